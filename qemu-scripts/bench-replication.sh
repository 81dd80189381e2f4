#!/usr/bin/env bash
# Replication benchmark (docs/performance.md, "Replication"):
#  1. write throughput of a primary with a live secondary on loopback vs the same image served
#     standalone, in one run, alternating (4 KiB random write QD32, 1 MiB sequential write);
#  2. checkpoint cost with 1 MiB and with 1 GiB buffered on the secondary;
#  3. failover time without and with Secondary VM writes.
# Usage: qemu-scripts/bench-replication.sh [--reps N] [--seconds S] [--dir DIR] [--throughput-only]
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPS=3
SECONDS_PER=5
WORKDIR=
COSTS=1
while [ $# -gt 0 ]; do
    case "$1" in
    --throughput-only) COSTS=0; shift ;;
    --reps) REPS=$2; shift 2 ;;
    --seconds) SECONDS_PER=$2; shift 2 ;;
    --dir) WORKDIR=$2; shift 2 ;;
    -h | --help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done

log() { echo "[bench-replication] $*" >&2; }

cd "$REPO"
cargo build --release -q
BENCH=$(cargo bench --bench blkbench --no-run --message-format=json-render-diagnostics 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="blkbench" and m.get("executable"):
        print(m["executable"])' | tail -n1)
COLO=$REPO/target/release/colo-blk
[ -x "$BENCH" ] || { echo "blkbench not built" >&2; exit 1; }

[ -n "$WORKDIR" ] || WORKDIR=$(mktemp -d /var/tmp/colo-blk-repl.XXXXXX)
mkdir -p "$WORKDIR"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

# Starts colo-blk in the background, waits for a log line; prints the pid.
start() {
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
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

qmp() { # qmp SOCKET COMMAND [JSON-ARGS]
    python3 - "$@" <<'PY'
import asyncio, json, sys
from qemu.qmp import QMPClient
async def main(path, cmd, args):
    q = QMPClient("bench")
    await q.connect(path)
    r = await q.execute(cmd, json.loads(args) if args else None)
    print(json.dumps(r))
    await q.disconnect()
asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else ""))
PY
}

SIZE=2G
WORKLOADS=randwrite-4k-qd32,seqwrite-1m-qd8
RESULTS=$WORKDIR/results.jsonl
: >"$RESULTS"

run_standalone() {
    rm -f "$WORKDIR/p.img"
    fallocate -l $SIZE "$WORKDIR/p.img"
    local pid
    pid=$(start "$WORKDIR/standalone.log" "vhost-user socket listening" --socket "$WORKDIR/p.sock" --image "$WORKDIR/p.img")
    "$BENCH" --socket "$WORKDIR/p.sock" --workload $WORKLOADS --seconds "$SECONDS_PER" --json --label standalone >>"$RESULTS"
    stop "$pid"
}

run_primary() {
    rm -rf "$WORKDIR/p.img" "$WORKDIR/s.img" "$WORKDIR/layers"
    fallocate -l $SIZE "$WORKDIR/p.img"
    fallocate -l $SIZE "$WORKDIR/s.img"
    local spid ppid
    spid=$(start "$WORKDIR/secondary.log" "waiting for the primary" --role secondary --insecure-link --image "$WORKDIR/s.img" \
        --listen 127.0.0.1:0 --layer-dir "$WORKDIR/layers" --qmp "$WORKDIR/s.qmp")
    local port
    port=$(grep -o '127.0.0.1:[0-9]*' "$WORKDIR/secondary.log" | head -n1 | cut -d: -f2)
    ppid=$(start "$WORKDIR/primary.log" "replicating to" --role primary --insecure-link --image "$WORKDIR/p.img" \
        --socket "$WORKDIR/p.sock" --peer "127.0.0.1:$port" --qmp "$WORKDIR/p.qmp")
    "$BENCH" --socket "$WORKDIR/p.sock" --workload $WORKLOADS --seconds "$SECONDS_PER" --json --label primary >>"$RESULTS"
    qmp "$WORKDIR/p.qmp" replication-checkpoint '{"timeout-ms": 600000}' >/dev/null
    stop "$ppid"
    stop "$spid"
}

for rep in $(seq 1 "$REPS"); do
    log "rep $rep: standalone"
    run_standalone
    log "rep $rep: primary + secondary"
    run_primary
done

