#!/usr/bin/env bash
# colo-qemu-pair.sh -- a real COLO pair (QEMU's own x-colo) on one host, both VMs' disks served
# by colo-blk over vhost-user-blk. The backends follow QEMU's checkpoints by themselves (no
# manager, no replication-checkpoint): docs/colo-with-qemu.md.
#
# Usage: colo-qemu-pair.sh start    [options]   start everything (in the background), migrate
#                                                into COLO, print the QMP sockets, return
#        colo-qemu-pair.sh status   [--dir DIR] query-status / query-colo-status / query-migrate
#                                                of both QEMUs, query-replication of both backends
#        colo-qemu-pair.sh failover [--dir DIR] the PVM's host "dies": SIGKILL the PVM's QEMU and
#                                                the primary backend, then x-colo-lost-heartbeat
#                                                on the SVM's QEMU; the secondary backend fails
#                                                over by itself when QEMU ends COLO on the SVM
#                                                (checked; if it did not within 5 s,
#                                                replication-failover is sent and reported)
#        colo-qemu-pair.sh failover-pvm [--dir DIR] the SVM's host "dies": SIGKILL the SVM's
#                                                QEMU and the secondary backend, then
#                                                x-colo-lost-heartbeat on the PVM's QEMU (the
#                                                primary backend notices the lost peer itself)
#        colo-qemu-pair.sh reprotect [--dir DIR] [--resync full|copy] [--allow-full-sync]
#                                                the direction is learned from what runs.
#                                                After failover (only the SVM's side runs): the
#                                                roles swap. The old PVM's image comes back as a
#                                                secondary (--discard-my-data, another port), a
#                                                new SVM QEMU with -incoming on it, then
#                                                colo-blk reprotect --x-colo promotes the
#                                                survivor's backend in place (its VM runs on),
#                                                resyncs incrementally (the union of both dirty
#                                                records; full only with --allow-full-sync when
#                                                the generations demand it), migrates the
#                                                survivor's VM with x-colo and returns after
#                                                the first COLO checkpoint. The survivor is
#                                                then the pair's PVM side for every command.
#                                                After failover-pvm (only the PVM's side runs): a
#                                                new secondary backend (on the same port) on a fresh
#                                                image with a full resync (replication-start
#                                                {"full": true}; default), or on a copy of the
#                                                primary's image taken while the PVM is paused
#                                                (copy: replication-stop, stop, cp, start, cont:
#                                                the incremental resync of what the PVM wrote
#                                                since); a new SVM QEMU with -incoming; migrate
#                                                with x-colo again; returns in COLO
#        colo-qemu-pair.sh stop     [--dir DIR] kill everything this pair started
#
# What start runs (files in DIR):
#   1. secondary backend: colo-blk --role secondary --listen 127.0.0.1:PORT --layer-dir layers
#      --socket svm.sock --qmp secondary.qmp (log secondary.log), serving the SVM's disk;
#   2. primary backend: colo-blk --role primary --peer 127.0.0.1:PORT --socket pvm.sock
#      --qmp primary.qmp (log primary.log);
#   3. the SVM's QEMU with -incoming defer on svm.sock (console svm.log, QMP svm.qmp);
#   4. the PVM's QEMU on pvm.sock (console pvm.log, QMP pvm.qmp); both with
#      memory-backend-memfd share=on, the tiny guest of build-guest.sh running a loop that writes
#      and reads back /dev/vda every second ("TICK n ok", "IOERR n" on error);
#   5. QMP, per QEMU's docs/COLO-FT.txt: return-path + x-colo on the SVM, migrate-incoming;
#      return-path + x-colo on the PVM, x-checkpoint-delay, migrate; waits for status "colo";
#   6. colo-qemu-watch.py (log events.log: every QMP event of both QEMUs with QEMU's timestamp,
#      the PVM's STOP->RESUME pause per checkpoint).
#
# Options (start):
#   --dir DIR              working directory (default ./colo-qemu-pair)
#   --size SIZE            disk size of the fresh images (default 64M)
#   --machine q35|pc       machine type (default q35)
#   --mem SIZE             guest RAM (default 256M)
#   --smp N                vCPUs (default 1); the disk has as many queues
#   --delay MS             x-checkpoint-delay (default 2000)
#   --port N               replication port (default 7790); migration N+1, NIC chardevs N+2..N+5
#   --nic                  add a NIC (-netdev user, restricted) with colo-compare on the PVM,
#                          filter-mirror / filter-redirector / filter-rewriter as in COLO-FT.txt
#                          (not with reprotect)
#   --disk-checkpoint M    how the backends' disk checkpoints follow QEMU's (default qemu):
#                            qemu     the backends follow QEMU's own checkpoints (a MARKER per
#                                     device stop with dirty logging on; the SVM's restart
#                                     decides): nothing else runs
#                            on-stop  in addition, at every PVM STOP event colo-qemu-watch.py
#                                     runs replication-checkpoint on the primary backend (the
#                                     old helper, for a colo-blk without QEMU-driven
#                                     checkpoints; QEMU does not wait for it)
#                            none     same as qemu (kept for old scripts)
#   --no-disk              no vhost-user-blk device at all (a control; no backends)
#   --strace               run both backends under strace -f (recvmsg/sendmsg, in
#                          primary.strace / secondary.strace) to see the vhost-user messages
#   --colo-blk PATH        colo-blk binary (default target/release/colo-blk, else target/debug)
#
# Environment: COLO_QEMU (QEMU, default /opt/colo-qemu/bin/qemu-system-x86_64, from
# install-colo-qemu.sh; QEMU 7.2 does not work for x-colo), COLO_BLK_ACCEL=tcg|kvm (default tcg),
# COLO_GUEST_DIR (the guest of build-guest.sh, default qemu-scripts/guest), RUST_LOG (the
# backends' log level, default info; debug shows every marker).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
# shellcheck source-path=SCRIPTDIR source=qemu-lib.sh
. "$here/qemu-lib.sh"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }
die() { echo "colo-qemu-pair: error: $*" >&2; exit 2; }
log() { echo "colo-qemu-pair: $*" >&2; }

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
    start|status|failover|failover-pvm|reprotect|stop) ;;
    -h|--help|help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
