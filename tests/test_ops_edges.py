"""Edge cases of identity and staleness, driven through the UnionOperations handlers
without a kernel mount (each would need an upper reused across mounts, or a kernel
holding an inode, to show through one): a stale .wh. file under a dir with no lower
layer, a stale origin record naming another upper file's number, and a rename over one
name of a hard-linked file."""

from __future__ import annotations

import os
import struct
import types

import pyfuse3
import pytest
import trio

from unionfuse.fs.operations import UnionOperations

CTX = types.SimpleNamespace(uid=os.geteuid(), gid=os.getegid(), pid=os.getpid(), umask=0o22)
DIRENT = struct.Struct("<QQII")


class Ops:
    def __init__(self, base, whiteout=None):
        b = os.fsencode(str(base))
        self.o = UnionOperations([b + b"/l"], b + b"/u", b + b"/w", whiteout)

    def run(self, name, *args):
        async def f():
            return await getattr(self.o, name)(*args)

        return trio.run(f)

    def lookup(self, parent: int, name: bytes) -> int:
        return self.run("lookup", parent, name, CTX).st_ino

    def walk(self, path: bytes) -> int:
        ino = 1
        for part in path.split(b"/"):
            ino = self.lookup(ino, part)
        return ino

    def plain(self, ino: int) -> dict[bytes, int]:
        buf, out, i = self.o.readdir_plain(ino, 1 << 20, 0), {}, 0
        assert isinstance(buf, bytes), buf
        while i < len(buf):
            d_ino, _, ln, _ = DIRENT.unpack_from(buf, i)
            out[buf[i + 24 : i + 24 + ln]] = d_ino
            i += (24 + ln + 7) & ~7
        assert out.pop(b".") == ino
        del out[b".."]
        return out

    def plus(self, ino: int) -> dict[bytes, int]:
        """READDIRPLUS through the handler: {name: st_ino}."""
        out = {}
        orig = pyfuse3.readdir_reply

        def reply(token, name, attrs, off):
            out[name] = attrs.st_ino
            return True

        pyfuse3.readdir_reply = reply
        try:
            fh = self.run("opendir", ino, CTX)
            self.run("readdir", fh, 0, None)
            self.run("releasedir", fh)
        finally:
            pyfuse3.readdir_reply = orig
        assert out.pop(b".") == ino
        del out[b".."]
        return out


@pytest.fixture
def base(tmp_path):
    for d in ("l", "u", "w"):
        (tmp_path / d).mkdir()
    return tmp_path


@pytest.mark.parametrize("whiteout", ["overlay", "oci"])
def test_stale_wh_file_under_a_dir_without_lowers(base, whiteout):
    """A dir only in the upper holds a .wh.NAME left from an earlier mount.  A merged
    dir renamed to NAME keeps showing its lower files (the stale .wh. beside it would
    make it opaque), in this mount and the next."""
    (base / "u" / "D").mkdir()
    (base / "u" / "D" / ".wh.NAME").write_bytes(b"")
    (base / "l" / "m").mkdir()
    (base / "l" / "m" / "a").write_bytes(b"a")
    (base / "l" / "m" / "b").write_bytes(b"b")
    o = Ops(base, whiteout)
    d, m = o.lookup(1, b"D"), o.lookup(1, b"m")
    o.run("rename", 1, b"m", d, b"NAME", 0, CTX)
    assert not (base / "u" / "D" / ".wh.NAME").exists()
    assert sorted(o.plus(o.lookup(d, b"NAME"))) == [b"a", b"b"]
    o2 = Ops(base, whiteout)
    assert sorted(o2.plus(o2.walk(b"D/NAME"))) == [b"a", b"b"]
    # and a create takes the name from a stale .wh. too
    (base / "u" / "D" / ".wh.new").write_bytes(b"")
    fi, _ = o.run("create", d, b"new", 0o644, os.O_RDWR, CTX)
    assert not (base / "u" / "D" / ".wh.new").exists()


def test_stale_origin_naming_another_upper_files_number(base):
    """f's origin record names inode N (a lower file since deleted); N is now the number
    of g, itself a copy-up with an origin of its own.  f and g stay two files."""
    (base / "l" / "m").write_bytes(b"lower m")
    (base / "u" / "f").write_bytes(b"I am f")
    (base / "u" / "g").write_bytes(b"I am g")
    o = Ops(base)
    x = o.o.origin_xattr
    st_g, st_m = os.lstat(base / "u" / "g"), os.lstat(base / "l" / "m")
    os.setxattr(base / "u" / "f", x, b"%d:%d:" % (st_g.st_dev, st_g.st_ino))
    os.setxattr(base / "u" / "g", x, b"%d:%d:" % (st_m.st_dev, st_m.st_ino))
    f = o.lookup(1, b"f")
    g = o.lookup(1, b"g")
    assert f != g
    assert o.o.table.get(g).key == (st_m.st_dev, st_m.st_ino)


@pytest.mark.parametrize("where", ["lower", "upper"])
def test_rename_over_one_name_of_a_hard_linked_file(base, where):
    """a/h1 and c/h2 are one file; the kernel holds h1; a file is renamed over a/h1.
    c/h2 is still that file: the same number in c's listings and in a lookup."""
    top = base / ("l" if where == "lower" else "u")
    (top / "a").mkdir()
    (top / "c").mkdir()
    (top / "a" / "h1").write_bytes(b"hard")
    os.link(top / "a" / "h1", top / "c" / "h2")
    o = Ops(base)
    a, c = o.lookup(1, b"a"), o.lookup(1, b"c")
    before = o.plain(c)[b"h2"]
    h1 = o.lookup(a, b"h1")
    assert h1 == before
    fi, _ = o.run("create", a, b"new", 0o644, os.O_RDWR, CTX)
    o.run("rename", a, b"new", a, b"h1", 0, CTX)
    assert o.plain(c)[b"h2"] == before
    assert o.plus(c)[b"h2"] == before
    assert o.lookup(c, b"h2") == before
