"""The kernel caches that fs/_fuseshim.c turns on (no OPEN/OPENDIR: cached listings,
page cache kept across opens, cached symlinks) stay coherent with every change made
through the mount, and the daemon's per-file fds (no OPEN means it is never told about
opens and closes) keep unlinked-but-open files readable and stay bounded."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import threading
import time

import pytest

from conftest import start_daemon
from layerkit import cached_bytes, put, read


@pytest.fixture
def lay(dirs):
    l1, l2 = dirs["l1"], dirs["l2"]
    put(l2 / "a", b"lower a\n")
    (l2 / "d").mkdir()
    for i in range(40):
        put(l2 / "d" / f"f{i:02d}", b"file %d\n" % i)
    os.symlink("a", l2 / "link")
    return dirs


@pytest.fixture
def mnt(lay, mounts):
    d = mounts.union([lay["l1"], lay["l2"]], lay["upper"], lay["work"], extra=("--debug",))
    return d


def own_daemon(lay, tmp_path, **kw):
    """A daemon on l1+l2 that the test starts itself (and must stop)."""
    mp = tmp_path / "m"
    mp.mkdir()
    return mp, start_daemon(mp, [lay["l1"], lay["l2"]], lay["upper"], lay["work"], **kw)


def fds_of(pid: int) -> int:
    """The daemon's fds on files in the layers (its cached per-file fds).  It reaches
    the layers through private clones of their mounts (fs/layermount.py), so the
    targets read relative to a clone's root: every path but /dev and its log, not
    O_PATH."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                flags = int(f.read().split("flags:")[1].split()[0], 8)
        except (OSError, IndexError, ValueError):
            continue
        if flags & 0o10000000:  # O_PATH: dirs' GETATTR fds, the clones themselves
            continue
        if target.startswith("/") and not target.startswith("/dev/") \
                and not target.endswith(".log"):
            n += 1
    return n


def test_shim_is_in_effect(mnt):
    """CI builds the shim (libfuse3-dev is installed): the daemon must be using it."""
    os.listdir(mnt.mountpoint)
    log = mnt.log_text()
    line = next((x for x in log.splitlines() if "kernel caching:" in x), "kernel caching:")
    features = line.split("kernel caching:")[1].strip().split(", ")
    for feature in ("no_opendir", "cache_symlinks", "splice_write"):
        assert feature in features, log[-2000:]
    # passthrough (Linux 6.9+, root) needs OPEN; without it the kernel opens files itself
    assert ("passthrough" in features) != ("no_open" in features), log[-2000:]


def test_cached_listing_follows_changes(mnt):
    m = mnt.mountpoint
    assert sorted(os.listdir(m)) == ["a", "d", "link"]
    assert sorted(os.listdir(m)) == ["a", "d", "link"]  # second one from the kernel's cache
    put(f"{m}/new", b"n")
    assert sorted(os.listdir(m)) == ["a", "d", "link", "new"]
    os.rename(f"{m}/new", f"{m}/d/moved")
    assert "new" not in os.listdir(m) and "moved" in os.listdir(f"{m}/d")
    os.unlink(f"{m}/a")
    os.mkdir(f"{m}/sub")
    assert sorted(os.listdir(m)) == ["d", "link", "sub"]
    os.rmdir(f"{m}/sub")
    os.symlink("x", f"{m}/s")
    assert sorted(os.listdir(m)) == ["d", "link", "s"]


def test_unlink_everything_while_listing(mnt):
    """for e in scandir(d): unlink(e) empties d (a reader resumes after the last name it
    got, whatever changed meanwhile)."""
    m = mnt.mountpoint
    os.mkdir(f"{m}/many")
    for i in range(2000):
        open(f"{m}/many/f{i:05d}", "w").close()
    for _ in range(2):
        with os.scandir(f"{m}/many") as it:
            for e in it:
                os.unlink(e.path)
        if not os.listdir(f"{m}/many"):
            break
    assert os.listdir(f"{m}/many") == []
    # the same over lower files (each unlink writes a whiteout)
    with os.scandir(f"{m}/d") as it:
        for e in it:
            os.unlink(e.path)
    assert os.listdir(f"{m}/d") == []


