//! The frame types of the replication link and, for each, what the codec needs: its number and
//! name, the payload sizes it allows, its decoder ([`FrameType::spec`], one row per type, as
//! DRBD's `drbd_cmd_handler[]` pairs each packet with its size and handler), and the encoder of
//! each [`Frame`] ([`Frame::wire_parts`]).

use std::fmt;
use std::mem::size_of;

use bytes::Bytes;
use vm_memory::ByteValued;

use super::wire::{
    FixedPayload, HelloPayload, QueuePosition, VerifyPayload, WelcomePayload, FLAG_MATCH,
    FLAG_UNMAP,
};
use super::{Frame, Mark, ProtocolError, RawHeader, MAX_MARK_QUEUES, MAX_PAYLOAD};
use crate::replication::dirty::{DirtyExtents, ExtentsError};
use crate::storage::Change;

/// The type byte of a frame header (docs/replication-protocol.md).
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameType {
    Hello = 1,
    Welcome = 2,
    Write = 3,
    WriteZeroes = 4,
    Discard = 5,
    Flush = 6,
    Checkpoint = 7,
    Ack = 8,
    Heartbeat = 9,
    Error = 10,
    Marker = 11,
    Verify = 12,
    VerifyResult = 13,
    PeerDirty = 14,
    Durable = 15,
}

impl FrameType {
    /// Every type, in number order.
    pub const ALL: [FrameType; 15] = [
        FrameType::Hello,
        FrameType::Welcome,
        FrameType::Write,
        FrameType::WriteZeroes,
        FrameType::Discard,
        FrameType::Flush,
        FrameType::Checkpoint,
        FrameType::Ack,
        FrameType::Heartbeat,
        FrameType::Error,
        FrameType::Marker,
        FrameType::Verify,
        FrameType::VerifyResult,
        FrameType::PeerDirty,
        FrameType::Durable,
    ];

    /// The type's name, for messages.
    pub fn name(self) -> &'static str {
        self.spec().name
    }

    /// The type's row of the codec's table: name, payload sizes, decoder.
    pub(super) fn spec(self) -> FrameSpec {
        use PayloadRule::*;
        let row = |name, payload, decode| FrameSpec {
            name,
            payload,
            decode,
        };
        match self {
            FrameType::Hello => row("HELLO", Fixed(size_of::<HelloPayload>()), decode_hello),
            FrameType::Welcome => row(
                "WELCOME",
                Fixed(size_of::<WelcomePayload>()),
                decode_welcome,
            ),
            FrameType::Write => row("WRITE", WriteData, decode_write),
            FrameType::WriteZeroes => row("WRITE_ZEROES", Empty, decode_write_zeroes),
            FrameType::Discard => row("DISCARD", Empty, decode_discard),
            FrameType::Flush => row("FLUSH", Empty, decode_flush),
            FrameType::Checkpoint => row("CHECKPOINT", Empty, decode_checkpoint),
            FrameType::Ack => row("ACK", Empty, |h, _| Ok(Frame::Ack { seq: h.seq })),
            FrameType::Heartbeat => row("HEARTBEAT", Empty, |_, _| Ok(Frame::Heartbeat)),
            FrameType::Error => row("ERROR", Text, decode_error),
            FrameType::Marker => row("MARKER", QueuePositions, decode_marker),
            FrameType::Verify => row("VERIFY", VerifyCrc, decode_verify),
            FrameType::VerifyResult => row("VERIFY_RESULT", Empty, decode_verify_result),
            FrameType::PeerDirty => row("PEER_DIRTY", ExtentBits, decode_peer_dirty),
            FrameType::Durable => row("DURABLE", Empty, |h, _| {
                Ok(Frame::Durable {
                    seq: h.seq,
                    epoch: h.length,
                })
            }),
        }
    }
}

impl TryFrom<u8> for FrameType {
    type Error = ProtocolError;

    fn try_from(ty: u8) -> Result<Self, ProtocolError> {
        FrameType::ALL
            .into_iter()
            .find(|t| *t as u8 == ty)
            .ok_or(ProtocolError::UnknownType(ty))
    }
}

