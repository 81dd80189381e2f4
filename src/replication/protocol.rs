//! The replication link's wire format (see docs/replication-protocol.md).
//!
//! Every frame is a 40-byte little-endian header followed by `payload_len` bytes of payload.
//! A crc32c covers the header (with the crc field itself excluded) and the payload, so a frame
//! corrupted on the way is rejected before any byte of it reaches a disk.
//!
//! ```text
//!  0      4    5     6        8         16        24        32           36      40
//!  +------+----+-----+--------+---------+---------+---------+------------+-------+---------
//!  |magic |type|flags|reserved|   seq   | offset  | length  |payload_len |crc32c | payload
//!  +------+----+-----+--------+---------+---------+---------+------------+-------+---------
//! ```

use std::mem::size_of;

use bytes::Bytes;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};
use vm_memory::ByteValued;

use super::dirty::DirtyExtents;
use super::metadata::Generations;
use crate::storage::Change;
use wire::{FrameHeader, HelloPayload, WelcomePayload, CRC_COVERS};

mod frame_type;
mod wire;

pub use frame_type::{FrameType, PayloadRule};

/// "COLO" as the first four bytes on the wire.
pub const MAGIC: u32 = u32::from_le_bytes(*b"COLO");
/// Protocol version spoken by this build.
pub const VERSION: u32 = 2;
/// Size of a frame header.
pub const HEADER_LEN: usize = 40;
/// Largest payload accepted. Larger guest writes are split into several frames.
pub const MAX_PAYLOAD: usize = 4 << 20;

/// HELLO payload size.
pub const HELLO_LEN: usize = size_of::<HelloPayload>();
/// WELCOME payload size.
pub const WELCOME_LEN: usize = size_of::<WelcomePayload>();

/// Errors on the replication link.
#[derive(Debug, Error)]
pub enum ProtocolError {
    #[error("link I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad magic {0:#010x}: the peer is not a colo-blk replication endpoint")]
    BadMagic(u32),
    #[error("frame checksum mismatch (header says {expected:#010x}, computed {actual:#010x})")]
    BadChecksum { expected: u32, actual: u32 },
    #[error("payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    PayloadTooLarge(u64),
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// A payload size the frame type does not allow (the rule says what it is not).
    #[error("malformed {kind} frame: {rule}")]
    PayloadSize {
        kind: &'static str,
        rule: PayloadRule,
    },
    #[error("malformed {kind} frame: {why}")]
    Malformed {
        kind: &'static str,
        why: &'static str,
    },
    #[error("peer reported an error: {0}")]
    Peer(String),
    /// Nothing (not even a heartbeat) came from the peer in time: detected here, not reported.
    #[error("no heartbeat from the peer for {0:?}")]
    PeerTimeout(std::time::Duration),
    #[error("handshake refused: {0}")]
    Refused(String),
    #[error("unexpected {got} frame (expected {expected})")]
    Unexpected {
        got: &'static str,
        expected: &'static str,
    },
    #[error("{0}")]
    Apply(String),
    #[error("DURABLE for marker {seq} (epoch {epoch}), which no acknowledged marker awaits")]
    UnexpectedDurable { seq: u64, epoch: u64 },
    #[error("sequence gap: expected {expected}, got {got}")]
    Sequence { expected: u64, got: u64 },
}

/// The primary's opening frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u32,
    pub disk_size: u64,
    pub block_size: u32,
    /// Epoch (checkpoint count) of the primary.
    pub epoch: u64,
    /// Writes complete only when the secondary has applied them.
    pub sync: bool,
    /// The primary keeps a persistent dirty log (a failback needs one on both sides).
    pub dirty_log: bool,
    /// The primary takes DURABLE frames: the secondary may acknowledge a MARKER once applied
    /// and say later when it is durable (docs/flush-policy.md, rule 11).
    pub takes_durable: bool,
    /// The primary disk's replication metadata.
    pub gens: Generations,
}

