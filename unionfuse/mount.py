"""Daemon lifecycle: options, serving a mount, sd_notify, and spawn/unmount helpers
for the rest of the program (runner, builder, tests)."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from .errors import MountError, NotMountedError, UsageError

log = logging.getLogger("unionfuse.mount")

PID_DIR = os.environ.get("UNIONFUSE_RUN_DIR", "/run/unionfuse")
READY_FD_ENV = "UNIONFUSE_READY_FD"
LOG_FILE_ENV = "UNIONFUSE_LOG_FILE"

# Generic mount flags mount(8)/mount.fuse3 pass along; libfuse understands them.
PASS_FLAGS = {
    "ro", "rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime",
    "nodiratime", "relatime", "strictatime", "sync", "async", "dirsync",
    "allow_other", "default_permissions",
}
# fstab-only words that mean nothing to the daemon.
IGNORED = {"defaults", "auto", "noauto", "nofail", "_netdev", "user", "users", "nouser", "owner"}
# What fuse-overlayfs accepts (containers/storage passes them to a mount_program, and
# kernel-overlay words may come from a storage.conf mountopt) that changes nothing here:
# accepted, with or without a value, and ignored.  volatile/fsync=0: fsync is still done;
# redirect_dir: renamed lower dirs always get a redirect; context=: no SELinux labels.
OVERLAY_IGNORED = {
    "volatile", "fsync", "noacl", "static_nlink", "threaded", "plugins", "redirect_dir",
    "fast_ino", "writeback", "noxattrs", "xattr_permissions", "context", "fscontext",
    "defcontext", "rootcontext", "lazytime", "nolazytime", "diratime", "allow_root",
    "kernel_cache", "max_write", "splice_read", "splice_write", "splice_move", "debug",
    "metacopy", "index", "userxattr", "xino", "nfs_export", "uuid", "default_permissions",
}


# How long the daemon polls for the next request before it sleeps (microseconds; see
# set_spin in fs/_fuseshim.c).  Mount option spin=US; 0 turns it off.
SPIN_US = 100


@dataclass
class MountSpec:
    mountpoint: str
    lowers: list[str]
    upper: str | None = None
    work: str | None = None
    whiteout: str | None = None
    fuse_flags: list[str] = field(default_factory=list)
    timeout: float = 60.0
    spin_us: int = SPIN_US
    passthrough: bool | None = None  # None: where it costs nothing else (_want_passthrough)
    # id mapping (fs/idmap.py): (stored, shown, count) ranges; squash: one shown id
    uidmap: tuple | None = None
    gidmap: tuple | None = None
    squash_uid: int | None = None
    squash_gid: int | None = None

    @property
    def id_mapped(self) -> bool:
        return bool(self.uidmap or self.gidmap) or self.squash_uid is not None \
            or self.squash_gid is not None

    def idmap_options(self) -> list[str]:
        """The -o words that give a daemon this spec's id mapping."""
        from .fs.idmap import format_mapping

        out = [f"uidmapping={format_mapping(self.uidmap)}"] if self.uidmap else []
        out += [f"gidmapping={format_mapping(self.gidmap)}"] if self.gidmap else []
        out += [f"squash_to_uid={self.squash_uid}"] if self.squash_uid is not None else []
        out += [f"squash_to_gid={self.squash_gid}"] if self.squash_gid is not None else []
        return out

    @property
    def read_only(self) -> bool:
        return self.upper is None

    def check(self) -> None:
        if not self.lowers:
            raise UsageError("no lower layer given (--lower DIR or -o lowerdir=DIR[:DIR...])")
        if (self.upper is None) != (self.work is None):
            raise UsageError("upperdir and workdir go together (give both or neither)")
        if self.whiteout not in (None, "overlay", "oci"):
            raise UsageError(f"whiteout must be overlay or oci, not {self.whiteout!r}")
        for d in self.lowers + [x for x in (self.upper, self.work) if x]:
            if not os.path.isdir(d):
                raise UsageError(f"not a directory: {d}")
        clear_dead_mount(self.mountpoint)
        if not os.path.isdir(self.mountpoint):
            raise UsageError(f"mount point is not a directory: {self.mountpoint}")
        if self.upper is not None:
            if os.stat(self.upper).st_dev != os.stat(self.work).st_dev:
                raise UsageError("workdir must be on the same filesystem as upperdir")
            ru, rw = os.path.realpath(self.upper), os.path.realpath(self.work)
            if ru == rw or rw.startswith(ru + "/") or ru.startswith(rw + "/"):
                raise UsageError("upperdir and workdir must be separate, not nested")
            for low in self.lowers:
                rl = os.path.realpath(low)
                if rl == ru or ru.startswith(rl + "/"):
                    raise UsageError(f"upperdir must not be inside a lower layer: {low}")


