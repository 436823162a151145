"""Pure tests of the union rules (unionfuse/fs/union.py) and of mount option handling
(unionfuse/mount.py) -- no FUSE mount.  Layers are real temp dirs.

Layer numbering follows union.py: 0 is the upper, 1..n the lowers, top-most first.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess

import pytest

from unionfuse.errors import UsageError
from unionfuse.fs import union
from unionfuse.fs.union import DirMeta, Layers, check_name, dir_meta, is_private_xattr
from unionfuse.mount import (
    MountSpec,
    apply_options,
    fuse_options,
    read_config,
    split_lowerdir,
    split_options,
)

# -- helpers ---------------------------------------------------------------------------


def b(p) -> bytes:
    return os.fsencode(str(p))


def mkfile(path, data: str = "") -> None:
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(data)


def mkdir(path) -> None:
    os.makedirs(str(path), exist_ok=True)


def whiteout(path) -> None:
    """The overlay whiteout: a 0/0 character device."""
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    os.mknod(str(path), stat.S_IFCHR | 0o000, os.makedev(0, 0))


def setx(path, name: str, value: bytes) -> None:
    try:
        os.setxattr(str(path), name, value, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            pytest.skip(f"can't set {name} on this filesystem: {e}")
        raise


class L:
    """A set of layer dirs under tmp: upper u, lowers l1 l2 l3."""

    def __init__(self, tmp, upper=True, nlower=3):
        self.u = tmp / "u"
        self.lo = [tmp / f"l{i}" for i in range(1, nlower + 1)]
        for d in ([self.u] if upper else []) + self.lo:
            d.mkdir()
        self.layers = Layers(b(self.u) if upper else None, [b(x) for x in self.lo])
        self.has_upper = upper

    @property
    def l1(self):
        return self.lo[0]

    @property
    def l2(self):
        return self.lo[1]

    @property
    def l3(self):
        return self.lo[2]

    def root_lowers(self):
        return [(i, b"") for i in range(1, len(self.lo) + 1)]

    def lookup(self, path: str) -> union.Entry:
        """Resolve a '/'-separated path from the root, component by component."""
        upper_dir = b"" if self.has_upper else None
        lowers = self.root_lowers()
        ent = None
        parts = [p for p in path.split("/") if p]
        for i, name in enumerate(parts):
            ent = self.layers.resolve(upper_dir, lowers, name.encode())
            if i == len(parts) - 1:
                break
            assert ent.found and ent.is_dir, f"{name} is not a merged dir"
            upper_dir = union.join(upper_dir, name.encode()) if ent.in_upper else None
            lowers = ent.lowers
        return ent

    def listdir(self, path: str = "") -> list[bytes]:
        if not path:
            return self.layers.listdir(b"" if self.has_upper else None, self.root_lowers())
        ent = self.lookup(path)
        assert ent.found and ent.is_dir
        upper_dir = os.fsencode(path.strip("/")) if ent.in_upper else None
        return self.layers.listdir(upper_dir, ent.lowers)


@pytest.fixture
def L3(tmp_path):
    return L(tmp_path)


@pytest.fixture
def L3ro(tmp_path):
    return L(tmp_path, upper=False)


def content(ent: union.Entry, lay: L) -> str:
    """Which real file an entry points at, by reading it."""
    if ent.in_upper:
        raise AssertionError("use upper path")
    idx, rel = ent.lowers[0]
    with open(lay.layers.real(idx, rel), "rb") as f:
        return f.read().decode()


# -- resolve: precedence ----------------------------------------------------------------


def test_top_most_lower_wins(L3ro):
    mkfile(L3ro.l1 / "f", "one")
    mkfile(L3ro.l2 / "f", "two")
    mkfile(L3ro.l3 / "f", "three")
    ent = L3ro.lookup("f")
    assert ent.found and not ent.is_dir and not ent.in_upper
    assert ent.lowers == [(1, b"f")]
    assert content(ent, L3ro) == "one"
    assert ent.st.st_ino == os.lstat(L3ro.l1 / "f").st_ino


def test_name_only_in_bottom_layer(L3):
    mkfile(L3.l3 / "f", "three")
    ent = L3.lookup("f")
    assert ent.found and not ent.in_upper and ent.lowers == [(3, b"f")]


def test_upper_wins_over_lowers(L3):
    mkfile(L3.u / "f", "up")
    mkfile(L3.l1 / "f", "one")
    ent = L3.lookup("f")
    assert ent.found and ent.in_upper and not ent.is_dir
    assert ent.st.st_ino == os.lstat(L3.u / "f").st_ino
    assert ent.lowers == []  # upper-only non-dir: no lower source


def test_missing_name(L3):
    ent = L3.lookup("nope")
    assert not ent.found and not ent.upper_whiteout and ent.lowers == []


def test_dirs_merge_across_layers(L3):
    mkdir(L3.u / "d")
    mkdir(L3.l1 / "d")
    mkdir(L3.l3 / "d")
    ent = L3.lookup("d")
    assert ent.found and ent.is_dir and ent.in_upper and not ent.opaque
    assert ent.lowers == [(1, b"d"), (3, b"d")]
    assert ent.st.st_ino == os.lstat(L3.u / "d").st_ino


def test_nested_dirs_merge(L3):
    mkfile(L3.l1 / "a/b/x")
    mkfile(L3.l2 / "a/b/y")
    mkfile(L3.l3 / "a/z")
    ent = L3.lookup("a/b")
    assert ent.is_dir and not ent.in_upper
    assert ent.lowers == [(1, b"a/b"), (2, b"a/b")]
    assert sorted(L3.listdir("a/b")) == [b"x", b"y"]
    assert sorted(L3.listdir("a")) == [b"b", b"z"]


# -- resolve: whiteouts ----------------------------------------------------------------


def test_chardev_whiteout_in_upper_hides_lowers(L3):
    whiteout(L3.u / "f")
    mkfile(L3.l1 / "f")
    mkdir(L3.l2 / "f")
    ent = L3.lookup("f")
    assert not ent.found and ent.upper_whiteout and ent.lowers == []


def test_chardev_whiteout_in_lower_hides_lower_layers(L3):
    whiteout(L3.l1 / "f")
    mkfile(L3.l2 / "f")
    whiteout(L3.l1 / "d")
    mkdir(L3.l2 / "d")
    for name in ("f", "d"):
        ent = L3.lookup(name)
        assert not ent.found, name
        assert not ent.upper_whiteout  # the upper has no whiteout of its own
    assert not L3.layers.lower_positive(L3.root_lowers(), b"f")


def test_chardev_whiteout_in_middle_lower_only_hides_below(L3):
    mkfile(L3.l1 / "f", "one")
    whiteout(L3.l2 / "f")
    mkfile(L3.l3 / "f", "three")
    ent = L3.lookup("f")
    assert ent.found and content(ent, L3) == "one"


def test_long_names_resolve(L3):
    """A 255-byte name: its `.wh.` probe is too long for the filesystem, not an error."""
    for n in (252, 253, 255):
        name = "a" * n
        mkfile(L3.l2 / name, "two")
        ent = L3.lookup(name)
        assert ent.found and ent.lowers == [(2, name.encode())], n
        assert name.encode() in L3.listdir()


def test_char_device_not_0_0_is_not_a_whiteout(L3):
    os.mknod(L3.l1 / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    mkfile(L3.l2 / "null")
    ent = L3.lookup("null")
    assert ent.found and stat.S_ISCHR(ent.st.st_mode) and ent.lowers == [(1, b"null")]
    assert b"null" in L3.listdir()


def test_wh_file_in_upper_hides_lowers(L3):
    mkfile(L3.u / ".wh.f")
    mkfile(L3.l1 / "f")
    ent = L3.lookup("f")
    assert not ent.found and ent.upper_whiteout


def test_wh_file_in_lower_hides_lower_layers(L3):
    mkfile(L3.l1 / ".wh.f")
    mkfile(L3.l2 / "f")
    mkfile(L3.l1 / ".wh.d")
    mkdir(L3.l2 / "d")
    mkdir(L3.l3 / "d")
    for name in ("f", "d"):
        ent = L3.lookup(name)
        assert not ent.found and not ent.upper_whiteout, name


def test_wh_file_in_subdir(L3):
    mkfile(L3.l1 / "d/.wh.x")
    mkfile(L3.l2 / "d/x")
    mkfile(L3.l2 / "d/y")
    assert not L3.lookup("d/x").found
    assert L3.lookup("d/y").found
    assert L3.listdir("d") == [b"y"]


@pytest.mark.parametrize("layer", ["u", "l1"])
def test_real_entry_beats_wh_sibling_in_same_layer(L3, layer):
    top = getattr(L3, layer)
    mkfile(top / "f", "top")
    mkfile(top / ".wh.f")
    mkfile(L3.l2 / "f", "two")
    ent = L3.lookup("f")
    assert ent.found and not ent.upper_whiteout
    if layer == "u":
        assert ent.in_upper
    else:
        assert ent.lowers == [(1, b"f")]
    assert b"f" in L3.listdir()


@pytest.mark.parametrize("layer", ["u", "l1"])
def test_wh_sibling_still_hides_lower_dir_under_same_layer_dir(L3, layer):
    """OCI image-spec layer.md: "Whiteout files MUST only apply to resources in
    lower/parent layers.  Files that are present in the same layer as a whiteout file can
    only be hidden by whiteout files in subsequent layers."  A layer holding both
    ``.wh.d`` and ``d/`` deleted the lower ``d`` and made a new one: the new ``d`` is
    visible, the lower ``d``'s contents are not."""
    top = getattr(L3, layer)
    mkfile(top / "d/new")
    mkfile(top / ".wh.d")
    mkfile(L3.l2 / "d/old")
    ent = L3.lookup("d")
    assert ent.found and ent.is_dir
    assert ent.lowers == ([] if layer == "u" else [(1, b"d")])
    assert L3.listdir("d") == [b"new"]