/// A frame type's row: what [`Frame::from_parts`] checks and calls.
pub(super) struct FrameSpec {
    pub name: &'static str,
    pub payload: PayloadRule,
    /// Builds the frame from a header and a payload its rule allows.
    pub decode: fn(&RawHeader, Vec<u8>) -> Result<Frame, ProtocolError>,
}

/// Which payload sizes a frame type allows (its `Display` says what a refused one is not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadRule {
    /// None.
    Empty,
    /// Exactly this many bytes (a fixed payload struct).
    Fixed(usize),
    /// WRITE: the data, at least a byte, as many as the header's length.
    WriteData,
    /// VERIFY: a crc32c (4 bytes), and a header length of 1 byte to [`MAX_PAYLOAD`].
    VerifyCrc,
    /// MARKER: 1 to [`MAX_MARK_QUEUES`] queue positions (4 bytes each).
    QueuePositions,
    /// PEER_DIRTY: a bitmap of the disk's extents ([`DirtyExtents::decode`] checks it).
    ExtentBits,
    /// ERROR: text of any length.
    Text,
}

impl PayloadRule {
    /// Whether a frame with header `h` may carry `len` payload bytes.
    pub fn allows(self, h: &RawHeader, len: usize) -> bool {
        match self {
            PayloadRule::Empty => len == 0,
            PayloadRule::Fixed(n) => len == n,
            PayloadRule::WriteData => len != 0 && h.length == len as u64,
            PayloadRule::VerifyCrc => {
                len == size_of::<VerifyPayload>() && h.length != 0 && h.length <= MAX_PAYLOAD as u64
            }
            PayloadRule::QueuePositions => {
                let entry = size_of::<QueuePosition>();
                len != 0 && len % entry == 0 && len <= entry * MAX_MARK_QUEUES
            }
            PayloadRule::ExtentBits | PayloadRule::Text => true,
        }
    }
}

impl fmt::Display for PayloadRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PayloadRule::Empty => write!(f, "unexpected payload"),
            PayloadRule::Fixed(n) => write!(f, "payload is not {n} bytes"),
            PayloadRule::WriteData => write!(f, "length does not match payload"),
            PayloadRule::VerifyCrc => write!(
                f,
                "payload is not {} bytes or bad length",
                size_of::<VerifyPayload>()
            ),
            PayloadRule::QueuePositions => {
                write!(f, "payload is not 1 to {MAX_MARK_QUEUES} queue positions")
            }
            PayloadRule::ExtentBits => write!(f, "bitmap length does not match the disk"),
            PayloadRule::Text => write!(f, "payload too large"),
        }
    }
}

fn malformed(kind: &'static str, why: &'static str) -> ProtocolError {
    ProtocolError::Malformed { kind, why }
}

fn decode_hello(_: &RawHeader, payload: Vec<u8>) -> Result<Frame, ProtocolError> {
    let hello = HelloPayload::read(&payload)?.hello();
    Ok(Frame::Hello(
        hello.ok_or(malformed("HELLO", "bad generations"))?,
    ))
}

fn decode_welcome(_: &RawHeader, payload: Vec<u8>) -> Result<Frame, ProtocolError> {
    let welcome = WelcomePayload::read(&payload)?.welcome();
    Ok(Frame::Welcome(
        welcome.ok_or(malformed("WELCOME", "bad generations"))?,
    ))
}

fn stream(h: &RawHeader, change: Change<Bytes>) -> Result<Frame, ProtocolError> {
    Ok(Frame::Change { seq: h.seq, change })
}

fn decode_write(h: &RawHeader, payload: Vec<u8>) -> Result<Frame, ProtocolError> {
    let (offset, data) = (h.offset, Bytes::from(payload));
    stream(h, Change::Write { offset, data })
}

fn decode_write_zeroes(h: &RawHeader, _: Vec<u8>) -> Result<Frame, ProtocolError> {
    let (offset, len, unmap) = (h.offset, h.length, h.flags & FLAG_UNMAP != 0);
    stream(h, Change::WriteZeroes { offset, len, unmap })
}

fn decode_discard(h: &RawHeader, _: Vec<u8>) -> Result<Frame, ProtocolError> {
    let (offset, len) = (h.offset, h.length);
    stream(h, Change::Discard { offset, len })
}

fn decode_flush(h: &RawHeader, _: Vec<u8>) -> Result<Frame, ProtocolError> {
    stream(h, Change::Flush)
}

