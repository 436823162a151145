"""The FUSE side: a thin pyfuse3.Operations over the union rules.

Handlers resolve names with :mod:`.union`, keep identities in :mod:`.inodes`, and do
real work on the upper/lower dirs.  OSError becomes FUSEError only here, at the edge
(see ``_fuse_edge``); any other exception is logged and answered with EIO so that a bug
in one handler never takes the mount down.
"""

from __future__ import annotations

import array
import bisect
import errno
import functools
import inspect
import logging
import os
import stat
import struct
import sys
import weakref

import pyfuse3
import trio

from . import copyup, fastwait
from .copyup import RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT, renameat2
from .inodes import InodeTable, Node
from .union import (
    WH_OPAQUE,
    WH_PREFIX,
    Entry,
    Layers,
    check_name,
    dir_meta,
    is_private_xattr,
    is_whiteout_stat,
    join,
    lstat_or_none,
)

log = logging.getLogger("unionfuse.fs")

# Copies bigger than this run in a worker thread (a blocking copy would stall every
# request: pyfuse3 serves all of them from one thread).
INLINE_COPY_MAX = 256 * 1024

# readdir/fsyncdir fh of a directory the kernel did not open: its inode | INO_TAG (set by
# fs/_fuseshim.c when the kernel caches listings and sends no OPENDIR)
# pyfuse3 max_tasks that keeps it from ever starting a worker (see _in_thread)
NO_SPAWN = -(1 << 30)

CAPS_XATTR = b"security.capability"
# fast-path table flags (fs/_fuseshim.c)
FP_READ, FP_WRITE, FP_ATTR, FP_SETATTR, FP_NOCAPS = 1, 2, 4, 8, 16
FP_NLINK0, FP_NLINK1 = 32, 64  # GETATTR answers nlink 0 (unlinked) / 1 (merged dir)
FP_UPPERONLY = 128  # a dir with no lower layer: C answers the negative LOOKUPs
FP_CACHED_OPEN = 256  # passthrough on: C answers a read-only OPEN without a backing file
INO_TAG = 1 << 63  # above every inode number (inodes.py: private ones start at 1 << 62)
# A lower file up to this size is stored in the kernel's page cache at its first
# read-only open (_prime), so that no READ is needed to read it.
PRIME_MAX = 64 * 1024
INO_MASK = INO_TAG - 1

# struct fuse_dirent (linux/fuse.h): ino, off (where the next read resumes), namelen, type
_DIRENT = struct.Struct("<QQII")
_DT_DIR, _DT_REG, _DT_LNK = 4, 8, 10


FD_CACHE_ENV = "UNIONFUSE_FD_CACHE_MAX"


