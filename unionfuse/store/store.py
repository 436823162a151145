"""The image store: immutable content-addressed layers, OCI image configs, name:tag
references and container records, all under one root dir.

Layout::

    ROOT/                 0700
      lock                flock for metadata changes
      refs.json           {"name:tag": "sha256:<image id>"}
      layers/<hex>/       one per diff_id (sha256 of the uncompressed layer tar)
          diff/           the layer tree (overlay-form whiteouts)
          layer.json      {"diff_id", "size", "created"}
      images/<hex>.json   the OCI image config; <hex> = sha256 of these bytes
      containers/<id>/    see unionfuse.runtime
      tmp/<pid>-<rand>/   staging; renamed into place when complete
      tmp/<pid>-lease-<hex>, tmp/<pid>-pin-<hex>, tmp/<pid>-pinimg-<hex>
                          a live process's hold on a layer / an image (gc and prune
                          spare them; a dead process's are removed)

Layer dirs and image configs are written once, in tmp/, then renamed into place; JSON
metadata is replaced atomically (write + fsync + rename) under the lock, so a crash
mid-import or mid-commit leaves no half-made layer referenced by anything, and several
CLI commands may run at once.

Locking follows containers/storage: one lock per store (flock on ROOT/lock), taken
for short critical sections only (check-then-write of metadata, moving a finished layer
into place, deciding what gc removes), never across a download, an unpack or a
container's life.  Anything that must outlive a section (a layer about to be
referenced, the images a build works from) is held by a pin file named by its pid.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from ..errors import UnionfuseError

DEFAULT_ROOT = "/var/lib/unionfuse"


class StoreError(UnionfuseError):
    pass


class NotFound(StoreError):
    exit_code = 1


class Conflict(StoreError):
    exit_code = 1


class ImageInUse(Conflict):
    def __init__(self, user):
        super().__init__("the image is in use")
        self.user = user


def now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%09dZ" % int((t % 1) * 1e9)


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def write_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    tmp = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)


# docker's reference grammar (distribution/reference); used with fullmatch, ASCII only
_REF_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*", re.ASCII)
_HOST_RE = re.compile(r"[a-zA-Z0-9](?:[a-zA-Z0-9.-]*[a-zA-Z0-9])?(?::[0-9]+)?", re.ASCII)
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)


def normalize_ref(ref: str) -> str:
    """'busybox' -> 'busybox:latest'; validates like docker's reference grammar."""
    name, tag = ref, "latest"
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        name, tag = ref[:colon], ref[colon + 1:]
    if not _TAG_RE.fullmatch(tag):
        raise StoreError(f"invalid reference format: bad tag in {ref!r}")
    parts = name.split("/")
    host = parts[0] if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost") else None
    path = "/".join(parts[1:]) if host else name
    if (host and not _HOST_RE.fullmatch(host)) or not _REF_RE.fullmatch(path) or len(name) > 255:
        raise StoreError(f"invalid reference format: {ref!r} (names are lowercase letters, digits, "
                         "separators . _ -, and /)")
    return f"{name}:{tag}"


@dataclass
class Image:
    id: str  # "sha256:<hex>"
    config: dict

    @property
    def short_id(self) -> str:
        return self.id.split(":", 1)[1][:12]

    @property
    def diff_ids(self) -> list[str]:
        return list(self.config.get("rootfs", {}).get("diff_ids", []))

    @property
    def run_config(self) -> dict:
        return self.config.get("config") or {}


