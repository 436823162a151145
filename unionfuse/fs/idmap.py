"""Owner shifting for id-mapped mounts, as fuse-overlayfs does it (its uidmapping=,
gidmapping=, squash_to_uid=, squash_to_gid=, squash_to_root options, which
containers/storage passes to a mount_program for a container in a user namespace).

A mapping is a list of (stored, shown, count) ranges: an owner *stored* in a layer shows
through the mount as *shown* (+ the offset into the range), and an owner set through the
mount (chown, or a new file made by a caller) is stored shifted back.  An id outside
every range shows as (and is stored as) the kernel's overflow id, 65534, as in
fuse-overlayfs.  Squashing shows every owner as one id and leaves what is stored alone.
No pyfuse3 here: the rules are tested without a mount.
"""

from __future__ import annotations

OVERFLOW_ID = 65534


def _overflow(kind: str) -> int:
    try:
        with open(f"/proc/sys/kernel/overflow{kind}") as f:
            return int(f.read())
    except (OSError, ValueError):
        return OVERFLOW_ID


def parse_mapping(text: str) -> tuple[tuple[int, int, int], ...]:
    """``STORED:SHOWN:COUNT[:STORED:SHOWN:COUNT...]`` (containers/storage writes
    CONTAINER:HOST:SIZE) -> ranges.  ValueError on anything else."""
    parts = [p for p in text.split(":") if p != ""]
    if not parts or len(parts) % 3:
        raise ValueError(f"invalid id mapping {text!r} (want FROM:TO:COUNT[:FROM:TO:COUNT...])")
    out = []
    for i in range(0, len(parts), 3):
        try:
            a, b, n = (int(x) for x in parts[i:i + 3])
        except ValueError:
            raise ValueError(f"invalid id mapping {text!r}") from None
        if min(a, b) < 0 or n <= 0 or max(a, b) + n > 1 << 32:
            raise ValueError(f"invalid id mapping {text!r}")
        out.append((a, b, n))
    return tuple(out)


def format_mapping(ranges) -> str:
    return ":".join(f"{a}:{b}:{n}" for a, b, n in ranges)


class IdMap:
    """Shown <-> stored owners.  ``None`` for a side means identity."""

    def __init__(self, uids=None, gids=None, squash_uid: int | None = None,
                 squash_gid: int | None = None):
        self.uids = tuple(uids) if uids else None
        self.gids = tuple(gids) if gids else None
        self.squash_uid, self.squash_gid = squash_uid, squash_gid
        self.overflow_uid = _overflow("uid") if self.uids else OVERFLOW_ID
        self.overflow_gid = _overflow("gid") if self.gids else OVERFLOW_ID

    @property
    def squashing(self) -> bool:
        return self.squash_uid is not None or self.squash_gid is not None

    @staticmethod
    def _map(ranges, i: int, src: int, dst: int, overflow: int) -> int:
        for r in ranges:
            off = i - r[src]
            if 0 <= off < r[2]:
                return r[dst] + off
        return overflow

    def shown(self, uid: int, gid: int) -> tuple[int, int]:
        """What a layer's (uid, gid) looks like through the mount."""
        if self.squash_uid is not None:
            uid = self.squash_uid
        elif self.uids:
            uid = self._map(self.uids, uid, 0, 1, self.overflow_uid)
        if self.squash_gid is not None:
            gid = self.squash_gid
        elif self.gids:
            gid = self._map(self.gids, gid, 0, 1, self.overflow_gid)
        return uid, gid

    def stored(self, uid: int, gid: int) -> tuple[int, int]:
        """What a (uid, gid) given through the mount is stored as (-1: unchanged)."""
        if self.uids and uid != -1:
            uid = self._map(self.uids, uid, 1, 0, self.overflow_uid)
        if self.gids and gid != -1:
            gid = self._map(self.gids, gid, 1, 0, self.overflow_gid)
        return uid, gid