esac

dir=./colo-qemu-pair
size=64M
machine=q35
mem=256M
smp=1
delay=2000
port=7790
nic=0
disk_ckpt=qemu
disk=1
resync=full
allow_full=0
strace=0
bin=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dir) dir="$2"; shift 2 ;;
        --size) size="$2"; shift 2 ;;
        --machine) machine="$2"; shift 2 ;;
        --mem) mem="$2"; shift 2 ;;
        --smp) smp="$2"; shift 2 ;;
        --delay) delay="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        --nic) nic=1; shift ;;
        --disk-checkpoint) disk_ckpt="$2"; shift 2 ;;
        --no-disk) disk=0; shift ;;
        --strace) strace=1; shift ;;
        --colo-blk) bin="$2"; shift 2 ;;
        --resync) resync="$2"; shift 2 ;;
        --allow-full-sync) allow_full=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
case "$disk_ckpt" in qemu|none|on-stop) ;; *) die "--disk-checkpoint must be qemu, on-stop or none" ;; esac
[ "$disk_ckpt" = none ] && disk_ckpt=qemu
[ "$disk" = 1 ] || disk_ckpt=qemu
case "$resync" in full|copy) ;; *) die "--resync must be full or copy" ;; esac
qemu="${COLO_QEMU:-$COLO_QEMU_DEFAULT}"

# qmp SOCKET COMMAND [JSON-ARGS]: runs one QMP command, prints its answer as JSON.
qmp() {
    python3 - "$@" <<'EOF'
import asyncio, json, sys
from qemu.qmp import QMPClient
async def main(path, cmd, args):
    c = QMPClient("colo-qemu-pair")
    await c.connect(path)
    try:
        r = await asyncio.wait_for(c.execute(cmd, json.loads(args) if args else None), 30)
        print(json.dumps(r))
    finally:
        await c.disconnect()
asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else ""))
EOF
}

# ---------------------------------------------------------------------------------------------
pid_of() { sed -n "s/^$1 //p" "$dir/pids" 2>/dev/null | tail -n1; }
# A zombie (killed, not yet reaped by whoever inherited it) counts as dead.
alive() { [ -n "$1" ] && [ -r "/proc/$1/stat" ] && ! awk '{exit $3 == "Z" ? 0 : 1}' "/proc/$1/stat" 2>/dev/null; }
ms_since() { python3 -c "import sys,time; print(f'{1000*(time.time()-float(sys.argv[1])):.1f}')" "$1"; }

# spawn NAME LOG CMD...: runs CMD in its own session in the background, records its pid.
spawn() {
    local name="$1" logf="$2"
    shift 2
    setsid "$@" </dev/null >"$logf" 2>&1 &
    sed -i "/^$name /d" "$dir/pids"
    echo "$name $!" >>"$dir/pids"
}
# tracee NAME: under --strace, NAME's recorded pid is strace's; record colo-blk's own pid as
# NAME (what failover kills: SIGKILL of strace would leave its tracee running) and strace's
# as NAME-strace.
tracee() {
    [ "$strace" = 1 ] || return 0
    local sp child
    sp="$(pid_of "$1")"
    child="$(pgrep -P "$sp" | head -n1)"
    [ -n "$child" ] || die "no process under strace $sp"
    sed -i "s/^$1 $sp\$/$1-strace $sp\n$1 $child/" "$dir/pids"
}
wait_for() {  # wait_for WHAT TEST...
    local what="$1" _
    shift
    for _ in $(seq 1 600); do
        if "$@"; then return 0; fi
        sleep 0.1
    done
    die "timed out waiting for $what (logs in $dir)"
}

