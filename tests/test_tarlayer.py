"""apply_tar (the unpack security boundary) and write_layer_tar / iter_layer (packing).
No mounts: plain dirs in overlay form.  Runs as root (mknod, trusted.* xattrs, chown)."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import os
import stat
import tarfile

import pytest

from conftest import tree
from unionfuse.fs.union import Layers
from unionfuse.store.tarlayer import LayerTarError, apply_tar, iter_layer, write_layer_tar

OPQ = "trusted.overlay.opaque"


# -- helpers ------------------------------------------------------------------------------


def E(name, kind="file", data=b"", mode=None, uid=0, gid=0, mtime=1_600_000_000, link="",
      xattrs=None, dev=(0, 0)):
    """One tar entry description."""
    return dict(name=name, kind=kind, data=data, mode=mode, uid=uid, gid=gid, mtime=mtime,
                link=link, xattrs=xattrs or {}, dev=dev)


_TYPES = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE,
          "hard": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE,
          "fifo": tarfile.FIFOTYPE}


def mktar(entries, fmt=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for e in entries:
            ti = tarfile.TarInfo(e["name"])
            ti.type = _TYPES[e["kind"]]
            ti.mode = e["mode"] if e["mode"] is not None else (0o755 if e["kind"] == "dir" else 0o644)
            ti.uid, ti.gid, ti.mtime = e["uid"], e["gid"], e["mtime"]
            ti.linkname = e["link"]
            ti.devmajor, ti.devminor = e["dev"]
            if e["xattrs"]:
                ti.pax_headers = {"SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape")
                                  for k, v in e["xattrs"].items()}
            if e["kind"] == "file":
                ti.size = len(e["data"])
                tf.addfile(ti, io.BytesIO(e["data"]))
            else:
                tf.addfile(ti)
    return buf.getvalue()


@pytest.fixture
def box(tmp_path):
    """dest (the layer dir) next to a sentinel dir that hostile tars aim at."""
    dest = tmp_path / "box" / "dest"
    dest.mkdir(parents=True)
    sentinel = tmp_path / "box" / "sentinel"
    sentinel.mkdir()
    (sentinel / "passwd").write_text("untouched\n")
    (sentinel / "sub").mkdir()
    return dest, sentinel


def unpack(data: bytes, dest) -> tuple[str, int]:
    return apply_tar(io.BytesIO(data), str(dest), label="t.tar")


def outside_untouched(dest, sentinel, before=None):
    """Nothing outside *dest* changed: the sentinel tree and the box dir's listing."""
    snap = (tree(sentinel), sorted(os.listdir(os.path.dirname(dest))))
    if before is not None:
        assert snap == before
    return snap


def xattr(p, name):
    try:
        return os.getxattr(p, name, follow_symlinks=False)
    except OSError:
        return None


# -- hostile names ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../sentinel/passwd", "a/../../sentinel/passwd", "..", "./../x"])
def test_dotdot_refused(box, name):
    dest, sentinel = box
    before = outside_untouched(dest, sentinel)
    with pytest.raises(LayerTarError) as ei:
        unpack(mktar([E(name, data=b"pwned\n")]), dest)
    assert repr(name) in str(ei.value) and "t.tar" in str(ei.value)
    outside_untouched(dest, sentinel, before)


def test_absolute_name_lands_inside(box):
    """docker strips the leading / and keeps the entry inside the layer."""
    dest, sentinel = box
    before = outside_untouched(dest, sentinel)
    unpack(mktar([E(str(sentinel / "passwd"), data=b"inside\n"), E("/etc/x", data=b"x\n")]), dest)
    assert (dest / "etc/x").read_bytes() == b"x\n"
    assert (dest / str(sentinel).lstrip("/") / "passwd").read_bytes() == b"inside\n"
    outside_untouched(dest, sentinel, before)


@pytest.mark.parametrize("target", ["SENTINEL", "../sentinel", "../../..", "/"])
def test_file_through_symlink_refused(box, target):
    dest, sentinel = box
    target = str(sentinel) if target == "SENTINEL" else target
    before = outside_untouched(dest, sentinel)
    for second in (E("a/passwd", data=b"pwned\n"), E("a/sub/", "dir"), E("a/new", "sym", link="/"),
                   E("a/passwd", "hard", link="x"), E("a/.wh.passwd"), E("a/.wh..wh..opq"),
                   E("a/dev", "chr", dev=(1, 3)), E("a/fifo", "fifo")):
        d = dest.parent / "d2"
        d.mkdir()
        try:
            with pytest.raises(LayerTarError) as ei:
                unpack(mktar([E("x", data=b"x"), E("a", "sym", link=target), second]), d)
            assert repr(second["name"].rstrip("/")) in str(ei.value)
        finally:
            os.system(f"rm -rf '{d}'")
        outside_untouched(dest, sentinel, before)


