#!/usr/bin/env bash
# colo-pair.sh -- starts a COLO-protected test VM on one host: the secondary colo-blk backend,
# the primary colo-blk backend, the Primary VM (QEMU, the tiny test guest of build-guest.sh, its
# serial console on this terminal), the checkpoint manager colo-ctl.py and, with --svm, a
# Secondary VM on the secondary backend's socket.
#
# Usage: colo-pair.sh [options] [-- EXTRA-QEMU-ARGS-FOR-THE-PVM...]
#
# Options:
#   --dir DIR          working directory: images, sockets, logs (default: ./colo-pair)
#   --size SIZE        disk size when the images are created (default 64M)
#   --image-from IMG   start both disks as copies of IMG (default: fresh zero images)
#   --port PORT        replication port on 127.0.0.1 (default 7780)
#   --interval-ms N    checkpoint interval (default 1000)
#   --max-bytes B      checkpoint early after B replicated bytes (default 0: off)
#   --svm              also boot a Secondary VM on the secondary (in the background,
#                      console in DIR/svm.log)
#   --script FILE      guest script for the PVM (run-vm.sh --script); default: a shell
#   --svm-script FILE  guest script for the SVM (default: the PVM's)
#   --failover         let colo-ctl fail over to the secondary when the primary dies
#   --colo-blk PATH    colo-blk binary (default: target/release/colo-blk, else target/debug)
#   --qemu BIN         QEMU for both VMs (default $QEMU, else qemu-system-x86_64); QEMU 7.2 and
#                      11 both work (run-vm.sh picks the chardev options by version). This
#                      script uses colo-blk's own checkpoints (colo-ctl.py), not QEMU's x-colo;
#                      for a real x-colo pair see colo-qemu-pair.sh.
#   -h, --help         this text
#
# Files in DIR: primary.img secondary.img, pvm.sock svm.sock (vhost-user), primary.qmp
# secondary.qmp pvm.qmp (QMP), primary.log secondary.log colo-ctl.log svm.log, layers/.
# When the PVM exits (poweroff in the guest, or Ctrl-A x), everything else is stopped.
# Two hosts: see docs/user-guide.md (the same commands, split between the hosts).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }
die() { echo "colo-pair: error: $*" >&2; exit 2; }
log() { echo "colo-pair: $*" >&2; }

dir=./colo-pair
size=64M
image_from=""
port=7780
interval=1000
max_bytes=0
svm=0
script=""
svm_script=""
failover=0
bin=""
qemu="${QEMU:-qemu-system-x86_64}"
extra=()

while [ $# -gt 0 ]; do
    case "$1" in
        --dir) dir="$2"; shift 2 ;;
        --size) size="$2"; shift 2 ;;
        --image-from) image_from="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        --interval-ms) interval="$2"; shift 2 ;;
        --max-bytes) max_bytes="$2"; shift 2 ;;
        --svm) svm=1; shift ;;
        --script) script="$2"; shift 2 ;;
        --svm-script) svm_script="$2"; shift 2 ;;
        --failover) failover=1; shift ;;
        --colo-blk) bin="$2"; shift 2 ;;
        --qemu) qemu="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; extra=("$@"); break ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

if [ -z "$bin" ]; then
    for b in "$repo/target/release/colo-blk" "$repo/target/debug/colo-blk"; do
        if [ -x "$b" ]; then bin="$b"; break; fi
    done
fi
[ -n "$bin" ] || die "no colo-blk binary: run 'cargo build --release' first"
[ -x "$bin" ] || die "no colo-blk binary: run 'cargo build --release' first"
python3 -c 'import qemu.qmp' 2>/dev/null || die "python3 qemu.qmp missing: pip install qemu.qmp"

mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
for s in pvm.sock svm.sock primary.qmp secondary.qmp pvm.qmp; do rm -f "$dir/$s"; done
# --size only when colo-blk creates the images: on an existing image it must be its size.
size_args=()
if [ -n "$image_from" ]; then
    cp --sparse=always "$image_from" "$dir/primary.img"
    cp --sparse=always "$image_from" "$dir/secondary.img"
elif [ ! -f "$dir/primary.img" ] || [ ! -f "$dir/secondary.img" ]; then
    # Both disks must start identical: two fresh zero images.
    rm -f "$dir/primary.img" "$dir/secondary.img"
    size_args=(--size "$size")
fi

pids=()
# shellcheck disable=SC2317 # called by the trap
cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

# Waits until a unix socket exists (the process behind it is listening).
wait_socket() {
    local _
    for _ in $(seq 1 300); do
        [ -S "$1" ] && return 0
        sleep 0.1
    done
    die "$1 did not appear (see the logs in $dir)"
}

svm_args=()
if [ "$svm" = 1 ]; then svm_args=(--socket "$dir/svm.sock" --num-queues 2); fi
"$bin" --role secondary --insecure-link --image "$dir/secondary.img" ${size_args[@]+"${size_args[@]}"} \
    --listen "127.0.0.1:$port" --layer-dir "$dir/layers" --qmp "$dir/secondary.qmp" \
    ${svm_args[@]+"${svm_args[@]}"} 2>"$dir/secondary.log" &
pids+=($!)
wait_socket "$dir/secondary.qmp"
log "secondary backend: pid $!, log $dir/secondary.log"

"$bin" --role primary --insecure-link --image "$dir/primary.img" ${size_args[@]+"${size_args[@]}"} --socket "$dir/pvm.sock" \
    --num-queues 2 --peer "127.0.0.1:$port" --qmp "$dir/primary.qmp" 2>"$dir/primary.log" &
pids+=($!)
wait_socket "$dir/pvm.sock"
log "primary backend: pid $!, log $dir/primary.log"

ctl_args=(--qemu-qmp "$dir/pvm.qmp" --primary-qmp "$dir/primary.qmp"
    --secondary-qmp "$dir/secondary.qmp" --interval-ms "$interval" --max-bytes "$max_bytes")
if [ "$failover" = 1 ]; then ctl_args+=(--failover-on-primary-loss); fi
python3 "$here/colo-ctl.py" "${ctl_args[@]}" >"$dir/colo-ctl.log" 2>&1 &
pids+=($!)
log "colo-ctl: pid $!, log $dir/colo-ctl.log (one JSON line per checkpoint)"

if [ "$svm" = 1 ]; then
    wait_socket "$dir/svm.sock"
    s="${svm_script:-$script}"
    s_args=()
    if [ -n "$s" ]; then s_args=(--script "$s"); fi
    bash "$here/run-vm.sh" --qemu "$qemu" --socket "$dir/svm.sock" --qmp "$dir/svm.qmp" \
        ${s_args[@]+"${s_args[@]}"} </dev/null >"$dir/svm.log" 2>&1 &
    pids+=($!)
    log "Secondary VM: pid $!, console in $dir/svm.log"
fi

p_args=()
if [ -n "$script" ]; then p_args=(--script "$script"); fi
log "Primary VM: console below (guest: poweroff -f to end; QEMU: Ctrl-A x)"
rc=0
bash "$here/run-vm.sh" --qemu "$qemu" --socket "$dir/pvm.sock" --qmp "$dir/pvm.qmp" \
    ${p_args[@]+"${p_args[@]}"} -- ${extra[@]+"${extra[@]}"} || rc=$?
log "Primary VM exited ($rc); stopping the rest"
exit "$rc"
