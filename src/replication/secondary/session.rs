//! One primary's session on the secondary: the handshake decision (WELCOME or a refusal),
//! then the stream loop (reader task, writer task) and the applier thread that applies the
//! stream to the disk buffer and acknowledges it.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use log::{error, info, warn};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use super::{Peer, Secondary, Stage};
use crate::replication::events::{self, Side};
use crate::replication::link::{self, Stream, Timing};
use crate::replication::metadata::{decide_with, Decision, SyncPolicy};
use crate::replication::protocol::{Frame, Hello, ProtocolError, Welcome, VERSION};
use crate::storage::{BlockDevice, Change};

impl Secondary {
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
        let (out_tx, out_rx) = mpsc::unbounded_channel::<Frame>();
        // First in the writer's queue: nothing else is queued before the applier starts.
        match self.handshake(&hello, addr) {
            Ok(first) => {
                for frame in first {
                    let _ = out_tx.send(frame);
                }
            }
            Err(message) => return Err(link::refuse(&mut wr, message).await),
        }
        self.streaming(&hello, addr);
        let acks = MarkerAcks::for_primary(&hello);
        self.stream(rd, wr, out_tx, out_rx, stop, acks).await
    }

    /// The handshake's decision on `hello` (reported in SYNC_DECISION), recorded in the
    /// metadata: the frames that open the stream (WELCOME, and a failback's PEER_DIRTY), or
    /// why the primary is refused.
    fn handshake(&self, hello: &Hello, addr: &str) -> Result<Vec<Frame>, String> {
        let mine = self.meta.gens();
        let decision = self.refusal(hello);
        let (name, reason) = match &decision {
            Ok(d) => (d.name(), d.reason().to_string()),
            Err(why) => (
                decide_with(&hello.gens, &mine, &self.policy(hello)).name(),
                why.clone(),
            ),
        };
        self.events.send(&events::SyncDecision {
            role: Side::Secondary,
            peer: addr.to_string(),
            decision: if decision.is_ok() { name } else { "refused" }.into(),
            reason: reason.clone(),
            secondary_epoch: Some(mine.epoch),
        });
        let decision = match decision {
            Ok(d) => d,
            Err(message) => {
                warn!("refusing primary {addr} ({name}): {message}");
                return Err(message);
            }
        };
        info!("primary {addr}: {name}: {reason}");
        // The source is on disk before any of its frames is (and a full sync's target is
        // marked inconsistent until its first checkpoint).
        // A failback's target holds no checkpoint either until the resync reached one.
        let full = decision.overwrites();
        let own_dirty = match &decision {
            Decision::Failback(_) => match self.own_dirty() {
                Some(x) => Some(x.clone()),
                None => return Err("failback: no dirty record".into()),
            },
            _ => None,
        };
        if let Err(e) = self.meta.secondary_accept(&hello.gens, full) {
            return Err(format!("secondary metadata: {e}"));
        }
        let mut first = vec![Frame::Welcome(Welcome {
            version: VERSION,
            disk_size: self.disk.capacity(),
            block_size: self.opts.block_size,
            gens: mine,
            decision: decision.code(),
            allow_full: self.opts.allow_full_sync,
            discard_my_data: self.discard_my_data(),
            own_dirty: self.own_dirty().is_some(),
            sends_durable: hello.takes_durable,
        })];
        if let Some(x) = own_dirty {
            info!(
                "failback: sending this disk's own dirty record ({} bytes) to {addr}",
                x.dirty_bytes()
            );
            first.push(Frame::PeerDirty(x));
        }
        Ok(first)
    }

    /// The handshake passed: the session slot streams from `addr` (logged, counted, and
    /// REPLICATION_PEER_CONNECTED).
    fn streaming(&self, hello: &Hello, addr: &str) {
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
    }

    /// The stream loop: the reader checks the sequence and hands frames to the applier thread
    /// ([`Secondary::apply_loop`]), the writer sends what the applier answers (and
    /// heartbeats). Ends with the first of them, or when failover stops the session; returns
    /// once the applier thread has stopped.
    async fn stream<S: Stream>(
        self: Arc<Self>,
        mut rd: ReadHalf<S>,
        wr: WriteHalf<S>,
        out_tx: mpsc::UnboundedSender<Frame>,
        out_rx: mpsc::UnboundedReceiver<Frame>,
        mut stop: watch::Receiver<bool>,
        acks: MarkerAcks,
    ) -> Result<(), ProtocolError> {
        let (frame_tx, frame_rx) = mpsc::channel::<Frame>(256);
        let applier = {
            let me = self.clone();
            std::thread::Builder::new()
                .name("colo-apply".into())
                .spawn(move || me.apply_loop(frame_rx, out_tx, acks))?
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
    /// together: a run of stream changes is one batch for the layers (nothing synced). A
    /// MARKER is acknowledged at once; with [`MarkerAcks::Early`] a sync thread beside the
    /// applier makes it durable after the ACK and sends DURABLE, while the applier goes on.
    fn apply_loop(
        &self,
        rx: mpsc::Receiver<Frame>,
        out: mpsc::UnboundedSender<Frame>,
        acks: MarkerAcks,
    ) {
        std::thread::scope(|scope| {
            // Rule 11: markers are synced beside the applier, so the next one (another
            // queue's, in the same pause) never waits behind a sync. Joined before this
            // returns: a failover starts only after it.
            let syncer = (acks == MarkerAcks::Early).then(|| {
                let (tx, rx) = std::sync::mpsc::channel();
                let out = out.clone();
                std::thread::Builder::new()
                    .name("colo-sync".into())
                    .spawn_scoped(scope, move || self.sync_markers(rx, out))
                    .map(|_| tx)
            });
            match syncer {
                Some(Err(e)) => {
                    let message = format!("secondary cannot start its marker sync thread: {e}");
                    error!("{message}");
                    let _ = out.send(Frame::Error { message });
                }
                Some(Ok(tx)) => self.apply_frames(rx, &out, Some(&tx)),
                None => self.apply_frames(rx, &out, None),
            }
        })
    }

    /// The applier's loop ([`Secondary::apply_loop`]); with `syncer`, markers go to it after
    /// their ACK.
    fn apply_frames(
        &self,
        mut rx: mpsc::Receiver<Frame>,
        out: &mpsc::UnboundedSender<Frame>,
        syncer: Option<&std::sync::mpsc::Sender<AppliedMarker>>,
    ) {
        // Acknowledge when caught up, and at least every ACK_EVERY_FRAMES frames or
        // ACK_EVERY_BYTES bytes: the primary's window must drain steadily, not in window-sized
        // steps (which would stall it until the whole window is applied).
        const ACK_EVERY_FRAMES: u32 = 32;
        const ACK_EVERY_BYTES: u64 = 1 << 20;
        let mut unacked = 0u32;
        let mut unacked_bytes = 0u64;
        let stop = self.stop.subscribe();
        let mut frames = Vec::with_capacity(BATCH_FRAMES);
        while receive_batch(&mut rx, &mut frames) {
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
                    let matches = match self.verify_range(offset, len, crc) {
                        Ok(m) => m,
                        Err(e) => return report(out, group, e),
                    };
                    let _ = out.send(Frame::VerifyResult {
                        seq,
                        offset,
                        len,
                        matches,
                    });
                }
                let gate = self.apply_gate.lock().unwrap_or_else(|e| e.into_inner());
                let marker = match self.apply(group) {
                    Ok(m) => m,
                    Err(e) => return report(out, group, e),
                };
                self.state().applied_seq = last;
                drop(gate);
                unacked += group.len() as u32;
                unacked_bytes += group.iter().map(Frame::data_len).sum::<u64>();
                let caught_up = rest.is_empty() && rx.is_empty();
                let due = unacked >= ACK_EVERY_FRAMES || unacked_bytes >= ACK_EVERY_BYTES;
                if let (Some(m), None) = (&marker, syncer) {
                    // A primary that does not take DURABLE: the sync precedes the ACK.
                    if let Err(e) = self.settle_marker(m) {
                        return report(out, group, e);
                    }
                }
                if caught_up || due || marker.is_some() {
                    unacked = 0;
                    unacked_bytes = 0;
                    if out.send(Frame::Ack { seq: last }).is_err() {
                        return;
                    }
                }
                if let (Some(m), Some(tx)) = (marker, syncer) {
                    // Rule 11: the primary's pause ended at the ACK; the sync follows it.
                    if tx.send(m).is_err() {
                        return; // the syncer failed and reported it
                    }
                }
            }
        }
    }

    /// Rule 11's syncer: makes each marker handed to it durable and sends DURABLE (after the
    /// marker's ACK, which the applier sent before handing it over). Markers that queued up
    /// meanwhile are covered by one sync: DURABLE goes for the newest only.
    fn sync_markers(
        &self,
        rx: std::sync::mpsc::Receiver<AppliedMarker>,
        out: mpsc::UnboundedSender<Frame>,
    ) {
        while let Ok(mut m) = rx.recv() {
            while let Ok(newer) = rx.try_recv() {
                m = newer;
            }
            if let Err(e) = self.settle_marker(&m) {
                let message = format!("secondary cannot make marker {} durable: {e}", m.seq);
                error!("{message}");
                let _ = out.send(Frame::Error { message });
                return;
            }
            let (seq, epoch) = (m.seq, m.epoch);
            if out.send(Frame::Durable { seq, epoch }).is_err() {
                return;
            }
        }
    }

    /// Makes an applied MARKER durable, unless applying it did already.
    fn settle_marker(&self, m: &AppliedMarker) -> io::Result<()> {
        if m.durable {
            return Ok(());
        }
        self.marker_durable(m.epoch)
    }

    /// Applies a run of stream changes as one batch, or one other frame; for a MARKER, says
    /// what its acknowledgement must still make durable.
    fn apply(&self, group: &[Frame]) -> io::Result<Option<AppliedMarker>> {
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
            return Ok(None);
        }
        let Some(frame) = group.first() else {
            return Ok(None);
        };
        match *frame {
            Frame::Marker { seq, ref mark } => {
                let durable = self.apply_marker(mark)?;
                Ok(Some(AppliedMarker {
                    seq,
                    epoch: mark.epoch,
                    durable,
                }))
            }
            Frame::Checkpoint { epoch, .. } => {
                self.apply_checkpoint(epoch)?;
                Ok(None)
            }
            _ => Ok(None),
        }
    }

    /// CHECKPOINT: the layers are dropped and the checkpoint recorded, durable before the ACK
    /// (the disk is this checkpoint of the source).
    fn apply_checkpoint(&self, epoch: u64) -> io::Result<()> {
        let t = Instant::now();
        self.disk.checkpoint_as(epoch)?;
        self.meta.checkpoint_done(epoch)?;
        self.state().bytes_since_checkpoint = 0;
        self.metrics.checkpoint(t.elapsed());
        info!("checkpoint {epoch}: layers dropped in {:?}", t.elapsed());
        self.events.send(&events::Checkpoint {
            role: Side::Secondary,
            epoch,
        });
        Ok(())
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
}

