#!/usr/bin/env bash
# unionfuse demo, from nothing:   sudo bash scripts/demo.sh
#
# Installs what is needed (scripts/install.sh), builds three small lower layers in a temp
# dir, mounts them with an upper dir through unionfuse, and shows the union rules at work:
# shadowing, whiteouts and opaque dirs in both the OCI and the overlayfs form, copy-up, hard
# links, deleting, replacing a directory, renaming a lower directory. Then it unmounts and
# mounts the same upper with kernel overlayfs to show that the kernel sees the same tree.
# Every step is checked; the exit status is 0 only if all checks passed. Everything is
# unmounted and removed on exit, also on failure (UNIONFUSE_DEMO_KEEP=1 keeps the files).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ "$(id -u)" -ne 0 ]; then
    echo "demo.sh: must run as root: sudo bash scripts/demo.sh" >&2
    exit 1
fi

bash "$ROOT/scripts/install.sh"

DEMO=$(realpath "$(mktemp -d "${TMPDIR:-/tmp}/unionfuse-demo.XXXXXX")")
MNT=$DEMO/merged
KMNT=$DEMO/kernel-merged
failures=0

# --- helpers --------------------------------------------------------------------------
section() { printf '\n==================== %s ====================\n' "$*"; }
note() { printf '# %s\n' "$*"; }
# Show a command (paths relative to the demo dir) and run it.
run() {
    local shown="$*"
    printf '\n$ %s\n' "${shown//$DEMO\//}"
    "$@"
}
# Same for a shell snippet with pipes or redirections (run in the demo dir).
run_sh() {
    printf '\n$ %s\n' "$1"
    eval "$1"
}
check() {
    local what=$1
    shift
    if "$@"; then
        printf '  [ok] %s\n' "$what"
    else
        printf '  [FAILED] %s\n' "$what" >&2
        failures=$((failures + 1))
    fi
}
same() { [ "$1" = "$2" ] || { printf '    got:      %q\n    expected: %q\n' "$1" "$2" >&2; return 1; }; }
is_mounted() { awk -v m="$1" '$5 == m { found = 1 } END { exit !found }' /proc/self/mountinfo; }
# The real CLI, with a time limit so a hung daemon cannot hang the demo.
unionfuse() { timeout 60 /usr/local/bin/unionfuse "$@"; }
# One line per entry: type, mode, owner, content hash or device numbers, path.
tree_digest() {
    (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | while IFS= read -r p; do
        if [ -L "$p" ]; then
            printf 'l %s -> %s\n' "$p" "$(readlink "$p")"
        elif [ -f "$p" ]; then
            printf 'f %s %s %s\n' "$(stat -c '%a %u:%g' "$p")" "$(sha256sum <"$p" | cut -c1-16)" "$p"
        elif [ -d "$p" ]; then
            printf 'd %s %s\n' "$(stat -c '%a %u:%g' "$p")" "$p"
        else
            printf '%s %s\n' "$(stat -c '%F %t:%T %a %u:%g' "$p")" "$p"
        fi
    done)
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if is_mounted "$KMNT"; then
        umount "$KMNT" 2>/dev/null || umount -l "$KMNT"
    fi
    if is_mounted "$MNT"; then
        unionfuse umount "$MNT" 2>/dev/null
        if is_mounted "$MNT"; then
            fusermount3 -u -z "$MNT" 2>/dev/null || umount -l "$MNT"
        fi
    fi
    if is_mounted "$MNT" || is_mounted "$KMNT"; then
        echo "demo.sh: could not unmount everything; leaving $DEMO in place" >&2
        [ "$rc" -ne 0 ] || rc=1
    elif [ "${UNIONFUSE_DEMO_KEEP:-0}" = 1 ]; then
        echo "demo.sh: kept $DEMO"
    else
        rm -rf --one-file-system "$DEMO"
    fi
    if [ "$rc" -eq 0 ]; then
        printf '\ndemo.sh: all checks passed\n'
    else
        printf '\ndemo.sh: FAILED (exit %s)\n' "$rc" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

cd "$DEMO"

# --- the layers -----------------------------------------------------------------------
section "1. Three lower layers (the first --lower is the top-most)"
mk() { mkdir -p "$(dirname "$1")" && printf '%s\n' "$2" >"$1"; }

L1=$DEMO/layer1-base
mk "$L1/etc/hostname" "base"
mk "$L1/etc/motd" "motd from layer1-base"
mk "$L1/docs/readme.txt" "readme from layer1-base"
mk "$L1/docs/guide.txt" "guide from layer1-base"
mk "$L1/docs/faq.txt" "faq from layer1-base"
mk "$L1/data/a.txt" "a"
mk "$L1/data/b.txt" "b"
mk "$L1/app/config.ini" "[app]"
mk "$L1/app/lib/util.py" "def util(): pass"
mk "$L1/var/log/old.log" "old log line"
mk "$L1/bin/tool" "#!/bin/sh"
chmod 0755 "$L1/bin/tool"
ln "$L1/bin/tool" "$L1/bin/tool-hardlink"

L2=$DEMO/layer2
mk "$L2/etc/motd" "motd from layer2"
mkdir -p "$L2/docs"
: >"$L2/docs/.wh.guide.txt"         # OCI whiteout: hides docs/guide.txt below
mk "$L2/data/c.txt" "c"
: >"$L2/data/.wh..wh..opq"          # OCI opaque marker: hides data/* below

L3=$DEMO/layer3-top
mkdir -p "$L3/docs" "$L3/var/log"
mknod "$L3/docs/faq.txt" c 0 0      # overlayfs whiteout: hides docs/faq.txt below
setfattr -n trusted.overlay.opaque -v y "$L3/var/log"   # overlayfs opaque dir
mk "$L3/var/log/new.log" "new log line"
mk "$L3/app/VERSION" "1.0"

mkdir -p "$DEMO/upper" "$DEMO/work" "$MNT"
for l in layer1-base layer2 layer3-top; do
    run_sh "find $l -mindepth 1 | LC_ALL=C sort"
done
run ls -l layer2/docs layer3-top/docs
run getfattr -n trusted.overlay.opaque layer3-top/var/log

# --- mount ----------------------------------------------------------------------------
section "2. Mount: unionfuse mount --lower TOP ... --lower BOTTOM --upper U --work W MNT"
run unionfuse mount --lower "$L3" --lower "$L2" --lower "$L1" \
    --upper "$DEMO/upper" --work "$DEMO/work" --whiteout overlay "$MNT"
check "merged is a mount point" is_mounted "$MNT"
run_sh "grep ' $MNT ' /proc/self/mountinfo | cut -d' ' -f5,7-"

section "3. The merged tree"
run ls -la merged
run_sh "find merged -mindepth 1 | LC_ALL=C sort"
run cat merged/etc/motd merged/etc/hostname
expected_tree="merged/app
merged/app/VERSION
merged/app/config.ini
merged/app/lib
merged/app/lib/util.py
merged/bin
merged/bin/tool
merged/bin/tool-hardlink
merged/data
merged/data/c.txt
merged/docs
merged/docs/readme.txt
merged/etc
merged/etc/hostname
merged/etc/motd
merged/var
merged/var/log
merged/var/log/new.log"
check "tree = layers merged by the union rules" \
    same "$(find merged -mindepth 1 | LC_ALL=C sort)" "$expected_tree"
check "etc/motd comes from layer2 (top-most wins)" same "$(cat merged/etc/motd)" "motd from layer2"
note "docs/guide.txt: hidden by layer2's .wh.guide.txt (OCI whiteout)"
note "docs/faq.txt:   hidden by layer3's 0/0 character device (overlayfs whiteout)"
note "data/{a,b}.txt: hidden by layer2's .wh..wh..opq (OCI opaque dir)"
note "var/log/old.log: hidden by layer3's trusted.overlay.opaque=y (overlayfs opaque dir)"

# --- copy-up --------------------------------------------------------------------------
section "4. Copy-up: writing a lower file copies it to upper first"
ino_before=$(stat -c %i merged/etc/hostname)
run_sh 'echo "appended through the mount" >> merged/etc/hostname'
run cat merged/etc/hostname
run cat layer1-base/etc/hostname
run ls -l upper/etc
check "the merged file has the new line" \
    same "$(cat merged/etc/hostname)" $'base\nappended through the mount'
check "the lower file is unchanged" same "$(cat "$L1/etc/hostname")" "base"
check "the copy lives in upper" same "$(cat upper/etc/hostname 2>/dev/null)" \
    $'base\nappended through the mount'
check "st_ino did not change on copy-up" same "$(stat -c %i merged/etc/hostname)" "$ino_before"

section "5. Hard links stay one inode through copy-up"
run_sh "stat -c '%i %h %n' merged/bin/tool merged/bin/tool-hardlink"
run_sh 'echo "echo patched" >> merged/bin/tool'
run tail -n1 merged/bin/tool-hardlink
check "the other name sees the write" same "$(tail -n1 merged/bin/tool-hardlink)" "echo patched"
check "both names are one inode" \
    same "$(stat -c %i merged/bin/tool-hardlink)" "$(stat -c %i merged/bin/tool)"
check "the lower file is unchanged" same "$(cat "$L1/bin/tool")" "#!/bin/sh"

# --- whiteout -------------------------------------------------------------------------
section "6. Deleting a lower file writes a whiteout (0/0 character device) in upper"
run rm merged/docs/readme.txt
run ls -la merged/docs
run ls -l upper/docs
run ls -l layer1-base/docs
check "docs is empty in the merged view" same "$(ls -A merged/docs)" ""
check "upper/docs/readme.txt is a 0/0 char device" \
    same "$(stat -c '%F %t:%T' upper/docs/readme.txt 2>/dev/null)" "character special file 0:0"
check "the lower file is still there" test -f "$L1/docs/readme.txt"

# --- opaque dir -----------------------------------------------------------------------
section "7. Replacing a lower directory: rm -rf, then mkdir gives an opaque dir"
run rm -rf merged/data
run mkdir merged/data
run_sh 'echo fresh > merged/data/fresh.txt'
run ls -la merged/data
run getfattr -n trusted.overlay.opaque upper/data
check "only the new file is visible" same "$(ls -A merged/data)" "fresh.txt"
check "upper/data is marked opaque" \
    same "$(getfattr --only-values -n trusted.overlay.opaque upper/data 2>/dev/null)" "y"

# --- rename of a lower dir ------------------------------------------------------------
section "8. Renaming a directory that lives in lower layers (redirect, no EXDEV)"
run mv merged/app merged/application
run_sh "find merged/application | LC_ALL=C sort"
run_sh 'ls merged/app 2>&1 || true'
run_sh "getfattr -d -m '^trusted\.overlay\.' upper/application"
run ls -l upper
check "old name is gone" test ! -e merged/app
check "new name has the files of all layers" same "$(cd merged/application && find . | LC_ALL=C sort)" \
    "$(printf '%s\n' . ./VERSION ./config.ini ./lib ./lib/util.py)"
check "upper/application carries a redirect xattr" \
    getfattr --only-values -n trusted.overlay.redirect upper/application

# --- unmount --------------------------------------------------------------------------
fuse_digest=$(tree_digest merged)
section "9. Unmount"
run unionfuse umount "$MNT"
check "merged is no longer a mount point" eval '! is_mounted "$MNT"'
note "what the mount left in upper:"
run_sh "find upper -mindepth 1 -printf '%M %p\n' | LC_ALL=C sort -k2"

# --- the kernel's view ----------------------------------------------------------------
section "10. Kernel overlayfs on the same upper"
note "The kernel reads only the overlayfs forms, so layer2's OCI .wh. entries are converted"
note "in a copy (as an image store does when it unpacks a layer for overlayfs)."
cp -a "$L2" "$DEMO/layer2-kernel"
find "$DEMO/layer2-kernel" -name '.wh.*' | while IFS= read -r wh; do
    dir=$(dirname "$wh")
    base=$(basename "$wh")
    if [ "$base" = .wh..wh..opq ]; then
        setfattr -n trusted.overlay.opaque -v y "$dir"
    else
        mknod "$dir/${base#.wh.}" c 0 0
    fi
    rm -f "$wh"
done
mkdir -p "$DEMO/kernel-work" "$KMNT"
run mount -t overlay overlay \
    -o "lowerdir=$L3:$DEMO/layer2-kernel:$L1,upperdir=$DEMO/upper,workdir=$DEMO/kernel-work,redirect_dir=on" \
    "$KMNT"
run_sh "find kernel-merged -mindepth 1 | LC_ALL=C sort"
run cat kernel-merged/etc/hostname
kernel_digest=$(tree_digest "$KMNT")
# Hard links: the kernel (without index=on and its own origin records) reads the second
# name from the lower layer; unionfuse keeps the link with bookkeeping the kernel ignores.
if [ "$(tail -n1 "$KMNT/bin/tool-hardlink")" != "echo patched" ]; then
    note "bin/tool-hardlink: the kernel shows the lower copy (it does not read unionfuse's"
    note "hard-link record), so it is left out of the comparison"
    fuse_digest=$(grep -v ' ./bin/tool-hardlink$' <<<"$fuse_digest")
    kernel_digest=$(grep -v ' ./bin/tool-hardlink$' <<<"$kernel_digest")
fi
if [ "$fuse_digest" = "$kernel_digest" ]; then
    printf '  [ok] kernel overlayfs shows the same tree as unionfuse (%s entries)\n' \
        "$(wc -l <<<"$kernel_digest")"
else
    printf '  [FAILED] kernel overlayfs shows a different tree (< unionfuse, > kernel):\n' >&2
    diff <(echo "$fuse_digest") <(echo "$kernel_digest") >&2 || true
    failures=$((failures + 1))
fi
run umount "$KMNT"

section "11. Containers: import a busybox image, run, diff, commit, history"
STORE=${UNIONFUSE_ROOT:-/var/lib/unionfuse}
note "store: $STORE (set UNIONFUSE_ROOT to use another)"
uf() { unionfuse --root "$STORE" "$@"; }
run bash "$ROOT/scripts/busybox-rootfs.sh" "$DEMO/busybox.tar"
run uf import "$DEMO/busybox.tar" busybox --change 'CMD ["/bin/sh"]'
run uf images
CNAME=demo-$$
run uf run --name "$CNAME" busybox sh -c \
    'echo "hello from a container" > /hello; rm /etc/hostname; mkdir -p /srv/app; echo built > /srv/app/info; id; exit 3' \
    || code=$?
check "run returns the container's exit code (3)" same "${code:-0}" 3
changes=$(uf diff "$CNAME")
run uf diff "$CNAME"
check "diff: A /hello" grep -qx 'A /hello' <<<"$changes"
check "diff: D /etc/hostname" grep -qx 'D /etc/hostname' <<<"$changes"
check "diff: C /etc" grep -qx 'C /etc' <<<"$changes"
run uf commit -m "demo change" "$CNAME" demo-busybox
run uf history demo-busybox
out=$(uf run --rm demo-busybox cat /hello /srv/app/info)
printf '\n$ unionfuse run --rm demo-busybox cat /hello /srv/app/info\n%s\n' "$out"
check "the committed image has the change" same "$out" "$(printf 'hello from a container\nbuilt')"
run uf rm "$CNAME"
check "no container mount is left" bash -c "! grep -q ' $STORE/containers/' /proc/self/mountinfo"
note "interactive: unionfuse run -it --name example busybox /bin/sh"

section "12. Build: examples/busybox/Dockerfile (FROM busybox), then a cached rebuild"
run uf build -t hello "$ROOT/examples/busybox"
out=$(uf run --rm hello)
printf '\n$ unionfuse run --rm hello\n%s\n' "$out"
check "the built image runs its CMD" grep -q "Welcome to a unionfuse-built image." <<<"$out"
rebuild=$(uf build -t hello "$ROOT/examples/busybox")
printf '\n$ unionfuse build -t hello examples/busybox   # again: every step from the cache\n'
echo "$rebuild" | tail -n 4
check "a rebuild with nothing changed is all cache" bash -c "! grep -q 'Running in' <<<\"\$0\"" "$rebuild"
run uf history hello

section "Done"
if [ "$failures" -gt 0 ]; then
    echo "demo.sh: $failures check(s) failed" >&2
    exit 1
fi