/// The secondary's answer to a [`Hello`] it accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub version: u32,
    pub disk_size: u64,
    pub block_size: u32,
    /// The secondary disk's replication metadata (after it recorded the primary as source).
    pub gens: Generations,
    /// The secondary's decision: 1 incremental, 2 full sync, 3 incremental failback (see
    /// `metadata::decide_with`).
    pub decision: u32,
    /// The secondary's operator allowed a full sync (`--allow-full-sync`).
    pub allow_full: bool,
    /// The secondary's operator discards its disk's own writes (`--discard-my-data`).
    pub discard_my_data: bool,
    /// The secondary has a readable dirty log of its own.
    pub own_dirty: bool,
    /// The secondary acknowledges a MARKER once applied and sends DURABLE after its sync
    /// (only when the HELLO said the primary takes it).
    pub sends_durable: bool,
}

/// One frame on the link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    Welcome(Welcome),
    /// A change of the primary's disk, in stream order (WRITE, WRITE_ZEROES, DISCARD or FLUSH
    /// on the wire). A write's data is shared with the primary's local write.
    Change {
        seq: u64,
        change: Change<Bytes>,
    },
    /// End of an epoch: everything before it is the checkpoint's disk; drop the layers.
    Checkpoint {
        seq: u64,
        epoch: u64,
    },
    /// Online verify: the crc32c of the primary's `[offset, offset+len)` at this point of the
    /// stream; the secondary compares its own disk.
    Verify {
        seq: u64,
        offset: u64,
        len: u64,
        crc: u32,
    },
    /// Secondary → primary: the result of the VERIFY frame `seq`.
    VerifyResult {
        seq: u64,
        offset: u64,
        len: u64,
        matches: bool,
    },
    /// COLO: the primary's device stopped here (QEMU stopped the VM with dirty logging on, for
    /// a checkpoint or otherwise). The secondary makes it a tentative cut, or ignores it while
    /// its own VM runs (docs/colo-with-qemu.md).
    Marker {
        seq: u64,
        mark: Mark,
    },
    /// Secondary → primary, right after WELCOME when the decision is a failback: the extents
    /// the secondary's disk wrote since the common generation (its dirty log).
    PeerDirty(DirtyExtents),
    /// Secondary → primary: every frame up to and including `seq` is applied.
    Ack {
        seq: u64,
    },
    /// Secondary → primary (only in a session whose WELCOME said so): the MARKER `seq`, which
    /// ended `epoch` and was acknowledged once applied, is durable now, with everything
    /// before it.
    Durable {
        seq: u64,
        epoch: u64,
    },
    Heartbeat,
    Error {
        message: String,
    },
}

/// Most queues a MARKER describes (the device's limit).
pub const MAX_MARK_QUEUES: usize = 64;

/// A point in the primary's stream where its device stopped, with the position of each
/// virtqueue there (the `GET_VRING_BASE` answers QEMU got, which it gives the Secondary VM's
/// device when that VM takes the primary's state).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mark {
    /// The epoch the primary ended with this marker.
    pub epoch: u64,
    /// `next_avail` of each queue, in queue order (`None`: the queue did not run since the
    /// device last started, so its position is not known to the backend).
    pub bases: Vec<Option<u16>>,
}

