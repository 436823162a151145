"""The daemon's C fast path (fs/_fuseshim.c: READ, WRITE, GETATTR, SETATTR, a
security.capability GETXATTR and RELEASE answered from a table of cached fds) and its
fast wait (fs/fastwait.py): the answers are the same as the Python ones, stay coherent
with every change made through the mount, and the daemon still stops on a signal.

Each coherence test runs twice: with the fast path, and with UNIONFUSE_NO_FASTPATH=1
(everything answered in Python), so the two are held to the same results."""

from __future__ import annotations

import ast
import errno
import fcntl
import os
import signal
import stat
import struct
import termios
import time

import pytest

from conftest import start_daemon
from layerkit import cached_bytes, put, read
from unionfuse.mount import mount_entry

CAPS = "security.capability"
# a valid VFS_CAP_REVISION_2 value: cap_net_bind_service in the permitted set
CAP_VALUE = struct.pack("<IIIII", 0x02000000, 1 << 10, 0, 0, 0)


def drop_page_cache():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1\n")


def answered_in_c(d) -> dict | None:
    """What the stopped daemon answered in C (its --debug log's last line of stats)."""
    for line in reversed(d.log_text().splitlines()):
        if "answered in C: " in line:
            return ast.literal_eval(line.split("answered in C: ", 1)[1].strip())
    return None


@pytest.fixture
def lay(dirs):
    l2 = dirs["l2"]
    put(l2 / "low", b"lower data\n")
    put(l2 / "big", os.urandom(3 << 20))
    return dirs


@pytest.fixture(params=["fast", "python"])
def mode(request, monkeypatch):
    if request.param == "python":
        monkeypatch.setenv("UNIONFUSE_NO_FASTPATH", "1")
    return request.param


@pytest.fixture
def daemon(lay, mode, tmp_path):
    """A --debug daemon on l1+l2 (upper rw); stopped in teardown, or by the test."""
    mp = tmp_path / "m"
    mp.mkdir()
    d = start_daemon(mp, [lay["l1"], lay["l2"]], lay["upper"], lay["work"], extra=("--debug",))
    yield d
    d.stop()


def same_attrs(a: os.stat_result, b: os.stat_result, times=True):
    """*times*=False after writes: with the writeback cache the kernel keeps the mtime
    of its own writes, a moment before the daemon's pwrite stamps the upper file."""
    fields = ["st_mode", "st_uid", "st_gid", "st_size", "st_nlink"]
    for f in fields + (["st_mtime_ns"] if times else []):
        assert getattr(a, f) == getattr(b, f), (f, a, b)


def test_new_file_attrs_follow_writes_and_setattr(daemon, lay, mode):
    mp, up = daemon.mountpoint, lay["upper"]
    p = f"{mp}/new"
    with open(p, "wb") as f:
        f.write(b"x" * 10000)
        f.flush()
        os.fsync(f.fileno())
        same_attrs(os.fstat(f.fileno()), os.lstat(up / "new"), times=False)
        os.ftruncate(f.fileno(), 123)  # SETATTR size on an open file
        assert os.fstat(f.fileno()).st_size == 123
    os.chmod(p, 0o640)
    os.chown(p, 1234, 4321)
    os.utime(p, ns=(1_000_000_000, 2_000_000_123))
    st = os.stat(p)
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_uid, st.st_gid, st.st_size) == (1234, 4321, 123)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000, 2_000_000_123)
    same_attrs(st, os.lstat(up / "new"))
    os.utime(p)  # both "now"
    st = os.stat(p)
    assert abs(st.st_mtime - time.time()) < 5
    same_attrs(st, os.lstat(up / "new"))
    os.truncate(p, 0)
    with open(p, "ab") as f:
        f.write(b"tail")
    drop_page_cache()  # the next read reaches the daemon
    assert read(p) == b"tail"
    assert read(up / "new") == b"tail"
    daemon.stop()
    stats = answered_in_c(daemon)
    if mode == "python":
        assert stats is None
    else:  # the fast path did answer these (counted in C)
        assert stats is not None, daemon.log_text()[-2000:]
        # (with passthrough the kernel writes and reads upper files itself)
        kinds = ("setattr",) if stats["pt_opens"] else ("write", "setattr", "getxattr", "read")
        for kind in kinds:
            assert stats[kind] > 0, stats


