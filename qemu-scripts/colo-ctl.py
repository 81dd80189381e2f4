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

Consistency groups (docs/consistency-groups.md): a VM with several disks, or several VMs (on
any hosts) forming one service, checkpointed and failed over together, so that after a failover
every disk of every member is from the same group checkpoint:

  --vm QEMU_QMP --disk PRIMARY_QMP:SECONDARY_QMP [--disk ...] [--vm ... --disk ...]
  --group FILE.json   {"members": [{"name", "qemu-qmp", "disks": [{"name", "primary-qmp",
                      "secondary-qmp"}]}]}   (instead of --qemu-qmp/--primary-qmp/...)

A group checkpoint G is a two-phase commit: `stop` every VM -> PREPARE every disk (primary
`replication-prepare-checkpoint`, then secondary `replication-prepare {group: G, applied-seq:
S}` with S the primary's last sequence number: the secondary records durably that it holds
exactly the primary's disk) -> --pause-hook (COLO_EPOCH=G) -> COMMIT every disk (primary
`replication-checkpoint`) -> `cont` every VM. A failure before the first commit aborts G on
every disk (all keep G-1); after it the remaining disks are still committed (retried). Lines:
checkpoint {epoch: G, group: G, pause_ms, stop_ms, prepare_ms, hook_ms, commit_ms, disks:
{name: {epoch, bytes}}}, checkpoint-error {phase, error, committed, failed}. With
--failover-on-primary-loss the loss of any member's QEMU or primary backend stops the other
members' VMs and fails the whole group over (as below).

  --mode group-failover (--disk :SECONDARY_QMP ... or the same --vm/--disk/--group) [--dry-run]
      reads every secondary's group record; G = the newest group checkpoint any disk is at;
      disks one behind but prepared for G are committed to G (secondary
      `replication-do-checkpoint {group: G}`), then every disk fails over. Any other disk
      stops it before anything is failed over (failover-error names it). Lines: failover
      {group, committed, disks}, failover-plan (--dry-run), failover-error {members}.

COLO_CTL_FAULT=exit-after-commit:K (tests): exit 70 right after the K-th commit of a group
checkpoint, without `cont` (a coordinator crash); the commits then run one after the other.

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
        said = False
        while True:
            try:
                await client.connect(path)
                return
            except Exception as e:  # ConnectError, or the socket does not exist yet
                if not said:
                    # Never a silent wait: the operator sees which socket is missing at once.
                    log(f"waiting for {what} QMP {path} (up to {self.args.connect_timeout:g} s; "
                        f"--connect-timeout): {e}")
                    said = True
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
             duration_ms=round((time.monotonic() - t0) * 1000, 3), manual=manual, reprotect=[
                 "the old PVM's host fenced; its image as the survivor's secondary: colo-blk "
                 "--role secondary --discard-my-data (an empty --layer-dir), a new SVM QEMU "
                 "with -incoming on it (migrate-set-capabilities return-path,x-colo; "
                 "migrate-incoming)",
                 "on the survivor: colo-blk reprotect --x-colo --survivor SECONDARY.qmp --peer "
                 "HOST:PORT --qemu-qmp SVM.qmp --migrate-uri URI",
                 "or: qemu-scripts/colo-qemu-pair.sh reprotect --dir DIR",
             ])
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


# ---- consistency groups (docs/consistency-groups.md) ---------------------------------------


class GroupAbort(Exception):
    """A group checkpoint cannot be committed (nothing was committed)."""


class Disk:
    """One disk of a group member: a colo-blk pair (primary and secondary QMP sockets)."""

    def __init__(self, name, primary_qmp, secondary_qmp):
        self.name = name
        self.primary_qmp = primary_qmp
        self.secondary_qmp = secondary_qmp
        self.primary = QMPClient(f"{name} primary")
        self.secondary = QMPClient(f"{name} secondary")


class Member:
    """A VM of a group (its QEMU's QMP socket, None for a group failover) and its disks."""

    def __init__(self, name, qemu_qmp):
        self.name = name
        self.qemu_qmp = qemu_qmp
        self.qemu = QMPClient(name) if qemu_qmp else None
        self.disks = []


