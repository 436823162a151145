"""The inode table: FUSE node ids <-> merged objects.

A node id is also the st_ino users see.  It is derived from the object's *origin*: the
real (st_dev, st_ino) of the lower file or dir it came from, kept across copy-up in a
private xattr.  So st_ino does not change when a file is copied up, hard links inside a
lower layer are one node, and the numbers are the same after a remount.  When all layers
live on the upper's filesystem the real inode number is used as is; otherwise (or on the
rare clash with a live node) a number is allocated from a private range.

Nodes form a tree like the kernel's dentries: a dir knows its parent and name, a non-dir
its aliases (parent, name); paths are computed by walking up, so renaming a directory
is O(1) here.  A node stays in the table while the kernel holds a lookup on it, while it
has open handles, or while a child refers to it.
"""

from __future__ import annotations

import itertools
import os

from .union import join

ROOT_INODE = 1
_PRIVATE_BASE = 1 << 62
# private numbers promised to objects not in the table (listed but not looked up yet,
# or forgotten by the kernel; layers on another filesystem than the upper), at most
# this many
PROMISE_MAX = 32_768
# Objects of a layer on another filesystem than the upper get a number made from their
# real one, as overlayfs' xino does: bit 61, 20 bits of st_dev, the real st_ino if it
# fits in 40 bits (below _PRIVATE_BASE; node ids stay under 2**63 for C's int64).  The same after a remount (and with the layers rotated), so st_ino
# stays put across remounts and copy-ups there too.  Otherwise (or on a clash with a
# live node) a counter from _PRIVATE_BASE.
_XINO_BASE = 1 << 61


def _xino(dev: int, ino: int) -> int | None:
    if not 0 < ino < (1 << 40):
        return None
    d = ((os.major(dev) & 0xFF) << 12 | (os.minor(dev) & 0xFFF)) ^ (os.minor(dev) >> 12)
    return _XINO_BASE | (d & 0xFFFFF) << 40 | ino


class Node:
    __slots__ = (
        "ino",
        "key",
        "is_dir",
        "parent",
        "name",
        "aliases",
        "in_upper",
        "lowers",
        "index",
        "lookups",
        "refs",
        "handles",
        "deleted",
        "lock",
        "last_st",
        "orphan",
        "dcache",
        "attrs",
        "fdh",
        "own_key",
        "primed",
        "__weakref__",
    )

    def __init__(self, ino: int, key, is_dir: bool):
        self.ino = ino
        self.key = key
        self.is_dir = is_dir
        self.parent: Node | None = None  # dirs only
        self.name = b""  # dirs only
        # non-dirs only; a tuple, replaced on change (a list costs ~90 bytes more a node,
        # and nearly every file has exactly one name)
        self.aliases: tuple[tuple[Node, bytes], ...] = ()
        self.in_upper = False
        self.lowers: list[tuple[int, bytes]] = []
        self.index: bytes | None = None  # hard-link group name in the index dir
        self.lookups = 0
        self.refs = 0
        self.handles: set | tuple = ()  # open handles (a set once there is one)
        self.deleted = False
        self.lock = None
        self.last_st: os.stat_result | None = None
        self.primed = False  # its data was offered to the kernel's cache (operations._prime)
        self.orphan: bytes | None = None  # copy of an unlinked-but-open lower file
        self.dcache = None  # dirs: the merged listing (operations.DirCache)
        self.attrs = None  # lower-only nodes: their (immutable) EntryAttributes
        self.fdh = None  # files, no-OPEN mode: the daemon's cached fd (operations.CachedFd)
        # an upper object keyed by its own (st_dev, st_ino), known to have no origin
        # record (made through the mount, or read without one): see _node_for
        self.own_key = False

    # (an empty set is 216 bytes: most nodes never get a handle)
    def add_handle(self, h) -> None:
        if not self.handles:
            self.handles = set()
        self.handles.add(h)

    def drop_handle(self, h) -> None:
        if self.handles:
            self.handles.discard(h)

    def path(self) -> bytes | None:
        """Merged path relative to the mount root, or None if no name leads here."""
        if self.is_dir:
            parts = []
            node = self
            while node.parent is not None:
                parts.append(node.name)
                node = node.parent
            if node.ino != ROOT_INODE:
                return None
            return b"/".join(reversed(parts))
        if not self.aliases:
            return None
        parent, name = self.aliases[0]
        ppath = parent.path()
        return None if ppath is None else join(ppath, name)

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"<Node {self.ino} {self.path()!r} upper={self.in_upper} lowers={self.lowers}>"


