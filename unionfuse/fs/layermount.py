"""Private clones of the layers' mounts, so the daemon never keeps a layer's
filesystem busy.

For a plain FUSE mount ``umount(2)`` returns without waiting for the daemon: the
kernel sends it nothing (FUSE_DESTROY goes to fuseblk mounts only) and its next read
of /dev/fuse fails with ENODEV some milliseconds later.  Until the daemon has exited,
every fd it has open on a layer (cached file fds, O_PATH dir fds, backing files of
passthrough, its cwd) counts against the mount the layer lives on, and an
``umount LAYERFS`` right after ``umount MERGED`` fails with "target is busy".

Kernel overlayfs does not pin its layers' mounts at all: it works through a private,
detached clone of each (``clone_private_mount``), so ``umount LAYERFS`` succeeds even
while the overlay is mounted; the layer's superblock lives on until the clone goes.
The daemon does the same with ``open_tree(OPEN_TREE_CLONE|AT_RECURSIVE)``: a detached
copy of the mount (and of those below the layer, which the daemon crosses), rooted at
the layer, in no namespace and reachable only through the fd
``open_tree`` returns.  Every path the daemon uses then starts with
``/proc/self/fd/N/./``, whose walk lands in the clone, so what it opens references the
clone and never the mount in the caller's namespace.  The clones (and with them the
layers' superblocks) go away when the daemon exits; ``unionfuse umount`` waits for
that.

The upper and work dirs share one clone (of the directory that holds both):
renames and hard links between them must stay on one mount.  Where cloning is refused
(no CAP_SYS_ADMIN, an unbindable mount, a kernel before 5.2) or the clone does not
show the same directory, the daemon uses the plain path, as before.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("unionfuse.layermount")

_SYS_OPEN_TREE = 428  # the same on every architecture's unified syscall table (5.2+)
_OPEN_TREE_CLONE = 1
_AT_RECURSIVE = 0x8000  # with the mounts below the layer (the daemon crosses them)
_AT_FDCWD = -100

# fds of the clones: open for the daemon's lifetime (closed by its exit)
_held: list[int] = []


def _open_tree_clone(path: bytes) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(ctypes.c_long(_SYS_OPEN_TREE), ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(path),
                      ctypes.c_uint(_OPEN_TREE_CLONE | _AT_RECURSIVE | os.O_CLOEXEC))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
    return fd


def _same(a: bytes, b: bytes) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _clone(base: bytes, rels: list[bytes]) -> list[bytes] | None:
    """Clone the mount at *base* (a real, absolute dir); return the clone paths of
    base/rel for each rel, or None if that does not give the same dirs."""
    try:
        fd = _open_tree_clone(base)
    except OSError as e:
        log.debug("no private clone of %r: %s", base, e)
        return None
    # "/.": the bare /proc/self/fd/N would lstat (and O_NOFOLLOW-open) as the link
    root = b"/proc/self/fd/%d/." % fd
    out = [root + b"/" + r if r else root for r in rels]
    if not all(_same(os.path.join(base, r) if r else base, p) for r, p in zip(rels, out)):
        log.debug("the clone of %r does not show the layer (a mount below it?)", base)
        os.close(fd)
        return None
    _held.append(fd)
    return out


def private_paths(lowers: list[bytes], upper: bytes | None, work: bytes | None,
                  ) -> tuple[list[bytes], bytes | None, bytes | None]:
    """The paths the daemon should use for its layers: through private clones where
    possible, else the given (absolute) paths."""
    new_lowers = []
    for low in lowers:
        real = os.path.realpath(low)
        got = _clone(real, [b""])
        new_lowers.append(got[0] if got else low)
    if upper is None or work is None:
        return new_lowers, upper, work
    ru, rw = os.path.realpath(upper), os.path.realpath(work)
    base = os.path.commonpath([ru, rw])
    rel = [os.path.relpath(p, base) if p != base else b"" for p in (ru, rw)]
    got = _clone(base, rel)
    if got is None:
        return new_lowers, upper, work
    return new_lowers, got[0], got[1]


def release() -> None:
    """Close the clones (a test's teardown; a daemon just exits)."""
    while _held:
        os.close(_held.pop())
