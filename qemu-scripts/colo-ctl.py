#!/usr/bin/env python3
"""colo-ctl.py -- the COLO checkpoint manager for a colo-blk protected VM.

Two modes:

  --mode pause (default)  disk-only protection for QEMUs without a working COLO (QEMU 7.2):
                          colo-ctl itself pauses the VM and checkpoints the disks (below).
  --mode colo             QEMU's own COLO (x-colo, QEMU 11) runs the checkpoints and the
                          backends follow them by themselves (docs/colo-with-qemu.md): colo-ctl
                          only watches both QEMUs (--qemu-qmp: the PVM's, --svm-qmp: the
                          SVM's) and both backends, reports each checkpoint, and on the loss of
                          the PVM's side (its QEMU's or the primary backend's QMP connection
                          ends) sends x-colo-lost-heartbeat to the SVM's QEMU with
                          --failover-on-primary-loss; the secondary backend fails over by
                          itself (checked; replication-failover only if it did not within 5 s,
                          reported as "manual": true). On the loss of the SVM's side it sends
                          x-colo-lost-heartbeat to the PVM's QEMU and prints the re-protect
                          steps. No stop/cont, no replication-checkpoint. Events: ready,
                          checkpoint {epoch, pause_ms (PVM STOP->RESUME, QEMU timestamps)},
                          failover {reason, epoch, duration_ms, manual}, unprotected
                          {reason, reprotect: [...]}.

The pause mode drives three QMP sockets:

  --qemu-qmp       the Primary VM's QEMU (stop / cont)
  --primary-qmp    the primary colo-blk backend (query-replication, replication-checkpoint)
  --secondary-qmp  the secondary colo-blk backend (replication-failover)

Every checkpoint is: QEMU `stop` -> primary backend `replication-checkpoint` (waits until the
secondary applied everything and dropped its layers) -> optional --pause-hook -> QEMU `cont`.
A checkpoint is taken every --interval-ms, or earlier when the primary's
`bytes-sent-since-checkpoint` passes --max-bytes (polled every --poll-ms).

One JSON object per line on stdout (flushed), e.g.

  {"event": "ready", ...}
  {"event": "checkpoint", "epoch": 7, "pause_ms": 3.1, "bytes": 1232896, ...}
      (also stop_ms, replication_ms, hook_ms: parts of the pause; stopped_at: wall clock
      time just before QEMU `stop`, everything the guest did before it is in the checkpoint)
  {"event": "unprotected", "reason": "..."}      secondary lost; the PVM keeps running
  {"event": "protected", "epoch": 7}             secondary back and resynchronised
  {"event": "checkpoint-error", "error": "..."}  a checkpoint failed; the PVM was continued
  {"event": "failover", "epoch": 7, "duration_ms": ..., "reason": "..."}
  {"event": "primary-lost", "reason": "..."}     (without --failover-on-primary-loss)

The Primary VM is never left stopped: every path after `stop` runs `cont` (unless QEMU itself
is gone), also SIGTERM/SIGINT during a pause. Exit status: 0 after --count checkpoints or a
failover, 1 when the primary was lost without --failover-on-primary-loss (or failover failed),
2 on usage / startup errors, 143 after SIGTERM/SIGINT.
"""

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time

from qemu.qmp import ExecuteError, QMPClient, Runstate


def emit(event, **data):
    """Prints one JSON line and flushes, so a pipe reader sees it at once."""
    rec = {"event": event, "time": round(time.time(), 3)}
    rec.update(data)
    sys.stdout.write(json.dumps(rec) + "\n")
    sys.stdout.flush()


def log(msg):
    sys.stderr.write(f"colo-ctl: {msg}\n")
    sys.stderr.flush()


class PrimaryLost(Exception):
    """The Primary VM's QEMU or the primary backend is gone."""


