//! The primary: applies every guest change locally and forwards a copy, in the order the
//! changes took effect, to the secondary.
//!
//! ```text
//!  queue worker threads                       tokio (link task, session.rs)       secondary
//!  ───────────────────                        ─────────────────────────────       ─────────
//!  Change ─► [order lock] mark dirty,      ─► frame channel (bounded by the
//!            register range, number, queue    window in bytes) ─► writer ──TCP──► apply, ACK
//!            (waits only if window full)                          reader ◄─TCP─── ACK / heartbeat
//!        ─► wait for earlier overlapping                          ACK frees window, wakes waiters
//!           changes (ordering.rs), apply locally
//! ```
//!
//! One [`Change`] is the whole request: the frame and the local operation are both derived
//! from it. Under the order lock a change is only marked dirty, registered and queued; its
//! local write runs outside, after the earlier changes that overlap it (and only those), so
//! the secondary, applying in sequence order, ends with exactly the primary's disk.
//!
//! - `mod.rs` (this file): the engine: submitting changes, checkpoints, stop/start, status.
//! - `session.rs`: the link task: connect, handshake, stream, resync, acknowledgements.
//! - `settle.rs`: an epoch a MARKER ended, from its ACK to its DURABLE (flush-policy rule 11).

mod session;
mod settle;
mod verify;

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use log::info;
use tokio::sync::{mpsc, watch};

use super::dirty::{DirtyBitmap, DirtyExtents, DirtyLog};
use super::events::{self, PrimaryStatus, Side, VerifyStatus};
use super::metadata::MetaStore;
use super::metrics::ReplicationMetrics;
use super::ordering::ChangeOrder;
use super::protocol::{Frame, Mark, HEADER_LEN, MAX_PAYLOAD};
use super::tls::LinkSecurity;
use crate::qmp::EventSender;
use crate::storage::{BlockDevice, Change, GuestSlice};
use settle::Settles;

/// How the primary forwards writes.
#[derive(Debug, Clone)]
pub struct PrimaryOptions {
    /// Secondary's replication address (HOST:PORT).
    pub peer: String,
    /// Most bytes forwarded but not yet acknowledged; guest writes wait beyond it.
    pub window_bytes: u64,
    /// A write completes only once the secondary has applied it (DRBD protocol C).
    pub sync: bool,
    pub heartbeat_interval: Duration,
    /// The peer is declared dead after this long without a frame from it.
    pub peer_timeout: Duration,
    /// Delay between connection attempts.
    pub reconnect_interval: Duration,
    /// Chunk size of the dirty bitmap.
    pub dirty_granularity: u64,
    /// Logical block size, checked against the secondary's.
    pub block_size: u32,
    /// How the link is protected (TLS or plain TCP).
    pub security: LinkSecurity,
}

/// A dirty log shared with its previous owner, and the byte ranges it records.
pub type SharedLog = (Arc<DirtyLog>, Vec<(u64, u64)>);

/// Size of one range of `replication-verify`.
pub const VERIFY_RANGE: u64 = 1 << 20;

/// Where `replication-verify` stands.
#[derive(Debug, Default)]
struct Verify {
    session: u64,
    state: Option<&'static str>,
    total: u64,
    sent: u64,
    compared: u64,
    mismatches: Vec<(u64, u64)>,
}

/// Where the link to the secondary stands.
#[derive(Debug)]
enum Link {
    /// Forwarding stopped by `replication-stop`: changes are only tracked as dirty.
    Stopped,
    /// No secondary (trying to connect): changes are tracked as dirty.
    Connecting,
    /// Streaming to a secondary (resyncing while `resync_remaining > 0`).
    Connected(Session),
}

impl Link {
    fn name(&self) -> &'static str {
        match self {
            Link::Stopped => "stopped",
            Link::Connecting => "connecting",
            Link::Connected(_) => "connected",
        }
    }

    fn session(&self) -> Option<&Session> {
        match self {
            Link::Connected(s) => Some(s),
            _ => None,
        }
    }

    fn session_mut(&mut self) -> Option<&mut Session> {
        match self {
            Link::Connected(s) => Some(s),
            _ => None,
        }
    }
}

/// One connection to a secondary and its stream window.
#[derive(Debug)]
struct Session {
    /// Distinguishes sessions, so a waiter never takes a new session's ACK for its frame.
    id: u64,
    /// Where frames go.
    tx: mpsc::UnboundedSender<Frame>,
    peer_addr: String,
    /// Bytes of the dirty record not yet resent: the secondary is in sync only at 0.
    resync_remaining: u64,
    next_seq: u64,
    acked_seq: u64,
    /// `(seq, cost)` of every frame sent and not acknowledged.
    in_flight: VecDeque<(u64, u64)>,
    in_flight_bytes: u64,
    /// The secondary acknowledges a MARKER once applied and sends DURABLE later (WELCOME).
    sends_durable: bool,
}

