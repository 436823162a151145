"""Real mounts, every way a user starts one: by hand (`unionfuse mount`, background or
--foreground), through mount(8) / an fstab line (`mount -t fuse.unionfuse` runs
mount.fuse3, which runs /usr/local/bin/unionfuse), and as a systemd Type=notify service.

Every mount made here is undone in teardown (lazily, even after a failure) and every
daemon a test started is waited for by its own PID (killed by PID only if it hangs).
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from unionfuse.mount import mount_entry, pid_file

UF = "/usr/local/bin/unionfuse"
REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not os.path.exists(UF), reason=f"{UF} missing: run scripts/install.sh"
)

# -- helpers -----------------------------------------------------------------------------


def mount_count(path) -> int:
    """How many mounts are stacked at *path* (mountinfo escapes spaces etc. as \\ooo)."""
    target = os.path.realpath(str(path))
    n = 0
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            mp = line.split()[4]
            mp = mp.replace(b"\\040", b" ").replace(b"\\011", b"\t").replace(b"\\012", b"\n")
            mp = mp.replace(b"\\134", b"\\")
            if os.fsdecode(mp) == target:
                n += 1
    return n


def fstype(path) -> str | None:
    return mount_entry(str(path))


def pid_state(pid: int) -> str | None:
    """The /proc state letter, None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def alive(pid: int) -> bool:
    # A daemon detached from its starter is re-parented to PID 1, which on this machine
    # does not reap: a zombie has exited.
    return pid_state(pid) not in (None, "Z")


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [os.fsdecode(x) for x in f.read().split(b"\0") if x]
    except OSError:
        return []


def daemon_pid(mnt) -> int:
    """The daemon serving *mnt*: from its pid file, checked against /proc."""
    with open(pid_file(str(mnt))) as f:
        pid = int(f.read().strip())
    assert alive(pid), f"pid file names {pid}, which is not running"
    assert os.path.realpath(str(mnt)) in cmdline(pid), cmdline(pid)
    return pid


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.02)
    return not alive(pid)


