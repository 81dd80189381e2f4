//! The secondary: receives the primary's stream and applies it to the secondary disk through
//! the disk buffer ([`LayeredDisk`]), acknowledging what it applied.
//!
//! ```text
//!  primary ─TCP─► reader task ──(bounded channel)──► applier thread ──► LayeredDisk
//!          ◄TCP── writer task ◄── ACK(seq) ◄────────────┘   (copy-before-write into hidden)
//!                 + heartbeats
//! ```

use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use serde_json::{json, Value};
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use super::layers::LayeredDisk;
use super::protocol::{read_frame, read_frame_within, Frame, ProtocolError, Welcome, VERSION};
use crate::qmp::EventSender;
use crate::storage::BlockDevice;

/// How the secondary listens.
#[derive(Debug, Clone)]
pub struct SecondaryOptions {
    pub listen: String,
    pub heartbeat_interval: Duration,
    pub peer_timeout: Duration,
    pub block_size: u32,
}

#[derive(Debug, Default)]
struct SecState {
    connected: Option<String>,
    epoch: u64,
    applied_seq: u64,
    bytes_since_checkpoint: u64,
    bytes_total: u64,
    last_error: Option<String>,
    failed_over: bool,
    /// An applier thread is running (failover waits for it to stop).
    applying: bool,
}

/// Errors of secondary operations.
#[derive(Debug, thiserror::Error)]
pub enum SecondaryError {
    #[error("failover already done")]
    AlreadyFailedOver,
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
}

/// The secondary's replication endpoint.
pub struct Secondary {
    disk: Arc<LayeredDisk>,
    opts: SecondaryOptions,
    state: Mutex<SecState>,
    cond: Condvar,
    events: EventSender,
    /// Flips to true on failover: the session ends and no new one is accepted.
    stop: watch::Sender<bool>,
}

impl Secondary {
    pub fn new(disk: Arc<LayeredDisk>, opts: SecondaryOptions, events: EventSender) -> Arc<Self> {
        let (stop, _) = watch::channel(false);
        Arc::new(Secondary {
            disk,
            opts,
            state: Mutex::new(SecState::default()),
            cond: Condvar::new(),
            events,
            stop,
        })
    }

    fn state(&self) -> MutexGuard<'_, SecState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The disk the Secondary VM (if any) is served from.
    pub fn disk(&self) -> Arc<LayeredDisk> {
        self.disk.clone()
    }

    /// Binds the listening socket (so that errors show at start-up).
    pub async fn bind(&self) -> io::Result<TcpListener> {
        let l = TcpListener::bind(&self.opts.listen).await?;
        info!("waiting for the primary on {}", l.local_addr()?);
        Ok(l)
    }