# Which processes play which part now (the files of each are named after it): PV the PVM's
# QEMU, PB the primary backend, SV the SVM's QEMU, SB the secondary backend; PIMG, SIMG their
# images, SPORT where the secondary listens. A reprotect after a failover swaps the sides.
PV=pvm PB=primary SV=svm SB=secondary PIMG=primary.img SIMG=secondary.img SPORT=""
save_roles() { declare -p PV PB SV SB PIMG SIMG SPORT >"$dir/roles"; }
load_roles() {  # (after the config: the default SPORT is the pair's port)
    SPORT="$port"
    # declare -g: the file's declare lines must not make the variables local to this function.
    # shellcheck disable=SC1090
    if [ -f "$dir/roles" ]; then . <(sed 's/^declare -- /declare -g /' "$dir/roles"); fi
}

# The settings a later command (reprotect) needs again.
save_config() {
    declare -p size machine mem smp delay port nic disk disk_ckpt strace bin qemu accel \
        reconnect guest >"$dir/config"
}

start_secondary() {  # start_secondary IMAGE [FLAGS...]: the secondary backend $SB serving $SV.sock
    local t=() img="$1"
    shift
    local flags=("$@")
    # --allow-full-sync: a re-protect's new secondary disk (fresh or a copy) has no common
    # generation with the primary and is fully synced; a fresh pair starts in sync anyway.
    [ ${#flags[@]} -gt 0 ] || flags=(--allow-full-sync)
    rm -rf "$dir/layers-$SB"
    rm -f "$dir/$SV.sock" "$dir/$SB.qmp"
    [ "$strace" = 1 ] && t=("${tracer[@]}" "$dir/$SB.strace")
    spawn "$SB" "$dir/$SB.log" ${t[@]+"${t[@]}"} "$bin" --role secondary --insecure-link \
        "${flags[@]}" --image "$img" --size "$size" --listen "127.0.0.1:$SPORT" \
        --layer-dir "$dir/layers-$SB" --socket "$dir/$SV.sock" --num-queues "$smp" --qmp "$dir/$SB.qmp"
    wait_for "the secondary backend" test -S "$dir/$SV.sock"
    tracee "$SB"
}

common_args() {
    common=(
        -machine "$machine" -accel "$accel" -smp "$smp" -m "$mem"
        -object "memory-backend-memfd,id=mem,size=$mem,share=on" -machine memory-backend=mem
        -kernel "$guest/vmlinuz" -initrd "$dir/initrd"
        -append "console=ttyS0 panic=-1 loglevel=4 edd=off"
        -nographic -no-reboot -nodefaults -serial stdio
    )
}
vm_args() {  # vm_args pvm|svm: the per-VM devices
    local vm="$1"
    if [ "$disk" = 1 ]; then
        echo "-chardev socket,id=vub,path=$dir/$vm.sock,$reconnect"
        echo "-device vhost-user-blk-pci,chardev=vub,num-queues=$smp,id=disk0"
    fi
    echo "-qmp unix:$dir/$vm.qmp,server=on,wait=off"
    echo "-qmp unix:$dir/$vm-watch.qmp,server=on,wait=off"
    if [ "$nic" = 1 ]; then
        echo "-netdev user,id=hn0,restrict=on"
        echo "-device virtio-net-pci,id=e0,netdev=hn0,mac=52:54:00:c0:10:01"
        local m=$((port + 2)) c=$((port + 3)) p=$((port + 4)) o=$((port + 5))
        if [ "$vm" = "$PV" ]; then
            echo "-chardev socket,id=mirror0,host=127.0.0.1,port=$m,server=on,wait=off"
            echo "-chardev socket,id=compare1,host=127.0.0.1,port=$c,server=on,wait=off"
            echo "-chardev socket,id=compare0,host=127.0.0.1,port=$p,server=on,wait=off"
            echo "-chardev socket,id=compare0-0,host=127.0.0.1,port=$p"
            echo "-chardev socket,id=compare_out,host=127.0.0.1,port=$o,server=on,wait=off"
            echo "-chardev socket,id=compare_out0,host=127.0.0.1,port=$o"
            echo "-object filter-mirror,id=m0,netdev=hn0,queue=tx,outdev=mirror0"
            echo "-object filter-redirector,netdev=hn0,id=redire0,queue=rx,indev=compare_out"
            echo "-object filter-redirector,netdev=hn0,id=redire1,queue=rx,outdev=compare0"
            echo "-object iothread,id=iothread1"
            echo "-object colo-compare,id=comp0,primary_in=compare0-0,secondary_in=compare1,outdev=compare_out0,iothread=iothread1"
        else
            echo "-chardev socket,id=red0,host=127.0.0.1,port=$m,$reconnect"
            echo "-chardev socket,id=red1,host=127.0.0.1,port=$c,$reconnect"
            echo "-object filter-redirector,id=f1,netdev=hn0,queue=tx,indev=red0"
            echo "-object filter-redirector,id=f2,netdev=hn0,queue=rx,outdev=red1"
            echo "-object filter-rewriter,id=rew0,netdev=hn0,queue=all"
        fi
    fi
}
start_svm() {  # the SVM's QEMU ($SV), -incoming defer
    local svm_dev
    common_args
    rm -f "$dir/$SV.qmp" "$dir/$SV-watch.qmp"
    mapfile -t svm_dev < <(vm_args "$SV" | tr ' ' '\n')
    spawn "$SV" "$dir/$SV.log" "$qemu" -name "$SV" "${common[@]}" "${svm_dev[@]}" -incoming defer
    wait_for "the SVM's QMP socket" test -S "$dir/$SV.qmp"
}
watch_events() {  # (re)start colo-qemu-watch.py, appending to events.log
    local w_args=() mode=none
    if [ "$disk" = 1 ]; then w_args=(--primary-qmp "$dir/$PB.qmp"); fi
    [ "$disk_ckpt" = on-stop ] && mode=on-stop
    local p
    p="$(pid_of watch)"
    if alive "$p"; then kill "$p" 2>/dev/null || true; fi
    setsid python3 "$here/colo-qemu-watch.py" --pvm-qmp "$dir/$PV-watch.qmp" \
        --svm-qmp "$dir/$SV-watch.qmp" --disk-checkpoint "$mode" ${w_args[@]+"${w_args[@]}"} \
        </dev/null >>"$dir/events.log" 2>&1 &
    sed -i "/^watch /d" "$dir/pids"
    echo "watch $!" >>"$dir/pids"
    local n
    n=$(watching)
    wait_for "colo-qemu-watch" watching_more "$n"
}
watching() { local c; c=$(grep -c '"watching"' "$dir/events.log" 2>/dev/null || true); echo "${c:-0}"; }
# shellcheck disable=SC2317 # called by wait_for
watching_more() { [ "$(watching)" -gt "$1" ]; }
CAPS='{"capabilities": [{"capability": "return-path", "state": true}, {"capability": "x-colo", "state": true}]}'
svm_incoming() {  # the SVM's half of the x-colo sequence
    log "svm migrate-set-capabilities return-path x-colo: $(qmp "$dir/$SV.qmp" migrate-set-capabilities "$CAPS")"
    log "svm migrate-incoming: $(qmp "$dir/$SV.qmp" migrate-incoming "{\"uri\": \"tcp:127.0.0.1:$1\"}")"
}
migrate_colo() {  # QMP per COLO-FT.txt: into COLO, wait for status colo
    local mport=$((port + 1))
    svm_incoming "$mport"
    log "pvm migrate-set-capabilities return-path x-colo: $(qmp "$dir/$PV.qmp" migrate-set-capabilities "$CAPS")"
    log "pvm x-checkpoint-delay $delay: $(qmp "$dir/$PV.qmp" migrate-set-parameters "{\"x-checkpoint-delay\": $delay}")"
    log "pvm migrate: $(qmp "$dir/$PV.qmp" migrate "{\"uri\": \"tcp:127.0.0.1:$mport\"}")"
    in_colo() { qmp "$dir/$PV.qmp" query-migrate 2>/dev/null | grep -q '"status": "colo"'; }
    wait_for "query-migrate status colo" in_colo
    log "in COLO: pvm $(qmp "$dir/$PV.qmp" query-colo-status), svm $(qmp "$dir/$SV.qmp" query-colo-status)"
}
# reprotect after failover-pvm: the PVM's side survived; a new secondary and a new SVM.
reprotect_new_svm() {
    alive "$(pid_of "$PV")" || die "neither the PVM nor the SVM runs: nothing to re-protect"
    alive "$(pid_of "$PB")" || die "the primary backend is not running"
    ! alive "$(pid_of "$SV")" || die "both VMs run: fail one side over first"
    if alive "$(pid_of "$SB")"; then kill -9 "$(pid_of "$SB")"; fi
    [ "$(qmp "$dir/$PV.qmp" query-colo-status | python3 -c 'import json,sys; print(json.load(sys.stdin)["mode"])')" = none ] \
        || die "the PVM is still in COLO: failover-pvm first"
    log "the PVM's side survived: a new secondary backend and a new SVM"
    local t0 n img resyncs
    t0=$(date +%s.%N)
    n=$(( $(grep -c '^secondary-gen' "$dir/pids" 2>/dev/null || true) + 2 ))
    echo "secondary-gen $n" >>"$dir/pids"
    img="$dir/secondary$n.img"
    rm -f "$img"
    for f in "$SB" "$SV"; do [ -f "$dir/$f.log" ] && mv "$dir/$f.log" "$dir/$f-gen$((n - 1)).log"; done
    resyncs=$(grep -c 'resync complete' "$dir/$PB.log" 2>/dev/null || true)
    log "replication-stop on the primary: $(qmp "$dir/$PB.qmp" replication-stop)"
    if [ "$resync" = copy ]; then
        # A copy of the primary's image while the PVM is paused, then the incremental
        # resync of what it wrote since (the primary's dirty record).
        log "pvm stop: $(qmp "$dir/$PV.qmp" stop)"
        cp --sparse=always "$dir/$PIMG" "$img"
        log "copied $PIMG while the PVM was paused"
        start_secondary "$img"
        log "replication-start: $(qmp "$dir/$PB.qmp" replication-start)"
        log "pvm cont: $(qmp "$dir/$PV.qmp" cont)"
    else
        start_secondary "$img"
        log "replication-start full: $(qmp "$dir/$PB.qmp" replication-start '{"full": true}')"
    fi
    SIMG="$(basename "$img")"
    save_roles
    # shellcheck disable=SC2317 # called by wait_for
    synced() {
        [ "$(grep -c 'resync complete' "$dir/$PB.log" 2>/dev/null || true)" -gt "$resyncs" ] \
            && qmp "$dir/$PB.qmp" query-replication | grep -q '"state": "connected"'
    }
    wait_for "the resync of the new secondary" synced
    log "new secondary backend in sync ($(ms_since "$t0") ms): $(qmp "$dir/$PB.qmp" query-replication)"
    start_svm
    watch_events
    migrate_colo
    log "re-protected in $(ms_since "$t0") ms (secondary image $img)"
}

# reprotect after failover: the SVM's side survived (its backend failed over). The roles swap:
# the old PVM's image comes back as the secondary (--discard-my-data) of the survivor, whose
# backend colo-blk reprotect promotes in place; a new SVM QEMU on the old PVM's side.
reprotect_after_failover() {
    alive "$(pid_of "$SB")" || die "the survivor's backend ($SB) is not running"
    ! alive "$(pid_of "$PB")" || die "the old primary backend ($PB) still runs: it must be dead (fenced) first"
    local st
    st="$(qmp "$dir/$SB.qmp" query-replication)"
    case "$st" in
        *'"state": "failed-over"'*|*'"role": "primary"'*) ;;
        *) die "the survivor's backend has not failed over: $st" ;;
    esac
    log "the SVM's side survived: the roles swap ($SV and $SB become the PVM's side)"
    local t0 n nsv nsb nport mport flags=(--discard-my-data)
    t0=$(date +%s.%N)
    n=$(( $(grep -c '^swap-gen' "$dir/pids" 2>/dev/null || true) + 2 ))
    echo "swap-gen $n" >>"$dir/pids"
    nsv="svm-g$n" nsb="secondary-g$n"
    if [ "$SPORT" = "$port" ]; then nport=$((port + 6)); else nport="$port"; fi
    mport=$((port + 1))
    [ "$allow_full" = 1 ] && flags+=(--allow-full-sync)
    # The new secondary on the old PVM's image, then the new SVM waiting for the migration.
    local old_pimg="$PIMG"
    PV="$SV" PB="$SB" PIMG="$SIMG" SV="$nsv" SB="$nsb" SIMG="$old_pimg" SPORT="$nport"
    start_secondary "$dir/$SIMG" "${flags[@]}"
    start_svm
    svm_incoming "$mport"
    save_roles
    log "colo-blk reprotect --x-colo: promote $PB in place, resync, migrate $PV with x-colo"
    "$bin" reprotect --x-colo --survivor "$dir/$PB.qmp" --peer "127.0.0.1:$SPORT" \
        --target "$dir/$SB.qmp" --qemu-qmp "$dir/$PV.qmp" --migrate-uri "tcp:127.0.0.1:$mport" \
        --checkpoint-delay "$delay" >"$dir/reprotect-g$n.json" \
        || die "colo-blk reprotect failed: $(cat "$dir/reprotect-g$n.json")"
    log "report: $(cat "$dir/reprotect-g$n.json")"
    watch_events
    log "re-protected in $(ms_since "$t0") ms: PVM $PV (backend $PB, $PIMG), SVM $SV (backend $SB, $SIMG)"
}

