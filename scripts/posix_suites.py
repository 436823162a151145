#!/usr/bin/env python3
"""Run public POSIX filesystem suites against a unionfuse mount (long runs; not part of CI).

    posix_suites.py pjdfstest PJDFSTEST_CHECKOUT [--fuse-overlayfs]
    posix_suites.py fsx XFSTESTS_CHECKOUT [--ops N]
    posix_suites.py fsstress XFSTESTS_CHECKOUT [--seconds S] [--procs P]

Each run builds what it needs inside the checkout it is given (pjdfstest: autoreconf,
configure, make pjdfstest; xfstests: make configure, configure, make -C lib, make -C ltp
fsx fsstress), makes a scratch dir with a populated lower layer, an upper and a work dir,
mounts unionfuse from this repository (or --repo DIR), runs the suite with its cwd inside
the mount, unmounts, and prints the counts.  After fsstress (and fsx) it also checks that
every directory lists exactly what lookups find, that the lower layer is bit-identical to
before, and that kernel overlayfs over the same lower + upper shows the same tree.

Needs root, /dev/fuse, prove (perl), gcc, autoconf/automake/libtool and, for xfstests,
libaio-dev xfslibs-dev uuid-dev liburing-dev libacl1-dev libattr1-dev.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh(cmd, **kw):
    print("+", cmd if isinstance(cmd, str) else " ".join(cmd), flush=True)
    return subprocess.run(cmd, shell=isinstance(cmd, str), check=True, **kw)


# -- scratch layers and mounts ------------------------------------------------------------


def populate_lower(lower: str) -> None:
    """A lower layer with some of everything: files of several sizes, dirs, symlinks,
    hard links, a fifo, odd modes, xattrs, and a copy of a real tree."""
    os.makedirs(lower, exist_ok=True)
    src = "/usr/share/perl5" if os.path.isdir("/usr/share/perl5") else "/usr/share/doc"
    shutil.copytree(src, os.path.join(lower, "realtree"), symlinks=True)
    for i in range(50):
        d = os.path.join(lower, "d%02d" % (i % 7), "sub%d" % (i % 3))
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "f%d" % i), "wb") as f:
            f.write(os.urandom(i * 997))
    with open(os.path.join(lower, "big"), "wb") as f:
        f.write(os.urandom(3 << 20))
    for mode in ("mmap", "nommap"):
        with open(os.path.join(lower, "fsx.lower." + mode), "wb") as f:
            f.write(os.urandom(256 << 10))
    with open(os.path.join(lower, "hl1"), "wb") as f:
        f.write(b"hard linked\n")
    os.link(os.path.join(lower, "hl1"), os.path.join(lower, "hl2"))
    os.symlink("d00/sub0", os.path.join(lower, "symdir"))
    os.symlink("nowhere", os.path.join(lower, "dangling"))
    os.mkfifo(os.path.join(lower, "fifo"))
    p = os.path.join(lower, "suid")
    open(p, "wb").close()
    os.chmod(p, 0o4755)
    os.setxattr(p, "user.note", b"lower xattr")


def snapshot(root: str) -> dict:
    """name -> (type, mode, uid, gid, size, content hash or link target or rdev, xattrs)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames) + ([] if dirpath != root else ["."]):
            p = os.path.normpath(os.path.join(dirpath, name))
            rel = os.path.relpath(p, root)
            try:
                st = os.lstat(p)
            except FileNotFoundError:  # listed, not found (kernel overlayfs: a whiteout
                out[rel] = ("listed but not found",)  # in a dir only one layer has)
                continue
            if stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                extra = h.hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(p)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                extra = st.st_rdev
            else:
                extra = None
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
            try:
                xa = tuple(sorted((k, os.getxattr(p, k, follow_symlinks=False))
                                  for k in os.listxattr(p, follow_symlinks=False)
                                  if k.startswith("user.")))
            except OSError:
                xa = ()
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid,
                        st.st_gid, size, extra, xa)
    return out


