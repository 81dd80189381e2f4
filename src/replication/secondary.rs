//! The secondary: receives the primary's stream and applies it to the secondary disk through
//! the disk buffer ([`LayeredDisk`]), acknowledging what it applied.
//!
//! ```text
//!  primary ─TCP─► reader task ──(bounded channel)──► applier thread ──► LayeredDisk
//!          ◄TCP── writer task ◄── ACK(seq) ◄────────────┘   (copy-before-write into hidden)
//!                 + heartbeats
//! ```
//!
//! One primary at a time: a connection claims the session slot atomically before its
//! handshake, so a second primary is refused even while the first is still handshaking.
//!
//! This file: the endpoint, its state, checkpoints, group checkpoints, failover, status.
//! `session.rs`: one primary's session (the handshake decision, then the stream loop and the
//! applier thread). `colo.rs`: the Secondary VM under COLO (markers, tentative cuts, restarts,
//! leaving COLO). `failback.rs`: the failback parts (the disk's own dirty record offered to a
//! primary, the failed-over disk's dirty log, promotion to a primary in place). `restart.rs`:
//! what a restart of the Secondary VM's device is.

mod colo;
mod failback;
mod restart;
mod session;

pub use colo::SvmDevice;
pub use failback::{FailbackOptions, FailoverLogSpec, Promotion};

use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::info;
use tokio::sync::watch;

use super::dirty::DirtyExtents;
use super::events::{self, FailoverReport, SecondaryStatus, Side};
use super::layers::{GroupPrepared, LayeredDisk};
use super::metadata::MetaStore;
use super::metrics::ReplicationMetrics;
use super::tls::LinkSecurity;
use crate::qmp::EventSender;
use crate::storage::BlockDevice;

/// How the secondary listens.
#[derive(Debug, Clone)]
pub struct SecondaryOptions {
    pub listen: String,
    /// A Secondary VM may attach (`--socket`): COLO markers become tentative cuts that its
    /// restart decides. Without one, a marker is a checkpoint of the disk.
    pub serves_vm: bool,
    pub heartbeat_interval: Duration,
    pub peer_timeout: Duration,
    pub block_size: u32,
    /// The operator allows a full sync to overwrite this disk (`--allow-full-sync`).
    pub allow_full_sync: bool,
    /// How the link is protected (TLS or plain TCP).
    pub security: LinkSecurity,
}

/// Where the secondary's replication stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Taking the primary's stream (or waiting for it).
    Receiving,
    /// `replication-failover` is committing the layers; no stream is taken any more.
    FailingOver,
    /// The disk is the Secondary VM's own.
    FailedOver,
}

/// Who holds the session slot.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Peer {
    Idle,
    /// A connection is handshaking.
    Handshaking(String),
    /// A primary streams; its applier thread may be running until the slot is freed.
    Streaming(String),
}

#[derive(Debug)]
struct SecState {
    stage: Stage,
    peer: Peer,
    /// The Secondary VM under COLO (colo.rs).
    svm: colo::SvmState,
    applied_seq: u64,
    bytes_since_checkpoint: u64,
    bytes_total: u64,
    last_error: Option<String>,
}

/// Errors of secondary operations.
#[derive(Debug, thiserror::Error)]
pub enum SecondaryError {
    #[error("failover already done")]
    AlreadyFailedOver,
    #[error("no primary is connected: {0}")]
    NotConnected(&'static str),
    #[error(
        "applied sequence number is {applied}, not {expected}: the secondary did not apply \
         exactly what the primary sent, so it is not prepared"
    )]
    SeqMismatch { expected: u64, applied: u64 },
    #[error("{0}")]
    NotPrepared(String),
    /// The Secondary VM runs a state its disk does not match (docs/colo-with-qemu.md).
    #[error(
        "the Secondary VM's memory does not match its disk ({0}); failing over would serve \
         it a disk that is not its own: use replication-failover {{\"force\": true}} to take \
         the disk anyway (the last checkpoint plus the Secondary VM's writes), or fail over \
         to the primary's side"
    )]
    SvmMismatch(String),
    /// The secondary lost power while its layers held unsynced changes (docs/flush-policy.md).
    #[error(
        "the secondary lost power while its layers held unsynced changes: its disk is no \
         checkpoint until the primary has resent what changed and the next checkpoint; use \
         replication-failover {{\"force\": true}} to take the disk as it is \
         (crash-consistent: the primary's writes up to its last FLUSH, and some later ones)"
    )]
    NeedsResync,
    /// `replication-promote` refused (not failed over, already promoted, not set up).
    #[error("{0}")]
    CannotPromote(&'static str),
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
}

