#!/usr/bin/env bash
# run-vm.sh -- boots the test guest (see build-guest.sh) in QEMU against a colo-blk
# vhost-user socket. The guest disk appears as /dev/vda (more --socket: /dev/vdb, ...).
#
# Usage: run-vm.sh --socket PATH [options] [-- EXTRA-QEMU-ARGS...]
#
# Options:
#   --socket PATH     vhost-user-blk socket of a running colo-blk (required; env COLO_SOCKET).
#                     Repeatable: one vhost-user-blk device per socket, in order, so the
#                     first is /dev/vda, the second /dev/vdb, ... (a VM with several disks).
#   --guest DIR       directory holding vmlinuz and initramfs.cpio.gz
#                     (default: qemu-scripts/guest; env COLO_GUEST_DIR).
#   --script FILE     shell script the guest's /init runs (installed as /colo/test.sh). Without
#                     it the guest starts an interactive shell on the serial console.
#   --file FILE       extra file made available in the guest as /colo/<basename> (repeatable).
#                     --script/--file are passed as a second, uncompressed cpio archive appended
#                     to the initramfs (the kernel unpacks concatenated archives).
#   --qmp PATH        also open a QMP server on unix socket PATH (server=on,wait=off).
#   --num-queues N    virtqueues of the vhost-user-blk device (default 1, colo-blk's default
#                     --num-queues: QEMU fails when it asks for more queues than the backend has).
#   --smp N           guest vCPUs (default 2; the Linux driver uses at most one queue per vCPU,
#                     so a device with N queues needs N vCPUs to use them all).
#   --mem SIZE        guest RAM, also the size of the shared memfd backend (default 256M).
#   --append STR      extra kernel command-line arguments.
#   --qemu BIN        QEMU binary (default $QEMU, else qemu-system-x86_64).
#   -h, --help        this text.
#   -- ARGS...        anything after -- is passed to QEMU unchanged.
#
# Environment:
#   COLO_BLK_ACCEL    QEMU accelerator: tcg (default) or kvm. -cpu host is never used.
#   QEMU              QEMU binary (default qemu-system-x86_64); --qemu BIN does the same. Works
#                     with QEMU 7.2 (Debian 12) and the QEMU 11 of install-colo-qemu.sh
#                     ($COLO_QEMU): the chardev option is picked from the version.
#
# QEMU is started with -nographic -no-reboot: the serial console is on stdout/stdin, and the
# guest's poweroff (or a kernel panic, with panic=-1) makes QEMU exit. The script's exit status is
# QEMU's. Guest memory is a shared memfd, as vhost-user requires; the vhost-user chardev uses
# reconnect=1 (QEMU < 9.2) or reconnect-ms=1000 (newer), so QEMU waits for the backend and
# reconnects if it restarts.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=qemu-lib.sh
. "$here/qemu-lib.sh"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }
die() { echo "run-vm: error: $*" >&2; exit 2; }

socks=()
guest="${COLO_GUEST_DIR:-$here/guest}"
script=""
files=()
qmp=""
num_queues=1
smp=2
mem=256M
append=""
extra=()
qemu="${QEMU:-qemu-system-x86_64}"

while [ $# -gt 0 ]; do
    case "$1" in
        --socket) socks+=("$2"); shift 2 ;;
        --guest) guest="$2"; shift 2 ;;
        --script) script="$2"; shift 2 ;;
        --file) files+=("$2"); shift 2 ;;
        --qmp) qmp="$2"; shift 2 ;;
        --num-queues) num_queues="$2"; shift 2 ;;
        --smp) smp="$2"; shift 2 ;;
        --mem) mem="$2"; shift 2 ;;
        --append) append="$2"; shift 2 ;;
        --qemu) qemu="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; extra=("$@"); break ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

if [ ${#socks[@]} -eq 0 ] && [ -n "${COLO_SOCKET:-}" ]; then socks=("$COLO_SOCKET"); fi
[ ${#socks[@]} -gt 0 ] || die "--socket is required"
if [ ! -f "$guest/vmlinuz" ] || [ ! -f "$guest/initramfs.cpio.gz" ]; then
    die "no guest in $guest: run qemu-scripts/build-guest.sh first"
fi

reconnect="$(qemu_reconnect_opt "$qemu")" || die "$qemu does not run"
case "${COLO_BLK_ACCEL:-tcg}" in
    tcg) accel=tcg ;;
    kvm) accel=kvm ;;
    *) die "COLO_BLK_ACCEL must be tcg or kvm" ;;
esac

initrd="$guest/initramfs.cpio.gz"
tmp=""
# shellcheck disable=SC2317 # called by the trap
cleanup() { if [ -n "$tmp" ]; then rm -rf "$tmp"; fi; }
trap cleanup EXIT
if [ -n "$script" ] || [ ${#files[@]} -gt 0 ]; then
    tmp="$(mktemp -d "${TMPDIR:-/tmp}/colo-vm.XXXXXX")"
    mkdir -p "$tmp/root/colo"
    [ -n "$script" ] && install -m 755 "$script" "$tmp/root/colo/test.sh"
    for f in ${files[@]+"${files[@]}"}; do
        install -m 644 "$f" "$tmp/root/colo/$(basename "$f")"
    done
    cat "$initrd" >"$tmp/initrd"
    # The kernel only looks for an uncompressed archive at a 4-byte aligned offset: pad with
    # zeros (which it skips) to a 512-byte boundary.
    size=$(stat -c %s "$tmp/initrd")
    head -c $(( (512 - size % 512) % 512 )) /dev/zero >>"$tmp/initrd"
    (cd "$tmp/root" && find colo | cpio --quiet -o -H newc -R 0:0) >>"$tmp/initrd"
    initrd="$tmp/initrd"
fi

args=(
    -machine q35 -accel "$accel"
    -smp "$smp"
    -m "$mem"
    -object "memory-backend-memfd,id=mem,size=$mem,share=on"
    -machine memory-backend=mem
    -kernel "$guest/vmlinuz"
    -initrd "$initrd"
    -append "console=ttyS0 panic=-1 loglevel=4 edd=off $append"
    -nographic -no-reboot
    -nic none
)
# One device per socket; the first keeps the id of the single-disk setup (vub).
for i in "${!socks[@]}"; do
    id=vub; [ "$i" = 0 ] || id="vub$i"
    args+=(-chardev "socket,id=$id,path=${socks[$i]},$reconnect"
           -device "vhost-user-blk-pci,chardev=$id,num-queues=$num_queues")
done
[ -n "$qmp" ] && args+=(-qmp "unix:$qmp,server=on,wait=off")

# Not exec: the trap must remove the temporary initrd once QEMU exits. Callers that need to kill
# QEMU should kill this script's process group.
rc=0
"$qemu" "${args[@]}" ${extra[@]+"${extra[@]}"} || rc=$?
exit "$rc"
