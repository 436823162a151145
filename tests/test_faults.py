"""Faults (issue 15, part 4): `kill -9` of the daemon in the middle of a large copy-up, of
renames of lower directories, of hard-link index work; of `commit` and `build` (and of
the daemon under a build step); and an upper that fills up.

After a kill the FUSE mount is dead (ENOTCONN): it is lazily unmounted and the same
upper/work mounted again.  The remount must show every file either as it was before the
interrupted operation or as after it, never half-made, no work files, and the work dir's
scratch space must be empty again.  Operations the writer saw complete (and fsync'd)
must be there."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from runner_util import UF, busybox_store, mount_points

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")


def kill_and_remount(mounts, d, lowers, upper, work):
    """SIGKILL the daemon, check the mount is dead, detach it, mount the same dirs."""
    os.kill(d.pid, signal.SIGKILL)
    d.proc.wait(10)
    with pytest.raises(OSError) as ei:
        os.listdir(os.path.join(d.mountpoint, "never-seen-before"))
    assert ei.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    subprocess.run(["fusermount3", "-u", "-z", d.mountpoint], check=True, capture_output=True)
    return mounts.union(lowers, upper, work, mountpoint=d.mountpoint)


def scratch(work) -> list[str]:
    """What the daemon's scratch dir holds (must be empty after a mount)."""
    return os.listdir(os.path.join(work, "unionfuse", "tmp"))


def worker(script: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=str(REPO))


def wait_lines(p: subprocess.Popen, n: int, timeout: float = 30) -> list[str]:
    lines = []
    end = time.monotonic() + timeout
    while len(lines) < n and time.monotonic() < end:
        line = p.stdout.readline()
        if not line:
            break
        lines.append(line.strip())
    return lines


def drain(p: subprocess.Popen, lines: list[str]) -> list[str]:
    """The worker's remaining progress lines (it dies of ENOTCONN after the kill)."""
    out, _ = p.communicate(timeout=30)
    return lines + [x.strip() for x in out.splitlines() if x.strip()]


# -- a large copy-up ------------------------------------------------------------------------


def pattern(size: int) -> bytes:
    """*size* bytes where every MiB is different (a partial copy can't look whole)."""
    return b"".join(hashlib.sha256(b"%d" % i).digest() * (1 << 15) for i in range(size >> 20))


OPEN_APPEND = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)
os.write(fd, b"appended")
os.fsync(fd)
print("done", flush=True)
"""


def test_kill_during_large_copy_up(mounts, dirs):
    size = 192 << 20
    data = pattern(size)
    (dirs["l1"] / "big").write_bytes(data)
    (dirs["l1"] / "small").write_text("small\n")
    lowers, upper, work = [dirs["l1"]], dirs["upper"], dirs["work"]
    tmpdir = work / "unionfuse" / "tmp"
    caught = []
    for rnd, frac in enumerate((0.1, 0.5, 0.9)):
        d = mounts.union(lowers, upper, work, mountpoint=dirs["l1"].parent / "mnt")
        assert scratch(work) == []
        p = worker(OPEN_APPEND, Path(d.mountpoint) / "big")
        # wait until the copy in the work dir has reached *frac* of the file
        end = time.monotonic() + 30
        seen = 0
        while time.monotonic() < end and p.poll() is None:
            names = os.listdir(tmpdir)
            if names:
                try:
                    seen = os.stat(tmpdir / names[0]).st_size
                except FileNotFoundError:
                    continue
                if seen >= frac * size:
                    break
        os.kill(d.pid, signal.SIGKILL)
        d.proc.wait(10)
        out = p.communicate(timeout=30)[0]
        caught.append(0 < seen < size and "done" not in out)
        subprocess.run(["fusermount3", "-u", "-z", d.mountpoint], check=True, capture_output=True)
        d = mounts.union(lowers, upper, work, mountpoint=d.mountpoint)
        assert scratch(work) == []  # the half-made copy is gone
        got = (Path(d.mountpoint) / "big").read_bytes()
        assert got in (data, data + b"appended"), f"round {rnd}: partial file of {len(got)} bytes"
        if (upper / "big").exists():  # if it is in the upper, it is whole
            assert (upper / "big").stat().st_size in (size, size + 8)
        assert sorted(os.listdir(d.mountpoint)) == ["big", "small"]
        d.stop()
    assert any(caught), "never killed mid-copy"
    # and the copy-up completes on a healthy mount
    d = mounts.union(lowers, upper, work, mountpoint=dirs["l1"].parent / "mnt")
    with open(Path(d.mountpoint) / "big", "ab") as f:
        f.write(b"!")
    assert (Path(d.mountpoint) / "big").read_bytes()[-1:] == b"!"
    assert (Path(d.mountpoint) / "big").stat().st_size in (size + 1, size + 9)


# -- renames of lower directories -----------------------------------------------------------------

RENAMES = """
import os, sys
m, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    dst = f"{m}/r{i}" if i % 2 == 0 else f"{m}/e/r{i}"
    os.rename(f"{m}/d{i}", dst)
    print(i, flush=True)
