"""OCI image configs: making them, and applying Dockerfile-style ``--change`` lines
(CMD, ENTRYPOINT, ENV, WORKDIR, USER, EXPOSE, LABEL, VOLUME, STOPSIGNAL, ONBUILD)."""

from __future__ import annotations

import copy
import json
import os
import shlex

from ..errors import UsageError
from .store import now_iso

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def goarch() -> str:
    m = os.uname().machine  # (platform costs ~1.5 ms to import)
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(m, m)


def new_config(diff_ids: list[str], created_by: str, comment: str = "", size_layer: bool = True) -> dict:
    now = now_iso()
    return {
        "created": now,
        "architecture": goarch(),
        "os": "linux",
        "config": {"Env": [DEFAULT_PATH]},
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [_history(now, created_by, comment, empty=not size_layer)],
    }


def _history(created: str, created_by: str, comment: str, empty: bool) -> dict:
    h = {"created": created, "created_by": created_by}
    if comment:
        h["comment"] = comment
    if empty:
        h["empty_layer"] = True
    return h


def child_config(parent: dict, diff_id: str | None, created_by: str, comment: str = "") -> dict:
    """A config one step on from *parent*: a new layer (diff_id) or an empty-layer entry."""
    cfg = copy.deepcopy(parent)
    now = now_iso()
    cfg["created"] = now
    cfg.setdefault("rootfs", {"type": "layers", "diff_ids": []})
    if diff_id is not None:
        cfg["rootfs"]["diff_ids"].append(diff_id)
    cfg.setdefault("history", []).append(_history(now, created_by, comment, empty=diff_id is None))
    return cfg


def _json_or_shell(arg: str) -> list[str]:
    arg = arg.strip()
    if arg.startswith("["):
        try:
            v = json.loads(arg)
        except ValueError:
            v = None
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            return v
    return ["/bin/sh", "-c", arg]


def apply_change(cfg: dict, line: str) -> None:
    """Apply one Dockerfile instruction line to the image config's "config" object."""
    line = line.strip()
    if not line:
        return
    word, _, arg = line.partition(" ")
    word = word.upper()
    arg = arg.strip()
    c = cfg.setdefault("config", {})
    if word == "CMD":
        c["Cmd"] = _json_or_shell(arg)
    elif word == "ENTRYPOINT":
        c["Entrypoint"] = _json_or_shell(arg)
    elif word == "ENV":
        env = c.setdefault("Env", [])
        for k, v in _pairs(arg, "ENV"):
            env[:] = [e for e in env if e.split("=", 1)[0] != k] + [f"{k}={v}"]
    elif word == "LABEL":
        labels = c.setdefault("Labels", {})
        for k, v in _pairs(arg, "LABEL"):
            labels[k] = v
    elif word == "WORKDIR":
        c["WorkingDir"] = arg
    elif word == "USER":
        c["User"] = arg
    elif word == "EXPOSE":
        ports = c.setdefault("ExposedPorts", {})
        for p in arg.split():
            ports[p if "/" in p else p + "/tcp"] = {}
    elif word == "VOLUME":
        vols = c.setdefault("Volumes", {})
        for v in _json_or_words(arg):
            vols[v] = {}
    elif word == "STOPSIGNAL":
        c["StopSignal"] = arg
    elif word == "ONBUILD":
        c.setdefault("OnBuild", []).append(arg)
    else:
        raise UsageError(f"unsupported --change instruction: {word}")


def _json_or_words(arg: str) -> list[str]:
    if arg.startswith("["):
        try:
            v = json.loads(arg)
            if isinstance(v, list):
                return [str(x) for x in v]
        except ValueError:
            pass
    return arg.split()


def _pairs(arg: str, word: str) -> list[tuple[str, str]]:
    try:
        toks = shlex.split(arg)
    except ValueError as e:
        raise UsageError(f"bad {word} value: {e}") from None
    if toks and "=" not in toks[0]:
        # legacy form: ENV KEY value with spaces
        key, _, rest = arg.partition(" ")
        return [(key, rest.strip())]
    out = []
    for t in toks:
        if "=" not in t:
            raise UsageError(f"bad {word} value {t!r}: expected KEY=VALUE")
        k, v = t.split("=", 1)
        out.append((k, v))
    return out


def check_config(cfg: dict) -> None:
    """Refuse an image config (from an archive or a registry) whose fields have the
    wrong types: they would otherwise turn into strange commands at run time."""
    def bad(what: str):
        raise UsageError(f"image config: {what}")

    if not isinstance(cfg, dict):
        bad("not a JSON object")
    rootfs = cfg.get("rootfs", {})
    if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids", []), list) or \
            not all(isinstance(d, str) for d in rootfs.get("diff_ids", [])):
        bad("rootfs.diff_ids must be a list of strings")
    if not isinstance(cfg.get("history", []), list) or not all(isinstance(h, dict) for h in cfg.get("history", [])):
        bad("history must be a list of objects")
    c = cfg.get("config") or {}
    if not isinstance(c, dict):
        bad("config must be an object")
    for key in ("Env", "Cmd", "Entrypoint"):
        v = c.get(key)
        if v is not None and (not isinstance(v, list) or not all(isinstance(x, str) for x in v)):
            bad(f"config.{key} must be a list of strings")
    for key in ("WorkingDir", "User", "StopSignal"):
        v = c.get(key)
        if v is not None and not isinstance(v, str):
            bad(f"config.{key} must be a string")
    for key in ("Labels", "ExposedPorts", "Volumes"):
        v = c.get(key)
        if v is not None and not isinstance(v, dict):
            bad(f"config.{key} must be an object")
