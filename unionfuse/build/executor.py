"""Running a parsed Dockerfile against the store.

Each stage starts from its FROM image; every instruction makes a new (untagged) image in
the store, like docker's intermediate images:

- RUN: a container of the image so far (the runner: union mount + OCI runtime, network
  none unless asked), attached to our output; its upper dir becomes the step's layer;
- COPY/ADD/WORKDIR (when it creates the dir): the image so far is mounted with a fresh
  upper dir, files are written through the mount with symlink-safe, image-scoped path
  resolution (:mod:`.fsops`), and the upper dir becomes the layer;
- everything else only changes the config and adds an empty-layer history entry.

A step is looked up in the build cache first (:mod:`.cache`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import posixpath
import re
import shutil
import signal
import stat
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

import dockerfile as _df

from .. import mount as mountmod
from ..errors import UnionfuseError
from ..runtime import spec as specmod
from ..runtime.container import Containers, RunOptions
from ..store import imageconfig
from ..store.store import Image, NotFound, Store, StoreError, normalize_ref
from . import fsops
from .cache import BuildCache
from .context import Context, ContextError, hash_entries
from .lex import LexError, expand
from .parse import DockerfileError, Instr, Parsed, Stage, parse
from .progress import Progress

DEFAULT_SHELL = ["/bin/sh", "-c"]
NOP = "/bin/sh -c #(nop) "


class BuildError(UnionfuseError):
    exit_code = 1

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class BuildOptions:
    context: str
    dockerfile: str | None = None      # path, "-" for stdin; default CONTEXT/Dockerfile
    tags: list[str] = field(default_factory=list)
    build_args: dict[str, str] = field(default_factory=dict)
    no_cache: bool = False
    target: str | None = None
    network: str = "none"
    driver: str = "fuse"
    runtime: str | None = None


@dataclass
class StageState:
    stage: Stage
    image: Image
    args: dict[str, str | None] = field(default_factory=dict)
    shell: list[str] = field(default_factory=lambda: list(DEFAULT_SHELL))
    cmd_set: bool = False
    clear_onbuild: bool = False

    def env(self) -> dict[str, str]:
        d = {k: v for k, v in self.args.items() if v is not None}
        for e in self.image.run_config.get("Env") or []:
            k, _, v = e.partition("=")
            d[k] = v
        return d


def scratch_config() -> dict:
    # deterministic (no timestamp): the same id every build, so the cache works
    return {
        "architecture": imageconfig.goarch(),
        "os": "linux",
        "config": {"Env": [imageconfig.DEFAULT_PATH]},
        "rootfs": {"type": "layers", "diff_ids": []},
        "history": [],
    }


_DUR = re.compile(r"(\d+(?:\.\d*)?)(ns|us|µs|ms|s|m|h)")
_DUR_NS = {"ns": 1, "us": 1000, "µs": 1000, "ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}


def parse_duration(s: str) -> int:
    if s == "0":
        return 0
    pos, total = 0, 0.0
    for m in _DUR.finditer(s):
        if m.start() != pos:
            raise ValueError(s)
        total += float(m.group(1)) * _DUR_NS[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s:
        raise ValueError(s)
    return int(total)


class Builder:
    def __init__(self, store: Store, opts: BuildOptions, progress: Progress):
        self.store = store
        self.opts = opts
        self.progress = progress
        self.cache = BuildCache(store)
        self.containers = Containers(store)
        self.consumed: set[str] = set()
        self.results: dict = {}
        self.ctx: Context | None = None

    # -- entry point ---------------------------------------------------------------------

    def build(self) -> Image:
        for t in self.opts.tags:
            try:
                normalize_ref(t)
            except StoreError as e:
                raise BuildError(f"invalid tag {t!r}: {e}", 2) from None
        text, self.name = self._read_dockerfile()
        parsed = parse(text, self.name)
        self.escape = parsed.escape
        try:
            self.ctx = Context(self.opts.context)
        except ContextError as e:
            raise BuildError(str(e)) from None
        try:
            image = self._build(parsed)
        except BaseException:
            self.progress.failed()
            raise
        finally:
            self.ctx.close()
        unused = sorted(set(self.opts.build_args) - self.consumed)
        if unused:
            self.progress.warn(f"One or more build-args [{' '.join(unused)}] were not consumed")
        refs = [self.store.tag(image, t) for t in self.opts.tags]
        self.progress.finished(image.id, refs)
        return image

    def _read_dockerfile(self) -> tuple[str, str]:
        path = self.opts.dockerfile
        if path == "-":
            import sys

            return sys.stdin.read(), "Dockerfile"
        if path is None:
            path = os.path.join(self.opts.context, "Dockerfile")
            ctx = os.path.realpath(self.opts.context)
            if not os.path.realpath(path).startswith(ctx + os.sep):
                raise BuildError(f"the Dockerfile in {self.opts.context} leads out of the build context")
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read(), os.path.basename(path)
        except OSError as e:
            raise BuildError(f"can't read the Dockerfile {path}: {e.strerror}") from None

    def _where(self, ins: Instr) -> str:
        return f"{self.name}:{ins.line}"

    def _x(self, ins: Instr, word: str, env: dict) -> str:
        try:
            return expand(word, env, self.escape)
        except LexError as e:
            raise BuildError(f"{self._where(ins)}: {ins.cmd}: {e}") from None

    # -- planning ------------------------------------------------------------------------

    def _build(self, parsed: Parsed) -> Image:
        self.global_args: dict[str, str | None] = {}
        for ins in parsed.global_args:
            self._declare_args(ins, self.global_args, self.global_env())
        stages = parsed.stages
        by_name = {s.name: s for s in stages if s.name}
        if self.opts.target:
            t = by_name.get(self.opts.target.lower())
            if t is None:
                raise BuildError(f"target stage {self.opts.target!r} could not be found")
        else:
            t = stages[-1]
        needed: set[int] = set()

        def need(s: Stage) -> None:
            if s.index in needed:
                return
            needed.add(s.index)
            for ref in self._stage_refs(s):
                dep = by_name.get(ref.lower())
                if dep is None and ref.isdigit() and int(ref) < len(stages):
                    dep = stages[int(ref)]
                if dep is not None and dep.index < s.index:
                    need(dep)

        self._check_stage_refs(stages)
        need(t)
        order = [s for s in stages if s.index in needed]
        self.total = sum(1 + len(s.instrs) for s in order)
        self.n = 0
        self.stage_names = {s.name: s.index for s in stages if s.name}
        image = None
        for s in order:
            image = self._run_stage(s, stages)
            self.results[s.index] = image
            if s is t:
                break
        return image

    def _check_stage_refs(self, stages: list[Stage]) -> None:
        """A FROM or COPY --from naming this stage or a later one is an error up front
        (docker: stages can only use the ones before them)."""
        index = {s.name: s.index for s in stages if s.name}
        env = self.global_env()
        for s in stages:
            refs = [(s.from_instr, s.base)] + [(i, i.flags["from"]) for i in s.instrs
                                              if i.cmd == "COPY" and "from" in i.flags]
            for ins, raw in refs:
                if "$" in raw:
                    try:
                        raw = expand(raw, env, self.escape)
                    except LexError:
                        continue
                idx = index.get(raw.lower())
                if idx is None and ins.cmd == "COPY" and raw.isdigit():
                    idx = int(raw)
                if idx is not None and idx >= s.index:
                    what = "FROM" if ins is s.from_instr else "COPY --from"
                    raise BuildError(f"{self._where(ins)}: {what} {raw}: stage {raw!r} is defined after this one "
                                     "(a stage can only use stages before it)")

    def global_env(self) -> dict[str, str]:
        return {k: v for k, v in self.global_args.items() if v is not None}

    def _stage_refs(self, s: Stage) -> list[str]:
        env = self.global_env()
        out = []
        try:
            out.append(expand(s.base, env, self.escape))
        except LexError:
            pass
        for ins in s.instrs:
            if ins.cmd == "COPY" and "from" in ins.flags:
                try:
                    out.append(expand(ins.flags["from"], env, self.escape))
                except LexError:
                    pass
        return out

    def _declare_args(self, ins: Instr, scope: dict, env: dict, inherit: dict | None = None) -> list[str]:
        shown = []
        for tok in ins.args:
            if not tok:
                continue
            k, eq, v = tok.partition("=")
            k = self._x(ins, k, env)
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
                raise BuildError(f"{self._where(ins)}: ARG: invalid name {k!r}")
            if k in self.opts.build_args:
                val = self.opts.build_args[k]
                self.consumed.add(k)
            elif eq:
                val = self._x(ins, v, env)
            elif inherit is not None and k in inherit:
                val = inherit[k]
            else:
                val = None
            scope[k] = val
            env = dict(env)
            if val is not None:
                env[k] = val
            shown.append(f"{k}={val}" if eq or val is not None else k)
        return shown

    # -- stages --------------------------------------------------------------------------

    def _pin(self, ins: Instr, image: Image) -> None:
        """Keep an image this build works from (and its layers) from a concurrent
        rmi/prune until the build ends."""
        try:
            self.store.pin(image)
        except NotFound as e:
            raise BuildError(f"{self._where(ins)}: {ins.cmd}: {e.message}") from None

    def _step(self, ins: Instr) -> None:
        self.n += 1
        self.progress.step(self.n, self.total, ins.text)

    def _run_stage(self, s: Stage, stages: list[Stage]) -> Image:
        fi = s.from_instr
        self._step(fi)
        base = self._x(fi, s.base, self.global_env())
        if not base:
            raise BuildError(f"{self._where(fi)}: FROM: the base image name is empty")
        idx = self.stage_names.get(base.lower())
        if idx is not None and idx < s.index:
            if idx not in self.results:
                raise BuildError(f"{self._where(fi)}: FROM {base}: stage was not built")
            image = self.results[idx]
        elif idx is not None:
            raise BuildError(f"{self._where(fi)}: FROM {base}: a stage can't build on itself or a later stage")
        elif base == "scratch":
            image = self.store.put_image(scratch_config())
        else:
            try:
                image = self.store.resolve(base)
            except (NotFound, StoreError):
                raise BuildError(f"{self._where(fi)}: FROM {base}: no such image or build stage") from None
        self._pin(fi, image)
        st = StageState(s, image)
        self.progress.step_done(image.short_id, cached=False)
        triggers = list(image.run_config.get("OnBuild") or [])
        if triggers:
            st.clear_onbuild = True
            self.progress.info(f"# Executing {len(triggers)} build trigger{'s' if len(triggers) > 1 else ''}")
            try:
                cmds = _df.parse_string("\n".join(triggers) + "\n")
            except _df.GoParseError as e:
                raise BuildError(f"{self._where(fi)}: ONBUILD trigger of {base}: {e}") from None
            for c in cmds:
                tins = Instr(c.cmd.upper(), fi.line, c.original, list(c.value),
                             {f[2:].partition("=")[0]: f[2:].partition("=")[2] for f in c.flags},
                             bool(c.json), list(c.heredocs))
                self.progress.note(f"Trigger: {tins.text}")
                self._exec(st, tins, trigger=True)
        for ins in s.instrs:
            self._step(ins)
            self._exec(st, ins)
        return st.image

    # -- one instruction -----------------------------------------------------------------

    def _exec(self, st: StageState, ins: Instr, trigger: bool = False) -> None:
        fn = getattr(self, "_i_" + ins.cmd.lower(), None)
        if fn is None:
            raise BuildError(f"{self._where(ins)}: unknown instruction: {ins.cmd}")
        try:
            fn(st, ins)
        except (BuildError, DockerfileError, KeyboardInterrupt):
            raise
        except (ContextError, fsops.FsOpError, fsops.Escape) as e:
            raise BuildError(f"{self._where(ins)}: {ins.cmd} failed: {e}") from None
        except UnionfuseError as e:
            raise BuildError(f"{self._where(ins)}: {ins.cmd}: {e.message}", e.exit_code) from None
        except OSError as e:
            what = f" {e.filename}" if e.filename and isinstance(e.filename, str) and "/" not in e.filename[:1] else ""
            raise BuildError(f"{self._where(ins)}: {ins.cmd} failed:{what} {e.strerror or e}") from None

    def _cached(self, st: StageState, key: str, produce) -> None:
        parent = st.image
        if not self.opts.no_cache:
            hit = self.cache.get(parent.id, key)
            if hit is not None:
                try:
                    self.store.pin(hit)  # (a concurrent prune may have taken it: a miss)
                except NotFound:
                    hit = None
            if hit is not None:
                st.image = hit
                self.progress.step_done(hit.short_id, cached=True)
                return
        image = produce()
        self.store.pin(image)
        self.cache.put(parent.id, key, image.id)
        st.image = image
        self.progress.step_done(image.short_id, cached=False)

    def _child(self, st: StageState, cfg: dict, diff_id: str | None, created_by: str) -> Image:
        new = imageconfig.child_config(cfg, diff_id, created_by)
        if st.clear_onbuild:
            new.setdefault("config", {}).pop("OnBuild", None)
        return self.store.put_image(new)

    def _config_step(self, st: StageState, ins: Instr, shown: str, change) -> None:
        created_by = NOP + shown
        cfg = copy.deepcopy(st.image.config)
        change(cfg.setdefault("config", {}))
        key = "CONFIG " + created_by + "\n" + json.dumps(cfg.get("config"), sort_keys=True) + json.dumps(cfg.get("author"))
        if st.clear_onbuild:
            key += "\nclear-onbuild"
        self._cached(st, key, lambda: self._child(st, cfg, None, created_by))

    # config-only instructions

    def _i_arg(self, st: StageState, ins: Instr) -> None:
        shown = self._declare_args(ins, st.args, st.env(), inherit=self.global_args)
        self._config_step(st, ins, "ARG " + " ".join(shown), lambda c: None)

    def _pairs(self, st: StageState, ins: Instr) -> list[tuple[str, str]]:
        env = st.env()
        a = ins.args
        out = []
        for i in range(0, len(a) - 1, 2):
            k = self._x(ins, a[i], env)
            if not k:
                raise BuildError(f"{self._where(ins)}: {ins.cmd} names can not be blank")
            out.append((k, self._x(ins, a[i + 1], env)))
        return out

    def _i_env(self, st: StageState, ins: Instr) -> None:
        pairs = self._pairs(st, ins)

        def change(c):
            env = c.setdefault("Env", [])
            for k, v in pairs:
                env[:] = [e for e in env if e.partition("=")[0] != k] + [f"{k}={v}"]

        self._config_step(st, ins, "ENV " + " ".join(f"{k}={v}" for k, v in pairs), change)

    def _i_label(self, st: StageState, ins: Instr) -> None:
        pairs = self._pairs(st, ins)

        def change(c):
            labels = c.get("Labels") or {}
            for k, v in pairs:
                labels[k] = v
            c["Labels"] = labels

        self._config_step(st, ins, "LABEL " + " ".join(f"{k}={v}" for k, v in pairs), change)

    def _i_maintainer(self, st: StageState, ins: Instr) -> None:
        who = self._x(ins, ins.args[0], st.env())
        created_by = NOP + "MAINTAINER " + who
        cfg = copy.deepcopy(st.image.config)
        cfg["author"] = who
        self._cached(st, "CONFIG " + created_by, lambda: self._child(st, cfg, None, created_by))

    def _i_user(self, st: StageState, ins: Instr) -> None:
        user = self._x(ins, ins.args[0], st.env())
        if not user:
            raise BuildError(f"{self._where(ins)}: USER requires a user name or id")
        self._config_step(st, ins, "USER " + user, lambda c: c.__setitem__("User", user))

    def _i_expose(self, st: StageState, ins: Instr) -> None:
        env = st.env()
        ports = []
        for w in ins.args:
            w = self._x(ins, w, env)
            if not w:
                continue
            port, _, proto = w.partition("/")
            proto = (proto or "tcp").lower()
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", port)
            if not m or proto not in ("tcp", "udp", "sctp"):
                raise BuildError(f"{self._where(ins)}: EXPOSE: invalid port {w!r}")
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if not (0 < lo <= hi <= 65535):
                raise BuildError(f"{self._where(ins)}: EXPOSE: invalid port range {w!r}")
            ports += [f"{p}/{proto}" for p in range(lo, hi + 1)]

        def change(c):
            e = c.get("ExposedPorts") or {}
            for p in ports:
                e[p] = {}
            c["ExposedPorts"] = e

        self._config_step(st, ins, "EXPOSE " + " ".join(ports), change)

    def _i_volume(self, st: StageState, ins: Instr) -> None:
        env = st.env()
        vols = [self._x(ins, w, env) for w in ins.args]
        vols = [v for v in vols if v]
        if not vols:
            raise BuildError(f"{self._where(ins)}: VOLUME specified can not be an empty string")

        def change(c):
            v = c.get("Volumes") or {}
            for x in vols:
                v[x] = {}
            c["Volumes"] = v

        self._config_step(st, ins, "VOLUME " + json.dumps(vols), change)

    def _i_stopsignal(self, st: StageState, ins: Instr) -> None:
        sig = self._x(ins, ins.args[0], st.env())
        name = sig.upper()
        ok = name.isdigit() and 0 < int(name) < 65
        if not ok:
            try:
                signal.Signals[name if name.startswith("SIG") else "SIG" + name]
                ok = True
            except KeyError:
                ok = bool(re.fullmatch(r"SIGRTM(IN|AX)([+-]\d+)?", name))
        if not ok:
            raise BuildError(f"{self._where(ins)}: STOPSIGNAL: invalid signal: {sig}")
        self._config_step(st, ins, "STOPSIGNAL " + sig, lambda c: c.__setitem__("StopSignal", sig))

    def _i_shell(self, st: StageState, ins: Instr) -> None:
        st.shell = list(ins.args)
        self._config_step(st, ins, "SHELL " + json.dumps(st.shell), lambda c: c.__setitem__("Shell", list(ins.args)))

    def _argv(self, st: StageState, ins: Instr) -> list[str]:
        if ins.json:
            return list(ins.args)
        return list(st.shell) + [ins.args[0] if ins.args else ""]

    def _i_cmd(self, st: StageState, ins: Instr) -> None:
        argv = self._argv(st, ins)
        st.cmd_set = True
        self._config_step(st, ins, "CMD " + json.dumps(argv), lambda c: c.__setitem__("Cmd", argv))

    def _i_entrypoint(self, st: StageState, ins: Instr) -> None:
        argv = self._argv(st, ins)
        reset = not st.cmd_set

        def change(c):
            c["Entrypoint"] = argv
            if reset:
                c.pop("Cmd", None)

        self._config_step(st, ins, "ENTRYPOINT " + json.dumps(argv), change)

    def _i_healthcheck(self, st: StageState, ins: Instr) -> None:
        a = ins.args
        if a[0].upper() == "NONE":
            hc = {"Test": ["NONE"]}
        else:
            test = ["CMD"] + list(a[1:]) if ins.json else ["CMD-SHELL", " ".join(a[1:])]
            hc = {"Test": test}
            for flag, keyname in (("interval", "Interval"), ("timeout", "Timeout"),
                                  ("start-period", "StartPeriod"), ("start-interval", "StartInterval")):
                if flag in ins.flags:
                    try:
                        d = parse_duration(ins.flags[flag])
                    except ValueError:
                        raise BuildError(f"{self._where(ins)}: HEALTHCHECK --{flag}: invalid duration "
                                         f"{ins.flags[flag]!r}") from None
                    if 0 < d < 10**6:
                        raise BuildError(f"{self._where(ins)}: HEALTHCHECK --{flag} can't be less than 1ms")
                    hc[keyname] = d
            if "retries" in ins.flags:
                r = ins.flags["retries"]
                if not r.isdigit() or int(r) < 1:
                    raise BuildError(f"{self._where(ins)}: HEALTHCHECK --retries must be at least 1")
                hc["Retries"] = int(r)
        self._config_step(st, ins, "HEALTHCHECK " + json.dumps(hc, sort_keys=True),
                          lambda c: c.__setitem__("Healthcheck", hc))

    def _i_onbuild(self, st: StageState, ins: Instr) -> None:
        trigger = ins.sub.original if ins.sub else ins.args[0]

        def change(c):
            c["OnBuild"] = list(c.get("OnBuild") or []) + [trigger]

        self._config_step(st, ins, "ONBUILD " + trigger, change)

    def _i_from(self, st: StageState, ins: Instr) -> None:  # only reachable from a trigger
        raise BuildError(f"{self._where(ins)}: FROM isn't allowed as an ONBUILD trigger")

    # WORKDIR: config + the dir, made if missing (a layer only when something was made)

    def _i_workdir(self, st: StageState, ins: Instr) -> None:
        wd = self._x(ins, ins.args[0], st.env())
        if not wd.startswith("/"):
            wd = posixpath.join(st.image.run_config.get("WorkingDir") or "/", wd)
        wd = posixpath.normpath(wd)
        if wd.startswith("//"):
            wd = "/" + wd.lstrip("/")
        created_by = NOP + "WORKDIR " + wd

        def produce():
            cfg = copy.deepcopy(st.image.config)
            cfg.setdefault("config", {})["WorkingDir"] = wd
            with self._mounted(st.image) as (mnt, upper, lowers):
                with fsops.ScopedRoot(mnt, clamp=True) as root:
                    parts = root.resolve(wd)
                    fd = root.makedirs(parts, 0, 0)
                    os.close(fd)
                made = bool(os.listdir(upper))
                diff_id = self.store.add_layer_from_dir(upper, lowers) if made else None
            return self._child(st, cfg, diff_id, created_by)

        self._cached(st, "WORKDIR " + created_by, produce)

    # -- mounting the image so far --------------------------------------------------------

    def _empty_layer(self) -> str:
        p = os.path.join(self.store.root, "empty")
        os.makedirs(p, mode=0o755, exist_ok=True)
        return p

    @contextlib.contextmanager
    def _mounted(self, image: Image, writable: bool = True):
        lowers = self.store.layer_dirs(image) or [self._empty_layer()]
        stage = self.store.staging()
        mnt = os.path.join(stage, "rootfs")
        upper = os.path.join(stage, "upper") if writable else None
        work = os.path.join(stage, "work") if writable else None
        for d in (mnt, upper, work):
            if d:
                os.mkdir(d, 0o755)
        pid = None
        try:
            pid = mountmod.mount_layers(self.opts.driver, lowers, upper, work, mnt,
                                        log_file=os.path.join(stage, "daemon.log"))
            yield mnt, upper, lowers
        finally:
            mountmod.unmount_layers(mnt, pid, timeout=20)
            if mountmod.mount_entry(mnt) is None:
                shutil.rmtree(stage, ignore_errors=True)

    # -- RUN -----------------------------------------------------------------------------

    def _i_run(self, st: StageState, ins: Instr) -> None:
        if ins.json:
            argv = list(ins.args)
        else:
            cmd = ins.args[0]
            if ins.heredocs:
                if re.fullmatch(r"\s*<<-?\s*[\"']?[A-Za-z0-9_]+[\"']?\s*", cmd) and len(ins.heredocs) == 1:
                    cmd = ins.heredocs[0].content
                else:
                    cmd = cmd + "\n" + "".join(h.content + h.name + "\n" for h in ins.heredocs)
            argv = list(st.shell) + [cmd]
        if not argv or not argv[0]:
            raise BuildError(f"{self._where(ins)}: RUN: no command")
        image_env = {e.partition("=")[0] for e in st.image.run_config.get("Env") or []}
        args = sorted((k, v) for k, v in st.args.items() if v is not None)
        run_env = [f"{k}={v}" for k, v in args if k not in image_env]
        created_by = " ".join(argv)
        if args:
            created_by = f"|{len(args)} " + " ".join(f"{k}={v}" for k, v in args) + " " + created_by
        network = ins.flags.get("network", "default")
        if network == "default":
            network = self.opts.network
        elif network == "host" and self.opts.network != "host":
            # the Dockerfile can't grant itself the host's network (buildkit wants the
            # network.host entitlement); the person running the build can
            raise BuildError(f"{self._where(ins)}: RUN --network=host needs `unionfuse build --network host`")

        # with the host's network, name resolution needs the host's resolver config (docker
        # and buildkit bind it into every RUN); read-only, so nothing of it lands in the layer
        volumes = []
        if network == "host" and os.path.isfile("/etc/resolv.conf"):
            volumes.append("/etc/resolv.conf:/etc/resolv.conf:ro")

        def produce():
            c = self.containers.create(st.image, st.image.id, None, RunOptions(
                args=argv, entrypoint=[], env=run_env, network=network, volumes=volumes,
                driver=self.opts.driver, runtime=self.opts.runtime))
            try:
                self.progress.note(f"Running in {c.short_id}")
                with self.progress.capture():
                    code = self.containers.start(c, attach=True)
                if code != 0:
                    raise BuildError(f"{self._where(ins)}: RUN returned exit code {code}", code or 1)
                with self.containers.using(c):  # (a concurrent prune waits for the layer)
                    diff_id = self.store.add_layer_from_dir(c.path("upper"), c.lower_dirs())
            finally:
                try:
                    self.containers.remove(c, force=True)
                except UnionfuseError:
                    pass
            self.progress.info(f"Removing intermediate container {c.short_id}")
            return self._child(st, st.image.config, diff_id, created_by)

        self._cached(st, "RUN " + json.dumps(argv) + "\n" + created_by, produce)

    # -- COPY / ADD ----------------------------------------------------------------------

    def _i_copy(self, st: StageState, ins: Instr) -> None:
        self._copy(st, ins, add=False)

    def _i_add(self, st: StageState, ins: Instr) -> None:
        self._copy(st, ins, add=True)

    def _owner(self, ins: Instr, env: dict, rootfs: str | None) -> fsops.Owner:
        own = fsops.Owner(0, 0, None)
        if "chmod" in ins.flags:
            m = self._x(ins, ins.flags["chmod"], env)
            if not re.fullmatch(r"[0-7]{1,4}", m):
                raise BuildError(f"{self._where(ins)}: {ins.cmd} --chmod: invalid mode {m!r} (octal, e.g. 755)")
            own.mode = int(m, 8)
        if "chown" in ins.flags and rootfs is not None:
            spec = self._x(ins, ins.flags["chown"], env)
            own.uid, own.gid = self._chown_ids(ins, spec, rootfs)
        return own

    def _chown_ids(self, ins: Instr, spec: str, rootfs: str) -> tuple[int, int]:
        user, _, group = spec.partition(":")
        if not user:
            raise BuildError(f"{self._where(ins)}: {ins.cmd} --chown: no user in {spec!r}")

        def num(s):
            return int(s) if s.isdigit() else None

        uid = num(user)
        if uid is None:
            users = specmod._parse_passwd(specmod.read_in_root(rootfs, "/etc/passwd"))
            m = next((p for p in users if p.name == user), None)
            if m is None:
                raise BuildError(f"{self._where(ins)}: {ins.cmd} --chown: unable to find user {user}: "
                                 "no matching entries in passwd file")
            uid = m.uid
        if not group:
            return uid, uid
        gid = num(group)
        if gid is None:
            groups = specmod._parse_group(specmod.read_in_root(rootfs, "/etc/group"))
            g = next((x for x in groups if x.name == group), None)
            if g is None:
                raise BuildError(f"{self._where(ins)}: {ins.cmd} --chown: unable to find group {group}: "
                                 "no matching entries in group file")
            gid = g.gid
        return uid, gid

    def _copy(self, st: StageState, ins: Instr, add: bool) -> None:
        env = st.env()
        where = self._where(ins)
        heredocs = {h.name: h for h in ins.heredocs}
        raw_srcs, raw_dest = ins.args[:-1], ins.args[-1]
        dest = self._x(ins, raw_dest, env)
        if not dest:
            raise BuildError(f"{where}: {ins.cmd}: the destination is empty")
        dir_hint = dest.endswith("/") or posixpath.basename(dest) in (".", "..")
        if not dest.startswith("/"):
            dest = posixpath.join(st.image.run_config.get("WorkingDir") or "/", dest)
        from_ref = self._x(ins, ins.flags["from"], env) if "from" in ins.flags else None
        if from_ref is not None and add:
            raise BuildError(f"{where}: ADD doesn't support --from")
        src_image = self._from_image(ins, from_ref) if from_ref is not None else None

        # what to copy: (kind, display name, payload)
        items: list[tuple[str, str, object]] = []
        h = hashlib.sha256()
        tmpfiles: list[str] = []
        try:
            for raw in raw_srcs:
                m = re.fullmatch(r"<<-?[\"']?([A-Za-z0-9_]+)[\"']?", raw)
                if m and m.group(1) in heredocs:
                    content = heredocs[m.group(1)].content.encode()
                    items.append(("heredoc", m.group(1), content))
                    h.update(b"heredoc\0" + m.group(1).encode() + b"\0" + content)
                    continue
                src = self._x(ins, raw, env)
                if add and re.match(r"^https?://", src):
                    path, fname, mtime, digest = self._download(ins, src, st)
                    tmpfiles.append(path)
                    items.append(("url", fname, (path, mtime)))
                    h.update(b"url\0" + src.encode() + b"\0" + digest.encode())
                    continue
                if src_image is not None:
                    items.append(("image", src, None))
                    h.update(b"image\0" + src.encode() + b"\0")
                    continue
                for name, parts, sst in self.ctx.sources(src):
                    entries = self.ctx.walk(parts, sst)
                    kind = "ctx"
                    if add and stat.S_ISREG(sst.st_mode) and fsops.is_archive(self.ctx.tree, parts):
                        kind = "archive"
                    items.append((kind, name, entries))
                    h.update(f"{kind}\0{name}\0".encode())
                    hash_entries(self.ctx.tree, entries, h)
            if src_image is not None:
                h.update(b"from\0" + src_image.id.encode())
            if len(items) > 1 and not dir_hint and src_image is None:
                raise BuildError(f"{where}: When using {ins.cmd} with more than one source file, "
                                 "the destination must be a directory and end with a /")
            digest = h.hexdigest()
            what = "multi" if len(items) > 1 else ("dir" if items and items[0][0] == "ctx"
                                                  and stat.S_ISDIR(items[0][2][0].st.st_mode) else "file")
            created_by = f"{NOP}{ins.cmd} {what}:{digest} in {dest} "
            flags = " ".join(f"--{k}={self._x(ins, v, env)}" for k, v in sorted(ins.flags.items()))
            key = f"{ins.cmd} {flags} {json.dumps(raw_srcs)} {dest}\n{digest}"

            def produce():
                cfg = st.image.config
                with self._mounted(st.image) as (mnt, upper, lowers):
                    own = self._owner(ins, env, mnt)
                    with fsops.ScopedRoot(mnt, clamp=True) as root:
                        if src_image is not None:
                            self._copy_from_image(ins, src_image, [i[1] for i in items], root, dest, dir_hint, own)
                        else:
                            self._write_items(ins, items, root, dest, dir_hint, own, add)
                    diff_id = self.store.add_layer_from_dir(upper, lowers)
                return self._child(st, cfg, diff_id, created_by)

            self._cached(st, key, produce)
        finally:
            for p in tmpfiles:
                try:
                    os.unlink(p)
                except OSError:
                    pass

    def _from_image(self, ins: Instr, ref: str) -> Image:
        idx = self.stage_names.get(ref.lower())
        if idx is None and ref.isdigit():
            idx = int(ref)
        if idx is not None:
            if idx not in self.results:
                raise BuildError(f"{self._where(ins)}: COPY --from={ref}: stage is not defined before this one")
            return self.results[idx]
        try:
            image = self.store.resolve(ref)
        except (NotFound, StoreError):
            raise BuildError(f"{self._where(ins)}: COPY --from={ref}: no such build stage or image") from None
        self._pin(ins, image)
        return image

    def _target(self, root: fsops.ScopedRoot, dest: str, dir_hint: bool, base: str) -> list[str]:
        """Where one file source goes: DEST/BASENAME if DEST ends in / or is a dir in the
        image, else DEST itself (symlinks resolved in the image)."""
        parts = root.resolve(dest)
        dst = root.lstat(parts)
        if dir_hint or (dst is not None and stat.S_ISDIR(dst.st_mode)):
            return root.resolve("/" + "/".join(parts + [base]))
        return parts

    def _write_items(self, ins, items, root: fsops.ScopedRoot, dest: str, dir_hint: bool,
                     own: fsops.Owner, add: bool) -> None:
        for kind, name, payload in items:
            base = posixpath.basename(posixpath.normpath(name))
            if kind == "heredoc":
                fsops.write_file(root, self._target(root, dest, dir_hint, base), io.BytesIO(payload), own, 0o644)
            elif kind == "url":
                path, mtime = payload
                with open(path, "rb") as f:
                    fsops.write_file(root, self._target(root, dest, dir_hint, base), f, own, 0o600, mtime)
            elif kind == "archive":
                parts = root.resolve(dest)
                entries = payload
                tar_own = fsops.Owner(None, None, own.mode) if "chown" not in ins.flags else own
                fd = self.ctx.tree.open_file(entries[0].parts)
                with os.fdopen(fd, "rb") as f:
                    fsops.untar(f, root, parts, tar_own, label=name)
            else:
                entries = payload
                if stat.S_ISDIR(entries[0].st.st_mode):
                    fsops.copy_entries(self.ctx.tree, entries, root, root.resolve(dest), own, True)
                else:
                    fsops.copy_entries(self.ctx.tree, entries, root, self._target(root, dest, dir_hint, base),
                                       own, False)

    def _copy_from_image(self, ins, image: Image, srcs: list[str], root: fsops.ScopedRoot, dest: str,
                         dir_hint: bool, own: fsops.Owner) -> None:
        with self._mounted(image, writable=False) as (smnt, _, _):
            with fsops.ScopedRoot(smnt, clamp=True) as stree:
                found = []
                for src in srcs:
                    if any(c in "*?[" for c in src):
                        found += self._glob_image(stree, src)
                    else:
                        parts = stree.resolve(src)
                        sst = stree.lstat(parts)
                        if sst is None:
                            raise BuildError(f"{self._where(ins)}: COPY --from: {src}: not found in the source image")
                        found.append((src, parts, sst))
                if not found:
                    raise BuildError(f"{self._where(ins)}: COPY --from: no source files were specified")
                if len(found) > 1 and not dir_hint:
                    raise BuildError(f"{self._where(ins)}: When using COPY with more than one source file, "
                                     "the destination must be a directory and end with a /")
                for name, parts, sst in found:
                    entries = fsops.walk(stree, parts, sst)
                    base = posixpath.basename(posixpath.normpath(name)) or "root"
                    if stat.S_ISDIR(sst.st_mode):
                        fsops.copy_entries(stree, entries, root, root.resolve(dest), own, True)
                    else:
                        fsops.copy_entries(stree, entries, root, self._target(root, dest, dir_hint, base), own, False)

    def _glob_image(self, tree: fsops.ScopedRoot, pattern: str):
        import fnmatch

        comps = [c for c in pattern.split("/") if c and c != "."]
        out = []

        def rec(prefix, i):
            if i == len(comps):
                st = tree.lstat(prefix)
                if st is not None:
                    out.append(("/".join(prefix), prefix, st))
                return
            try:
                dfd = tree.open_dir(prefix)
            except OSError:
                return
            try:
                names = sorted(os.listdir(dfd))
            finally:
                os.close(dfd)
            for n in names:
                if fnmatch.fnmatchcase(n, comps[i]):
                    rec(prefix + [n], i + 1)

        rec([], 0)
        return out

    def _download(self, ins: Instr, url: str, st: StageState):
        where = self._where(ins)
        fname = posixpath.basename(urllib.parse.unquote(urllib.parse.urlparse(url).path))
        if not fname or fname in (".", "..") or "/" in fname or "\0" in fname:
            raise BuildError(f"{where}: ADD {url}: can't derive a file name from the URL")
        fd, path = tempfile.mkstemp(prefix=f"{os.getpid()}-add-", dir=os.path.join(self.store.root, "tmp"))
        h = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out:
                req = urllib.request.Request(url, headers={"User-Agent": "unionfuse-build"})
                with urllib.request.urlopen(req, timeout=60) as r:
                    lm = r.headers.get("Last-Modified")
                    while True:
                        b = r.read(1 << 20)
                        if not b:
                            break
                        h.update(b)
                        out.write(b)
        except (OSError, ValueError) as e:
            os.unlink(path)
            reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e)
            raise BuildError(f"{where}: ADD {url}: download failed: {reason}") from None
        mtime = None
        if lm:
            try:
                mtime = parsedate_to_datetime(lm).timestamp()
            except (TypeError, ValueError):
                mtime = None
        digest = "sha256:" + h.hexdigest()
        want = ins.flags.get("checksum")
        if want and want != digest:
            os.unlink(path)
            raise BuildError(f"{where}: ADD {url}: checksum mismatch: expected {want}, got {digest}")
        return path, fname, mtime, digest
