//! The primary's link task: connects to the secondary, handshakes, streams the queued frames,
//! resends what the dirty record holds (after a failback handshake, joined by the secondary's
//! own record, PEER_DIRTY), and takes acknowledgements; reconnects after a break.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use log::{info, warn};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use super::{events, Link, Primary, Session, Side};
use crate::replication::dirty::DirtyBitmap;
use crate::replication::link::{self, Stream, Timing};
use crate::replication::metadata::{decide_with, Decision, SyncPolicy};
use crate::replication::protocol::{Frame, Hello, ProtocolError, Welcome, VERSION};
use crate::storage::Change;

impl Primary {
    fn timing(&self) -> Timing {
        Timing {
            heartbeat: self.opts.heartbeat_interval,
            peer_timeout: self.opts.peer_timeout,
        }
    }

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
                    let addr = stream
                        .peer_addr()
                        .map(|a| a.to_string())
                        .unwrap_or_default();
                    if let Err(e) = stream.set_nodelay(true) {
                        warn!("TCP_NODELAY on the link: {e}");
                    }
                    let me = self.clone();
                    let connected = async move {
                        let stream = me
                            .opts
                            .security
                            .connect(stream, me.opts.peer_timeout)
                            .await
                            .map_err(ProtocolError::Io)?;
                        me.session(stream, addr).await
                    };
                    let reason = tokio::select! {
                        r = connected => match r {
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

    /// A session ended (or never got past its handshake): back to connecting (unless stopped),
    /// and say why.
    pub(super) fn link_down(&self, reason: &str) {
        let (ended, new_error) = {
            let mut st = self.state();
            let ended = match std::mem::replace(&mut st.link, Link::Connecting) {
                Link::Stopped => {
                    st.link = Link::Stopped;
                    None
                }
                Link::Connecting => None,
                Link::Connected(s) => Some(s),
            };
            let new_error = st.last_error.as_deref() != Some(reason);
            st.last_error = Some(reason.to_string());
            (ended, new_error)
        };
        self.cond.notify_all();
        if reason != "replication stopped" {
            self.metrics.link_error();
        }
        match ended {
            Some(s) => self.session_lost(&s, reason),
            // The secondary refused us (or broke the handshake): say so once per new reason,
            // not at every retry. (After replication-stop, stop() has reported it.)
            None if new_error && reason != "replication stopped" => {
                warn!("secondary {} refused replication: {reason}", self.opts.peer);
                self.events.send(&events::Error {
                    role: Side::Primary,
                    error: reason.to_string(),
                });
            }
            None => {}
        }
    }

    /// One session over `stream`: handshake, then stream until an error or the peer closes.
    pub(super) async fn session<S: Stream>(
        self: Arc<Self>,
        stream: S,
        addr: String,
    ) -> Result<(), ProtocolError> {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let (decision, welcome) = self.handshake(&mut rd, &mut wr, &addr).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (session, resync) = self.open_session(&decision, &welcome, tx, &addr)?;
        self.stream(rd, wr, rx, session, resync).await
    }

    /// The handshake: HELLO, the secondary's decision in WELCOME checked against this
    /// primary's (both apply the same table), SYNC_DECISION; after a failback decision, the
    /// secondary's own dirty record (PEER_DIRTY) joins this primary's. Returns the decision
    /// and the secondary's WELCOME.
    async fn handshake<S: Stream>(
        &self,
        rd: &mut ReadHalf<S>,
        wr: &mut WriteHalf<S>,
        addr: &str,
    ) -> Result<(Decision, Welcome), ProtocolError> {
        let gens = self.meta.gens();
        let hello = Hello {
            version: VERSION,
            disk_size: self.local.capacity(),
            block_size: self.opts.block_size,
            epoch: self.state().epoch,
            sync: self.opts.sync,
            dirty_log: self.has_dirty_log(),
            takes_durable: true,
            gens,
        };
        let welcome = match link::offer(rd, wr, hello, self.timing()).await {
            Ok(w) => w,
            Err(ProtocolError::Refused(why)) => {
                self.events.send(&events::SyncDecision {
                    role: Side::Primary,
                    peer: addr.to_string(),
                    decision: "refused".into(),
                    reason: why.clone(),
                    secondary_epoch: None,
                });
                return Err(ProtocolError::Refused(why));
            }
            Err(e) => return Err(e),
        };
        // The secondary decided from both sides' generations; the same table here must agree.
        let policy = SyncPolicy {
            allow_full: welcome.allow_full,
            discard_my_data: welcome.discard_my_data,
            primary_dirty_log: self.has_dirty_log(),
            secondary_dirty_log: welcome.own_dirty,
        };
        let decision = decide_with(&gens, &welcome.gens, &policy);
        if decision.code() != welcome.decision || decision.code() == 0 {
            let why = format!(
                "the secondary decided {} but this primary's generations say {} ({})",
                welcome.decision,
                decision.name(),
                decision.reason()
            );
            return Err(link::refuse(wr, why).await);
        }
        info!(
            "secondary {addr}: {} ({}); its disk {:032x} at checkpoint {}",
            decision.name(),
            decision.reason(),
            welcome.gens.disk_id,
            welcome.gens.epoch
        );
        self.state().sync_decision = Some(format!("{}: {}", decision.name(), decision.reason()));
        self.events.send(&events::SyncDecision {
            role: Side::Primary,
            peer: addr.to_string(),
            decision: decision.name().into(),
            reason: decision.reason().into(),
            secondary_epoch: Some(welcome.gens.epoch),
        });
        if matches!(decision, Decision::Failback(_)) {
            self.take_peer_dirty(rd, wr, addr).await?;
        }
        Ok((decision, welcome))
    }

    /// Failback: the secondary's own dirty record comes right after WELCOME; it joins this
    /// primary's before the resync takes its snapshot.
    async fn take_peer_dirty<S: Stream>(
        &self,
        rd: &mut ReadHalf<S>,
        wr: &mut WriteHalf<S>,
        addr: &str,
    ) -> Result<(), ProtocolError> {
        let x = loop {
            match link::read_within(rd, self.opts.peer_timeout).await? {
                Frame::Heartbeat => continue,
                Frame::PeerDirty(x) => break x,
                Frame::Error { message } => return Err(ProtocolError::Peer(message)),
                other => {
                    return Err(ProtocolError::Unexpected {
                        got: other.kind(),
                        expected: "PEER_DIRTY",
                    })
                }
            }
        };
        match self.merge_peer_dirty(&x) {
            Ok(bytes) => info!(
                "secondary {addr}: its own dirty record ({bytes} bytes in {}-byte extents) \
                 joins the resync",
                x.extent()
            ),
            Err(e) => {
                return Err(link::refuse(wr, format!("failback: {e}")).await);
            }
        }
        Ok(())
    }

    /// Opens the stream: the session is installed (frames go to `tx` from now on) with what
    /// changed since the last checkpoint (everything, for a full sync) as the record to send
    /// again first. Returns the session's id and that record.
    fn open_session(
        &self,
        decision: &Decision,
        welcome: &Welcome,
        tx: mpsc::UnboundedSender<Frame>,
        addr: &str,
    ) -> Result<(u64, DirtyBitmap), ProtocolError> {
        let (session, resync) = {
            let _order = self.order();
            if matches!(decision, Decision::Full(_)) {
                self.dirty().mark_all();
            }
            let dirty = self.dirty().clone();
            let mut st = self.state();
            if matches!(st.link, Link::Stopped) {
                return Err(ProtocolError::Refused("replication stopped".into()));
            }
            // The secondary may have completed a checkpoint this primary did not record.
            st.epoch = st.epoch.max(welcome.gens.epoch);
            st.sessions += 1;
            let id = st.sessions;
            let mut session = Session::new(id, tx, addr.to_string(), dirty.dirty_bytes());
            session.sends_durable = welcome.sends_durable;
            st.link = Link::Connected(session);
            (id, dirty)
        };
        self.metrics.connected(resync.dirty_bytes());
        info!(
            "replicating to {addr} ({} bytes to resync)",
            resync.dirty_bytes()
        );
        self.events.send(&events::PeerConnected {
            role: Side::Primary,
            peer: addr.to_string(),
            resync_bytes: Some(resync.dirty_bytes()),
        });
        Ok((session, resync))
    }

    /// The stream loop of session `session`: the resync of `resync` beside the guest's
    /// writes, the writer (queued frames, heartbeats) and the reader (ACK, VERIFY_RESULT),
    /// until the first of them ends.
    async fn stream<S: Stream>(
        self: Arc<Self>,
        mut rd: ReadHalf<S>,
        wr: WriteHalf<S>,
        rx: mpsc::UnboundedReceiver<Frame>,
        session: u64,
        resync: DirtyBitmap,
    ) -> Result<(), ProtocolError> {
        // A blocking task cannot be aborted: the resync looks at `ended` before each range,
        // and this session sets it when it ends, however it ends (also when `run_link` drops
        // it at replication-stop). A range being read or queued at that moment is finished:
        // its frame goes to this session's queue, which nothing sends any more, or nowhere
        // once the session is gone (`enqueue` then finds none). The range stays dirty in the
        // primary's record either way, so the next session sends it again.
        let ended = EndedOnDrop::default();
        {
            let me = self.clone();
            let ended = ended.flag();
            tokio::task::spawn_blocking(move || me.resync(session, resync, &ended));
        }

        let writer = link::write_loop(wr, rx, self.timing());
        let me = self.clone();
        let timeout = self.opts.peer_timeout;
        let reader = async move {
            loop {
                match link::read_within(&mut rd, timeout).await? {
                    Frame::Ack { seq } => me.acked(session, seq)?,
                    Frame::Durable { seq, epoch } => me.durable(session, seq, epoch)?,
                    Frame::VerifyResult {
                        offset,
                        len,
                        matches,
                        ..
                    } => me.verify_result(session, offset, len, matches),
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
        tokio::select! {
            r = writer => r,
            r = reader => r,
        }
    }

    /// Takes an acknowledgement of session `id`: frees the window up to `seq`.
    pub(super) fn acked(&self, id: u64, seq: u64) -> Result<(), ProtocolError> {
        let mut st = self.state();
        let Some(s) = st.link.session_mut().filter(|s| s.id == id) else {
            return Ok(()); // the session is being torn down
        };
        if seq >= s.next_seq || seq < s.acked_seq {
            return Err(ProtocolError::Sequence {
                expected: s.acked_seq,
                got: seq,
            });
        }
        s.acked_seq = seq;
        let mut freed = 0;
        while s.in_flight.front().is_some_and(|&(n, _)| n <= seq) {
            if let Some((_, cost)) = s.in_flight.pop_front() {
                s.in_flight_bytes -= cost;
                freed += cost;
            }
        }
        drop(st);
        self.metrics.acked(freed);
        self.cond.notify_all();
        Ok(())
    }

    /// Sends the current content of every chunk in `dirty` to session `id` (blocking; runs
    /// beside the guest), each read in stream order ([`Primary::read_in_stream_order`]).
    /// Stops early when `ended` is set or the session is gone.
    pub(super) fn resync(&self, id: u64, dirty: DirtyBitmap, ended: &AtomicBool) {
        let mut buf = vec![0u8; dirty.granularity() as usize];
        for (offset, len) in dirty.ranges() {
            if ended.load(Ordering::Relaxed) {
                return;
            }
            let data = &mut buf[..len as usize];
            let queued = self.read_in_stream_order(id, offset, data, |data| {
                let change = Change::Write {
                    offset,
                    data: Bytes::copy_from_slice(data),
                };
                if self.enqueue_change(change).is_none() {
                    return false;
                }
                let mut st = self.state();
                match st.link.session_mut().filter(|s| s.id == id) {
                    Some(s) => {
                        s.resync_remaining = s.resync_remaining.saturating_sub(len);
                        true
                    }
                    None => false,
                }
            });
            match queued {
                Ok(Some(true)) => {}
                Ok(_) => return,
                Err(e) => {
                    warn!("resync read at {offset} failed: {e}");
                    return;
                }
            }
        }
        match self.state().link.session_mut().filter(|s| s.id == id) {
            Some(s) => s.resync_remaining = 0,
            None => return,
        }
        self.metrics.in_sync();
        info!("resync complete");
        self.events.send(&events::ResyncDone {
            role: Side::Primary,
        });
    }

    /// Reads `data.len()` bytes at `offset` for session `id` in stream order and hands them
    /// to `queue`, all under the order lock (the resync and `replication-verify`). The range
    /// is read after the changes already registered over it are on the disk: what `queue`
    /// queues then carries data at least as new as every frame before it, and no later
    /// change to the range can be numbered in between. This is the one place that waits for
    /// another change while holding the order lock, one range at a time. `Ok(None)`: session
    /// `id` is gone (nothing read).
    pub(super) fn read_in_stream_order<T>(
        &self,
        id: u64,
        offset: u64,
        data: &mut [u8],
        queue: impl FnOnce(&[u8]) -> T,
    ) -> io::Result<Option<T>> {
        let _order = self.order();
        // A new session is only installed under the order lock: checked here, what `queue`
        // queues goes to session `id` or nowhere.
        if self.state().link.session().map(|s| s.id) != Some(id) {
            return Ok(None);
        }
        let ticket = self.changes.register(offset, data.len() as u64);
        ticket.wait_turn();
        let read = self.local.read_at(data, offset);
        drop(ticket);
        read?;
        Ok(Some(queue(data)))
    }
}

/// A flag set when it is dropped: the end of a session, for the blocking task beside it.
#[derive(Default)]
struct EndedOnDrop(Arc<AtomicBool>);

impl EndedOnDrop {
    fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }
}

impl Drop for EndedOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
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
