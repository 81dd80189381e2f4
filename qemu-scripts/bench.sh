#!/usr/bin/env bash
# Compares colo-blk with qemu-storage-daemon (qsd) serving the same raw image over vhost-user-blk,
# driven by the same load generator (benches/blkbench.rs). See docs/performance.md.
#
# For every cache mode asked for, the two backends run one after the other on the same image,
# with the same O_DIRECT setting and the same number of queues, REPS times each, in ABBA order
# (qsd colo colo qsd qsd colo ...) so that slow drift of the machine hits both alike. The table
# shows per-backend medians over the repetitions and the colo-blk/qsd ratios.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: qemu-scripts/bench.sh [options]
  --direct off|on|both   cache.direct / --direct setting(s) to measure (default: both)
  --queues N             virtqueues (qsd num-queues=, colo-blk --num-queues, blkbench --queues) (1)
  --reps N               runs per backend and cache mode (default: 3)
  --seconds S            measured seconds per workload (default: 5)
  --warmup S             warm-up seconds per workload (default: 1)
  --size SIZE            image size (default: 2G); the whole image is the working set
  --workloads LIST       comma-separated blkbench workloads (default: all)
  --dir DIR              where the image and sockets go (default: a new dir under /var/tmp);
                         must be a real disk-backed filesystem, not tmpfs
  --out DIR              results directory (default: target/bench-results/<date>)
  --no-build             use the existing release binaries
  --keep                 keep the image
Environment: QSD (default qemu-storage-daemon), CARGO (default cargo).
EOF
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
QSD=${QSD:-qemu-storage-daemon}
CARGO=${CARGO:-cargo}
MODES=(off on)
QUEUES=1
REPS=3
MEASURE=5
WARMUP=1
SIZE=2G
WORKLOADS=
WORKDIR=
OUT=
BUILD=1
KEEP=0

while [ $# -gt 0 ]; do
    case "$1" in
    --direct)
        case "${2:-}" in
        off | on) MODES=("$2") ;;
        both) MODES=(off on) ;;
        *) echo "--direct: off, on or both" >&2; exit 2 ;;
        esac
        shift 2 ;;
    --queues) QUEUES=$2; shift 2 ;;
    --reps) REPS=$2; shift 2 ;;
    --seconds) MEASURE=$2; shift 2 ;;
    --warmup) WARMUP=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --workloads) WORKLOADS=$2; shift 2 ;;
    --dir) WORKDIR=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --keep) KEEP=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

SIZE_BYTES=$(numfmt --from=iec "$SIZE") || die "bad --size $SIZE"
[ $((SIZE_BYTES % 1048576)) -eq 0 ] || die "--size must be a multiple of 1 MiB"
command -v "$QSD" >/dev/null || die "$QSD not found"

# ---- build -------------------------------------------------------------------------------------
cd "$REPO"
COLO=$REPO/target/release/colo-blk
if [ "$BUILD" = 1 ]; then
    log "cargo build --release"
    "$CARGO" build --release
