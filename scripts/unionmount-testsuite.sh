#!/bin/bash
# Run the kernel overlayfs test suite (unionmount-testsuite) against unionfuse.
#
#   bash scripts/unionmount-testsuite.sh CHECKOUT [MODE...]
#
# CHECKOUT: a checkout of unionmount-testsuite (github.com/amir73il/unionmount-testsuite;
# never committed here).  MODE: extra `run` arguments for one pass, quoted, e.g.
# "--ov" "--ov=3 --verify"; default: every mode below.  Each pass runs
# `./run --ov[=N] --fuse=unionfuse [--samefs] [--verify]`: the suite mounts with
# `mount -t fuse.unionfuse`, i.e. the `unionfuse` that mount.fuse3 finds
# (/usr/local/bin/unionfuse, written by scripts/install.sh for this checkout).
# Directory renames are included (no --xdev).  Needs root.
#
# The suite mounts tmpfs on /lower, /upper and /base (it creates nothing else outside
# them); the union mount point is a temporary dir (UNIONMOUNT_MNTPOINT), not /mnt.
# A failing test stops the suite: a pass reports how many of its tests ran before.
# Exit status 0 only if every test of every pass ran and passed.
set -u
if [ $# -lt 1 ] || [ ! -x "$1/run" ]; then
    echo "usage: $0 UNIONMOUNT-TESTSUITE-CHECKOUT [MODE...]" >&2
    exit 2
fi
suite=$(cd "$1" && pwd)
shift
if [ $# -gt 0 ]; then
    modes=("$@")
else
    modes=("--ov" "--ov --verify" "--ov=3" "--ov=3 --verify" "--ov --samefs"
           "--ov --samefs --verify" "--ov=3 --samefs" "--ov=3 --samefs --verify")
fi
[ "$(id -u)" = 0 ] || { echo "$0: needs root" >&2; exit 2; }
command -v unionfuse >/dev/null || { echo "$0: no unionfuse on PATH: run scripts/install.sh" >&2; exit 2; }

mnt=$(mktemp -d /tmp/unionmount-ts.XXXXXX)
logs=${UNIONMOUNT_LOGS:-$mnt.logs}
mkdir -p /lower /upper /base "$logs"
cleanup() {
    (cd "$suite" && UNIONMOUNT_MNTPOINT=$mnt ./run --clean-up >/dev/null 2>&1)
    if grep -q " $mnt " /proc/mounts; then fusermount3 -u -z "$mnt" 2>/dev/null; fi
    rmdir "$mnt" 2>/dev/null
}
trap cleanup EXIT

# the test list: the base list plus the directory-rename tests (run without --xdev)
total=$(sed -n '/^tests = \[/,/"rename-move-dir"/p' "$suite/run" | grep '^ *"' | grep -vc rename-exdev)
failed=0
for mode in "${modes[@]}"; do
    read -r first rest <<<"$mode"
    args=("$first" "--fuse=unionfuse")
    # shellcheck disable=SC2206
    [ -n "$rest" ] && args+=($rest)
    want=$total  # --ov=N runs every test twice: rotating up to N layers, then without
    case $first in --ov=*) want=$((2 * total)) ;; esac
    log="$logs/$(echo "$mode" | tr ' =' '_-' | tr -d -).log"
    start=$(date +%s)
    (cd "$suite" && UNIONMOUNT_MNTPOINT=$mnt ./run "${args[@]}") >"$log" 2>&1
    rc=$?
    ran=$(grep -a -cE '^\*\*\* \./run' "$log")
    passed=$ran
    [ $rc -ne 0 ] && passed=$((ran > 0 ? ran - 1 : 0))
    if [ $rc -eq 0 ] && [ "$passed" -eq "$want" ]; then
        printf '%-28s %3d/%d passed  (%ds)\n' "$mode" "$passed" "$want" $(( $(date +%s) - start ))
    else
        failed=1
        last=$(grep -a -E '^\*\*\* \./run' "$log" | tail -1 | sed 's/^\*\*\* //')
        printf '%-28s %3d/%d passed, FAILED at: %s  (log: %s)\n' "$mode" "$passed" "$want" "$last" "$log"
        grep -a -v '^ ' "$log" | tail -3 | sed 's/^/    /'
    fi
done
exit $failed