# -- resolve: opaque dirs --------------------------------------------------------------


@pytest.mark.parametrize("form", ["trusted", "user", "wh"])
def test_opaque_upper_dir_stops_merge(L3, form):
    mkfile(L3.u / "d/mine")
    if form == "wh":
        mkfile(L3.u / "d" / ".wh..wh..opq")
    else:
        setx(L3.u / "d", f"{form}.overlay.opaque", b"y")
    mkfile(L3.l1 / "d/theirs")
    ent = L3.lookup("d")
    assert ent.found and ent.is_dir and ent.in_upper and ent.opaque
    assert ent.lowers == []
    assert L3.listdir("d") == [b"mine"]


@pytest.mark.parametrize("form", ["trusted", "user", "wh"])
def test_opaque_lower_dir_stops_merge_below_it(L3, form):
    mkfile(L3.u / "d/up")
    mkfile(L3.l1 / "d/one")
    if form == "wh":
        mkfile(L3.l1 / "d" / ".wh..wh..opq")
    else:
        setx(L3.l1 / "d", f"{form}.overlay.opaque", b"y")
    mkfile(L3.l2 / "d/two")
    mkfile(L3.l3 / "d/three")
    ent = L3.lookup("d")
    assert ent.found and ent.is_dir and ent.in_upper
    assert ent.lowers == [(1, b"d")]
    assert sorted(L3.listdir("d")) == [b"one", b"up"]


