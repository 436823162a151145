"""Path resolution and file copying inside a directory tree that must not be escaped.

:class:`ScopedRoot` resolves paths the way a process chrooted at the tree would see them:
symlinks are read and re-resolved by us, never by the kernel (every open is an ``*at``
call with ``O_NOFOLLOW`` on a directory fd).  Two flavours:

- ``clamp=True`` (an image rootfs): absolute symlink targets restart at the tree's root and
  ``..`` stops there, exactly like a chroot — an image symlink ``/app -> /etc`` leads to
  the image's /etc, never the host's.
- ``clamp=False`` (the build context): a path or symlink that would leave the tree is an
  error (:class:`Escape`).
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
from collections import deque
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from ..store.tarlayer import write_new_file

MAX_LINKS = 40
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Escape(ValueError):
    """A path (or a symlink on it) that leads out of the tree."""


class FsOpError(ValueError):
    pass


class ScopedRoot:
    def __init__(self, path: str, clamp: bool):
        self.path = path
        self.clamp = clamp
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def sub(self, parts: list[str]) -> "ScopedRoot":
        """A ScopedRoot at the real dir *parts* (reached without following links)."""
        obj = ScopedRoot.__new__(ScopedRoot)
        obj.path = os.path.join(self.path, *parts)
        obj.clamp = self.clamp
        obj.fd = self.open_dir(parts)
        return obj

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- walking ------------------------------------------------------------------------

    def open_dir(self, parts: list[str]) -> int:
        """fd of the directory at *parts* (real components: no symlink is followed)."""
        fd = os.dup(self.fd)
        try:
            for comp in parts:
                nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def lstat(self, parts: list[str]) -> os.stat_result | None:
        if not parts:
            return os.fstat(self.fd)
        try:
            pfd = self.open_dir(parts[:-1])
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return None
            raise
        try:
            return os.stat(parts[-1], dir_fd=pfd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        finally:
            os.close(pfd)

    def readlink(self, parts: list[str]) -> str:
        pfd = self.open_dir(parts[:-1])
        try:
            return os.readlink(parts[-1], dir_fd=pfd)
        finally:
            os.close(pfd)

    def resolve(self, path: str, follow_last: bool = True, what: str = "path") -> list[str]:
        """The real components of *path* inside the tree, symlinks resolved in scope.
        Missing components are kept as given (lexically)."""
        todo = deque(path.split("/"))
        cur: list[str] = []
        links = 0
        while todo:
            name = todo.popleft()
            if name in ("", "."):
                continue
            if name == "..":
                if cur:
                    cur.pop()
                elif not self.clamp:
                    raise Escape(f"{what} {path!r} leads outside the build context")
                continue
            last = all(p in ("", ".") for p in todo)
            st = self.lstat(cur + [name])
            if st is not None and stat.S_ISLNK(st.st_mode) and (follow_last or not last):
                links += 1
                if links > MAX_LINKS:
                    raise FsOpError(f"{what} {path!r}: too many levels of symbolic links")
                target = self.readlink(cur + [name])
                if target.startswith("/"):
                    if not self.clamp:
                        raise Escape(f"{what} {path!r}: symlink {'/'.join(cur + [name])} -> {target} "
                                     "leads outside the build context")
                    cur = []
                todo.extendleft(reversed(target.split("/")))
                continue
            cur.append(name)
        return cur

    def open_file(self, parts: list[str]) -> int:
        pfd = self.open_dir(parts[:-1])
        try:
            return os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=pfd)
        finally:
            os.close(pfd)

    def makedirs(self, parts: list[str], uid: int, gid: int, mode: int = 0o755) -> int:
        """Create the real dir *parts* (parents first, new ones owned uid:gid); its fd."""
        fd = os.dup(self.fd)
        try:
            for i, comp in enumerate(parts):
                try:
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    os.mkdir(comp, mode, dir_fd=fd)
                    os.chown(comp, uid, gid, dir_fd=fd, follow_symlinks=False)
                    os.chmod(comp, mode, dir_fd=fd)
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ENOTDIR, errno.ELOOP):
                        raise FsOpError(f"/{'/'.join(parts[:i + 1])} exists and is not a directory") from None
                    raise
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise


# -- listing a source ----------------------------------------------------------------


@dataclass
class Entry:
    rel: str                 # path below the source ("" for the source itself)
    parts: list[str]         # real components inside the tree
    st: os.stat_result


def walk(tree: ScopedRoot, parts: list[str], st: os.stat_result, keep=None) -> list[Entry]:
    """The source at *parts* and (for a dir) everything below it, parents before
    children, sorted by name.  ``keep(parts, is_dir)`` filters (e.g. .dockerignore);
    a dir that is not kept itself still appears when something below it is kept."""
    out = [Entry("", parts, st)]
    if not stat.S_ISDIR(st.st_mode):
        return out

    def rec(dfd: int, dparts: list[str], rel: str) -> list[Entry]:
        res = []
        for name in sorted(os.listdir(dfd)):
            try:
                cst = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISSOCK(cst.st_mode):
                continue
            cparts = dparts + [name]
            crel = f"{rel}/{name}" if rel else name
            isdir = stat.S_ISDIR(cst.st_mode)
            kept = keep is None or keep(cparts, isdir)
            if isdir:
                if not kept and keep is not None and not getattr(keep, "may_descend", lambda p: False)(cparts):
                    continue
                cfd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
                try:
                    sub = rec(cfd, cparts, crel)
                finally:
                    os.close(cfd)
                if kept or sub:
                    res.append(Entry(crel, cparts, cst))
                    res.extend(sub)
            elif kept:
                res.append(Entry(crel, cparts, cst))
        return res

    dfd = tree.open_dir(parts)
    try:
        out.extend(rec(dfd, parts, ""))
    finally:
        os.close(dfd)
    return out


# -- writing -------------------------------------------------------------------------


@dataclass
class Owner:
    uid: int | None = None   # None: keep the source's (ADD archives)
    gid: int | None = None
    mode: int | None = None  # --chmod


def _replace_slot(dfd: int, name: str, want_dir: bool) -> bool:
    """Make room for *name* in dfd; returns True if a dir is already there to reuse."""
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        if want_dir:
            return True
        remove_at(dfd, name)
        return False
    os.unlink(name, dir_fd=dfd)
    return False


def remove_at(dfd: int, name: str) -> None:
    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        sub = os.open(name, _DIR_FLAGS, dir_fd=dfd)
        try:
            for n in os.listdir(sub):
                remove_at(sub, n)
        finally:
            os.close(sub)
        os.rmdir(name, dir_fd=dfd)
    else:
        os.unlink(name, dir_fd=dfd)


def _copy_data(src_fd: int, dst_fd: int) -> None:
    while True:
        buf = os.read(src_fd, 1 << 20)
        if not buf:
            break
        view = memoryview(buf)
        while view:
            n = os.write(dst_fd, view)
            view = view[n:]


def _finish(dfd: int, name: str, st: os.stat_result, own: Owner, is_link: bool) -> None:
    uid = st.st_uid if own.uid is None else own.uid
    gid = st.st_gid if own.gid is None else own.gid
    os.chown(name, uid, gid, dir_fd=dfd, follow_symlinks=False)
    if not is_link:
        mode = stat.S_IMODE(st.st_mode) if own.mode is None else own.mode
        os.chmod(name, mode, dir_fd=dfd)
    os.utime(name, ns=(st.st_mtime_ns, st.st_mtime_ns), dir_fd=dfd, follow_symlinks=False)


def copy_entries(src: ScopedRoot, entries: list[Entry], dst: ScopedRoot, dest_parts: list[str],
                 own: Owner, contents_only: bool) -> None:
    """Copy a walked source into the image.  *dest_parts* names the file (or, for a dir
    source, the dir that receives its contents when *contents_only*).  Below the top,
    nothing in the image is followed: an existing symlink in the way is replaced."""
    top = entries[0]
    dir_times: list[tuple[list[str], os.stat_result]] = []
    if stat.S_ISDIR(top.st.st_mode) and contents_only:
        dfd = dst.makedirs(dest_parts, own.uid or 0, own.gid or 0)
        os.close(dfd)
        body = entries[1:]
    else:
        pfd = dst.makedirs(dest_parts[:-1], own.uid or 0, own.gid or 0)
        os.close(pfd)
        body = entries
    for e in body:
        rel_parts = [p for p in e.rel.split("/") if p]
        if e is top:
            target = dest_parts
        else:
            target = dest_parts + rel_parts
        pfd = dst.open_dir(target[:-1])
        try:
            name = target[-1]
            m = e.st.st_mode
            if stat.S_ISDIR(m):
                if not _replace_slot(pfd, name, True):
                    os.mkdir(name, 0o700, dir_fd=pfd)
                dir_times.append((target, e.st))
                os.chown(name, own.uid if own.uid is not None else e.st.st_uid,
                         own.gid if own.gid is not None else e.st.st_gid, dir_fd=pfd, follow_symlinks=False)
                os.chmod(name, own.mode if own.mode is not None else stat.S_IMODE(m), dir_fd=pfd)
                continue
            _replace_slot(pfd, name, False)
            if stat.S_ISREG(m):
                sfd = src.open_file(e.parts)
                try:
                    dfd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                  0o600, dir_fd=pfd)
                    try:
                        _copy_data(sfd, dfd)
                    finally:
                        os.close(dfd)
                finally:
                    os.close(sfd)
                _finish(pfd, name, e.st, own, False)
            elif stat.S_ISLNK(m):
                os.symlink(src.readlink(e.parts), name, dir_fd=pfd)
                _finish(pfd, name, e.st, own, True)
            elif stat.S_ISFIFO(m):
                os.mkfifo(name, 0o600, dir_fd=pfd)
                _finish(pfd, name, e.st, own, False)
            elif stat.S_ISCHR(m) or stat.S_ISBLK(m):
                os.mknod(name, (m & ~0o7777) | 0o600, e.st.st_rdev, dir_fd=pfd)
                _finish(pfd, name, e.st, own, False)
        finally:
            os.close(pfd)
    for target, st in reversed(dir_times):
        pfd = dst.open_dir(target[:-1])
        try:
            os.utime(target[-1], ns=(st.st_mtime_ns, st.st_mtime_ns), dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(pfd)


def write_file(dst: ScopedRoot, dest_parts: list[str], stream: BinaryIO, own: Owner, mode: int,
               mtime: float | None = None) -> None:
    """A new regular file at *dest_parts* (parents created) from *stream*."""
    pfd = dst.makedirs(dest_parts[:-1], own.uid or 0, own.gid or 0)
    try:
        name = dest_parts[-1]
        _replace_slot(pfd, name, False)
        write_new_file(pfd, name, stream)
        os.chown(name, own.uid or 0, own.gid or 0, dir_fd=pfd, follow_symlinks=False)
        os.chmod(name, own.mode if own.mode is not None else mode, dir_fd=pfd)
        if mtime is not None:
            os.utime(name, (mtime, mtime), dir_fd=pfd, follow_symlinks=False)
    finally:
        os.close(pfd)


# -- ADD: unpacking a local archive ---------------------------------------------------


def _clean_member(name: str) -> list[str]:
    parts = []
    for p in name.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            raise FsOpError(f"archive entry {name!r} leaves the destination ('..')")
        parts.append(p)
    return parts


def untar(fileobj: BinaryIO, dst: ScopedRoot, dest_parts: list[str], own: Owner, label: str) -> None:
    """Unpack a (plain/gzip/bzip2/xz) tar into the image dir *dest_parts*.  Entries are
    placed relative to it (a leading / is dropped, like tar does; ``..`` is refused),
    never through a symlink (one in the way of a path is an error, not followed), and
    hard links must name an earlier entry of the same archive."""
    dfd0 = dst.makedirs(dest_parts, own.uid or 0, own.gid or 0)
    os.close(dfd0)
    base = dst.sub(dest_parts)
    dir_times: list[tuple[list[str], int]] = []
    try:
        try:
            tf = tarfile.open(fileobj=fileobj, mode="r|*")
        except tarfile.TarError as e:
            raise FsOpError(f"{label}: not a tar archive ({e})") from None
        with tf:
            for ti in tf:
                parts = _clean_member(ti.name)
                if not parts:
                    continue
                try:
                    pfd = base.makedirs(parts[:-1], own.uid or 0, own.gid or 0)
                except FsOpError as e:
                    raise FsOpError(f"{label}: entry {ti.name!r}: {e} (a symlink in the archive?)") from None
                try:
                    name = parts[-1]
                    if ti.isdir():
                        if not _replace_slot(pfd, name, True):
                            os.mkdir(name, 0o700, dir_fd=pfd)
                    else:
                        _replace_slot(pfd, name, False)
                        if ti.isreg():
                            write_new_file(pfd, name, tf.extractfile(ti))
                        elif ti.issym():
                            os.symlink(ti.linkname, name, dir_fd=pfd)
                        elif ti.islnk():
                            lparts = _clean_member(ti.linkname)
                            if not lparts:
                                raise FsOpError(f"{label}: hard link {ti.name!r} to the destination itself")
                            try:
                                lfd = base.open_dir(lparts[:-1])
                            except OSError:
                                raise FsOpError(f"{label}: hard link {ti.name!r} -> {ti.linkname!r}: "
                                                "target is not in the archive") from None
                            try:
                                os.link(lparts[-1], name, src_dir_fd=lfd, dst_dir_fd=pfd, follow_symlinks=False)
                            except FileNotFoundError:
                                raise FsOpError(f"{label}: hard link {ti.name!r} -> {ti.linkname!r}: "
                                                "target is not in the archive") from None
                            finally:
                                os.close(lfd)
                            continue
                        elif ti.ischr() or ti.isblk():
                            kind = stat.S_IFCHR if ti.ischr() else stat.S_IFBLK
                            os.mknod(name, kind | 0o600, os.makedev(ti.devmajor, ti.devminor), dir_fd=pfd)
                        elif ti.isfifo():
                            os.mkfifo(name, 0o600, dir_fd=pfd)
                        else:
                            continue
                    uid = ti.uid if own.uid is None else own.uid
                    gid = ti.gid if own.gid is None else own.gid
                    os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)
                    if not ti.issym():
                        os.chmod(name, ti.mode & 0o7777 if own.mode is None else own.mode, dir_fd=pfd)
                    if ti.isdir():
                        dir_times.append((parts, int(ti.mtime)))
                    else:
                        os.utime(name, (ti.mtime, ti.mtime), dir_fd=pfd, follow_symlinks=False)
                finally:
                    os.close(pfd)
        for parts, mtime in reversed(dir_times):
            try:
                pfd = base.open_dir(parts[:-1])
                try:
                    os.utime(parts[-1], (mtime, mtime), dir_fd=pfd, follow_symlinks=False)
                finally:
                    os.close(pfd)
            except OSError:
                pass
    except (tarfile.TarError, EOFError) as e:
        raise FsOpError(f"{label}: broken archive: {e}") from None
    finally:
        base.close()


def is_archive(tree: ScopedRoot, parts: list[str]) -> bool:
    """Docker's rule: a local file whose content is a tar (maybe gzip/bzip2/xz
    compressed) is unpacked by ADD."""
    fd = tree.open_file(parts)
    try:
        with os.fdopen(os.dup(fd), "rb") as f:
            try:
                with tarfile.open(fileobj=f, mode="r|*") as tf:
                    return tf.next() is not None
            except (tarfile.TarError, EOFError, OSError, ValueError):
                return False
    finally:
        os.close(fd)


def iter_hash_chunks(tree: ScopedRoot, parts: list[str]) -> Iterator[bytes]:
    fd = tree.open_file(parts)
    try:
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                return
            yield b
    finally:
        os.close(fd)
