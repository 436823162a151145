"""Differential tests: the same operations on a unionfuse mount and on a kernel overlayfs
mount (redirect_dir=on,index=on) over equal copies of a populated three-layer lower set.

unionfuse reads the lowers as built (both whiteout forms: 0/0 char devices and
trusted.overlay.opaque, *and* OCI `.wh.NAME` / `.wh..wh..opq`); the kernel gets a copy
converted to its own forms.  Each step's outcome (value or errno) is compared; at the end
the visible trees (tree(): no st_ino, no times, no dir nlink) and the lowers (must be
byte-for-byte unchanged).  Where unionfuse deliberately goes past the kernel, its
intended behaviour is asserted instead (Pair.expect).

Each test collects every difference and fails once at the end with the full list, so one
run shows all of them (later ones may be knock-on effects of earlier ones).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from conftest import tree
from layerkit import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    Pair,
    diff_dicts,
    listdir,
    lstat,
    make_template,
    outcome,
    read,
    renameat2,
    write,
    xattrs,
)


def J(root, *parts) -> str:
    return os.path.join(root, *parts)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return make_template(tmp_path_factory.mktemp("template"))


@pytest.fixture
def pair(mounts, tmp_path, template):
    return Pair(mounts, tmp_path / "pair", template)


def walk_listing(root) -> dict:
    """dir -> sorted names, for every dir reachable from root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        out[os.path.relpath(dirpath, root)] = sorted(dirnames + filenames)
    return out


# ------------------------------------------------------------------------------------


def test_initial_view(pair):
    p = pair
    p.check_trees("initial tree")
    p.same("ls /", lambda r: listdir(r))
    p.same("ls d (kernel + OCI whiteouts)", lambda r: listdir(J(r, "d")))
    u = listdir(J(p.u, "d"))
    p.expect("ls d", u, ["keep", "l1only", "sub"])
    p.expect("ls opq_oci", listdir(J(p.u, "opq_oci")), ["new"])
    p.expect("ls opq_kern", listdir(J(p.u, "opq_kern")), ["new"])
    p.same("ls opq_oci", lambda r: listdir(J(r, "opq_oci")))
    p.same("ls opq_kern", lambda r: listdir(J(r, "opq_kern")))
    for name in ("kwh", "owh", "gone1", "gone2", "d/a", "d/b", ".wh.owh", "d/.wh.b",
                 "opq_oci/.wh..wh..opq", "opq_oci/old", "opq_kern/old", "dir_then_file/x"):
        p.same(f"lstat {name}", lambda r, n=name: lstat(J(r, n)))
        p.expect(f"lstat {name} hidden", outcome(os.lstat, J(p.u, name))[0], "err")
    for name in ("shadow.txt", "dir_then_file", "low3only", "m644", "suid", "sgid", "owned",
                 "suid_owned", "xa", "hl/one", "tree/sub/b", "n1/n2/n3/deep", "file_then_dir/inside"):
        p.same(f"read {name}", lambda r, n=name: read(J(r, n)))
        p.same(f"lstat {name}", lambda r, n=name: lstat(J(r, n)))
    for name in ("lnk", "dangling", "dirlnk", "tree/link"):
        p.same(f"readlink {name}", lambda r, n=name: os.readlink(J(r, n)))
    for name in ("fifo", "chr", "blk", "sticky", "file_then_dir", "dir_then_file", "tree/sub"):
        p.same(f"lstat {name}", lambda r, n=name: lstat(J(r, n)))
    p.same("read through dirlnk", lambda r: read(J(r, "dirlnk/l1only")))
    p.same("xattrs xa", lambda r: xattrs(J(r, "xa")))
    p.same("xattrs opq_kern (trusted.overlay.* hidden)", lambda r: xattrs(J(r, "opq_kern")))
    p.expect("xattrs opq_kern", xattrs(J(p.u, "opq_kern")), [])
    # lower hard links: one inode, nlink right
    su = [os.lstat(J(p.u, n)) for n in ("hl/one", "hl/two", "hl/sub/three")]
    p.expect("hl st_ino equal", len({s.st_ino for s in su}), 1)
    p.expect("hl nlink", [s.st_nlink for s in su], [3, 3, 3])
    sk = [os.lstat(J(p.k, n)) for n in ("hl/one", "hl/two", "hl/sub/three")]
    p.same("hl st_ino equal (kernel too)", lambda r: len({os.lstat(J(r, n)).st_ino
                                                          for n in ("hl/one", "hl/two", "hl/sub/three")}))
    del sk
    p.same("walk", walk_listing)
    p.finish()