def test_symlink_stored_not_followed(box):
    dest, sentinel = box
    before = outside_untouched(dest, sentinel)
    unpack(mktar([E("a", "sym", link=str(sentinel / "passwd"), mode=0o777),
                  E("a", data=b"replaced, not written through\n")]), dest)
    assert (dest / "a").read_bytes() == b"replaced, not written through\n"
    outside_untouched(dest, sentinel, before)


def test_symlink_kept_verbatim(box):
    dest, _ = box
    unpack(mktar([E("etc/a", "sym", link="../../../../etc/passwd"), E("b", "sym", link="/etc")]), dest)
    assert os.readlink(dest / "etc/a") == "../../../../etc/passwd"
    assert os.readlink(dest / "b") == "/etc"


# -- hard links -----------------------------------------------------------------------------


def test_hardlink_outside_refused(box):
    dest, sentinel = box
    before = outside_untouched(dest, sentinel)
    for link in ("../sentinel/passwd", str(sentinel / "passwd")):
        d = dest.parent / "d2"
        d.mkdir()
        try:
            with pytest.raises(LayerTarError, match="'h'"):
                unpack(mktar([E("h", "hard", link=link)]), d)
        finally:
            os.system(f"rm -rf '{d}'")
    assert os.stat(sentinel / "passwd").st_nlink == 1
    outside_untouched(dest, sentinel, before)


def test_hardlink_via_symlink_dir_refused(box):
    dest, sentinel = box
    before = outside_untouched(dest, sentinel)
    with pytest.raises(LayerTarError, match="'h'"):
        unpack(mktar([E("s", "sym", link=str(sentinel)), E("h", "hard", link="s/passwd")]), dest)
    assert os.stat(sentinel / "passwd").st_nlink == 1
    outside_untouched(dest, sentinel, before)


def test_hardlink_to_symlink_links_the_symlink(box):
    dest, sentinel = box
    before = outside_untouched(dest, sentinel)
    unpack(mktar([E("s", "sym", link=str(sentinel / "passwd")), E("h", "hard", link="s")]), dest)
    st_s, st_h = os.lstat(dest / "s"), os.lstat(dest / "h")
    assert stat.S_ISLNK(st_h.st_mode) and st_s.st_ino == st_h.st_ino
    assert os.stat(sentinel / "passwd").st_nlink == 1
    outside_untouched(dest, sentinel, before)


def test_hardlink_forward_reference_refused(box):
    dest, _ = box
    with pytest.raises(LayerTarError, match="'h'.*not in this layer"):
        unpack(mktar([E("h", "hard", link="later"), E("later", data=b"x")]), dest)


def test_hardlink_to_dir_refused(box):
    dest, _ = box
    with pytest.raises(LayerTarError, match="'h'.*directory"):
        unpack(mktar([E("d/", "dir"), E("h", "hard", link="d")]), dest)


def test_hardlink_to_whiteout_refused(box):
    dest, _ = box
    with pytest.raises(LayerTarError, match="'h'"):
        unpack(mktar([E(".wh.gone"), E("h", "hard", link="gone")]), dest)


def test_hardlink_ok(box):
    dest, _ = box
    unpack(mktar([E("a/f", data=b"data", mode=0o4755), E("b/g", "hard", link="a/f"),
                  E("/c", "hard", link="/a/f")]), dest)
    ino = os.lstat(dest / "a/f").st_ino
    assert os.lstat(dest / "b/g").st_ino == ino == os.lstat(dest / "c").st_ino
    assert os.lstat(dest / "a/f").st_nlink == 3
    assert stat.S_IMODE(os.lstat(dest / "c").st_mode) == 0o4755


# -- whiteouts ----------------------------------------------------------------------------


