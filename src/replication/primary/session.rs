//! The primary's link task: connects to the secondary, handshakes, streams the queued frames,
//! resends what the dirty record holds (after a failback handshake, joined by the secondary's
//! own record, PEER_DIRTY), and takes acknowledgements; reconnects after a break.

use std::sync::Arc;

use bytes::Bytes;
use log::{info, warn};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use super::{events, Link, Primary, Session, Side};
use crate::replication::dirty::DirtyBitmap;
use crate::replication::link::{self, Stream, Timing};
use crate::replication::metadata::{decide_with, Decision, SyncPolicy};
use crate::replication::protocol::{Frame, Hello, ProtocolError, VERSION};
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
    fn link_down(&self, reason: &str) {
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
        let gens = self.meta.gens();
        let hello = Hello {
            version: VERSION,
            disk_size: self.local.capacity(),
            block_size: self.opts.block_size,
            epoch: self.state().epoch,
            sync: self.opts.sync,
            dirty_log: self.has_dirty_log(),
            gens,
        };
        let welcome = match link::offer(&mut rd, &mut wr, hello, self.timing()).await {
            Ok(w) => w,
            Err(ProtocolError::Refused(why)) => {
                self.events.send(&events::SyncDecision {
                    role: Side::Primary,
                    peer: addr.clone(),
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
            return Err(link::refuse(&mut wr, why).await);
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
            peer: addr.clone(),
            decision: decision.name().into(),
            reason: decision.reason().into(),
            secondary_epoch: Some(welcome.gens.epoch),
        });

        // Failback: the secondary's own dirty record comes right after WELCOME; it joins this
        // primary's before the resync below takes its snapshot.
        if matches!(decision, Decision::Failback(_)) {
            let x = loop {
                match link::read_within(&mut rd, self.opts.peer_timeout).await? {
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
                    return Err(link::refuse(&mut wr, format!("failback: {e}")).await);
                }
            }
        }

        // Open the stream. Whatever changed since the last checkpoint is sent again first
        // (everything, for a full sync).
        let (tx, rx) = mpsc::unbounded_channel();
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
            st.link = Link::Connected(Session::new(id, tx, addr.clone(), dirty.dirty_bytes()));
            (id, dirty)
        };
        self.metrics.connected(resync.dirty_bytes());
        info!(
            "replicating to {addr} ({} bytes to resync)",
            resync.dirty_bytes()
        );
        self.events.send(&events::PeerConnected {
            role: Side::Primary,
            peer: addr,
            resync_bytes: Some(resync.dirty_bytes()),
        });
        let resync_task = {
            let me = self.clone();
            tokio::task::spawn_blocking(move || me.resync(session, resync))
        };

        let writer = link::write_loop(wr, rx, self.timing());
        let me = self.clone();
        let timeout = self.opts.peer_timeout;
        let reader = async move {
            loop {
                match link::read_within(&mut rd, timeout).await? {
                    Frame::Ack { seq } => me.acked(session, seq)?,
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
        let r = tokio::select! {
            r = writer => r,
            r = reader => r,
        };
        resync_task.abort();
        r
    }

    /// Takes an acknowledgement of session `id`: frees the window up to `seq`.
    fn acked(&self, id: u64, seq: u64) -> Result<(), ProtocolError> {
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
    /// beside the guest).
    ///
    /// Each chunk is read and queued under the order lock after the changes already registered
    /// over it are on the disk: the frame then carries data at least as new as every frame
    /// before it, and no later change to the chunk can be numbered in between. This is the one
    /// place that waits for another change while holding the order lock, one chunk at a time.
    pub(super) fn resync(&self, id: u64, dirty: DirtyBitmap) {
        let mut buf = vec![0u8; dirty.granularity() as usize];
        for (offset, len) in dirty.ranges() {
            let _order = self.order();
            // A new session is only installed under the order lock: checked here, the frame
            // below goes to session `id` or nowhere.
            if self.state().link.session().map(|s| s.id) != Some(id) {
                return;
            }
            let ticket = self.changes.register(offset, len);
            ticket.wait_turn();
            let data = &mut buf[..len as usize];
            let read = self.local.read_at(data, offset);
            drop(ticket);
            if let Err(e) = read {
                warn!("resync read at {offset} failed: {e}");
                return;
            }
            let change = Change::Write {
                offset,
                data: Bytes::copy_from_slice(data),
            };
            if self.enqueue_change(change).is_none() {
                return;
            }
            let mut st = self.state();
            match st.link.session_mut().filter(|s| s.id == id) {
                Some(s) => s.resync_remaining = s.resync_remaining.saturating_sub(len),
                None => return,
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