impl Frame {
    /// The frame's name, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "HELLO",
            Frame::Welcome(_) => "WELCOME",
            Frame::Change { change, .. } => change.kind(),
            Frame::Checkpoint { .. } => "CHECKPOINT",
            Frame::Marker { .. } => "MARKER",
            Frame::Ack { .. } => "ACK",
            Frame::Durable { .. } => "DURABLE",
            Frame::PeerDirty(_) => "PEER_DIRTY",
            Frame::Verify { .. } => "VERIFY",
            Frame::VerifyResult { .. } => "VERIFY_RESULT",
            Frame::Heartbeat => "HEARTBEAT",
            Frame::Error { .. } => "ERROR",
        }
    }

    /// Sequence number of a stream frame (0 for control frames).
    pub fn seq(&self) -> u64 {
        match self {
            Frame::Change { seq, .. }
            | Frame::Checkpoint { seq, .. }
            | Frame::Ack { seq }
            | Frame::Durable { seq, .. }
            | Frame::Verify { seq, .. }
            | Frame::VerifyResult { seq, .. }
            | Frame::Marker { seq, .. } => *seq,
            _ => 0,
        }
    }

    /// Bytes of guest data a stream change carries (0 for every other frame).
    pub fn data_len(&self) -> u64 {
        match self {
            Frame::Change { change, .. } => change.data_len(),
            _ => 0,
        }
    }

    /// A WRITE frame (tests and tools).
    pub fn write(seq: u64, offset: u64, data: impl Into<Bytes>) -> Frame {
        Frame::Change {
            seq,
            change: Change::Write {
                offset,
                data: data.into(),
            },
        }
    }

    /// Appends the encoded frame to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        if let Some(data) = self.encode_head(out) {
            out.extend_from_slice(&data);
        }
    }

    /// Appends the encoded frame to `out`, except a WRITE's data, which it returns instead
    /// (shared, not copied) for the caller to send right after: the link writes guest data
    /// straight from the buffer the primary's local write used.
    pub fn encode_head(&self, out: &mut Vec<u8>) -> Option<Bytes> {
        let parts = self.wire_parts();
        let payload = parts.payload.as_bytes();
        let header = FrameHeader::new(
            parts.ty as u8,
            parts.flags,
            parts.seq,
            parts.offset,
            parts.length,
            payload,
        );
        out.extend_from_slice(header.as_slice());
        if let Frame::Change {
            change: Change::Write { data, .. },
            ..
        } = self
        {
            return Some(data.clone());
        }
        out.extend_from_slice(payload);
        None
    }

    /// The encoded frame.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode_into(&mut v);
        v
    }

    /// Decodes a header; returns it with the payload length still to read.
    pub fn parse_header(h: &[u8; HEADER_LEN]) -> Result<RawHeader, ProtocolError> {
        let mut header = FrameHeader::default();
        header.as_mut_slice().copy_from_slice(h);
        let magic = header.magic.to_native();
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic(magic));
        }
        let payload_len = u64::from(header.payload_len.to_native());
        if payload_len > MAX_PAYLOAD as u64 {
            return Err(ProtocolError::PayloadTooLarge(payload_len));
        }
        Ok(RawHeader {
            ty: header.ty,
            flags: header.flags,
            seq: header.seq.to_native(),
            offset: header.offset.to_native(),
            length: header.length.to_native(),
            payload_len: payload_len as usize,
            crc: header.crc.to_native(),
            header_crc: crc32c::crc32c(&h[..CRC_COVERS]),
        })
    }

    /// Builds a frame from a checked header and its payload: the checksum, then the type's
    /// payload rule, then its decoder (`FrameType::spec`, one row per type).
    pub fn from_parts(h: RawHeader, payload: Vec<u8>) -> Result<Frame, ProtocolError> {
        let actual = crc32c::crc32c_append(h.header_crc, &payload);
        if actual != h.crc {
            return Err(ProtocolError::BadChecksum {
                expected: h.crc,
                actual,
            });
        }
        let spec = FrameType::try_from(h.ty)?.spec();
        if !spec.payload.allows(&h, payload.len()) {
            return Err(ProtocolError::PayloadSize {
                kind: spec.name,
                rule: spec.payload,
            });
        }
        (spec.decode)(&h, payload)
    }
}

impl Frame {
    /// Decodes the first frame in `bytes`; returns it and the number of bytes it took. Fails on
    /// a truncated frame as on a bad one (the link reader and the fuzz targets use the same
    /// checks: [`Frame::parse_header`], then [`Frame::from_parts`]).
    pub fn decode(bytes: &[u8]) -> Result<(Frame, usize), ProtocolError> {
        let truncated = ProtocolError::Malformed {
            kind: "frame",
            why: "truncated",
        };
        let Some(h) = bytes.first_chunk::<HEADER_LEN>() else {
            return Err(truncated);
        };
        let raw = Frame::parse_header(h)?;
        let end = HEADER_LEN + raw.payload_len;
        let Some(payload) = bytes.get(HEADER_LEN..end) else {
            return Err(truncated);
        };
        Ok((Frame::from_parts(raw, payload.to_vec())?, end))
    }
}

