"""Plain READDIR (fs/_fuseshim.c + UnionOperations.readdir_plain): a listing nobody
stats as it goes is answered from ready-made fuse_dirent records, without a node per
name.  What it shows must be what lookups show: the same names, each d_type the type
lstat finds and each d_ino the st_ino lstat finds, whichever layer the name comes from,
before and after copy-up, across a remount, and with layers on another filesystem.

Mount tests run with the fast path (plain READDIR on) and with UNIONFUSE_NO_FASTPATH=1
(READDIRPLUS only), held to the same results."""

from __future__ import annotations

import contextlib
import os
import stat
import struct
import subprocess

import pytest

from conftest import start_daemon
from layerkit import put
from test_fastpath import answered_in_c
from unionfuse.fs.inodes import _PRIVATE_BASE, InodeTable
from unionfuse.fs.operations import UnionOperations
from unionfuse.mount import mount_entry

LONG = "x" * 40  # long names: a listing of ~1,500 of them spans several READDIR replies


@pytest.fixture(params=["fast", "python"])
def mode(request, monkeypatch):
    if request.param == "python":
        monkeypatch.setenv("UNIONFUSE_NO_FASTPATH", "1")
    return request.param


def make_layers(l1, l2, n=1500):
    d2 = l2 / "d"
    d2.mkdir(exist_ok=True)
    for i in range(n):
        put(d2 / f"f{i:05d}{LONG}", b"%d" % i)
    os.symlink("f00000" + LONG, d2 / "sl")
    os.mkfifo(d2 / "ff")
    (d2 / "sub").mkdir()
    put(d2 / "sub" / "in2", b"2")
    put(d2 / "hl_a", b"hard")
    os.link(d2 / "hl_a", d2 / "hl_b")
    put(d2 / "gone", b"g")
    put(d2 / "shadow", b"low")
    d1 = l1 / "d"
    d1.mkdir()
    put(d1 / "shadow", b"high")
    put(d1 / ".wh.gone", b"")  # OCI whiteout of l2's gone
    (d1 / "sub").mkdir()  # merged with l2's sub
    put(d1 / "sub" / "in1", b"1")
    put(d1 / "l1only", b"1")


def change_through(mp, n=1500):
    d = f"{mp}/d"
    put(f"{d}/new1", b"new")  # upper only
    with open(f"{d}/f00005{LONG}", "ab") as f:  # copied up: origin xattr
        f.write(b"+")
    os.rename(f"{d}/f00006{LONG}", f"{d}/renamed")  # copied up under another name
    os.unlink(f"{d}/f00007{LONG}")  # whiteout
    os.mkdir(f"{d}/newdir")
    os.link(f"{d}/hl_a", f"{d}/hl_c")  # the hard-link group copied up
    os.chmod(f"{d}/sub", 0o711)  # merged dir copied up
    expected = {f"f{i:05d}{LONG}" for i in range(n)} - {f"f00006{LONG}", f"f00007{LONG}"}
    return expected | {"sl", "ff", "sub", "hl_a", "hl_b", "hl_c", "shadow", "l1only", "new1",
                       "renamed", "newdir"}


def dtype_ok(e: os.DirEntry, st: os.stat_result) -> bool:
    if stat.S_ISLNK(st.st_mode):
        return e.is_symlink()
    if stat.S_ISDIR(st.st_mode):
        return e.is_dir(follow_symlinks=False)
    if stat.S_ISREG(st.st_mode):
        return e.is_file(follow_symlinks=False)
    return not (e.is_dir(follow_symlinks=False) or e.is_file(follow_symlinks=False) or e.is_symlink())


def check_listing(path, expected):
    """List without a stat in between (so the kernel may ask plain READDIR), then check
    every entry against lstat."""
    with os.scandir(path) as it:
        ents = list(it)
    names = [e.name for e in ents]
    assert len(names) == len(set(names)), "a name listed twice"
    assert set(names) == expected
    bad = []
    for e in ents:
        st = os.lstat(e.path)
        if e.inode() != st.st_ino or not dtype_ok(e, st):
            bad.append((e.name, e.inode(), st.st_ino, oct(st.st_mode)))
    assert not bad, bad[:5]
    # the hard links are one inode, in the listing as in stat
    by = {e.name: e.inode() for e in ents}
    assert by["hl_a"] == by["hl_b"] == by["hl_c"]


