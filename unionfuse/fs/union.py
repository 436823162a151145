"""Union rules: how layers combine into one tree.  No pyfuse3 here.

Layers are numbered 0 (the upper dir, if any) and 1..n (lower dirs, top-most first).
Paths inside a layer are *relative* byte strings (b"" is the layer root).

Read side, every common form is understood in every layer:

* whiteouts: a 0/0 character device, or a ``.wh.NAME`` file (OCI);
* opaque dirs: ``trusted.overlay.opaque`` / ``user.overlay.opaque`` = ``y``, or a
  ``.wh..wh..opq`` entry inside the dir (OCI);
* renamed dirs: ``trusted.overlay.redirect`` / ``user.overlay.redirect`` (absolute
  ``/a/b`` from the layer root, or a plain name relative to the parent), as the kernel
  writes with ``redirect_dir=on``.

Within one layer a real entry wins over a ``.wh.`` sibling of the same name (OCI
image-spec layer.md: a whiteout only applies to lower layers).
"""

from __future__ import annotations

import collections
import errno
import os
import stat
import threading
from dataclasses import dataclass, field

WH_PREFIX = b".wh."
WH_OPAQUE = b".wh..wh..opq"
OVERLAY_NS = (b"trusted.overlay.", b"user.overlay.")
NAME_MAX = 255


def is_private_xattr(name: bytes) -> bool:
    """True for xattrs the mount never lists or lets users set (the kernel's overlay
    xattrs and the daemon's own records, kept under ``*.overlay.unionfuse.*``)."""
    return name.startswith(OVERLAY_NS)


def is_whiteout_stat(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def lstat_or_none(path: bytes) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:  # e.g. ".wh." + a 252-byte name
            return None
        raise


def _getxattr(path: bytes, name: bytes) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES):
            return None
        raise


@dataclass(frozen=True)
class DirMeta:
    opaque: bool = False
    redirect: bytes | None = None