/// A header whose magic and payload size were checked, and whose checksum is pending.
#[derive(Debug, Clone, Copy)]
pub struct RawHeader {
    pub ty: u8,
    pub flags: u8,
    pub seq: u64,
    pub offset: u64,
    pub length: u64,
    pub payload_len: usize,
    crc: u32,
    header_crc: u32,
}

/// Reads one whole, verified frame.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Frame, ProtocolError> {
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h).await?;
    let header = Frame::parse_header(&h)?;
    // Read into the buffer's spare capacity: zero-filling up to MAX_PAYLOAD bytes first would
    // cost a memset as large as the copy out of the socket.
    let n = header.payload_len;
    let mut payload = Vec::with_capacity(n);
    while payload.len() < n {
        let mut rest = (&mut *r).take((n - payload.len()) as u64);
        if rest.read_buf(&mut payload).await? == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
    }
    Frame::from_parts(header, payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncWrite, AsyncWriteExt};

    fn gens() -> Generations {
        Generations {
            disk_id: 0x0123_4567_89ab_cdef_0011_2233_4455_6677,
            current: 3,
            bitmap: 2,
            history: [2, 1, 0, 0],
            source: 0,
            epoch: 7,
            flags: 0,
        }
    }

    fn samples() -> Vec<Frame> {
        vec![
            Frame::Hello(Hello {
                version: VERSION,
                disk_size: 1 << 30,
                block_size: 512,
                epoch: 7,
                sync: true,
                dirty_log: true,
                takes_durable: true,
                gens: gens(),
            }),
            Frame::Welcome(Welcome {
                version: VERSION,
                disk_size: 1 << 30,
                block_size: 512,
                gens: Generations { flags: 1, ..gens() },
                decision: 2,
                allow_full: true,
                discard_my_data: true,
                own_dirty: false,
                sends_durable: true,
            }),
            Frame::PeerDirty(DirtyExtents::from_extents(
                4 << 20,
                (64 << 20) + 512,
                [0u64, 3, 16].into_iter(),
            )),
            Frame::Verify {
                seq: 6,
                offset: 1 << 20,
                len: 1 << 20,
                crc: 0xdead_beef,
            },
            Frame::VerifyResult {
                seq: 6,
                offset: 1 << 20,
                len: 1 << 20,
                matches: false,
            },
            Frame::write(1, 4096, vec![0xab; 1000]),
            Frame::Change {
                seq: 2,
                change: Change::WriteZeroes {
                    offset: 0,
                    len: 1 << 20,
                    unmap: true,
                },
            },
            Frame::Change {
                seq: 3,
                change: Change::Discard {
                    offset: 512,
                    len: 512,
                },
            },
            Frame::Change {
                seq: 4,
                change: Change::Flush,
            },
            Frame::Checkpoint { seq: 5, epoch: 9 },
            Frame::Marker {
                seq: 6,
                mark: Mark {
                    epoch: 10,
                    bases: vec![Some(0), None, Some(65535)],
                },
            },
            Frame::Ack { seq: 5 },
            Frame::Heartbeat,
            Frame::Error {
                message: "disk size mismatch".into(),
            },
        ]
    }

    fn decode(bytes: &[u8]) -> Result<Frame, ProtocolError> {
        let (f, used) = Frame::decode(bytes)?;
        assert_eq!(used, bytes.len());
        Ok(f)
    }

    #[test]
    fn every_frame_round_trips() {
        for f in samples() {
            assert_eq!(decode(&f.encode()).unwrap(), f);
        }
    }

    #[test]
    fn peer_dirty_is_checked() {
        let x = DirtyExtents::from_extents(4096, 10 * 4096 + 1, [0u64, 10].into_iter());
        let good = Frame::PeerDirty(x).encode();
        assert!(decode(&good).is_ok());
        // Re-encoded with a forged header field (and a correct checksum): refused.
        let forge = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.clone();
            f(&mut b);
            let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..36]), &b[HEADER_LEN..]);
            b[36..40].copy_from_slice(&crc.to_le_bytes());
            decode(&b)
        };
        type Forgery<'a> = &'a dyn Fn(&mut Vec<u8>);
        let bad: [Forgery; 5] = [
            &|b| b[16..24].copy_from_slice(&4095u64.to_le_bytes()), // extent
            &|b| b[24..32].copy_from_slice(&0u64.to_le_bytes()),    // disk size
            &|b| b[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes()), // bits too few
            &|b| {
                b.push(0); // a byte too many
                b[32..36].copy_from_slice(&3u32.to_le_bytes());
            },
            &|b| b[HEADER_LEN + 1] |= 0x80, // a bit past the last extent
        ];
        for (i, f) in bad.iter().enumerate() {
            assert!(
                matches!(
                    forge(f),
                    Err(ProtocolError::Malformed {
                        kind: "PEER_DIRTY",
                        ..
                    })
                ),
                "forgery {i}"
            );
        }
        // The fuzz seed (fuzz/seeds.py): WELCOME, a good PEER_DIRTY, a forged one.
        let seed = include_bytes!("../../fuzz/corpus/frame_decode/welcome-peer-dirty");
        let (w, n) = Frame::decode(seed).unwrap();
        assert!(matches!(w, Frame::Welcome(_)));
        let (x, m) = Frame::decode(&seed[n..]).unwrap();
        let Frame::PeerDirty(x) = x else {
            panic!("{x:?}")
        };
        assert_eq!(x.ranges().count(), 2);
        assert!(Frame::decode(&seed[n + m..]).is_err());
        // Truncated anywhere: an error, never a panic.
        for n in 0..good.len() {
            assert!(Frame::decode(&good[..n]).is_err());
        }
    }

    #[test]
    fn any_flipped_bit_is_rejected() {
        let f = Frame::write(42, 8192, (0..64u8).collect::<Vec<u8>>());
        let good = f.encode();
        for byte in 0..good.len() {
            for bit in 0..8 {
                let mut bad = good.clone();
                bad[byte] ^= 1 << bit;
                if let Ok(g) = decode(&bad) {
                    panic!("flip at {byte}.{bit} decoded as {g:?}");
                }
            }
        }
    }

    #[test]
    fn oversized_payload_is_refused_before_reading_it() {
        let mut bytes = Frame::Heartbeat.encode();
        bytes[32..36].copy_from_slice(&(u32::MAX).to_le_bytes());
        let h: [u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().unwrap();
        assert!(matches!(
            Frame::parse_header(&h),
            Err(ProtocolError::PayloadTooLarge(_))
        ));
    }

    async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, f: &Frame) -> std::io::Result<()> {
        w.write_all(&f.encode()).await
    }

    #[tokio::test]
    async fn async_read_write() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        for f in samples() {
            write_frame(&mut a, &f).await.unwrap();
        }
        for f in samples() {
            assert_eq!(read_frame(&mut b).await.unwrap(), f);
        }
    }

    #[tokio::test]
    async fn a_payload_that_arrives_in_pieces_is_read_whole_and_a_cut_one_is_an_error() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + 1) as u8).collect();
        let f = Frame::write(9, 1 << 20, data);
        // A 5-byte pipe: every read returns a few bytes of the payload.
        let (mut a, mut b) = tokio::io::duplex(5);
        let bytes = f.encode();
        let writer = tokio::spawn(async move { a.write_all(&bytes).await.map(|()| a) });
        assert_eq!(read_frame(&mut b).await.unwrap(), f);
        drop(writer.await.unwrap().unwrap());
        // The stream ends in the middle of the payload.
        let bytes = f.encode();
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        a.write_all(&bytes[..bytes.len() - 1]).await.unwrap();
        drop(a);
        match read_frame(&mut b).await {
            Err(ProtocolError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof),
            other => panic!("a cut payload gave {other:?}"),
        }
    }
}

#[cfg(test)]
mod golden;
