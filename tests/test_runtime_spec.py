"""unionfuse.runtime.spec: unit tests of every function, then real-runtime tests that run
the generated config.json with runc (and crun, through its hybrid-cgroup workaround) on a
plain-directory busybox rootfs."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from unionfuse.errors import UsageError
from unionfuse.runtime.spec import (
    DEFAULT_CAPABILITIES,
    DEFAULT_PATH,
    MASKED_PATHS,
    READONLY_PATHS,
    Volume,
    make_spec,
    merge_env,
    open_in_root,
    parse_volume,
    read_in_root,
    resolve_command,
    resolve_user,
)

REPO = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------- commands

SH = ["/bin/sh", "-c", "echo hi"]


@pytest.mark.parametrize(
    "config, entrypoint, cmd, expected",
    [
        # image Cmd only
        ({"Cmd": ["ls", "-l"]}, None, [], ["ls", "-l"]),
        # user cmd replaces image Cmd
        ({"Cmd": ["ls", "-l"]}, None, ["echo", "x"], ["echo", "x"]),
        # image Entrypoint + image Cmd
        ({"Entrypoint": ["/ep"], "Cmd": ["a", "b"]}, None, [], ["/ep", "a", "b"]),
        # image Entrypoint + user cmd (replaces image Cmd)
        ({"Entrypoint": ["/ep"], "Cmd": ["a"]}, None, ["z"], ["/ep", "z"]),
        # image Entrypoint only
        ({"Entrypoint": ["/ep", "-x"], "Cmd": None}, None, [], ["/ep", "-x"]),
        # --entrypoint drops the image Cmd
        ({"Entrypoint": ["/ep"], "Cmd": ["a"]}, ["/other"], [], ["/other"]),
        # --entrypoint with user cmd
        ({"Entrypoint": ["/ep"], "Cmd": ["a"]}, ["/other"], ["b", "c"], ["/other", "b", "c"]),
        # --entrypoint '' (reset) with user cmd
        ({"Entrypoint": ["/ep"], "Cmd": ["a"]}, [], ["ls"], ["ls"]),
        ({"Entrypoint": ["/ep"], "Cmd": ["a"]}, [""], ["ls"], ["ls"]),
        # shell form is stored as sh -c by builders: passed through untouched
        ({"Cmd": SH}, None, [], SH),
        ({"Entrypoint": SH}, None, ["ignored-by-sh"], SH + ["ignored-by-sh"]),
        # missing / None keys
        ({}, None, ["true"], ["true"]),
        (None, None, ["true"], ["true"]),
        ({"Entrypoint": None, "Cmd": ["x"]}, None, [], ["x"]),
        ({"Entrypoint": [], "Cmd": ["x"]}, None, [], ["x"]),
        # tuples accepted
        ({"Cmd": ["x"]}, ("/e",), ("y",), ["/e", "y"]),
    ],
)
def test_resolve_command(config, entrypoint, cmd, expected):
    assert resolve_command(config, entrypoint, cmd) == expected


@pytest.mark.parametrize(
    "config, entrypoint, cmd",
    [
        ({}, None, []),
        (None, None, None),
        ({"Entrypoint": None, "Cmd": None}, None, []),
        ({"Cmd": ["a"]}, [], []),  # reset entrypoint drops image Cmd: nothing left
        ({"Entrypoint": ["/ep"], "Cmd": ["a"]}, [""], []),
        ({"Cmd": []}, None, []),
    ],
)
def test_resolve_command_empty(config, entrypoint, cmd):
    with pytest.raises(UsageError, match="^no command specified$"):
        resolve_command(config, entrypoint, cmd)


def test_resolve_command_does_not_alias_config():
    config = {"Entrypoint": ["/ep"], "Cmd": ["a"]}
    argv = resolve_command(config, None, [])
    argv.append("mutated")
    assert config == {"Entrypoint": ["/ep"], "Cmd": ["a"]}


# --------------------------------------------------------------------------- env


def test_merge_env_replace_and_append_in_order():
    out = merge_env(["PATH=/bin", "A=1", "B=2"], ["B=3", "C=4", "A=5", "C=6"], environ={})
    assert out == ["PATH=/bin", "A=5", "B=3", "C=6"]


def test_merge_env_value_with_equals_and_empty():
    assert merge_env(["A=1"], ["A=x=y", "E="], environ={}) == ["A=x=y", "E="]


def test_merge_env_key_only_from_caller_environment():
    assert merge_env(["A=1"], ["HOSTVAR", "A"], environ={"HOSTVAR": "v", "A": "z"}) == [
        "A=z", "HOSTVAR=v"]


def test_merge_env_key_only_unset_is_dropped_and_unsets_image_value():
    # docker: `-e KEY` with KEY unset in the caller removes KEY (ReplaceOrAppendEnvValues)
    assert merge_env(["A=1", "B=2"], ["A", "MISSING"], environ={}) == ["B=2"]


def test_merge_env_defaults_to_os_environ(monkeypatch):
    monkeypatch.setenv("UF_SPEC_TEST_VAR", "hello")
    assert merge_env([], ["UF_SPEC_TEST_VAR"]) == ["UF_SPEC_TEST_VAR=hello"]
    monkeypatch.delenv("UF_SPEC_TEST_VAR")
    assert merge_env([], ["UF_SPEC_TEST_VAR"]) == []


def test_merge_env_none_inputs():
    assert merge_env(None, None, environ={}) == []


@pytest.mark.parametrize("bad", ["=x", "="])
def test_merge_env_invalid(bad):
    with pytest.raises(UsageError, match="invalid environment variable"):
        merge_env([], [bad], environ={})


# --------------------------------------------------------------------------- users

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
# a comment
broken:x:notanumber:0::/nope:/bin/sh

nobody:x:65534:65534:nobody:/home:/bin/false
user:x:1000:1000:user:/home/user:/bin/sh
nohome:x:1001:1001:::/bin/sh
"""
GROUP = """\
root:x:0:
daemon:x:1:
wheel:x:10:user
users:x:100:daemon,user
nogroup:x:65534:
user:x:1000:
staff:x:50:nobody
"""


