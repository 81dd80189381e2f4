#!/usr/bin/env bash
# Replication link benchmarks (docs/performance.md, "Over a real link" and its TLS paragraph):
#  tls:   primary + secondary on loopback, TLS 1.3 with a pre-shared key (--tls-psk-file) vs
#         --insecure-link, ABBA order (rep 1: tls, insecure; rep 2: insecure, tls; ...);
#  netns: primary and secondary in two network namespaces joined by a veth pair, the primary's
#         end rate-limited with `tc qdisc ... tbf` (1gbit, 10gbit, and no limit), async mode,
#         plus --sync at 1gbit; bytes-in-flight sampled every 50 ms (query-replication) during
#         each workload.
# Workloads: blkbench randwrite-4k-qd32 and seqwrite-1m-qd8, one queue, 2 GiB images (created by colo-blk),
# --insecure-link for the netns part (TLS cost is measured separately). Needs root for netns.
# Usage: qemu-scripts/bench-netns.sh [--part tls|netns|all] [--reps N] [--seconds S] [--dir DIR]
# Environment: COLO_BLK (the colo-blk binary to measure; default: build target/release/colo-blk)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source-path=SCRIPTDIR source=bench-lib.sh
. "$REPO/qemu-scripts/bench-lib.sh"
REPS=3
SECONDS_PER=5
WORKDIR=
PART=all
while [ $# -gt 0 ]; do
    case "$1" in
    --part) PART=$2; shift 2 ;;
    --reps) REPS=$2; shift 2 ;;
    --seconds) SECONDS_PER=$2; shift 2 ;;
    --dir) WORKDIR=$2; shift 2 ;;
    -h | --help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done

log() { echo "[bench-netns] $*" >&2; }

cd "$REPO"
# COLO_BLK: a colo-blk binary to measure (e.g. a copy, so a build during the run changes nothing).
[ -n "${COLO_BLK:-}" ] || cargo build --release -q
BENCH=$(blkbench_path)
COLO=${COLO_BLK:-$REPO/target/release/colo-blk}
[ -x "$BENCH" ] || { echo "blkbench not built" >&2; exit 1; }

[ -n "$WORKDIR" ] || WORKDIR=$(mktemp -d /var/tmp/colo-blk-netns.XXXXXX)
mkdir -p "$WORKDIR"
NS_P=cbbench$$-p
NS_S=cbbench$$-s
DEV_P=cbb$$p
DEV_S=cbb$$s
IP_P=10.251.0.1
IP_S=10.251.0.2
COLO_PIDS_FILE=$WORKDIR/pids
: >"$COLO_PIDS_FILE"
PIDS=()
cleanup() {
    cleanup_colo
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    ip netns del "$NS_P" 2>/dev/null || true
    ip netns del "$NS_S" 2>/dev/null || true
}
trap cleanup EXIT

# start LOG NETNS|- ARGS...: start_colo, in NETNS unless -.
start() {
    local logf=$1 ns=$2
    shift 2
    if [ "$ns" = - ]; then
        start_colo "$logf" "$@"
    else
        start_colo_in "$logf" ip netns exec "$ns" -- "$@"
    fi
}

# sampler SOCKET OUT: polls query-replication every 50 ms until killed; one JSON line per
# sample; its pid is in $SAMPLER.
sampler() {
    python3 - "$1" "$2" >/dev/null 2>&1 <<'PY' &
import asyncio, json, signal, sys
from qemu.qmp import QMPClient
async def main(path, out):
    q = QMPClient("sampler")
    await q.connect(path)
    with open(out, "w") as f:
        while True:
            r = await q.execute("query-replication")
            f.write(json.dumps({k: r[k] for k in ("bytes-in-flight", "frames-in-flight", "window-bytes", "state")}) + "\n")
            f.flush()
            await asyncio.sleep(0.05)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
asyncio.run(main(sys.argv[1], sys.argv[2]))
PY
    SAMPLER=$!
    PIDS+=("$SAMPLER")
}

SIZE=2G
WORKLOADS=(randwrite-4k-qd32 seqwrite-1m-qd8)
RESULTS=$WORKDIR/results.jsonl
: >"$RESULTS"

