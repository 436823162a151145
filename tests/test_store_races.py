"""The store under concurrency (issue 15, part 5), through the real CLI on a temp store
with real mounts and runc: many `run`s of one image at once, parallel builds sharing the
build cache, rmi/prune/rm -f racing run/commit/build, two pulls of one image at once.

Each race runs a few bounded rounds.  After every round: every command either succeeded
or failed with one clear line, nothing is corrupt (every image's layers are there, every
container's image is there), and nothing is left mounted or running."""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from runner_util import REPO, UF, busybox_store, mount_points

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="containers need root")


@pytest.fixture(scope="module")
def uf(tmp_path_factory) -> UF:
    base = tmp_path_factory.mktemp("races")
    u = busybox_store(base)
    yield u
    for cid in u.cids():
        u.cleanup(cid)


@pytest.fixture(autouse=True)
def clean(uf):
    yield
    for cid in uf.cids():
        uf.cleanup(cid)


def start(uf: UF, *args: str, delay: float = 0.0) -> subprocess.Popen:
    argv = uf.argv(*args)
    if delay:
        argv = ["sh", "-c", f'sleep {delay:.3f}; exec "$@"', "sh", *argv]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(REPO), stdin=subprocess.DEVNULL)


def finish(procs: list[subprocess.Popen], timeout: float = 120) -> list[tuple[int, str, str]]:
    """Wait for every command (no deadlock: all done within *timeout*)."""
    out = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            o, e = p.communicate()
            raise AssertionError(f"hung (deadlock?): {p.args}\n{e}")
        out.append((p.returncode, o, e))
    return out


def one_line(err: str, *allowed: str) -> None:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("unionfuse: ") and "Traceback" not in err, err
    assert any(a in lines[0] for a in allowed), err


def consistent(uf: UF) -> None:
    """The store's invariants: every image's layers are in the store, every container's
    image and layers too, every name points at an image, no stray staging left by a
    finished command, and nothing of the store mounted but running containers."""
    root = Path(uf.root)
    layers = {d for d in os.listdir(root / "layers") if (root / "layers" / d / "layer.json").is_file()}
    images = {}
    for n in os.listdir(root / "images"):
        assert n.endswith(".json"), f"stray file in images/: {n}"
        images["sha256:" + n[:-5]] = json.loads((root / "images" / n).read_text())
    for iid, cfg in images.items():
        for d in cfg["rootfs"]["diff_ids"]:
            assert d.split(":")[1] in layers, f"image {iid[:19]} lost layer {d[:19]}"
    refs = json.loads((root / "refs.json").read_text()) if (root / "refs.json").exists() else {}
    for r, iid in refs.items():
        assert iid in images, f"{r} points at a removed image"
    for cid in uf.cids():
        rec = uf.rec(cid)
        for d in rec["diff_ids"]:
            assert d.split(":")[1] in layers, f"container {cid[:12]} lost layer {d[:19]}"
        assert rec["image_id"] in images, f"container {cid[:12]}'s image was removed from under it"
    running = {uf.rootfs(c) for c in uf.cids() if uf.rec(c)["state"] == "running"}
    assert [m for m in mount_points() if m.startswith(uf.root + "/") and m not in running] == []
    left = [n for n in os.listdir(root / "tmp") if not n.split("-", 1)[0] == str(os.getpid())]
    assert left == [], f"left in tmp/: {left}"


# -- many runs of one image -----------------------------------------------------------------


def test_eight_runs_at_once(uf):
    rounds = 2
    for rnd in range(rounds):
        procs = [start(uf, "run", "--rm", "busybox", "sh", "-c", f"echo {rnd}-{i} > /mine && cat /mine")
                 for i in range(8)]
        for i, (rc, out, err) in enumerate(finish(procs)):
            assert rc == 0 and out == f"{rnd}-{i}\n", (rc, out, err)
        assert uf.cids() == set()
        consistent(uf)


# -- rmi / prune racing run -----------------------------------------------------------------