tracer=()
# shellcheck disable=SC2054 # the commas are strace's
if [ "$strace" = 1 ]; then tracer=(strace -f -tt -T -xx -s 256 -e trace=recvmsg,sendmsg -o); fi

# ---------------------------------------------------------------------------------------------
if [ "$cmd" != start ]; then
    [ -d "$dir" ] || die "no pair in $dir"
    dir="$(cd "$dir" && pwd)"
    # shellcheck disable=SC1091
    if [ -f "$dir/config" ]; then . "$dir/config"; fi
    load_roles
    case "$cmd" in
    status)
        for part in "pvm $PV" "svm $SV"; do
            read -r label vm <<<"$part"
            if alive "$(pid_of "$vm")"; then
                echo "$label ($vm) query-status: $(qmp "$dir/$vm.qmp" query-status)"
                echo "$label ($vm) query-colo-status: $(qmp "$dir/$vm.qmp" query-colo-status)"
            else
                echo "$label ($vm): not running"
            fi
        done
        if alive "$(pid_of "$PV")"; then
            qmp "$dir/$PV.qmp" query-migrate | python3 -c 'import json,sys; m=json.load(sys.stdin); print("pvm query-migrate: status", m.get("status"))' || true
        fi
        rm -f "$dir/.primary.status" "$dir/.secondary.status"
        for part in "primary $PB" "secondary $SB"; do
            read -r label b <<<"$part"
            if alive "$(pid_of "$b")"; then
                qmp "$dir/$b.qmp" query-replication >"$dir/.$label.status" 2>/dev/null || true
                echo "$label backend ($b) query-replication: $(cat "$dir/.$label.status")"
                if [ -n "$bin" ]; then "$bin" status "$dir/$b.qmp" 2>/dev/null | grep '^  protection: ' || true; fi
            elif [ -n "$(pid_of "$b")" ]; then
                echo "$label backend ($b): not running"
            fi
        done
        # A user stop/cont of the PVM during COLO ends an epoch on the primary (a MARKER) and
        # pauses the PVM, but is not a checkpoint: counted apart (docs/colo-with-qemu.md).
        python3 - "$dir" <<'EOF'
