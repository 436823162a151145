"""``save``, ``load``, ``pull``, ``push``: parsers and dispatch for the main CLI.

    from .oci import cli as oci_cli
    oci_cli.add_parsers(sub)          # in commands.add_parsers
    if a.command in oci_cli.COMMANDS: return oci_cli.dispatch(a)   # in commands.dispatch
"""

from __future__ import annotations

import argparse
import sys

from ..errors import UsageError
from ..store.store import Store

COMMANDS = ("save", "load", "pull", "push")


def _bool(v: str) -> bool:
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {v!r}")


def _remote_flags(p) -> None:
    p.add_argument("--tls-verify", type=_bool, nargs="?", const=True, default=True, metavar="BOOL",
                   help="check the registry's TLS certificate (default true); false also allows "
                   "plain http, as do ROOT/config.json \"insecure-registries\"")
    p.add_argument("--creds", metavar="USER[:PASS]",
                   help="registry credentials (default: ROOT/auth.json, else anonymous)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def add_parsers(sub) -> None:
    p = sub.add_parser("save", help="write images to a tar archive (docker-archive or OCI layout)",
                       description="Write one or more images, with their names, to a tar archive: "
                       "docker-archive (what docker/podman load read) or oci-archive (an OCI image "
                       "layout in a tar). Layers keep their original tars (and diff_ids).")
    p.add_argument("-o", "--output", metavar="FILE", help="archive to write (default: stdout if not a tty)")
    p.add_argument("--format", default="docker-archive", choices=("docker-archive", "oci-archive"))
    p.add_argument("images", nargs="+", metavar="IMAGE")

    p = sub.add_parser("load", help="load images from a tar archive",
                       description="Load the images of a docker-archive or an OCI layout tar "
                       "(layers uncompressed, gzip or zstd). Digests are verified; on any error "
                       "nothing is stored.")
    p.add_argument("-i", "--input", metavar="FILE", help="archive to read (default: stdin)")
    p.add_argument("-q", "--quiet", action="store_true")

    p = sub.add_parser("pull", help="download an image from a registry",
                       description="Pull NAME[:TAG|@DIGEST] over the OCI distribution API. "
                       "Layers the store has are not downloaded; broken downloads resume.")
    _remote_flags(p)
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="image to pick from a multi-platform index (default linux/<host arch>)")
    p.add_argument("name", metavar="NAME[:TAG|@DIGEST]")

    p = sub.add_parser("push", help="upload an image to a registry",
                       description="Push NAME[:TAG] to the registry its name points at "
                       "(HOST[:PORT]/REPO:TAG). Blobs the registry has are skipped or mounted.")
    _remote_flags(p)
    p.add_argument("name", metavar="NAME[:TAG]")


def _creds(v: str | None):
    if not v:
        return None
    user, sep, pw = v.partition(":")
    if not sep:
        import getpass

        pw = getpass.getpass(f"Password for {user}: ")
    return user, pw


def dispatch(a) -> int:
    try:
        return _dispatch(a)
    except (AttributeError, KeyError, TypeError, IndexError) as e:
        # JSON of the wrong shape from an archive or a registry (what was half-stored
        # has been discarded on the way out)
        from .local import OCIError

        raise OCIError(f"{a.command}: malformed image metadata ({type(e).__name__}: {e})") from None


def _dispatch(a) -> int:
    store = Store(a.root)
    cmd = a.command
    if cmd == "save":
        from . import archive

        out = a.output
        if not out:
            if sys.stdout.isatty():
                raise UsageError("save: refusing to write an archive to a terminal; give -o FILE")
            out = "-"
        archive.save(store, a.images, out, a.format)
        return 0
    if cmd == "load":
        from . import archive

        src = a.input or "-"
        if src == "-" and sys.stdin.isatty():
            raise UsageError("load: give -i FILE (stdin is a terminal)")
        lines = archive.load(store, src, log=(lambda m: None) if a.quiet else None)
        for line in lines:
            print(line)
        return 0
    if cmd in ("pull", "push"):
        from . import registry

        progress = registry.Progress(quiet=a.quiet)
        if cmd == "pull":
            image, c = registry.pull(store, a.name, tls_verify=a.tls_verify, creds=_creds(a.creds),
                                     platform=a.platform, progress=progress)
            c.close()
            print(image.id)
        else:
            digest, c = registry.push(store, a.name, tls_verify=a.tls_verify, creds=_creds(a.creds),
                                      progress=progress)
            c.close()
        return 0
    raise UsageError(f"unknown command {cmd}")
