#!/usr/bin/env bash
# Compares colo-blk with qemu-storage-daemon (qsd) serving the same raw image over vhost-user-blk,
# driven by the same load generator (benches/blkbench.rs). See docs/performance.md.
#
# qsd runs in each of its AIO configurations in the same run: aio=threads, aio=io_uring and (with
# cache.direct=on only: qsd refuses it on the page cache) aio=native. For every cache mode and
# queue count asked for, all backends run one after the other on the same image, with the same
# O_DIRECT setting and number of queues, REPS times each, in ABBA order (the backend order is
# reversed on every other repetition) so that slow drift of the machine hits them alike. The
# table gives per-backend medians over the repetitions and colo-blk / best qsd per row (the best
# qsd configuration of that row, by median IOPS).
#
# With --ceiling, fio runs the same workloads with O_DIRECT on the image directly from the host
# (io_uring, one job per queue), with no vhost-user backend in between, as one more backend of
# the ABBA order of the cache.direct=on rows: what the device gives without virtqueues, the
# ceiling that no backend can pass. Its column and colo-blk / fio say how close a row is to it.
# Not for the page cache: there the limit is CPU, and fio's io_uring is no ceiling (ext4 hands
# buffered io_uring writes to io-wq one at a time; fio got 0.5x the backends' 1 MiB writes).
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: qemu-scripts/bench.sh [options]
  --direct off|on|both   cache.direct / --direct setting(s) to measure (default: both)
  --queues LIST          comma-separated queue counts (qsd num-queues=, colo-blk --num-queues,
                         blkbench --queues) (default: 1,2)
  --reps N               runs per backend, cache mode and queue count (default: 3)
  --seconds S            measured seconds per workload (default: 3)
  --warmup S             warm-up seconds per workload (default: 1)
  --size SIZE            image size (default: 1G); the whole image is the working set
  --workloads LIST       comma-separated blkbench workloads (default: all)
  --qsd-aio LIST         qsd aio= settings (default: threads,io_uring,native)
  --io-engine E          colo-blk --io-engine (default: auto)
  --ceiling              O_DIRECT rows: also run fio on the image from the host (no vhost-user),
                         the device's ceiling
  --dir DIR              where the image and sockets go (default: a new dir under /var/tmp);
                         must be a real disk-backed filesystem, not tmpfs
  --out DIR              results directory (default: target/bench-results/<date>)
  --no-build             use the existing release binaries
  --keep                 keep the image
Environment: QSD (default qemu-storage-daemon), CARGO (default cargo), COLO_BLK (a colo-blk
binary to measure instead of building target/release/colo-blk; e.g. a copy, so that a build
during the run does not change what is measured).
USAGE
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
QSD=${QSD:-qemu-storage-daemon}
CARGO=${CARGO:-cargo}
MODES=(off on)
QUEUE_LIST=1,2
REPS=3
MEASURE=3
WARMUP=1
SIZE=1G
QSD_AIO=threads,io_uring,native
ENGINE=auto
WORKLOADS=
WORKDIR=
OUT=
BUILD=1
KEEP=0
CEILING=0

while [ $# -gt 0 ]; do
    case "$1" in
    --direct)
        case "${2:-}" in
        off | on) MODES=("$2") ;;
        both) MODES=(off on) ;;
        *) echo "--direct: off, on or both" >&2; exit 2 ;;
        esac
        shift 2 ;;
    --queues) QUEUE_LIST=$2; shift 2 ;;
    --qsd-aio) QSD_AIO=$2; shift 2 ;;
    --io-engine) ENGINE=$2; shift 2 ;;
    --reps) REPS=$2; shift 2 ;;
    --seconds) MEASURE=$2; shift 2 ;;
    --warmup) WARMUP=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --workloads) WORKLOADS=$2; shift 2 ;;
    --dir) WORKDIR=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --keep) KEEP=1; shift ;;
    --ceiling) CEILING=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

SIZE_BYTES=$(numfmt --from=iec "$SIZE") || die "bad --size $SIZE"
[ $((SIZE_BYTES % 1048576)) -eq 0 ] || die "--size must be a multiple of 1 MiB"
command -v "$QSD" >/dev/null || die "$QSD not found"
[ "$CEILING" = 0 ] || command -v fio >/dev/null || die "--ceiling needs fio (apt-get install fio)"

# ---- build -------------------------------------------------------------------------------------
cd "$REPO"
COLO=${COLO_BLK:-$REPO/target/release/colo-blk}
if [ "$BUILD" = 1 ] && [ -z "${COLO_BLK:-}" ]; then
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
    echo "image: $SIZE, queues: $QUEUE_LIST, reps: $REPS, ${WARMUP}s warm-up + ${MEASURE}s per workload"
    echo "qsd aio: $QSD_AIO; colo-blk --io-engine $ENGINE"
    [ "$CEILING" = 0 ] || echo "ceiling: $(fio --version) on the image from the host, ioengine=io_uring"
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

