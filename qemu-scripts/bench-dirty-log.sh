#!/usr/bin/env bash
# Cost of the primary's persistent dirty log (docs/performance.md, "Persistent dirty log (primary)"):
# a primary with a live secondary on loopback, randwrite 4k at QD32 and QD1, with the log
# (default) and with --no-dirty-log, runs in ABBA order (A B B A A B for 3 reps), medians.
# Usage: qemu-scripts/bench-dirty-log.sh [--reps N] [--seconds S] [--dir DIR] [--size SIZE]
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source-path=SCRIPTDIR source=bench-lib.sh
. "$REPO/qemu-scripts/bench-lib.sh"
REPS=3
SECONDS_PER=5
WORKDIR=
SIZE=2G
WORKING_SET=1G
while [ $# -gt 0 ]; do
    case "$1" in
    --reps) REPS=$2; shift 2 ;;
    --seconds) SECONDS_PER=$2; shift 2 ;;
    --dir) WORKDIR=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    -h | --help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done

log() { echo "[bench-dirty-log] $*" >&2; }

cd "$REPO"
cargo build --release -q
BENCH=$(blkbench_path)
COLO=$REPO/target/release/colo-blk
[ -x "$BENCH" ] || { echo "blkbench not built" >&2; exit 1; }

[ -n "$WORKDIR" ] || WORKDIR=$(mktemp -d /var/tmp/colo-blk-dlog.XXXXXX)
mkdir -p "$WORKDIR"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

start() { # LOGFILE MARKER ARGS...
    local logf=$1 marker=$2
    shift 2
    "$COLO" "$@" >"$logf" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    for _ in $(seq 1 600); do
        grep -q "$marker" "$logf" && { echo "$pid"; return 0; }
        kill -0 "$pid" 2>/dev/null || { cat "$logf" >&2; return 1; }
        sleep 0.05
    done
    echo "timeout waiting for '$marker' in $logf" >&2
    return 1
}

RESULTS=$WORKDIR/results.jsonl
: >"$RESULTS"

run() { # LABEL [PRIMARY ARGS...]
    local label=$1
    shift
    # Fresh images created by colo-blk (sparse, known zero: the pair starts in sync).
    rm -rf "$WORKDIR"/p.img* "$WORKDIR"/s.img* "$WORKDIR/layers"
    local spid ppid port
    spid=$(start "$WORKDIR/secondary.log" "waiting for the primary" --role secondary --insecure-link --image "$WORKDIR/s.img" \
        --size "$SIZE" --listen 127.0.0.1:0 --layer-dir "$WORKDIR/layers" --qmp "$WORKDIR/s.qmp")
    port=$(grep -o '127.0.0.1:[0-9]*' "$WORKDIR/secondary.log" | head -n1 | cut -d: -f2)
    ppid=$(start "$WORKDIR/primary.log" "replicating to" --role primary --insecure-link --image "$WORKDIR/p.img" \
        --size "$SIZE" --socket "$WORKDIR/p.sock" --peer "127.0.0.1:$port" --qmp "$WORKDIR/p.qmp" "$@")
    "$BENCH" --socket "$WORKDIR/p.sock" --workload randwrite-4k-qd32,randwrite-4k-qd1 \
        --working-set "$WORKING_SET" --seconds "$SECONDS_PER" --json --label "$label" >>"$RESULTS"
    stop "$ppid"
    stop "$spid"
}

for rep in $(seq 1 "$REPS"); do
    if [ $((rep % 2)) -eq 1 ]; then order="log nolog"; else order="nolog log"; fi
    for v in $order; do
        log "rep $rep: $v"
        if [ "$v" = log ]; then run dirty-log; else run no-dirty-log --no-dirty-log; fi
    done
done

python3 - "$RESULTS" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    rows.setdefault((r["workload"], r["label"]), []).append(r)
print("| workload | without log IOPS | with log IOPS | with/without | runs without | runs with |")
print("|---|---:|---:|---:|---|---|")
for w in sorted({k[0] for k in rows}):
    a = [x["iops"] for x in rows[(w, "no-dirty-log")]]
    b = [x["iops"] for x in rows[(w, "dirty-log")]]
    ma, mb = statistics.median(a), statistics.median(b)
    fmt = lambda v: ", ".join(f"{x:,.0f}" for x in v)
    print(f"| {w} | {ma:,.0f} | {mb:,.0f} | **{mb/ma:.3f}** | {fmt(a)} | {fmt(b)} |")
PY
