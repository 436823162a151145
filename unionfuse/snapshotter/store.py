"""The snapshotter's state: snapshot records (one JSON file, replaced atomically), their
directories, and one unionfuse mount per active snapshot or view.  No gRPC here: the
service (service.py) translates these calls and errors to containerd's API.

Semantics follow containerd 1.6's overlay snapshotter and its metastore
(snapshots/overlay/overlay.go, snapshots/storage/bolt.go):

- A snapshot is active (writable), view (read-only) or committed (immutable).  Only a
  committed snapshot can be a parent.  An active snapshot is a unionfuse mount of the
  parent chain (top-most first) + the snapshot's own dir as the upper layer; a view is a
  read-only unionfuse mount of the chain.  containerd gets a bind mount of it.
- Commit unmounts the active snapshot (its daemon exits, so every change is on disk),
  syncs, and records the same dir as a committed snapshot under the new name.
- Records change only by replacing ROOT/metadata.json (temp file, fsync, rename, fsync of
  the dir): a crash leaves either the old or the new state, never a half-committed
  snapshot.  Dirs no record refers to (a crash mid-Prepare or mid-Remove) are removed at
  start-up and by Cleanup.

Layout under ROOT: metadata.json, empty/ (the lower of a snapshot with no parent),
snapshots/ID/{fs,work,mnt} (fs: the layer; work: the daemon's work dir; mnt: the mount).
"""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field

from ..errors import UnionfuseError

log = logging.getLogger("unionfuse.snapshotter")

ACTIVE, VIEW, COMMITTED = "active", "view", "committed"
KINDS = (ACTIVE, VIEW, COMMITTED)
MAX_LABEL = 4096  # containerd's labels.Validate: key + value


class SnapshotError(UnionfuseError):
    """Base of the errors containerd's errdefs know (the service maps each to a gRPC code)."""


class NotFound(SnapshotError):
    pass


class AlreadyExists(SnapshotError):
    pass


class FailedPrecondition(SnapshotError):
    pass


class InvalidArgument(SnapshotError):
    pass


@dataclass
class Info:
    name: str
    parent: str
    kind: str
    created: int  # ns since the epoch
    updated: int
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class Mount:
    type: str
    source: str
    options: list[str]


def _now() -> int:
    return time.time_ns()


def check_labels(labels: dict[str, str]) -> None:
    for k, v in labels.items():
        if len(k.encode()) + len(v.encode()) > MAX_LABEL:
            raise InvalidArgument(f"label key and value length ({len(k) + len(v)} bytes) "
                                  f"greater than maximum size ({MAX_LABEL} bytes), key: {k[:32]}")


def disk_usage(path: str) -> tuple[int, int]:
    """(bytes, inodes) of the tree at *path*, as containerd's fs.DiskUsage counts them:
    allocated blocks, each inode once, the root included, not crossing into mounts."""
    seen: set[int] = set()
    size = inodes = 0
    try:
        top = os.lstat(path)
    except FileNotFoundError:
        return 0, 0
    stack = [path]
    seen.add(top.st_ino)
    size += top.st_blocks * 512
    inodes += 1
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError:
            continue
        with it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                if st.st_dev != top.st_dev:
                    continue
                if st.st_ino not in seen:
                    seen.add(st.st_ino)
                    size += st.st_blocks * 512
                    inodes += 1
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
    return size, inodes


# -- filters (containerd's filters package syntax) --------------------------------------

_FIELD = re.compile(r"[A-Za-z0-9_]+")


def _quoted(s: str, i: int, q: str) -> tuple[str, int]:
    """A "..." (Go escapes) or /.../ token starting at s[i] == q: (text, index after)."""
    out = []
    i += 1
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            nxt = s[i + 1]
            out.append({"n": "\n", "t": "\t", "r": "\r"}.get(nxt, nxt) if q == '"' else
                       (nxt if nxt == "/" else "\\" + nxt))
            i += 2
            continue
        if c == q:
            return "".join(out), i + 1
        out.append(c)
        i += 1
    raise InvalidArgument(f"filter: unterminated quoted string in {s!r}")