fi
log "cargo bench --bench blkbench --no-run"
# The JSON messages name the bench executable; diagnostics are still rendered on stderr.
BENCH=$("$CARGO" bench --bench blkbench --no-run --message-format=json-render-diagnostics |
    python3 -c '
import json, sys
exe = None
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "blkbench" and m.get("executable"):
        exe = m["executable"]
print(exe or "")')
[ -x "$BENCH" ] || die "cannot locate the blkbench executable"
[ -x "$COLO" ] || die "$COLO missing (run without --no-build)"

# ---- work directory, image, results ------------------------------------------------------------
if [ -z "$WORKDIR" ]; then
    WORKDIR=$(mktemp -d /var/tmp/colo-blk-bench.XXXXXX)
else
    mkdir -p "$WORKDIR"
fi
FSTYPE=$(findmnt -n -o FSTYPE -T "$WORKDIR" || stat -f -c %T "$WORKDIR")
[ "$FSTYPE" != tmpfs ] || die "$WORKDIR is on tmpfs: O_DIRECT and the page cache would not mean anything"
IMG=$WORKDIR/disk.img
SOCK=$WORKDIR/vhost.sock
OUT=${OUT:-$REPO/target/bench-results/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT/raw" "$OUT/logs"
rm -f "$OUT"/raw/*.jsonl "$OUT/runs.txt"

PID=
stop_backend() {
    [ -n "$PID" ] || return 0
    if kill -0 "$PID" 2>/dev/null; then
        kill -TERM "$PID" 2>/dev/null || true
        for _ in $(seq 100); do
            kill -0 "$PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$PID" 2>/dev/null || true
    fi
    wait "$PID" 2>/dev/null || true
    PID=
    rm -f "$SOCK"
}
cleanup() {
    stop_backend
    if [ "$KEEP" = 0 ]; then
        rm -f "$IMG"
        rmdir "$WORKDIR" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "creating $IMG ($SIZE, fully written with zeros so that every block is allocated)"
rm -f "$IMG"
dd if=/dev/zero of="$IMG" bs=1M count=$((SIZE_BYTES / 1048576)) oflag=direct conv=fsync status=none

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -srm)"
    echo "cpus: $(nproc) x $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
    echo "memory: $(free -h | awk '/^Mem:/ {print $2}')"
    echo "filesystem: $FSTYPE on $(df --output=source "$WORKDIR" | tail -1) ($WORKDIR)"
    echo "qsd: $("$QSD" --version | head -1)"
    echo "colo-blk: $(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown)"
    echo "image: $SIZE, queues: $QUEUES, reps: $REPS, ${WARMUP}s warm-up + ${MEASURE}s per workload"
} >"$OUT/environment.txt"
cat "$OUT/environment.txt" >&2

# ---- one backend run ---------------------------------------------------------------------------
# The page cache is put in the same state before every run: written back, then either fully
# populated with the image (buffered I/O) or emptied of it (O_DIRECT).
prepare_cache() {
    sync "$IMG"
    if [ "$1" = off ]; then
        cat "$IMG" >/dev/null
    else
        dd if="$IMG" iflag=nocache count=0 status=none
    fi
}

# Waits until $SOCK accepts a connection (qsd logs nothing when its export is ready).
wait_socket() {
    local deadline=$((SECONDS + 30))
    while [ $SECONDS -lt $deadline ]; do
        kill -0 "$PID" 2>/dev/null || return 1
        if [ -S "$SOCK" ] && python3 -c '
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(1)
s.connect(sys.argv[1])
s.close()' "$SOCK" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}

# Waits until colo-blk logs that it listens.
wait_log() {
    local deadline=$((SECONDS + 30))
    while [ $SECONDS -lt $deadline ]; do
        kill -0 "$PID" 2>/dev/null || return 1
        grep -q "listening on" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

run_one() { # backend mode rep
    local backend=$1 mode=$2 rep=$3
    local logf=$OUT/logs/$mode-$rep-$backend.log
    local res=$OUT/raw/$mode-$rep-$backend.jsonl
    prepare_cache "$mode"
    rm -f "$SOCK"
    case "$backend" in
    qsd)
        "$QSD" \
            --blockdev "driver=file,node-name=file,filename=$IMG,cache.direct=$mode" \
            --blockdev driver=raw,node-name=disk,file=file \
            --export "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=$QUEUES" \
            >"$logf" 2>&1 &
        PID=$!
        wait_socket || { cat "$logf" >&2; die "qemu-storage-daemon did not come up"; }
        ;;
    colo-blk)
        local direct=()
        [ "$mode" = on ] && direct=(--direct)
        RUST_LOG=info "$COLO" --socket "$SOCK" --image "$IMG" --num-queues "$QUEUES" "${direct[@]}" \
            >"$logf" 2>&1 &
        PID=$!
        wait_log "$logf" || { cat "$logf" >&2; die "colo-blk did not come up"; }
        ;;
    esac
    local load
    load=$(cut -d' ' -f1 /proc/loadavg)
    log "direct=$mode rep $rep/$REPS: $backend (pid $PID), load average $load"
    echo "$mode $rep $backend $load" >>"$OUT/runs.txt"
    local wl=()
    [ -n "$WORKLOADS" ] && wl=(--workload "$WORKLOADS")
    if ! "$BENCH" --socket "$SOCK" --seconds "$MEASURE" --warmup "$WARMUP" --queues "$QUEUES" \
        --json --label "$backend" "${wl[@]}" >"$res" 2> >(sed 's/^/    /' >&2); then
        log "blkbench failed against $backend; its log:"
        tail -20 "$logf" >&2
        die "benchmark failed"
    fi
    stop_backend
}

for mode in "${MODES[@]}"; do
    for rep in $(seq "$REPS"); do
        # ABBA: odd repetitions start with qsd, even ones with colo-blk.
        if [ $((rep % 2)) = 1 ]; then order=(qsd colo-blk); else order=(colo-blk qsd); fi
        for backend in "${order[@]}"; do
            run_one "$backend" "$mode" "$rep"
        done
    done
done

# ---- table -------------------------------------------------------------------------------------
python3 - "$OUT" "$QUEUES" "$REPS" "$WARMUP" "$MEASURE" >"$OUT/summary.md" <<'EOF'
import glob, json, os, statistics, sys

out, queues, reps, warmup, measure = sys.argv[1:6]
rows = {}  # (mode, workload) -> backend -> list of results
order = []
for path in sorted(glob.glob(os.path.join(out, "raw", "*.jsonl"))):
    mode, rep, backend = os.path.basename(path)[:-6].split("-", 2)
    for line in open(path):
        r = json.loads(line)
        key = (mode, r["workload"])
        if key not in rows:
            rows[key] = {}
            order.append(key)
        rows[key].setdefault(backend, []).append(r)

def med(rs, k):
    return statistics.median(r[k] for r in rs)

def fmt(v):
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"

wl_order = ["randread-4k-qd1", "randread-4k-qd32", "randwrite-4k-qd1", "randwrite-4k-qd32",
            "seqwrite-1m-qd8", "seqread-1m-qd8"]
order.sort(key=lambda k: (k[0] != "off", wl_order.index(k[1]) if k[1] in wl_order else 99))
for mode in ["off", "on"]:
    keys = [k for k in order if k[0] == mode]
    if not keys:
        continue
    print(f"### cache.direct={mode} ({'O_DIRECT' if mode == 'on' else 'host page cache'}), "
          f"{queues} queue(s), median of {reps} runs x {measure}s (after {warmup}s warm-up)\n")
    print("| workload | qsd IOPS | colo-blk IOPS | IOPS ratio | qsd MiB/s | colo-blk MiB/s "
          "| qsd p50 µs | colo-blk p50 µs | p50 ratio | qsd p99 µs | colo-blk p99 µs | p99 ratio |")
    print("|---|" + "---:|" * 11)
    for k in keys:
        q, c = rows[k].get("qsd", []), rows[k].get("colo-blk", [])
        if not q or not c:
            continue
        qi, ci = med(q, "iops"), med(c, "iops")
        q50, c50 = med(q, "lat_p50_us"), med(c, "lat_p50_us")
        q99, c99 = med(q, "lat_p99_us"), med(c, "lat_p99_us")
        print(f"| {k[1]} | {fmt(qi)} | {fmt(ci)} | **{ci / qi:.2f}** | {fmt(med(q, 'mib_s'))} "
              f"| {fmt(med(c, 'mib_s'))} | {fmt(q50)} | {fmt(c50)} | {c50 / q50:.2f} "
              f"| {fmt(q99)} | {fmt(c99)} | {c99 / q99:.2f} |")
    print()
    print("IOPS of every run (repetition 1 / 2 / ...):\n")
    print("| workload | qsd | colo-blk |")
    print("|---|---|---|")
    for k in keys:
        q, c = rows[k].get("qsd", []), rows[k].get("colo-blk", [])
        print(f"| {k[1]} | {' / '.join(fmt(r['iops']) for r in q)} "
              f"| {' / '.join(fmt(r['iops']) for r in c)} |")
    print()
loads = [float(l.split()[3]) for l in open(os.path.join(out, "runs.txt"))]
print(f"1-minute load average when the runs started: {min(loads):.2f} to {max(loads):.2f}.\n")
print("IOPS ratio = colo-blk / qsd (higher is better for colo-blk); "
      "latency ratios = colo-blk / qsd (lower is better for colo-blk).")
EOF
log "results in $OUT"
echo
cat "$OUT/environment.txt"
echo
cat "$OUT/summary.md"