"""


def test_kill_during_lower_dir_renames(mounts, dirs, tmp_path):
    n = 60
    low = dirs["l1"]
    (low / "e").mkdir()
    (low / "e" / "keep").write_text("keep\n")
    for i in range(n):
        (low / f"d{i}" / "sub").mkdir(parents=True)
        (low / f"d{i}" / "f").write_text(f"f{i}\n")
        (low / f"d{i}" / "sub" / "g").write_text(f"g{i}\n")
    lowers, upper, work = [low], dirs["upper"], dirs["work"]
    d = mounts.union(lowers, upper, work)
    p = worker(RENAMES, d.mountpoint, n)
    lines = wait_lines(p, random.randint(5, 25))
    d = kill_and_remount(mounts, d, lowers, upper, work)
    done = {int(x) for x in drain(p, lines)}
    assert 0 < len(done) < n, "the kill came before or after all the renames"
    assert scratch(work) == []
    m = Path(d.mountpoint)

    def check(view: Path, where: str) -> None:
        names = set(os.listdir(view))
        assert names <= {"e"} | {f"d{i}" for i in range(n)} | {f"r{i}" for i in range(0, n, 2)}, \
            f"{where}: stray names {sorted(names)}"
        enames = set(os.listdir(view / "e"))
        assert enames <= {"keep"} | {f"r{i}" for i in range(1, n, 2)}, f"{where}: stray {sorted(enames)}"
        for i in range(n):
            old = view / f"d{i}"
            new = view / (f"r{i}" if i % 2 == 0 else f"e/r{i}")
            assert old.exists() != new.exists(), f"{where}: d{i} at {old.exists() + new.exists()} places"
            assert not (i in done and old.exists()), f"{where}: completed rename of d{i} undone"
            at = new if new.exists() else old
            assert sorted(os.listdir(at)) == ["f", "sub"], f"{where}: {at} lost entries"
            assert (at / "f").read_text() == f"f{i}\n" and (at / "sub" / "g").read_text() == f"g{i}\n"

    check(m, "remount")
    # the same upper through kernel overlayfs (redirect_dir): the same tree
    kwork = tmp_path / "kwork"
    kwork.mkdir()
    kmnt = mounts.overlay(lowers, upper, kwork, opts="redirect_dir=on")
    check(Path(kmnt), "kernel overlayfs")
    subprocess.run(["umount", kmnt], check=True)
    # renaming the rest works
    for i in range(n):
        if (m / f"d{i}").exists():
            os.rename(m / f"d{i}", m / (f"r{i}" if i % 2 == 0 else f"e/r{i}"))
    assert not any((m / f"d{i}").exists() for i in range(n))


# -- hard-link index --------------------------------------------------------------------------------

LINKS = """
import os, sys
m, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    g = f"{m}/g{i}"
    with open(f"{g}/a", "ab") as f:
        f.write(b"more\\n")
        f.flush()
        os.fsync(f.fileno())
    print(i, 1, flush=True)
    os.link(f"{g}/a", f"{g}/d")
    print(i, 2, flush=True)
    os.unlink(f"{g}/b")
    print(i, 3, flush=True)