def test_rmi_racing_run(uf):
    """`rmi NAME` while containers of that image start: either the rmi comes first (the
    runs then fail with 'no such image') or it is refused because a container uses it;
    a run that got its container always runs to the end."""
    outcomes = {"rmi-deleted": 0, "rmi-refused": 0, "run-ok": 0, "run-no-image": 0}
    for rnd in range(4):
        name = f"victim{rnd}"
        uf.ok("import", uf.tar, name)  # same layer, a new image id each round
        procs = [start(uf, "run", "--rm", name, "cat", "/etc/passwd", delay=random.random() * 0.3)
                 for _ in range(3)]
        procs.append(start(uf, "rmi", name, delay=random.random() * 0.4))
        res = finish(procs)
        for rc, out, err in res[:3]:
            if rc == 0:
                assert out.startswith("root:"), out
                outcomes["run-ok"] += 1
            else:
                assert rc == 125, (rc, err)
                one_line(err, "no such image")
                outcomes["run-no-image"] += 1
        rc, out, err = res[3]
        if rc == 0:
            assert "Deleted: sha256:" in out
            outcomes["rmi-deleted"] += 1
        else:
            one_line(err, "uses it")
            outcomes["rmi-refused"] += 1
            uf.ok("rmi", name)  # nothing uses it now
        assert uf.cids() == set()
        consistent(uf)
    print("rmi vs run:", outcomes)


def test_prune_racing_run_and_detached_container(uf):
    """`prune` while runs of an untagged image start and one container of it runs
    detached: prune never removes an image (or layer) a container uses, nor a container
    that is starting; the runs all succeed."""
    iid = uf.ok("import", uf.tar).strip()
    cid = uf.ok("run", "-d", iid, "sleep", "60").strip()
    try:
        for rnd in range(3):
            procs = [start(uf, "run", "--rm", iid, "sh", "-c", f"echo r{i} > /x && cat /x",
                           delay=random.random() * 0.3) for i in range(3)]
            procs += [start(uf, "prune", delay=random.random() * 0.3) for _ in range(2)]
            res = finish(procs)
            for i, (rc, out, err) in enumerate(res[:3]):
                assert rc == 0 and out == f"r{i}\n", (rc, out, err)
            for rc, out, err in res[3:]:
                assert rc == 0, err
                assert iid not in out, "prune removed an image in use"
            consistent(uf)
        assert uf.ok("inspect", iid)
        assert uf.ok("commit", cid, "fromdetached").startswith("sha256:")
    finally:
        uf("rm", "-f", cid)
    uf.ok("run", "--rm", "fromdetached", "true")
    out = uf.ok("prune")
    assert iid in out  # unused now: pruned
    consistent(uf)


# -- rm -f racing commit and run --------------------------------------------------------------


def test_rm_f_racing_commit(uf):
    """`rm -f` while `commit` reads the container's layer: the commit either gets the
    whole layer (all 2,000 files) or fails with one line; never a partial image."""
    seen = {"commit-ok": 0, "commit-no-container": 0}
    for rnd in range(3):
        name = f"big{rnd}"
        uf.ok("run", "--name", name, "busybox", "sh", "-c",
              "mkdir /d && i=0; while [ $i -lt 2000 ]; do echo $i > /d/$i; i=$((i+1)); done")
        commit = start(uf, "commit", name, f"bigimg{rnd}")
        rm = start(uf, "rm", "-f", name, delay=(0.05, 0.3, 0.0)[rnd])
        (crc, cout, cerr), (rrc, rout, rerr) = finish([commit, rm])
        assert rrc == 0, rerr
        if crc == 0:
            n = uf.ok("run", "--rm", f"bigimg{rnd}", "sh", "-c", "ls /d | wc -l").strip()
            assert n == "2000", f"commit made a partial layer: {n} files"
            seen["commit-ok"] += 1
        else:
            one_line(cerr, "no such container")
            seen["commit-no-container"] += 1
        assert uf.cids() == set()
        consistent(uf)
    print("rm -f vs commit:", seen)


