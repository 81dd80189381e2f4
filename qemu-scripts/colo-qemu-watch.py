#!/usr/bin/env python3
"""colo-qemu-watch.py -- the helper colo-qemu-pair.sh runs next to a real (x-colo) COLO pair.

  --pvm-qmp PATH        a QMP socket of the Primary VM's QEMU (its events are logged)
  --svm-qmp PATH        optional: a QMP socket of the Secondary VM's QEMU (events logged too)
  --primary-qmp PATH    the primary colo-blk backend (for --disk-checkpoint on-stop)
  --disk-checkpoint M   none: only log. on-stop: at every STOP event of the PVM (QEMU's COLO
                        checkpoint stops the PVM) run `replication-checkpoint` on the primary
                        backend. QEMU does not wait for it: each record says whether the
                        backend's checkpoint finished before QEMU resumed the PVM.

One JSON line per event on stdout, flushed:
  {"vm": "pvm", "event": "STOP", "ts": 1733.123456, ...}   ts: QEMU's own event timestamp
  {"vm": "pvm", "event": "RESUME", ..., "pause_ms": 51.2}  STOP->RESUME from QEMU timestamps
  {"disk_checkpoint": 7, "ms": 3.2, "before_resume": true}  (on-stop only)
Exits when the PVM's QMP connection ends (the SVM's events are then still followed until it
ends too, so a failover's RESUME / COLO_EXIT on the SVM is logged).
"""

import argparse
import asyncio
import json
import sys
import time

from qemu.qmp import QMPClient


def out(rec):
    sys.stdout.write(json.dumps(rec) + "\n")
    sys.stdout.flush()


async def connect(name, path, timeout=30.0):
    c = QMPClient(name)
    deadline = time.monotonic() + timeout
    while True:
        try:
            await c.connect(path)
            return c
        except Exception as e:  # not there yet
            if time.monotonic() > deadline:
                raise SystemExit(f"colo-qemu-watch: cannot connect to {path}: {e}")
            await asyncio.sleep(0.1)


def ts(ev):
    t = ev.get("timestamp", {})
    return t.get("seconds", 0) + t.get("microseconds", 0) / 1e6


async def follow(name, client, state):
    stop_ts = None
    try:
        async for ev in client.events:
            rec = {"vm": name, "event": ev["event"], "ts": round(ts(ev), 6)}
            if ev.get("data"):
                rec["data"] = ev["data"]
            if name == "pvm" and ev["event"] == "STOP":
                stop_ts = ts(ev)
                state["running"] = False
                if state["primary"] is not None:
                    state["pending"] = asyncio.ensure_future(disk_checkpoint(state))
            elif name == "pvm" and ev["event"] == "RESUME":
                state["running"] = True
                if stop_ts is not None:
                    rec["pause_ms"] = round((ts(ev) - stop_ts) * 1000, 3)
                stop_ts = None
            out(rec)
    except Exception as e:
        out({"vm": name, "event": "watch-ended", "error": str(e)})


async def disk_checkpoint(state):
    state["n"] += 1
    n = state["n"]
    t0 = time.monotonic()
    try:
        await state["primary"].execute("replication-checkpoint")
        out({"disk_checkpoint": n, "ms": round((time.monotonic() - t0) * 1000, 3),
             "before_resume": not state["running"]})
    except Exception as e:
        out({"disk_checkpoint": n, "error": str(e)})


async def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pvm-qmp", required=True)
    ap.add_argument("--svm-qmp")
    ap.add_argument("--primary-qmp")
    ap.add_argument("--disk-checkpoint", choices=["none", "on-stop"], default="none")
    a = ap.parse_args()
    if a.disk_checkpoint == "on-stop" and not a.primary_qmp:
        ap.error("--disk-checkpoint on-stop needs --primary-qmp")
    state = {"primary": None, "running": True, "n": 0, "pending": None}
    if a.disk_checkpoint == "on-stop":
        state["primary"] = await connect("primary", a.primary_qmp)
    tasks = [asyncio.ensure_future(follow("pvm", await connect("pvm", a.pvm_qmp), state))]
    if a.svm_qmp:
        tasks.append(asyncio.ensure_future(follow("svm", await connect("svm", a.svm_qmp), state)))
    out({"event": "watching", "disk_checkpoint": a.disk_checkpoint, "time": time.time()})
    await asyncio.gather(*tasks)


if __name__ == "__main__":
    asyncio.run(main())