def parse_filter(s: str) -> list[tuple[list[str], str | None, str | re.Pattern | None]]:
    """One filter string: selectors joined by ',' (all must match).  A selector is
    FIELD[.FIELD...] [OP VALUE] with OP one of == != ~=; fields or values may be quoted."""
    sels = []
    i, n = 0, len(s)

    def skip_ws():
        nonlocal i
        while i < n and s[i].isspace():
            i += 1

    while True:
        skip_ws()
        path = []
        while True:
            skip_ws()
            if i < n and s[i] in "\"/":
                part, i = _quoted(s, i, s[i])
            else:
                m = _FIELD.match(s, i)
                if not m:
                    raise InvalidArgument(f"filter: expected a field name at {i} in {s!r}")
                part, i = m.group(0), m.end()
            path.append(part)
            skip_ws()
            if i < n and s[i] == ".":
                i += 1
                continue
            break
        op = value = None
        if s.startswith(("==", "!=", "~="), i):
            op = s[i:i + 2]
            i += 2
            skip_ws()
            if i < n and s[i] in "\"/":
                value, i = _quoted(s, i, s[i])
            else:
                j = i
                while j < n and s[j] != ",":
                    j += 1
                value, i = s[i:j].strip(), j
                if not value:
                    raise InvalidArgument(f"filter: missing value after {op} in {s!r}")
            if op == "~=":
                try:
                    value = re.compile(value)
                except re.error as e:
                    raise InvalidArgument(f"filter: bad regular expression {value!r}: {e}") from None
        sels.append((path, op, value))
        skip_ws()
        if i >= n:
            return sels
        if s[i] != ",":
            raise InvalidArgument(f"filter: unexpected {s[i]!r} at {i} in {s!r}")
        i += 1


def _field(info: Info, path: list[str]) -> tuple[str, bool]:
    """containerd's snapshot adaptor (metadata/adaptors.go, adaptSnapshot)."""
    head = path[0]
    if head == "kind":
        return info.kind, True
    if head == "name":
        return info.name, True
    if head == "parent":
        return info.parent, True
    if head == "labels":
        key = ".".join(path[1:])
        if not key or key not in info.labels:
            return "", False
        return info.labels[key], True
    return "", False


def match_filters(info: Info, parsed: list) -> bool:
    """True if *info* matches any of the parsed filters (none: everything matches)."""
    if not parsed:
        return True
    for sels in parsed:
        ok = True
        for path, op, value in sels:
            got, present = _field(info, path)
            if op is None:
                ok = present
            elif op == "==":
                ok = present and got == value
            elif op == "!=":
                ok = got != value
            else:
                ok = bool(value.search(got))
            if not ok:
                break
        if ok:
            return True
    return False


# -- the store ---------------------------------------------------------------------------


class Mounter:
    """Mounts and unmounts snapshots with the unionfuse daemon (unionfuse/mount.py)."""

    def __init__(self, debug: bool = False):
        self.debug = debug

    def mount(self, lowers: list[str], upper: str | None, work: str | None, mnt: str,
              log_file: str | None = None) -> None:
        from .. import mount as mountmod

        mountmod.mount_layers("fuse", lowers, upper, work, mnt, log_file=log_file, debug=self.debug)

    def state(self, mnt: str) -> str:
        """'live', 'dead' (daemon gone: ENOTCONN) or 'none'."""
        from .. import mount as mountmod

        fstype = mountmod.mount_entry(mnt)
        if fstype is None:
            return "none"
        try:
            os.statvfs(mnt)  # always reaches the daemon
        except OSError as e:
            if e.errno == errno.ENOTCONN:
                return "dead"
            raise
        return "live" if fstype == "fuse.unionfuse" else "other"

    def unmount(self, mnt: str) -> None:
        """Unmount and wait for the daemon to exit (so the upper dir is complete)."""
        from .. import mount as mountmod

        for _ in range(8):  # stacked mounts, if any
            if mountmod.mount_entry(mnt) is None:
                return
            pid = mountmod._read_pid(mnt)
            mountmod.unmount_layers(mnt, pid=pid, timeout=20.0)