def wait_live(mnt, probe: str, proc: subprocess.Popen | None = None, timeout: float = 20.0):
    """Poll until *probe* (a file in the mount) is readable through a FUSE mount."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"daemon exited with {proc.returncode} before the mount was live")
        if (fstype(mnt) or "").startswith("fuse"):
            try:
                with open(os.path.join(str(mnt), probe)) as f:
                    return f.read()
            except OSError:
                pass
        time.sleep(0.02)
    raise AssertionError(f"{mnt} did not come up")


def run(argv, timeout: float = 60.0, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, **kw)


class Guard:
    """Undoes every mount and stops every daemon a test made."""

    def __init__(self):
        self.mountpoints: list[str] = []
        self.pids: list[tuple[int, str]] = []  # (pid, mountpoint) of background daemons
        self.procs: list[subprocess.Popen] = []

    def mountpoint(self, path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.mountpoints.append(str(path))
        return path

    def track_pid_file(self, mnt) -> int | None:
        try:
            pid = daemon_pid(mnt)
        except (OSError, ValueError, AssertionError):
            return None
        self.pids.append((pid, os.path.realpath(str(mnt))))
        return pid

    def popen(self, argv, **kw) -> subprocess.Popen:
        p = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, **kw)
        self.procs.append(p)
        return p

    def cleanup(self) -> None:
        for mnt in self.mountpoints:
            # Stacked mounts (e.g. over a dead one): peel each.
            for _ in range(10):
                if mount_count(mnt) == 0:
                    break
                r = subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
                if r.returncode != 0:
                    subprocess.run(["umount", "-l", mnt], capture_output=True)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for pid, mnt in self.pids:
            if not wait_gone(pid, 10) and mnt in cmdline(pid):
                os.kill(pid, signal.SIGKILL)  # ours: its cmdline names our mountpoint
                wait_gone(pid, 5)


@pytest.fixture
def guard():
    g = Guard()
    try:
        yield g
    finally:
        g.cleanup()


@pytest.fixture
def layers(tmp_path):
    """l1 (top) and l2 with a file each and a shared dir; empty upper and work."""
    d = {n: tmp_path / n for n in ("l1", "l2", "u", "w")}
    for p in d.values():
        p.mkdir()
    (d["l1"] / "a").write_text("from l1\n")
    (d["l2"] / "b").write_text("from l2\n")
    (d["l1"] / "shared").write_text("l1 wins\n")
    (d["l2"] / "shared").write_text("l2 loses\n")
    return d


def check_merged_rw(mnt, layers) -> None:
    assert (mnt / "a").read_text() == "from l1\n"
    assert (mnt / "b").read_text() == "from l2\n"
    assert (mnt / "shared").read_text() == "l1 wins\n"
    (mnt / "new").write_text("written\n")
    assert (layers["u"] / "new").read_text() == "written\n"
    assert not (layers["l1"] / "new").exists() and not (layers["l2"] / "new").exists()


# -- by hand: unionfuse mount / umount ---------------------------------------------------


def test_mount_by_hand_background_then_umount(guard, layers, tmp_path):
    mnt = guard.mountpoint(tmp_path / "mnt")
    r = run([UF, "mount", "--lower", layers["l1"], "--lower", layers["l2"],
             "--upper", layers["u"], "--work", layers["w"], mnt])
    pid = guard.track_pid_file(mnt)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    # Live the moment the command returns: no polling.
    assert (mnt / "a").read_text() == "from l1\n"
    assert fstype(mnt) == "fuse.unionfuse"
    assert pid is not None and alive(pid)  # the daemon stayed behind in the background
    check_merged_rw(mnt, layers)

    r = run([UF, "umount", mnt])
    assert r.returncode == 0, r.stderr
    assert fstype(mnt) is None
    assert not alive(pid), "daemon still running after `unionfuse umount` returned"
    assert not os.path.exists(pid_file(str(mnt)))
    assert (layers["u"] / "new").read_text() == "written\n"  # changes stay in the upper


def test_mount_by_hand_o_options(guard, layers, tmp_path):
    mnt = guard.mountpoint(tmp_path / "mnt")
    o = f"lowerdir={layers['l1']}:{layers['l2']},upperdir={layers['u']},workdir={layers['w']}"
    r = run([UF, "mount", "-o", o, mnt])
    pid = guard.track_pid_file(mnt)
    assert r.returncode == 0, r.stderr
    check_merged_rw(mnt, layers)
    r = run([UF, "umount", mnt])
    assert r.returncode == 0, r.stderr
    assert fstype(mnt) is None and not alive(pid)


def test_mount_read_only_without_upper(guard, layers, tmp_path):
    mnt = guard.mountpoint(tmp_path / "mnt")
    r = run([UF, "mount", "--lower", layers["l1"], "--lower", layers["l2"], mnt])
    pid = guard.track_pid_file(mnt)
    assert r.returncode == 0, r.stderr
    assert (mnt / "a").read_text() == "from l1\n"
    assert sorted(os.listdir(mnt)) == ["a", "b", "shared"]
    attempts = [
        lambda: open(mnt / "new", "w"),
        lambda: open(mnt / "a", "a"),
        lambda: os.mkdir(mnt / "d"),
        lambda: os.unlink(mnt / "a"),
        lambda: os.rename(mnt / "a", mnt / "z"),
        lambda: os.chmod(mnt / "a", 0o600),
        lambda: os.symlink("a", mnt / "s"),
    ]
    for i, fn in enumerate(attempts):
        with pytest.raises(OSError) as ei:
            fn()
        assert ei.value.errno == errno.EROFS, (i, ei.value)
    for low in ("l1", "l2"):
        assert sorted(os.listdir(layers[low])) == sorted(["a", "shared"] if low == "l1"
                                                         else ["b", "shared"])
    run([UF, "umount", mnt])
    assert fstype(mnt) is None and wait_gone(pid, 5)


def test_umount_mountpoint_with_space(guard, layers, tmp_path):
    mnt = guard.mountpoint(tmp_path / "my mnt")
    r = run([UF, "mount", "--lower", layers["l1"], mnt])
    pid = guard.track_pid_file(mnt)
    assert r.returncode == 0, r.stderr
    assert (mnt / "a").read_text() == "from l1\n"
    r = run([UF, "umount", mnt])
    assert r.returncode == 0, r.stderr
    assert mount_count(mnt) == 0 and not alive(pid)


def test_umount_mountpoint_with_non_ascii_name(guard, layers, tmp_path):
    mnt = guard.mountpoint(tmp_path / "mnt-é")
    r = run([UF, "mount", "--lower", layers["l1"], mnt])
    pid = guard.track_pid_file(mnt)
    assert r.returncode == 0, r.stderr
    assert (mnt / "a").read_text() == "from l1\n"
    r = run([UF, "umount", mnt])
    assert r.returncode == 0, r.stderr
    assert mount_count(mnt) == 0 and not alive(pid)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_foreground_stays_attached_and_stops_on_signal(guard, layers, tmp_path, sig):
    mnt = guard.mountpoint(tmp_path / "mnt")
    log = open(tmp_path / "daemon.log", "wb")
    p = guard.popen([UF, "mount", "--foreground", "--lower", layers["l1"], "--lower",
                     layers["l2"], "--upper", layers["u"], "--work", layers["w"], mnt],
                    stdout=log, stderr=log)
    log.close()
    assert wait_live(mnt, "a", p) == "from l1\n"
    assert p.poll() is None  # still attached, serving
    assert daemon_pid(mnt) == p.pid  # the wrapper execs: one process
    check_merged_rw(mnt, layers)
    time.sleep(0.2)  # let it settle into its main loop (see test_notify_* for the race)
    os.kill(p.pid, sig)
    rc = p.wait(15)
    out = (tmp_path / "daemon.log").read_text(errors="replace")
    assert rc == 0, out
    assert mount_count(mnt) == 0
    assert not os.path.exists(pid_file(str(mnt)))


# -- mount(8) and fstab ------------------------------------------------------------------


def _opts(layers) -> str:
    return f"lowerdir={layers['l1']}:{layers['l2']},upperdir={layers['u']},workdir={layers['w']}"


def test_mount_8_then_plain_umount(guard, layers, tmp_path):
    mnt = guard.mountpoint(tmp_path / "mnt")
    r = run(["mount", "-t", "fuse.unionfuse", "unionfuse", mnt, "-o", _opts(layers)])
    pid = guard.track_pid_file(mnt)
    assert r.returncode == 0, r.stderr
    assert (mnt / "a").read_text() == "from l1\n"  # live once mount(8) returns
    assert fstype(mnt) == "fuse.unionfuse"
    check_merged_rw(mnt, layers)
    assert pid is not None
    r = run(["umount", mnt])
    assert r.returncode == 0, r.stderr
    assert mount_count(mnt) == 0
    assert wait_gone(pid, 10), "daemon did not exit after umount(8)"


def test_mount_8_nosuid_nodev_ro(guard, layers, tmp_path):
    mnt = guard.mountpoint(tmp_path / "mnt")
    r = run(["mount", "-t", "fuse.unionfuse", "unionfuse", mnt, "-o",
             f"lowerdir={layers['l1']},nosuid,nodev,ro"])
    pid = guard.track_pid_file(mnt)
    assert r.returncode == 0, r.stderr
    with open("/proc/self/mountinfo") as f:
        line = next(x for x in f if x.split()[4] == os.path.realpath(mnt))
    per_mount = set(line.split()[5].split(","))
    assert {"nosuid", "nodev", "ro"} <= per_mount, line
    with pytest.raises(OSError) as ei:
        (mnt / "new").write_text("x")
    assert ei.value.errno == errno.EROFS
    run(["umount", mnt])
    assert wait_gone(pid, 10)


@pytest.mark.parametrize("flag", ["-T", "--fstab"])
def test_fstab_entry(guard, layers, tmp_path, flag):
    mnt = guard.mountpoint(tmp_path / "mnt")
    fstab = tmp_path / "fstab"
    fstab.write_text(
        "# test fstab\n"
        f"unionfuse {mnt} fuse.unionfuse defaults,nofail,_netdev,x-systemd.automount,"
        f"x-systemd.idle-timeout=1min,x-systemd.requires=local-fs.target,{_opts(layers)} 0 0\n"
    )
    r = run(["mount", flag, fstab, mnt])
    pid = guard.track_pid_file(mnt)
    assert r.returncode == 0, r.stderr
    assert (mnt / "a").read_text() == "from l1\n"
    check_merged_rw(mnt, layers)
    r = run(["umount", mnt])
    assert r.returncode == 0, r.stderr
    assert mount_count(mnt) == 0
    assert pid is not None and wait_gone(pid, 10)


# -- systemd Type=notify ----------------------------------------------------------------


def _notify_socket(tmp_path, abstract: bool):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"unionfuse-test-{os.getpid()}-{time.monotonic_ns()}"
        s.bind("\0" + name)
        env_value = "@" + name
    else:
        path = str(tmp_path / "notify.sock")
        s.bind(path)
        env_value = path
    return s, env_value


def _recv_until(s: socket.socket, want: str, timeout: float) -> list[str]:
    """Collect notify lines until *want* arrives (or time runs out)."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while want not in got:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        s.settimeout(left)
        try:
            data = s.recv(4096)
        except socket.timeout:
            break
        got += data.decode(errors="replace").splitlines()
    return got


