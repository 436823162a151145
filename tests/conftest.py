"""Shared fixtures: real unionfuse mounts and kernel overlayfs mounts, always unmounted
in teardown (lazily, even when the test failed), and daemons stopped by their own PID."""

from __future__ import annotations

import os
import pickle
import select
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from unionfuse.mount import LOG_FILE_ENV, READY_FD_ENV, mount_entry

REPO = Path(__file__).resolve().parent.parent


def _lazy_unmount(path: str) -> None:
    if mount_entry(path) is None:
        return
    r = subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True)
    if r.returncode != 0 and mount_entry(path) is not None:
        subprocess.run(["umount", "-l", path], capture_output=True)


class Daemon:
    """One `unionfuse mount --foreground` process started by a test."""

    def __init__(self, proc: subprocess.Popen, mountpoint: str, log: Path):
        self.proc = proc
        self.mountpoint = mountpoint
        self.log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        _lazy_unmount(self.mountpoint)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def start_daemon(mountpoint, lowers, upper=None, work=None, extra=(), log: Path | None = None,
                 timeout: float = 20.0, prefix=()) -> Daemon:
    argv = [*prefix, sys.executable, "-m", "unionfuse", "mount", "--foreground"]
    for low in lowers:
        argv += ["--lower", str(low)]
    if upper is not None:
        argv += ["--upper", str(upper), "--work", str(work)]
    argv += list(extra) + [str(mountpoint)]
    log = log or Path(str(mountpoint) + ".log")
    r, w = os.pipe()
    env = dict(os.environ, **{READY_FD_ENV: str(w), LOG_FILE_ENV: str(log)})
    env.pop("NOTIFY_SOCKET", None)
    errf = open(log, "ab")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=errf, stderr=errf,
                            pass_fds=(w,), env=env, cwd=str(REPO))
    errf.close()
    os.close(w)
    d = Daemon(proc, str(mountpoint), log)
    try:
        ready, _, _ = select.select([r], [], [], timeout)
        data = os.read(r, 16) if ready else b""
    finally:
        os.close(r)
    if not data.startswith(b"ready"):
        d.stop()
        raise RuntimeError(f"daemon did not start: {d.log_text()[-2000:]}")
    return d


class Mounts:
    """Factory fixture: every mount made through it is undone in teardown."""

    def __init__(self, base: Path):
        self.base = base
        self.daemons: list[Daemon] = []
        self.kernel: list[str] = []

    def union(self, lowers, upper=None, work=None, mountpoint=None, extra=()) -> Daemon:
        mnt = Path(mountpoint) if mountpoint else self.base / f"mnt{len(self.daemons)}"
        mnt.mkdir(exist_ok=True)
        d = start_daemon(mnt, lowers, upper, work, extra)
        self.daemons.append(d)
        return d

    def overlay(self, lowers, upper=None, work=None, mountpoint=None, opts="redirect_dir=on,index=on") -> str:
        mnt = Path(mountpoint) if mountpoint else self.base / f"ovl{len(self.kernel)}"
        mnt.mkdir(exist_ok=True)
        o = "lowerdir=" + ":".join(str(x) for x in lowers)
        if upper is not None:
            o += f",upperdir={upper},workdir={work}"
        if opts:
            o += "," + opts
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", o, str(mnt)], check=True,
                       capture_output=True)
        self.kernel.append(str(mnt))
        return str(mnt)

    def cleanup(self) -> None:
        for d in self.daemons:
            d.stop()
        for m in self.kernel:
            if mount_entry(m) is not None:
                subprocess.run(["umount", "-l", m], capture_output=True)


@pytest.fixture
def mounts(tmp_path, request):
    m = Mounts(tmp_path)
    yield m
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for d in m.daemons:
            sys.stderr.write(f"--- daemon log {d.log} ---\n{d.log_text()[-4000:]}\n")
    m.cleanup()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def dirs(tmp_path):
    """A standard set of empty dirs: l1 l2 l3 (lowers), upper, work."""
    out = {}
    for n in ("l1", "l2", "l3", "upper", "work"):
        p = tmp_path / n
        p.mkdir()
        out[n] = p
    return out