def test_whiteouts_to_overlay_form(box):
    dest, _ = box
    unpack(mktar([E("d/", "dir"), E("d/.wh.gone"), E("d/.wh..wh..opq"), E(".wh.top"),
                  E("e/.wh..wh..opq")]), dest)
    for p in (dest / "d/gone", dest / "top"):
        st = os.lstat(p)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert xattr(dest / "d", OPQ) == b"y"
    assert xattr(dest / "e", OPQ) == b"y"
    assert sorted(os.listdir(dest)) == ["d", "e", "top"]
    assert sorted(os.listdir(dest / "d")) == ["gone"]
    assert os.listdir(dest / "e") == []


@pytest.mark.parametrize("name", [".wh..", ".wh...", ".wh.", "d/.wh...", "d/.wh.."])
def test_whiteout_escape_refused(box, name):
    dest, sentinel = box
    before = outside_untouched(dest, sentinel)
    snap = tree(dest.parent)
    with pytest.raises(LayerTarError, match="whiteout"):
        unpack(mktar([E("d/", "dir"), E("d/f", data=b"keep"), E(name)]), dest)
    assert os.path.isdir(dest / "d") or name.startswith(".wh.")
    outside_untouched(dest, sentinel, before)
    assert {k: v for k, v in snap.items() if not k.startswith("dest")} == \
        {k: v for k, v in tree(dest.parent).items() if not k.startswith("dest")}


def test_whiteout_name_as_dir_refused(box):
    dest, _ = box
    with pytest.raises(LayerTarError, match="'.wh.x/y'"):
        unpack(mktar([E(".wh.x/y", data=b"")]), dest)


def test_aufs_metadata_skipped(box):
    dest, _ = box
    unpack(mktar([E(".wh..wh.plnk/", "dir"), E(".wh..wh.plnk/123.4", data=b"x"),
                  E(".wh..wh.aufs", data=b""), E("f", data=b"f")]), dest)
    assert os.listdir(dest) == ["f"]


def test_whiteout_beside_same_layer_dir_is_opaque(box):
    """OCI: a whiteout only hides lower layers; '.wh.d' + 'd/' in one layer = a new d
    over the lower one (opaque), as the union reads that layer in OCI form."""
    dest, _ = box
    unpack(mktar([E(".wh.d"), E("d/", "dir"), E("d/new", data=b"n"),
                  E("f/", "dir"), E(".wh.f"),  # whiteout after the dir
                  E("g", data=b"g"), E(".wh.g")]), dest)
    assert xattr(dest / "d", OPQ) == b"y" and os.listdir(dest / "d") == ["new"]
    assert xattr(dest / "f", OPQ) == b"y"
    assert (dest / "g").read_bytes() == b"g"


def test_overlay_xattrs_from_tar_dropped(box):
    dest, _ = box
    forged = {"trusted.overlay.opaque": b"y", "trusted.overlay.redirect": b"/etc",
              "user.overlay.opaque": b"y", "trusted.overlay.unionfuse.x": b"1",
              "user.keep": b"kept"}
    unpack(mktar([E("d/", "dir", xattrs=forged), E("f", xattrs=forged)]), dest)
    for p in (dest / "d", dest / "f"):
        names = os.listxattr(p, follow_symlinks=False)
        assert not [n for n in names if ".overlay." in n], names
        assert xattr(p, "user.keep") == b"kept"


# -- metadata -----------------------------------------------------------------------------


