"""The store side of images that travel.

Additions under the store root (all owned by this package)::

    ROOT/oci/tarsplit/<diffhex>.gz   how to rebuild a layer's original tar byte for byte
    ROOT/oci/blobs.json              {diff_id: [{digest, mediaType, size, repos: [...]}]}
    ROOT/oci/downloads/              pulled blobs, kept (and resumed) until the pull ends

- Image configs that arrive (load, pull) are stored as the exact bytes received:
  ``put_image_bytes`` writes ROOT/images/<sha256 of the bytes>.json, so the image id is
  the config digest (docker's rule) and ``push``/``save`` send the same bytes back.
- A layer's diff_id is the sha256 of its *original* uncompressed tar.  The store keeps
  only the unpacked tree, and re-packing a tree gives a canonical tar that need not be
  byte-identical (GNU vs PAX headers, a "./" entry, ...).  So every layer imported here
  also gets a *tar-split recipe*: the tar's bytes minus the regular files' contents
  (headers, padding, end blocks), with references to the files in the layer dir.
  Replaying it rebuilds the original tar, checked against the diff_id.  A recipe is
  verified when it is made; if replay would not reproduce the tar (the same path twice,
  sparse files, ...) the whole tar is kept in the recipe instead.
- Layers without a recipe (``import`` of a rootfs tar, ``commit``) are re-packed with
  ``Store.layer_tar``.  Committed layers re-pack to the same diff_id; imported ones may
  not, and then ``save``/``push`` rewrite the image's diff_ids (a new image id) and say so.
  ``add_layer_tar_recorded`` is a drop-in for ``Store.add_layer_tar`` that records the
  recipe too (for ``import``).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from typing import BinaryIO

from ..errors import UnionfuseError
from ..store import store as storemod
from ..store.store import Image, NotFound, Store, canonical_json, write_atomic
from ..store import imageconfig
from ..store.tarlayer import HashingReader, HashingWriter, Prefixed  # noqa: F401  (archive.py uses local.HashingReader)

CHUNK = 1 << 20

# media types
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = OCI_LAYER + "+gzip"
OCI_LAYER_ZSTD = OCI_LAYER + "+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
FOREIGN_LAYERS = (
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
LAYER_TYPES = (OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, DOCKER_LAYER_GZIP,
               "application/vnd.docker.image.rootfs.diff.tar")


class OCIError(UnionfuseError):
    pass


class DigestMismatch(OCIError):
    pass


class LayerError(OCIError):
    pass


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_of(data: bytes) -> str:
    return "sha256:" + sha256_hex(data)


def check_digest(digest: str) -> str:
    """The hex of a "sha256:<64 hex>" digest; anything else is an error (it ends up in
    file names)."""
    algo, _, hexpart = (digest or "").partition(":")
    if algo != "sha256" or len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise OCIError(f"unsupported or malformed digest {digest!r} (only sha256 is supported)")
    return hexpart


def oci_dir(store: Store, *sub: str) -> str:
    p = os.path.join(store.root, "oci", *sub)
    os.makedirs(p, mode=0o700, exist_ok=True)
    return p


# -- image configs as exact bytes ---------------------------------------------------------


def put_image_bytes(store: Store, data: bytes) -> Image:
    """Store an image config exactly as *data* (image id = sha256 of the bytes, the config
    digest).  Like Store.put_image: every diff_id must be in the store; drops this
    process's leases on them."""
    try:
        config = json.loads(data)
    except ValueError as e:
        raise OCIError(f"image config is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise OCIError("image config is not a JSON object")
    try:
        imageconfig.check_config(config)
    except UnionfuseError as e:
        raise OCIError(str(e)) from None
    image_id = digest_of(data)
    path = os.path.join(store.root, "images", sha256_hex(data) + ".json")
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    with store.lock():
        for d in diff_ids:
            if not store.has_layer(d):
                raise NotFound(f"layer {d} is not in the store")
        if not os.path.exists(path):
            write_atomic(path, data)
        for d in diff_ids:
            _drop_lease(store, d)
    return Image(image_id, config)


def config_bytes(store: Store, image: Image) -> bytes:
    """The stored config bytes of *image* (their sha256 is the image id)."""
    path = os.path.join(store.root, "images", check_digest(image.id) + ".json")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise NotFound(f"no such image: {image.id}") from None
    if digest_of(data) != image.id:
        raise OCIError(f"image {image.short_id}: stored config does not match its id (corrupt store?)")
    return data


def _lease(store: Store, diff_id: str) -> None:
    """Keep a layer we reuse from a concurrent prune until the image is stored."""
    lp = getattr(store, "_lease_path", None)
    if lp is None:
        return
    path = lp(diff_id)
    with open(path, "wb"):
        pass
    leases = getattr(storemod, "_LEASES", None)
    if leases is not None:
        leases.add(path)


def _drop_lease(store: Store, diff_id: str) -> None:
    lp = getattr(store, "_lease_path", None)
    if lp is None:
        return
    drop = getattr(storemod, "_drop_lease", None)
    if drop is not None:
        drop(lp(diff_id))
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lp(diff_id))


