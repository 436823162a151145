"""Builder pieces without a build: variable substitution, .dockerignore patterns, the
parser's validation and line numbers."""

from __future__ import annotations

import pytest

from unionfuse.build.context import IgnoreMatcher
from unionfuse.build.lex import LexError, expand
from unionfuse.build.parse import DockerfileError, escape_token, parse

ENV = {"A": "a", "EMPTY": "", "SP": "x y"}


@pytest.mark.parametrize("word,want", [
    ("$A", "a"), ("${A}", "a"), ("pre${A}post", "preapost"), ("$A$A", "aa"), ("$UNSET", ""),
    ("${UNSET:-dflt}", "dflt"), ("${EMPTY:-dflt}", "dflt"), ("${EMPTY-dflt}", ""), ("${UNSET-dflt}", "dflt"),
    ("${A:+alt}", "alt"), ("${EMPTY:+alt}", ""), ("${EMPTY+alt}", "alt"), ("${UNSET:+alt}", ""),
    ("${UNSET:-${A}x}", "ax"), ("'$A'", "$A"), ('"$A"', "a"), ('"q \\" \\$A \\x"', 'q " $A \\x'),
    ("\\$A", "$A"), ("a\\ b", "a b"), ("$", "$"), ("$-", ""), ("${SP}", "x y"), ('"${SP}"', "x y"),
    ("100%", "100%"),
])
def test_expand(word, want):
    assert expand(word, ENV) == want


def test_expand_backtick_escape_and_errors():
    assert expand("`$A", ENV, "`") == "$A"
    assert expand("C:\\dir", ENV, "`") == "C:\\dir"
    for bad in ("${A", "${}", "'open", '"open', "${A:?}", "${UNSET?gone}", "${A:*x}"):
        if bad == "${A:?}":
            assert expand(bad, ENV) == "a"
            continue
        with pytest.raises(LexError):
            expand(bad, ENV)


@pytest.mark.parametrize("patterns,path,ignored", [
    (["*.log"], "x.log", True), (["*.log"], "d/x.log", False), (["**/*.log"], "d/e/x.log", True),
    (["**/*.log"], "x.log", True), (["d"], "d/e/f", True), (["d/"], "d/e", True), (["/d"], "d", True),
    (["*.log", "!keep.log"], "keep.log", False), (["d", "!d/keep"], "d/keep", False), (["d", "!d/keep"], "d/other", True),
    (["!x", "x"], "x", True), (["a?c"], "abc", True), (["a?c"], "a/c", False), (["[ab].txt"], "b.txt", True),
    (["[!a].txt"], "b.txt", True), (["d/**"], "d/x/y", True), (["d/**"], "d", False), (["# c", ""], "# c", False),
    (["./x"], "x", True), (["x.(y)"], "x.(y)", True), (["x.y"], "xzy", False),
])
def test_dockerignore(patterns, path, ignored):
    assert IgnoreMatcher(patterns).ignored(path) is ignored


def test_parse_stages_and_directives():
    p = parse("# escape=`\nARG X=1\nFROM a AS One\nRUN echo `\n  hi\nFROM One\nCOPY --from=one a b\n")
    assert p.escape == "`" and [i.cmd for i in p.global_args] == ["ARG"]
    assert [(s.name, s.base, s.line) for s in p.stages] == [("one", "a", 3), (None, "One", 6)]
    assert p.stages[0].instrs[0].args == ["echo   hi"] and p.stages[0].instrs[0].line == 4
    assert p.stages[1].instrs[0].flags == {"from": "one"}
    assert escape_token("FROM a\n# escape=`\n") == "\\"


@pytest.mark.parametrize("text,where", [
    ("FROM a\nRUN x\nLABEL onlykey\n", "Dockerfile:3:"),
    ("FROM a\nFROM b c\n", "Dockerfile:2:"),
    ("FROM a AS 1bad\n", "Dockerfile:1:"),
    ("FROM a\nONBUILD FROM b\n", "Dockerfile:2:"),
    ("FROM a\nRUN --mount=type=cache x\n", "Dockerfile:2:"),
    ("FROM a\nHEALTHCHECK NONE x\n", "Dockerfile:2:"),
    ("FROM a\nCOPY onlyone\n", "Dockerfile:2:"),
    ("FROM a\nWORKDIR\n", "Dockerfile:2:"),
])
def test_parse_errors(text, where):
    with pytest.raises(DockerfileError) as e:
        parse(text)
    assert str(e.value).startswith(where) and "\n" not in str(e.value)
