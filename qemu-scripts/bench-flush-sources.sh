#!/usr/bin/env bash
# Where the secondary's device flushes come from (issue 22, docs/flush-policy.md, "Measured"):
#  1. ratio: the replicated (async) / standalone throughput of each workload on freshly created
#     images, REPS repetitions, ABBA (the order of the two configurations reversed on every
#     other repetition); medians printed;
#  2. attribution: one more replicated run per workload with the secondary started under
#     `strace -f --seccomp-bpf -ttt -T -y -e trace=fdatasync,fsync` (only those two syscalls stop
#     the process) and the primary under the same, each sync attributed to its SyncPoint by the
#     file it syncs (hidden-*.img: Hidden; s.img: Base*; *.colo-meta: MetaSlot; *.colo-dirty:
#     DirtyBits; the layer directory or layers.state*: State*), counted per second and per MiB
#     applied, with the time spent in them and when they happened (first vs later seconds);
#  3. writes: one more replicated run per workload with `perf stat` counting the secondary's
#     write syscalls (pwrite64, pwritev, pwritev2, fallocate; tracepoints, no stop per call).
# The strace'd runs are slower than the plain ones (each sync stops the process twice): their
# throughput is reported beside, and the counts per MiB are the figures to compare.
#  --working-set SIZE: blkbench writes only the first SIZE of the images (cached pages after
#     the first pass); --checkpoint-every S: during replicated runs, a checkpoint
#     (replication-prepare-checkpoint, replication-checkpoint) every S seconds, as a COLO pair
#     would make them: each empties the hidden layer, so copy-before-write (and today's
#     per-batch sync) starts again.
# Usage: qemu-scripts/bench-flush-sources.sh [--reps N] [--seconds S] [--size SIZE] [--dir DIR]
#                                            [--workloads W1,W2] [--no-ratio] [--no-trace]
#                                            [--working-set SIZE] [--checkpoint-every S] [--sync]
#  --sync: the replicated runs use `--sync` on the primary (a write completes once applied).
# Environment: COLO_BLK (the binary to measure; default: cargo build --release, honouring
# CARGO_TARGET_DIR).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source-path=SCRIPTDIR source=bench-lib.sh
. "$REPO/qemu-scripts/bench-lib.sh"
REPS=3
SECONDS_PER=5
SIZE=1G
WORKDIR=
WORKLOADS=seqwrite-1m-qd8,randwrite-4k-qd32
RATIO=1
TRACE=1
WORKING_SET=()
CKPT_EVERY=
PRIMARY_OPTS=()
REPL_LABEL=primary-async
while [ $# -gt 0 ]; do
    case "$1" in
    --reps) REPS=$2; shift 2 ;;
    --seconds) SECONDS_PER=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --dir) WORKDIR=$2; shift 2 ;;
    --workloads) WORKLOADS=$2; shift 2 ;;
    --no-ratio) RATIO=0; shift ;;
    --no-trace) TRACE=0; shift ;;
    --working-set) WORKING_SET=(--working-set "$2"); shift 2 ;;
    --checkpoint-every) CKPT_EVERY=$2; shift 2 ;;
    --sync) PRIMARY_OPTS=(--sync); REPL_LABEL=primary-sync; shift ;;
    -h | --help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done

log() { echo "[bench-flush-sources] $*" >&2; }

cd "$REPO"
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
[ -n "${COLO_BLK:-}" ] || cargo build --release -q
BENCH=$(blkbench_path)
COLO=${COLO_BLK:-$TARGET/release/colo-blk}
[ -x "$BENCH" ] || { echo "blkbench not built" >&2; exit 1; }
[ -n "$WORKDIR" ] || WORKDIR=$(mktemp -d /var/tmp/colo-blk-flush.XXXXXX)
mkdir -p "$WORKDIR"
RESULTS=$WORKDIR/results.jsonl
: >"$RESULTS"
COLO_PIDS_FILE=$WORKDIR/pids
: >"$COLO_PIDS_FILE"
trap cleanup_colo EXIT

# The colo-blk process under a wrapper pid (strace forks it), or the pid itself.
colo_pid() { # PID
    local c
    c=$(pgrep -P "$1" | head -n1 || true)
    echo "${c:-$1}"
}

