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

use bytes::Bytes;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::dirty::DirtyExtents;
use super::metadata::{Generations, GENERATIONS_LEN};
use crate::storage::Change;

/// "COLO" as the first four bytes on the wire.
pub const MAGIC: u32 = u32::from_le_bytes(*b"COLO");
/// Protocol version spoken by this build.
pub const VERSION: u32 = 2;
/// Size of a frame header.
pub const HEADER_LEN: usize = 40;
/// Largest payload accepted. Larger guest writes are split into several frames.
pub const MAX_PAYLOAD: usize = 4 << 20;

const FLAG_UNMAP: u8 = 1;
const FLAG_SYNC: u32 = 1;
const FLAG_DIRTY_LOG: u32 = 2;
const FLAG_MATCH: u8 = 1;
const FLAG_ALLOW_FULL: u32 = 1;
const FLAG_DISCARD_MY_DATA: u32 = 2;
const FLAG_OWN_DIRTY: u32 = 4;
/// HELLO payload size.
pub const HELLO_LEN: usize = 28 + GENERATIONS_LEN;
/// WELCOME payload size.
pub const WELCOME_LEN: usize = 24 + GENERATIONS_LEN;

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
    Heartbeat,
    Error {
        message: String,
    },
}

const T_HELLO: u8 = 1;
const T_WELCOME: u8 = 2;
const T_WRITE: u8 = 3;
const T_WRITE_ZEROES: u8 = 4;
const T_DISCARD: u8 = 5;
const T_FLUSH: u8 = 6;
const T_CHECKPOINT: u8 = 7;
const T_ACK: u8 = 8;
const T_HEARTBEAT: u8 = 9;
const T_ERROR: u8 = 10;
const T_VERIFY: u8 = 12;
const T_VERIFY_RESULT: u8 = 13;
const T_MARKER: u8 = 11;
const T_PEER_DIRTY: u8 = 14;