class GroupSpecAction(argparse.Action):
    """--vm QEMU_QMP / --disk PRIMARY_QMP:SECONDARY_QMP, in command-line order: a --disk
    belongs to the --vm before it (or, for --mode group-failover, to no VM)."""

    def __call__(self, parser, namespace, value, option_string=None):
        spec = getattr(namespace, "spec", None) or []
        namespace.spec = spec
        spec.append((self.dest, value))


def vdisk_name(i):
    """vda, vdb, ... (the guest's names for the disks in --disk order, as run-vm.sh)."""
    return "vd" + "abcdefghijklmnopqrstuvwxyz"[i] if i < 26 else f"disk{i}"


def build_group(p, a):
    """The members from --group FILE.json or --vm/--disk (see the docstring); [] if none."""
    members = []
    if a.group:
        try:
            with open(a.group) as f:
                doc = json.load(f)
            for i, m in enumerate(doc["members"]):
                mem = Member(m.get("name", f"vm{i}"), m.get("qemu-qmp"))
                for k, d in enumerate(m["disks"]):
                    mem.disks.append(Disk(f"{mem.name}/{d.get('name', vdisk_name(k))}",
                                          d.get("primary-qmp"), d["secondary-qmp"]))
                members.append(mem)
        except (OSError, ValueError, KeyError, TypeError) as e:
            p.error(f"--group {a.group}: {type(e).__name__}: {e}")
    for kind, value in getattr(a, "spec", None) or []:
        if kind == "vm":
            members.append(Member(f"vm{len(members)}", value))
            continue
        primary, sep, secondary = value.rpartition(":")
        if not sep or not secondary:
            p.error(f"--disk {value}: expected PRIMARY_QMP:SECONDARY_QMP")
        if not members:
            members.append(Member("vm0", None))
        m = members[-1]
        m.disks.append(Disk(f"{m.name}/{vdisk_name(len(m.disks))}", primary or None, secondary))
    for m in members:
        if not m.disks:
            p.error(f"group member {m.name} has no --disk")
    names = [d.name for m in members for d in m.disks]
    if len(set(names)) != len(names):
        p.error(f"group disk names are not unique: {names}")
    return members


async def reconnect(client, path):
    """Connects `client` again if its connection ended (a restarted secondary backend)."""
    if client.runstate == Runstate.RUNNING:
        return
    try:
        await client.disconnect()
    except Exception:
        pass
    await client.connect(path)


def parse_fault():
    """COLO_CTL_FAULT=exit-after-commit:K (tests): exit, as abruptly as a crash (no `cont`),
    right after the K-th disk of a group checkpoint committed. Commits then run one by one."""
    spec = os.environ.get("COLO_CTL_FAULT", "")
    name, _, k = spec.partition(":")
    if name == "exit-after-commit" and k.isdigit():
        return int(k)
    return None


