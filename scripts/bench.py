#!/usr/bin/env python3
"""unionfuse benchmark, side by side with kernel overlayfs, fuse-overlayfs and a plain dir.

    sudo python3 scripts/bench.py            # full run (several minutes)
    sudo python3 scripts/bench.py --quick    # small sizes, one repeat (about a minute)
    sudo python3 scripts/bench.py --json out.json --repeat 5 --containers

It builds deterministic lower layers once (cached in --workdir), then times each scenario
on every implementation, interleaved (scenario by scenario, implementation by
implementation), on a fresh mount each time, and prints the median of N repeats with the
min-max spread, ratios against kernel overlayfs and fuse-overlayfs, and the FUSE daemons'
CPU seconds and peak RSS per scenario.  It is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

IMPLS = ("unionfuse", "overlay", "fuse-overlayfs", "plain")


@dataclass
class Sizes:
    small_files: int
    dirs: int
    big_mib: int
    bigdir_entries: int
    untar_files: int
    rm_files: int
    churn_files: int
    write_mib: int


FULL = Sizes(20000, 1000, 1024, 20000, 5000, 5000, 5000, 1024)
QUICK = Sizes(2000, 100, 64, 2000, 500, 500, 500, 64)


# -- data set ----------------------------------------------------------------------------


def build_data(base: str, sz: Sizes) -> str:
    tag = f"v1-{sz.small_files}-{sz.dirs}-{sz.big_mib}-{sz.bigdir_entries}-{sz.untar_files}-{sz.rm_files}"
    data = os.path.join(base, "data-" + tag)
    if os.path.exists(os.path.join(data, "READY")):
        return data
    if os.path.exists(data):
        shutil.rmtree(data)
    print(f"building the data set in {data} ...", file=sys.stderr)
    rnd = random.Random(42)
    layers = [os.path.join(data, n) for n in ("l1", "l2", "l3")]
    for lay in layers:
        os.makedirs(lay)

    def blob(n: int) -> bytes:
        return rnd.randbytes(n)

    # the small-file tree: mostly in the bottom layer, some shadowed above
    per_dir = max(1, sz.small_files // sz.dirs)
    for d in range(sz.dirs):
        rel = f"tree/d{d // 50:02d}/d{d:04d}"
        for lay in layers:
            os.makedirs(os.path.join(lay, rel), exist_ok=True)
        for f in range(per_dir):
            name = os.path.join(rel, f"f{f:03d}")
            r = rnd.random()
            lay = layers[0] if r < 0.05 else layers[1] if r < 0.15 else layers[2]
            with open(os.path.join(lay, name), "wb") as fh:
                fh.write(blob(rnd.randint(1024, 8192)))
            if lay != layers[2] and rnd.random() < 0.5:  # shadowed: also below
                with open(os.path.join(layers[2], name), "wb") as fh:
                    fh.write(blob(1024))
    # one big file in the bottom layer
    with open(os.path.join(layers[2], "big"), "wb") as fh:
        chunk = blob(1 << 20)
        for _ in range(sz.big_mib):
            fh.write(chunk)
    # one big directory
    bd = os.path.join(layers[1], "bigdir")
    os.makedirs(bd)
    for i in range(sz.bigdir_entries):
        open(os.path.join(bd, f"entry{i:06d}"), "wb").close()
    # a tree to delete
    for i in range(sz.rm_files):
        p = os.path.join(layers[2], "rmme", f"d{i // 100:03d}", f"f{i:05d}")
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as fh:
            fh.write(blob(2048))
    # a tar to extract
    src = os.path.join(data, "untar-src")
    for i in range(sz.untar_files):
        p = os.path.join(src, f"d{i // 100:03d}", f"f{i:05d}")
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as fh:
            fh.write(blob(rnd.randint(512, 4096)))
    with tarfile.open(os.path.join(data, "untar.tar"), "w") as tf:
        tf.add(src, arcname="x")
    shutil.rmtree(src)
    # the plain-dir floor: the merged tree, materialised
    plain = os.path.join(data, "plain")
    os.makedirs(plain)
    for lay in reversed(layers):
        subprocess.run(["cp", "-a", "--reflink=auto", lay + "/.", plain], check=True)
    open(os.path.join(data, "READY"), "w").close()
    return data


# -- implementations ---------------------------------------------------------------------


@dataclass
class Mounted:
    impl: str
    path: str
    pid: int | None = None
    proc: subprocess.Popen | None = None
    scratch: str | None = None
    cpu0: float = 0.0
    extra: dict = field(default_factory=dict)


def _cpu(pid: int | None) -> float:
    if not pid:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def _status(pid: int | None, key: str) -> int:
    if not pid:
        return 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def mount(impl: str, data: str, scratch: str) -> Mounted:
    lowers = [os.path.join(data, n) for n in ("l1", "l2", "l3")]
    up, work, mnt = (os.path.join(scratch, n) for n in ("upper", "work", "mnt"))
    for d in (up, work, mnt):
        os.makedirs(d, exist_ok=True)
    if impl == "plain":
        # rm_tree and friends change the tree: give each run its own copy of the parts
        # that scenarios write to (the big file is appended to in place: harmless)
        return Mounted(impl, os.path.join(data, "plain"), scratch=scratch)
    if impl == "overlay":
        opts = f"lowerdir={':'.join(lowers)},upperdir={up},workdir={work}"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, mnt], check=True)
        return Mounted(impl, mnt, scratch=scratch)
    if impl == "fuse-overlayfs":
        opts = f"lowerdir={':'.join(lowers)},upperdir={up},workdir={work}"
        proc = subprocess.Popen(["fuse-overlayfs", "-f", "-o", opts, mnt],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_mounted(mnt, proc)
        return Mounted(impl, mnt, pid=proc.pid, proc=proc, scratch=scratch, cpu0=_cpu(proc.pid))
    if impl in ("unionfuse", "unionfuse-nopt"):
        from unionfuse.mount import LOG_FILE_ENV, READY_FD_ENV

        r, w = os.pipe()
        env = dict(os.environ, **{READY_FD_ENV: str(w), LOG_FILE_ENV: os.path.join(scratch, "log")})
        argv = [sys.executable, "-m", "unionfuse", "mount", "--foreground"]
        if impl == "unionfuse-nopt":  # A/B: without FUSE passthrough
            argv += ["-o", "nopassthrough"]
        for low in lowers:
            argv += ["--lower", low]
        proc = subprocess.Popen(argv + ["--upper", up, "--work", work, mnt], pass_fds=(w,), env=env,
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(w)
        ok = os.read(r, 16)
        os.close(r)
        if not ok.startswith(b"ready"):
            raise SystemExit("unionfuse did not start")
        return Mounted(impl, mnt, pid=proc.pid, proc=proc, scratch=scratch, cpu0=_cpu(proc.pid))
    raise ValueError(impl)


def _wait_mounted(mnt: str, proc: subprocess.Popen) -> None:
    for _ in range(500):
        if os.path.ismount(mnt):
            return
        if proc.poll() is not None:
            raise SystemExit(f"daemon for {mnt} exited")
        time.sleep(0.01)
    raise SystemExit(f"{mnt} did not mount")


def unmount(m: Mounted) -> None:
    if m.impl == "plain":
        return
    if m.impl == "overlay":
        subprocess.run(["umount", m.path], check=False)
    else:
        subprocess.run(["fusermount3", "-u", m.path], check=False)
        if m.proc is not None:
            try:
                m.proc.wait(30)
            except subprocess.TimeoutExpired:
                m.proc.kill()
                m.proc.wait()


def drop_caches() -> None:
    subprocess.run(["sync"], check=False)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


# -- scenarios ---------------------------------------------------------------------------


def read_file(path: str) -> int:
    n = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                return n
            n += len(b)


def walk_stat(root: str) -> int:
    n = 0
    stack = [root]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                os.lstat(e.path)
                n += 1
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
    return n


def small_files(root: str) -> list[str]:
    out = []
    for dirpath, _, files in os.walk(os.path.join(root, "tree")):
        out.extend(os.path.join(dirpath, f) for f in files)
    out.sort()
    return out


def read_all(paths: list[str]) -> None:
    for p in paths:
        with open(p, "rb") as f:
            f.read()


class Scenario:
    """setup() -> state (untimed), run(state) timed, on a fresh mount."""

    def __init__(self, name, run, setup=None, plain_reset=None):
        self.name, self.run, self.setup, self.plain_reset = name, run, setup, plain_reset


def warm_lower(data: str, *parts: str) -> None:
    """Read lower-layer files straight from the data dir (untimed), so every
    implementation starts a warm scenario with the same page cache, whichever ran first."""
    for layer in ("l1", "l2", "l3"):
        for part in parts:
            top = os.path.join(data, layer, part)
            if os.path.isfile(top):
                read_file(top)
                continue
            for dirpath, _, files in os.walk(top):
                for f in files:
                    read_file(os.path.join(dirpath, f))


def scenarios(data: str, sz: Sizes) -> list[Scenario]:
    untar = os.path.join(data, "untar.tar")

    def seq_read_cold(m):
        return read_file(os.path.join(m.path, "big"))

    def warm_big(m):
        read_file(os.path.join(m.path, "big"))

    def churn(m):
        d = os.path.join(m.path, f"churn{os.getpid()}")
        os.mkdir(d)
        for i in range(sz.churn_files):
            p = os.path.join(d, f"f{i}")
            with open(p, "wb") as f:
                f.write(b"x")
            os.rename(p, p + ".r")
            os.unlink(p + ".r")
        os.rmdir(d)

    def seq_write(m):
        p = os.path.join(m.path, f"written{os.getpid()}")
        buf = b"\xa5" * (1 << 20)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for _ in range(sz.write_mib):
            os.write(fd, buf)
        os.fsync(fd)
        os.close(fd)
        m.extra["cleanup"] = p

    def copy_up(m):
        fd = os.open(os.path.join(m.path, "big"), os.O_WRONLY | os.O_APPEND)
        os.write(fd, b"!")
        os.close(fd)

    def untar_write(m):
        dst = os.path.join(m.path, f"untar{os.getpid()}")
        os.mkdir(dst)
        subprocess.run(["tar", "-xf", untar, "-C", dst], check=True)
        m.extra["cleanup"] = dst

    def rm_tree(m):
        subprocess.run(["rm", "-rf", os.path.join(m.path, "rmme")], check=True)

    def plain_rm_reset(data_, m):
        dst = os.path.join(m.path, "rmme")
        if not os.path.exists(dst):
            subprocess.run(["cp", "-a", os.path.join(data_, "l3", "rmme"), dst], check=True)

    return [
        Scenario("seq_read_cold", seq_read_cold, setup=lambda m: drop_caches()),
        Scenario("seq_read_warm", warm_big, setup=warm_big),
        Scenario("tree_stat", lambda m: walk_stat(m.path), setup=lambda m: drop_caches()),
        Scenario("tree_stat_warm", lambda m: walk_stat(m.path), setup=lambda m: walk_stat(m.path)),
        Scenario("readdir_big", lambda m: os.listdir(os.path.join(m.path, "bigdir"))),
        Scenario("small_read", lambda m: read_all(m.extra["files"]),
                 setup=lambda m: (warm_lower(data, "tree"), m.extra.update(files=small_files(m.path)))),
        Scenario("small_read_warm", lambda m: read_all(m.extra["files"]),
                 setup=lambda m: (m.extra.update(files=small_files(m.path)), read_all(m.extra["files"]))),
        Scenario("copy_up_big", copy_up, setup=lambda m: warm_lower(data, "big")),
        Scenario("untar_write", untar_write, setup=lambda m: read_file(untar)),
        Scenario("rm_tree", rm_tree, plain_reset=plain_rm_reset),
        Scenario("meta_churn", churn),
        Scenario("seq_write", seq_write),
    ]


def run_one(impl: str, sc: Scenario, data: str, base: str) -> dict:
    scratch = tempfile.mkdtemp(prefix=f"{impl}-", dir=base)
    m = mount(impl, data, scratch)
    try:
        if impl == "plain" and sc.plain_reset:
            sc.plain_reset(data, m)
        if sc.setup:
            sc.setup(m)
        # earlier runs' dirty pages (GiBs of them) would be written back during this one
        os.sync()
        cpu0 = _cpu(m.pid)
        t0 = time.perf_counter()
        sc.run(m)
        dt = time.perf_counter() - t0
        cpu = _cpu(m.pid) - cpu0
        rss = _status(m.pid, "VmHWM")
        res = {"seconds": dt, "daemon_cpu": cpu, "daemon_peak_rss": rss}
        if impl == "plain" and "cleanup" in m.extra:
            p = m.extra["cleanup"]
            shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)
        return res
    finally:
        unmount(m)
        shutil.rmtree(scratch, ignore_errors=True)


def memory_probe(data: str, base: str) -> dict:
    """unionfuse's RSS after walking the whole tree, and after the kernel forgets it."""
    scratch = tempfile.mkdtemp(prefix="mem-", dir=base)
    m = mount("unionfuse", data, scratch)
    try:
        walk_stat(m.path)
        peak = _status(m.pid, "VmRSS")
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2\n")  # dentries and inodes: the kernel sends FORGETs
        time.sleep(1.0)
        after = _status(m.pid, "VmRSS")
        return {"rss_after_walk": peak, "rss_after_forget": after, "vmhwm": _status(m.pid, "VmHWM")}
    finally:
        unmount(m)
        shutil.rmtree(scratch, ignore_errors=True)