class Store:
    def __init__(self, root: str | None = None):
        self.root = os.path.abspath(root or os.environ.get("UNIONFUSE_ROOT") or DEFAULT_ROOT)
        try:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            os.chmod(self.root, 0o700)
            for d in ("layers", "images", "containers", "tmp"):
                os.makedirs(os.path.join(self.root, d), mode=0o700, exist_ok=True)
        except OSError as e:
            raise StoreError(f"can't use store root {self.root}: {e.strerror}") from None
        self._clean_tmp()

    # -- locking and staging ------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        fd = os.open(os.path.join(self.root, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _clean_tmp(self) -> None:
        """Remove what dead processes left: staging dirs, gc trash and leases in tmp/
        (named <pid>-...), and half-written metadata files (NAME.<pid>.<rand>.tmp)."""
        tmp = os.path.join(self.root, "tmp")
        for name in os.listdir(tmp):
            pid = name.split("-", 1)[0]
            if pid.isdigit() and not _alive(pid):
                path = os.path.join(tmp, name)
                if not _unmount_under(path):
                    continue  # something is still mounted there: never delete through it
                _rmtree(path)
        for d in (self.root, os.path.join(self.root, "images")):
            for name in os.listdir(d):
                parts = name.split(".")
                if len(parts) >= 4 and parts[-1] == "tmp" and parts[-3].isdigit() and not _alive(parts[-3]):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(d, name))

    def _lease_path(self, diff_id: str, pid: int | None = None) -> str:
        return os.path.join(self.root, "tmp", f"{pid or os.getpid()}-lease-{_hex(diff_id)}")

    def _leased_layers(self) -> set[str]:
        """Layers a live process has just added and not yet put in an image, or pinned."""
        return self._held("-lease-") | self._held("-pin-")

    def pinned_images(self) -> set[str]:
        """Images a live process works from (a build): prune spares them."""
        return self._held("-pinimg-")

    def _held(self, kind: str) -> set[str]:
        out = set()
        for name in os.listdir(os.path.join(self.root, "tmp")):
            pid, _, rest = name.partition(kind)
            if rest and pid.isdigit() and _alive(pid):
                out.add("sha256:" + rest)
        return out

    def pin(self, image: Image) -> None:
        """Hold *image* and its layers for as long as this process lives (a build works
        from it): a concurrent rmi/prune leaves them.  NotFound if it went meanwhile."""
        tmp = os.path.join(self.root, "tmp")
        with self.lock():
            if not os.path.exists(os.path.join(self.root, "images", _hex(image.id) + ".json")):
                raise NotFound(f"no such image: {image.id} (removed meanwhile)")
            for d in image.diff_ids:
                if not self.has_layer(d):
                    raise NotFound(f"layer {d} is missing from the store")
            for p in [f"{os.getpid()}-pinimg-{_hex(image.id)}"] + [f"{os.getpid()}-pin-{_hex(d)}" for d in image.diff_ids]:
                p = os.path.join(tmp, p)
                if p not in _LEASES:
                    with open(p, "wb"):
                        pass
                    _LEASES.add(p)

    def check_image(self, image: Image) -> None:
        """Under the lock: *image* and all its layers are still in the store."""
        if not os.path.exists(os.path.join(self.root, "images", _hex(image.id) + ".json")):
            raise NotFound(f"no such image: {image.id} (removed meanwhile)")
        for d in image.diff_ids:
            if not self.has_layer(d):
                raise NotFound(f"layer {d} of image {image.short_id} is missing from the store")

    def staging(self) -> str:
        return tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=os.path.join(self.root, "tmp"))

    # -- layers -------------------------------------------------------------------------

    def layer_path(self, diff_id: str) -> str:
        return os.path.join(self.root, "layers", _hex(diff_id))

    def layer_diff(self, diff_id: str) -> str:
        return os.path.join(self.layer_path(diff_id), "diff")

    def has_layer(self, diff_id: str) -> bool:
        return os.path.isfile(os.path.join(self.layer_path(diff_id), "layer.json"))

    def layer_info(self, diff_id: str) -> dict:
        try:
            with open(os.path.join(self.layer_path(diff_id), "layer.json")) as f:
                return json.load(f)
        except OSError:
            raise NotFound(f"layer {diff_id} is missing from the store") from None

    def add_layer_tar(self, stream: BinaryIO, label: str = "layer") -> str:
        """Unpack a layer tar into the store; returns its diff_id (reusing an existing
        layer with the same diff_id)."""
        stage = self.staging()
        try:
            diff = os.path.join(stage, "diff")
            os.mkdir(diff, 0o755)
            os.chmod(diff, 0o755)  # the rootfs "/" unless the tar has a "./" entry
            from . import tarlayer
            diff_id, size = tarlayer.apply_tar(stream, diff, label=label)
            return self._commit_layer(stage, diff_id, size)
        finally:
            _rmtree(stage)

    def add_layer_from_dir(self, src: str, lowers: list[str] | None = None) -> str:
        """Normalise a layer dir (e.g. a container's upper) through its OCI tar form and
        store it.  *lowers* (top first) expand renamed dirs."""
        from ..fs.union import Layers

        layers = Layers(None, [os.fsencode(x) for x in (lowers or [])]) if lowers else None
        stage = self.staging()
        try:
            tar_path = os.path.join(stage, "layer.tar")
            from . import tarlayer  # (not imported for `run`: ~4 ms)

            with open(tar_path, "wb") as f:
                tarlayer.write_layer_tar(src, f, layers)
            with open(tar_path, "rb") as f:
                diff = os.path.join(stage, "diff")
                os.mkdir(diff, 0o755)
                os.chmod(diff, 0o755)
                diff_id, size = tarlayer.apply_tar(f, diff)
            os.unlink(tar_path)
            return self._commit_layer(stage, diff_id, size)
        finally:
            _rmtree(stage)

    def _commit_layer(self, stage: str, diff_id: str, size: int) -> str:
        write_atomic(os.path.join(stage, "layer.json"),
                     canonical_json({"diff_id": diff_id, "size": size, "created": now_iso()}))
        os.chmod(stage, 0o700)
        with self.lock():
            # until put_image references it, gc_layers (a concurrent rmi/prune) keeps it
            lease = self._lease_path(diff_id)
            with open(lease, "wb"):
                pass
            _LEASES.add(lease)
            if self.has_layer(diff_id):
                return diff_id
            dst = self.layer_path(diff_id)
            if os.path.lexists(dst):  # a leftover without layer.json: never referenced
                _rmtree(dst)
            os.rename(stage, dst)
        return diff_id

    def layer_tar(self, diff_id: str, out: BinaryIO) -> str:
        from . import tarlayer
        return tarlayer.write_layer_tar(self.layer_diff(diff_id), out)

    def all_layers(self) -> list[str]:
        out = []
        for name in os.listdir(os.path.join(self.root, "layers")):
            if os.path.isfile(os.path.join(self.root, "layers", name, "layer.json")):
                out.append("sha256:" + name)
        return out

    # -- images -------------------------------------------------------------------------

    def put_image(self, config: dict, ref: str | None = None) -> Image:
        """Store an image config; with *ref*, name it in the same locked step (so a
        concurrent prune can't take the still-untagged image in between)."""
        ref = normalize_ref(ref) if ref is not None else None
        data = canonical_json(config)
        image_id = "sha256:" + hashlib.sha256(data).hexdigest()
        path = os.path.join(self.root, "images", _hex(image_id) + ".json")
        diff_ids = config.get("rootfs", {}).get("diff_ids", [])
        with self.lock():  # gc_layers can't run between the check and the write
            for d in diff_ids:
                if not self.has_layer(d):
                    raise NotFound(f"layer {d} is not in the store")
            if not os.path.exists(path):
                write_atomic(path, data)
            for d in diff_ids:
                _drop_lease(self._lease_path(d))
            if ref is not None:
                refs = self.refs()
                refs[ref] = image_id
                self._write_refs(refs)
        return Image(image_id, config)

    def image_by_id(self, image_id: str) -> Image:
        path = os.path.join(self.root, "images", _hex(image_id) + ".json")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise NotFound(f"no such image: {image_id}") from None
        try:
            config = json.loads(data)
        except ValueError as e:
            raise StoreError(f"image config {image_id} is corrupt: {e}") from None
        if not isinstance(config, dict):
            raise StoreError(f"image config {image_id} is corrupt: not a JSON object")
        return Image(image_id, config)

    def image_ids(self) -> list[str]:
        return ["sha256:" + n[:-5] for n in os.listdir(os.path.join(self.root, "images")) if n.endswith(".json")]

    def refs(self) -> dict[str, str]:
        path = os.path.join(self.root, "refs.json")
        try:
            with open(path) as f:
                refs = json.load(f)
        except FileNotFoundError:
            return {}
        except ValueError as e:
            raise StoreError(f"store metadata is corrupt: {path}: {e}") from None
        if not isinstance(refs, dict):
            raise StoreError(f"store metadata is corrupt: {path}: not a JSON object")
        return refs

    def _write_refs(self, refs: dict[str, str]) -> None:
        write_atomic(os.path.join(self.root, "refs.json"), canonical_json(refs))

    def tag(self, image: Image, ref: str) -> str:
        ref = normalize_ref(ref)
        with self.lock():
            if not os.path.exists(os.path.join(self.root, "images", _hex(image.id) + ".json")):
                raise NotFound(f"no such image: {image.id}")  # e.g. removed meanwhile
            refs = self.refs()
            refs[ref] = image.id
            self._write_refs(refs)
        return ref

    def untag(self, ref: str) -> str | None:
        ref = normalize_ref(ref)
        with self.lock():
            refs = self.refs()
            image_id = refs.pop(ref, None)
            if image_id is not None:
                self._write_refs(refs)
        return image_id

    def resolve(self, name: str) -> Image:
        """An image by name[:tag], full id, or unique id prefix (as docker accepts)."""
        refs = self.refs()
        try:
            ref = normalize_ref(name)
        except StoreError:
            ref = None
        if ref and ref in refs:
            return self.image_by_id(refs[ref])
        hexpart = name.removeprefix("sha256:")
        if re.fullmatch(r"[0-9a-f]{4,64}", hexpart):
            matches = [i for i in self.image_ids() if _hex(i).startswith(hexpart)]
            if len(matches) == 1:
                return self.image_by_id(matches[0])
            if len(matches) > 1:
                raise Conflict(f"ambiguous image id prefix {name!r}")
        raise NotFound(f"no such image: {name}")

    def refs_of(self, image_id: str) -> list[str]:
        return sorted(r for r, i in self.refs().items() if i == image_id)

    def delete_image(self, image: Image, keep=None) -> bool:
        """Remove an image and its names.  *keep* (a function giving image ids, called
        under the lock: e.g. those containers use) spares it: returns False."""
        with self.lock():
            if keep is not None and image.id in set(keep()):
                return False
            refs = self.refs()
            if any(i == image.id for i in refs.values()):
                self._write_refs({r: i for r, i in refs.items() if i != image.id})
            try:
                os.unlink(os.path.join(self.root, "images", _hex(image.id) + ".json"))
            except FileNotFoundError:
                pass
        return True

    def remove_image(self, image: Image, users, force: bool) -> tuple[list[str], bool]:
        """rmi in one locked step: *users()* (under the lock) are the containers using
        it; with some and not *force*: Conflict, nothing changed.  Returns (the names
        removed, whether the image itself went; not while a container uses it)."""
        with self.lock():
            using = users()
            if using and not force:
                raise ImageInUse(using[0])
            refs = self.refs()
            gone = sorted(r for r, i in refs.items() if i == image.id)
            if gone:
                self._write_refs({r: i for r, i in refs.items() if i != image.id})
            if using:
                return gone, False
            try:
                os.unlink(os.path.join(self.root, "images", _hex(image.id) + ".json"))
            except FileNotFoundError:
                if not gone:
                    raise NotFound(f"no such image: {image.id}") from None
        return gone, True

    def gc_layers(self, keep) -> list[str]:
        """Remove layers no image uses, nor *keep* (a set, or a function giving one, called
        under the lock so a concurrent command can't slip a new user in).  Returns the
        removed diff_ids."""
        removed = []
        with self.lock():
            used = set(keep() if callable(keep) else keep) | self._leased_layers()
            for iid in self.image_ids():
                try:
                    used.update(self.image_by_id(iid).diff_ids)
                except (NotFound, ValueError):
                    continue
            for d in self.all_layers():
                if d not in used:
                    trash = os.path.join(self.root, "tmp", f"{os.getpid()}-gc-{_hex(d)[:16]}")
                    os.rename(self.layer_path(d), trash)
                    _rmtree(trash)
                    removed.append(d)
        return removed

    def layer_dirs(self, image: Image) -> list[str]:
        """The image's layer dirs, top-most first (the daemon's --lower order)."""
        return [self.layer_diff(d) for d in reversed(image.diff_ids)]