def run_as(uid: int, gid: int, fn, *args, groups=()):
    """Run fn(*args) in a forked child with the given ids; return its result or raise
    the OSError it raised (with the same errno)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            res = ("ok", fn(*args))
        except OSError as e:
            res = ("oserror", (e.errno, str(e)))
        except BaseException:
            res = ("exc", traceback.format_exc())
        try:
            data = pickle.dumps(res)
        except Exception:
            data = pickle.dumps(("exc", "unpicklable result"))
        os.write(w, data)
        os._exit(0)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    os.waitpid(pid, 0)
    kind, val = pickle.loads(b"".join(chunks))
    if kind == "ok":
        return val
    if kind == "oserror":
        raise OSError(val[0], val[1])
    raise RuntimeError(val)


def allow_traverse(path) -> None:
    """Let other users reach *path*: pytest's temp dirs are 0700."""
    p = os.path.dirname(os.path.abspath(str(path)))
    while p not in ("/", ""):
        st = os.stat(p)
        if not st.st_mode & 0o001:
            os.chmod(p, (st.st_mode & 0o7777) | 0o011)
        p = os.path.dirname(p)


def tree(root) -> dict:
    """A comparable snapshot of a visible tree: path -> (type, mode, uid, gid, size,
    content/target/rdev, sorted xattrs)."""
    root = str(root)
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            import stat as S

            if S.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    extra = f.read()
            elif S.S_ISLNK(st.st_mode):
                extra = os.readlink(p)
            elif S.S_ISDIR(st.st_mode):
                extra = None
            else:
                extra = st.st_rdev
            try:
                xa = sorted((k, os.getxattr(p, k, follow_symlinks=False))
                            for k in os.listxattr(p, follow_symlinks=False))
            except OSError:
                xa = []
            out[rel] = (S.S_IFMT(st.st_mode), S.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                        st.st_size if not S.S_ISDIR(st.st_mode) else None, extra, xa)
    return out


@pytest.fixture(scope="session")
def debian_tar(tmp_path_factory):
    """A Debian bookworm rootfs tar from scripts/debian-rootfs.sh, made once per session
    ($UNIONFUSE_DEBIAN_TAR names a ready one).  Skips when no apt mirror answers."""
    ready = os.environ.get("UNIONFUSE_DEBIAN_TAR")
    if ready and os.path.exists(ready):
        return Path(ready)
    import urllib.request

    script = REPO / "scripts" / "debian-rootfs.sh"
    r = subprocess.run(["bash", str(script), "--print-mirror"], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"no apt mirror configured: {r.stderr.strip()}")
    mirror = r.stdout.strip()
    try:
        with urllib.request.urlopen(f"{mirror}/dists/bookworm/Release", timeout=10) as f:
            f.read(64)
    except OSError as e:
        pytest.skip(f"apt mirror {mirror} not reachable: {e}")
    d = tmp_path_factory.mktemp("debian")
    out = d / "debian.tar"
    r = subprocess.run(["bash", str(script), str(out)], capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, TMPDIR=str(d)))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="session", autouse=True)
def zygote_dir(tmp_path_factory):
    """Mount daemons started by CLIs under test are forked by a zygote (see
    unionfuse/zygote.py): give the run its own socket dir and stop the zygote(s) it
    started, by pid, at the end."""
    from unionfuse import zygote

    d = tmp_path_factory.mktemp("zygote")
    old = os.environ.get(zygote.DIR_ENV)
    os.environ[zygote.DIR_ENV] = str(d)
    yield d
    if old is None:
        os.environ.pop(zygote.DIR_ENV, None)
    else:
        os.environ[zygote.DIR_ENV] = old
    for pidfile in d.glob("zygote-*.pid"):
        try:
            pid = int(pidfile.read_text())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"_zygote" in f.read():
                    os.kill(pid, 15)
        except (OSError, ValueError):
            pass