def test_opaque_value_other_than_y_is_not_opaque(L3):
    mkdir(L3.l1 / "d")
    setx(L3.l1 / "d", "trusted.overlay.opaque", b"n")
    mkfile(L3.l2 / "d/two")
    assert L3.lookup("d").lowers == [(1, b"d"), (2, b"d")]


# -- resolve: type changes between layers ----------------------------------------------


def test_non_dir_in_upper_hides_lower_dir(L3):
    mkfile(L3.u / "d", "file")
    mkfile(L3.l1 / "d/x")
    ent = L3.lookup("d")
    assert ent.found and ent.in_upper and not ent.is_dir and ent.lowers == []


def test_non_dir_in_lower_hides_dir_below(L3):
    mkfile(L3.l1 / "d", "file")
    mkfile(L3.l2 / "d/x")
    ent = L3.lookup("d")
    assert ent.found and not ent.is_dir and ent.lowers == [(1, b"d")]


def test_symlink_to_dir_is_a_non_dir(L3):
    mkdir(L3.l2 / "target")
    os.symlink("target", L3.l1 / "d")
    mkfile(L3.l2 / "d/x")
    ent = L3.lookup("d")
    assert ent.found and not ent.is_dir and stat.S_ISLNK(ent.st.st_mode)
    assert ent.lowers == [(1, b"d")]


