"""The build context: a directory read only through :class:`fsops.ScopedRoot` (nothing
outside it is ever opened), filtered by ``.dockerignore`` with Docker's pattern rules
(moby/patternmatcher: ``*``, ``?``, ``[...]``, ``**``, ``!`` exceptions, a pattern that
matches a parent dir excludes what is below it, the last matching pattern wins)."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import posixpath
import re
import stat

from . import fsops

GLOB_CHARS = set("*?[")


class ContextError(ValueError):
    pass


# -- .dockerignore ---------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern:
    out = ["^"]
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        i += 1
        if ch == "*":
            if i < n and pattern[i] == "*":
                i += 1
                if i < n and pattern[i] == "/":
                    i += 1
                out.append(".*" if i >= n else "(.*/)?")
            else:
                out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch in ".+()|{}$^":
            out.append("\\" + ch)
        elif ch == "\\":
            if i < n:
                out.append("\\" + pattern[i])
                i += 1
            else:
                out.append("\\\\")
        elif ch == "[":
            j = pattern.find("]", i)
            if j < 0:
                out.append("\\[")
            else:
                body = pattern[i:j]
                if body.startswith("^") or body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = j + 1
        else:
            out.append(re.escape(ch))
    out.append("$")
    return re.compile("".join(out), re.S)


class IgnoreMatcher:
    def __init__(self, lines: list[str]):
        self.patterns: list[tuple[re.Pattern, bool]] = []
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            excl = line.startswith("!")
            if excl:
                line = line[1:].strip()
                if not line:
                    continue
            line = posixpath.normpath(line)
            if len(line) > 1 and line.startswith("/"):
                line = line.lstrip("/")
            if line == ".":
                continue
            self.patterns.append((_pattern_regex(line), excl))
        self.has_exceptions = any(e for _, e in self.patterns)

    @classmethod
    def from_file(cls, path: str) -> "IgnoreMatcher":
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return cls(f.read().splitlines())
        except FileNotFoundError:
            return cls([])

    def ignored(self, rel: str) -> bool:
        if not self.patterns or not rel:
            return False
        parents = rel.split("/")[:-1]
        matched = False
        for rx, excl in self.patterns:
            if excl != matched:
                continue
            m = bool(rx.match(rel))
            if not m and parents:
                for i in range(len(parents)):
                    if rx.match("/".join(parents[: i + 1])):
                        m = True
                        break
            if m:
                matched = not excl
        return matched


# -- the context -------------------------------------------------------------------------


class Context:
    def __init__(self, path: str, dockerfile_rel: str | None = None):
        self.path = os.path.realpath(path)
        if not os.path.isdir(self.path):
            raise ContextError(f"unable to prepare context: path {path!r} is not a directory")
        self.tree = fsops.ScopedRoot(self.path, clamp=False)
        ignore = os.path.join(self.path, ".dockerignore")
        if os.path.lexists(ignore) and not os.path.realpath(ignore).startswith(self.path + os.sep):
            raise ContextError(".dockerignore leads out of the build context")
        self.ignore = IgnoreMatcher.from_file(ignore)

    def close(self) -> None:
        self.tree.close()

    # a callable for fsops.walk: keep(parts, is_dir)
    def keep(self, parts: list[str], is_dir: bool) -> bool:
        return not self.ignore.ignored("/".join(parts))

    def _may_descend(self, parts: list[str]) -> bool:
        return self.ignore.has_exceptions

    def sources(self, pattern: str) -> list[tuple[str, list[str], os.stat_result]]:
        """Context paths matching one COPY/ADD source: (name as matched, real parts, stat).
        Symlinks on the way are followed inside the context; leaving it is an error."""
        if pattern.startswith("/"):
            raise ContextError(f"source {pattern!r} is an absolute path: sources are relative to the build context")
        norm = posixpath.normpath(pattern)
        if norm == ".." or norm.startswith("../"):
            raise ContextError(f"forbidden path outside the build context: {pattern}")
        if not any(c in GLOB_CHARS for c in norm):
            names = [norm]
        else:
            names = self._glob(norm)
            if not names:
                raise ContextError(f"no source files were specified: no file in the build context matches {pattern!r}")
        out = []
        for name in names:
            parts = self.tree.resolve(name, what="source")
            rel = "/".join(parts)
            st = self.tree.lstat(parts)
            if st is None or (name != "." and (self.ignore.ignored(name) or self.ignore.ignored(rel))):
                raise ContextError(f"file not found in build context or excluded by .dockerignore: {name}")
            out.append((name, parts, st))
        return out

    def _glob(self, pattern: str) -> list[str]:
        comps = pattern.split("/")
        results: list[str] = []

        def rec(prefix: list[str], i: int) -> None:
            if i == len(comps):
                results.append("/".join(prefix))
                return
            comp = comps[i]
            try:
                dfd = self.tree.open_dir(prefix)
            except OSError:
                return
            try:
                names = sorted(os.listdir(dfd))
            finally:
                os.close(dfd)
            for n in names:
                if fnmatch.fnmatchcase(n, comp):
                    rel = "/".join(prefix + [n])
                    if self.ignore.ignored(rel) and not (i < len(comps) - 1 and self.ignore.has_exceptions):
                        continue
                    if i < len(comps) - 1:
                        st = self.tree.lstat(prefix + [n])
                        if st is None or not stat.S_ISDIR(st.st_mode):
                            continue
                    rec(prefix + [n], i + 1)

        rec([], 0)
        return results

    def walk(self, parts: list[str], st: os.stat_result) -> list[fsops.Entry]:
        keep = _Keep(self)
        return fsops.walk(self.tree, parts, st, keep if self.ignore.patterns else None)


class _Keep:
    def __init__(self, ctx: Context):
        self.ctx = ctx

    def __call__(self, parts, is_dir):
        return self.ctx.keep(parts, is_dir)

    def may_descend(self, parts):
        return self.ctx._may_descend(parts)


def hash_entries(tree: fsops.ScopedRoot, entries: list[fsops.Entry], h) -> None:
    """Feed the content and metadata Docker's cache looks at (names, types, permission
    bits, file content, link targets; not mtimes or owners) into hash *h*."""
    for e in entries:
        m = e.st.st_mode
        h.update(f"{e.rel}\0{stat.S_IFMT(m):o}\0{stat.S_IMODE(m):o}\0".encode("utf-8", "surrogateescape"))
        if stat.S_ISREG(m):
            fh = hashlib.sha256()
            for chunk in fsops.iter_hash_chunks(tree, e.parts):
                fh.update(chunk)
            h.update(fh.digest())
        elif stat.S_ISLNK(m):
            h.update(tree.readlink(e.parts).encode("utf-8", "surrogateescape"))
        elif stat.S_ISCHR(m) or stat.S_ISBLK(m):
            h.update(str(e.st.st_rdev).encode())
        h.update(b"\n")