def dir_meta(path: bytes, wh_opaque: bool | None = None) -> DirMeta:
    """Opaque flag and redirect of one real directory (*wh_opaque*: whether it holds a
    ``.wh..wh..opq`` entry, if the caller knows already)."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EACCES, errno.EPERM):
            names = []
        else:
            raise
    opaque = False
    redirect = None
    if names:
        for ns in OVERLAY_NS:
            nsstr = ns.decode()
            if nsstr + "opaque" in names and _getxattr(path, ns + b"opaque") == b"y":
                opaque = True
            if redirect is None and nsstr + "redirect" in names:
                redirect = _getxattr(path, ns + b"redirect") or None
    if not opaque:
        if wh_opaque is None:
            wh_opaque = lstat_or_none(os.path.join(path, WH_OPAQUE)) is not None
        opaque = wh_opaque
    return DirMeta(opaque, redirect)


def join(rel: bytes, name: bytes) -> bytes:
    return name if not rel else rel + b"/" + name


def parent_of(rel: bytes) -> bytes:
    i = rel.rfind(b"/")
    return b"" if i < 0 else rel[:i]


def check_name(name: bytes) -> None:
    """Names a user may create through the mount."""
    if len(name) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, "name too long")
    if name.startswith(WH_PREFIX):
        raise OSError(errno.EINVAL, "reserved whiteout name")


@dataclass
class Entry:
    """What one name resolves to in a merged directory."""

    found: bool = False
    is_dir: bool = False
    # Real stat of the top-most real entry (upper if in_upper, else the top lower).
    st: os.stat_result | None = None
    in_upper: bool = False
    # Lower layers contributing: for a dir, every merged lower dir (top first); for a
    # non-dir, the single lower file it comes from (empty if upper-only).
    lowers: list[tuple[int, bytes]] = field(default_factory=list)
    # The upper layer hides the name with a whiteout (create/mkdir must replace it).
    upper_whiteout: bool = False
    opaque: bool = False


# Kinds of the names in one cached lower dir.
K_DIR = 1
K_OTHER = 2  # file, symlink, device, ...
K_WHITEOUT = 3  # a 0/0 character device


class LowerDir:
    """One real directory of a lower layer, scanned once: its names (in scandir order)
    with their kinds, the names its ``.wh.`` files hide, and (lazily) its opaque flag and
    redirect.  Lower layers never change while mounted, so this stays true."""

    __slots__ = ("names", "wh", "_meta", "path")

    def __init__(self, path: bytes, names: dict[bytes, int], wh: set[bytes]):
        self.path = path
        self.names = names
        self.wh = wh
        self._meta: DirMeta | None = None

    def meta(self) -> DirMeta:
        m = self._meta
        if m is None:
            m = self._meta = dir_meta(self.path, WH_OPAQUE in self.wh)
        return m


def scan_lower(path: bytes) -> LowerDir | None:
    """Scan one real dir (None if there is no dir at *path*)."""
    try:
        it = os.scandir(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            return None
        raise
    names: dict[bytes, int] = {}
    wh: set[bytes] = set()
    with it:
        for e in it:
            n = e.name
            if n.startswith(WH_PREFIX):
                # ".wh..wh..opq" is kept as the name "..wh..opq" would be: never a real
                # entry name, so it can't clash; LowerDir.meta() looks for it
                wh.add(WH_OPAQUE if n == WH_OPAQUE else n[len(WH_PREFIX) :])
                continue
            try:
                if e.is_dir(follow_symlinks=False):
                    names[n] = K_DIR
                    continue
                if _maybe_device(e) and is_whiteout_stat(e.stat(follow_symlinks=False)):
                    names[n] = K_WHITEOUT
                    continue
            except FileNotFoundError:
                continue
            names[n] = K_OTHER
    return LowerDir(path, names, wh)


class LowerCache:
    """Scanned lower dirs, bounded by the total number of names held (the oldest scans
    go first: FIFO, so a hit costs one dict lookup)."""

    def __init__(self, max_names: int = 200_000):
        self.max_names = max_names
        self.size = 0
        self._d: dict[tuple[int, bytes], LowerDir | None] = {}

    def get(self, key: tuple[int, bytes], path: bytes) -> LowerDir | None:
        d = self._d
        try:
            return d[key]
        except KeyError:
            pass
        ld = scan_lower(path)
        n = 1 + (len(ld.names) + len(ld.wh) if ld is not None else 0)
        d[key] = ld
        self.size += n
        while self.size > self.max_names and len(d) > 1:
            old = d.pop(next(iter(d)))
            self.size -= 1 + (len(old.names) + len(old.wh) if old is not None else 0)
        return ld

    def clear(self) -> None:
        self._d.clear()
        self.size = 0


class Layers:
    """The real directories of one mount and the rules to combine them.

    With ``cache_lowers=True`` the lower layers are taken to be immutable (true for a
    mount: only the daemon writes, and only to the upper) and their directories are
    scanned once and answered from memory (see LowerCache)."""

    def __init__(self, upper: bytes | None, lowers: list[bytes], cache_lowers: bool = False):
        # roots[0] is the upper (None for a read-only mount)
        self.roots: list[bytes | None] = [upper] + list(lowers)
        self.nlower = len(lowers)
        self.cache: LowerCache | None = LowerCache() if cache_lowers else None

    def lower_dir(self, idx: int, rel: bytes) -> LowerDir | None:
        """The cached scan of a lower dir (None: no dir there).  Needs the cache."""
        key = (idx, rel)
        try:
            return self.cache._d[key]
        except KeyError:
            return self.cache.get(key, self.real(idx, rel))

    def real(self, idx: int, rel: bytes) -> bytes:
        root = self.roots[idx]
        assert root is not None
        return root if not rel else short_path(root + b"/" + rel)

    def upper(self, rel: bytes) -> bytes:
        return self.real(0, rel)

    def _wh_file(self, idx: int, rel: bytes) -> bool:
        parent = parent_of(rel)
        base = rel[len(parent) + 1 :] if parent else rel
        return lstat_or_none(self.real(idx, join(parent, WH_PREFIX + base))) is not None

    def resolve(
        self,
        upper_dir: bytes | None,
        parent_lowers: list[tuple[int, bytes]],
        name: bytes,
    ) -> Entry:
        """Resolve *name* in a merged directory.

        *upper_dir* is the parent's relative path in the upper layer if the parent
        exists there (else None); *parent_lowers* the parent's lower stack.
        """
        ent = Entry()
        relname = name
        override: bytes | None = None  # absolute redirect in force below this point
        if upper_dir is not None and self.roots[0] is not None:
            rel = join(upper_dir, name)
            st = lstat_or_none(self.upper(rel))
            if st is not None:
                if is_whiteout_stat(st):
                    ent.upper_whiteout = True
                    return ent
                ent.found, ent.st, ent.in_upper = True, st, True
                if not stat.S_ISDIR(st.st_mode):
                    return ent
                ent.is_dir = True
                meta = dir_meta(self.upper(rel))
                # OCI: a .wh.NAME beside dir NAME in one layer deleted the lower NAME
                if meta.opaque or self._wh_file(0, rel):
                    ent.opaque = True
                    return ent
                if meta.redirect:
                    override, relname = self._follow(meta.redirect, override, relname)
            elif self._wh_file(0, rel):
                # (also under a dir with no lower layer, where it hides nothing: found,
                # it is cleared by the create or rename that takes the name, and a
                # stale one beside a dir would make that dir opaque)
                ent.upper_whiteout = True
                return ent
        if self.cache is not None:
            try:
                return self._resolve_lowers_cached(ent, parent_lowers, relname, override)
            except OSError:
                pass  # e.g. an unreadable lower dir: answer the slow way
        pmap = dict(parent_lowers)
        for idx in range(1, self.nlower + 1):
            if override is not None:
                rel = override
            else:
                ppath = pmap.get(idx)
                if ppath is None:
                    continue
                rel = join(ppath, relname)
            st = lstat_or_none(self.real(idx, rel))
            if st is None:
                if self._wh_file(idx, rel):
                    break
                continue
            if is_whiteout_stat(st):
                break
            if stat.S_ISDIR(st.st_mode):
                if not ent.found:
                    ent.found, ent.is_dir, ent.st = True, True, st
                elif not ent.is_dir:
                    break
                ent.lowers.append((idx, rel))
                meta = dir_meta(self.real(idx, rel))
                if meta.opaque or self._wh_file(idx, rel):
                    break
                if meta.redirect:
                    override, relname = self._follow(meta.redirect, override, relname)
            else:
                if not ent.found:
                    ent.found, ent.st = True, st
                    ent.lowers.append((idx, rel))
                break
        return ent

    def _resolve_lowers_cached(self, ent: Entry, parent_lowers, relname: bytes,
                               override: bytes | None) -> Entry:
        """The lower half of resolve() from scanned dirs: one lstat for the entry found,
        none at all for a name no lower layer has."""
        found, is_dir, st = ent.found, ent.is_dir, ent.st
        lowers: list[tuple[int, bytes]] = []
        pmap = dict(parent_lowers)
        for idx in range(1, self.nlower + 1):
            if override is not None:
                rel = override
                pdir = parent_of(rel)
                base = rel[len(pdir) + 1 :] if pdir else rel
            else:
                pdir = pmap.get(idx)
                if pdir is None:
                    continue
                base = relname
                rel = join(pdir, base)
            ld = self.lower_dir(idx, pdir)
            if ld is None:
                continue
            kind = ld.names.get(base)
            if kind is None:
                if base in ld.wh:
                    break
                continue
            if kind == K_WHITEOUT:
                break
            if kind == K_DIR:
                if not found:
                    st = lstat_or_none(self.real(idx, rel))
                    if st is None or not stat.S_ISDIR(st.st_mode):
                        raise OSError(errno.ESTALE, "lower layer changed")
                    found, is_dir = True, True
                elif not is_dir:
                    break
                lowers.append((idx, rel))
                sub = self.lower_dir(idx, rel)
                if sub is None:
                    raise OSError(errno.ESTALE, "lower layer changed")
                meta = sub.meta()
                if meta.opaque or base in ld.wh:
                    break
                if meta.redirect:
                    override, relname = self._follow(meta.redirect, override, relname)
            else:
                if not found:
                    st = lstat_or_none(self.real(idx, rel))
                    if st is None:
                        raise OSError(errno.ESTALE, "lower layer changed")
                    found = True
                    lowers.append((idx, rel))
                break
        ent.found, ent.is_dir, ent.st = found, is_dir, st
        ent.lowers.extend(lowers)
        return ent

    @staticmethod
    def _follow(redirect: bytes, override: bytes | None, relname: bytes):
        if redirect.startswith(b"/"):
            return redirect.strip(b"/"), relname
        if b"/" in redirect or redirect in (b".", b".."):
            return override, relname  # malformed: ignore, as the kernel does
        if override is not None:
            return join(parent_of(override), redirect), relname
        return None, redirect

    def lower_positive(self, parent_lowers: list[tuple[int, bytes]], name: bytes) -> bool:
        """Does any lower layer (below the upper) show *name* in this directory?"""
        return self.resolve(None, parent_lowers, name).found

    def listdir(
        self, upper_dir: bytes | None, lowers: list[tuple[int, bytes]]
    ) -> list[bytes]:
        """Visible names of a merged directory, upper first then each lower."""
        dirs: list[bytes] = []
        if upper_dir is not None and self.roots[0] is not None:
            dirs.append(self.upper(upper_dir))
        seen: set[bytes] = set()
        hidden: set[bytes] = set()
        out: list[bytes] = []
        if self.cache is not None:
            # upper first (scanned: it changes), then the cached lowers
            if dirs:
                self._listdir_real(dirs, seen, hidden, out)
            for i, r in lowers:
                ld = self.lower_dir(i, r)
                if ld is None:
                    continue
                for n, kind in ld.names.items():
                    if n in seen or n in hidden:
                        continue
                    if kind == K_WHITEOUT:
                        hidden.add(n)
                        continue
                    seen.add(n)
                    out.append(n)
                hidden.update(ld.wh)
            return out
        dirs.extend(self.real(i, r) for i, r in lowers)
        self._listdir_real(dirs, seen, hidden, out)
        return out

    @staticmethod
    def _listdir_real(dirs: list[bytes], seen: set[bytes], hidden: set[bytes], out: list[bytes]) -> None:
        for d in dirs:
            layer_wh: list[bytes] = []
            try:
                it = os.scandir(d)
            except (FileNotFoundError, NotADirectoryError):
                continue
            with it:
                for e in it:
                    n = e.name
                    if n.startswith(WH_PREFIX):
                        if n != WH_OPAQUE:
                            layer_wh.append(n[len(WH_PREFIX) :])
                        continue
                    if n in seen or n in hidden:
                        continue
                    if _maybe_device(e) and is_whiteout_stat(e.stat(follow_symlinks=False)):
                        hidden.add(n)
                        continue
                    seen.add(n)
                    out.append(n)
            hidden.update(layer_wh)


def _maybe_device(e: os.DirEntry) -> bool:
    """d_type says neither dir, file nor symlink (no syscall when d_type is known)."""
    try:
        return not (
            e.is_dir(follow_symlinks=False) or e.is_file(follow_symlinks=False) or e.is_symlink()
        )
    except OSError:
        return False


# -- paths longer than the kernel takes ---------------------------------------------------
#
# A merged path may be as long as PATH_MAX (the kernel hands us one name at a time), so
# a layer root + that path may not fit in one syscall (ENAMETOOLONG: pjdfstest's */03.t).
# Such a path is reached through an O_PATH fd on its parent dir, opened a few components
# at a time: "/proc/self/fd/N/NAME" works for every path call (stat, open, rename,
# xattrs...) and, joined with more names, for the names below.  The fds are closed
# after SHORT_KEEP more long paths (a caller uses its path at once).

SHORT_AT = 3800  # with a 255-byte name added, still under PATH_MAX (4096)
SHORT_KEEP = 512
_short_fds: collections.deque[int] = collections.deque()
_short_lock = threading.Lock()


def _open_dir_chain(path: bytes) -> int:
    flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
    fd = os.open(b"/", flags)
    try:
        chunk: list[bytes] = []
        size = 0
        parts = [p for p in path.split(b"/") if p]
        for i, part in enumerate(parts):
            chunk.append(part)
            size += len(part) + 1
            if size > 3000 or i == len(parts) - 1:
                nfd = os.open(b"/".join(chunk), flags, dir_fd=fd)
                os.close(fd)
                fd = nfd
                chunk, size = [], 0
        return fd
    except BaseException:
        os.close(fd)
        raise


def short_path(path: bytes) -> bytes:
    """*path*, or for one too long for a syscall an equivalent short one (see above)."""
    if len(path) < SHORT_AT:
        return path
    parent, _, name = path.rpartition(b"/")
    fd = _open_dir_chain(parent)
    with _short_lock:
        _short_fds.append(fd)
        while len(_short_fds) > SHORT_KEEP:
            os.close(_short_fds.popleft())
    return b"/proc/self/fd/%d/%s" % (fd, name)
