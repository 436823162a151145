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
- Only a caller in the same context may use it: same uid (socket mode 0600, SO_PEERCRED),
  capabilities, no_new_privs, namespaces, root, cgroup and rlimits as the zygote; anyone
  else is refused and starts its daemon the plain way.  The client checks the server's
  uid and the socket dir's owner and mode too.
- Once a request is sent the client never falls back (that could start two daemons).
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

from .errors import MountError

log = logging.getLogger("unionfuse.zygote")

NO_ZYGOTE_ENV = "UNIONFUSE_NO_ZYGOTE"
DIR_ENV = "UNIONFUSE_ZYGOTE_DIR"
IDLE_ENV = "UNIONFUSE_ZYGOTE_IDLE"
DEFAULT_DIR = "/run/unionfuse"
MAX_MSG = 1 << 20
IMPORT_TIME_ENV = ("UNIONFUSE_RUN_DIR",)


def _dir() -> str:
    return os.environ.get(DIR_ENV) or DEFAULT_DIR


def fingerprint() -> str:
    """Interpreter + where the code is + when any of it last changed."""
    pkg = os.path.dirname(os.path.abspath(__file__))
    # + settings modules read at import time (the zygote imports them once)
    env = "\0".join(os.environ.get(k, "") for k in IMPORT_TIME_ENV)
    h = hashlib.sha256(f"{sys.executable}\0{pkg}\0{os.geteuid()}\0{env}".encode())
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
    try:
        st = os.stat(d)
    except FileNotFoundError:
        return os.geteuid() == 0
    except OSError:
        return False
    # a dir others can write to would let them pose as the zygote
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022 and os.access(d, os.W_OK)


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
        if _peer_uid(s) != os.geteuid():
            log.warning("%s is not served by our uid: not used", path)
            return None
        msg = json.dumps({"argv": argv, "env": env, "cwd": os.getcwd()}).encode()
        socket.send_fds(s, [msg], [ready_fd, stderr_fd])
    except OSError as e:
        log.debug("zygote at %s: %s", path, e)
        s.close()
        return None
    # Sent: the zygote may fork at any moment now, so there is no going back (a
    # daemon started here as well could stack a second mount).
    try:
        s.settimeout(30)
        reply = s.recv(64)
    except OSError as e:
        raise MountError(f"the zygote did not answer: {e}") from None
    finally:
        s.close()
    if reply == b"refused":
        return None  # checked before forking anything: start it the plain way
    if not reply.startswith(b"pid "):
        raise MountError("the zygote did not start the daemon")
    return int(reply[4:])


def _peer_uid(s: socket.socket) -> int:
    creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _start(path: str) -> None:
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        # the zygote must import the very code the client runs (and fingerprinted)
        top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = top + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        subprocess.Popen(
            [sys.executable, "-P", "-m", "unionfuse", "_zygote", path, " " * ARGV_PAD],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True, cwd="/", env=env,
        )
    except OSError as e:
        log.debug("can't start a zygote: %s", e)


# -- the zygote --------------------------------------------------------------------------


def serve(path: str) -> int:
    from . import mount

    os.chdir("/")  # hold no filesystem busy
    if os.path.basename(path) != f"zygote-{fingerprint()}.sock":
        return 0  # not the code the client fingerprinted: serve nothing
    # everything a daemon imports, in the order serve() needs (the shim before pyfuse3;
    # each daemon then turns it on or off for itself)
    mount._load_fuse_shim(force=True)
    import pyfuse3  # noqa: F401
    import trio  # noqa: F401

    from .fs import operations  # noqa: F401

    # what every child inherits: collected once here, then out of the collector's sight
    # (and its pages stay shared with the children); see mount._tune_gc
    import gc

    gc.collect()
    gc.freeze()
    try:
        idle = float(os.environ.get(IDLE_ENV, "600"))
    except ValueError:
        idle = 600.0
    sock = _bind(path)
    if sock is None:
        return 0  # another zygote has it
    st = os.stat(path)
    pidfile = path[: -len(".sock")] + ".pid"
    fd = os.open(pidfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()}\n")
    me = _context(os.getpid())
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
                conn.settimeout(5)
                _handle(sock, conn, me)
            except Exception:  # never let one bad request end the zygote
                log.exception("zygote request")
            finally:
                conn.close()
    finally:
        try:
            if os.stat(path).st_ino == st.st_ino:
                os.unlink(path)
            with open(pidfile) as f:
                if f.read().strip() == str(os.getpid()):
                    os.unlink(pidfile)
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


def _context(pid: int) -> tuple | None:
    """What a process runs with that a daemon forked here would take from the zygote
    instead: privileges, namespaces, root, cgroup, limits."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = tuple(line for line in f
                           if line.startswith(("Uid:", "Gid:", "Groups:", "Cap", "NoNewPrivs:", "Seccomp:")))
        ns = tuple(os.readlink(f"/proc/{pid}/ns/{n}") for n in ("mnt", "user", "pid", "net", "ipc", "uts", "cgroup")
                   if os.path.exists(f"/proc/{pid}/ns/{n}"))
        with open(f"/proc/{pid}/cgroup") as f:
            cgroup = f.read()
        with open(f"/proc/{pid}/limits") as f:
            limits = f.read()
        return status, ns, os.readlink(f"/proc/{pid}/root"), cgroup, limits
    except OSError:
        return None


def _handle(sock: socket.socket, conn: socket.socket, me: tuple | None) -> None:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    peer, uid, _gid = struct.unpack("3i", creds)
    msg, fds, _flags, _addr = socket.recv_fds(conn, MAX_MSG, 2)
    try:
        # (the peer waits for our answer: its pid can't be reused meanwhile)
        if uid != os.geteuid() or len(fds) != 2 or me is None or _context(peer) != me:
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
            except BaseException as e:  # cli.main reports its own; anything else, one line
                try:
                    os.write(2, f"unionfuse: starting the daemon: {e}\n".encode())
                except OSError:
                    pass
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
