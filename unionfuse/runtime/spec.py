"""Turn an image config plus `docker run` options into an OCI runtime-spec config.json.

Pure functions (no runtime is called here); each mirrors what Docker does:

- :func:`resolve_command` — Entrypoint/Cmd merging (moby ``daemon/commit.go`` merge rules).
- :func:`resolve_user` — ``USER[:GROUP]`` through the image's /etc/passwd and /etc/group
  (moby/sys/user ``GetExecUser`` rules), reading those files *inside* an untrusted rootfs
  without ever following a symlink out of it.
- :func:`parse_volume` — ``-v HOST:CTR[:ro|rw]`` bind mounts.
- :func:`merge_env` — image Env + ``-e`` overrides (docker CLI ``ValidateEnv`` and moby
  ``ReplaceOrAppendEnvValues``).
- :func:`make_spec` — a complete OCI runtime-spec 1.0.2 config with Docker's defaults
  (capabilities, masked/read-only paths, mounts, namespaces).

Isolation itself is the OCI runtime's job; this module only describes it.
"""

from __future__ import annotations

import errno
import os
import posixpath
import resource
import stat
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from unionfuse.errors import UsageError

OCI_VERSION = "1.0.2"

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# moby oci/caps/defaults.go DefaultCapabilities().
DEFAULT_CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)

# moby oci/defaults.go DefaultLinuxSpec(): /proc/asound is masked by Docker (runc's
# `runc spec` masks it too); /sys/devices/virtual/powercap since Docker 25 (CVE-2020-8694).
MASKED_PATHS = (
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)

READONLY_PATHS = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)

# This host (and many CI hosts) lacks CAP_SYS_RESOURCE with a nofile hard limit of 20000:
# a config asking for more fails with EPERM.  We never ask for more than the caller has.
NOFILE_SOFT = 1024
NOFILE_HARD_CAP = 1 << 20

MIN_ID = 0
MAX_ID = (1 << 31) - 1

# Reading /etc/passwd and /etc/group from an untrusted image.
MAX_SYMLINKS = 40
MAX_READ = 1 << 20

NETWORK_MODES = ("none", "host")


# --------------------------------------------------------------------------- command


def resolve_command(config: Mapping | None, entrypoint: Sequence[str] | None,
                    cmd: Sequence[str] | None) -> list[str]:
    """Final argv = entrypoint + cmd, Docker style.

    ``entrypoint`` is None when ``--entrypoint`` was not given, ``[E]`` for
    ``--entrypoint E`` and ``[]`` (or ``[""]``) for ``--entrypoint ''`` (reset).  Giving an
    entrypoint drops the image Cmd; giving cmd args replaces the image Cmd.
    """
    config = config or {}
    cmd = list(cmd or [])
    if entrypoint is not None:
        ep = list(entrypoint)
        if ep == [""]:
            ep = []
        argv = ep + cmd
    else:
        ep = list(config.get("Entrypoint") or [])
        argv = ep + (cmd if cmd else list(config.get("Cmd") or []))
    if not argv or argv[0] == "":
        raise UsageError("no command specified")
    return argv


# --------------------------------------------------------------------------- env


def merge_env(image_env: Iterable[str] | None, overrides: Iterable[str] | None,
              environ: Mapping[str, str] | None = None) -> list[str]:
    """Image Env merged with ``-e`` overrides: same key replaced in place, new keys
    appended, later wins.  ``-e KEY`` takes KEY's value from ``environ`` (default: this
    process's environment); if KEY is unset there it is dropped — and, like Docker, it
    then also removes KEY from the image's Env."""
    if environ is None:
        environ = os.environ
    resolved: list[str] = []
    for value in overrides or ():
        key, sep, _ = value.partition("=")
        if not key:
            raise UsageError(f"invalid environment variable: {value}")
        if not sep and key in environ:
            value = f"{key}={environ[key]}"
        resolved.append(value)
    return _replace_or_append(list(image_env or ()), resolved)