def test_dir_in_upper_over_lower_file_stops_merge(L3):
    mkfile(L3.u / "d/up")
    mkfile(L3.l1 / "d", "file")
    mkfile(L3.l2 / "d/two")
    ent = L3.lookup("d")
    assert ent.found and ent.is_dir and ent.in_upper
    assert ent.lowers == []
    assert L3.listdir("d") == [b"up"]


def test_dir_in_lower_over_lower_file_stops_merge(L3):
    mkfile(L3.l1 / "d/one")
    mkfile(L3.l2 / "d", "file")
    mkfile(L3.l3 / "d/three")
    ent = L3.lookup("d")
    assert ent.is_dir and ent.lowers == [(1, b"d")]
    assert L3.listdir("d") == [b"one"]


# -- resolve: redirects ------------------------------------------------------------------


@pytest.mark.parametrize("ns", ["trusted", "user"])
def test_absolute_redirect_from_upper(L3, ns):
    mkfile(L3.u / "new/up")
    setx(L3.u / "new", f"{ns}.overlay.redirect", b"/a/b")
    mkfile(L3.l1 / "a/b/one")
    mkfile(L3.l1 / "new/decoy")  # the name itself is not merged once redirected
    mkfile(L3.l2 / "a/b/two")
    ent = L3.lookup("new")
    assert ent.found and ent.is_dir and ent.in_upper
    assert ent.lowers == [(1, b"a/b"), (2, b"a/b")]
    assert sorted(L3.listdir("new")) == [b"one", b"two", b"up"]


def test_absolute_redirect_from_upper_in_subdir(L3):
    mkdir(L3.u / "p/q")
    setx(L3.u / "p/q", "trusted.overlay.redirect", b"/x")
    mkfile(L3.l1 / "x/one")
    mkfile(L3.l1 / "p/q/decoy")
    ent = L3.lookup("p/q")
    assert ent.lowers == [(1, b"x")]


@pytest.mark.parametrize("ns", ["trusted", "user"])
def test_relative_redirect_from_upper(L3, ns):
    mkdir(L3.u / "p/new")
    setx(L3.u / "p/new", f"{ns}.overlay.redirect", b"old")
    mkfile(L3.l1 / "p/old/one")
    mkfile(L3.l2 / "p/old/two")
    mkfile(L3.l2 / "p/new/decoy")
    ent = L3.lookup("p/new")
    assert ent.in_upper and ent.lowers == [(1, b"p/old"), (2, b"p/old")]
    assert sorted(L3.listdir("p/new")) == [b"one", b"two"]


def test_relative_redirect_in_lower_applies_below_it(L3):
    mkfile(L3.l1 / "new/one")
    setx(L3.l1 / "new", "trusted.overlay.redirect", b"old")
    mkfile(L3.l2 / "old/two")
    mkfile(L3.l2 / "new/decoy")
    ent = L3.lookup("new")
    assert ent.lowers == [(1, b"new"), (2, b"old")]
    assert sorted(L3.listdir("new")) == [b"one", b"two"]


def test_absolute_redirect_in_lower_applies_below_it(L3):
    mkfile(L3.l1 / "p/new/one")
    setx(L3.l1 / "p/new", "trusted.overlay.redirect", b"/q/old")
    mkfile(L3.l2 / "q/old/two")
    mkfile(L3.l3 / "q/old/three")
    ent = L3.lookup("p/new")
    assert ent.lowers == [(1, b"p/new"), (2, b"q/old"), (3, b"q/old")]


def test_redirect_chain_upper_then_lower(L3):
    """The upper's absolute redirect leads to a lower dir that was itself renamed."""
    mkdir(L3.u / "c")
    setx(L3.u / "c", "trusted.overlay.redirect", b"/a/b")
    mkfile(L3.l1 / "a/b/one")
    setx(L3.l1 / "a/b", "trusted.overlay.redirect", b"z")  # relative: a/z below
    mkfile(L3.l2 / "a/z/two")
    mkfile(L3.l2 / "a/b/decoy")
    ent = L3.lookup("c")
    assert ent.lowers == [(1, b"a/b"), (2, b"a/z")]
    assert sorted(L3.listdir("c")) == [b"one", b"two"]


