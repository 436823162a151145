"""Containers: a thin writable layer over an image's layers, mounted by a unionfuse
daemon (or kernel overlayfs), run by a real OCI runtime (runc or crun).

Each container lives in ROOT/containers/<id>/::

    container.json   the record (name, image, command, options, state, pids, exit code)
    upper/ work/     its writable layer
    rootfs/          mount point of the merged view
    bundle/          OCI runtime bundle (config.json; root.path -> ../rootfs)
    log              stdout+stderr of a detached container

The process that runs the runtime (the CLI for an attached run, a detached "shim"
otherwise) owns the mount: it mounts before the runtime starts and unmounts when the
container exits, so no daemon outlives its container.  Anything a killed shim leaves
behind is cleaned up by ``refresh``/``remove`` (lazy unmount, daemon by PID).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

from .. import mount as mountmod
from ..errors import UnionfuseError, UsageError
from ..store.store import Conflict, Image, NotFound, Store, canonical_json, now_iso, write_atomic
from . import spec as specmod

log = logging.getLogger("unionfuse.runtime")

RUNTIMES = ("runc", "crun")
_CRUN_WRAP = 'umount /sys/fs/cgroup/unified 2>/dev/null; exec crun "$@"'


class RuntimeError_(UnionfuseError):
    pass


class AlreadyRunning(Conflict):
    pass


SHIM_ALREADY_RUNNING = 3


class _RunLock:
    """containers/<id>/lock, held (flock) by the process that runs the container, and
    by its creator from the moment the container exists until a runner takes over (so
    a concurrent prune/rm never removes a container that is about to start)."""

    def __init__(self, c: "Container"):
        self.path = c.path("lock")
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


RUNLOCK_FD_ENV = "UNIONFUSE_RUNLOCK_FD"  # the creator's run lock, handed to the shim


def _take_run_lock(c: "Container") -> _RunLock:
    """The run lock of *c*: the one its creator (or the CLI that started this shim)
    handed over, else a fresh try; AlreadyRunning when someone else holds it."""
    lock = c.__dict__.pop("_runlock", None)
    if lock is not None:
        return lock
    fd = os.environ.pop(RUNLOCK_FD_ENV, None)
    if fd is not None and fd.isdigit():
        lock = _RunLock(c)
        try:
            if os.path.samestat(os.fstat(int(fd)), os.stat(lock.path)):
                os.set_inheritable(int(fd), False)
                lock.fd = int(fd)
                return lock
        except OSError:
            pass
    lock = _RunLock(c)
    if not lock.try_acquire():
        raise AlreadyRunning(f"container {c.short_id} is already running")
    return lock


@dataclass
class RunOptions:
    args: list[str] = field(default_factory=list)
    entrypoint: list[str] | None = None
    env: list[str] = field(default_factory=list)
    workdir: str | None = None
    user: str | None = None
    volumes: list[str] = field(default_factory=list)
    network: str = "none"
    hostname: str | None = None
    tty: bool = False
    interactive: bool = False
    driver: str = "fuse"
    runtime: str | None = None
    auto_remove: bool = False  # run -d --rm: the shim removes the container when it exits


def default_driver(store: Store, *explicit: str | None) -> str:
    """The storage driver: the first one given explicitly (flags), else
    $UNIONFUSE_STORAGE_DRIVER, else the store's config.json "storage-driver", else fuse."""
    for d in explicit:
        if d:
            return d
    env = os.environ.get("UNIONFUSE_STORAGE_DRIVER")
    if env:
        return env
    try:
        with open(os.path.join(store.root, "config.json")) as f:
            return json.load(f).get("storage-driver", "fuse")
    except (OSError, ValueError, AttributeError):
        return "fuse"


def default_runtime() -> str:
    for r in RUNTIMES:
        if shutil.which(r):
            return r
    raise RuntimeError_("no OCI runtime found (install runc or crun)")


def runtime_knows(runtime: str, runtime_id: str) -> bool:
    """May the runtime hold state for *runtime_id*?  (Its state dirs as root: /run/NAME,
    or under $XDG_RUNTIME_DIR where crun looks when that is set; saves a `delete -f`
    round trip, ~10 ms, when there is nothing to delete.)"""
    dirs = ["/run"]
    if os.environ.get("XDG_RUNTIME_DIR"):
        dirs.append(os.environ["XDG_RUNTIME_DIR"])
    return any(os.path.exists(os.path.join(d, runtime, runtime_id)) for d in dirs)


