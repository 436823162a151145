"""Helpers for the container runner tests (tests/test_runner.py): a temp store driven
through the real CLI, a scripted pseudo-terminal, and leak checks / cleanup that never
touch anything the tests did not start (processes are only killed by PID after their
command line proves they belong to one of our containers)."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CRUN_WRAP = 'umount /sys/fs/cgroup/unified 2>/dev/null; exec crun "$@"'


# -- mounts and processes --------------------------------------------------------------------


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def mount_points() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {_unescape(line.split()[4]) for line in f}


def is_mounted(path: str) -> bool:
    return os.path.abspath(path) in mount_points()


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [os.fsdecode(x) for x in f.read().split(b"\0") if x]
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def daemons_for(rootfs: str) -> list[int]:
    """PIDs of unionfuse daemons whose command line names *rootfs* as an argument."""
    rootfs = os.path.abspath(rootfs)
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        argv = cmdline(int(d))
        if argv and "unionfuse" in " ".join(argv) and "mount" in argv and rootfs in argv and alive(int(d)):
            out.append(int(d))
    return out


def shims_for(root: str, cid: str) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        argv = cmdline(int(d))
        if "_shim" in argv and cid in argv and os.path.abspath(root) in argv and alive(int(d)):
            out.append(int(d))
    return out


def runtime_ids(runtime: str) -> set[str]:
    if runtime == "crun":
        argv = ["unshare", "-m", "sh", "-c", CRUN_WRAP, "crun", "list", "-q"]
    else:
        argv = ["runc", "list", "-q"]
    r = subprocess.run(argv, capture_output=True, text=True)
    return set(r.stdout.split())


def runtime_id(cid: str) -> str:
    return "unionfuse-" + cid[:32]


# -- the store -------------------------------------------------------------------------------


class UF:
    """A temp store driven through `python3 -m unionfuse --root ROOT ...`."""

    def __init__(self, root: Path):
        self.root = str(root)

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "unionfuse", "--root", self.root, *args]

    def __call__(self, *args: str, input: str | None = None, timeout: float = 60,
                 stdin=None) -> subprocess.CompletedProcess:
        kw = {"input": input} if input is not None else {"stdin": stdin if stdin is not None else subprocess.DEVNULL}
        return subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout,
                              cwd=str(REPO), **kw)

    def ok(self, *args: str, **kw) -> str:
        r = self(*args, **kw)
        assert r.returncode == 0, f"{args} -> {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
        return r.stdout

    # container records, read straight from the store
    def cids(self) -> set[str]:
        try:
            return {d for d in os.listdir(os.path.join(self.root, "containers"))
                    if os.path.isfile(os.path.join(self.root, "containers", d, "container.json"))}
        except FileNotFoundError:
            return set()

    def cdir(self, cid: str) -> str:
        return os.path.join(self.root, "containers", cid)

    def rec(self, cid: str) -> dict:
        with open(os.path.join(self.cdir(cid), "container.json")) as f:
            return json.load(f)

    def cid(self, name: str) -> str:
        for c in self.cids():
            try:
                if self.rec(c)["name"] == name:
                    return c
            except (OSError, ValueError):
                pass
        raise KeyError(name)

    def rootfs(self, cid: str) -> str:
        return os.path.join(self.cdir(cid), "rootfs")

    def diff(self, name: str) -> list[str]:
        return self.ok("diff", name).splitlines()

    def ps_rows(self, *flags: str) -> list[list[str]]:
        out = self.ok("ps", *flags).splitlines()
        return [re.split(r"\s{2,}", line.strip()) for line in out[1:] if line.strip()]

    def leftovers(self, cid: str) -> list[str]:
        """What an exited container must not leave behind."""
        bad = []
        rootfs = self.rootfs(cid)
        if is_mounted(rootfs):
            bad.append(f"{rootfs} still mounted")
        for pid in daemons_for(rootfs):
            bad.append(f"unionfuse daemon {pid} still alive for {rootfs}")
        try:
            rt = self.rec(cid)["options"].get("runtime") or "runc"
        except (OSError, ValueError, KeyError):
            rt = "runc"
        if runtime_id(cid) in runtime_ids(rt):
            bad.append(f"{rt} container {runtime_id(cid)} still exists")
        return bad

    def cleanup(self, cid: str) -> None:
        """Undo everything a container may hold: lazy unmount, runtime delete, our shim
        and daemon by PID (proved by their command lines), then its directory."""
        d = self.cdir(cid)
        rootfs = self.rootfs(cid)
        try:
            rec = self.rec(cid)
        except (OSError, ValueError):
            rec = {}
        for rt in ("runc", "crun"):
            if runtime_id(cid) in runtime_ids(rt):
                argv = ["runc"] if rt == "runc" else ["unshare", "-m", "sh", "-c", CRUN_WRAP, "crun"]
                subprocess.run(argv + ["delete", "-f", runtime_id(cid)], capture_output=True)
        if is_mounted(rootfs):
            r = subprocess.run(["fusermount3", "-u", "-z", rootfs], capture_output=True)
            if r.returncode != 0 and is_mounted(rootfs):
                subprocess.run(["umount", "-l", rootfs], capture_output=True)
        # only processes whose command line names this container (our shim / daemon)
        pids = set(shims_for(self.root, cid)) | set(daemons_for(rootfs))
        end = time.monotonic() + 2
        while pids and time.monotonic() < end:  # an unmounted daemon exits by itself
            pids = {p for p in pids if alive(p)}
            time.sleep(0.05)
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # bundle mounts never live on the host, but be thorough about anything below d
        for m in sorted(mount_points(), reverse=True):
            if m.startswith(d + "/"):
                subprocess.run(["umount", "-l", m], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


# -- a scripted terminal ---------------------------------------------------------------------


def busybox_store(base: Path) -> "UF":
    """A store under *base* with Debian's busybox-static imported as `busybox`
    (`.tar` keeps the rootfs tar's path)."""
    tar = base / "busybox.tar"
    subprocess.run(["bash", str(REPO / "scripts" / "busybox-rootfs.sh"), str(tar)], check=True,
                   capture_output=True)
    u = UF(base / "store")
    u.ok("import", str(tar), "busybox")
    u.tar = str(tar)
    return u


class Pty:
    """`unionfuse run -it ...` on a fresh pseudo-terminal (the CLI as session leader with
    the pty as its controlling terminal, window size set before it starts)."""

    def __init__(self, argv: list[str], rows: int = 24, cols: int = 80):
        self.master, slave = os.openpty()
        self.set_size(rows, cols, fd=slave)
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, cwd=str(REPO),
            start_new_session=True, preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        os.close(slave)
        self.buf = b""
        self.seq = 0

    def set_size(self, rows: int, cols: int, fd: int | None = None) -> None:
        fcntl.ioctl(self.master if fd is None else fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def read_until(self, token: bytes, timeout: float = 15) -> bytes:
        end = time.monotonic() + timeout
        while token not in self.buf:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{token!r} not seen; terminal so far:\n{self.buf.decode(errors='replace')}")
            r, _, _ = select.select([self.master], [], [], min(left, 0.2))
            if r:
                try:
                    data = os.read(self.master, 65536)
                except OSError:  # EIO: the other side is gone
                    data = b""
                if not data:
                    raise TimeoutError(f"{token!r} not seen before EOF; terminal:\n{self.buf.decode(errors='replace')}")
                self.buf += data
        i = self.buf.index(token) + len(token)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def send(self, text: str | bytes) -> None:
        os.write(self.master, text.encode() if isinstance(text, str) else text)

    def cmd(self, line: str, timeout: float = 15) -> str:
        """Type *line*, then a marker echo; return what the terminal showed in between
        (the marker's arithmetic means its typed echo never matches the output)."""
        self.seq += 1
        n = 1000 + self.seq
        self.send(line + "\n")
        self.send(f"echo @@$(({n}+1))@@\n")
        out = self.read_until(f"@@{n + 1}@@".encode(), timeout)
        return out.decode(errors="replace").replace("\r", "")

    def wait(self, timeout: float = 20) -> int:
        end = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < end:
            r, _, _ = select.select([self.master], [], [], 0.1)
            if r:
                try:
                    self.buf += os.read(self.master, 65536)
                except OSError:
                    time.sleep(0.05)
        return self.proc.wait(max(0.1, end - time.monotonic()))

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # our own session, started above
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        try:
            os.close(self.master)
        except OSError:
            pass
