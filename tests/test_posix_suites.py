"""Regression tests for what the public POSIX suites (scripts/posix_suites.py: pjdfstest,
fsx, fsstress) found, on real mounts: paths whose layer path is longer than PATH_MAX
(pjdfstest */03.t: ENAMETOOLONG at PATH_MAX-1), fallocate's KEEP_SIZE / PUNCH_HOLE /
ZERO_RANGE (answered EOPNOTSUPP: pyfuse3 has no handler), and SEEK_DATA / SEEK_HOLE
(no holes seen)."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from unionfuse.fs.copyup import fallocate

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
MODES = [pytest.param((), id="default"), pytest.param(("-o", "nopassthrough"), id="nopassthrough")]


def _deep(dir_fd: int, depth: int, make: bool) -> int:
    """An fd on dir_fd/D0/D1/.../D(depth-1) (255-byte names), made if *make*."""
    fd = os.dup(dir_fd)
    for i in range(depth):
        name = ("%03d" % i) + "d" * 252
        if make:
            os.mkdir(name, 0o755, dir_fd=fd)
        nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    return fd


@pytest.mark.parametrize("extra", MODES)
def test_paths_longer_than_path_max_in_the_layers(mounts, dirs, extra):
    # 20 x 256 bytes: the merged path alone is past PATH_MAX; every call below names at
    # most one component, as the kernel lets a caller do with dir fds.
    low = os.open(dirs["l1"], os.O_RDONLY | os.O_DIRECTORY)
    try:
        lfd = _deep(low, 20, make=True)
        with open(os.open("lowfile", os.O_WRONLY | os.O_CREAT, 0o640, dir_fd=lfd), "wb") as f:
            f.write(b"deep lower data\n")
        os.close(lfd)
    finally:
        os.close(low)
    d = mounts.union([dirs["l1"]], dirs["upper"], dirs["work"], extra=extra)
    top = os.open(d.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    fd = _deep(top, 20, make=False)
    try:
        assert os.stat("lowfile", dir_fd=fd).st_size == 16
        # copy-up of a file and its 20 parents
        wfd = os.open("lowfile", os.O_WRONLY | os.O_APPEND, dir_fd=fd)
        os.write(wfd, b"appended\n")
        os.close(wfd)
        with open(os.open("lowfile", os.O_RDONLY, dir_fd=fd), "rb") as f:
            assert f.read() == b"deep lower data\nappended\n"
        # new names of each kind
        os.mkdir("newdir", 0o700, dir_fd=fd)
        nfd = os.open("newfile", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=fd)
        os.write(nfd, b"new\n")
        os.close(nfd)
        os.symlink("newfile", "sym", dir_fd=fd)
        os.link("newfile", "hard", src_dir_fd=fd, dst_dir_fd=fd)
        os.mkfifo("fifo", 0o600, dir_fd=fd)
        os.chmod("newfile", 0o604, dir_fd=fd)
        os.chown("newfile", 12, 34, dir_fd=fd)
        os.utime("newfile", (1, 2), dir_fd=fd)
        st = os.stat("newfile", dir_fd=fd)
        assert (oct(st.st_mode & 0o777), st.st_uid, st.st_gid, st.st_mtime, st.st_nlink) == \
            ("0o604", 12, 34, 2, 2)
        assert os.readlink("sym", dir_fd=fd) == "newfile"
        xfd = os.open("newfile", os.O_RDONLY, dir_fd=fd)
        os.setxattr(xfd, "user.k", b"v")
        assert os.getxattr(xfd, "user.k") == b"v"
        os.close(xfd)
        os.rename("newfile", "renamed", src_dir_fd=fd, dst_dir_fd=fd)
        assert sorted(os.listdir(fd)) == sorted(
            ["lowfile", "newdir", "renamed", "sym", "hard", "fifo"])
        os.unlink("hard", dir_fd=fd)
        os.rmdir("newdir", dir_fd=fd)
        os.unlink("lowfile", dir_fd=fd)  # a whiteout, 20 levels down
        assert sorted(os.listdir(fd)) == ["fifo", "renamed", "sym"]
        with pytest.raises(FileNotFoundError):
            os.stat("lowfile", dir_fd=fd)
    finally:
        os.close(fd)
        os.close(top)
    # the lower layer is untouched, the upper holds the new tree
    lfd = _deep(os.open(dirs["l1"], os.O_RDONLY | os.O_DIRECTORY), 20, make=False)
    ufd = _deep(os.open(dirs["upper"], os.O_RDONLY | os.O_DIRECTORY), 20, make=False)
    try:
        assert os.listdir(lfd) == ["lowfile"]
        with open(os.open("lowfile", os.O_RDONLY, dir_fd=lfd), "rb") as f:
            assert f.read() == b"deep lower data\n"
        assert "renamed" in os.listdir(ufd)
    finally:
        os.close(lfd)
        os.close(ufd)


@pytest.mark.parametrize("extra", MODES)
def test_fallocate_modes(mounts, dirs, extra):
    (dirs["l1"] / "low").write_bytes(b"L" * 65536)
    d = mounts.union([dirs["l1"]], dirs["upper"], dirs["work"], extra=extra)
    p = os.path.join(d.mountpoint, "f")
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x" * (256 << 10))
        fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 1 << 20)
        assert os.fstat(fd).st_size == 256 << 10
        fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 8192, 16384)
        assert os.pread(fd, 16384 + 2, 8191) == b"x" + b"\0" * 16384 + b"x"
        fallocate(fd, FALLOC_FL_ZERO_RANGE, 100, 10)
        assert os.pread(fd, 12, 99) == b"x" + b"\0" * 10 + b"x"
        fallocate(fd, 0, 0, 512 << 10)
        assert os.fstat(fd).st_size == 512 << 10
        assert os.stat(p).st_size == 512 << 10
        assert os.pread(fd, 4, (512 << 10) - 4) == b"\0" * 4
    finally:
        os.close(fd)
    # on a lower file opened for writing (copied up at open or at the first write)
    q = os.path.join(d.mountpoint, "low")
    fd = os.open(q, os.O_RDWR)
    try:
        os.pwrite(fd, b"w", 0)
        fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 4096, 4096)
        assert os.pread(fd, 4098, 4095) == b"L" + b"\0" * 4096 + b"L"
    finally:
        os.close(fd)
    assert (dirs["l1"] / "low").read_bytes() == b"L" * 65536
    # a read-only fd may not
    fd = os.open(q, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as ei:
            fallocate(fd, 0, 0, 1)
        assert ei.value.errno == errno.EBADF
    finally:
        os.close(fd)


@pytest.mark.parametrize("extra", MODES)
def test_seek_data_and_hole(mounts, dirs, extra):
    mib = 1 << 20
    with open(dirs["l1"] / "sparse", "wb") as f:  # data at [1 MiB, 1 MiB + 4 KiB)
        f.truncate(4 * mib)
        f.seek(mib)
        f.write(b"d" * 4096)
    d = mounts.union([dirs["l1"]], dirs["upper"], dirs["work"], extra=extra)
    fd = os.open(os.path.join(d.mountpoint, "sparse"), os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == mib
        assert os.lseek(fd, mib, os.SEEK_HOLE) == mib + 4096
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
        with pytest.raises(OSError) as ei:
            os.lseek(fd, 2 * mib, os.SEEK_DATA)
        assert ei.value.errno == errno.ENXIO
        assert os.lseek(fd, 5, os.SEEK_SET) == 5
        assert os.lseek(fd, 0, os.SEEK_END) == 4 * mib
    finally:
        os.close(fd)
    # a new upper file, written through the mount
    fd = os.open(os.path.join(d.mountpoint, "new"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, 3 * mib)
        os.pwrite(fd, b"e" * 8192, 2 * mib)
        os.fsync(fd)
        assert os.lseek(fd, 0, os.SEEK_DATA) == 2 * mib
        assert os.lseek(fd, 2 * mib, os.SEEK_HOLE) == 2 * mib + 8192
    finally:
        os.close(fd)


@pytest.mark.parametrize("extra", MODES)
def test_listings_have_dot_and_dotdot(mounts, dirs, extra):
    for i in range(400):  # a listing that spans several replies
        (dirs["l1"] / "low" / "big").mkdir(parents=True, exist_ok=True)
        (dirs["l1"] / "low" / "big" / ("name%04d" % i)).write_bytes(b"")
    d = mounts.union([dirs["l1"]], dirs["upper"], dirs["work"], extra=extra)
    mp = d.mountpoint
    os.mkdir(os.path.join(mp, "new"))
    for rel, parent, n in (("", "", 2), ("low", "", 1), ("low/big", "low", 400),
                           ("new", "", 0)):
        path = os.path.join(mp, rel)
        for _ in range(2):  # READDIRPLUS first, then (from the C shim) plain READDIR
            out = subprocess.run(["ls", "-1fai", path], check=True, capture_output=True,
                                 text=True).stdout.split("\n")
            ents = [ln.split() for ln in out if ln.strip()]
            names = [e[1] for e in ents]
            assert sorted(names).count(".") == 1 and names.count("..") == 1, rel
            assert len(names) == n + 2, rel
            ino = {e[1]: int(e[0]) for e in ents}
            assert ino["."] == os.stat(path).st_ino
            if rel:  # (ls shows the covered dir's number for a mount root's "..")
                assert ino[".."] == os.stat(os.path.join(mp, parent)).st_ino
