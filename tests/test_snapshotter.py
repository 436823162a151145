"""The containerd snapshotter's service (unionfuse/snapshotter) over a real gRPC channel on
a tmp unix socket, with real unionfuse mounts; no containerd here."""

from __future__ import annotations

import os
import subprocess

import pytest

grpc = pytest.importorskip("grpc")

from unionfuse.snapshotter import service, store as st  # noqa: E402
from unionfuse.snapshotter._proto import snapshots_pb2 as pb, snapshots_pb2_grpc as pb_grpc  # noqa: E402


@pytest.fixture
def snap(tmp_path):
    root = tmp_path / "root"
    s = st.Store(str(root))
    sock = str(tmp_path / "snap.sock")
    server = service.start_server(s, sock)
    ch = grpc.insecure_channel("unix:" + sock)
    stub = pb_grpc.SnapshotsStub(ch)
    try:
        yield stub, s, root
    finally:
        ch.close()
        server.stop(0).wait()
        for mp in st._mounts_under(str(root)):
            subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True)


def code(fn, *a):
    with pytest.raises(grpc.RpcError) as ei:
        fn(*a)
    return ei.value.code()


def test_prepare_commit_chain_and_errors(snap):
    stub, s, root = snap
    r = stub.Prepare(pb.PrepareSnapshotRequest(key="k1", labels={"a": "1"}))
    (m,) = r.mounts
    assert m.type == "bind" and "rw" in m.options
    with open(os.path.join(m.source, "hello"), "w") as f:
        f.write("one")
    stub.Commit(pb.CommitSnapshotRequest(key="k1", name="c1", labels={"x": "y"}))
    info = stub.Stat(pb.StatSnapshotRequest(key="c1")).info
    assert info.kind == pb.COMMITTED and dict(info.labels) == {"x": "y"}
    assert stub.Usage(pb.UsageRequest(key="c1")).inodes >= 2
    assert not os.path.ismount(m.source)

    r2 = stub.Prepare(pb.PrepareSnapshotRequest(key="k2", parent="c1")).mounts[0]
    with open(os.path.join(r2.source, "hello")) as f:
        assert f.read() == "one"
    os.unlink(os.path.join(r2.source, "hello"))  # a whiteout in k2's upper
    stub.Commit(pb.CommitSnapshotRequest(key="k2", name="c2"))
    v = stub.View(pb.ViewSnapshotRequest(key="v", parent="c2")).mounts[0]
    assert "ro" in v.options and not os.path.exists(os.path.join(v.source, "hello"))
    assert stub.Stat(pb.StatSnapshotRequest(key="v")).info.parent == "c2"

    # containerd's error codes
    assert code(stub.Stat, pb.StatSnapshotRequest(key="nope")) == grpc.StatusCode.NOT_FOUND
    assert code(stub.Mounts, pb.MountsRequest(key="nope")) == grpc.StatusCode.NOT_FOUND
    assert code(stub.Prepare, pb.PrepareSnapshotRequest(key="k3", parent="missing")) == grpc.StatusCode.NOT_FOUND
    assert code(stub.Prepare, pb.PrepareSnapshotRequest(key="v", parent="c2")) == grpc.StatusCode.ALREADY_EXISTS
    assert code(stub.Commit, pb.CommitSnapshotRequest(key="v", name="c3")) == grpc.StatusCode.FAILED_PRECONDITION
    assert code(stub.Commit, pb.CommitSnapshotRequest(key="gone", name="c3")) == grpc.StatusCode.NOT_FOUND
    assert code(stub.Remove, pb.RemoveSnapshotRequest(key="c1")) == grpc.StatusCode.FAILED_PRECONDITION
    assert code(stub.Mounts, pb.MountsRequest(key="c1")) == grpc.StatusCode.FAILED_PRECONDITION
    assert code(stub.Prepare, pb.PrepareSnapshotRequest(key="k4", parent="v")) == grpc.StatusCode.INVALID_ARGUMENT
    assert st._mounts_under(str(root)) == [v.source]  # no mount left by a failed call

    # list with filters (containerd's syntax)
    names = lambda *f: sorted(i.name for r in stub.List(pb.ListSnapshotsRequest(filters=list(f))) for i in r.info)
    assert names() == ["c1", "c2", "v"]
    assert names("kind==committed") == ["c1", "c2"]
    assert names("parent==c1", "name==v") == ["c2", "v"]
    assert names('labels."x"==y') == ["c1"]
    assert names("name~=^c,kind!=view") == ["c1", "c2"]
    assert code(lambda r: list(stub.List(r)), pb.ListSnapshotsRequest(filters=["=="])) == grpc.StatusCode.INVALID_ARGUMENT

    # update: labels only
    from google.protobuf import field_mask_pb2
    u = stub.Update(pb.UpdateSnapshotRequest(info=pb.Info(name="c1", labels={"n": "2"}),
                                             update_mask=field_mask_pb2.FieldMask(paths=["labels.n"])))
    assert dict(u.info.labels) == {"x": "y", "n": "2"}
    assert code(stub.Update, pb.UpdateSnapshotRequest(
        info=pb.Info(name="c1"), update_mask=field_mask_pb2.FieldMask(paths=["parent"]))) == grpc.StatusCode.INVALID_ARGUMENT

    # remove: unmounts and deletes
    stub.Remove(pb.RemoveSnapshotRequest(key="v"))
    assert not os.path.exists(v.source) and st._mounts_under(str(root)) == []


def test_state_survives_restart(snap, tmp_path):
    stub, s, root = snap
    m = stub.Prepare(pb.PrepareSnapshotRequest(key="a")).mounts[0]
    stub.Prepare(pb.PrepareSnapshotRequest(key="b"))
    with open(os.path.join(m.source, "f"), "w") as f:
        f.write("x")
    # the mount of "a" dies (daemon gone): a new store finds and re-mounts it
    subprocess.run(["fusermount3", "-u", "-z", m.source], check=True)
    os.makedirs(os.path.join(root, "snapshots", "new-leftover"))
    s2 = st.Store(str(root))
    s2.restore()
    assert not os.path.exists(os.path.join(root, "snapshots", "new-leftover"))
    assert os.path.ismount(m.source)
    with open(os.path.join(m.source, "f")) as f:
        assert f.read() == "x"
    assert {i.name for i in s2.list([])} == {"a", "b"}


def test_filter_parser():
    assert st.parse_filter('labels."containerd.io/gc.root",name==x') == [
        (["labels", "containerd.io/gc.root"], None, None), (["name"], "==", "x")]
    for bad in ("", "name==", 'labels."x', "name==a;"):
        if bad == "name==a;":
            assert st.parse_filter(bad) == [(["name"], "==", "a;")]
            continue
        with pytest.raises(st.InvalidArgument):
            st.parse_filter(bad)