# pair LABEL NS_PRIMARY NS_SECONDARY HOST SECURITY PRIMARY_EXTRA...: one primary + secondary
# run of both workloads; results labelled LABEL.
pair() {
    local label=$1 nsp=$2 nss=$3 host=$4 security=$5
    shift 5
    local sec=()
    if [ "$security" = tls ]; then
        sec=(--tls-psk-file "$WORKDIR/link.psk")
    else
        sec=(--insecure-link)
    fi
    # colo-blk creates both images (--size): known zero, so the pair starts in sync. Images
    # made by fallocate would carry no replication history, and the secondary refuses the full
    # sync they need unless it is allowed to.
    rm -rf "$WORKDIR"/p.img* "$WORKDIR"/s.img* "$WORKDIR/layers"
    local spid ppid port
    spid=$(start "$WORKDIR/secondary.log" "$nss" --role secondary "${sec[@]}" --image "$WORKDIR/s.img" --size $SIZE \
        --listen "$host:0" --layer-dir "$WORKDIR/layers" --qmp "$WORKDIR/s.qmp")
    port=$(ready_port "$WORKDIR/secondary.log.out")
    ppid=$(start "$WORKDIR/primary.log" "$nsp" --role primary "${sec[@]}" --image "$WORKDIR/p.img" --size $SIZE \
        --socket "$WORKDIR/p.sock" --peer "$host:$port" --qmp "$WORKDIR/p.qmp" "$@")
    local up=0
    for _ in $(seq 1 200); do
        grep -aq "replicating to" "$WORKDIR/primary.log" && { up=1; break; }
        sleep 0.05
    done
    if [ "$up" != 1 ]; then
        echo "the primary did not connect to the secondary:" >&2
        tail -n 5 "$WORKDIR/primary.log" "$WORKDIR/secondary.log" >&2
        exit 1
    fi
    for w in "${WORKLOADS[@]}"; do
        sampler "$WORKDIR/p.qmp" "$WORKDIR/samples.jsonl"
        local spl=$SAMPLER
        "$BENCH" --socket "$WORKDIR/p.sock" --workload "$w" --seconds "$SECONDS_PER" --json --label "$label" >"$WORKDIR/one.json"
        kill "$spl" 2>/dev/null || true
        wait "$spl" 2>/dev/null || true
        python3 - "$WORKDIR/one.json" "$WORKDIR/samples.jsonl" >>"$RESULTS" <<'PY'
import json, statistics, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
s = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
f = [x["bytes-in-flight"] for x in s if x["state"] == "connected"]
r["in_flight_max"] = max(f) if f else 0
r["in_flight_median"] = statistics.median(f) if f else 0
r["window"] = s[0]["window-bytes"] if s else 0
r["samples"] = len(f)
print(json.dumps(r))
PY
        tail -n1 "$RESULTS" >&2
    done
    qmp "$WORKDIR/p.qmp" replication-checkpoint '{"timeout-ms": 600000}' >/dev/null
    stop "$ppid"
    stop "$spid"
}

summary() { # summary LABEL...
    python3 - "$RESULTS" "$@" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    rows.setdefault((r["label"], r["workload"]), []).append(r)
print("| run | workload | IOPS (median) | MiB/s (median) | MiB/s per run | bytes-in-flight median / max (MiB) | window (MiB) |")
print("|---|---|---:|---:|---|---:|---:|")
for label in sys.argv[2:]:
    for w in ("randwrite-4k-qd32", "seqwrite-1m-qd8"):
        xs = rows.get((label, w))
        if not xs:
            continue
        med = lambda k: statistics.median(x[k] for x in xs)
        runs = ", ".join(f"{x['mib_s']:.0f}" for x in xs)
        print(f"| {label} | {w} | {med('iops'):,.0f} | {med('mib_s'):,.1f} | {runs} | "
              f"{med('in_flight_median') / 2**20:.1f} / {max(x['in_flight_max'] for x in xs) / 2**20:.1f} | "
              f"{xs[0]['window'] / 2**20:.0f} |")
PY
}

if [ "$PART" = tls ] || [ "$PART" = all ]; then
    head -c 32 /dev/urandom | base64 >"$WORKDIR/link.psk"
    chmod 600 "$WORKDIR/link.psk"
    for rep in $(seq 1 "$REPS"); do
        if [ $((rep % 2)) = 1 ]; then order=(tls insecure); else order=(insecure tls); fi
        for sec in "${order[@]}"; do
            log "rep $rep: loopback $sec"
            pair "loopback-$sec" - - 127.0.0.1 "$sec"
        done
    done
    summary loopback-tls loopback-insecure
fi

if [ "$PART" = netns ] || [ "$PART" = all ]; then
    ip netns add "$NS_P"
    ip netns add "$NS_S"
    ip link add "$DEV_P" netns "$NS_P" type veth peer name "$DEV_S" netns "$NS_S"
    ip -n "$NS_P" addr add "$IP_P/24" dev "$DEV_P"
    ip -n "$NS_S" addr add "$IP_S/24" dev "$DEV_S"
    for ns in "$NS_P" "$NS_S"; do ip -n "$ns" link set lo up; done
    ip -n "$NS_P" link set "$DEV_P" up
    ip -n "$NS_S" link set "$DEV_S" up
    rate() { # rate none|1gbit|10gbit
        ip -n "$NS_P" link set "$DEV_P" up
        tc -n "$NS_P" qdisc del dev "$DEV_P" root 2>/dev/null || true
        case "$1" in
        none) ;;
        1gbit) tc -n "$NS_P" qdisc add dev "$DEV_P" root tbf rate 1gbit burst 256kb latency 20ms ;;
        10gbit) tc -n "$NS_P" qdisc add dev "$DEV_P" root tbf rate 10gbit burst 2mb latency 20ms ;;
        esac
        tc -n "$NS_P" qdisc show dev "$DEV_P" >&2
    }
    for rep in $(seq 1 "$REPS"); do
        if [ $((rep % 2)) = 1 ]; then order=(1gbit 10gbit none); else order=(none 10gbit 1gbit); fi
        for r in "${order[@]}"; do
            rate "$r"
            log "rep $rep: netns $r async"
            pair "netns-$r-async" "$NS_P" "$NS_S" "$IP_S" insecure
        done
        rate 1gbit
        log "rep $rep: netns 1gbit sync"
        pair "netns-1gbit-sync" "$NS_P" "$NS_S" "$IP_S" insecure --sync
    done
    summary netns-1gbit-async netns-10gbit-async netns-none-async netns-1gbit-sync
fi
log "results: $RESULTS"
