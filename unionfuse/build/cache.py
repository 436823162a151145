"""The build cache: ROOT/build-cache/<sha256(parent id, step key)>.json -> {"image": id}.

The key of a step is its parent image id (which pins the whole chain before it) and the
step after substitution, plus, for COPY/ADD, a hash of what it copies.  Entries are
written atomically under the store lock; a stale entry (its image was removed) is a miss.
"""

from __future__ import annotations

import hashlib
import json
import os

from ..store.store import NotFound, Store, canonical_json, write_atomic


class BuildCache:
    def __init__(self, store: Store):
        self.store = store
        self.dir = os.path.join(store.root, "build-cache")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)

    def _path(self, parent: str, key: str) -> str:
        h = hashlib.sha256(f"{parent}\n{key}".encode("utf-8", "surrogateescape")).hexdigest()
        return os.path.join(self.dir, h + ".json")

    def get(self, parent: str, key: str):
        try:
            with open(self._path(parent, key)) as f:
                rec = json.load(f)
            return self.store.image_by_id(rec["image"])
        except (OSError, ValueError, KeyError, NotFound):
            return None

    def put(self, parent: str, key: str, image_id: str) -> None:
        with self.store.lock():
            write_atomic(self._path(parent, key), canonical_json({"parent": parent, "key": key, "image": image_id}))

    def image_ids(self) -> set[str]:
        """Images the cache points at: docker's "intermediate images" (``images`` can
        hide the untagged ones among them unless -a)."""
        out = set()
        for name in os.listdir(self.dir):
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(self.dir, name)) as f:
                    out.add(json.load(f)["image"])
            except (OSError, ValueError, KeyError):
                continue
        return out

    def prune(self) -> int:
        """Drop entries whose image is gone (after ``prune``/``rmi``); returns how many."""
        n = 0
        with self.store.lock():
            for name in os.listdir(self.dir):
                p = os.path.join(self.dir, name)
                try:
                    with open(p) as f:
                        image_id = json.load(f)["image"]
                    self.store.image_by_id(image_id)
                except NotFound:
                    os.unlink(p)
                    n += 1
                except (OSError, ValueError, KeyError):
                    if not name.endswith(".json"):
                        continue
                    os.unlink(p)
                    n += 1
        return n
