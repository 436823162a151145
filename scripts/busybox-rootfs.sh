#!/usr/bin/env bash
# Make a busybox root filesystem tar from Debian's busybox-static (no network pulls):
#   bash scripts/busybox-rootfs.sh OUT.tar
# The result is deterministic for a given busybox binary (sorted, fixed mtime, numeric
# owners), so importing it twice gives the same layer diff_id.
set -euo pipefail
out=${1:?usage: busybox-rootfs.sh OUT.tar}
bb=/bin/busybox
# the rootfs has no libc: the binary must be the static build (Debian's busybox-static)
if [ ! -x "$bb" ] || ldd "$bb" >/dev/null 2>&1; then
  echo "busybox-rootfs.sh: no static busybox at $bb (apt-get install busybox-static)" >&2
  exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
r=$tmp/rootfs
mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,etc,root,tmp,proc,sys,dev,var/tmp,home}
install -m 0755 "$bb" "$r/bin/busybox"
for applet in $("$bb" --list-full); do
  [ "$applet" = bin/busybox ] && continue
  mkdir -p "$r/$(dirname "$applet")"
  ln -sf /bin/busybox "$r/$applet"
done
chmod 1777 "$r/tmp" "$r/var/tmp"
chmod 0700 "$r/root"
cat > "$r/etc/passwd" <<'P'
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
nobody:x:65534:65534:nobody:/home:/bin/false
user:x:1000:1000:user:/home/user:/bin/sh
P
cat > "$r/etc/group" <<'G'
root:x:0:
daemon:x:1:
wheel:x:10:user
users:x:100:user
nogroup:x:65534:
user:x:1000:
G
mkdir -p "$r/home/user" && chown 1000:1000 "$r/home/user"
echo "busybox" > "$r/etc/hostname"
printf 'nameserver 127.0.0.1\n' > "$r/etc/resolv.conf"
printf 'PATH="/usr/sbin:/usr/bin:/sbin:/bin"\n' > "$r/etc/profile"
tar --sort=name --mtime=@0 --numeric-owner --format=gnu -C "$r" -cf "$out" .