def test_listing_agrees_with_lstat(dirs, mode, tmp_path):
    make_layers(dirs["l1"], dirs["l2"])
    mp = tmp_path / "m"
    mp.mkdir()
    lowers = [dirs["l1"], dirs["l2"]]
    d = start_daemon(mp, lowers, dirs["upper"], dirs["work"], extra=("--debug",))
    try:
        expected = change_through(mp)
        check_listing(f"{mp}/d", expected)
        check_listing(f"{mp}/d", expected)  # again: from the kernel's cache
        put(f"{mp}/d/later", b"l")  # the dir changed: listed through the daemon again
        check_listing(f"{mp}/d", expected | {"later"})
    finally:
        d.stop()
    if mode == "fast":
        assert "readdir_plain" in d.log_text()
        assert answered_in_c(d)["readdir"] > 0, d.log_text()[-2000:]
    # a fresh daemon over the same upper: nothing in its table yet, so each d_ino comes
    # from the layers (the origin record of the copied-up ones)
    d = start_daemon(mp, lowers, dirs["upper"], dirs["work"], extra=("--debug",))
    try:
        check_listing(f"{mp}/d", expected | {"later"})
    finally:
        d.stop()


def test_listing_while_the_dir_changes(dirs, mode, tmp_path):
    l2 = dirs["l2"] / "big"
    l2.mkdir()
    names = {f"n{i:05d}{LONG}" for i in range(3000)}
    for n in names:
        put(l2 / n, b"")
    mp = tmp_path / "m"
    mp.mkdir()
    d = start_daemon(mp, [dirs["l2"]], dirs["upper"], dirs["work"])
    try:
        seen = []
        with os.scandir(f"{mp}/big") as it:
            for i, e in enumerate(it):
                seen.append(e.name)
                if i == 100:
                    put(f"{mp}/big/zz_added", b"")
                    victim = sorted(names - set(seen))[0]
                    os.unlink(f"{mp}/big/{victim}")
                    os.mkdir(f"{mp}/other")  # a change elsewhere in the mount too
        assert len(seen) == len(set(seen)), "a name listed twice"
        # names there throughout come exactly once; the two changed may or may not
        assert names - {victim} <= set(seen)
        assert set(seen) <= names | {"zz_added"}
    finally:
        d.stop()


@contextlib.contextmanager
def tmpfs_at(p, size: str):
    """A tmpfs mounted on *p* for the block, lazily unmounted after it."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(p)], check=True)
    try:
        yield p
    finally:
        if mount_entry(str(p)) is not None:
            subprocess.run(["umount", "-l", str(p)], check=True)


@pytest.fixture
def tmpfs(tmp_path):
    p = tmp_path / "tfs"
    p.mkdir()
    with tmpfs_at(p, "64m"):
        yield p


@contextlib.contextmanager
def union_on_tmpfs(dirs, tmp_path, tmpfs, n):
    """Layers l1, l2 (make_layers) on the tmpfs, the upper on disk, changed through the
    mount (change_through): yields the mountpoint and the names expected in d."""
    l1, l2 = tmpfs / "l1", tmpfs / "l2"
    l1.mkdir()
    l2.mkdir()
    make_layers(l1, l2, n=n)
    mp = tmp_path / "m"
    mp.mkdir()
    d = start_daemon(mp, [l1, l2], dirs["upper"], dirs["work"])
    try:
        yield mp, change_through(mp, n=n)
    finally:
        d.stop()


def test_layers_on_another_filesystem(dirs, mode, tmp_path, tmpfs):
    """Layers off the upper's filesystem get private inode numbers: a listing shows the
    number that a later lookup gives (promised before the node exists)."""
    with union_on_tmpfs(dirs, tmp_path, tmpfs, 800) as (mp, expected):
        check_listing(f"{mp}/d", expected)
        with os.scandir(f"{mp}/d") as it:
            # (xino-style numbers from bit 61, or the private counter's)
            assert all(e.inode() >= 1 << 61 for e in it if e.name.startswith("f0001"))


def drop_dentries():
    """The kernel forgets unused inodes: FORGETs reach the daemon."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")