def test_copied_up_file_is_written_through_its_new_fd(daemon, lay, mode):
    mp, up = daemon.mountpoint, lay["upper"]
    assert read(f"{mp}/low") == b"lower data\n"  # cached fd on the lower file
    with open(f"{mp}/low", "ab") as f:
        f.write(b"more\n")
    drop_page_cache()
    assert read(f"{mp}/low") == b"lower data\nmore\n"
    assert read(up / "low") == b"lower data\nmore\n"
    assert read(lay["l2"] / "low") == b"lower data\n"  # lower never modified
    same_attrs(os.stat(f"{mp}/low"), os.lstat(up / "low"), times=False)
    # a big lower file read at a large offset, then rewritten in the middle
    data = read(lay["l2"] / "big")
    with open(f"{mp}/big", "r+b") as f:
        f.seek(1 << 20)
        assert f.read(1 << 20) == data[1 << 20: 2 << 20]
        f.seek(5)
        f.write(b"HELLO")
    drop_page_cache()
    assert read(f"{mp}/big") == data[:5] + b"HELLO" + data[10:]
    assert read(lay["l2"] / "big") == data


def test_unlinked_and_replaced_files_are_not_answered_from_the_table(daemon, lay, mode):
    mp = daemon.mountpoint
    put(f"{mp}/gone", b"still here")
    put(f"{mp}/victim", b"old")
    put(f"{mp}/src", b"new")
    with open(f"{mp}/gone", "r+b") as f, open(f"{mp}/victim", "rb") as v:
        os.unlink(f"{mp}/gone")
        assert os.fstat(f.fileno()).st_nlink == 0
        f.seek(0, 2)
        f.write(b"!")
        f.flush()
        os.fsync(f.fileno())
        drop_page_cache()
        f.seek(0)
        assert f.read() == b"still here!"
        os.rename(f"{mp}/src", f"{mp}/victim")  # replaces an open file
        assert os.fstat(v.fileno()).st_nlink == 0
        assert v.read() == b"old"
    assert read(f"{mp}/victim") == b"new"
    assert sorted(os.listdir(mp)) == ["big", "low", "victim"]


def test_hard_links_share_attrs(daemon, lay, mode):
    mp = daemon.mountpoint
    put(f"{mp}/a", b"one")
    os.link(f"{mp}/a", f"{mp}/b")
    with open(f"{mp}/b", "ab") as f:
        f.write(b"two")
    os.chmod(f"{mp}/a", 0o600)
    for name in ("a", "b"):
        st = os.stat(f"{mp}/{name}")
        assert (st.st_nlink, st.st_size, stat.S_IMODE(st.st_mode)) == (2, 6, 0o600)
    os.unlink(f"{mp}/a")
    assert os.stat(f"{mp}/b").st_nlink == 1
    drop_page_cache()
    assert read(f"{mp}/b") == b"onetwo"
    # a lower file linked after copy-up: the hard-link group's own link count
    os.link(f"{mp}/low", f"{mp}/low2")
    with open(f"{mp}/low2", "ab") as f:
        f.write(b"+")
    assert os.stat(f"{mp}/low").st_nlink == 2
    assert read(f"{mp}/low") == b"lower data\n+"


