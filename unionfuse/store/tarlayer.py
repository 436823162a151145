"""Layer tars <-> layer directories.

Unpacking (``apply_tar``) is the security boundary for everything that comes from an
image: every entry is placed relative to the layer root without ever following a
symlink on the host, names with ``..`` or absolute paths are refused, hard links must
point at an earlier entry of the same tar, and OCI whiteouts become the daemon's
overlay form (0/0 char device, ``trusted.overlay.opaque=y``) so that kernel overlayfs can
mount the same layer dirs.

Packing (``write_layer_tar``) turns a container's upper dir (overlay form, possibly with
redirected dirs and the daemon's private xattrs) into a self-contained OCI layer tar:
whiteouts as ``.wh.NAME``, opaque dirs as ``.wh..wh..opq``, redirected dirs expanded from
the lowers, private xattrs dropped, entries sorted, hard links kept.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import hashlib
import lzma
import os
import stat
import tarfile
from typing import BinaryIO, Iterator

from ..errors import UnionfuseError
from ..fs.union import OVERLAY_NS, Layers, dir_meta, is_whiteout_stat

WH_PREFIX = ".wh."
WH_OPAQUE = ".wh..wh..opq"
WH_META_PREFIX = ".wh..wh."

OPAQUE_XATTR = "trusted.overlay.opaque"
XATTR_PAX = "SCHILY.xattr."


class LayerTarError(UnionfuseError):
    """A layer tar that can't be unpacked safely; names the entry."""


# -- unpacking ------------------------------------------------------------------------


def _clean_name(name: str) -> list[str]:
    parts = []
    for p in name.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            raise ValueError("path leaves the layer ('..')")
        parts.append(p)
    return parts


class _Root:
    """Operations inside one directory tree that never follow host symlinks."""

    def __init__(self, root: str):
        self.root = root
        self.fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        os.close(self.fd)

    def open_parent(self, parts: list[str], create: bool) -> int:
        """fd of the dir holding parts[-1]; every component must be a real dir."""
        fd = os.dup(self.fd)
        try:
            for comp in parts[:-1]:
                try:
                    nfd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(comp, 0o755, dir_fd=fd)
                    nfd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                    os.chmod(nfd, 0o755)  # not subject to the umask
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise ValueError(f"parent '{comp}' is not a directory (symlink?)") from None
                    raise
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise


def write_new_file(dir_fd: int, name: str, stream: BinaryIO) -> None:
    """Create *name* in *dir_fd* (never through a symlink, never over an existing
    entry) with mode 0600 and fill it from *stream*."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        while True:
            buf = stream.read(1 << 20)
            if not buf:
                break
            view = memoryview(buf)
            while view:
                view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _remove_at(dfd: int, name: str) -> None:
    try:
        st = os.lstat(name, dir_fd=dfd)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            for n in os.listdir(sub):
                _remove_at(sub, n)
        finally:
            os.close(sub)
        os.rmdir(name, dir_fd=dfd)
    else:
        os.unlink(name, dir_fd=dfd)


def apply_tar(stream: BinaryIO, dest: str, *, label: str = "layer") -> tuple[str, int]:
    """Unpack an uncompressed (or gzip/bz2/xz) layer tar into the empty dir *dest*.
    Returns (diff_id "sha256:...", bytes).  The diff_id is the sha256 of the
    *uncompressed* tar stream and bytes its length."""
    hasher = HashingReader(_decompressed(stream, label))
    root = _Root(dest)
    state = _State()
    bad = (tarfile.TarError, OSError, EOFError, lzma.LZMAError, ValueError)
    try:
        try:
            tf = tarfile.open(fileobj=hasher, mode="r|", tarinfo=_StrictTarInfo)
        except bad as e:
            raise LayerTarError(f"{label}: not a tar archive ({_msg(e)})") from None
        with tf:
            while True:
                try:
                    ti = tf.next()
                except EOFError:
                    raise LayerTarError(f"{label}: tar ends in the middle of entry {_last(tf)!r}") from None
                except bad as e:
                    raise LayerTarError(f"{label}: broken tar after entry {_last(tf)!r}: {_msg(e)}") from None
                if ti is None:
                    break
                try:
                    _apply_entry(tf, ti, root, state)
                except bad as e:
                    raise LayerTarError(f"{label}: entry {ti.name!r}: {_msg(e)}") from None
            try:
                hasher.drain()
            except bad as e:
                raise LayerTarError(f"{label}: broken data after the last entry: {_msg(e)}") from None
        for parts, mtime in reversed(list(state.dir_times.items())):
            try:
                if not parts:
                    os.utime(root.fd, (mtime, mtime))
                    continue
                pfd = root.open_parent(list(parts), False)
                try:
                    os.utime(parts[-1], (mtime, mtime), dir_fd=pfd, follow_symlinks=False)
                finally:
                    os.close(pfd)
            except (OSError, ValueError):
                pass
    finally:
        root.close()
    return "sha256:" + hasher.sha.hexdigest(), hasher.count


class _StrictTarInfo(tarfile.TarInfo):
    """tarfile treats a truncated or garbled header after the first entry as the end of
    the archive, which would import a truncated layer without a word.  Only a zero block
    (the end-of-archive marker) or a clean end of data between entries ends it here."""

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.TruncatedHeaderError:
            raise tarfile.ReadError("data ends inside a header") from None
        except tarfile.InvalidHeaderError as e:
            raise tarfile.ReadError(str(e) or "bad header") from None


def _msg(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


class _State:
    """What one apply_tar run has done so far."""

    def __init__(self):
        self.dir_times: dict[tuple[str, ...], int] = {}  # the last entry for a dir wins
        self.whiteouts: set[tuple[str, ...]] = set()  # 0/0 devices made from .wh. entries


class Prefixed:
    """A reader that gives back *head* (bytes already read to sniff a format) first."""

    def __init__(self, head: bytes, f: BinaryIO):
        self.head, self.f = head, f

    def read(self, n: int = -1) -> bytes:
        if self.head:
            if n is None or n < 0:
                b, self.head = self.head + self.f.read(), b""
                return b
            b, self.head = self.head[:n], self.head[n:]
            return b
        return self.f.read(n)


def _decompressed(stream: BinaryIO, label: str):
    """*stream* itself, or a reader of its decompressed bytes (gzip, bzip2, xz)."""
    head = b""
    while len(head) < 6:
        b = stream.read(6 - len(head))
        if not b:
            break
        head += b
    src = Prefixed(head, stream)
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=src, mode="rb")
    if head.startswith(b"BZh"):
        return bz2.BZ2File(src, "rb")
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(src, "rb")
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        raise LayerTarError(f"{label}: zstd-compressed tars are not supported (decompress it first)")
    return src


def _last(tf) -> str:
    members = getattr(tf, "members", None)
    return members[-1].name if members else "(start)"


def _apply_entry(tf: tarfile.TarFile, ti: tarfile.TarInfo, root: _Root, state: _State) -> None:
    parts = _clean_name(ti.name)
    if not parts:  # the root dir itself ("./"): its metadata is the layer root's
        if ti.isdir():
            os.chown(root.fd, ti.uid, ti.gid)
            os.chmod(root.fd, ti.mode & 0o7777)
            _set_xattrs(ti, f"/proc/self/fd/{root.fd}")
            state.dir_times[()] = int(ti.mtime)
        return
    base = parts[-1]
    if any(p.startswith(WH_META_PREFIX) for p in parts) and base != WH_OPAQUE:
        return  # aufs metadata (.wh..wh.plnk/, .wh..wh.aufs): docker skips it too
    if any(p.startswith(WH_PREFIX) for p in parts[:-1]):
        raise ValueError("a '.wh.' name can't be a directory")
    if base.startswith(WH_PREFIX):
        pfd = root.open_parent(parts, True)
        try:
            if base == WH_OPAQUE:
                os.setxattr(pfd, OPAQUE_XATTR, b"y")
            else:
                target = base[len(WH_PREFIX):]
                if target in ("", ".", ".."):
                    raise ValueError("bad whiteout name")
                tparts = tuple(parts[:-1] + [target])
                try:
                    st = os.lstat(target, dir_fd=pfd)
                except FileNotFoundError:
                    st = None
                if st is not None and tparts not in state.whiteouts:
                    # OCI: a whiteout only hides lower layers.  An entry of this layer
                    # stays; a dir of this layer hides the lower one (opaque), the way
                    # the union reads a .wh.NAME beside a dir NAME.
                    if stat.S_ISDIR(st.st_mode):
                        dfd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                      dir_fd=pfd)
                        try:
                            os.setxattr(dfd, OPAQUE_XATTR, b"y")
                        finally:
                            os.close(dfd)
                    return
                if st is None:
                    os.mknod(target, stat.S_IFCHR | 0o000, 0, dir_fd=pfd)
                    state.whiteouts.add(tparts)
        finally:
            os.close(pfd)
        return
    pfd = root.open_parent(parts, True)
    try:
        existing = None
        try:
            existing = os.lstat(base, dir_fd=pfd)
        except FileNotFoundError:
            pass
        replaces_whiteout = existing is not None and tuple(parts) in state.whiteouts
        state.whiteouts.discard(tuple(parts))
        if existing is not None and not (ti.isdir() and stat.S_ISDIR(existing.st_mode)):
            _remove_at(pfd, base)
        mode = ti.mode & 0o7777
        if ti.isdir():
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                os.mkdir(base, 0o700, dir_fd=pfd)
            if replaces_whiteout:  # .wh.NAME then NAME/ in one layer: a new dir over the old
                os.setxattr(f"/proc/self/fd/{pfd}/{base}", OPAQUE_XATTR, b"y", follow_symlinks=False)
        elif ti.isreg():
            write_new_file(pfd, base, tf.extractfile(ti))
        elif ti.issym():
            os.symlink(ti.linkname, base, dir_fd=pfd)  # stored as is; never followed here
        elif ti.islnk():
            lparts = _clean_name(ti.linkname)
            if not lparts:
                raise ValueError("hard link to the layer root")
            if tuple(lparts) in state.whiteouts:
                raise ValueError(f"hard link target {ti.linkname!r} is not in this layer")
            lfd = root.open_parent(lparts, False)
            try:
                lst = os.lstat(lparts[-1], dir_fd=lfd)
                if stat.S_ISDIR(lst.st_mode):
                    raise ValueError("hard link to a directory")
                os.link(lparts[-1], base, src_dir_fd=lfd, dst_dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                raise ValueError(f"hard link target {ti.linkname!r} is not in this layer") from None
            finally:
                os.close(lfd)
            return  # a hard link shares the target's metadata
        elif ti.ischr() or ti.isblk():
            kind = stat.S_IFCHR if ti.ischr() else stat.S_IFBLK
            os.mknod(base, kind | 0o600, os.makedev(ti.devmajor, ti.devminor), dir_fd=pfd)
        elif ti.isfifo():
            os.mkfifo(base, 0o600, dir_fd=pfd)
        else:
            raise ValueError(f"unsupported tar entry type {ti.type!r}")
        # order that keeps suid and capabilities: chown (clears them) -> chmod -> xattrs
        os.chown(base, ti.uid, ti.gid, dir_fd=pfd, follow_symlinks=False)
        if not ti.issym():
            os.chmod(base, mode, dir_fd=pfd)
            _set_xattrs(ti, f"/proc/self/fd/{pfd}/{base}")
        if ti.isdir():
            state.dir_times[tuple(parts)] = int(ti.mtime)
        else:
            os.utime(base, (int(ti.mtime), int(ti.mtime)), dir_fd=pfd, follow_symlinks=False)
    finally:
        os.close(pfd)


def _set_xattrs(ti: tarfile.TarInfo, path: str) -> None:
    """PAX SCHILY.xattr.* -> xattrs of *path* (never followed).  The overlay's own
    xattrs (trusted.overlay.*, user.overlay.*) are never taken from a tar: they would
    forge whiteouts, opaque dirs and redirects.  Like docker, an xattr the filesystem
    refuses (EPERM/ENOTSUP, e.g. user.* on a device) is skipped."""
    for k, v in (ti.pax_headers or {}).items():
        if not k.startswith(XATTR_PAX):
            continue
        name = k[len(XATTR_PAX):]
        if name.encode("utf-8", "surrogateescape").startswith(OVERLAY_NS):
            continue
        value = v.encode("utf-8", "surrogateescape") if isinstance(v, str) else v
        try:
            os.setxattr(path, name, value, follow_symlinks=False)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP):
                raise


class HashingReader:
    """A reader that hashes (sha256) and counts what passes through."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.sha = hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.sha.update(b)
        self.count += len(b)
        return b

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha.hexdigest()