def diff_snapshots(a: dict, b: dict, limit: int = 20) -> list[str]:
    lines = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            lines.append(f"  {k}: {a.get(k)} != {b.get(k)}")
    return lines[:limit] + ([f"  ... {len(lines) - limit} more"] if len(lines) > limit else [])


def layer_names(layers: list[str], rel: str) -> set[str]:
    names = set()
    for layer in layers:
        try:
            for n in os.listdir(os.path.join(layer, rel)):
                names.add(n[4:] if n.startswith(".wh.") else n)
        except OSError:
            pass
    return {n for n in names if n and not n.startswith(".wh.")}


def check_listing_vs_lookup(mnt: str, layers: list[str]) -> tuple[int, list[str]]:
    """Every listed name is found by lookup, and every name any layer has in that dir that
    the listing omits is not found.  Returns (dirs checked, problems)."""
    problems, ndirs = [], 0
    for dirpath, dirnames, filenames in os.walk(mnt):
        ndirs += 1
        rel = os.path.relpath(dirpath, mnt)
        listed = set(dirnames) | set(filenames)
        with os.scandir(dirpath) as it:
            listed2 = {e.name for e in it}
        if listed != listed2:
            problems.append(f"{rel}: walk and scandir disagree")
        for n in listed:
            try:
                os.lstat(os.path.join(dirpath, n))
            except OSError as e:
                problems.append(f"{rel}/{n}: listed but lookup fails: {e}")
        for n in layer_names(layers, rel) - listed:
            if os.path.lexists(os.path.join(dirpath, n)):
                problems.append(f"{rel}/{n}: found by lookup but not listed")
    return ndirs, problems


class Scratch:
    def __init__(self, repo: str, keep: bool = False):
        self.repo = repo
        self.base = tempfile.mkdtemp(prefix="uf-suite-", dir="/tmp")
        self.lower = os.path.join(self.base, "lower")
        self.upper = os.path.join(self.base, "upper")
        self.work = os.path.join(self.base, "work")
        self.mnt = os.path.join(self.base, "mnt")
        self.keep = keep
        for d in (self.upper, self.work, self.mnt):
            os.makedirs(d)
        populate_lower(self.lower)
        self.lower_before = snapshot(self.lower)
        self.mounted = None

    def mount_unionfuse(self):
        env = dict(os.environ, PYTHONPATH=self.repo)
        sh([sys.executable, "-P", "-m", "unionfuse", "mount", "--lower", self.lower,
            "--upper", self.upper, "--work", self.work, "-o", "allow_other",
            "--log", os.path.join(self.base, "daemon.log"), self.mnt], env=env, cwd=self.repo)
        self.mounted = "unionfuse"

    def mount_fuse_overlayfs(self):
        sh(["fuse-overlayfs", "-o", f"lowerdir={self.lower},upperdir={self.upper},"
            f"workdir={self.work},allow_other", self.mnt])
        self.mounted = "fuse-overlayfs"

    def mount_kernel(self, mnt: str):
        work2 = os.path.join(self.base, "kwork")
        os.makedirs(work2, exist_ok=True)
        sh(["mount", "-t", "overlay", "overlay", "-o",
            f"lowerdir={self.lower},upperdir={self.upper},workdir={work2},"
            "redirect_dir=on,index=on,xino=off", mnt])

    def umount(self):
        if self.mounted == "unionfuse":
            env = dict(os.environ, PYTHONPATH=self.repo)
            r = subprocess.run([sys.executable, "-P", "-m", "unionfuse", "umount", self.mnt],
                               env=env, cwd=self.repo)
            if r.returncode:
                subprocess.run(["fusermount3", "-u", "-z", self.mnt])
        elif self.mounted:
            subprocess.run(["fusermount3", "-u", "-z", self.mnt])
        self.mounted = None

    def check_lower(self) -> bool:
        d = diff_snapshots(self.lower_before, snapshot(self.lower))
        print("lower layer unchanged:", "yes" if not d else "NO\n" + "\n".join(d))
        return not d

    def consistency(self) -> bool:
        """While mounted: listings vs lookups, then a snapshot; after unmounting: lower
        unchanged and kernel overlayfs shows the same tree."""
        ok = True
        ndirs, problems = check_listing_vs_lookup(self.mnt, [self.upper, self.lower])
        print(f"listing == lookup: {ndirs} dirs, {len(problems)} problems")
        for p in problems[:20]:
            print("  " + p)
        ok &= not problems
        merged = snapshot(self.mnt)
        self.umount()
        ok &= self.check_lower()
        kmnt = os.path.join(self.base, "kmnt")
        os.makedirs(kmnt, exist_ok=True)
        self.mount_kernel(kmnt)
        try:
            kern = snapshot(kmnt)
        finally:
            subprocess.run(["umount", kmnt])
        d = diff_snapshots(merged, kern)
        print(f"kernel overlayfs tree == unionfuse tree ({len(merged)} entries):",
              "yes" if not d else "NO\n" + "\n".join(d))
        return ok and not d

    def cleanup(self):
        self.umount()
        if not self.keep:
            shutil.rmtree(self.base, ignore_errors=True)
        else:
            print("kept", self.base)