/// The secondary's replication endpoint.
pub struct Secondary {
    disk: Arc<LayeredDisk>,
    opts: SecondaryOptions,
    state: Mutex<SecState>,
    /// Signalled when the session slot is freed.
    cond: Condvar,
    events: EventSender,
    /// Flips to true on failover: the session ends and no new one is accepted.
    stop: watch::Sender<bool>,
    /// The disk's replication metadata (generations, last checkpoint, consistency).
    meta: Arc<MetaStore>,
    /// The secondary disk under the layers (what VERIFY compares); `None`: the layered view.
    base: Option<Arc<dyn BlockDevice>>,
    /// Counters and timestamps for operators.
    metrics: ReplicationMetrics,
    /// Failback and promotion (failback.rs).
    fb: failback::Failback,
    /// Held while a batch is applied and its sequence number recorded, and by the group
    /// prepare and commit: they see the disk exactly at `applied_seq`.
    apply_gate: Mutex<()>,
}

impl Secondary {
    /// The endpoint over `disk` (the layers over `base`) with its metadata, its link options
    /// and its failback settings, all fixed from here on. A disk buffer reopened after a
    /// failover (or in the middle of one) takes no stream; see [`Secondary::resume_failover`].
    pub fn new(
        disk: Arc<LayeredDisk>,
        base: Option<Arc<dyn BlockDevice>>,
        meta: Arc<MetaStore>,
        opts: SecondaryOptions,
        failback: FailbackOptions,
        events: EventSender,
    ) -> Arc<Self> {
        let stage = match (disk.is_failed_over(), disk.failover_pending()) {
            (false, _) => Stage::Receiving,
            (true, true) => Stage::FailingOver,
            (true, false) => Stage::FailedOver,
        };
        let (stop, _) = watch::channel(stage != Stage::Receiving);
        Arc::new(Secondary {
            disk,
            opts,
            meta,
            base,
            state: Mutex::new(SecState {
                stage,
                peer: Peer::Idle,
                svm: colo::SvmState::default(),
                applied_seq: 0,
                bytes_since_checkpoint: 0,
                bytes_total: 0,
                last_error: None,
            }),
            cond: Condvar::new(),
            events,
            stop,
            metrics: ReplicationMetrics::new(),
            fb: failback::Failback::new(failback),
            apply_gate: Mutex::new(()),
        })
    }

    /// A secondary whose metadata lives in memory, as for a freshly created disk, with no
    /// image under the layers and no failback settings (unit tests, fuzzing).
    pub fn in_memory(
        disk: Arc<LayeredDisk>,
        opts: SecondaryOptions,
        events: EventSender,
    ) -> Arc<Self> {
        let meta = Arc::new(MetaStore::in_memory(disk.capacity()));
        Self::new(disk, None, meta, opts, FailbackOptions::default(), events)
    }

    fn state(&self) -> MutexGuard<'_, SecState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `replication-do-checkpoint` on the secondary: drop both layers now. Only while a
    /// primary streams: without one nothing says that the disk is a checkpoint (a prepared
    /// group checkpoint is committed with [`Secondary::commit_group`]).
    pub fn do_checkpoint(&self) -> Result<u64, SecondaryError> {
        {
            let st = self.state();
            if st.stage != Stage::Receiving {
                return Err(SecondaryError::AlreadyFailedOver);
            }
            if !matches!(st.peer, Peer::Streaming(_)) {
                return Err(SecondaryError::NotConnected(
                    "a checkpoint now would not be known to match the primary; a prepared \
                     group checkpoint is committed with replication-do-checkpoint {\"group\": G}",
                ));
            }
        }
        let t = Instant::now();
        self.disk.checkpoint()?;
        self.state().bytes_since_checkpoint = 0;
        self.metrics.checkpoint(t.elapsed());
        let epoch = self.disk.stats().epoch;
        self.meta.checkpoint_done(epoch)?;
        self.events.send(&events::Checkpoint {
            role: Side::Secondary,
            epoch,
        });
        Ok(epoch)
    }

    /// `replication-prepare {"group": G, "applied-seq": S}` (docs/consistency-groups.md):
    /// records durably that the disk is group checkpoint `G`, if a primary streams and the
    /// stream is applied exactly up to its sequence number `S` (what the primary sent, read by
    /// the coordinator after `replication-prepare-checkpoint`). Refused otherwise: then the
    /// disk is not prepared (an earlier prepared record stays as it was).
    pub fn prepare_group(
        &self,
        group: u64,
        applied_seq: u64,
    ) -> Result<GroupPrepared, SecondaryError> {
        let _gate = self.apply_gate.lock().unwrap_or_else(|e| e.into_inner());
        {
            let st = self.state();
            if st.stage != Stage::Receiving {
                return Err(SecondaryError::AlreadyFailedOver);
            }
            if !matches!(st.peer, Peer::Streaming(_)) {
                return Err(SecondaryError::NotConnected(
                    "a group checkpoint is prepared while the primary streams",
                ));
            }
            if st.applied_seq != applied_seq {
                return Err(SecondaryError::SeqMismatch {
                    expected: applied_seq,
                    applied: st.applied_seq,
                });
            }
        }
        let p = self.disk.group_prepare(group, applied_seq)?;
        info!(
            "prepared for group checkpoint {group} at epoch {} (applied seq {applied_seq})",
            p.epoch
        );
        Ok(p)
    }