impl Session {
    fn new(id: u64, tx: mpsc::UnboundedSender<Frame>, peer_addr: String, resync: u64) -> Self {
        Session {
            sends_durable: false,
            id,
            tx,
            peer_addr,
            resync_remaining: resync,
            next_seq: 1,
            acked_seq: 0,
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
        }
    }

    fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    fn all_acked(&self) -> bool {
        self.acked_seq == self.last_seq()
    }
}

/// The frame that ends an epoch.
enum EpochEnd<'a> {
    /// `replication-checkpoint`: CHECKPOINT (the secondary drops its layers).
    Checkpoint,
    /// The device stopped for COLO: MARKER with the queues' positions.
    Marker(&'a [Option<u16>]),
}

impl EpochEnd<'_> {
    fn frame(&self, seq: u64, epoch: u64) -> Frame {
        match self {
            EpochEnd::Checkpoint => Frame::Checkpoint { seq, epoch },
            EpochEnd::Marker(bases) => Frame::Marker {
                seq,
                mark: Mark {
                    epoch,
                    bases: bases.to_vec(),
                },
            },
        }
    }
}

/// A frame that was queued: which session took it and its sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sent {
    session: u64,
    seq: u64,
}

#[derive(Debug)]
struct State {
    link: Link,
    sessions: u64,
    /// The last epoch the secondary acknowledged.
    epoch: u64,
    /// The last epoch the secondary made durable (and this primary recorded).
    durable_epoch: u64,
    /// Acknowledged markers that await the secondary's DURABLE (`settle.rs`).
    settling: settle::Settling,
    /// The last checkpoint recorded in the metadata (set under [`Primary::recording`]).
    recorded_epoch: u64,
    /// The last epoch number put into the stream (acknowledged or not).
    attempted_epoch: u64,
    sent_since_checkpoint: u64,
    total_sent: u64,
    last_error: Option<String>,
    /// MARKERs the secondary applied (device stops with dirty logging on).
    markers: u64,
    /// The last handshake's decision and its reason (`incremental-failback: ...`).
    sync_decision: Option<String>,
}

/// Errors of replication operations.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("the secondary is not connected")]
    NotConnected,
    #[error("timed out after {0:?} waiting for the secondary to acknowledge")]
    Timeout(Duration),
    #[error("the replication link broke before the secondary acknowledged")]
    LinkLost,
    #[error("{0}")]
    Invalid(String),
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
}

/// The primary's replication engine, shared by the data plane and the link task.
pub struct Primary {
    local: Arc<dyn BlockDevice>,
    opts: PrimaryOptions,
    /// Held only to mark, register, number and queue one change (or resync chunk).
    order: Mutex<()>,
    /// Changes registered and still being applied locally.
    changes: ChangeOrder,
    state: Mutex<State>,
    /// Signalled on every ACK and link change.
    cond: Condvar,
    dirty: Mutex<DirtyBitmap>,
    events: EventSender,
    enabled: watch::Sender<bool>,
    /// The disk's replication metadata (generations, last checkpoint).
    meta: Arc<MetaStore>,
    /// The persistent dirty record, when kept (shared with the failed-over secondary it was
    /// promoted from, if so).
    log: Option<Arc<DirtyLog>>,
    verify: Mutex<Verify>,
    /// Counters and timestamps for operators.
    metrics: ReplicationMetrics,
    /// Held while a checkpoint is recorded: one recording at a time.
    recording: Mutex<()>,
}

impl Primary {
    /// A primary whose metadata lives in memory only, as for a freshly created disk, and that
    /// keeps no persistent dirty record (unit tests).
    pub fn new(
        local: Arc<dyn BlockDevice>,
        opts: PrimaryOptions,
        events: EventSender,
    ) -> Arc<Self> {
        let meta = Arc::new(MetaStore::in_memory(local.capacity()));
        Self::open(local, opts, events, meta, None).expect("in-memory metadata")
    }

    /// A primary over `local` with its metadata and (optionally) its persistent dirty log and
    /// the ranges that log recorded as dirty at start. Records the start in the metadata (a
    /// new current generation when the current one is the peer's).
    pub fn open(
        local: Arc<dyn BlockDevice>,
        opts: PrimaryOptions,
        events: EventSender,
        meta: Arc<MetaStore>,
        log: Option<(DirtyLog, Vec<(u64, u64)>)>,
    ) -> io::Result<Arc<Self>> {
        let log = log.map(|(l, r)| (Arc::new(l), r));
        Self::open_shared(local, opts, events, meta, log)
    }

