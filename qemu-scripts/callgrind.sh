#!/usr/bin/env bash
# Instruction counts of colo-blk's request path under callgrind, with blkbench as the client.
# Wall-clock numbers are noisy on a shared machine; callgrind's instruction counts are not.
#
#   qemu-scripts/callgrind.sh [--colo BIN] [--bench BIN] [--out DIR] [--seconds S]
#                             [--workloads a,b] [-- extra colo-blk options...]
#
# For every workload: colo-blk runs under `valgrind --tool=callgrind` on a 256 MiB image in the
# page cache (so the numbers are the backend's user-space cost, not the disk's), blkbench runs
# the workload once (no warm-up), colo-blk is stopped, and the script prints the request count
# (blkbench's count), total instructions and instructions per request, plus the
# top functions by inclusive and self cost into DIR/<workload>.txt.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
COLO=$REPO/target/release/colo-blk
BENCH=
OUT=$REPO/target/callgrind
SECONDS_PER=4
WORKLOADS=randread-4k-qd1,randread-4k-qd32,randwrite-4k-qd1,randwrite-4k-qd32
while [ $# -gt 0 ]; do
    case "$1" in
    --colo) COLO=$2; shift 2 ;;
    --bench) BENCH=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --seconds) SECONDS_PER=$2; shift 2 ;;
    --workloads) WORKLOADS=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
EXTRA=("$@")
if [ -z "$BENCH" ]; then
    BENCH=$(ls -t "$REPO"/target/release/deps/blkbench-* | grep -v '\.d$' | head -1)
fi
mkdir -p "$OUT"
WORK=$(mktemp -d /var/tmp/colo-callgrind.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
dd if=/dev/zero of="$WORK/disk.img" bs=1M count=256 status=none
cat "$WORK/disk.img" >/dev/null

printf '| workload | requests | instructions (total) | instructions / request | load |\n'
printf '|---|---:|---:|---:|---|\n'
for wl in ${WORKLOADS//,/ }; do
    # Under valgrind the first requests can race with blkbench's memory-region registration
    # (it fails with "data buffer outside guest memory"): retry the run a few times.
    for attempt in 1 2 3; do
        rm -f "$WORK/vhost.sock" "$OUT/$wl.cg" "$OUT/$wl.log"
        valgrind --tool=callgrind --callgrind-out-file="$OUT/$wl.cg" \
            "$COLO" --socket "$WORK/vhost.sock" --image "$WORK/disk.img" "${EXTRA[@]}" \
            >"$OUT/$wl.log" 2>&1 &
        PID=$!
        for _ in $(seq 600); do
            grep -q "listening on" "$OUT/$wl.log" && break
            sleep 0.1
        done
        load=$(cut -d' ' -f1 /proc/loadavg)
        ok=1
        "$BENCH" --socket "$WORK/vhost.sock" --workload "$wl" --seconds "$SECONDS_PER" \
            --warmup 0 --json >"$OUT/$wl.json" 2>"$OUT/$wl.bench" || ok=0
        kill -TERM "$PID"
        wait "$PID" || true
        [ "$ok" = 1 ] && break
        echo "$wl: attempt $attempt failed: $(tail -1 "$OUT/$wl.bench")" >&2
    done
    [ "$ok" = 1 ] || exit 1
    callgrind_annotate --inclusive=yes "$OUT/$wl.cg" >"$OUT/$wl.incl.txt" 2>/dev/null || true
    callgrind_annotate "$OUT/$wl.cg" >"$OUT/$wl.self.txt" 2>/dev/null || true
    total=$(sed -n 's/^\([0-9,]*\) *(100.0%) *PROGRAM TOTALS.*/\1/p' "$OUT/$wl.self.txt" | tr -d ,)
    # Requests: every completion blkbench counted (no warm-up, so that is all of them but the
    # few still in flight when the window closed).
    reqs=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["ios"])' "$OUT/$wl.json")
    per=$(python3 -c "print(f'{int(\"$total\") / max(1, int(\"$reqs\")):,.0f}')")
    printf '| %s | %s | %s | %s | %s |\n' "$wl" "$reqs" "$(printf "%'d" "$total")" "$per" "$load"
done