    /// `replication-do-checkpoint {"group": G}`: commits the prepared group checkpoint `G`
    /// (the layers are dropped, the disk's epoch advances), with or without a primary. Refused,
    /// changing nothing, unless the disk is prepared for `G` at its current epoch with nothing
    /// applied since. Used by a group failover for members whose commit the coordinator did
    /// not get to.
    pub fn commit_group(&self, group: u64) -> Result<u64, SecondaryError> {
        let _gate = self.apply_gate.lock().unwrap_or_else(|e| e.into_inner());
        if self.state().stage != Stage::Receiving {
            return Err(SecondaryError::AlreadyFailedOver);
        }
        let t = Instant::now();
        let epoch = match self.disk.checkpoint_group(group) {
            Ok(e) => e,
            Err(e @ crate::replication::layers::LayerError::NotPrepared { .. }) => {
                return Err(SecondaryError::NotPrepared(e.to_string()))
            }
            Err(e) => return Err(e.into()),
        };
        self.state().bytes_since_checkpoint = 0;
        self.metrics.checkpoint(t.elapsed());
        self.meta.checkpoint_done(epoch)?;
        info!("group checkpoint {group} committed locally: epoch {epoch}");
        self.events.send(&events::Checkpoint {
            role: Side::Secondary,
            epoch,
        });
        Ok(epoch)
    }

    /// Completes a failover that a previous process started (the disk buffer was reopened in
    /// the middle of it). Does nothing otherwise.
    pub fn resume_failover(&self) -> Result<(), SecondaryError> {
        if self.state().stage != Stage::FailingOver {
            return Ok(());
        }
        info!("resuming the failover a previous process started");
        self.failover().map(|_| ())
    }

    /// At a clean stop of the process: takes no more streams and waits, at most `limit`, for
    /// the applier to let go of the disk. Returns whether nothing writes base any more (no
    /// stream, no failover under way), so that the image's stamp may be recorded.
    pub fn quiesce(&self, limit: Duration) -> bool {
        self.stop.send_replace(true);
        let deadline = Instant::now() + limit;
        let mut st = self.state();
        while !matches!(st.peer, Peer::Idle) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .cond
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        st.stage != Stage::FailingOver
    }

    /// A clean stop after [`Secondary::quiesce`]: the layers are synced and recorded as such,
    /// so that a power loss before the next start needs no resync.
    pub fn close_layers(&self) -> io::Result<()> {
        self.disk.close()
    }

    /// `replication-failover`: stop taking the stream and make the Secondary VM's view (or,
    /// without one, the last checkpoint) the disk. After an I/O error, calling it again
    /// resumes the commit.
    pub fn failover(&self) -> Result<FailoverReport, SecondaryError> {
        self.failover_with(false)
    }