def test_file_capabilities_set_through_the_mount_are_seen(daemon, lay, mode):
    mp = daemon.mountpoint
    put(f"{mp}/tool", b"#!/bin/sh\n")
    with pytest.raises(OSError) as e:
        os.getxattr(f"{mp}/tool", CAPS)
    assert e.value.errno == errno.ENODATA
    os.setxattr(f"{mp}/tool", CAPS, CAP_VALUE)
    assert os.getxattr(f"{mp}/tool", CAPS) == CAP_VALUE
    assert os.getxattr(lay["upper"] / "tool", CAPS) == CAP_VALUE
    os.removexattr(f"{mp}/tool", CAPS)
    with pytest.raises(OSError) as e:
        os.getxattr(f"{mp}/tool", CAPS)
    assert e.value.errno == errno.ENODATA
    # a lower file with capabilities keeps them through a read (no "none" cached)
    os.setxattr(lay["l2"] / "low", CAPS, CAP_VALUE)
    assert read(f"{daemon.mountpoint}/low") == b"lower data\n"
    assert os.getxattr(f"{mp}/low", CAPS) == CAP_VALUE


def test_read_only_mount_refuses_writes_and_setattr(lay, tmp_path, mode):
    mp = tmp_path / "ro"
    mp.mkdir()
    d = start_daemon(mp, [lay["l1"], lay["l2"]], extra=("--debug",))
    try:
        assert read(f"{mp}/low") == b"lower data\n"
        with pytest.raises(OSError) as e:
            os.chmod(f"{mp}/low", 0o600)
        assert e.value.errno == errno.EROFS
        with pytest.raises(OSError) as e:
            open(f"{mp}/low", "ab")
        assert e.value.errno == errno.EROFS
        drop_page_cache()
        assert read(f"{mp}/low") == b"lower data\n"
    finally:
        d.stop()


@pytest.mark.parametrize("last", ["python", "c"])
def test_daemon_idle_in_fast_wait_stops_at_once_on_sigterm(lay, tmp_path, last):
    """Idle after a request Python answered (waiting in fs/fastwait.py) or one C
    answered (waiting in the shim's C serve loop): a signal ends either wait."""
    mp = tmp_path / "m"
    mp.mkdir()
    d = start_daemon(mp, [lay["l1"], lay["l2"]], lay["upper"], lay["work"], extra=("--debug",))
    try:
        for i in range(200):  # past the fast wait's turns back to trio
            put(f"{mp}/f{i}", b"x")
            os.stat(f"{mp}/f{i}")
        if last == "python":
            os.mkdir(f"{mp}/made")
        else:
            drop_page_cache()
            assert read(f"{mp}/big")[:1]  # READs, answered in C
        time.sleep(0.3)  # now idle, blocked in poll()
        t0 = time.monotonic()
        os.kill(d.pid, signal.SIGTERM)
        rc = d.proc.wait(10)
        took = time.monotonic() - t0
    finally:
        d.stop()
    assert rc == 0, d.log_text()[-2000:]
    assert took < 0.5, took  # not the fast wait's 1 s idle timeout
    assert "fast wait for requests installed" in d.log_text()
    assert "C serve loop on" in d.log_text()
    assert mount_entry(str(mp)) is None
    stats = answered_in_c(d)
    assert stats["in_loop"] > 0, stats
    if last == "c":
        assert stats["read"] > 0, stats


@pytest.mark.parametrize("spin", [0, 100])
def test_waits_spin_only_when_asked(lay, tmp_path, spin):
    """-o spin=US: the daemon polls for up to US microseconds before it sleeps, so
    requests that follow each other closely are read by a wait that never slept;
    spin=0 sleeps in every wait.  (IOCTLs: each one a request answered in C.)"""
    mp = tmp_path / "m"
    mp.mkdir()
    d = start_daemon(mp, [lay["l1"], lay["l2"]], lay["upper"], lay["work"],
                     extra=("--debug", "-o", f"spin={spin}"))
    try:
        fd = os.open(f"{mp}/low", os.O_RDONLY)
        try:
            for _ in range(300):
                with pytest.raises(OSError) as ei:
                    fcntl.ioctl(fd, termios.TCGETS, bytes(64))
                assert ei.value.errno == errno.ENOTTY
        finally:
            os.close(fd)
        assert read(f"{mp}/low") == b"lower data\n"
    finally:
        d.stop()
    stats = answered_in_c(d)
    assert stats["in_loop"] >= 250, stats
    if spin:
        assert stats["spin_caught"] > 0, stats
    else:
        assert stats["spin_caught"] == 0 and stats["slept"] > 0, stats


