"""A resident fork server for mount daemons (the "zygote").

Starting a daemon the plain way costs a Python start-up plus importing trio, pyfuse3 and
the filesystem (about 0.2 s), which is most of what `unionfuse run` spends before the
container starts.  The zygote is a small root process that has all of that imported and
does nothing but fork: `spawn_background` asks it over a unix socket to fork a child
that runs `unionfuse mount --foreground ARGS` with the caller's environment, cwd, ready
pipe and stderr.  The child calls setsid() and is from then on an ordinary daemon.

- Started on first use (that first mount still spawns a daemon the plain way), it exits
  after $UNIONFUSE_ZYGOTE_IDLE seconds (default 600) without a request.
- The socket is named after a fingerprint of the interpreter and the installed code, so
  a changed installation gets a fresh zygote and the old one idles out.
- Only its own uid may use it (socket mode 0600 in a root-owned dir, SO_PEERCRED check).
- $UNIONFUSE_NO_ZYGOTE=1 turns it off; $UNIONFUSE_ZYGOTE_DIR moves the socket and pid
  files (the test suite uses its own dir and stops its zygote by pid).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys

log = logging.getLogger("unionfuse.zygote")

NO_ZYGOTE_ENV = "UNIONFUSE_NO_ZYGOTE"
DIR_ENV = "UNIONFUSE_ZYGOTE_DIR"
IDLE_ENV = "UNIONFUSE_ZYGOTE_IDLE"
DEFAULT_DIR = "/run/unionfuse"
MAX_MSG = 1 << 20


def _dir() -> str:
    return os.environ.get(DIR_ENV) or DEFAULT_DIR


def fingerprint() -> str:
    """Interpreter + where the code is + when any of it last changed."""
    pkg = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256(f"{sys.executable}\0{pkg}\0{os.geteuid()}".encode())
    for dirpath, dirnames, filenames in os.walk(pkg):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if name.endswith((".py", ".so")):
                st = os.stat(os.path.join(dirpath, name))
                h.update(f"{name}\0{st.st_mtime_ns}\0{st.st_size}\0".encode())
    return h.hexdigest()[:16]


def socket_path(key: str | None = None) -> str:
    return os.path.join(_dir(), f"zygote-{key or fingerprint()}.sock")


def enabled() -> bool:
    if os.environ.get(NO_ZYGOTE_ENV) == "1":
        return False
    d = _dir()
    return os.access(d, os.W_OK) if os.path.isdir(d) else os.geteuid() == 0


# -- client side -------------------------------------------------------------------------


def spawn(argv: list[str], env: dict[str, str], ready_fd: int, stderr_fd: int) -> int | None:
    """Have the zygote fork ``unionfuse mount --foreground ARGV``; its pid, or None when
    no zygote answers (one is then started for next time)."""
    if not enabled():
        return None
    key = fingerprint()
    path = socket_path(key)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(5)
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            _start(path)
            return None
        msg = json.dumps({"argv": argv, "env": env, "cwd": os.getcwd()}).encode()
        socket.send_fds(s, [msg], [ready_fd, stderr_fd])
        reply = s.recv(64)
    except OSError as e:
        log.debug("zygote at %s: %s", path, e)
        return None
    finally:
        s.close()
    if not reply.startswith(b"pid "):
        log.debug("zygote refused: %r", reply)
        return None
    return int(reply[4:])


def _start(path: str) -> None:
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        subprocess.Popen(
            [sys.executable, "-P", "-m", "unionfuse", "_zygote", path, " " * ARGV_PAD],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True,
        )
    except OSError as e:
        log.debug("can't start a zygote: %s", e)


# -- the zygote --------------------------------------------------------------------------


def serve(path: str) -> int:
    from . import mount

    # everything a daemon imports, in the order serve() needs (the shim before pyfuse3)
    mount._load_fuse_shim()
    import pyfuse3  # noqa: F401
    import trio  # noqa: F401

    from .fs import operations  # noqa: F401

    try:
        idle = float(os.environ.get(IDLE_ENV, "600"))
    except ValueError:
        idle = 600.0
    sock = _bind(path)
    if sock is None:
        return 0  # another zygote has it
    st = os.stat(path)
    pidfile = path[: -len(".sock")] + ".pid"
    with open(pidfile, "w") as f:
        f.write(f"{os.getpid()}\n")
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sock.settimeout(idle)
    try:
        while True:
            try:
                conn, _ = sock.accept()
            except socket.timeout:
                break
            try:
                _handle(sock, conn)
            except Exception:  # never let one bad request end the zygote
                log.exception("zygote request")
            finally:
                conn.close()
    finally:
        for p in (path, pidfile):
            try:
                if p == pidfile or os.stat(p).st_ino == st.st_ino:
                    os.unlink(p)
            except OSError:
                pass
    return 0


def _bind(path: str) -> socket.socket | None:
    for _ in range(2):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(path)
            sock.listen(16)
            return sock
        except OSError:
            sock.close()
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                probe.connect(path)
                return None  # a live one
            except OSError:
                try:
                    os.unlink(path)  # stale
                except OSError:
                    return None
            finally:
                probe.close()
        finally:
            os.umask(old)
    return None


def _handle(sock: socket.socket, conn: socket.socket) -> None:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    msg, fds, _flags, _addr = socket.recv_fds(conn, MAX_MSG, 2)
    try:
        if uid != os.geteuid() or len(fds) != 2:
            conn.send(b"refused")
            return
        req = json.loads(msg)
        pid = os.fork()
        if pid == 0:
            rc = 1
            try:
                sock.close()
                conn.close()
                rc = _child(req, fds[0], fds[1])
            finally:
                os._exit(rc)
        conn.send(b"pid %d" % pid)
    finally:
        for fd in fds:
            os.close(fd)


# The zygote's argv carries this much blank padding: a forked daemon writes its own argv
# over that memory, so ps and /proc/PID/cmdline (mount.is_daemon_for) show what it serves.
ARGV_PAD = 4096


def _set_cmdline(argv: list[str]) -> bool:
    """Overwrite this process's argv area (as setproctitle does) with *argv*; False if
    it does not fit."""
    import ctypes

    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end: fields 48, 49
    data = b"".join(os.fsencode(a) + b"\0" for a in argv)
    if not start or len(data) > end - start:
        return False
    ctypes.memmove(start, data + b"\0" * (end - start - len(data)), end - start)
    return True


def _child(req: dict, ready_fd: int, stderr_fd: int) -> int:
    from . import cli
    from .mount import READY_FD_ENV

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(stderr_fd, 2)
    os.close(null)
    os.close(stderr_fd)
    os.set_inheritable(ready_fd, True)
    os.environ.clear()
    os.environ.update(req["env"])
    os.environ[READY_FD_ENV] = str(ready_fd)
    os.chdir(req["cwd"])
    argv = ["mount", "--foreground", *req["argv"]]
    if not _set_cmdline([sys.executable, "-m", "unionfuse", *argv]):
        # without our argv in /proc the daemon could not be recognised: start it afresh
        os.execv(sys.executable, [sys.executable, "-m", "unionfuse", *argv])
    return cli.main(argv)
