//! The primary: applies every guest write locally and forwards a copy, in the order the writes
//! took effect, to the secondary.
//!
//! ```text
//!  queue worker threads                 tokio (link task)                 secondary
//!  ───────────────────                  ─────────────────                 ─────────
//!  write ─► [order lock] local write ─► frame queue (bounded by the
//!           mark dirty, number it        window in bytes) ─► sender ─TCP─► apply, ACK
//!           (wait only if window full)                      receiver ◄─TCP─ ACK / heartbeat
//!                                        ACK frees window, wakes waiters
//! ```
//!
//! Ordering: the local write, the dirty mark and the frame's sequence number are taken under
//! one lock, so the secondary applies writes in exactly the order they took effect here, also
//! for overlapping writes racing on different queues.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{info, warn};
use serde_json::{json, Value};
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use super::dirty::DirtyBitmap;
use super::protocol::{
    read_frame, read_frame_within, Frame, Hello, ProtocolError, HEADER_LEN, MAX_PAYLOAD, VERSION,
};
use crate::qmp::EventSender;
use crate::storage::BlockDevice;

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
}

/// State of the link to the secondary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// Trying to connect.
    Connecting,
    /// Streaming (possibly still resyncing).
    Connected,
    /// Forwarding stopped by `replication-stop`.
    Stopped,
}

impl PeerState {
    fn name(self) -> &'static str {
        match self {
            PeerState::Connecting => "connecting",
            PeerState::Connected => "connected",
            PeerState::Stopped => "stopped",
        }
    }
}

#[derive(Debug)]
struct LinkState {
    peer: PeerState,
    /// Where frames go while connected.
    tx: Option<mpsc::UnboundedSender<Frame>>,
    next_seq: u64,
    acked_seq: u64,
    in_flight: VecDeque<(u64, u64)>,
    in_flight_bytes: u64,
    sent_since_checkpoint: u64,
    total_sent: u64,
    epoch: u64,
    resync_remaining: u64,
    last_error: Option<String>,
    peer_addr: Option<String>,
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
    order: Mutex<()>,
    /// Changes queued but still being applied to the local disk: `(start, end)`.
    ranges: Mutex<Vec<(u64, u64)>>,
    ranges_idle: Condvar,
    state: Mutex<LinkState>,
    cond: Condvar,
    dirty: Mutex<DirtyBitmap>,
    events: EventSender,
    enabled: watch::Sender<bool>,
}

impl Primary {
    pub fn new(
        local: Arc<dyn BlockDevice>,
        opts: PrimaryOptions,
        events: EventSender,
    ) -> Arc<Self> {
        let dirty = DirtyBitmap::new(local.capacity(), opts.dirty_granularity);
        let (enabled, _) = watch::channel(true);
        Arc::new(Primary {
            local,
            opts,
            order: Mutex::new(()),
            ranges: Mutex::new(Vec::new()),
            ranges_idle: Condvar::new(),
            state: Mutex::new(LinkState {
                peer: PeerState::Connecting,
                tx: None,
                next_seq: 1,
                acked_seq: 0,
                in_flight: VecDeque::new(),
                in_flight_bytes: 0,
                sent_since_checkpoint: 0,
                total_sent: 0,
                epoch: 0,
                resync_remaining: 0,
                last_error: None,
                peer_addr: None,
            }),
            cond: Condvar::new(),
            dirty: Mutex::new(dirty),
            events,
            enabled,
        })
    }

