#!/usr/bin/env python3
"""colo-pause-bench.py -- how long QEMU's COLO checkpoint pauses the Primary VM, with a colo-blk
disk (vhost-user-blk) and with no disk at all (the same VM otherwise).

For each configuration it starts a pair with colo-qemu-pair.sh (QEMU from $COLO_QEMU, TCG unless
COLO_BLK_ACCEL=kvm), follows the PVM's QMP events, and takes every STOP->RESUME interval (QEMU's
own event timestamps) of the next N checkpoints (the first checkpoint, which carries the state
after the initial migration, is reported apart), then stops the pair.

Usage: colo-pause-bench.py [-n 30] [--delay 500] [--dir /tmp/colo-pause-bench]
                           [--disk-checkpoint qemu|on-stop]
                           [--only disk|disk-write|nodisk[,...]] [--colo-blk PATH] [--smp N]
Configurations: disk (the guest ticks once a second: idle), disk-write (the guest writes 64 KiB
with O_DIRECT in a loop, all the time), nodisk (no vhost-user-blk device).
Prints one JSON line per configuration: n, min/median/p90/max/mean pause in ms, first_ms; for
the disk configurations also the backend's share of each pause: the primary backend runs with
RUST_LOG=debug and logs, per device stop, how long the MARKER took until the secondary applied
it ("applied by the secondary in X ms": the time QEMU's GET_VRING_BASE waits in the backend),
summarised as backend_median_ms / backend_p90_ms / backend_max_ms over the same checkpoints
(with --smp N, N queues: the sum of a stop's N lines).
The numbers depend on the machine's load (TCG, a shared host): compare the two lines of one
run, not runs on different days.
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

from qemu.qmp import QMPClient

HERE = os.path.dirname(os.path.abspath(__file__))


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]


async def measure(qmp_path, n, timeout):
    c = QMPClient("bench")
    await c.connect(qmp_path)
    pauses = []
    stop = None
    deadline = time.monotonic() + timeout
    try:
        async def collect():
            nonlocal stop
            async for ev in c.events:
                t = ev["timestamp"]["seconds"] + ev["timestamp"]["microseconds"] / 1e6
                if ev["event"] == "STOP":
                    stop = t
                elif ev["event"] == "RESUME" and stop is not None:
                    pauses.append((t - stop) * 1000)
                    stop = None
                    if len(pauses) >= n + 1:
                        return
        await asyncio.wait_for(collect(), max(1, deadline - time.monotonic()))
    finally:
        await c.disconnect()
    return pauses


WRITER = """echo "TICK 1 "; echo "TICK 2 "
i=0
while true; do
  i=$((i + 1))
  dd if=/dev/zero of=/dev/vda bs=64k count=1 seek=$((i % 500)) oflag=direct 2>/dev/null || echo "IOERR $i"
done
"""


def run(name, args, extra):
    d = os.path.join(args.dir, name)
    pair = os.path.join(HERE, "colo-qemu-pair.sh")
    start = ["bash", pair, "start", "--dir", d, "--delay", str(args.delay),
             "--smp", str(args.smp)] + extra
    env = dict(os.environ)
    if name != "nodisk":
        env["RUST_LOG"] = "debug"
    if name == "disk-write":
        os.makedirs(args.dir, exist_ok=True)
        script = os.path.join(args.dir, "writer.sh")
        with open(script, "w") as f:
            f.write(WRITER)
        env["COLO_PAIR_SCRIPT"] = script
    r = subprocess.run(start, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if r.returncode != 0:
        sys.stderr.write(r.stderr)
        raise SystemExit(f"colo-pause-bench: {name}: colo-qemu-pair.sh start failed")
    try:
        # The first pause may already be over when we connect: measure n + 1 from now and
        # report the first one we saw apart only if it is the initial checkpoint (from the
        # events log the pair's watcher keeps).
        pauses = asyncio.run(measure(os.path.join(d, "pvm.qmp"), args.n,
                                     args.timeout or (args.n + 5) * (args.delay / 1000 + 2) + 60))
    finally:
        subprocess.run(["bash", pair, "stop", "--dir", d], stderr=subprocess.DEVNULL)
    first = None
    try:
        for line in open(os.path.join(d, "events.log")):
            e = json.loads(line)
            if e.get("vm") == "pvm" and "pause_ms" in e:
                first = e["pause_ms"]
                break
    except (OSError, ValueError):
        pass
    xs = pauses[1:] if len(pauses) > args.n else pauses
    backend = {}
    if name != "nodisk":
        # The last len(xs) + 1 device stops of the primary backend before the pair was
        # stopped (the last is the stop at `stop`, dropped), one per checkpoint.
        # With several queues one stop logs a line per queue (only the last queue's marker is
        # waited for; the others are "queued"): summed per stop.
        lines = []
        try:
            for line in open(os.path.join(d, "primary.log")):
                if "applied by the secondary in" in line or "queued in" in line:
                    lines.append(float(line.rsplit(" in ", 1)[1].split()[0]))
        except OSError:
            pass
        q = max(1, args.smp)
        ms = [sum(lines[i:i + q]) for i in range(0, len(lines) - q + 1, q)]
        ms = ms[1:]  # the end of the migration into COLO
        if ms:
            backend = {
                "backend_n": len(ms),
                "backend_median_ms": round(statistics.median(ms), 3),
                "backend_p90_ms": round(pct(ms, 0.9), 3),
                "backend_max_ms": round(max(ms), 3),
                "backend_share_of_median_pause": round(statistics.median(ms) / statistics.median(xs), 4),
            }
    return {
        "config": name, "n": len(xs), "delay_ms": args.delay,
        "min_ms": round(min(xs), 2), "median_ms": round(statistics.median(xs), 2),
        "p90_ms": round(pct(xs, 0.9), 2), "max_ms": round(max(xs), 2),
        "mean_ms": round(statistics.mean(xs), 2), "first_ms": first,
        "load": os.getloadavg()[0],
        **backend,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=30, help="checkpoints per configuration")
    ap.add_argument("--delay", type=int, default=500, help="x-checkpoint-delay in ms")
    ap.add_argument("--dir", default="/tmp/colo-pause-bench")
    ap.add_argument("--disk-checkpoint", choices=["qemu", "on-stop"], default="qemu")
    ap.add_argument("--only", default="disk,disk-write,nodisk",
                    help="comma-separated: disk, disk-write, nodisk (default all)")
    ap.add_argument("--timeout", type=float, default=0)
    ap.add_argument("--colo-blk", help="the colo-blk binary (default: built from this checkout); "
                    "two builds compared ABBA give one each")
    ap.add_argument("--smp", type=int, default=1,
                    help="vCPUs of each VM, and so queues of the disk (a MARKER per queue)")
    args = ap.parse_args()
    for name in args.only.split(","):
        if name in ("disk", "disk-write"):
            extra = ["--disk-checkpoint", args.disk_checkpoint]
            if args.colo_blk:
                extra += ["--colo-blk", args.colo_blk]
        elif name == "nodisk":
            extra = ["--no-disk"]
        else:
            raise SystemExit(f"colo-pause-bench: unknown configuration {name}")
        print(json.dumps(run(name, args, extra)), flush=True)


if __name__ == "__main__":
    main()