async def group_failover(disks, reason, dry_run=False):
    """Fails over every disk of a group to the same group checkpoint, or none of them.

    `disks`: [(name, connected QMPClient of the secondary)]. Reads each secondary's group
    record; the newest group checkpoint any disk is at (G) is the target. A disk at G is
    fine; a disk one checkpoint behind that is prepared for G (nothing applied since the
    prepare) is committed to G first (secondary `replication-do-checkpoint {"group": G}`);
    any other disk is an error that stops before anything is failed over, naming it. Then
    `replication-failover` on every disk. Returns the exit status (0 done, 1 refused/failed)."""
    t0 = time.monotonic()
    qs = await asyncio.gather(*(c.execute("query-replication") for _, c in disks),
                              return_exceptions=True)
    problems = [f"{n}: query-replication: {q}" for (n, _), q in zip(disks, qs)
                if isinstance(q, BaseException)]
    if problems:
        emit("failover-error", reason=reason, error="cannot read every secondary",
             members=problems)
        return 1
    state = {n: q for (n, _), q in zip(disks, qs)}
    current = {n: (q.get("group") or {}).get("current") for n, q in state.items()}
    known = [g for g in current.values() if g is not None]
    if not known:
        emit("failover-error", reason=reason,
             error="no disk is at a group checkpoint (none was taken, or each disk's last "
                   "checkpoint was not a group checkpoint)",
             members=[f"{n}: epoch {q.get('epoch')}, group {q.get('group')}"
                      for n, q in state.items()])
        return 1
    target = max(known)
    laggards = []
    for n, q in state.items():
        g = q.get("group") or {}
        if current[n] == target:
            continue
        prep = g.get("prepared")
        if prep and prep.get("group") == target and q.get("state") != "failed-over":
            laggards.append(n)
            continue
        problems.append(
            f"{n}: at group checkpoint {current[n]} (epoch {q.get('epoch')}, state "
            f"{q.get('state')}), not prepared for {target} (prepared: {prep}): failing it "
            f"over would mix checkpoints")
    plan = dict(group=target, commit=laggards,
                failover=[n for n, q in state.items() if q.get("state") != "failed-over"],
                connected=[n for n, q in state.items() if q.get("state") == "connected"])
    if problems:
        emit("failover-error", reason=reason, group=target,
             error="the disks are not at one group checkpoint; nothing was failed over",
             members=problems)
        return 1
    if dry_run:
        emit("failover-plan", reason=reason, **plan)
        return 0
    if plan["connected"]:
        log(f"failing over disks whose primary is still connected: {plan['connected']} "
            "(make sure those primaries are stopped or fenced)")
    clients = dict(disks)
    rs = await asyncio.gather(*(clients[n].execute("replication-do-checkpoint", {"group": target})
                                for n in laggards), return_exceptions=True)
    problems = [f"{n}: replication-do-checkpoint: {r}" for n, r in zip(laggards, rs)
                if isinstance(r, BaseException)]
    if problems:
        emit("failover-error", reason=reason, group=target,
             error="a prepared disk could not be committed; nothing was failed over",
             members=problems)
        return 1
    t1 = time.monotonic()
    rs = await asyncio.gather(*(clients[n].execute("replication-failover")
                                for n in plan["failover"]), return_exceptions=True)
    done = {}
    for n, r in zip(plan["failover"], rs):
        if isinstance(r, BaseException):
            problems.append(f"{n}: replication-failover: {r}")
        else:
            done[n] = dict(epoch=r.get("epoch"), backend_ms=r.get("duration-ms"),
                           restored_hidden_bytes=r.get("restored-hidden-bytes"),
                           committed_active_bytes=r.get("committed-active-bytes"))
    if problems:
        # The decision stands: re-running group-failover completes the others.
        emit("failover-error", reason=reason, group=target,
             error="some disks did not fail over (run --mode group-failover again)",
             members=problems, failed_over=sorted(done))
        return 1
    emit("failover", reason=reason, group=target, epoch=target, committed=laggards,
         disks=done, commit_ms=round((t1 - t0) * 1000, 3),
         duration_ms=round((time.monotonic() - t0) * 1000, 3))
    return 0


class GroupFailover:
    """--mode group-failover: fail a group over by hand (e.g. after the coordinator died)."""

    def __init__(self, args, members):
        self.args = args
        self.disks = [d for m in members for d in m.disks]

    async def run(self):
        ctl = Ctl.__new__(Ctl)
        ctl.args = self.args
        for d in self.disks:
            await Ctl.connect(ctl, d.secondary, d.secondary_qmp, f"{d.name} secondary backend")
        try:
            return await group_failover([(d.name, d.secondary) for d in self.disks],
                                        "group-failover requested", self.args.dry_run)
        finally:
            for d in self.disks:
                try:
                    await d.secondary.disconnect()
                except Exception:
                    pass


