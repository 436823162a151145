"""Stateful differential test: random sequences of namespace and data operations on a
small pool of names over a populated three-layer lower set, run on unionfuse and on
kernel overlayfs (redirect_dir=on,index=on).  Every step's outcome (value or errno) must
match; at the end of each example the visible trees must match, every directory must
list exactly what lookups find, and the lowers must be unchanged.

Each example gets fresh copies of the layers (cp -a from a template built once) and
fresh mounts, torn down in teardown().  Bounded to keep the file to a couple of minutes.

Knobs (environment): UNIONFUSE_STATEFUL_EXAMPLES (default 40), UNIONFUSE_STATEFUL_STEPS
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

MODES = [0o644, 0o600, 0o755, 0o4755, 0o2750, 0o1777, 0o000]
XNAMES = ["user.a", "user.b"]

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


def observe(path: str):
    st_ = os.lstat(path)
    if stat.S_ISDIR(st_.st_mode):
        return (lstat(path), listdir(path), xattrs(path))
    if stat.S_ISREG(st_.st_mode):
        return (lstat(path), read(path), xattrs(path))
    if stat.S_ISLNK(st_.st_mode):
        return (lstat(path), os.readlink(path))
    return (lstat(path),)


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

    # -- one random step ------------------------------------------------------------
    # A single rule that draws its operation and arguments from a hypothesis-controlled
    # Random: separate @rule()s got a very skewed mix with few examples (mostly link()
    # on missing names).  Paths are drawn mostly from names that exist right now (looked
    # up on the kernel side, the oracle), the rest from the whole pool.

    OPS = {"create": 3, "write": 4, "truncate": 2, "rename": 5, "exchange": 1, "link": 3,
           "unlink": 3, "mkdir": 3, "rmdir": 3, "chmod": 2, "setxattr": 2, "removexattr": 1,
           "symlink": 1, "observe": 3}

    @rule(rnd=st.randoms(use_true_random=True))
    def step(self, rnd):
        k = self.pair.k
        existing = [p for p in POOL if os.path.lexists(J(k, p))]
        dirs = [p for p in existing if os.path.isdir(J(k, p)) and not os.path.islink(J(k, p))]
        files = [p for p in existing if p not in dirs]

        def pick(among, p_existing=0.8):
            if among and rnd.random() < p_existing:
                return rnd.choice(among)
            return rnd.choice(POOL)

        def blob():
            return bytes(rnd.randrange(256) for _ in range(rnd.choice([0, 1, 5, 17, 64])))

        op = rnd.choices(list(self.OPS), weights=list(self.OPS.values()))[0]
        if op == "create":
            p, d, mode = pick(existing, 0.2), blob(), rnd.choice(MODES)
            self.same(f"create {p} {mode:o}", lambda r: write(J(r, p), d, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
        elif op == "write":
            p, d = pick(files, 0.9), blob()
            how = rnd.choice(["trunc", "append", "pwrite0", "pwrite5", "creat"])
            flags = {"trunc": os.O_WRONLY | os.O_TRUNC, "append": os.O_WRONLY | os.O_APPEND,
                     "pwrite0": os.O_WRONLY, "pwrite5": os.O_RDWR, "creat": os.O_WRONLY | os.O_CREAT}[how]
            off = {"pwrite0": 0, "pwrite5": 5}.get(how)
            self.same(f"write {p} {how} {len(d)}", lambda r: write(J(r, p), d, flags, 0o644, off))
        elif op == "truncate":
            p, size = pick(files, 0.9), rnd.choice([0, 3, 100])
            self.same(f"truncate {p} {size}", lambda r: os.truncate(J(r, p), size))
        elif op in ("rename", "exchange"):
            a = pick(existing, 0.9)
            b = pick(existing, 0.6 if op == "exchange" else 0.35)
            flags = RENAME_EXCHANGE if op == "exchange" else rnd.choice([0, 0, 0, RENAME_NOREPLACE])
            self.same(f"rename {a} {b} flags={flags}", lambda r: renameat2(J(r, a), J(r, b), flags))
        elif op == "link":
            a, b = pick(files, 0.9), pick(existing, 0.15)
            self.same(f"link {a} {b}", lambda r: os.link(J(r, a), J(r, b), follow_symlinks=False))
        elif op == "unlink":
            p = pick(files, 0.85)
            self.same(f"unlink {p}", lambda r: os.unlink(J(r, p)))
        elif op == "mkdir":
            p, mode = pick(existing, 0.15), rnd.choice([0o755, 0o700])
            self.same(f"mkdir {p}", lambda r: os.mkdir(J(r, p), mode))
        elif op == "rmdir":
            p = pick(dirs, 0.85)
            self.same(f"rmdir {p}", lambda r: os.rmdir(J(r, p)))
        elif op == "chmod":
            p, mode = pick(existing, 0.9), rnd.choice(MODES)
            self.same(f"chmod {p} {mode:o}", lambda r: os.chmod(J(r, p), mode))
        elif op == "setxattr":
            p, name, value = pick(existing, 0.9), rnd.choice(XNAMES), blob()
            self.same(f"setxattr {p} {name}", lambda r: os.setxattr(J(r, p), name, value, follow_symlinks=False))
        elif op == "removexattr":
            p, name = pick(existing, 0.9), rnd.choice(XNAMES)
            self.same(f"removexattr {p} {name}", lambda r: os.removexattr(J(r, p), name, follow_symlinks=False))
        elif op == "symlink":
            p, dest = pick(existing, 0.15), rnd.choice(["a", "../shadow.txt", "/nonexistent"])
            self.same(f"symlink {p} -> {dest}", lambda r: os.symlink(dest, J(r, p)))
        else:
            p = pick(existing, 0.9)
            self.same(f"observe {p}", lambda r: observe(J(r, p)))

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
    max_examples=int(os.environ.get("UNIONFUSE_STATEFUL_EXAMPLES", "40")),
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