# bench W LABEL SOCKET [PRIMARY_QMP]: one blkbench run; with PRIMARY_QMP, waits until the
# secondary applied everything; prints blkbench's JSON line plus "wall_s" (start to applied).
bench() {
    local w=$1 label=$2 sock=$3 pqmp=${4:--}
    sync
    local t0 t1 line
    t0=$(date +%s.%N)
    local ck=
    if [ "$pqmp" != - ] && [ -n "$CKPT_EVERY" ]; then
        (while sleep "$CKPT_EVERY"; do
            qmp "$pqmp" replication-prepare-checkpoint '{"timeout-ms": 60000}' >/dev/null 2>&1 &&
                qmp "$pqmp" replication-checkpoint '{"timeout-ms": 60000}' >/dev/null 2>&1 || true
        done) &
        ck=$!
    fi
    line=$("$BENCH" --socket "$sock" --workload "$w" --seconds "$SECONDS_PER" --warmup 0 --json --label "$label" \
        "${WORKING_SET[@]}")
    if [ -n "$ck" ]; then kill "$ck" 2>/dev/null || true; wait "$ck" 2>/dev/null || true; fi
    [ "$pqmp" = - ] || qmp "$pqmp" replication-prepare-checkpoint '{"timeout-ms": 600000}' >/dev/null
    t1=$(date +%s.%N)
    python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r["t0"]=float(sys.argv[2]); r["t1"]=float(sys.argv[3]); r["wall_s"]=round(r["t1"]-r["t0"],3); print(json.dumps(r))' "$line" "$t0" "$t1"
}

standalone() { # W
    rm -f "$WORKDIR"/p.img*
    local pid
    pid=$(start_colo "$WORKDIR/standalone.log" --socket "$WORKDIR/p.sock" --image "$WORKDIR/p.img" --size "$SIZE")
    bench "$1" standalone "$WORKDIR/p.sock" >>"$RESULTS"
    stop "$pid"
}

# pair W LABEL [SECONDARY_WRAPPER... --] [PRIMARY_WRAPPER... --]: a fresh pair (colo-blk makes
# both images: known zero, in sync), one run of W. Sets SPID/PPID (the wrappers' pids).
pair() {
    local w=$1 label=$2
    shift 2
    local swrap=() pwrap=()
    if [ $# -gt 0 ]; then
        while [ "$1" != -- ]; do swrap+=("$1"); shift; done
        shift
        while [ "$1" != -- ]; do pwrap+=("$1"); shift; done
        shift
    fi
    rm -rf "$WORKDIR"/p.img* "$WORKDIR"/s.img* "$WORKDIR/layers"
    SPID=$(start_colo_in "$WORKDIR/secondary.log" "${swrap[@]}" -- --role secondary --insecure-link \
        --image "$WORKDIR/s.img" --size "$SIZE" --listen 127.0.0.1:0 --layer-dir "$WORKDIR/layers" --qmp "$WORKDIR/s.qmp")
    local port
    port=$(ready_port "$WORKDIR/secondary.log.out")
    PPID_=$(start_colo_in "$WORKDIR/primary.log" "${pwrap[@]}" -- --role primary --insecure-link \
        --image "$WORKDIR/p.img" --size "$SIZE" --socket "$WORKDIR/p.sock" --peer "127.0.0.1:$port" --qmp "$WORKDIR/p.qmp" "${PRIMARY_OPTS[@]}")
    wait_session "$WORKDIR/primary.log"
    if [ -n "${PERF_OUT:-}" ]; then
        perf stat -x, -o "$PERF_OUT" -p "$(colo_pid "$SPID")" -e syscalls:sys_enter_pwrite64,syscalls:sys_enter_pwritev,syscalls:sys_enter_pwritev2,syscalls:sys_enter_fallocate,syscalls:sys_enter_fdatasync,syscalls:sys_enter_fsync,syscalls:sys_enter_io_uring_enter &
        PERF_PID=$!
        sleep 0.3
    fi
    bench "$w" "$label" "$WORKDIR/p.sock" "$WORKDIR/p.qmp" >>"$RESULTS"
    if [ -n "${PERF_OUT:-}" ]; then
        kill -INT "$PERF_PID"
        wait "$PERF_PID" || true
    fi
    # The colo-blk process first (a killed strace would detach and leave it running).
    stop "$(colo_pid "$PPID_")"
    stop "$PPID_"
    stop "$(colo_pid "$SPID")"
    stop "$SPID"
}

if [ "$RATIO" = 1 ]; then
    for rep in $(seq 1 "$REPS"); do
        order=(standalone async)
        [ $((rep % 2)) = 0 ] && order=(async standalone)
        for w in ${WORKLOADS//,/ }; do
            for c in "${order[@]}"; do
                log "rep $rep $w: $c (load $(cut -d' ' -f1 /proc/loadavg))"
                case $c in
                standalone) standalone "$w" ;;
                async) pair "$w" "$REPL_LABEL" ;;
                esac
            done
        done
    done
fi