    /// The failover. Order (each step durable before the next; docs/replication-protocol.md,
    /// "Failback", says why a crash anywhere is recoverable): refuse an inconsistent disk
    /// unless `force`; stop the stream; the dirty log records every buffered range and the
    /// SVM's writes go through it; the metadata records the new lineage (bitmap: the
    /// checkpoint generation, when there is a log); the commit.
    fn failover_with(&self, force: bool) -> Result<FailoverReport, SecondaryError> {
        self.meta.failover_check(force)?;
        if let Some(why) = self.state().svm.mismatch.clone().filter(|_| !force) {
            return Err(SecondaryError::SvmMismatch(why));
        }
        if self.disk.stats().needs_resync && !force && !self.disk.is_failed_over() {
            return Err(SecondaryError::NeedsResync);
        }
        let t = Instant::now();
        {
            let mut st = self.state();
            match st.stage {
                Stage::FailedOver => return Err(SecondaryError::AlreadyFailedOver),
                Stage::Receiving | Stage::FailingOver => st.stage = Stage::FailingOver,
            }
        }
        self.stop.send_replace(true);
        // Wait for the applier to let go of the disk.
        {
            let mut st = self.state();
            while matches!(st.peer, Peer::Streaming(_)) {
                st = self.cond.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        }
        let before = self.disk.stats();
        self.metrics
            .failover_started(before.hidden_bytes + before.active_bytes);
        let resume = self.disk.failover_pending()
            || self.meta.get().role == super::metadata::DiskRole::FailedOver;
        let log = if self.failover_log_applies() {
            self.failover_log(resume)?
        } else {
            None
        };
        self.disk.prepare_failover(log.clone(), force)?;
        // The new lineage is on disk before any cluster is committed. A disk that needs a
        // resync (forced) is no checkpoint: it names no common ancestor with the primary.
        self.meta
            .failover(force, log.is_some() && !before.needs_resync)?;
        self.disk.failover()?;
        self.metrics.failover_done(t.elapsed());
        let duration_ms = t.elapsed().as_secs_f64() * 1000.0;
        self.state().stage = Stage::FailedOver;
        let epoch = self.disk.stats().epoch;
        info!("failover done in {duration_ms:.1} ms (epoch {epoch})");
        let report = FailoverReport {
            epoch,
            duration_ms,
            committed_active_bytes: before.active_bytes,
            restored_hidden_bytes: before.hidden_bytes,
        };
        self.events.send(&report);
        Ok(report)
    }

    /// `replication-failover {"force": true}`: fails over even an inconsistent disk.
    pub fn force_failover(&self) -> Result<FailoverReport, SecondaryError> {
        self.failover_with(true)
    }

    /// The secondary's counters and timestamps (for the metrics endpoint).
    pub fn metrics(&self) -> &ReplicationMetrics {
        &self.metrics
    }

    /// `query-replication` for the secondary.
    pub fn status(&self) -> SecondaryStatus {
        let st = self.state();
        let layers = self.disk.stats();
        let (state, peer_address) = match (&st.stage, &st.peer) {
            (Stage::FailingOver | Stage::FailedOver, _) => ("failed-over", None),
            (Stage::Receiving, Peer::Streaming(a)) => ("connected", Some(a.clone())),
            (Stage::Receiving, _) => ("waiting", None),
        };
        let m = self.metrics.snapshot();
        let committing = st.stage == Stage::FailingOver;
        SecondaryStatus {
            role: Side::Secondary,
            state,
            peer_address,
            listen: self.opts.listen.clone(),
            epoch: layers.epoch,
            applied_seq: st.applied_seq,
            bytes_received_since_checkpoint: st.bytes_since_checkpoint,
            bytes_received_total: st.bytes_total,
            hidden_bytes: layers.hidden_bytes,
            active_bytes: layers.active_bytes,
            cluster_size: layers.cluster_size,
            consistency: if self.meta.gens().inconsistent() {
                "inconsistent"
            } else if layers.needs_resync {
                "needs-resync"
            } else {
                "consistent"
            },
            metadata: self.meta.status(),
            last_error: st.last_error.clone(),
            unprotected_since: m.unprotected_since,
            last_checkpoint_at: m.last_checkpoint_at,
            checkpoints: m.checkpoints,
            sessions: m.sessions,
            link_errors: m.link_errors,
            failover_total_bytes: m.failover_total_bytes,
            failover_remaining_bytes: if committing {
                layers.hidden_bytes + layers.active_bytes
            } else {
                0
            },
            failover_started_at: m.failover_started_at,
            failovers: m.failovers,
            own_dirty_bytes: self.own_dirty().map(DirtyExtents::dirty_bytes),
            group: {
                let (epoch, g) = self.disk.group();
                events::GroupStatus {
                    current: g.committed.filter(|c| c.epoch == epoch).map(|c| c.group),
                    committed: g.committed,
                    prepared: g.prepared.filter(|p| p.epoch == epoch),
                }
            },
            colo: events::ColoStatus {
                stops: st.svm.stops,
                cuts: self.disk.marks().iter().map(|m| m.epoch).collect(),
                svm_mismatch: st.svm.mismatch.clone(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::link::{self, Timing};
    use crate::replication::protocol::{read_frame, Frame, Hello, Mark, Welcome, VERSION};
    use crate::storage::{BlockDevice, Change, MemDisk};
    use tokio::io::{split, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};

    const DISK: u64 = 1 << 20;

    fn timing() -> Timing {
        Timing {
            heartbeat: Duration::from_millis(50),
            // Long: a heavily loaded test machine must not time a session out.
            peer_timeout: Duration::from_secs(60),
        }
    }

    fn secondary(dir: &std::path::Path) -> (Arc<Secondary>, Arc<MemDisk>) {
        let base = Arc::new(MemDisk::new(DISK as usize));
        base.write_at(&vec![0x11; DISK as usize], 0).unwrap();
        let layered = Arc::new(LayeredDisk::new(base.clone(), dir, 4096).unwrap());
        let opts = SecondaryOptions {
            listen: "in-memory".into(),
            serves_vm: false,
            heartbeat_interval: timing().heartbeat,
            peer_timeout: timing().peer_timeout,
            block_size: 512,
            allow_full_sync: false,
            security: LinkSecurity::Insecure,
        };
        (
            Secondary::in_memory(layered, opts, EventSender::new()),
            base,
        )
    }

    fn hello() -> Hello {
        Hello {
            version: VERSION,
            disk_size: DISK,
            block_size: 512,
            epoch: 0,
            sync: false,
            dirty_log: false,
            takes_durable: true,
            gens: crate::replication::metadata::Generations::fresh_primary(),
        }
    }

    type Halves = (ReadHalf<DuplexStream>, WriteHalf<DuplexStream>);

    /// Connects a test primary to `sec` over an in-memory stream and handshakes.
    async fn connect(sec: &Arc<Secondary>, name: &str) -> Halves {
        connect_with(sec, name, hello()).await.0
    }

    /// [`connect`] with `hello`; also returns the WELCOME.
    async fn connect_with(sec: &Arc<Secondary>, name: &str, hello: Hello) -> (Halves, Welcome) {
        let (a, b) = tokio::io::duplex(1 << 20);
        tokio::spawn(sec.clone().serve(b, name.to_string()));
        let (mut rd, mut wr) = split(a);
        let welcome = link::offer(&mut rd, &mut wr, hello, timing())
            .await
            .unwrap();
        ((rd, wr), welcome)
    }

    async fn send(wr: &mut WriteHalf<DuplexStream>, frames: &[Frame]) {
        for f in frames {
            wr.write_all(&f.encode()).await.unwrap();
        }
        wr.flush().await.unwrap();
    }

    /// Reads frames until the ACK of `seq` (heartbeats and earlier ACKs are skipped).
    async fn wait_ack(rd: &mut ReadHalf<DuplexStream>, seq: u64) {
        loop {
            match read_frame(rd).await.unwrap() {
                Frame::Ack { seq: s } if s == seq => return,
                Frame::Ack { .. } | Frame::Heartbeat | Frame::Durable { .. } => {}
                f => panic!("unexpected {f:?}"),
            }
        }
    }

    /// The next frame that is not a heartbeat.
    async fn next_frame(rd: &mut ReadHalf<DuplexStream>) -> Frame {
        loop {
            match read_frame(rd).await.unwrap() {
                Frame::Heartbeat => {}
                f => return f,
            }
        }
    }

    /// A disk whose flushes wait while its gate is closed, and are counted.
    #[derive(Debug)]
    struct GatedFlush {
        disk: MemDisk,
        closed: std::sync::Mutex<bool>,
        opened: std::sync::Condvar,
        flushes: std::sync::atomic::AtomicU64,
    }

    impl GatedFlush {
        fn new() -> Arc<Self> {
            let disk = MemDisk::new(DISK as usize);
            disk.write_at(&vec![0x11; DISK as usize], 0).unwrap();
            Arc::new(GatedFlush {
                disk,
                closed: std::sync::Mutex::new(false),
                opened: std::sync::Condvar::new(),
                flushes: Default::default(),
            })
        }

        fn gate(&self, closed: bool) {
            *self.closed.lock().unwrap() = closed;
            self.opened.notify_all();
        }

        fn flushes(&self) -> u64 {
            self.flushes.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    impl BlockDevice for GatedFlush {
        fn capacity(&self) -> u64 {
            self.disk.capacity()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.disk.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.disk.write_at(buf, offset)
        }
        fn flush(&self) -> io::Result<()> {
            let mut closed = self.closed.lock().unwrap();
            while *closed {
                closed = self.opened.wait(closed).unwrap();
            }
            self.flushes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.disk.flush()
        }
        fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
            self.disk.discard(offset, len)
        }
        fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
            self.disk.write_zeroes(offset, len, unmap)
        }
    }

    /// Rule 11 (docs/flush-policy.md): a primary that takes DURABLE gets a MARKER's ACK while
    /// base's sync cannot finish (its gate closed: the ACK does not wait for it), and so does
    /// the next marker (a device stop of two queues: it does not queue behind the first's
    /// sync); the epoch is unrecorded until the sync, and DURABLE of the newest marker comes
    /// after it, with the epoch recorded first.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_marker_is_acknowledged_before_its_sync_and_durable_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let base = GatedFlush::new();
        let sec = colo_secondary_on(dir.path(), base.clone());
        let ((mut rd, mut wr), welcome) = connect_with(&sec, "p", hello()).await;
        assert!(welcome.sends_durable);
        send(&mut wr, &[Frame::write(1, 0, vec![0x22; 8192])]).await;
        wait_ack(&mut rd, 1).await;
        base.gate(true);
        for (seq, epoch) in [(2, 1), (3, 2)] {
            send(&mut wr, &[marker(seq, epoch, seq as u16)]).await;
            // A guard against a hang, not a timing: the gate stays closed until both ACKs.
            let Ok(ack) = tokio::time::timeout(Duration::from_secs(60), next_frame(&mut rd)).await
            else {
                base.gate(false); // lets the applier (and so the test's runtime) finish
                panic!("no ACK of marker {seq} while base's sync cannot finish");
            };
            assert_eq!(ack, Frame::Ack { seq });
        }
        assert_eq!(
            sec.status().metadata.checkpoint_epoch,
            0,
            "recorded before its sync"
        );
        let before = base.flushes();
        base.gate(false);
        loop {
            match next_frame(&mut rd).await {
                Frame::Durable { seq: 3, epoch: 2 } => break,
                Frame::Durable { seq: 2, epoch: 1 } => {}
                f => panic!("unexpected {f:?}"),
            }
        }
        assert!(base.flushes() > before, "DURABLE without a sync of base");
        assert_eq!(sec.status().metadata.checkpoint_epoch, 2);
        assert!(base.disk.snapshot()[..8192].iter().all(|&b| b == 0x22));
    }

    /// A primary of an older build (no DURABLE in its HELLO) reads a MARKER's ACK as
    /// "durable": base is synced and the epoch recorded before the ACK, and no DURABLE comes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_primary_without_durable_gets_the_ack_after_the_sync() {
        let dir = tempfile::tempdir().unwrap();
        let base = GatedFlush::new();
        let sec = colo_secondary_on(dir.path(), base.clone());
        let old = Hello {
            takes_durable: false,
            ..hello()
        };
        let ((mut rd, mut wr), welcome) = connect_with(&sec, "p", old).await;
        assert!(!welcome.sends_durable);
        send(&mut wr, &[Frame::write(1, 0, vec![0x22; 8192])]).await;
        wait_ack(&mut rd, 1).await;
        let before = base.flushes();
        send(&mut wr, &[marker(2, 1, 3)]).await;
        assert_eq!(next_frame(&mut rd).await, Frame::Ack { seq: 2 });
        assert!(base.flushes() > before, "ACK before base's sync");
        assert_eq!(sec.status().metadata.checkpoint_epoch, 1);
        send(&mut wr, &[Frame::write(3, 0, vec![0x33; 512])]).await;
        assert_eq!(next_frame(&mut rd).await, Frame::Ack { seq: 3 });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn applies_the_stream_acknowledges_and_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let (sec, base) = secondary(dir.path());
        let (mut rd, mut wr) = connect(&sec, "p1").await;
        send(
            &mut wr,
            &[
                Frame::write(1, 8192, vec![0x22; 4096]),
                Frame::Change {
                    seq: 2,
                    change: Change::WriteZeroes {
                        offset: 0,
                        len: 512,
                        unmap: false,
                    },
                },
                Frame::Change {
                    seq: 3,
                    change: Change::Flush,
                },
            ],
        )
        .await;
        wait_ack(&mut rd, 3).await;
        let disk = base.snapshot();
        assert!(disk[..512].iter().all(|&b| b == 0));
        assert!(disk[512..8192].iter().all(|&b| b == 0x11));
        assert!(disk[8192..12288].iter().all(|&b| b == 0x22));
        let st = sec.status();
        assert_eq!((st.state, st.applied_seq, st.epoch), ("connected", 3, 0));
        assert!(st.hidden_bytes > 0);
        send(&mut wr, &[Frame::Checkpoint { seq: 4, epoch: 1 }]).await;
        wait_ack(&mut rd, 4).await;
        let st = sec.status();
        assert_eq!((st.epoch, st.hidden_bytes), (1, 0));
    }

    /// The slot is claimed before the handshake: a second primary is refused even while the
    /// first one has not sent its HELLO yet.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_primary_is_refused_while_the_first_handshakes() {
        let dir = tempfile::tempdir().unwrap();
        let (sec, _base) = secondary(dir.path());
        let (a1, b1) = tokio::io::duplex(1 << 16);
        let mut first = Box::pin(sec.clone().serve(b1, "first".into()));
        // Poll the first connection once: it claims the slot and waits for HELLO.
        tokio::select! {
            biased;
            _ = &mut first => panic!("the first session ended early"),
            _ = std::future::ready(()) => {}
        }
        let (a2, b2) = tokio::io::duplex(1 << 16);
        sec.clone().serve(b2, "second".into()).await;
        let (mut rd2, _wr2) = split(a2);
        match read_frame(&mut rd2).await.unwrap() {
            Frame::Error { message } => {
                assert!(
                    message.contains("already replicating from first"),
                    "{message}"
                )
            }
            f => panic!("unexpected {f:?}"),
        }
        // The first one goes on normally.
        let task = tokio::spawn(first);
        let (mut rd1, mut wr1) = split(a1);
        link::offer(&mut rd1, &mut wr1, hello(), timing())
            .await
            .unwrap();
        send(&mut wr1, &[Frame::write(1, 0, vec![7; 512])]).await;
        wait_ack(&mut rd1, 1).await;
        drop((rd1, wr1));
        task.await.unwrap();
        assert_eq!(sec.status().state, "waiting");
    }

    /// Failover while a primary streams: the session ends, the disk is the last checkpoint, and
    /// a new primary is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failover_ends_the_session_and_rolls_back() {
        let dir = tempfile::tempdir().unwrap();
        let (sec, base) = secondary(dir.path());
        let (mut rd, mut wr) = connect(&sec, "p1").await;
        send(
            &mut wr,
            &[
                Frame::write(1, 0, vec![0x33; 8192]),
                Frame::Checkpoint { seq: 2, epoch: 1 },
                Frame::write(3, 4096, vec![0x44; 8192]),
            ],
        )
        .await;
        wait_ack(&mut rd, 3).await;
        let s = sec.clone();
        let report = tokio::task::spawn_blocking(move || s.failover())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(report.epoch, 1);
        let disk = base.snapshot();
        assert!(disk[..8192].iter().all(|&b| b == 0x33));
        assert!(disk[8192..].iter().all(|&b| b == 0x11));
        assert_eq!(sec.status().state, "failed-over");
        assert!(matches!(
            sec.failover(),
            Err(SecondaryError::AlreadyFailedOver)
        ));
        // The old session is gone; a new primary is told why it is refused.
        let (a, b) = tokio::io::duplex(1 << 16);
        tokio::spawn(sec.clone().serve(b, "p2".into()));
        let (mut rd2, mut wr2) = split(a);
        let e = link::offer(&mut rd2, &mut wr2, hello(), timing())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("failed over"), "{e}");
    }

