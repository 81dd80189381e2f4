#!/usr/bin/env bash
# Replication benchmark on an allocated base (docs/performance.md, "Allocated base"): a primary and
# a secondary on loopback start on fresh 2 GiB images, the whole disk is written once through the
# primary (seqwrite-1m-qd8 for FILL seconds; it wraps around, so it covers the disk when it runs
# at 2 GiB / FILL or faster; the script checks that both images are fully allocated), a
# checkpoint empties the layers, and then one workload is measured in async mode. The
# secondary's copy-before-write then reads data instead of holes, as on a guest disk that
# is full of data. Prints IOPS, MiB/s and the CPU seconds per GiB of each side, counted until
# the secondary has applied everything.
# Usage: qemu-scripts/bench-allocated.sh [--workload W] [--cluster-size SIZE] [--seconds S]
#                                        [--fill S] [--dir DIR]
# Environment: COLO_BLK (the colo-blk binary to measure; default: build target/release/colo-blk)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source-path=SCRIPTDIR source=bench-lib.sh
. "$REPO/qemu-scripts/bench-lib.sh"
W=randwrite-4k-qd32
CLUSTER=64K
SECONDS_PER=5
FILL=20
D=
while [ $# -gt 0 ]; do
    case "$1" in
    --workload) W=$2; shift 2 ;;
    --cluster-size) CLUSTER=$2; shift 2 ;;
    --seconds) SECONDS_PER=$2; shift 2 ;;
    --fill) FILL=$2; shift 2 ;;
    --dir) D=$2; shift 2 ;;
    -h | --help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done

cd "$REPO"
[ -n "${COLO_BLK:-}" ] || cargo build --release -q
COLO=${COLO_BLK:-$REPO/target/release/colo-blk}
BENCH=$(blkbench_path)
[ -x "$BENCH" ] || { echo "blkbench not built" >&2; exit 1; }
[ -n "$D" ] || D=$(mktemp -d /var/tmp/colo-blk-alloc.XXXXXX)
mkdir -p "$D"
rm -rf "$D"/p.img* "$D"/s.img* "$D/layers"

PIDS=()
trap 'for p in "${PIDS[@]}"; do stop "$p"; done' EXIT
wait_for() { # FILE PATTERN
    for _ in $(seq 1 600); do
        grep -aq "$2" "$1" 2>/dev/null && return 0
        sleep 0.05
    done
    echo "timeout waiting for '$2' in $1" >&2
    return 1
}

"$COLO" --role secondary --insecure-link --image "$D/s.img" --size 2G --listen 127.0.0.1:0 \
    --layer-dir "$D/layers" --qmp "$D/s.qmp" --cluster-size "$CLUSTER" >"$D/s.log" 2>&1 &
SP=$!
PIDS+=("$SP")
wait_for "$D/s.log" '"ready"'
PORT=$(grep -ao '127.0.0.1:[0-9]*' "$D/s.log" | head -n1 | cut -d: -f2)
"$COLO" --role primary --insecure-link --image "$D/p.img" --size 2G --socket "$D/p.sock" \
    --peer "127.0.0.1:$PORT" --qmp "$D/p.qmp" >"$D/p.log" 2>&1 &
PP=$!
PIDS+=("$PP")
wait_for "$D/p.log" '"ready"'
wait_for "$D/p.log" 'replicating to'

"$BENCH" --socket "$D/p.sock" --workload seqwrite-1m-qd8 --seconds "$FILL" --warmup 0 >/dev/null
qmp "$D/p.qmp" replication-checkpoint '{"timeout-ms": 600000}' >/dev/null
for img in p.img s.img; do
    used=$(($(stat -c '%b * %B' "$D/$img")))
    [ "$used" -ge $((2 << 30)) ] || {
        echo "$img has only $used bytes allocated after the fill: raise --fill" >&2
        exit 1
    }
done
sync

TCK=$(getconf CLK_TCK)
cpu() { awk -v t="$TCK" '{print ($14 + $15) / t}' "/proc/$1/stat"; }
p0=$(cpu "$PP")
s0=$(cpu "$SP")
line=$("$BENCH" --socket "$D/p.sock" --workload "$W" --seconds "$SECONDS_PER" --warmup 0 --json --label allocated)
qmp "$D/p.qmp" replication-prepare-checkpoint '{"timeout-ms": 600000}' >/dev/null
p1=$(cpu "$PP")
s1=$(cpu "$SP")
python3 - "$line" "$p0" "$p1" "$s0" "$s1" "$CLUSTER" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
p0, p1, s0, s1 = map(float, sys.argv[2:6])
gib = r["mib_s"] * r["seconds"] / 1024
print(f'{r["workload"]} allocated base, --cluster-size {sys.argv[6]}, async: {r["iops"]:,.0f} IOPS, '
      f'{r["mib_s"]:,.0f} MiB/s; CPU s per GiB: primary {(p1 - p0) / gib:.2f}, secondary {(s1 - s0) / gib:.2f}')
PY
