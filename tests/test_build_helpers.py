"""Helpers for the builder tests (tests/test_build*.py): a temp store with the busybox
base, running `unionfuse build` through the real CLI in a subprocess, reading files out
of an image's layer dirs, and a leak check (no mounts, containers or staging dirs left
behind).  No test here kills anything it did not start."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

def build_argv(root) -> list[str]:
    return [sys.executable, "-m", "unionfuse", "--root", str(root), "build"]


def uf(root, *args, timeout=120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unionfuse", "--root", str(root), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=str(REPO), **kw)


def build(root, ctx, *args, timeout=180, env=None) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.pop("UNIONFUSE_ROOT", None)
    if env:
        e.update(env)
    return subprocess.run(build_argv(root) + [*args, str(ctx)], capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO), env=e, stdin=subprocess.DEVNULL)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"rc={r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r


def write(ctx: Path, files: dict) -> Path:
    ctx.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        p = ctx / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
    return ctx


def image(root, ref):
    from unionfuse.store.store import Store

    return Store(str(root)).resolve(ref)


def has_ref(root, ref) -> bool:
    from unionfuse.store.store import Store, normalize_ref

    return normalize_ref(ref) in Store(str(root)).refs()


def layer_path(root, ref, path: str) -> str | None:
    """Where *path* lives in the image's layers (top-most first; no whiteouts in these
    tests), following no symlinks; None if absent."""
    from unionfuse.store.store import Store

    s = Store(str(root))
    for d in s.layer_dirs(s.resolve(ref)):
        p = os.path.join(d, path.lstrip("/"))
        if os.path.lexists(p):
            return p
    return None


def read(root, ref, path: str) -> str:
    p = layer_path(root, ref, path)
    assert p is not None, f"{path} not in {ref}"
    with open(p) as f:
        return f.read()


def mounts_under(root) -> list[str]:
    root = os.path.realpath(str(root))
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4]
            if mp.startswith(root + "/"):
                out.append(mp)
    return out


def assert_clean(root) -> None:
    assert mounts_under(root) == []
    cdir = Path(root) / "containers"
    assert not cdir.exists() or list(cdir.iterdir()) == []
    tdir = Path(root) / "tmp"
    left = [p.name for p in tdir.iterdir()] if tdir.exists() else []
    assert [n for n in left if "-lease-" not in n] == [], left


def _lazy_unmount_all(root) -> None:
    for mp in sorted(mounts_under(root), key=len, reverse=True):
        subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True)
        if mp in mounts_under(root):
            subprocess.run(["umount", "-l", mp], capture_output=True)


@pytest.fixture(scope="session")
def busybox_tar(tmp_path_factory) -> Path:
    if not shutil.which("runc") and not shutil.which("crun"):
        pytest.skip("no OCI runtime (runc/crun)")
    t = tmp_path_factory.mktemp("bb") / "busybox.tar"
    r = subprocess.run(["bash", str(REPO / "scripts/busybox-rootfs.sh"), str(t)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"no busybox rootfs: {r.stderr.strip()}")
    return t


def new_store(path: Path, busybox_tar: Path) -> Path:
    r = uf(path, "import", str(busybox_tar), "busybox")
    assert r.returncode == 0, r.stderr
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory, busybox_tar):
    """One store per test module (cache shared: tests use distinct content)."""
    root = tmp_path_factory.mktemp("store")
    new_store(root, busybox_tar)
    yield root
    _lazy_unmount_all(root)


@pytest.fixture
def fresh_store(tmp_path, busybox_tar):
    root = tmp_path / "store"
    new_store(root, busybox_tar)
    yield root
    _lazy_unmount_all(root)


@pytest.fixture
def clean(store):
    """Fails the test if a build left a mount, container or staging dir in the store."""
    yield store
    assert_clean(store)