def test_redirect_target_whited_out_below(L3):
    mkdir(L3.u / "new")
    setx(L3.u / "new", "trusted.overlay.redirect", b"/old")
    mkfile(L3.l1 / "old/one")
    whiteout(L3.l2 / "old")
    mkfile(L3.l3 / "old/three")
    assert L3.lookup("new").lowers == [(1, b"old")]


def test_redirect_does_not_override_opaque(L3):
    mkdir(L3.u / "new")
    setx(L3.u / "new", "trusted.overlay.redirect", b"/old")
    setx(L3.u / "new", "trusted.overlay.opaque", b"y")
    mkfile(L3.l1 / "old/one")
    ent = L3.lookup("new")
    assert ent.opaque and ent.lowers == []


# -- listdir ------------------------------------------------------------------------------


def test_listdir_merges_without_duplicates(L3):
    for n in ("a", "b"):
        mkfile(L3.u / n)
    for n in ("b", "c"):
        mkfile(L3.l1 / n)
    for n in ("c", "d"):
        mkfile(L3.l2 / n)
    mkdir(L3.l3 / "a")
    names = L3.listdir()
    assert sorted(names) == [b"a", b"b", b"c", b"d"]
    assert len(names) == len(set(names))


def test_listdir_order_upper_first(L3):
    up = {b"u1", b"u2", b"u3", b"both"}
    for n in up:
        mkfile(L3.u / n.decode())
    for n in ("both", "l1a", "l1b"):
        mkfile(L3.l1 / n)
    for n in ("l2a",):
        mkfile(L3.l2 / n)
    names = L3.listdir()
    assert set(names[:4]) == up
    assert set(names[4:6]) == {b"l1a", b"l1b"}
    assert names[6:] == [b"l2a"]


def test_listdir_hides_whiteouts_and_wh_names(L3):
    mkfile(L3.u / "keep")
    whiteout(L3.u / "gone_dev")
    mkfile(L3.u / ".wh.gone_file")
    mkfile(L3.u / ".wh..wh..opq_not_really")  # a .wh. name, never shown
    mkfile(L3.l1 / "gone_dev")
    mkfile(L3.l1 / "gone_file")
    whiteout(L3.l1 / "gone_lower")
    mkfile(L3.l1 / ".wh.gone_lower2")
    mkfile(L3.l2 / "gone_lower")
    mkdir(L3.l2 / "gone_lower2")
    mkfile(L3.l2 / "visible")
    names = L3.listdir()
    assert sorted(names) == [b"keep", b"visible"]
    assert not any(n.startswith(b".wh.") for n in names)


def test_listdir_hides_opaque_marker(L3):
    mkfile(L3.l1 / "d" / ".wh..wh..opq")
    mkfile(L3.l1 / "d/x")
    mkfile(L3.l2 / "d/y")
    assert L3.listdir("d") == [b"x"]


def test_listdir_whiteout_in_upper_hides_only_its_name(L3):
    whiteout(L3.u / "a")
    mkfile(L3.l1 / "a")
    mkfile(L3.l1 / "b")
    assert L3.listdir() == [b"b"]


def test_listdir_same_layer_real_entry_beats_wh_sibling(L3):
    mkfile(L3.l1 / "x")
    mkfile(L3.l1 / ".wh.x")
    mkfile(L3.l2 / "x")
    assert L3.listdir() == [b"x"]


def test_listdir_read_only_no_upper(L3ro):
    mkfile(L3ro.l1 / "a")
    mkfile(L3ro.l2 / "b")
    assert sorted(L3ro.listdir()) == [b"a", b"b"]


def test_listdir_upper_dir_missing_in_upper(L3):
    mkfile(L3.l1 / "d/x")
    ent = L3.lookup("d")
    assert not ent.in_upper
    assert L3.layers.listdir(None, ent.lowers) == [b"x"]


# -- lower_positive ----------------------------------------------------------------------


def test_lower_positive(L3):
    mkfile(L3.u / "up_only")
    mkfile(L3.l2 / "low")
    mkfile(L3.l1 / ".wh.gone")
    mkfile(L3.l2 / "gone")
    whiteout(L3.u / "wh_upper")  # an upper whiteout does not matter here
    mkfile(L3.l1 / "wh_upper")
    rl = L3.root_lowers()
    lp = L3.layers.lower_positive
    assert not lp(rl, b"up_only")
    assert lp(rl, b"low")
    assert not lp(rl, b"gone")
    assert lp(rl, b"wh_upper")
    assert not lp(rl, b"nothing")
    assert not lp([], b"low")  # a dir with no lower stack