class GroupCtl(Ctl):
    """--mode pause over a group: several VMs, each with one or more disks. A checkpoint is
    a two-phase commit: stop every VM -> prepare every disk (primary
    replication-prepare-checkpoint, then secondary replication-prepare at the primary's
    sequence number) -> --pause-hook -> commit every disk (primary replication-checkpoint) ->
    cont every VM. A failure before the first commit aborts it everywhere (every disk keeps
    the previous group checkpoint); after it, the remaining disks are still committed."""

    def __init__(self, args, members):
        super().__init__(args)
        self.members = members
        self.disks = [d for m in members for d in m.disks]
        self.group = 0
        self.fault = parse_fault()

    # ---- QMP calls -------------------------------------------------------------------------

    async def call(self, client, what, cmd, args=None):
        """As Ctl.call; a broken connection to a QEMU or a primary becomes PrimaryLost,
        to a secondary a plain error."""
        try:
            return await client.execute(cmd, args)
        except ExecuteError:
            raise
        except Exception as e:
            if any(client is d.secondary for d in self.disks):
                raise
            if not self.primary_dead.is_set():
                self.lost_reason = f"{what}: {cmd} failed: {type(e).__name__}: {e}"
                self.primary_dead.set()
            raise PrimaryLost(self.lost_reason) from e

    async def query_disk(self, d):
        return await self.call(d.primary, f"{d.name} primary backend", "query-replication")

    def qemu_gone(self, m=None):
        ms = [m] if m is not None else self.members
        return any(x.qemu.runstate != Runstate.RUNNING for x in ms)

    async def pump(self, d):
        async for ev in d.primary.events:
            name = ev["event"]
            data = ev.get("data", {})
            if name == "REPLICATION_PEER_LOST":
                self.mark_unprotected(f"{d.name}: secondary lost: {data.get('reason', '?')}")
            elif name in ("REPLICATION_PEER_CONNECTED", "REPLICATION_RESYNC_DONE",
                          "REPLICATION_ERROR"):
                log(f"{d.name}: {name} {json.dumps(data)}")
            self.peer_event.set()

    async def ensure_running(self):
        """`cont` every member whose QEMU does not run (at startup and after errors)."""
        for m in self.members:
            st = await self.call(m.qemu, f"{m.name} QEMU", "query-status")
            if not st.get("running", False) and st.get("status") in ("paused", "prelaunch"):
                await self.call(m.qemu, f"{m.name} QEMU", "cont")

    # ---- the two phases --------------------------------------------------------------------

    async def prepare(self, d, g):
        """Prepares disk `d` for group checkpoint `g`; returns the primary's state."""
        what = f"{d.name} primary backend"
        to = {"timeout-ms": self.args.checkpoint_timeout_ms}
        await self.call(d.primary, what, "replication-prepare-checkpoint", to)
        q1 = await self.query_disk(d)
        seq = q1.get("acked-seq")
        if (q1.get("state") != "connected" or q1.get("resync-remaining-bytes", 0)
                or seq != q1.get("last-seq")):
            raise GroupAbort(f"{d.name}: the primary is not in sync (state {q1.get('state')}, "
                             f"resync {q1.get('resync-remaining-bytes')}, seq {seq}/"
                             f"{q1.get('last-seq')})")
        try:
            await reconnect(d.secondary, d.secondary_qmp)
            await d.secondary.execute("replication-prepare", {"group": g, "applied-seq": seq})
        except Exception as e:
            raise GroupAbort(f"{d.name}: secondary replication-prepare: {e}") from e
        q2 = await self.query_disk(d)
        # The same session and nothing sent since: the secondary is prepared at exactly the
        # primary's disk (no VM writes: they are all stopped).
        if q2.get("sessions") != q1.get("sessions") or q2.get("last-seq") != seq:
            raise GroupAbort(f"{d.name}: the stream moved during the prepare (seq {seq} -> "
                             f"{q2.get('last-seq')}, sessions {q1.get('sessions')} -> "
                             f"{q2.get('sessions')})")
        return q1

    async def commit(self, d, g):
        """Commits disk `d` (the decision is made: retried, re-preparing after a link
        problem, while its primary lives). Returns its new epoch, or raises."""
        what = f"{d.name} primary backend"
        deadline = time.monotonic() + 3 * self.args.checkpoint_timeout_ms / 1000
        attempt = 0
        while True:
            try:
                if attempt > 0:
                    # Still stopped: the disk is still group checkpoint g.
                    while True:
                        q = await self.query_disk(d)
                        if q.get("state") == "connected" and not q.get("resync-remaining-bytes"):
                            break
                        if time.monotonic() > deadline:
                            raise GroupAbort(f"{d.name}: secondary not back in time")
                        self.peer_event.clear()
                        try:
                            await asyncio.wait_for(self.peer_event.wait(), 0.1)
                        except asyncio.TimeoutError:
                            pass
                    await self.prepare(d, g)
                r = await self.call(d.primary, what, "replication-checkpoint",
                                    {"timeout-ms": self.args.checkpoint_timeout_ms})
                return r["epoch"]
            except (ExecuteError, GroupAbort) as e:
                attempt += 1
                if time.monotonic() > deadline or attempt >= 4:
                    raise
                log(f"{d.name}: commit of group checkpoint {g} failed ({e}); retrying")

    async def checkpoint(self, sent):
        g = self.group + 1
        self.group = g  # never reused, even when this one aborts
        stopped_at = time.time()
        t0 = time.monotonic()
        rec = dict(epoch=g, group=g, bytes=sum(sent.values()), stopped_at=round(stopped_at, 6))
        error = None
        phase = "stop"
        committed, failed = {}, {}
        t_stopped = t_prepared = t_hook = None
        try:
            rs = await asyncio.gather(*(self.call(m.qemu, f"{m.name} QEMU", "stop")
                                        for m in self.members), return_exceptions=True)
            t_stopped = time.monotonic()
            bad = [f"{m.name}: stop: {r}" for m, r in zip(self.members, rs)
                   if isinstance(r, BaseException)]
            if bad:
                raise GroupAbort("; ".join(bad))
            phase = "prepare"
            rs = await asyncio.gather(*(self.prepare(d, g) for d in self.disks),
                                      return_exceptions=True)
            bad = [f"{r}" if isinstance(r, GroupAbort) else f"{d.name}: {r}"
                   for d, r in zip(self.disks, rs) if isinstance(r, BaseException)]
            if bad:
                raise GroupAbort("; ".join(bad))
            t_prepared = time.monotonic()
            if self.args.pause_hook:
                await self.run_hook(g)
            t_hook = time.monotonic()
            phase = "commit"
            if self.fault is not None:
                for i, d in enumerate(self.disks):
                    committed[d.name] = await self.commit(d, g)
                    if i + 1 == self.fault:
                        log(f"fault injected: exit after committing {i + 1} disk(s)")
                        os._exit(70)
            else:
                rs = await asyncio.gather(*(self.commit(d, g) for d in self.disks),
                                          return_exceptions=True)
                for d, r in zip(self.disks, rs):
                    if isinstance(r, BaseException):
                        failed[d.name] = str(r) or type(r).__name__
                    else:
                        committed[d.name] = r
        except (GroupAbort, ExecuteError, PrimaryLost) as e:
            error = str(e) or type(e).__name__
        finally:
            # Every VM runs again (those whose QEMU lives), whatever happened above.
            for m in self.members:
                if not self.qemu_gone(m):
                    try:
                        await self.call(m.qemu, f"{m.name} QEMU", "cont")
                    except (PrimaryLost, ExecuteError):
                        pass
        t1 = time.monotonic()
        rec["pause_ms"] = round((t1 - t0) * 1000, 3)
        if t_stopped is not None:
            rec["stop_ms"] = round((t_stopped - t0) * 1000, 3)
        if t_prepared is not None:
            rec["prepare_ms"] = round((t_prepared - t_stopped) * 1000, 3)
        if t_hook is not None:
            if self.args.pause_hook:
                rec["hook_ms"] = round((t_hook - t_prepared) * 1000, 3)
            rec["commit_ms"] = round((t1 - t_hook) * 1000, 3)
            rec["replication_ms"] = round((t1 - t_hook + t_prepared - t_stopped) * 1000, 3)
        if error is not None or failed:
            emit("checkpoint-error", phase=phase, error=error, committed=committed,
                 failed=failed, **rec)
            if not committed and error and ("not connected" in error.lower()
                                            or "link broke" in error.lower()):
                self.mark_unprotected(f"group checkpoint {g} refused: {error}")
        else:
            self.count += 1
            rec["disks"] = {d.name: dict(epoch=committed[d.name], bytes=sent.get(d.name, 0))
                            for d in self.disks}
            emit("checkpoint", **rec)
        if self.primary_dead.is_set():
            raise PrimaryLost(self.lost_reason)

    # ---- main loop -------------------------------------------------------------------------

    async def wait_due(self):
        """As Ctl.wait_due over every disk; returns {disk: bytes-sent-since-checkpoint}."""
        deadline = time.monotonic() + self.args.interval_ms / 1000
        poll = self.args.poll_ms / 1000
        while True:
            qs = [await self.query_disk(d) for d in self.disks]
            sent = {d.name: q.get("bytes-sent-since-checkpoint", 0)
                    for d, q in zip(self.disks, qs)}
            down = [f"{d.name}: secondary link {q.get('state')}: {q.get('last-error')}"
                    for d, q in zip(self.disks, qs)
                    if q.get("state") != "connected" or q.get("resync-remaining-bytes", 0)]
            if not self.protected:
                if not down:
                    self.protected = True
                    emit("protected", epoch=self.group)
                    return sent
            elif down:
                self.mark_unprotected("; ".join(down))
            elif time.monotonic() >= deadline:
                return sent
            elif self.args.max_bytes and max(sent.values()) >= self.args.max_bytes:
                return sent
            self.peer_event.clear()
            left = max(0.0, min(poll, deadline - time.monotonic()))
            try:
                await asyncio.wait_for(self.peer_event.wait(), left)
            except asyncio.TimeoutError:
                pass

    async def failover(self, reason):
        if not self.args.failover_on_primary_loss:
            emit("primary-lost", reason=reason)
            return 1
        # The whole group moves: the VMs that still run on the primary side are stopped
        # first (fence their hosts before starting the group on the secondaries).
        for m in self.members:
            if not self.qemu_gone(m):
                try:
                    await m.qemu.execute("stop")
                    log(f"{m.name}: stopped (the group fails over)")
                except Exception as e:
                    log(f"{m.name}: stop: {e}")
        for d in self.disks:
            try:
                await reconnect(d.secondary, d.secondary_qmp)
            except Exception as e:
                log(f"{d.name} secondary backend: {e}")
        return await group_failover([(d.name, d.secondary) for d in self.disks], reason)

    async def run(self):
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        for m in self.members:
            await self.connect(m.qemu, m.qemu_qmp, f"{m.name} QEMU")
        for d in self.disks:
            await self.connect(d.primary, d.primary_qmp, f"{d.name} primary backend")
            await self.connect(d.secondary, d.secondary_qmp, f"{d.name} secondary backend")
        watchers = [asyncio.create_task(self.watch(m.qemu, f"{m.name} QEMU"))
                    for m in self.members]
        watchers += [asyncio.create_task(self.watch(d.primary, f"{d.name} primary backend"))
                     for d in self.disks]
        watchers += [asyncio.create_task(self.pump(d)) for d in self.disks]
        cycle = None
        try:
            # Group checkpoint numbers go on from the newest any secondary has seen.
            for d in self.disks:
                g = (await d.secondary.execute("query-replication")).get("group") or {}
                for k in ("committed", "prepared"):
                    self.group = max(self.group, (g.get(k) or {}).get("group", 0))
            await self.ensure_running()
            qs = [await self.query_disk(d) for d in self.disks]
            down = [d.name for d, q in zip(self.disks, qs) if q.get("state") != "connected"]
            self.protected = not down
            emit("ready", group=self.group, members={
                m.name: [d.name for d in m.disks] for m in self.members},
                state={d.name: q.get("state") for d, q in zip(self.disks, qs)})
            if down:
                emit("unprotected", reason=f"secondary link down: {down}")
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
            return await self.failover(self.lost_reason or "primary lost")
        finally:
            if cycle is not None and not cycle.done():
                cycle.cancel()
                await asyncio.gather(cycle, return_exceptions=True)
            for t in watchers:
                t.cancel()
            clients = [m.qemu for m in self.members]
            clients += [c for d in self.disks for c in (d.primary, d.secondary)]
            for c in clients:
                try:
                    await c.disconnect()
                except Exception:
                    pass


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="COLO checkpoint manager for colo-blk (see the module docstring).")
    p.add_argument("--mode", choices=["pause", "colo", "group-failover"], default="pause",
                   help="pause: colo-ctl checkpoints (default); colo: QEMU's x-colo does; "
                        "group-failover: fail a consistency group over now")
    p.add_argument("--qemu-qmp", help="Primary VM's QEMU QMP unix socket")
    p.add_argument("--svm-qmp", help="--mode colo: the Secondary VM's QEMU QMP unix socket")
    p.add_argument("--primary-qmp", help="primary colo-blk QMP unix socket")
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
    g = p.add_argument_group(
        "consistency groups (docs/consistency-groups.md): several VMs and/or disks checkpointed "
        "and failed over together, instead of --qemu-qmp/--primary-qmp/--secondary-qmp")
    g.add_argument("--vm", dest="vm", action=GroupSpecAction, metavar="QEMU_QMP",
                   help="a group member: its QEMU's QMP socket (repeatable)")
    g.add_argument("--disk", dest="disk", action=GroupSpecAction,
                   metavar="PRIMARY_QMP:SECONDARY_QMP",
                   help="a disk of the --vm before it, in guest order (vda, vdb, ...): its "
                        "colo-blk pair's QMP sockets (repeatable; group-failover needs only "
                        ":SECONDARY_QMP)")
    g.add_argument("--group", metavar="FILE.json",
                   help='the members as JSON: {"members": [{"name": "db", "qemu-qmp": PATH, '
                        '"disks": [{"name": "vda", "primary-qmp": PATH, "secondary-qmp": '
                        'PATH}, ...]}, ...]}')
    g.add_argument("--dry-run", action="store_true",
                   help="--mode group-failover: print the plan (failover-plan), change nothing")
    a = p.parse_args(argv)
    if a.interval_ms <= 0 or a.poll_ms <= 0:
        p.error("--interval-ms and --poll-ms must be positive")
    a.members = build_group(p, a)
    if a.members:
        if a.mode == "colo":
            p.error("--mode colo takes no group (--vm/--disk/--group)")
        if a.qemu_qmp or a.primary_qmp or a.secondary_qmp:
            p.error("a group (--vm/--disk/--group) replaces --qemu-qmp/--primary-qmp/"
                    "--secondary-qmp")
        if a.mode == "pause":
            for m in a.members:
                if not m.qemu_qmp:
                    p.error(f"group member {m.name}: a --disk needs a --vm before it")
                for d in m.disks:
                    if not d.primary_qmp:
                        p.error(f"{d.name}: pause mode needs PRIMARY_QMP:SECONDARY_QMP")
        return a
    if a.mode == "group-failover":
        p.error("--mode group-failover needs the group (--disk ... or --group FILE.json)")
    if not (a.qemu_qmp and a.primary_qmp):
        p.error("--qemu-qmp and --primary-qmp are required (or a group: --vm/--disk/--group)")
    if a.mode == "colo" and not (a.svm_qmp and a.secondary_qmp):
        p.error("--mode colo needs --svm-qmp and --secondary-qmp")
    if a.failover_on_primary_loss and not a.secondary_qmp:
        p.error("--failover-on-primary-loss needs --secondary-qmp")
    return a


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.CRITICAL)  # qemu.qmp logs disconnects loudly
    try:
        if args.mode == "group-failover":
            runner = GroupFailover(args, args.members)
        elif args.members:
            runner = GroupCtl(args, args.members)
        elif args.mode == "colo":
            runner = ColoWatch(args)
        else:
            runner = Ctl(args)
        return asyncio.run(runner.run())
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("stopped by a signal")
        return 143


if __name__ == "__main__":
    sys.exit(main())