    /// [`Primary::open`] with a log another owner shares: a failed-over secondary promoted
    /// in place hands its dirty log over (its bits are `ranges`).
    pub fn open_shared(
        local: Arc<dyn BlockDevice>,
        opts: PrimaryOptions,
        events: EventSender,
        meta: Arc<MetaStore>,
        log: Option<SharedLog>,
    ) -> io::Result<Arc<Self>> {
        let started = meta.primary_start(log.is_some())?;
        let mut dirty = DirtyBitmap::new(local.capacity(), opts.dirty_granularity);
        let log = log.map(|(log, ranges)| {
            for (offset, len) in ranges {
                dirty.mark(offset, len);
            }
            log
        });
        info!(
            "primary disk {:032x}: generation {:016x}, peer generation {:016x}, checkpoint {}, \
             {} bytes dirty at start",
            started.gens.disk_id,
            started.gens.current,
            started.gens.bitmap,
            started.gens.epoch,
            dirty.dirty_bytes()
        );
        let (enabled, _) = watch::channel(true);
        Ok(Arc::new(Primary {
            local,
            opts,
            order: Mutex::new(()),
            changes: ChangeOrder::new(),
            state: Mutex::new(State {
                link: Link::Connecting,
                sessions: 0,
                epoch: started.gens.epoch,
                durable_epoch: started.gens.epoch,
                settling: settle::Settling::Settled,
                recorded_epoch: started.gens.epoch,
                attempted_epoch: started.gens.epoch,
                sent_since_checkpoint: 0,
                total_sent: 0,
                last_error: None,
                markers: 0,
                sync_decision: None,
            }),
            cond: Condvar::new(),
            dirty: Mutex::new(dirty),
            events,
            enabled,
            metrics: ReplicationMetrics::new(),
            recording: Mutex::new(()),
            meta,
            log,
            verify: Mutex::new(Verify::default()),
        }))
    }

    /// Failback: the new secondary's own dirty record (PEER_DIRTY) joins this primary's, in
    /// the persistent log first (durably: a primary restart still resends it) and then in
    /// the dirty bitmap the coming resync sends.
    fn merge_peer_dirty(&self, peer: &DirtyExtents) -> Result<u64, ReplicationError> {
        if peer.disk_size() != self.local.capacity() {
            return Err(ReplicationError::Invalid(format!(
                "the secondary's dirty record describes a disk of {} bytes, this one has {}",
                peer.disk_size(),
                self.local.capacity()
            )));
        }
        let ranges: Vec<(u64, u64)> = peer.ranges().collect();
        if let Some(l) = &self.log {
            l.mark_ranges(&ranges)?;
        }
        let _order = self.order();
        let mut dirty = self.dirty();
        for (offset, len) in ranges {
            dirty.mark(offset, len);
        }
        Ok(peer.dirty_bytes())
    }

    /// Whether this primary keeps a persistent dirty log.
    pub fn has_dirty_log(&self) -> bool {
        self.log.is_some()
    }