class InodeTable:
    def __init__(self, upper_dev: int | None):
        self.by_ino: dict[int, Node] = {}
        self.by_key: dict[tuple[int, int], Node] = {}
        self.upper_dev = upper_dev
        self._private = itertools.count(_PRIVATE_BASE)
        # key -> private number already shown (as a listing's d_ino, or by a node since
        # dropped) for an object not in the table: new() gives it that number (predict)
        self._promised: dict[tuple[int, int], int] = {}

    def __getitem__(self, ino: int) -> Node:
        return self.by_ino[ino]

    def get(self, ino: int) -> Node | None:
        return self.by_ino.get(ino)

    def add_root(self, key) -> Node:
        root = Node(ROOT_INODE, key, True)
        root.lookups = 1  # never dropped
        self.by_ino[ROOT_INODE] = root
        self.by_key[key] = root
        return root

    def find(self, key) -> Node | None:
        node = self.by_key.get(key)
        if node is not None and node.deleted:
            return None
        return node

    def predict(self, key) -> int:
        """The number the object with *key* has, or will get from new(): a plain
        listing (no lookup) shows it as d_ino, and stat must agree with it later."""
        node = self.by_key.get(key)
        if node is not None and not node.deleted:
            return node.ino
        ino = self._promised.get(key)
        if ino is not None:
            return ino
        dev, ino = key
        if dev == self.upper_dev and ROOT_INODE < ino < _PRIVATE_BASE and ino not in self.by_ino:
            return ino  # new() gives the real number while nothing else holds it
        if dev != self.upper_dev:
            x = _xino(dev, ino)
            if x is not None and x not in self.by_ino:
                return x  # new() gives it while nothing else holds it
        ino = next(self._private)
        self._promise(key, ino)
        return ino

    def _promise(self, key, ino: int) -> None:
        if len(self._promised) >= PROMISE_MAX:
            del self._promised[next(iter(self._promised))]  # oldest: may show a new number
        self._promised[key] = ino

    def new(self, key, is_dir: bool) -> Node:
        dev, ino = key
        promised = self._promised.pop(key, None) if self._promised else None
        if promised is not None:
            ino = promised
        elif dev != self.upper_dev:
            x = _xino(dev, ino)
            ino = x if x is not None and x not in self.by_ino else next(self._private)
        elif ino in self.by_ino or ino <= ROOT_INODE or ino >= _PRIVATE_BASE:
            ino = next(self._private)
        node = Node(ino, key, is_dir)
        self.by_ino[ino] = node
        self.by_key[key] = node
        return node

    # -- the tree -------------------------------------------------------------------

    def set_dir_parent(self, node: Node, parent: Node, name: bytes) -> None:
        old = node.parent
        if old is parent and node.name == name:
            return
        parent.refs += 1
        node.parent, node.name = parent, name
        if old is not None:
            old.refs -= 1
            self.maybe_drop(old)

    def add_alias(self, node: Node, parent: Node, name: bytes) -> None:
        if node.is_dir:
            self.set_dir_parent(node, parent, name)
            return
        for p, n in node.aliases:
            if p is parent and n == name:
                return
        parent.refs += 1
        node.aliases = (*node.aliases, (parent, name))

    def remove_alias(self, node: Node, parent: Node, name: bytes) -> None:
        if node.is_dir:
            if node.parent is parent and node.name == name:
                node.parent = None
                parent.refs -= 1
                self.maybe_drop(parent)
            return
        for i, (p, n) in enumerate(node.aliases):
            if p is parent and n == name:
                node.aliases = node.aliases[:i] + node.aliases[i + 1 :]
                p.refs -= 1
                self.maybe_drop(p)
                return

    def mark_deleted(self, node: Node) -> None:
        node.deleted = True
        if self.by_key.get(node.key) is node:
            del self.by_key[node.key]
        self.maybe_drop(node)

    def forget(self, ino: int, count: int) -> None:
        node = self.by_ino.get(ino)
        if node is None:
            return
        node.lookups = max(0, node.lookups - count)
        self.maybe_drop(node)

    def maybe_drop(self, node: Node) -> None:
        while (
            node.ino != ROOT_INODE
            and node.lookups == 0
            and node.refs == 0
            and not node.handles
            and self.by_ino.get(node.ino) is node
        ):
            del self.by_ino[node.ino]
            if self.by_key.get(node.key) is node:
                del self.by_key[node.key]
                if node.ino >= _PRIVATE_BASE:
                    # the same object looked up again gets the same number back: a
                    # listing (or a process) may still hold this one
                    self._promise(node.key, node.ino)
            if node.is_dir:
                parent = node.parent
                node.parent = None
                if parent is None:
                    return
                parent.refs -= 1
                node = parent
            else:
                parents = [p for p, _ in node.aliases]
                node.aliases = ()
                for p in parents:
                    p.refs -= 1
                for p in parents[1:]:
                    self.maybe_drop(p)
                if not parents:
                    return
                node = parents[0]
