"""FUSE passthrough (fs/_fuseshim.c, Linux 6.9+ as root): files in the upper layer, and
every file of a read-only mount, are opened with a backing file; the kernel then reads
and writes them without the daemon.  Lower files of a writable mount stay in this
mount's page cache (a copy-up while they are open must reach the readers, as on
overlayfs).  `-o nopassthrough` turns it off."""

from __future__ import annotations

import mmap
import os
import time

import pytest

from conftest import start_daemon
from layerkit import put, read
from test_fastpath import answered_in_c, cached_bytes, drop_page_cache

def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        got = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return got >= (major, minor)


pytestmark = pytest.mark.skipif(not (_kernel_at_least(6, 9) and os.geteuid() == 0),
                                reason="FUSE passthrough needs Linux 6.9+ and root")


@pytest.fixture
def lay(dirs):
    put(dirs["l2"] / "low", b"lower data\n")
    put(dirs["l2"] / "big", os.urandom(2 << 20))
    return dirs


def _mount(lay, tmp_path, *opts, rw=True):
    mp = tmp_path / "m"
    mp.mkdir()
    extra = ["--debug"] + [x for o in opts for x in ("-o", o)]
    if rw:
        d = start_daemon(mp, [lay["l1"], lay["l2"]], lay["upper"], lay["work"], extra=extra)
    else:
        d = start_daemon(mp, [lay["l1"], lay["l2"]], extra=extra)
    os.stat(mp)  # (after INIT)
    if "passthrough not offered" in d.log_text():  # e.g. no CONFIG_FUSE_PASSTHROUGH
        d.stop()
        pytest.skip("the kernel does not offer FUSE passthrough")
    return d


def _features(d) -> str:
    for line in d.log_text().splitlines():
        if "kernel caching:" in line:
            return line
    return ""