def test_file_data(pair):
    p = pair
    ino_m644 = os.lstat(J(p.u, "m644")).st_ino
    ino_tree = os.lstat(J(p.u, "tree")).st_ino
    p.same("create new", lambda r: write(J(r, "new.txt"), b"hello\n", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
    p.same("stat new", lambda r: lstat(J(r, "new.txt")))
    p.same("O_EXCL on lower file", lambda r: write(J(r, "m644"), b"x", os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    p.same("O_EXCL on lower dir", lambda r: write(J(r, "d"), b"x", os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    p.same("append lower", lambda r: write(J(r, "shadow.txt"), b"appended\n", os.O_WRONLY | os.O_APPEND))
    p.same("read appended", lambda r: read(J(r, "shadow.txt")))
    p.same("pwrite middle of lower", lambda r: write(J(r, "m644"), b"XY", os.O_WRONLY, offset=1))
    p.same("read m644", lambda r: read(J(r, "m644")))
    p.expect("st_ino of m644 unchanged by copy-up", os.lstat(J(p.u, "m644")).st_ino, ino_m644)
    p.same("pwrite past EOF", lambda r: write(J(r, "m600"), b"Z", os.O_WRONLY, offset=20))
    p.same("read m600", lambda r: read(J(r, "m600")))
    p.same("truncate lower shrink", lambda r: os.truncate(J(r, "low3only"), 4))
    p.same("read low3only", lambda r: read(J(r, "low3only")))
    p.same("truncate lower grow", lambda r: os.truncate(J(r, "tree/sub/b"), 30))
    p.same("read tree/sub/b", lambda r: read(J(r, "tree/sub/b")))
    p.expect("st_ino of tree unchanged by copy-up", os.lstat(J(p.u, "tree")).st_ino, ino_tree)
    p.same("O_TRUNC lower", lambda r: write(J(r, "m755"), b"", os.O_WRONLY | os.O_TRUNC))
    p.same("stat m755", lambda r: lstat(J(r, "m755")))
    p.same("O_TRUNC + write lower suid", lambda r: write(J(r, "suid"), b"new suid\n", os.O_WRONLY | os.O_TRUNC))
    p.same("stat suid", lambda r: lstat(J(r, "suid")))
    p.same("O_RDWR lower read", lambda r: (lambda fd: (os.pread(fd, 100, 0), os.close(fd))[0])(
        os.open(J(r, "xa"), os.O_RDWR)))
    p.same("write deep (parents copied up)", lambda r: write(J(r, "n1/n2/n3/deep"), b"DEEP", os.O_WRONLY))
    p.same("read deep", lambda r: read(J(r, "n1/n2/n3/deep")))
    p.same("xattrs of xa after write", lambda r: (write(J(r, "xa"), b"!", os.O_WRONLY | os.O_APPEND),
                                                  xattrs(J(r, "xa")))[1])
    for name in ("kwh", "owh", "gone1", "gone2", "d/a", "d/b"):
        p.same(f"create over whiteout {name}", lambda r, n=name: write(J(r, n), b"fresh " + n.encode(),
                                                                        os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        p.same(f"read {name}", lambda r, n=name: read(J(r, n)))
    p.same("create in opaque dir", lambda r: write(J(r, "opq_oci/old"), b"o", os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    p.same("truncate dir", lambda r: os.truncate(J(r, "d"), 0))
    p.same("open dir O_WRONLY", lambda r: os.close(os.open(J(r, "d"), os.O_WRONLY)))
    p.same("create under a file", lambda r: write(J(r, "m644/x"), b"", os.O_WRONLY | os.O_CREAT))
    p.same("create in missing dir", lambda r: write(J(r, "nope/x"), b"", os.O_WRONLY | os.O_CREAT))
    p.same("open whiteout name no O_CREAT", lambda r: os.close(os.open(J(r, "dir_then_file/x"), os.O_RDONLY)))
    p.same("write hardlink p (l1)", lambda r: write(J(r, "hlt/p"), b"P", os.O_WRONLY))
    p.same("read hardlink q (l1)", lambda r: read(J(r, "hlt/q")))
    p.finish()


def test_metadata(pair):
    p = pair
    ino = {n: os.lstat(J(p.u, n)).st_ino for n in ("m600", "suid_owned", "sticky", "lnk", "fifo", "xa")}
    p.same("chmod lower", lambda r: os.chmod(J(r, "m600"), 0o640))
    p.same("chmod suid keep", lambda r: os.chmod(J(r, "sgid"), 0o6750))
    p.same("chmod lower dir", lambda r: os.chmod(J(r, "sticky"), 0o1770))
    p.same("chmod fifo", lambda r: os.chmod(J(r, "fifo"), 0o600))
    p.same("chown lower", lambda r: os.chown(J(r, "owned"), 2000, 3000))
    p.same("chown suid file (clears suid)", lambda r: os.chown(J(r, "suid_owned"), 1001, -1))
    p.same("stat suid_owned", lambda r: lstat(J(r, "suid_owned")))
    p.same("lchown symlink", lambda r: os.chown(J(r, "lnk"), 5, 6, follow_symlinks=False))
    p.same("stat lnk", lambda r: lstat(J(r, "lnk")))
    p.same("chown dir", lambda r: os.chown(J(r, "tree/sub"), 7, 8))
    p.same("utime lower", lambda r: os.utime(J(r, "low3only"), ns=(1_000_000_000, 2_000_000_000)))
    p.same("mtime after utime", lambda r: os.lstat(J(r, "low3only")).st_mtime_ns)
    p.same("utime symlink nofollow", lambda r: os.utime(J(r, "dangling"), ns=(3, 4_000_000_000),
                                                        follow_symlinks=False))
    p.same("mtime symlink", lambda r: os.lstat(J(r, "dangling")).st_mtime_ns)
    p.same("utime dir", lambda r: os.utime(J(r, "n1/n2"), ns=(5, 6_000_000_000)))
    p.same("mtime dir", lambda r: os.lstat(J(r, "n1/n2")).st_mtime_ns)
    p.same("chmod via symlink", lambda r: os.chmod(J(r, "lnk"), 0o604))
    p.same("stat shadow", lambda r: lstat(J(r, "shadow.txt")))
    p.same("chmod xa", lambda r: os.chmod(J(r, "xa"), 0o600))
    p.same("xattrs kept by copy-up", lambda r: xattrs(J(r, "xa")))
    p.same("lower mtime kept by copy-up", lambda r: os.lstat(J(r, "xa")).st_mtime_ns == os.lstat(
        J(r, "m644")).st_mtime_ns or os.lstat(J(r, "xa")).st_mtime_ns)
    p.same("chmod missing", lambda r: os.chmod(J(r, "gone1"), 0o600))
    for n, i in ino.items():
        p.expect(f"st_ino of {n} unchanged by copy-up", os.lstat(J(p.u, n)).st_ino, i)
    p.finish()


def test_unlink_rmdir_mkdir(pair):
    p = pair
    p.same("unlink lower (shadowed)", lambda r: os.unlink(J(r, "shadow.txt")))
    p.same("lstat unlinked", lambda r: lstat(J(r, "shadow.txt")))
    p.same("ls / after unlink", lambda r: listdir(r))
    p.same("recreate shadow.txt", lambda r: write(J(r, "shadow.txt"), b"mine", os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    p.same("read recreated", lambda r: read(J(r, "shadow.txt")))
    p.same("unlink merged-dir file", lambda r: os.unlink(J(r, "d/keep")))
    p.same("unlink upper file", lambda r: (write(J(r, "up"), b"u", os.O_WRONLY | os.O_CREAT), os.unlink(J(r, "up")))[1])
    for n in ("lnk", "fifo", "chr", "blk", "dangling", "low3only", "dir_then_file"):
        p.same(f"unlink {n}", lambda r, n=n: os.unlink(J(r, n)))
    p.same("unlink dir", lambda r: os.unlink(J(r, "d")))
    p.same("unlink missing", lambda r: os.unlink(J(r, "nope")))
    p.same("unlink whiteout name", lambda r: os.unlink(J(r, "gone1")))
    p.same("rmdir empty lower dir", lambda r: os.rmdir(J(r, "emptydir")))
    p.same("rmdir non-empty", lambda r: os.rmdir(J(r, "full")))
    p.same("rmdir file", lambda r: os.rmdir(J(r, "m644")))
    p.same("rmdir missing", lambda r: os.rmdir(J(r, "nope")))
    p.same("rmdir with whiteouts only", lambda r: (os.unlink(J(r, "opq_oci/new")), os.rmdir(J(r, "opq_oci")))[1])
    # empty `full` then remove and recreate: recreated dir is opaque
    p.same("empty full", lambda r: [os.unlink(J(r, "full", n)) for n in ("f1", "f2")])
    p.same("rmdir full", lambda r: os.rmdir(J(r, "full")))
    p.same("mkdir full again", lambda r: os.mkdir(J(r, "full"), 0o755))
    p.same("ls full (opaque)", lambda r: listdir(J(r, "full")))
    p.expect("ls full (opaque)", listdir(J(p.u, "full")), [])
    p.same("lstat full/f1", lambda r: lstat(J(r, "full/f1")))
    # d: merged l1+l3 with whiteouts in both forms
    p.same("rm -r d", lambda r: (os.unlink(J(r, "d/l1only")), os.unlink(J(r, "d/sub/c")),
                                 os.rmdir(J(r, "d/sub")), os.rmdir(J(r, "d")))[3])
    p.same("mkdir d again", lambda r: os.mkdir(J(r, "d")))
    p.same("ls d", lambda r: listdir(J(r, "d")))
    p.expect("ls d (opaque)", listdir(J(p.u, "d")), [])
    p.same("mkdir opq_oci again", lambda r: os.mkdir(J(r, "opq_oci")))
    p.same("ls opq_oci", lambda r: listdir(J(r, "opq_oci")))
    p.same("mkdir emptydir again", lambda r: os.mkdir(J(r, "emptydir"), 0o700))
    p.same("mkdir over whiteout", lambda r: os.mkdir(J(r, "kwh")))
    p.same("mkdir over OCI whiteout", lambda r: os.mkdir(J(r, "gone2")))
    p.same("mkdir over removed lower file", lambda r: os.mkdir(J(r, "low3only")))
    p.same("ls low3only", lambda r: listdir(J(r, "low3only")))
    p.same("mkdir existing", lambda r: os.mkdir(J(r, "tree")))
    p.same("mkdir existing file", lambda r: os.mkdir(J(r, "m644")))
    p.same("mkdir missing parent", lambda r: os.mkdir(J(r, "nope/x")))
    p.same("mkdir+rmdir upper", lambda r: (os.mkdir(J(r, "tmpd")), os.rmdir(J(r, "tmpd")))[1])
    p.same("rmdir merged dir after emptying", lambda r: (
        [os.unlink(J(r, "tree/sub/deep", n)) for n in listdir(J(r, "tree/sub/deep"))],
        os.rmdir(J(r, "tree/sub/deep")), listdir(J(r, "tree/sub")))[2])
    p.same("ls / end", lambda r: listdir(r))
    p.finish()


def test_rename_files(pair):
    p = pair
    ino = os.lstat(J(p.u, "shadow.txt")).st_ino
    p.same("rename lower -> new", lambda r: os.rename(J(r, "shadow.txt"), J(r, "renamed.txt")))
    p.expect("st_ino kept by rename", os.lstat(J(p.u, "renamed.txt")).st_ino, ino)
    p.same("old name gone", lambda r: lstat(J(r, "shadow.txt")))
    p.same("read renamed", lambda r: read(J(r, "renamed.txt")))
    p.same("rename back", lambda r: os.rename(J(r, "renamed.txt"), J(r, "shadow.txt")))
    p.same("read back", lambda r: read(J(r, "shadow.txt")))
    p.same("rename over lower file", lambda r: os.rename(J(r, "m644"), J(r, "m600")))
    p.same("read m600", lambda r: (read(J(r, "m600")), lstat(J(r, "m600"))))
    p.same("NOREPLACE over existing", lambda r: renameat2(J(r, "m755"), J(r, "sgid"), RENAME_NOREPLACE))
    p.same("NOREPLACE to new", lambda r: renameat2(J(r, "m755"), J(r, "m755b"), RENAME_NOREPLACE))
    p.same("NOREPLACE onto whiteout name", lambda r: renameat2(J(r, "m755b"), J(r, "gone1"), RENAME_NOREPLACE))
    p.same("read gone1", lambda r: read(J(r, "gone1")))
    p.same("EXCHANGE two lower files", lambda r: renameat2(J(r, "sgid"), J(r, "suid"), RENAME_EXCHANGE))
    p.same("read after exchange", lambda r: (read(J(r, "sgid")), lstat(J(r, "sgid")), read(J(r, "suid"))))
    p.same("EXCHANGE symlink and file", lambda r: renameat2(J(r, "lnk"), J(r, "low3only"), RENAME_EXCHANGE))
    p.same("readlink after exchange", lambda r: (os.readlink(J(r, "low3only")), read(J(r, "lnk"))))
    p.same("EXCHANGE with missing", lambda r: renameat2(J(r, "xa"), J(r, "nope"), RENAME_EXCHANGE))
    p.same("EXCHANGE file and lower dir", lambda r: renameat2(J(r, "xa"), J(r, "emptydir"), RENAME_EXCHANGE))
    p.same("after file/dir exchange", lambda r: (lstat(J(r, "xa")), read(J(r, "emptydir")), listdir(J(r, "xa"))))
    for flags in (RENAME_WHITEOUT, 8, RENAME_NOREPLACE | RENAME_EXCHANGE, 1 << 20):
        p.same(f"invalid flags {flags:#x}", lambda r, f=flags: renameat2(J(r, "owned"), J(r, "owned2"), f))
    p.same("file over dir", lambda r: os.rename(J(r, "owned"), J(r, "full")))
    p.same("dir over file", lambda r: os.rename(J(r, "full"), J(r, "owned")))
    p.same("dir over non-empty dir", lambda r: os.rename(J(r, "n1"), J(r, "full")))
    p.same("dir into itself", lambda r: os.rename(J(r, "tree"), J(r, "tree/sub/x")))
    p.same("rename missing", lambda r: os.rename(J(r, "nope"), J(r, "nope2")))
    p.same("rename onto self", lambda r: os.rename(J(r, "owned"), J(r, "owned")))
    p.same("rename into opaque dir over hidden name", lambda r: os.rename(J(r, "owned"), J(r, "opq_kern/old")))
    p.same("read opq_kern/old", lambda r: (read(J(r, "opq_kern/old")), lstat(J(r, "opq_kern/old"))))
    p.same("rename file across dirs", lambda r: os.rename(J(r, "tree/a"), J(r, "d/a")))
    p.same("ls d + tree", lambda r: (listdir(J(r, "d")), listdir(J(r, "tree"))))
    p.same("new file over lower", lambda r: (write(J(r, "fresh"), b"fresh", os.O_WRONLY | os.O_CREAT),
                                             os.rename(J(r, "fresh"), J(r, "d/l1only")))[1])
    p.same("read d/l1only", lambda r: read(J(r, "d/l1only")))
    p.same("hard link alias rename (l2)", lambda r: os.rename(J(r, "hl/two"), J(r, "hl/renamed")))
    p.same("read hl", lambda r: (read(J(r, "hl/renamed")), lstat(J(r, "hl/renamed")), lstat(J(r, "hl/one"))))
    p.expect("hl alias ino after rename", os.lstat(J(p.u, "hl/renamed")).st_ino, os.lstat(J(p.u, "hl/one")).st_ino)
    p.same("rename alias over other alias (no-op)", lambda r: os.rename(J(r, "hlt/p"), J(r, "hlt/q")))
    p.same("ls hlt", lambda r: listdir(J(r, "hlt")))
    p.same("rename special files", lambda r: (os.rename(J(r, "fifo"), J(r, "fifo2")),
                                              os.rename(J(r, "chr"), J(r, "n1/chr")))[1])
    p.same("stat moved specials", lambda r: (lstat(J(r, "fifo2")), lstat(J(r, "n1/chr"))))
    p.finish()


def test_rename_lower_dirs(pair):
    p = pair
    before = walk_listing(J(p.u, "tree"))
    ino_tree = os.lstat(J(p.u, "tree")).st_ino
    p.same("rename merged lower dir", lambda r: os.rename(J(r, "tree"), J(r, "moved")))
    p.expect("moved listing (unionfuse)", walk_listing(J(p.u, "moved")), before)
    p.expect("st_ino of renamed dir", os.lstat(J(p.u, "moved")).st_ino, ino_tree)
    p.same("moved listing", lambda r: walk_listing(J(r, "moved")))
    p.same("old name gone", lambda r: lstat(J(r, "tree")))
    p.check_trees("after rename tree->moved")
    p.same("write inside moved", lambda r: write(J(r, "moved/sub/b"), b"changed", os.O_WRONLY | os.O_TRUNC))
    p.same("create inside moved", lambda r: write(J(r, "moved/sub/new"), b"n", os.O_WRONLY | os.O_CREAT))
    p.same("unlink inside moved", lambda r: os.unlink(J(r, "moved/a")))
    p.same("unlink l2 file inside moved", lambda r: os.unlink(J(r, "moved/sub/l2sub")))
    p.same("rename nested lower dir", lambda r: os.rename(J(r, "moved/sub/deep"), J(r, "moved/deep2")))
    p.same("readlink inside moved", lambda r: os.readlink(J(r, "moved/link")))
    p.same("read via link", lambda r: read(J(r, "moved/link")))
    p.same("moved listing 2", lambda r: walk_listing(J(r, "moved")))
    p.same("mkdir at old name", lambda r: os.mkdir(J(r, "tree")))
    p.same("old name is empty", lambda r: listdir(J(r, "tree")))
    p.expect("old name is empty", listdir(J(p.u, "tree")), [])
    p.same("rename moved into a new dir", lambda r: (os.mkdir(J(r, "newparent")),
                                                     os.rename(J(r, "moved"), J(r, "newparent/inner")))[1])
    p.same("inner listing", lambda r: walk_listing(J(r, "newparent")))
    p.same("rename nested lower dir to top", lambda r: os.rename(J(r, "n1/n2"), J(r, "n2moved")))
    p.same("n1 + n2moved", lambda r: (walk_listing(J(r, "n1")), walk_listing(J(r, "n2moved"))))
    p.same("rename dir with whiteouts inside", lambda r: os.rename(J(r, "d"), J(r, "d2")))
    p.same("ls d2", lambda r: listdir(J(r, "d2")))
    p.expect("ls d2", listdir(J(p.u, "d2")), ["keep", "l1only", "sub"])
    p.same("rename opaque dir", lambda r: os.rename(J(r, "opq_kern"), J(r, "opq2")))
    p.same("ls opq2", lambda r: listdir(J(r, "opq2")))
    p.same("rename OCI-opaque dir", lambda r: os.rename(J(r, "opq_oci"), J(r, "opq3")))
    p.same("ls opq3", lambda r: listdir(J(r, "opq3")))
    p.same("rename lower dir over empty lower dir", lambda r: os.rename(J(r, "full"), J(r, "emptydir")))
    p.same("ls emptydir", lambda r: listdir(J(r, "emptydir")))
    p.same("EXCHANGE two lower dirs", lambda r: renameat2(J(r, "sticky"), J(r, "file_then_dir"), RENAME_EXCHANGE))
    p.same("after dir exchange", lambda r: (listdir(J(r, "sticky")), lstat(J(r, "sticky")),
                                            listdir(J(r, "file_then_dir")), lstat(J(r, "file_then_dir"))))
    p.same("rename renamed dir back", lambda r: os.rename(J(r, "d2"), J(r, "d")))
    p.same("ls d", lambda r: listdir(J(r, "d")))
    p.same("rename dir onto whiteout name", lambda r: os.rename(J(r, "hl"), J(r, "gone1")))
    p.same("ls gone1", lambda r: walk_listing(J(r, "gone1")))
    p.same("rmdir renamed-away parent", lambda r: os.rmdir(J(r, "n1")))
    p.finish()


def test_hardlinks(pair):
    p = pair
    # link() of a lower file
    ino = os.lstat(J(p.u, "m644")).st_ino
    p.same("link lower file", lambda r: os.link(J(r, "m644"), J(r, "m644.link")))
    su = (os.lstat(J(p.u, "m644")), os.lstat(J(p.u, "m644.link")))
    p.expect("link: same ino", su[0].st_ino == su[1].st_ino, True)
    p.expect("link: st_ino unchanged", su[0].st_ino, ino)
    p.expect("link: nlink", (su[0].st_nlink, su[1].st_nlink), (2, 2))
    p.same("link nlink", lambda r: (os.lstat(J(r, "m644")).st_nlink, os.lstat(J(r, "m644.link")).st_nlink))
    p.same("write via link", lambda r: write(J(r, "m644.link"), b"via link\n", os.O_WRONLY | os.O_TRUNC))
    p.same("read via other", lambda r: read(J(r, "m644")))
    p.same("unlink original", lambda r: os.unlink(J(r, "m644")))
    p.same("nlink after unlink", lambda r: os.lstat(J(r, "m644.link")).st_nlink)
    p.same("link upper file", lambda r: (write(J(r, "u1"), b"u1", os.O_WRONLY | os.O_CREAT), os.link(J(r, "u1"), J(r, "d/u2")),
                                         os.lstat(J(r, "u1")).st_nlink)[2])
    p.same("link onto whiteout name", lambda r: os.link(J(r, "xa"), J(r, "gone1")))
    p.same("xattrs via new link", lambda r: xattrs(J(r, "gone1")))
    p.same("link dir", lambda r: os.link(J(r, "d"), J(r, "d.link")))
    p.same("link onto existing", lambda r: os.link(J(r, "xa"), J(r, "m600")))
    p.same("link missing", lambda r: os.link(J(r, "nope"), J(r, "nope2")))
    p.same("link symlink", lambda r: os.link(J(r, "lnk"), J(r, "lnk2"), follow_symlinks=False))
    p.same("readlink link of symlink", lambda r: os.readlink(J(r, "lnk2")))
    p.same("link fifo", lambda r: os.link(J(r, "fifo"), J(r, "fifo2")))

    # hard links that live in a lower layer (l2: hl/one hl/two hl/sub/three)
    names = ("hl/one", "hl/two", "hl/sub/three")
    st0 = [os.lstat(J(p.u, n)) for n in names]
    p.expect("lower hl: one inode", len({s.st_ino for s in st0}), 1)
    p.expect("lower hl: nlink", [s.st_nlink for s in st0], [3, 3, 3])
    p.same("lower hl stat", lambda r: [lstat(J(r, n)) for n in names])
    p.same("write through one alias", lambda r: write(J(r, "hl/two"), b"written via two\n", os.O_WRONLY | os.O_APPEND))
    st1 = [os.lstat(J(p.u, n)) for n in names]
    p.expect("lower hl after write: same ino as before", [s.st_ino for s in st1], [st0[0].st_ino] * 3)
    p.expect("lower hl after write: nlink", [s.st_nlink for s in st1], [3, 3, 3])
    p.expect("lower hl after write: content", [read(J(p.u, n)) for n in names],
             [b"hard-linked in l2\nwritten via two\n"] * 3)
    p.same("lower hl after write", lambda r: [(read(J(r, n)), lstat(J(r, n))) for n in names])
    p.same("ino equal after write", lambda r: len({os.lstat(J(r, n)).st_ino for n in names}))
    p.same("chmod through alias", lambda r: os.chmod(J(r, "hl/sub/three"), 0o600))
    p.same("modes after chmod", lambda r: [lstat(J(r, n)) for n in names])
    p.same("unlink one alias", lambda r: os.unlink(J(r, "hl/one")))
    p.same("nlink after alias unlink", lambda r: [os.lstat(J(r, n)).st_nlink for n in names[1:]])
    p.expect("nlink after alias unlink", [os.lstat(J(p.u, n)).st_nlink for n in names[1:]], [2, 2])
    p.same("link new alias", lambda r: os.link(J(r, "hl/two"), J(r, "hl4")))
    p.same("nlink after link", lambda r: [os.lstat(J(r, n)).st_nlink for n in ("hl/two", "hl/sub/three", "hl4")])
    p.expect("ino after link", len({os.lstat(J(p.u, n)).st_ino for n in ("hl/two", "hl/sub/three", "hl4")}), 1)
    # l1 pair: metadata change through one alias shows on the other
    p.same("chmod hlt/p", lambda r: os.chmod(J(r, "hlt/p"), 0o611))
    p.same("hlt/q mode", lambda r: (lstat(J(r, "hlt/q")), os.lstat(J(r, "hlt/q")).st_ino == os.lstat(J(r, "hlt/p")).st_ino))
    p.finish()


def test_special_files(pair):
    p = pair
    p.same("symlink", lambda r: os.symlink("some/target", J(r, "sl")))
    p.same("readlink", lambda r: (os.readlink(J(r, "sl")), lstat(J(r, "sl"))))
    p.same("symlink long target", lambda r: os.symlink("t" * 4000, J(r, "sl_long")))
    p.same("readlink long", lambda r: os.readlink(J(r, "sl_long")))
    p.same("symlink over existing", lambda r: os.symlink("x", J(r, "m644")))
    p.same("symlink over whiteout", lambda r: os.symlink("kwh-target", J(r, "kwh")))
    p.same("readlink kwh", lambda r: os.readlink(J(r, "kwh")))
    p.same("readlink of file", lambda r: os.readlink(J(r, "m644")))
    p.same("mkfifo", lambda r: os.mkfifo(J(r, "ff"), 0o640))
    p.same("mknod fifo", lambda r: os.mknod(J(r, "ff2"), stat.S_IFIFO | 0o600))
    p.same("mknod char dev", lambda r: os.mknod(J(r, "cd"), stat.S_IFCHR | 0o620, os.makedev(1, 5)))
    p.same("mknod block dev", lambda r: os.mknod(J(r, "bd"), stat.S_IFBLK | 0o600, os.makedev(7, 1)))
    p.same("mknod regular", lambda r: os.mknod(J(r, "rf"), stat.S_IFREG | 0o600))
    p.same("mknod over OCI whiteout", lambda r: os.mkfifo(J(r, "gone2")))
    p.same("mknod 0/0 char dev (looks like a whiteout)", lambda r: os.mknod(J(r, "zz"), stat.S_IFCHR | 0o600, 0))
    p.same("lstat zz", lambda r: lstat(J(r, "zz")))
    p.same("ls /", lambda r: listdir(r))
    p.same("stat specials", lambda r: [lstat(J(r, n)) for n in ("ff", "ff2", "cd", "bd", "rf", "gone2")])
    p.same("read char dev (/dev/zero-like 1,5)", lambda r: (lambda fd: (os.read(fd, 4), os.close(fd))[0])(
        os.open(J(r, "cd"), os.O_RDONLY)))
    p.same("read lower chr (1,3 null)", lambda r: read(J(r, "chr")))
    p.finish()


def test_xattrs(pair):
    p = pair
    p.same("setxattr lower file", lambda r: os.setxattr(J(r, "m644"), "user.k", b"v1"))
    p.same("get", lambda r: os.getxattr(J(r, "m644"), "user.k"))
    p.same("list", lambda r: sorted(os.listxattr(J(r, "m644"))))
    p.same("replace", lambda r: os.setxattr(J(r, "m644"), "user.k", b"v2", os.XATTR_REPLACE))
    p.same("XATTR_CREATE existing", lambda r: os.setxattr(J(r, "m644"), "user.k", b"v3", os.XATTR_CREATE))
    p.same("XATTR_REPLACE missing", lambda r: os.setxattr(J(r, "m644"), "user.nope", b"v", os.XATTR_REPLACE))
    p.same("get missing", lambda r: os.getxattr(J(r, "m644"), "user.nope"))
    p.same("remove", lambda r: os.removexattr(J(r, "m644"), "user.k"))
    p.same("remove missing", lambda r: os.removexattr(J(r, "m644"), "user.k"))
    p.same("remove lower xattr", lambda r: os.removexattr(J(r, "xa"), "user.foo"))
    p.same("xattrs xa", lambda r: xattrs(J(r, "xa")))
    p.same("setxattr lower dir", lambda r: os.setxattr(J(r, "tree"), "user.dir", b"D"))
    p.same("xattrs tree", lambda r: xattrs(J(r, "tree")))
    p.same("ls tree after dir xattr (still merged)", lambda r: listdir(J(r, "tree")))
    p.same("setxattr new file", lambda r: (write(J(r, "nf"), b"", os.O_WRONLY | os.O_CREAT),
                                           os.setxattr(J(r, "nf"), "user.a", b"\x00\xff"))[1])
    p.same("get binary", lambda r: os.getxattr(J(r, "nf"), "user.a"))
    p.same("user.* on symlink", lambda r: os.setxattr(J(r, "lnk"), "user.s", b"s", follow_symlinks=False))
    p.same("big value", lambda r: (os.setxattr(J(r, "nf"), "user.big", b"x" * 3000), len(os.getxattr(J(r, "nf"), "user.big")))[1])
    p.same("list size-0 probe", lambda r: sorted(os.listxattr(J(r, "nf"))))
    p.same("list opq_kern", lambda r: xattrs(J(r, "opq_kern")))
    p.same("get trusted.overlay.opaque on opaque dir", lambda r: os.getxattr(J(r, "opq_kern"), "trusted.overlay.opaque"))
    p.same("trusted.other on new file", lambda r: (os.setxattr(J(r, "nf"), "trusted.other", b"t"),
                                                  os.getxattr(J(r, "nf"), "trusted.other"))[1])
    # trusted.overlay.* / user.overlay.* (which hold the daemon's own records too) are
    # never listed or settable through unionfuse (design).  The kernel (>= 6.7) instead
    # lets them be set through the mount, *escaped* for nested overlays
    # (trusted.overlay.overlay.X in the upper), so this is asserted, not compared; the
    # kernel's answers are printed for the record and undone so the trees compare.
    attempts = {
        "set trusted.overlay.opaque on dir": lambda r: os.setxattr(J(r, "tree"), "trusted.overlay.opaque", b"y"),
        "set trusted.overlay.redirect on dir": lambda r: os.setxattr(J(r, "n1"), "trusted.overlay.redirect", b"/d"),
        "set trusted.overlay.foo on file": lambda r: os.setxattr(J(r, "nf"), "trusted.overlay.foo", b"1"),
        "set trusted.overlay.unionfuse.origin": lambda r: os.setxattr(J(r, "nf"), "trusted.overlay.unionfuse.origin", b"1:2"),
        "set user.overlay.opaque on dir": lambda r: os.setxattr(J(r, "full"), "user.overlay.opaque", b"y"),
        "remove trusted.overlay.opaque": lambda r: os.removexattr(J(r, "opq_kern"), "trusted.overlay.opaque"),
    }
    kernel = {}
    for label, fn in attempts.items():
        kernel[label] = outcome(fn, p.k)
        got = outcome(fn, p.u)
        p.expect(label + " refused", got[0], "err")
    print("kernel answers for trusted/user.overlay.*:", kernel)
    for path, name in (("tree", "trusted.overlay.opaque"), ("n1", "trusted.overlay.redirect"),
                       ("nf", "trusted.overlay.foo"), ("nf", "trusted.overlay.unionfuse.origin"),
                       ("full", "user.overlay.opaque")):
        outcome(os.removexattr, J(p.k, path), name)
    p.same("ls tree/n1/full/opq_kern after attempts (no effect)",
           lambda r: [listdir(J(r, n)) for n in ("tree", "n1", "full", "opq_kern")])
    p.expect("private xattrs never listed", [k for n in ("nf", "tree", "n1", "full", "opq_kern", "m644")
                                             for k in os.listxattr(J(p.u, n))
                                             if k.startswith(("trusted.overlay.", "user.overlay."))], [])
    # copied-up files/dirs and links must not show the daemon's bookkeeping
    p.same("link + xattrs", lambda r: (os.link(J(r, "hl/one"), J(r, "hl/new")), write(J(r, "hl/two"), b"!", os.O_WRONLY | os.O_APPEND),
                                       [xattrs(J(r, n)) for n in ("hl/one", "hl/two", "hl/new", "hl")])[2])
    p.finish()


def test_names(pair):
    p = pair
    long = "n" * 256
    longer = "n" * 1100
    for nm in (long, longer):
        L = len(nm)
        p.same(f"create {L}", lambda r, n=nm: write(J(r, n), b"", os.O_WRONLY | os.O_CREAT))
        p.same(f"mkdir {L}", lambda r, n=nm: os.mkdir(J(r, n)))
        p.same(f"lstat {L}", lambda r, n=nm: lstat(J(r, n)))
        p.same(f"rename to {L}", lambda r, n=nm: os.rename(J(r, "m644"), J(r, n)))
        p.same(f"symlink {L}", lambda r, n=nm: os.symlink("x", J(r, n)))
        p.same(f"link {L}", lambda r, n=nm: os.link(J(r, "m600"), J(r, n)))
        p.same(f"mknod {L}", lambda r, n=nm: os.mkfifo(J(r, n)))
        p.same(f"unlink {L}", lambda r, n=nm: os.unlink(J(r, n)))
        p.same(f"setxattr name {L}", lambda r, n=nm: os.setxattr(J(r, "m600"), "user." + n, b""))
    # 252..255-byte names are legal; ".wh." + such a name is not (internal probes and
    # OCI markers must not turn that into ENAMETOOLONG).
    ok = "k" * 255
    p.same("create 255", lambda r: write(J(r, ok), b"255", os.O_WRONLY | os.O_CREAT))
    p.same("rename 255 into merged dir", lambda r: os.rename(J(r, ok), J(r, "d/" + ok)))
    p.same("read 255", lambda r: read(J(r, "d/" + ok)))
    p.same("ls d", lambda r: [n[:8] for n in listdir(J(r, "d"))])
    for L in (252, 255):
        p.same(f"mkdir {L}", lambda r, n="m" * L: os.mkdir(J(r, "d", n)))
        p.same(f"symlink {L}", lambda r, n="s" * L: os.symlink("t", J(r, "d", n)))
        p.same(f"mkfifo {L}", lambda r, n="f" * L: os.mkfifo(J(r, "d", n)))
        p.same(f"link {L}", lambda r, n="h" * L: os.link(J(r, "m600"), J(r, "d", n)))
        p.same(f"stat {L}", lambda r, L=L: [lstat(J(r, "d", c * L)) for c in "msfh"])
    p.same("unlink 255 lower file", lambda r: os.unlink(J(r, "L" * 255)))
    p.same("lstat 255 after unlink", lambda r: lstat(J(r, "L" * 255)))
    p.same("recreate 255 lower name", lambda r: write(J(r, "L" * 255), b"again", os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    p.same("rename 255-named lower dir", lambda r: os.rename(J(r, "D" * 255), J(r, "dshort")))
    p.same("ls dshort", lambda r: listdir(J(r, "dshort")))
    p.same("rename back to 255", lambda r: os.rename(J(r, "dshort"), J(r, "E" * 255)))
    p.same("ls / names", lambda r: [n[:8] for n in listdir(r)])
    # `.wh.` names: unionfuse refuses to create them (EINVAL); the kernel doesn't care.
    # Documented, not compared.
    wh_ops = {
        "create .wh.foo": lambda r: write(J(r, ".wh.foo"), b"", os.O_WRONLY | os.O_CREAT),
        "mkdir .wh.foo": lambda r: os.mkdir(J(r, ".wh.dir")),
        "symlink .wh.foo": lambda r: os.symlink("x", J(r, ".wh.sl")),
        "mknod .wh.foo": lambda r: os.mkfifo(J(r, ".wh.ff")),
        "link to .wh.foo": lambda r: os.link(J(r, "m600"), J(r, ".wh.ln")),
        "rename to .wh.foo": lambda r: os.rename(J(r, "m755"), J(r, ".wh.m755")),
        "rename to .wh..wh..opq": lambda r: os.rename(J(r, "sgid"), J(r, "d/.wh..wh..opq")),
    }
    kernel_answers = {}
    for label, fn in wh_ops.items():
        got = outcome(fn, p.u)
        kernel_answers[label] = outcome(fn, p.k)
        p.expect(label, got, ("err", "EINVAL"))
    print("kernel answers for .wh. names:", kernel_answers)
    # undo on the kernel side so the trees compare
    for n in (".wh.foo", ".wh.sl", ".wh.ff", ".wh.ln"):
        outcome(os.unlink, J(p.k, n))
    outcome(os.rmdir, J(p.k, ".wh.dir"))
    outcome(os.rename, J(p.k, ".wh.m755"), J(p.k, "m755"))
    outcome(os.rename, J(p.k, "d/.wh..wh..opq"), J(p.k, "sgid"))
    p.same("ls / after .wh. attempts", lambda r: listdir(r))
    p.same("ls d after .wh. attempts", lambda r: listdir(J(r, "d")))
    p.same("lookup .wh. names", lambda r: [outcome(os.lstat, J(r, n))[0] for n in (".wh.gone2", "d/.wh.b", ".wh.foo")])
    p.finish()


# ------------------------------------------------------------------------------------


def _mutate(r: str) -> None:
    """A mix of changes whose on-disk form the kernel must be able to read back."""
    os.unlink(J(r, "shadow.txt"))
    os.unlink(J(r, "d/keep"))
    os.unlink(J(r, "d/l1only"))
    write(J(r, "new.txt"), b"new\n", os.O_WRONLY | os.O_CREAT)
    write(J(r, "m644"), b"more\n", os.O_WRONLY | os.O_APPEND)
    os.chmod(J(r, "m600"), 0o604)
    os.chown(J(r, "owned"), 1234, 4321)
    os.setxattr(J(r, "xa"), "user.added", b"1")
    for n in ("f1", "f2"):
        os.unlink(J(r, "full", n))
    os.rmdir(J(r, "full"))
    os.mkdir(J(r, "full"))                      # opaque
    write(J(r, "full/f9"), b"9", os.O_WRONLY | os.O_CREAT)
    os.rename(J(r, "tree"), J(r, "moved"))      # redirect
    write(J(r, "moved/sub/b"), b"B", os.O_WRONLY | os.O_APPEND)
    os.unlink(J(r, "moved/l2file"))
    os.rename(J(r, "moved/sub"), J(r, "moved/sub2"))
    os.mkdir(J(r, "tree"))                      # over the moved-away name
    os.rename(J(r, "n1/n2"), J(r, "n2top"))
    os.rename(J(r, "d"), J(r, "dd"))            # dir with whiteouts in both forms below
    write(J(r, "hl/two"), b"x", os.O_WRONLY | os.O_APPEND)   # lower hard link copy-up
    os.link(J(r, "hl/one"), J(r, "hl5"))
    os.link(J(r, "m755"), J(r, "m755.link"))
    os.symlink("dd/sub", J(r, "sl"))
    os.mkfifo(J(r, "ff"))
    os.rename(J(r, "opq_oci"), J(r, "opq_oci2"))
    os.rmdir(J(r, "emptydir"))
    write(J(r, "gone1"), b"back", os.O_WRONLY | os.O_CREAT)
    os.rename(J(r, "sgid"), J(r, "sgid2"))


def _strip_private(t: dict) -> dict:
    out = {}
    for k, v in t.items():
        xa = [(n, val) for n, val in v[6] if not n.startswith(("trusted.unionfuse.", "user.unionfuse."))]
        out[k] = v[:6] + (xa,)
    return out


def test_upper_mountable_by_kernel(mounts, tmp_path, template):
    """unionfuse --whiteout overlay writes the kernel's forms: after unmounting, the
    kernel (redirect_dir=on, index=off, fresh workdir) shows the same tree over the
    kernel-form lowers; a unionfuse remount of the same upper does too."""
    p = Pair(mounts, tmp_path / "pair", template, extra=("--whiteout", "overlay"))
    p.same("mutate", _mutate)
    p.check_trees("after mutate")
    p.check_lowers()
    shown = tree(p.u)
    p.daemon.stop()
    # 1. unionfuse again on the same upper
    d2 = mounts.union(p.ulowers, p.uupper, p.uwork, mountpoint=tmp_path / "remount",
                      extra=("--whiteout", "overlay"))
    again = tree(d2.mountpoint)
    d2.stop()
    if again != shown:
        p.mismatches.append("unionfuse remount shows a different tree:\n" +
                            "\n".join(diff_dicts(again, shown, "remount", "before")))
    # 2. the kernel over unionfuse's upper + kernel-form lowers
    work2 = tmp_path / "kwork2"
    work2.mkdir()
    kmnt = mounts.overlay(_fresh_kernel_lowers(template, tmp_path),
                          p.uupper, work2, mountpoint=tmp_path / "kover", opts="redirect_dir=on,index=off")
    seen = tree(kmnt)
    raw_diff = diff_dicts(seen, shown, "kernel", "unionfuse")
    if _strip_private(seen) != _strip_private(shown):
        p.mismatches.append("kernel mount of unionfuse's upper shows a different tree:\n" +
                            "\n".join(diff_dicts(_strip_private(seen), _strip_private(shown), "kernel", "unionfuse")))
    if raw_diff:
        print("note: kernel shows unionfuse's private xattrs:\n" + "\n".join(raw_diff[:10]))
    assert not p.mismatches, "differences:\n" + "\n".join(p.mismatches)


def _fresh_kernel_lowers(template, tmp_path) -> list[Path]:
    from layerkit import cp_a

    base = tmp_path / "klow2"
    base.mkdir()
    out = []
    for src in template[1]:
        cp_a(src, base / src.name)
        out.append(base / src.name)
    return out


def test_open_handles(pair):
    """Open file descriptors across copy-up, unlink and rename."""
    p = pair

    def ro_then_copyup(r):
        fd = os.open(J(r, "m644"), os.O_RDONLY)
        try:
            write(J(r, "m644"), b"NEW!", os.O_WRONLY)          # copy-up through another open
            return os.pread(fd, 100, 0), os.fstat(fd).st_size
        finally:
            os.close(fd)

    def unlinked_open(r):
        fd = os.open(J(r, "low3only"), os.O_RDWR)
        try:
            os.unlink(J(r, "low3only"))
            os.pwrite(fd, b"still here", 0)
            st_ = os.fstat(fd)
            return os.pread(fd, 100, 0), st_.st_nlink, outcome(os.lstat, J(r, "low3only"))[0]
        finally:
            os.close(fd)

    def renamed_open(r):
        fd = os.open(J(r, "tree/sub/b"), os.O_RDWR | os.O_APPEND)
        try:
            os.rename(J(r, "tree"), J(r, "tree_moved"))
            os.write(fd, b"+appended")
            return read(J(r, "tree_moved/sub/b"))
        finally:
            os.close(fd)

    def replaced_open(r):
        fd = os.open(J(r, "xa"), os.O_RDONLY)
        try:
            write(J(r, "xa.new"), b"replacement", os.O_WRONLY | os.O_CREAT)
            os.rename(J(r, "xa.new"), J(r, "xa"))
            return os.pread(fd, 100, 0), read(J(r, "xa"))
        finally:
            os.close(fd)

    def dir_handle(r):
        fd = os.open(J(r, "d"), os.O_RDONLY | os.O_DIRECTORY)
        try:
            a = sorted(os.listdir(fd))
            write(J(r, "d/added"), b"", os.O_WRONLY | os.O_CREAT)
            os.unlink(J(r, "d/keep"))
            return a, sorted(os.listdir(fd))      # listdir(fd) rewinds
        finally:
            os.close(fd)

    def hardlink_alias_after_dir_rename(r):
        os.rename(J(r, "hl/sub"), J(r, "hlsub_moved"))
        write(J(r, "hl/one"), b"via one\n", os.O_WRONLY | os.O_TRUNC)
        return (read(J(r, "hlsub_moved/three")), os.lstat(J(r, "hlsub_moved/three")).st_nlink,
                os.lstat(J(r, "hlsub_moved/three")).st_ino == os.lstat(J(r, "hl/two")).st_ino)

    def ftruncate_lower(r):
        fd = os.open(J(r, "m600"), os.O_RDWR)
        try:
            os.ftruncate(fd, 2)
            os.fchmod(fd, 0o640)
            return os.pread(fd, 100, 0), lstat(J(r, "m600"))
        finally:
            os.close(fd)

    for fn in (ro_then_copyup, unlinked_open, renamed_open, replaced_open, dir_handle,
               hardlink_alias_after_dir_rename, ftruncate_lower):
        p.same(fn.__name__, fn)
    p.finish()


def test_as_other_user(pair):
    """Files created by a non-root caller are owned by the caller (daemon runs as root)."""
    p = pair
    from conftest import allow_traverse, run_as

    allow_traverse(J(p.u, "x"))
    allow_traverse(J(p.k, "x"))

    def as_user(fn):
        return lambda r: run_as(1000, 1000, fn, r)

    def mk(r):
        write(J(r, "sticky/mine"), b"m", os.O_WRONLY | os.O_CREAT, 0o640)
        os.mkdir(J(r, "sticky/mydir"))
        os.symlink("t", J(r, "sticky/mylink"))
        return [lstat(J(r, "sticky", n)) for n in ("mine", "mydir", "mylink")]

    p.same("create as uid 1000", as_user(mk))
    p.same("unlink root's file in sticky dir", as_user(lambda r: os.unlink(J(r, "sticky/inner"))))
    p.same("write root-owned 0644 file", as_user(lambda r: write(J(r, "m644"), b"x", os.O_WRONLY)))
    p.same("read 0600 root file", as_user(lambda r: read(J(r, "m600"))))
    p.same("chmod own file", as_user(lambda r: os.chmod(J(r, "owned"), 0o600)))
    p.same("chown away", as_user(lambda r: os.chown(J(r, "owned"), 0, 0)))
    p.same("write owned", as_user(lambda r: write(J(r, "owned"), b"mine now", os.O_WRONLY | os.O_TRUNC)))
    p.same("write to suid_owned (kills suid)", as_user(lambda r: write(J(r, "suid_owned"), b"x", os.O_WRONLY)))
    p.same("stat suid_owned", lambda r: lstat(J(r, "suid_owned")))
    p.finish()


def test_oci_whiteout_mode(mounts, tmp_path, template):
    """--whiteout oci: the same changes look the same as on the kernel, also after a
    unionfuse remount (the upper holds .wh. files instead of char devices)."""
    p = Pair(mounts, tmp_path / "pair", template, extra=("--whiteout", "oci"))
    p.same("mutate", _mutate)
    p.check_trees("after mutate")
    shown = tree(p.u)
    p.daemon.stop()
    d2 = mounts.union(p.ulowers, p.uupper, p.uwork, mountpoint=tmp_path / "remount", extra=("--whiteout", "oci"))
    again = tree(d2.mountpoint)
    if again != shown:
        p.mismatches.append("unionfuse (oci) remount shows a different tree:\n" +
                            "\n".join(diff_dicts(again, shown, "remount", "before")))
    chr_wh = [os.path.join(dp, n) for dp, dn, fn in os.walk(p.uupper) for n in fn
              if stat.S_ISCHR(os.lstat(os.path.join(dp, n)).st_mode)]
    p.expect("no char-dev whiteouts in an oci-mode upper", chr_wh, [])
    p.check_lowers()
    assert not p.mismatches, "differences:\n" + "\n".join(p.mismatches)