# fio with O_DIRECT, straight on the image, for every workload blkbench would run; writes one JSON line per
# workload in blkbench's format (workload, iops, lat_p50_us, lat_p99_us) to $1.
run_fio() { # result-file queues
    local res=$1 queues=$2 names
    if [ -n "$WORKLOADS" ]; then names=${WORKLOADS//,/ }; else names=$("$BENCH" --list | awk '{print $1}'); fi
    : >"$res"
    local w
    for w in $names; do
        [[ $w =~ ^(rand|seq)(read|write)-([0-9]+[km])-qd([0-9]+)$ ]] || die "fio: cannot map workload $w"
        local rw=${BASH_REMATCH[2]}
        [ "${BASH_REMATCH[1]}" = rand ] && rw=rand$rw
        fio --name="$w" --filename="$IMG" --direct=1 \
            --ioengine=io_uring --rw="$rw" --bs="${BASH_REMATCH[3]}" --iodepth="${BASH_REMATCH[4]}" \
            --numjobs="$queues" --group_reporting --time_based --ramp_time="$WARMUP" \
            --runtime="$MEASURE" --norandommap --randrepeat=0 --output-format=json |
            python3 -c '
import json, sys
j = json.load(sys.stdin)["jobs"][0]
d = j["read"] if j["read"]["io_bytes"] else j["write"]
p = d["clat_ns"].get("percentile", {})
print(json.dumps({"workload": sys.argv[1], "iops": d["iops"],
                  "lat_p50_us": p.get("50.000000", 0) / 1000, "lat_p99_us": p.get("99.000000", 0) / 1000}))' "$w" >>"$res"
    done
}

run_one() { # backend mode queues rep
    local backend=$1 mode=$2 queues=$3 rep=$4
    local tag="${mode}__q${queues}__${rep}__${backend}"
    local logf=$OUT/logs/$tag.log
    local res=$OUT/raw/$tag.jsonl
    prepare_cache "$mode"
    rm -f "$SOCK"
    if [ "$backend" = fio ]; then
        log "direct=$mode queues=$queues rep $rep/$REPS: fio on the image (ceiling)"
        echo "$mode $queues $rep $backend $(cut -d' ' -f1 /proc/loadavg)" >>"$OUT/runs.txt"
        run_fio "$res" "$queues"
        return
    fi
    case "$backend" in
    qsd-*)
        local aio=${backend#qsd-}
        "$QSD" \
            --blockdev "driver=file,node-name=file,filename=$IMG,cache.direct=$mode,aio=$aio" \
            --blockdev driver=raw,node-name=disk,file=file \
            --export "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=$queues" \
            >"$logf" 2>&1 &
        PID=$!
        wait_socket || { cat "$logf" >&2; die "qemu-storage-daemon ($backend) did not come up"; }
        ;;
    colo-blk)
        local direct=()
        [ "$mode" = on ] && direct=(--direct)
        RUST_LOG=info "$COLO" --socket "$SOCK" --image "$IMG" --num-queues "$queues" \
            --io-engine "$ENGINE" "${direct[@]}" >"$logf" 2>&1 &
        PID=$!
        wait_log "$logf" || { cat "$logf" >&2; die "colo-blk did not come up"; }
        ;;
    esac
    local load
    load=$(cut -d' ' -f1 /proc/loadavg)
    log "direct=$mode queues=$queues rep $rep/$REPS: $backend (pid $PID), load average $load"
    echo "$mode $queues $rep $backend $load" >>"$OUT/runs.txt"
    local wl=()
    [ -n "$WORKLOADS" ] && wl=(--workload "$WORKLOADS")
    if ! "$BENCH" --socket "$SOCK" --seconds "$MEASURE" --warmup "$WARMUP" --queues "$queues" \
        --json --label "$backend" "${wl[@]}" >"$res" 2> >(sed 's/^/    /' >&2); then
        log "blkbench failed against $backend; its log:"
        tail -20 "$logf" >&2
        die "benchmark failed"
    fi
    stop_backend
}