/// The header's length is the new epoch.
fn decode_checkpoint(h: &RawHeader, _: Vec<u8>) -> Result<Frame, ProtocolError> {
    let (seq, epoch) = (h.seq, h.length);
    Ok(Frame::Checkpoint { seq, epoch })
}

fn decode_error(_: &RawHeader, payload: Vec<u8>) -> Result<Frame, ProtocolError> {
    let message = String::from_utf8_lossy(&payload).into_owned();
    Ok(Frame::Error { message })
}

/// The header's length is the epoch; the payload one position per queue.
fn decode_marker(h: &RawHeader, payload: Vec<u8>) -> Result<Frame, ProtocolError> {
    let invalid = || malformed(QueuePosition::KIND, QueuePosition::INVALID);
    let bases = payload
        .chunks(size_of::<QueuePosition>())
        .map(|q| QueuePosition::read(q)?.get().map_err(|_| invalid()))
        .collect::<Result<_, ProtocolError>>()?;
    let (seq, epoch) = (h.seq, h.length);
    Ok(Frame::Marker {
        seq,
        mark: Mark { epoch, bases },
    })
}

fn decode_verify(h: &RawHeader, payload: Vec<u8>) -> Result<Frame, ProtocolError> {
    let crc = VerifyPayload::read(&payload)?.crc.to_native();
    let (seq, offset, len) = (h.seq, h.offset, h.length);
    Ok(Frame::Verify {
        seq,
        offset,
        len,
        crc,
    })
}

fn decode_verify_result(h: &RawHeader, _: Vec<u8>) -> Result<Frame, ProtocolError> {
    let (seq, offset, len, matches) = (h.seq, h.offset, h.length, h.flags & FLAG_MATCH != 0);
    Ok(Frame::VerifyResult {
        seq,
        offset,
        len,
        matches,
    })
}

/// The header's offset is the extent size, its length the disk size.
fn decode_peer_dirty(h: &RawHeader, payload: Vec<u8>) -> Result<Frame, ProtocolError> {
    let x = DirtyExtents::decode(h.offset, h.length, &payload).map_err(|e| {
        let why = match e {
            ExtentsError::BadExtent => "bad extent size",
            ExtentsError::EmptyDisk => "disk size 0",
            ExtentsError::BadLength => "bitmap length does not match the disk",
            ExtentsError::TrailingBits => "bits past the last extent",
        };
        malformed("PEER_DIRTY", why)
    })?;
    Ok(Frame::PeerDirty(x))
}

/// A frame's header fields and payload, before the header is laid out.
pub(super) struct WireParts<'a> {
    pub ty: FrameType,
    pub flags: u8,
    pub seq: u64,
    pub offset: u64,
    pub length: u64,
    pub payload: Payload<'a>,
}

impl<'a> WireParts<'a> {
    /// A frame of type `ty` with these header fields, no flags and no payload.
    fn new(ty: FrameType, seq: u64, offset: u64, length: u64) -> Self {
        let payload = Payload::Bytes(&[]);
        let flags = 0;
        WireParts {
            ty,
            flags,
            seq,
            offset,
            length,
            payload,
        }
    }

    fn payload(self, payload: Payload<'a>) -> Self {
        WireParts { payload, ..self }
    }

    /// With the header flag `flag` set when `on`.
    fn flag(self, flag: u8, on: bool) -> Self {
        let flags = self.flags | if on { flag } else { 0 };
        WireParts { flags, ..self }
    }
}

/// A payload to send: the frame's own bytes, or a fixed payload struct built for it.
pub(super) enum Payload<'a> {
    Bytes(&'a [u8]),
    Hello(HelloPayload),
    Welcome(WelcomePayload),
    Verify(VerifyPayload),
    /// MARKER's [`QueuePosition`]s, laid out.
    Queues(Vec<u8>),
}

impl Payload<'_> {
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Payload::Bytes(b) => b,
            Payload::Hello(p) => p.as_slice(),
            Payload::Welcome(p) => p.as_slice(),
            Payload::Verify(p) => p.as_slice(),
            Payload::Queues(b) => b,
        }
    }
}

