#!/usr/bin/env bash
# Replication benchmark (docs/performance.md, "Replication throughput"):
#  1. write throughput of a primary with a live secondary on loopback, asynchronous and --sync,
#     vs the same image served standalone, in one run, ABBA (4 KiB random write QD32, 1 MiB
#     sequential write QD8), with the CPU time each process used per GiB written (for the
#     replicated runs until the secondary applied everything);
#  2. checkpoint cost with 1 MiB and with 1 GiB buffered on the secondary;
#  3. failover time without and with Secondary VM writes.
#  --working-set SIZE: the throughput runs write only the first SIZE of the 2 GiB images, so
#     that after the first pass they overwrite pages already in the page cache on both sides
#     (and clusters already saved in this epoch); without it most writes go to fresh pages.
# Usage: qemu-scripts/bench-replication.sh [--reps N] [--seconds S] [--dir DIR] [--throughput-only]
#                                          [--working-set SIZE]
# Environment: COLO_BLK (the colo-blk binary to measure; default: build target/release/colo-blk)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source-path=SCRIPTDIR source=bench-lib.sh
. "$REPO/qemu-scripts/bench-lib.sh"
REPS=3
SECONDS_PER=5
WORKDIR=
COSTS=1
WORKING_SET=()
while [ $# -gt 0 ]; do
    case "$1" in
    --throughput-only) COSTS=0; shift ;;
    --reps) REPS=$2; shift 2 ;;
    --seconds) SECONDS_PER=$2; shift 2 ;;
    --dir) WORKDIR=$2; shift 2 ;;
    --working-set) WORKING_SET=(--working-set "$2"); shift 2 ;;
    -h | --help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done

log() { echo "[bench-replication] $*" >&2; }

cd "$REPO"
# COLO_BLK: a colo-blk binary to measure (e.g. a copy of an older build) instead of building.
[ -n "${COLO_BLK:-}" ] || cargo build --release -q
BENCH=$(blkbench_path)
COLO=${COLO_BLK:-$REPO/target/release/colo-blk}
[ -x "$BENCH" ] || { echo "blkbench not built" >&2; exit 1; }

[ -n "$WORKDIR" ] || WORKDIR=$(mktemp -d /var/tmp/colo-blk-repl.XXXXXX)
mkdir -p "$WORKDIR"
COLO_PIDS_FILE=$WORKDIR/pids
: >"$COLO_PIDS_FILE"
trap cleanup_colo EXIT

SIZE=2G
WORKLOADS=randwrite-4k-qd32,seqwrite-1m-qd8
RESULTS=$WORKDIR/results.jsonl
: >"$RESULTS"

# One blkbench run of workload W against SOCKET with label L; adds to its JSON line the CPU
# seconds each PID used from the start of the run until (for replication) the secondary has
# applied everything (replication-prepare-checkpoint), and that per GiB written.
measure() { # W L SOCKET PRIMARY_QMP|- PID...
    local w=$1 label=$2 sock=$3 pqmp=$4
    shift 4
    local before=() after=() p
    # Every run starts without the previous runs' dirty pages still being written back.
    sync
    for p in "$@"; do before+=("$(cpu_of "$p")"); done
    local line
    line=$("$BENCH" --socket "$sock" --workload "$w" --seconds "$SECONDS_PER" --warmup 0 --json --label "$label" \
        "${WORKING_SET[@]}")
    [ "$pqmp" = - ] || qmp "$pqmp" replication-prepare-checkpoint '{"timeout-ms": 600000}' >/dev/null
    for p in "$@"; do after+=("$(cpu_of "$p")"); done
    python3 - "$line" "${before[*]}" "${after[*]}" "$(cat /proc/loadavg)" <<'PY' >>"$RESULTS"
import json, sys
r = json.loads(sys.argv[1])
b = [float(x) for x in sys.argv[2].split()]
a = [float(x) for x in sys.argv[3].split()]
gib = r["mib_s"] * r["seconds"] / 1024
r["cpu_s"] = [round(y - x, 3) for x, y in zip(b, a)]
r["cpu_s_per_gib"] = [round((y - x) / gib, 3) if gib else None for x, y in zip(b, a)]
r["load"] = float(sys.argv[4].split()[0])
print(json.dumps(r))
PY
}