def _replace_or_append(defaults: list[str], overrides: Iterable[str]) -> list[str]:
    """moby container.ReplaceOrAppendEnvValues: an override without '=' unsets."""
    out: list[str | None] = []
    index: dict[str, int] = {}
    for e in defaults:
        key = e.partition("=")[0]
        if key in index:  # duplicate key in the defaults: keep the first slot, last value
            out[index[key]] = e
            continue
        index[key] = len(out)
        out.append(e)
    for value in overrides:
        key, sep, _ = value.partition("=")
        if not sep:
            if key in index:
                out[index.pop(key)] = None
            continue
        if key in index:
            out[index[key]] = value
        else:
            index[key] = len(out)
            out.append(value)
    return [e for e in out if e is not None]


def _env_has(env: Iterable[str], key: str) -> bool:
    return any(e.partition("=")[0] == key for e in env)


# --------------------------------------------------------------------------- user


def open_in_root(rootfs: str, path: str, max_links: int = MAX_SYMLINKS) -> int | None:
    """Open ``path`` for reading as seen from inside ``rootfs`` (chroot semantics).

    Each component is walked with ``*at`` calls on directory fds: symlinks are read and
    re-resolved by us, absolute targets restart at ``rootfs`` and ``..`` never climbs above
    it, so nothing outside ``rootfs`` is ever opened.  Returns an fd of a regular file, or
    None if the path does not exist / is not a regular file.  Raises UsageError after
    ``max_links`` symlinks (a loop).
    """
    flags_dir = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    stack = [root_fd]  # stack[-1] is the current directory; stack[0] is the root
    parts = deque(path.split("/"))
    links = 0
    try:
        while parts:
            name = parts.popleft()
            if name in ("", "."):
                continue
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                continue
            last = not any(p not in ("", ".") for p in parts)
            try:
                st = os.stat(name, dir_fd=stack[-1], follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                return None
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > max_links:
                    raise UsageError(
                        f"unable to open {path} in the image: too many levels of symbolic links")
                target = os.readlink(name, dir_fd=stack[-1])
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                parts.extendleft(reversed(target.split("/")))
                continue
            if last:
                if not stat.S_ISREG(st.st_mode):
                    return None
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                                 | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=stack[-1])
                except OSError as e:
                    if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                        return None  # swapped under us: treat as absent
                    raise
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    os.close(fd)
                    return None
                return fd
            if not stat.S_ISDIR(st.st_mode):
                return None
            try:
                stack.append(os.open(name, flags_dir, dir_fd=stack[-1]))
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    return None
                raise
        return None  # path named a directory (or the root itself)
    finally:
        for fd in stack:
            os.close(fd)


def read_in_root(rootfs: str, path: str, limit: int = MAX_READ) -> str | None:
    """Text of ``path`` inside ``rootfs`` (see :func:`open_in_root`), at most ``limit``
    bytes, cut back to the last complete line; None if absent."""
    fd = open_in_root(rootfs, path)
    if fd is None:
        return None
    try:
        chunks = []
        left = limit + 1
        while left > 0:
            b = os.read(fd, min(left, 65536))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        data = data[:limit]
        data = data[: data.rfind(b"\n") + 1]
    return data.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class _Passwd:
    name: str
    uid: int
    gid: int
    home: str


@dataclass(frozen=True)
class _Group:
    name: str
    gid: int
    members: tuple[str, ...]


def _parse_id(s: str) -> int | None:
    s = s.strip()
    if not s or not (s.isdigit() or (s[0] in "+-" and s[1:].isdigit())):
        return None
    return int(s)


def _parse_passwd(text: str | None) -> list[_Passwd]:
    out = []
    for line in (text or "").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        f = line.split(":")
        f += [""] * (7 - len(f))
        uid, gid = _parse_id(f[2]), _parse_id(f[3])
        if uid is None or gid is None:
            continue  # malformed: skip (moby would read it as uid 0)
        out.append(_Passwd(f[0], uid, gid, f[5]))
    return out


def _parse_group(text: str | None) -> list[_Group]:
    out = []
    for line in (text or "").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        f = line.split(":")
        f += [""] * (4 - len(f))
        gid = _parse_id(f[2])
        if gid is None:
            continue
        members = tuple(m.strip() for m in f[3].split(",") if m.strip())
        out.append(_Group(f[0], gid, members))
    return out


