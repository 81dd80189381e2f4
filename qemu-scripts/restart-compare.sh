#!/usr/bin/env bash
# restart-compare.sh -- the backend-restart test of tests/backend_restart.rs, run against
# qemu-storage-daemon ("qsd") or colo-blk, both made slow the same way from the outside, for a
# side-by-side row (issue 21, docs/performance.md "Restart behaviour").
#
# Usage: restart-compare.sh [options]
#
#   --backend B      qsd or colo-blk (default colo-blk).
#   --engine E       qsd: threads (aio=threads) or io_uring; colo-blk: threads or uring
#                    (--io-engine). Default threads. The strace delay only reaches syscalls, so
#                    an io_uring backend is not slowed by it.
#   --delay-ms N     delay added to the exit of every pread64/pwrite64/preadv/pwritev of the
#                    backend, by `strace -f -e inject=SYSCALL:delay_exit=...` (default 15; 0:
#                    no strace). Neither backend's own fault injection is used.
#   --restarts N     SIGKILLs of the backend process (default 10), each once the guest printed a
#                    progress line since the previous restart.
#   --reps N         repeat the whole run N times (default 1).
#   --stall-s N      no guest progress within N s after a restart counts as a stall (default 60).
#   --out FILE       append one tab-separated result line per run (default: stdout only).
#   --keep DIR       work directory (image, socket, logs) kept for inspection (default: a temp
#                    directory, removed).
#   -h, --help       this text.
#
# Environment: COLO_BLK (colo-blk binary; default target/release/colo-blk, or
# $CARGO_TARGET_DIR/release/colo-blk), QEMU (see run-vm.sh), COLO_GUEST_DIR (the test guest).
#
# The guest is the one of tests/backend_restart.rs (its script is taken from that file): QEMU 7.2,
# TCG, one vCPU, one queue, reconnect=1; 8 workers write and read back their own 4 KiB records
# with O_DIRECT, 4 workers read 8 MiB at a time. After the last worker, every record slot is
# read back in the guest ("RST: verified"), and again from the image on the host once the guest
# powered off.
#
# Result line: backend engine delay_ms rep restarts guest_io_errors first_error_after stalls
# records_verified seconds. guest_io_errors counts console lines with "I/O error", "IOERR" or
# "is not a head"; first_error_after is the restart the first of them followed ("-": none);
# records_verified is "yes" only when the guest printed "verified", no "FAIL" line, and the host
# found every slot's last record in the image.
#
# Example (the runs of docs/performance.md):
#   qemu-scripts/restart-compare.sh --backend qsd --engine threads --reps 3 --out r.tsv
#   qemu-scripts/restart-compare.sh --backend colo-blk --engine threads --reps 3 --out r.tsv
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }
die() { echo "restart-compare: error: $*" >&2; exit 2; }
say() { echo "restart-compare: $*" >&2; }

backend=colo-blk
engine=threads
delay_ms=15
restarts=10
reps=1
stall_s=60
out=""
keep=""
while [ $# -gt 0 ]; do
    case "$1" in
        --backend) backend="$2"; shift 2 ;;
        --engine) engine="$2"; shift 2 ;;
        --delay-ms) delay_ms="$2"; shift 2 ;;
        --restarts) restarts="$2"; shift 2 ;;
        --reps) reps="$2"; shift 2 ;;
        --stall-s) stall_s="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --keep) keep="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
case "$backend" in
    qsd) command -v qemu-storage-daemon >/dev/null || die "qemu-storage-daemon not installed" ;;
    colo-blk)
        colo_blk="${COLO_BLK:-${CARGO_TARGET_DIR:-$repo/target}/release/colo-blk}"
        [ -x "$colo_blk" ] || die "no colo-blk at $colo_blk (cargo build --release, or COLO_BLK)" ;;
    *) die "--backend must be qsd or colo-blk" ;;
esac
[ "$delay_ms" = 0 ] || command -v strace >/dev/null || die "strace not installed"