/// Most queues a MARKER describes (the device's limit).
pub const MAX_MARK_QUEUES: usize = 64;
const UNKNOWN_BASE: u32 = u32::MAX;

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
            | Frame::Verify { seq, .. }
            | Frame::VerifyResult { seq, .. }
            | Frame::Marker { seq, .. } => *seq,
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
        let mut hello_buf = Vec::new();
        let (ty, flags, seq, offset, length, payload): (u8, u8, u64, u64, u64, &[u8]) = match self {
            Frame::Hello(h) => {
                hello_buf.extend_from_slice(&h.version.to_le_bytes());
                hello_buf.extend_from_slice(&h.block_size.to_le_bytes());
                hello_buf.extend_from_slice(&h.disk_size.to_le_bytes());
                hello_buf.extend_from_slice(&h.epoch.to_le_bytes());
                let flags = if h.sync { FLAG_SYNC } else { 0 }
                    | if h.dirty_log { FLAG_DIRTY_LOG } else { 0 };
                hello_buf.extend_from_slice(&flags.to_le_bytes());
                h.gens.encode_into(&mut hello_buf);
                (T_HELLO, 0, 0, 0, 0, &hello_buf)
            }
            Frame::Welcome(w) => {
                hello_buf.extend_from_slice(&w.version.to_le_bytes());
                hello_buf.extend_from_slice(&w.block_size.to_le_bytes());
                hello_buf.extend_from_slice(&w.disk_size.to_le_bytes());
                hello_buf.extend_from_slice(&w.decision.to_le_bytes());
                let flags = if w.allow_full { FLAG_ALLOW_FULL } else { 0 }
                    | if w.discard_my_data {
                        FLAG_DISCARD_MY_DATA
                    } else {
                        0
                    }
                    | if w.own_dirty { FLAG_OWN_DIRTY } else { 0 };
                hello_buf.extend_from_slice(&flags.to_le_bytes());
                w.gens.encode_into(&mut hello_buf);
                (T_WELCOME, 0, 0, 0, 0, &hello_buf)
            }
            Frame::Change { seq, change } => match change {
                Change::Write { offset, data } => {
                    (T_WRITE, 0, *seq, *offset, data.len() as u64, &data[..])
                }
                Change::WriteZeroes { offset, len, unmap } => (
                    T_WRITE_ZEROES,
                    if *unmap { FLAG_UNMAP } else { 0 },
                    *seq,
                    *offset,
                    *len,
                    &[],
                ),
                Change::Discard { offset, len } => (T_DISCARD, 0, *seq, *offset, *len, &[]),
                Change::Flush => (T_FLUSH, 0, *seq, 0, 0, &[]),
            },
            Frame::Checkpoint { seq, epoch } => (T_CHECKPOINT, 0, *seq, 0, *epoch, &[]),
            Frame::Marker { seq, mark } => {
                for b in &mark.bases {
                    let v = b.map_or(UNKNOWN_BASE, u32::from);
                    hello_buf.extend_from_slice(&v.to_le_bytes());
                }
                (T_MARKER, 0, *seq, 0, mark.epoch, &hello_buf)
            }
            Frame::Ack { seq } => (T_ACK, 0, *seq, 0, 0, &[]),
            Frame::PeerDirty(x) => (T_PEER_DIRTY, 0, 0, x.extent(), x.disk_size(), x.bits()),
            Frame::Verify {
                seq,
                offset,
                len,
                crc,
            } => {
                hello_buf.extend_from_slice(&crc.to_le_bytes());
                (T_VERIFY, 0, *seq, *offset, *len, &hello_buf)
            }
            Frame::VerifyResult {
                seq,
                offset,
                len,
                matches,
            } => (
                T_VERIFY_RESULT,
                if *matches { FLAG_MATCH } else { 0 },
                *seq,
                *offset,
                *len,
                &[],
            ),
            Frame::Heartbeat => (T_HEARTBEAT, 0, 0, 0, 0, &[]),
            Frame::Error { message } => (T_ERROR, 0, 0, 0, 0, message.as_bytes()),
        };
        let start = out.len();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.push(ty);
        out.push(flags);
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&seq.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&length.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&out[start..start + 36]), payload);
        out.extend_from_slice(&crc.to_le_bytes());
        match self {
            Frame::Change {
                change: Change::Write { data, .. },
                ..
            } => Some(data.clone()),
            _ => {
                out.extend_from_slice(payload);
                None
            }
        }
    }

    /// The encoded frame.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode_into(&mut v);
        v
    }

    /// Decodes a header; returns it with the payload length still to read.
    pub fn parse_header(h: &[u8; HEADER_LEN]) -> Result<RawHeader, ProtocolError> {
        let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let magic = u32_at(0);
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic(magic));
        }
        let payload_len = u32_at(32) as u64;
        if payload_len > MAX_PAYLOAD as u64 {
            return Err(ProtocolError::PayloadTooLarge(payload_len));
        }
        Ok(RawHeader {
            ty: h[4],
            flags: h[5],
            seq: u64_at(8),
            offset: u64_at(16),
            length: u64_at(24),
            payload_len: payload_len as usize,
            crc: u32_at(36),
            header_crc: crc32c::crc32c(&h[..36]),
        })
    }

    /// Builds a frame from a checked header and its payload.
    pub fn from_parts(h: RawHeader, payload: Vec<u8>) -> Result<Frame, ProtocolError> {
        let actual = crc32c::crc32c_append(h.header_crc, &payload);
        if actual != h.crc {
            return Err(ProtocolError::BadChecksum {
                expected: h.crc,
                actual,
            });
        }
        let no_payload = |kind: &'static str| -> Result<(), ProtocolError> {
            if payload.is_empty() {
                Ok(())
            } else {
                Err(ProtocolError::Malformed {
                    kind,
                    why: "unexpected payload",
                })
            }
        };
        let le32 = |o: usize| {
            u32::from_le_bytes([payload[o], payload[o + 1], payload[o + 2], payload[o + 3]])
        };
        let le64 = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&payload[o..o + 8]);
            u64::from_le_bytes(b)
        };
        Ok(match h.ty {
            T_HELLO => {
                if payload.len() != HELLO_LEN {
                    return Err(ProtocolError::Malformed {
                        kind: "HELLO",
                        why: "payload is not 112 bytes",
                    });
                }
                let gens = Generations::decode(&payload[28..]).ok_or(ProtocolError::Malformed {
                    kind: "HELLO",
                    why: "bad generations",
                })?;
                Frame::Hello(Hello {
                    version: le32(0),
                    block_size: le32(4),
                    disk_size: le64(8),
                    epoch: le64(16),
                    sync: le32(24) & FLAG_SYNC != 0,
                    dirty_log: le32(24) & FLAG_DIRTY_LOG != 0,
                    gens,
                })
            }
            T_WELCOME => {
                if payload.len() != WELCOME_LEN {
                    return Err(ProtocolError::Malformed {
                        kind: "WELCOME",
                        why: "payload is not 108 bytes",
                    });
                }
                let gens = Generations::decode(&payload[24..]).ok_or(ProtocolError::Malformed {
                    kind: "WELCOME",
                    why: "bad generations",
                })?;
                Frame::Welcome(Welcome {
                    version: le32(0),
                    block_size: le32(4),
                    disk_size: le64(8),
                    decision: le32(16),
                    allow_full: le32(20) & FLAG_ALLOW_FULL != 0,
                    discard_my_data: le32(20) & FLAG_DISCARD_MY_DATA != 0,
                    own_dirty: le32(20) & FLAG_OWN_DIRTY != 0,
                    gens,
                })
            }
            T_WRITE => {
                if h.length != payload.len() as u64 || payload.is_empty() {
                    return Err(ProtocolError::Malformed {
                        kind: "WRITE",
                        why: "length does not match payload",
                    });
                }
                Frame::Change {
                    seq: h.seq,
                    change: Change::Write {
                        offset: h.offset,
                        data: Bytes::from(payload),
                    },
                }
            }
            T_WRITE_ZEROES => {
                no_payload("WRITE_ZEROES")?;
                Frame::Change {
                    seq: h.seq,
                    change: Change::WriteZeroes {
                        offset: h.offset,
                        len: h.length,
                        unmap: h.flags & FLAG_UNMAP != 0,
                    },
                }
            }
            T_DISCARD => {
                no_payload("DISCARD")?;
                Frame::Change {
                    seq: h.seq,
                    change: Change::Discard {
                        offset: h.offset,
                        len: h.length,
                    },
                }
            }
            T_FLUSH => {
                no_payload("FLUSH")?;
                Frame::Change {
                    seq: h.seq,
                    change: Change::Flush,
                }
            }
            T_CHECKPOINT => {
                no_payload("CHECKPOINT")?;
                Frame::Checkpoint {
                    seq: h.seq,
                    epoch: h.length,
                }
            }
            T_ACK => {
                no_payload("ACK")?;
                Frame::Ack { seq: h.seq }
            }
            T_PEER_DIRTY => {
                // offset = extent size, length = disk size, payload = one bit per extent.
                let x = DirtyExtents::decode(h.offset, h.length, &payload).map_err(|e| {
                    ProtocolError::Malformed {
                        kind: "PEER_DIRTY",
                        why: match e {
                            crate::replication::dirty::ExtentsError::BadExtent => "bad extent size",
                            crate::replication::dirty::ExtentsError::EmptyDisk => "disk size 0",
                            crate::replication::dirty::ExtentsError::BadLength => {
                                "bitmap length does not match the disk"
                            }
                            crate::replication::dirty::ExtentsError::TrailingBits => {
                                "bits past the last extent"
                            }
                        },
                    }
                })?;
                Frame::PeerDirty(x)
            }
            T_VERIFY => {
                if payload.len() != 4 || h.length == 0 || h.length > MAX_PAYLOAD as u64 {
                    return Err(ProtocolError::Malformed {
                        kind: "VERIFY",
                        why: "payload is not 4 bytes or bad length",
                    });
                }
                Frame::Verify {
                    seq: h.seq,
                    offset: h.offset,
                    len: h.length,
                    crc: le32(0),
                }
            }
            T_VERIFY_RESULT => {
                no_payload("VERIFY_RESULT")?;
                Frame::VerifyResult {
                    seq: h.seq,
                    offset: h.offset,
                    len: h.length,
                    matches: h.flags & FLAG_MATCH != 0,
                }
            }
            T_MARKER => {
                if payload.is_empty()
                    || payload.len() % 4 != 0
                    || payload.len() > 4 * MAX_MARK_QUEUES
                {
                    return Err(ProtocolError::Malformed {
                        kind: "MARKER",
                        why: "payload is not 1 to 64 queue positions",
                    });
                }
                let mut bases = Vec::with_capacity(payload.len() / 4);
                for q in payload.chunks_exact(4) {
                    let v = u32::from_le_bytes([q[0], q[1], q[2], q[3]]);
                    bases.push(match v {
                        UNKNOWN_BASE => None,
                        v => Some(u16::try_from(v).map_err(|_| ProtocolError::Malformed {
                            kind: "MARKER",
                            why: "queue position above 65535",
                        })?),
                    });
                }
                Frame::Marker {
                    seq: h.seq,
                    mark: Mark {
                        epoch: h.length,
                        bases,
                    },
                }
            }
            T_HEARTBEAT => {
                no_payload("HEARTBEAT")?;
                Frame::Heartbeat
            }
            T_ERROR => Frame::Error {
                message: String::from_utf8_lossy(&payload).into_owned(),
            },
            other => return Err(ProtocolError::UnknownType(other)),
        })
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