def make_root(tmp_path: Path, passwd: str | None = PASSWD, group: str | None = GROUP) -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    if passwd is not None:
        (root / "etc/passwd").write_text(passwd)
    if group is not None:
        (root / "etc/group").write_text(group)
    return root


@pytest.mark.parametrize(
    "spec, expected",
    [
        (None, (0, 0, [], "/root")),
        ("", (0, 0, [], "/root")),
        ("root", (0, 0, [], "/root")),
        ("0", (0, 0, [], "/root")),
        ("user", (1000, 1000, [10, 100], "/home/user")),
        ("1000", (1000, 1000, [10, 100], "/home/user")),
        ("daemon", (1, 1, [100], "/usr/sbin")),
        ("nobody", (65534, 65534, [50], "/home")),
        ("nohome", (1001, 1001, [], "/")),
        # explicit group: replaces gid, no supplementary groups
        ("user:wheel", (1000, 10, [], "/home/user")),
        ("user:100", (1000, 100, [], "/home/user")),
        ("user:4242", (1000, 4242, [], "/home/user")),
        ("1000:1000", (1000, 1000, [], "/home/user")),
        # numeric uid without passwd entry: gid 0, HOME /
        ("4242", (4242, 0, [], "/")),
        ("4242:4243", (4242, 4243, [], "/")),
        ("4242:wheel", (4242, 10, [], "/")),
        (":wheel", (0, 10, [], "/root")),
        # group field may carry more colons: only the first two fields count
        ("user:wheel:junk", (1000, 10, [], "/home/user")),
    ],
)
def test_resolve_user_table(tmp_path, spec, expected):
    root = make_root(tmp_path)
    assert resolve_user(str(root), spec) == expected


def test_resolve_user_unknown_name(tmp_path):
    root = make_root(tmp_path)
    with pytest.raises(UsageError) as ei:
        resolve_user(str(root), "ghost")
    assert str(ei.value) == "unable to find user ghost: no matching entries in passwd file"


def test_resolve_user_malformed_line_is_skipped(tmp_path):
    # moby would parse uid "notanumber" as 0 (root); we skip the line instead
    root = make_root(tmp_path)
    with pytest.raises(UsageError, match="unable to find user broken"):
        resolve_user(str(root), "broken")


def test_resolve_user_unknown_group(tmp_path):
    root = make_root(tmp_path)
    with pytest.raises(UsageError) as ei:
        resolve_user(str(root), "user:ghosts")
    assert str(ei.value) == "unable to find group ghosts: no matching entries in group file"


