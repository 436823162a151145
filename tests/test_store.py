"""The image store (no mounts): layers by diff_id, images, refs, locking, staging and
crash cleanup; and the image commands through the CLI (`python3 -m unionfuse --root R`)."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from test_tarlayer import E, mktar
from unionfuse.store import imageconfig
from unionfuse.store.store import Conflict, NotFound, Store, StoreError, normalize_ref

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TAR1 = mktar([E("bin/", "dir"), E("bin/sh", data=b"#!sh\n", mode=0o755), E("etc/passwd", data=b"root:x:0:0::/:/bin/sh\n")])
TAR2 = mktar([E("etc/hostname", data=b"two\n")])


def layer(store: Store, data: bytes = TAR1) -> str:
    return store.add_layer_tar(io.BytesIO(data))


def image(store: Store, data: bytes = TAR1, created_by: str = "x", **kw):
    return store.put_image(imageconfig.new_config([layer(store, data)], created_by=created_by, **kw))


def listing(root) -> dict:
    """Everything under a store root (paths, kinds, file contents' sha)."""
    out = {}
    for dp, dns, fns in os.walk(root):
        for n in dns + fns:
            p = os.path.join(dp, n)
            st = os.lstat(p)
            h = None
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    h = hashlib.sha256(f.read()).hexdigest()
            out[os.path.relpath(p, root)] = (stat.S_IFMT(st.st_mode), h)
    return out


# -- layers -------------------------------------------------------------------------------


def test_root_layout_and_mode(tmp_path):
    root = tmp_path / "r"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    s = Store(str(root))
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    for d in ("layers", "images", "containers", "tmp"):
        assert os.path.isdir(root / d)
    new = tmp_path / "a/b/new"
    Store(str(new))
    assert stat.S_IMODE(os.stat(new).st_mode) == 0o700
    assert s.root == str(root)


def test_root_not_usable(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(StoreError, match="can't use store root"):
        Store(str(f))


def test_env_root(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIONFUSE_ROOT", str(tmp_path / "env"))
    assert Store().root == str(tmp_path / "env")
    assert Store(str(tmp_path / "arg")).root == str(tmp_path / "arg")


def test_layer_dedup(tmp_path):
    s = Store(str(tmp_path / "r"))
    d1 = layer(s)
    d2 = layer(s)
    assert d1 == d2 == "sha256:" + hashlib.sha256(TAR1).hexdigest()
    assert s.all_layers() == [d1]
    assert os.listdir(tmp_path / "r/layers") == [d1[7:]]
    assert os.listdir(tmp_path / "r/tmp") == [f"{os.getpid()}-lease-{d1[7:]}"]
    info = s.layer_info(d1)
    assert info["diff_id"] == d1 and info["size"] == len(TAR1)
    assert (tmp_path / "r/layers" / d1[7:] / "diff/bin/sh").read_bytes() == b"#!sh\n"
    assert stat.S_IMODE(os.stat(s.layer_diff(d1)).st_mode) == 0o755


def test_layer_root_mode_ignores_umask(tmp_path):
    s = Store(str(tmp_path / "r"))
    old = os.umask(0o077)
    try:
        d = layer(s, TAR2)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(s.layer_diff(d)).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(os.path.join(s.layer_diff(d), "etc")).st_mode) == 0o755


def test_bad_tar_leaves_nothing(tmp_path):
    s = Store(str(tmp_path / "r"))
    layer(s)
    before = listing(s.root)
    from unionfuse.store.tarlayer import LayerTarError

    for bad in (b"garbage" * 100, TAR1[:700], mktar([E("../x", data=b"")])):
        with pytest.raises(LayerTarError):
            s.add_layer_tar(io.BytesIO(bad), label="bad.tar")
        assert listing(s.root) == before


def test_layer_from_dir_normalises(tmp_path):
    s = Store(str(tmp_path / "r"))
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d/f").write_text("f")
    os.mknod(src / "gone", stat.S_IFCHR, 0)
    d1 = s.add_layer_from_dir(str(src))
    d2 = s.add_layer_from_dir(str(src))
    assert d1 == d2 and s.all_layers() == [d1]
    st = os.lstat(os.path.join(s.layer_diff(d1), "gone"))
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    buf = io.BytesIO()
    assert s.layer_tar(d1, buf) == d1  # the stored layer packs back to its own diff_id


# -- images and refs ----------------------------------------------------------------------


def test_put_image_and_resolve(tmp_path):
    s = Store(str(tmp_path / "r"))
    im = image(s)
    assert im.id == "sha256:" + hashlib.sha256((tmp_path / "r/images" / (im.id[7:] + ".json")).read_bytes()).hexdigest()
    assert len(im.short_id) == 12
    s.tag(im, "busybox")
    s.tag(im, "reg.example:5000/team/app:v1.2")
    for name in ("busybox", "busybox:latest", im.id, im.id[7:], im.short_id, im.id[7:11],
                 "sha256:" + im.id[7:19], "reg.example:5000/team/app:v1.2"):
        assert s.resolve(name).id == im.id, name
    for name in ("busybox:other", "nope", "BUSYBOX", "reg.example:5000/team/app", im.id[7:10], "", "sha256:"):
        with pytest.raises(NotFound):
            s.resolve(name)
    assert s.refs_of(im.id) == ["busybox:latest", "reg.example:5000/team/app:v1.2"]


def test_resolve_ambiguous_prefix(tmp_path):
    s = Store(str(tmp_path / "r"))
    ims = []
    i = 0
    while True:  # two images whose ids share a 4-hex prefix
        ims.append(s.put_image(imageconfig.new_config([], created_by=f"n{i}")))
        i += 1
        prefixes = {}
        for im in ims:
            prefixes.setdefault(im.id[7:11], []).append(im)
        clash = [v for v in prefixes.values() if len(v) > 1]
        if clash:
            a, b = clash[0][:2]
            break
    with pytest.raises(Conflict, match="ambiguous"):
        s.resolve(a.id[7:11])
    common = os.path.commonprefix([a.id[7:], b.id[7:]])
    assert s.resolve(a.id[7:7 + len(common) + 1]).id == a.id
    # a ref named like a prefix wins over the prefix
    s.tag(b, a.id[7:11])
    assert s.resolve(a.id[7:11]).id == b.id


def test_put_image_needs_its_layers(tmp_path):
    s = Store(str(tmp_path / "r"))
    with pytest.raises(NotFound):
        s.put_image(imageconfig.new_config(["sha256:" + "0" * 64], created_by=""))
    assert os.listdir(tmp_path / "r/images") == []


@pytest.mark.parametrize("ref,want", [
    ("busybox", "busybox:latest"),
    ("busybox:1.36", "busybox:1.36"),
    ("library/busybox:v1_x-Y.z", "library/busybox:v1_x-Y.z"),
    ("a.b/c", "a.b/c:latest"),
    ("localhost/x", "localhost/x:latest"),
    ("localhost:5000/x", "localhost:5000/x:latest"),
    ("reg.example.com:443/a/b/c:t", "reg.example.com:443/a/b/c:t"),
    ("Reg.Example/x:t", "Reg.Example/x:t"),
    ("my-app__x.y", "my-app__x.y:latest"),
    ("a---b", "a---b:latest"),
])
def test_normalize_ref_good(ref, want):
    assert normalize_ref(ref) == want


@pytest.mark.parametrize("ref", [
    "", ":", "BusyBox", "busybox:", ":tag", "busy box", "a//b", "/a", "a/", "-a", "a-", "a..b",
    "a___b", "a:b:c", "busybox:-x", "busybox:.x", "busybox:" + "t" * 129, "foo\n", "foo:bar\n",
    "foo:t\u00e5g", "f\u00f6\u00f6", "foo@sha256:" + "0" * 64, "-reg.io/x", "reg.io:port/x",
    "a/" * 130 + "b",
])
def test_normalize_ref_bad(ref):
    with pytest.raises(StoreError, match="invalid reference format"):
        normalize_ref(ref)


def test_tag_untag(tmp_path):
    s = Store(str(tmp_path / "r"))
    a = image(s, TAR1, "a")
    b = image(s, TAR2, "b")
    assert s.tag(a, "x") == "x:latest"
    s.tag(a, "x:1")
    s.tag(b, "x")  # moves the tag
    assert s.refs() == {"x:latest": b.id, "x:1": a.id}
    assert s.untag("x:1") == a.id
    assert s.untag("x:1") is None
    assert s.refs() == {"x:latest": b.id}
    with pytest.raises(StoreError):
        s.tag(a, "Bad")
    assert json.loads((tmp_path / "r/refs.json").read_text()) == {"x:latest": b.id}


def test_tag_of_removed_image_refused(tmp_path):
    s = Store(str(tmp_path / "r"))
    a = image(s)
    s.delete_image(a)
    with pytest.raises(NotFound):
        s.tag(a, "dangling")
    assert s.refs() == {}


def test_put_image_with_ref(tmp_path):
    s = Store(str(tmp_path / "r"))
    d = layer(s)
    im = s.put_image(imageconfig.new_config([d], created_by=""), ref="named:v1")
    assert s.refs() == {"named:v1": im.id}
    with pytest.raises(StoreError, match="invalid reference"):
        s.put_image(imageconfig.new_config([d], created_by="other"), ref="Bad")
    assert len(s.image_ids()) == 1  # nothing written for a bad name


def test_refs_written_atomically(tmp_path, monkeypatch):
    """A crash while writing refs.json (here: the write fails) leaves the old file."""
    s = Store(str(tmp_path / "r"))
    a = image(s)
    s.tag(a, "keep")
    before = (tmp_path / "r/refs.json").read_bytes()
    real_write = os.write

    def boom(fd, data):
        real_write(fd, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", boom)
    with pytest.raises(OSError):
        s.tag(a, "new")
    monkeypatch.setattr(os, "write", real_write)
    assert (tmp_path / "r/refs.json").read_bytes() == before
    # the half-written temp file of this (live) process stays until it is gone
    leftovers = [n for n in os.listdir(tmp_path / "r") if n.endswith(".tmp")]
    assert len(leftovers) == 1


def test_dead_process_tmp_files_cleaned(tmp_path):
    s = Store(str(tmp_path / "r"))
    dead = _dead_pid()
    (tmp_path / f"r/refs.json.{dead}.abcd1234.tmp").write_text("{")
    (tmp_path / f"r/images/{'1' * 64}.json.{dead}.abcd1234.tmp").write_text("{")
    mine = tmp_path / f"r/refs.json.{os.getpid()}.abcd1234.tmp"
    mine.write_text("{")
    (tmp_path / f"r/tmp/{dead}-stagingXYZ/diff/x").mkdir(parents=True)
    (tmp_path / f"r/tmp/{dead}-lease-{'2' * 64}").write_text("")
    (tmp_path / f"r/tmp/{os.getpid()}-mine").mkdir()
    Store(s.root)
    assert sorted(os.listdir(tmp_path / "r/tmp")) == [f"{os.getpid()}-mine"]
    assert os.listdir(tmp_path / "r/images") == []
    assert sorted(n for n in os.listdir(tmp_path / "r") if n.endswith(".tmp")) == [mine.name]


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_delete_image_and_gc(tmp_path):
    s = Store(str(tmp_path / "r"))
    a = image(s, TAR1, "a")
    b = s.put_image(imageconfig.child_config(a.config, layer(s, TAR2), "b"))
    s.tag(a, "a")
    s.tag(b, "b")
    assert s.gc_layers(set()) == []
    s.delete_image(b)
    assert s.refs() == {"a:latest": a.id}
    assert s.gc_layers(set()) == [b.diff_ids[1]]
    assert sorted(s.all_layers()) == [a.diff_ids[0]]
    s.delete_image(a)
    assert s.gc_layers({a.diff_ids[0]}) == []  # kept: e.g. a container uses it
    assert s.gc_layers(set()) == [a.diff_ids[0]]
    assert s.all_layers() == [] and os.listdir(tmp_path / "r/layers") == []
    assert os.listdir(tmp_path / "r/tmp") == []


def test_gc_spares_layer_not_yet_in_an_image(tmp_path):
    """A concurrent rmi/prune between an import's layer and its image must not delete
    the layer (else put_image fails, or worse, an image points at nothing)."""
    s = Store(str(tmp_path / "r"))
    d = layer(s)
    other = Store(s.root)  # another command's view
    assert other.gc_layers(set()) == []
    assert s.has_layer(d)
    im = s.put_image(imageconfig.new_config([d], created_by=""))
    assert os.listdir(tmp_path / "r/tmp") == []  # lease dropped with the image
    s.delete_image(im)
    assert other.gc_layers(set()) == [d]


def _gc_in_child(root, q):
    q.put(Store(root).gc_layers(set()))


def test_lease_of_dead_process_ignored(tmp_path):
    root = str(tmp_path / "r")
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_layer_in_child, args=(root, q))
    p.start()
    d = q.get(timeout=30)
    p.join(30)
    assert Store(root).gc_layers(set()) == [d]


def _layer_in_child(root, q):
    q.put(Store(root).add_layer_tar(io.BytesIO(TAR1)))


# -- concurrency and crashes --------------------------------------------------------------


def _tagger(root, worker, n, barrier):
    s = Store(root)
    im = s.put_image(imageconfig.new_config([], created_by=f"w{worker}"))
    barrier.wait()
    for i in range(n):
        s.tag(im, f"w{worker}:t{i}")
        s.tag(im, "shared")
        if i % 3 == 0:
            s.untag(f"w{worker}:t{i}")
            s.tag(im, f"w{worker}:t{i}")


def test_concurrent_tags_no_lost_updates(tmp_path):
    root = str(tmp_path / "r")
    Store(root)
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_tagger, args=(root, w, 10, barrier)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    refs = Store(root).refs()
    assert len(refs) == 41
    assert {r for r in refs if r != "shared:latest"} == {f"w{w}:t{i}" for w in range(4) for i in range(10)}
    ids = {refs[f"w{w}:t0"] for w in range(4)}
    assert len(ids) == 4 and refs["shared:latest"] in ids
    assert [n for n in os.listdir(root) if n.endswith(".tmp")] == []


def _importer(root, worker, barrier):
    barrier.wait()
    s = Store(root)
    for i in range(5):
        d = s.add_layer_tar(io.BytesIO(TAR1 if i % 2 else TAR2))
        im = s.put_image(imageconfig.new_config([d], created_by=f"w{worker}-{i}"))
        s.tag(im, f"imp{worker}:{i}")
        if i == 2:
            s.gc_layers(set())  # a concurrent prune


def test_concurrent_imports(tmp_path):
    root = str(tmp_path / "r")
    Store(root)
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_importer, args=(root, w, barrier)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    s = Store(root)
    assert sorted(s.all_layers()) == sorted({"sha256:" + hashlib.sha256(t).hexdigest() for t in (TAR1, TAR2)})
    refs = s.refs()
    assert len(refs) == 20
    for r in refs:
        assert all(s.has_layer(d) for d in s.resolve(r).diff_ids)
    assert os.listdir(os.path.join(root, "tmp")) == []


def cli(root, *args, input=None, env=None, check=True):
    e = dict(os.environ)
    e.pop("UNIONFUSE_ROOT", None)
    e.update(env or {})
    argv = [sys.executable, "-m", "unionfuse"] + (["--root", str(root)] if root else []) + list(args)
    r = subprocess.run(argv, input=input, capture_output=True, cwd=REPO, env=e, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"{args}: rc={r.returncode} {r.stderr.decode()}")
    return r


def test_crash_mid_import(tmp_path):
    """SIGKILL an import half-way through a tar (fed through a pipe, so 'half-way' is
    exact): nothing references the half-made layer, and the next Store() removes it."""
    root = tmp_path / "r"
    Store(str(root))
    big = mktar([E("a", data=b"a"), E("big", data=os.urandom(8 << 20)), E("z", data=b"z")])
    argv = [sys.executable, "-m", "unionfuse", "--root", str(root), "import", "-", "crashy"]
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         cwd=REPO)
    try:
        p.stdin.write(big[: len(big) // 2])
        p.stdin.flush()
        deadline = time.time() + 30
        staged = []
        while time.time() < deadline:
            # (import spools the tar into a staging dir first; either way, staged bytes)
            staged = [os.path.join(dp, f) for dp, _, fns in os.walk(root / "tmp") for f in fns]
            if any(os.path.getsize(f) > 1 << 20 for f in staged):
                break
            time.sleep(0.02)
        assert staged, "the import never started writing"
        p.send_signal(signal.SIGKILL)
    finally:
        p.kill()
        p.wait(10)
        p.stdin.close()
    assert p.returncode == -signal.SIGKILL
    assert len(os.listdir(root / "tmp")) == 1
    s = Store(str(root))
    assert os.listdir(root / "tmp") == []
    assert s.refs() == {} and s.image_ids() == [] and s.all_layers() == []
    assert os.listdir(root / "layers") == []
    # and the same import completes afterwards
    cli(root, "import", "-", "crashy", input=big)
    assert list(Store(str(root)).refs()) == ["crashy:latest"]


# -- CLI ----------------------------------------------------------------------------------


@pytest.fixture
def tars(tmp_path):
    t1 = tmp_path / "one.tar"
    t1.write_bytes(TAR1)
    t2 = tmp_path / "two.tar.gz"
    import gzip

    t2.write_bytes(gzip.compress(TAR2))
    return t1, t2


def test_cli_import_forms(tmp_path, tars):
    t1, t2 = tars
    root = tmp_path / "r"
    out = cli(root, "import", str(t1), "one", "--change", 'CMD ["sh"]', "-c", "ENV A=1",
              "--change", "WORKDIR /w").stdout.decode().strip()
    assert out.startswith("sha256:") and len(out) == 71
    info = json.loads(cli(root, "inspect", "one").stdout)
    assert len(info) == 1
    cfg = info[0]["Config"]
    assert cfg["Cmd"] == ["sh"] and "A=1" in cfg["Env"] and cfg["WorkingDir"] == "/w"
    assert info[0]["Id"] == out and info[0]["RepoTags"] == ["one:latest"]
    assert info[0]["RootFS"]["Layers"] == ["sha256:" + hashlib.sha256(TAR1).hexdigest()]
    # compressed tar from stdin: same diff_id as the uncompressed tar
    cli(root, "import", "-", "two:gz", input=t2.read_bytes())
    info = json.loads(cli(root, "inspect", "two:gz").stdout)[0]
    assert info["RootFS"]["Layers"] == ["sha256:" + hashlib.sha256(TAR2).hexdigest()]
    # a directory
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc/hostname").write_text("dir\n")
    cli(root, "import", str(src), "fromdir:v1", "-c", "ENTRYPOINT /bin/sh")
    info = json.loads(cli(root, "inspect", "fromdir:v1").stdout)[0]
    assert info["Config"]["Entrypoint"] == ["/bin/sh", "-c", "/bin/sh"]
    d = info["RootFS"]["Layers"][0]
    assert (root / "layers" / d[7:] / "diff/etc/hostname").read_text() == "dir\n"
    # no name: a dangling image
    iid = cli(root, "import", str(t1)).stdout.decode().strip()
    assert iid != out  # another "created" time, same layer
    assert len(os.listdir(root / "layers")) == 3


def test_cli_images_history(tmp_path, tars):
    t1, _ = tars
    root = tmp_path / "r"
    iid = cli(root, "import", str(t1), "one:v1", "-m", "first import").stdout.decode().strip()
    cli(root, "tag", "one:v1", "reg.local:5000/one")
    lines = cli(root, "images").stdout.decode().splitlines()
    assert lines[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"]
    rows = [ln.split() for ln in lines[1:]]
    assert sorted((r[0], r[1], r[2]) for r in rows) == [("one", "v1", iid[7:19]),
                                                        ("reg.local:5000/one", "latest", iid[7:19])]
    assert cli(root, "images", "-q").stdout.decode().split() == [iid[7:19]]

    hist = cli(root, "history", "one:v1").stdout.decode().splitlines()
    header = hist[0]
    cols = ["IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT"]
    starts = [header.index(c) for c in cols]
    assert starts == sorted(starts)
    assert len(hist) == 2
    row = hist[1]
    assert row[starts[0]:starts[1]].strip() == iid[7:19]
    assert row[starts[4]:].strip() == "first import"
    assert row[starts[3]:starts[4]].strip().endswith("kB") or row[starts[3]:starts[4]].strip().endswith("B")
    full = cli(root, "history", "--no-trunc", iid[7:19]).stdout.decode().splitlines()
    assert full[1].split()[0] == iid
    assert cli(root, "history", "-q", "one:v1").stdout.decode().split() == [iid[7:19]]


def test_cli_rmi(tmp_path, tars):
    t1, t2 = tars
    root = tmp_path / "r"
    iid = cli(root, "import", str(t1), "one").stdout.decode().strip()
    cli(root, "tag", "one", "alias:x")
    cli(root, "import", str(t2), "two")
    # a second name: only the name goes
    out = cli(root, "rmi", "alias:x").stdout.decode()
    assert out.strip() == "Untagged: alias:x"
    assert Store(str(root)).resolve("one").id == iid
    out = cli(root, "rmi", "one").stdout.decode().splitlines()
    assert out == ["Untagged: one:latest", f"Deleted: {iid}"]
    s = Store(str(root))
    assert list(s.refs()) == ["two:latest"]
    assert s.all_layers() == ["sha256:" + hashlib.sha256(TAR2).hexdigest()]  # layer gc'd
    assert len(s.image_ids()) == 1


def _one_error_line(r):
    assert r.returncode != 0
    err = r.stderr.decode()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("unionfuse: "), err
    assert "Traceback" not in err
    return lines[0]


def test_cli_bad_input_changes_nothing(tmp_path, tars):
    t1, _ = tars
    root = tmp_path / "r"
    iid = cli(root, "import", str(t1), "one").stdout.decode().strip()
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar" * 300)
    truncated = tmp_path / "trunc.tar"
    truncated.write_bytes(mktar([E("x", data=b"1"), E("big", data=os.urandom(100000))])[:60000])
    hostile = tmp_path / "hostile.tar"
    hostile.write_bytes(mktar([E("a", "sym", link="/etc"), E("a/passwd", data=b"pwned")]))
    before = listing(root)
    cases = [
        ("inspect", "nope"), ("history", "nope"), ("tag", "nope", "x"), ("rmi", "nope"),
        ("history", "sha256:" + "f" * 64),
        ("import", str(garbage), "g"), ("import", str(truncated), "t"), ("import", str(hostile), "h"),
        ("import", str(tmp_path / "missing.tar"), "m"),
        ("import", str(t1), "BAD"), ("import", str(t1), "bad:"), ("tag", "one", "Bad Name"),
        ("tag", "one", "x:" + "y" * 200), ("import", str(t1), "x", "--change", "FROB 1"),
    ]
    msgs = {}
    for args in cases:
        r = cli(root, *args, check=False)
        msgs[args] = _one_error_line(r)
        assert listing(root) == before, args
    assert "trunc.tar" in msgs[("import", str(truncated), "t")] and "big" in msgs[("import", str(truncated), "t")]
    assert "'a/passwd'" in msgs[("import", str(hostile), "h")]
    assert "invalid reference format" in msgs[("import", str(t1), "BAD")]
    assert Store(str(root)).resolve("one").id == iid
    # the lease an import took on its layer goes with the process
    assert os.listdir(root / "tmp") == []
    # stdin garbage too
    r = cli(root, "import", "-", "s", input=b"\x1f\x8b" + b"junk" * 100, check=False)
    _one_error_line(r)
    assert listing(root) == before


def test_cli_root_override(tmp_path, tars):
    t1, _ = tars
    env_root = tmp_path / "env"
    arg_root = tmp_path / "arg"
    cli(None, "import", str(t1), "viaenv", env={"UNIONFUSE_ROOT": str(env_root)})
    assert "viaenv:latest" in Store(str(env_root)).refs()
    cli(arg_root, "import", str(t1), "viaarg", env={"UNIONFUSE_ROOT": str(env_root)})
    assert "viaarg:latest" in Store(str(arg_root)).refs()
    assert "viaarg:latest" not in Store(str(env_root)).refs()
    assert stat.S_IMODE(os.stat(env_root).st_mode) == 0o700
    assert not os.path.exists("/var/lib/unionfuse/refs.json") or \
        "viaenv:latest" not in json.load(open("/var/lib/unionfuse/refs.json"))


def test_cli_bad_change_stores_no_layer(tmp_path, tars):
    t1, t2 = tars
    root = tmp_path / "r"
    cli(root, "import", str(t1), "one")
    before = listing(root)
    _one_error_line(cli(root, "import", str(t2), "x", "--change", "FROB 1", check=False))
    assert listing(root) == before


def test_killed_builder_mount_is_cleared_not_deleted_through(tmp_path):
    """A dead process's staging dir with a live union mount inside (a builder killed
    mid-COPY): Store() unmounts it (daemon gone) instead of deleting through the mount."""
    from unionfuse import mount as mountmod

    root = tmp_path / "r"
    Store(str(root))
    stage = root / "tmp" / "999999999-deadbuild"
    for d in ("low", "upper", "work", "rootfs"):
        (stage / d).mkdir(parents=True)
    (stage / "low" / "keep").write_text("k")
    lower = tmp_path / "outside-lower"
    lower.mkdir()
    (lower / "precious").write_text("p")
    pid = mountmod.mount_layers("fuse", [str(lower)], str(stage / "upper"), str(stage / "work"),
                                str(stage / "rootfs"))
    try:
        assert (stage / "rootfs" / "precious").read_text() == "p"
        Store(str(root))  # the "next command"
        assert not mountmod.is_mounted(str(stage / "rootfs")) if stage.exists() else True
        assert not os.path.exists(stage)
        assert (lower / "precious").read_text() == "p"  # nothing deleted through the mount
        deadline = time.time() + 10
        while os.path.exists(f"/proc/{pid}") and time.time() < deadline:
            time.sleep(0.05)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(stage / "rootfs")], capture_output=True)