import json, os, sys
d = sys.argv[1]
def load(name):
    try:
        with open(os.path.join(d, "." + name + ".status")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
p, s = load("primary"), load("secondary")
resumes = {"pvm": 0, "svm": 0}
try:
    for line in open(os.path.join(d, "events.log")):
        e = json.loads(line)
        if e.get("event") == "RESUME" and e.get("vm") in resumes:
            resumes[e["vm"]] += 1
except (OSError, ValueError):
    pass
if s:
    colo = s.get("colo", {})
    print("checkpoints: %d taken by the secondary (epoch %d); stops of the PVM that were not "
          "checkpoints (user stop, reset): %d" % (s["checkpoints"], s["epoch"], colo.get("stops", 0)))
    if colo.get("svm-mismatch"):
        print("SVM MEMORY AND DISK DO NOT MATCH (failover refused): " + colo["svm-mismatch"])
if p:
    print("primary: %d markers (checkpoints and other stops of the PVM), epoch %d"
          % (p.get("markers", 0), p["epoch"]))
print("events.log: PVM STOP->RESUME %d (checkpoints and user stops), SVM RESUME %d"
      % (resumes["pvm"], resumes["svm"]))
EOF
        ;;
    failover|failover-pvm)
        # failover: the PVM's side dies, the SVM takes over; failover-pvm: the SVM's side dies,
        # the PVM goes on alone.
        if [ "$cmd" = failover ]; then dead=("$PV" "$PB"); vm="$SV"; backend="$SB"
        else dead=("$SV" "$SB"); vm="$PV"; backend=""; fi
        t0=$(date +%s.%N)
        for p in "${dead[@]}"; do
            if alive "$(pid_of "$p")"; then kill -9 "$(pid_of "$p")"; fi
        done
        # Wait until both are really gone (a SIGKILLed process can take a moment to be reaped).
        for p in "${dead[@]}"; do
            while alive "$(pid_of "$p")"; do sleep 0.05; done
        done
        t1=$(date +%s.%N)
        log "killed ${dead[*]} ($(python3 -c "import sys; print(f'{1000*(float(sys.argv[2])-float(sys.argv[1])):.1f}')" "$t0" "$t1") ms)"
        bq=""
        if [ -n "$backend" ] && [ -n "$(pid_of "$backend")" ]; then bq="$dir/$backend.qmp"; fi
        nic_objs=""
        if [ -f "$dir/nic" ]; then
            # COLO-FT.txt "Secondary Failover" / "Primary Failover": the filters go.
            if [ "$vm" = "$SV" ]; then nic_objs="f2 f1"; else nic_objs="comp0 iothread1 m0 redire0 redire1"; fi
        fi
        python3 - "$dir/$vm.qmp" "$bq" "$nic_objs" "$t0" <<'EOF2'
