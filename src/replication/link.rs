//! The parts of a replication session both ends share: the handshake, the writer half (frames
//! out, batched, plus heartbeats), reads bounded by the peer timeout, and error frames.
//!
//! Sessions run over any byte stream ([`Stream`]): TCP in production, an in-memory duplex in
//! the unit tests, and whatever wraps TCP later (TLS) without touching the session logic.
//!
//! ```text
//!  primary: offer(HELLO) ──► secondary: accept() → check → WELCOME | ERROR
//!  both:    write_loop(frames from a channel + HEARTBEAT every interval)
//!           read_within(peer timeout) in each side's reader loop
//! ```

use std::time::Duration;

use std::io::IoSlice;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::protocol::{read_frame, Frame, Hello, ProtocolError, Welcome, VERSION};

/// A byte stream a session runs over.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// Timing of a session.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// A heartbeat is sent at least this often.
    pub heartbeat: Duration,
    /// The peer is dead after this long without a frame (and the handshake must finish within).
    pub peer_timeout: Duration,
}

/// Largest batch of frames written with one syscall.
const BATCH_BYTES: usize = 1 << 20;

/// Reads one frame, or fails when the peer sends nothing (not even a heartbeat) for `timeout`.
pub async fn read_within<R: AsyncRead + Unpin>(
    r: &mut R,
    timeout: Duration,
) -> Result<Frame, ProtocolError> {
    match tokio::time::timeout(timeout, read_frame(r)).await {
        Ok(f) => f,
        Err(_) => Err(ProtocolError::PeerTimeout(timeout)),
    }
}

/// Writes an ERROR frame telling the peer why (best effort) and returns the refusal.
pub async fn refuse<W: AsyncWrite + Unpin>(w: &mut W, message: String) -> ProtocolError {
    let _ = w
        .write_all(
            &Frame::Error {
                message: message.clone(),
            }
            .encode(),
        )
        .await;
    let _ = w.flush().await;
    ProtocolError::Refused(message)
}

/// The primary's side of the handshake: sends HELLO and returns the secondary's WELCOME.
pub async fn offer<R, W>(
    rd: &mut R,
    wr: &mut W,
    hello: Hello,
    timing: Timing,
) -> Result<Welcome, ProtocolError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let sent = async {
        wr.write_all(&Frame::Hello(hello).encode()).await?;
        wr.flush().await
    }
    .await;
    match tokio::time::timeout(timing.peer_timeout, read_frame(rd)).await {
        // A peer that refused at once may have closed before HELLO was written: its ERROR
        // frame, read above, says why; otherwise the write error does.
        Ok(Ok(Frame::Error { message })) => Err(ProtocolError::Refused(message)),
        _ if sent.is_err() => Err(sent.unwrap_err().into()),
        // Silence is no refusal: nobody may be behind the address yet (a forwarded port
        // whose guest still boots). The session retries; no sync decision is reported.
        Err(_) => Err(ProtocolError::PeerTimeout(timing.peer_timeout)),
        Ok(Err(e)) => Err(e),
        Ok(Ok(Frame::Welcome(w))) if w.version == VERSION => Ok(w),
        Ok(Ok(Frame::Welcome(w))) => Err(ProtocolError::Refused(format!(
            "secondary speaks version {}",
            w.version
        ))),
        Ok(Ok(f)) => Err(ProtocolError::Unexpected {
            got: f.kind(),
            expected: "WELCOME",
        }),
    }
}

/// The secondary's side of the handshake: reads the primary's HELLO.
pub async fn accept<R: AsyncRead + Unpin>(
    rd: &mut R,
    timing: Timing,
) -> Result<Hello, ProtocolError> {
    match tokio::time::timeout(timing.peer_timeout, read_frame(rd)).await {
        Err(_) => Err(ProtocolError::Refused("no HELLO".into())),
        Ok(Err(e)) => Err(e),
        Ok(Ok(Frame::Hello(h))) => Ok(h),
        Ok(Ok(f)) => Err(ProtocolError::Unexpected {
            got: f.kind(),
            expected: "HELLO",
        }),
    }
}

