#!/usr/bin/env bash
# qemu-migrate-try.sh -- the experiment behind docs/colo-with-qemu.md: migrates a running test
# guest whose disk is vhost-user-blk (two standalone colo-blk processes on one image, one per
# QEMU) from a source QEMU to a destination QEMU started with -incoming, either as a plain live
# migration or with QEMU's COLO (x-colo) switched on.
#
# Usage: qemu-migrate-try.sh plain|colo [--machine q35|pc] [--no-disk [--private-ram]] [--dir DIR]
#   --no-disk       no vhost-user-blk device at all (the control experiment)
#   --private-ram   ordinary guest RAM instead of a shared memfd (only with --no-disk)
# Prints the QMP exchange, the tails of both consoles and whether the guest kept ticking.
# QEMU=BIN picks the QEMU (default qemu-system-x86_64, Debian 12's 7.2; e.g.
# QEMU=/opt/colo-qemu/bin/qemu-system-x86_64 for install-colo-qemu.sh's QEMU 11, which also
# needs the return-path capability for x-colo, set here on both sides).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
# shellcheck source-path=SCRIPTDIR source=qemu-lib.sh
. "$here/qemu-lib.sh"
QEMU="${QEMU:-qemu-system-x86_64}"
reconnect="$(qemu_reconnect_opt "$QEMU")" || { echo "$QEMU does not run" >&2; exit 2; }
mode="${1:-}"
shift || true
machine=q35
disk=1
# shellcheck disable=SC2054 # the commas are QEMU's
mem=(-object memory-backend-memfd,id=mem,size=192M,share=on -machine memory-backend=mem)
dir="${TMPDIR:-/tmp}/colo-migrate-try"
while [ $# -gt 0 ]; do
    case "$1" in
        --machine) machine="$2"; shift 2 ;;
        --no-disk) disk=0; shift ;;
        --private-ram) mem=(); shift ;;
        --dir) dir="$2"; shift 2 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
case "$mode" in plain|colo) ;; *) echo "usage: $0 plain|colo [...]" >&2; exit 2 ;; esac

bin="$repo/target/release/colo-blk"
[ -x "$bin" ] || bin="$repo/target/debug/colo-blk"
guest="${COLO_GUEST_DIR:-$here/guest}"
mkdir -p "$dir/root/colo"
dir="$(cd "$dir" && pwd)"
cd "$dir"
rm -f ./*.sock ./*.qmp ./*.log disk.img

# The guest prints a tick every second and (with a disk) writes it to /dev/vda.
io=true
if [ "$disk" = 1 ]; then
    # shellcheck disable=SC2016 # expanded by the guest's shell
    io='echo "tick $i" >/tmp/t; dd if=/tmp/t of=/dev/vda bs=512 seek=$((i % 1000)) conv=sync oflag=direct 2>/dev/null || echo "IOERR $i"'
fi
cat >root/colo/test.sh <<EOF
i=0
while true; do
  i=\$((i + 1))
  $io
  echo "TICK \$i"
  sleep 1
done
EOF
chmod 755 root/colo/test.sh
cat "$guest/initramfs.cpio.gz" >initrd
size=$(stat -c %s initrd)
head -c $(( (512 - size % 512) % 512 )) /dev/zero >>initrd
(cd root && find colo | cpio --quiet -o -H newc -R 0:0) >>initrd

pids=()
# shellcheck disable=SC2317 # called by the trap
cleanup() {
    local p
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

qemu() {
    local name="$1"
    shift
    local dev=()
    if [ "$disk" = 1 ]; then
        # shellcheck disable=SC2054 # the commas are QEMU's
        dev=(-chardev "socket,id=vub,path=$dir/$name.sock,$reconnect"
            -device vhost-user-blk-pci,chardev=vub,num-queues=1)
    fi
    "$QEMU" -machine "$machine" -accel tcg -smp 1 -m 192M \
        ${mem[@]+"${mem[@]}"} \
        ${dev[@]+"${dev[@]}"} -qmp "unix:$dir/$name.qmp,server=on,wait=off" \
        -kernel "$guest/vmlinuz" -initrd initrd \
        -append "console=ttyS0 panic=-1 loglevel=4 edd=off" \
        -nographic -no-reboot -nic none "$@" </dev/null >"$name.log" 2>&1 &
    pids+=($!)
}

if [ "$disk" = 1 ]; then
    truncate -s 64M disk.img
    for side in src dst; do
        "$bin" --socket "$side.sock" --image disk.img --share-rw 2>"backend-$side.log" &
        pids+=($!)
    done
    for _ in $(seq 100); do [ -S src.sock ] && [ -S dst.sock ] && break; sleep 0.1; done
fi
qemu src
qemu dst -incoming tcp:127.0.0.1:4444
for _ in $(seq 300); do grep -q "TICK 3" src.log && break; sleep 0.2; done

python3 - "$mode" "$dir" <<'EOF'
import asyncio, json, sys
from qemu.qmp import QMPClient, ExecuteError

async def main(mode, d):
    src, dst = QMPClient("src"), QMPClient("dst")
    await src.connect(f"{d}/src.qmp")
    await dst.connect(f"{d}/dst.qmp")

    async def ex(c, cmd, args=None):
        try:
            r = await asyncio.wait_for(c.execute(cmd, args), 5)
            print(c.name, cmd, json.dumps(args) if args else "", "->", json.dumps(r)[:300], flush=True)
            return r
        except ExecuteError as e:
            print(c.name, cmd, "-> ERROR:", e, flush=True)
        except asyncio.TimeoutError:
            print(c.name, cmd, "-> NO ANSWER within 5 s", flush=True)
        except Exception as e:
            print(c.name, cmd, "->", type(e).__name__, e, flush=True)

    if mode == "colo":
        # QEMU >= 8.1 refuses x-colo without return-path; set it on both sides, secondary first
        # (7.2 accepts it too).
        for c in (dst, src):
            await ex(c, "migrate-set-capabilities",
                     {"capabilities": [{"capability": "return-path", "state": True},
                                       {"capability": "x-colo", "state": True}]})
        await ex(src, "migrate-set-parameters", {"x-checkpoint-delay": 3000})
    await ex(src, "migrate", {"uri": "tcp:127.0.0.1:4444"})
    for _ in range(60):
        r = await ex(src, "query-migrate")
        if not r or r.get("status") not in ("setup", "active"):
            break
        await asyncio.sleep(1)
    for _ in range(3):
        await asyncio.sleep(3)
        await ex(src, "query-status")
        await ex(dst, "query-status")
        if mode == "colo":
            await ex(src, "query-colo-status")
            await ex(dst, "query-colo-status")

asyncio.run(main(sys.argv[1], sys.argv[2]))
EOF
sleep 3
for side in src dst; do
    echo "--- $side console (last lines)"
    tail -n 4 "$side.log"
    echo "--- $side: $(grep -c TICK "$side.log" || true) ticks, last: $(grep TICK "$side.log" | tail -n 1)"
done
