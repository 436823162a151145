"""What a container's layer changed, like ``docker container diff``: A (added),
C (changed, including the parent dirs of any change), D (deleted)."""

from __future__ import annotations

import os

from ..fs.union import Layers
from .tarlayer import _lowers_at, iter_layer


def changes(upper: str, lowers: list[str]) -> list[tuple[str, str]]:
    """Sorted (kind, "/path") pairs for layer dir *upper* over *lowers* (top first)."""
    layers = Layers(None, [os.fsencode(x) for x in lowers])
    out: dict[str, str] = {}
    stack_cache: dict[str, list] = {}

    def lower_stack(d: str):
        if d not in stack_cache:
            stack_cache[d] = _lowers_at(layers, d) if lowers else []
        return stack_cache[d]

    def in_lowers(rel: str) -> bool:
        d, _, base = rel.rpartition("/")
        stack = lower_stack(d)
        return bool(stack) and layers.resolve(None, stack, os.fsencode(base)).found

    for kind, rel, _st, _real in iter_layer(upper, layers):
        if kind == "entry":
            out[rel] = "C" if in_lowers(rel) else "A"
        elif kind == "whiteout":
            if in_lowers(rel):
                out[rel] = "D"
        elif kind == "opaque":
            stack = lower_stack(rel) if in_lowers(rel) else []
            present = set(os.listdir(os.path.join(upper, rel))) if os.path.isdir(os.path.join(upper, rel)) else set()
            for n in layers.listdir(None, stack) if stack else []:
                name = os.fsdecode(n)
                if name not in present:
                    out.setdefault(f"{rel}/{name}", "D")
    # parents of every change are changed too (their listings differ)
    for rel in list(out):
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            p = "/".join(parts[:i])
            if p not in out:
                out[p] = "C" if in_lowers(p) else "A"
    # by path, component by component (docker's walk order: a dir, its contents, then
    # the next name: /a, /a/b, /a-c), not by kind
    return [(out[r], "/" + r) for r in sorted(out, key=lambda r: r.split("/"))]