def test_numbers_kept_after_the_kernel_forgets(dirs, mode, tmp_path, tmpfs):
    """Private numbers (layers off the upper's filesystem) outlive the node: after the
    kernel forgets the inodes, a listing and a lookup still agree with each other and
    with what was shown before."""
    with union_on_tmpfs(dirs, tmp_path, tmpfs, 300) as (mp, expected):
        check_listing(f"{mp}/d", expected)
        before = {e.name: e.inode() for e in os.scandir(f"{mp}/d")}
        for _ in range(2):
            drop_dentries()
            check_listing(f"{mp}/d", expected)
            assert {e.name: e.inode() for e in os.scandir(f"{mp}/d")} == before


@pytest.fixture
def nested_mount(dirs):
    """A tmpfs mounted on a dir inside lower layer l2 (a mount point in a layer)."""
    p = dirs["l2"] / "d" / "mnt"
    p.mkdir(parents=True)
    with tmpfs_at(p, "1m"):
        put(p / "inside", b"i")
        yield p


def test_mount_point_inside_a_layer(dirs, mode, tmp_path, nested_mount):
    """getdents gives a mount point's covered dir's number; lookup stats the mounted
    root: the listing shows the latter."""
    make_layers(dirs["l1"], dirs["l2"])
    mp = tmp_path / "m"
    mp.mkdir()
    d = start_daemon(mp, [dirs["l1"], dirs["l2"]], dirs["upper"], dirs["work"])
    try:
        expected = change_through(mp)
        check_listing(f"{mp}/d", expected | {"mnt"})
        assert os.listdir(f"{mp}/d/mnt") == ["inside"]
    finally:
        d.stop()


# -- no mount: the records and the numbers ---------------------------------------------

DIRENT = struct.Struct("<QQII")


def parse(buf: bytes):
    out, i = [], 0
    while i < len(buf):
        ino, off, ln, typ = DIRENT.unpack_from(buf, i)
        name = buf[i + 24 : i + 24 + ln]
        out.append((name, ino, off, typ))
        i += (24 + ln + 7) & ~7
        assert i <= len(buf)
    return out


def test_records_resume_and_fit(dirs):
    make_layers(dirs["l1"], dirs["l2"], n=300)
    ops = UnionOperations([bytes(dirs["l1"]), bytes(dirs["l2"])], bytes(dirs["upper"]),
                          bytes(dirs["work"]))
    d = ops.table.by_ino[1]
    # the dir node, as a lookup would make it
    ppath, ent = ops._resolve(d, b"d")
    node = ops._node_for(d, ppath, b"d", ent)
    whole = ops.readdir_plain(node.ino, 1 << 20, 0)
    recs = parse(whole)
    names = {r[0] for r in recs}
    # ".", "..", f*, sl, ff, sub, hl_a, hl_b, shadow, l1only
    assert len(recs) == len(names) == 2 + 300 + 7
    assert recs[:2] == [(b".", node.ino, 1, 4), (b"..", 1, 2, 4)]
    assert b"gone" not in names and not any(n.startswith(b".wh.") for n in names)
    offs = [r[2] for r in recs]
    assert offs == sorted(offs) and len(set(offs)) == len(offs) and offs[0] > 0
    types = {r[0]: r[3] for r in recs}
    assert types[b"sl"] == 10 and types[b"ff"] == 1 and types[b"sub"] == 4
    assert types[b"shadow"] == 8
    inos = {r[0]: r[1] for r in recs}
    assert inos[b"shadow"] == os.lstat(dirs["l1"] / "d" / "shadow").st_ino
    assert inos[b"hl_a"] == inos[b"hl_b"]
    # read in small replies, each resuming where the last ended: the same records,
    # whole ones only, none over the size
    for size in (100, 333, 4096):
        got, off = [], 0
        while True:
            buf = ops.readdir_plain(node.ino, size, off)
            assert len(buf) <= size
            if not buf:
                break
            part = parse(buf)
            got += part
            off = part[-1][2]
        assert got == recs
    # resuming after any record gives exactly the rest
    for k in (0, 1, 150, len(recs) - 1):
        assert parse(ops.readdir_plain(node.ino, 1 << 20, recs[k][2])) == recs[k + 1 :]
    # errors are errnos
    assert ops.readdir_plain(12345678, 4096, 0) == 2  # ENOENT
    assert ops.readdir_plain(1, 4096, 0) != b""


