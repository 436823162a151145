"""Command line.  The only module that prints for the user or exits."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import mount as mountmod
from .errors import UnionfuseError, UsageError

SUBCOMMANDS = (
    "mount", "umount", "unmount", "import", "images", "tag", "rmi", "inspect", "history", "prune",
    "run", "ps", "start", "stop", "kill", "rm", "logs", "exec", "diff", "commit", "_shim",
    "save", "load", "pull", "push", "build", "_zygote", "snapshotter",
)

log = logging.getLogger("unionfuse")


def _setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="unionfuse[%(process)d] %(levelname)s %(name)s: %(message)s",
        force=True,  # again in a daemon forked by the zygote
    )


def build_parser(with_commands: bool = True, only: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unionfuse",
        allow_abbrev=False,  # `--ro` is not `--root` (and _command_word must see options whole)
        description="A union filesystem (FUSE) with overlayfs semantics.",
        epilog="mount(8) helper form: unionfuse SOURCE MOUNTPOINT -o OPTIONS "
        "(what `mount -t fuse.unionfuse` runs).  fuse-overlayfs form: unionfuse [-f] [-d] "
        "-o lowerdir=L1:L2,upperdir=U,workdir=W[,...] MOUNTPOINT (what containers/storage "
        "runs as its mount_program).",
    )
    p.add_argument("--debug", action="store_true", help="log every step to stderr")
    p.add_argument("--root", metavar="DIR",
                   help="store root (default $UNIONFUSE_ROOT or /var/lib/unionfuse)")
    p.add_argument("--storage-driver", choices=("fuse", "overlay"),
                   help="how container rootfs are mounted (default: the store's, else fuse)")
    p.add_argument("--runtime", choices=("runc", "crun"), help="OCI runtime (default: runc if installed)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    m = sub.add_parser(
        "mount",
        help="mount a merged view of layers",
        description="Mount lower layers (read-only, first --lower is the top-most) and an "
        "optional writable upper dir at MOUNTPOINT. Without --upper/--work the mount is "
        "read-only. Returns once the mount is live, leaving the daemon in the background, "
        "unless --foreground.",
    )
    m.add_argument("--lower", action="append", default=[], metavar="DIR",
                   help="a read-only layer; repeat, top-most first")
    m.add_argument("--upper", metavar="DIR", help="writable layer that receives changes")
    m.add_argument("--work", metavar="DIR", help="scratch dir on the upper's filesystem")
    m.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS",
                   help="overlay-style options: lowerdir=L1:L2,upperdir=U,workdir=W,"
                   "whiteout=overlay|oci,timeout=SECONDS,spin=MICROSECONDS (poll before sleeping, "
                   "default 100, 0 off), nopassthrough, and mount flags (ro, nosuid, ...)")
    m.add_argument("--whiteout", choices=("overlay", "oci"),
                   help="whiteout form to write (default: overlay if mknod works, else oci)")
    m.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="kernel attribute/entry cache timeout (default 60)")
    m.add_argument("--config", metavar="FILE",
                   help="read KEY=VALUE settings (lowerdir, upperdir, workdir, mountpoint, "
                   "whiteout, options, timeout) from FILE")
    m.add_argument("-f", "--foreground", action="store_true", help="stay attached")
    m.add_argument("--log", metavar="FILE", help="daemon log file when in the background")
    m.add_argument("--debug", action="store_true", dest="sub_debug", help=argparse.SUPPRESS)
    m.add_argument("mountpoint", nargs="?", metavar="MOUNTPOINT")

    u = sub.add_parser("umount", aliases=["unmount"], help="unmount and wait for the daemon",
                       description="Unmount a unionfuse mount and wait for its daemon to exit.")
    u.add_argument("-l", "--lazy", action="store_true", help="detach even if busy")
    u.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the daemon")
    u.add_argument("mountpoint", metavar="MOUNTPOINT")

    if with_commands and only in (None, "snapshotter"):
        _add_snapshotter_parser(sub)
    if with_commands:
        from . import commands

        commands.add_parsers(sub if only is None else _OnlySub(sub, only))
    return p


def _add_snapshotter_parser(sub) -> None:
    s = sub.add_parser(
        "snapshotter", help="serve containerd's snapshots API (a proxy plugin)",
        description="Serve containerd's snapshots gRPC API on a unix socket, for a "
        "[proxy_plugins.NAME] entry of type \"snapshot\" in containerd's config.toml. Each "
        "active snapshot is a unionfuse mount of its parent chain; its mounts outlive this "
        "process and are found again (or re-made) when it restarts. Stop with SIGTERM.")
    s.add_argument("--address", default="/run/unionfuse/snapshotter.sock", metavar="SOCK",
                   help="unix socket to listen on (default /run/unionfuse/snapshotter.sock)")
    s.add_argument("--root", dest="snapshotter_root", default="/var/lib/unionfuse/snapshotter",
                   metavar="DIR", help="state dir: metadata and snapshot layers "
                   "(default /var/lib/unionfuse/snapshotter)")
    s.add_argument("--debug", action="store_true", dest="sub_debug", help=argparse.SUPPRESS)


class _Absorb:
    """Stands in for the parsers of commands not being run: takes any call, does nothing."""

    def __getattr__(self, name):
        return lambda *a, **kw: self


class _OnlySub:
    """Adds only the parser of the command being run (all ~25 cost ~15 ms per start)."""

    def __init__(self, sub, only: str):
        self.sub, self.only = sub, only

    def add_parser(self, name, **kw):
        if name == self.only or self.only in kw.get("aliases", ()):
            return self.sub.add_parser(name, **kw)
        return _Absorb()


GLOBAL_VALUE_OPTS = ("--root", "--storage-driver", "--runtime")


def _command_word(argv: list[str]) -> str | None:
    """The subcommand in *argv* (after the global options), if it is one we know."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in GLOBAL_VALUE_OPTS:
            i += 2
            continue
        if a in ("-h", "--help"):
            return None  # the general help lists every command
        if a.startswith("-"):
            i += 1
            continue
        return a if a in SUBCOMMANDS else None
    return None