def discard_layers(store: Store, diff_ids: list[str]) -> None:
    """Undo the layers a failed load/pull added: removed unless an image uses them or
    another live process holds a lease on them."""
    if not diff_ids:
        return
    with store.lock():
        for d in diff_ids:
            _drop_lease(store, d)
        used: set[str] = set()
        for iid in store.image_ids():
            with contextlib.suppress(Exception):
                used.update(store.image_by_id(iid).diff_ids)
        leased = getattr(store, "_leased_layers", lambda: set())()
        for d in diff_ids:
            if d in used or d in leased or not store.has_layer(d):
                continue
            trash = os.path.join(store.root, "tmp", f"{os.getpid()}-discard-{check_digest(d)[:16]}")
            os.rename(store.layer_path(d), trash)
            shutil.rmtree(trash, ignore_errors=True)


# -- decompression --------------------------------------------------------------------------


def compression_of(head: bytes) -> str:
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    if head.startswith(b"BZh"):
        return "bzip2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    return "none"


def decompressed(src: BinaryIO, label: str):
    """A reader of *src*'s decompressed bytes (compression found by magic: gzip, zstd,
    bzip2, xz, or none)."""
    head = b""
    while len(head) < 6:
        b = src.read(6 - len(head))
        if not b:
            break
        head += b
    pre = Prefixed(head, src)
    kind = compression_of(head)
    if kind == "gzip":
        return gzip.GzipFile(fileobj=pre, mode="rb")
    if kind == "zstd":
        return _zstd_reader(pre, label)
    if kind == "bzip2":
        import bz2

        return bz2.BZ2File(pre, "rb")
    if kind == "xz":
        import lzma

        return lzma.LZMAFile(pre, "rb")
    return pre