def undo_idmapped_layers(spec: MountSpec) -> None:
    """containers/storage before 1.45 hands a mount_program with uidmapping= lowers on
    kernel id-mapped mounts of the same mapping (``<layer>/mapped/N/...``), and detaches
    those mounts as soon as the program returns: shifting owners again would show them
    twice shifted, and the paths would be gone.  For an id-mapped spec, each layer on an
    id-mapped mount is replaced by the same directory seen through a plain mount of its
    filesystem (checked: same device and inode)."""
    if not spec.id_mapped:
        return
    try:
        mounts = _mountinfo()
    except OSError:
        return
    if not any(m[3] for m in mounts):
        return
    spec.lowers = [_unmapped(x, mounts) for x in spec.lowers]


def _mountinfo() -> list[tuple[bytes, bytes, bytes, bool]]:
    """(device, root in its filesystem, mount point, id-mapped) per mount."""
    out = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            parts = line.split()
            out.append((parts[2], _unescape_mountinfo(parts[3]), _unescape_mountinfo(parts[4]),
                        b"idmapped" in parts[5].split(b",")))
    return out


def _unmapped(path: str, mounts) -> str:
    real = os.fsencode(os.path.realpath(path))

    def under(p: bytes, top: bytes) -> bytes | None:  # p relative to top, or None
        if top == b"/":
            return p
        if p == top:
            return b"/"
        return p[len(top):] if p.startswith(top + b"/") else None

    best = None
    for m in mounts:  # the last (top-most) of the longest mount points holding real
        rel = under(real, m[2])
        if rel is not None and (best is None or len(m[2]) >= len(best[0][2])):
            best = (m, rel)
    if best is None or not best[0][3]:
        return path
    (dev, root, _, _), rel = best
    in_fs = root.rstrip(b"/") + rel if rel != b"/" else root
    try:
        want = os.stat(real)
    except OSError:
        return path
    for m in mounts:
        if m[0] != dev or m[3]:
            continue
        r = under(in_fs, m[1])
        if r is None:
            continue
        cand = m[2].rstrip(b"/") + r if r != b"/" else m[2]
        try:
            st = os.stat(cand)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
            log.debug("layer %s: on an id-mapped mount, served from %s", path, os.fsdecode(cand))
            return os.fsdecode(cand)
    return path


def split_options(opts: str) -> list[str]:
    """Split a -o string on commas, honouring backslash escapes (\\, and \\:) and
    double quotes (context="...:c1,c2", as containers/storage writes an SELinux label)."""
    out, cur, esc, quoted = [], [], False, False
    for ch in opts:
        if esc:
            cur.append("\\" + ch)
            esc = False
        elif ch == "\\":
            esc = True
        elif ch == '"':
            quoted = not quoted
            cur.append(ch)
        elif ch == "," and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return [o for o in out if o]


def split_lowerdir(value: str) -> list[str]:
    out, cur, esc = [], [], False
    for ch in value:
        if esc:
            cur.append(ch)
            esc = False
        elif ch == "\\":
            esc = True
        elif ch == ":":
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return [x for x in out if x]