def _spec_from_args(a: argparse.Namespace) -> mountmod.MountSpec:
    spec = mountmod.MountSpec(mountpoint=a.mountpoint or "", lowers=list(a.lower))
    if a.config:
        cfg = mountmod.read_config(a.config)
        if cfg.get("options"):
            mountmod.apply_options(spec, mountmod.split_options(cfg["options"]))
        keys = [f"{k}={cfg[k]}" for k in ("lowerdir", "upperdir", "workdir", "whiteout", "timeout") if k in cfg]
        mountmod.apply_options(spec, keys)
        if not spec.mountpoint:
            spec.mountpoint = cfg.get("mountpoint", "")
    for o in a.options:
        mountmod.apply_options(spec, mountmod.split_options(o))
    if a.lower:
        spec.lowers = list(a.lower)
    if a.upper:
        spec.upper = a.upper
    if a.work:
        spec.work = a.work
    if a.whiteout:
        spec.whiteout = a.whiteout
    if a.timeout is not None:
        spec.timeout = a.timeout
    if not spec.mountpoint:
        raise UsageError("no mount point given")
    return spec


def _spec_argv(spec: mountmod.MountSpec, debug: bool) -> list[str]:
    argv = []
    for low in spec.lowers:
        argv += ["--lower", os.path.realpath(low)]  # (containers/storage passes l/ links)
    if spec.upper:
        argv += ["--upper", os.path.abspath(spec.upper), "--work", os.path.abspath(spec.work)]
    if spec.whiteout:
        argv += ["--whiteout", spec.whiteout]
    argv += ["--timeout", str(spec.timeout)]
    opts = list(spec.fuse_flags)
    if spec.spin_us != mountmod.SPIN_US:
        opts.append(f"spin={spec.spin_us}")
    if spec.passthrough is not None:
        opts.append("passthrough" if spec.passthrough else "nopassthrough")
    opts += spec.idmap_options()
    if opts:
        argv += ["-o", ",".join(opts)]
    if debug:
        argv.append("--debug")
    argv.append(os.path.abspath(spec.mountpoint))
    return argv


def cmd_mount(a: argparse.Namespace, debug: bool) -> int:
    spec = _spec_from_args(a)
    spec.check()
    if a.foreground:
        return mountmod.serve(spec)
    mountmod.spawn_background(_spec_argv(spec, debug), log_file=a.log)
    return 0


def cmd_umount(a: argparse.Namespace) -> int:
    mountmod.unmount(a.mountpoint, timeout=a.timeout, lazy=a.lazy)
    return 0


class _HelperParser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage text (the caller shows stderr whole)
        raise UsageError(message)