impl Frame {
    /// The frame's header fields and payload.
    pub(super) fn wire_parts(&self) -> WireParts<'_> {
        use FrameType as T;
        match self {
            Frame::Hello(h) => WireParts::new(T::Hello, 0, 0, 0).payload(Payload::Hello(h.into())),
            Frame::Welcome(w) => {
                WireParts::new(T::Welcome, 0, 0, 0).payload(Payload::Welcome(w.into()))
            }
            Frame::Change { seq, change } => change_parts(*seq, change),
            Frame::Checkpoint { seq, epoch } => WireParts::new(T::Checkpoint, *seq, 0, *epoch),
            Frame::Ack { seq } => WireParts::new(T::Ack, *seq, 0, 0),
            Frame::Durable { seq, epoch } => WireParts::new(T::Durable, *seq, 0, *epoch),
            Frame::Heartbeat => WireParts::new(T::Heartbeat, 0, 0, 0),
            Frame::Error { message } => {
                WireParts::new(T::Error, 0, 0, 0).payload(Payload::Bytes(message.as_bytes()))
            }
            Frame::Marker { seq, mark } => {
                let queues = mark.bases.iter().map(|&b| QueuePosition::from(b));
                let bytes = queues.flat_map(|q| q.as_slice().to_vec()).collect();
                WireParts::new(T::Marker, *seq, 0, mark.epoch).payload(Payload::Queues(bytes))
            }
            Frame::Verify {
                seq,
                offset,
                len,
                crc,
            } => {
                let p = VerifyPayload { crc: (*crc).into() };
                WireParts::new(T::Verify, *seq, *offset, *len).payload(Payload::Verify(p))
            }
            Frame::VerifyResult {
                seq,
                offset,
                len,
                matches,
            } => WireParts::new(T::VerifyResult, *seq, *offset, *len).flag(FLAG_MATCH, *matches),
            Frame::PeerDirty(x) => WireParts::new(T::PeerDirty, 0, x.extent(), x.disk_size())
                .payload(Payload::Bytes(x.bits())),
        }
    }
}

/// WRITE (its data as the payload), WRITE_ZEROES, DISCARD or FLUSH.
fn change_parts(seq: u64, change: &Change<Bytes>) -> WireParts<'_> {
    use FrameType as T;
    match change {
        Change::Write { offset, data } => {
            WireParts::new(T::Write, seq, *offset, data.len() as u64).payload(Payload::Bytes(data))
        }
        Change::WriteZeroes { offset, len, unmap } => {
            WireParts::new(T::WriteZeroes, seq, *offset, *len).flag(FLAG_UNMAP, *unmap)
        }
        Change::Discard { offset, len } => WireParts::new(T::Discard, seq, *offset, *len),
        Change::Flush => WireParts::new(T::Flush, seq, 0, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::protocol::{HEADER_LEN, HELLO_LEN, WELCOME_LEN};

    #[test]
    fn every_type_byte_names_one_type_in_number_order() {
        for (i, t) in FrameType::ALL.into_iter().enumerate() {
            assert_eq!(t as usize, i + 1, "{t:?}");
        }
        for byte in 0..=u8::MAX {
            match FrameType::try_from(byte) {
                Ok(t) => assert_eq!(t as u8, byte),
                Err(e) => {
                    assert!(!(1..=15).contains(&byte), "{byte}");
                    assert!(matches!(e, ProtocolError::UnknownType(b) if b == byte));
                }
            }
        }
        let names: std::collections::BTreeSet<_> =
            FrameType::ALL.iter().map(|t| t.name()).collect();
        assert_eq!(names.len(), FrameType::ALL.len());
    }

    /// The sizes docs/replication-protocol.md gives, and the refusals that name them.
    #[test]
    fn payload_sizes_are_the_documented_ones() {
        assert_eq!((HEADER_LEN, HELLO_LEN, WELCOME_LEN), (40, 112, 108));
        let rule = |t: FrameType| t.spec().payload.to_string();
        assert_eq!(rule(FrameType::Hello), "payload is not 112 bytes");
        assert_eq!(rule(FrameType::Welcome), "payload is not 108 bytes");
        assert_eq!(
            rule(FrameType::Verify),
            "payload is not 4 bytes or bad length"
        );
        assert_eq!(
            rule(FrameType::Marker),
            "payload is not 1 to 64 queue positions"
        );
    }
}
