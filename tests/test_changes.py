"""changes(): docker-diff A/C/D lines for an upper dir over lower dirs, built by hand in
overlay form (no mount)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from unionfuse.store.changes import changes


def w(p: Path, data="x") -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(data)


def wh(p: Path) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(p, stat.S_IFCHR | 0o000, 0)


def opaque(p: Path) -> None:
    p.mkdir(parents=True, exist_ok=True)
    os.setxattr(p, "trusted.overlay.opaque", b"y")


@pytest.fixture
def lowers(tmp_path):
    l1, l2 = tmp_path / "l1", tmp_path / "l2"
    for f in ("etc/passwd", "etc/group", "etc/hosts", "bin/sh", "usr/lib/a/b", "usr/lib/a/c",
              "var/log/x", "opt/o1", "opt/o2", "opt/sub/o3", "old/f", "old/sub/g", "a/b", "deep/1/2/3"):
        w(l2 / f)
    (l2 / "home").mkdir()
    w(l1 / "etc/motd")
    wh(l1 / "etc/hosts")  # deleted by l1: not in the merged lowers
    w(l1 / "old/fromtop")
    return [str(l1), str(l2)]


def test_no_changes(tmp_path, lowers):
    (tmp_path / "up").mkdir()
    assert changes(str(tmp_path / "up"), lowers) == []


def test_mixed(tmp_path, lowers):
    up = tmp_path / "up"
    w(up / "etc/passwd", "changed")          # C (and C /etc)
    w(up / "etc/newfile")                    # A
    wh(up / "etc/group")                     # D
    w(up / "etc/hosts")                      # deleted in l1, back again: A
    w(up / "etc/motd", "m")                  # from l1: C
    w(up / "newdir/x")                       # A /newdir, A /newdir/x
    wh(up / "usr/lib/a/b")                   # D deep; parents C
    opaque(up / "opt")                       # opaque: lower children gone
    w(up / "opt/o1", "new o1")               # ... but o1 written again: C
    wh(up / "var")                           # a whole dir deleted: only D /var
    (up / "home").mkdir()
    wh(up / "home/ghost")                    # whiteout of nothing: not reported
    w(up / "a-c")                            # sorting: /a, /a/new, /a-c
    w(up / "a/new")
    got = changes(str(up), lowers)
    assert got == [
        ("C", "/a"), ("A", "/a/new"), ("A", "/a-c"),
        ("C", "/etc"), ("D", "/etc/group"), ("A", "/etc/hosts"), ("C", "/etc/motd"),
        ("A", "/etc/newfile"), ("C", "/etc/passwd"),
        ("C", "/home"),
        ("A", "/newdir"), ("A", "/newdir/x"),
        ("C", "/opt"), ("C", "/opt/o1"), ("D", "/opt/o2"), ("D", "/opt/sub"),
        ("C", "/usr"), ("C", "/usr/lib"), ("C", "/usr/lib/a"), ("D", "/usr/lib/a/b"),
        ("D", "/var"),
    ]


def test_sorted_by_path_not_kind(tmp_path, lowers):
    up = tmp_path / "up"
    wh(up / "bin/sh")
    w(up / "bin/ash")
    w(up / "bin/zsh", "z")
    got = changes(str(up), lowers)
    assert got == [("C", "/bin"), ("A", "/bin/ash"), ("D", "/bin/sh"), ("A", "/bin/zsh")]
    paths = [p for _, p in got]
    assert paths == sorted(paths, key=lambda p: p.split("/"))


def test_parents_reported(tmp_path, lowers):
    up = tmp_path / "up"
    w(up / "deep/1/2/3", "changed")
    w(up / "deep/1/new/x/y")
    assert changes(str(up), lowers) == [
        ("C", "/deep"), ("C", "/deep/1"), ("C", "/deep/1/2"), ("C", "/deep/1/2/3"),
        ("A", "/deep/1/new"), ("A", "/deep/1/new/x"), ("A", "/deep/1/new/x/y"),
    ]


def test_parent_of_change_missing_in_upper_listing(tmp_path, lowers):
    """A whiteout deep in a dir whose parents exist in the upper only as the path to it."""
    up = tmp_path / "up"
    wh(up / "usr/lib/a/c")
    assert changes(str(up), lowers) == [("C", "/usr"), ("C", "/usr/lib"), ("C", "/usr/lib/a"),
                                        ("D", "/usr/lib/a/c")]


def test_redirected_dir(tmp_path, lowers):
    """mv /old /new (redirect_dir): the new name with all its merged content is added,
    the old one deleted."""
    up = tmp_path / "up"
    (up / "new").mkdir(parents=True)
    os.setxattr(up / "new", "trusted.overlay.redirect", b"/old")
    w(up / "new/added")
    wh(up / "new/f")  # deleted after the rename
    wh(up / "old")
    assert changes(str(up), lowers) == [
        ("A", "/new"), ("A", "/new/added"), ("A", "/new/fromtop"), ("A", "/new/sub"), ("A", "/new/sub/g"),
        ("D", "/old"),
    ]


def test_redirect_over_existing_dir(tmp_path, lowers):
    """mv /old /opt over an existing dir: /opt changes, its old-only names are deleted."""
    up = tmp_path / "up"
    (up / "opt").mkdir(parents=True)
    os.setxattr(up / "opt", "trusted.overlay.redirect", b"/old")
    wh(up / "old")
    got = changes(str(up), lowers)
    assert ("D", "/old") in got and ("C", "/opt") in got
    assert ("A", "/opt/f") in got and ("A", "/opt/sub/g") in got
    assert ("D", "/opt/o1") in got and ("D", "/opt/o2") in got
    assert ("C", "/opt/sub") in got  # in both: a changed dir


def test_oci_form_upper(tmp_path, lowers):
    """An upper written with --whiteout oci: .wh.NAME files and .wh..wh..opq."""
    up = tmp_path / "up"
    w(up / "etc/.wh.group", "")
    w(up / "opt/.wh..wh..opq", "")
    w(up / "opt/o2", "again")
    w(up / ".wh.ghost", "")
    assert changes(str(up), lowers) == [
        ("C", "/etc"), ("D", "/etc/group"),
        ("C", "/opt"), ("D", "/opt/o1"), ("C", "/opt/o2"), ("D", "/opt/sub"),
    ]


def test_type_changes(tmp_path, lowers):
    up = tmp_path / "up"
    w(up / "home")                    # dir -> file
    (up / "bin/sh").mkdir(parents=True)  # file -> dir
    w(up / "bin/sh/inner")
    os.symlink("/nowhere", up / "a-link")
    assert changes(str(up), lowers) == [
        ("A", "/a-link"), ("C", "/bin"), ("C", "/bin/sh"), ("A", "/bin/sh/inner"), ("C", "/home"),
    ]


def test_no_lowers(tmp_path):
    up = tmp_path / "up"
    w(up / "x/y")
    wh(up / "gone")
    opaque(up / "o")
    assert changes(str(up), []) == [("A", "/o"), ("A", "/x"), ("A", "/x/y")]