def apply_options(spec: MountSpec, opts: list[str], lenient: bool = False) -> None:
    """Apply -o words to *spec*.  An unknown word is a UsageError, or with *lenient*
    (fuse-overlayfs' command line) a warning, as fuse-overlayfs does."""
    for opt in opts:
        key, eq, value = opt.partition("=")
        value = value.replace("\\,", ",") if key != "lowerdir" else value
        if key == "lowerdir":
            spec.lowers = split_lowerdir(value.replace("\\,", ","))
        elif key == "upperdir":
            spec.upper = value
        elif key == "workdir":
            spec.work = value
        elif key == "whiteout":
            spec.whiteout = value
        elif key == "timeout":
            try:
                spec.timeout = float(value)
            except ValueError:
                raise UsageError(f"bad timeout value: {value!r}") from None
        elif key in ("passthrough", "nopassthrough") and not eq:  # (default: auto)
            spec.passthrough = key == "passthrough"
        elif key == "spin":
            try:
                us = int(value)
            except ValueError:
                us = -1
            if not 0 <= us <= 100000:
                raise UsageError(f"bad spin value: {value!r} (microseconds, 0 to 100000)")
            spec.spin_us = us
        elif key in PASS_FLAGS and not eq:
            if key != "rw":
                spec.fuse_flags.append(key)
        elif key in ("uidmapping", "gidmapping"):
            from .fs.idmap import parse_mapping

            try:
                ranges = parse_mapping(value) if value else None
            except ValueError as e:
                raise UsageError(str(e)) from None
            if key == "uidmapping":
                spec.uidmap = ranges
            else:
                spec.gidmap = ranges
        elif key in ("squash_to_uid", "squash_to_gid") and eq:
            try:
                n = int(value)
                if not 0 <= n < 1 << 32:
                    raise ValueError
            except ValueError:
                raise UsageError(f"bad {key} value: {value!r}") from None
            if key == "squash_to_uid":
                spec.squash_uid = n
            else:
                spec.squash_gid = n
        elif key == "squash_to_root" and not eq:
            spec.squash_uid = spec.squash_gid = 0
        elif key in IGNORED or key.startswith("x-") or key in ("fsname", "subtype"):
            continue
        elif key in OVERLAY_IGNORED:
            log.debug("option %s: accepted, no effect here", opt)
        elif lenient:
            log.warning("unknown option ignored: %s", opt)
        else:
            raise UsageError(f"unknown mount option: {opt}")


def read_config(path: str) -> dict[str, str]:
    """KEY=VALUE lines (lowerdir, upperdir, workdir, mountpoint, whiteout, options)."""
    out: dict[str, str] = {}
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise UsageError(f"can't read config {path}: {e.strerror}") from None
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, eq, value = line.partition("=")
        key = key.strip()
        if not eq or key not in ("lowerdir", "upperdir", "workdir", "mountpoint", "whiteout", "options", "timeout"):
            raise UsageError(f"{path}:{n}: expected KEY=VALUE with KEY one of lowerdir, upperdir, "
                             f"workdir, mountpoint, whiteout, options, timeout")
        out[key] = value.strip()
    return out


# -- serving ----------------------------------------------------------------------------


def sd_notify(message: str) -> None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError as e:
        log.warning("sd_notify failed: %s", e)


def pid_file(mountpoint: str) -> str:
    h = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:32]
    return os.path.join(PID_DIR, h + ".pid")


def fuse_options(spec: MountSpec) -> set[str]:
    opts = {"fsname=unionfuse", "subtype=unionfuse", "default_permissions"}
    if os.geteuid() == 0 or _user_allow_other():
        opts.add("allow_other")
    if os.geteuid() == 0:
        opts.update({"suid", "dev"})
    if spec.read_only:
        opts.add("ro")
    for flag in spec.fuse_flags:
        neg = {"nosuid": "suid", "nodev": "dev", "suid": "nosuid", "dev": "nodev"}.get(flag)
        if neg:
            opts.discard(neg)
        opts.add(flag)
    return opts


def _user_allow_other() -> bool:
    try:
        with open("/etc/fuse.conf") as f:
            return any(line.strip() == "user_allow_other" for line in f)
    except OSError:
        return False


# Set to 1 to run without fs/_fuseshim (kernel-cached dir listings and symlinks).
NO_SHIM_ENV = "UNIONFUSE_NO_SHIM"
NO_FASTPATH_ENV = "UNIONFUSE_NO_FASTPATH"  # A/B: keep the shim, answer everything in Python
SHIM_MODULE = "unionfuse.fs._fuseshim"