def _check_range(n: int) -> int:
    if not MIN_ID <= n <= MAX_ID:
        raise UsageError(f"uids and gids must be in range {MIN_ID}-{MAX_ID}")
    return n


def resolve_user(rootfs: str, user: str | None) -> tuple[int, int, list[int], str]:
    """``USER``, ``USER:GROUP``, ``UID``, ``UID:GID`` (any mix) → (uid, gid,
    additional_gids, home), looked up in the rootfs's /etc/passwd and /etc/group like
    Docker (moby/sys/user GetExecUser):

    - a name must exist in passwd; a number need not (then gid 0 and home "/");
    - a group, when given, replaces the passwd gid; a name must exist in group, a number
      need not; supplementary groups (groups listing the user as a member) are only set
      when no group was given;
    - no user (None or "") is uid 0: root's passwd entry if any, else 0:0 with home /root.
    """
    spec = user or ""
    fields = spec.split(":")
    user_arg = fields[0]
    group_arg = fields[1] if len(fields) > 1 else ""
    uid_num = _parse_id(user_arg) if user_arg else None
    gid_num = _parse_id(group_arg) if group_arg else None

    passwd = _parse_passwd(read_in_root(rootfs, "/etc/passwd"))

    uid, gid, home = 0, 0, "/"
    matched_name = ""
    if not user_arg:
        entry = next((p for p in passwd if p.uid == 0), None)
        home = "/root"
    elif uid_num is not None:
        entry = next((p for p in passwd if p.uid == uid_num), None)
        uid = _check_range(uid_num)
    else:
        entry = next((p for p in passwd if p.name == user_arg), None)
        if entry is None:
            raise UsageError(
                f"unable to find user {user_arg}: no matching entries in passwd file")
    if entry is not None:
        matched_name = entry.name
        uid, gid = _check_range(entry.uid), _check_range(entry.gid)
        home = entry.home or "/"

    sgids: list[int] = []
    if group_arg or matched_name:
        groups = _parse_group(read_in_root(rootfs, "/etc/group"))
        if group_arg:
            if gid_num is not None:
                g = next((g for g in groups if g.gid == gid_num), None)
            else:
                g = next((g for g in groups if g.name == group_arg), None)
            if g is not None:
                gid = _check_range(g.gid)
            elif gid_num is not None:
                gid = _check_range(gid_num)
            else:
                raise UsageError(
                    f"unable to find group {group_arg}: no matching entries in group file")
        else:
            for g in groups:
                if matched_name in g.members:
                    sgids.append(_check_range(g.gid))
    return uid, gid, sgids, home


# --------------------------------------------------------------------------- volumes


@dataclass(frozen=True)
class Volume:
    host: str
    container: str
    readonly: bool = False


def parse_volume(spec: str) -> Volume:
    """``-v HOST:CTR[:ro|rw]`` → Volume.  HOST must be an absolute existing path (named
    and anonymous volumes are not supported); CTR must be absolute and not "/"."""
    def bad(why: str = "") -> UsageError:
        return UsageError(f"invalid volume specification: '{spec}'" + (f": {why}" if why else ""))

    parts = spec.split(":")
    if len(parts) == 1:
        if parts[0].startswith("/"):
            raise bad("anonymous volumes are not supported")
        raise bad()
    if len(parts) > 3:
        raise bad()
    host, ctr = parts[0], parts[1]
    mode = parts[2] if len(parts) == 3 else None
    if not host or not ctr or mode == "":
        raise bad()
    readonly = False
    if mode is not None:
        seen = set()
        for m in mode.split(","):
            if m not in ("ro", "rw") or seen & {"ro", "rw"}:
                raise bad(f"invalid mode: {mode}")
            seen.add(m)
        readonly = "ro" in seen
    if not host.startswith("/"):
        raise bad("named volumes are not supported; the host path must be absolute")
    if not ctr.startswith("/"):
        raise bad(f"invalid mount path: '{ctr}' mount path must be absolute")
    ctr = posixpath.normpath(ctr)
    if ctr.startswith("//"):
        ctr = "/" + ctr.lstrip("/")
    if ctr == "/":
        raise bad("destination can't be '/'")
    host = os.path.normpath(host)
    if not os.path.exists(host):
        raise bad(f"bind source path does not exist: {host}")
    return Volume(host, ctr, readonly)