IFS=, read -r -a QUEUES <<<"$QUEUE_LIST"
IFS=, read -r -a AIOS <<<"$QSD_AIO"
for mode in "${MODES[@]}"; do
    backends=()
    for aio in "${AIOS[@]}"; do
        # qsd refuses aio=native without O_DIRECT.
        [ "$aio" = native ] && [ "$mode" = off ] && continue
        backends+=("qsd-$aio")
    done
    backends+=(colo-blk)
    [ "$CEILING" = 1 ] && [ "$mode" = on ] && backends+=(fio)
    for queues in "${QUEUES[@]}"; do
        for rep in $(seq "$REPS"); do
            # ABBA: odd repetitions in list order, even ones reversed.
            order=("${backends[@]}")
            if [ $((rep % 2)) = 0 ]; then
                order=()
                for ((i = ${#backends[@]} - 1; i >= 0; i--)); do order+=("${backends[i]}"); done
            fi
            for backend in "${order[@]}"; do
                run_one "$backend" "$mode" "$queues" "$rep"
            done
        done
    done
done

# ---- table -------------------------------------------------------------------------------------
python3 - "$OUT" "$REPS" "$WARMUP" "$MEASURE" >"$OUT/summary.md" <<'EOF'
import glob, json, os, statistics, sys

out, reps, warmup, measure = sys.argv[1:5]
rows = {}  # (mode, queues, workload) -> backend -> list of results
for path in sorted(glob.glob(os.path.join(out, "raw", "*.jsonl"))):
    mode, queues, rep, backend = os.path.basename(path)[:-6].split("__")
    for line in open(path):
        r = json.loads(line)
        rows.setdefault((mode, int(queues[1:]), r["workload"]), {}).setdefault(backend, []).append(r)

def med(rs, k):
    return statistics.median(r[k] for r in rs)

def fmt(v):
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"

wl_order = ["randread-4k-qd1", "randread-4k-qd32", "randwrite-4k-qd1", "randwrite-4k-qd32",
            "seqwrite-1m-qd8", "seqread-1m-qd8"]
def wl_key(w):
    return wl_order.index(w) if w in wl_order else 99

groups = sorted({(k[0], k[1]) for k in rows}, key=lambda g: (g[0] != "off", g[1]))
for mode, queues in groups:
    keys = sorted([k for k in rows if k[:2] == (mode, queues)], key=lambda k: wl_key(k[2]))
    qsds = sorted({b for k in keys for b in rows[k] if b.startswith("qsd-")})
    ceiling = any("fio" in rows[k] for k in keys)
    print(f"### cache.direct={mode} ({'O_DIRECT' if mode == 'on' else 'host page cache'}), "
          f"{queues} queue(s), median of {reps} runs x {measure}s (after {warmup}s warm-up)\n")
    print("| workload | " + " | ".join(f"{b} IOPS" for b in qsds) +
          " | colo-blk IOPS | **colo-blk / best qsd** | best qsd | colo-blk p50 µs "
          "| best-qsd p50 µs | colo-blk p99 µs | best-qsd p99 µs |" +
          (" host fio IOPS | colo-blk / fio | best qsd / fio |" if ceiling else ""))
    print("|---|" + "---:|" * (len(qsds) + 7 + (3 if ceiling else 0)))
    for k in keys:
        c = rows[k].get("colo-blk", [])
        q = {b: rows[k][b] for b in qsds if b in rows[k]}
        if not c or not q:
            continue
        best = max(q, key=lambda b: med(q[b], "iops"))
        bi, ci = med(q[best], "iops"), med(c, "iops")
        cells = " | ".join(fmt(med(q[b], "iops")) if b in q else "-" for b in qsds)
        extra = ""
        if ceiling:
            f = rows[k].get("fio", [])
            fi = med(f, "iops") if f else 0
            extra = (f" {fmt(fi)} | {ci / fi:.2f} | {bi / fi:.2f} |" if fi else " - | - | - |")
        print(f"| {k[2]} | {cells} | {fmt(ci)} | **{ci / bi:.2f}** | {best[4:]} "
              f"| {fmt(med(c, 'lat_p50_us'))} | {fmt(med(q[best], 'lat_p50_us'))} "
              f"| {fmt(med(c, 'lat_p99_us'))} | {fmt(med(q[best], 'lat_p99_us'))} |" + extra)
    print()
    print("IOPS of every run (repetition 1 / 2 / ...):\n")
    cols = qsds + ["colo-blk"] + (["fio"] if ceiling else [])
    print("| workload | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for k in keys:
        cells = [" / ".join(fmt(r["iops"]) for r in rows[k].get(b, [])) for b in cols]
        print(f"| {k[2]} | " + " | ".join(cells) + " |")
    print()
loads = [float(l.split()[4]) for l in open(os.path.join(out, "runs.txt"))]
print(f"1-minute load average when the runs started: {min(loads):.2f} to {max(loads):.2f} "
      f"(median {statistics.median(loads):.2f}).\n")
print("colo-blk / best qsd = colo-blk's median IOPS over the median IOPS of the best qsd aio= "
      "configuration of that row (higher is better for colo-blk).")
if any("fio" in v for v in rows.values()):
    print("\nhost fio = fio with O_DIRECT on the image from the host (io_uring, one job per queue), "
          "no vhost-user backend: the device's ceiling.")
EOF
log "results in $OUT"
echo
cat "$OUT/environment.txt"
echo
cat "$OUT/summary.md"