def _mounts_under(path: str) -> list[str]:
    """Mount points at or below *path* (deepest first)."""
    from ..mount import _unescape_mountinfo

    prefix = os.fsencode(os.path.realpath(path))
    out = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            mp = _unescape_mountinfo(line.split()[4])
            if mp == prefix or mp.startswith(prefix + b"/"):
                out.append(os.fsdecode(mp))
    return sorted(set(out), key=len, reverse=True)


class Store:
    def __init__(self, root: str, mounter: Mounter | None = None):
        self.root = os.path.abspath(root)
        self.mounter = mounter or Mounter()
        self.lock = threading.RLock()
        self.meta_path = os.path.join(self.root, "metadata.json")
        self.snap_dir = os.path.join(self.root, "snapshots")
        self.empty_dir = os.path.join(self.root, "empty")
        os.makedirs(self.snap_dir, mode=0o700, exist_ok=True)
        os.chmod(self.root, 0o711)  # mounts below are shown to containers' non-root users
        os.makedirs(self.empty_dir, mode=0o755, exist_ok=True)
        self.meta = self._load()

    # -- metadata file -------------------------------------------------------------------

    def _load(self) -> dict:
        try:
            with open(self.meta_path, "rb") as f:
                meta = json.loads(f.read())
        except FileNotFoundError:
            return {"version": 1, "next_id": 1, "snapshots": {}}
        except ValueError as e:
            raise SnapshotError(f"{self.meta_path}: unreadable metadata: {e}") from None
        if meta.get("version") != 1 or not isinstance(meta.get("snapshots"), dict):
            raise SnapshotError(f"{self.meta_path}: unknown metadata version")
        return meta

    def _save(self, meta: dict) -> None:
        """Replace the metadata file with *meta* atomically, then adopt it."""
        data = json.dumps(meta, sort_keys=True, indent=1).encode()
        tmp = f"{self.meta_path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.meta_path)
        dfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self.meta = meta

    # -- helpers -------------------------------------------------------------------------

    def _rec(self, key: str) -> dict:
        rec = self.meta["snapshots"].get(key)
        if rec is None:
            raise NotFound(f"snapshot {key} does not exist")
        return rec

    def _paths(self, sid: int) -> tuple[str, str, str, str]:
        base = os.path.join(self.snap_dir, str(sid))
        return base, os.path.join(base, "fs"), os.path.join(base, "work"), os.path.join(base, "mnt")

    def _chain(self, parent: str) -> list[str]:
        """fs dirs of *parent* and its ancestors, top-most first."""
        lowers = []
        while parent:
            rec = self.meta["snapshots"][parent]
            lowers.append(self._paths(rec["id"])[1])
            parent = rec["parent"]
        return lowers

    def _info(self, key: str, rec: dict) -> Info:
        return Info(name=key, parent=rec["parent"], kind=rec["kind"], created=rec["created"],
                    updated=rec["updated"], labels=dict(rec.get("labels", {})))

    def _mount_rec(self, rec: dict) -> None:
        _base, fs, work, mnt = self._paths(rec["id"])
        lowers = self._chain(rec["parent"]) or [self.empty_dir]
        log_file = os.path.join(os.path.dirname(fs), "daemon.log") if self.mounter.debug else None
        if rec["kind"] == ACTIVE:
            os.makedirs(work, exist_ok=True)
            self.mounter.mount(lowers, fs, work, mnt, log_file=log_file)
        else:
            self.mounter.mount(lowers, None, None, mnt, log_file=log_file)

    def _mounts_of(self, rec: dict) -> list[Mount]:
        mnt = self._paths(rec["id"])[3]
        ro = rec["kind"] == VIEW
        return [Mount(type="bind", source=mnt, options=["ro" if ro else "rw", "rbind"])]

    def _rmtree(self, path: str) -> None:
        """Remove *path*, first unmounting anything mounted below it (never delete
        through a mount)."""
        for mp in _mounts_under(path):
            self.mounter.unmount(mp)
        left = _mounts_under(path)
        if left:
            raise SnapshotError(f"cannot remove {path}: still mounted at {left[0]}")
        shutil.rmtree(path, ignore_errors=True)

    # -- the API -------------------------------------------------------------------------

    def create(self, kind: str, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        """Prepare (kind active) or View (kind view)."""
        if not key:
            raise InvalidArgument("snapshot key must not be empty")
        check_labels(labels)
        with self.lock:
            if key in self.meta["snapshots"]:
                raise AlreadyExists(f"snapshot {key} already exists")
            if parent:
                prec = self.meta["snapshots"].get(parent)
                if prec is None:
                    raise NotFound(f"missing parent {parent!r} bucket: not found")
                if prec["kind"] != COMMITTED:
                    raise InvalidArgument(f"parent {parent!r} is not committed snapshot")
            meta = copy.deepcopy(self.meta)
            sid = meta["next_id"]
            meta["next_id"] = sid + 1
            now = _now()
            rec = {"id": sid, "kind": kind, "parent": parent, "labels": dict(labels),
                   "created": now, "updated": now}
            meta["snapshots"][key] = rec
            base, fs, work, mnt = self._paths(sid)
            if os.path.lexists(base):  # left by a crash before its record was written
                self._rmtree(base)
            tmp = os.path.join(self.snap_dir, f"new-{uuid.uuid4().hex[:12]}")
            os.mkdir(tmp, 0o700)
            os.mkdir(os.path.join(tmp, "fs"), 0o755)
            os.mkdir(os.path.join(tmp, "mnt"), 0o755)
            if kind == ACTIVE:
                os.mkdir(os.path.join(tmp, "work"), 0o700)
            os.rename(tmp, base)
            self._save(meta)
            try:
                self._mount_rec(rec)
            except Exception:
                meta = copy.deepcopy(self.meta)
                del meta["snapshots"][key]
                self._save(meta)
                self._rmtree(base)
                raise
            return self._mounts_of(rec)

    def mounts(self, key: str) -> list[Mount]:
        with self.lock:
            rec = self._rec(key)
            if rec["kind"] == COMMITTED:
                raise FailedPrecondition(f"requested snapshot {key} not active or view")
            self._ensure_mounted(key, rec)
            return self._mounts_of(rec)

    def _ensure_mounted(self, key: str, rec: dict) -> None:
        mnt = self._paths(rec["id"])[3]
        st = self.mounter.state(mnt)
        if st == "live":
            return
        if st != "none":
            log.warning("snapshot %s: mount at %s is %s, mounting again", key, mnt, st)
            self.mounter.unmount(mnt)
        self._mount_rec(rec)

    def commit(self, name: str, key: str, labels: dict[str, str]) -> None:
        if not name:
            raise InvalidArgument("snapshot name must not be empty")
        check_labels(labels)
        with self.lock:
            rec = self._rec(key)
            if name in self.meta["snapshots"]:
                raise AlreadyExists(f"snapshot {name} already exists")
            if rec["kind"] != ACTIVE:
                raise FailedPrecondition(f"snapshot {key} is not active")
            base, fs, work, mnt = self._paths(rec["id"])
            self.mounter.unmount(mnt)
            if self.mounter.state(mnt) != "none":
                raise SnapshotError(f"snapshot {key}: could not unmount {mnt}")
            size, inodes = disk_usage(fs)
            dfd = os.open(fs, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.syncfs(dfd) if hasattr(os, "syncfs") else os.sync()
            finally:
                os.close(dfd)
            meta = copy.deepcopy(self.meta)
            now = _now()
            meta["snapshots"].pop(key)
            meta["snapshots"][name] = {"id": rec["id"], "kind": COMMITTED, "parent": rec["parent"],
                                       "labels": dict(labels), "created": now, "updated": now,
                                       "size": size, "inodes": inodes}
            self._save(meta)
            shutil.rmtree(work, ignore_errors=True)

    def remove(self, key: str) -> None:
        with self.lock:
            rec = self._rec(key)
            for other in self.meta["snapshots"].values():
                if other["parent"] == key:
                    raise FailedPrecondition("cannot remove snapshot with child")
            base, _fs, _work, mnt = self._paths(rec["id"])
            if rec["kind"] != COMMITTED:
                self.mounter.unmount(mnt)
            meta = copy.deepcopy(self.meta)
            del meta["snapshots"][key]
            self._save(meta)
            self._rmtree(base)

    def stat(self, key: str) -> Info:
        with self.lock:
            return self._info(key, self._rec(key))

    def update(self, info: Info, fieldpaths: list[str]) -> Info:
        with self.lock:
            rec = self._rec(info.name)
            labels = dict(rec.get("labels", {}))
            if fieldpaths:
                for path in fieldpaths:
                    if path.startswith("labels."):
                        k = path[len("labels."):]
                        if info.labels.get(k, ""):
                            labels[k] = info.labels[k]
                        else:
                            labels.pop(k, None)
                    elif path == "labels":
                        labels = dict(info.labels)
                    else:
                        raise InvalidArgument(f"cannot update {path!r} field on snapshot {info.name!r}")
            else:
                labels = dict(info.labels)
            check_labels(labels)
            meta = copy.deepcopy(self.meta)
            new = meta["snapshots"][info.name]
            new["labels"] = labels
            new["updated"] = _now()
            self._save(meta)
            return self._info(info.name, new)

    def usage(self, key: str) -> tuple[int, int]:
        with self.lock:
            rec = self._rec(key)
            if rec["kind"] == COMMITTED:
                return rec.get("size", 0), rec.get("inodes", 0)
            if rec["kind"] == VIEW:
                return 0, 0
            fs = self._paths(rec["id"])[1]
        return disk_usage(fs)

    def list(self, filters: list[str]) -> list[Info]:
        parsed = [parse_filter(f) for f in filters if f.strip()]
        with self.lock:
            infos = [self._info(k, r) for k, r in self.meta["snapshots"].items()]
        return [i for i in sorted(infos, key=lambda i: i.name) if match_filters(i, parsed)]

    def cleanup(self) -> list[str]:
        """Remove dirs no record refers to (left by a crash or an interrupted Remove)."""
        with self.lock:
            ids = {str(r["id"]) for r in self.meta["snapshots"].values()}
            removed = []
            for name in os.listdir(self.snap_dir):
                if name not in ids:
                    path = os.path.join(self.snap_dir, name)
                    log.info("cleanup: removing %s", path)
                    self._rmtree(path)
                    removed.append(path)
            for name in os.listdir(self.root):
                if name.startswith("metadata.json.") and name.endswith(".tmp"):
                    os.unlink(os.path.join(self.root, name))
            return removed

    def restore(self) -> None:
        """At start-up: drop leftovers and mount every active snapshot and view whose mount
        is gone (the daemons outlive the snapshotter, so most are still there)."""
        self.cleanup()
        with self.lock:
            for key, rec in sorted(self.meta["snapshots"].items(), key=lambda kv: kv[1]["id"]):
                if rec["kind"] == COMMITTED:
                    continue
                try:
                    self._ensure_mounted(key, rec)
                except UnionfuseError as e:
                    log.error("snapshot %s: cannot mount again: %s", key, e)

    def unmount_all(self) -> None:
        """Unmount every snapshot's mount (not done on a plain stop: containers keep
        running; for tests and `--unmount-on-exit`)."""
        with self.lock:
            for rec in self.meta["snapshots"].values():
                if rec["kind"] != COMMITTED:
                    self.mounter.unmount(self._paths(rec["id"])[3])