def test_predicted_numbers_are_the_ones_given(tmp_path):
    t = InodeTable(upper_dev=7)
    assert t.predict((7, 500)) == 500  # the real number, while free
    assert t.new((7, 500), False).ino == 500
    other = t.predict((9, 500))  # another filesystem: a private number, kept for it
    assert other >= 1 << 61 and other != 500
    assert t.predict((9, 500)) == other
    assert t.new((9, 500), False).ino == other
    assert t.predict((9, 500)) == other  # now from the table
    # a real number still held by a deleted node (open, unlinked; its inode number
    # reused by a new file): a private number, promised
    old = t.new((7, 600), False)
    old.lookups = 1
    t.mark_deleted(old)
    assert t.by_ino[600] is old
    p = t.predict((7, 600))
    assert p >= _PRIVATE_BASE and t.new((7, 600), True).ino == p


def test_records_show_a_mount_points_own_number(dirs, nested_mount):
    make_layers(dirs["l1"], dirs["l2"], n=20)
    ops = UnionOperations([bytes(dirs["l1"]), bytes(dirs["l2"])], bytes(dirs["upper"]),
                          bytes(dirs["work"]))
    root = ops.table.by_ino[1]
    ppath, ent = ops._resolve(root, b"d")
    node = ops._node_for(root, ppath, b"d", ent)
    inos = {r[0]: r[1] for r in parse(ops.readdir_plain(node.ino, 1 << 20, 0))}
    st = os.lstat(nested_mount)
    covered = {e.name: e.inode() for e in os.scandir(nested_mount.parent)}["mnt"]
    assert st.st_ino != covered
    assert inos[b"mnt"] == ops.table.predict((st.st_dev, st.st_ino))
    # and a lookup gives that number
    _, ent = ops._resolve(node, b"mnt")
    assert ops._node_for(node, ppath + b"/d" if ppath else b"d", b"mnt", ent).ino == inos[b"mnt"]


def test_listings_follow_changes_in_other_dirs(dirs, mode, tmp_path):
    """Each dir's cached listing is dropped by changes to its own names only: moves,
    links and copy-ups from one dir into another show in both."""
    l2 = dirs["l2"]
    for d in ("a", "b", "c"):
        (l2 / d).mkdir()
        for i in range(300):
            put(l2 / d / f"{d}{i:04d}{LONG}", b"x")
    put(l2 / "a" / "h1", b"hard")
    os.link(l2 / "a" / "h1", l2 / "c" / "h2")
    mp = tmp_path / "m"
    mp.mkdir()
    d = start_daemon(mp, [dirs["l2"]], dirs["upper"], dirs["work"])
    try:
        a = {f"a{i:04d}{LONG}" for i in range(300)} | {"h1"}
        b = {f"b{i:04d}{LONG}" for i in range(300)}
        c = {f"c{i:04d}{LONG}" for i in range(300)} | {"h2"}

        def check():
            for name, want in (("a", a), ("b", b), ("c", c)):
                got = os.listdir(f"{mp}/{name}")
                assert len(got) == len(set(got)) and set(got) == want, name
                with os.scandir(f"{mp}/{name}") as it:
                    for e in it:
                        assert e.inode() == os.lstat(e.path).st_ino, e.path

        for name in ("a", "b", "c"):  # the dirs in the upper already: no dir copy-up
            put(f"{mp}/{name}/tmp", b"")
            os.unlink(f"{mp}/{name}/tmp")
        check()
        os.rename(f"{mp}/a/a0001{LONG}", f"{mp}/b/moved")  # copy-up, move
        a.discard(f"a0001{LONG}")
        b.add("moved")
        check()
        os.link(f"{mp}/b/b0002{LONG}", f"{mp}/c/linked")
        c.add("linked")
        check()
        with open(f"{mp}/a/h1", "ab") as f:  # copies up the group: c/h2 follows
            f.write(b"!")
        assert open(f"{mp}/c/h2", "rb").read() == b"hard!"
        check()
        os.mkdir(f"{mp}/b/sub")
        os.rename(f"{mp}/b/sub", f"{mp}/c/sub")
        c.add("sub")
        check()
        os.rename(f"{mp}/c/sub", f"{mp}/a/sub")
        c.discard("sub")
        a.add("sub")
        os.rmdir(f"{mp}/a/sub")
        a.discard("sub")
        os.unlink(f"{mp}/c/c0003{LONG}")
        c.discard(f"c0003{LONG}")
        check()
    finally:
        d.stop()