"""


def test_kill_during_hard_link_index_work(mounts, dirs):
    """Lower files with three names each: append to one name (the group is copied up
    into the index, every name linked to it), link a fourth name, unlink one; killed at
    a random step.  Each group is then in one of the four states, all its names one
    inode with the right link count."""
    n = 30
    low = dirs["l1"]
    for i in range(n):
        g = low / f"g{i}"
        g.mkdir()
        (g / "a").write_text(f"orig{i}\n")
        os.link(g / "a", g / "b")
        os.link(g / "a", g / "c")
    lowers, upper, work = [low], dirs["upper"], dirs["work"]
    for rnd in range(2):
        if rnd:  # a fresh upper each round
            for p_ in (upper, work):
                subprocess.run(["rm", "-rf", str(p_)], check=True)
                p_.mkdir()
        d = mounts.union(lowers, upper, work, mountpoint=low.parent / "mnt")
        p = worker(LINKS, d.mountpoint, n)
        lines = wait_lines(p, random.randint(10, 60))
        d = kill_and_remount(mounts, d, lowers, upper, work)
        progress = {}
        for x in drain(p, lines):
            i, step = map(int, x.split())
            progress[i] = step
        assert scratch(work) == []
        m = Path(d.mountpoint)
        states = [({"a", "b", "c"}, "orig{}\n"), ({"a", "b", "c"}, "orig{}\nmore\n"),
                  ({"a", "b", "c", "d"}, "orig{}\nmore\n"), ({"a", "c", "d"}, "orig{}\nmore\n")]
        for i in range(n):
            g = m / f"g{i}"
            names = set(os.listdir(g))
            sts = {nm: os.stat(g / nm) for nm in names}
            content = {(g / nm).read_text() for nm in names}
            assert len(content) == 1, f"g{i}: names differ: {content}"
            found = [k for k, (nms, c) in enumerate(states) if nms == names and c.format(i) in content]
            assert found, f"g{i}: not a before/after state: {sorted(names)} {content}"
            assert found[0] >= progress.get(i, 0), f"g{i}: completed step lost"
            assert len({st.st_ino for st in sts.values()}) == 1, f"g{i}: names split into inodes"
            assert {st.st_nlink for st in sts.values()} == {len(names)}, \
                f"g{i}: nlink {[st.st_nlink for st in sts.values()]} for {sorted(names)}"
        # the rest of the work completes on the new mount
        for i in range(n):
            g = m / f"g{i}"
            if (g / "b").exists():
                os.unlink(g / "b")
            assert os.stat(g / "a").st_nlink == len(os.listdir(g))
        d.stop()


# -- an upper that fills up ------------------------------------------------------------------------


def test_full_upper_gives_enospc_and_loses_nothing(mounts, dirs, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(small)], check=True)
    try:
        upper, work = small / "upper", small / "work"
        upper.mkdir()
        work.mkdir()
        low = dirs["l1"]
        lowbig = os.urandom(3 << 20)
        (low / "lowbig").write_bytes(lowbig)
        (low / "lowsmall").write_text("lower\n")
        d = mounts.union([low], upper, work)
        m = Path(d.mountpoint)
        keep = os.urandom(1 << 20)
        (m / "keep").write_bytes(keep)
        # fill it: the writer sees ENOSPC (from write, fsync or close), not EIO
        err = None
        f = open(m / "filler", "wb")
        try:
            for _ in range(64):
                f.write(b"\xab" * (256 << 10))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            err = e
        finally:
            try:
                f.close()
            except OSError as e:
                err = err or e
        assert err is not None and err.errno == errno.ENOSPC, err
        # a copy-up that does not fit: ENOSPC, the lower file still whole, no scratch left
        with pytest.raises(OSError) as ei:
            with open(m / "lowbig", "ab") as g:
                g.write(b"x")
        assert ei.value.errno == errno.ENOSPC
        assert (m / "lowbig").read_bytes() == lowbig
        assert not (upper / "lowbig").exists()
        assert scratch(work) == []
        # an existing file's data is intact; a write into it that does not fit fails cleanly
        assert (m / "keep").read_bytes() == keep
        assert (m / "lowsmall").read_text() == "lower\n"
        # space back (once the kernel forgets the deleted inode: FORGET is asynchronous,
        # and the daemon keeps a deleted file's data while the kernel may still use it)
        os.unlink(m / "filler")
        end = time.monotonic() + 10
        while os.statvfs(small).f_bavail * os.statvfs(small).f_frsize < (4 << 20) and time.monotonic() < end:
            time.sleep(0.05)
        with open(m / "lowbig", "ab") as g:
            g.write(b"x")
        assert (m / "lowbig").read_bytes() == lowbig + b"x"
        (m / "new").write_text("new\n")
        d.stop()
        d = mounts.union([low], upper, work, mountpoint=m)
        assert (m / "keep").read_bytes() == keep
        assert (m / "lowbig").read_bytes() == lowbig + b"x"
        assert sorted(os.listdir(m)) == ["keep", "lowbig", "lowsmall", "new"]
        d.stop()
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)


# -- commit and build killed midway ----------------------------------------------------------------


@pytest.fixture(scope="module")
def uf(tmp_path_factory) -> UF:
    base = tmp_path_factory.mktemp("faults")
    u = busybox_store(base)
    yield u
    for cid in u.cids():
        u.cleanup(cid)


def store_sane(uf: UF) -> None:
    """No half-made layer or image visible; images/history/ps work; nothing mounted."""
    root = Path(uf.root)
    for name in os.listdir(root / "layers"):
        assert (root / "layers" / name / "layer.json").is_file(), f"half-made layer {name}"
    layers = set(os.listdir(root / "layers"))
    for n in os.listdir(root / "images"):
        assert n.endswith(".json"), f"half-written image file {n}"
        cfg = json.loads((root / "images" / n).read_text())
        assert all(x.split(":")[1] in layers for x in cfg["rootfs"]["diff_ids"])
    uf.ok("images", "-a")
    uf.ok("history", "busybox")
    uf.ok("ps", "-a")


def test_commit_killed_midway(uf):
    uf.ok("run", "--name", "many", "busybox", "sh", "-c",
          "mkdir /d && i=0; while [ $i -lt 3000 ]; do echo $i > /d/$i; i=$((i+1)); done")
    before_images = set(os.listdir(Path(uf.root) / "images"))
    killed = 0
    for delay in (0.15, 0.3, 0.5):
        p = subprocess.Popen(uf.argv("commit", "many", "committed"), cwd=str(REPO),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(delay)
        p.kill()
        p.communicate(timeout=30)
        killed += p.returncode == -signal.SIGKILL
        new = set(os.listdir(Path(uf.root) / "images")) - before_images
        if new:  # it finished first: then the image is whole
            assert ["committed", "latest"] in [ln.split()[:2] for ln in uf.ok("images").splitlines()]
            assert uf.ok("run", "--rm", "committed", "sh", "-c", "ls /d | wc -l").strip() == "3000"
            uf.ok("rmi", "committed")
            uf.ok("prune")
        store_sane(uf)
        assert "committed" not in uf.ok("images")
    assert killed, "commit always finished before the kill"
    assert os.listdir(Path(uf.root) / "tmp") == []  # the next command cleaned up after it
    # a retry succeeds
    uf.ok("commit", "many", "committed")
    assert uf.ok("run", "--rm", "committed", "sh", "-c", "ls /d | wc -l").strip() == "3000"
    assert len(uf.ok("history", "-q", "committed").split()) == 2
    uf.ok("rm", "many")
    uf.ok("rmi", "committed")


def _wait_running_step(uf: UF, word: str, timeout: float = 30) -> dict:
    """The record of the build's running RUN step whose command has *word*."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for cid in uf.cids():
            try:
                rec = uf.rec(cid)
            except (OSError, ValueError):
                continue
            if rec["state"] == "running" and rec.get("daemon_pid") and word in " ".join(rec["argv"]):
                return rec
        time.sleep(0.02)
    raise AssertionError("the build's RUN step never started")