# --------------------------------------------------------------------------- spec


def default_rlimits() -> list[dict]:
    """RLIMIT_NOFILE soft 1024, hard = this process's hard limit (never raised: raising
    needs CAP_SYS_RESOURCE, which root lacks on some hosts)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = NOFILE_HARD_CAP  # lowering from unlimited needs no privilege
    soft = min(NOFILE_SOFT, hard)
    return [{"type": "RLIMIT_NOFILE", "soft": soft, "hard": hard}]


def default_mounts() -> list[dict]:
    """Docker's default mounts (moby oci/defaults.go), plus a read-only cgroup mount."""
    return [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620",
                     "gid=5"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
    ]


def _depth(path: str) -> int:
    return len([p for p in path.split("/") if p])


def make_spec(*, rootfs: str, args: Sequence[str], env: Sequence[str], cwd: str, uid: int,
              gid: int, additional_gids: Sequence[int], terminal: bool, hostname: str,
              network: str = "none", volumes: Sequence[Volume] = (),
              readonly_rootfs: bool = False, home: str | None = None,
              rlimits: Sequence[dict] | None = None,
              console_size: tuple[int, int] | None = None) -> dict:
    """A complete OCI runtime-spec config (dict, ready for json.dump) with Docker's
    defaults.  ``env`` is the merged container env (see :func:`merge_env`); PATH,
    HOSTNAME, TERM (with a terminal) and HOME (``home``, from :func:`resolve_user`) are
    added unless ``env`` sets them.  ``network`` is "none" (own netns, only lo) or "host".
    ``console_size`` (rows, columns): the terminal's starting size (crun sets it from
    here; runc copies the size of the terminal it runs on)."""
    args = list(args)
    if not args or not args[0]:
        raise UsageError("no command specified")
    if network not in NETWORK_MODES:
        raise UsageError(f"unsupported network mode: {network} (use none or host)")
    cwd = cwd or "/"
    if not cwd.startswith("/"):
        raise UsageError(
            f"the working directory '{cwd}' is invalid, it needs to be an absolute path")
    cwd = posixpath.normpath(cwd)
    if cwd.startswith("//"):
        cwd = "/" + cwd.lstrip("/")
    for n in (uid, gid, *additional_gids):
        _check_range(int(n))

    # moby container.CreateDaemonEnvironment: defaults first, container env replaces.
    defaults = [f"PATH={DEFAULT_PATH}", f"HOSTNAME={hostname}"]
    if terminal:
        defaults.append("TERM=xterm")
    full_env = _replace_or_append(defaults, [e for e in env if "=" in e])
    if not _env_has(full_env, "HOME"):
        full_env.append(f"HOME={home or ('/root' if uid == 0 else '/')}")

    # User volumes replace default mounts at the same destination (a /dev volume also
    # replaces /dev/*); then volumes, parents before children.
    vols = list(volumes)
    dests: set[str] = set()
    for v in vols:
        if v.container in dests:
            raise UsageError(f"duplicate mount point: {v.container}")
        dests.add(v.container)
    mounts = [m for m in default_mounts()
              if m["destination"] not in dests
              and not ("/dev" in dests and m["destination"].startswith("/dev/"))]
    for v in sorted(vols, key=lambda v: _depth(v.container)):
        opts = ["rbind", "rprivate"]
        if v.readonly:
            opts.append("ro")
        mounts.append({"destination": v.container, "type": "bind", "source": v.host,
                       "options": opts})

    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if network != "host":
        namespaces.append({"type": "network"})

    caps = list(DEFAULT_CAPABILITIES)
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": bool(terminal),
            **({"consoleSize": {"height": int(console_size[0]), "width": int(console_size[1])}}
               if terminal and console_size else {}),
            "user": {"uid": int(uid), "gid": int(gid),
                     "additionalGids": [int(g) for g in additional_gids]},
            "args": args,
            "env": full_env,
            "cwd": cwd,
            "capabilities": {
                "bounding": list(caps),
                "effective": list(caps),
                "permitted": list(caps),
            },
            "rlimits": [dict(r) for r in (rlimits if rlimits is not None
                                          else default_rlimits())],
            "noNewPrivileges": True,
            "oomScoreAdj": 0,
        },
        "root": {"path": rootfs, "readonly": bool(readonly_rootfs)},
        "hostname": hostname,
        "mounts": mounts,
        "linux": {
            "namespaces": namespaces,
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
            "seccomp": default_seccomp(),
        },
    }