def test_upper_files_are_read_and_written_by_the_kernel(lay, tmp_path):
    d = _mount(lay, tmp_path)
    mp = d.mountpoint
    data = os.urandom(3 << 20)
    try:
        fd = os.open(f"{mp}/new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for i in range(0, len(data), 1 << 20):
                assert os.write(fd, data[i:i + (1 << 20)]) == 1 << 20
            os.fsync(fd)
        finally:
            os.close(fd)
        assert os.stat(f"{mp}/new").st_size == len(data)  # attrs follow the writes
        assert read(lay["upper"] / "new") == data
        drop_page_cache()
        assert read(f"{mp}/new") == data
        # the pages read are the upper file's own (no second copy in this mount's cache)
        assert cached_bytes(lay["upper"] / "new") == len(data)
        with open(f"{mp}/new", "r+b") as f:  # appends and rewrites
            f.seek(0, 2)
            f.write(b"tail")
            f.seek(0)
            f.write(b"HEAD")
        assert read(f"{mp}/new") == b"HEAD" + data[4:] + b"tail"
    finally:
        d.stop()
    assert "passthrough" in _features(d), d.log_text()[-2000:]
    stats = answered_in_c(d)
    assert stats["pt_opens"] >= 3 and stats["write"] == 0 and stats["read"] == 0, stats


def test_mmap_writes_reach_the_upper_file(lay, tmp_path):
    d = _mount(lay, tmp_path)
    mp = d.mountpoint
    try:
        put(f"{mp}/mapped", b"\0" * 8192)
        with open(f"{mp}/mapped", "r+b") as f:
            with mmap.mmap(f.fileno(), 8192) as mm:
                mm[100:105] = b"hello"
                mm.flush()
        assert read(f"{mp}/mapped")[100:105] == b"hello"
        assert read(lay["upper"] / "mapped")[100:105] == b"hello"
        # Writes through the mapping change the upper file's mtime without the kernel
        # updating this inode; while the file is open for writing its attributes are
        # cached for a second only, so the new mtime shows within that.
        os.utime(lay["upper"] / "mapped", ns=(1_000_000_000, 1_000_000_000))
        with open(f"{mp}/mapped", "r+b") as f:
            with mmap.mmap(f.fileno(), 8192) as mm:
                os.fstat(f.fileno())  # (mapping it dropped the atime: fetched again)
                time.sleep(0.01)
                mm[0:2] = b"hi"
                want = os.stat(lay["upper"] / "mapped").st_mtime_ns
                assert want != 1_000_000_000
                deadline = time.monotonic() + 3
                while os.fstat(f.fileno()).st_mtime_ns != want and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert os.fstat(f.fileno()).st_mtime_ns == want
        # a lower file written through a shared mapping: copied up at the open for writing
        with open(f"{mp}/low", "r+b") as f:
            with mmap.mmap(f.fileno(), 0) as mm:
                mm[0:5] = b"LOWER"
        assert read(f"{mp}/low") == b"LOWER data\n"
        assert read(lay["l2"] / "low") == b"lower data\n"  # never modified
    finally:
        d.stop()


def test_copy_up_while_a_reader_has_the_lower_file_open(lay, tmp_path):
    """The reader's file is in this mount's cache, not passed through: the writer's
    copy-up reaches it (as on overlayfs).  Once both are closed, the file, now in the
    upper layer, is opened with a backing file."""
    d = _mount(lay, tmp_path)
    mp = d.mountpoint
    try:
        rfd = os.open(f"{mp}/low", os.O_RDONLY)
        try:
            assert os.pread(rfd, 100, 0) == b"lower data\n"
            with open(f"{mp}/low", "r+b") as w:
                w.write(b"NEW!")
            assert os.pread(rfd, 100, 0) == b"NEW!r data\n"
            assert os.fstat(rfd).st_size == 11
            with open(f"{mp}/low", "rb") as r2:  # while the first reader is still open
                assert r2.read() == b"NEW!r data\n"
        finally:
            os.close(rfd)
        with open(f"{mp}/low", "ab") as w:
            w.write(b"more\n")
        assert read(f"{mp}/low") == b"NEW!r data\nmore\n"
        assert read(lay["l2"] / "low") == b"lower data\n"
    finally:
        d.stop()
    assert answered_in_c(d)["pt_opens"] >= 1


def test_lower_files_of_a_read_only_mount_are_passed_through(lay, tmp_path):
    d = _mount(lay, tmp_path, rw=False)
    big = lay["l2"] / "big"
    data = read(big)
    try:
        drop_page_cache()
        assert read(f"{d.mountpoint}/big") == data
        assert cached_bytes(big) == len(data)  # read into the lower file's own cache
        for _ in range(3):
            assert read(f"{d.mountpoint}/low") == b"lower data\n"
        with pytest.raises(OSError):
            open(f"{d.mountpoint}/low", "r+b")
    finally:
        d.stop()
    stats = answered_in_c(d)
    assert stats["pt_opens"] >= 4 and stats["read"] == 0, stats
    assert stats["open"] >= 1, stats  # later opens answered in C


def test_nopassthrough_keeps_the_daemon_in_the_data_path(lay, tmp_path):
    d = _mount(lay, tmp_path, "nopassthrough")
    mp = d.mountpoint
    try:
        put(f"{mp}/new", b"x" * 100000)
        assert read(f"{mp}/new") == b"x" * 100000
    finally:
        d.stop()
    assert "passthrough" not in _features(d), _features(d)
    assert "no_open" in _features(d)
    stats = answered_in_c(d)
    assert stats["pt_opens"] == 0, stats


def test_hard_links_while_the_file_is_opened_and_closed_for_writing(lay, tmp_path):
    """Closing files opened for writing must not make the kernel doubt the link count:
    link(2) of an existing file never fails while others open and close it."""
    import multiprocessing

    d = _mount(lay, tmp_path)
    p = f"{d.mountpoint}/linked"
    put(p, b"x")
    stop = multiprocessing.Event()

    def closer():
        while not stop.is_set():
            os.close(os.open(p, os.O_RDWR))

    procs = [multiprocessing.Process(target=closer) for _ in range(2)]
    failures = []
    try:
        for pr in procs:
            pr.start()
        for i in range(1500):
            try:
                os.unlink(p + ".lnk")
            except FileNotFoundError:
                pass
            try:
                os.link(p, p + ".lnk")
            except OSError as e:
                failures.append((i, e.strerror))
    finally:
        stop.set()
        for pr in procs:
            pr.join(10)
            if pr.is_alive():
                pr.kill()
        d.stop()
    assert not failures, failures[:5]
