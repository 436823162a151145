"""Helpers and fixtures for the OCI interop tests (tests/test_oci_*.py): hand-made layers,
images and archives; the save/load/pull/push commands driven in-process through
unionfuse.oci.cli; podman in a scratch store; a docker-registry on 127.0.0.1 stopped by
its PID.  (No tests here.)"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from unionfuse.errors import UnionfuseError
from unionfuse.oci import cli as oci_cli

REPO = Path(__file__).resolve().parent.parent
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def need(*tools):
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- the commands ---------------------------------------------------------------------------


def oci(root, *argv) -> tuple[int, str, str]:
    """Run save/load/pull/push in-process, the way cli.main would: (rc, stdout, stderr)."""
    p = argparse.ArgumentParser(prog="unionfuse")
    p.add_argument("--root")
    sub = p.add_subparsers(dest="command")
    oci_cli.add_parsers(sub)
    a = p.parse_args(["--root", str(root), *map(str, argv)])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = oci_cli.dispatch(a)
        except UnionfuseError as e:
            print(f"unionfuse: {e.message}", file=sys.stderr)
            rc = e.exit_code
    return rc, out.getvalue(), err.getvalue()


def ok(root, *argv) -> str:
    rc, out, err = oci(root, *argv)
    assert rc == 0, f"{argv}: rc={rc}\n{err}"
    return out


def uf(root, *args, check=True, timeout=120) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "unionfuse", "--root", str(root), *map(str, args)],
                       capture_output=True, text=True, cwd=str(REPO), timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"unionfuse {args}: rc={r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def store_state(root) -> tuple[set, set, dict]:
    """(layer dirs, image files, refs) of a store root."""
    root = Path(root)
    layers = {p.name for p in (root / "layers").iterdir()} if (root / "layers").exists() else set()
    images = {p.name for p in (root / "images").iterdir()} if (root / "images").exists() else set()
    refs = json.loads((root / "refs.json").read_text()) if (root / "refs.json").exists() else {}
    return layers, images, refs


# -- layers, images, archives made by hand --------------------------------------------------


def layer_tar(entries, fmt=tarfile.GNU_FORMAT) -> bytes:
    """entries: (name, content) for files, (name/, None) for dirs, (name, "->target") for
    symlinks, (name, b"") for empty files / whiteouts."""
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=fmt) as tf:
        for name, content in entries:
            ti = tarfile.TarInfo(name.rstrip("/") if name != "./" else ".")
            ti.mtime = 1700000000
            if name.endswith("/"):
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(ti)
            elif isinstance(content, str) and content.startswith("->"):
                ti.type, ti.linkname = tarfile.SYMTYPE, content[2:]
                tf.addfile(ti)
            else:
                data = content if isinstance(content, bytes) else content.encode()
                ti.size, ti.mode = len(data), 0o644
                tf.addfile(ti, io.BytesIO(data))
    return bio.getvalue()


def image_config(layers: list[bytes], arch="amd64", cmd=("/bin/sh",), label="") -> bytes:
    cfg = {
        "architecture": arch, "os": "linux", "created": "2024-01-01T00:00:00Z",
        "config": {"Env": [PATH_ENV], "Cmd": list(cmd), **({"Labels": {"t": label}} if label else {})},
        "rootfs": {"type": "layers", "diff_ids": [sha(x) for x in layers]},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": f"layer {i}"} for i in range(len(layers))],
    }
    return json.dumps(cfg, indent=2).encode()  # not canonical on purpose: bytes must be kept


def compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data, mtime=0)
    if how == "zstd":
        return subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, check=True).stdout
    return data


def _add(tf, name, data: bytes):
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode = len(data), 0o644
    tf.addfile(ti, io.BytesIO(data))


def docker_archive(path, layers: list[bytes], tags=(), config: bytes | None = None,
                   layer_names=None, compress_as=None) -> bytes:
    config = config or image_config(layers)
    with tarfile.open(path, "w") as tf:
        names = []
        for i, layer in enumerate(layers):
            name = (layer_names or {}).get(i) or f"{hashlib.sha256(layer).hexdigest()}/layer.tar"
            names.append(name)
            if layer_names and name.startswith(".."):
                continue
            _add(tf, name, compress(layer, compress_as) if compress_as else layer)
        _add(tf, hashlib.sha256(config).hexdigest() + ".json", config)
        _add(tf, "manifest.json", json.dumps([{"Config": hashlib.sha256(config).hexdigest() + ".json",
                                                "RepoTags": list(tags), "Layers": names}]).encode())
    return config


def oci_archive(path, layers: list[bytes], tag="latest", name=None, compress_as="gzip",
                config: bytes | None = None, corrupt_layer: int | None = None, drop_blob: int | None = None):
    config = config or image_config(layers)
    blobs = {}

    def blob(data):
        blobs[sha(data)] = data
        return {"digest": sha(data), "size": len(data)}

    suffix = {"gzip": "+gzip", "zstd": "+zstd", None: ""}[compress_as]
    ldescs = []
    for i, layer in enumerate(layers):
        data = compress(layer, compress_as) if compress_as else layer
        d = {"mediaType": "application/vnd.oci.image.layer.v1.tar" + suffix, **blob(data)}
        if corrupt_layer == i:
            blobs[d["digest"]] = data[:-1] + bytes([data[-1] ^ 1])
        if drop_blob == i:
            del blobs[d["digest"]]
        ldescs.append(d)
    m = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
         "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **blob(config)}, "layers": ldescs}
    mdesc = {"mediaType": "application/vnd.oci.image.manifest.v1+json", **blob(json.dumps(m).encode())}
    ann = {"org.opencontainers.image.ref.name": tag}
    if name:
        ann["io.containerd.image.name"] = name
    index = {"schemaVersion": 2, "manifests": [{**mdesc, "annotations": ann}]}
    with tarfile.open(path, "w") as tf:
        _add(tf, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        _add(tf, "index.json", json.dumps(index).encode())
        for d, data in blobs.items():
            _add(tf, "blobs/sha256/" + d[7:], data)
    return config


# A second layer over busybox with a marker, a whiteout, an opaque dir and new content.
BASE_EXTRA = [("etc/", None), ("etc/marker", "made by hand\n"), ("srv/", None), ("srv/a/", None),
              ("srv/a/x", "x\n"), ("srv/a/y", "y\n"), ("srv/b", "b\n"), ("srv/c/", None), ("srv/c/keep", "k\n")]
TOP = [("srv/", None), ("srv/a/", None), ("srv/a/.wh.x", b""), ("srv/.wh.b", b""),
       ("srv/c/", None), ("srv/c/.wh..wh..opq", b""), ("srv/c/new", "new\n"), ("etc/", None),
       ("etc/.wh.hostname", b""), ("etc/top", "top layer\n")]


@pytest.fixture(scope="session")
def busybox_tar(tmp_path_factory) -> bytes:
    need("busybox")
    p = tmp_path_factory.mktemp("bb") / "busybox.tar"
    subprocess.run(["bash", str(REPO / "scripts/busybox-rootfs.sh"), str(p)], check=True, capture_output=True)
    return p.read_bytes()


@pytest.fixture(scope="session")
def image_layers(busybox_tar) -> list[bytes]:
    """busybox + a layer with a marker + a layer with whiteouts and an opaque dir."""
    return [busybox_tar, layer_tar(BASE_EXTRA), layer_tar(TOP, fmt=tarfile.PAX_FORMAT)]


@pytest.fixture
def loaded(tmp_path, image_layers):
    """A store with the hand-made image loaded (so its layers keep their original tars),
    tagged test/img:1."""
    root = tmp_path / "root"
    arch = tmp_path / "in.tar"
    config = docker_archive(arch, image_layers, tags=["test/img:1"])
    ok(root, "load", "-i", arch)
    return root, sha(config)


# -- podman in a scratch store --------------------------------------------------------------


class Podman:
    def __init__(self, base: Path):
        self.base = base
        (base / "containers.conf").write_text(
            '[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
            '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n')
        (base / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{base}/graph"\nrunroot = "{base}/run"\n')
        self.env = dict(os.environ, CONTAINERS_CONF=str(base / "containers.conf"),
                        CONTAINERS_STORAGE_CONF=str(base / "storage.conf"),
                        TMPDIR=str(base))

    def __call__(self, *args, check=True, timeout=120) -> subprocess.CompletedProcess:
        r = subprocess.run(["podman", *map(str, args)], capture_output=True, text=True, env=self.env,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"podman {args}: rc={r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self("rm", "-af", check=False, timeout=60)
            self("system", "reset", "--force", check=False, timeout=60)
        with open("/proc/self/mountinfo") as f:
            mnts = [line.split()[4] for line in f]
        for m in reversed(mnts):
            if m.startswith(str(self.base) + "/"):
                subprocess.run(["umount", "-l", m], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def podman():
    need("podman", "runc")
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="uf-podman-"))
    p = Podman(base)
    yield p
    p.cleanup()


# -- docker-registry on 127.0.0.1 -----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    def __init__(self, base: Path, htpasswd: str | None = None):
        need("docker-registry")
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        cfg = (f"version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n"
               f"storage:\n  filesystem:\n    rootdirectory: {base}/data\n  delete:\n    enabled: true\n"
               f"http:\n  addr: {self.host}\n")
        if htpasswd:
            (base / "htpasswd").write_text(htpasswd)
            cfg += f"auth:\n  htpasswd:\n    realm: test\n    path: {base}/htpasswd\n"
        (base / "config.yml").write_text(cfg)
        self.log = base / "registry.log"
        logf = open(self.log, "wb")
        self.proc = subprocess.Popen(["docker-registry", "serve", str(base / "config.yml")],
                                     stdout=logf, stderr=logf, stdin=subprocess.DEVNULL, cwd=str(base))
        logf.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"docker-registry did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    r = Registry(tmp_path_factory.mktemp("registry"))
    yield r
    r.stop()


def tree_without_times(root) -> dict:
    from conftest import tree

    return {k: v[:6] for k, v in tree(root).items()}