def test_private_inode_numbers_are_not_mistaken(lay, tmp_path):
    """Lower files on another filesystem than the upper get inode numbers from a private
    range (1 << 62 up): reads and writes by inode must reach the right file."""
    shm = tmp_path_on_other_fs(tmp_path)
    up, work = shm / "upper", shm / "work"
    up.mkdir()
    work.mkdir()
    put(up / "secret", b"upper secret")
    mp = tmp_path / "m"
    mp.mkdir()
    d = start_daemon(mp, [lay["l2"]], up, work)
    try:
        ino = os.stat(f"{mp}/d/f05").st_ino
        assert ino >= 1 << 61  # xino-style (inodes._xino) or the private counter
        for i in range(40):
            assert read(f"{mp}/d/f{i:02d}") == b"file %d\n" % i
        assert sorted(os.listdir(f"{mp}/d"))[:2] == ["f00", "f01"]
        with open(f"{mp}/d/f05", "r+b") as f:
            f.write(b"FILE")
        assert read(up / "secret") == b"upper secret"
        assert read(up / "d" / "f05") == b"FILE 5\n"
    finally:
        d.stop()
        subprocess.run(["rm", "-rf", str(shm)])


def tmp_path_on_other_fs(tmp_path):
    import tempfile
    from pathlib import Path

    for base in ("/dev/shm", "/run"):
        if os.path.isdir(base) and os.stat(base).st_dev != os.stat(tmp_path).st_dev:
            return Path(tempfile.mkdtemp(prefix="uf-test-", dir=base))
    pytest.skip("no second filesystem to put an upper on")


def test_daemon_without_dac_override_opens_files_itself(lay, tmp_path):
    """A daemon that can't override file permissions keeps OPEN (it must open files
    with the caller's access, when the kernel checked it), so chmod-then-write and
    unlink of unreadable files work as on a root daemon."""
    mp, d = own_daemon(lay, tmp_path, extra=("--debug",),
                       prefix=("setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"))
    try:
        put(f"{mp}/u1", b"upper one\n")
        fd = os.open(f"{mp}/u1", os.O_RDWR)
        os.fchmod(fd, 0o444)
        os.pwrite(fd, b"WRITTEN", 0)
        os.close(fd)
        assert read(lay["upper"] / "u1") == b"WRITTENne\n"
        os.chmod(f"{mp}/d/f07", 0)
        os.unlink(f"{mp}/d/f07")
        assert "f07" not in os.listdir(f"{mp}/d")
        line = next(x for x in d.log_text().splitlines() if "kernel caching:" in x)
        features = line.split("kernel caching:")[1].strip().split(", ")
        assert "no_open" not in features and "no_opendir" in features
    finally:
        d.stop()


def test_symlink_cache_follows_replacement(mnt):
    m = mnt.mountpoint
    assert os.readlink(f"{m}/link") == "a"
    assert os.readlink(f"{m}/link") == "a"
    os.symlink("elsewhere", f"{m}/link2")
    os.rename(f"{m}/link2", f"{m}/link")
    assert os.readlink(f"{m}/link") == "elsewhere"