def _zstd_reader(src, label: str):
    try:
        import zstandard
    except ImportError:
        zstandard = None
    if zstandard is not None:
        return zstandard.ZstdDecompressor().stream_reader(src, read_across_frames=True)
    if shutil.which("zstd") is None:
        raise LayerError(f"{label}: zstd-compressed layer, and neither the zstandard module nor "
                         "the zstd program is installed")
    spool = tempfile.TemporaryFile()
    shutil.copyfileobj(src, spool, CHUNK)
    spool.seek(0)
    proc = subprocess.Popen(["zstd", "-dcq"], stdin=spool, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    spool.close()
    return _ProcReader(proc, label)


class _ProcReader:
    def __init__(self, proc, label):
        self.proc, self.label = proc, label

    def read(self, n: int = -1) -> bytes:
        b = self.proc.stdout.read(n)
        if not b:
            err = self.proc.stderr.read().decode(errors="replace").strip()
            if self.proc.wait() != 0:
                raise LayerError(f"{self.label}: zstd: {err or 'bad data'}")
        return b


def decompress_to(src: BinaryIO, out: BinaryIO, label: str) -> tuple[str, int]:
    """Copy *src* decompressed into *out*; returns (sha256 digest, length) of what was
    written (the diff_id of a layer blob)."""
    hw = HashingWriter(out)
    try:
        r = decompressed(src, label)
        while True:
            b = r.read(CHUNK)
            if not b:
                break
            hw.write(b)
    except (OSError, EOFError, ValueError) as e:
        raise LayerError(f"{label}: broken compressed data ({e})") from None
    except Exception as e:  # zstandard.ZstdError, lzma.LZMAError, ...
        if isinstance(e, UnionfuseError):
            raise
        raise LayerError(f"{label}: broken compressed data ({e})") from None
    return hw.digest, hw.count


# -- layers in ---------------------------------------------------------------------------------


def import_layer(store: Store, src: BinaryIO, expected: str | None, label: str, added: list[str]) -> str:
    """Unpack the layer blob *src* (any compression) into the store, checking that its
    uncompressed digest is *expected* (the image config's diff_id) before anything is
    stored, and record its tar-split recipe.  A layer already in the store is reused
    without reading *src*.  New diff_ids are appended to *added* (for discard_layers)."""
    if expected and store.has_layer(expected):
        _lease(store, expected)
        return expected
    stage = store.staging()
    try:
        tmp = os.path.join(stage, "layer.tar")
        with open(tmp, "wb") as out:
            diff_id, _ = decompress_to(src, out, label)
        if expected and diff_id != expected:
            raise DigestMismatch(f"{label}: layer content is {diff_id}, but the image config "
                                 f"says {expected}; nothing stored")
        existed = store.has_layer(diff_id)
        with open(tmp, "rb") as f:
            got = store.add_layer_tar(f, label=label)
        if got != diff_id:  # can't happen: both hash the same bytes
            raise DigestMismatch(f"{label}: unpacked digest {got} != {diff_id}")
        if not existed:
            added.append(diff_id)
        record_recipe(store, diff_id, tmp)
        return diff_id
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def add_layer_tar_recorded(store: Store, stream: BinaryIO, label: str = "layer") -> str:
    """Store.add_layer_tar that also keeps the tar-split recipe, so that save/push give
    back the very tar (and diff_id) that was imported.  For ``import``."""
    stage = store.staging()
    try:
        tmp = os.path.join(stage, "layer.tar")
        with open(tmp, "wb") as out:
            decompress_to(stream, out, label)
        with open(tmp, "rb") as f:
            diff_id = store.add_layer_tar(f, label=label)
        record_recipe(store, diff_id, tmp)
        return diff_id
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# -- tar-split recipes -------------------------------------------------------------------------


def recipe_path(store: Store, diff_id: str) -> str:
    return os.path.join(store.root, "oci", "tarsplit", check_digest(diff_id) + ".gz")


def _clean(name: str) -> list[str] | None:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return parts


def _scan(tar_path: str) -> list[list] | None:
    """Segments [raw_len, path-or-None, size] of an uncompressed tar, or None when the
    tar can't be described that way."""
    segs: list[list] = []
    seen: set[tuple[str, ...]] = set()
    pos = 0
    try:
        with tarfile.open(tar_path, mode="r:") as tf:
            for ti in tf:
                if not ti.isreg() or ti.size == 0:
                    continue
                if ti.issparse():
                    return None
                parts = _clean(ti.name)
                if parts is None or tuple(parts) in seen:
                    return None
                seen.add(tuple(parts))
                segs.append([ti.offset_data - pos, "/".join(parts), ti.size])
                pos = ti.offset_data + ti.size
    except (tarfile.TarError, OSError, ValueError):
        return None
    segs.append([os.path.getsize(tar_path) - pos, None, 0])
    return segs


def record_recipe(store: Store, diff_id: str, tar_path: str) -> None:
    """Write the recipe that rebuilds *tar_path* (whose sha256 is *diff_id*) from the
    stored layer.  Verified by replaying it; falls back to keeping the whole tar."""
    dst = recipe_path(store, diff_id)
    if os.path.exists(dst):
        return
    oci_dir(store, "tarsplit")
    segs = _scan(tar_path)
    tmp = f"{dst}.{os.getpid()}.tmp"
    for attempt in ("split", "whole"):
        if attempt == "whole" or segs is None:
            segs = [[os.path.getsize(tar_path), None, 0]]
        with open(tar_path, "rb") as src, open(tmp, "wb") as raw:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as g:
                g.write(json.dumps({"v": 1, "segments": segs}).encode() + b"\n")
                for raw_len, path, size in segs:
                    _copy_n(src, g, raw_len)
                    if path is not None:
                        src.seek(size, os.SEEK_CUR)
        hw = HashingWriter(None)
        try:
            _replay(store, diff_id, tmp, hw)
            ok = hw.digest == diff_id
        except (OSError, OCIError):
            ok = False
        if ok:
            os.rename(tmp, dst)
            return
    os.unlink(tmp)
    raise LayerError(f"can't record the original tar of layer {diff_id}")


def _copy_n(src, dst, n: int) -> None:
    while n > 0:
        b = src.read(min(n, CHUNK))
        if not b:
            raise OCIError("unexpected end of data")
        dst.write(b)
        n -= len(b)


def _open_in_layer(root: str, rel: str) -> int:
    """fd of regular file *rel* inside *root*, never following a symlink."""
    parts = rel.split("/")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for comp in parts[:-1]:
            nfd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nfd
        ffd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(ffd).st_mode):
        os.close(ffd)
        raise OCIError(f"{rel} is not a regular file in the layer")
    return ffd