@pytest.mark.parametrize("spec", ["-1", "2147483648", "1000:-5", "0:99999999999"])
def test_resolve_user_out_of_range(tmp_path, spec):
    root = make_root(tmp_path)
    with pytest.raises(UsageError, match="range"):
        resolve_user(str(root), spec)


def test_resolve_user_missing_files(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    assert resolve_user(str(root), None) == (0, 0, [], "/root")
    assert resolve_user(str(root), "1000:1000") == (1000, 1000, [], "/")
    assert resolve_user(str(root), "77") == (77, 0, [], "/")
    with pytest.raises(UsageError, match="unable to find user user:"):
        resolve_user(str(root), "user")
    with pytest.raises(UsageError, match="unable to find group wheel"):
        resolve_user(str(root), "0:wheel")


def test_resolve_user_missing_group_file_only(tmp_path):
    root = make_root(tmp_path, group=None)
    assert resolve_user(str(root), "user") == (1000, 1000, [], "/home/user")


def test_resolve_user_relative_symlinks_inside_are_followed(tmp_path):
    root = make_root(tmp_path, passwd=None, group=None)
    (root / "data").mkdir()
    (root / "data/pw").write_text("app:x:500:600:app:/srv/app:/bin/sh\n")
    (root / "data/gr").write_text("app:x:600:\nextra:x:700:app\n")
    os.symlink("../data/pw", root / "etc/passwd")
    os.symlink("/data/gr", root / "etc/group")  # absolute: relative to rootfs
    assert resolve_user(str(root), "app") == (500, 600, [700], "/srv/app")


HOSTILE = "evil:x:0:0:evil:/evil:/bin/sh\n"


@pytest.fixture
def outside(tmp_path):
    """A passwd-like file outside the rootfs that must never be read."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "passwd").write_text(HOSTILE)
    (d / "group").write_text("evilgroup:x:0:user\n")
    return d


def test_hostile_absolute_symlink_to_host_shadow(tmp_path):
    # /etc/passwd -> /etc/shadow must mean the *image's* /etc/shadow, never the host's
    assert Path("/etc/shadow").exists()
    root = make_root(tmp_path, passwd=None)
    os.symlink("/etc/shadow", root / "etc/passwd")
    with pytest.raises(UsageError, match="unable to find user root"):
        resolve_user(str(root), "root")  # the host's shadow has a root line
    # and an image that ships its own /etc/shadow gets that one
    (root / "etc/shadow").write_text("inside:x:5:5::/in:/bin/sh\n")
    assert resolve_user(str(root), "inside") == (5, 5, [], "/in")


def test_hostile_absolute_symlink_to_outside_file(tmp_path, outside):
    root = make_root(tmp_path, passwd=None, group=None)
    os.symlink(str(outside / "passwd"), root / "etc/passwd")
    os.symlink(str(outside / "group"), root / "etc/group")
    with pytest.raises(UsageError, match="unable to find user evil"):
        resolve_user(str(root), "evil")
    with pytest.raises(UsageError, match="unable to find group evilgroup"):
        resolve_user(str(root), "7:evilgroup")
    assert resolve_user(str(root), "7") == (7, 0, [], "/")


def test_hostile_etc_symlink_to_slash(tmp_path):
    root = tmp_path / "rootfs"
    root.mkdir()
    os.symlink("/", root / "etc")  # /etc -> / : /etc/passwd is the rootfs's /passwd
    with pytest.raises(UsageError, match="unable to find user daemon"):
        resolve_user(str(root), "daemon")  # the host's /etc/passwd has daemon
    (root / "passwd").write_text("top:x:9:9::/t:/bin/sh\n")
    assert resolve_user(str(root), "top") == (9, 9, [], "/t")


def test_hostile_etc_symlink_to_host_etc_by_absolute_path(tmp_path):
    root = tmp_path / "rootfs"
    root.mkdir()
    os.symlink("/etc", root / "etc")  # loops back onto itself inside the rootfs
    with pytest.raises(UsageError, match="too many levels of symbolic links"):
        resolve_user(str(root), "daemon")


@pytest.mark.parametrize("depth", [1, 3, 12])
def test_hostile_dotdot_escape(tmp_path, outside, depth):
    root = make_root(tmp_path, passwd=None, group=None)
    target = "../" * depth + str(outside / "passwd").lstrip("/")
    os.symlink(target, root / "etc/passwd")
    with pytest.raises(UsageError, match="unable to find user evil"):
        resolve_user(str(root), "evil")
    # the same path created inside the rootfs is what gets read (chroot semantics)
    inner = root / str(outside / "passwd").lstrip("/")
    inner.parent.mkdir(parents=True)
    inner.write_text("clamped:x:3:3::/c:/bin/sh\n")
    assert resolve_user(str(root), "clamped") == (3, 3, [], "/c")


def test_hostile_dotdot_directory_escape(tmp_path, outside):
    root = tmp_path / "rootfs"
    root.mkdir()
    # /etc -> ../../../<outside dir>: would be the outside dir if followed on the host
    os.symlink("../../../../" + str(outside).lstrip("/"), root / "etc")
    assert resolve_user(str(root), None) == (0, 0, [], "/root")
    with pytest.raises(UsageError, match="unable to find user evil"):
        resolve_user(str(root), "evil")


def test_hostile_literal_dotdot_in_path_component(tmp_path):
    root = make_root(tmp_path, passwd=None)
    (root / "etc/x").mkdir()
    os.symlink("x/../../../../../../etc/shadow", root / "etc/passwd")
    with pytest.raises(UsageError, match="unable to find user root"):
        resolve_user(str(root), "root")


def test_symlink_loop(tmp_path):
    root = make_root(tmp_path, passwd=None)
    os.symlink("passwd2", root / "etc/passwd")
    os.symlink("passwd", root / "etc/passwd2")
    with pytest.raises(UsageError, match="too many levels of symbolic links"):
        resolve_user(str(root), "root")


def test_long_symlink_chain_within_cap(tmp_path):
    root = make_root(tmp_path, passwd=None)
    (root / "etc/real").write_text("chain:x:8:8::/ch:/bin/sh\n")
    prev = "real"
    for i in range(30):
        os.symlink(prev, root / f"etc/l{i}")
        prev = f"l{i}"
    os.symlink(prev, root / "etc/passwd")
    assert resolve_user(str(root), "chain") == (8, 8, [], "/ch")


def test_non_regular_passwd_is_ignored(tmp_path):
    root = make_root(tmp_path, passwd=None)
    os.mkfifo(root / "etc/passwd")  # must not block
    assert resolve_user(str(root), None) == (0, 0, [], "/root")
    os.unlink(root / "etc/passwd")
    (root / "etc/passwd").mkdir()
    assert resolve_user(str(root), "12") == (12, 0, [], "/")
    os.rmdir(root / "etc/passwd")
    os.symlink("/dev/zero", root / "etc/passwd")  # absent inside the rootfs
    assert resolve_user(str(root), None) == (0, 0, [], "/root")


def test_passwd_read_is_capped(tmp_path):
    filler = ("#" + "x" * 98 + "\n") * 10486  # ~1 MiB of comment lines
    text = "early:x:1:1::/e:/bin/sh\n" + filler + "late:x:2:2::/l:/bin/sh\n"
    assert len(text) > (1 << 20)
    root = make_root(tmp_path, passwd=text)
    assert resolve_user(str(root), "early")[:2] == (1, 1)
    with pytest.raises(UsageError, match="unable to find user late"):
        resolve_user(str(root), "late")


def test_open_in_root_fd_and_absent(tmp_path):
    root = make_root(tmp_path)
    fd = open_in_root(str(root), "/etc/../etc/./passwd")
    try:
        assert os.read(fd, 5) == b"root:"
    finally:
        os.close(fd)
    assert open_in_root(str(root), "/etc") is None
    assert open_in_root(str(root), "/") is None
    assert open_in_root(str(root), "/etc/passwd/x") is None
    assert open_in_root(str(root), "/nope/passwd") is None
    assert read_in_root(str(root), "etc/group") == GROUP


# --------------------------------------------------------------------------- volumes


def test_parse_volume_good(tmp_path):
    h = str(tmp_path)
    assert parse_volume(f"{h}:/data") == Volume(h, "/data", False)
    assert parse_volume(f"{h}:/data:ro") == Volume(h, "/data", True)
    assert parse_volume(f"{h}:/data:rw") == Volume(h, "/data", False)
    assert parse_volume(f"{h}/:/a/b/../c//d/") == Volume(h, "/a/c/d", False)
    f = tmp_path / "file"
    f.write_text("x")
    assert parse_volume(f"{f}:/etc/thing:ro") == Volume(str(f), "/etc/thing", True)


@pytest.mark.parametrize(
    "spec, why",
    [
        ("", ""),
        ("foo", ""),
        ("/data", "anonymous volumes are not supported"),
        ("{h}:", ""),
        (":/data", ""),
        ("{h}:/data:ro:x", ""),
        ("{h}:/data:rx", "invalid mode: rx"),
        ("{h}:/data:ro,rw", "invalid mode: ro,rw"),
        ("{h}:/data:", ""),
        ("named:/data", "named volumes are not supported"),
        ("rel/dir:/data", "named volumes are not supported"),
        ("{h}:data", "mount path must be absolute"),
        ("{h}:/", "destination can't be '/'"),
        ("{h}:/a/..", "destination can't be '/'"),
        ("{h}/missing:/data", "bind source path does not exist"),
    ],
)
def test_parse_volume_bad(tmp_path, spec, why):
    spec = spec.replace("{h}", str(tmp_path))
    with pytest.raises(UsageError) as ei:
        parse_volume(spec)
    msg = str(ei.value)
    assert msg.startswith(f"invalid volume specification: '{spec}'")
    assert why in msg
    assert "\n" not in msg


# --------------------------------------------------------------------------- make_spec


def spec_for(**kw):
    base = dict(rootfs="/r", args=["sh"], env=[], cwd="/", uid=0, gid=0, additional_gids=[],
                terminal=False, hostname="box")
    base.update(kw)
    return make_spec(**base)


def test_make_spec_shape():
    s = spec_for()
    json.dumps(s)  # serialisable
    assert s["ociVersion"] == "1.0.2"
    p = s["process"]
    assert p["terminal"] is False
    assert p["user"] == {"uid": 0, "gid": 0, "additionalGids": []}
    assert p["args"] == ["sh"] and p["cwd"] == "/"
    caps = p["capabilities"]
    assert set(caps) == {"bounding", "effective", "permitted"}
    for k in caps.values():
        assert sorted(k) == sorted(DEFAULT_CAPABILITIES) and len(k) == 14
    assert p["noNewPrivileges"] is True and p["oomScoreAdj"] == 0
    assert s["root"] == {"path": "/r", "readonly": False}
    assert s["hostname"] == "box"
    dests = [m["destination"] for m in s["mounts"]]
    assert dests == ["/proc", "/dev", "/dev/pts", "/sys", "/sys/fs/cgroup", "/dev/mqueue",
                     "/dev/shm"]
    by = {m["destination"]: m for m in s["mounts"]}
    assert by["/sys"]["options"] == ["nosuid", "noexec", "nodev", "ro"]
    assert "ro" in by["/sys/fs/cgroup"]["options"]
    assert by["/dev"]["options"] == ["nosuid", "strictatime", "mode=755", "size=65536k"]
    assert {"newinstance", "ptmxmode=0666", "mode=0620", "gid=5"} <= set(
        by["/dev/pts"]["options"])
    lx = s["linux"]
    assert [n["type"] for n in lx["namespaces"]] == ["pid", "ipc", "uts", "mount", "network"]
    assert lx["maskedPaths"] == list(MASKED_PATHS)
    assert lx["readonlyPaths"] == list(READONLY_PATHS)
    for path in ("/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                 "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
                 "/sys/firmware"):
        assert path in lx["maskedPaths"]
    assert lx["resources"]["devices"] == [{"allow": False, "access": "rwm"}]


def test_make_spec_rlimits_never_exceed_host():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    (r,) = spec_for()["process"]["rlimits"]
    assert r["type"] == "RLIMIT_NOFILE"
    assert r["soft"] <= r["hard"]
    assert r["soft"] == min(1024, r["hard"])
    if hard != resource.RLIM_INFINITY:
        assert r["hard"] == hard
    custom = [{"type": "RLIMIT_NOFILE", "soft": 10, "hard": 20}]
    assert spec_for(rlimits=custom)["process"]["rlimits"] == custom


def test_make_spec_env_defaults():
    env = spec_for(hostname="h1")["process"]["env"]
    assert env == [f"PATH={DEFAULT_PATH}", "HOSTNAME=h1", "HOME=/root"]
    env = spec_for(terminal=True, uid=1000, home="/home/u")["process"]["env"]
    assert env == [f"PATH={DEFAULT_PATH}", "HOSTNAME=box", "TERM=xterm", "HOME=/home/u"]
    env = spec_for(uid=5)["process"]["env"]
    assert "HOME=/" in env


def test_make_spec_env_overrides_defaults():
    env = spec_for(env=["PATH=/bin", "HOME=/h", "TERM=dumb", "A=1", "HOSTNAME=mine"],
                   terminal=True, home="/ignored")["process"]["env"]
    assert env == ["PATH=/bin", "HOSTNAME=mine", "TERM=dumb", "HOME=/h", "A=1"]


def test_make_spec_host_network_keeps_host_netns():
    s = spec_for(network="host")
    assert "network" not in [n["type"] for n in s["linux"]["namespaces"]]
    with pytest.raises(UsageError, match="unsupported network mode"):
        spec_for(network="bridge")


def test_make_spec_volumes(tmp_path):
    v1 = Volume("/h/a", "/data", True)
    v2 = Volume("/h/b", "/data/sub", False)
    v3 = Volume("/h/shm", "/dev/shm", False)
    s = spec_for(volumes=[v2, v3, v1])
    dests = [m["destination"] for m in s["mounts"]]
    assert dests.count("/dev/shm") == 1
    assert dests.index("/data") < dests.index("/data/sub")
    by = {m["destination"]: m for m in s["mounts"]}
    assert by["/data"] == {"destination": "/data", "type": "bind", "source": "/h/a",
                           "options": ["rbind", "rprivate", "ro"]}
    assert by["/data/sub"]["options"] == ["rbind", "rprivate"]
    assert by["/dev/shm"]["source"] == "/h/shm"
    # a /dev volume replaces /dev and everything under it
    s = spec_for(volumes=[Volume("/h/dev", "/dev")])
    dests = [m["destination"] for m in s["mounts"]]
    assert not [d for d in dests if d.startswith("/dev/")]
    with pytest.raises(UsageError, match="duplicate mount point: /data"):
        spec_for(volumes=[v1, Volume("/h/c", "/data")])


def test_make_spec_misc_validation():
    assert spec_for(readonly_rootfs=True)["root"]["readonly"] is True
    assert spec_for(cwd="")["process"]["cwd"] == "/"
    assert spec_for(cwd="/a/../b/")["process"]["cwd"] == "/b"
    with pytest.raises(UsageError, match="needs to be an absolute path"):
        spec_for(cwd="rel")
    with pytest.raises(UsageError, match="no command specified"):
        spec_for(args=[])
    with pytest.raises(UsageError, match="range"):
        spec_for(uid=-1)
    s = spec_for(uid=1000, gid=1000, additional_gids=[10, 100])
    assert s["process"]["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [10, 100]}


def test_make_spec_returns_fresh_objects():
    a, b = spec_for(), spec_for()
    a["mounts"][0]["options"].append("x")
    a["process"]["capabilities"]["bounding"].pop()
    assert b == spec_for()


# --------------------------------------------------------------------------- real runtimes

RUNTIMES = ["runc", "crun"]
CGROUP2_HYBRID = "/sys/fs/cgroup/unified"


def runtime_argv(runtime: str, *args: str) -> list[str]:
    if runtime == "crun" and os.path.ismount(CGROUP2_HYBRID):
        # crun 1.8 refuses hybrid cgroups: hide the v2 mount in a private mount namespace
        inner = " ".join(["exec", "crun", *[_shq(a) for a in args]])
        return ["unshare", "-m", "sh", "-c", f"umount {CGROUP2_HYBRID} && {inner}"]
    return [runtime, *args]


def _shq(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


@pytest.fixture(scope="module")
def bb_rootfs(tmp_path_factory) -> Path:
    if shutil.which("busybox") is None and not Path("/bin/busybox").exists():
        pytest.skip("busybox-static not installed")
    d = tmp_path_factory.mktemp("bbroot")
    tar = d / "bb.tar"
    subprocess.run(["bash", str(REPO / "scripts/busybox-rootfs.sh"), str(tar)], check=True)
    root = d / "rootfs"
    root.mkdir(mode=0o755)
    subprocess.run(["tar", "-xpf", str(tar), "-C", str(root), "--numeric-owner"], check=True)
    return root


class Runner:
    def __init__(self, runtime: str, rootfs: Path, tmp_path: Path):
        self.runtime = runtime
        self.rootfs = rootfs
        self.tmp_path = tmp_path
        self.ids: list[str] = []

    def run(self, args, *, user=None, env=(), cwd="/", hostname="specbox", volumes=(),
            network="none", readonly_rootfs=False, timeout=30):
        uid, gid, sgids, home = resolve_user(str(self.rootfs), user)
        spec = make_spec(rootfs=str(self.rootfs), args=args, env=list(env), cwd=cwd, uid=uid,
                         gid=gid, additional_gids=sgids, terminal=False, hostname=hostname,
                         network=network, volumes=list(volumes),
                         readonly_rootfs=readonly_rootfs, home=home)
        cid = f"ufspec-{uuid.uuid4().hex[:12]}"
        bundle = self.tmp_path / f"bundle-{cid}"
        bundle.mkdir()
        (bundle / "config.json").write_text(json.dumps(spec, indent=1))
        self.ids.append(cid)
        return subprocess.run(runtime_argv(self.runtime, "run", "-b", str(bundle), cid),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)

    def cleanup(self):
        for cid in self.ids:
            subprocess.run(runtime_argv(self.runtime, "delete", "-f", cid),
                           capture_output=True, timeout=30)


@pytest.fixture(params=RUNTIMES)
def rt(request, bb_rootfs, tmp_path):
    runtime = request.param
    if shutil.which(runtime) is None:
        pytest.skip(f"{runtime} not installed")
    if os.geteuid() != 0:
        pytest.skip("needs root")
    r = Runner(runtime, bb_rootfs, tmp_path)
    yield r
    r.cleanup()


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"rc={r.returncode}\nstdout={r.stdout}\nstderr={r.stderr}"
    return r.stdout


def test_rt_id_root(rt):
    assert ok(rt.run(["id"])).strip() == "uid=0(root) gid=0(root)"


def test_rt_id_named_users(rt):
    assert ok(rt.run(["id"], user="nobody")).strip() == "uid=65534(nobody) gid=65534(nogroup)"
    out = ok(rt.run(["id"], user="user")).strip()
    assert out.startswith("uid=1000(user) gid=1000(user) groups=")
    assert "10(wheel)" in out and "100(users)" in out


def test_rt_id_numeric(rt):
    out = ok(rt.run(["id"], user="1000:1000")).strip()
    assert out == "uid=1000(user) gid=1000(user)"
    out = ok(rt.run(["sh", "-c", "id -u; id -g; echo $HOME"], user="4242")).split()
    assert out == ["4242", "0", "/"]


def test_rt_env(rt):
    env = merge_env(["FOO=image", "KEEP=1"], ["FOO=cli", "NEW=x y"], environ={})
    lines = ok(rt.run(["env"], env=env, user="user")).splitlines()
    for want in ("FOO=cli", "KEEP=1", "NEW=x y", "HOSTNAME=specbox", "HOME=/home/user",
                 f"PATH={DEFAULT_PATH}"):
        assert want in lines
    assert "TERM=xterm" not in lines


def test_rt_cwd_and_hostname(rt):
    out = ok(rt.run(["sh", "-c", "pwd; hostname"], cwd="/home/user", hostname="h-42"))
    assert out.split() == ["/home/user", "h-42"]


def test_rt_proc1_cmdline(rt):
    args = ["cat", "/proc/1/cmdline"]
    assert ok(rt.run(args)) == "\0".join(args) + "\0"


def test_rt_volumes(rt, tmp_path):
    ro = tmp_path / "ro"
    rw = tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    (ro / "in.txt").write_text("hello\n")
    vols = [parse_volume(f"{ro}:/mnt/ro:ro"), parse_volume(f"{rw}:/mnt/rw")]
    r = rt.run(["sh", "-c", "cat /mnt/ro/in.txt; echo nope > /mnt/ro/x"], volumes=vols)
    assert r.returncode != 0 and r.stdout == "hello\n"
    assert "Read-only file system" in r.stderr
    assert not (ro / "x").exists()
    ok(rt.run(["sh", "-c", "echo landed > /mnt/rw/out.txt"], volumes=vols))
    assert (rw / "out.txt").read_text() == "landed\n"


def test_rt_network_none(rt):
    out = ok(rt.run(["cat", "/proc/net/dev"]))
    ifaces = [ln.split(":")[0].strip() for ln in out.splitlines()[2:] if ln.strip()]
    assert ifaces == ["lo"]


def test_rt_network_host(rt):
    host = Path("/proc/net/dev").read_text().splitlines()[2:]
    out = ok(rt.run(["cat", "/proc/net/dev"], network="host"))
    assert len(out.splitlines()[2:]) == len(host)


def test_rt_exit_code(rt):
    r = rt.run(["sh", "-c", "exit 7"])
    assert r.returncode == 7, r.stderr


def test_rt_missing_binary_fails(rt):
    r = rt.run(["/no/such/binary"])
    assert r.returncode != 0


def test_rt_security_defaults(rt):
    assert os.path.getsize("/proc/timer_list") == 0  # (procfs reports 0; read it instead)
    assert Path("/proc/timer_list").read_bytes()  # non-empty on the host
    out = ok(rt.run(["sh", "-c",
                     "grep -E '^(CapEff|CapBnd|CapPrm|CapInh|NoNewPrivs)' /proc/self/status;"
                     " wc -c < /proc/timer_list; ulimit -n; ulimit -Hn;"
                     " echo 1 > /proc/sys/kernel/shmmax && echo WROTE;"
                     " ls /sys/fs/cgroup; touch /sys/x 2>/dev/null || echo SYSRO"]))
    fields = dict(ln.split(":\t") for ln in out.splitlines() if ":\t" in ln)
    # Docker's well-known default set
    assert fields["CapEff"].strip() == "00000000a80425fb"
    assert fields["CapBnd"].strip() == "00000000a80425fb"
    assert fields["CapPrm"].strip() == "00000000a80425fb"
    assert fields["CapInh"].strip() == "0000000000000000"
    assert fields["NoNewPrivs"].strip() == "1"
    rest = [ln.strip() for ln in out.splitlines() if ":\t" not in ln]
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert rest[0] == "0"  # /proc/timer_list masked
    assert rest[1] == "1024"
    assert rest[2] == (str(hard) if hard != resource.RLIM_INFINITY else "1048576")
    assert "WROTE" not in rest  # /proc/sys read-only
    assert "memory" in rest or "pids" in rest  # cgroup mount visible
    assert rest[-1] == "SYSRO"


def test_rt_readonly_rootfs(rt):
    r = rt.run(["sh", "-c", "touch /newfile"], readonly_rootfs=True)
    assert r.returncode != 0
    assert not (rt.rootfs / "newfile").exists()
    ok(rt.run(["sh", "-c", "touch /dev/shm/ok"], readonly_rootfs=True))


def test_rt_nonroot_cannot_escalate(rt):
    r = rt.run(["sh", "-c", "cat /root/.profile 2>&1; mknod /tmp/n c 1 3 2>&1; id -u"],
               user="nobody")
    out = ok(r).splitlines()
    assert out[-1] == "65534"
    assert any("denied" in ln or "not permitted" in ln for ln in out[:-1])


def test_rt_seccomp_blocks_namespaces_and_mounts(rt):
    out = ok(rt.run(["sh", "-c",
                     "grep '^Seccomp:' /proc/self/status;"
                     " unshare -U true 2>/dev/null && echo USERNS;"
                     " unshare -m true 2>/dev/null && echo MOUNTNS;"
                     " echo done"]))
    assert "Seccomp:\t2" in out  # a filter is in force
    assert "USERNS" not in out and "MOUNTNS" not in out
    assert out.strip().endswith("done")
    # ordinary processes and threads still start (clone without namespace flags)
    assert ok(rt.run(["sh", "-c", "(echo sub) | cat; sleep 0 & wait; echo ok"])).split() == ["sub", "ok"]


def test_seccomp_profile_shape():
    from unionfuse.runtime.spec import default_seccomp

    prof = default_seccomp()
    assert prof["defaultAction"] == "SCMP_ACT_ALLOW"
    names = {n for r in prof["syscalls"] for n in r["names"]}
    assert {"mount", "unshare", "setns", "keyctl", "bpf", "clone", "clone3"} <= names