BUILD = """FROM busybox
RUN echo one > /one
RUN sleep 1 && echo two > /two
COPY f /f
"""


@pytest.mark.parametrize("victim", ["build", "daemon"])
def test_build_killed_midway(uf, tmp_path, victim):
    """kill -9 of `build` (or of the daemon under its RUN step) while a step runs: no
    half-made image, the step's leftovers are cleaned by the next commands, and the
    retry builds (reusing the steps that completed)."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(BUILD)
    (ctx / "f").write_text("f\n")
    p = subprocess.Popen(uf.argv("build", "-t", "killed", str(ctx)), cwd=str(REPO),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        rec = _wait_running_step(uf, "sleep")  # the second RUN step
        if victim == "build":
            p.kill()
        else:
            os.kill(rec["daemon_pid"], signal.SIGKILL)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    if victim == "build":
        assert p.returncode == -signal.SIGKILL
    else:
        assert p.returncode != 0
        lines = [x for x in err.splitlines() if x.startswith("unionfuse: ")]
        assert len(lines) == 1 and "Traceback" not in err, err
    assert "killed:latest" not in uf.ok("images")
    store_sane(uf)  # (ps -a notices the dead step: unmounted, runtime state gone)
    assert [m for m in mount_points() if m.startswith(uf.root + "/")] == []
    r = uf("build", "-t", "killed", str(ctx))
    assert r.returncode == 0, r.stderr
    assert "Using cache" in r.stdout + r.stderr  # the first RUN completed before the kill
    assert uf.ok("run", "--rm", "killed", "cat", "/one", "/two", "/f") == "one\ntwo\nf\n"
    uf.ok("rmi", "killed")
    uf.ok("prune")
    store_sane(uf)
    assert uf.cids() == set()
    assert [m for m in mount_points() if m.startswith(uf.root + "/")] == []