def test_rm_f_racing_run_detached(uf):
    """`rm -f` of a container while `run -d` starts it: each command succeeds or fails
    with one line, and in the end nothing of it is left (mount, daemon, runtime state)."""
    for rnd in range(3):
        name = f"racer{rnd}"
        run = start(uf, "run", "-d", "--name", name, "busybox", "sleep", "30")
        rms = [start(uf, "rm", "-f", name, delay=d) for d in (0.1 * rnd, 0.2 + 0.1 * rnd)]
        res = finish([run, *rms])
        rc, out, err = res[0]
        if rc != 0:
            one_line(err, "no such", "starting")
        for rc, out, err in res[1:]:
            if rc != 0:
                one_line(err, "no such container", "starting")
        # whoever lost: a last rm -f leaves nothing behind
        r = uf("rm", "-f", name)
        if r.returncode != 0:
            one_line(r.stderr, "no such container")
        for cid in list(uf.cids()):
            assert uf.rec(cid)["name"] != name
        consistent(uf)


# -- builds ----------------------------------------------------------------------------------------


DOCKERFILE = """FROM busybox
RUN echo one > /one
COPY f /f
RUN cat /one /f > /both
"""


def test_parallel_builds_share_cache_and_prune(uf, tmp_path):
    """Three builds of one Dockerfile at once (one cache key per step), with a prune
    racing them: all succeed, the images run, and a rebuild is all cache hits."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    for rnd in range(2):
        (ctx / "f").write_text(f"content {rnd}\n")
        procs = [start(uf, "build", "-q", "-t", f"par{i}", str(ctx)) for i in range(3)]
        procs.append(start(uf, "prune", delay=0.3 + 0.3 * rnd))
        res = finish(procs, timeout=240)
        for rc, out, err in res:
            assert rc == 0, err
        for i in range(3):
            assert uf.ok("run", "--rm", f"par{i}", "cat", "/both") == f"one\ncontent {rnd}\n"
            assert len(uf.ok("history", "-q", f"par{i}").split()) >= 4
        consistent(uf)
    r = uf("build", "-t", "par-again", str(ctx))
    assert r.returncode == 0, r.stderr
    assert (r.stdout + r.stderr).count("Using cache") == 3
    for i in range(3):
        uf.ok("rmi", f"par{i}")
    uf.ok("rmi", "par-again")
    uf.ok("prune")
    consistent(uf)


# -- pulls -----------------------------------------------------------------------------------------


def test_two_pulls_of_one_image(uf, tmp_path):
    """Two `pull`s of one image into one store at once (they share the download of each
    blob): both succeed with the same image, whose layers are complete."""
    from test_oci_common import Registry

    reg = Registry(tmp_path / "registry")
    try:
        # an image with a layer big enough for the downloads to overlap
        big = tmp_path / "big"
        big.mkdir()
        (big / "blob").write_bytes(os.urandom(24 << 20))
        uf.ok("run", "--name", "mkbig", "-v", f"{big}:/src:ro", "busybox", "cp", "/src/blob", "/blob")
        uf.ok("commit", "mkbig", "bigpull")
        uf.ok("rm", "mkbig")
        name = f"{reg.host}/race/big:1"
        uf.ok("tag", "bigpull", name)
        uf.ok("push", name, "--tls-verify=false")
        want = uf.ok("run", "--rm", "bigpull", "md5sum", "/blob").split()[0]
        rounds = 3
        for rnd in range(rounds):
            fresh = UF(tmp_path / f"pulled{rnd}")
            fresh.ok("import", uf.tar, "busybox")  # the base layer is there, the big one is not
            procs = [start(fresh, "pull", name, "--tls-verify=false", "-q", delay=0.02 * i) for i in range(2)]
            res = finish(procs, timeout=240)
            ids = set()
            for rc, out, err in res:
                assert rc == 0, err
                ids.add(out.strip().splitlines()[-1])
            assert len(ids) == 1, ids
            assert fresh.ok("run", "--rm", name, "md5sum", "/blob").split()[0] == want
            downloads = Path(fresh.root) / "oci" / "downloads"
            assert os.listdir(downloads) == []
            consistent(fresh)
    finally:
        reg.stop()
