"""Dockerfile parsing: the `dockerfile` package (the official Go parser from moby/buildkit)
does the syntax; this module validates on top of it and groups instructions into stages.

Every error is a :class:`DockerfileError` whose message is one line
``NAME:LINE: message``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import dockerfile as _df

from ..errors import UnionfuseError

KNOWN = {c.upper() for c in _df.all_cmds()}

FLAGS = {
    "FROM": {"platform"},
    "RUN": {"network"},
    "COPY": {"from", "chown", "chmod", "link"},
    "ADD": {"chown", "chmod", "link", "checksum", "keep-git-dir"},
    "HEALTHCHECK": {"interval", "timeout", "start-period", "start-interval", "retries"},
}
JSON_FORMS = {"RUN", "CMD", "ENTRYPOINT", "SHELL"}
_STAGE_NAME = re.compile(r"^[a-z][a-z0-9\-_.]*$")


class DockerfileError(UnionfuseError):
    exit_code = 1


@dataclass
class Instr:
    cmd: str                      # upper case
    line: int
    original: str
    args: list[str]
    flags: dict[str, str]
    json: bool = False
    heredocs: list = field(default_factory=list)
    sub: "Instr | None" = None    # ONBUILD's instruction

    @property
    def text(self) -> str:
        """The instruction as shown in ``Step N/M :`` (first line of a heredoc)."""
        return self.original.split("\n", 1)[0]


@dataclass
class Stage:
    index: int
    base: str                      # as written (substituted later)
    name: str | None
    line: int
    from_instr: Instr
    instrs: list[Instr] = field(default_factory=list)


@dataclass
class Parsed:
    name: str
    escape: str
    global_args: list[Instr]
    stages: list[Stage]


def escape_token(text: str) -> str:
    """The ``# escape=`` parser directive (only among the leading comment lines)."""
    for line in text.splitlines():
        s = line.strip()
        if not s.startswith("#"):
            break
        m = re.match(r"#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$", s)
        if not m:
            break
        if m.group(1).lower() == "escape":
            return m.group(2)
    return "\\"


def _error_line(text: str, message: str) -> int:
    """The Go parser's errors carry no line: find the first prefix that fails the same way."""
    lines = text.split("\n")
    for n in range(1, len(lines) + 1):
        try:
            _df.parse_string("\n".join(lines[:n]) + "\n")
        except _df.GoParseError as e:
            if str(e) == message:
                return n
        except Exception:
            continue
    return 1


def _flags(c, name: str) -> dict[str, str]:
    allowed = FLAGS.get(c.cmd.upper(), set())
    out = {}
    for f in c.flags:
        k, eq, v = f[2:].partition("=")
        if k not in allowed:
            raise DockerfileError(f"{name}:{c.start_line}: unknown flag --{k} for {c.cmd.upper()}")
        out[k] = v if eq else "true"
    return out


def _instr(c, name: str) -> Instr:
    cmd = c.cmd.upper()
    line = c.start_line
    if cmd not in KNOWN:
        raise DockerfileError(f"{name}:{line}: unknown instruction: {c.cmd.upper()}")
    if cmd == "ONBUILD":
        if not c.sub_cmd:
            raise DockerfileError(f"{name}:{line}: ONBUILD requires an instruction")
        sub_name = c.sub_cmd.upper()
        if sub_name in ("ONBUILD", "FROM", "MAINTAINER"):
            raise DockerfileError(f"{name}:{line}: {sub_name} isn't allowed as an ONBUILD trigger")
        if sub_name not in KNOWN:
            raise DockerfileError(f"{name}:{line}: unknown instruction: {sub_name}")
        trigger = c.original.split(None, 1)[1] if " " in c.original.strip() else ""
        sub = Instr(sub_name, line, trigger, list(c.value), {}, c.json, list(c.heredocs))
        return Instr(cmd, line, c.original, [trigger], {}, False, [], sub)
    flags = _flags(c, name)
    args = [v for v in c.value]
    ins = Instr(cmd, line, c.original, args, flags, bool(c.json), list(c.heredocs))
    _validate(ins, name)
    return ins