def test_lower_positive_in_subdir(L3):
    mkfile(L3.l3 / "d/x")
    ent = L3.lookup("d")
    assert L3.layers.lower_positive(ent.lowers, b"x")
    assert not L3.layers.lower_positive(ent.lowers, b"y")


# -- check_name --------------------------------------------------------------------------


def test_check_name_ok():
    for name in (b"a", b"a" * 255, b".wh", b".whx", b"x.wh.y", "é".encode() * 127):
        check_name(name)


@pytest.mark.parametrize("name", [b"a" * 256, "é".encode() * 128, b"x" * 4096])
def test_check_name_too_long(name):
    with pytest.raises(OSError) as ei:
        check_name(name)
    assert ei.value.errno == errno.ENAMETOOLONG


@pytest.mark.parametrize("name", [b".wh.", b".wh.x", b".wh..wh..opq"])
def test_check_name_reserved(name):
    with pytest.raises(OSError) as ei:
        check_name(name)
    assert ei.value.errno == errno.EINVAL


# -- dir_meta ----------------------------------------------------------------------------


def test_dir_meta_plain(tmp_path):
    assert dir_meta(b(tmp_path)) == DirMeta(False, None)


@pytest.mark.parametrize("ns", ["trusted", "user"])
def test_dir_meta_xattrs(tmp_path, ns):
    d = tmp_path / "d"
    d.mkdir()
    setx(d, f"{ns}.overlay.opaque", b"y")
    assert dir_meta(b(d)) == DirMeta(True, None)
    setx(d, f"{ns}.overlay.redirect", b"/a/b")
    assert dir_meta(b(d)) == DirMeta(True, b"/a/b")
    setx(d, f"{ns}.overlay.opaque", b"n")
    assert dir_meta(b(d)) == DirMeta(False, b"/a/b")


def test_dir_meta_wh_opq(tmp_path):
    mkfile(tmp_path / "d" / ".wh..wh..opq")
    assert dir_meta(b(tmp_path / "d")) == DirMeta(True, None)


def test_dir_meta_other_xattrs_ignored(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    setx(d, "user.opaque", b"y")
    setx(d, "trusted.unionfuse.origin", b"x")
    assert dir_meta(b(d)) == DirMeta(False, None)


# -- is_private_xattr --------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    b"trusted.overlay.opaque", b"trusted.overlay.redirect", b"user.overlay.opaque",
    b"user.overlay.origin", b"trusted.overlay.unionfuse.origin", b"user.overlay.unionfuse.links",
])
def test_private_xattrs(name):
    assert is_private_xattr(name)


@pytest.mark.parametrize("name", [
    b"user.foo", b"trusted.foo", b"security.capability", b"security.selinux",
    b"system.posix_acl_access", b"user.overlayfoo", b"trusted.overlay", b"trusted.overlayx.y",
])
def test_public_xattrs(name):
    assert not is_private_xattr(name)


# == mount.py option handling ===========================================================


def test_split_options_plain():
    assert split_options("a=1,b,c=x") == ["a=1", "b", "c=x"]
    assert split_options("") == []
    assert split_options(",,a,,") == ["a"]


def test_split_options_escaped_comma_and_colon():
    parts = split_options(r"lowerdir=/a\,b:/c\:d,upperdir=/u\,v,ro")
    assert len(parts) == 3
    assert parts[0].startswith("lowerdir=") and parts[2] == "ro"
    spec = MountSpec(mountpoint="/m", lowers=[])
    apply_options(spec, parts)
    assert spec.lowers == ["/a,b", "/c:d"]
    assert spec.upper == "/u,v"
    assert "ro" in spec.fuse_flags


def test_split_lowerdir():
    assert split_lowerdir("/a:/b:/c") == ["/a", "/b", "/c"]
    assert split_lowerdir(r"/a\:b:/c") == ["/a:b", "/c"]
    assert split_lowerdir(r"/a\\:/b") == ["/a\\", "/b"]
    assert split_lowerdir("/a::/b:") == ["/a", "/b"]


