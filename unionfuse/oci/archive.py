"""``save`` and ``load``: images in a tar file.

Formats:

- docker-archive (``docker save`` / ``podman save``): ``manifest.json`` =
  ``[{"Config": "<hex>.json", "RepoTags": [...], "Layers": ["<hex>.tar", ...]}]`` with the
  config bytes and the uncompressed layer tars beside it.
- oci-archive: an OCI image layout (``oci-layout``, ``index.json``, ``blobs/sha256/...``)
  in a tar.  Each tag is one index entry annotated with
  ``org.opencontainers.image.ref.name`` = the tag (what umoci and skopeo look up) and
  ``io.containerd.image.name`` = the full name (what docker and containerd read).

``load`` accepts both (and docker 25's archives that hold both, and archives compressed
as a whole), layers uncompressed, gzip or zstd.  Everything is verified before the
image is stored: blob digests (OCI), config digests, each layer's diff_id; a failure
removes the layers this load added and stores no image.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import sys
import tarfile
import time

from ..store.store import Image, Store, normalize_ref
from . import local
from .local import (INDEX_TYPES, MANIFEST_TYPES, OCI_CONFIG, OCI_INDEX, OCI_LAYER,
                    OCI_MANIFEST, OCIError, check_digest, digest_of)

FORMATS = ("docker-archive", "oci-archive")
MAX_JSON = 16 << 20  # manifests, indexes and configs are small; don't read a huge one


def local_name(ref: str) -> str:
    """docker.io/library/busybox:latest -> busybox:latest (how docker names images)."""
    for p in ("docker.io/", "index.docker.io/"):
        if ref.startswith(p):
            rest = ref[len(p):]
            if rest.startswith("library/") and "/" not in rest[len("library/"):]:
                rest = rest[len("library/"):]
            return rest
    return ref


# -- save --------------------------------------------------------------------------------------


def _refs_for(store: Store, name: str, image: Image) -> list[str]:
    """The name to record for an argument: the ref it names, or none for an id."""
    try:
        ref = normalize_ref(name)
    except Exception:
        return []
    return [ref] if store.refs().get(ref) == image.id else []


def save(store: Store, names: list[str], out_path: str, fmt: str = "docker-archive", log=None) -> None:
    if fmt not in FORMATS:
        raise OCIError(f"unknown format {fmt!r} (use docker-archive or oci-archive)")
    log = log or (lambda msg: print(msg, file=sys.stderr))
    chosen: dict[str, tuple[Image, list[str]]] = {}
    for n in names:
        img = store.resolve(n)
        refs = _refs_for(store, n, img)
        if img.id in chosen:
            chosen[img.id][1].extend(r for r in refs if r not in chosen[img.id][1])
        else:
            chosen[img.id] = (img, refs)
    stage = store.staging()
    try:
        layers: dict[str, tuple[str, str, int]] = {}  # diff_id -> (path, digest, size)
        entries = []  # (config bytes, refs, [(path, digest, size)])
        for img, refs in chosen.values():
            data = local.config_bytes(store, img)
            mapping = {}
            for d in img.diff_ids:
                if d not in layers:
                    layers[d] = local.export_layer_file(store, d, stage)
                if layers[d][1] != d:
                    mapping[d] = layers[d][1]
            if mapping:
                data = local.rewrite_diff_ids(data, mapping)
                log(f"warning: image {img.short_id}: the original tar of {len(mapping)} layer(s) was not "
                    f"kept (made by import?); saved re-packed layers, so the saved image's id is "
                    f"{digest_of(data)[:19]}")
            entries.append((data, refs, [layers[d] for d in img.diff_ids]))
        if out_path == "-":
            with tarfile.open(fileobj=sys.stdout.buffer, mode="w|", format=tarfile.PAX_FORMAT) as tf:
                _write(tf, fmt, entries)
            return
        tmp = f"{out_path}.{os.getpid()}.tmp"
        try:
            with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tf:
                _write(tf, fmt, entries)
            os.rename(tmp, out_path)
        except OSError as e:
            with _suppress():
                os.unlink(tmp)
            raise OCIError(f"can't write {out_path}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return True


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = len(data), 0o644, 0
    tf.addfile(ti, io.BytesIO(data))


def _add_file(tf: tarfile.TarFile, name: str, path: str) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = os.path.getsize(path), 0o644, 0
    with open(path, "rb") as f:
        tf.addfile(ti, f)


def _add_dir(tf: tarfile.TarFile, name: str) -> None:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 0
    tf.addfile(ti)


def _write(tf: tarfile.TarFile, fmt: str, entries) -> None:
    written: set[str] = set()
    if fmt == "docker-archive":
        manifest = []
        for data, refs, layers in entries:
            cname = check_digest(digest_of(data)) + ".json"
            if cname not in written:
                _add_bytes(tf, cname, data)
                written.add(cname)
            names = []
            for path, digest, _size in layers:
                lname = check_digest(digest) + ".tar"
                if lname not in written:
                    _add_file(tf, lname, path)
                    written.add(lname)
                names.append(lname)
            manifest.append({"Config": cname, "RepoTags": list(refs), "Layers": names})
        _add_bytes(tf, "manifest.json", json.dumps(manifest).encode())
        return
    _add_bytes(tf, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    _add_dir(tf, "blobs/")
    _add_dir(tf, "blobs/sha256/")

    def blob_bytes(data: bytes) -> dict:
        d = digest_of(data)
        if d not in written:
            _add_bytes(tf, "blobs/sha256/" + check_digest(d), data)
            written.add(d)
        return {"digest": d, "size": len(data)}

    index = []
    for data, refs, layers in entries:
        cdesc = {"mediaType": OCI_CONFIG, **blob_bytes(data)}
        ldescs = []
        for path, digest, size in layers:
            if digest not in written:
                _add_file(tf, "blobs/sha256/" + check_digest(digest), path)
                written.add(digest)
            ldescs.append({"mediaType": OCI_LAYER, "digest": digest, "size": size})
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cdesc, "layers": ldescs}
        mdesc = {"mediaType": OCI_MANIFEST, **blob_bytes(json.dumps(manifest).encode())}
        if not refs:
            index.append(mdesc)
        for r in refs:
            index.append({**mdesc, "annotations": {
                "io.containerd.image.name": r,
                "org.opencontainers.image.ref.name": r.rsplit(":", 1)[1]}})
    _add_bytes(tf, "index.json", json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": index}).encode())


# -- load --------------------------------------------------------------------------------------


class _Archive:
    def __init__(self, path: str):
        try:
            self.tf = tarfile.open(path, mode="r:*")
            members = self.tf.getmembers()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise OCIError(f"{path}: not a readable tar archive ({e})") from None
        self.path = path
        self.members: dict[str, tarfile.TarInfo] = {}
        for m in members:
            parts = local._clean(m.name)
            if parts is None:
                if m.name.strip("./") == "":
                    continue
                raise OCIError(f"{path}: archive entry {m.name!r} leaves the archive root; refusing it")
            self.members["/".join(parts)] = m

    def has(self, name: str) -> bool:
        return name in self.members

    def open(self, name: str):
        parts = local._clean(name)
        if parts is None:
            raise OCIError(f"{self.path}: {name!r} leaves the archive root; refusing it")
        m = self.members.get("/".join(parts))
        if m is None:
            raise OCIError(f"{self.path}: {name} is missing from the archive")
        try:
            f = self.tf.extractfile(m)
        except (tarfile.TarError, KeyError) as e:
            raise OCIError(f"{self.path}: can't read {name} ({e})") from None
        if f is None:
            raise OCIError(f"{self.path}: {name} is not a file")
        return f

    def read(self, name: str, limit: int = MAX_JSON) -> bytes:
        f = self.open(name)
        data = f.read(limit + 1)
        if len(data) > limit:
            raise OCIError(f"{self.path}: {name} is too large")
        return data

    def blob_name(self, digest: str) -> str:
        return "blobs/sha256/" + check_digest(digest)

    def read_blob(self, desc: dict) -> bytes:
        name = self.blob_name(desc.get("digest", ""))
        data = self.read(name)
        if digest_of(data) != desc["digest"]:
            raise local.DigestMismatch(f"{self.path}: blob {desc['digest']} has digest {digest_of(data)}")
        return data


def _json(data: bytes, what: str):
    try:
        return json.loads(data)
    except ValueError as e:
        raise OCIError(f"{what} is not valid JSON ({e})") from None


class _Entry:
    """One image to load: config bytes, layers (archive name, blob digest or None,
    what to call it), refs."""

    def __init__(self, config: bytes, layers: list[tuple[str, str | None]], refs: list[str]):
        self.config, self.layers, self.refs = config, layers, refs


def _docker_entries(ar: _Archive) -> list[_Entry]:
    manifest = _json(ar.read("manifest.json"), f"{ar.path}: manifest.json")
    if not isinstance(manifest, list):
        raise OCIError(f"{ar.path}: manifest.json is not a list")
    out = []
    for item in manifest:
        cname = item.get("Config") or ""
        data = ar.read(cname)
        m = re.search(r"([0-9a-f]{64})(\.json)?$", cname)
        if m and digest_of(data) != "sha256:" + m.group(1):
            raise local.DigestMismatch(f"{ar.path}: config {cname} has digest {digest_of(data)}")
        layers = []
        for lname in item.get("Layers") or []:
            lm = re.fullmatch(r"blobs/sha256/([0-9a-f]{64})", lname.lstrip("./"))
            layers.append((lname, "sha256:" + lm.group(1) if lm else None))
        out.append(_Entry(data, layers, [local_name(r) for r in item.get("RepoTags") or []]))
    return out


def _platform_ok(p: dict | None) -> bool:
    from ..store.imageconfig import goarch

    return not p or (p.get("os", "linux") == "linux" and p.get("architecture") in (goarch(), None))


def _oci_entries(ar: _Archive) -> list[_Entry]:
    index = _json(ar.read("index.json"), f"{ar.path}: index.json")
    out: dict[str, _Entry] = {}

    def visit(desc: dict, refs: list[str], depth: int) -> None:
        mt = desc.get("mediaType")
        data = ar.read_blob(desc)
        doc = _json(data, f"{ar.path}: blob {desc['digest']}")
        mt = mt or doc.get("mediaType")
        if mt in INDEX_TYPES or "manifests" in doc:
            if depth > 4:
                raise OCIError(f"{ar.path}: indexes nested too deep")
            subs = [d for d in doc.get("manifests", []) if _platform_ok(d.get("platform"))]
            if not subs:
                raise OCIError(f"{ar.path}: index {desc['digest']} has no manifest for this platform")
            visit(subs[0], refs, depth + 1)
            return
        if mt not in MANIFEST_TYPES and "layers" not in doc:
            raise OCIError(f"{ar.path}: {desc['digest']} is not an image manifest ({mt})")
        config = ar.read_blob(doc["config"])
        layers = []
        for ld in doc.get("layers", []):
            if ld.get("mediaType") in local.FOREIGN_LAYERS:
                raise OCIError(f"{ar.path}: foreign layer {ld['digest']} can't be loaded")
            layers.append((ar.blob_name(ld["digest"]), ld["digest"]))
        key = digest_of(config)
        if key in out:
            out[key].refs.extend(r for r in refs if r not in out[key].refs)
        else:
            out[key] = _Entry(config, layers, list(refs))

    for desc in index.get("manifests", []):
        ann = desc.get("annotations") or {}
        name = ann.get("io.containerd.image.name") or ""
        tagname = ann.get("org.opencontainers.image.ref.name") or ""
        if not name and ("/" in tagname or ":" in tagname):
            name = tagname
        refs = [local_name(name)] if name else []
        visit(desc, refs, 0)
    return list(out.values())


def load(store: Store, path: str, log=None) -> list[str]:
    """Load every image in the archive at *path* ("-": stdin).  Returns the lines to print
    ("Loaded image: NAME" / "Loaded image ID: ID")."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    spool_dir = None
    try:
        if path == "-":
            spool_dir = store.staging()
            spooled = os.path.join(spool_dir, "stdin.tar")
            with open(spooled, "wb") as f:
                shutil.copyfileobj(sys.stdin.buffer, f, local.CHUNK)
            path = spooled
        elif not os.path.isfile(path):
            raise OCIError(f"can't read {path}: no such file")
        ar = _Archive(path)
        if ar.has("manifest.json"):
            entries = _docker_entries(ar)
        elif ar.has("index.json"):
            entries = _oci_entries(ar)
        else:
            raise OCIError(f"{path}: neither a docker archive (manifest.json) nor an OCI layout (index.json)")
        if not entries:
            raise OCIError(f"{path}: the archive holds no image")
        for e in entries:  # every check that needs no layer data, before any is stored
            cfg = _json(e.config, f"{path}: image config")
            diff_ids = ((cfg or {}).get("rootfs") or {}).get("diff_ids")
            if not isinstance(diff_ids, list) or len(diff_ids) != len(e.layers):
                raise OCIError(f"{path}: image config lists {len(diff_ids or [])} layers, the manifest "
                               f"{len(e.layers)}")
            for d in diff_ids:
                check_digest(d)
            for r in e.refs:
                normalize_ref(r)
        added: list[str] = []
        try:
            for e in entries:
                diff_ids = json.loads(e.config)["rootfs"]["diff_ids"]
                for (name, blob_digest), diff_id in zip(e.layers, diff_ids):
                    if store.has_layer(diff_id):
                        local.import_layer(store, None, diff_id, name, added)  # reuse + lease
                        continue
                    if blob_digest is not None:  # OCI: the blob's own digest first
                        hr = local.HashingReader(ar.open(name))
                        hr.drain()
                        if hr.digest != blob_digest:
                            raise local.DigestMismatch(
                                f"{path}: layer blob {blob_digest} has digest {hr.digest}; nothing stored")
                    t0 = time.monotonic()
                    local.import_layer(store, ar.open(name), diff_id, f"{path}: {name}", added)
                    log(f"Loaded layer {diff_id[7:19]} ({time.monotonic() - t0:.1f}s)")
            out = []
            images = [local.put_image_bytes(store, e.config) for e in entries]
        except BaseException:
            local.discard_layers(store, added)
            raise
        for img, e in zip(images, entries):
            for r in e.refs:
                out.append(f"Loaded image: {store.tag(img, r)}")
            if not e.refs:
                out.append(f"Loaded image ID: {img.id}")
        return out
    finally:
        if spool_dir:
            shutil.rmtree(spool_dir, ignore_errors=True)