run_standalone() {
    rm -f "$WORKDIR/p.img"
    local pid w
    pid=$(start_colo "$WORKDIR/standalone.log" --socket "$WORKDIR/p.sock" --image "$WORKDIR/p.img" --size $SIZE)
    for w in ${WORKLOADS//,/ }; do
        measure "$w" standalone "$WORKDIR/p.sock" - "$pid"
    done
    stop "$pid"
}

run_primary() { # LABEL [PRIMARY-OPTIONS...]
    local label=$1
    shift
    # colo-blk creates both images (--size): known zero, so the pair starts in sync (images
    # made by fallocate would carry no replication metadata and need a full sync).
    rm -rf "$WORKDIR"/p.img* "$WORKDIR"/s.img* "$WORKDIR/layers"
    local spid ppid w
    spid=$(start_colo "$WORKDIR/secondary.log" --role secondary --insecure-link --image "$WORKDIR/s.img" --size $SIZE \
        --listen 127.0.0.1:0 --layer-dir "$WORKDIR/layers" --qmp "$WORKDIR/s.qmp")
    local port
    port=$(ready_port "$WORKDIR/secondary.log.out")
    ppid=$(start_colo "$WORKDIR/primary.log" --role primary --insecure-link --image "$WORKDIR/p.img" --size $SIZE \
        --socket "$WORKDIR/p.sock" --peer "127.0.0.1:$port" --qmp "$WORKDIR/p.qmp" "$@")
    wait_session "$WORKDIR/primary.log"
    for w in ${WORKLOADS//,/ }; do
        measure "$w" "$label" "$WORKDIR/p.sock" "$WORKDIR/p.qmp" "$ppid" "$spid"
        # A checkpoint between workloads, so each starts with empty layers.
        qmp "$WORKDIR/p.qmp" replication-checkpoint '{"timeout-ms": 600000}' >/dev/null
    done
    stop "$ppid"
    stop "$spid"
}

for rep in $(seq 1 "$REPS"); do
    # ABBA: the order of the three configurations is reversed on every other repetition.
    order=(standalone async sync)
    [ $((rep % 2)) = 0 ] && order=(sync async standalone)
    for c in "${order[@]}"; do
        log "rep $rep: $c (load $(cut -d' ' -f1 /proc/loadavg))"
        case $c in
        standalone) run_standalone ;;
        async) run_primary primary-async ;;
        sync) run_primary primary-sync --sync ;;
        esac
    done
done

python3 - "$RESULTS" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    rows.setdefault((r["workload"], r["label"]), []).append(r)
med = statistics.median
print("| workload | mode | IOPS | MiB/s | / standalone | CPU s per GiB: primary (standalone: the backend) | CPU s per GiB: secondary | load |")
print("|---|---|---:|---:|---:|---:|---:|---|")
for w in sorted({k[0] for k in rows}):
    base = med(x["iops"] for x in rows[(w, "standalone")])
    for label in ("standalone", "primary-async", "primary-sync"):
        rs = rows.get((w, label))
        if not rs:
            continue
        iops = med(x["iops"] for x in rs)
        mib = med(x["mib_s"] for x in rs)
        cp = med(x["cpu_s_per_gib"][0] for x in rs)
        cs = "-" if label == "standalone" else f'{med(x["cpu_s_per_gib"][1] for x in rs):.2f}'
        loads = "/".join(f'{x["load"]:.1f}' for x in rs)
        print(f"| {w} | {label} | {iops:,.0f} | {mib:,.0f} | **{iops/base:.2f}** | {cp:.2f} | {cs} | {loads} |")
PY

# Sequential 1 MiB writes over the first MIB MiB of a device until each block was written.
fill() { # SOCKET MIB
    local secs=$(( $2 / 100 + 2 ))
    "$BENCH" --socket "$1" --workload seqwrite-1m-qd8 --working-set "$2M" --warmup 0 --seconds "$secs" >/dev/null
}

# Checkpoint and failover costs on a secondary with a Secondary VM socket.
checkpoint_and_failover() { # BUFFERED_MIB SVM_MIB
    local buffered=$1 svm=$2
    # colo-blk creates both images (--size): known zero, so the pair starts in sync (images
    # made by fallocate would carry no replication metadata and need a full sync).
    rm -rf "$WORKDIR"/p.img* "$WORKDIR"/s.img* "$WORKDIR/layers"
    local spid ppid port
    spid=$(start_colo "$WORKDIR/secondary.log" --role secondary --insecure-link --image "$WORKDIR/s.img" --size $SIZE \
        --listen 127.0.0.1:0 --layer-dir "$WORKDIR/layers" --qmp "$WORKDIR/s.qmp" --socket "$WORKDIR/svm.sock")
    port=$(ready_port "$WORKDIR/secondary.log.out")
    ppid=$(start_colo "$WORKDIR/primary.log" --role primary --insecure-link --image "$WORKDIR/p.img" --size $SIZE \
        --socket "$WORKDIR/p.sock" --peer "127.0.0.1:$port" --qmp "$WORKDIR/p.qmp")
    wait_session "$WORKDIR/primary.log"
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
