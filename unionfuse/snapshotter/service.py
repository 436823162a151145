"""containerd's snapshots gRPC service (containerd.services.snapshots.v1.Snapshots) over a
unix socket, for containerd's `[proxy_plugins]` (type "snapshot").  Errors go back as the
gRPC status codes containerd's errdefs maps (NotFound, AlreadyExists, FailedPrecondition,
InvalidArgument, Unimplemented)."""

from __future__ import annotations

import logging
import os
import signal
import stat
import threading
from concurrent import futures

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from ..errors import UnionfuseError, UsageError
from ._proto import mount_pb2, snapshots_pb2 as pb, snapshots_pb2_grpc as pb_grpc
from . import store as st

log = logging.getLogger("unionfuse.snapshotter")

DEFAULT_ADDRESS = "/run/unionfuse/snapshotter.sock"
DEFAULT_ROOT = "/var/lib/unionfuse/snapshotter"

_KIND_TO_PB = {st.VIEW: pb.VIEW, st.ACTIVE: pb.ACTIVE, st.COMMITTED: pb.COMMITTED}
_CODES = [
    (st.NotFound, grpc.StatusCode.NOT_FOUND),
    (st.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (st.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (st.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
]


def _ts(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def _info_pb(i: st.Info) -> pb.Info:
    return pb.Info(name=i.name, parent=i.parent, kind=_KIND_TO_PB[i.kind],
                   created_at=_ts(i.created), updated_at=_ts(i.updated), labels=i.labels)


def _mounts_pb(mounts: list[st.Mount]) -> list:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=m.options) for m in mounts]


def _abort(context, e: st.SnapshotError):
    code = next((c for cls, c in _CODES if isinstance(e, cls)), grpc.StatusCode.UNKNOWN)
    context.abort(code, e.message)


def _rpc(fn):
    """Run a handler; store errors become containerd's status codes, the rest Unknown."""
    name = fn.__name__

    def wrapper(self, request, context):
        log.debug("%s %s", name, str(request).replace("\n", " "))
        try:
            return fn(self, request, context)
        except st.SnapshotError as e:
            log.debug("%s: %s", name, e.message)
            _abort(context, e)
        except UnionfuseError as e:
            log.warning("%s: %s", name, e.message)
            context.abort(grpc.StatusCode.UNKNOWN, e.message)
        except OSError as e:
            log.warning("%s: %s", name, e)
            context.abort(grpc.StatusCode.UNKNOWN, str(e))

    wrapper.__name__ = name
    return wrapper


class SnapshotsServicer(pb_grpc.SnapshotsServicer):
    def __init__(self, store: st.Store):
        self.store = store

    @_rpc
    def Prepare(self, request, context):
        m = self.store.create(st.ACTIVE, request.key, request.parent, dict(request.labels))
        return pb.PrepareSnapshotResponse(mounts=_mounts_pb(m))

    @_rpc
    def View(self, request, context):
        m = self.store.create(st.VIEW, request.key, request.parent, dict(request.labels))
        return pb.ViewSnapshotResponse(mounts=_mounts_pb(m))

    @_rpc
    def Mounts(self, request, context):
        return pb.MountsResponse(mounts=_mounts_pb(self.store.mounts(request.key)))

    @_rpc
    def Commit(self, request, context):
        self.store.commit(request.name, request.key, dict(request.labels))
        return empty_pb2.Empty()

    @_rpc
    def Remove(self, request, context):
        self.store.remove(request.key)
        return empty_pb2.Empty()

    @_rpc
    def Stat(self, request, context):
        return pb.StatSnapshotResponse(info=_info_pb(self.store.stat(request.key)))

    @_rpc
    def Update(self, request, context):
        i = request.info
        info = st.Info(name=i.name, parent=i.parent, kind="", created=0, updated=0,
                       labels=dict(i.labels))
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        return pb.UpdateSnapshotResponse(info=_info_pb(self.store.update(info, paths)))

    def List(self, request, context):  # a stream: errors are mapped before the first reply
        try:
            infos = self.store.list(list(request.filters))
        except st.SnapshotError as e:
            _abort(context, e)
        # in batches of 100, as containerd's own proxy service sends them
        for i in range(0, len(infos), 100):
            yield pb.ListSnapshotsResponse(info=[_info_pb(x) for x in infos[i:i + 100]])

    @_rpc
    def Usage(self, request, context):
        size, inodes = self.store.usage(request.key)
        return pb.UsageResponse(size=size, inodes=inodes)

    @_rpc
    def Cleanup(self, request, context):
        self.store.cleanup()
        return empty_pb2.Empty()


def start_server(store: st.Store, address: str, workers: int = 8) -> grpc.Server:
    """Listen on the unix socket *address* (a stale socket file is replaced)."""
    d = os.path.dirname(os.path.abspath(address))
    os.makedirs(d, mode=0o755, exist_ok=True)
    try:
        if stat.S_ISSOCK(os.lstat(address).st_mode):
            os.unlink(address)
        else:
            raise UsageError(f"{address}: exists and is not a socket")
    except FileNotFoundError:
        pass
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="snap"),
                         options=[("grpc.max_receive_message_length", 16 << 20),
                                  ("grpc.max_send_message_length", 16 << 20)])
    pb_grpc.add_SnapshotsServicer_to_server(SnapshotsServicer(store), server)
    old = os.umask(0o177)  # the socket: root only
    try:
        if server.add_insecure_port("unix:" + os.path.abspath(address)) == 0:
            raise UsageError(f"cannot listen on {address}")
    finally:
        os.umask(old)
    server.start()
    return server


def main(address: str, root: str, debug: bool = False) -> int:
    """`unionfuse snapshotter`: serve until SIGTERM/SIGINT.  Mounts stay when it stops
    (running containers keep their rootfs); a restart finds them again."""
    from .. import mount as mountmod

    if os.geteuid() != 0:
        raise UsageError("the snapshotter must run as root (it mounts and chowns)")
    os.makedirs(root, mode=0o711, exist_ok=True)
    store = st.Store(root, st.Mounter(debug=debug))
    store.restore()
    server = start_server(store, address)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("serving containerd snapshots API on %s (root %s)", address, root)
    mountmod.sd_notify("READY=1")
    while not stop.wait(3600):
        pass
    mountmod.sd_notify("STOPPING=1")
    server.stop(grace=5).wait()
    try:
        os.unlink(address)
    except OSError:
        pass
    return 0
