#!/usr/bin/env bash
# CPU per GiB written (docs/performance.md, "Replication throughput"; issue 22 goal 3): the
# user + system CPU seconds a standalone backend, and a replicating primary and its secondary,
# spend per GiB of guest writes, for the same fixed amount of data (blkbench --bytes).
#
# Every run gets fresh images created by colo-blk (page cache, not O_DIRECT) and fresh
# processes; the CPU is read from /proc/PID/stat just before blkbench starts and, for the
# pair, after the secondary has applied everything (replication-prepare-checkpoint), so
# start-up is not counted. Async replication, one queue, loopback; the link is TLS 1.3 with a
# pre-shared key unless --insecure-link. Per-thread CPU of each run goes to DIR/threads.jsonl.
# --perf: also `perf record -g` (DWARF call graphs) each process during each run, into
# DIR/perf-<config>-<workload>-<rep>-<n>.data (n: 0 the primary or standalone, 1 the secondary);
# the CPU figures then include perf's own overhead. Images are deleted after each run.
# --passes N: write the data N times and measure only the last pass (from the second on, the
# writes overwrite cached pages, and on the secondary clusters saved in this epoch: what is
# left without the first touch of fresh pages).
#
# Usage: qemu-scripts/bench-cpu.sh [--reps N] [--bytes SIZE] [--size SIZE] [--dir DIR]
#                                  [--workloads a,b] [--insecure-link] [--only standalone|pair]
#                                  [--perf] [--passes N]
# Environment: COLO_BLK (the colo-blk binary to measure; default: build target/release/colo-blk),
#              BLKBENCH (the blkbench executable; default: build it)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source-path=SCRIPTDIR source=bench-lib.sh
. "$REPO/qemu-scripts/bench-lib.sh"
REPS=3
BYTES=1G
SIZE=1G
WORKDIR=
WORKLOADS=randwrite-4k-qd32,seqwrite-1m-qd8
SECURITY=tls
ONLY=
PERF=0
PASSES=1
while [ $# -gt 0 ]; do
    case "$1" in
    --reps) REPS=$2; shift 2 ;;
    --bytes) BYTES=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --dir) WORKDIR=$2; shift 2 ;;
    --workloads) WORKLOADS=$2; shift 2 ;;
    --insecure-link) SECURITY=insecure; shift ;;
    --only) ONLY=$2; shift 2 ;;
    --perf) PERF=1; shift ;;
    --passes) PASSES=$2; shift 2 ;;
    -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done

log() { echo "[bench-cpu] $*" >&2; }

cd "$REPO"
[ -n "${COLO_BLK:-}" ] || cargo build --release -q
# BLKBENCH: a blkbench executable (building it rebuilds the library in the bench profile).
BENCH=${BLKBENCH:-$(blkbench_path)}
COLO=${COLO_BLK:-${CARGO_TARGET_DIR:-$REPO/target}/release/colo-blk}
[ -x "$BENCH" ] || { echo "blkbench not built" >&2; exit 1; }

[ -n "$WORKDIR" ] || WORKDIR=$(mktemp -d /var/tmp/colo-blk-cpu.XXXXXX)
mkdir -p "$WORKDIR"
COLO_PIDS_FILE=$WORKDIR/pids
: >"$COLO_PIDS_FILE"
trap cleanup_colo EXIT
RESULTS=$WORKDIR/results.jsonl
: >"$RESULTS"
if [ "$SECURITY" = tls ]; then
    head -c 32 /dev/urandom | base64 >"$WORKDIR/link.psk"
    chmod 600 "$WORKDIR/link.psk"
    LINK=(--tls-psk-file "$WORKDIR/link.psk")
else
    LINK=(--insecure-link)
fi

# threads PID...: one JSON object {pid: {thread name: cpu seconds}} of every thread so far, and
# the process's user and system seconds as "(user)" and "(sys)".
threads() {
    python3 - "$@" <<'PY'
import json, os, sys
tck = os.sysconf("SC_CLK_TCK")
out = {}
for pid in sys.argv[1:]:
    d = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            s = open(f"/proc/{pid}/task/{t}/stat").read()
        except OSError:
            continue
        name = s[s.index("(") + 1 : s.rindex(")")]
        f = s.rsplit(")", 1)[1].split()
        d[name] = round(d.get(name, 0) + (int(f[11]) + int(f[12])) / tck, 2)
    # The process's own counters also hold the threads that ended (a queue worker ends at
    # the client's disconnect).
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    d["(user)"], d["(sys)"] = int(f[11]) / tck, int(f[12]) / tck
    out[pid] = d
print(json.dumps(out))
PY
}