class Ctl:
    def __init__(self, args):
        self.args = args
        self.qemu = QMPClient("qemu")
        self.primary = QMPClient("primary")
        self.secondary = QMPClient("secondary") if args.secondary_qmp else None
        self.protected = True
        self.lost_reason = None
        self.primary_dead = asyncio.Event()
        self.peer_event = asyncio.Event()
        self.count = 0

    # ---- connections ---------------------------------------------------------------------

    async def connect(self, client, path, what):
        deadline = time.monotonic() + self.args.connect_timeout
        while True:
            try:
                await client.connect(path)
                return
            except Exception as e:  # ConnectError, or the socket does not exist yet
                if time.monotonic() > deadline:
                    raise SystemExit(f"colo-ctl: cannot connect to {what} QMP {path}: {e}")
                await asyncio.sleep(0.1)

    async def watch(self, client, what):
        """Sets primary_dead when the connection to `client` ends."""
        while True:
            state = await client.runstate_changed()
            if state in (Runstate.DISCONNECTING, Runstate.IDLE):
                if not self.primary_dead.is_set():
                    self.lost_reason = f"{what} QMP connection lost"
                    self.primary_dead.set()
                return

    async def pump_primary_events(self):
        """Follows the primary backend's replication events."""
        async for ev in self.primary.events:
            name = ev["event"]
            data = ev.get("data", {})
            if name == "REPLICATION_PEER_LOST":
                self.mark_unprotected(f"secondary lost: {data.get('reason', '?')}")
            elif name in ("REPLICATION_PEER_CONNECTED", "REPLICATION_RESYNC_DONE"):
                log(f"{name} {json.dumps(data)}")
            elif name == "REPLICATION_ERROR":
                log(f"{name} {json.dumps(data)}")
            self.peer_event.set()

    def mark_unprotected(self, reason):
        # Once the primary is gone, a broken link is a consequence, not news.
        if self.protected and not self.primary_dead.is_set():
            self.protected = False
            emit("unprotected", reason=reason)

    # ---- QMP calls -------------------------------------------------------------------------

    async def call(self, client, what, cmd, args=None):
        """Runs a command; a broken connection becomes PrimaryLost (or a plain error for the
        secondary). ExecuteError (the command failed) passes through."""
        try:
            return await client.execute(cmd, args)
        except ExecuteError:
            raise
        except Exception as e:
            if client is self.secondary:
                raise
            if not self.primary_dead.is_set():
                self.lost_reason = f"{what}: {cmd} failed: {type(e).__name__}: {e}"
                self.primary_dead.set()
            raise PrimaryLost(self.lost_reason) from e

    async def query(self):
        return await self.call(self.primary, "primary backend", "query-replication")

    async def ensure_running(self):
        """`cont` unless QEMU already runs (used at startup and after errors)."""
        st = await self.call(self.qemu, "QEMU", "query-status")
        if not st.get("running", False) and st.get("status") in ("paused", "prelaunch"):
            await self.call(self.qemu, "QEMU", "cont")

    # ---- checkpoint ------------------------------------------------------------------------

    async def checkpoint(self, bytes_sent):
        stopped_at = time.time()
        t0 = time.monotonic()
        await self.call(self.qemu, "QEMU", "stop")
        t_stopped = time.monotonic()
        epoch = None
        error = None
        hook_ms = None
        try:
            try:
                r = await self.call(
                    self.primary,
                    "primary backend",
                    "replication-checkpoint",
                    {"timeout-ms": self.args.checkpoint_timeout_ms},
                )
                epoch = r["epoch"]
            except ExecuteError as e:
                error = str(e)
            t_ckpt = time.monotonic()
            if epoch is not None and self.args.pause_hook:
                th = time.monotonic()
                await self.run_hook(epoch)
                hook_ms = (time.monotonic() - th) * 1000
        finally:
            # Whatever happened above, the Primary VM runs again (QEMU alive permitting).
            if not self.qemu_gone():
                try:
                    await self.call(self.qemu, "QEMU", "cont")
                except PrimaryLost:
                    pass
        t1 = time.monotonic()
        if self.primary_dead.is_set():
            raise PrimaryLost(self.lost_reason)
        if epoch is None:
            low = error.lower()
            if "not connected" in low or "link broke" in low:
                self.mark_unprotected(f"checkpoint refused: {error}")
            else:
                emit("checkpoint-error", error=error, pause_ms=round((t1 - t0) * 1000, 3))
            return
        self.count += 1
        rec = dict(
            epoch=epoch,
            pause_ms=round((t1 - t0) * 1000, 3),
            stop_ms=round((t_stopped - t0) * 1000, 3),
            replication_ms=round((t_ckpt - t_stopped) * 1000, 3),
            bytes=bytes_sent,
            stopped_at=round(stopped_at, 6),
        )
        if hook_ms is not None:
            rec["hook_ms"] = round(hook_ms, 3)
        emit("checkpoint", **rec)

    def qemu_gone(self):
        return self.qemu.runstate != Runstate.RUNNING

    async def run_hook(self, epoch):
        env = dict(os.environ, COLO_EPOCH=str(epoch))
        proc = await asyncio.create_subprocess_shell(self.args.pause_hook, env=env)
        try:
            rc = await asyncio.wait_for(proc.wait(), self.args.hook_timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            log(f"pause hook timed out after {self.args.hook_timeout}s")
            return
        if rc != 0:
            log(f"pause hook exited with {rc}")

    # ---- main loop -------------------------------------------------------------------------

    async def wait_due(self):
        """Returns bytes-sent-since-checkpoint once a checkpoint is due (interval passed or
        max-bytes exceeded). While unprotected, returns None once protection is possible."""
        deadline = time.monotonic() + self.args.interval_ms / 1000
        poll = self.args.poll_ms / 1000
        while True:
            q = await self.query()
            sent = q.get("bytes-sent-since-checkpoint", 0)
            if not self.protected:
                if q.get("state") == "connected" and q.get("resync-remaining-bytes", 0) == 0:
                    self.protected = True
                    emit("protected", epoch=q.get("epoch"))
                    return sent
            elif q.get("state") != "connected":
                self.mark_unprotected(f"secondary link {q.get('state')}: {q.get('last-error')}")
            elif time.monotonic() >= deadline:
                return sent
            elif self.args.max_bytes and sent >= self.args.max_bytes:
                return sent
            self.peer_event.clear()
            left = max(0.0, min(poll, deadline - time.monotonic()))
            try:
                await asyncio.wait_for(self.peer_event.wait(), left)
            except asyncio.TimeoutError:
                pass

    async def cycle(self):
        while self.args.count is None or self.count < self.args.count:
            sent = await self.wait_due()
            if self.primary_dead.is_set():
                raise PrimaryLost(self.lost_reason)
            try:
                await self.checkpoint(sent)
            except ExecuteError as e:
                # stop or cont refused: report, and make sure the VM runs.
                emit("checkpoint-error", error=str(e))
                await self.ensure_running()

    async def failover(self, reason):
        if not self.args.failover_on_primary_loss or self.secondary is None:
            emit("primary-lost", reason=reason)
            return 1
        t0 = time.monotonic()
        try:
            r = await self.secondary.execute("replication-failover")
        except Exception as e:
            emit("failover-error", reason=reason, error=str(e))
            return 1
        emit(
            "failover",
            reason=reason,
            epoch=r.get("epoch"),
            duration_ms=round((time.monotonic() - t0) * 1000, 3),
            backend_ms=r.get("duration-ms"),
            committed_active_bytes=r.get("committed-active-bytes"),
            restored_hidden_bytes=r.get("restored-hidden-bytes"),
        )
        return 0

    async def run(self):
        # SIGTERM / SIGINT cancel the main task: a checkpoint in progress still runs `cont`.
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        a = self.args
        await self.connect(self.qemu, a.qemu_qmp, "QEMU")
        await self.connect(self.primary, a.primary_qmp, "primary backend")
        if self.secondary is not None:
            await self.connect(self.secondary, a.secondary_qmp, "secondary backend")
        watchers = [
            asyncio.create_task(self.watch(self.qemu, "QEMU")),
            asyncio.create_task(self.watch(self.primary, "primary backend")),
            asyncio.create_task(self.pump_primary_events()),
        ]
        rc = 0
        cycle = None
        try:
            await self.ensure_running()
            q = await self.query()
            self.protected = q.get("state") == "connected"
            emit("ready", state=q.get("state"), epoch=q.get("epoch"))
            if not self.protected:
                emit("unprotected", reason=f"secondary link {q.get('state')}")
            cycle = asyncio.create_task(self.cycle())
            dead = asyncio.create_task(self.primary_dead.wait())
            done, _ = await asyncio.wait({cycle, dead}, return_when=asyncio.FIRST_COMPLETED)
            if cycle in done and not self.primary_dead.is_set():
                dead.cancel()
                try:
                    cycle.result()
                except PrimaryLost:
                    pass
                else:
                    return 0
            else:
                cycle.cancel()
                try:
                    await cycle
                except (asyncio.CancelledError, PrimaryLost):
                    pass
            rc = await self.failover(self.lost_reason or "primary lost")
            if not self.qemu_gone():
                # Only the backend died: do not leave a (possibly) stopped VM behind.
                try:
                    await self.qemu.execute("cont")
                except Exception:
                    pass
            return rc
        finally:
            if cycle is not None and not cycle.done():
                # Cancelled by a signal: let a checkpoint in progress `cont` the VM first.
                cycle.cancel()
                await asyncio.gather(cycle, return_exceptions=True)
            for t in watchers:
                t.cancel()
            for c in (self.qemu, self.primary, self.secondary):
                if c is not None:
                    try:
                        await c.disconnect()
                    except Exception:
                        pass


class ColoWatch:
    """--mode colo: QEMU runs COLO; watch it, fail over on loss (see the module docstring)."""

    def __init__(self, args):
        self.args = args
        self.clients = {
            "pvm": QMPClient("pvm"), "svm": QMPClient("svm"),
            "primary": QMPClient("primary"), "secondary": QMPClient("secondary"),
        }
        self.paths = {"pvm": args.qemu_qmp, "svm": args.svm_qmp,
                      "primary": args.primary_qmp, "secondary": args.secondary_qmp}
        self.lost = asyncio.Queue()
        self.stop_ts = None
        self.epoch = None

    async def watch(self, name):
        c = self.clients[name]
        while True:
            state = await c.runstate_changed()
            if state in (Runstate.DISCONNECTING, Runstate.IDLE):
                await self.lost.put(name)
                return

    async def pump(self, name):
        def ts(ev):
            t = ev.get("timestamp", {})
            return t.get("seconds", 0) + t.get("microseconds", 0) / 1e6
        async for ev in self.clients[name].events:
            e = ev["event"]
            if name == "pvm" and e == "STOP":
                self.stop_ts = ts(ev)
            elif name == "pvm" and e == "RESUME" and self.stop_ts is not None:
                emit("checkpoint", epoch=self.epoch,
                     pause_ms=round((ts(ev) - self.stop_ts) * 1000, 3))
                self.stop_ts = None
            elif name == "secondary" and e == "REPLICATION_CHECKPOINT":
                self.epoch = ev.get("data", {}).get("epoch")
            elif e in ("COLO_EXIT", "REPLICATION_ERROR", "REPLICATION_PEER_LOST",
                       "REPLICATION_FAILOVER_DONE"):
                log(f"{name} {e} {json.dumps(ev.get('data', {}))}")

    async def fail_over_to_svm(self, reason):
        svm, sec = self.clients["svm"], self.clients["secondary"]
        t0 = time.monotonic()
        try:
            await svm.execute("x-colo-lost-heartbeat")
            while (await svm.execute("query-colo-status"))["mode"] != "none":
                await asyncio.sleep(0.01)
        except Exception as e:
            emit("failover-error", reason=reason, error=f"x-colo-lost-heartbeat: {e}")
            return 1
        left_ms = (time.monotonic() - t0) * 1000
        manual = False
        try:
            deadline = time.monotonic() + 5
            while True:
                r = await sec.execute("query-replication")
                if r.get("state") == "failed-over" and r.get("hidden-bytes", 0) == 0:
                    break
                if time.monotonic() > deadline:
                    log("the secondary backend did not fail over by itself: replication-failover")
                    manual = True
                    await sec.execute("replication-failover")
                    r = await sec.execute("query-replication")
                    break
                await asyncio.sleep(0.01)
        except Exception as e:
            emit("failover-error", reason=reason, error=f"secondary backend: {e}")
            return 1
        emit("failover", reason=reason, epoch=r.get("epoch"), left_colo_ms=round(left_ms, 3),
             duration_ms=round((time.monotonic() - t0) * 1000, 3), manual=manual)
        return 0

    async def secondary_lost(self, reason):
        try:
            await self.clients["pvm"].execute("x-colo-lost-heartbeat")
            while (await self.clients["pvm"].execute("query-colo-status"))["mode"] != "none":
                await asyncio.sleep(0.01)
        except Exception as e:
            log(f"x-colo-lost-heartbeat on the PVM: {e}")
        emit("unprotected", reason=reason, reprotect=[
            "start a new secondary backend on the old --listen port (fresh image)",
            'primary backend: replication-start {"full": true}; wait for REPLICATION_RESYNC_DONE',
            "a new SVM QEMU with -incoming defer on the new backend's socket",
            "SVM: migrate-set-capabilities return-path,x-colo; migrate-incoming",
            "PVM: migrate-set-capabilities return-path,x-colo; migrate (x-colo again)",
            "or: qemu-scripts/colo-qemu-pair.sh reprotect --dir DIR",
        ])

    async def run(self):
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        ctl = Ctl.__new__(Ctl)
        ctl.args = self.args
        for name, c in self.clients.items():
            await Ctl.connect(ctl, c, self.paths[name], name)
        tasks = [asyncio.create_task(self.watch(n)) for n in self.clients]
        tasks += [asyncio.create_task(self.pump(n)) for n in self.clients]
        try:
            emit("ready", pvm=await self.clients["pvm"].execute("query-colo-status"),
                 svm=await self.clients["svm"].execute("query-colo-status"))
            while True:
                name = await self.lost.get()
                if name in ("pvm", "primary"):
                    reason = f"{name} QMP connection lost"
                    if not self.args.failover_on_primary_loss:
                        emit("primary-lost", reason=reason)
                        return 1
                    return await self.fail_over_to_svm(reason)
                await self.secondary_lost(f"{name} QMP connection lost")
                return 0
        finally:
            for t in tasks:
                t.cancel()
            for c in self.clients.values():
                try:
                    await c.disconnect()
                except Exception:
                    pass


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="COLO checkpoint manager for colo-blk (see the module docstring).")
    p.add_argument("--mode", choices=["pause", "colo"], default="pause",
                   help="pause: colo-ctl checkpoints (default); colo: QEMU's x-colo does")
    p.add_argument("--qemu-qmp", required=True, help="Primary VM's QEMU QMP unix socket")
    p.add_argument("--svm-qmp", help="--mode colo: the Secondary VM's QEMU QMP unix socket")
    p.add_argument("--primary-qmp", required=True, help="primary colo-blk QMP unix socket")
    p.add_argument("--secondary-qmp", help="secondary colo-blk QMP unix socket (for failover)")
    p.add_argument("--interval-ms", type=int, default=1000,
                   help="checkpoint period (default 1000)")
    p.add_argument("--max-bytes", type=int, default=0,
                   help="checkpoint early once this many bytes were replicated (0: off)")
    p.add_argument("--poll-ms", type=int, default=50,
                   help="how often to poll query-replication (default 50)")
    p.add_argument("--count", type=int, default=None, help="stop after K checkpoints")
    p.add_argument("--checkpoint-timeout-ms", type=int, default=5000,
                   help="replication-checkpoint timeout (the VM is paused meanwhile)")
    p.add_argument("--failover-on-primary-loss", action="store_true",
                   help="run replication-failover on the secondary when the primary dies")
    p.add_argument("--pause-hook", metavar="CMD",
                   help="shell command run while the VM is paused after each completed "
                        "checkpoint (env COLO_EPOCH); for tests and snapshots")
    p.add_argument("--hook-timeout", type=float, default=30.0, help="seconds (default 30)")
    p.add_argument("--connect-timeout", type=float, default=30.0,
                   help="seconds to wait for the QMP sockets to appear (default 30)")
    a = p.parse_args(argv)
    if a.mode == "colo" and not (a.svm_qmp and a.secondary_qmp):
        p.error("--mode colo needs --svm-qmp and --secondary-qmp")
    if a.failover_on_primary_loss and not a.secondary_qmp:
        p.error("--failover-on-primary-loss needs --secondary-qmp")
    if a.interval_ms <= 0 or a.poll_ms <= 0:
        p.error("--interval-ms and --poll-ms must be positive")
    return a


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.CRITICAL)  # qemu.qmp logs disconnects loudly
    try:
        return asyncio.run((ColoWatch(args) if args.mode == "colo" else Ctl(args)).run())
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("stopped by a signal")
        return 143


if __name__ == "__main__":
    sys.exit(main())