def helper_main(argv: list[str]) -> int:
    """``unionfuse SOURCE MOUNTPOINT -o OPTS`` as run by mount.fuse3, and fuse-overlayfs'
    ``unionfuse [-f] [-d] -o OPTS MOUNTPOINT`` as containers/storage runs its
    mount_program (there, unknown options are a warning, as in fuse-overlayfs)."""
    hp = _HelperParser(prog="unionfuse", add_help=False)
    hp.add_argument("words", nargs="+", metavar="[SOURCE] MOUNTPOINT")
    hp.add_argument("-o", dest="options", action="append", default=[])
    hp.add_argument("-f", dest="foreground", action="store_true")
    hp.add_argument("-d", "--debug", dest="debug", action="store_true")  # (implies -f, as libfuse)
    hp.add_argument("-s", dest="single", action="store_true")  # libfuse's: we are single-threaded
    hp.add_argument("-n", dest="nomtab", action="store_true")  # accepted, like mount.fuse
    hp.add_argument("-v", dest="verbose", action="store_true")
    a = hp.parse_intermixed_args(argv)
    if len(a.words) > 2:
        raise UsageError(f"unexpected argument: {a.words[2]}")
    overlay_form = len(a.words) == 1
    if a.debug:
        _setup_logging(True)
    spec = mountmod.MountSpec(mountpoint=a.words[-1], lowers=[])
    for o in a.options:
        mountmod.apply_options(spec, mountmod.split_options(o), lenient=overlay_form)
    mountmod.undo_idmapped_layers(spec)
    spec.check()
    if a.foreground or a.debug:
        return mountmod.serve(spec)
    mountmod.spawn_background(_spec_argv(spec, False))
    return 0


def _helper_form(argv: list[str]) -> bool:
    """mount.fuse3's ``SOURCE MOUNTPOINT -o ...`` (the SOURCE word is free-form; fstab
    examples use "unionfuse") or fuse-overlayfs' ``[-f] [-d] -o OPTS MOUNTPOINT``."""
    if not argv:
        return False
    if argv[0] in ("-f", "-d", "-s") or (argv[0].startswith("-o") and argv[0] != "--"):
        return True
    return len(argv) >= 2 and not argv[0].startswith("-") and argv[0] not in SUBCOMMANDS


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if _helper_form(argv):
            _setup_logging(False)
            return helper_main(argv)
        if argv[:1] == ["_zygote"] and len(argv) in (2, 3):  # PATH [PADDING]
            from . import zygote

            _setup_logging(False)
            return zygote.serve(argv[1])
        # mount/umount (every daemon start) skip the image/container commands' imports
        mount_only = bool(argv) and argv[0] in ("mount", "umount", "unmount")
        parser = build_parser(with_commands=not mount_only, only=_command_word(argv))
        a = parser.parse_args(argv)
        debug = a.debug or getattr(a, "sub_debug", False)
        _setup_logging(debug)
        if a.command == "mount":
            return cmd_mount(a, debug)
        if a.command in ("umount", "unmount"):
            return cmd_umount(a)
        if a.command == "snapshotter":
            from .snapshotter import service  # grpc: imported by this command only

            return service.main(a.address, a.snapshotter_root, debug)
        if a.command:
            from . import commands

            return commands.dispatch(a)
        parser.print_help(sys.stderr)
        return 2
    except UnionfuseError as e:
        print(f"unionfuse: {e.message}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:
        return 141
    except (OSError, ValueError) as e:
        # not one of ours: still one line (--debug shows where it came from)
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            log.exception("unexpected error")
        msg = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.filename else str(e)
        print(f"unionfuse: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def entry() -> None:
    """The console script and ``python -m unionfuse``: main(), then a quick exit."""
    exit_quickly(main())


def exit_quickly(code: int) -> None:
    """Exit with *code* without the interpreter's teardown of every module (12-17 ms
    here, a tenth of `run --rm IMAGE true`).  What a normal exit does for the user still
    happens: atexit handlers run (logging.shutdown, tempfile finalizers) and stdout and
    stderr are flushed.  With a non-daemon thread still running, exit the normal way
    (it would be joined)."""
    import threading

    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    import atexit

    atexit._run_exitfuncs()
    for f in (sys.stdout, sys.stderr):
        if f is None or f.closed:  # (none at start, or closed by the command: as sys.exit)
            continue
        try:
            f.flush()
        except (OSError, ValueError):
            code = code or 120  # what the interpreter returns when its final flush fails
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