# -- packing --------------------------------------------------------------------------


def _xattrs(path: str) -> dict[str, str]:
    out = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return out
    for n in sorted(names):
        if n.encode().startswith(OVERLAY_NS) or n.startswith(("trusted.unionfuse.", "user.unionfuse.")):
            continue
        try:
            v = os.getxattr(path, n, follow_symlinks=False)
        except OSError:
            continue
        out[XATTR_PAX + n] = v.decode("utf-8", "surrogateescape")
    return out


def _tarinfo(path: str, name: str, st: os.stat_result) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.mode = stat.S_IMODE(st.st_mode)
    ti.uid, ti.gid = st.st_uid, st.st_gid
    ti.uname = ti.gname = ""
    ti.mtime = int(st.st_mtime)
    m = st.st_mode
    if stat.S_ISDIR(m):
        ti.type = tarfile.DIRTYPE
    elif stat.S_ISREG(m):
        ti.type, ti.size = tarfile.REGTYPE, st.st_size
    elif stat.S_ISLNK(m):
        ti.type, ti.linkname = tarfile.SYMTYPE, os.readlink(path)
    elif stat.S_ISCHR(m) or stat.S_ISBLK(m):
        ti.type = tarfile.CHRTYPE if stat.S_ISCHR(m) else tarfile.BLKTYPE
        ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    elif stat.S_ISFIFO(m):
        ti.type = tarfile.FIFOTYPE
    else:
        return None  # sockets don't go into layers (docker skips them too)
    x = _xattrs(path)
    if x:
        ti.pax_headers = x
    return ti