def _config(tmp_path, layers, mnt) -> Path:
    cfg = tmp_path / "unionfuse.conf"
    cfg.write_text(
        "# as systemd/unionfuse@.service would read it\n"
        f"lowerdir={layers['l1']}:{layers['l2']}\n"
        f"upperdir={layers['u']}\n"
        f"workdir={layers['w']}\n"
        f"mountpoint={mnt}\n"
    )
    return cfg


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_ready_and_stopping(guard, layers, tmp_path, abstract):
    mnt = guard.mountpoint(tmp_path / "mnt")
    cfg = _config(tmp_path, layers, mnt)
    s, addr = _notify_socket(tmp_path, abstract)
    with s:
        log = open(tmp_path / "daemon.log", "wb")
        p = guard.popen([UF, "mount", "--foreground", "--config", cfg],
                        env=dict(os.environ, NOTIFY_SOCKET=addr), stdout=log, stderr=log)
        log.close()
        got = _recv_until(s, "READY=1", 20)
        assert "READY=1" in got, (got, p.poll(), (tmp_path / "daemon.log").read_text())
        # Live by the time READY=1 is sent: no polling.
        assert fstype(mnt) == "fuse.unionfuse"
        assert (mnt / "a").read_text() == "from l1\n"
        check_merged_rw(mnt, layers)
        assert p.poll() is None
        time.sleep(0.2)  # see test_sigterm_right_after_ready for why
        os.kill(p.pid, signal.SIGTERM)
        got = _recv_until(s, "STOPPING=1", 15)
        assert "STOPPING=1" in got, got
        rc = p.wait(15)
    assert rc == 0, (tmp_path / "daemon.log").read_text()
    assert mount_count(mnt) == 0


