"""Bad input: one clear line on stderr (``unionfuse: ...``), a non-zero exit, and nothing
changed (no mount, no daemon, no files or dirs created, no pid file)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from unionfuse.mount import mount_entry, pid_file

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-P", "-m", "unionfuse"]
USAGE, MOUNT_FAILURE = 2, 32


def snapshot(root: Path) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames + ["."]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_size, st.st_mtime_ns,
                                             st.st_ctime_ns)
    return out


def fuse_mounts_under(root: Path) -> list[str]:
    root = os.path.realpath(str(root))
    with open("/proc/self/mountinfo", "rb") as f:
        mps = [os.fsdecode(line.split()[4]) for line in f]
    return [m for m in mps if m == root or m.startswith(root + "/")]


@pytest.fixture
def env(tmp_path):
    for n in ("l1", "l2", "u", "w", "mnt"):
        (tmp_path / n).mkdir()
    (tmp_path / "l1" / "a").write_text("a\n")
    return tmp_path


def fails(env: Path, args, code: int, *needles: str, cwd=None) -> str:
    """Run the CLI; check exit *code*, one ``unionfuse:`` line naming *needles*, an empty
    stdout, and that nothing under *env* changed.  Returns the message."""
    before = snapshot(env)
    pid_before = os.path.exists(pid_file(str(env / "mnt")))
    r = subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL, cwd=cwd or str(env))
    lines = r.stderr.splitlines()
    assert r.returncode == code, (r.returncode, r.stderr)
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("unionfuse: "), lines[0]
    assert "Traceback" not in r.stderr
    assert r.stdout == ""
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert fuse_mounts_under(env) == []
    assert snapshot(env) == before
    assert os.path.exists(pid_file(str(env / "mnt"))) == pid_before
    return lines[0]


# -- mount -------------------------------------------------------------------------------


def test_missing_lower_dir(env):
    fails(env, ["mount", "--lower", env / "nope", "--upper", env / "u", "--work", env / "w",
                env / "mnt"], USAGE, "not a directory", str(env / "nope"))


def test_missing_second_lower_dir_in_o_form(env):
    fails(env, ["mount", "-o", f"lowerdir={env / 'l1'}:{env / 'gone'}", env / "mnt"],
          USAGE, str(env / "gone"))


def test_lower_is_a_file(env):
    fails(env, ["mount", "--lower", env / "l1" / "a", env / "mnt"], USAGE,
          "not a directory", str(env / "l1" / "a"))


def test_no_lower_at_all(env):
    fails(env, ["mount", env / "mnt"], USAGE, "lower")


def test_upper_without_work(env):
    fails(env, ["mount", "--lower", env / "l1", "--upper", env / "u", env / "mnt"], USAGE,
          "workdir")


def test_work_without_upper(env):
    fails(env, ["mount", "--lower", env / "l1", "--work", env / "w", env / "mnt"], USAGE,
          "upperdir")


def test_missing_upper_dir(env):
    fails(env, ["mount", "--lower", env / "l1", "--upper", env / "nu", "--work", env / "w",
                env / "mnt"], USAGE, str(env / "nu"))


def test_nested_upper_and_work(env):
    (env / "u" / "w").mkdir()
    fails(env, ["mount", "--lower", env / "l1", "--upper", env / "u", "--work",
                env / "u" / "w", env / "mnt"], USAGE, "nested")


@pytest.mark.parametrize("opt,needle", [
    ("bogus", "bogus"),
    ("lowerdir=L1,bogus=1", "bogus=1"),
    ("lowerdir=L1,size=10m", "size=10m"),
    ("lowerdir=L1,whiteout=aufs", "aufs"),
    ("lowerdir=L1,timeout=soon", "soon"),
])
def test_bad_o_option(env, opt, needle):
    opt = opt.replace("L1", str(env / "l1"))
    fails(env, ["mount", "-o", opt, env / "mnt"], USAGE, needle)


def test_mountpoint_missing(env):
    fails(env, ["mount", "--lower", env / "l1", env / "nomnt"], USAGE, "mount point",
          str(env / "nomnt"))
    assert not (env / "nomnt").exists()


def test_mountpoint_is_a_file(env):
    (env / "file").write_text("")
    fails(env, ["mount", "--lower", env / "l1", env / "file"], USAGE, "mount point")


def test_no_mountpoint_given(env):
    fails(env, ["mount", "--lower", env / "l1"], USAGE, "mount point")


def test_foreground_errors_the_same(env):
    fails(env, ["mount", "--foreground", "--lower", env / "nope", env / "mnt"], USAGE,
          str(env / "nope"))


# -- config file ---------------------------------------------------------------------------


def test_bad_config_line(env):
    cfg = env / "unionfuse.conf"
    cfg.write_text(f"# comment\nlowerdir={env / 'l1'}\nmountpoint={env / 'mnt'}\n"
                   "this is not a setting\n")
    fails(env, ["mount", "--config", cfg], USAGE, f"{cfg}:4")


def test_unknown_config_key(env):
    cfg = env / "unionfuse.conf"
    cfg.write_text(f"lowerdir={env / 'l1'}\ncolour=blue\nmountpoint={env / 'mnt'}\n")
    fails(env, ["mount", "--config", cfg], USAGE, f"{cfg}:2")


def test_config_missing(env):
    fails(env, ["mount", "--config", env / "none.conf"], USAGE, str(env / "none.conf"))


def test_config_with_bad_option(env):
    cfg = env / "unionfuse.conf"
    cfg.write_text(f"lowerdir={env / 'l1'}\nmountpoint={env / 'mnt'}\noptions=nosuid,bogus\n")
    fails(env, ["mount", "--config", cfg], USAGE, "bogus")


def test_config_missing_lower(env):
    cfg = env / "unionfuse.conf"
    cfg.write_text(f"lowerdir={env / 'nope'}\nmountpoint={env / 'mnt'}\n")
    fails(env, ["mount", "--config", cfg], USAGE, str(env / "nope"))


# -- mount(8) helper form ------------------------------------------------------------------


def test_helper_form_bad_option(env):
    fails(env, ["unionfuse", env / "mnt", "-o", f"rw,dev,suid,lowerdir={env / 'l1'},bogus"],
          USAGE, "bogus")


def test_helper_form_missing_lower(env):
    fails(env, ["unionfuse", env / "mnt", "-o", f"lowerdir={env / 'nope'}"], USAGE,
          str(env / "nope"))


@pytest.mark.skipif(not os.path.exists("/usr/local/bin/unionfuse"),
                    reason="mount(8) needs /usr/local/bin/unionfuse (scripts/install.sh)")
def test_mount_8_reports_the_error(env):
    before = snapshot(env)
    r = subprocess.run(["mount", "-t", "fuse.unionfuse", "unionfuse", str(env / "mnt"),
                        "-o", f"lowerdir={env / 'nope'}"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0
    assert f"unionfuse: not a directory: {env / 'nope'}" in r.stderr.splitlines(), r.stderr
    assert fuse_mounts_under(env) == [] and snapshot(env) == before


# -- umount --------------------------------------------------------------------------------


def test_umount_not_mounted(env):
    fails(env, ["umount", env / "mnt"], MOUNT_FAILURE, "not mounted", str(env / "mnt"))


def test_umount_missing_dir(env):
    fails(env, ["umount", env / "nomnt"], MOUNT_FAILURE, str(env / "nomnt"))


def test_umount_other_filesystem_left_alone(env):
    mnt = env / "mnt"
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"can't mount a tmpfs: {r.stderr.strip()}")
    try:
        r = subprocess.run(CLI + ["umount", str(mnt)], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == MOUNT_FAILURE, r.stderr
        assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("unionfuse: ")
        assert "not a unionfuse mount" in r.stderr
        assert mount_entry(str(mnt)) == "tmpfs"  # still mounted
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.skipif(not os.path.exists("/usr/bin/fuse-overlayfs"), reason="no fuse-overlayfs")
def test_umount_other_fuse_filesystem_left_alone(env):
    """Another FUSE filesystem (here fuse-overlayfs) is not ours to unmount."""
    mnt = env / "mnt"
    r = subprocess.run(["fuse-overlayfs", "-o", f"lowerdir={env / 'l1'}", str(mnt)],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"fuse-overlayfs failed: {r.stderr.strip()}")
    try:
        assert mount_entry(str(mnt)) == "fuse.fuse-overlayfs"
        r = subprocess.run(CLI + ["umount", str(mnt)], capture_output=True, text=True,
                           timeout=60)
        still = mount_entry(str(mnt))
        assert r.returncode == MOUNT_FAILURE, (r.returncode, r.stderr)
        assert len(r.stderr.splitlines()) == 1 and "not a unionfuse mount" in r.stderr
        assert still == "fuse.fuse-overlayfs"
    finally:
        # fuse-overlayfs exits by itself once unmounted
        if mount_entry(str(mnt)) is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


# -- the quick exit (cli.exit_quickly skips the interpreter's teardown) --------------------


@pytest.mark.parametrize("threaded", [False, True])
def test_quick_exit_keeps_what_a_normal_exit_does(threaded):
    """Exit code, buffered stdout (a pipe), atexit handlers, and a non-daemon thread that
    is still running: all as after sys.exit."""
    code = (
        "import atexit, sys, threading, time\n"
        "from unionfuse.cli import exit_quickly\n"
        "atexit.register(lambda: sys.stdout.write(' atexit'))\n"
        "if THREADED:\n"
        "    threading.Thread(target=lambda: (time.sleep(0.3), sys.stdout.write(' thread'))).start()\n"
        "sys.stdout.write('out' * 10000)\n"
        "exit_quickly(3)\n"
    ).replace("THREADED", str(threaded))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 3, r.stderr
    assert r.stdout == "out" * 10000 + (" thread" if threaded else "") + " atexit"
    assert r.stderr == ""


@pytest.mark.parametrize("how", [">&-", "2>&-"])
def test_quick_exit_with_a_stream_closed(how):
    """stdout or stderr closed (at start, or by the command): exit 0 as sys.exit does."""
    code = "from unionfuse.cli import exit_quickly; exit_quickly(0)"
    r = subprocess.run(["sh", "-c", f'"$0" -c "$1" {how}', sys.executable, code], timeout=30)
    assert r.returncode == 0
    code = "import sys; from unionfuse.cli import exit_quickly; sys.stdout.close(); exit_quickly(0)"
    assert subprocess.run([sys.executable, "-c", code], timeout=30).returncode == 0
