"""Union rules: how layers combine into one tree.  No pyfuse3 here.

Layers are numbered 0 (the upper dir, if any) and 1..n (lower dirs, top-most first).
Paths inside a layer are *relative* byte strings (b"" is the layer root).

Read side, every common form is understood in every layer:

* whiteouts: a 0/0 character device, or a ``.wh.NAME`` file (OCI);
* opaque dirs: ``trusted.overlay.opaque`` / ``user.overlay.opaque`` = ``y``, or a
  ``.wh..wh..opq`` entry inside the dir (OCI);
* renamed dirs: ``trusted.overlay.redirect`` / ``user.overlay.redirect`` (absolute
  ``/a/b`` from the layer root, or a plain name relative to the parent), as the kernel
  writes with ``redirect_dir=on``.

Within one layer a real entry wins over a ``.wh.`` sibling of the same name (OCI
image-spec layer.md: a whiteout only applies to lower layers).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field

WH_PREFIX = b".wh."
WH_OPAQUE = b".wh..wh..opq"
OVERLAY_NS = (b"trusted.overlay.", b"user.overlay.")
NAME_MAX = 255


def is_private_xattr(name: bytes) -> bool:
    """True for xattrs the mount never lists or lets users set (the kernel's overlay
    xattrs and the daemon's own records, kept under ``*.overlay.unionfuse.*``)."""
    return name.startswith(OVERLAY_NS)


def is_whiteout_stat(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def lstat_or_none(path: bytes) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:  # e.g. ".wh." + a 252-byte name
            return None
        raise


def _getxattr(path: bytes, name: bytes) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES):
            return None
        raise


@dataclass(frozen=True)
class DirMeta:
    opaque: bool = False
    redirect: bytes | None = None


def dir_meta(path: bytes) -> DirMeta:
    """Opaque flag and redirect of one real directory."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EACCES, errno.EPERM):
            names = []
        else:
            raise
    opaque = False
    redirect = None
    if names:
        for ns in OVERLAY_NS:
            nsstr = ns.decode()
            if nsstr + "opaque" in names and _getxattr(path, ns + b"opaque") == b"y":
                opaque = True
            if redirect is None and nsstr + "redirect" in names:
                redirect = _getxattr(path, ns + b"redirect") or None
    if not opaque and lstat_or_none(os.path.join(path, WH_OPAQUE)) is not None:
        opaque = True
    return DirMeta(opaque, redirect)


def join(rel: bytes, name: bytes) -> bytes:
    return name if not rel else rel + b"/" + name


def parent_of(rel: bytes) -> bytes:
    i = rel.rfind(b"/")
    return b"" if i < 0 else rel[:i]


def check_name(name: bytes) -> None:
    """Names a user may create through the mount."""
    if len(name) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, "name too long")
    if name.startswith(WH_PREFIX):
        raise OSError(errno.EINVAL, "reserved whiteout name")


@dataclass
class Entry:
    """What one name resolves to in a merged directory."""

    found: bool = False
    is_dir: bool = False
    # Real stat of the top-most real entry (upper if in_upper, else the top lower).
    st: os.stat_result | None = None
    in_upper: bool = False
    # Lower layers contributing: for a dir, every merged lower dir (top first); for a
    # non-dir, the single lower file it comes from (empty if upper-only).
    lowers: list[tuple[int, bytes]] = field(default_factory=list)
    # The upper layer hides the name with a whiteout (create/mkdir must replace it).
    upper_whiteout: bool = False
    opaque: bool = False


class Layers:
    """The real directories of one mount and the rules to combine them."""

    def __init__(self, upper: bytes | None, lowers: list[bytes]):
        # roots[0] is the upper (None for a read-only mount)
        self.roots: list[bytes | None] = [upper] + list(lowers)
        self.nlower = len(lowers)

    def real(self, idx: int, rel: bytes) -> bytes:
        root = self.roots[idx]
        assert root is not None
        return root if not rel else root + b"/" + rel

    def upper(self, rel: bytes) -> bytes:
        return self.real(0, rel)

    def _wh_file(self, idx: int, rel: bytes) -> bool:
        parent = parent_of(rel)
        base = rel[len(parent) + 1 :] if parent else rel
        return lstat_or_none(self.real(idx, join(parent, WH_PREFIX + base))) is not None

    def resolve(
        self,
        upper_dir: bytes | None,
        parent_lowers: list[tuple[int, bytes]],
        name: bytes,
    ) -> Entry:
        """Resolve *name* in a merged directory.

        *upper_dir* is the parent's relative path in the upper layer if the parent
        exists there (else None); *parent_lowers* the parent's lower stack.
        """
        ent = Entry()
        relname = name
        override: bytes | None = None  # absolute redirect in force below this point
        if upper_dir is not None and self.roots[0] is not None:
            rel = join(upper_dir, name)
            st = lstat_or_none(self.upper(rel))
            if st is not None:
                if is_whiteout_stat(st):
                    ent.upper_whiteout = True
                    return ent
                ent.found, ent.st, ent.in_upper = True, st, True
                if not stat.S_ISDIR(st.st_mode):
                    return ent
                ent.is_dir = True
                meta = dir_meta(self.upper(rel))
                # OCI: a .wh.NAME beside dir NAME in one layer deleted the lower NAME
                if meta.opaque or self._wh_file(0, rel):
                    ent.opaque = True
                    return ent
                if meta.redirect:
                    override, relname = self._follow(meta.redirect, override, relname)
            elif self._wh_file(0, rel):
                ent.upper_whiteout = True
                return ent
        pmap = dict(parent_lowers)
        for idx in range(1, self.nlower + 1):
            if override is not None:
                rel = override
            else:
                ppath = pmap.get(idx)
                if ppath is None:
                    continue
                rel = join(ppath, relname)
            st = lstat_or_none(self.real(idx, rel))
            if st is None:
                if self._wh_file(idx, rel):
                    break
                continue
            if is_whiteout_stat(st):
                break
            if stat.S_ISDIR(st.st_mode):
                if not ent.found:
                    ent.found, ent.is_dir, ent.st = True, True, st
                elif not ent.is_dir:
                    break
                ent.lowers.append((idx, rel))
                meta = dir_meta(self.real(idx, rel))
                if meta.opaque or self._wh_file(idx, rel):
                    break
                if meta.redirect:
                    override, relname = self._follow(meta.redirect, override, relname)
            else:
                if not ent.found:
                    ent.found, ent.st = True, st
                    ent.lowers.append((idx, rel))
                break
        return ent

    @staticmethod
    def _follow(redirect: bytes, override: bytes | None, relname: bytes):
        if redirect.startswith(b"/"):
            return redirect.strip(b"/"), relname
        if b"/" in redirect or redirect in (b".", b".."):
            return override, relname  # malformed: ignore, as the kernel does
        if override is not None:
            return join(parent_of(override), redirect), relname
        return None, redirect

    def lower_positive(self, parent_lowers: list[tuple[int, bytes]], name: bytes) -> bool:
        """Does any lower layer (below the upper) show *name* in this directory?"""
        return self.resolve(None, parent_lowers, name).found

    def listdir(
        self, upper_dir: bytes | None, lowers: list[tuple[int, bytes]]
    ) -> list[bytes]:
        """Visible names of a merged directory, upper first then each lower."""
        dirs: list[bytes] = []
        if upper_dir is not None and self.roots[0] is not None:
            dirs.append(self.upper(upper_dir))
        dirs.extend(self.real(i, r) for i, r in lowers)
        seen: set[bytes] = set()
        hidden: set[bytes] = set()
        out: list[bytes] = []
        for d in dirs:
            layer_wh: list[bytes] = []
            try:
                it = os.scandir(d)
            except (FileNotFoundError, NotADirectoryError):
                continue
            with it:
                for e in it:
                    n = e.name
                    if n.startswith(WH_PREFIX):
                        if n != WH_OPAQUE:
                            layer_wh.append(n[len(WH_PREFIX) :])
                        continue
                    if n in seen or n in hidden:
                        continue
                    if _maybe_device(e) and is_whiteout_stat(e.stat(follow_symlinks=False)):
                        hidden.add(n)
                        continue
                    seen.add(n)
                    out.append(n)
            hidden.update(layer_wh)
        return out


def _maybe_device(e: os.DirEntry) -> bool:
    """d_type says neither dir, file nor symlink (no syscall when d_type is known)."""
    try:
        return not (
            e.is_dir(follow_symlinks=False) or e.is_file(follow_symlinks=False) or e.is_symlink()
        )
    except OSError:
        return False
