"""scripts/debian-rootfs.sh: debootstrap a minimal bookworm from the configured apt mirror,
import the tar into a temp store.  Slow (~50 s, ~120 MB tar; about 1 min more the first
time when debootstrap must be installed); skipped when no mirror is reachable."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys

import pytest

from unionfuse.store.store import Store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow


def _mounts_under(path: str) -> list[str]:
    with open("/proc/self/mounts") as f:
        return [ln.split()[1] for ln in f if ln.split()[1].startswith(path)]


def test_debian_rootfs_imports(tmp_path, debian_tar):
    out = debian_tar
    assert out.is_file() and not out.with_name("debian.tar.part").exists()
    if not os.environ.get("UNIONFUSE_DEBIAN_TAR"):
        # the script cleaned up: only the tar is left in its TMPDIR, and no mounts
        assert os.listdir(out.parent) == ["debian.tar"]
        assert _mounts_under(str(out.parent)) == []

    store = Store(str(tmp_path / "store"))
    with open(out, "rb") as f:
        diff_id = store.add_layer_tar(f, label=str(out))
    with open(out, "rb") as f:
        assert diff_id == "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    diff = store.layer_diff(diff_id)
    with open(os.path.join(diff, "etc/debian_version")) as f:
        assert f.read().strip().startswith("12")
    assert os.path.islink(os.path.join(diff, "bin")) and os.readlink(os.path.join(diff, "bin")) == "usr/bin"
    for p in ("usr/bin/apt-get", "usr/bin/dpkg", "usr/bin/bash", "etc/passwd", "usr/sbin/policy-rc.d"):
        assert os.path.exists(os.path.join(diff, p)), p
    st = os.stat(os.path.join(diff, "usr/bin/passwd"))
    assert st.st_mode & 0o4000  # suid kept through tar and unpack
    assert os.stat(os.path.join(diff, "tmp")).st_mode & 0o7777 == 0o1777
    # the stored layer packs back to a tar with a stable diff_id
    a, b = io.BytesIO(), io.BytesIO()
    d1 = store.layer_tar(diff_id, a)
    d2 = store.layer_tar(diff_id, b)
    assert d1 == d2 and a.getvalue() == b.getvalue()

    # and through the CLI
    r = subprocess.run([sys.executable, "-m", "unionfuse", "--root", str(tmp_path / "store"),
                        "import", str(out), "debian:bookworm", "--change", 'CMD ["bash"]'],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    assert Store(str(tmp_path / "store")).resolve("debian:bookworm").diff_ids == [diff_id]