def test_sigterm_right_after_ready(guard, layers, tmp_path):
    """systemd may stop a service the instant it reports READY=1 (e.g. a stop job queued
    behind the start).  The daemon must still unmount cleanly, not die with the default
    SIGTERM action and leave a dead mount."""
    for i in range(5):
        mnt = guard.mountpoint(tmp_path / f"mnt{i}")
        cfg = _config(tmp_path, layers, mnt)
        sock = tmp_path / f"notify{i}.sock"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(str(sock))
        with s:
            log = open(tmp_path / f"daemon{i}.log", "wb")
            p = guard.popen([UF, "mount", "--foreground", "--config", cfg],
                            env=dict(os.environ, NOTIFY_SOCKET=str(sock)), stdout=log,
                            stderr=log)
            log.close()
            got = _recv_until(s, "READY=1", 20)
            assert "READY=1" in got, got
            os.kill(p.pid, signal.SIGTERM)
            rc = p.wait(15)
        assert (rc, mount_count(mnt)) == (0, 0), (
            f"round {i}: exit {rc}, {mount_count(mnt)} mount(s) left at {mnt}")


# -- dead mounts ---------------------------------------------------------------------------


def test_sigkill_leaves_dead_mount_and_remount_clears_it(guard, layers, tmp_path):
    mnt = guard.mountpoint(tmp_path / "mnt")
    log = open(tmp_path / "daemon.log", "wb")
    p = guard.popen([UF, "mount", "--foreground", "--lower", layers["l1"], "--upper",
                     layers["u"], "--work", layers["w"], mnt], stdout=log, stderr=log)
    log.close()
    wait_live(mnt, "a", p)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(10)
    assert mount_count(mnt) == 1  # the kernel keeps the mount...
    for probe in (os.statvfs, lambda m: os.stat(m / "never-looked-up"),
                  lambda m: open(m / "b").read()):
        with pytest.raises(OSError) as ei:
            probe(mnt)
        assert ei.value.errno == errno.ENOTCONN  # ...but nobody serves it
    # (what the kernel has cached may still be answered: the root's attributes, its
    # listing, the data of "a" that wait_live read)

    r = run([UF, "mount", "--lower", layers["l1"], "--lower", layers["l2"], "--upper",
             layers["u"], "--work", layers["w"], mnt])
    pid = guard.track_pid_file(mnt)
    assert r.returncode == 0, r.stderr
    assert (mnt / "b").read_text() == "from l2\n"
    assert mount_count(mnt) == 1  # the dead one was detached, not stacked under
    r = run([UF, "umount", mnt])
    assert r.returncode == 0, r.stderr
    assert mount_count(mnt) == 0 and not alive(pid)


