"""Image and container commands (the docker-like half of the CLI; cli.py holds the
mount half and the error/exit handling)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import fmt
from .errors import UnionfuseError, UsageError
from .runtime.container import Containers, RunOptions, default_driver
from .store import imageconfig
from .store.store import Conflict, Image, ImageInUse, NotFound, Store, normalize_ref


class RunError(UnionfuseError):
    exit_code = 125  # docker: the error is unionfuse's own, not the container's


def add_parsers(sub) -> None:
    p = sub.add_parser("import", help="make an image from a rootfs tar or directory",
                       description="Create an image with one layer from a tar archive (- for stdin; "
                       "gzip/bzip2/xz detected) or a directory.")
    p.add_argument("-c", "--change", action="append", default=[], metavar="INSTR",
                   help="apply a Dockerfile instruction (CMD, ENTRYPOINT, ENV, WORKDIR, USER, "
                   "EXPOSE, LABEL, VOLUME, STOPSIGNAL)")
    p.add_argument("-m", "--message", default="", help="commit message for the history")
    p.add_argument("source", metavar="SRC")
    p.add_argument("ref", metavar="NAME[:TAG]", nargs="?")

    p = sub.add_parser("images", help="list images")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("-a", "--all", action="store_true")

    p = sub.add_parser("tag", help="add a name to an image")
    p.add_argument("source", metavar="IMAGE")
    p.add_argument("target", metavar="NAME[:TAG]")

    p = sub.add_parser("rmi", help="remove images")
    p.add_argument("-f", "--force", action="store_true", help="remove even if a container uses it")
    p.add_argument("images", nargs="+", metavar="IMAGE")

    p = sub.add_parser("inspect", help="show image or container details as JSON")
    p.add_argument("names", nargs="+", metavar="NAME")

    p = sub.add_parser("history", help="show the layers of an image, newest first")
    p.add_argument("--no-trunc", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("image", metavar="IMAGE")

    p = sub.add_parser("prune", help="remove stopped containers, dangling images and unused layers")
    p.add_argument("-f", "--force", action="store_true", help="(accepted; there is no prompt)")

    p = sub.add_parser("run", help="run a command in a new container", add_help=False,
                       description="Run a command in a new container: a thin writable layer over "
                       "the image, mounted by unionfuse and run by an OCI runtime.")
    p.add_argument("--help", action="help", help="show this help message and exit")
    _run_flags(p)
    p.add_argument("--rm", action="store_true", help="remove the container when it exits")
    p.add_argument("-d", "--detach", action="store_true", help="run in the background, print its id")
    p.add_argument("--name", help="container name")
    p.add_argument("--entrypoint", help="override the image's ENTRYPOINT")
    p.add_argument("-v", "--volume", action="append", default=[], metavar="HOST:CTR[:ro]")
    p.add_argument("--network", "--net", default="none", choices=("none", "host"))
    p.add_argument("--hostname", "-h", dest="hostname")
    p.add_argument("--storage-driver", dest="run_driver", choices=("fuse", "overlay"))
    p.add_argument("--runtime", dest="run_runtime", choices=("runc", "crun"))
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="CMD")

    p = sub.add_parser("ps", help="list containers")
    p.add_argument("-a", "--all", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--no-trunc", action="store_true")

    p = sub.add_parser("start", help="start stopped containers (on the same layer)")
    p.add_argument("-a", "--attach", action="store_true")
    p.add_argument("-i", "--interactive", action="store_true")
    p.add_argument("containers", nargs="+", metavar="CONTAINER")

    p = sub.add_parser("stop", help="stop running containers (TERM, then KILL)")
    p.add_argument("-t", "--time", type=float, default=10)
    p.add_argument("containers", nargs="+", metavar="CONTAINER")

    p = sub.add_parser("kill", help="send a signal to running containers")
    p.add_argument("-s", "--signal", default="KILL")
    p.add_argument("containers", nargs="+", metavar="CONTAINER")

    p = sub.add_parser("rm", help="remove containers")
    p.add_argument("-f", "--force", action="store_true", help="kill it first if running")
    p.add_argument("containers", nargs="+", metavar="CONTAINER")

    p = sub.add_parser("logs", help="output of a detached container")
    p.add_argument("container", metavar="CONTAINER")

    p = sub.add_parser("exec", help="run a process in a running container")
    p.add_argument("-i", "--interactive", action="store_true")
    p.add_argument("-t", "--tty", action="store_true")
    p.add_argument("-e", "--env", action="append", default=[])
    p.add_argument("-u", "--user")
    p.add_argument("-w", "--workdir")
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="CMD")

    p = sub.add_parser("diff", help="files a container added (A), changed (C) or deleted (D)")
    p.add_argument("container", metavar="CONTAINER")

    p = sub.add_parser("commit", help="make an image from a container's layer")
    p.add_argument("-m", "--message", default="")
    p.add_argument("-a", "--author", default="")
    p.add_argument("-c", "--change", action="append", default=[], metavar="INSTR")
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("ref", metavar="IMAGE[:TAG]", nargs="?")

    p = sub.add_parser("_shim", help=argparse.SUPPRESS)
    p.add_argument("container")

    from .oci import cli as oci_cli

    oci_cli.add_parsers(sub)

    from .build.cli import add_parser as add_build_parser

    add_build_parser(sub)


def _run_flags(p) -> None:
    p.add_argument("-i", "--interactive", action="store_true", help="keep stdin open")
    p.add_argument("-t", "--tty", action="store_true", help="allocate a terminal")
    p.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("-w", "--workdir", metavar="DIR")
    p.add_argument("-u", "--user", metavar="USER[:GROUP]")


def _store(a) -> Store:
    return Store(a.root)


def cmd_build(a) -> int:
    from .build.cli import cmd_build as build

    return build(a)


def dispatch(a) -> int:
    from .oci import cli as oci_cli

    if a.command in oci_cli.COMMANDS:
        return oci_cli.dispatch(a)
    fn = globals().get("cmd_" + a.command.lstrip("_").replace("-", "_"))
    if fn is None:
        raise UsageError(f"unknown command {a.command}")
    return fn(a)


# -- images ---------------------------------------------------------------------------------


def cmd_import(a) -> int:
    store = _store(a)
    src = a.source
    if a.ref:
        normalize_ref(a.ref)  # fail before any work
    from .oci import local as oci_local

    # the config changes are checked before a layer is stored
    cfg = imageconfig.new_config([], created_by="", comment=a.message or f"Imported from {src}")
    for ch in a.change:
        imageconfig.apply_change(cfg, ch)
    if src == "-":
        diff_id = oci_local.add_layer_tar_recorded(store, sys.stdin.buffer, label="stdin")
    elif os.path.isdir(src):
        diff_id = store.add_layer_from_dir(src)
    else:
        try:
            f = open(src, "rb")
        except OSError as e:
            raise UsageError(f"can't read {src}: {e.strerror}") from None
        with f:
            # keeps a record of the exact tar, so save/push give back the same diff_id
            diff_id = oci_local.add_layer_tar_recorded(store, f, label=src)
    cfg["rootfs"]["diff_ids"] = [diff_id]
    image = store.put_image(cfg, ref=a.ref)
    print(image.id)
    return 0


def _image_size(store: Store, image: Image) -> int:
    total = 0
    for d in image.diff_ids:
        try:
            total += store.layer_info(d).get("size", 0)
        except NotFound:
            pass
    return total


def cmd_images(a) -> int:
    store = _store(a)
    refs = store.refs()
    rows = []
    tagged = set(refs.values())
    images = {}
    for iid in store.image_ids():
        try:
            images[iid] = store.image_by_id(iid)
        except (NotFound, ValueError):
            continue
    entries = [(r.rsplit(":", 1)[0], r.rsplit(":", 1)[1], images[i]) for r, i in refs.items() if i in images]
    # build steps' intermediate images are hidden unless -a, as docker does
    hidden = set() if a.all else _build_cache_ids(store)
    entries += [("<none>", "<none>", im) for iid, im in images.items() if iid not in tagged and iid not in hidden]
    entries.sort(key=lambda e: (e[2].config.get("created", ""), e[0], e[1]), reverse=True)
    if a.quiet:
        seen = []
        for _, _, im in entries:
            if im.short_id not in seen:
                seen.append(im.short_id)
        print("\n".join(seen)) if seen else None
        return 0
    for repo, tag, im in entries:
        rows.append([repo, tag, im.short_id, fmt.ago(im.config.get("created")), fmt.size(_image_size(store, im))])
    print(fmt.table(["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"], rows))
    return 0


def cmd_tag(a) -> int:
    store = _store(a)
    store.tag(store.resolve(a.source), a.target)
    return 0


def cmd_rmi(a) -> int:
    store = _store(a)
    cs = Containers(store)
    failed = 0
    for name in a.images:
        try:
            image = store.resolve(name)
            refs = store.refs_of(image.id)
            by_ref = False
            try:
                by_ref = normalize_ref(name) in refs
            except UnionfuseError:
                pass
            if by_ref and len(refs) > 1:
                store.untag(name)
                print(f"Untagged: {normalize_ref(name)}")
                continue
            try:
                # users are counted under the store lock: a `run` creating a container
                # either comes first (and keeps the image) or finds it gone
                gone, deleted = store.remove_image(
                    image, lambda: [c for c in cs.all() if c.rec["image_id"] == image.id], a.force)
            except ImageInUse as e:
                raise Conflict(f"conflict: unable to remove image {name} ({image.short_id}): "
                               f"container {e.user.short_id} ({e.user.name}) uses it (use -f)") from None
            for r in gone:
                print(f"Untagged: {r}")
            if not deleted:
                continue  # -f: the name goes; the layers stay while a container uses them
            print(f"Deleted: {image.id}")
            store.gc_layers(cs.layers_in_use)
        except UnionfuseError as e:
            print(f"unionfuse: {e.message}", file=sys.stderr)
            failed = 1
    return failed


def _build_cache_ids(store: Store) -> set[str]:
    from .build.cache import BuildCache

    return BuildCache(store).image_ids()


def _ancestors(store: Store, images: set[str], candidates: set[str]) -> set[str]:
    """The *candidates* whose layers and history are a prefix of one of *images* (the
    build steps that led to them)."""
    def chain(iid):
        try:
            cfg = store.image_by_id(iid).config
        except (NotFound, ValueError):
            return None
        return cfg.get("rootfs", {}).get("diff_ids", []), [h.get("created_by") for h in cfg.get("history", [])]

    targets = [c for c in (chain(i) for i in images) if c]
    out = set()
    for cand in candidates:
        c = chain(cand)
        if c and any(t[0][:len(c[0])] == c[0] and t[1][:len(c[1])] == c[1] for t in targets):
            out.add(cand)
    return out


def _image_json(store: Store, image: Image) -> dict:
    cfg = image.config
    return {
        "Id": image.id,
        "RepoTags": store.refs_of(image.id),
        "Created": cfg.get("created"),
        "Architecture": cfg.get("architecture"),
        "Os": cfg.get("os"),
        "Config": cfg.get("config", {}),
        "RootFS": {"Type": "layers", "Layers": image.diff_ids},
        "History": cfg.get("history", []),
        "Size": _image_size(store, image),
    }


def _container_json(c) -> dict:
    r = c.rec
    return {
        "Id": r["id"],
        "Name": "/" + r["name"],
        "Created": r["created"],
        "Image": r["image_id"],
        "Config": {"Image": r["image"], "Cmd": r["argv"], **{k: v for k, v in r["options"].items()}},
        "State": {"Status": r["state"], "Running": r["state"] == "running", "ExitCode": r["exit_code"],
                  "StartedAt": r["started_at"], "FinishedAt": r["finished_at"], "Pid": r.get("shim_pid") or 0},
        "GraphDriver": {"Name": r["options"]["driver"],
                        "Data": {"UpperDir": c.path("upper"), "WorkDir": c.path("work"),
                                 "MergedDir": c.path("rootfs"), "LowerDir": ":".join(c.lower_dirs())}},
    }


def cmd_inspect(a) -> int:
    store = _store(a)
    cs = Containers(store)
    out = []
    for name in a.names:
        try:
            out.append(_container_json(cs.refresh(cs.get(name))))
            continue
        except NotFound:
            pass
        try:
            out.append(_image_json(store, store.resolve(name)))
        except NotFound:
            raise NotFound(f"no such object: {name}") from None
    print(json.dumps(out, indent=4))
    return 0


def cmd_history(a) -> int:
    store = _store(a)
    image = store.resolve(a.image)
    hist = list(image.config.get("history", []))
    diff_ids = image.diff_ids
    sizes = []
    li = 0
    for h in hist:
        if h.get("empty_layer"):
            sizes.append(0)
        else:
            d = diff_ids[li] if li < len(diff_ids) else None
            li += 1
            sizes.append(store.layer_info(d).get("size", 0) if d else 0)
    rows = []
    for i in range(len(hist) - 1, -1, -1):
        h = hist[i]
        ident = (image.id if a.no_trunc else image.short_id) if i == len(hist) - 1 else "<missing>"
        if a.quiet:
            rows.append([ident])
            continue
        created_by = h.get("created_by", "")
        if not a.no_trunc:
            created_by = fmt.trunc(created_by, 45)
        rows.append([ident, fmt.ago(h.get("created")), created_by, fmt.size(sizes[i]), h.get("comment", "")])
    if a.quiet:
        print("\n".join(r[0] for r in rows))
        return 0
    print(fmt.table(["IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT"], rows))
    return 0


def cmd_prune(a) -> int:
    store = _store(a)
    cs = Containers(store)
    for c in cs.all():
        cs.refresh(c)
        if c.state != "running":
            try:
                cs.remove(c)
            except (Conflict, NotFound):
                continue  # being started, or removed meanwhile: not ours to prune
            print(f"Deleted container: {c.id}")
    keep = set(store.refs().values()) | cs.images_in_use() | store.pinned_images()
    keep |= _ancestors(store, keep, _build_cache_ids(store))  # build cache of live images

    def keep_now():  # (under the store lock: what a concurrent run/tag/build just started using)
        return keep | set(store.refs().values()) | cs.images_in_use() | store.pinned_images()

    for iid in store.image_ids():
        if iid in keep:
            continue
        try:
            image = store.image_by_id(iid)
        except UnionfuseError:
            continue  # removed meanwhile (or unreadable: left for rmi to report)
        if store.delete_image(image, keep=keep_now):
            print(f"Deleted image: {iid}")
    from .build.cache import BuildCache

    BuildCache(store).prune()
    removed = store.gc_layers(cs.layers_in_use)
    for d in removed:
        print(f"Deleted layer: {d}")
    return 0


# -- containers ---------------------------------------------------------------------------


def cmd_run(a) -> int:
    try:
        return _run(a)
    except UnionfuseError as e:
        if e.exit_code in (126, 127) or isinstance(e, RunError):
            raise
        raise RunError(str(e)) from None  # docker: 125 when the run itself fails


def _run(a) -> int:
    store = _store(a)
    cs = Containers(store)
    image = store.resolve(a.image)
    args = list(a.args)
    if args and args[0] == "--":
        args = args[1:]
    opts = RunOptions(
        args=args,
        entrypoint=None if a.entrypoint is None else ([a.entrypoint] if a.entrypoint else []),
        env=a.env, workdir=a.workdir, user=a.user, volumes=a.volume, network=a.network,
        hostname=a.hostname, tty=a.tty, interactive=a.interactive,
        driver=default_driver(store, getattr(a, "run_driver", None), a.storage_driver), runtime=a.run_runtime or a.runtime,
        auto_remove=a.rm and a.detach,
    )
    c = cs.create(image, a.image, a.name, opts)
    if a.detach:
        try:
            cs.start(c, attach=False)
        except UnionfuseError as e:
            raise RunError(str(e)) from None
        print(c.id)
        return 0
    try:
        code = cs.start(c, attach=True, log_debug=a.debug)
    except UnionfuseError as e:
        if e.exit_code in (126, 127):
            raise
        raise RunError(str(e)) from None
    finally:
        if a.rm:
            cs.remove(c, force=True)
    return code


def cmd_shim(a) -> int:
    store = _store(a)
    cs = Containers(store)
    return cs.run_shim(cs.get(a.container))


def cmd_ps(a) -> int:
    store = _store(a)
    cs = Containers(store)
    rows = []
    for c in cs.all():
        cs.refresh(c)
        if c.state != "running" and not a.all:
            continue
        if a.quiet:
            rows.append([c.id if a.no_trunc else c.short_id])
            continue
        r = c.rec
        if c.state == "running":
            status = "Up " + fmt.duration(_since(r["started_at"]))
        elif c.state == "created":
            status = "Created"
        else:
            status = f"Exited ({r['exit_code']}) {fmt.ago(r['finished_at'])}"
        cmd = json.dumps(" ".join(r["argv"]))
        rows.append([c.id if a.no_trunc else c.short_id, r["image"],
                     cmd if a.no_trunc else fmt.trunc(cmd, 22), fmt.ago(r["created"]), status, r["name"]])
    if a.quiet:
        if rows:
            print("\n".join(r[0] for r in rows))
        return 0
    print(fmt.table(["CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "NAMES"], rows))
    return 0


def _since(ts) -> float:
    import time

    t = fmt.parse_iso(ts)
    return 0 if t is None else time.time() - t


def _each(a, fn) -> int:
    store = _store(a)
    cs = Containers(store)
    failed = 0
    for name in a.containers:
        try:
            fn(cs, cs.get(name))
            print(name)
        except UnionfuseError as e:
            print(f"unionfuse: {e.message}", file=sys.stderr)
            failed = 1
    return failed


def cmd_start(a) -> int:
    store = _store(a)
    cs = Containers(store)
    if a.attach or a.interactive:
        if len(a.containers) != 1:
            raise UsageError("you cannot start and attach multiple containers at once")
        c = cs.get(a.containers[0])
        if a.interactive:
            c.rec["options"]["interactive"] = True
            c.save()
        try:
            return cs.start(c, attach=True)
        except UnionfuseError as e:
            raise RunError(str(e)) from None
    return _each(a, lambda cs, c: cs.start(c, attach=False))


def cmd_stop(a) -> int:
    def stop(cs, c):
        cs.refresh(c)
        if c.state == "running":
            cs.stop(c, a.time)

    return _each(a, stop)


def cmd_kill(a) -> int:
    return _each(a, lambda cs, c: cs.kill(c, a.signal.upper()))


def cmd_rm(a) -> int:
    return _each(a, lambda cs, c: cs.remove(c, force=a.force))


def cmd_logs(a) -> int:
    store = _store(a)
    c = Containers(store).get(a.container)
    try:
        with open(c.path("log"), "rb") as f:
            while True:
                b = f.read(1 << 16)
                if not b:
                    break
                sys.stdout.buffer.write(b)
    except FileNotFoundError:
        pass
    sys.stdout.flush()
    return 0


def cmd_exec(a) -> int:
    store = _store(a)
    cs = Containers(store)
    c = cs.get(a.container)
    args = list(a.args)
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        raise UsageError("exec needs a command")
    try:
        return cs.exec(c, args, a.tty, a.interactive, a.env, a.user, a.workdir)
    except UnionfuseError as e:
        raise RunError(str(e)) from None


def cmd_diff(a) -> int:
    store = _store(a)
    cs = Containers(store)
    c = cs.get(a.container)
    from .store.changes import changes  # (not imported for `run`)

    with cs.using(c), cs.paused(c):
        found = changes(c.path("upper"), c.lower_dirs())
    for kind, path in found:
        print(f"{kind} {path}")
    return 0


def cmd_commit(a) -> int:
    store = _store(a)
    cs = Containers(store)
    c = cs.refresh(cs.get(a.container))
    if a.ref:
        normalize_ref(a.ref)
    parent = c.image()
    created_by = " ".join(c.rec["argv"])
    cfg = imageconfig.child_config(parent.config, None, created_by, a.message)
    cfg["history"][-1].pop("empty_layer", None)
    if a.author:
        cfg["author"] = a.author
    for ch in a.change:  # checked before a layer is stored
        imageconfig.apply_change(cfg, ch)
    # (an `rm -f` meanwhile waits until the layer is read; one that came first: NotFound)
    with cs.using(c), cs.paused(c):
        cfg["rootfs"]["diff_ids"].append(store.add_layer_from_dir(c.path("upper"), lowers=c.lower_dirs()))
    image = store.put_image(cfg, ref=a.ref)
    print(image.id)
    return 0