def runtime_delete(runtime: str, runtime_id: str) -> None:
    if runtime_knows(runtime, runtime_id):
        subprocess.run(runtime_argv(runtime, "delete", "-f", runtime_id), capture_output=True)


def runtime_argv(runtime: str, *args: str) -> list[str]:
    """The command line for one runtime call (crun needs the cgroup2 mount hidden on a
    hybrid-cgroup host: a private mount namespace does that without touching the host)."""
    if runtime == "crun":
        return ["unshare", "-m", "sh", "-c", _CRUN_WRAP, "crun", *args]
    return [runtime, *args]


class Container:
    def __init__(self, store: "Containers", rec: dict):
        self.containers = store
        self.rec = rec

    id = property(lambda self: self.rec["id"])
    name = property(lambda self: self.rec["name"])
    state = property(lambda self: self.rec["state"])

    @property
    def dir(self) -> str:
        return os.path.join(self.containers.store.root, "containers", self.id)

    def path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def runtime_id(self) -> str:
        return "unionfuse-" + self.id[:32]

    def save(self) -> None:
        write_atomic(self.path("container.json"), canonical_json(self.rec))

    def reload(self) -> "Container":
        with open(self.path("container.json")) as f:
            self.rec = json.load(f)
        return self

    def image(self) -> Image:
        return self.containers.store.image_by_id(self.rec["image_id"])

    def lower_dirs(self) -> list[str]:
        return self.containers.store.layer_dirs(self.image())