    fn state(&self) -> MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn order(&self) -> MutexGuard<'_, ()> {
        self.order.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a frame for the secondary (caller holds the order lock). Waits while the window
    /// is full. Returns the frame's sequence number, or `None` when no secondary is connected.
    fn enqueue(&self, cost: u64, make: impl FnOnce(u64) -> Frame) -> Option<u64> {
        let mut st = self.state();
        loop {
            st.tx.as_ref()?;
            if st.in_flight_bytes == 0 || st.in_flight_bytes + cost <= self.opts.window_bytes {
                break;
            }
            st = self.cond.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        let seq = st.next_seq;
        let frame = make(seq);
        let sent = st
            .tx
            .as_ref()
            .map(|tx| tx.send(frame).is_ok())
            .unwrap_or(false);
        if !sent {
            // The link task is gone; it reports why itself.
            st.tx = None;
            return None;
        }
        st.next_seq += 1;
        st.in_flight.push_back((seq, cost));
        st.in_flight_bytes += cost;
        st.sent_since_checkpoint += cost;
        st.total_sent += cost;
        Some(seq)
    }

    /// Waits until the secondary acknowledged `seq` (or the link is gone).
    fn wait_acked(&self, seq: u64, timeout: Option<Duration>) -> Result<(), ReplicationError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = self.state();
        while st.acked_seq < seq {
            if st.tx.is_none() {
                return Err(ReplicationError::LinkLost);
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
        Ok(())
    }

    /// Runs a local modification and forwards it, in order.
    ///
    /// Under the order lock (briefly): mark the range dirty, wait until no earlier change to an
    /// overlapping range is still being applied locally, claim the range, and queue the frames
    /// (`enqueue_frames` returns the last sequence number). Then, outside the lock, `local`
    /// applies the change while changes to other ranges proceed in parallel. So overlapping
    /// changes take effect locally in sequence-number order, which is the order the secondary
    /// applies them in, and non-overlapping ones, whose order does not matter, do not wait for
    /// each other.
    ///
    /// The frame is queued before the local write: if that write then fails (EIO), the guest
    /// gets the error but the secondary may already hold the data. The range is marked dirty
    /// either way, so a later resync sends what the primary really has.
    fn replicate(
        &self,
        offset: u64,
        len: u64,
        enqueue_frames: impl FnOnce() -> Option<u64>,
        local: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        let last = {
            let _order = self.order();
            self.dirty
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .mark(offset, len);
            self.claim_range(offset, len);
            enqueue_frames()
        };
        let r = local();
        self.release_range(offset, len);
        r?;
        if self.opts.sync {
            if let Some(seq) = last {
                // A broken link does not fail the guest's write: it is recorded as dirty.
                let _ = self.wait_acked(seq, None);
            }
        }
        Ok(())
    }

    /// Waits until no change overlapping `[offset, offset+len)` is being applied locally, then
    /// records this one as in progress. Called with the order lock held.
    fn claim_range(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        let mut ranges = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
        while len > 0 && ranges.iter().any(|&(o, e)| o < end && offset < e) {
            ranges = self
                .ranges_idle
                .wait(ranges)
                .unwrap_or_else(|e| e.into_inner());
        }
        ranges.push((offset, end));
    }

    fn release_range(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        let mut ranges = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = ranges.iter().position(|&r| r == (offset, end)) {
            ranges.swap_remove(i);
        }
        drop(ranges);
        self.ranges_idle.notify_all();
    }

    /// Applies a change locally and queues the one frame describing it.
    fn replicate_one(
        &self,
        offset: u64,
        len: u64,
        local: impl FnOnce() -> io::Result<()>,
        make: impl FnOnce(u64) -> Frame,
    ) -> io::Result<()> {
        self.replicate(offset, len, || self.enqueue(HEADER_LEN as u64, make), local)
    }

    // ---- control operations ----

    /// `replication-prepare-checkpoint`: returns once everything forwarded so far is acked.
    pub fn prepare_checkpoint(&self, timeout: Option<Duration>) -> Result<(), ReplicationError> {
        let last = {
            let st = self.state();
            if st.tx.is_none() {
                return Err(ReplicationError::NotConnected);
            }
            st.next_seq - 1
        };
        self.wait_acked(last, timeout)
    }

    /// `replication-do-checkpoint`: starts a new epoch locally. Everything must be acked.
    pub fn do_checkpoint(&self) -> Result<u64, ReplicationError> {
        let _order = self.order();
        let mut st = self.state();
        if st.tx.is_some() && st.acked_seq + 1 < st.next_seq {
            return Err(ReplicationError::Invalid(format!(
                "{} bytes are not acknowledged yet: run replication-prepare-checkpoint first",
                st.in_flight_bytes
            )));
        }
        if st.tx.is_none() || st.resync_remaining > 0 {
            return Err(ReplicationError::Invalid(
                "the secondary is not in sync; a checkpoint now would not be consistent".into(),
            ));
        }
        st.epoch += 1;
        st.sent_since_checkpoint = 0;
        self.dirty.lock().unwrap_or_else(|e| e.into_inner()).take();
        let epoch = st.epoch;
        drop(st);
        self.events.emit(
            "REPLICATION_CHECKPOINT",
            json!({"epoch": epoch, "role": "primary"}),
        );
        Ok(epoch)
    }

    /// `replication-checkpoint`: puts an epoch marker into the stream and waits until the
    /// secondary applied everything before it and dropped its layers.
    pub fn checkpoint(&self, timeout: Option<Duration>) -> Result<u64, ReplicationError> {
        let (seq, epoch, old_dirty, old_sent) = {
            let _order = self.order();
            let (epoch, resyncing) = {
                let st = self.state();
                (st.epoch + 1, st.resync_remaining > 0)
            };
            if resyncing {
                return Err(ReplicationError::Invalid(
                    "resynchronisation in progress; checkpoint after it completes".into(),
                ));
            }
            let seq = self
                .enqueue(HEADER_LEN as u64, |seq| Frame::Checkpoint { seq, epoch })
                .ok_or(ReplicationError::NotConnected)?;
            let old_dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner()).take();
            let mut st = self.state();
            let old_sent = std::mem::take(&mut st.sent_since_checkpoint);
            (seq, epoch, old_dirty, old_sent)
        };
        match self.wait_acked(seq, timeout) {
            Ok(()) => {
                self.state().epoch = epoch;
                info!("checkpoint {epoch} done");
                self.events.emit(
                    "REPLICATION_CHECKPOINT",
                    json!({"epoch": epoch, "role": "primary"}),
                );
                Ok(epoch)
            }
            Err(e) => {
                // The epoch did not end: its changes are still unprotected.
                self.dirty
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .merge(&old_dirty);
                self.state().sent_since_checkpoint += old_sent;
                Err(e)
            }
        }
    }

    /// `replication-stop`: stop forwarding; keep serving and recording dirty blocks.
    pub fn stop(&self) {
        self.enabled.send_replace(false);
        self.state().peer = PeerState::Stopped;
    }

    /// `replication-start`: resume forwarding (after a stop), resyncing what changed. With
    /// `full`, the whole disk is sent (a brand-new secondary).
    pub fn start(&self, full: bool) {
        if full {
            self.dirty
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .mark_all();
        }
        let mut st = self.state();
        if st.peer == PeerState::Stopped {
            st.peer = PeerState::Connecting;
        }
        drop(st);
        self.enabled.send_replace(true);
    }

    /// `query-replication` for the primary.
    pub fn query(&self) -> Value {
        let st = self.state();
        let dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        json!({
            "role": "primary",
            "state": st.peer.name(),
            "peer": self.opts.peer,
            "peer-address": st.peer_addr,
            "mode": if self.opts.sync { "sync" } else { "async" },
            "epoch": st.epoch,
            "bytes-sent-since-checkpoint": st.sent_since_checkpoint,
            "bytes-sent-total": st.total_sent,
            "bytes-in-flight": st.in_flight_bytes,
            "frames-in-flight": st.in_flight.len(),
            "window-bytes": self.opts.window_bytes,
            "last-seq": st.next_seq - 1,
            "acked-seq": st.acked_seq,
            "resync-remaining-bytes": st.resync_remaining,
            "dirty-bytes": dirty.dirty_bytes(),
            "dirty-granularity": dirty.granularity(),
            "last-error": st.last_error,
        })
    }

    /// Bytes forwarded since the last checkpoint (QEMU's get_sent_data_size).
    pub fn sent_since_checkpoint(&self) -> u64 {
        self.state().sent_since_checkpoint
    }

    // ---- the link ----

    /// Connects to the secondary and streams, reconnecting until the runtime stops.
    pub async fn run_link(self: Arc<Self>) {
        let mut enabled = self.enabled.subscribe();
        let mut logged_refusal = false;
        loop {
            if !*enabled.borrow_and_update() {
                if enabled.changed().await.is_err() {
                    return;
                }
                continue;
            }
            match TcpStream::connect(&self.opts.peer).await {
                Ok(stream) => {
                    logged_refusal = false;
                    let reason = tokio::select! {
                        r = self.clone().session(stream) => match r {
                            Ok(()) => "closed by the secondary".to_string(),
                            Err(e) => e.to_string(),
                        },
                        _ = wait_disabled(&mut enabled) => "replication stopped".to_string(),
                    };
                    self.link_down(&reason);
                }
                Err(e) => {
                    if !logged_refusal {
                        info!("cannot reach secondary {}: {e} (retrying)", self.opts.peer);
                        logged_refusal = true;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.opts.reconnect_interval) => {}
                _ = wait_disabled(&mut enabled) => {}
            }
        }
    }

    fn link_down(&self, reason: &str) {
        let (was_connected, new_error) = {
            let mut st = self.state();
            let was = st.tx.take().is_some();
            st.in_flight.clear();
            st.in_flight_bytes = 0;
            st.resync_remaining = 0;
            st.peer_addr = None;
            if st.peer != PeerState::Stopped {
                st.peer = PeerState::Connecting;
            }
            let new_error = st.last_error.as_deref() != Some(reason);
            st.last_error = Some(reason.to_string());
            (was, new_error)
        };
        self.cond.notify_all();
        if !was_connected {
            // The secondary refused us (or broke the handshake): say so once per new reason,
            // not at every retry.
            if new_error && reason != "replication stopped" {
                warn!("secondary {} refused replication: {reason}", self.opts.peer);
                self.events.emit(
                    "REPLICATION_ERROR",
                    json!({"role": "primary", "error": reason}),
                );
            }
        } else {
            warn!("replication link lost: {reason}; the guest keeps running, changes are tracked");
            let dirty = self
                .dirty
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .dirty_bytes();
            self.events.emit(
                "REPLICATION_PEER_LOST",
                json!({"role": "primary", "reason": reason, "dirty-bytes": dirty}),
            );
        }
    }

    async fn session(self: Arc<Self>, stream: TcpStream) -> Result<(), ProtocolError> {
        stream.set_nodelay(true)?;
        let addr = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let (mut rd, wr) = stream.into_split();
        let mut wr = BufWriter::with_capacity(1 << 20, wr);
        let hello = Frame::Hello(Hello {
            version: VERSION,
            disk_size: self.local.capacity(),
            block_size: self.opts.block_size,
            epoch: self.state().epoch,
            sync: self.opts.sync,
        });
        wr.write_all(&hello.encode()).await?;
        wr.flush().await?;
        match tokio::time::timeout(self.opts.peer_timeout, read_frame(&mut rd)).await {
            Err(_) => return Err(ProtocolError::Refused("no answer to HELLO".into())),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(Frame::Welcome(w))) if w.version == VERSION => {}
            Ok(Ok(Frame::Welcome(w))) => {
                return Err(ProtocolError::Refused(format!(
                    "secondary speaks version {}",
                    w.version
                )))
            }
            Ok(Ok(Frame::Error { message })) => return Err(ProtocolError::Refused(message)),
            Ok(Ok(f)) => {
                return Err(ProtocolError::Unexpected {
                    got: f.kind(),
                    expected: "WELCOME",
                })
            }
        }

        // Open the stream. Whatever changed since the last checkpoint is sent again first.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let resync = {
            let _order = self.order();
            let dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let mut st = self.state();
            st.tx = Some(tx);
            st.next_seq = 1;
            st.acked_seq = 0;
            st.in_flight.clear();
            st.in_flight_bytes = 0;
            st.peer = PeerState::Connected;
            st.peer_addr = Some(addr.clone());
            st.resync_remaining = dirty.dirty_bytes();
            dirty
        };
        info!(
            "replicating to {addr} ({} bytes to resync)",
            resync.dirty_bytes()
        );
        self.events.emit(
            "REPLICATION_PEER_CONNECTED",
            json!({"role": "primary", "peer": addr, "resync-bytes": resync.dirty_bytes()}),
        );
        let resync_task = {
            let me = self.clone();
            tokio::task::spawn_blocking(move || me.resync(resync))
        };

        let hb = self.opts.heartbeat_interval;
        let writer = async move {
            let mut tick = tokio::time::interval(hb);
            let mut buf = Vec::with_capacity(1 << 20);
            loop {
                tokio::select! {
                    f = rx.recv() => {
                        let Some(f) = f else { return Ok::<(), ProtocolError>(()) };
                        buf.clear();
                        f.encode_into(&mut buf);
                        // Batch whatever else is queued into the same write.
                        while buf.len() < (1 << 20) {
                            match rx.try_recv() {
                                Ok(f) => f.encode_into(&mut buf),
                                Err(_) => break,
                            }
                        }
                        wr.write_all(&buf).await?;
                        wr.flush().await?;
                    }
                    _ = tick.tick() => {
                        wr.write_all(&Frame::Heartbeat.encode()).await?;
                        wr.flush().await?;
                    }
                }
            }
        };
        let me = self.clone();
        let timeout = self.opts.peer_timeout;
        let reader = async move {
            loop {
                let f = read_frame_within(&mut rd, timeout).await?;
                match f {
                    Frame::Ack { seq } => me.acked(seq)?,
                    Frame::Heartbeat => {}
                    Frame::Error { message } => return Err(ProtocolError::Peer(message)),
                    other => {
                        return Err(ProtocolError::Unexpected {
                            got: other.kind(),
                            expected: "ACK",
                        })
                    }
                }
            }
        };
        let r = tokio::select! {
            r = writer => r,
            r = reader => r,
        };
        resync_task.abort();
        r
    }