def _listdir_nofollow(path: str) -> list[str]:
    """listdir that refuses a symlink put in place of a dir (a layer being walked may
    belong to a live container)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise LayerTarError(f"{path}: changed while being read (not a directory any more)") from None
        raise
    try:
        return os.listdir(fd)
    finally:
        os.close(fd)


def _open_same(path: str, st: os.stat_result):
    """Open the very file that was lstat'ed as *st* (never a symlink swapped in since)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    f = os.fdopen(fd, "rb")
    now = os.fstat(fd)
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(now.st_mode):
        f.close()
        raise LayerTarError(f"{path}: changed while being read")
    return f


def iter_layer(upper: str, layers: Layers | None = None) -> Iterator[tuple[str, str, os.stat_result | None, str]]:
    """Walk a layer dir in sorted order, yielding (kind, relpath, stat, realpath) with kind
    'entry', 'whiteout' or 'opaque'.  A dir with a redirect xattr (a renamed lower dir)
    is expanded from the lower *layers*: its merged content goes in whole, marked opaque,
    so the layer stands on its own."""

    def walk(real: str | None, rel: str, lowers: list | None):
        # lowers None: a plain diff; a list: expand, merging with these lower dirs
        names: dict[str, str | None] = {}
        if real is not None:
            for n in sorted(_listdir_nofollow(real)):
                names[n] = os.path.join(real, n)
        wh = {n[len(WH_PREFIX):] for n in names if n.startswith(WH_PREFIX) and n != WH_OPAQUE}
        if lowers:
            for n in layers.listdir(None, lowers):
                names.setdefault(os.fsdecode(n), None)
        for n in sorted(names):
            r = _j(rel, n)
            if n.startswith(WH_PREFIX):
                if n != WH_OPAQUE and lowers is None:
                    yield "whiteout", _j(rel, n[len(WH_PREFIX):]), None, ""
                continue
            p = names[n]
            if p is None:  # only in the lowers of an expanded dir
                if n in wh:
                    continue
                ent = layers.resolve(None, lowers, os.fsencode(n))
                if not ent.found:
                    continue
                idx, lrel = ent.lowers[0]
                p = os.fsdecode(layers.real(idx, lrel))
                st = os.lstat(p)
                yield "entry", r, st, p
                if stat.S_ISDIR(st.st_mode):
                    yield from walk(None, r, ent.lowers)
                continue
            st = os.lstat(p)
            if is_whiteout_stat(st):
                if lowers is None:
                    yield "whiteout", r, None, ""
                continue
            yield "entry", r, st, p
            if not stat.S_ISDIR(st.st_mode):
                continue
            meta = dir_meta(os.fsencode(p))
            if meta.opaque:
                if lowers is None:
                    yield "opaque", r, None, ""
                sub = [] if lowers is not None else None
            elif meta.redirect and layers is not None:
                target = os.fsdecode(meta.redirect)
                if not target.startswith("/"):
                    target = _j(rel.rpartition("/")[0], target)
                if lowers is None:
                    yield "opaque", r, None, ""
                sub = _lowers_at(layers, target.strip("/"))
            elif lowers is not None:
                ent = layers.resolve(None, lowers, os.fsencode(n))
                sub = ent.lowers if ent.found and ent.is_dir else []
            else:
                sub = None
            yield from walk(p, r, sub)

    yield from walk(upper, "", None)


