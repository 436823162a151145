"""Helpers for the differential tests: a populated multi-layer lower set, its conversion
to the kernel's whiteout forms, lower-dir snapshots, and a `Pair` that runs the same
operation on a unionfuse mount and on a kernel overlayfs mount and compares the outcome.

Layer order everywhere is top-most first: lowers[0] is l1 (top), lowers[2] is l3.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

from conftest import tree

from unionfuse.fs import copyup
from unionfuse.fs.copyup import RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT  # noqa: F401


def renameat2(src, dst, flags: int) -> None:
    """renameat2(2) on str or bytes paths (the daemon's ctypes wrapper)."""
    copyup.renameat2(os.fsencode(src), os.fsencode(dst), flags)


# -- building layers ------------------------------------------------------------------


def _w(p: Path, data: str | bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    os.chown(p, uid, gid)
    os.chmod(p, mode)
    return p


def _kwh(p: Path) -> None:
    """Kernel-form whiteout: a 0/0 character device."""
    p.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(p, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def _owh(p: Path) -> None:
    """OCI-form whiteout: an empty `.wh.NAME` file next to NAME."""
    p.parent.mkdir(parents=True, exist_ok=True)
    (p.parent / (".wh." + p.name)).write_bytes(b"")


def build_lowers(base: Path) -> list[Path]:
    """Three populated lower layers under *base*; returns [l1, l2, l3] (top-most first).

    Mixes both whiteout forms: 0/0 char devices and trusted.overlay.opaque (kernel) and
    `.wh.NAME` / `.wh..wh..opq` files (OCI)."""
    l1, l2, l3 = (base / n for n in ("l1", "l2", "l3"))
    for d in (l1, l2, l3):
        d.mkdir(parents=True)

    # ---- l3 (bottom) ----
    _w(l3 / "shadow.txt", "from l3\n")
    _w(l3 / "d/a", "l3 d/a\n")
    _w(l3 / "d/b", "l3 d/b\n")
    _w(l3 / "d/keep", "l3 d/keep\n")
    _w(l3 / "d/sub/c", "l3 d/sub/c\n")
    _w(l3 / "dir_then_file/x", "x in a dir that l2 replaces by a file\n")
    _w(l3 / "kwh", "whited out by l2 (char dev)\n")
    _w(l3 / "owh", "whited out by l2 (.wh. file)\n")
    _w(l3 / "gone1", "whited out by l1 (char dev)\n")
    _w(l3 / "opq_oci/old", "hidden by .wh..wh..opq in l2\n")
    _w(l3 / "opq_kern/old", "hidden by trusted.overlay.opaque in l2\n")
    (l3 / "emptydir").mkdir()
    _w(l3 / "full/f1", "f1\n")
    _w(l3 / "full/f2", "f2\n")
    _w(l3 / "tree/a", "tree/a\n")
    _w(l3 / "tree/sub/b", "tree/sub/b\n")
    _w(l3 / "tree/sub/deep/c", "tree/sub/deep/c\n")
    os.symlink("sub/b", l3 / "tree/link")
    _w(l3 / "low3only", "only in l3\n", 0o640)
    os.chmod(l3 / "tree/sub", 0o750)
    _w(l3 / ("L" * 255), "255-byte name in l3\n")
    _w(l3 / ("D" * 255) / "x", "inside a 255-byte dir name\n")

    # ---- l2 ----
    _w(l2 / "shadow.txt", "from l2\n")
    _w(l2 / "dir_then_file", "now a file (was a dir in l3)\n")
    _kwh(l2 / "kwh")
    _owh(l2 / "owh")
    _w(l2 / "opq_oci/new", "new in l2\n")
    (l2 / "opq_oci/.wh..wh..opq").write_bytes(b"")
    _w(l2 / "opq_kern/new", "new in l2\n")
    os.setxattr(l2 / "opq_kern", "trusted.overlay.opaque", b"y")
    _w(l2 / "hl/one", "hard-linked in l2\n")
    os.link(l2 / "hl/one", l2 / "hl/two")
    (l2 / "hl/sub").mkdir()
    os.link(l2 / "hl/one", l2 / "hl/sub/three")
    _w(l2 / "tree/l2file", "tree/l2file\n")
    _w(l2 / "tree/sub/l2sub", "tree/sub/l2sub\n")
    _w(l2 / "gone2", "whited out by l1 (.wh. file)\n")
    _w(l2 / "file_then_dir", "a file l1 replaces by a dir\n")

    # ---- l1 (top) ----
    _w(l1 / "shadow.txt", "from l1\n")
    _w(l1 / "m644", "m644\n", 0o644)
    _w(l1 / "m600", "m600\n", 0o600)
    _w(l1 / "m755", "#!/bin/sh\necho hi\n", 0o755)
    _w(l1 / "suid", "suid\n", 0o4755)
    _w(l1 / "sgid", "sgid\n", 0o2755)
    _w(l1 / "owned", "owned by 1000\n", 0o640, 1000, 1000)
    _w(l1 / "suid_owned", "suid owned by 1000\n", 0o4755, 1000, 1000)
    (l1 / "sticky").mkdir()
    os.chmod(l1 / "sticky", 0o1777)
    _w(l1 / "sticky/inner", "inner\n")
    _w(l1 / "xa", "has xattrs\n")
    os.setxattr(l1 / "xa", "user.foo", b"bar")
    os.setxattr(l1 / "xa", "user.empty", b"")
    os.symlink("shadow.txt", l1 / "lnk")
    os.symlink("nowhere/at/all", l1 / "dangling")
    os.symlink("d", l1 / "dirlnk")
    os.mkfifo(l1 / "fifo", 0o644)
    os.mknod(l1 / "chr", stat.S_IFCHR | 0o644, os.makedev(1, 3))
    os.mknod(l1 / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 200))
    _w(l1 / "d/l1only", "l1 d/l1only\n")
    _owh(l1 / "d/b")       # hides l3 d/b (OCI form)
    _kwh(l1 / "d/a")       # hides l3 d/a (kernel form)
    _kwh(l1 / "gone1")
    _owh(l1 / "gone2")
    _w(l1 / "file_then_dir/inside", "inside\n")
    _w(l1 / "n1/n2/n3/deep", "deep\n")
    _w(l1 / "hlt/p", "hard link pair in l1\n")
    os.link(l1 / "hlt/p", l1 / "hlt/q")
    _w(l1 / "tree/l1file", "tree/l1file\n")
    return [l1, l2, l3]


def convert_to_kernel(layer: Path) -> None:
    """In place: `.wh.X` -> 0/0 char dev X, `.wh..wh..opq` -> trusted.overlay.opaque=y."""
    for dirpath, dirnames, filenames in os.walk(layer):
        for name in list(filenames) + list(dirnames):
            if not name.startswith(".wh."):
                continue
            p = os.path.join(dirpath, name)
            if name == ".wh..wh..opq":
                os.unlink(p)
                os.setxattr(dirpath, "trusted.overlay.opaque", b"y")
            else:
                os.unlink(p)
                target = os.path.join(dirpath, name[4:])
                if not os.path.lexists(target):
                    os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def cp_a(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)


def make_template(base: Path) -> tuple[list[Path], list[Path]]:
    """Build the lower set once: (oci/mixed-form lowers, kernel-form lowers)."""
    mixed = build_lowers(base / "mixed")
    kern_base = base / "kernel"
    kern_base.mkdir()
    kern = []
    for p in mixed:
        cp_a(p, kern_base / p.name)
        convert_to_kernel(kern_base / p.name)
        kern.append(kern_base / p.name)
    return mixed, kern


def snapshot(root) -> dict:
    """Everything about a real dir tree (lower layers must stay byte-for-byte the same):
    per entry its lstat (minus atime), content/target and *all* xattrs incl. trusted.*."""
    root = str(root)
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [""] + sorted(dirnames + filenames) if dirpath == root else sorted(dirnames + filenames):
            p = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    extra = f.read()
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(p)
            elif stat.S_ISDIR(st.st_mode):
                extra = sorted(os.listdir(p))
            else:
                extra = st.st_rdev
            xa = sorted((k, os.getxattr(p, k, follow_symlinks=False))
                        for k in os.listxattr(p, follow_symlinks=False))
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_ino, st.st_nlink, st.st_uid, st.st_gid,
                                             st.st_size, st.st_mtime_ns, st.st_ctime_ns, extra, xa)
    return out


def diff_dicts(a: dict, b: dict, an: str = "unionfuse", bn: str = "kernel", limit: int = 40) -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k, "<absent>") != b.get(k, "<absent>"):
            out.append(f"  {short(k, 80)}: {an}={short(a.get(k, '<absent>'))} {bn}={short(b.get(k, '<absent>'))}")
    if len(out) > limit:
        out = out[:limit] + [f"  ... {len(out) - limit} more"]
    return out