    fn acked(&self, seq: u64) -> Result<(), ProtocolError> {
        let mut st = self.state();
        if seq >= st.next_seq || seq < st.acked_seq {
            return Err(ProtocolError::Sequence {
                expected: st.acked_seq,
                got: seq,
            });
        }
        st.acked_seq = seq;
        while st.in_flight.front().is_some_and(|&(s, _)| s <= seq) {
            if let Some((_, cost)) = st.in_flight.pop_front() {
                st.in_flight_bytes -= cost;
            }
        }
        drop(st);
        self.cond.notify_all();
        Ok(())
    }

    /// Sends the current content of every chunk in `dirty` (blocking; runs beside the guest).
    fn resync(&self, dirty: DirtyBitmap) {
        let mut buf = vec![0u8; dirty.granularity() as usize];
        for (offset, len) in dirty.ranges() {
            let _order = self.order();
            // Changes queued before this point must be on the disk before it is read, or the
            // resync frame (queued after theirs) would carry older data.
            self.claim_range(offset, len);
            let data = &mut buf[..len as usize];
            let read = self.local.read_at(data, offset);
            self.release_range(offset, len);
            if let Err(e) = read {
                warn!("resync read at {offset} failed: {e}");
                return;
            }
            let data = Arc::new(data.to_vec());
            if self
                .enqueue(len, |seq| Frame::Write { seq, offset, data })
                .is_none()
            {
                return;
            }
            let mut st = self.state();
            st.resync_remaining = st.resync_remaining.saturating_sub(len);
        }
        self.state().resync_remaining = 0;
        info!("resync complete");
        self.events
            .emit("REPLICATION_RESYNC_DONE", json!({"role": "primary"}));
    }
}