class Containers:
    def __init__(self, store: Store):
        self.store = store
        self.base = os.path.join(store.root, "containers")

    # -- records --------------------------------------------------------------------------

    def all(self) -> list[Container]:
        out = []
        for cid in os.listdir(self.base):
            p = os.path.join(self.base, cid, "container.json")
            try:
                with open(p) as f:
                    out.append(Container(self, json.load(f)))
            except (OSError, ValueError):
                continue
        out.sort(key=lambda c: c.rec["created"], reverse=True)
        return out

    def get(self, ref: str) -> Container:
        cs = self.all()
        for c in cs:
            if c.name == ref or c.id == ref:
                return c
        if len(ref) >= 1 and all(ch in "0123456789abcdef" for ch in ref):
            m = [c for c in cs if c.id.startswith(ref)]
            if len(m) == 1:
                return m[0]
            if len(m) > 1:
                raise Conflict(f"ambiguous container id prefix {ref!r}")
        raise NotFound(f"no such container: {ref}")

    def images_in_use(self) -> set[str]:
        return {c.rec["image_id"] for c in self.all()}

    def layers_in_use(self) -> set[str]:
        used: set[str] = set()
        for c in self.all():
            ids = c.rec.get("diff_ids")
            if ids is None:
                try:
                    ids = c.image().diff_ids
                except NotFound:
                    ids = []
            used.update(ids)
        return used

    def create(self, image: Image, ref: str, name: str | None, opts: RunOptions) -> Container:
        if name is not None:
            _check_name(name)
        cid = secrets.token_hex(32)
        if opts.driver not in mountmod.DRIVERS:
            raise UsageError(f"unknown storage driver {opts.driver!r} (use fuse or overlay)")
        runtime = opts.runtime or default_runtime()
        if runtime not in RUNTIMES:
            raise UsageError(f"unknown runtime {runtime!r} (use runc or crun)")
        for v in opts.volumes:
            specmod.parse_volume(v)  # validate before anything is made
        if opts.network not in ("none", "host"):
            raise UsageError(f"unsupported network mode {opts.network!r} (use none or host)")
        argv = specmod.resolve_command(image.run_config, opts.entrypoint, opts.args)
        # `-e KEY` takes the caller's value now (as docker's client does), or is dropped
        opts.env = [e if "=" in e else f"{e}={os.environ[e]}" for e in opts.env
                    if "=" in e or e in os.environ]
        rec = {
            "id": cid,
            "name": name or _random_name(),
            "image_id": image.id,
            "image": ref,
            "diff_ids": image.diff_ids,  # its layers stay while it exists, even after rmi -f
            "created": now_iso(),
            "argv": argv,
            "options": asdict(opts) | {"runtime": runtime},
            "state": "created",
            "exit_code": None,
            "started_at": None,
            "finished_at": None,
            "shim_pid": None,
            "daemon_pid": None,
        }
        with self.store.lock():
            # (an rmi/prune counts the users of an image under this lock too: the image
            # is either still here, and kept for this container, or gone)
            self.store.check_image(image)
            if any(c.name == rec["name"] for c in self.all()):
                raise Conflict(f'the container name "{rec["name"]}" is already in use')
            d = os.path.join(self.base, cid)
            os.makedirs(d, mode=0o700)
            for sub in ("upper", "work", "rootfs", "bundle"):
                os.mkdir(os.path.join(d, sub), 0o755 if sub != "work" else 0o700)
            c = Container(self, rec)
            lock = _RunLock(c)
            lock.try_acquire()  # new: nobody else can hold it yet
            c._runlock = lock
            c.save()
        return c

    def release(self, c: Container) -> None:
        """Drop the run lock a creator holds (when it does not run the container)."""
        lock = c.__dict__.pop("_runlock", None)
        if lock is not None:
            lock.release()

    def using(self, c: Container):
        """Hold a container's layer still in place for reading (commit, diff, a build
        step's layer): `rm` waits for it.  NotFound if the container went meanwhile."""
        import contextlib

        @contextlib.contextmanager
        def cm():
            fd = self._lock_use(c, fcntl.LOCK_SH)
            try:
                yield c.reload()
            finally:
                os.close(fd)

        return cm()

    @staticmethod
    def _lock_use(c: Container, mode: int) -> int:
        """Take the container's "use" lock (shared: reading its layer; exclusive: rm) and
        return its fd; NotFound if the container is gone, or went while we waited."""
        try:
            fd = os.open(c.path("use"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            raise NotFound(f"no such container: {c.name}") from None
        try:
            fcntl.flock(fd, mode)
            if not os.path.exists(c.path("container.json")):
                raise NotFound(f"no such container: {c.name}")
        except BaseException:
            os.close(fd)
            raise
        return fd

    # -- state ----------------------------------------------------------------------------

    def refresh(self, c: Container) -> Container:
        """Notice a container whose runner (shim or attached CLI) died: mark it exited
        and clean up its mount.  The runner holds the container's lock for as long as it
        lives, so this is immune to pid reuse."""
        if c.state != "running":
            return c
        held = _RunLock(c)
        if not held.try_acquire():
            return c  # a runner is alive
        try:
            c.reload()
            if c.state != "running":
                return c
            self._cleanup_runtime(c)
            c.rec.update(state="exited", exit_code=c.rec.get("exit_code") or 137, finished_at=now_iso(),
                         daemon_pid=None)
            c.save()
        finally:
            held.release()
        return c

    def _cleanup_runtime(self, c: Container) -> None:
        runtime_delete(c.rec["options"]["runtime"], c.runtime_id)
        mountmod.unmount_layers(c.path("rootfs"), c.rec.get("daemon_pid"), timeout=10)

    def remove(self, c: Container, force: bool = False) -> None:
        self.release(c)  # (its creator removing it: e.g. run --rm after a failed start)
        use = self._lock_use(c, fcntl.LOCK_EX)  # a commit/diff reading its layer finishes first
        try:
            c.reload()
            self.refresh(c)
            if c.state == "running":
                if not force:
                    raise Conflict(f"you cannot remove a running container {c.short_id}: stop it first or use -f")
                self.kill(c, "KILL")
                self.wait(c, 10)
            lock = _RunLock(c)
            if not lock.try_acquire():  # a runner is starting it right now
                raise Conflict(f"container {c.short_id} is starting: try again, or stop it first")
            try:
                self._cleanup_runtime(c)
                if mountmod.mount_entry(c.path("rootfs")) is not None:
                    raise UnionfuseError(f"container {c.short_id}: rootfs still mounted")
                trash = os.path.join(self.store.root, "tmp", f"{os.getpid()}-rm-{c.id[:16]}")
                os.rename(c.dir, trash)
            finally:
                lock.release()
        finally:
            os.close(use)
        shutil.rmtree(trash, ignore_errors=True)

    def kill(self, c: Container, sig: str = "KILL") -> None:
        self.refresh(c)
        if c.state != "running":
            raise Conflict(f"container {c.short_id} is not running")
        runtime = c.rec["options"]["runtime"]
        res = subprocess.run(runtime_argv(runtime, "kill", c.runtime_id, sig.removeprefix("SIG")),
                             capture_output=True, text=True)
        if res.returncode != 0 and self.refresh(c).state == "running":
            raise RuntimeError_(f"kill failed: {res.stderr.strip()}")

    def paused(self, c: Container):
        """Freeze a running container's processes for the duration (docker commit does),
        so its layer holds still while it is read."""
        import contextlib

        @contextlib.contextmanager
        def cm():
            self.refresh(c)
            if c.state != "running":
                yield
                return
            runtime = c.rec["options"]["runtime"]
            res = subprocess.run(runtime_argv(runtime, "pause", c.runtime_id), capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError_(f"can't pause container {c.short_id}: {res.stderr.strip()}")
            try:
                yield
            finally:
                subprocess.run(runtime_argv(runtime, "resume", c.runtime_id), capture_output=True)

        return cm()

    def wait(self, c: Container, timeout: float | None = None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            c.reload()
            self.refresh(c)
            if c.state == "exited":
                return c.rec["exit_code"]
            if deadline is not None and time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    def stop(self, c: Container, timeout: float = 10) -> None:
        self.kill(c, "TERM")
        if self.wait(c, timeout) is None:
            self.kill(c, "KILL")
            self.wait(c, 10)

    # -- running --------------------------------------------------------------------------

    def start(self, c: Container, attach: bool, log_debug: bool = False) -> int | None:
        """Run the container's process.  Attached: in this process, returns the exit
        code.  Detached: in a shim; returns once it runs."""
        self.refresh(c)
        if c.state == "running":
            raise Conflict(f"container {c.short_id} is already running")
        if attach:
            return self._run(c, attached=True, debug=log_debug)
        lock = c.__dict__.pop("_runlock", None)
        env = None
        if lock is not None:  # the shim inherits it: no moment with the container unlocked
            env = dict(os.environ, **{RUNLOCK_FD_ENV: str(lock.fd)})
        try:
            shim = subprocess.Popen(
                [sys.executable, "-m", "unionfuse", "--root", self.store.root, "_shim", c.id],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True, env=env, pass_fds=(lock.fd,) if lock is not None else (),
            )
        finally:
            if lock is not None:
                lock.release()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            c.reload()
            if c.state == "running" and c.rec.get("shim_pid") == shim.pid:
                return None
            if shim.poll() is not None:
                if shim.returncode == SHIM_ALREADY_RUNNING:
                    raise AlreadyRunning(f"container {c.short_id} is already running")
                c.reload()
                if c.rec.get("error"):
                    raise RuntimeError_(c.rec["error"])
                return None
            time.sleep(0.02)
        raise RuntimeError_("the container did not start in time")

    def run_shim(self, c: Container) -> int:
        """Body of the detached shim process: stdio goes to the container's log."""
        fd = os.open(c.path("log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        try:
            code = self._run(c, attached=False)
        except AlreadyRunning:
            return SHIM_ALREADY_RUNNING
        except UnionfuseError as e:
            c.reload()
            c.rec["error"] = str(e)
            c.save()
            return 125
        if c.rec["options"].get("auto_remove"):
            self.remove(c, force=True)
        return code

    def _run(self, c: Container, attached: bool, debug: bool = False) -> int:
        lock = _take_run_lock(c)
        try:
            c.reload()
            return self._run_locked(c, attached, debug)
        finally:
            lock.release()

    def _run_locked(self, c: Container, attached: bool, debug: bool) -> int:
        opts = RunOptions(**c.rec["options"])
        image = c.image()
        rootfs = c.path("rootfs")
        lowers = self.store.layer_dirs(image)
        if not lowers:
            lowers = [self._empty_layer()]
        c.rec.update(shim_pid=os.getpid(), error=None)
        daemon_pid = mountmod.mount_layers(opts.driver, lowers, c.path("upper"), c.path("work"), rootfs,
                                           log_file=c.path("daemon.log"), debug=debug)
        c.rec["daemon_pid"] = daemon_pid
        c.save()
        try:
            cfg = image.run_config
            uid, gid, groups, home = specmod.resolve_user(rootfs, opts.user or cfg.get("User") or None)
            env = specmod.merge_env(cfg.get("Env") or [], opts.env)
            cwd = opts.workdir or cfg.get("WorkingDir") or "/"
            if not cwd.startswith("/"):
                cwd = "/" + cwd
            specmod.check_executable(rootfs, c.rec["argv"][0], env, cwd)
            vols = [specmod.parse_volume(v) for v in opts.volumes]
            config = specmod.make_spec(
                rootfs=rootfs, args=c.rec["argv"], env=env, cwd=cwd, uid=uid, gid=gid,
                additional_gids=groups, terminal=opts.tty, hostname=opts.hostname or c.short_id,
                network=opts.network, volumes=vols, home=home,
                console_size=_terminal_size() if attached and opts.tty else None,
            )
            write_atomic(c.path("bundle", "config.json"), json.dumps(config, indent=2).encode())
            runtime_delete(opts.runtime, c.runtime_id)
            argv = runtime_argv(opts.runtime, "run", "-b", c.path("bundle"), c.runtime_id)
            stdin = None if (attached and (opts.interactive or opts.tty)) else subprocess.DEVNULL
            proc = subprocess.Popen(argv, stdin=stdin)
            if not attached:
                # `run -d` / `start` return once the container runs: wait for the runtime
                self._wait_running(c, opts.runtime, proc)
            c.rec.update(state="running", started_at=now_iso(), exit_code=None, finished_at=None)
            c.save()
            code = _wait_forwarding_signals(proc)
        except BaseException:
            self._cleanup_runtime(c)
            c.rec.update(state="exited", finished_at=now_iso(), exit_code=c.rec.get("exit_code") or 125,
                         daemon_pid=None)
            c.save()
            raise
        # unmounted (and the daemon gone) before anyone can see "exited"
        self._cleanup_runtime(c)
        c.rec.update(state="exited", exit_code=code, finished_at=now_iso(), daemon_pid=None)
        c.save()
        return code

    def _wait_running(self, c: Container, runtime: str, proc: subprocess.Popen, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            res = subprocess.run(runtime_argv(runtime, "state", c.runtime_id), capture_output=True, text=True)
            if res.returncode == 0:
                try:
                    if json.loads(res.stdout).get("status") in ("running", "stopped"):
                        return
                except ValueError:
                    pass
            time.sleep(0.01)

    def _empty_layer(self) -> str:
        p = os.path.join(self.store.root, "empty")
        os.makedirs(p, mode=0o755, exist_ok=True)
        return p

    def exec(self, c: Container, args: list[str], tty: bool, interactive: bool, env: list[str],
             user: str | None, workdir: str | None) -> int:
        self.refresh(c)
        if c.state != "running":
            raise Conflict(f"container {c.short_id} is not running")
        opts = c.rec["options"]
        rt = ["exec"]
        if tty:
            rt.append("--tty")
        image = c.image()
        cfg = image.run_config
        uid, gid, groups, home = specmod.resolve_user(c.path("rootfs"), user or opts.get("user") or cfg.get("User") or None)
        rt += ["--user", f"{uid}:{gid}"]
        for g in groups:
            rt += ["--additional-gids", str(g)]
        merged = specmod.merge_env(specmod.merge_env(cfg.get("Env") or [], opts.get("env") or []), env)
        for e in merged:
            rt += ["--env", e]
        rt += ["--cwd", workdir or opts.get("workdir") or cfg.get("WorkingDir") or "/"]
        rt += [c.runtime_id, *args]
        stdin = None if (interactive or tty) else subprocess.DEVNULL
        return _run_forwarding_signals(runtime_argv(opts["runtime"], *rt), stdin)


def _terminal_size() -> tuple[int, int] | None:
    """(rows, columns) of the terminal we run on: stdin's, else stdout's or stderr's."""
    for fd in (0, 1, 2):
        try:
            size = os.get_terminal_size(fd)
        except OSError:
            continue
        if size.lines and size.columns:
            return size.lines, size.columns
    return None


def _run_forwarding_signals(argv: list[str], stdin) -> int:
    return _wait_forwarding_signals(subprocess.Popen(argv, stdin=stdin))


def _wait_forwarding_signals(proc: subprocess.Popen) -> int:
    """Wait for the runtime in the foreground; SIGINT/SIGTERM/SIGHUP reach it (it forwards
    to the container) while we stay alive to clean up afterwards."""
    old = {}

    def forward(sig, frame):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        old[s] = signal.signal(s, forward)
    try:
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return rc if rc >= 0 else 128 - rc


def _check_name(name: str) -> None:
    import re

    if not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*", name):
        raise UsageError(f'invalid container name "{name}": only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed')


_ADJ = ["brave", "calm", "eager", "fancy", "gentle", "happy", "jolly", "keen", "lucid", "merry",
        "nifty", "proud", "quirky", "sharp", "tender", "vivid", "witty", "zen"]
_NOUN = ["turing", "hopper", "lovelace", "knuth", "ritchie", "thompson", "torvalds", "liskov",
         "hamilton", "curie", "noether", "shannon", "dijkstra", "wirth", "kay", "backus"]


def _random_name() -> str:
    return f"{secrets.choice(_ADJ)}_{secrets.choice(_NOUN)}_{secrets.token_hex(2)}"
