"""Dockerfile word expansion: ``$VAR``, ``${VAR}``, ``${VAR:-x}``, ``${VAR-x}``,
``${VAR:+x}``, ``${VAR+x}``, ``${VAR:?msg}``, quotes and the escape character, with the
rules of buildkit's ``frontend/dockerfile/shell/lex.go`` (ProcessWord): quotes are
removed, single quotes are literal, inside double quotes the escape only escapes ``"``,
``$`` and itself, an unset variable is empty."""

from __future__ import annotations

from typing import Mapping


class LexError(ValueError):
    pass


_SPECIAL = set("@*#?-$!")


class _Word:
    def __init__(self, text: str, env: Mapping[str, str], escape: str):
        self.s = text
        self.i = 0
        self.env = env
        self.esc = escape

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def next(self) -> str:
        ch = self.peek()
        if ch:
            self.i += 1
        return ch

    def process(self, stop: str = "") -> str:
        out = []
        while self.peek():
            ch = self.peek()
            if stop and ch == stop:
                self.next()
                return "".join(out)
            if ch == "'":
                out.append(self.single())
            elif ch == '"':
                out.append(self.double())
            elif ch == "$":
                out.append(self.dollar())
            else:
                ch = self.next()
                if ch == self.esc:
                    ch = self.next()
                    if not ch:
                        break
                out.append(ch)
        if stop:
            raise LexError(f"unexpected end of statement while looking for matching {stop}")
        return "".join(out)

    def single(self) -> str:
        self.next()
        out = []
        while True:
            ch = self.next()
            if not ch:
                raise LexError("unexpected end of statement while looking for matching single-quote")
            if ch == "'":
                return "".join(out)
            out.append(ch)

    def double(self) -> str:
        self.next()
        out = []
        while True:
            ch = self.peek()
            if not ch:
                raise LexError("unexpected end of statement while looking for matching double-quote")
            if ch == '"':
                self.next()
                return "".join(out)
            if ch == "$":
                out.append(self.dollar())
                continue
            ch = self.next()
            if ch == self.esc:
                nxt = self.peek()
                if not nxt:
                    continue
                if nxt in ('"', "$", self.esc):
                    ch = self.next()
            out.append(ch)

    def name(self) -> str:
        out = []
        while self.peek():
            ch = self.peek()
            if not out and ch.isdigit():
                while self.peek().isdigit():
                    out.append(self.next())
                return "".join(out)
            if not out and ch in _SPECIAL:
                return self.next()
            if not (ch.isalnum() or ch == "_"):
                break
            out.append(self.next())
        return "".join(out)

    def dollar(self) -> str:
        self.next()
        if self.peek() != "{":
            n = self.name()
            if not n:
                return "$"
            return self.env.get(n, "")
        self.next()
        if not self.peek():
            raise LexError("syntax error: missing '}'")
        if self.peek() in "{}:":
            raise LexError("syntax error: bad substitution")
        n = self.name()
        ch = self.next()
        is_set = n in self.env
        value = self.env.get(n, "")
        if ch == "}":
            return value
        if ch == ":":
            mod = self.next()
            word = self.process("}")
            if mod == "+":
                return word if value else ""
            if mod == "-":
                return value if value else word
            if mod == "?":
                if not value:
                    raise LexError(f"{n}: {word or 'is not allowed to be unset'}")
                return value
            raise LexError(f"unsupported modifier ({mod}) in substitution")
        if ch in "+-?":
            word = self.process("}")
            if ch == "+":
                return word if is_set else ""
            if ch == "-":
                return value if is_set else word
            if not is_set:
                raise LexError(f"{n}: {word or 'is not allowed to be unset'}")
            return value
        raise LexError(f"unsupported modifier ({ch}) in substitution" if ch else "syntax error: missing '}'")


def expand(word: str, env: Mapping[str, str], escape: str = "\\") -> str:
    """One Dockerfile word with variables substituted and quotes removed."""
    return _Word(word, env, escape).process()