async fn wait_disabled(rx: &mut watch::Receiver<bool>) {
    loop {
        if !*rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
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

impl ReplicatedDisk {
    /// Writes `data` locally, then hands the same buffer to the link (split into frames of at
    /// most [`MAX_PAYLOAD`] bytes only when it is larger).
    fn write_owned(&self, data: Vec<u8>, offset: u64) -> io::Result<()> {
        let p = &self.primary;
        let len = data.len() as u64;
        let data = Arc::new(data);
        let frames = || {
            if data.len() <= MAX_PAYLOAD {
                // The common case: the buffer itself becomes the frame.
                let d = data.clone();
                return p.enqueue(len + HEADER_LEN as u64, move |seq| Frame::Write {
                    seq,
                    offset,
                    data: d,
                });
            }
            let mut last = None;
            for (i, chunk) in data.chunks(MAX_PAYLOAD).enumerate() {
                let off = offset + (i * MAX_PAYLOAD) as u64;
                let cost = chunk.len() as u64 + HEADER_LEN as u64;
                last = p
                    .enqueue(cost, |seq| Frame::Write {
                        seq,
                        offset: off,
                        data: Arc::new(chunk.to_vec()),
                    })
                    .or(last);
            }
            last
        };
        p.replicate(offset, len, frames, || p.local.write_at(&data, offset))
    }
}

impl BlockDevice for ReplicatedDisk {
    fn capacity(&self) -> u64 {
        self.primary.local.capacity()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.primary.local.read_at(buf, offset)
    }

    fn read_to_guest(
        &self,
        offset: u64,
        bufs: &[crate::storage::GuestSlice<'_>],
    ) -> io::Result<()> {
        self.primary.local.read_to_guest(offset, bufs)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_owned(buf.to_vec(), offset)
    }

    fn write_from_guest(
        &self,
        offset: u64,
        bufs: &[crate::storage::GuestSlice<'_>],
    ) -> io::Result<()> {
        // The copy the link needs anyway is the only copy out of guest memory.
        self.write_owned(crate::storage::gather(bufs), offset)
    }

    fn flush(&self) -> io::Result<()> {
        let p = &self.primary;
        p.replicate_one(0, 0, || p.local.flush(), |seq| Frame::Flush { seq })
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let p = &self.primary;
        p.replicate_one(
            offset,
            len,
            || p.local.discard(offset, len),
            |seq| Frame::Discard { seq, offset, len },
        )
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let p = &self.primary;
        p.replicate_one(
            offset,
            len,
            || p.local.write_zeroes(offset, len, unmap),
            |seq| Frame::WriteZeroes {
                seq,
                offset,
                len,
                unmap,
            },
        )
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
        }
    }

    /// Racing overlapping writes from many threads: after every round, replaying the frames in
    /// sequence order gives exactly the primary's disk.
    #[test]
    fn sequence_order_reproduces_the_primary_disk() {
        let local = Arc::new(SlowDisk(MemDisk::new(64 * 1024)));
        let primary = Primary::new(local.clone(), options(), EventSender::new());
        let (tx, mut rx) = mpsc::unbounded_channel();
        primary.state().tx = Some(tx);
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
                if let Frame::Write { offset, data, .. } = f {
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
}