# -- the suites ---------------------------------------------------------------------------


def build_pjdfstest(src: str) -> None:
    if not os.path.exists(os.path.join(src, "pjdfstest")):
        sh("autoreconf -ifs && ./configure && make pjdfstest", cwd=src)


def run_pjdfstest(src: str, scr: Scratch) -> tuple[int, int, int, int, str]:
    """Returns (files, tests, failed files, failed tests, failure summary)."""
    work = os.path.join(scr.mnt, "pjd")
    os.makedirs(work, exist_ok=True)
    r = subprocess.run(["prove", "-r", os.path.join(src, "tests")], cwd=work,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = r.stdout
    m = re.search(r"Files=(\d+), Tests=(\d+)", out)
    files, tests = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    ffiles = ftests = 0
    for m in re.finditer(r"\(Wstat: (\d+) Tests: \d+ Failed: (\d+)\)", out):
        if int(m.group(1)) or int(m.group(2)):
            ffiles += 1
            ftests += int(m.group(2))
    summary = out[out.find("Test Summary Report"):] if "Test Summary Report" in out else ""
    with open(os.path.join(scr.base, "prove.log"), "w") as f:
        f.write(out)
    return files, tests, ffiles, ftests, summary


def build_xfstests(src: str) -> None:
    if not (os.path.exists(os.path.join(src, "ltp/fsx"))
            and os.path.exists(os.path.join(src, "ltp/fsstress"))):
        sh("make configure && ./configure && make -C lib && make -C ltp fsx fsstress", cwd=src)


def cmd_pjdfstest(a) -> int:
    src = os.path.abspath(a.checkout)
    build_pjdfstest(src)
    rc = 0
    for kind in ["unionfuse"] + (["fuse-overlayfs"] if a.fuse_overlayfs else []):
        scr = Scratch(a.repo, a.keep)
        try:
            scr.mount_unionfuse() if kind == "unionfuse" else scr.mount_fuse_overlayfs()
            t0 = time.monotonic()
            files, tests, ff, ft, summary = run_pjdfstest(src, scr)
            print(f"{kind}: pjdfstest Files={files} Tests={tests} failed files={ff} "
                  f"failed tests={ft} ({time.monotonic() - t0:.0f} s)")
            if summary:
                print(summary)
            rc |= bool(ft or not tests) and kind == "unionfuse"
        finally:
            scr.cleanup()
    return rc


def cmd_fsx(a) -> int:
    src = os.path.abspath(a.checkout)
    build_xfstests(src)
    fsx = os.path.join(src, "ltp/fsx")
    scr = Scratch(a.repo, a.keep)
    rc = 0
    try:
        scr.mount_unionfuse()
        # fsx.lower.*: 256 KiB lower files, kept (-k: no truncate at start), so fsx's first
        # write copies them up with their data; fsx.new.*: created in the upper.
        # fsx -R/-W turn mmap reads/writes off; the default uses both.
        runs = [(f"fsx.{where}.{mode}", flags) for where in ("lower", "new")
                for mode, flags in (("mmap", []), ("nommap", ["-R", "-W"]))]
        for name, flags in runs:
            # -k: keep the file's data; -E then, since fsx's copy-range probe copies
            # byte 0 over byte 1 after it read the file (fails on ext4 just the same)
            keep = ["-k", "-E"] if ".lower." in name else []
            cmd = [fsx, "-N", str(a.ops), "-S", "1", "-p", str(max(a.ops // 4, 1)), "-P", scr.base,
                   *keep, *flags, os.path.join(scr.mnt, name)]
            t0 = time.monotonic()
            r = subprocess.run(cmd, cwd=scr.base, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
            lines = r.stdout.strip().splitlines()
            print(f"fsx {name} {' '.join(keep + flags)}: rc={r.returncode} "
                  f"({time.monotonic() - t0:.0f} s)\n  " + "\n  ".join(lines[-4:]), flush=True)
            rc |= r.returncode != 0
        rc |= not scr.consistency()
    finally:
        scr.cleanup()
    return rc


def cmd_fsstress(a) -> int:
    src = os.path.abspath(a.checkout)
    build_xfstests(src)
    fsstress = os.path.join(src, "ltp/fsstress")
    scr = Scratch(a.repo, a.keep)
    rc = 0
    try:
        # Seed the lower layer with an fsstress tree of its own (same seed, so the run on
        # the mount reuses its names: creat truncates lower files, renames and unlinks hit
        # lower entries), then restart the checks from that lower.  No mknod there: its
        # 0/0 character devices are whiteouts in a layer.
        sh([fsstress, "-d", os.path.join(scr.lower, "stress"), "-p", str(a.procs),
            "-n", "3000", "-s", "1", "-f", "mknod=0"], stdout=subprocess.DEVNULL)
        scr.lower_before = snapshot(scr.lower)
        scr.mount_unionfuse()
        t0 = time.monotonic()
        r = subprocess.run([fsstress, "-d", os.path.join(scr.mnt, "stress"), "-p",
                            str(a.procs), "-n", "100000000", "-l", "0", "-s", "1",
                            f"--duration={a.seconds}", "-v"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        el = time.monotonic() - t0
        with open(os.path.join(scr.base, "fsstress.log"), "w") as f:
            f.write(r.stdout)
        nops = sum(1 for ln in r.stdout.splitlines() if re.match(r"\d+/\d+: ", ln))
        print(f"fsstress: rc={r.returncode}, {a.procs} procs, {nops} ops in {el:.0f} s")
        if r.returncode:
            print("\n".join(r.stdout.splitlines()[-20:]))
        rc |= r.returncode != 0
        alive = os.path.ismount(scr.mnt)
        print("mount alive after the run:", alive)
        rc |= not alive or not scr.consistency()
    finally:
        scr.cleanup()
    return rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", default=REPO, help="unionfuse checkout to mount with")
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pjdfstest")
    p.add_argument("checkout")
    p.add_argument("--fuse-overlayfs", action="store_true", help="also run fuse-overlayfs")
    p = sub.add_parser("fsx")
    p.add_argument("checkout")
    p.add_argument("--ops", type=int, default=1000000)
    p = sub.add_parser("fsstress")
    p.add_argument("checkout")
    p.add_argument("--seconds", type=int, default=600)
    p.add_argument("--procs", type=int, default=4)
    a = ap.parse_args()
    return {"pjdfstest": cmd_pjdfstest, "fsx": cmd_fsx, "fsstress": cmd_fsstress}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
