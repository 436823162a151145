"""Stateful differential test: random sequences of namespace and data operations on a
small pool of names over a populated three-layer lower set, run on unionfuse and on
kernel overlayfs (redirect_dir=on,index=on).  Every step's outcome (value or errno) must
match; at the end of each example the visible trees must match, every directory must
list exactly what lookups find, and the lowers must be unchanged.

Each example gets fresh copies of the layers (cp -a from a template built once) and
fresh mounts, torn down in teardown().  Bounded to keep the file to a couple of minutes.

Knobs (environment): UNIONFUSE_STATEFUL_EXAMPLES (default 30), UNIONFUSE_STATEFUL_STEPS
(default 25), UNIONFUSE_SHRINK=1 to let hypothesis shrink a failure (slow: every shrink
step remounts), UNIONFUSE_RANDOM=1 for a fresh random seed instead of the fixed one.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

from conftest import Mounts
from layerkit import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    Pair,
    diff_dicts,
    listdir,
    lstat,
    make_template,
    read,
    renameat2,
    short,
    write,
    xattrs,
)
from unionfuse.mount import mount_entry

# -- the name pool ---------------------------------------------------------------------
# Top-level names hit files, dirs, whiteouts of both forms, opaque dirs, hard links and
# renamed-away dirs of the template (layerkit.build_lowers); plus fresh names.
TOP = ["d", "tree", "hl", "opq_oci", "opq_kern", "full", "emptydir", "shadow.txt", "kwh",
       "owh", "gone2", "dir_then_file", "file_then_dir", "m644", "xa", "x", "y"]
DIRISH = ["d", "tree", "hl", "opq_oci", "full", "emptydir", "file_then_dir", "x"]
SECOND = ["a", "b", "keep", "sub", "one", "two", "new", "old", "f1", "l2file", "z"]
THIRD = {"tree/sub": ["b", "l2sub", "deep", "z"], "d/sub": ["c", "z"], "hl/sub": ["three", "z"]}

POOL: list[str] = list(TOP)
POOL += [f"{t}/{n}" for t in DIRISH for n in SECOND]
POOL += [f"{t}/{n}" for t, names in THIRD.items() for n in names]
POOL = sorted(set(POOL))


def _children(pool: list[str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {"": set()}
    for p in pool:
        d, _, n = p.rpartition("/")
        out.setdefault(d, set()).add(n)
    return out


CHILDREN = _children(POOL)

paths = st.sampled_from(POOL)
data = st.binary(min_size=0, max_size=64)
modes = st.sampled_from([0o644, 0o600, 0o755, 0o4755, 0o2750, 0o1777, 0o000])
xnames = st.sampled_from(["user.a", "user.b"])

_TEMPLATE: tuple | None = None
_TEMPLATE_DIR: str | None = None


def template():
    global _TEMPLATE, _TEMPLATE_DIR
    if _TEMPLATE is None:
        _TEMPLATE_DIR = tempfile.mkdtemp(prefix="unionfuse-stateful-template-")
        _TEMPLATE = make_template(Path(_TEMPLATE_DIR))
    return _TEMPLATE


def J(root, p) -> str:
    return os.path.join(root, p)


def lookup_consistency(root: str) -> list[str]:
    """Every dir lists exactly what lookups find (among the pool's candidate names), and
    every listed name lstat's fine."""
    problems = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        rel = "" if rel == "." else rel
        listed = set(dirnames + filenames)
        for n in sorted(listed):
            try:
                os.lstat(os.path.join(dirpath, n))
            except OSError as e:
                problems.append(f"{rel or '.'}: listed {n!r} but lstat -> {errno.errorcode.get(e.errno)}")
        for n in sorted(CHILDREN.get(rel, ())):
            try:
                os.lstat(os.path.join(dirpath, n))
                found = True
            except OSError:
                found = False
            if found != (n in listed):
                problems.append(f"{rel or '.'}: {n!r} listed={n in listed} but lookup found={found}")
    return problems


class UnionVsKernel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.base = Path(tempfile.mkdtemp(prefix="unionfuse-stateful-"))
        self.mounts = Mounts(self.base)
        self.pair: Pair | None = None
        self.steps: list[str] = []

    @initialize()
    def mount(self):
        self.pair = Pair(self.mounts, self.base / "pair", template())

    # -- helpers -------------------------------------------------------------------

    def same(self, label: str, fn) -> None:
        ru, rk = self.pair.same(label, fn)
        self.steps.append(f"{label}: {short(ru, 120)}")
        assert ru == rk, (f"step {label!r}: unionfuse={short(ru)} kernel={short(rk)}\n"
                          "steps so far:\n  " + "\n  ".join(self.steps))

    # -- mutations -----------------------------------------------------------------

    @rule(p=paths, d=data, mode=modes)
    def create(self, p, d, mode):
        self.same(f"create {p} {mode:o}", lambda r: write(J(r, p), d, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))

    @rule(p=paths, d=data, how=st.sampled_from(["trunc", "append", "pwrite0", "pwrite5", "creat"]))
    def write(self, p, d, how):
        flags = {"trunc": os.O_WRONLY | os.O_TRUNC, "append": os.O_WRONLY | os.O_APPEND,
                 "pwrite0": os.O_WRONLY, "pwrite5": os.O_RDWR, "creat": os.O_WRONLY | os.O_CREAT}[how]
        off = {"pwrite0": 0, "pwrite5": 5}.get(how)
        self.same(f"write {p} {how} {len(d)}", lambda r: write(J(r, p), d, flags, 0o644, off))

    @rule(p=paths, size=st.sampled_from([0, 3, 100]))
    def truncate(self, p, size):
        self.same(f"truncate {p} {size}", lambda r: os.truncate(J(r, p), size))

    @rule(a=paths, b=paths, flags=st.sampled_from([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]))
    def rename(self, a, b, flags):
        self.same(f"rename {a} {b} flags={flags}", lambda r: renameat2(J(r, a), J(r, b), flags))

    @rule(a=paths, b=paths)
    def link(self, a, b):
        self.same(f"link {a} {b}", lambda r: os.link(J(r, a), J(r, b), follow_symlinks=False))

    @rule(p=paths)
    def unlink(self, p):
        self.same(f"unlink {p}", lambda r: os.unlink(J(r, p)))

    @rule(p=paths, mode=st.sampled_from([0o755, 0o700]))
    def mkdir(self, p, mode):
        self.same(f"mkdir {p}", lambda r: os.mkdir(J(r, p), mode))

    @rule(p=paths)
    def rmdir(self, p):
        self.same(f"rmdir {p}", lambda r: os.rmdir(J(r, p)))

    @rule(p=paths, mode=modes)
    def chmod(self, p, mode):
        self.same(f"chmod {p} {mode:o}", lambda r: os.chmod(J(r, p), mode, follow_symlinks=True))

    @rule(p=paths, name=xnames, value=data)
    def setxattr(self, p, name, value):
        self.same(f"setxattr {p} {name}", lambda r: os.setxattr(J(r, p), name, value, follow_symlinks=False))

    @rule(p=paths, name=xnames)
    def removexattr(self, p, name):
        self.same(f"removexattr {p} {name}", lambda r: os.removexattr(J(r, p), name, follow_symlinks=False))

    @rule(p=paths, dest=st.sampled_from(["a", "../shadow.txt", "/nonexistent"]))
    def symlink(self, p, dest):
        self.same(f"symlink {p} -> {dest}", lambda r: os.symlink(dest, J(r, p)))

    # -- observations ----------------------------------------------------------------

    @rule(p=paths)
    def observe(self, p):
        def look(r):
            path = J(r, p)
            st_ = os.lstat(path)
            if stat.S_ISDIR(st_.st_mode):
                return (lstat(path), listdir(path), xattrs(path))
            if stat.S_ISREG(st_.st_mode):
                return (lstat(path), read(path), xattrs(path))
            if stat.S_ISLNK(st_.st_mode):
                return (lstat(path), os.readlink(path))
            return (lstat(path),)
        self.same(f"observe {p}", look)

    # -- end of example --------------------------------------------------------------

    def teardown(self):
        log = os.environ.get("UNIONFUSE_STATEFUL_LOG")
        if log:
            with open(log, "a") as f:
                f.write("--- example\n" + "".join(s + "\n" for s in self.steps))
        try:
            if self.pair is not None:
                p = self.pair
                problems = []
                try:
                    tu = __import__("conftest").tree(p.u)
                    tk = __import__("conftest").tree(p.k)
                    if tu != tk:
                        problems.append("visible trees differ:\n" + "\n".join(diff_dicts(tu, tk)))
                except OSError as e:
                    problems.append(f"walking a tree failed: {e!r}")
                lu = lookup_consistency(p.u)
                if lu:
                    problems.append("unionfuse listing vs lookup:\n  " + "\n  ".join(lu))
                lk = lookup_consistency(p.k)
                if lk:
                    problems.append("(kernel) listing vs lookup:\n  " + "\n  ".join(lk))
                p.mismatches = []
                p.check_lowers()
                problems += p.mismatches
                assert not problems, ("\n".join(problems) + "\nsteps:\n  " + "\n  ".join(self.steps))
        finally:
            self.mounts.cleanup()
            if not any(mount_entry(str(m)) for m in (self.base / "pair/umnt", self.base / "pair/kmnt")):
                shutil.rmtree(self.base, ignore_errors=True)


_phases = [Phase.explicit, Phase.reuse, Phase.generate]
if os.environ.get("UNIONFUSE_SHRINK"):
    _phases.append(Phase.shrink)

TestUnionVsKernel = UnionVsKernel.TestCase
TestUnionVsKernel.settings = settings(
    max_examples=int(os.environ.get("UNIONFUSE_STATEFUL_EXAMPLES", "30")),
    stateful_step_count=int(os.environ.get("UNIONFUSE_STATEFUL_STEPS", "25")),
    deadline=None,
    derandomize=not os.environ.get("UNIONFUSE_RANDOM"),
    database=None,
    phases=_phases,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)


def teardown_module(module):
    if _TEMPLATE_DIR:
        shutil.rmtree(_TEMPLATE_DIR, ignore_errors=True)