# -- running the same thing on both mounts -------------------------------------------


def short(x, n: int = 300) -> str:
    r = repr(x)
    return r if len(r) <= n else r[: n - 40] + f"...<{len(r)} chars>..." + r[-30:]


def outcome(fn, *args):
    """("ok", value) or ("err", "ENAME") — errno only, never the message."""
    try:
        return ("ok", fn(*args))
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno, str(e.errno)))


def norm_stat(st: os.stat_result, nlink: bool = True) -> tuple:
    """The comparable part of a stat: type, mode, owner, size (not dirs), rdev,
    nlink (non-dirs only).  Never st_ino or times."""
    isdir = stat.S_ISDIR(st.st_mode)
    return (stat.filemode(st.st_mode), st.st_uid, st.st_gid, None if isdir else st.st_size,
            st.st_rdev, None if (isdir or not nlink) else st.st_nlink)


class Pair:
    """A unionfuse mount and a kernel overlayfs mount over equal copies of the lowers.

    `same(label, fn)` runs fn(root) on both roots and records a mismatch of outcomes;
    `finish()` compares visible trees and checks the lowers are untouched, then fails
    with every mismatch recorded on the way."""

    def __init__(self, mounts, base: Path, template: tuple[list[Path], list[Path]],
                 extra=(), kernel_opts: str = "redirect_dir=on,index=on"):
        mixed, kern = template
        self.base = base
        self.ulowers, self.klowers = [], []
        for sub, src, dst in (("u", mixed, self.ulowers), ("k", kern, self.klowers)):
            (base / sub).mkdir(parents=True)
            for p in src:
                cp_a(p, base / sub / p.name)
                dst.append(base / sub / p.name)
            for n in ("upper", "work"):
                (base / sub / n).mkdir()
        self.uupper, self.uwork = base / "u/upper", base / "u/work"
        self.kupper, self.kwork = base / "k/upper", base / "k/work"
        self.lower_before = {str(p): snapshot(p) for p in self.ulowers}
        self.klower_before = {str(p): snapshot(p) for p in self.klowers}
        self.daemon = mounts.union(self.ulowers, self.uupper, self.uwork,
                                   mountpoint=base / "umnt", extra=extra)
        self.u = str(base / "umnt")
        self.k = mounts.overlay(self.klowers, self.kupper, self.kwork, mountpoint=base / "kmnt",
                                opts=kernel_opts)
        self.mismatches: list[str] = []
        self.log: list[str] = []

    def same(self, label: str, fn, *, compare=None):
        """Run fn(root) on both; record a mismatch; return (unionfuse, kernel) outcomes."""
        ru = outcome(fn, self.u)
        rk = outcome(fn, self.k)
        eq = (compare(ru, rk) if compare else ru == rk)
        self.log.append(f"{label}: unionfuse={short(ru)} kernel={short(rk)}")
        if not eq:
            self.mismatches.append(f"{label}: unionfuse={short(ru)} kernel={short(rk)}")
        return ru, rk

    def expect(self, label: str, got, want) -> None:
        """A unionfuse-only expectation (where it deliberately differs from the kernel)."""
        if got != want:
            self.mismatches.append(f"{label} [unionfuse intended]: got {short(got)}, want {short(want)}")

    def trees(self) -> tuple[dict, dict]:
        return tree(self.u), tree(self.k)

    def check_trees(self, label: str) -> None:
        try:
            tu = tree(self.u)
        except OSError as e:
            self.mismatches.append(f"{label}: walking the unionfuse tree failed: {e!r}")
            return
        tk = tree(self.k)
        if tu != tk:
            self.mismatches.append(f"{label}: visible trees differ:\n" + "\n".join(diff_dicts(tu, tk)))

    def check_lowers(self) -> None:
        for p in self.ulowers:
            d = diff_dicts(self.lower_before[str(p)], snapshot(p), "before", "after")
            if d:
                self.mismatches.append(f"unionfuse lower {p.name} changed:\n" + "\n".join(d))
        for p in self.klowers:
            d = diff_dicts(self.klower_before[str(p)], snapshot(p), "before", "after")
            if d:
                self.mismatches.append(f"(kernel) lower {p.name} changed:\n" + "\n".join(d))

    def finish(self, label: str = "end") -> None:
        self.check_trees(label)
        self.check_lowers()
        assert not self.mismatches, "differences:\n" + "\n".join(self.mismatches)


# -- small file helpers used as step bodies -------------------------------------------


def read(p) -> bytes:
    with open(p, "rb") as f:
        return f.read()


def write(p, data: bytes, flags: int = os.O_WRONLY, mode: int = 0o644, offset: int | None = None) -> int:
    fd = os.open(p, flags, mode)
    try:
        if offset is not None:
            return os.pwrite(fd, data, offset)
        return os.write(fd, data)
    finally:
        os.close(fd)


def cached_bytes(path) -> int:
    """How much of *path* is in the page cache (fincore, util-linux-extra)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def put(p, data: bytes) -> None:
    """Create or truncate *p* and write *data*."""
    write(p, data, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)


def listdir(p) -> list[str]:
    return sorted(os.listdir(p))


def lstat(p, nlink: bool = True) -> tuple:
    return norm_stat(os.lstat(p), nlink)


def xattrs(p) -> list:
    return sorted((k, os.getxattr(p, k, follow_symlinks=False)) for k in os.listxattr(p, follow_symlinks=False))
