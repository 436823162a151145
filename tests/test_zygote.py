"""Background mounts are forked by the zygote (unionfuse/zygote.py): the daemon it forks
behaves like one started afresh (same argv in /proc, errors as one line, unmount), and
the zygote can be turned off."""

from __future__ import annotations

import os
import time

import pytest

from conftest import REPO, allow_traverse
from test_mount_modes import UF, check_merged_rw, guard, layers, run, wait_gone  # noqa: F401
from unionfuse import zygote


def ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[1])


def cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode() for a in f.read().split(b"\0") if a]


def zygote_pid(timeout: float = 20.0) -> int:
    path = zygote.socket_path()
    pidfile = path[: -len(".sock")] + ".pid"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid = int(open(pidfile).read())
            if os.path.exists(path):
                return pid
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"no zygote at {path}")


def mount_bg(guard, layers, mnt, env=None):  # noqa: F811
    r = run([UF, "mount", "--lower", layers["l1"], "--lower", layers["l2"], "--upper",
             layers["u"], "--work", layers["w"], mnt], env=env)
    pid = guard.track_pid_file(mnt)
    assert r.returncode == 0, r.stderr
    return pid


def test_daemon_forked_by_zygote(guard, layers, tmp_path):  # noqa: F811
    first = guard.mountpoint(tmp_path / "m1")
    mount_bg(guard, layers, first)  # starts a zygote if none is up yet
    zpid = zygote_pid()
    assert "_zygote" in " ".join(cmdline(zpid))
    mnt = guard.mountpoint(tmp_path / "m2")
    pid = mount_bg(guard, layers, mnt)
    assert ppid(pid) == zpid
    argv = cmdline(pid)
    assert argv[1:5] == ["-m", "unionfuse", "mount", "--foreground"] and argv[-1] == str(mnt)
    check_merged_rw(mnt, layers)
    for m in (mnt, first):
        r = run([UF, "umount", m])
        assert r.returncode == 0, r.stderr
    assert wait_gone(pid)
    assert zygote_pid() == zpid  # still there for the next one


def test_daemon_error_through_zygote_is_one_line(guard, layers, tmp_path):  # noqa: F811
    mount_bg(guard, layers, guard.mountpoint(tmp_path / "m1"))
    zygote_pid()
    # the work dir is a file: only the daemon finds out
    (tmp_path / "wfile").write_text("")
    r = run([UF, "mount", "--lower", layers["l1"], "--upper", layers["u"], "--work",
             tmp_path / "wfile", guard.mountpoint(tmp_path / "m2")])
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("unionfuse: "), r.stderr


def test_no_zygote(guard, layers, tmp_path):  # noqa: F811
    env = dict(os.environ, **{zygote.NO_ZYGOTE_ENV: "1"})
    mnt = guard.mountpoint(tmp_path / "m")
    pid = mount_bg(guard, layers, mnt, env=env)
    assert "_zygote" not in " ".join(cmdline(ppid(pid)))
    check_merged_rw(mnt, layers)


def test_caller_in_another_context_is_refused(guard, layers, tmp_path):  # noqa: F811
    """A daemon forked by the zygote would run with the zygote's privileges, namespaces,
    cgroup and limits: a caller that differs (here: no_new_privs) gets its own daemon."""
    mount_bg(guard, layers, guard.mountpoint(tmp_path / "m1"))
    zpid = zygote_pid()
    mnt = guard.mountpoint(tmp_path / "m2")
    r = run(["setpriv", "--no-new-privs", UF, "mount", "--lower", layers["l1"], "--lower",
             layers["l2"], "--upper", layers["u"], "--work", layers["w"], mnt])
    pid = guard.track_pid_file(mnt)
    assert r.returncode == 0, r.stderr
    assert ppid(pid) != zpid
    with open(f"/proc/{pid}/status") as f:
        assert "NoNewPrivs:\t1" in f.read()
    check_merged_rw(mnt, layers)


def test_changed_code_gets_its_own_zygote(tmp_path, monkeypatch):
    a = zygote.fingerprint()
    assert zygote.fingerprint() == a
    monkeypatch.setattr(zygote.sys, "executable", "/nonexistent/python")
    assert zygote.fingerprint() != a


def test_zygote_refuses_other_users(tmp_path):
    """Only the zygote's own uid may ask it to fork (SO_PEERCRED)."""
    import socket
    import subprocess
    import sys

    d = tmp_path / "z"
    d.mkdir()
    path = str(d / f"zygote-{zygote.fingerprint()}.sock")
    p = subprocess.Popen([sys.executable, "-m", "unionfuse", "_zygote", path],
                         env=dict(os.environ, **{zygote.IDLE_ENV: "30"}), cwd=str(REPO))
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.stat(path).st_mode & 0o777 == 0o600
        allow_traverse(path)
        os.chmod(path, 0o666)  # even if someone loosened it
        code = ("import os, socket, sys\n"
                "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
                "s.connect(sys.argv[1])\n"
                "r, w = os.pipe()\n"
                "socket.send_fds(s, [b'{\"argv\": [], \"env\": {}, \"cwd\": \"/\"}'], [w, w])\n"
                "print(s.recv(64).decode())\n")
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            sys.executable, "-c", code, path], capture_output=True, text=True, timeout=30)
        assert r.stdout.strip() == "refused", (r.stdout, r.stderr)
    finally:
        p.terminate()
        p.wait(10)
    assert not os.path.exists(path)