import asyncio, json, sys, time
from qemu.qmp import QMPClient
async def main(vm_path, backend_path, nic_objs, t0):
    t0 = float(t0)
    vm = QMPClient("vm")
    await vm.connect(vm_path)
    t = time.monotonic()
    r = await vm.execute("x-colo-lost-heartbeat")
    print(f"x-colo-lost-heartbeat: {json.dumps(r)} ({1000*(time.monotonic()-t):.1f} ms)")
    for o in nic_objs.split():
        try:
            await vm.execute("object-del", {"id": o})
        except Exception as e:
            print(f"object-del {o}: {e}")
    # Wait until QEMU left COLO (the failover runs in QEMU's migration thread).
    while (await vm.execute("query-colo-status"))["mode"] != "none":
        await asyncio.sleep(0.01)
    print(f"left COLO after {1000*(time.monotonic()-t):.1f} ms ({1000*(time.time()-t0):.1f} ms after the kill)")
    print("query-status:", json.dumps(await vm.execute("query-status")))
    print("query-colo-status:", json.dumps(await vm.execute("query-colo-status")))
    await vm.disconnect()
    if backend_path:
        # QEMU switched dirty logging off on the SVM: the secondary backend fails over by
        # itself. Check it; only if it did not, fail over by hand (and say so).
        b = QMPClient("backend")
        await b.connect(backend_path)
        deadline = time.monotonic() + 5
        while True:
            r = await b.execute("query-replication")
            if r["state"] == "failed-over" and r.get("hidden-bytes", 0) == 0:
                print(f"secondary backend failed over by itself: epoch {r['epoch']} "
                      f"({1000*(time.time()-t0):.1f} ms after the kill)")
                break
            if time.monotonic() > deadline:
                print(f"secondary backend did NOT fail over by itself within 5 s ({json.dumps(r)}); "
                      "sending replication-failover")
                r = await b.execute("replication-failover")
                print(f"replication-failover: {json.dumps(r)}")
                break
            await asyncio.sleep(0.01)
        await b.disconnect()