def _spec(**kw) -> MountSpec:
    return MountSpec(mountpoint=kw.pop("mountpoint", "/m"), lowers=kw.pop("lowers", []), **kw)


def test_apply_options_layers_and_settings():
    spec = _spec()
    apply_options(spec, ["lowerdir=/l1:/l2", "upperdir=/u", "workdir=/w", "whiteout=oci",
                         "timeout=2.5"])
    assert spec.lowers == ["/l1", "/l2"]
    assert (spec.upper, spec.work, spec.whiteout, spec.timeout) == ("/u", "/w", "oci", 2.5)


def test_apply_options_flags():
    spec = _spec()
    apply_options(spec, ["rw", "dev", "suid", "nosuid", "nodev", "noatime", "allow_other"])
    assert "rw" not in spec.fuse_flags
    for f in ("dev", "suid", "nosuid", "nodev", "noatime", "allow_other"):
        assert f in spec.fuse_flags


def test_apply_options_ignored_words():
    spec = _spec()
    apply_options(spec, ["defaults", "nofail", "auto", "noauto", "_netdev",
                         "x-systemd.automount", "x-systemd.requires=foo.service",
                         "x-systemd.idle-timeout=30", "x-mount.mkdir", "fsname=foo",
                         "subtype=bar"])
    assert spec == _spec()


@pytest.mark.parametrize("opt", ["bogus", "bogus=1", "ro=1", "lowerdirx=/a", "size=10m"])
def test_apply_options_unknown(opt):
    with pytest.raises(UsageError) as ei:
        apply_options(_spec(), [opt])
    assert opt in ei.value.message


def test_apply_options_spin():
    spec = _spec()
    assert spec.spin_us == 100  # the default
    apply_options(spec, ["spin=0"])
    assert spec.spin_us == 0
    apply_options(spec, ["spin=250"])
    assert spec.spin_us == 250


@pytest.mark.parametrize("value", ["", "x", "-1", "1.5", "100001"])
def test_apply_options_bad_spin(value):
    with pytest.raises(UsageError, match="spin"):
        apply_options(_spec(), [f"spin={value}"])


def test_apply_options_passthrough():
    spec = _spec()
    assert spec.passthrough is None  # auto
    apply_options(spec, ["nopassthrough"])
    assert spec.passthrough is False
    apply_options(spec, ["passthrough"])
    assert spec.passthrough is True
    with pytest.raises(UsageError):
        apply_options(spec, ["passthrough=1"])


@pytest.mark.parametrize("asked,cap,initial_ns,depth,want", [
    (None, True, True, 1, True),
    (None, True, True, 2, False),   # a layer on overlayfs: off unless asked for
    (True, True, True, 2, True),
    (False, True, True, 1, False),
    (None, False, True, 1, False),  # no CAP_SYS_ADMIN
    (True, True, False, 1, False),  # root of a user namespace: the kernel would refuse
])
def test_passthrough_is_asked_for_only_where_the_kernel_grants_it(monkeypatch, asked, cap,
                                                                   initial_ns, depth, want):
    from unionfuse import mount

    monkeypatch.setattr(mount, "_has_cap", lambda bit: cap)
    monkeypatch.setattr(mount, "_initial_userns", lambda: initial_ns)
    assert mount._want_passthrough(_spec(passthrough=asked), depth) is want


def test_apply_options_bad_timeout():
    with pytest.raises(UsageError, match="timeout"):
        apply_options(_spec(), ["timeout=soon"])


def test_read_config(tmp_path):
    cfg = tmp_path / "c.conf"
    cfg.write_text(
        "# a comment\n"
        "\n"
        "   # indented comment\n"
        "lowerdir=/l1:/l2\n"
        "upperdir = /u\n"
        "workdir=/w=x\n"
        "mountpoint=/mnt\n"
        "options=nosuid,nodev\n"
        "timeout=5\n"
    )
    assert read_config(str(cfg)) == {
        "lowerdir": "/l1:/l2", "upperdir": "/u", "workdir": "/w=x", "mountpoint": "/mnt",
        "options": "nosuid,nodev", "timeout": "5",
    }