def test_metadata(box):
    dest, _ = box
    cap = bytes.fromhex("01000002" "00200000" "00000000" "00000000" "00000000")  # cap_net_raw+ep
    unpack(mktar([
        E("bin/", "dir", mode=0o750, uid=7, gid=8, mtime=1000),
        E("bin/su", data=b"#!", mode=0o4755, uid=0, gid=0, mtime=2000),
        E("bin/sg", data=b"#!", mode=0o2711, uid=5, gid=6),
        E("bin/ping", data=b"#!", mode=0o755, xattrs={"security.capability": cap, "user.bin": b"\xff\x00z"}),
        E("tmp/", "dir", mode=0o1777, mtime=3000),
        E("dev/null", "chr", mode=0o666, dev=(1, 3)),
        E("dev/sda", "blk", mode=0o660, gid=6, dev=(8, 0)),
        E("run/fifo", "fifo", mode=0o620),
        E("lnk", "sym", link="bin/su", uid=3, gid=4, mtime=4000),
        E("dev/", "dir", mode=0o755, mtime=5000),  # a dir's entry after its contents
    ]), dest)

    def st(p):
        return os.lstat(dest / p)

    assert (stat.S_IMODE(st("bin").st_mode), st("bin").st_uid, st("bin").st_gid) == (0o750, 7, 8)
    assert st("bin").st_mtime == 1000  # after its children were written
    assert stat.S_IMODE(st("bin/su").st_mode) == 0o4755 and st("bin/su").st_mtime == 2000
    assert (stat.S_IMODE(st("bin/sg").st_mode), st("bin/sg").st_uid, st("bin/sg").st_gid) == (0o2711, 5, 6)
    assert xattr(dest / "bin/ping", "security.capability") == cap
    assert xattr(dest / "bin/ping", "user.bin") == b"\xff\x00z"
    assert stat.S_IMODE(st("tmp").st_mode) == 0o1777 and st("tmp").st_mtime == 3000
    assert stat.S_ISCHR(st("dev/null").st_mode) and st("dev/null").st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(st("dev/null").st_mode) == 0o666
    assert stat.S_ISBLK(st("dev/sda").st_mode) and st("dev/sda").st_rdev == os.makedev(8, 0)
    assert st("dev/sda").st_gid == 6
    assert stat.S_ISFIFO(st("run/fifo").st_mode) and stat.S_IMODE(st("run/fifo").st_mode) == 0o620
    assert os.readlink(dest / "lnk") == "bin/su"
    assert (st("lnk").st_uid, st("lnk").st_gid, st("lnk").st_mtime) == (3, 4, 4000)
    assert st("dev").st_mtime == 5000
    assert stat.S_IMODE(st("run").st_mode) == 0o755  # implicit parent


def test_implicit_parents_ignore_umask(box):
    dest, _ = box
    old = os.umask(0o077)
    try:
        unpack(mktar([E("a/b/c", data=b"x")]), dest)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.lstat(dest / "a").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(dest / "a/b").st_mode) == 0o755


def test_root_entry_sets_layer_root(box):
    dest, _ = box
    unpack(mktar([E("./", "dir", mode=0o751, uid=2, gid=3, mtime=777), E("./f", data=b"")]), dest)
    st = os.lstat(dest)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime) == (0o751, 2, 3, 777)


def test_user_xattr_on_fifo_skipped(box):
    """Like docker, an xattr the filesystem refuses on that file type is skipped."""
    dest, _ = box
    unpack(mktar([E("p", "fifo", xattrs={"user.x": b"1"}), E("l", "sym", link="p")]), dest)
    assert stat.S_ISFIFO(os.lstat(dest / "p").st_mode)


def test_replace_dir_by_file_and_back(box):
    dest, _ = box
    unpack(mktar([E("x/", "dir"), E("x/inner", data=b"1"), E("x", data=b"file"),
                  E("y", data=b"file"), E("y/", "dir"), E("y/z", data=b"z")]), dest)
    assert (dest / "x").read_bytes() == b"file"
    assert (dest / "y/z").read_bytes() == b"z"


# -- compression, diff_id, broken input ----------------------------------------------------

SAMPLE = [E("d/", "dir"), E("d/f", data=b"hello\n" * 1000), E("d/l", "sym", link="f")]


@pytest.mark.parametrize("comp", [None, gzip.compress, bz2.compress, lzma.compress])
def test_compressed_input_diff_id_is_uncompressed_sha(box, comp):
    dest, _ = box
    raw = mktar(SAMPLE)
    data = comp(raw) if comp else raw
    diff_id, size = unpack(data, dest)
    assert diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert size == len(raw)
    assert (dest / "d/f").read_bytes() == b"hello\n" * 1000


def test_nonseekable_stdin_like_stream(box):
    dest, _ = box
    raw = gzip.compress(mktar(SAMPLE))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        with os.fdopen(w, "wb") as f:
            f.write(raw)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        diff_id, _ = apply_tar(f, str(dest))
    os.waitpid(pid, 0)
    assert diff_id == "sha256:" + hashlib.sha256(mktar(SAMPLE)).hexdigest()


def test_garbage_refused(box):
    dest, _ = box
    for data in (b"this is not a tar archive at all" * 40, b"", b"\x1f\x8bgarbage", b"BZh9garbage"):
        with pytest.raises(LayerTarError, match="t.tar"):
            unpack(data, dest)