def test_remount_over_dead_mount_after_attr_cache_expired(guard, layers, tmp_path):
    """Once the kernel's cached attributes of the dead root expire, even stat() of the
    mount point fails with ENOTCONN: the usual state when systemd restarts a service a
    while after its daemon died.  Mounting again must still work."""
    mnt = guard.mountpoint(tmp_path / "mnt")
    p = guard.popen([UF, "mount", "--foreground", "--timeout", "0.1", "--lower", layers["l1"],
                     mnt], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_live(mnt, "a", p)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(10)
    time.sleep(0.5)
    with pytest.raises(OSError) as ei:
        os.stat(mnt)
    assert ei.value.errno == errno.ENOTCONN
    r = run([UF, "mount", "--lower", layers["l1"], "--lower", layers["l2"], mnt])
    pid = guard.track_pid_file(mnt)
    assert r.returncode == 0, r.stderr
    assert (mnt / "b").read_text() == "from l2\n"
    assert mount_count(mnt) == 1
    r = run([UF, "umount", mnt])
    assert r.returncode == 0, r.stderr
    assert mount_count(mnt) == 0 and not alive(pid)


def test_sigkill_dead_mount_then_mount_8(guard, layers, tmp_path):
    mnt = guard.mountpoint(tmp_path / "mnt")
    p = guard.popen([UF, "mount", "--foreground", "--lower", layers["l1"], mnt],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_live(mnt, "a", p)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(10)
    r = run(["mount", "-t", "fuse.unionfuse", "unionfuse", mnt, "-o", _opts(layers)])
    pid = guard.track_pid_file(mnt)
    assert r.returncode == 0, r.stderr
    assert (mnt / "b").read_text() == "from l2\n"
    assert mount_count(mnt) == 1
    run(["umount", mnt])
    assert mount_count(mnt) == 0 and wait_gone(pid, 10)


def test_umount_of_dead_mount(guard, layers, tmp_path):
    """`unionfuse umount` clears a mount whose daemon was killed."""
    mnt = guard.mountpoint(tmp_path / "mnt")
    p = guard.popen([UF, "mount", "--foreground", "--lower", layers["l1"], mnt],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_live(mnt, "a", p)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(10)
    r = run([UF, "umount", mnt], timeout=30)
    assert r.returncode == 0, r.stderr
    assert mount_count(mnt) == 0

# A handler bug answering EIO (daemon stays up) is tested in test_robustness.py.
