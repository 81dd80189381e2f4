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
//! `failback.rs`: the failback parts (the disk's own dirty record offered to a primary, the
//! failed-over disk's dirty log, promotion to a primary in place).

mod failback;
mod restart;

pub use failback::{FailoverLogSpec, Promotion};
use restart::{Restart, Restarted};

use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use super::events::{self, FailoverReport, SecondaryStatus, Side};
use super::layers::{GroupPrepared, LayeredDisk};
use super::link::{self, Stream, Timing};
use super::metadata::{decide_with, Decision, MetaStore, SyncPolicy};
use super::metrics::ReplicationMetrics;
use super::protocol::{Frame, Hello, Mark, ProtocolError, Welcome, VERSION};
use super::tls::LinkSecurity;
use crate::qmp::EventSender;
use crate::storage::{BlockDevice, Change};

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

/// The Secondary VM's device, as QEMU drives it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Svm {
    /// Stopped by QEMU (a COLO checkpoint begins), or not started yet: `own` is where each
    /// queue stood when it stopped (empty when it never ran).
    Stopped { own: Vec<Option<u16>> },
    /// Running since its restart.
    Running,
}

#[derive(Debug)]
struct SecState {
    stage: Stage,
    peer: Peer,
    svm: Svm,
    /// The Secondary VM's device logs dirty pages (it is in COLO).
    svm_log_all: bool,
    applied_seq: u64,
    bytes_since_checkpoint: u64,
    bytes_total: u64,
    last_error: Option<String>,
    /// Markers that arrived while the Secondary VM ran (not a checkpoint's stop).
    stops: u64,
    /// Why the Secondary VM's memory and its disk do not match (`None`: they do).
    svm_mismatch: Option<String>,
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
    /// A secondary whose metadata lives in memory, as for a freshly created disk (unit tests).
    pub fn new(disk: Arc<LayeredDisk>, opts: SecondaryOptions, events: EventSender) -> Arc<Self> {
        let meta = Arc::new(MetaStore::in_memory(disk.capacity()));
        Self::new_durable(disk, None, meta, opts, events)
    }

