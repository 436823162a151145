"""unionfuse as containers/storage's mount_program (podman, buildah): fuse-overlayfs'
command line, real podman runs, builds and commits on unionfuse mounts, bad input.

podman keeps its state in a scratch dir (CONTAINERS_CONF / CONTAINERS_STORAGE_CONF) and
runs the checkout under test through a wrapper script as its mount_program."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from unionfuse.errors import UsageError
from unionfuse.fs.idmap import IdMap, parse_mapping
from unionfuse.mount import MountSpec, apply_options, split_options

REPO = Path(__file__).resolve().parent.parent


def need(*tools):
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


def write_wrapper(path: Path) -> Path:
    """A mount program that runs this checkout (not /usr/local/bin's)."""
    path.write_text(f'#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -P -m unionfuse "$@"\n')
    path.chmod(0o755)
    return path


def lazy_unmount_under(base: Path) -> None:
    with open("/proc/self/mountinfo") as f:
        mnts = [line.split()[4] for line in f]
    for m in reversed(mnts):
        if m == str(base) or m.startswith(str(base) + "/"):
            subprocess.run(["umount", "-l", m], capture_output=True)


# == option handling (no mount) =========================================================


def test_split_options_keeps_a_quoted_label_whole():
    parts = split_options('lowerdir=/a,,volatile,context="system_u:object_r:container_file_t:s0:c1,c2"')
    assert parts == ["lowerdir=/a", "volatile",
                     'context="system_u:object_r:container_file_t:s0:c1,c2"']


def test_fuse_overlayfs_options_accepted():
    spec = MountSpec(mountpoint="/m", lowers=[])
    apply_options(spec, split_options(
        "lowerdir=/l1:/l2,upperdir=/u,workdir=/w,,volatile,fsync=0,noacl,static_nlink,threaded=1,"
        "plugins=,redirect_dir=off,fast_ino=1,writeback=1,noxattrs=0,xattr_permissions=0,"
        "context=\"a:b:c:s0:c1,c2\",nodev,lazytime,metacopy=on"))
    assert spec.lowers == ["/l1", "/l2"] and (spec.upper, spec.work) == ("/u", "/w")
    assert "nodev" in spec.fuse_flags
    assert not spec.id_mapped


def test_unknown_option_strict_and_lenient(caplog):
    with pytest.raises(UsageError, match="unknown mount option: frobnicate=1"):
        apply_options(MountSpec(mountpoint="/m", lowers=[]), ["frobnicate=1"])
    spec = MountSpec(mountpoint="/m", lowers=[])
    apply_options(spec, ["frobnicate=1", "lowerdir=/a"], lenient=True)
    assert spec.lowers == ["/a"]
    assert "unknown option ignored: frobnicate=1" in caplog.text


def test_id_mapping_options():
    spec = MountSpec(mountpoint="/m", lowers=[])
    # containers/storage (podman 4.3) writes a leading colon
    apply_options(spec, ["uidmapping=:0:100000:65536", "gidmapping=0:200000:1000:1000:300000:10"])
    assert spec.uidmap == ((0, 100000, 65536),)
    assert spec.gidmap == ((0, 200000, 1000), (1000, 300000, 10))
    assert spec.idmap_options() == ["uidmapping=0:100000:65536", "gidmapping=0:200000:1000:1000:300000:10"]
    spec = MountSpec(mountpoint="/m", lowers=[])
    apply_options(spec, ["squash_to_uid=1000", "squash_to_gid=5"])
    assert (spec.squash_uid, spec.squash_gid) == (1000, 5) and spec.id_mapped
    apply_options(spec, ["squash_to_root"])
    assert (spec.squash_uid, spec.squash_gid) == (0, 0)


@pytest.mark.parametrize("opt", ["uidmapping=0:1", "uidmapping=a:b:c", "gidmapping=0:1:0",
                                 "uidmapping=-1:0:5", "squash_to_uid=x", "squash_to_gid=-3"])
def test_bad_id_mapping(opt):
    with pytest.raises(UsageError):
        apply_options(MountSpec(mountpoint="/m", lowers=[]), [opt])


def test_idmap_rules():
    m = IdMap(parse_mapping("0:100000:65536"), parse_mapping("0:200000:10:10:300000:5"))
    assert m.shown(0, 0) == (100000, 200000)
    assert m.shown(65535, 12) == (165535, 300002)
    assert m.shown(70000, 15) == (m.overflow_uid, m.overflow_gid)  # outside every range
    assert m.stored(100007, 300004) == (7, 14)
    assert m.stored(0, 0) == (m.overflow_uid, m.overflow_gid)
    assert m.stored(-1, -1) == (-1, -1)  # chown's "unchanged"
    assert IdMap(None, parse_mapping("0:5:1")).shown(42, 0) == (42, 5)  # uid side: identity
    sq = IdMap(squash_uid=1000, squash_gid=1000)
    assert sq.shown(0, 7) == (1000, 1000) and sq.stored(3, 4) == (3, 4)


# == the fuse-overlayfs command line, real mounts ========================================


@pytest.fixture
def ofs(tmp_path):
    """Layers for a direct `unionfuse -o ... MERGED` mount (as containers/storage runs
    it: cwd = the store, lowers given as l/ symlinks); unmounted in teardown."""
    d = tmp_path
    for n in ("store/id1/diff", "store/id2/diff", "store/l", "u", "w", "m"):
        (d / n).mkdir(parents=True)
    os.symlink("../id1/diff", d / "store/l/SHORT1")
    os.symlink("../id2/diff", d / "store/l/SHORT2")
    (d / "store/id1/diff/top").write_text("top\n")
    (d / "store/id2/diff/bottom").write_text("bottom\n")
    os.chown(d / "store/id2/diff/bottom", 5, 6)
    prog = write_wrapper(d / "unionfuse-wrapper")
    yield d, prog
    lazy_unmount_under(d / "m")


def _run(prog, *args, cwd=None, timeout=30):
    return subprocess.run([str(prog), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def _wait_daemon_gone(mnt: Path, timeout=10.0):
    """After an unmount the daemon for *mnt* exits (its argv names the mount point)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for p in os.listdir("/proc"):
            if p.isdigit():
                with contextlib.suppress(OSError), open(f"/proc/{p}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
                    if os.fsencode(str(mnt)) in argv and b"--foreground" in argv:
                        alive.append(p)
        if not alive:
            return
        time.sleep(0.05)
    raise AssertionError(f"daemon still running for {mnt}: {alive}")


def test_overlay_form_mounts_and_umount_ends_daemon(ofs):
    d, prog = ofs
    opts = (f"lowerdir=l/SHORT1:l/SHORT2,upperdir={d}/u,workdir={d}/w,,volatile,"
            'context="system_u:object_r:container_file_t:s0:c1,c2",fsync=0,frobnicate')
    r = _run(prog, "-o", opts, d / "m", cwd=d / "store")
    assert r.returncode == 0, r.stderr
    assert "unknown option ignored: frobnicate" in r.stderr  # a warning, as fuse-overlayfs
    assert os.path.ismount(d / "m")  # live when the command returns
    assert (d / "m/top").read_text() == "top\n" and (d / "m/bottom").read_text() == "bottom\n"
    (d / "m/new").write_text("n")
    os.unlink(d / "m/bottom")
    assert (d / "u/new").read_text() == "n"
    assert (d / "store/id2/diff/bottom").exists()  # lowers untouched
    r = subprocess.run(["umount", str(d / "m")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _wait_daemon_gone(d / "m")
    assert not os.path.ismount(d / "m")


def test_overlay_form_read_only_and_foreground(ofs):
    """containers/storage mounts a parent layer read-only (no upperdir) for its diffs;
    -f stays attached until unmounted."""
    d, prog = ofs
    p = subprocess.Popen([str(prog), "-f", "-o", "lowerdir=l/SHORT1:l/SHORT2", str(d / "m")],
                         cwd=d / "store", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(d / "m"):
            assert p.poll() is None, p.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert sorted(os.listdir(d / "m")) == ["bottom", "top"]
        with pytest.raises(OSError) as ei:
            (d / "m/x").write_text("x")
        assert ei.value.errno == 30  # EROFS
        assert subprocess.run(["fusermount3", "-u", str(d / "m")]).returncode == 0
        assert p.wait(timeout=10) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.parametrize("case", ["missing-lower", "missing-upper", "no-lowerdir", "no-mountpoint",
                                  "upper-without-work", "bad-mapping"])
def test_overlay_form_bad_input(ofs, case):
    d, prog = ofs
    opts = {
        "missing-lower": f"lowerdir=l/SHORT1:{d}/nope,upperdir={d}/u,workdir={d}/w",
        "missing-upper": f"lowerdir=l/SHORT1,upperdir={d}/nope,workdir={d}/w",
        "no-lowerdir": f"upperdir={d}/u,workdir={d}/w",
        "no-mountpoint": "lowerdir=l/SHORT1",
        "upper-without-work": f"lowerdir=l/SHORT1,upperdir={d}/u",
        "bad-mapping": "lowerdir=l/SHORT1,uidmapping=0:100000",
    }[case]
    mnt = d / ("nope-m" if case == "no-mountpoint" else "m")
    r = _run(prog, "-o", opts, mnt, cwd=d / "store", timeout=30)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("unionfuse: "), r.stderr
    assert not os.path.ismount(d / "m")


def test_overlay_form_id_mapping(ofs):
    """uidmapping=/gidmapping= as fuse-overlayfs does them: stored owners show shifted;
    owners given through the mount (chown, a caller's new file) are stored shifted back."""
    from conftest import allow_traverse, run_as

    d, prog = ofs
    opts = (f"lowerdir=l/SHORT1:l/SHORT2,upperdir={d}/u,workdir={d}/w,"
            "uidmapping=0:100000:65536,gidmapping=0:200000:65536")
    r = _run(prog, "-o", opts, d / "m", cwd=d / "store")
    assert r.returncode == 0, r.stderr
    st = os.stat(d / "m/bottom")
    assert (st.st_uid, st.st_gid) == (100005, 200006)
    assert (os.stat(d / "m/top").st_uid, os.stat(d / "m").st_gid) == (100000, 200000)
    os.chown(d / "m/top", 100042, 200043)  # copy-up, then the chown
    st = os.stat(d / "u/top")
    assert (st.st_uid, st.st_gid) == (42, 43)
    assert os.stat(d / "m/top").st_uid == 100042
    # a container process (host uid 101000 = container uid 1000) makes a file
    os.chmod(d / "u", 0o777)
    allow_traverse(d / "m")
    run_as(101000, 201000, lambda: open(os.path.join(d, "m/mine"), "w").close())
    st = os.stat(d / "u/mine")
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    st = os.stat(d / "m/mine")
    assert (st.st_uid, st.st_gid) == (101000, 201000)
    assert subprocess.run(["fusermount3", "-u", str(d / "m")]).returncode == 0


# == podman / buildah with mount_program = unionfuse ======================================


BASE_DOCKERFILE = """FROM localhost/bb
RUN mkdir -p /data/sub && echo one > /data/sub/f && ln /data/sub/f /data/hard \\
    && echo gone > /data/old
COPY note.txt /data/note.txt
RUN rm /data/old && chmod 0644 /data/note.txt
ENV STEP=3
RUN echo "$STEP" > /data/step
"""


class UPodman:
    """podman (and buildah) with a scratch store whose mount_program is unionfuse."""

    def __init__(self, base: Path):
        self.base = base
        prog = write_wrapper(base / "unionfuse-mount-program")
        (base / "containers.conf").write_text(
            '[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
            '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n')
        (base / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{base}/graph"\nrunroot = "{base}/run"\n'
            f'[storage.options.overlay]\nmount_program = "{prog}"\n')
        self.env = dict(os.environ, CONTAINERS_CONF=str(base / "containers.conf"),
                        CONTAINERS_STORAGE_CONF=str(base / "storage.conf"), TMPDIR=str(base))

    def run(self, tool, *args, check=True, timeout=120) -> subprocess.CompletedProcess:
        r = subprocess.run([tool, *map(str, args)], capture_output=True, text=True, env=self.env,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{tool} {args}: rc={r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def __call__(self, *args, **kw) -> subprocess.CompletedProcess:
        return self.run("podman", *args, **kw)

    def sh(self, image, script, *opts) -> str:
        return self("run", "--rm", "--network=none", *opts, image, "sh", "-c", script).stdout

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self("rm", "-af", "-t", "0", check=False, timeout=60)
        if shutil.which("buildah"):
            with contextlib.suppress(Exception):
                self.run("buildah", "rm", "--all", check=False, timeout=60)
        lazy_unmount_under(self.base)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="module")
def upod(tmp_path_factory):
    need("podman", "runc", "busybox")
    base = Path(tempfile.mkdtemp(prefix="uf-upod-"))
    p = UPodman(base)
    try:
        tar = base / "busybox.tar"
        subprocess.run(["bash", str(REPO / "scripts/busybox-rootfs.sh"), str(tar)], check=True,
                       capture_output=True)
        p("import", tar, "localhost/bb")
        ctx = base / "ctx"
        ctx.mkdir()
        (ctx / "Dockerfile").write_text(BASE_DOCKERFILE)
        (ctx / "note.txt").write_text("note\n")
        p("build", "--network=none", "-q", "-t", "localhost/bbx", ctx)
        yield p
    finally:
        p.cleanup()


def test_podman_run_on_unionfuse(upod):
    out = upod.sh("localhost/bbx", "awk '$5 == \"/\" {print $0}' /proc/self/mountinfo; id -u;"
                  " cat /data/note.txt /data/step; ls /data")
    assert "fuse.unionfuse" in out  # the rootfs is our mount
    assert out.split("\n")[1:] == ["0", "note", "3", "hard", "note.txt", "step", "sub", ""], out


def test_podman_diff_commit_and_run_committed(upod):
    name = "uf-diff"
    try:
        upod("run", "--name", name, "--network=none", "localhost/bbx", "sh", "-c",
             "echo new > /added && rm /data/note.txt && echo more >> /data/sub/f")
        diff = set(upod("diff", name).stdout.split("\n")) - {""}
        assert {"A /added", "D /data/note.txt", "C /data/sub/f"} <= diff, diff
        upod("commit", "-q", name, "localhost/bbx-committed")
        out = upod.sh("localhost/bbx-committed",
                      "cat /added /data/sub/f /data/hard; ls /data/note.txt 2>&1 || true")
        assert out.startswith("new\none\nmore\n"), out
        assert "No such file" in out
    finally:
        upod("rm", "-f", name, check=False)


def test_podman_beyond_fuse_overlayfs(upod):
    """What fuse-overlayfs refuses: a rename of a directory from a lower layer (EXDEV
    there), and hard links that stay one file through a copy-up; the commit keeps both."""
    name = "uf-beyond"
    try:
        out = upod("run", "--name", name, "--network=none", "localhost/bbx", "sh", "-c",
                   "mv /data/sub /data/moved && echo two >> /data/hard && cat /data/moved/f && "
                   "[ $(stat -c %i /data/hard) = $(stat -c %i /data/moved/f) ] && echo same-inode").stdout
        assert out == "one\ntwo\nsame-inode\n", out
        upod("commit", "-q", name, "localhost/bbx-beyond")
        out = upod.sh("localhost/bbx-beyond", "cat /data/moved/f; ls /data/sub 2>&1 || true")
        assert out.startswith("one\ntwo\n") and "No such file" in out, out
    finally:
        upod("rm", "-f", name, check=False)


def test_podman_two_containers_of_one_image(upod):
    names = ["uf-two-a", "uf-two-b"]
    try:
        for n in names:
            upod("run", "-d", "--name", n, "--network=none", "localhost/bbx", "sleep", "60")
        upod("exec", names[0], "sh", "-c", "echo a > /data/sub/f && touch /only-a")
        upod("exec", names[1], "sh", "-c", "echo b > /data/sub/f")
        assert upod("exec", names[0], "cat", "/data/sub/f").stdout == "a\n"
        assert upod("exec", names[1], "cat", "/data/sub/f").stdout == "b\n"
        assert upod("exec", names[1], "ls", "/only-a", check=False).returncode != 0
    finally:
        upod("rm", "-f", "-t", "0", *names, check=False)
    assert upod.sh("localhost/bbx", "cat /data/sub/f") == "one\n"  # the image is untouched


def test_podman_non_root_user(upod):
    out = upod.sh("localhost/bbx", "id -u; cat /data/step; echo hi > /tmp/mine; stat -c '%u %a' /tmp/mine;"
                  " echo x > /data/step 2>/dev/null && echo wrote || echo denied", "--user", "1000")
    assert out == "1000\n3\n1000 644\ndenied\n", out


def test_podman_build_on_unionfuse(upod, tmp_path):
    """The module fixture built localhost/bbx (4 steps that make layers) through the mount
    program; a second build on top of it, with a cache hit on the first run."""
    ctx = tmp_path / "ctx2"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(
        "FROM localhost/bbx\nRUN mv /data/sub /data/renamed && rm /data/hard\n"
        "RUN echo built >> /data/renamed/f\nWORKDIR /data\nCMD [\"cat\", \"renamed/f\"]\n")
    upod("build", "--network=none", "-q", "-t", "localhost/bbx2", ctx)
    out = upod("run", "--rm", "--network=none", "localhost/bbx2").stdout
    assert out == "one\nbuilt\n"
    assert upod.sh("localhost/bbx2", "ls /data") == "note.txt\nrenamed\nstep\n"


def test_buildah_from_run_commit(upod):
    need("buildah")
    c = upod.run("buildah", "from", "localhost/bbx").stdout.strip()
    try:
        upod.run("buildah", "run", "--network=none", c, "--", "sh", "-c",
                 "echo via-buildah > /data/b && rm /data/step")
        upod.run("buildah", "commit", "-q", c, "localhost/bbx-buildah")
    finally:
        upod.run("buildah", "rm", c, check=False)
    out = upod.sh("localhost/bbx-buildah", "cat /data/b; ls /data")
    assert out == "via-buildah\nb\nhard\nnote.txt\nsub\n", out