def _load_fuse_shim(force: bool = False, spec: MountSpec | None = None):
    """Load fs/_fuseshim globally so pyfuse3, imported next, binds to its
    fuse_session_new (see the C source).  None if unavailable, off or too late.
    *force*: load it even if this process is told not to use it (the zygote: each
    daemon it forks decides for itself)."""
    shim = sys.modules.get(SHIM_MODULE)  # in a daemon forked by the zygote: loaded
    if os.environ.get(NO_SHIM_ENV) == "1" and not force:
        if shim is not None:
            shim.configure(0)  # bound already: pass pyfuse3's table through unchanged
        return None
    if shim is None:
        if "pyfuse3" in sys.modules:
            log.debug("pyfuse3 already loaded: kernel caching shim not used")
            return None
        flags = sys.getdlopenflags()
        sys.setdlopenflags(flags | os.RTLD_GLOBAL)
        try:
            from .fs import _fuseshim as shim
        except ImportError as e:
            log.warning("kernel caching shim not available (%s): the daemon runs slower", e)
            return None
        finally:
            sys.setdlopenflags(flags)
    flags = shim.NO_OPENDIR | shim.CACHE_SYMLINKS
    depth = 1  # max_stack_depth announced with passthrough
    if _has_dac_override():
        # Without OPEN the daemon opens files with its own rights, later: only when
        # those rights are not narrower than what the kernel already checked.
        flags |= shim.NO_OPEN
        # (an id-mapped mount shifts every owner it answers: not in C)
        if os.environ.get(NO_FASTPATH_ENV) != "1" and not (spec is not None and spec.id_mapped):
            flags |= shim.FASTPATH  # needs NO_OPEN: it serves the daemon's cached fds
            if spec is not None and spec.passthrough is not False:
                depth = _stack_depth(spec)
                if _want_passthrough(spec, depth):
                    flags |= shim.PASSTHROUGH
    shim.configure(flags, depth)
    return shim


def _want_passthrough(spec: MountSpec, depth: int) -> bool:
    """FUSE passthrough needs CAP_SYS_ADMIN in the initial user namespace (the kernel
    refuses backing files to anyone else, and asking for it would only cost this mount
    its no-OPEN mode).  By default it is also left off when a layer sits on a stacked
    filesystem: this mount would then count as two levels deep, and no overlayfs could
    be mounted over it."""
    if spec.passthrough is False or not _has_cap(21) or not _initial_userns():
        return False
    return spec.passthrough is True or depth == 1


def _initial_userns() -> bool:
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return False


# statfs f_type of filesystems that stack on others (a backing file there is one level
# deeper): overlayfs, FUSE, ecryptfs
_STACKED_FS = {0x794C7630, 0x65735546, 0xF15F}