python3 - "$RESULTS" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    rows.setdefault((r["workload"], r["label"]), []).append(r)
print("| workload | standalone IOPS | primary IOPS | primary/standalone | standalone MiB/s | primary MiB/s |")
print("|---|---:|---:|---:|---:|---:|")
for w in sorted({k[0] for k in rows}):
    s = statistics.median(x["iops"] for x in rows[(w, "standalone")])
    p = statistics.median(x["iops"] for x in rows[(w, "primary")])
    sm = statistics.median(x["mib_s"] for x in rows[(w, "standalone")])
    pm = statistics.median(x["mib_s"] for x in rows[(w, "primary")])
    print(f"| {w} | {s:,.0f} | {p:,.0f} | **{p/s:.2f}** | {sm:,.0f} | {pm:,.0f} |")
PY

# Sequential 1 MiB writes over the first MIB MiB of a device until each block was written.
fill() { # SOCKET MIB
    local secs=$(( $2 / 100 + 2 ))
    "$BENCH" --socket "$1" --workload seqwrite-1m-qd8 --working-set "$2M" --warmup 0 --seconds "$secs" >/dev/null
}

# Checkpoint and failover costs on a secondary with a Secondary VM socket.
checkpoint_and_failover() { # BUFFERED_MIB SVM_MIB
    local buffered=$1 svm=$2
    rm -rf "$WORKDIR/p.img" "$WORKDIR/s.img" "$WORKDIR/layers"
    fallocate -l $SIZE "$WORKDIR/p.img"
    fallocate -l $SIZE "$WORKDIR/s.img"
    local spid ppid port
    spid=$(start "$WORKDIR/secondary.log" "waiting for the primary" --role secondary --insecure-link --image "$WORKDIR/s.img" \
        --listen 127.0.0.1:0 --layer-dir "$WORKDIR/layers" --qmp "$WORKDIR/s.qmp" --socket "$WORKDIR/svm.sock")
    port=$(grep -o '127.0.0.1:[0-9]*' "$WORKDIR/secondary.log" | head -n1 | cut -d: -f2)
    ppid=$(start "$WORKDIR/primary.log" "replicating to" --role primary --insecure-link --image "$WORKDIR/p.img" \
        --socket "$WORKDIR/p.sock" --peer "127.0.0.1:$port" --qmp "$WORKDIR/p.qmp")
    # Fill the hidden layer: sequential 1 MiB primary writes over the first BUFFERED_MIB of the
    # disk, long enough to cover it (query-replication below reports what is buffered).
    fill "$WORKDIR/p.sock" "$buffered"
    qmp "$WORKDIR/p.qmp" replication-prepare-checkpoint '{"timeout-ms": 600000}' >/dev/null
    if [ "$svm" -gt 0 ]; then
        fill "$WORKDIR/svm.sock" "$svm"
    fi
    local q
    q=$(qmp "$WORKDIR/s.qmp" query-replication)
    if [ "$svm" -eq 0 ]; then
        local t0 t1
        t0=$(date +%s%N)
        qmp "$WORKDIR/p.qmp" replication-checkpoint '{"timeout-ms": 600000}' >/dev/null
        t1=$(date +%s%N)
        echo "checkpoint with $(echo "$q" | python3 -c 'import json,sys; print(json.load(sys.stdin)["hidden-bytes"] >> 20)') MiB hidden: $(( (t1 - t0) / 1000 )) us end to end (python QMP client start-up included); secondary: $(grep -o 'layers dropped in [^ ]*' "$WORKDIR/secondary.log" | tail -n1)"
        fill "$WORKDIR/p.sock" "$buffered"
        qmp "$WORKDIR/p.qmp" replication-prepare-checkpoint '{"timeout-ms": 600000}' >/dev/null
    fi
    local f
    f=$(qmp "$WORKDIR/s.qmp" replication-failover)
    echo "failover: hidden $(echo "$q" | python3 -c 'import json,sys; print(json.load(sys.stdin)["hidden-bytes"])') B, active (SVM) $(echo "$q" | python3 -c 'import json,sys; print(json.load(sys.stdin)["active-bytes"])') B -> $f"
    stop "$ppid"
    stop "$spid"
}
[ "$COSTS" = 1 ] || exit 0
checkpoint_and_failover 1 0
checkpoint_and_failover 1024 0
checkpoint_and_failover 64 0
checkpoint_and_failover 64 64
checkpoint_and_failover 1024 512