asyncio.run(main(*sys.argv[1:5]))
EOF2
        ;;
    reprotect)
        [ -f "$dir/config" ] || die "no $dir/config (start the pair with this version)"
        [ "$nic" = 0 ] || die "reprotect does not re-add the NIC filters (start without --nic)"
        [ "$disk" = 1 ] || die "reprotect needs the disks"
        # The direction: which side survived.
        if ! alive "$(pid_of "$PV")" && alive "$(pid_of "$SV")"; then
            reprotect_after_failover
        else
            reprotect_new_svm
        fi
        ;;
    stop)
        # Each process was started in its own session (setsid): signal its process group, so
        # an strace wrapper and its tracee go together. QEMU in COLO can ignore SIGTERM; after
        # 5 s, SIGKILL.
        while read -r name p; do
            case "$name" in secondary-gen|swap-gen) continue ;; esac
            if alive "$p"; then kill -TERM -- "-$p" 2>/dev/null || kill "$p" 2>/dev/null || true; log "stopping $name ($p)"; fi
        done <"$dir/pids"
        while read -r name p; do
            case "$name" in secondary-gen|swap-gen) continue ;; esac
            for _ in $(seq 1 50); do alive "$p" || break; sleep 0.1; done
            if alive "$p"; then kill -KILL -- "-$p" 2>/dev/null || kill -9 "$p" 2>/dev/null || true; log "killed $name ($p) with SIGKILL"; fi
        done <"$dir/pids"
        ;;
    esac
    exit 0
fi

# --- start ------------------------------------------------------------------------------------
if [ -z "$bin" ] && [ "$disk" = 1 ]; then
    # Built here, so that a checkout never runs a stale binary from an older build.
    if command -v cargo >/dev/null; then
        log "building colo-blk (cargo build --release)"
        (cd "$repo" && cargo build --release --quiet) || die "cargo build --release failed"
    fi
    for b in "$repo/target/release/colo-blk" "$repo/target/debug/colo-blk"; do
        if [ -x "$b" ]; then bin="$b"; break; fi
    done
fi
if [ "$disk" = 1 ]; then
    { [ -n "$bin" ] && [ -x "$bin" ]; } || die "no colo-blk binary: run 'cargo build --release' first"
fi
qemu_at_least "$qemu" 8 1 \
    || die "$qemu is not a QEMU >= 8.1 (x-colo needs QEMU 11 here): run qemu-scripts/install-colo-qemu.sh, or set COLO_QEMU"
python3 -c 'import qemu.qmp' 2>/dev/null || die "python3 qemu.qmp missing: pip install qemu.qmp"
[ "$strace" = 0 ] || command -v strace >/dev/null || die "strace not installed"
guest="${COLO_GUEST_DIR:-$here/guest}"
{ [ -f "$guest/vmlinuz" ] && [ -f "$guest/initramfs.cpio.gz" ]; } \
    || die "no guest in $guest: run qemu-scripts/build-guest.sh first"
case "${COLO_BLK_ACCEL:-tcg}" in tcg|kvm) accel="${COLO_BLK_ACCEL:-tcg}" ;; *) die "COLO_BLK_ACCEL must be tcg or kvm" ;; esac
reconnect="$(qemu_reconnect_opt "$qemu")"

mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
if [ -f "$dir/pids" ]; then
    while read -r name p; do
        case "$name" in secondary-gen|swap-gen) continue ;; esac
        if kill -0 "$p" 2>/dev/null; then die "a pair is still running in $dir (colo-qemu-pair.sh stop --dir $dir)"; fi
    done <"$dir/pids"
fi
rm -rf "$dir"/layers* "$dir/root"
rm -f "$dir"/*.sock "$dir"/*.qmp "$dir"/*.log "$dir"/*.strace "$dir/pids" "$dir/nic" \
    "$dir"/primary.img "$dir"/secondary*.img "$dir/config" "$dir/roles" "$dir"/reprotect-g*.json
: >"$dir/pids"
[ "$nic" = 1 ] && : >"$dir/nic"
save_config
SPORT="$port"
save_roles

started=0
# shellcheck disable=SC2317 # called by the trap
on_exit() {
    if [ "$started" = 0 ]; then
        log "start failed; stopping what was started (logs in $dir)"
        local name p
        while read -r name p; do kill "$p" 2>/dev/null || true; done <"$dir/pids"
    fi
}
trap on_exit EXIT

# The guest: write a tick to /dev/vda, read it back, every second.
mkdir -p "$dir/root/colo"
if [ "$disk" = 1 ]; then
    cat >"$dir/root/colo/test.sh" <<'EOF'
i=0
while true; do
  i=$((i + 1))
  echo "tick $i" >/tmp/t
  if dd if=/tmp/t of=/dev/vda bs=512 seek=$((i % 1000)) count=1 conv=sync oflag=direct 2>/dev/null \
     && dd if=/dev/vda of=/tmp/r bs=512 skip=$((i % 1000)) count=1 iflag=direct 2>/dev/null \
     && [ "$(head -n1 /tmp/r | tr -d '\000')" = "tick $i" ]; then
    echo "TICK $i ok"
  else
    echo "IOERR $i"
  fi
  sleep 1
done
EOF
else
    # shellcheck disable=SC2016 # expanded by the guest's shell
    printf 'i=0\nwhile true; do i=$((i + 1)); echo "TICK $i nodisk"; sleep 1; done\n' >"$dir/root/colo/test.sh"
fi
if [ -n "${COLO_PAIR_SCRIPT:-}" ]; then cp "$COLO_PAIR_SCRIPT" "$dir/root/colo/test.sh"; fi
cat "$guest/initramfs.cpio.gz" >"$dir/initrd"
isz=$(stat -c %s "$dir/initrd")
head -c $(( (512 - isz % 512) % 512 )) /dev/zero >>"$dir/initrd"
(cd "$dir/root" && find colo | cpio --quiet -o -H newc -R 0:0) >>"$dir/initrd"

if [ "$disk" = 1 ]; then
    start_secondary "$dir/secondary.img"
    t=()
    [ "$strace" = 1 ] && t=("${tracer[@]}" "$dir/primary.strace")
    spawn primary "$dir/primary.log" ${t[@]+"${t[@]}"} "$bin" --role primary --insecure-link \
        --image "$dir/primary.img" --size "$size" --peer "127.0.0.1:$port" \
        --socket "$dir/pvm.sock" --num-queues "$smp" --qmp "$dir/primary.qmp"
    wait_for "the primary backend" test -S "$dir/pvm.sock"
    tracee primary
    log "backends up: secondary $dir/secondary.qmp, primary $dir/primary.qmp"
fi

common_args
mapfile -t pvm_dev < <(vm_args pvm | tr ' ' '\n')
# With --nic the PVM must listen before the SVM connects its redirectors (they reconnect anyway).
spawn pvm "$dir/pvm.log" "$qemu" -name primary "${common[@]}" "${pvm_dev[@]}"
start_svm
wait_for "the PVM's QMP socket" test -S "$dir/pvm.qmp"
log "QEMUs up ($("$qemu" --version | head -n1)); waiting for the PVM's guest to run"
wait_for "the PVM's guest (${COLO_PAIR_READY:-TICK 2 } in pvm.log)" grep -q "${COLO_PAIR_READY:-TICK 2 }" "$dir/pvm.log"

watch_events
migrate_colo
started=1

cat <<EOF
COLO pair running in $dir (x-checkpoint-delay $delay ms, disk checkpoints: $disk_ckpt)
  PVM QEMU QMP:            $dir/pvm.qmp      console $dir/pvm.log
  SVM QEMU QMP:            $dir/svm.qmp      console $dir/svm.log
EOF
if [ "$disk" = 1 ]; then
    cat <<EOF
  primary backend QMP:     $dir/primary.qmp  log $dir/primary.log
  secondary backend QMP:   $dir/secondary.qmp  log $dir/secondary.log
EOF
fi
cat <<EOF
  events (STOP/RESUME...): $dir/events.log
  $0 status --dir $dir | failover --dir $dir | failover-pvm --dir $dir | reprotect --dir $dir | stop --dir $dir
EOF