# ---- the guest script of tests/backend_restart.rs ----------------------------------------------
test_rs="$repo/tests/backend_restart.rs"
const() { sed -n "s/^const $1: [a-z0-9&' ]* = \"\{0,1\}\([^\";]*\)\"\{0,1\};/\1/p" "$test_rs"; }
workers="$(const WORKERS)"; slots="$(const SLOTS)"; iters="$(const ITERS)"; mark="$(const MARK)"
[ -n "$workers" ] && [ -n "$slots" ] && [ -n "$iters" ] && [ -n "$mark" ] \
    || die "cannot read the constants of $test_rs"
guest_script() {
    # The format! string between r#" and "#, with its {NAME}s filled in and {{ }} unescaped.
    sed -n '/r#"W=/,/^"#$/p' "$test_rs" | sed '$d; 1s/^ *r#"//' \
        | sed "s/{WORKERS}/$workers/g; s/{SLOTS}/$slots/g; s/{ITERS}/$iters/g; s/{MARK}/$mark/g;
               s/{{/{/g; s/}}/}/g"
}

# ---- one run -------------------------------------------------------------------------------
bpid=""; spid=""; vmpid=""
# shellcheck disable=SC2317 # called by the trap and stop_all
stop_all() {
    if [ -n "$vmpid" ]; then kill -KILL -- "-$vmpid" 2>/dev/null || true; wait "$vmpid" 2>/dev/null || true; fi
    if [ -n "$bpid" ]; then kill -KILL "$bpid" 2>/dev/null || true; fi
    if [ -n "$spid" ]; then wait "$spid" 2>/dev/null || true; fi
    vmpid=""; bpid=""; spid=""
}
trap stop_all EXIT
trap 'exit 130' INT TERM

# start_backend DIR: starts the backend (under strace when delay_ms > 0) on DIR/vhost.sock; sets
# spid (the process started here) and bpid (the backend itself) and waits for its socket.
start_backend() {
    local dir="$1" cmd=() i
    rm -f "$dir/vhost.sock"
    case "$backend" in
        qsd) cmd=(qemu-storage-daemon
                  --blockdev "driver=file,filename=$dir/disk.img,node-name=f,cache.direct=off,aio=$engine"
                  --blockdev "driver=raw,file=f,node-name=d"
                  --export "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=$dir/vhost.sock,writable=on,num-queues=1") ;;
        colo-blk) cmd=("$colo_blk" --socket "$dir/vhost.sock" --image "$dir/disk.img" --size 128M
                       --io-engine "$engine" --io-threads 16) ;;
    esac
    if [ "$delay_ms" = 0 ]; then
        "${cmd[@]}" >>"$dir/backend.log" 2>&1 &
        spid=$!; bpid=$spid
    else
        local d=$((delay_ms * 1000)) inj=()
        for sc in pwritev preadv pwrite64 pread64; do inj+=(-e "inject=$sc:delay_exit=$d"); done
        strace -f "${inj[@]}" -o /dev/null "${cmd[@]}" >>"$dir/backend.log" 2>&1 &
        spid=$!; bpid=""
    fi
    for i in $(seq 300); do
        if [ -S "$dir/vhost.sock" ]; then
            # strace's child that runs the backend's binary (strace may fork helpers).
            local exe c
            exe="$(readlink -f "$(command -v "${cmd[0]}")")"
            for c in $(pgrep -P "$spid" || true); do
                [ "$(readlink -f "/proc/$c/exe" 2>/dev/null)" = "$exe" ] && bpid=$c
            done
            [ -n "$bpid" ] && return 0
        fi
        kill -0 "$spid" 2>/dev/null || die "the backend exited (see $dir/backend.log)"
        sleep 0.1
    done
    die "no backend on $dir/vhost.sock after 30 s"
}

# wait_line CONSOLE FROM PATTERN TIMEOUT: waits for a console line after line FROM matching
# PATTERN (grep -E); prints its line number.
wait_line() {
    local n deadline=$((SECONDS + $4))
    while [ $SECONDS -lt $deadline ]; do
        n="$(tail -n +"$(($2 + 1))" "$1" | grep -n -m1 -E -- "$3" | cut -d: -f1 || true)"
        if [ -n "$n" ]; then echo $(($2 + n)); return 0; fi
        [ -n "$vmpid" ] && ! kill -0 "$vmpid" 2>/dev/null && return 1
        sleep 0.2
    done
    return 1
}