# Syscalls a container without CAP_SYS_ADMIN has no business making; most already fail
# for want of a capability, but a user namespace would hand those capabilities back, so
# (like Docker's default profile) namespaces can't be made and the rest are refused here.
SECCOMP_DENY = (
    "acct", "add_key", "bpf", "clock_adjtime", "clock_settime", "create_module", "delete_module",
    "fanotify_init", "finit_module", "fsconfig", "fsmount", "fsopen", "fspick", "get_kernel_syms",
    "get_mempolicy", "init_module", "io_uring_enter", "io_uring_register", "io_uring_setup", "ioperm",
    "iopl", "kcmp", "kexec_file_load", "kexec_load", "keyctl", "lookup_dcookie", "mbind", "mount",
    "mount_setattr", "move_mount", "move_pages", "name_to_handle_at", "nfsservctl", "open_by_handle_at",
    "open_tree", "perf_event_open", "pivot_root", "process_vm_readv", "process_vm_writev",
    "query_module", "quotactl", "reboot", "request_key", "set_mempolicy", "setns", "settimeofday",
    "swapoff", "swapon", "sysfs", "_sysctl", "syslog", "umount2", "unshare", "uselib", "userfaultfd",
    "ustat", "vm86", "vm86old",
)
CLONE_NS_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000,
                  0x00000080)  # NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME
_SECCOMP_ARCHES = {
    "x86_64": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    "aarch64": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
}


def default_seccomp() -> dict:
    eperm = errno.EPERM
    rules = [{"names": list(SECCOMP_DENY), "action": "SCMP_ACT_ERRNO", "errnoRet": eperm}]
    for flag in CLONE_NS_FLAGS:
        rules.append({"names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": eperm,
                      "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}]})
    # clone3 passes its flags in memory, out of seccomp's sight: ENOSYS makes libc use clone
    rules.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS})
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": _SECCOMP_ARCHES.get(os.uname().machine, []),
        "syscalls": rules,
    }


class CommandNotRunnable(UsageError):
    """The container's command is missing (127) or not executable (126), as docker says."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.exit_code = code


def check_executable(rootfs: str, argv0: str, env: Sequence[str], cwd: str = "/") -> None:
    """Raise CommandNotRunnable unless *argv0* names an executable file in the rootfs
    (looked up in the container's PATH when it has no slash; resolved inside the rootfs)."""
    if "/" in argv0:
        candidates = [argv0 if argv0.startswith("/") else os.path.join(cwd, argv0)]
    else:
        path = next((e[5:] for e in env if e.startswith("PATH=")), DEFAULT_PATH)
        candidates = [os.path.join(d or ".", argv0) if d.startswith("/") else os.path.join(cwd, d, argv0)
                      for d in path.split(":")]
    found_not_exec = None
    for cand in candidates:
        fd = open_in_root(rootfs, cand)
        if fd is None:
            continue
        try:
            mode = os.fstat(fd).st_mode
        finally:
            os.close(fd)
        if mode & 0o111:
            return
        found_not_exec = cand
    if found_not_exec is not None:
        raise CommandNotRunnable(f'exec: "{argv0}": permission denied', 126)
    where = "in $PATH" if "/" not in argv0 else ""
    raise CommandNotRunnable(f'exec: "{argv0}": executable file not found {where}'.strip()
                             if where else f'exec: "{argv0}": no such file or directory', 127)