def _stack_depth(spec: MountSpec) -> int:
    """max_stack_depth to announce for passthrough: 2 if a layer sits on a stacked
    filesystem, else 1 (which still lets an overlayfs be mounted over this mount)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)  # (find_library would run `ldconfig -p`)
    buf = ctypes.create_string_buffer(120)  # struct statfs; f_type is its first long
    for d in [*spec.lowers, *([spec.upper] if spec.upper else [])]:
        if libc.statfs(os.fsencode(d), buf) == 0 and \
                ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF in _STACKED_FS:
            return 2
    return 1


def _has_cap(bit: int) -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << bit))
    except (OSError, ValueError):
        pass
    return False


def _has_dac_override() -> bool:
    return _has_cap(1)  # CAP_DAC_OVERRIDE


# The daemon holds one object per inode the kernel knows (tens of thousands) and
# allocates a few per request: with the default thresholds the collector runs every 700
# allocations and its older generations walk all of them, about half the cost of
# making a node for a readdir entry.  Start-up objects are frozen out of its sight.
GC_THRESHOLDS = (20_000, 50, 100)
GC_ENV = "UNIONFUSE_GC_THRESHOLDS"  # "a,b,c" overrides (for measuring)


def _tune_gc() -> None:
    import gc

    thresholds = GC_THRESHOLDS
    raw = os.environ.get(GC_ENV)
    if raw:
        try:
            thresholds = tuple(int(x) for x in raw.split(","))
        except ValueError:
            log.warning("ignoring %s=%r (want three integers)", GC_ENV, raw)
    gc.freeze()  # no collect() first: that costs ~10 ms of every container's start
    gc.set_threshold(*thresholds)


def serve(spec: MountSpec) -> int:
    """Mount and serve in this process until unmounted or signalled.  Returns 0."""
    shim = _load_fuse_shim(spec=spec)
    import pyfuse3
    import trio

    from .fs import fastwait, layermount
    from .fs.operations import NO_SPAWN, UnionOperations

    spec.check()
    os.umask(0)
    enc = os.fsencode
    # Hold no layer's mount busy (fs/layermount.py): layers through private clones of
    # their mounts, and no cwd anywhere but /.
    spec.mountpoint = os.path.abspath(spec.mountpoint)
    lowers, upper, work = layermount.private_paths(
        [enc(os.path.realpath(x)) for x in spec.lowers],  # (a layer may be a symlink: l/ links)
        enc(os.path.abspath(spec.upper)) if spec.upper else None,
        enc(os.path.abspath(spec.work)) if spec.work else None)
    os.chdir("/")
    try:
        ops = UnionOperations(
            lowers, upper, work,
            whiteout=spec.whiteout,
            timeout=spec.timeout,
            idmap=_idmap(spec),
        )
    except (OSError, ValueError) as e:
        raise MountError(f"can't set up the layers: {e}") from None
    pidf = pid_file(spec.mountpoint)  # before mounting: realpath() would wait on us
    # From the moment the mount is live a SIGTERM must unmount, not kill: hold the
    # signals until trio's receiver is in place.
    stop_signals = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        pyfuse3.init(ops, spec.mountpoint, fuse_options(spec))
    except RuntimeError as e:
        raise MountError(f"mounting {spec.mountpoint} failed: {e}") from None
    try:
        os.makedirs(PID_DIR, mode=0o755, exist_ok=True)
        _drop_stale_pid_files()
        with open(pidf, "w") as f:
            f.write(f"{os.getpid()}\n")
    except OSError as e:
        log.warning("can't write pid file %s: %s", pidf, e)
        pidf = None
    log.info("mounted %s (lowers=%s upper=%s whiteout=%s)", spec.mountpoint, spec.lowers,
             spec.upper, ops.whiteout)

    if shim is not None and not shim.status()["interposed"]:
        log.warning("kernel caching shim loaded but not in use (pyfuse3 bound elsewhere)")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(_watch_signals, pyfuse3, stop_signals)
            _announce_ready()
            # One worker: see UnionOperations._in_thread for how blocking requests are
            # kept from stalling the others.
            ops.worker_nursery = nursery
            if shim is not None and hasattr(shim, "fileops_enable"):
                shim.fileops_enable(ops.fileop)  # FALLOCATE, LSEEK (pyfuse3 has neither)
            if shim is not None and shim.fp_enable(ops.timeout, ops.readdir_plain):
                ops.fastpath = shim
                log.debug("C fast path on")
            if ops.fastpath is not None:
                ops.fastpath.set_spin(spec.spin_us)
            if fastwait.install(pyfuse3, ops.fastpath):
                log.debug("fast wait for requests installed")
            _tune_gc()
            await pyfuse3.main(min_tasks=1, max_tasks=NO_SPAWN)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        sd_notify("STOPPING=1")
        if ops.fastpath is not None:
            log.debug("answered in C: %s", ops.fastpath.fp_stats())
        pyfuse3.close(unmount=True)
        if pidf:
            try:
                os.unlink(pidf)
            except OSError:
                pass
        log.info("unmounted %s", spec.mountpoint)
    return 0


def _idmap(spec: MountSpec):
    if not spec.id_mapped:
        return None
    from .fs.idmap import IdMap

    return IdMap(spec.uidmap, spec.gidmap, spec.squash_uid, spec.squash_gid)


def _drop_stale_pid_files() -> None:
    """Pid files of daemons that were killed (SIGKILL leaves them behind)."""
    for name in os.listdir(PID_DIR):
        path = os.path.join(PID_DIR, name)
        try:
            with open(path) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if not os.path.exists(f"/proc/{pid}"):
            try:
                os.unlink(path)
            except OSError:
                pass


def clear_dead_mount(mountpoint: str) -> None:
    """A daemon that died (e.g. before a systemd restart) leaves a dead FUSE mount whose
    every access fails with ENOTCONN: detach it so we can mount again.  statvfs always
    reaches the daemon (stat may be answered from the kernel's cache)."""
    for _ in range(8):  # stacked dead mounts
        try:
            os.statvfs(mountpoint)
            return
        except OSError as e:
            if e.errno != errno.ENOTCONN:
                return
        log.warning("%s: clearing a dead FUSE mount", mountpoint)
        subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True)


