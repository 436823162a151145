"""``python -m unionfuse.build [--root DIR] [--storage-driver D] [--runtime R] build ...``:
the build command on its own (for tests and until it is wired into the main CLI)."""

from __future__ import annotations

import argparse
import sys

from ..errors import UnionfuseError
from . import cli


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="unionfuse")
    p.add_argument("--root")
    p.add_argument("--storage-driver", choices=("fuse", "overlay"))
    p.add_argument("--runtime", choices=("runc", "crun"))
    sub = p.add_subparsers(dest="command")
    cli.add_parser(sub)
    a = p.parse_args(argv)
    if a.command != "build":
        p.print_help(sys.stderr)
        return 2
    try:
        return cli.cmd_build(a)
    except UnionfuseError as e:
        print(f"unionfuse: {e.message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