if [ "$TRACE" = 1 ]; then
    for w in ${WORKLOADS//,/ }; do
        log "$w: syncs traced"
        st="$WORKDIR/sync-$w.secondary.strace"
        pt="$WORKDIR/sync-$w.primary.strace"
        pair "$w" traced-syncs strace -f --seccomp-bpf -ttt -T -y -e trace=fdatasync,fsync -o "$st" -- \
            strace -f --seccomp-bpf -ttt -T -y -e trace=fdatasync,fsync -o "$pt" --
        log "$w: writes counted (perf stat)"
        PERF_OUT="$WORKDIR/writes-$w.perf" pair "$w" counted-writes
    done
fi

python3 - "$RESULTS" "$WORKDIR" <<'PY'
import json, re, statistics, sys, os, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    r = json.loads(line)
    rows[(r["workload"], r["label"])].append(r)
med = statistics.median
workloads = sorted({k[0] for k in rows})
print("## Throughput (median of the ABBA repetitions; fresh images each run)\n")
print("| workload | standalone | replicated (async, or --sync if given) | ratio | runs (standalone / replicated) |")
print("|---|---:|---:|---:|---|")
for w in workloads:
    s, a = rows.get((w, "standalone")), rows.get((w, "primary-async")) or rows.get((w, "primary-sync"))
    if not s or not a:
        continue
    unit = "mib_s" if "1m" in w else "iops"
    fmt = lambda x: f"{x:,.0f}"
    ratios = [x[unit] / y[unit] for x, y in zip(a, s)]
    print(f"| {w} | {fmt(med(x[unit] for x in s))} {unit} | {fmt(med(x[unit] for x in a))} | "
          f"**{med(x[unit] for x in a) / med(x[unit] for x in s):.2f}** (pairwise {', '.join(f'{r:.2f}' for r in ratios)}) | "
          f"{' '.join(fmt(x[unit]) for x in s)} / {' '.join(fmt(x[unit]) for x in a)} |")

def klass(path, side):
    b = os.path.basename(path)
    if b.startswith("hidden-"): return "Hidden (hidden-*.img)"
    if b.startswith("active-"): return "Active* (active-*.img)"
    if b.endswith(".colo-meta"): return "MetaSlot (.colo-meta)"
    if b.endswith(".colo-dirty"): return "DirtyBits (.colo-dirty)"
    if b.startswith("layers") or path.endswith("/layers"): return "State* (layers, layers.state*)"
    if b in ("s.img",): return "Base* (s.img)"
    if b in ("p.img",): return "Device (p.img)"
    return "other: " + b
pat = re.compile(r"^(\d+)\s+([\d.]+) (fdatasync|fsync)\((\d+)<([^>]*)>\)\s+= (-?\d+).*<([\d.]+)>")
wd = sys.argv[2]
print("\n## Syncs by SyncPoint (strace'd run; per second of the run until all was applied, per MiB applied)\n")
print("| workload | side | sync point | in the run | per s | per MiB | s in sync | mean ms | 1st / 2nd half of the run | outside (start-up, shutdown) |")
print("|---|---|---|---:|---:|---:|---:|---:|---|---:|")
for w in workloads:
    t = rows.get((w, "traced-syncs"))
    if not t:
        continue
    t = t[-1]
    mib = t["mib_s"] * t["seconds"]
    for side in ("secondary", "primary"):
        f = os.path.join(wd, f"sync-{w}.{side}.strace")
        if not os.path.exists(f):
            continue
        ev = []
        for line in open(f):
            m = pat.match(line)
            if m:
                ev.append((float(m[2]), klass(m[5], side), float(m[7])))
        t0, t1 = t["t0"], t["t1"]
        by = collections.defaultdict(list)
        for e in ev:
            by[e[1]].append(e)
        for k, es in sorted(by.items()):
            inside = [e for e in es if t0 <= e[0] <= t1]
            n = len(inside)
            tot = sum(e[2] for e in inside)
            first = sum(1 for e in inside if e[0] < (t0 + t1) / 2)
            mean = f"{1000 * tot / n:.2f}" if n else "-"
            print(f"| {w} | {side} | {k} | {n} | {n / t['wall_s']:.1f} | {n / mib:.3f} | {tot:.2f} | {mean} | {first} / {n - first} | {len(es) - n} |")
    print(f"| {w} | (run) | {t['mib_s']:,.0f} MiB/s, {t['iops']:,.0f} IOPS, {mib:,.0f} MiB in {t['wall_s']} s until applied | | | | | | |")
print("\n## Write syscalls of the secondary (perf stat run)\n")
print("| workload | MiB applied | counts | per MiB |")
print("|---|---:|---|---|")
for w in workloads:
    t = rows.get((w, "counted-writes"))
    f = os.path.join(wd, f"writes-{w}.perf")
    if not t or not os.path.exists(f):
        continue
    t = t[-1]
    mib = t["mib_s"] * t["seconds"]
    c = {}
    for line in open(f):
        p = line.strip().split(",")
        if len(p) > 2 and p[0].strip().isdigit():
            c[p[2].split(":")[-1].replace("sys_enter_", "")] = int(p[0])
    print(f"| {w} | {mib:,.0f} | {', '.join(f'{k} {v}' for k, v in c.items())} | {', '.join(f'{k} {v / mib:.2f}' for k, v in c.items() if v)} |")
PY
log "results in $WORKDIR"