    /// Accepts the primary, one session at a time, until failover.
    pub async fn run(self: Arc<Self>, listener: TcpListener) {
        let mut stop = self.stop.subscribe();
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.changed() => return,
            };
            let (stream, addr) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    warn!("accept failed: {e}");
                    continue;
                }
            };
            if *stop.borrow() {
                return;
            }
            let busy = self.state().connected.clone();
            if let Some(cur) = busy {
                let msg = format!("already replicating from {cur}");
                warn!("refusing {addr}: {msg}");
                let mut s = stream;
                let _ = s.write_all(&Frame::Error { message: msg }.encode()).await;
                continue;
            }
            let me = self.clone();
            let mut stop_rx = self.stop.subscribe();
            tokio::spawn(async move {
                let addr = addr.to_string();
                let r = tokio::select! {
                    r = me.clone().session(stream, addr.clone()) => r,
                    _ = stop_rx.wait_for(|s| *s) => Ok(()),
                };
                me.session_ended(&addr, r);
            });
        }
    }

    fn session_ended(&self, addr: &str, r: Result<(), ProtocolError>) {
        let reason = match &r {
            Ok(()) => "closed".to_string(),
            Err(e) => e.to_string(),
        };
        let was_connected = {
            let mut st = self.state();
            let was = st.connected.take().is_some();
            if r.is_err() {
                st.last_error = Some(reason.clone());
            }
            was
        };
        if was_connected {
            warn!("primary {addr} gone: {reason}");
            self.events.emit(
                "REPLICATION_PEER_LOST",
                json!({"role": "secondary", "reason": reason}),
            );
        } else if let Err(e) = r {
            error!("refused primary {addr}: {e}");
            self.events.emit(
                "REPLICATION_ERROR",
                json!({"role": "secondary", "error": e.to_string()}),
            );
        }
    }

    async fn session(
        self: Arc<Self>,
        stream: TcpStream,
        addr: String,
    ) -> Result<(), ProtocolError> {
        stream.set_nodelay(true)?;
        let (mut rd, wr) = stream.into_split();
        let mut wr = BufWriter::new(wr);
        let hello = match tokio::time::timeout(self.opts.peer_timeout, read_frame(&mut rd)).await {
            Err(_) => return Err(ProtocolError::Refused("no HELLO".into())),
            Ok(r) => r?,
        };
        let Frame::Hello(hello) = hello else {
            return Err(ProtocolError::Unexpected {
                got: hello.kind(),
                expected: "HELLO",
            });
        };
        let refusal = if hello.version != VERSION {
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
        } else if self.state().failed_over {
            Some("the secondary has failed over and no longer takes a stream".into())
        } else {
            None
        };
        if let Some(message) = refusal {
            let _ = wr
                .write_all(
                    &Frame::Error {
                        message: message.clone(),
                    }
                    .encode(),
                )
                .await;
            let _ = wr.flush().await;
            return Err(ProtocolError::Refused(message));
        }
        wr.write_all(
            &Frame::Welcome(Welcome {
                version: VERSION,
                disk_size: self.disk.capacity(),
                block_size: self.opts.block_size,
            })
            .encode(),
        )
        .await?;
        wr.flush().await?;
        {
            let mut st = self.state();
            st.connected = Some(addr.clone());
            st.applied_seq = 0;
            st.applying = true;
        }
        info!(
            "primary {addr} connected (epoch {}, {})",
            hello.epoch,
            if hello.sync { "sync" } else { "async" }
        );
        self.events.emit(
            "REPLICATION_PEER_CONNECTED",
            json!({"role": "secondary", "peer": addr}),
        );

        let (frame_tx, frame_rx) = mpsc::channel::<Frame>(256);
        let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<Result<u64, String>>();
        let applier = {
            let me = self.clone();
            std::thread::Builder::new()
                .name("colo-apply".into())
                .spawn(move || me.apply_loop(frame_rx, ack_tx))?
        };

        let hb = self.opts.heartbeat_interval;
        let writer = async move {
            let mut tick = tokio::time::interval(hb);
            loop {
                tokio::select! {
                    a = ack_rx.recv() => match a {
                        Some(Ok(seq)) => {
                            wr.write_all(&Frame::Ack { seq }.encode()).await?;
                            wr.flush().await?;
                        }
                        Some(Err(message)) => {
                            let _ = wr.write_all(&Frame::Error { message: message.clone() }.encode()).await;
                            let _ = wr.flush().await;
                            return Err(ProtocolError::Apply(message));
                        }
                        None => return Ok::<(), ProtocolError>(()),
                    },
                    _ = tick.tick() => {
                        wr.write_all(&Frame::Heartbeat.encode()).await?;
                        wr.flush().await?;
                    }
                }
            }
        };
        let timeout = self.opts.peer_timeout;
        let reader = async move {
            let mut expected = 1u64;
            loop {
                let f = read_frame_within(&mut rd, timeout).await?;
                match f {
                    Frame::Heartbeat => continue,
                    Frame::Error { message } => return Err(ProtocolError::Peer(message)),
                    Frame::Write { .. }
                    | Frame::WriteZeroes { .. }
                    | Frame::Discard { .. }
                    | Frame::Flush { .. }
                    | Frame::Checkpoint { .. } => {
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
        };
        // Dropping the reader closed the frame channel: the applier finishes what it holds.
        let _ = tokio::task::spawn_blocking(move || applier.join()).await;
        r
    }

    /// Applies frames in order and acknowledges them.
    fn apply_loop(
        &self,
        mut rx: mpsc::Receiver<Frame>,
        acks: mpsc::UnboundedSender<Result<u64, String>>,
    ) {
        // Acknowledge when caught up, and at least every ACK_EVERY_FRAMES frames or
        // ACK_EVERY_BYTES bytes: the primary's window must drain steadily, not in window-sized
        // steps (which would stall it until the whole window is applied).
        const ACK_EVERY_FRAMES: u32 = 32;
        const ACK_EVERY_BYTES: u64 = 1 << 20;
        let mut unacked = 0u32;
        let mut unacked_bytes = 0u64;
        while let Some(frame) = rx.blocking_recv() {
            let seq = frame.seq();
            if let Frame::Write { data, .. } = &frame {
                unacked_bytes += data.len() as u64;
            }
            if let Err(e) = self.apply(frame) {
                let msg = format!("secondary cannot apply frame {seq}: {e}");
                error!("{msg}");
                let _ = acks.send(Err(msg));
                break;
            }
            self.state().applied_seq = seq;
            unacked += 1;
            if rx.is_empty() || unacked >= ACK_EVERY_FRAMES || unacked_bytes >= ACK_EVERY_BYTES {
                unacked = 0;
                unacked_bytes = 0;
                if acks.send(Ok(seq)).is_err() {
                    break;
                }
            }
        }
        self.state().applying = false;
        self.cond.notify_all();
    }

    fn apply(&self, frame: Frame) -> io::Result<()> {
        let bytes = match &frame {
            Frame::Write { data, .. } => data.len() as u64,
            _ => 0,
        };
        match frame {
            Frame::Write { offset, data, .. } => self.disk.primary_write(offset, &data)?,
            Frame::WriteZeroes {
                offset, len, unmap, ..
            } => self.disk.primary_write_zeroes(offset, len, unmap)?,
            Frame::Discard { offset, len, .. } => self.disk.primary_discard(offset, len)?,
            Frame::Flush { .. } => self.disk.flush()?,
            Frame::Checkpoint { epoch, .. } => {
                let t = Instant::now();
                self.disk.checkpoint()?;
                let mut st = self.state();
                st.epoch = epoch;
                st.bytes_since_checkpoint = 0;
                drop(st);
                info!("checkpoint {epoch}: layers dropped in {:?}", t.elapsed());
                self.events.emit(
                    "REPLICATION_CHECKPOINT",
                    json!({"role": "secondary", "epoch": epoch}),
                );
                return Ok(());
            }
            _ => return Ok(()),
        }
        let mut st = self.state();
        st.bytes_since_checkpoint += bytes;
        st.bytes_total += bytes;
        Ok(())
    }

    /// `replication-do-checkpoint` on the secondary: drop both layers now.
    pub fn do_checkpoint(&self) -> Result<u64, SecondaryError> {
        if self.state().failed_over {
            return Err(SecondaryError::AlreadyFailedOver);
        }
        self.disk.checkpoint()?;
        let mut st = self.state();
        st.epoch += 1;
        st.bytes_since_checkpoint = 0;
        let epoch = st.epoch;
        drop(st);
        self.events.emit(
            "REPLICATION_CHECKPOINT",
            json!({"role": "secondary", "epoch": epoch}),
        );
        Ok(epoch)
    }

    /// `replication-failover`: stop taking the stream and make the Secondary VM's view (or,
    /// without one, the last checkpoint) the disk.
    pub fn failover(&self) -> Result<Value, SecondaryError> {
        let t = Instant::now();
        {
            let mut st = self.state();
            if st.failed_over {
                return Err(SecondaryError::AlreadyFailedOver);
            }
            st.failed_over = true;
        }
        self.stop.send_replace(true);
        // Wait for the applier to let go of the disk.
        {
            let mut st = self.state();
            while st.applying {
                st = self.cond.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        }
        let before = self.disk.stats();
        self.disk.failover()?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        let epoch = self.state().epoch;
        info!("failover done in {ms:.1} ms (epoch {epoch})");
        let data = json!({
            "epoch": epoch,
            "duration-ms": ms,
            "committed-active-bytes": before.active_bytes,
            "restored-hidden-bytes": before.hidden_bytes,
        });
        self.events.emit("REPLICATION_FAILOVER_DONE", data.clone());
        Ok(data)
    }

    /// `query-replication` for the secondary.
    pub fn query(&self) -> Value {
        let st = self.state();
        let layers = self.disk.stats();
        json!({
            "role": "secondary",
            "state": if st.failed_over { "failed-over" } else if st.connected.is_some() { "connected" } else { "waiting" },
            "peer-address": st.connected,
            "listen": self.opts.listen,
            "epoch": st.epoch,
            "applied-seq": st.applied_seq,
            "bytes-received-since-checkpoint": st.bytes_since_checkpoint,
            "bytes-received-total": st.bytes_total,
            "hidden-bytes": layers.hidden_bytes,
            "active-bytes": layers.active_bytes,
            "cluster-size": layers.cluster_size,
            "last-error": st.last_error,
        })
    }
}