async def _watch_signals(pyfuse3, stop_signals, task_status) -> None:
    import trio

    with trio.open_signal_receiver(*stop_signals) as sigs:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
        task_status.started()
        async for sig in sigs:
            log.info("signal %d: unmounting", sig)
            pyfuse3.terminate()
            return


def _announce_ready() -> None:
    sd_notify("READY=1")
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is not None:
        try:
            os.write(int(fd), b"ready\n")
            os.close(int(fd))
        except (OSError, ValueError):
            pass
        # Detached from the command that started us: its stderr pipe goes away.
        log_file = os.environ.pop(LOG_FILE_ENV, None)
        target = os.open(log_file or os.devnull, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.dup2(target, 2)
        os.dup2(target, 1)
        os.close(target)


def spawn_background(argv: list[str], timeout: float = 30.0, log_file: str | None = None) -> int:
    """Run ``unionfuse mount --foreground ARGV`` as a detached daemon and return its pid
    once the mount is live.  Errors from the daemon come back as one line.  The daemon
    is forked by the zygote when one is up (see zygote.py), else started afresh."""
    from . import zygote

    r, w = os.pipe()
    er, ew = os.pipe()
    env = dict(os.environ, **{READY_FD_ENV: str(w)})
    env.pop("NOTIFY_SOCKET", None)
    if log_file:
        env[LOG_FILE_ENV] = os.path.abspath(log_file)
    proc = None
    try:
        pid = zygote.spawn(argv, env, w, ew)
        if pid is None:
            proc = subprocess.Popen(
                [sys.executable, "-m", "unionfuse", "mount", "--foreground", *argv],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=ew,
                pass_fds=(w,), env=env, start_new_session=True,
            )
            pid = proc.pid
    finally:
        os.close(w)
        os.close(ew)
    deadline = time.monotonic() + timeout
    try:
        import select

        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                raise MountError("the daemon did not come up in time")
            ready, _, _ = select.select([r], [], [], left)
            if ready:
                data = os.read(r, 64)
                if data.startswith(b"ready"):
                    return pid
                # EOF: the daemon exited before it was ready
                rc = proc.wait() if proc is not None else None
                msg = _read_all(er).decode(errors="replace").strip()
                last = msg.splitlines()[-1] if msg else f"daemon exited with status {rc}"
                raise MountError(last.removeprefix("unionfuse: "))
    finally:
        os.close(r)
        os.close(er)


def _read_all(fd: int) -> bytes:
    out = []
    while True:
        b = os.read(fd, 65536)
        if not b:
            return b"".join(out)
        out.append(b)


# -- unmounting -------------------------------------------------------------------------


def _unescape_mountinfo(field: bytes) -> bytes:
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), field)


def mount_entry(mountpoint: str) -> str | None:
    """The fstype of the (top) mount at *mountpoint* (None if nothing is mounted there)."""
    target = os.fsencode(os.path.realpath(mountpoint)) if not _is_dead(mountpoint) else os.fsencode(os.path.abspath(mountpoint))
    found = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            parts = line.split()
            sep = parts.index(b"-")
            if _unescape_mountinfo(parts[4]) == target:
                found = os.fsdecode(parts[sep + 1])
    return found


def _is_dead(path: str) -> bool:
    try:
        os.lstat(path)
        return False
    except OSError as e:
        return e.errno == errno.ENOTCONN


def unmount(mountpoint: str, pid: int | None = None, timeout: float = 30.0, lazy: bool = False) -> None:
    """Unmount a unionfuse mount and wait for its daemon to exit."""
    fstype = mount_entry(mountpoint)
    if fstype is None:
        raise NotMountedError(f"{mountpoint}: not mounted")
    if fstype != "fuse.unionfuse":
        raise NotMountedError(f"{mountpoint}: not a unionfuse mount ({fstype})")
    if pid is None:
        pid = _read_pid(mountpoint)
    cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [mountpoint]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        msg = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "fusermount3 failed"
        raise MountError(msg.removeprefix("fusermount3: "))
    if pid is not None:
        wait_pid(pid, timeout)


