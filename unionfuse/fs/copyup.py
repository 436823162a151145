"""Copy-up and other real-filesystem helpers (blocking; called off the event loop when
they may take long).

A copy is always built under the work dir and renamed into place, so the upper dir
never holds a half-made file.  Order that keeps suid bits and capabilities:
data -> chown -> chmod -> xattrs -> times -> rename.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import uuid

from .union import is_private_xattr

FICLONE = 0x40049409
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2
AT_FDCWD = -100

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_renameat2.restype = ctypes.c_int

_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, off: int, length: int) -> None:
    """fallocate(2) with its mode (os has only posix_fallocate)."""
    if _fallocate(fd, mode, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def renameat2(src: bytes, dst: bytes, flags: int) -> None:
    if _renameat2(AT_FDCWD, src, AT_FDCWD, dst, flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), src, None, dst)


class WorkDir:
    """The daemon's scratch space inside the work dir (same filesystem as the upper)."""

    def __init__(self, work: bytes):
        self.base = os.path.join(work, b"unionfuse")
        self.tmp = os.path.join(self.base, b"tmp")
        self.index = os.path.join(self.base, b"index")
        for d in (self.base, self.tmp, self.index):
            os.makedirs(d, mode=0o700, exist_ok=True)
        # Leftovers of a crash mid-operation: never referenced by the upper dir.
        for name in os.listdir(self.tmp):
            remove_tree(os.path.join(self.tmp, name))

    def tmpname(self) -> bytes:
        return os.path.join(self.tmp, uuid.uuid4().hex.encode())


def remove_tree(path: bytes) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        for name in os.listdir(path):
            remove_tree(os.path.join(path, name))
        os.rmdir(path)
    else:
        os.unlink(path)


def copy_xattrs(src: bytes, dst: bytes) -> None:
    try:
        names = os.listxattr(src, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return
        raise
    for name in names:
        bname = name.encode()
        if is_private_xattr(bname):
            continue
        try:
            value = os.getxattr(src, name, follow_symlinks=False)
            os.setxattr(dst, name, value, follow_symlinks=False)
        except OSError as e:
            # e.g. a security.* label the upper fs can't store: overlayfs skips too
            if e.errno not in (errno.ENOTSUP, errno.EPERM, errno.ENODATA):
                raise


def data_ranges(fd: int, size: int):
    """(start, end) of the parts of a file that hold data (SEEK_DATA/SEEK_HOLE); the
    whole file where the filesystem can't tell."""
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole from here on
                return
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield off, size
                return
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if end <= start:
            return
        yield start, end
        off = end


def copy_data(src_fd: int, dst_fd: int, size: int) -> None:
    """Copy *size* bytes of a file into an empty one: a reflink if the filesystem has
    them, else copy_file_range (or read/write) of the parts that hold data, so holes
    stay holes."""
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
        return
    except OSError:
        pass
    ranges = list(data_ranges(src_fd, size))

    def copy_ranges(copy) -> None:  # copy(off, n) -> bytes copied at off (0: at the end)
        for start, end in ranges:
            off = start
            while off < end:
                n = copy(off, end - off)
                if n == 0:
                    break
                off += n

    try:
        copy_ranges(lambda off, n: os.copy_file_range(src_fd, dst_fd, n, off, off))
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
        copy_ranges(lambda off, n: os.pwrite(dst_fd, os.pread(src_fd, min(n, 1 << 20), off), off))
    os.ftruncate(dst_fd, size)  # a hole at the end


def set_meta(path: bytes, st: os.stat_result, src_for_xattrs: bytes | None) -> None:
    """chown -> chmod -> xattrs -> times, in the order that keeps suid and caps."""
    os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(path, stat.S_IMODE(st.st_mode))
    if src_for_xattrs is not None:
        copy_xattrs(src_for_xattrs, path)


def set_times(path: bytes, st: os.stat_result) -> None:
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def make_copy(src: bytes, st: os.stat_result, tmp: bytes, data: bool, xattrs: dict[bytes, bytes]) -> None:
    """Build a copy of *src* at *tmp* (in the work dir).  Blocking."""
    mode = st.st_mode
    if stat.S_ISREG(mode):
        sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            dfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                if data and st.st_size:
                    copy_data(sfd, dfd, st.st_size)
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)
    elif stat.S_ISLNK(mode):
        os.symlink(os.readlink(src), tmp)
    elif stat.S_ISDIR(mode):
        os.mkdir(tmp, 0o700)
    else:
        os.mknod(tmp, mode, st.st_rdev)
    set_meta(tmp, st, src)
    for k, v in xattrs.items():
        os.setxattr(tmp, k, v, follow_symlinks=False)
    set_times(tmp, st)


def preserve_dir_times(path: bytes):
    """Context helper: restore a dir's atime/mtime after we add or move entries in it
    as part of a copy-up (which must not look like a change to the user)."""
    try:
        st = os.lstat(path)
    except OSError:
        return lambda: None

    def restore() -> None:
        try:
            set_times(path, st)
        except OSError:
            pass

    return restore