/// The writer half of a session: writes every frame `rx` yields, batching what is queued into
/// one vectored write (headers from one buffer, guest data straight from the frames' shared
/// buffers), and a heartbeat whenever `timing.heartbeat` passes. An ERROR frame is written and
/// ends the session with that error; the channel closing ends it cleanly.
pub async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<Frame>,
    timing: Timing,
) -> Result<(), ProtocolError> {
    // The first heartbeat one interval from now, not at once: the first queued frame (the
    // secondary's WELCOME) must be the first on the wire.
    let mut tick = tokio::time::interval_at(Instant::now() + timing.heartbeat, timing.heartbeat);
    let mut batch = Batch::default();
    loop {
        tokio::select! {
            // Queued frames before a due heartbeat (any frame shows the peer is alive).
            biased;
            f = rx.recv() => {
                let Some(mut f) = f else { return Ok(()) };
                batch.clear();
                loop {
                    let error = match &f {
                        Frame::Error { message } => Some(message.clone()),
                        _ => None,
                    };
                    batch.push(&f);
                    if let Some(message) = error {
                        batch.write(&mut wr).await?;
                        return Err(ProtocolError::Apply(message));
                    }
                    if batch.bytes >= BATCH_BYTES {
                        break;
                    }
                    match rx.try_recv() {
                        Ok(next) => f = next,
                        Err(_) => break,
                    }
                }
                batch.write(&mut wr).await?;
            }
            _ = tick.tick() => {
                wr.write_all(&Frame::Heartbeat.encode()).await?;
                wr.flush().await?;
            }
        }
    }
}

/// Frames encoded for one vectored write: `parts` are ranges of `head` or shared data buffers.
#[derive(Default)]
struct Batch {
    head: Vec<u8>,
    parts: Vec<Part>,
    bytes: usize,
}

enum Part {
    Head(std::ops::Range<usize>),
    Data(Bytes),
}

impl Batch {
    fn clear(&mut self) {
        self.head.clear();
        self.parts.clear();
        self.bytes = 0;
    }

    fn push(&mut self, f: &Frame) {
        let start = self.head.len();
        let data = f.encode_head(&mut self.head);
        self.bytes += self.head.len() - start;
        match self.parts.last_mut() {
            Some(Part::Head(r)) if r.end == start => r.end = self.head.len(),
            _ => self.parts.push(Part::Head(start..self.head.len())),
        }
        if let Some(d) = data {
            self.bytes += d.len();
            self.parts.push(Part::Data(d));
        }
    }