def _lowers_at(layers: Layers, relpath: str) -> list[tuple[int, bytes]]:
    """The lower stack of the merged dir at *relpath* (lower layers only)."""
    stack = [(i, b"") for i in range(1, layers.nlower + 1)]
    for comp in [c for c in relpath.split("/") if c]:
        ent = layers.resolve(None, stack, os.fsencode(comp))
        if not ent.found or not ent.is_dir:
            return []
        stack = ent.lowers
    return stack


def _j(rel: str, name: str) -> str:
    return name if not rel else rel + "/" + name


def write_layer_tar(upper: str, out: BinaryIO, layers: Layers | None = None) -> str:
    """Write the OCI layer tar of layer dir *upper* to *out*; return its diff_id."""
    hw = HashingWriter(out)
    seen_inodes: dict[tuple[int, int], str] = {}
    with tarfile.open(fileobj=hw, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        for kind, rel, st, real in iter_layer(upper, layers):
            if kind == "whiteout":
                d, _, base = rel.rpartition("/")
                ti = tarfile.TarInfo(_j(d, WH_PREFIX + base))
                ti.mtime = 0
                tf.addfile(ti)
                continue
            if kind == "opaque":
                ti = tarfile.TarInfo(_j(rel, WH_OPAQUE))
                ti.mtime = 0
                tf.addfile(ti)
                continue
            ti = _tarinfo(real, rel, st)
            if ti is None:
                continue
            if ti.type == tarfile.DIRTYPE:
                ti.name = rel + "/"
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                if key in seen_inodes:
                    ti.type, ti.linkname, ti.size = tarfile.LNKTYPE, seen_inodes[key], 0
                    tf.addfile(ti)
                    continue
                seen_inodes[key] = rel
            if ti.type == tarfile.REGTYPE:
                with _open_same(real, st) as f:
                    tf.addfile(ti, f)
            else:
                tf.addfile(ti)
    return "sha256:" + hw.sha.hexdigest()


class HashingWriter:
    """A writer (to *f*, or nowhere) that hashes (sha256) and counts what passes."""

    def __init__(self, f: BinaryIO | None):
        self.f = f
        self.sha = hashlib.sha256()
        self.count = 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.count += len(b)
        if self.f is not None:
            self.f.write(b)
        return len(b)

    def flush(self) -> None:
        if self.f is not None:
            self.f.flush()

    def tell(self) -> int:
        return self.count

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha.hexdigest()