    fn colo_secondary(dir: &std::path::Path) -> (Arc<Secondary>, Arc<MemDisk>) {
        let base = Arc::new(MemDisk::new(DISK as usize));
        base.write_at(&vec![0x11; DISK as usize], 0).unwrap();
        (colo_secondary_on(dir, base.clone()), base)
    }

    /// A secondary serving a Secondary VM over `base`.
    fn colo_secondary_on(dir: &std::path::Path, base: Arc<dyn BlockDevice>) -> Arc<Secondary> {
        let layered = Arc::new(LayeredDisk::new(base, dir, 4096).unwrap());
        let opts = SecondaryOptions {
            listen: "in-memory".into(),
            serves_vm: true,
            heartbeat_interval: timing().heartbeat,
            peer_timeout: timing().peer_timeout,
            block_size: 512,
            security: LinkSecurity::Insecure,
            allow_full_sync: false,
        };
        Secondary::in_memory(layered, opts, EventSender::new())
    }

    fn marker(seq: u64, epoch: u64, base: u16) -> Frame {
        Frame::Marker {
            seq,
            mark: Mark {
                epoch,
                bases: vec![Some(base), None],
            },
        }
    }

    fn view(sec: &Secondary, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        sec.disk.read_at(&mut v, offset).unwrap();
        v
    }