def _replay(store: Store, diff_id: str, recipe: str, out) -> None:
    root = store.layer_diff(diff_id)
    with gzip.open(recipe, "rb") as g:
        head = json.loads(g.readline())
        for raw_len, path, size in head["segments"]:
            _copy_n(g, out, raw_len)
            if path is None:
                continue
            fd = _open_in_layer(root, path)
            with os.fdopen(fd, "rb") as f:
                _copy_n(f, out, size)


def export_layer(store: Store, diff_id: str, out: BinaryIO) -> str:
    """Write layer *diff_id* as a tar to *out*: the original bytes when a recipe exists,
    else the store's canonical packing.  Returns the digest of what was written (differs
    from *diff_id* only for a re-packed layer whose original tar was not kept)."""
    if not store.has_layer(diff_id):
        raise NotFound(f"layer {diff_id} is missing from the store")
    rp = recipe_path(store, diff_id)
    if os.path.exists(rp):
        hw = HashingWriter(out)
        try:
            _replay(store, diff_id, rp, hw)
        except (OSError, ValueError, OCIError) as e:
            raise LayerError(f"layer {diff_id}: can't rebuild its tar ({e})") from None
        if hw.digest != diff_id:
            raise LayerError(f"layer {diff_id}: the rebuilt tar is {hw.digest} (layer changed on disk?)")
        return diff_id
    return store.layer_tar(diff_id, out)


def export_layer_file(store: Store, diff_id: str, dest_dir: str) -> tuple[str, str, int]:
    """export_layer into a new file in *dest_dir*: (path, digest, size)."""
    path = os.path.join(dest_dir, check_digest(diff_id) + ".tar")
    with open(path, "wb") as f:
        got = export_layer(store, diff_id, f)
    return path, got, os.path.getsize(path)


def gzip_file(src_path: str, dst_path: str) -> tuple[str, int]:
    """Deterministic gzip (no name, mtime 0): (digest, size) of the compressed file."""
    with open(src_path, "rb") as src, open(dst_path, "wb") as raw:
        hw = HashingWriter(raw)
        with gzip.GzipFile(filename="", mode="wb", fileobj=hw, mtime=0, compresslevel=6) as g:
            shutil.copyfileobj(src, g, CHUNK)
    return hw.digest, hw.count


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(CHUNK)
            if not b:
                break
            h.update(b)
    return "sha256:" + h.hexdigest()


# -- images whose layers were re-packed ----------------------------------------------------------


def rewrite_diff_ids(config_data: bytes, mapping: dict[str, str]) -> bytes:
    """The config with diff_ids replaced per *mapping* (canonical JSON: a new image id)."""
    cfg = json.loads(config_data)
    cfg["rootfs"]["diff_ids"] = [mapping.get(d, d) for d in cfg["rootfs"]["diff_ids"]]
    return canonical_json(cfg)


# -- which compressed blobs a layer is known as ------------------------------------------------


def _blobs_file(store: Store) -> str:
    return os.path.join(oci_dir(store), "blobs.json")


def known_blobs(store: Store, diff_id: str) -> list[dict]:
    try:
        with open(_blobs_file(store)) as f:
            return list(json.load(f).get(diff_id, []))
    except (OSError, ValueError):
        return []


def record_blob(store: Store, diff_id: str, digest: str, media_type: str, size: int, repo: str | None) -> None:
    """Remember that layer *diff_id* is blob *digest* (and, if given, is in *repo*,
    "host/name"), for push to skip or mount it."""
    path = _blobs_file(store)
    with store.lock():
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            data = {}
        entries = data.setdefault(diff_id, [])
        for e in entries:
            if e["digest"] == digest:
                break
        else:
            e = {"digest": digest, "mediaType": media_type, "size": size, "repos": []}
            entries.append(e)
        if repo and repo not in e["repos"]:
            e["repos"].append(repo)
        write_atomic(path, canonical_json(data))