    /// The endpoint over `disk` (the layers over `base`) with its metadata. A disk buffer
    /// reopened after a failover (or in the middle of one) takes no stream; see
    /// [`Secondary::resume_failover`].
    pub fn new_durable(
        disk: Arc<LayeredDisk>,
        base: Option<Arc<dyn BlockDevice>>,
        meta: Arc<MetaStore>,
        opts: SecondaryOptions,
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
                svm: Svm::Stopped { own: Vec::new() },
                svm_log_all: false,
                applied_seq: 0,
                bytes_since_checkpoint: 0,
                bytes_total: 0,
                last_error: None,
                stops: 0,
                svm_mismatch: None,
            }),
            cond: Condvar::new(),
            events,
            stop,
            metrics: ReplicationMetrics::new(),
            fb: failback::Failback::default(),
            apply_gate: Mutex::new(()),
        })
    }

    fn state(&self) -> MutexGuard<'_, SecState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn timing(&self) -> Timing {
        Timing {
            heartbeat: self.opts.heartbeat_interval,
            peer_timeout: self.opts.peer_timeout,
        }
    }

    /// Binds the listening socket (so that errors show at start-up).
    pub async fn bind(&self) -> io::Result<TcpListener> {
        let l = TcpListener::bind(&self.opts.listen).await.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on --listen {}: {e}", self.opts.listen),
            )
        })?;
        info!("waiting for the primary on {}", l.local_addr()?);
        Ok(l)
    }

    /// Accepts primaries until failover; each connection is served by [`Secondary::serve`].
    pub async fn run(self: Arc<Self>, listener: TcpListener) {
        let mut stop = self.stop.subscribe();
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.wait_for(|s| *s) => return,
            };
            match accepted {
                Ok((stream, addr)) => {
                    if let Err(e) = stream.set_nodelay(true) {
                        warn!("TCP_NODELAY on the link: {e}");
                    }
                    let me = self.clone();
                    tokio::spawn(async move {
                        let addr = addr.to_string();
                        // Authenticated before anything it sends is read as a frame.
                        match me.opts.security.accept(stream, me.opts.peer_timeout).await {
                            Ok(stream) => me.serve(stream, addr).await,
                            Err(e) => me.session_ended(&addr, Err(ProtocolError::Io(e))),
                        }
                    });
                }
                Err(e) => warn!("accept failed: {e}"),
            }
        }
    }

    /// Serves one connection: claims the session slot (or refuses the connection when another
    /// primary holds it), runs the session, frees the slot and reports how it ended.
    pub async fn serve<S: Stream>(self: Arc<Self>, stream: S, addr: String) {
        let claimed = {
            let mut st = self.state();
            match &st.peer {
                _ if st.stage != Stage::Receiving => {
                    Err("the secondary has failed over and no longer takes a stream".to_string())
                }
                Peer::Idle => {
                    st.peer = Peer::Handshaking(addr.clone());
                    Ok(())
                }
                Peer::Handshaking(cur) | Peer::Streaming(cur) => {
                    Err(format!("already replicating from {cur}"))
                }
            }
        };
        if let Err(msg) = claimed {
            warn!("refusing {addr}: {msg}");
            let (_, mut wr) = tokio::io::split(stream);
            link::refuse(&mut wr, msg).await;
            return;
        }
        let r = self.clone().session(stream, &addr).await;
        self.session_ended(&addr, r);
    }

    fn session_ended(&self, addr: &str, r: Result<(), ProtocolError>) {
        let reason = match &r {
            Ok(()) => "closed".to_string(),
            Err(e) => e.to_string(),
        };
        let was_streaming = {
            let mut st = self.state();
            let was = matches!(st.peer, Peer::Streaming(_));
            st.peer = Peer::Idle;
            if r.is_err() {
                st.last_error = Some(reason.clone());
            }
            was
        };
        self.cond.notify_all();
        if was_streaming {
            self.metrics.unprotected();
        }
        if r.is_err() {
            self.metrics.link_error();
        }
        if was_streaming {
            warn!("primary {addr} gone: {reason}");
            self.events.send(&events::PeerLost {
                role: Side::Secondary,
                reason,
                dirty_bytes: None,
            });
        } else if let Err(e) = r {
            error!("refused primary {addr}: {e}");
            self.events.send(&events::Error {
                role: Side::Secondary,
                error: e.to_string(),
            });
        }
    }

    /// Whether the secondary takes `hello`'s stream: the decision from both disks' generations
    /// ([`decide`]), or why not.
    fn refusal(&self, hello: &Hello) -> Result<Decision, String> {
        if let Some(why) = self.basic_refusal(hello) {
            return Err(why);
        }
        match decide_with(&hello.gens, &self.meta.gens(), &self.policy(hello)) {
            Decision::Refuse(_, why) => Err(why),
            d => Ok(d),
        }
    }

    /// What the decision depends on besides the generations.
    fn policy(&self, hello: &Hello) -> SyncPolicy {
        SyncPolicy {
            allow_full: self.opts.allow_full_sync,
            discard_my_data: self.discard_my_data(),
            primary_dirty_log: hello.dirty_log,
            secondary_dirty_log: self.own_dirty().is_some(),
        }
    }

    /// Version, geometry and stage checks.
    fn basic_refusal(&self, hello: &Hello) -> Option<String> {
        if hello.version != VERSION {
            Some(format!(
                "protocol version {} is not supported (this secondary speaks {VERSION})",
                hello.version
            ))
        } else if hello.disk_size != self.disk.capacity() {
            Some(format!(
                "disk size mismatch: primary has {} bytes, secondary has {}",
                hello.disk_size,
                self.disk.capacity()
            ))
        } else if hello.block_size != self.opts.block_size {
            Some(format!(
                "block size mismatch: primary uses {}, secondary uses {}",
                hello.block_size, self.opts.block_size
            ))
        } else if self.state().stage != Stage::Receiving {
            Some("the secondary has failed over and no longer takes a stream".into())
        } else {
            None
        }
    }

    /// One session, the slot claimed: handshake, then apply the stream until it ends, the peer
    /// fails, or failover stops it. Returns only once the applier thread has stopped.
    async fn session<S: Stream>(
        self: Arc<Self>,
        stream: S,
        addr: &str,
    ) -> Result<(), ProtocolError> {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let mut stop = self.stop.subscribe();
        let hello = tokio::select! {
            h = link::accept(&mut rd, self.timing()) => h?,
            _ = stop.wait_for(|s| *s) => return Ok(()),
        };
        let mine = self.meta.gens();
        let decision = self.refusal(&hello);
        let (name, reason) = match &decision {
            Ok(d) => (d.name(), d.reason().to_string()),
            Err(why) => (
                decide_with(&hello.gens, &mine, &self.policy(&hello)).name(),
                why.clone(),
            ),
        };
        self.events.send(&events::SyncDecision {
            role: Side::Secondary,
            peer: addr.to_string(),
            decision: if decision.is_ok() { name } else { "refused" }.into(),
            reason: reason.clone(),
        });
        let decision = match decision {
            Ok(d) => d,
            Err(message) => {
                warn!("refusing primary {addr} ({name}): {message}");
                return Err(link::refuse(&mut wr, message).await);
            }
        };
        info!("primary {addr}: {name}: {reason}");
        // The source is on disk before any of its frames is (and a full sync's target is
        // marked inconsistent until its first checkpoint).
        // A failback's target holds no checkpoint either until the resync reached one.
        let full = decision.overwrites();
        let own_dirty = match &decision {
            Decision::Failback(_) => match self.own_dirty() {
                Some(x) => Some(x),
                None => return Err(link::refuse(&mut wr, "failback: no dirty record".into()).await),
            },
            _ => None,
        };
        if let Err(e) = self.meta.secondary_accept(&hello.gens, full) {
            return Err(link::refuse(&mut wr, format!("secondary metadata: {e}")).await);
        }
        let (out_tx, out_rx) = mpsc::unbounded_channel::<Frame>();
        let welcome = Frame::Welcome(Welcome {
            version: VERSION,
            disk_size: self.disk.capacity(),
            block_size: self.opts.block_size,
            gens: mine,
            decision: decision.code(),
            allow_full: self.opts.allow_full_sync,
            discard_my_data: self.discard_my_data(),
            own_dirty: self.own_dirty().is_some(),
        });
        // First in the writer's queue: nothing else is queued before the applier starts.
        let _ = out_tx.send(welcome);
        if let Some(x) = own_dirty {
            info!(
                "failback: sending this disk's own dirty record ({} bytes) to {addr}",
                x.dirty_bytes()
            );
            let _ = out_tx.send(Frame::PeerDirty(x));
        }
        {
            let mut st = self.state();
            st.peer = Peer::Streaming(addr.to_string());
            st.applied_seq = 0;
        }
        info!(
            "primary {addr} connected (epoch {}, {})",
            hello.epoch,
            if hello.sync { "sync" } else { "async" }
        );
        self.metrics.connected(0);
        self.metrics.in_sync();
        self.events.send(&events::PeerConnected {
            role: Side::Secondary,
            peer: addr.to_string(),
            resync_bytes: None,
        });

        let (frame_tx, frame_rx) = mpsc::channel::<Frame>(256);
        let applier = {
            let me = self.clone();
            std::thread::Builder::new()
                .name("colo-apply".into())
                .spawn(move || me.apply_loop(frame_rx, out_tx))?
        };

        let writer = link::write_loop(wr, out_rx, self.timing());
        let timeout = self.opts.peer_timeout;
        let reader = async move {
            let mut expected = 1u64;
            loop {
                let f = link::read_within(&mut rd, timeout).await?;
                match f {
                    Frame::Heartbeat => continue,
                    Frame::Error { message } => return Err(ProtocolError::Peer(message)),
                    Frame::Change { .. }
                    | Frame::Checkpoint { .. }
                    | Frame::Marker { .. }
                    | Frame::Verify { .. } => {
                        if f.seq() != expected {
                            return Err(ProtocolError::Sequence {
                                expected,
                                got: f.seq(),
                            });
                        }
                        expected += 1;
                        if frame_tx.send(f).await.is_err() {
                            // The applier stopped on an error; the writer reports it.
                            std::future::pending::<()>().await;
                        }
                    }
                    other => {
                        return Err(ProtocolError::Unexpected {
                            got: other.kind(),
                            expected: "a stream frame",
                        })
                    }
                }
            }
        };
        let r = tokio::select! {
            r = writer => r,
            r = reader => r,
            _ = stop.wait_for(|s| *s) => Ok(()),
        };
        // Dropping the reader closed the frame channel: the applier stops.
        let _ = tokio::task::spawn_blocking(move || applier.join()).await;
        r
    }

    /// Applies frames in order and acknowledges them; stops at the first error (reported to
    /// the primary in an ERROR frame) or when failover begins. What is queued is applied
    /// together: a run of stream changes is one batch for the layers (one sync of the rollback
    /// data per batch).
    fn apply_loop(&self, mut rx: mpsc::Receiver<Frame>, out: mpsc::UnboundedSender<Frame>) {
        // Acknowledge when caught up, and at least every ACK_EVERY_FRAMES frames or
        // ACK_EVERY_BYTES bytes: the primary's window must drain steadily, not in window-sized
        // steps (which would stall it until the whole window is applied).
        const ACK_EVERY_FRAMES: u32 = 32;
        const ACK_EVERY_BYTES: u64 = 1 << 20;
        const BATCH_FRAMES: usize = 64;
        const BATCH_BYTES: u64 = 8 << 20;
        let mut unacked = 0u32;
        let mut unacked_bytes = 0u64;
        let stop = self.stop.subscribe();
        let mut frames = Vec::with_capacity(BATCH_FRAMES);
        while let Some(first) = rx.blocking_recv() {
            frames.clear();
            frames.push(first);
            let mut bytes = 0u64;
            while frames.len() < BATCH_FRAMES && bytes < BATCH_BYTES {
                match rx.try_recv() {
                    Ok(f) => {
                        if let Frame::Change { change, .. } = &f {
                            bytes += change.data_len();
                        }
                        frames.push(f)
                    }
                    Err(_) => break,
                }
            }
            let mut rest = &frames[..];
            while !rest.is_empty() {
                if *stop.borrow() {
                    return; // failover: what is left belongs to the abandoned epoch
                }
                let run = rest
                    .iter()
                    .take_while(|f| matches!(f, Frame::Change { .. }))
                    .count()
                    .max(1);
                let (group, tail) = rest.split_at(run);
                rest = tail;
                let last = group[group.len() - 1].seq();
                if let [Frame::Verify {
                    seq,
                    offset,
                    len,
                    crc,
                }] = *group
                {
                    // Compared at this point of the stream; the answer precedes the ACK.
                    match self.verify_range(offset, len, crc) {
                        Ok(matches) => {
                            let _ = out.send(Frame::VerifyResult {
                                seq,
                                offset,
                                len,
                                matches,
                            });
                        }
                        Err(e) => {
                            let message = format!("secondary cannot verify frame {seq}: {e}");
                            error!("{message}");
                            let _ = out.send(Frame::Error { message });
                            return;
                        }
                    }
                }
                let gate = self.apply_gate.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(e) = self.apply(group) {
                    let first = group[0].seq();
                    let which = if first == last {
                        format!("frame {first}")
                    } else {
                        format!("frames {first}..={last}")
                    };
                    let message = format!("secondary cannot apply {which}: {e}");
                    error!("{message}");
                    let _ = out.send(Frame::Error { message });
                    return;
                }
                self.state().applied_seq = last;
                drop(gate);
                unacked += group.len() as u32;
                unacked_bytes += group
                    .iter()
                    .map(|f| match f {
                        Frame::Change { change, .. } => change.data_len(),
                        _ => 0,
                    })
                    .sum::<u64>();
                let caught_up = rest.is_empty() && rx.is_empty();
                if caught_up || unacked >= ACK_EVERY_FRAMES || unacked_bytes >= ACK_EVERY_BYTES {
                    unacked = 0;
                    unacked_bytes = 0;
                    if out.send(Frame::Ack { seq: last }).is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Applies a run of stream changes as one batch, or one other frame.
    fn apply(&self, group: &[Frame]) -> io::Result<()> {
        if let [Frame::Change { .. }, ..] = group {
            let changes: Vec<Change<&[u8]>> = group
                .iter()
                .filter_map(|f| match f {
                    Frame::Change { change, .. } => Some(change.as_slice()),
                    _ => None,
                })
                .collect();
            let r = self.disk.apply_primary_batch(&changes);
            let applied = match &r {
                Ok(()) => changes.len(),
                Err(e) => e.applied,
            };
            let bytes: u64 = changes[..applied].iter().map(Change::data_len).sum();
            let mut st = self.state();
            st.bytes_since_checkpoint += bytes;
            st.bytes_total += bytes;
            if let Err(e) = r {
                // What was applied is reported as applied (the frames before the bad one).
                if let Some(f) = applied.checked_sub(1).and_then(|i| group.get(i)) {
                    st.applied_seq = f.seq();
                }
                return Err(e.error);
            }
            return Ok(());
        }
        let Some(frame) = group.first() else {
            return Ok(());
        };
        match frame {
            Frame::Marker { mark, .. } => {
                // Durable before the ACK: the disk holds the source's data at this marker.
                self.meta.stream_epoch(mark.epoch)?;
                self.apply_marker(mark)?
            }
            &Frame::Checkpoint { epoch, .. } => {
                let t = Instant::now();
                self.disk.checkpoint_as(epoch)?;
                // Durable before the ACK: the disk is this checkpoint of the source.
                self.meta.checkpoint_done(epoch)?;
                self.state().bytes_since_checkpoint = 0;
                self.metrics.checkpoint(t.elapsed());
                info!("checkpoint {epoch}: layers dropped in {:?}", t.elapsed());
                self.events.send(&events::Checkpoint {
                    role: Side::Secondary,
                    epoch,
                });
            }
            _ => {}
        }
        Ok(())
    }

    /// A COLO marker (docs/colo-with-qemu.md): with a Secondary VM, a tentative cut its next
    /// restart decides, whether it is stopped (a checkpoint's stop) or runs (another stop of
    /// the primary, e.g. a user `stop`: if the primary stays stopped, QEMU's next checkpoint
    /// gives the Secondary VM the state of this point); without one, a checkpoint of the disk.
    fn apply_marker(&self, mark: &Mark) -> io::Result<()> {
        if !self.opts.serves_vm {
            let t = Instant::now();
            self.disk.checkpoint_as(mark.epoch)?;
            self.meta.checkpoint_done(mark.epoch)?;
            self.state().bytes_since_checkpoint = 0;
            self.metrics.checkpoint(t.elapsed());
            info!("marker {}: checkpoint (no Secondary VM)", mark.epoch);
            self.events.send(&events::Checkpoint {
                role: Side::Secondary,
                epoch: mark.epoch,
            });
            return Ok(());
        }
        self.disk.mark(mark.clone())?;
        let mut st = self.state();
        match st.svm {
            Svm::Stopped { .. } => info!(
                "marker {}: tentative cut (the Secondary VM is stopped)",
                mark.epoch
            ),
            Svm::Running => {
                st.stops += 1;
                info!(
                    "marker {}: the primary stopped while the Secondary VM runs (not a \
                     checkpoint's stop): kept as a tentative cut for QEMU's next checkpoint",
                    mark.epoch
                );
            }
        }
        Ok(())
    }

    /// The Secondary VM's queue `queue` runs again, from `next_avail`; on the first queue of a
    /// restart in COLO, decides what the restart is ([`Restarted::decide`]): QEMU gave it the
    /// primary's state of a tentative cut → the cut becomes the checkpoint before any request
    /// runs; it resumed its own state or reset its device → nothing changes; neither → refused
    /// loudly: the disk stays at the last checkpoint and a failover is refused until a later
    /// checkpoint matches again.
    fn svm_starting(&self, queue: u16, next_avail: u16) {
        let (own, link_alive, in_colo) = {
            let mut st = self.state();
            let Svm::Stopped { own } = std::mem::replace(&mut st.svm, Svm::Running) else {
                return;
            };
            let link_alive = matches!(st.peer, Peer::Streaming(_));
            (own, link_alive, st.svm_log_all)
        };
        if self.is_failed_over() || !in_colo {
            return;
        }
        let marks = self.disk.marks();
        let restarted = Restarted {
            queue,
            at: next_avail,
            own: own.get(usize::from(queue)).copied().flatten(),
            marks: &marks,
            link_alive,
        };
        let epoch = self.disk.stats().epoch;
        match restarted.decide() {
            Restart::Cut(cut) => self.take_cut(cut),
            Restart::Own => info!(
                "the Secondary VM resumed its own state (queue {queue} at {next_avail}); the \
                 disk stays at checkpoint {epoch}"
            ),
            Restart::Reset => info!(
                "the Secondary VM's guest reset its device (queue {queue} at 0); the disk \
                 stays at checkpoint {epoch}"
            ),
            Restart::First => info!(
                "the Secondary VM's device starts (queue {queue} at {next_avail}); the disk is \
                 checkpoint {epoch}"
            ),
            Restart::Unmatched => self.svm_mismatch(format!(
                "QEMU restarted the Secondary VM's queue {queue} at {next_avail}, which is \
                 neither its own position ({}) nor that of a stop of the primary this \
                 secondary can cut its disk at (cuts: {}); its disk stays at checkpoint \
                 {epoch}",
                restarted.own.map_or("unknown".into(), |o| o.to_string()),
                describe_cuts(&marks, queue),
            )),
        }
    }

    /// The Secondary VM runs the primary's state of the tentative cut `cut`: it becomes the
    /// checkpoint, and the Secondary VM's memory and disk match again.
    fn take_cut(&self, cut: u64) {
        let t = Instant::now();
        let r = self
            .disk
            .commit_mark(cut)
            .and_then(|()| self.meta.checkpoint_done(cut).map(drop));
        if let Err(e) = r {
            return self.svm_mismatch(format!(
                "cannot make tentative cut {cut} the checkpoint: {e}"
            ));
        }
        {
            let mut st = self.state();
            st.bytes_since_checkpoint = 0;
            st.svm_mismatch = None;
        }
        self.metrics.checkpoint(t.elapsed());
        info!("checkpoint {cut}: the Secondary VM runs the primary's state");
        self.events.send(&events::Checkpoint {
            role: Side::Secondary,
            epoch: cut,
        });
    }

    /// The Secondary VM's memory and disk do not match: REPLICATION_ERROR, and failovers are
    /// refused (unless forced) until a checkpoint matches again.
    fn svm_mismatch(&self, why: String) {
        self.state().svm_mismatch = Some(why.clone());
        self.report_svm_error(format!(
            "{why}: the Secondary VM's memory does not match its disk; a failover to it is \
             refused unless forced, until a later checkpoint matches"
        ));
    }

    fn report_svm_error(&self, error: String) {
        error!("{error}");
        self.state().last_error = Some(error.clone());
        self.events.send(&events::Error {
            role: Side::Secondary,
            error,
        });
    }

    fn is_failed_over(&self) -> bool {
        self.state().stage != Stage::Receiving
    }

    /// The Secondary VM's device switched dirty logging: off after on means QEMU ended COLO on
    /// the Secondary VM (failover), so the disk becomes its own.
    fn svm_log_all(self: &Arc<Self>, on: bool) {
        let was = std::mem::replace(&mut self.state().svm_log_all, on);
        if was && !on && !self.is_failed_over() {
            info!("the Secondary VM left COLO: failing over");
            let me = self.clone();
            let spawned = std::thread::Builder::new()
                .name("colo-failover".into())
                .spawn(move || {
                    if let Err(e) = me.failover() {
                        me.report_svm_error(format!(
                            "the Secondary VM left COLO, but its disk was not failed over: {e}"
                        ));
                    }
                });
            if let Err(e) = spawned {
                error!("cannot start the failover: {e}");
            }
        }
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
        if let Some(why) = self.state().svm_mismatch.clone().filter(|_| !force) {
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

    /// Whether `[offset, offset+len)` of the secondary disk has crc32c `crc`.
    fn verify_range(&self, offset: u64, len: u64, crc: u32) -> io::Result<bool> {
        let mut buf = vec![0u8; len as usize];
        match &self.base {
            Some(base) => base.read_at(&mut buf, offset)?,
            None => self.disk.read_at(&mut buf, offset)?,
        }
        Ok(crc32c::crc32c(&buf) == crc)
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
            own_dirty_bytes: self.own_dirty().map(|x| x.dirty_bytes()),
            group: {
                let (epoch, g) = self.disk.group();
                events::GroupStatus {
                    current: g.committed.filter(|c| c.epoch == epoch).map(|c| c.group),
                    committed: g.committed,
                    prepared: g.prepared.filter(|p| p.epoch == epoch),
                }
            },
            colo: events::ColoStatus {
                stops: st.stops,
                cuts: self.disk.marks().iter().map(|m| m.epoch).collect(),
                svm_mismatch: st.svm_mismatch.clone(),
            },
        }
    }
}

/// The cuts' epochs and positions of `queue`, for a message.
fn describe_cuts(marks: &[Mark], queue: u16) -> String {
    if marks.is_empty() {
        return "none".into();
    }
    let pos = |m: &Mark| match m.bases.get(usize::from(queue)).copied().flatten() {
        Some(b) => b.to_string(),
        None => "any".into(),
    };
    marks
        .iter()
        .map(|m| format!("{} at {}", m.epoch, pos(m)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The Secondary VM's device tells the secondary when QEMU stops and restarts it.
pub struct SvmDevice(pub Arc<Secondary>);

impl crate::vhost_user::DeviceObserver for SvmDevice {
    fn log_all(&self, on: bool) {
        self.0.svm_log_all(on);
    }

    fn queue_stopped(&self, queue: u16, bases: &[Option<u16>], log_all: bool) {
        if let Some(p) = self.0.promoted() {
            // Promoted: this VM is the primary's now (a COLO checkpoint of the new pair).
            let device = super::primary::PrimaryDevice(p);
            crate::vhost_user::DeviceObserver::queue_stopped(&device, queue, bases, log_all);
            return;
        }
        self.0.state().svm = Svm::Stopped {
            own: bases.to_vec(),
        };
    }

    fn queue_starting(&self, queue: u16, next_avail: u16) {
        self.0.svm_starting(queue, next_avail);
    }

    fn queue_previous(&self, queue: u16, at: u16) {
        // A restarted secondary (an upgrade, a crash): where its previous process left the
        // Secondary VM's queue is its own position, as if this process had stopped it there.
        if let Svm::Stopped { own } = &mut self.0.state().svm {
            let q = usize::from(queue);
            if own.len() <= q {
                own.resize(q + 1, None);
            }
            if own[q].is_none() {
                own[q] = Some(at);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::protocol::read_frame;
    use crate::storage::{Change, MemDisk};
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
        (Secondary::new(layered, opts, EventSender::new()), base)
    }

    fn hello() -> Hello {
        Hello {
            version: VERSION,
            disk_size: DISK,
            block_size: 512,
            epoch: 0,
            sync: false,
            dirty_log: false,
            gens: crate::replication::metadata::Generations::fresh_primary(),
        }
    }

    type Halves = (ReadHalf<DuplexStream>, WriteHalf<DuplexStream>);

    /// Connects a test primary to `sec` over an in-memory stream and handshakes.
    async fn connect(sec: &Arc<Secondary>, name: &str) -> Halves {
        let (a, b) = tokio::io::duplex(1 << 20);
        tokio::spawn(sec.clone().serve(b, name.to_string()));
        let (mut rd, mut wr) = split(a);
        link::offer(&mut rd, &mut wr, hello(), timing())
            .await
            .unwrap();
        (rd, wr)
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
                Frame::Ack { .. } | Frame::Heartbeat => {}
                f => panic!("unexpected {f:?}"),
            }
        }
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
        let layered = Arc::new(LayeredDisk::new(base.clone(), dir, 4096).unwrap());
        let opts = SecondaryOptions {
            listen: "in-memory".into(),
            serves_vm: true,
            heartbeat_interval: timing().heartbeat,
            peer_timeout: timing().peer_timeout,
            block_size: 512,
            security: LinkSecurity::Insecure,
            allow_full_sync: false,
        };
        (Secondary::new(layered, opts, EventSender::new()), base)
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
            svm.queue_stopped(0, &[Some(9), None], true);
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
            svm.queue_stopped(0, &[Some(20 + round), None], true);
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
        svm.queue_stopped(0, &[Some(28), None], true);
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
        svm.queue_stopped(0, &[Some(30), None], true);
        send(&mut wr, &[marker(2, 1, 17)]).await;
        wait_ack(&mut rd, 2).await;
        svm.queue_starting(0, 17);
        assert_eq!(
            (sec.status().epoch, sec.status().colo.svm_mismatch),
            (1, None)
        );
        svm.queue_stopped(0, &[Some(31), None], true);
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