# -- container level ---------------------------------------------------------------------


BUILD_DOCKERFILE = """FROM busybox
ENV GREETING=hello
WORKDIR /app
COPY hello.sh ./hello
RUN chmod 0755 /app/hello && echo built > /app/build-info
CMD ["/app/hello"]
"""


def container_bench(base: str, repeat: int) -> dict:
    """`run --rm busybox true` and a small build (cold: --no-cache; fully cached) for
    unionfuse and podman, interleaved: every repeat runs each command once, in turn (this
    machine's noise is larger than the differences).  Each command gets one untimed
    warm-up run first (for unionfuse that starts the zygote, see unionfuse/zygote.py).
    unionfuse runs with its default runtime (runc, podman's runtime here too) and with crun;
    the run without a zygote is timed too."""
    root = os.path.join(base, "store")
    tar = os.path.join(base, "busybox.tar")
    if not os.path.exists(tar):
        subprocess.run(["bash", os.path.join(REPO, "scripts", "busybox-rootfs.sh"), tar], check=True)
    ctx = os.path.join(base, "buildctx")
    os.makedirs(ctx, exist_ok=True)
    with open(os.path.join(ctx, "Dockerfile"), "w") as f:
        f.write(BUILD_DOCKERFILE)
    with open(os.path.join(ctx, "hello.sh"), "w") as f:
        f.write("#!/bin/sh\necho \"$GREETING\"\n")
    zdir = tempfile.mkdtemp(prefix="zygote-", dir=base)
    env = dict(os.environ, UNIONFUSE_ZYGOTE_DIR=zdir)
    uf = [sys.executable, "-m", "unionfuse", "--root", root]
    cmds = {  # name: (argv, env)
        "unionfuse_run_true": (uf + ["run", "--rm", "busybox", "true"], env),
        "unionfuse_run_true_no_zygote": (uf + ["run", "--rm", "busybox", "true"],
                                         dict(env, UNIONFUSE_NO_ZYGOTE="1")),
        "unionfuse_build_cold": (uf + ["build", "--no-cache", "-q", "-t", "benchimg", ctx], env),
        "unionfuse_build_cached": (uf + ["build", "-q", "-t", "benchimg", ctx], env),
    }
    if shutil.which("crun"):
        cmds["unionfuse_run_true_crun"] = (uf + ["run", "--runtime", "crun", "--rm", "busybox", "true"], env)
    subprocess.run(uf + ["import", tar, "busybox"], check=True, stdout=subprocess.DEVNULL, cwd=REPO)
    if shutil.which("podman"):
        pdir = os.path.join(base, "podman")
        os.makedirs(pdir, exist_ok=True)
        with open(os.path.join(pdir, "containers.conf"), "w") as f:
            f.write('[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
                    '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n')
        with open(os.path.join(pdir, "storage.conf"), "w") as f:
            f.write(f'[storage]\ndriver = "overlay"\ngraphroot = "{pdir}/graph"\nrunroot = "{pdir}/run"\n')
        penv = dict(os.environ, CONTAINERS_CONF=os.path.join(pdir, "containers.conf"),
                    CONTAINERS_STORAGE_CONF=os.path.join(pdir, "storage.conf"))
        subprocess.run(["podman", "import", tar, "busybox"], env=penv, check=True, stdout=subprocess.DEVNULL)
        pb = ["podman", "build", "--network=none", "-q", "-t", "benchimg"]
        cmds["podman_run_true"] = (["podman", "run", "--rm", "--network=none", "busybox", "true"], penv)
        cmds["podman_build_cold"] = (pb[:2] + ["--no-cache"] + pb[2:] + [ctx], penv)
        cmds["podman_build_cached"] = (pb + [ctx], penv)
    times: dict = {k: [] for k in cmds}
    try:
        for argv, e in cmds.values():  # warm-up
            subprocess.run(argv, check=True, env=e, cwd=REPO, stdout=subprocess.DEVNULL)
        for _ in range(repeat):
            for k, (argv, e) in cmds.items():
                t0 = time.perf_counter()
                subprocess.run(argv, check=True, env=e, cwd=REPO, stdout=subprocess.DEVNULL)
                times[k].append(time.perf_counter() - t0)
    finally:
        for pidfile in glob.glob(os.path.join(zdir, "zygote-*.pid")):
            try:
                os.kill(int(open(pidfile).read()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        shutil.rmtree(zdir, ignore_errors=True)  # (a stopping zygote removes its own files)
    return {k: {"median": statistics.median(t), "min": min(t), "max": max(t)} for k, t in times.items() if t}


# -- report ------------------------------------------------------------------------------


def summarise(results: dict, impls: list[str]) -> dict:
    out = {}
    for sc, per in results.items():
        row = {}
        for impl in impls:
            runs = per.get(impl, [])
            if not runs:
                continue
            secs = [r["seconds"] for r in runs]
            row[impl] = {
                "median": statistics.median(secs), "min": min(secs), "max": max(secs),
                "daemon_cpu": statistics.median(r["daemon_cpu"] for r in runs),
                "daemon_peak_rss": max(r["daemon_peak_rss"] for r in runs),
            }
        out[sc] = row
    return out


def print_table(summary: dict, impls: list[str]) -> None:
    def cell(r):
        return f"{r['median'] * 1000:8.1f} ({r['min'] * 1000:.0f}-{r['max'] * 1000:.0f})"

    hdr = f"{'scenario':16}" + "".join(f"{i + ' ms':>24}" for i in impls)
    hdr += f"{'uf/kernel':>11}{'uf/fuse-ovl':>12}{'fovl/kernel':>12}{'uf cpu s':>10}{'uf rss MB':>10}"
    print(hdr)
    for sc, row in summary.items():
        line = f"{sc:16}" + "".join(f"{cell(row[i]):>24}" if i in row else f"{'-':>24}" for i in impls)

        def ratio(a, b):
            return f"{row[a]['median'] / row[b]['median']:.2f}" if a in row and b in row and row[b]["median"] else "-"

        line += f"{ratio('unionfuse', 'overlay'):>11}{ratio('unionfuse', 'fuse-overlayfs'):>12}"
        line += f"{ratio('fuse-overlayfs', 'overlay'):>12}"
        u = row.get("unionfuse")
        line += f"{u['daemon_cpu']:>10.2f}{u['daemon_peak_rss'] / 1e6:>10.1f}" if u else ""
        print(line)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    ap.add_argument("--repeat", type=int, help="repeats per scenario (default 3; 1 with --quick)")
    ap.add_argument("--impls", default=",".join(IMPLS),
                    help="comma-separated; also unionfuse-nopt (unionfuse -o nopassthrough)")
    ap.add_argument("--scenarios", help="comma-separated subset")
    ap.add_argument("--workdir", default="/var/tmp/unionfuse-bench", help="data set and scratch")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--containers", action="store_true",
                    help="also time `run --rm busybox true` and a small build (cold, cached) vs podman")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench.py: run as root (mounts, drop_caches)", file=sys.stderr)
        return 1
    sz = QUICK if a.quick else FULL
    repeat = a.repeat or (1 if a.quick else 3)
    impls = [i for i in a.impls.split(",") if i]
    if "fuse-overlayfs" in impls and not shutil.which("fuse-overlayfs"):
        print("fuse-overlayfs not installed: skipped", file=sys.stderr)
        impls.remove("fuse-overlayfs")
    os.makedirs(a.workdir, exist_ok=True)
    data = build_data(a.workdir, sz)
    scs = scenarios(data, sz)
    if a.scenarios:
        want = set(a.scenarios.split(","))
        scs = [s for s in scs if s.name in want]
    results: dict = {s.name: {i: [] for i in impls} for s in scs}
    for rep in range(repeat):
        for sc in scs:
            k = rep % len(impls)  # rotate: each implementation goes first in turn
            order = impls[k:] + impls[:k]
            for impl in order:
                r = run_one(impl, sc, data, a.workdir)
                results[sc.name][impl].append(r)
                print(f"  {sc.name:16} {impl:15} {r['seconds'] * 1000:9.1f} ms", file=sys.stderr)
    summary = summarise(results, impls)
    print_table(summary, impls)
    report = {"sizes": sz.__dict__, "repeat": repeat, "scenarios": summary}
    if "unionfuse" in impls:
        report["memory"] = memory_probe(data, a.workdir)
        mem = report["memory"]
        print(f"\nunionfuse memory: RSS {mem['rss_after_walk'] / 1e6:.1f} MB after walking the tree, "
              f"{mem['rss_after_forget'] / 1e6:.1f} MB after the kernel forgot it (peak {mem['vmhwm'] / 1e6:.1f} MB)")
    if a.containers:
        report["containers"] = container_bench(a.workdir, max(repeat, 5))
        for k, v in report["containers"].items():
            print(f"{k:30} {v['median'] * 1000:8.1f} ms ({v['min'] * 1000:.0f}-{v['max'] * 1000:.0f})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