def _validate(i: Instr, name: str) -> None:
    where = f"{name}:{i.line}"
    a = i.args
    if i.cmd in JSON_FORMS and not i.json:
        raw = (a[0] if a else "").lstrip()
        # looks like the exec form (`["...`) but the Go parser didn't take it as JSON: docker
        # would silently run it as a shell command; say so instead
        if raw.startswith("[") and raw[1:].lstrip().startswith('"'):
            raise DockerfileError(f"{where}: {i.cmd}: invalid JSON array form: {raw}")
    if i.cmd == "SHELL" and not i.json:
        raise DockerfileError(f"{where}: SHELL requires the arguments to be in JSON form")
    if i.cmd == "SHELL" and not a:
        raise DockerfileError(f"{where}: SHELL requires at least one argument")
    if i.cmd == "RUN" and (not a or (not i.json and not a[0].strip())):
        raise DockerfileError(f"{where}: RUN requires at least one argument")
    if i.cmd in ("COPY", "ADD") and len(a) < 2 and not (i.heredocs and len(a) >= 2):
        raise DockerfileError(f"{where}: {i.cmd} requires at least two arguments, but only {len(a)} provided")
    if i.cmd in ("WORKDIR", "USER", "STOPSIGNAL", "MAINTAINER") and (len(a) != 1 or not a[0].strip()):
        raise DockerfileError(f"{where}: {i.cmd} requires exactly one argument")
    if i.cmd in ("ENV", "LABEL") and len(a) < 2:
        raise DockerfileError(f"{where}: {i.cmd} requires at least one KEY=VALUE argument")
    if i.cmd in ("EXPOSE", "VOLUME", "ARG") and not [x for x in a if x.strip()]:
        raise DockerfileError(f"{where}: {i.cmd} requires at least one argument")
    if i.cmd == "HEALTHCHECK":
        if not a or a[0].upper() not in ("CMD", "NONE"):
            raise DockerfileError(f"{where}: HEALTHCHECK requires CMD or NONE")
        if a[0].upper() == "NONE" and (len(a) > 1 or i.flags):
            raise DockerfileError(f"{where}: HEALTHCHECK NONE takes no other arguments")
        if a[0].upper() == "CMD" and len(a) < 2:
            raise DockerfileError(f"{where}: HEALTHCHECK CMD requires a command")
    if i.cmd == "RUN" and "network" in i.flags and i.flags["network"] not in ("none", "host", "default"):
        raise DockerfileError(f"{where}: RUN --network must be none, host or default")


def parse(text: str, name: str = "Dockerfile") -> Parsed:
    if not text.strip():
        raise DockerfileError(f"{name}:1: the Dockerfile has no instructions")
    try:
        cmds = _df.parse_string(text)
    except _df.GoParseError as e:
        msg = str(e)
        if msg == "file with no instructions":
            raise DockerfileError(f"{name}:1: the Dockerfile has no instructions") from None
        raise DockerfileError(f"{name}:{_error_line(text, msg)}: {msg}") from None
    escape = escape_token(text)
    global_args: list[Instr] = []
    stages: list[Stage] = []
    names: set[str] = set()
    for c in cmds:
        ins = _instr(c, name)
        if ins.cmd == "FROM":
            a = ins.args
            if len(a) == 1:
                sname = None
            elif len(a) == 3 and a[1].upper() == "AS":
                sname = a[2].lower()
                if not _STAGE_NAME.match(sname):
                    raise DockerfileError(f"{name}:{ins.line}: invalid name for build stage: {a[2]!r}, "
                                          "name can't start with a number or contain symbols")
                if sname in names:
                    raise DockerfileError(f"{name}:{ins.line}: duplicate name {a[2]!r} for build stage")
                names.add(sname)
            else:
                raise DockerfileError(f"{name}:{ins.line}: FROM requires either one or three arguments "
                                      "(FROM IMAGE [AS NAME])")
            stages.append(Stage(len(stages), a[0], sname, ins.line, ins))
        elif not stages:
            if ins.cmd != "ARG":
                raise DockerfileError(f"{name}:{ins.line}: no FROM instruction before {ins.cmd} "
                                      "(only ARG may come before the first FROM)")
            global_args.append(ins)
        else:
            stages[-1].instrs.append(ins)
    if not stages:
        line = cmds[-1].start_line if cmds else 1
        raise DockerfileError(f"{name}:{line}: no FROM instruction: the Dockerfile has no build stage")
    return Parsed(name, escape, global_args, stages)