def test_truncated_mid_entry_names_entry(box):
    dest, _ = box
    raw = mktar([E("first", data=b"1"), E("big/file", data=os.urandom(100_000)), E("last", data=b"x")])
    cut = raw.index(b"big/file") + 50_000
    with pytest.raises(LayerTarError, match="big/file"):
        unpack(raw[:cut], dest)
    d2 = dest.parent / "d2"
    d2.mkdir()
    with pytest.raises(LayerTarError, match="big/file"):
        unpack(gzip.compress(raw)[:len(gzip.compress(raw)) // 2], d2)


def test_truncated_or_garbled_header_refused(box):
    """tarfile alone would stop quietly at a bad header after the first entry and import
    a truncated layer."""
    dest, _ = box
    raw = mktar([E("first", data=b"1"), E("second", data=b"2")])
    at = raw.index(b"second")
    for bad in (raw[:at + 40], raw[:at] + b"\x07" * 512 + raw[at + 512:],
                raw[:at] + os.urandom(3000)):
        d = dest.parent / "d2"
        d.mkdir()
        try:
            with pytest.raises(LayerTarError, match="after entry 'first'"):
                unpack(bad, d)
        finally:
            os.system(f"rm -rf '{d}'")


def test_end_without_marker_accepted(box):
    """Like docker (Go's archive/tar): data that ends cleanly between entries is a tar."""
    dest, _ = box
    raw = mktar([E("first", data=b"1"), E("second", data=b"2")])
    end = raw.index(b"second") + 1024
    diff_id, _ = unpack(raw[:end], dest)
    assert diff_id == "sha256:" + hashlib.sha256(raw[:end]).hexdigest()
    assert (dest / "second").read_bytes() == b"2"


def test_unsupported_type_refused(box):
    dest, _ = box
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        ti = tarfile.TarInfo("weird")
        ti.type = b"V"  # GNU volume header: not a file
        tf.addfile(ti)
    with pytest.raises(LayerTarError, match="weird|t.tar"):
        unpack(buf.getvalue(), dest)


# -- packing ------------------------------------------------------------------------------


def members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        return tf.getmembers()


def pack(upper, layers=None) -> tuple[bytes, str]:
    buf = io.BytesIO()
    diff_id = write_layer_tar(str(upper), buf, layers)
    return buf.getvalue(), diff_id


RICH = [
    E("./", "dir", mode=0o755),
    E("bin/", "dir", mode=0o755, mtime=10),
    E("bin/su", data=b"su", mode=0o4755),
    E("bin/ping", data=b"p", xattrs={"security.capability": bytes.fromhex("0100000200200000" + "00" * 12)}),
    E("bin/link", "hard", link="bin/su"),
    E("dev/", "dir"),
    E("dev/null", "chr", mode=0o666, dev=(1, 3)),
    E("etc/", "dir", mtime=20),
    E("etc/.wh.gone"),
    E("etc/l", "sym", link="/bin/su"),
    E("opq/", "dir", mtime=30),
    E("opq/.wh..wh..opq"),
    E("opq/keep", data=b"k", uid=1000, gid=100),
    E("run/p", "fifo"),
    E("tmp/", "dir", mode=0o1777),
    E("\u00fcnicode-\u540d", data=b"u"),
    E("long/" + "n" * 200 + "/" + "m" * 150, data=b"long"),
]


def test_round_trip_deterministic(tmp_path):
    a, b, c = (tmp_path / n for n in "abc")
    for d in (a, b, c):
        d.mkdir()
    unpack(mktar(RICH), a)
    t1, id1 = pack(a)
    assert id1 == "sha256:" + hashlib.sha256(t1).hexdigest()
    id1b, _ = apply_tar(io.BytesIO(t1), str(b))
    assert id1b == id1
    t2, id2 = pack(b)
    assert (t2, id2) == (t1, id1)  # pack(unpack(pack(x))) == pack(x), byte for byte
    assert pack(a) == (t1, id1)    # and packing twice gives the same bytes
    assert tree(a) == tree(b)
    apply_tar(io.BytesIO(t2), str(c))
    assert tree(c) == tree(a)


def test_pack_forms(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    unpack(mktar(RICH), a)
    ms = {m.name: m for m in members(pack(a)[0])}
    names = list(ms)
    # whiteouts / opaque in OCI form, no overlay xattrs, no char-dev whiteouts
    assert "etc/.wh.gone" in ms and ms["etc/.wh.gone"].isreg() and ms["etc/.wh.gone"].size == 0
    assert "opq/.wh..wh..opq" in ms
    assert names.index("opq") < names.index("opq/.wh..wh..opq") < names.index("opq/keep")
    assert "etc/gone" not in ms
    for m in ms.values():
        assert not [k for k in m.pax_headers if ".overlay." in k], m.name
    # hard links as tar hard links to the first name in sorted order
    assert ms["bin/link"].isreg() and ms["bin/su"].islnk() and ms["bin/su"].linkname == "bin/link"
    assert ms["bin/su"].mode == 0o4755
    assert ms["bin/ping"].pax_headers["SCHILY.xattr.security.capability"]
    assert ms["dev/null"].ischr() and (ms["dev/null"].devmajor, ms["dev/null"].devminor) == (1, 3)
    assert ms["run/p"].isfifo() and ms["etc/l"].linkname == "/bin/su"
    assert ms["tmp"].mode == 0o1777 and ms["bin"].mtime == 10
    assert ms["opq/keep"].uid == 1000 and ms["opq/keep"].uname == ""
    # sorted, dirs with a trailing slash, parents before children
    assert names == sorted(names, key=lambda n: n.rstrip("/").split("/"))


def test_pack_overlay_upper_with_private_xattrs(tmp_path):
    """A container upper as the daemon writes it: 0/0 devices, opaque xattr, private
    records under trusted.overlay.unionfuse.*, a socket (skipped)."""
    import socket

    up = tmp_path / "up"
    (up / "d").mkdir(parents=True)
    (up / "d/f").write_text("f")
    os.setxattr(up / "d/f", "trusted.overlay.unionfuse.origin", b"x")
    os.setxattr(up / "d/f", "trusted.overlay.origin", b"x")
    os.setxattr(up / "d", "trusted.overlay.opaque", b"y")
    os.mknod(up / "gone", stat.S_IFCHR, 0)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(up / "sock"))
    s.close()
    ms = {m.name: m for m in members(pack(up)[0])}
    assert sorted(ms) == sorted([".wh.gone", "d", "d/.wh..wh..opq", "d/f"])
    assert not [k for k in ms["d/f"].pax_headers if "overlay" in k]


def test_redirect_expanded_from_lowers(tmp_path):
    """A renamed lower dir (trusted.overlay.redirect) becomes a self-contained opaque
    dir with the merged content; the old name is whited out."""
    l1, l2, up = tmp_path / "l1", tmp_path / "l2", tmp_path / "up"
    (l2 / "old/sub").mkdir(parents=True)
    (l2 / "old/a").write_text("a from l2")
    (l2 / "old/b").write_text("b from l2")
    (l2 / "old/sub/c").write_text("c")
    (l1 / "old").mkdir(parents=True)
    (l1 / "old/a").write_text("a from l1")  # l1 overrides a
    os.mknod(l1 / "old/b", stat.S_IFCHR, 0)  # and deletes b
    (l1 / "old/n").write_text("n")
    (up / "new").mkdir(parents=True)
    os.setxattr(up / "new", "trusted.overlay.redirect", b"/old")
    (up / "new/added").write_text("added")
    os.mknod(up / "new/n", stat.S_IFCHR, 0)  # deleted after the rename
    os.mknod(up / "old", stat.S_IFCHR, 0)
    layers = Layers(None, [os.fsencode(l1), os.fsencode(l2)])

    kinds = [(k, r) for k, r, _, _ in iter_layer(str(up), layers)]
    assert ("opaque", "new") in kinds and ("whiteout", "old") in kinds
    data, _ = pack(up, layers)
    ms = {m.name: m for m in members(data)}
    assert sorted(ms) == sorted([".wh.old", "new", "new/.wh..wh..opq", "new/a", "new/added",
                                 "new/sub", "new/sub/c"])
    out = tmp_path / "out"
    out.mkdir()
    apply_tar(io.BytesIO(data), str(out))
    assert (out / "new/a").read_text() == "a from l1"
    assert (out / "new/sub/c").read_text() == "c"
    assert xattr(out / "new", OPQ) == b"y"
    # relative redirect (a rename within the same parent) works the same
    os.setxattr(up / "new", "trusted.overlay.redirect", b"old")
    assert pack(up, layers)[0] == data


def test_redirect_without_lowers_not_expanded(tmp_path):
    up = tmp_path / "up"
    (up / "new").mkdir(parents=True)
    os.setxattr(up / "new", "trusted.overlay.redirect", b"/old")
    names = [m.name for m in members(pack(up)[0])]
    assert names == ["new"]
