#!/usr/bin/env bash
# Make a minimal Debian bookworm root filesystem tar with debootstrap, from the Debian
# mirror configured for apt on this host (no hardcoded host):
#   bash scripts/debian-rootfs.sh OUT.tar
#   bash scripts/debian-rootfs.sh --print-mirror    (the mirror it would use, and exit)
# Installs debootstrap with apt-get if it is missing.  Needs root.  ~30-60 s, ~200 MB.
# The tar has numeric owners and sorted entries, like busybox-rootfs.sh makes.
# Environment: SUITE (default bookworm), MIRROR (overrides the apt config), VARIANT
# (default minbase).
set -euo pipefail
out=${1:?usage: debian-rootfs.sh OUT.tar}
suite=${SUITE:-bookworm}
variant=${VARIANT:-minbase}
die() { echo "debian-rootfs.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || [ "$out" = --print-mirror ] || die "must run as root (debootstrap needs it)"

# The first apt source that serves "$suite" with component main, from
# /etc/apt/sources.list (one-line form) and /etc/apt/sources.list.d/*.list / *.sources
# (deb822 form).  Prints "URI KEYRING" (KEYRING may be empty).
find_mirror() {
  python3 - "$suite" <<'PY'
import glob, re, sys
suite = sys.argv[1]

def oneline(path):
    for line in open(path, errors="replace"):
        line = line.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        opts = {}
        m = re.match(r"deb\s+\[([^\]]*)\]\s+(.*)", line)
        if m:
            for o in m.group(1).split():
                k, _, v = o.partition("=")
                opts[k.lower()] = v
            rest = m.group(2).split()
        else:
            rest = line.split()[1:]
        if len(rest) >= 3:
            yield rest[0], [rest[1]], rest[2:], opts.get("signed-by", "")

def deb822(path):
    text = open(path, errors="replace").read()
    for para in re.split(r"\n\s*\n", text):
        f, key = {}, None
        for line in para.splitlines():
            if line.startswith("#"):
                continue
            if line[:1] in (" ", "\t") and key:
                f[key] += " " + line.strip()
                continue
            k, sep, v = line.partition(":")
            if sep:
                key = k.strip().lower()
                f[key] = v.strip()
        if "deb" not in f.get("types", "").split() or f.get("enabled", "yes").lower() == "no":
            continue
        signed = f.get("signed-by", "")
        if signed.startswith("-----"):
            signed = ""  # an inline key: debootstrap can't take it; use its default
        for uri in f.get("uris", "").split():
            yield uri, f.get("suites", "").split(), f.get("components", "").split(), signed

sources = []
for p in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")):
    try:
        sources += list(oneline(p))
    except OSError:
        pass
for p in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    try:
        sources += list(deb822(p))
    except OSError:
        pass
for uri, suites, comps, signed in sources:
    if suite in suites and "main" in comps and uri.startswith(("http://", "https://", "file:/")):
        print(uri.rstrip("/"), signed.split()[0] if signed else "")
        sys.exit(0)
sys.exit(1)
PY
}

if [ -n "${MIRROR:-}" ]; then
  mirror=$MIRROR keyring=
else
  read -r mirror keyring < <(find_mirror) || die "no apt source for '$suite' (main) in /etc/apt/sources.list{,.d}"
fi
if [ "$out" = --print-mirror ]; then
  echo "$mirror"
  exit 0
fi

if ! command -v debootstrap >/dev/null; then
  echo "debian-rootfs.sh: installing debootstrap" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >&2 ||
    { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >&2; } ||
    die "can't install debootstrap"
fi

tmp=$(mktemp -d)
r=$tmp/rootfs
cleanup() {
  # debootstrap mounts /proc (and /sys) in the target; never leave them behind
  local m
  for m in $(awk -v r="$r" '$2 == r || index($2, r "/") == 1 {print $2}' /proc/self/mounts | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
  rm -rf --one-file-system "$tmp"
}
trap cleanup EXIT

args=(--variant="$variant")
[ -n "$keyring" ] && [ -r "$keyring" ] && args+=(--keyring="$keyring")
echo "debian-rootfs.sh: debootstrap $suite from $mirror" >&2
debootstrap "${args[@]}" "$suite" "$r" "$mirror" >"$tmp/debootstrap.log" 2>&1 || {
  tail -n 30 "$tmp/debootstrap.log" >&2
  die "debootstrap failed (log above)"
}
# the debootstrap-time mounts go before packing
for m in $(awk -v r="$r" '$2 == r || index($2, r "/") == 1 {print $2}' /proc/self/mounts | sort -r); do
  umount "$m"
done

# a container image, not a booted system: no services started by package installs,
# no caches, the host's apt lists out
printf '#!/bin/sh\nexit 101\n' > "$r/usr/sbin/policy-rc.d"
chmod 0755 "$r/usr/sbin/policy-rc.d"
rm -rf "$r"/var/lib/apt/lists/* "$r"/var/cache/apt/*.bin "$r"/var/cache/apt/archives/*.deb \
  "$r"/var/log/bootstrap.log "$r"/debootstrap
: > "$r/etc/resolv.conf"
echo "debian" > "$r/etc/hostname"

tar --sort=name --numeric-owner --xattrs --xattrs-include='security.capability' --format=pax \
  --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
  -C "$r" -cf "$out.part" .
mv "$out.part" "$out"
echo "debian-rootfs.sh: wrote $out ($(du -h "$out" | cut -f1))" >&2