def _unmount_under(path: str) -> bool:
    """Unmount what a killed builder left mounted below *path* (its daemons too).
    True when nothing is mounted there any more."""
    from .. import mount as mountmod

    prefix = os.fsencode(os.path.realpath(path)) + b"/"
    with open("/proc/self/mountinfo", "rb") as f:
        points = [mountmod._unescape_mountinfo(line.split()[4]) for line in f]
    for mp in sorted((m for m in points if m.startswith(prefix)), key=len, reverse=True):
        target = os.fsdecode(mp)
        pid = mountmod._read_pid(target)
        mountmod.unmount_layers(target, pid, timeout=10)
    with open("/proc/self/mountinfo", "rb") as f:
        return not any(mountmod._unescape_mountinfo(line.split()[4]).startswith(prefix) for line in f)


def _hex(digest: str) -> str:
    h = digest.removeprefix("sha256:")
    if not re.fullmatch(r"[0-9a-f]{64}", h):
        raise StoreError(f"bad digest {digest!r}")
    return h


_LEASES: set[str] = set()  # this process's lease files


def _drop_lease(path: str) -> None:
    _LEASES.discard(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@atexit.register
def _drop_leases() -> None:  # a lease only matters while its process lives
    for path in list(_LEASES):
        if path.startswith(f"{os.path.dirname(path)}/{os.getpid()}-"):
            _drop_lease(path)


def _alive(pid: str | int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def _rmtree(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        with contextlib.suppress(OSError):
            os.unlink(path)