def _read_pid(mountpoint: str) -> int | None:
    """The daemon's pid from its pid file, if that process still is this mount's daemon
    (a stale file from a killed daemon may name a reused pid)."""
    path = pid_file(mountpoint)
    try:
        with open(path) as f:
            pid = int(f.read().strip())
        written = os.stat(path).st_mtime
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        started = os.stat(f"/proc/{pid}").st_ctime
    except (OSError, ValueError):
        return None
    # the daemon writes the file after it starts: a process younger than the file is
    # some other process that got the pid of a daemon that died
    if b"unionfuse" not in cmdline or started > written + 1:
        return None
    return pid


def wait_pid(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            wpid, _ = os.waitpid(pid, os.WNOHANG)
            if wpid == pid:
                return
        except ChildProcessError:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            if _is_zombie(pid):
                return
        if time.monotonic() > deadline:
            raise MountError(f"daemon {pid} did not exit after unmount")
        time.sleep(0.02)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def is_mounted(mountpoint: str) -> bool:
    return mount_entry(mountpoint) is not None


__all__ = [
    "MountSpec", "apply_options", "read_config", "serve", "spawn_background", "unmount",
    "split_options", "is_mounted", "errno",
]


# -- mounting a set of layers (what the runner and builder use) --------------------------

DRIVERS = ("fuse", "overlay")


def mount_layers(driver: str, lowers: list[str], upper: str | None, work: str | None,
                 mountpoint: str, log_file: str | None = None, debug: bool = False) -> int | None:
    """Mount *lowers* (top-most first) + upper at *mountpoint* with the given driver.
    Returns the unionfuse daemon's pid (None for the kernel overlay driver)."""
    if driver == "fuse":
        spec = MountSpec(mountpoint=mountpoint, lowers=list(lowers), upper=upper, work=work)
        spec.check()
        argv = [f"--lower={x}" for x in lowers]
        if upper is not None:
            argv += [f"--upper={upper}", f"--work={work}"]
        if debug:
            argv.append("--debug")
        return spawn_background(argv + [mountpoint], log_file=log_file)
    if driver == "overlay":
        opts = "lowerdir=" + ":".join(_escape_overlay(x) for x in lowers)
        if upper is not None:
            opts += f",upperdir={_escape_overlay(upper)},workdir={_escape_overlay(work)}"
            opts += ",redirect_dir=on"
        if len(lowers) == 1 and upper is None:
            # overlayfs needs two lowers for a read-only mount: a bind of one layer is it
            res = subprocess.run(["mount", "--bind", "-o", "ro", lowers[0], mountpoint],
                                 capture_output=True, text=True)
        else:
            res = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, mountpoint],
                                 capture_output=True, text=True)
        if res.returncode != 0:
            raise MountError(f"overlay mount failed: {res.stderr.strip() or res.returncode}")
        return None
    raise UsageError(f"unknown storage driver {driver!r} (use fuse or overlay)")


def _escape_overlay(path: str) -> str:
    return path.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def unmount_layers(mountpoint: str, pid: int | None = None, timeout: float = 30.0) -> None:
    """Undo mount_layers, even for a dead daemon (lazy).  Never fails on 'not mounted'."""
    fstype = mount_entry(mountpoint)
    if fstype is not None:
        if fstype.startswith("fuse"):
            res = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True)
            if res.returncode != 0:
                subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True)
        else:
            res = subprocess.run(["umount", mountpoint], capture_output=True)
            if res.returncode != 0:
                subprocess.run(["umount", "-l", mountpoint], capture_output=True)
    if pid is not None:
        try:
            wait_pid(pid, timeout)
        except MountError:
            if is_daemon_for(pid, mountpoint):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def is_daemon_for(pid: int, mountpoint: str) -> bool:
    """Is *pid* (still) the unionfuse daemon serving *mountpoint*? (pids get reused)"""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return b"unionfuse" in b" ".join(argv) and os.fsencode(os.path.abspath(mountpoint)) in argv