    /// A COLO checkpoint as QEMU runs it: the Secondary VM stops, the primary's device stops
    /// (MARKER), the Secondary VM restarts from the primary's queue positions: its disk is the
    /// primary's at the marker (its own writes gone) before its first request runs. Restarting
    /// from its own positions instead (an abandoned checkpoint) keeps the last checkpoint and its
    /// writes. A marker while it runs is a stop, not a checkpoint: only a possible cut.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn colo_cuts_follow_the_secondary_vms_restart() {
        use crate::vhost_user::DeviceObserver;
        for restart_from_marker in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let (sec, base) = colo_secondary(dir.path());
            let svm = SvmDevice(sec.clone());
            svm.log_all(true);
            svm.queue_starting(0, 0);
            sec.disk.write_at(&[0x55; 4096], 65536).unwrap();
            let (mut rd, mut wr) = connect(&sec, "p").await;
            send(&mut wr, &[Frame::write(1, 0, vec![0x22; 8192])]).await;
            wait_ack(&mut rd, 1).await;
            // The primary stops while the Secondary VM runs (a user stop): not a checkpoint.
            send(&mut wr, &[marker(2, 1, 3)]).await;
            wait_ack(&mut rd, 2).await;
            assert_eq!((sec.status().epoch, sec.status().colo.stops), (0, 1));
            // A checkpoint: the Secondary VM stops first, then the primary.
            svm.queue_stopped(0, &[Some(9), None], true, true);
            send(&mut wr, &[marker(3, 2, 4)]).await;
            wait_ack(&mut rd, 3).await;
            assert_eq!(sec.status().colo.cuts, [1, 2]);
            // The primary resumes and writes before the Secondary VM's first request.
            send(&mut wr, &[Frame::write(4, 4096, vec![0x33; 4096])]).await;
            wait_ack(&mut rd, 4).await;
            let svm_view = [view(&sec, 0, 8192), view(&sec, 65536, 4096)];
            assert!(
                svm_view[0].iter().all(|&b| b == 0x11),
                "view still the old checkpoint"
            );
            assert!(svm_view[1].iter().all(|&b| b == 0x55));
            if restart_from_marker {
                svm.queue_starting(0, 4);
                assert_eq!(sec.status().epoch, 2);
                assert!(
                    view(&sec, 0, 8192).iter().all(|&b| b == 0x22),
                    "the marker's disk"
                );
                assert!(
                    view(&sec, 65536, 4096).iter().all(|&b| b == 0x11),
                    "own writes gone"
                );
            } else {
                svm.queue_starting(0, 9);
                assert_eq!(sec.status().epoch, 0);
                assert_eq!([view(&sec, 0, 8192), view(&sec, 65536, 4096)], svm_view);
            }
            let snapshot = base.snapshot();
            assert!(snapshot[..4096].iter().all(|&b| b == 0x22));
            assert!(snapshot[4096..8192].iter().all(|&b| b == 0x33));
            // Failover keeps exactly the Secondary VM's view.
            let want = [view(&sec, 0, 8192), view(&sec, 65536, 4096)];
            let s = sec.clone();
            tokio::task::spawn_blocking(move || s.failover())
                .await
                .unwrap()
                .unwrap();
            let snapshot = base.snapshot();
            assert_eq!(snapshot[..8192], want[0][..]);
            assert_eq!(snapshot[65536..65536 + 4096], want[1][..]);
        }
    }

    /// Issue 19: a user `stop` of the primary held across QEMU's checkpoint. The marker of the
    /// stop arrives while the Secondary VM runs; it keeps writing; QEMU checkpoints with the
    /// primary stopped (no new marker) and restarts the Secondary VM from the stop's
    /// positions: that marker becomes the checkpoint (its own writes gone), and again at the
    /// next checkpoint while the primary stays stopped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_user_stop_held_across_a_checkpoint_is_cut_there() {
        use crate::vhost_user::DeviceObserver;
        let dir = tempfile::tempdir().unwrap();
        let (sec, _base) = colo_secondary(dir.path());
        let svm = SvmDevice(sec.clone());
        svm.log_all(true);
        svm.queue_starting(0, 0);
        let (mut rd, mut wr) = connect(&sec, "p").await;
        send(&mut wr, &[Frame::write(1, 0, vec![0x22; 8192])]).await;
        send(&mut wr, &[marker(2, 1, 3)]).await;
        wait_ack(&mut rd, 2).await;
        let at_stop = view(&sec, 0, 8192);
        assert!(
            at_stop.iter().all(|&b| b == 0x11),
            "still the last checkpoint"
        );
        for round in 0..2 {
            // The Secondary VM runs on and writes, over the primary's clusters too.
            sec.disk.write_at(&[0x55; 4096], 4096).unwrap();
            sec.disk.write_at(&[0x55; 4096], 65536).unwrap();
            svm.queue_stopped(0, &[Some(20 + round), None], true, true);
            svm.queue_starting(0, 3);
            let st = sec.status();
            assert_eq!((st.epoch, st.colo.svm_mismatch), (1, None), "round {round}");
            assert!(view(&sec, 0, 8192).iter().all(|&b| b == 0x22));
            assert!(view(&sec, 65536, 4096).iter().all(|&b| b == 0x11));
        }
        assert_eq!(sec.status().colo.stops, 1);
    }

    /// A restart from a position that is neither the Secondary VM's own nor a cut's (no
    /// tentative cut at all): REPLICATION_ERROR's reason in query-replication, the failover
    /// refused with it (forced: allowed); a later checkpoint that matches clears it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restart_matching_nothing_refuses_the_failover() {
        use crate::vhost_user::DeviceObserver;
        let dir = tempfile::tempdir().unwrap();
        let (sec, _base) = colo_secondary(dir.path());
        let svm = SvmDevice(sec.clone());
        svm.log_all(true);
        svm.queue_starting(0, 0);
        let (mut rd, mut wr) = connect(&sec, "p").await;
        send(&mut wr, &[Frame::write(1, 0, vec![0x22; 8192])]).await;
        wait_ack(&mut rd, 1).await;
        assert!(sec.disk.marks().is_empty());
        svm.queue_stopped(0, &[Some(28), None], true, true);
        svm.queue_starting(0, 13);
        let st = sec.status();
        let why = st.colo.svm_mismatch.expect("a mismatch");
        assert!(why.contains("at 13") && why.contains("(28)"), "{why}");
        assert!(st.last_error.is_some_and(|e| e.contains(&why)));
        match sec.failover() {
            Err(e @ SecondaryError::SvmMismatch(_)) => {
                assert!(e.to_string().contains("force"), "{e}")
            }
            r => panic!("failover not refused: {r:?}"),
        }
        // The next checkpoint matches: memory and disk agree again.
        svm.queue_stopped(0, &[Some(30), None], true, true);
        send(&mut wr, &[marker(2, 1, 17)]).await;
        wait_ack(&mut rd, 2).await;
        svm.queue_starting(0, 17);
        assert_eq!(
            (sec.status().epoch, sec.status().colo.svm_mismatch),
            (1, None)
        );
        svm.queue_stopped(0, &[Some(31), None], true, true);
        svm.queue_starting(0, 5);
        assert!(sec.status().colo.svm_mismatch.is_some());
        let s = sec.clone();
        tokio::task::spawn_blocking(move || s.force_failover())
            .await
            .unwrap()
            .unwrap();
    }

    /// QEMU ending COLO on the Secondary VM (dirty logging switched off) fails over by itself.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn leaving_colo_fails_over() {
        use crate::vhost_user::DeviceObserver;
        let dir = tempfile::tempdir().unwrap();
        let (sec, _base) = colo_secondary(dir.path());
        let svm = SvmDevice(sec.clone());
        svm.log_all(true);
        let (mut rd, mut wr) = connect(&sec, "p").await;
        send(&mut wr, &[Frame::write(1, 0, vec![0x22; 8192])]).await;
        wait_ack(&mut rd, 1).await;
        svm.log_all(false);
        // The failover ends the session: the primary sees the stream close.
        while let Ok(Frame::Heartbeat | Frame::Ack { .. }) = read_frame(&mut rd).await {}
        let s = sec.clone();
        let st = tokio::task::spawn_blocking(move || loop {
            let st = s.status();
            if st.state == "failed-over" && st.hidden_bytes == 0 {
                break st;
            }
            std::thread::yield_now();
        })
        .await
        .unwrap();
        assert_eq!(st.epoch, 0);
        assert!(
            view(&sec, 0, 8192).iter().all(|&b| b == 0x11),
            "rolled back"
        );
    }
}