def test_page_cache_follows_writes_from_other_opens(mnt):
    m = mnt.mountpoint
    assert read(f"{m}/a") == b"lower a\n"
    with open(f"{m}/a", "r+b") as f:
        f.write(b"LOWER")
    assert read(f"{m}/a") == b"LOWER a\n"
    put(f"{m}/a", b"short")  # O_TRUNC: reaches the daemon as a truncate
    assert read(f"{m}/a") == b"short"
    fd = os.open(f"{m}/d/f01", os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert read(f"{m}/d/f01") == b""
    assert os.path.getsize(os.path.join(os.path.dirname(m), "upper", "d", "f01")) == 0


def test_open_trunc_of_lower_file_copies_no_data(mnt, lay):
    m = mnt.mountpoint
    fd = os.open(f"{m}/d/f02", os.O_WRONLY | os.O_TRUNC)
    os.write(fd, b"new")
    os.close(fd)
    assert read(f"{m}/d/f02") == b"new"
    assert read(lay["upper"] / "d" / "f02") == b"new"
    assert read(lay["l2"] / "d" / "f02") == b"file 2\n"
    copied = [x for x in mnt.log_text().splitlines() if "copied up" in x and "f02" in x]
    assert copied and copied[0].endswith("(0 bytes)"), copied


def test_unlinked_open_upper_file_stays_readable_and_writable(mnt, lay):
    m = mnt.mountpoint
    put(f"{m}/up", b"upper data")
    f = open(f"{m}/up", "r+b")  # no request reaches the daemon for this open
    os.unlink(f"{m}/up")
    assert not (lay["upper"] / "up").exists()
    assert f.read() == b"upper data"
    f.write(b"+more")
    f.flush()
    os.fsync(f.fileno())
    f.seek(0)
    assert f.read() == b"upper data+more"
    f.close()


def test_unlinking_a_read_lower_file_copies_nothing(mnt):
    """After an unlink the kernel flushes the file's cached (unchanged) times: that must
    not copy the lower file up (into an orphan nobody will read)."""
    m = mnt.mountpoint
    for i in range(8, 12):
        assert read(f"{m}/d/f{i:02d}") == b"file %d\n" % i
        os.unlink(f"{m}/d/f{i:02d}")
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")  # evict the inodes: their times get written back now
    os.listdir(m)
    assert not [x for x in mnt.log_text().splitlines() if "copied up" in x and "/d/f" in x]


def test_file_replaced_by_rename_stays_readable_through_open_fd(mnt, lay):
    m = mnt.mountpoint
    put(f"{m}/target", b"old contents")
    fd = os.open(f"{m}/target", os.O_RDONLY)
    put(f"{m}/tmp", b"new contents")
    os.rename(f"{m}/tmp", f"{m}/target")
    assert os.pread(fd, 100, 0) == b"old contents"
    os.close(fd)
    assert read(f"{m}/target") == b"new contents"
    # a lower file replaced while open, then written through the old fd
    fd = os.open(f"{m}/d/f03", os.O_RDWR)
    put(f"{m}/tmp", b"replacement")
    os.rename(f"{m}/tmp", f"{m}/d/f03")
    os.pwrite(fd, b"F", 0)
    os.fsync(fd)
    assert os.pread(fd, 100, 0) == b"File 3\n"
    os.close(fd)
    assert read(f"{m}/d/f03") == b"replacement"
    assert read(lay["l2"] / "d" / "f03") == b"file 3\n"


def test_shared_mmap_write_of_lower_file(mnt, lay):
    m = mnt.mountpoint
    with open(f"{m}/d/f04", "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0)
        mm[0:4] = b"FILE"
        mm.flush()
        mm.close()
    assert read(f"{m}/d/f04") == b"FILE 4\n"
    assert read(lay["upper"] / "d" / "f04") == b"FILE 4\n"
    assert read(lay["l2"] / "d" / "f04") == b"file 4\n"


def test_fd_cache_is_bounded(lay, tmp_path, monkeypatch):
    monkeypatch.setenv("UNIONFUSE_FD_CACHE_MAX", "8")
    mp, d = own_daemon(lay, tmp_path)
    try:
        base = fds_of(d.pid)
        for i in range(40):
            assert read(f"{mp}/d/f{i:02d}") == b"file %d\n" % i
        assert fds_of(d.pid) <= base + 8
        # written after their fds were dropped: opened again, copied up
        for i in range(0, 40, 3):
            with open(f"{mp}/d/f{i:02d}", "ab") as f:
                f.write(b"+")
        assert fds_of(d.pid) <= base + 8
        for i in range(40):
            assert read(f"{mp}/d/f{i:02d}") == b"file %d\n%s" % (i, b"+" if i % 3 == 0 else b"")
    finally:
        d.stop()
    for i in range(0, 40, 3):
        assert read(lay["upper"] / "d" / f"f{i:02d}") == b"file %d\n+" % i


def test_fds_closed_when_kernel_forgets(lay, tmp_path):
    mp, d = own_daemon(lay, tmp_path)
    try:
        base = fds_of(d.pid)
        for i in range(40):
            read(f"{mp}/d/f{i:02d}")
        assert fds_of(d.pid) >= base + 40
        # drop the kernel's dentries and inodes: it sends FORGET, we close
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2\n")
        for _ in range(50):
            if fds_of(d.pid) < base + 40:
                break
            threading.Event().wait(0.1)
        assert fds_of(d.pid) < base + 40
    finally:
        d.stop()


def test_blocking_request_does_not_stall_others(lay, tmp_path):
    """The daemon serves from one task; an fsync or a big copy-up runs in a thread
    while a second worker answers everything else."""
    big = lay["l2"] / "big"
    with open(big, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(256):
            f.write(chunk)
    mp, d = own_daemon(lay, tmp_path)
    try:
        done = threading.Event()
        waits = []

        def other():
            while not done.is_set():
                t0 = time.monotonic()
                try:  # getxattr always reaches the daemon (nothing cached answers it)
                    os.getxattr(f"{mp}/a", "user.none")
                except OSError:
                    pass
                waits.append(time.monotonic() - t0)

        t = threading.Thread(target=other)
        t.start()
        try:
            t0 = time.monotonic()
            with open(f"{mp}/big", "ab") as f:  # 256 MiB copy-up, in a thread
                f.write(b"!")
                os.fsync(f.fileno())
            busy = time.monotonic() - t0
        finally:
            done.set()
            t.join(30)
        assert os.path.getsize(lay["upper"] / "big") == (256 << 20) + 1
        # a stalled daemon would make one getxattr wait for the whole copy
        assert len(waits) > 10 and max(waits) < busy / 2, (busy, len(waits), max(waits))
    finally:
        d.stop()


def test_small_lower_files_are_in_the_cache_once_opened(dirs, mounts):
    """With passthrough (so the kernel sends OPEN), the first open of a small lower file
    stores its data in the kernel's page cache (operations._prime): reading it needs no
    READ.  The data is the file's, around page boundaries; a file over PRIME_MAX is left
    to READ; and a reader primed before a copy-up reads what is written after it."""
    from unionfuse.fs.operations import PRIME_MAX

    sizes = (1, 4095, 4096, 4097, PRIME_MAX, PRIME_MAX + 1)
    data = {n: bytes(i * 7 % 251 for i in range(n)) for n in sizes}
    for n in sizes:
        put(dirs["l1"] / f"s{n}", data[n])
    m = mounts.union([dirs["l1"]], dirs["upper"], dirs["work"], extra=("--debug",))
    mp = m.mountpoint
    os.listdir(mp)
    primes = "passthrough" in next(x for x in m.log_text().splitlines() if "kernel caching:" in x)
    for n in sizes:
        os.close(os.open(f"{mp}/s{n}", os.O_RDONLY))
        want = -(-n // 4096) * 4096 if primes and n <= PRIME_MAX else 0
        assert cached_bytes(f"{mp}/s{n}") == want, n
        assert read(f"{mp}/s{n}") == data[n]
        assert os.stat(f"{mp}/s{n}").st_size == n
    # a reader opened (and primed) before a writer copies the file up
    with open(f"{mp}/s4097", "rb") as r:
        assert r.read(10) == data[4097][:10]
        with open(f"{mp}/s4097", "r+b") as w:
            w.write(b"NEW")
        assert os.pread(r.fileno(), 5, 0) == b"NEW" + data[4097][3:5]
    assert read(dirs["l1"] / "s4097") == data[4097]  # the lower file is untouched