/// When the secondary acknowledges a MARKER (docs/flush-policy.md, rule 11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MarkerAcks {
    /// Once applied; DURABLE follows its sync (the primary said it takes DURABLE).
    Early,
    /// Once durable (a primary of an older build: its ACK meant durable).
    Durable,
}

impl MarkerAcks {
    fn for_primary(hello: &Hello) -> Self {
        if hello.takes_durable {
            MarkerAcks::Early
        } else {
            MarkerAcks::Durable
        }
    }
}

/// A MARKER the applier applied: its sequence number, the epoch it ended, and whether base
/// is already durable up to it with the epoch recorded (a checkpoint without a Secondary VM).
struct AppliedMarker {
    seq: u64,
    epoch: u64,
    durable: bool,
}

/// Most frames and data the applier takes as one batch.
const BATCH_FRAMES: usize = 64;
const BATCH_BYTES: u64 = 8 << 20;

/// Waits for the next frame and takes what else is queued, up to a batch, into `frames`;
/// `false` when the stream ended.
fn receive_batch(rx: &mut mpsc::Receiver<Frame>, frames: &mut Vec<Frame>) -> bool {
    frames.clear();
    let Some(first) = rx.blocking_recv() else {
        return false;
    };
    frames.push(first);
    let mut bytes = 0u64;
    while frames.len() < BATCH_FRAMES && bytes < BATCH_BYTES {
        match rx.try_recv() {
            Ok(f) => {
                bytes += f.data_len();
                frames.push(f)
            }
            Err(_) => break,
        }
    }
    true
}

/// Reports a frame the applier could not apply or make durable (an ERROR frame ends the
/// session).
fn report(out: &mpsc::UnboundedSender<Frame>, group: &[Frame], e: io::Error) {
    let (first, last) = (group[0].seq(), group[group.len() - 1].seq());
    let which = if first == last {
        format!("frame {first}")
    } else {
        format!("frames {first}..={last}")
    };
    let message = format!("secondary cannot apply {which}: {e}");
    error!("{message}");
    let _ = out.send(Frame::Error { message });
}