def dir_attrs(st: os.stat_result):
    return (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns)


def test_directory_attrs_follow_changes(daemon, lay, mode):
    mp, up = daemon.mountpoint, lay["upper"]
    (lay["l2"] / "ld").mkdir()
    put(lay["l2"] / "ld" / "x", b"x")
    # upper-only dir: its own link count, following subdirs made and removed
    os.mkdir(f"{mp}/ud")
    for _ in range(3):  # the first GETATTR is Python's, the next ones may be C's
        assert os.stat(f"{mp}/ud").st_nlink == 2
    os.mkdir(f"{mp}/ud/s")
    assert os.stat(f"{mp}/ud").st_nlink == 3
    os.chmod(f"{mp}/ud", 0o711)
    os.chown(f"{mp}/ud", 12, 34)
    assert dir_attrs(os.stat(f"{mp}/ud")) == dir_attrs(os.lstat(up / "ud"))
    assert stat.S_IMODE(os.stat(f"{mp}/ud").st_mode) == 0o711
    os.rmdir(f"{mp}/ud/s")
    assert os.stat(f"{mp}/ud").st_nlink == 2
    # a lower-only dir, then copied up by a create inside it: merged, nlink 1
    before = os.stat(f"{mp}/ld")
    assert os.stat(f"{mp}/ld").st_mtime_ns == before.st_mtime_ns
    put(f"{mp}/ld/new", b"n")
    for _ in range(3):
        st = os.stat(f"{mp}/ld")
        assert st.st_nlink == 1
        assert dir_attrs(st) == dir_attrs(os.lstat(up / "ld"))
    os.chmod(f"{mp}/ld", 0o700)
    assert stat.S_IMODE(os.stat(f"{mp}/ld").st_mode) == 0o700
    # renamed, removed, made again: each stat is the dir now at that name
    os.rename(f"{mp}/ud", f"{mp}/ud2")
    assert dir_attrs(os.stat(f"{mp}/ud2")) == dir_attrs(os.lstat(up / "ud2"))
    os.rmdir(f"{mp}/ud2")
    with pytest.raises(FileNotFoundError):
        os.stat(f"{mp}/ud2")
    os.mkdir(f"{mp}/ud2", 0o755)
    st = os.stat(f"{mp}/ud2")
    assert (st.st_nlink, stat.S_IMODE(st.st_mode), st.st_uid) == (2, 0o755, 0)
    # the root: merged (upper + lowers)
    for _ in range(3):
        assert os.stat(mp).st_nlink == 1
    os.unlink(f"{mp}/ld/new")
    os.unlink(f"{mp}/ld/x")
    os.rmdir(f"{mp}/ld")
    assert not os.path.exists(f"{mp}/ld")
    assert os.path.exists(lay["l2"] / "ld" / "x")  # lower never modified
    daemon.stop()
    if mode == "fast":  # no regular file was stat'ed: these were the directories'
        assert answered_in_c(daemon)["getattr"] > 0, daemon.log_text()[-2000:]


def test_unlinked_file_attrs_say_no_links(daemon, mode):
    mp = daemon.mountpoint
    with open(f"{mp}/tmpfile", "w+b") as f:
        f.write(b"abc")
        f.flush()
        os.unlink(f"{mp}/tmpfile")
        for _ in range(3):
            st = os.fstat(f.fileno())
            assert (st.st_nlink, st.st_size) == (0, 3)
        os.fchmod(f.fileno(), 0o600)
        os.ftruncate(f.fileno(), 1)
        st = os.fstat(f.fileno())
        assert (st.st_nlink, st.st_size, stat.S_IMODE(st.st_mode)) == (0, 1, 0o600)