def _fd_budget() -> int:
    """How many files may keep a cached fd (no-OPEN mode): raise the soft fd limit to
    the hard one and use about half of it, leaving room for everything else
    ($UNIONFUSE_FD_CACHE_MAX lowers it)."""
    import resource

    try:
        cap = int(os.environ.get(FD_CACHE_ENV, "65536"))
    except ValueError:
        cap = 65536

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > 1 << 20:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):
            pass
    return max(4, min(soft // 2 - 64, cap))


class Handle:
    __slots__ = ("fd", "node", "upper")

    def __init__(self, fd: int, node: Node, upper: bool):
        self.fd = fd
        self.node = node
        self.upper = upper


class CachedFd(Handle):
    """The daemon's own fd for a file the kernel opens without telling us (no OPEN:
    see fs/_fuseshim.c).  One per node, in node.handles like an open handle; kept while
    the kernel knows the inode, in an LRU unless *pinned* (the file lost its last name
    while the kernel may still have it open: the fd is then the only way to its data)."""

    __slots__ = ("writable", "pinned", "nocaps")

    def __init__(self, fd: int, node: Node, upper: bool, writable: bool):
        super().__init__(fd, node, upper)
        self.writable = writable
        self.pinned = False
        self.nocaps = False  # the file is known to have no security.capability


class DirCache:
    """A merged dir's listing and resolved entries (node.dcache).  Dropped (_touch)
    before and after every change that may add, remove or move a name in the dir: a
    create, link, unlink, rmdir or rename there, a copy-up into it; so it is valid for
    as long as it is there.  Changes elsewhere in the mount leave it be."""

    __slots__ = ("names", "ents", "keys", "plain")

    def __init__(self, names: list[bytes]):
        # in the order of their readdir offsets, keys: hash(name) (stable while the
        # daemon runs), in 1..2**62
        keyed = sorted(zip(map(_dir_key, names), names))
        self.keys = [k for k, _ in keyed]
        self.names = [n for _, n in keyed]
        # name -> weak ref to the child's node (None: the name resolved to nothing)
        self.ents: dict[bytes, weakref.ref | None] = {}
        # plain READDIR answer, built on first use (_plain_listing): (fuse_dirent records
        # in key order, where each starts (one more at the end), their keys)
        self.plain: tuple[bytes, array.array, list[int]] | None = None


FILEOP_PENDING = 1 << 62  # fileop: the answer comes later (fs/_fuseshim.c FO_PENDING)


def _dir_key(name: bytes) -> int:
    return (hash(name) & 0x3FFFFFFFFFFFFFFF) + 3  # 1 and 2: "." and ".." (_DOTS)


_DOTS = ((1, b"."), (2, b".."))


def _dot_inos(node: Node) -> tuple[int, int]:
    """The st_ino of "." and ".." in *node*'s listing (the root is its own parent)."""
    parent = node.parent
    return node.ino, (parent.ino if parent is not None else node.ino)


def _dot_records(node: Node, off: int) -> bytes:
    """Plain READDIR records for "." and ".." after offset *off* (see readdir_plain)."""
    out = b""
    for (key, name), ino in zip(_DOTS, _dot_inos(node)):
        if off < key:
            rec = _DIRENT.pack(ino, key, len(name), _DT_DIR) + name
            out += rec + b"\0" * (-len(rec) & 7)
    return out


class DirHandle:
    __slots__ = ("node",)

    def __init__(self, node: Node):
        self.node = node


def _fuse_edge(fn):
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self, *args):
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s%r -> %s", name, args[:-1] if args else args, e)
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except BaseException:
            log.exception("bug in %s handler (answered EIO)", name)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _changes_names(fn, parent_args: tuple[int, ...]):
    """A handler that adds, removes or moves names in the dirs given by these
    arguments (inode numbers): their cached listings (DirCache) are dropped as it
    starts and again as it ends (one built while it awaited is stale too)."""

    @functools.wraps(fn)
    async def wrapper(self, *args):
        get = self.table.get
        parents = [get(args[i]) for i in parent_args]
        self._touch(*parents)
        try:
            return await fn(self, *args)
        finally:
            self._touch(*parents)

    return wrapper


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class UnionOperations(pyfuse3.Operations):
    enable_writeback_cache = True
    # Set by the daemon (mount.serve) to the nursery the FUSE session runs in: while a
    # request waits on a thread, a second worker is started there (see _in_thread).
    worker_nursery: trio.Nursery | None = None
    # Set by the daemon to the loaded fs/_fuseshim module once its C fast path is on:
    # _fp_sync then keeps its table in step with the nodes.
    fastpath = None

    def __init__(
        self,
        lowers: list[bytes],
        upper: bytes | None = None,
        work: bytes | None = None,
        whiteout: str | None = None,
        timeout: float = 60.0,
        idmap=None,
    ):
        super().__init__()
        self.idmap = idmap  # fs/idmap.IdMap: owners shown shifted (None: as stored)
        if (upper is None) != (work is None):
            raise ValueError("upper and work dirs go together")
        if not lowers and upper is None:
            raise ValueError("need at least one layer")
        self.layers = Layers(upper, lowers, cache_lowers=True)
        self.rw = upper is not None
        self.timeout = timeout
        self.work = copyup.WorkDir(work) if work is not None else None
        self.ns = self._pick_xattr_ns()
        self.whiteout = whiteout or self._default_whiteout()
        if self.whiteout not in ("overlay", "oci"):
            raise ValueError(f"unknown whiteout form {self.whiteout!r}")
        # Our own records live in the overlay namespace, which the kernel hides too, so
        # an upper dir we leave behind looks the same under `mount -t overlay`.
        self.origin_xattr = self.ns + b"overlay.unionfuse.origin"
        self.nlink_xattr = self.ns + b"overlay.unionfuse.nlink"
        self.opaque_xattr = self.ns + b"overlay.opaque"
        self.redirect_xattr = self.ns + b"overlay.redirect"
        top = upper if upper is not None else lowers[0]
        top_st = os.stat(top)
        self.layer_ids = [os.stat(r).st_ino if r is not None else 0 for r in self.layers.roots]
        self.table = InodeTable(top_st.st_dev)
        root = self.table.add_root((top_st.st_dev, top_st.st_ino))
        root.in_upper = self.rw
        for i in range(1, self.layers.nlower + 1):
            root.lowers.append((i, b""))
            if dir_meta(self.layers.real(i, b"")).opaque:
                break
        if self.rw and dir_meta(self.layers.upper(b"")).opaque:
            root.lowers = []
        self.handles: dict[int, Handle | DirHandle] = {}
        # no-OPEN mode (set in init() from the shim): files have a CachedFd, not handles
        self.no_open = False
        # passthrough (set in init()): OPEN comes, and is answered with the node's
        # cached fd registered as the kernel's backing file (fs/_fuseshim.c)
        self.passthrough = False
        self._pt_refused = False  # the kernel refused a backing file: stop asking
        self._fd_lru: dict[int, Node] = {}  # ino -> node with an unpinned CachedFd
        self._fd_max = _fd_budget()
        # fast path (fs/_fuseshim.c) for directories' GETATTR: ino -> O_PATH fd on the
        # dir's real copy, oldest first, at most _dir_fd_max (see _dir_fp_add)
        self._dir_fds: dict[int, int] = {}
        self._dir_fd_max = max(16, self._fd_max // 4)
        self._euid, self._egid = os.geteuid(), os.getegid()  # what new files get (_owner)
        self._next_fh = 1
        self._rename_whiteout = self.whiteout == "overlay"
        # the whiteout every new one is a hard link to (see _new_whiteout)
        self._wh_shared = os.path.join(self.work.base, b"whiteout") if self.work is not None else None
        if self._wh_shared is not None:
            st = lstat_or_none(self._wh_shared)
            if st is not None and not is_whiteout_stat(st):
                copyup.remove_tree(self._wh_shared)

    async def _in_thread(self, fn, *args):
        """Run a blocking call in a worker thread while other requests go on being served.

        The daemon runs ONE pyfuse3 worker task (two or more hand the read lock to each
        other on every request, which doubles the cost of a request).  So a request that
        blocks on a thread starts one extra worker first; pyfuse3's loop ends that worker
        (min_tasks=0) as soon as it finds another worker waiting for the fd, so it goes
        away once this request is answered.  max_tasks=NO_SPAWN: pyfuse3 never spawns
        workers itself (its count of them goes wrong once ours have exited, so 0 would
        not be enough).
        """
        n = self.worker_nursery
        loop = getattr(pyfuse3, "_session_loop", None)
        # fastwait: every wait goes through trio from now until the extra worker has
        # ended (it could otherwise be woken for a request the fast wait already took)
        async def extra():
            try:
                await loop(n, 0, NO_SPAWN)
            finally:
                fastwait.idle()

        fastwait.busy()
        started = False
        try:
            if n is not None and loop is not None:
                n.start_soon(extra, name="pyfuse3-extra")
                started = True  # extra() says idle() when it ends
            return await trio.to_thread.run_sync(fn, *args)
        finally:
            if not started:
                fastwait.idle()

    # -- set-up helpers ---------------------------------------------------------------

    def _pick_xattr_ns(self) -> bytes:
        if self.work is None:
            return b"trusted."
        try:
            os.setxattr(self.work.base, b"trusted.unionfuse.probe", b"1")
            os.removexattr(self.work.base, b"trusted.unionfuse.probe")
            return b"trusted."
        except OSError:
            return b"user."

    def _default_whiteout(self) -> str:
        if self.work is None:
            return "overlay"
        tmp = self.work.tmpname()
        try:
            os.mknod(tmp, stat.S_IFCHR | 0o600, 0)
        except OSError:
            return "oci"
        os.unlink(tmp)
        return "overlay"

    # -- node helpers -----------------------------------------------------------------

    def _node(self, ino: int) -> Node:
        node = self.table.get(ino)
        if node is None:
            raise _err(errno.ENOENT)
        return node

    def _path(self, node: Node) -> bytes:
        p = node.path()
        if p is None:
            raise _err(errno.ENOENT)
        return p

    def _up(self, rel: bytes) -> bytes:
        return self.layers.upper(rel)

    def _index_path(self, name: bytes) -> bytes:
        assert self.work is not None
        return os.path.join(self.work.index, name)

    def _real(self, node: Node) -> bytes | None:
        """Where the node's data and metadata live now (None: no name and no index)."""
        if node.is_dir:
            if node.in_upper:
                p = node.path()
                return None if p is None else self._up(p)
            i, rel = node.lowers[0]
            return self.layers.real(i, rel)
        if node.orphan is not None:
            return node.orphan
        if node.index is not None and node.in_upper:
            return self._index_path(node.index)
        if node.in_upper:
            p = node.path()
            return None if p is None else self._up(p)
        if node.lowers:
            i, rel = node.lowers[0]
            return self.layers.real(i, rel)
        return None

    def _stat(self, node: Node) -> os.stat_result:
        real = None if node.deleted else self._real(node)
        if real is not None:
            try:
                st = os.lstat(real)
                node.last_st = st
                return st
            except FileNotFoundError:
                if not node.handles:
                    raise
        for h in node.handles:
            if isinstance(h, Handle):
                return os.fstat(h.fd)
        if node.last_st is not None:
            return node.last_st
        raise _err(errno.ENOENT)

    def _nlink(self, node: Node, st: os.stat_result) -> int:
        if node.deleted:
            return 0
        if node.is_dir:
            merged = len(node.lowers) + (1 if node.in_upper else 0) > 1
            return 1 if merged else st.st_nlink
        if node.index is not None:
            if node.in_upper:
                try:
                    return int(os.getxattr(self._index_path(node.index), self.nlink_xattr))
                except (OSError, ValueError):
                    return max(1, st.st_nlink - 1)
        return st.st_nlink

    def _entry(self, node: Node, st: os.stat_result | None = None,
               fresh: bool = False) -> pyfuse3.EntryAttributes:
        lower_only = not node.in_upper and not node.deleted and node.orphan is None
        if lower_only and node.attrs is not None and not fresh:
            # lower layers never change (but for atime: getattr asks fresh=True)
            return node.attrs
        if st is None:
            if node.deleted and node.attrs is not None and not node.handles:
                # an unlinked lower file nobody has open (its stat was dropped for
                # memory): the kernel may still flush times on it
                node.attrs.st_nlink = 0
                return node.attrs
            st = self._stat(node)
        e = self._make_entry(node, st)
        if lower_only:
            node.attrs = e
            node.last_st = None  # memory: e says it all (the lower file never goes away)
        return e

    def _make_entry(self, node: Node, st: os.stat_result) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = node.ino
        e.generation = 0
        e.entry_timeout = self.timeout
        e.attr_timeout = self.timeout
        e.st_mode = st.st_mode
        e.st_nlink = self._nlink(node, st)
        e.st_uid = st.st_uid
        e.st_gid = st.st_gid
        if self.idmap is not None:
            e.st_uid, e.st_gid = self.idmap.shown(st.st_uid, st.st_gid)
        e.st_rdev = st.st_rdev
        e.st_size = st.st_size
        e.st_blksize = st.st_blksize
        e.st_blocks = st.st_blocks
        e.st_atime_ns = st.st_atime_ns
        e.st_mtime_ns = st.st_mtime_ns
        e.st_ctime_ns = st.st_ctime_ns
        return e

    def _negative(self) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = 0
        e.entry_timeout = self.timeout
        return e

    def _check_rw(self) -> None:
        if not self.rw:
            raise _err(errno.EROFS)

    def _resolve(self, parent: Node, name: bytes) -> tuple[bytes, Entry]:
        if not parent.is_dir:
            raise _err(errno.ENOTDIR)
        ppath = self._path(parent)
        return ppath, self.layers.resolve(ppath if parent.in_upper else None, parent.lowers, name)

    def _origin(self, upper_real: bytes) -> tuple[tuple[int, int], bytes | None] | None:
        try:
            v = os.getxattr(upper_real, self.origin_xattr, follow_symlinks=False)
        except OSError:
            return None
        parts = v.split(b":")
        try:
            key = (int(parts[0]), int(parts[1]))
        except (ValueError, IndexError):
            return None
        return key, (parts[2] if len(parts) > 2 and parts[2] else None)

    def _group_name(self, ent: Entry) -> bytes | None:
        """Hard-link group (index) name of a lower regular file with several links."""
        st = ent.st
        if ent.in_upper or not ent.lowers or self.work is None:
            return None
        if not stat.S_ISREG(st.st_mode) or st.st_nlink < 2:
            return None
        idx = ent.lowers[0][0]
        return b"%x-%x" % (self.layer_ids[idx], st.st_ino)

    def _node_for(self, parent: Node, ppath: bytes, name: bytes, ent: Entry) -> Node:
        """The node a resolved entry stands for, registered under (parent, name)."""
        st = ent.st
        group = None
        key = (st.st_dev, st.st_ino)
        own = False
        known = None
        if ent.in_upper:
            # An upper object's origin record is written once, on the copy that copy-up
            # makes: a node keyed by this object's own number that was read with no
            # record (or made through the mount) still has none.  (A node keyed so by
            # another object's origin record does not count: own_key.)
            known = self.table.find(key)
            if known is not None and known.own_key and known.is_dir == ent.is_dir:
                own = True
            else:
                known = None
                origin = self._origin(self._up(join(ppath, name)))
                if origin is not None:
                    key, group = origin
                else:
                    own = True
        else:
            group = self._group_name(ent)
        node = known or self.table.find(key)  # (known: found under this key already)
        if node is None or node.is_dir != ent.is_dir:
            node = self.table.new(key, ent.is_dir)
        if own:
            node.own_key = True
        lowers = ent.lowers if (ent.is_dir or not ent.in_upper or not node.lowers) else node.lowers
        if lowers != node.lowers:
            node.attrs = None
            if node.is_dir:
                self._dir_fp_drop(node)
        if node.is_dir and ent.in_upper != node.in_upper:
            self._dir_fp_drop(node)
        node.lowers = lowers
        if group is not None:
            node.index = group
            node.in_upper = os.path.lexists(self._index_path(group))
            self.table.add_alias(node, parent, name)
            if node.in_upper and not ent.in_upper:
                # the group was copied up: this alias must show (and keep) the same inode
                self._link_alias(node, parent, name)
        else:
            node.in_upper = ent.in_upper
            self.table.add_alias(node, parent, name)
        node.last_st = st
        if node.fdh is not None:
            self._fp_sync(node)
        return node

    # -- copy-up ----------------------------------------------------------------------

    def _copy_up_dir(self, node: Node) -> None:
        """Make a dir exist in the upper layer (parents first).  Metadata only."""
        if node.in_upper:
            return
        self._check_rw()
        parent = node.parent
        if parent is None:
            raise _err(errno.ENOENT)
        self._copy_up_dir(parent)
        i, rel = node.lowers[0]
        src = self.layers.real(i, rel)
        st = os.lstat(src)
        tmp = self.work.tmpname()
        origin = b"%d:%d" % node.key
        try:
            copyup.make_copy(src, st, tmp, False, {self.origin_xattr: origin})
            pdir = self._up(self._path(parent))
            restore = copyup.preserve_dir_times(pdir)
            os.rename(tmp, os.path.join(pdir, node.name))
            restore()
        except BaseException:
            copyup.remove_tree(tmp)
            raise
        node.in_upper = True
        self._dir_fp_drop(node)  # its attrs are the upper copy's from now on
        self._touch(node, parent)

    async def _copy_up(self, node: Node, data: bool = True) -> None:
        if node.in_upper:
            return
        self._check_rw()
        if node.is_dir:
            self._copy_up_dir(node)
            return
        if node.lock is None:
            node.lock = trio.Lock()
        async with node.lock:
            if node.in_upper:
                return
            # the dirs it lands in: their listings are stale from here to the end
            parents = [p for p, _ in node.aliases]
            self._touch(*parents)
            try:
                await self._copy_up_locked(node, data)
            finally:
                self._touch(*parents, *(p for p, _ in node.aliases))

    async def _copy_up_locked(self, node: Node, data: bool) -> None:
        if not node.lowers:
            raise _err(errno.ENOENT)
        i, rel = node.lowers[0]
        src = self.layers.real(i, rel)
        st = os.lstat(src)
        xattrs = {self.origin_xattr: b"%d:%d:%s" % (*node.key, node.index or b"")}
        if node.index is not None:
            xattrs[self.nlink_xattr] = b"%d" % st.st_nlink
        tmp = self.work.tmpname()
        try:
            if data and stat.S_ISREG(st.st_mode) and st.st_size > INLINE_COPY_MAX:
                await self._in_thread(copyup.make_copy, src, st, tmp, True, xattrs)
            else:
                copyup.make_copy(src, st, tmp, data, xattrs)
            # Finalise without awaiting: names may have moved while we copied.
            if node.index is not None:
                os.rename(tmp, self._index_path(node.index))
                node.in_upper = True
                for parent, name in list(node.aliases):
                    self._link_alias(node, parent, name)
            elif not node.aliases:
                # unlinked but open: the copy lives in the work dir until closed
                if not node.handles:
                    raise _err(errno.ENOENT)
                node.orphan = tmp
                node.in_upper = True
            else:
                parent, name = node.aliases[0]
                self._copy_up_dir(parent)
                pdir = self._up(self._path(parent))
                restore = copyup.preserve_dir_times(pdir)
                os.rename(tmp, os.path.join(pdir, name))
                restore()
                node.in_upper = True
        except BaseException:
            if node.orphan != tmp:
                copyup.remove_tree(tmp)
            self._fp_sync(node)  # in_upper may be set already (a group's alias failed)
            raise
        log.debug("copied up %r (%d bytes)", src, st.st_size if data else 0)
        if self.passthrough:
            self.fastpath.pt_retire(node.ino)  # the lower file is no longer its data
        try:
            self._reopen_handles(node)
        finally:
            self._fp_sync(node)  # the C fast path must not keep answering from the lower

    def _link_alias(self, node: Node, parent: Node, name: bytes) -> None:
        """Hard-link a copied-up group's index file into the upper at one alias."""
        self._touch(parent)
        self._copy_up_dir(parent)
        pdir = self._up(self._path(parent))
        dst = os.path.join(pdir, name)
        st = lstat_or_none(dst)
        if st is not None and not is_whiteout_stat(st):
            return
        restore = copyup.preserve_dir_times(pdir)
        tmp = self.work.tmpname()
        os.link(self._index_path(node.index), tmp)
        os.rename(tmp, dst)
        restore()

    def _reopen_handles(self, node: Node) -> None:
        """Read handles opened on the lower file follow the copy-up (the daemon's
        cached fd too, made writable)."""
        real = self._real(node)
        for h in list(node.handles):
            if isinstance(h, Handle) and not h.upper:
                rw = isinstance(h, CachedFd)
                flags = os.O_CLOEXEC | os.O_NOFOLLOW
                try:
                    fd = os.open(real, flags | (os.O_RDWR if rw else os.O_RDONLY))
                except PermissionError:
                    if not rw:
                        raise
                    # e.g. a 0444 file and a daemon without CAP_DAC_OVERRIDE: readable
                    # now, opened for writing when a write comes (_file_fd)
                    fd = os.open(real, flags | os.O_RDONLY)
                    rw = False
                os.dup2(fd, h.fd)
                os.close(fd)
                h.upper = True
                if rw:
                    h.writable = True

    # -- cached fds (no-OPEN mode) ----------------------------------------------------

    async def _file_fd(self, node: Node, write: bool) -> int:
        """The daemon's fd for a file (opened on first use; copied up for a write)."""
        if node.is_dir:
            raise _err(errno.EISDIR)
        if write and not node.in_upper:
            self._check_rw()
            await self._copy_up(node)  # moves an existing CachedFd along (_reopen_handles)
        h = node.fdh
        if h is not None and (h.writable or not write):
            if not h.pinned:
                lru = self._fd_lru
                del lru[node.ino]
                lru[node.ino] = node
            return h.fd
        real = self._real(node)
        if real is None:
            raise _err(errno.ENOENT)
        fd, writable = self._open_file(node, real, write)
        if h is not None:  # a read-only fd that now has to write
            os.dup2(fd, h.fd)
            os.close(fd)
            h.writable = writable
            h.upper = node.in_upper
            self._fp_sync(node)
            return h.fd
        self._cache_fd(node, fd, writable)
        return fd

    @staticmethod
    def _open_file(node: Node, real: bytes, write: bool) -> tuple[int, bool]:
        """(fd, writable) on a file's real data: read-write once it is in the upper,
        read-only if the daemon may not write it and *write* is not needed."""
        if node.in_upper:
            try:
                return os.open(real, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW), True
            except PermissionError:
                if write:
                    raise
        return os.open(real, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW), False

    def _cache_fd(self, node: Node, fd: int, writable: bool, nocaps: bool = False) -> None:
        h = node.fdh = CachedFd(fd, node, node.in_upper, writable)
        h.nocaps = nocaps
        node.add_handle(h)
        self._fp_sync(node)
        lru = self._fd_lru
        lru[node.ino] = node
        while len(lru) > self._fd_max:
            old = lru.pop(next(iter(lru)))
            self._close_fd(old, from_lru=True)

    def _pin_fd(self, node: Node) -> None:
        """*node* (a file) is about to lose its last name: keep an fd on its data for as
        long as the kernel knows the inode (it may be open: we are not told).  Never
        fails the operation (an fd we can't get is logged)."""
        if not self.no_open or node.is_dir or node.lookups <= 0 or len(node.aliases) > 1:
            return
        try:
            self._pin_fd_now(node)
        except OSError as e:
            log.warning("can't keep %r readable after its last name goes: %s", node.path(), e)

    def _pin_fd_now(self, node: Node) -> None:
        h = node.fdh
        if h is None:
            real = self._real(node)
            if real is None:
                return
            st = node.last_st if node.last_st is not None else lstat_or_none(real)
            if st is None or not stat.S_ISREG(st.st_mode):
                return  # only regular files are read and written through us
            self._cache_fd(node, *self._open_file(node, real, False))
            h = node.fdh
        if not h.pinned:
            h.pinned = True
            self._fd_lru.pop(node.ino, None)

    def _close_fd(self, node: Node, from_lru: bool = False) -> None:
        h = node.fdh
        if h is None:
            return
        if not from_lru:
            self._fd_lru.pop(node.ino, None)
        node.fdh = None
        node.drop_handle(h)
        if self.fastpath is not None:
            self.fastpath.fp_clear(node.ino)
            if self.passthrough:
                st = self.fastpath.pt_state(node.ino)
                if st is not None and st[2] == 0:
                    # no file open: the backing goes with the fd (while files are open
                    # it stays the inode's: later opens must share it)
                    self.fastpath.pt_retire(node.ino)
        os.close(h.fd)
        self._drop_orphan(node)
        self.table.maybe_drop(node)

    def _fp_sync(self, node: Node) -> None:
        """Tell the C fast path (fs/_fuseshim.c) what it may answer for *node* itself:
        called whenever the node's cached fd or what it stands for changes."""
        fp = self.fastpath
        if fp is None:
            return
        if node.is_dir:
            if node.deleted:
                self._dir_fp_drop(node)
            return
        h = node.fdh
        if h is None:
            fp.fp_clear(node.ino)
            return
        flags = FP_READ
        if h.nocaps:
            flags |= FP_NOCAPS
        if node.in_upper and h.upper:
            if h.writable:
                flags |= FP_WRITE
            # attributes are the upper file's own: no hard-link group keeping a link
            # count of its own, not moved to the work dir (orphan: nlink 1 there)
            if node.index is None and node.orphan is None:
                flags |= FP_ATTR | (FP_NLINK0 if node.deleted else 0)
                if h.writable and self.rw:
                    flags |= FP_SETATTR
        elif not (node.in_upper or h.upper or node.deleted) and node.index is None \
                and node.orphan is None:
            flags |= FP_ATTR  # a lower file: immutable, its attrs are its own
        if self.passthrough and self.rw and not node.in_upper:
            flags |= FP_CACHED_OPEN  # read-only opens of a lower file (_pt_backing)
        fp.fp_set(node.ino, h.fd, flags)

    def _dir_fp_add(self, node: Node) -> None:
        """Let the C fast path answer GETATTR for directory *node* (after Python has
        answered one): an O_PATH fd on its real copy, and nlink 1 if it is merged;
        and, if it has no lower layer, negative LOOKUPs (a name not in that dir).
        Dropped (_dir_fp_drop) when it is copied up, its layers change, it is deleted,
        or the kernel forgets it."""
        if node.deleted or node.ino in self._dir_fds:
            return
        real = self._real(node)
        if real is None:
            return
        try:
            fd = os.open(real, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return
        merged = len(node.lowers) + (1 if node.in_upper else 0) > 1
        flags = FP_ATTR | (FP_NLINK1 if merged else 0)
        if node.in_upper and not node.lowers:
            flags |= FP_UPPERONLY  # (fd is the upper dir: _real)
        dfds = self._dir_fds
        dfds[node.ino] = fd
        self.fastpath.fp_set(node.ino, fd, flags)
        while len(dfds) > self._dir_fd_max:
            ino = next(iter(dfds))
            self.fastpath.fp_clear(ino)
            os.close(dfds.pop(ino))

    def _dir_fp_drop(self, node: Node) -> None:
        fd = self._dir_fds.pop(node.ino, None)
        if fd is not None:
            self.fastpath.fp_clear(node.ino)
            os.close(fd)

    def _drop_orphan(self, node: Node) -> None:
        if node.orphan is not None and not any(isinstance(x, Handle) for x in node.handles):
            try:
                os.unlink(node.orphan)
            except OSError:
                pass
            node.orphan = None

    # -- whiteouts and placing new entries --------------------------------------------

    def _set_opaque(self, real_dir: bytes) -> None:
        if self.whiteout == "overlay":
            os.setxattr(real_dir, self.opaque_xattr, b"y")
        else:
            os.close(os.open(os.path.join(real_dir, WH_OPAQUE), os.O_CREAT | os.O_WRONLY, 0o600))

    def _dev_whiteout(self, name: bytes) -> bool:
        """Write this name's whiteout as a 0/0 device?  (Always in overlay mode; in oci
        mode too when ".wh." + name would be longer than NAME_MAX.)"""
        return self.whiteout == "overlay" or len(WH_PREFIX + name) > 255

    def _new_whiteout(self, dst: bytes) -> None:
        """A 0/0 char device at the free path *dst*: a hard link to one shared whiteout
        in the work dir (as the kernel's overlayfs does), since making an inode costs
        ten times a link on ext4; a fresh mknod when linking fails."""
        if self._wh_shared is not None:
            for _ in range(2):
                try:
                    os.link(self._wh_shared, dst)
                    return
                except FileNotFoundError:
                    pass  # not made yet (or removed): make it below
                except OSError as e:
                    if e.errno == errno.EEXIST:
                        raise
                    if e.errno != errno.EMLINK:
                        self._wh_shared = None  # e.g. no hard links here: stop trying
                        break
                try:
                    tmp = self.work.tmpname()
                    os.mknod(tmp, stat.S_IFCHR | 0o000, 0)
                    os.rename(tmp, self._wh_shared)  # a fresh one when full (EMLINK)
                except OSError:
                    self._wh_shared = None
                    break
        os.mknod(dst, stat.S_IFCHR | 0o000, 0)

    def _make_whiteout(self, ppath: bytes, name: bytes) -> None:
        """A whiteout at a free name in the upper (the parent is there already)."""
        if self._dev_whiteout(name):
            self._new_whiteout(self._up(join(ppath, name)))
        else:
            fd = os.open(self._up(join(ppath, WH_PREFIX + name)), os.O_CREAT | os.O_WRONLY, 0o000)
            os.close(fd)

    def _whiteout_upper(self, ppath: bytes, name: bytes, is_dir: bool) -> None:
        """Atomically turn an upper entry into a whiteout."""
        dst = self._up(join(ppath, name))
        if self._dev_whiteout(name):
            tmp = self.work.tmpname()
            self._new_whiteout(tmp)
            if is_dir:
                renameat2(tmp, dst, RENAME_EXCHANGE)
                copyup.remove_tree(tmp)
            else:
                os.rename(tmp, dst)
        else:
            self._make_whiteout(ppath, name)
            self._remove_upper(ppath, name, is_dir)

    def _remove_upper(self, ppath: bytes, name: bytes, is_dir: bool) -> None:
        dst = self._up(join(ppath, name))
        if is_dir:
            tmp = self.work.tmpname()
            os.rename(dst, tmp)
            copyup.remove_tree(tmp)
        else:
            os.unlink(dst)

    def _clear_oci_whiteout(self, ppath: bytes, name: bytes) -> None:
        if len(WH_PREFIX + name) > 255:
            return  # can't exist
        try:
            os.unlink(self._up(join(ppath, WH_PREFIX + name)))
        except FileNotFoundError:
            pass

    def _place(self, tmp: bytes, ppath: bytes, name: bytes, is_dir: bool) -> None:
        """Move a new entry built at *tmp* to *name*, replacing a whiteout there."""
        dst = self._up(join(ppath, name))
        st = lstat_or_none(dst)
        if st is not None and is_whiteout_stat(st):
            if is_dir:
                renameat2(tmp, dst, RENAME_EXCHANGE)
                os.unlink(tmp)
            else:
                os.rename(tmp, dst)
        else:
            renameat2(tmp, dst, RENAME_NOREPLACE)
            self._clear_oci_whiteout(ppath, name)

    def _owner(self, parent_real: bytes, ctx, mode: int,
               is_dir: bool) -> tuple[int, int, int, bool]:
        """(uid, gid, mode) for a new entry, and whether it needs a chown: not when the
        daemon's own ids (or a setgid parent's group) are already the right ones."""
        pst = os.lstat(parent_real)
        uid, gid = ctx.uid, ctx.gid
        if self.idmap is not None:
            uid, gid = self.idmap.stored(uid, gid)
        own_gid = self._egid
        if pst.st_mode & stat.S_ISGID:
            gid = own_gid = pst.st_gid
            if is_dir:
                mode |= stat.S_ISGID
        return uid, gid, mode, uid != self._euid or gid != own_gid

    async def _create_entry(self, parent: Node, name: bytes, ctx, mode: int, *, rdev: int = 0,
                            target: bytes | None = None) -> tuple[Node, int | None]:
        """mkdir/mknod/symlink/create: a new object at *name*, owned by the caller."""
        check_name(name)
        self._check_rw()
        self._copy_up_dir(parent)
        ppath, ent = self._resolve(parent, name)
        if ent.found:
            raise _err(errno.EEXIST)
        pdir = self._up(ppath)
        kind = stat.S_IFMT(mode)
        is_dir = kind == stat.S_IFDIR
        uid, gid, mode, chown = self._owner(pdir, ctx, mode, is_dir)
        dst = os.path.join(pdir, name)
        path = self.work.tmpname() if (ent.upper_whiteout or is_dir) else dst
        fd = None
        try:
            if kind == stat.S_IFREG:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, stat.S_IMODE(mode))
            elif is_dir:
                os.mkdir(path, stat.S_IMODE(mode))
                if ent.upper_whiteout:
                    self._set_opaque(path)
            elif kind == stat.S_IFLNK:
                os.symlink(target, path)
            else:
                os.mknod(path, mode, rdev)
            if chown:
                os.chown(path, uid, gid, follow_symlinks=False)
            if mode & (stat.S_ISUID | stat.S_ISGID) and kind != stat.S_IFLNK:
                os.chmod(path, stat.S_IMODE(mode))
            if path != dst:
                self._place(path, ppath, name, is_dir)
        except BaseException:
            if fd is not None:
                os.close(fd)
            if path != dst:
                copyup.remove_tree(path)
            elif kind != stat.S_IFDIR:
                try:
                    os.unlink(dst)
                except OSError:
                    pass
            raise
        st = os.lstat(dst)
        node = self.table.new((st.st_dev, st.st_ino), is_dir)
        node.in_upper = True
        node.own_key = True
        node.last_st = st
        self.table.add_alias(node, parent, name)
        node.lookups += 1
        return node, fd

    # -- hard-link groups -------------------------------------------------------------

    async def _group_add(self, node: Node, delta: int) -> None:
        """Change a copied-up hard-link group's link count (copying it up first)."""
        await self._copy_up(node)
        ipath = self._index_path(node.index)
        try:
            n = int(os.getxattr(ipath, self.nlink_xattr))
        except (OSError, ValueError):
            n = os.lstat(ipath).st_nlink - 1
        os.setxattr(ipath, self.nlink_xattr, b"%d" % max(0, n + delta))

    # ================================================================================
    # pyfuse3 handlers
    # ================================================================================

    def init(self):
        shim = sys.modules.get("unionfuse.fs._fuseshim")
        st = shim.status() if shim is not None else {}
        self.passthrough = bool(st.get("passthrough")) and self.fastpath is not None
        # passthrough keeps no-OPEN's model: one cached fd per file, fh = tagged inode
        self.no_open = bool(st.get("no_open")) or self.passthrough
        on = [k for k in ("no_opendir", "no_open", "passthrough", "cache_symlinks",
                          "splice_write", "readdir_plain")
              if st.get(k)]
        log.info("kernel caching: attrs, entries, data%s%s", ", " if on else "", ", ".join(on))
        if st.get("passthrough_wanted") and not self.passthrough:
            log.info("passthrough not offered by the kernel (needs Linux 6.9+ with "
                     "CONFIG_FUSE_PASSTHROUGH)" if not st.get("passthrough_offered") else
                     "passthrough not in use")

    async def lookup(self, parent_inode, name, ctx):
        parent = self._node(parent_inode)
        if name == b".":
            node = parent
        elif name == b"..":
            node = parent.parent or parent
        else:
            if len(name) > 255:
                raise _err(errno.ENAMETOOLONG)
            if name.startswith(WH_PREFIX):
                return self._negative()
            ppath, ent = self._resolve(parent, name)
            if not ent.found:
                return self._negative()
            node = self._node_for(parent, ppath, name, ent)
            st = ent.st if not (node.index is not None and node.in_upper) else None
            attrs = self._entry(node, st)
            node.lookups += 1
            return attrs
        attrs = self._entry(node)
        node.lookups += 1
        return attrs

    async def forget(self, inode_list):
        by_ino = self.table.by_ino
        for ino, n in inode_list:
            try:
                node = by_ino.get(ino)
                self.table.forget(ino, n)
                if node is not None and node.lookups == 0:
                    if self.passthrough:
                        self.fastpath.pt_drop(ino)
                    if node.fdh is not None:
                        self._close_fd(node)  # the kernel has no file open on it any more
                    elif node.is_dir:
                        self._dir_fp_drop(node)
            except Exception:  # pragma: no cover - never let forget fail
                log.exception("forget(%d)", ino)

    async def getattr(self, inode, ctx):
        node = self._node(inode)
        e = self._entry(node, fresh=True)
        if node.is_dir and self.fastpath is not None:
            self._dir_fp_add(node)  # the next GETATTRs are answered in C
        return e

    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self._node(inode)
        if not (fields.update_size or fields.update_uid or fields.update_gid or fields.update_mode
                or fields.update_atime or fields.update_mtime):
            return self._entry(node)  # ctime only (the kernel's own bookkeeping)
        self._check_rw()
        h = self.handles.get(fh) if fh is not None else None
        if not isinstance(h, Handle):
            h = next((x for x in node.handles if isinstance(x, Handle)), None)
        if not node.in_upper:
            if h is None and not node.is_dir and not node.aliases:
                # unlinked and closed (e.g. the file a rename replaced): nothing can see
                # it any more; the kernel is only flushing its cached times
                return self._entry(node)
            if not (fields.update_size or fields.update_uid or fields.update_gid
                    or fields.update_mode):
                st = self._stat(node)
                if ((not fields.update_mtime or attr.st_mtime_ns == st.st_mtime_ns)
                        and (not fields.update_atime or attr.st_atime_ns == st.st_atime_ns)):
                    # the kernel flushing times it has cached (writeback cache), unchanged:
                    # e.g. after an unlink; nothing to copy up for that
                    return self._entry(node)
            trunc = fields.update_size and attr.st_size == 0 and not node.is_dir
            await self._copy_up(node, data=not trunc)
        real = self._real(node)
        if real is None:
            if h is None:
                return self._entry(node)  # an unlinked upper file nobody has open
            fd = h.fd
        if fields.update_size:
            if real is None:
                os.ftruncate(fd, attr.st_size)
            else:
                os.truncate(real, attr.st_size)
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            if self.idmap is not None:
                uid, gid = self.idmap.stored(uid, gid)
            if real is None:
                os.fchown(fd, uid, gid)
            else:
                os.chown(real, uid, gid, follow_symlinks=False)
        if fields.update_mode:
            st = self._stat(node)
            if not stat.S_ISLNK(st.st_mode):
                if real is None:
                    os.fchmod(fd, stat.S_IMODE(attr.st_mode))
                else:
                    os.chmod(real, stat.S_IMODE(attr.st_mode))
        if fields.update_atime or fields.update_mtime:
            st = self._stat(node)
            atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            if real is None:
                os.utime(fd, ns=(atime, mtime))
            else:
                os.utime(real, ns=(atime, mtime), follow_symlinks=False)
        return self._entry(node)

    async def readlink(self, inode, ctx):
        node = self._node(inode)
        real = self._real(node)
        if real is None:
            raise _err(errno.ENOENT)
        return os.readlink(real)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        if stat.S_ISCHR(mode) and rdev == 0:
            raise _err(errno.EPERM)  # that is a whiteout; the kernel refuses it too
        node, _ = await self._create_entry(self._node(parent_inode), name, ctx, mode, rdev=rdev)
        return self._entry(node)

    async def mkdir(self, parent_inode, name, mode, ctx):
        mode = stat.S_IFDIR | stat.S_IMODE(mode)
        node, _ = await self._create_entry(self._node(parent_inode), name, ctx, mode)
        return self._entry(node)

    async def symlink(self, parent_inode, name, target, ctx):
        node, _ = await self._create_entry(
            self._node(parent_inode), name, ctx, stat.S_IFLNK | 0o777, target=target
        )
        return self._entry(node)

    async def create(self, parent_inode, name, mode, flags, ctx):
        mode = stat.S_IFREG | stat.S_IMODE(mode)
        node, fd = await self._create_entry(self._node(parent_inode), name, ctx, mode)
        if self.no_open:
            # no RELEASE will come for this open: the fd becomes the node's cached one
            # (a new file has no file capabilities: the kernel asks before each write)
            self._cache_fd(node, fd, True, nocaps=True)
            if self.passthrough:
                self._pt_backing(node)
                fi = pyfuse3.FileInfo(fh=node.ino | INO_TAG, keep_cache=True)
            else:
                fi = pyfuse3.FileInfo(fh=0, keep_cache=True)
            return fi, self._entry(node, node.last_st)
        fh = self._add_handle(Handle(fd, node, True))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._entry(node)

    async def unlink(self, parent_inode, name, ctx):
        parent = self._node(parent_inode)
        self._check_rw()
        if name.startswith(WH_PREFIX):
            raise _err(errno.ENOENT)
        ppath, ent = self._resolve(parent, name)
        if not ent.found:
            raise _err(errno.ENOENT)
        if ent.is_dir:
            raise _err(errno.EISDIR)
        node = self._node_for(parent, ppath, name, ent)
        if node.index is not None:
            await self._group_add(node, -1)
            ppath, ent = self._resolve(parent, name)
        self._pin_fd(node)
        self._remove_name(parent, ppath, name, ent)
        self.table.remove_alias(node, parent, name)
        if self._last_name_gone(node, ent):
            self.table.mark_deleted(node)
            self._fp_sync(node)
        self.table.maybe_drop(node)

    def _last_name_gone(self, node: Node, ent: Entry) -> bool:
        """After non-dir *node* lost the name *ent* was resolved from (unlink, or a
        rename over it): was that its last link?  Not if the table knows other names,
        its hard-link group still counts links, or the upper file had more links."""
        if node.aliases:
            return False
        if node.index is not None:
            return self._nlink(node, self._stat(node)) == 0
        return not ent.in_upper or ent.st.st_nlink <= 1

    def _remove_name(self, parent: Node, ppath: bytes, name: bytes, ent: Entry) -> None:
        need_wh = bool(parent.lowers) and self.layers.lower_positive(parent.lowers, name)
        if ent.in_upper:
            if need_wh:
                self._whiteout_upper(ppath, name, ent.is_dir)
            else:
                self._remove_upper(ppath, name, ent.is_dir)
        else:
            self._copy_up_dir(parent)
            self._make_whiteout(self._path(parent), name)

    async def rmdir(self, parent_inode, name, ctx):
        parent = self._node(parent_inode)
        self._check_rw()
        if name.startswith(WH_PREFIX):
            raise _err(errno.ENOENT)
        ppath, ent = self._resolve(parent, name)
        if not ent.found:
            raise _err(errno.ENOENT)
        if not ent.is_dir:
            raise _err(errno.ENOTDIR)
        node = self._node_for(parent, ppath, name, ent)
        try:
            if self._listdir(node):
                raise _err(errno.ENOTEMPTY)
            self._remove_name(parent, ppath, name, ent)
            self.table.remove_alias(node, parent, name)
            self.table.mark_deleted(node)
            self._fp_sync(node)
        finally:
            self.table.maybe_drop(node)

    def _listdir(self, node: Node) -> list[bytes]:
        return self._merged(node).names

    def _merged(self, node: Node) -> DirCache:
        dc = node.dcache
        if dc is None:
            names = self.layers.listdir(self._path(node) if node.in_upper else None, node.lowers)
            dc = node.dcache = DirCache(names)
        return dc

    @staticmethod
    def _touch(*dirs: Node | None) -> None:
        """The names in these dirs may change: drop their cached listings."""
        for d in dirs:
            if d is not None:
                d.dcache = None

    def _is_ancestor(self, a: Node, b: Node) -> bool:
        """Is dir *a* the same as or an ancestor of *b*?"""
        while b is not None:
            if b is a:
                return True
            b = b.parent
        return False

    def _fix_moved_dir(self, node: Node, new_parent: Node, new_name: bytes) -> None:
        """Before a dir (already in the upper) lands at a new name: keep its lower
        contents with a redirect, or hide what lies below the new name with opaque."""
        self._touch(node)
        real = self._real(node)
        if node.lowers:
            os.setxattr(real, self.redirect_xattr, b"/" + node.lowers[0][1])
        elif new_parent.lowers and self.layers.lower_positive(new_parent.lowers, new_name):
            if not dir_meta(real).opaque:
                self._set_opaque(real)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == (RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise _err(errno.EINVAL)
        self._check_rw()
        pold = self._node(parent_inode_old)
        pnew = self._node(parent_inode_new)
        if name_old.startswith(WH_PREFIX):
            raise _err(errno.ENOENT)
        check_name(name_new)
        oldpath, src = self._resolve(pold, name_old)
        if not src.found:
            raise _err(errno.ENOENT)
        newpath, dst = self._resolve(pnew, name_new)
        exchange = bool(flags & RENAME_EXCHANGE)
        if flags & RENAME_NOREPLACE and dst.found:
            raise _err(errno.EEXIST)
        if exchange and not dst.found:
            raise _err(errno.ENOENT)
        snode = self._node_for(pold, oldpath, name_old, src)
        dnode = self._node_for(pnew, newpath, name_new, dst) if dst.found else None
        try:
            await self._rename(pold, name_old, pnew, name_new, snode, dnode, src, dst, exchange)
        finally:
            self.table.maybe_drop(snode)
            if dnode is not None:
                self.table.maybe_drop(dnode)

    async def _rename(self, pold, name_old, pnew, name_new, snode, dnode, src, dst, exchange):
        if pold is pnew and name_old == name_new:
            return
        if dnode is snode and not exchange:
            return  # two links to one file: POSIX says do nothing
        if src.is_dir and self._is_ancestor(snode, pnew):
            raise _err(errno.EINVAL)
        if exchange and dst.is_dir and self._is_ancestor(dnode, pold):
            raise _err(errno.EINVAL)
        if dst.found and not exchange:
            if src.is_dir and not dst.is_dir:
                raise _err(errno.ENOTDIR)
            if not src.is_dir and dst.is_dir:
                raise _err(errno.EISDIR)
            if dst.is_dir and self._listdir(dnode):
                raise _err(errno.ENOTEMPTY)
        # all in the upper already (no copy-up, nothing awaited): src and dst stand
        ready = (snode.in_upper and pold.in_upper and pnew.in_upper
                 and (not exchange or dnode.in_upper)
                 and (dnode is None or dnode.index is None or exchange))
        await self._copy_up(snode)
        if exchange:
            await self._copy_up(dnode)
        if dnode is not None and dnode.index is not None and not exchange:
            await self._group_add(dnode, -1)
        self._copy_up_dir(pold)
        self._copy_up_dir(pnew)
        if ready:
            oldpath, newpath = self._path(pold), self._path(pnew)
        else:
            # Re-resolve: names may have changed while we copied.
            oldpath, src = self._resolve(pold, name_old)
            newpath, dst = self._resolve(pnew, name_new)
            if not src.found or (exchange and not dst.found):
                raise _err(errno.ENOENT)
        up_old = self._up(join(oldpath, name_old))
        up_new = self._up(join(newpath, name_new))
        # resolving dst found nothing at the name in the upper, not even a whiteout
        # (nor a .wh. file): nothing there to look at or clear
        dst_absent = not dst.in_upper and not dst.upper_whiteout
        if exchange:
            if snode.is_dir:
                self._fix_moved_dir(snode, pnew, name_new)
            if dnode.is_dir:
                self._fix_moved_dir(dnode, pold, name_old)
            renameat2(up_old, up_new, RENAME_EXCHANGE)
            self.table.remove_alias(snode, pold, name_old)
            self.table.remove_alias(dnode, pnew, name_new)
            self.table.add_alias(snode, pnew, name_new)
            self.table.add_alias(dnode, pold, name_old)
            return
        if dnode is not None:
            self._pin_fd(dnode)  # replaced: it may still be open
        if src.is_dir:
            self._fix_moved_dir(snode, pnew, name_new)
        if dst.found and dst.in_upper and dst.is_dir:
            # an empty merged dir may still hold whiteouts: move it aside first
            tmp = self.work.tmpname()
            os.rename(up_new, tmp)
            self._move(up_old, up_new, oldpath, name_old, pold, src.is_dir)
            copyup.remove_tree(tmp)
        else:
            self._move(up_old, up_new, oldpath, name_old, pold, src.is_dir, dst_absent)
        if not dst_absent:
            self._clear_oci_whiteout(newpath, name_new)
        if dnode is not None:
            self.table.remove_alias(dnode, pnew, name_new)
            if dnode.is_dir or self._last_name_gone(dnode, dst):
                self.table.mark_deleted(dnode)
                self._fp_sync(dnode)
        self.table.remove_alias(snode, pold, name_old)
        self.table.add_alias(snode, pnew, name_new)

    def _move(self, up_old: bytes, up_new: bytes, oldpath: bytes, name_old: bytes,
              pold: Node, is_dir: bool, dst_absent: bool = False) -> None:
        """rename(2) in the upper, leaving a whiteout behind if a lower has the name."""
        need_wh = bool(pold.lowers) and self.layers.lower_positive(pold.lowers, name_old)
        dst_st = None if dst_absent else lstat_or_none(up_new)
        over_whiteout = dst_st is not None and is_whiteout_stat(dst_st)
        if is_dir and over_whiteout:
            # a dir can't replace a non-dir: swap with the whiteout instead
            renameat2(up_old, up_new, RENAME_EXCHANGE)
            if not need_wh or not self._dev_whiteout(name_old):
                os.unlink(up_old)
                if need_wh:
                    self._make_whiteout(oldpath, name_old)
            return
        if need_wh and self._dev_whiteout(name_old):
            if self._rename_whiteout:
                try:
                    renameat2(up_old, up_new, RENAME_WHITEOUT)
                    return
                except OSError as e:
                    if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
                        raise
                    self._rename_whiteout = False
            os.rename(up_old, up_new)
            self._make_whiteout(oldpath, name_old)
            return
        if need_wh:  # oci: the .wh. marker first; the entry still wins until it moves
            self._make_whiteout(oldpath, name_old)
        os.rename(up_old, up_new)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        node = self._node(inode)
        pnew = self._node(new_parent_inode)
        check_name(new_name)
        self._check_rw()
        if node.is_dir:
            raise _err(errno.EPERM)
        newpath, dst = self._resolve(pnew, new_name)
        if dst.found:
            raise _err(errno.EEXIST)
        await self._copy_up(node)
        self._copy_up_dir(pnew)
        newpath, dst = self._resolve(pnew, new_name)
        if dst.found:
            raise _err(errno.EEXIST)
        real = self._real(node)
        if real is None:
            raise _err(errno.ENOENT)
        tmp = self.work.tmpname()
        os.link(real, tmp)
        try:
            self._place(tmp, newpath, new_name, False)
        except BaseException:
            copyup.remove_tree(tmp)
            raise
        if node.index is not None:
            await self._group_add(node, +1)
        self.table.add_alias(node, pnew, new_name)
        node.lookups += 1
        return self._entry(node)

    # -- files ------------------------------------------------------------------------

    def _add_handle(self, h) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = h
        if isinstance(h, Handle):
            h.node.add_handle(h)
        return fh

    def _pt_backing(self, node: Node) -> None:
        """Give *node* a backing file (its cached fd) unless it has one: the shim adds
        it to the open replies for the node (FOPEN_PASSTHROUGH)."""
        fp = self.fastpath
        st = fp.pt_state(node.ino)
        if (st is not None and st[0] > 0) or self._pt_refused or node.fdh is None:
            return
        if self.rw and not (node.in_upper and node.fdh.upper):
            # A lower file may be copied up while it is open, and files opened before
            # must then read the new data (as on overlayfs); a passthrough open would
            # go on reading the lower file.  So lower files stay in the kernel's cache
            # of this mount (and the daemon's READs), unless nothing can be copied up.
            # (The fd too must be on the upper file: the kernel would open its path for
            # writing.)
            return
        try:
            bid = fp.backing_open(node.fdh.fd)
        except OSError as e:
            if e.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTTY):
                self._pt_refused = True
                log.warning("passthrough refused by the kernel (%s): files are read "
                            "and written through the daemon", e.strerror)
            else:  # e.g. ELOOP: a layer too deeply stacked for it
                log.debug("no backing file for %r: %s", node.path(), e)
            return
        fp.pt_set(node.ino, bid)

    async def _open_passthrough(self, node: Node, flags: int):
        if flags & os.O_TRUNC:  # (atomic_o_trunc: the kernel leaves it to us)
            self._check_rw()
            if not node.in_upper:
                await self._copy_up(node, data=False)
            fd = await self._file_fd(node, True)
            os.ftruncate(fd, 0)
        else:
            fd = await self._file_fd(node, flags & os.O_ACCMODE != os.O_RDONLY)  # copied up for a write
        self._pt_backing(node)
        if not node.in_upper and self.rw:  # (a read-only mount passes every file through)
            self._prime(node, fd)
        # (with a backing file the shim drops keep_cache; without one, an upper file's
        # pages in this mount's cache may predate writes made through a backing file)
        return pyfuse3.FileInfo(fh=node.ino | INO_TAG, keep_cache=not node.in_upper)

    async def open(self, inode, flags, ctx):
        node = self._node(inode)
        if self.passthrough:
            return await self._open_passthrough(node, flags)
        acc = flags & os.O_ACCMODE
        if acc != os.O_RDONLY or flags & os.O_TRUNC:
            self._check_rw()
            if not node.in_upper:
                await self._copy_up(node, data=not flags & os.O_TRUNC)
        real = self._real(node)
        if real is None:
            raise _err(errno.ENOENT)
        oflags = flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_DIRECT)
        if acc == os.O_WRONLY:  # writeback cache: the kernel may read through it
            oflags = (oflags & ~os.O_ACCMODE) | os.O_RDWR
        oflags &= ~os.O_APPEND  # the kernel keeps the offsets with writeback cache
        fd = os.open(real, oflags | os.O_CLOEXEC | os.O_NOFOLLOW)
        fh = self._add_handle(Handle(fd, node, node.in_upper))
        if not node.in_upper:
            self._prime(node, fd)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    def _prime(self, node: Node, fd: int) -> None:
        """At the first open of a small lower file (read-only: a write copies it up
        first), store its data in the kernel's page cache (NOTIFY_STORE) before the OPEN
        is answered.  Its reads are then served from there with no READ round trip, and,
        since no READ completes, the kernel does not drop the file's atime either, which
        made the next stat of it a GETATTR round trip (20,000 small files read twice:
        the second pass 2.46 -> 2.12 s, the first 4.29 -> 4.13 s, medians of 6
        interleaved).  Lower files never change, and the size stored is the one the
        kernel was told.  Once per node: the kernel keeps the pages across opens (with
        keep_cache), and READ refills any it drops."""
        if node.primed or node.deleted:
            return
        node.primed = True
        e = node.attrs  # what the kernel was told of this lower file
        size = e.st_size if e is not None else -1
        if not 0 < size <= PRIME_MAX:
            return
        try:
            data = os.pread(fd, size + 1, 0)
            if len(data) == size:
                pyfuse3.notify_store(node.ino, 0, data)
        except OSError as err:  # e.g. ENOENT: the kernel forgot the inode meanwhile
            log.debug("priming %d: %s", node.ino, err)

    async def read(self, fh, off, size):
        if fh & INO_TAG:
            node = self._node(fh & INO_MASK)
            h = node.fdh
            return os.pread(h.fd if h is not None else await self._file_fd(node, False), size, off)
        return os.pread(self.handles[fh].fd, size, off)

    async def write(self, fh, off, buf):
        if fh & INO_TAG:
            node = self._node(fh & INO_MASK)
            h = node.fdh
            if h is not None and h.writable and node.in_upper:
                return os.pwrite(h.fd, buf, off)
            return os.pwrite(await self._file_fd(node, True), buf, off)
        return os.pwrite(self.handles[fh].fd, buf, off)

    def fileop(self, op: int, ino: int, fh: int, a: int, b: int, c: int, req: int) -> int:
        """FALLOCATE (op 0: mode a, offset b, length c) and LSEEK (op 1: offset a, whence
        b) on a file the C fast path has no fd for (fs/_fuseshim.c calls this, outside
        pyfuse3; pyfuse3 has neither): the result, or -errno."""
        try:
            if fh & INO_TAG:
                node = self.table.get(fh & INO_MASK)
                h = node.fdh if node is not None else None
                writable = h is not None and h.writable and node.in_upper
            else:
                h = self.handles.get(fh)
                writable = h is not None and h.upper
            if h is not None and (op == 1 or writable):
                if op == 0:
                    copyup.fallocate(h.fd, a, b, c)
                    return 0
                return os.lseek(h.fd, a, b)
            # no fd of ours yet (the kernel opened it without OPEN): the file's own
            # data, on an fd of its own; a lower file is copied up first, in a task
            # that answers when done
            node = self.table.get(ino)
            if node is None or node.is_dir:
                return -errno.EBADF
            if op == 0 and not node.in_upper:
                if self.worker_nursery is None or self.fastpath is None:
                    return -errno.EOPNOTSUPP
                self.worker_nursery.start_soon(self._fallocate_later, req, node, a, b, c)
                return FILEOP_PENDING
            real = self._real(node)
            if real is None:
                return -errno.ENOENT
            fd, writable = self._open_file(node, real, op == 0)
            try:
                if op == 0:
                    copyup.fallocate(fd, a, b, c)
                    return 0
                return os.lseek(fd, a, b)
            finally:
                os.close(fd)
        except OSError as e:
            return -(e.errno or errno.EIO)
        except Exception:
            log.exception("fileop(%d, %d)", op, ino)
            return -errno.EIO

    async def _fallocate_later(self, req: int, node: Node, mode: int, off: int, n: int):
        try:
            fd = await self._file_fd(node, True)
            copyup.fallocate(fd, mode, off, n)
            r = 0
        except pyfuse3.FUSEError as e:
            r = -e.errno
        except OSError as e:
            r = -(e.errno or errno.EIO)
        except Exception:
            log.exception("fallocate(%d)", node.ino)
            r = -errno.EIO
        self.fastpath.fileop_reply(req, 0, r)

    # No flush handler: pyfuse3 answers ENOSYS once and the kernel stops sending FLUSH on
    # every close (dirty pages are still written back and their errors reported).

    async def release(self, fh):
        h = self.handles.pop(fh, None)
        if h is None:
            return  # fh & INO_TAG: a file created before the kernel stopped opening
        os.close(h.fd)
        node = h.node
        node.drop_handle(h)
        self._drop_orphan(node)
        self.table.maybe_drop(node)

    async def fsync(self, fh, datasync):
        if fh & INO_TAG:
            node = self._node(fh & INO_MASK)
            if not node.in_upper:
                return  # nothing of it was ever written
            fd = await self._file_fd(node, False)
        else:
            fd = self.handles[fh].fd
        fd = os.dup(fd)  # the cached one may be closed (LRU) while the thread syncs
        try:
            await self._in_thread(os.fdatasync if datasync else os.fsync, fd)
        finally:
            os.close(fd)

    # -- directories ------------------------------------------------------------------

    async def opendir(self, inode, ctx):
        node = self._node(inode)
        if not node.is_dir:
            raise _err(errno.ENOTDIR)
        return self._add_handle(DirHandle(node))

    async def readdir(self, fh, start_id, token):
        # fh & INO_TAG: the kernel does not open dirs (cached listings, fs/_fuseshim.c)
        node = self._node(fh & INO_MASK) if fh & INO_TAG else self.handles[fh].node
        ppath = node.path()
        if ppath is None:
            return
        dc = self._merged(node)
        # Offsets are positions in hash order (see DirCache), not in one listing: a
        # reader resumes after the last name it got even if the dir changed meanwhile,
        # so names present throughout come exactly once.
        if start_id < 2:  # "." and "..": the kernel takes no reference on them
            for (key, dname), ino in zip(_DOTS, _dot_inos(node)):
                if start_id < key:
                    ea = pyfuse3.EntryAttributes()
                    ea.st_ino = ino
                    ea.st_mode = stat.S_IFDIR
                    ea.entry_timeout = ea.attr_timeout = 0
                    if not pyfuse3.readdir_reply(token, dname, ea, key):
                        return
        keys = dc.keys
        start = bisect.bisect_right(keys, start_id) if start_id else 0
        names = dc.names
        ents = dc.ents
        by_ino = self.table.by_ino
        upper_dir = ppath if node.in_upper else None
        for i in range(start, len(names)):
            name = names[i]
            # No name in this dir changed since dc was built (a change drops it): a
            # child node still in the table still stands for this name (skip resolving).
            try:
                ref = ents[name]
            except KeyError:
                child = None
            else:
                if ref is None:
                    continue  # resolved to nothing
                child = ref()
                if child is not None and (child.deleted or by_ino.get(child.ino) is not child):
                    child = None
            if child is not None:
                st = None  # _entry: the cached attrs of a lower-only node, else a fresh stat
            else:
                ent = self.layers.resolve(upper_dir, node.lowers, name)
                if not ent.found:
                    ents[name] = None
                    continue
                child = self._node_for(node, ppath, name, ent)
                ents[name] = weakref.ref(child)
                st = ent.st if not (child.index is not None and child.in_upper) else None
            if not pyfuse3.readdir_reply(token, name, self._entry(child, st), keys[i]):
                self.table.maybe_drop(child)
                return
            child.lookups += 1

    def readdir_plain(self, ino: int, size: int, off: int) -> bytes | int:
        """Plain READDIR (fs/_fuseshim.c calls this, outside pyfuse3): up to *size*
        bytes of fuse_dirent records after offset *off*, or an errno.  The kernel asks
        for it instead of READDIRPLUS while nobody looks up the names it lists, so a
        big listing makes no node per name; each d_ino is the number stat will show."""
        try:
            node = self.table.get(ino)
            if node is None:
                return errno.ENOENT
            if not node.is_dir:
                return errno.ENOTDIR
            ppath = node.path()
            if ppath is None:
                return b""
            dc = self._merged(node)
            plain = dc.plain
            if plain is None:
                plain = dc.plain = self._plain_listing(node, ppath, dc)
            buf, pos, keys = plain
            dots = _dot_records(node, off) if off < 2 else b""
            size -= len(dots)
            i = bisect.bisect_right(keys, off) if off else 0
            j = bisect.bisect_right(pos, pos[i] + size, i) - 1  # whole records only
            return dots + buf[pos[i] : pos[j]] if dots else buf[pos[i] : pos[j]]
        except OSError as e:
            return e.errno or errno.EIO
        except Exception:
            log.exception("readdir_plain(%d)", ino)
            return errno.EIO

    def _plain_listing(self, node: Node, ppath: bytes, dc: DirCache):
        """fuse_dirent records for a merged dir's names (see readdir_plain).  Each name's
        identity is what lookup would find: a node still in the table, else the top-most
        real entry (its origin, once copied up), read from one scan of each layer."""
        want: dict[bytes, tuple[int, int] | None] = {}  # name -> (d_ino, d_type)
        by_ino = self.table.by_ino
        missing = 0
        for name in dc.names:
            ref = dc.ents.get(name, 0)
            if ref is None:
                continue  # resolved to nothing
            child = ref() if ref else None
            if child is not None and not child.deleted and by_ino.get(child.ino) is child:
                st = child.attrs or child.last_st
                if st is not None:
                    want[name] = (child.ino, stat.S_IFMT(st.st_mode) >> 12)
                    continue
            want[name] = None
            missing += 1
        dirs = []
        if node.in_upper:
            dirs.append((True, self._up(ppath)))
        dirs.extend((False, self.layers.real(i, r)) for i, r in node.lowers)
        predict = self.table.predict
        for upper, real in dirs:
            if not missing:
                break
            try:
                dev = os.stat(real).st_dev
                it = os.scandir(real)
            except (FileNotFoundError, NotADirectoryError):
                continue
            # d_ino + the dir's st_dev is what lstat would say, but for a dir that
            # is a mount point and for a layer on a filesystem that numbers its files
            # otherwise (overlayfs without xino): dirs are always lstat'ed, and if the
            # first file is off, every entry here is
            checked = stat_all = False
            with it:
                for e in it:
                    name = e.name
                    if want.get(name, 0) is not None:
                        continue  # not listed, or known already
                    try:
                        if e.is_dir(follow_symlinks=False):
                            st = e.stat(follow_symlinks=False)
                            key = (st.st_dev, st.st_ino)
                            dt = _DT_DIR
                        elif e.is_file(follow_symlinks=False):
                            dt = _DT_REG
                        elif e.is_symlink():
                            dt = _DT_LNK
                        else:
                            st = e.stat(follow_symlinks=False)
                            if is_whiteout_stat(st):
                                continue  # hides lower ones: the name is not from here
                            dt = stat.S_IFMT(st.st_mode) >> 12
                        if dt != _DT_DIR:
                            key = (dev, e.inode())
                            if not checked or stat_all:
                                st = e.stat(follow_symlinks=False)
                                real_key = (st.st_dev, st.st_ino)
                                stat_all = stat_all or (not checked and real_key != key)
                                checked = True
                                key = real_key
                    except FileNotFoundError:
                        continue
                    if upper:
                        origin = self._origin(os.path.join(real, name))
                        if origin is not None:
                            key = origin[0]
                    want[name] = (predict(key), dt)
                    missing -= 1
        parts = []
        pos = array.array("Q", [0])  # 8 bytes a name, not a list of int objects
        keys = []
        n = 0
        pack = _DIRENT.pack
        for key, name in zip(dc.keys, dc.names):
            v = want.get(name)
            if v is None:
                continue  # resolved to nothing, or gone meanwhile
            ln = len(name)
            rec = pack(v[0], key, ln, v[1]) + name
            pad = -(24 + ln) & 7
            if pad:
                rec += b"\0" * pad
            parts.append(rec)
            n += len(rec)
            pos.append(n)
            keys.append(key)
        return b"".join(parts), pos, keys

    async def releasedir(self, fh):
        self.handles.pop(fh, None)

    async def fsyncdir(self, fh, datasync):
        node = self._node(fh & INO_MASK) if fh & INO_TAG else self.handles[fh].node
        real = self._real(node)
        if real is None or not node.in_upper:
            return

        def _sync() -> None:
            fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        await self._in_thread(_sync)

    async def statfs(self, ctx):
        root = self.layers.roots[0] if self.rw else self.layers.roots[1]
        sv = os.statvfs(root)
        out = pyfuse3.StatvfsData()
        for attr in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail"):
            setattr(out, attr, getattr(sv, attr))
        out.f_namemax = 255
        return out

    # -- xattrs -----------------------------------------------------------------------

    async def getxattr(self, inode, name, ctx):
        if is_private_xattr(name):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        node = self._node(inode)
        real = self._real(node)
        if real is None:
            raise _err(errno.ENOENT)
        try:
            return os.getxattr(real, name, follow_symlinks=False)
        except OSError as e:
            h = node.fdh
            if e.errno == errno.ENODATA and name == CAPS_XATTR and h is not None and not h.nocaps:
                h.nocaps = True
                self._fp_sync(node)
            raise

    async def listxattr(self, inode, ctx):
        node = self._node(inode)
        real = self._real(node)
        if real is None:
            raise _err(errno.ENOENT)
        out = []
        for n in os.listxattr(real, follow_symlinks=False):
            b = n.encode()
            if not is_private_xattr(b):
                out.append(b)
        return out

    async def setxattr(self, inode, name, value, ctx):
        if is_private_xattr(name):
            raise _err(errno.EPERM)
        node = self._node(inode)
        self._check_rw()
        await self._copy_up(node)
        self._caps_may_change(node)
        os.setxattr(self._real(node), name, value, follow_symlinks=False)

    async def removexattr(self, inode, name, ctx):
        if is_private_xattr(name):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        node = self._node(inode)
        self._check_rw()
        await self._copy_up(node)
        self._caps_may_change(node)
        os.removexattr(self._real(node), name, follow_symlinks=False)

    def _caps_may_change(self, node: Node) -> None:
        h = node.fdh
        if h is not None and h.nocaps:
            h.nocaps = False
            self._fp_sync(node)

    async def access(self, inode, mode, ctx):
        node = self._node(inode)
        st = self._stat(node)
        if mode & os.W_OK and not self.rw:
            raise _err(errno.EROFS)
        if ctx.uid == 0:
            if mode & os.X_OK and not stat.S_ISDIR(st.st_mode) and not st.st_mode & 0o111:
                return False
            return True
        perm = st.st_mode
        uid, gid = self.idmap.shown(st.st_uid, st.st_gid) if self.idmap else (st.st_uid, st.st_gid)
        if ctx.uid == uid:
            bits = (perm >> 6) & 7
        elif ctx.gid == gid or gid in pyfuse3.get_sup_groups(ctx.pid):
            bits = (perm >> 3) & 7
        else:
            bits = perm & 7
        return (mode & bits) == mode


for _name, _parents in (("create", (0,)), ("mknod", (0,)), ("mkdir", (0,)), ("symlink", (0,)),
                        ("link", (1,)), ("unlink", (0,)), ("rmdir", (0,)), ("rename", (0, 2))):
    setattr(UnionOperations, _name, _changes_names(vars(UnionOperations)[_name], _parents))

for _name, _fn in list(vars(UnionOperations).items()):
    if (
        inspect.iscoroutinefunction(_fn)
        and not _name.startswith("_")
        and _name in vars(pyfuse3.Operations)
    ):
        setattr(UnionOperations, _name, _fuse_edge(_fn))