    /// Writes everything, however the stream splits it.
    async fn write<W: AsyncWrite + Unpin>(&self, wr: &mut W) -> std::io::Result<()> {
        let mut slices: Vec<IoSlice<'_>> = self
            .parts
            .iter()
            .map(|p| match p {
                Part::Head(r) => IoSlice::new(&self.head[r.clone()]),
                Part::Data(d) => IoSlice::new(d),
            })
            .collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            let n = wr.write_vectored(rest).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut rest, n);
        }
        wr.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::metadata::Generations;
    use tokio::io::split;

    fn timing() -> Timing {
        Timing {
            heartbeat: Duration::from_millis(20),
            peer_timeout: Duration::from_secs(5),
        }
    }

    fn hello() -> Hello {
        Hello {
            version: VERSION,
            disk_size: 1 << 20,
            block_size: 512,
            epoch: 0,
            sync: false,
            dirty_log: false,
            takes_durable: false,
            gens: Generations::fresh_primary(),
        }
    }

    #[tokio::test]
    async fn handshake_and_writer() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (mut ard, mut awr) = split(a);
        let (mut brd, bwr) = split(b);
        let secondary = tokio::spawn(async move {
            let h = accept(&mut brd, timing()).await.unwrap();
            let (tx, rx) = mpsc::unbounded_channel();
            tx.send(Frame::Welcome(Welcome {
                version: h.version,
                disk_size: h.disk_size,
                block_size: h.block_size,
                gens: Generations::default(),
                decision: 1,
                allow_full: false,
                discard_my_data: false,
                sends_durable: false,
                own_dirty: false,
            }))
            .unwrap();
            tx.send(Frame::Ack { seq: 9 }).unwrap();
            tx.send(Frame::Error {
                message: "stop".into(),
            })
            .unwrap();
            write_loop(bwr, rx, timing()).await
        });
        let w = offer(&mut ard, &mut awr, hello(), timing()).await.unwrap();
        assert_eq!(w.disk_size, 1 << 20);
        // Heartbeats may come in between; the ACK and the ERROR come in order.
        let mut got = Vec::new();
        while got.len() < 2 {
            match read_within(&mut ard, timing().peer_timeout).await.unwrap() {
                Frame::Heartbeat => {}
                f => got.push(f),
            }
        }
        assert_eq!(got[0], Frame::Ack { seq: 9 });
        assert!(matches!(&got[1], Frame::Error { message } if message == "stop"));
        assert!(matches!(
            secondary.await.unwrap(),
            Err(ProtocolError::Apply(m)) if m == "stop"
        ));
    }

    #[tokio::test]
    async fn a_refusal_reaches_the_primary() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (mut ard, mut awr) = split(a);
        let (mut brd, mut bwr) = split(b);
        let secondary = tokio::spawn(async move {
            accept(&mut brd, timing()).await.unwrap();
            refuse(&mut bwr, "disk size mismatch".into()).await
        });
        let e = offer(&mut ard, &mut awr, hello(), timing())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("disk size mismatch"), "{e}");
        assert!(matches!(
            secondary.await.unwrap(),
            ProtocolError::Refused(_)
        ));
    }

    /// An address that accepts and never answers (a forwarded port with nobody behind it yet)
    /// is a timeout, not a refusal: no sync decision is reported for it.
    #[tokio::test]
    async fn a_silent_secondary_is_a_timeout_not_a_refusal() {
        let (a, _b) = tokio::io::duplex(1 << 16);
        let (mut ard, mut awr) = split(a);
        let t = Timing {
            peer_timeout: Duration::from_millis(20),
            ..timing()
        };
        let e = offer(&mut ard, &mut awr, hello(), t).await.unwrap_err();
        assert!(matches!(e, ProtocolError::PeerTimeout(_)), "{e}");
    }

    #[tokio::test]
    async fn a_silent_peer_times_out() {
        let (a, _b) = tokio::io::duplex(64);
        let (mut ard, _awr) = split(a);
        let e = read_within(&mut ard, Duration::from_millis(10))
            .await
            .unwrap_err();
        assert!(matches!(e, ProtocolError::PeerTimeout(_)), "{e}");
        // Detected locally: the reason must not claim that the peer reported it.
        assert!(!e.to_string().contains("peer reported"), "{e}");
        assert!(e.to_string().contains("no heartbeat"), "{e}");
    }

    /// The first frame queued is the first on the wire: the primary reads WELCOME (or ERROR)
    /// as the answer to HELLO, so no heartbeat may overtake it, however short the interval.
    #[tokio::test(start_paused = true)]
    async fn nothing_overtakes_the_first_queued_frame() {
        let fast = Timing {
            heartbeat: Duration::from_micros(1),
            peer_timeout: Duration::from_secs(5),
        };
        for round in 0..200u64 {
            let (a, b) = tokio::io::duplex(1 << 12);
            let (mut brd, _bwr) = split(b);
            let (tx, rx) = mpsc::unbounded_channel();
            tx.send(Frame::Ack { seq: round + 1 }).unwrap();
            let writer = tokio::spawn(write_loop(a, rx, fast));
            let first = read_within(&mut brd, fast.peer_timeout).await.unwrap();
            assert_eq!(first, Frame::Ack { seq: round + 1 }, "round {round}");
            drop(tx);
            writer.await.unwrap().unwrap();
        }
    }

    /// A stream that takes a few bytes at a time: every frame still arrives whole, in order.
    #[tokio::test]
    async fn the_writer_survives_short_writes() {
        let (a, b) = tokio::io::duplex(97);
        let (mut brd, _bwr) = split(b);
        let (tx, rx) = mpsc::unbounded_channel();
        let frames: Vec<Frame> = (1..=20u64)
            .map(|i| Frame::write(i, i * 4096, vec![i as u8; 1000 + i as usize * 300]))
            .chain([Frame::Ack { seq: 3 }])
            .collect();
        for f in &frames {
            tx.send(f.clone()).unwrap();
        }
        drop(tx);
        let writer = tokio::spawn(write_loop(a, rx, timing()));
        let mut got = Vec::new();
        while got.len() < frames.len() {
            match read_within(&mut brd, timing().peer_timeout).await.unwrap() {
                Frame::Heartbeat => {}
                f => got.push(f),
            }
        }
        assert_eq!(got, frames);
        writer.await.unwrap().unwrap();
    }
}
