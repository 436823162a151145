"""``unionfuse build``: argument parsing and the command (wired in by commands.py)."""

from __future__ import annotations

import os
import sys

from ..errors import UsageError
from ..runtime.container import default_driver
from ..store.store import Store


def add_parser(sub) -> None:
    p = sub.add_parser("build", help="build an image from a Dockerfile",
                       description="Build an image from a Dockerfile and a context directory, "
                       "one layer per RUN/COPY/ADD, with a build cache.")
    p.add_argument("-t", "--tag", action="append", default=[], metavar="NAME[:TAG]",
                   help="name the result (repeatable)")
    p.add_argument("-f", "--file", metavar="PATH", help="the Dockerfile (default CONTEXT/Dockerfile; - for stdin)")
    p.add_argument("--build-arg", action="append", default=[], metavar="KEY[=VALUE]",
                   help="set a build-time variable (KEY alone: from the environment)")
    p.add_argument("--no-cache", action="store_true", help="don't use the build cache")
    p.add_argument("--target", metavar="STAGE", help="build up to this stage")
    p.add_argument("--progress", choices=("auto", "plain", "tty"), default="auto",
                   help="output style (auto: tty on a terminal, else plain)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the image id")
    p.add_argument("--network", choices=("none", "host"), default="none",
                   help="network for RUN steps (default none)")
    p.add_argument("context", metavar="CONTEXT")


def _build_args(items: list[str]) -> dict[str, str]:
    out = {}
    for it in items:
        k, eq, v = it.partition("=")
        if not k:
            raise UsageError(f"invalid --build-arg {it!r}: expected KEY=VALUE")
        if eq:
            out[k] = v
        elif k in os.environ:
            out[k] = os.environ[k]
    return out


def cmd_build(a) -> int:
    store = Store(getattr(a, "root", None))
    if a.quiet:
        mode = "quiet"
    elif a.progress == "auto":
        mode = "tty" if sys.stdout.isatty() else "plain"
    else:
        mode = a.progress
    from .executor import BuildOptions, Builder  # (heavy: only when building)
    from .progress import Progress

    opts = BuildOptions(
        context=a.context, dockerfile=a.file, tags=list(a.tag), build_args=_build_args(a.build_arg),
        no_cache=a.no_cache, target=a.target, network=a.network, driver=default_driver(store, getattr(a, "storage_driver", None)),
        runtime=getattr(a, "runtime", None),
    )
    if not os.path.isdir(a.context):
        raise UsageError(f"unable to prepare context: path {a.context!r} not found or not a directory")
    Builder(store, opts, Progress(mode)).build()
    return 0