    fn verify_state(&self) -> MutexGuard<'_, Verify> {
        self.verify.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A checkpoint completed: record it (the secondary holds `rec.holds` at `rec.epoch`),
    /// then let the dirty log forget extents untouched since. One recording at a time, never
    /// an older one after a newer (DURABLE's recordings run off the link task). Failures only
    /// make the record larger than needed (a later resync sends more), so they are logged.
    fn checkpoint_recorded(&self, rec: settle::CheckpointRecord) {
        let _one = self.recording.lock().unwrap_or_else(|e| e.into_inner());
        let epoch = rec.epoch;
        if self.state().recorded_epoch >= epoch {
            return;
        }
        if let Err(e) = self.meta.primary_checkpoint_of(epoch, rec.holds) {
            log::warn!("recording checkpoint {epoch} in the metadata: {e}");
            return;
        }
        self.state().recorded_epoch = epoch;
        self.cond.notify_all();
        if let Some(l) = &self.log {
            let r = match rec.boundary {
                Some(b) => l.checkpoint_done_at(b),
                None => l.checkpoint_done(),
            };
            if let Err(e) = r {
                log::warn!("clearing the dirty log after checkpoint {epoch}: {e}");
            }
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn order(&self) -> MutexGuard<'_, ()> {
        self.order.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn dirty(&self) -> MutexGuard<'_, DirtyBitmap> {
        self.dirty.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies `change` locally and forwards it, in order (see the module comment).
    ///
    /// The frame is queued before the local write: if that write then fails (EIO), the guest
    /// gets the error but the secondary may already hold the data. The range is marked dirty
    /// either way, so a later resync sends what the primary really has.
    pub fn submit(&self, change: Change<Bytes>) -> io::Result<()> {
        let (offset, len) = change.range();
        // Durably recorded before the frame is queued and before the local write.
        let _logged = match &self.log {
            Some(l) => Some(l.record(offset, len)?),
            None => None,
        };
        let (ticket, last) = {
            let _order = self.order();
            self.dirty().mark(offset, len);
            let ticket = self.changes.register(offset, len);
            (ticket, self.forward(change.clone()))
        };
        ticket.wait_turn();
        let r = change.as_slice().apply_to(&*self.local);
        drop(ticket);
        r?;
        if self.opts.sync {
            if let Some(sent) = last {
                // A broken link does not fail the guest's write: it is recorded as dirty.
                let _ = self.wait_acked(sent, None);
            }
        }
        Ok(())
    }

    /// Queues the frames of `change`: one, or for a write larger than [`MAX_PAYLOAD`] one per
    /// slice of it (no copy). Returns the last one queued; `None` when no secondary takes them.
    /// Called with the order lock held.
    fn forward(&self, change: Change<Bytes>) -> Option<Sent> {
        match change {
            Change::Write { offset, data } if data.len() > MAX_PAYLOAD => {
                let mut last = None;
                for start in (0..data.len()).step_by(MAX_PAYLOAD) {
                    let chunk = data.slice(start..(start + MAX_PAYLOAD).min(data.len()));
                    let change = Change::Write {
                        offset: offset + start as u64,
                        data: chunk,
                    };
                    last = Some(self.enqueue_change(change)?);
                }
                last
            }
            change => self.enqueue_change(change),
        }
    }

    fn enqueue_change(&self, change: Change<Bytes>) -> Option<Sent> {
        let cost = HEADER_LEN as u64 + change.data_len();
        self.enqueue(cost, |seq| Frame::Change { seq, change })
    }

    /// Queues a frame for the secondary (caller holds the order lock). Waits while the window
    /// is full. Returns the frame's number, or `None` when no secondary is connected.
    fn enqueue(&self, cost: u64, make: impl FnOnce(u64) -> Frame) -> Option<Sent> {
        self.enqueue_then(cost, make, |_, _| ())
            .map(|(sent, ())| sent)
    }

    /// [`Primary::enqueue`], then `then` under the same hold of the state lock (before any
    /// answer to the frame can be taken).
    fn enqueue_then<R>(
        &self,
        cost: u64,
        make: impl FnOnce(u64) -> Frame,
        then: impl FnOnce(&mut State, Sent) -> R,
    ) -> Option<(Sent, R)> {
        let mut st = self.state();
        loop {
            let s = st.link.session()?;
            if s.in_flight_bytes == 0 || s.in_flight_bytes + cost <= self.opts.window_bytes {
                break;
            }
            st = self.cond.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        let State {
            link,
            sent_since_checkpoint,
            total_sent,
            ..
        } = &mut *st;
        let s = link.session_mut()?;
        let seq = s.next_seq;
        if s.tx.send(make(seq)).is_err() {
            // The session task is gone; it reports why itself.
            return None;
        }
        s.next_seq += 1;
        s.in_flight.push_back((seq, cost));
        s.in_flight_bytes += cost;
        *sent_since_checkpoint += cost;
        *total_sent += cost;
        let sent = Sent { session: s.id, seq };
        let r = then(&mut st, sent);
        Some((sent, r))
    }

    /// Waits until the secondary acknowledged `sent` (or its session is gone).
    fn wait_acked(&self, sent: Sent, timeout: Option<Duration>) -> Result<(), ReplicationError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = self.state();
        loop {
            match st.link.session() {
                Some(s) if s.id == sent.session => {
                    if s.acked_seq >= sent.seq {
                        return Ok(());
                    }
                }
                _ => return Err(ReplicationError::LinkLost),
            }
            st = match deadline {
                None => self.cond.wait(st).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err(ReplicationError::Timeout(timeout.unwrap_or_default()));
                    }
                    self.cond
                        .wait_timeout(st, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    // ---- control operations ----

    /// `replication-prepare-checkpoint`: returns once everything forwarded so far is acked.
    pub fn prepare_checkpoint(&self, timeout: Option<Duration>) -> Result<(), ReplicationError> {
        let last = {
            let st = self.state();
            let s = st.link.session().ok_or(ReplicationError::NotConnected)?;
            Sent {
                session: s.id,
                seq: s.last_seq(),
            }
        };
        self.wait_acked(last, timeout)
    }

    /// `replication-do-checkpoint`: starts a new epoch locally. Everything must be acked.
    pub fn do_checkpoint(&self) -> Result<u64, ReplicationError> {
        let t = Instant::now();
        let r = self.do_checkpoint_inner();
        self.count_checkpoint(&r, t);
        r
    }

    fn do_checkpoint_inner(&self) -> Result<u64, ReplicationError> {
        let _order = self.order();
        let mut st = self.state();
        match st.link.session() {
            Some(s) if !s.all_acked() => {
                return Err(ReplicationError::Invalid(format!(
                    "{} bytes are not acknowledged yet: run replication-prepare-checkpoint first",
                    s.in_flight_bytes
                )))
            }
            Some(s) if s.resync_remaining == 0 => {}
            _ => {
                return Err(ReplicationError::Invalid(
                    "the secondary is not in sync; a checkpoint now would not be consistent".into(),
                ))
            }
        }
        st.epoch += 1;
        st.durable_epoch = st.epoch;
        st.sent_since_checkpoint = 0;
        // Everything is acknowledged and the secondary checkpoints too: what markers still
        // owed is covered as well.
        st.settling = settle::Settling::Settled;
        self.dirty().take();
        let record = settle::CheckpointRecord {
            epoch: st.epoch,
            holds: self.meta.gens().current,
            boundary: self.log.as_ref().map(|l| l.epoch_boundary()),
        };
        let epoch = st.epoch;
        drop(st);
        drop(_order);
        self.checkpoint_recorded(record);
        self.events.send(&events::Checkpoint {
            role: Side::Primary,
            epoch,
        });
        Ok(epoch)
    }

    /// `replication-checkpoint`: puts an epoch marker into the stream and waits until the
    /// secondary applied everything before it and dropped its layers.
    pub fn checkpoint(&self, timeout: Option<Duration>) -> Result<u64, ReplicationError> {
        self.end_epoch(timeout, EpochEnd::Checkpoint, true)
    }

    /// COLO: QEMU stopped the device with dirty logging on (a COLO checkpoint, the end of the
    /// migration into COLO, or a user `stop` during one), and no request is in flight. A
    /// MARKER with the queues' positions goes into the stream and this waits until the
    /// secondary applied everything before it (at most the peer timeout), so QEMU's state of
    /// this point never reaches the Secondary VM before the disk of this point reaches its
    /// backend. The secondary's sync of it comes after (`settle.rs`). Without a secondary in
    /// sync it returns at once (unprotected).
    ///
    /// QEMU stops the queues one after another and sends the state after the last answer:
    /// unless `last` (no other started queue still runs), the marker is only queued when the
    /// secondary sends DURABLE (the last queue's marker, later in the same ordered stream, is
    /// waited for); a secondary of an older build is waited for at every queue, as before.
    pub fn device_stopped(
        &self,
        bases: &[Option<u16>],
        last: bool,
    ) -> Result<u64, ReplicationError> {
        let timeout = Some(self.opts.peer_timeout);
        let epoch = self.end_epoch(timeout, EpochEnd::Marker(bases), last)?;
        self.state().markers += 1;
        Ok(epoch)
    }

    /// Ends the epoch with `end` and waits for its acknowledgement (without `wait`, only when
    /// it settles at its ACK). On failure the epoch's changes stay in the dirty record.
    fn end_epoch(
        &self,
        timeout: Option<Duration>,
        end: EpochEnd<'_>,
        wait: bool,
    ) -> Result<u64, ReplicationError> {
        let t = Instant::now();
        let r = self.end_epoch_inner(timeout, end, wait);
        self.count_checkpoint(&r, t);
        r
    }

    /// Counts a checkpoint attempt that started at `t`.
    fn count_checkpoint(&self, r: &Result<u64, ReplicationError>, t: Instant) {
        match r {
            Ok(_) => self.metrics.checkpoint(t.elapsed()),
            Err(_) => self.metrics.checkpoint_failed(),
        }
    }

    /// The primary's counters and timestamps (for the metrics endpoint).
    pub fn metrics(&self) -> &ReplicationMetrics {
        &self.metrics
    }

    fn end_epoch_inner(
        &self,
        timeout: Option<Duration>,
        end: EpochEnd<'_>,
        wait: bool,
    ) -> Result<u64, ReplicationError> {
        let (sent, epoch, settles) = {
            let _order = self.order();
            let epoch = {
                let st = self.state();
                if st.link.session().is_some_and(|s| s.resync_remaining > 0) {
                    return Err(ReplicationError::Invalid(
                        "resynchronisation in progress; checkpoint after it completes".into(),
                    ));
                }
                // A number once sent is never sent again for another point: a marker that
                // timed out here may still be applied by the secondary later.
                st.epoch.max(st.attempted_epoch) + 1
            };
            let is_marker = matches!(end, EpochEnd::Marker(_));
            let (sent, settles) = self
                .enqueue_then(
                    HEADER_LEN as u64,
                    |seq| end.frame(seq, epoch),
                    |st, sent| {
                        st.attempted_epoch = epoch;
                        self.end_epoch_changes(st, sent, epoch, is_marker)
                    },
                )
                .ok_or(ReplicationError::NotConnected)?;
            (sent, epoch, settles)
        };
        if !wait && matches!(settles, Settles::AtDurable) {
            return Ok(epoch); // owed; acknowledged with the next waited-for end
        }
        match self.wait_acked(sent, timeout) {
            Ok(()) => {
                self.state().epoch = epoch;
                if let Settles::AtAck(_, record) = settles {
                    // Durable at its ACK (a CHECKPOINT, or a secondary without DURABLE).
                    self.state().durable_epoch = epoch;
                    self.checkpoint_recorded(record);
                }
                info!("checkpoint {epoch} done");
                self.events.send(&events::Checkpoint {
                    role: Side::Primary,
                    epoch,
                });
                Ok(epoch)
            }
            Err(e) => {
                // The epoch did not end: its changes are still unprotected. (Owed ones wait
                // for their DURABLE, or go back when the session ends: `settle.rs`.)
                if let Settles::AtAck(changes, _) = settles {
                    self.give_back(changes);
                }
                Err(e)
            }
        }
    }

    /// `replication-stop`: stop forwarding; keep serving and recording dirty blocks.
    pub fn stop(&self) {
        self.enabled.send_replace(false);
        let was = std::mem::replace(&mut self.state().link, Link::Stopped);
        self.cond.notify_all();
        if let Link::Connected(s) = was {
            self.session_lost(&s, "replication stopped");
        }
    }

    /// `replication-start`: resume forwarding (after a stop), resyncing what changed. With
    /// `full`, the whole disk is sent (a brand-new secondary).
    pub fn start(&self, full: bool) {
        if full {
            self.dirty().mark_all();
        }
        {
            let mut st = self.state();
            if matches!(st.link, Link::Stopped) {
                st.link = Link::Connecting;
            }
        }
        self.enabled.send_replace(true);
    }

    /// `query-replication` for the primary.
    pub fn status(&self) -> PrimaryStatus {
        let st = self.state();
        let dirty = self.dirty();
        let s = st.link.session();
        let m = self.metrics.snapshot();
        PrimaryStatus {
            role: Side::Primary,
            state: st.link.name(),
            peer: self.opts.peer.clone(),
            peer_address: s.map(|s| s.peer_addr.clone()),
            mode: if self.opts.sync { "sync" } else { "async" },
            epoch: st.epoch,
            durable_epoch: st.durable_epoch,
            bytes_sent_since_checkpoint: st.sent_since_checkpoint,
            bytes_sent_total: st.total_sent,
            bytes_in_flight: s.map_or(0, |s| s.in_flight_bytes),
            frames_in_flight: s.map_or(0, |s| s.in_flight.len() as u64),
            window_bytes: self.opts.window_bytes,
            last_seq: s.map_or(0, |s| s.last_seq()),
            acked_seq: s.map_or(0, |s| s.acked_seq),
            resync_remaining_bytes: s.map_or(0, |s| s.resync_remaining),
            dirty_bytes: match &st.settling {
                // What a resync would send: an epoch owed its DURABLE included.
                settle::Settling::Owed(owed) => owed.dirty_bytes_with(&dirty),
                _ => dirty.dirty_bytes(),
            },
            dirty_granularity: dirty.granularity(),
            dirty_log_bytes: self.log.as_ref().map(|l| l.recorded_bytes()),
            verify: {
                let v = self.verify_state();
                v.state.map(|state| VerifyStatus {
                    state,
                    ranges_total: v.total,
                    ranges_sent: v.sent,
                    ranges_compared: v.compared,
                    mismatches: v.mismatches.len() as u64,
                })
            },
            metadata: self.meta.status(),
            last_error: st.last_error.clone(),
            unprotected_since: m.unprotected_since,
            last_checkpoint_at: m.last_checkpoint_at,
            checkpoints: m.checkpoints,
            checkpoint_failures: m.checkpoint_failures,
            markers: st.markers,
            sync_decision: st.sync_decision.clone(),
            resync_total_bytes: s.map_or(0, |_| m.resync_total_bytes),
            resync_started_at: s.and(m.resync_started_at),
            bytes_acked_total: m.acked_bytes,
            sessions: m.sessions,
            link_errors: m.link_errors,
        }
    }

    /// Reports a session that ended after its handshake (the guest keeps running).
    fn session_lost(&self, session: &Session, reason: &str) {
        self.unsettle(session.id);
        self.metrics.unprotected();
        log::warn!("replication link lost: {reason}; the guest keeps running, changes are tracked");
        // From now on this disk is written without its peer: a new generation (so that a
        // secondary failing over meanwhile is recognised as a split brain later).
        if let Err(e) = self.meta.primary_diverge() {
            log::error!("recording the link loss in the metadata: {e}");
        }
        self.verify_aborted(session.id);
        let dirty = self.dirty().dirty_bytes();
        self.events.send(&events::PeerLost {
            role: Side::Primary,
            reason: reason.to_string(),
            dirty_bytes: Some(dirty),
        });
    }
}

/// The Primary VM's device tells the primary when QEMU stops it (see
/// [`Primary::device_stopped`]).
pub struct PrimaryDevice(pub Arc<Primary>);

impl crate::vhost_user::DeviceObserver for PrimaryDevice {
    fn queue_stopped(&self, queue: u16, bases: &[Option<u16>], log_all: bool, last: bool) {
        if !log_all {
            return; // a plain stop: no checkpoint follows
        }
        let t = std::time::Instant::now();
        match self.0.device_stopped(bases, last) {
            Ok(epoch) if !last => log::debug!(
                "device stop (queue {queue}): marker of epoch {epoch} queued in {:.3} ms (the \
                 last queue's marker is waited for)",
                t.elapsed().as_secs_f64() * 1000.0
            ),
            Ok(epoch) => log::debug!(
                "device stop (queue {queue}): marker of epoch {epoch} applied by the secondary \
                 in {:.3} ms",
                t.elapsed().as_secs_f64() * 1000.0
            ),
            Err(e) => log::warn!(
                "QEMU stopped the device (queue {queue}) but the secondary did not get the \
                 marker: {e}; the Secondary VM cannot take this point's state"
            ),
        }
    }
}

/// The primary's disk as the guest sees it: the local image, with every change forwarded.
pub struct ReplicatedDisk {
    primary: Arc<Primary>,
}

impl ReplicatedDisk {
    pub fn new(primary: Arc<Primary>) -> Self {
        ReplicatedDisk { primary }
    }
}

impl BlockDevice for ReplicatedDisk {
    fn capacity(&self) -> u64 {
        self.primary.local.capacity()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.primary.local.read_at(buf, offset)
    }

    fn read_to_guest(&self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        self.primary.local.read_to_guest(offset, bufs)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.primary.submit(Change::Write {
            offset,
            data: Bytes::copy_from_slice(buf),
        })
    }

    fn write_from_guest(&self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        // The copy the link needs anyway is the only copy out of guest memory.
        self.primary.submit(Change::Write {
            offset,
            data: Bytes::from(crate::storage::gather(bufs)),
        })
    }

    fn flush(&self) -> io::Result<()> {
        self.primary.submit(Change::Flush)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.primary.submit(Change::Discard { offset, len })
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.primary
            .submit(Change::WriteZeroes { offset, len, unmap })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemDisk;

    /// A disk whose writes take a pseudo-random while, so that racing writes really overlap.
    struct SlowDisk(MemDisk);

    impl BlockDevice for SlowDisk {
        fn capacity(&self) -> u64 {
            self.0.capacity()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.0.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            // Simulated device latency (not synchronisation): 0-80 µs, by content.
            std::thread::sleep(Duration::from_micros((buf[0] % 5) as u64 * 20));
            self.0.write_at(buf, offset)
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
        fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
            self.0.discard(offset, len)
        }
        fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
            self.0.write_zeroes(offset, len, unmap)
        }
    }

    fn options() -> PrimaryOptions {
        PrimaryOptions {
            peer: "127.0.0.1:1".into(),
            window_bytes: 1 << 30,
            sync: false,
            heartbeat_interval: Duration::from_secs(1),
            peer_timeout: Duration::from_secs(5),
            reconnect_interval: Duration::from_secs(1),
            dirty_granularity: 4096,
            block_size: 512,
            security: LinkSecurity::Insecure,
        }
    }

    /// Racing overlapping writes from many threads: after every round, replaying the frames in
    /// sequence order gives exactly the primary's disk.
    #[test]
    fn sequence_order_reproduces_the_primary_disk() {
        let local = Arc::new(SlowDisk(MemDisk::new(64 * 1024)));
        let primary = Primary::new(local.clone(), options(), EventSender::new());
        let (tx, mut rx) = mpsc::unbounded_channel();
        primary.state().link = Link::Connected(Session::new(1, tx, "test".into(), 0));
        let disk = Arc::new(ReplicatedDisk::new(primary.clone()));
        let replay = MemDisk::new(64 * 1024);
        let mut expect_seq = 1;
        for round in 0..150u64 {
            // Eight writes at once, all over the same 8 KiB, in different sizes and speeds.
            std::thread::scope(|s| {
                for t in 0..8u64 {
                    let disk = disk.clone();
                    s.spawn(move || {
                        let len = [512usize, 1024, 4096, 8192][(t % 4) as usize];
                        let off = ((t + round) % 4) * 512;
                        let byte = (round * 8 + t) as u8;
                        disk.write_at(&vec![byte; len], off).unwrap();
                    });
                }
            });
            while let Ok(f) = rx.try_recv() {
                assert_eq!(f.seq(), expect_seq);
                expect_seq += 1;
                if let Frame::Change {
                    change: Change::Write { offset, data },
                    ..
                } = f
                {
                    replay.write_at(&data, offset).unwrap();
                }
            }
            assert!(
                replay.snapshot() == local.0.snapshot(),
                "round {round}: the stream replayed in order differs from the primary disk"
            );
        }
        assert_eq!(expect_seq, 150 * 8 + 1);
    }

    /// A disk whose writes at offset 0 wait until the test opens a gate.
    struct GatedDisk {
        inner: MemDisk,
        entered: Mutex<std::sync::mpsc::Sender<()>>,
        gate: Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl BlockDevice for GatedDisk {
        fn capacity(&self) -> u64 {
            self.inner.capacity()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            if offset == 0 {
                self.entered.lock().unwrap().send(()).unwrap();
                self.gate.lock().unwrap().recv().unwrap();
            }
            self.inner.write_at(buf, offset)
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
        fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
            self.inner.discard(offset, len)
        }
        fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
            self.inner.write_zeroes(offset, len, unmap)
        }
    }

    /// A write blocked on the disk (A) holds up a later write overlapping it (B) but not one
    /// elsewhere (C): C completes first, and the disk ends as A then B.
    #[test]
    fn a_blocked_overlapping_write_does_not_delay_other_ranges() {
        use std::sync::mpsc as std_mpsc;
        let (entered_tx, entered_rx) = std_mpsc::channel();
        let (gate_tx, gate_rx) = std_mpsc::channel();
        let local = Arc::new(GatedDisk {
            inner: MemDisk::new(1 << 20),
            entered: Mutex::new(entered_tx),
            gate: Mutex::new(gate_rx),
        });
        let primary = Primary::new(local.clone(), options(), EventSender::new());
        let (tx, mut rx) = mpsc::unbounded_channel();
        primary.state().link = Link::Connected(Session::new(1, tx, "test".into(), 0));
        let disk = Arc::new(ReplicatedDisk::new(primary.clone()));
        let (done_tx, done_rx) = std_mpsc::channel::<char>();
        let write = |name: char, offset: u64, len: usize| {
            let disk = disk.clone();
            let done = done_tx.clone();
            std::thread::spawn(move || {
                disk.write_at(&vec![name as u8; len], offset).unwrap();
                done.send(name).unwrap();
            })
        };
        let a = write('A', 0, 8192);
        entered_rx.recv().unwrap();
        let b = write('B', 4096, 4096);
        // B is numbered and queued (so registered) before C starts.
        let mut seqs = Vec::new();
        while seqs.len() < 2 {
            seqs.push(rx.blocking_recv().unwrap().seq());
        }
        assert_eq!(seqs, [1, 2]);
        let c = write('C', 1 << 16, 4096);
        // C must complete while A is still held (the bound only turns a hang into a failure).
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(30)), Ok('C'));
        gate_tx.send(()).unwrap();
        // A and B both finish (B's local write after A's: the disk content below says so).
        let mut rest = [done_rx.recv().unwrap(), done_rx.recv().unwrap()];
        rest.sort();
        assert_eq!(rest, ['A', 'B']);
        for t in [a, b, c] {
            t.join().unwrap();
        }
        let disk = local.inner.snapshot();
        assert!(disk[..4096].iter().all(|&x| x == b'A'));
        assert!(disk[4096..8192].iter().all(|&x| x == b'B'));
        assert!(disk[1 << 16..(1 << 16) + 4096].iter().all(|&x| x == b'C'));
    }
}