# check_image IMAGE: every slot holds the last record its worker wrote (as the test's host check).
check_image() {
    local w k s last
    for w in $(seq 0 $((workers - 1))); do
        for k in $(seq 0 $((slots - 1))); do
            s=$((w * slots + k)); last=$(( (iters - 1) - ((iters - 1 - k) % slots) ))
            cmp -s <(yes "W$w S$s I$last" | head -c 4096) \
                   <(dd if="$1" bs=4096 skip="$s" count=1 status=none) || return 1
        done
    done
}

run_once() {
    local rep="$1" dir console start line from done_restarts=0 stalls=0 errors verified
    local kills="" first k after=-
    if [ -n "$keep" ]; then dir="$keep/$backend-$engine-$rep"; rm -rf "$dir"; mkdir -p "$dir"
    else dir="$(mktemp -d "${TMPDIR:-/tmp}/restart-compare.XXXXXX")"; fi
    console="$dir/console.log"
    : >"$console"
    guest_script >"$dir/guest.sh"
    # qsd needs the image to exist; colo-blk creates it with --size (the test's way).
    [ "$backend" = qsd ] && truncate -s 128M "$dir/disk.img"
    start=$SECONDS
    start_backend "$dir"
    setsid bash "$here/run-vm.sh" --socket "$dir/vhost.sock" --num-queues 1 --smp 1 --mem 256M \
        --script "$dir/guest.sh" >"$console" 2>&1 </dev/null &
    vmpid=$!
    from="$(wait_line "$console" 0 "$mark start" 180)" || die "the guest did not start (see $console)"
    while [ "$done_restarts" -lt "$restarts" ]; do
        if ! line="$(wait_line "$console" "$from" "$mark (progress|verified)" "$stall_s")"; then
            stalls=$((stalls + 1))
            say "run $rep: no guest progress within ${stall_s}s after restart $done_restarts"
            line="$(wc -l <"$console")"
        elif sed -n "${line}p" "$console" | grep -q "$mark verified"; then
            say "run $rep: the guest finished after $done_restarts restarts"
            break
        fi
        kill -KILL "$bpid"
        wait "$spid" 2>/dev/null || true
        done_restarts=$((done_restarts + 1))
        from="$(wc -l <"$console")"
        kills="$kills $from"
        say "run $rep: restart $done_restarts after console line $line"
        start_backend "$dir"
    done
    # The rest of the run, with the same stall rule: some output within stall_s, until verified.
    while ! grep -q "$mark verified" "$console"; do
        if ! from="$(wait_line "$console" "$from" "$mark (progress|verified)" "$stall_s")"; then
            stalls=$((stalls + 1))
            say "run $rep: the guest stalled before the end (see $console)"
            break
        fi
    done
    if grep -q "$mark verified" "$console"; then
        wait_line "$console" 0 "colo-init: script exit status" 60 >/dev/null || true
    fi
    stop_all
    errors="$(grep -c -E "I/O error|IOERR|is not a head" "$console" || true)"
    # The restart the first error followed (the number of kills before its console line).
    first="$(grep -n -m1 -E "I/O error|IOERR|is not a head" "$console" | cut -d: -f1 || true)"
    if [ -n "$first" ]; then
        after=0
        for k in $kills; do [ "$k" -lt "$first" ] && after=$((after + 1)); done
    fi
    verified=no
    if grep -q "$mark verified" "$console" && ! grep -q "$mark FAIL" "$console" \
        && check_image "$dir/disk.img"; then
        verified=yes
    fi
    local row
    row="$(printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s' "$backend" "$engine" "$delay_ms" "$rep" \
        "$done_restarts" "$errors" "$after" "$stalls" "$verified" $((SECONDS - start)))"
    echo "$row"
    [ -z "$out" ] || echo "$row" >>"$out"
    if [ "$errors" != 0 ]; then
        grep -m5 -E "I/O error|IOERR|is not a head" "$console" | sed 's/^/  guest: /' >&2
    fi
    [ -n "$keep" ] || rm -rf "$dir"
}

for rep in $(seq "$reps"); do run_once "$rep"; done