def test_reading_through_the_mount_leaves_the_lower_page_cache(daemon, lay, mode):
    """READ replies are spliced from the lower file: its cached pages stay where they
    are (shared by every mount of the layer), nothing is moved out of them."""
    big = lay["l2"] / "big"
    data = read(big)
    assert cached_bytes(big) == len(data)
    assert read(f"{daemon.mountpoint}/big") == data
    assert cached_bytes(big) == len(data)


def test_table_flags_match_the_shim():
    """operations.py and fs/_fuseshim.c spell the table's flags each in their own
    language: the built module must agree with the Python side."""
    from unionfuse.fs import _fuseshim, operations

    for name in ("FP_READ", "FP_WRITE", "FP_ATTR", "FP_SETATTR", "FP_NOCAPS", "FP_NLINK0",
                 "FP_NLINK1", "FP_UPPERONLY", "FP_CACHED_OPEN"):
        assert getattr(_fuseshim, name) == getattr(operations, name), name


def test_lookups_in_dirs_with_and_without_lower_layers(lay, mode, tmp_path):
    """A dir with no lower layer answers a missing name in C; a merged dir never does
    (its lower names, whiteouts and opaque flag are the daemon's to resolve)."""
    (lay["l2"] / "ld").mkdir()
    put(lay["l2"] / "ld" / "lower_name", b"l")
    (lay["l2"] / "od").mkdir()
    put(lay["l2"] / "od" / "hidden", b"h")
    mp, up = tmp_path / "m", lay["upper"]
    mp.mkdir()
    daemon = start_daemon(mp, [lay["l1"], lay["l2"]], up, lay["work"], extra=("--debug",))
    try:
        lookups_with_and_without_lowers(mp, up)
    finally:
        daemon.stop()
    if mode == "fast":
        assert answered_in_c(daemon)["lookup"] > 0, daemon.log_text()[-2000:]


def lookups_with_and_without_lowers(mp, up):
    os.mkdir(f"{mp}/ud")
    for _ in range(3):
        os.stat(f"{mp}/ud")  # the dir's GETATTR: from now on in the C table
        os.stat(f"{mp}/ld")
    for i in range(20):
        p = f"{mp}/ud/n{i}"
        assert not os.path.lexists(p)
        put(p, b"x")
        assert read(p) == b"x"
        os.rename(p, p + ".r")
        assert not os.path.lexists(p) and os.path.lexists(p + ".r")
        os.unlink(p + ".r")
        assert not os.path.lexists(p + ".r")
    # a merged dir copied up: its lower names still found, a deleted one not
    put(f"{mp}/ld/new", b"n")
    os.stat(f"{mp}/ld")
    assert read(f"{mp}/ld/lower_name") == b"l"
    os.unlink(f"{mp}/ld/lower_name")
    assert not os.path.lexists(f"{mp}/ld/lower_name")
    assert os.path.lexists(f"{mp}/ld/new")
    # an upper-only dir made opaque over a lower one: lower names stay hidden
    os.rename(f"{mp}/ud", f"{mp}/ud2")
    os.rmdir(f"{mp}/ud2")
    assert os.listdir(f"{mp}/od") == ["hidden"]
    os.unlink(f"{mp}/od/hidden")
    os.rmdir(f"{mp}/od")
    os.mkdir(f"{mp}/od")
    for _ in range(3):
        os.stat(f"{mp}/od")
    assert not os.path.lexists(f"{mp}/od/hidden")
    assert os.listdir(f"{mp}/od") == []
    put(f"{mp}/od/hidden", b"new")
    assert read(f"{mp}/od/hidden") == b"new"
    # a file put into the upper dir behind the mount's back is found, not cached absent
    (up / "od" / "behind").write_bytes(b"b")
    assert read(f"{mp}/od/behind") == b"b"