# measure WORKLOAD CONFIG PRIMARY_QMP|- PID...: one blkbench run of --bytes, then (for a pair)
# until the secondary applied everything; appends the CPU seconds per GiB of each PID.
measure() {
    local w=$1 config=$2 pqmp=$3
    shift 3
    local before=() after=() perfs=() p line t0 t1 n=0 pass
    for pass in $(seq 2 "$PASSES"); do
        "$BENCH" --socket "$WORKDIR/p.sock" --workload "$w" --bytes "$BYTES" --json >/dev/null
        [ "$pqmp" = - ] || qmp "$pqmp" replication-prepare-checkpoint '{"timeout-ms": 600000}' >/dev/null
    done
    sync
    if [ "$PERF" = 1 ]; then
        for p in "$@"; do
            perf record -q -F 999 -g --call-graph dwarf,16384 -p "$p" \
                -o "$WORKDIR/perf-$config-$w-$rep-$n.data" 2>/dev/null &
            perfs+=("$!")
            n=$((n + 1))
        done
        sleep 1
    fi
    for p in "$@"; do before+=("$(cpu_of "$p")"); done
    t0=$(threads "$@")
    line=$("$BENCH" --socket "$WORKDIR/p.sock" --workload "$w" --bytes "$BYTES" --json --label "$config")
    [ "$pqmp" = - ] || qmp "$pqmp" replication-prepare-checkpoint '{"timeout-ms": 600000}' >/dev/null
    for p in "$@"; do after+=("$(cpu_of "$p")"); done
    for p in "${perfs[@]}"; do kill -INT "$p"; done
    for p in "${perfs[@]}"; do wait "$p" || true; done
    t1=$(threads "$@")
    python3 - "$line" "${before[*]}" "${after[*]}" "$(cut -d' ' -f1 /proc/loadavg)" <<'PY' | tee -a "$RESULTS" >&2
import json, sys
r = json.loads(sys.argv[1])
b = [float(x) for x in sys.argv[2].split()]
a = [float(x) for x in sys.argv[3].split()]
gib = r["mib_s"] * r["seconds"] / 1024
r["cpu_s"] = [round(y - x, 3) for x, y in zip(b, a)]
r["cpu_s_per_gib"] = [round((y - x) / gib, 3) for x, y in zip(b, a)]
r["load"] = float(sys.argv[4])
print(json.dumps(r))
PY
    python3 - "$w" "$config" "$t0" "$t1" >>"$WORKDIR/threads.jsonl" <<'PY'
import json, sys
b, a = json.loads(sys.argv[3]), json.loads(sys.argv[4])
d = {p: {n: round(s - b[p].get(n, 0), 2) for n, s in a[p].items() if s - b[p].get(n, 0) > 0} for p in a}
print(json.dumps({"workload": sys.argv[1], "config": sys.argv[2], "threads": list(d.values())}))
PY
}

standalone() { # WORKLOAD
    rm -f "$WORKDIR"/p.img*
    local pid
    pid=$(start_colo "$WORKDIR/standalone.log" --socket "$WORKDIR/p.sock" --image "$WORKDIR/p.img" --size "$SIZE")
    measure "$1" standalone - "$pid"
    stop "$pid"
    rm -f "$WORKDIR"/p.img*
}

pair() { # WORKLOAD
    # colo-blk creates both images (--size): known zero, so the pair starts in sync.
    rm -rf "$WORKDIR"/p.img* "$WORKDIR"/s.img* "$WORKDIR/layers"
    local spid ppid port
    spid=$(start_colo "$WORKDIR/secondary.log" --role secondary "${LINK[@]}" --image "$WORKDIR/s.img" \
        --size "$SIZE" --listen 127.0.0.1:0 --layer-dir "$WORKDIR/layers" --qmp "$WORKDIR/s.qmp")
    port=$(ready_port "$WORKDIR/secondary.log.out")
    ppid=$(start_colo "$WORKDIR/primary.log" --role primary "${LINK[@]}" --image "$WORKDIR/p.img" \
        --size "$SIZE" --socket "$WORKDIR/p.sock" --peer "127.0.0.1:$port" --qmp "$WORKDIR/p.qmp")
    wait_session "$WORKDIR/primary.log"
    measure "$1" pair "$WORKDIR/p.qmp" "$ppid" "$spid"
    stop "$ppid"
    stop "$spid"
    # The images and layers take GiBs; only the results are kept.
    rm -rf "$WORKDIR"/p.img* "$WORKDIR"/s.img* "$WORKDIR/layers"
}

for rep in $(seq 1 "$REPS"); do
    # ABBA: the order of the configurations is reversed on every other repetition.
    order=(standalone pair)
    [ $((rep % 2)) = 0 ] && order=(pair standalone)
    for c in "${order[@]}"; do
        [ -z "$ONLY" ] || [ "$ONLY" = "$c" ] || continue
        for w in ${WORKLOADS//,/ }; do
            log "rep $rep: $c $w (load $(cut -d' ' -f1 /proc/loadavg))"
            "$c" "$w"
        done
    done
done

python3 - "$RESULTS" "$SECURITY" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    rows.setdefault((r["workload"], r["label"]), []).append(r)
med = statistics.median
print(f"CPU s per GiB written, median of {max(len(v) for v in rows.values())} (link: {sys.argv[2]}):")
print("| workload | standalone | primary | secondary | primary / standalone | secondary / standalone | MiB/s standalone / pair |")
print("|---|---:|---:|---:|---:|---:|---:|")
for w in sorted({k[0] for k in rows}):
    s = rows.get((w, "standalone"), [])
    p = rows.get((w, "pair"), [])
    cs = med(x["cpu_s_per_gib"][0] for x in s) if s else float("nan")
    cp = med(x["cpu_s_per_gib"][0] for x in p) if p else float("nan")
    cq = med(x["cpu_s_per_gib"][1] for x in p) if p else float("nan")
    ms = med(x["mib_s"] for x in s) if s else float("nan")
    mp = med(x["mib_s"] for x in p) if p else float("nan")
    print(f"| {w} | {cs:.2f} | {cp:.2f} | {cq:.2f} | {cp/cs:.2f} | {cq/cs:.2f} | {ms:.0f} / {mp:.0f} |")
PY
