#!/usr/bin/env bash
# Install what unionfuse needs on a Debian machine and make `unionfuse` runnable from
# anywhere (including mount.fuse3, which resets PATH). Run as root from any directory.
# Idempotent: a second run does no apt and no pip work and takes about a second.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WRAPPER=/usr/local/bin/unionfuse
STAMP_DIR=/var/lib/unionfuse
STAMP=$STAMP_DIR/install.stamp

say() { printf 'install.sh: %s\n' "$*"; }
warn() { printf 'install.sh: warning: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: must run as root (try: sudo bash scripts/install.sh)" >&2
    exit 1
fi

PY=$(command -v python3) || { echo "install.sh: python3 not found on PATH" >&2; exit 1; }
# The real interpreter behind any shim (pyenv) or symlink; the wrapper execs this path.
PYEXE=$("$PY" -c 'import sys; print(sys.executable)')

# --- Debian packages ------------------------------------------------------------------
# fuse3: fusermount3, mount.fuse3, /etc/fuse.conf   libfuse3-dev + pkg-config + gcc: build pyfuse3
# crun, runc: OCI runtimes (runner)   fuse-overlayfs: peer for comparisons
# busybox-static: tiny rootfs for tests   attr: getfattr/setfattr   systemd: systemd-analyze
# util-linux-extra: fincore (tests: what of a file is in the page cache)
pkgs=(fuse3 libfuse3-dev pkg-config gcc crun runc fuse-overlayfs busybox-static attr systemd
      debootstrap zstd apache2-utils util-linux-extra)
# Peers for the interop tests and benchmarks, installed with their recommended packages
# (podman needs conmon, catatonit, ...): skopeo umoci podman buildah docker-registry.
peer_pkgs=(skopeo umoci podman buildah docker-registry)
# pyfuse3 compiles against the interpreter's headers; pyenv ships them, Debian's python3 does not.
PYINC=$("$PYEXE" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
[ -f "$PYINC/Python.h" ] || pkgs+=(python3-dev)

missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
missing_peers=()
for p in "${peer_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing_peers+=("$p")
done
if [ "${#missing[@]}" -gt 0 ] || [ "${#missing_peers[@]}" -gt 0 ]; then
    say "installing ${missing[*]} ${missing_peers[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    if [ "${#missing[@]}" -gt 0 ]; then
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    if [ "${#missing_peers[@]}" -gt 0 ]; then
        apt-get install -y -qq "${missing_peers[@]}" >/dev/null
    fi
fi

# --- /dev/fuse ------------------------------------------------------------------------
if [ ! -c /dev/fuse ]; then
    if command -v modprobe >/dev/null 2>&1; then modprobe fuse 2>/dev/null || true; fi
    [ -c /dev/fuse ] || warn "/dev/fuse is missing (modprobe fuse failed?); mounts will not work"
fi

# --- /etc/fuse.conf: allow_other for non-root mounts ----------------------------------
if ! grep -qsE '^[[:space:]]*user_allow_other[[:space:]]*$' /etc/fuse.conf; then
    echo user_allow_other >>/etc/fuse.conf
    say "enabled user_allow_other in /etc/fuse.conf"
fi

# --- the Python package (editable, with test extras) ----------------------------------
# Skipped when the stamp says this interpreter already has this checkout installed with this
# pyproject.toml and C shim source and everything still imports (a fresh clone elsewhere
# re-installs).
want="$PYEXE $ROOT $(cat "$ROOT/pyproject.toml" "$ROOT/unionfuse/fs/_fuseshim.c" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ] ||
    ! (cd / && "$PYEXE" -c '
import sys, os, importlib.util as u
for m in ("pyfuse3", "trio", "pytest", "pytest_trio", "hypothesis", "grpc"):
    if u.find_spec(m) is None: sys.exit(1)
s = u.find_spec("unionfuse")
sys.exit(s is None or os.path.dirname(s.origin) != os.path.join(sys.argv[1], "unionfuse"))
' "$ROOT") 2>/dev/null; then
    say "pip install -e '.[test,snapshotter]' with $PYEXE"
    pipflags=(-q --disable-pip-version-check --root-user-action=ignore)
    # Debian's own python3 refuses pip installs (PEP 668) unless told otherwise.
    stdlib=$("$PYEXE" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
    if [ -f "$stdlib/EXTERNALLY-MANAGED" ] && [ -z "${VIRTUAL_ENV:-}" ]; then
        pipflags+=(--break-system-packages)
    fi
    # compat: a plain path entry in site-packages (a finder hook would cost ~10 ms per start)
    (cd "$ROOT" && "$PYEXE" -m pip install "${pipflags[@]}" -e '.[test,snapshotter]' --config-settings editable_mode=compat)
    mkdir -p "$STAMP_DIR"
    echo "$want" >"$STAMP"
fi

# Bytecode for every module now: with PYTHONDONTWRITEBYTECODE set (as on some CI and
# sandboxes) each start of the CLI or a daemon would otherwise compile ~50 ms of source.
"$PYEXE" -m compileall -q "$ROOT/unionfuse" >/dev/null || warn "compileall failed (only slower starts)"

# --- /usr/local/bin/unionfuse ---------------------------------------------------------
# mount.fuse3 runs `unionfuse` with PATH reset to the standard dirs, so the wrapper needs
# an absolute interpreter path. -P: do not put the caller's cwd on sys.path (a root daemon
# must not import a stray ./unionfuse); exec keeps the PID (systemd Type=notify, MAINPID).
wrapper_text="#!/bin/sh
# Written by $ROOT/scripts/install.sh; re-run it after moving the checkout or the interpreter.
exec '$PYEXE' -P -m unionfuse \"\$@\"
"
if [ "$(cat "$WRAPPER" 2>/dev/null)" != "${wrapper_text%$'\n'}" ]; then
    tmp=$(mktemp "$WRAPPER.XXXXXX")
    printf '%s' "$wrapper_text" >"$tmp"
    chmod 0755 "$tmp"
    mv -f "$tmp" "$WRAPPER"
    say "wrote $WRAPPER -> $PYEXE -m unionfuse"
fi
