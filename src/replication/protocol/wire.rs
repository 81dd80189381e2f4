//! The byte layouts of the replication link (docs/replication-protocol.md, "Frame format"): the
//! frame header and every fixed payload, each a `#[repr(C, packed)]` [`ByteValued`] struct (as
//! vhost-user's messages are in rust-vmm's `vhost` crate), with its conversions from and to the
//! values the rest of the program uses and an `is_valid()` for the values a peer may send.
//!
//! Byte order: every integer field is one of vm-memory's little-endian types ([`Le16`],
//! [`Le32`], [`Le64`]: stored with `to_le()`, read with `from_le()`), so a struct's bytes are the
//! wire's on any host; `packed` leaves no padding (an aligned WELCOME struct, 108 bytes of
//! fields, would be padded to 112). A packed field is only ever read by value (`to_native()`
//! copies it), never borrowed. The generations inside HELLO and WELCOME
//! are bytes laid out by [`Generations::encode_into`], the one definition of that record (the
//! metadata file holds the same bytes).

use std::mem::{offset_of, size_of};

use vm_memory::{ByteValued, Le16, Le32, Le64};

use super::{Hello, PayloadRule, ProtocolError, Welcome, HEADER_LEN, MAGIC};
use crate::replication::metadata::{Generations, GENERATIONS_LEN};

/// A payload of a fixed size whose bytes a peer chose, and which values this side accepts
/// (vhost-user's `VhostUserMsgValidator::is_valid`).
pub(super) trait FixedPayload: ByteValued {
    /// The frame type's name, for errors.
    const KIND: &'static str;
    /// What an invalid payload is, for errors.
    const INVALID: &'static str = "invalid payload";

    /// Whether the peer's values are acceptable. Every byte pattern is a value of the struct;
    /// by default every value is acceptable (the receiver judges it, with an answer).
    fn is_valid(&self) -> bool {
        true
    }

    /// The payload in `bytes` when it has exactly the struct's size and valid values.
    fn read(bytes: &[u8]) -> Result<Self, ProtocolError> {
        match Self::from_slice(bytes) {
            Some(p) if p.is_valid() => Ok(*p),
            Some(_) => Err(ProtocolError::Malformed {
                kind: Self::KIND,
                why: Self::INVALID,
            }),
            None => Err(ProtocolError::PayloadSize {
                kind: Self::KIND,
                rule: PayloadRule::Fixed(size_of::<Self>()),
            }),
        }
    }
}

/// The 40-byte header in front of every frame.
#[repr(C, packed)]
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct FrameHeader {
    pub magic: Le32,
    pub ty: u8,
    pub flags: u8,
    pub reserved: Le16,
    pub seq: Le64,
    pub offset: Le64,
    pub length: Le64,
    pub payload_len: Le32,
    /// crc32c of the header's bytes before this field, then of the payload.
    pub crc: Le32,
}

// SAFETY: a packed struct of integers: no padding, and every byte pattern is a value.
unsafe impl ByteValued for FrameHeader {}

const _: () = assert!(size_of::<FrameHeader>() == HEADER_LEN);

/// How many header bytes the checksum covers (those before the crc field).
pub(super) const CRC_COVERS: usize = offset_of!(FrameHeader, crc);

impl FrameHeader {
    /// A header with a correct magic and checksum for `payload`.
    pub fn new(ty: u8, flags: u8, seq: u64, offset: u64, length: u64, payload: &[u8]) -> Self {
        let mut h = FrameHeader {
            magic: MAGIC.into(),
            ty,
            flags,
            reserved: 0.into(),
            seq: seq.into(),
            offset: offset.into(),
            length: length.into(),
            payload_len: (payload.len() as u32).into(),
            crc: 0.into(),
        };
        let head = crc32c::crc32c(&h.as_slice()[..CRC_COVERS]);
        h.crc = crc32c::crc32c_append(head, payload).into();
        h
    }
}

/// Header flag of WRITE_ZEROES: the range may be deallocated.
pub(super) const FLAG_UNMAP: u8 = 1;
/// Header flag of VERIFY_RESULT: the secondary's crc equals the primary's.
pub(super) const FLAG_MATCH: u8 = 1;

/// HELLO's flags: synchronous mode.
const FLAG_SYNC: u32 = 1;
/// HELLO's flags: the primary keeps a persistent dirty log.
const FLAG_DIRTY_LOG: u32 = 2;
/// HELLO's flags: the primary takes DURABLE (a MARKER may be acknowledged before its sync).
const FLAG_TAKES_DURABLE: u32 = 4;
/// WELCOME's flags: the secondary allows a full sync.
const FLAG_ALLOW_FULL: u32 = 1;
/// WELCOME's flags: `--discard-my-data`.
const FLAG_DISCARD_MY_DATA: u32 = 2;
/// WELCOME's flags: the secondary has a readable dirty log of its own.
const FLAG_OWN_DIRTY: u32 = 4;
/// WELCOME's flags: the secondary acknowledges a MARKER once applied and sends DURABLE after
/// its sync (only in answer to a HELLO with [`FLAG_TAKES_DURABLE`]).
const FLAG_SENDS_DURABLE: u32 = 8;

/// `bit` when `on`, else 0.
fn flag(on: bool, bit: u32) -> u32 {
    if on {
        bit
    } else {
        0
    }
}

/// A [`Generations`] record as HELLO and WELCOME carry it.
fn gens_bytes(g: &Generations) -> [u8; GENERATIONS_LEN] {
    let mut v = Vec::with_capacity(GENERATIONS_LEN);
    g.encode_into(&mut v);
    let mut b = [0u8; GENERATIONS_LEN];
    b.copy_from_slice(&v);
    b
}