@pytest.mark.parametrize("bad", ["just words", "color=blue", "=x"])
def test_read_config_bad_line(tmp_path, bad):
    cfg = tmp_path / "c.conf"
    cfg.write_text(f"# ok\nlowerdir=/l\n{bad}\n")
    with pytest.raises(UsageError) as ei:
        read_config(str(cfg))
    assert f"{cfg}:3:" in ei.value.message


def test_read_config_missing_file(tmp_path):
    with pytest.raises(UsageError, match="can't read config"):
        read_config(str(tmp_path / "nope"))


# -- MountSpec.check ---------------------------------------------------------------------


@pytest.fixture
def sd(tmp_path):
    """Existing dirs for a valid spec."""
    for n in ("l1", "l2", "u", "w", "m"):
        (tmp_path / n).mkdir()
    return tmp_path


def test_check_ok(sd):
    MountSpec(str(sd / "m"), [str(sd / "l1"), str(sd / "l2")], str(sd / "u"), str(sd / "w")).check()
    MountSpec(str(sd / "m"), [str(sd / "l1")]).check()


def test_check_no_lower(sd):
    with pytest.raises(UsageError, match="lower"):
        MountSpec(str(sd / "m"), []).check()


def test_check_upper_without_work(sd):
    with pytest.raises(UsageError, match="together"):
        MountSpec(str(sd / "m"), [str(sd / "l1")], upper=str(sd / "u")).check()
    with pytest.raises(UsageError, match="together"):
        MountSpec(str(sd / "m"), [str(sd / "l1")], work=str(sd / "w")).check()


def test_check_missing_dirs(sd):
    with pytest.raises(UsageError, match="not a directory"):
        MountSpec(str(sd / "m"), [str(sd / "nope")]).check()
    (sd / "file").write_text("")
    with pytest.raises(UsageError, match="not a directory"):
        MountSpec(str(sd / "m"), [str(sd / "file")]).check()
    with pytest.raises(UsageError, match="mount point"):
        MountSpec(str(sd / "nomnt"), [str(sd / "l1")]).check()


def test_check_bad_whiteout(sd):
    with pytest.raises(UsageError, match="whiteout"):
        MountSpec(str(sd / "m"), [str(sd / "l1")], whiteout="aufs").check()


@pytest.mark.parametrize("upper,work", [("u", "u"), ("u", "u/w"), ("w/u", "w")])
def test_check_nested_upper_work(sd, upper, work):
    (sd / upper).mkdir(parents=True, exist_ok=True)
    (sd / work).mkdir(parents=True, exist_ok=True)
    with pytest.raises(UsageError, match="nested"):
        MountSpec(str(sd / "m"), [str(sd / "l1")], str(sd / upper), str(sd / work)).check()


def test_check_upper_inside_lower(sd):
    (sd / "l1/u").mkdir()
    with pytest.raises(UsageError, match="lower"):
        MountSpec(str(sd / "m"), [str(sd / "l1")], str(sd / "l1/u"), str(sd / "w")).check()


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"can't mount a tmpfs: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_check_work_on_other_filesystem(sd, tmpfs):
    (tmpfs / "w").mkdir()
    with pytest.raises(UsageError, match="same filesystem"):
        MountSpec(str(sd / "m"), [str(sd / "l1")], str(sd / "u"), str(tmpfs / "w")).check()


# -- fuse_options ------------------------------------------------------------------------

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="root defaults")


@root_only
def test_fuse_options_rw_root():
    o = fuse_options(_spec(lowers=["/l"], upper="/u", work="/w"))
    assert {"allow_other", "default_permissions", "suid", "dev"} <= o
    assert "ro" not in o


@root_only
def test_fuse_options_ro_without_upper():
    assert "ro" in fuse_options(_spec(lowers=["/l"]))


@root_only
def test_fuse_options_nosuid_nodev_override():
    o = fuse_options(_spec(lowers=["/l"], upper="/u", work="/w", fuse_flags=["nosuid", "nodev"]))
    assert {"nosuid", "nodev"} <= o
    assert not {"suid", "dev"} & o


@root_only
def test_fuse_options_via_apply_options():
    spec = _spec(lowers=["/l"])
    apply_options(spec, ["rw", "nosuid", "dev", "noexec"])
    o = fuse_options(spec)
    assert "nosuid" in o and "suid" not in o and "dev" in o and "noexec" in o
    assert "rw" not in o