/// HELLO's payload: the primary's disk and replication state.
#[repr(C, packed)]
#[derive(Debug, Clone, Copy)]
pub(super) struct HelloPayload {
    version: Le32,
    block_size: Le32,
    disk_size: Le64,
    epoch: Le64,
    flags: Le32,
    gens: [u8; GENERATIONS_LEN],
}

// SAFETY: a packed struct of integers and bytes: no padding, every byte pattern is a value.
unsafe impl ByteValued for HelloPayload {}

/// Any version, size and flags: the handshake judges them, with an answer to the peer. (The
/// generations are checked by [`HelloPayload::hello`].)
impl FixedPayload for HelloPayload {
    const KIND: &'static str = "HELLO";
}

impl From<&Hello> for HelloPayload {
    fn from(h: &Hello) -> Self {
        HelloPayload {
            version: h.version.into(),
            block_size: h.block_size.into(),
            disk_size: h.disk_size.into(),
            epoch: h.epoch.into(),
            flags: (flag(h.sync, FLAG_SYNC)
                | flag(h.dirty_log, FLAG_DIRTY_LOG)
                | flag(h.takes_durable, FLAG_TAKES_DURABLE))
            .into(),
            gens: gens_bytes(&h.gens),
        }
    }
}

impl HelloPayload {
    /// The HELLO it carries (`None` when its generations are not a record).
    pub fn hello(&self) -> Option<Hello> {
        let flags = self.flags.to_native();
        Some(Hello {
            version: self.version.to_native(),
            disk_size: self.disk_size.to_native(),
            block_size: self.block_size.to_native(),
            epoch: self.epoch.to_native(),
            sync: flags & FLAG_SYNC != 0,
            dirty_log: flags & FLAG_DIRTY_LOG != 0,
            takes_durable: flags & FLAG_TAKES_DURABLE != 0,
            gens: Generations::decode(&self.gens)?,
        })
    }
}

/// WELCOME's payload: the secondary's disk, decision and replication state.
#[repr(C, packed)]
#[derive(Debug, Clone, Copy)]
pub(super) struct WelcomePayload {
    version: Le32,
    block_size: Le32,
    disk_size: Le64,
    decision: Le32,
    flags: Le32,
    gens: [u8; GENERATIONS_LEN],
}

// SAFETY: a packed struct of integers and bytes: no padding, every byte pattern is a value.
unsafe impl ByteValued for WelcomePayload {}

/// Any version, size, decision and flags: the primary judges them. (The generations are
/// checked by [`WelcomePayload::welcome`].)
impl FixedPayload for WelcomePayload {
    const KIND: &'static str = "WELCOME";
}

impl From<&Welcome> for WelcomePayload {
    fn from(w: &Welcome) -> Self {
        let flags = flag(w.allow_full, FLAG_ALLOW_FULL)
            | flag(w.discard_my_data, FLAG_DISCARD_MY_DATA)
            | flag(w.own_dirty, FLAG_OWN_DIRTY)
            | flag(w.sends_durable, FLAG_SENDS_DURABLE);
        WelcomePayload {
            version: w.version.into(),
            block_size: w.block_size.into(),
            disk_size: w.disk_size.into(),
            decision: w.decision.into(),
            flags: flags.into(),
            gens: gens_bytes(&w.gens),
        }
    }
}

impl WelcomePayload {
    /// The WELCOME it carries (`None` when its generations are not a record).
    pub fn welcome(&self) -> Option<Welcome> {
        let flags = self.flags.to_native();
        Some(Welcome {
            version: self.version.to_native(),
            disk_size: self.disk_size.to_native(),
            block_size: self.block_size.to_native(),
            gens: Generations::decode(&self.gens)?,
            decision: self.decision.to_native(),
            allow_full: flags & FLAG_ALLOW_FULL != 0,
            discard_my_data: flags & FLAG_DISCARD_MY_DATA != 0,
            own_dirty: flags & FLAG_OWN_DIRTY != 0,
            sends_durable: flags & FLAG_SENDS_DURABLE != 0,
        })
    }
}

/// VERIFY's payload: the crc32c of the primary's range.
#[repr(C, packed)]
#[derive(Debug, Clone, Copy)]
pub(super) struct VerifyPayload {
    pub crc: Le32,
}

// SAFETY: a packed struct of one integer: no padding, every byte pattern is a value.
unsafe impl ByteValued for VerifyPayload {}

/// Any crc: the secondary compares it with its own.
impl FixedPayload for VerifyPayload {
    const KIND: &'static str = "VERIFY";
}

/// One entry of MARKER's payload: a virtqueue's `next_avail`, or [`QueuePosition::UNKNOWN`].
#[repr(C, packed)]
#[derive(Debug, Clone, Copy)]
pub(super) struct QueuePosition {
    base: Le32,
}

// SAFETY: a packed struct of one integer: no padding, every byte pattern is a value.
unsafe impl ByteValued for QueuePosition {}

impl FixedPayload for QueuePosition {
    const KIND: &'static str = "MARKER";
    const INVALID: &'static str = "queue position above 65535";

    /// A 16-bit ring index or "unknown".
    fn is_valid(&self) -> bool {
        self.get().is_ok()
    }
}

impl From<Option<u16>> for QueuePosition {
    fn from(base: Option<u16>) -> Self {
        QueuePosition {
            base: base.map_or(Self::UNKNOWN, u32::from).into(),
        }
    }
}

impl QueuePosition {
    /// The queue did not run since the device last started.
    const UNKNOWN: u32 = u32::MAX;

    /// The position (`Err` for a value that is neither a ring index nor "unknown").
    pub fn get(&self) -> Result<Option<u16>, std::num::TryFromIntError> {
        match self.base.to_native() {
            Self::UNKNOWN => Ok(None),
            v => u16::try_from(v).map(Some),
        }
    }
}
