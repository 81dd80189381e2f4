//! Parsing and executing virtio-blk requests.
//!
//! This is the one place where a guest-controlled descriptor chain is interpreted. A chain is
//! treated as two byte streams: the device-readable descriptors (header, then OUT data or
//! discard/write-zeroes segments) followed by the device-writable ones (IN data or the GET_ID
//! string, then the status byte, which is the last writable byte). Every malformed chain is
//! turned into an error status when a status byte exists, or into a zero-length completion when
//! it does not, so that a bad request never panics the process nor stalls the queue.
//!
//! One request flows through three steps: `parse` (chain → `Request`, or `Parsed::Malformed`
//! with the `RequestError` that makes it so), execution against the [`BlockDevice`], and
//! completion, which writes the status byte and reports the used length. Every failure is a
//! `RequestError`, and `RequestError::status` alone decides between `IOERR` and `UNSUPP`.
//! The header and the discard/write-zeroes segments are read as the kernel's structs
//! (`virtio_blk_outhdr`, `virtio_blk_discard_write_zeroes`) through vm-memory's [`ByteValued`].

use std::io;

use log::{debug, warn};
use smallvec::SmallVec;
use thiserror::Error;
use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use crate::storage::{BlockDevice, Change, GuestMem, GuestSlice, SECTOR_SIZE};

/// `struct virtio_blk_outhdr`, the request header, as vm-memory reads it.
#[repr(transparent)]
#[derive(Debug, Default, Clone, Copy)]
struct OutHeader(virtio_blk_outhdr);

// SAFETY: `virtio_blk_outhdr` is a `repr(C)` struct of two u32 and one u64 with no padding
// (16 bytes, checked by the bindings), so every byte pattern is a valid value.
unsafe impl ByteValued for OutHeader {}

/// `struct virtio_blk_discard_write_zeroes`, one discard/write-zeroes segment.
#[repr(transparent)]
#[derive(Debug, Default, Clone, Copy)]
struct DwzSegment(virtio_blk_discard_write_zeroes);

// SAFETY: `virtio_blk_discard_write_zeroes` is a `repr(C)` struct of one u64 and two u32 with no
// padding (16 bytes, checked by the bindings), so every byte pattern is a valid value.
unsafe impl ByteValued for DwzSegment {}

/// Size of `struct virtio_blk_discard_write_zeroes`.
const DWZ_SEGMENT_LEN: usize = std::mem::size_of::<DwzSegment>();
const DWZ_FLAG_UNMAP: u32 = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
/// Largest data transfer of one request. Linux guests send at most a few MiB; the cap keeps a
/// hostile chain from making the host allocate gigabytes for a bounce buffer.
pub(crate) const MAX_REQUEST_BYTES: usize = 128 << 20;

/// Why a request fails. [`RequestError::status`] maps it to the status byte the guest sees.
#[derive(Debug, Error)]
pub(crate) enum RequestError {
    /// The chain does not have the shape of a virtio-blk request.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// A well-formed request the device refuses (bad lengths, ranges or buffers).
    #[error("invalid request: {0}")]
    Invalid(&'static str),
    /// A request type the device does not implement.
    #[error("unsupported request type {0}")]
    UnsupportedType(u32),
    /// Discard/write-zeroes flags the device does not implement (incl. UNMAP on a discard).
    #[error("unsupported discard/write-zeroes flags {0:#x}")]
    UnsupportedFlags(u32),
    /// The request is beyond the end of the device.
    #[error("sector {sector} (+{len} bytes) is beyond the end of the device")]
    OutOfRange { sector: u64, len: u64 },
    /// The storage failed.
    #[error("{op} failed: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

impl RequestError {
    /// The virtio-blk status byte for this error: `UNSUPP` for what the device does not
    /// implement, `IOERR` for everything else.
    pub(crate) fn status(&self) -> u8 {
        match self {
            RequestError::UnsupportedType(_) | RequestError::UnsupportedFlags(_) => {
                VIRTIO_BLK_S_UNSUPP as u8
            }
            RequestError::Malformed(_)
            | RequestError::Invalid(_)
            | RequestError::OutOfRange { .. }
            | RequestError::Io { .. } => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// Wraps a storage error with the operation that hit it.
fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> RequestError {
    move |source| RequestError::Io { op, source }
}

/// A request type the device understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestKind {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Unsupported(u32),
}

impl RequestKind {
    fn from_raw(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => RequestKind::In,
            VIRTIO_BLK_T_OUT => RequestKind::Out,
            VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
            VIRTIO_BLK_T_GET_ID => RequestKind::GetId,
            VIRTIO_BLK_T_DISCARD => RequestKind::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestKind::WriteZeroes,
            other => RequestKind::Unsupported(other),
        }
    }
}

/// One guest memory segment of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// The data segments of a request. Kept inline up to two (a guest's 4 KiB request has one, a
/// 1 MiB one of 4 KiB pages up to 256): parsing a typical request allocates nothing.
pub(crate) type Segments = SmallVec<[Segment; 2]>;

/// A well-formed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Request {
    pub kind: RequestKind,
    pub sector: u64,
    /// Device-readable data after the header (OUT data, discard/write-zeroes segments).
    pub out: Segments,
    /// Device-writable data before the status byte (IN data, GET_ID buffer).
    pub inp: Segments,
    pub status: GuestAddress,
}

impl Request {
    /// Bytes of disk data the request moves: `(read, written)`. Zero for everything but IN and
    /// OUT.
    pub(crate) fn data_bytes(&self) -> (u64, u64) {
        let sum = |segs: &[Segment]| segs.iter().map(|s| u64::from(s.len)).sum::<u64>();
        match self.kind {
            RequestKind::In => (sum(&self.inp), 0),
            RequestKind::Out => (0, sum(&self.out)),
            _ => (0, 0),
        }
    }
}

/// The outcome of parsing a chain.
#[derive(Debug)]
pub(crate) enum Parsed {
    /// A request to execute.
    Ok(Request),
    /// A chain with a status byte but a malformed body: complete it with `error`'s status.
    Malformed {
        status: GuestAddress,
        error: RequestError,
    },
    /// A chain without a usable status byte: complete it with length 0.
    NoStatus { why: &'static str },
}

/// Limits the parser enforces (they match what the config space advertises).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Most data segments in one request (the config space's `seg_max`).
    pub seg_max: u32,
}

/// Splits a chain into a [`Request`].
pub(crate) fn parse(
    mem: &GuestMem,
    descs: impl Iterator<Item = Descriptor>,
    limits: Limits,
) -> Parsed {
    let mut readable = Segments::new();
    let mut writable = Segments::new();
    let mut order_ok = true;
    for d in descs {
        let seg = Segment {
            addr: d.addr(),
            len: d.len(),
        };
        if d.is_write_only() {
            writable.push(seg);
        } else {
            if !writable.is_empty() {
                order_ok = false;
            }
            readable.push(seg);
        }
    }
    // The status byte is the last byte of the last writable segment.
    while writable.last().is_some_and(|s| s.len == 0) {
        writable.pop();
    }
    let Some(last) = writable.last_mut() else {
        return Parsed::NoStatus {
            why: "no device-writable descriptor for the status byte",
        };
    };
    let status = GuestAddress(last.addr.0.wrapping_add(u64::from(last.len) - 1));
    if !mem.check_range(status, 1) {
        return Parsed::NoStatus {
            why: "status byte outside guest memory",
        };
    }
    last.len -= 1;
    if last.len == 0 {
        writable.pop();
    }
    let malformed = |why| Parsed::Malformed {
        status,
        error: RequestError::Malformed(why),
    };
    if !order_ok {
        return malformed("device-readable descriptor after a writable one");
    }

    // The header: the first 16 readable bytes, possibly split over descriptors.
    let mut header = OutHeader::default();
    let Some(out) = take_prefix(mem, &readable, header.as_mut_slice()) else {
        return malformed("request header is short or unreadable");
    };
    let kind = RequestKind::from_raw(u32::from_le(header.0.type_));
    let sector = u64::from_le(header.0.sector);
    let inp = writable;

    if out.len() + inp.len() > limits.seg_max as usize {
        return malformed("more data segments than seg_max");
    }
    let wrong_direction = match kind {
        RequestKind::In | RequestKind::GetId => !out.is_empty(),
        RequestKind::Out | RequestKind::Discard | RequestKind::WriteZeroes | RequestKind::Flush => {
            !inp.is_empty()
        }
        RequestKind::Unsupported(_) => false,
    };
    if wrong_direction {
        return malformed("data descriptor has the wrong direction");
    }
    Parsed::Ok(Request {
        kind,
        sector,
        out,
        inp,
        status,
    })
}

/// Reads `buf.len()` bytes from the front of `segs`; returns the segments after them.
fn take_prefix(mem: &GuestMem, segs: &[Segment], buf: &mut [u8]) -> Option<Segments> {
    let mut filled = 0;
    let mut rest = Segments::new();
    for s in segs {
        if filled < buf.len() {
            let n = (buf.len() - filled).min(s.len as usize);
            mem.read_slice(&mut buf[filled..filled + n], s.addr).ok()?;
            filled += n;
            if n < s.len as usize {
                rest.push(Segment {
                    addr: s.addr.checked_add(n as u64)?,
                    len: s.len - n as u32,
                });
            }
        } else {
            rest.push(*s);
        }
    }
    (filled == buf.len()).then_some(rest)
}

/// What one request did, for the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Completion {
    pub status: u8,
    /// Bytes written into the device-writable part of the chain, status byte included.
    pub used_len: u32,
}

/// Device-wide facts the executor needs.
#[derive(Debug, Clone)]
pub(crate) struct DeviceInfo {
    pub read_only: bool,
    /// The GET_ID string (at most 20 bytes).
    pub serial: Vec<u8>,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_dwz_segments: u32,
}

/// Executes a request against `disk` and writes its status byte.
pub(crate) fn execute(
    mem: &GuestMem,
    disk: &dyn BlockDevice,
    info: &DeviceInfo,
    req: &Request,
) -> Completion {
    let result = run(mem, disk, info, req);
    if let Err(e) = &result {
        debug!("request {:?} sector {} failed: {e}", req.kind, req.sector);
    }
    complete(mem, req.status, result)
}

/// Completes a malformed chain whose status byte is known (with `IOERR`).
#[cfg(test)]
pub(crate) fn fail(mem: &GuestMem, status: GuestAddress) -> Completion {
    complete(
        mem,
        status,
        Err(RequestError::Malformed("malformed descriptor chain")),
    )
}

/// Completes a request: writes the status byte for `result` (`Ok` carries the bytes written to
/// the device-writable data) and returns what goes on the used ring. When the status byte
/// cannot be written, the used length is 0.
pub(crate) fn complete(
    mem: &GuestMem,
    status_addr: GuestAddress,
    result: Result<u32, RequestError>,
) -> Completion {
    let (status, data_len) = match &result {
        Ok(n) => (VIRTIO_BLK_S_OK as u8, *n),
        Err(e) => (e.status(), 0),
    };
    if let Err(e) = mem.write_obj(status, status_addr) {
        warn!("cannot write the status byte: {e}");
        return Completion {
            status,
            used_len: 0,
        };
    }
    Completion {
        status,
        used_len: data_len + 1,
    }
}

/// Turns segments into guest slices; fails when any is outside guest memory.
fn slices<'m>(mem: &'m GuestMem, segs: &[Segment]) -> Result<Vec<GuestSlice<'m>>, RequestError> {
    let mut out = Vec::with_capacity(segs.len());
    for s in segs {
        if s.len == 0 {
            continue;
        }
        // A segment may straddle two memory regions: take it piecewise.
        for piece in mem.get_slices(s.addr, s.len as usize) {
            out.push(piece.map_err(|_| RequestError::Invalid("data buffer outside guest memory"))?);
        }
    }
    Ok(out)
}

/// Byte offset of `len` bytes at `sector`, checked against the device's capacity.
fn byte_range(sector: u64, len: u64, capacity: u64) -> Result<u64, RequestError> {
    let out_of_range = RequestError::OutOfRange { sector, len };
    let Some(offset) = sector.checked_mul(SECTOR_SIZE) else {
        return Err(out_of_range);
    };
    crate::storage::check_range(capacity, offset, len).map_err(|_| out_of_range)?;
    Ok(offset)
}

/// Length of a data transfer, checked: whole sectors, at most [`MAX_REQUEST_BYTES`].
fn data_len(bufs: &[GuestSlice<'_>], what: &'static str) -> Result<usize, RequestError> {
    let len = crate::storage::total_len(bufs);
    if len as u64 % SECTOR_SIZE != 0 {
        return Err(RequestError::Invalid(what));
    }
    if len > MAX_REQUEST_BYTES {
        return Err(RequestError::Invalid(
            "data larger than the per-request limit",
        ));
    }
    Ok(len)
}

/// Executes a well-formed request; returns the bytes written into the device-writable data.
/// Applies one change the request makes, its data still in guest memory.
fn apply(disk: &dyn BlockDevice, change: Change<&[GuestSlice<'_>]>) -> Result<(), RequestError> {
    let op = match change {
        Change::Write { .. } => "write",
        Change::WriteZeroes { .. } => "write-zeroes",
        Change::Discard { .. } => "discard",
        Change::Flush => "flush",
    };
    change.apply_from_guest(disk).map_err(io_err(op))
}

/// Executes a parsed request: a read or GET_ID fills guest buffers; a write, flush, discard or
/// write-zeroes becomes one [`Change`] per range, applied to the disk in order.
fn run(
    mem: &GuestMem,
    disk: &dyn BlockDevice,
    info: &DeviceInfo,
    req: &Request,
) -> Result<u32, RequestError> {
    match req.kind {
        RequestKind::In => {
            let bufs = slices(mem, &req.inp)?;
            let len = data_len(&bufs, "read length is not a multiple of 512")?;
            let offset = byte_range(req.sector, len as u64, disk.capacity())?;
            disk.read_to_guest(offset, &bufs).map_err(io_err("read"))?;
            u32::try_from(len).map_err(|_| RequestError::Invalid("read too long"))
        }
        RequestKind::Out => {
            if info.read_only {
                return Err(RequestError::Invalid("write to a read-only device"));
            }
            let bufs = slices(mem, &req.out)?;
            let len = data_len(&bufs, "write length is not a multiple of 512")?;
            let offset = byte_range(req.sector, len as u64, disk.capacity())?;
            apply(
                disk,
                Change::Write {
                    offset,
                    data: &bufs[..],
                },
            )?;
            Ok(0)
        }
        RequestKind::Flush => {
            apply(disk, Change::Flush)?;
            Ok(0)
        }
        RequestKind::GetId => {
            let bufs = slices(mem, &req.inp)?;
            let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
            let n = info.serial.len().min(id.len());
            id[..n].copy_from_slice(&info.serial[..n]);
            let mut written = 0usize;
            for b in &bufs {
                if written == id.len() {
                    break;
                }
                let n = b.len().min(id.len() - written);
                b.subslice(0, n)
                    .map_err(|_| RequestError::Invalid("GET_ID buffer"))?
                    .copy_from(&id[written..written + n]);
                written += n;
            }
            Ok(written as u32)
        }
        RequestKind::Discard | RequestKind::WriteZeroes => {
            if info.read_only {
                return Err(RequestError::Invalid(
                    "discard/write-zeroes on a read-only device",
                ));
            }
            let zeroes = req.kind == RequestKind::WriteZeroes;
            let too_many = RequestError::Invalid("too many discard/write-zeroes segments");
            // Bound the segment list before copying it out of guest memory.
            let raw_len: u64 = req.out.iter().map(|s| u64::from(s.len)).sum();
            if raw_len > u64::from(info.max_dwz_segments) * DWZ_SEGMENT_LEN as u64 {
                return Err(too_many);
            }
            let bufs = slices(mem, &req.out)?;
            let raw = crate::storage::gather(&bufs);
            if raw.is_empty() || raw.len() % DWZ_SEGMENT_LEN != 0 {
                return Err(RequestError::Invalid(
                    "discard/write-zeroes payload is not a list of segments",
                ));
            }
            if raw.len() / DWZ_SEGMENT_LEN > info.max_dwz_segments as usize {
                return Err(too_many);
            }
            let max = if zeroes {
                info.max_write_zeroes_sectors
            } else {
                info.max_discard_sectors
            };
            // Validate every segment before touching the disk.
            let mut changes = Vec::new();
            for chunk in raw.chunks_exact(DWZ_SEGMENT_LEN) {
                let mut seg = DwzSegment::default();
                seg.as_mut_slice().copy_from_slice(chunk);
                let sector = u64::from_le(seg.0.sector);
                let num = u32::from_le(seg.0.num_sectors);
                let flags = u32::from_le(seg.0.flags);
                let unmap = flags & DWZ_FLAG_UNMAP != 0;
                if flags & !DWZ_FLAG_UNMAP != 0 || (!zeroes && unmap) {
                    return Err(RequestError::UnsupportedFlags(flags));
                }
                if num > max {
                    return Err(RequestError::Invalid(
                        "discard/write-zeroes segment larger than advertised",
                    ));
                }
                let len = u64::from(num) * SECTOR_SIZE;
                let offset = byte_range(sector, len, disk.capacity())?;
                changes.push(if zeroes {
                    Change::WriteZeroes { offset, len, unmap }
                } else {
                    Change::Discard { offset, len }
                });
            }
            for change in changes {
                apply(disk, change)?;
            }
            Ok(0)
        }
        RequestKind::Unsupported(t) => Err(RequestError::UnsupportedType(t)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemDisk;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT, QueueT};
    use vm_memory::GuestMemoryMmap;

    const HDR: u64 = 0x10_000;
    const DATA: u64 = 0x20_000;
    const STATUS: u64 = 0x30_000;
    const W: u16 = VRING_DESC_F_WRITE as u16;

    fn mem() -> GuestMem {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_000)]).unwrap()
    }

    fn info(read_only: bool) -> DeviceInfo {
        DeviceInfo {
            read_only,
            serial: b"serial-123".to_vec(),
            max_discard_sectors: 1 << 20,
            max_write_zeroes_sectors: 1 << 20,
            max_dwz_segments: 4,
        }
    }

    const LIMITS: Limits = Limits { seg_max: 8 };

    fn header(m: &GuestMem, t: u32, sector: u64) {
        m.write_obj(t, GuestAddress(HDR)).unwrap();
        m.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        m.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    }

    fn d(addr: u64, len: u32, flags: u16) -> Descriptor {
        Descriptor::new(addr, len, flags, 0)
    }

    /// Parses and executes a chain; returns (completion, status byte in memory).
    fn run(m: &GuestMem, disk: &MemDisk, descs: Vec<Descriptor>, ro: bool) -> Completion {
        match parse(m, descs.into_iter(), LIMITS) {
            Parsed::Ok(r) => execute(m, disk, &info(ro), &r),
            Parsed::Malformed { status, .. } => fail(m, status),
            Parsed::NoStatus { .. } => Completion {
                status: 0xff,
                used_len: 0,
            },
        }
    }

    fn status(m: &GuestMem) -> u8 {
        m.read_obj(GuestAddress(STATUS)).unwrap()
    }

    #[test]
    fn write_then_read_split_across_descriptors() {
        let m = mem();
        let disk = MemDisk::new(1 << 20);
        header(&m, VIRTIO_BLK_T_OUT, 8);
        let data: Vec<u8> = (0..1536u32).map(|i| (i % 251) as u8).collect();
        m.write_slice(&data, GuestAddress(DATA)).unwrap();
        let c = run(
            &m,
            &disk,
            vec![
                d(HDR, 16, 0),
                d(DATA, 512, 0),
                d(DATA + 512, 1024, 0),
                d(STATUS, 1, W),
            ],
            false,
        );
        assert_eq!(
            c,
            Completion {
                status: 0,
                used_len: 1
            }
        );
        assert_eq!(&disk.snapshot()[4096..4096 + 1536], &data[..]);

        // Read it back with the header split in two and the data in three pieces.
        m.write_slice(&[0u8; 1536], GuestAddress(DATA)).unwrap();
        header(&m, VIRTIO_BLK_T_IN, 8);
        let c = run(
            &m,
            &disk,
            vec![
                d(HDR, 7, 0),
                d(HDR + 7, 9, 0),
                d(DATA, 100, W),
                d(DATA + 100, 412, W),
                d(DATA + 512, 1024, W),
                d(STATUS, 1, W),
            ],
            false,
        );
        assert_eq!(
            c,
            Completion {
                status: 0,
                used_len: 1537
            }
        );
        let mut back = vec![0u8; 1536];
        m.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn status_byte_may_share_the_last_data_descriptor() {
        let m = mem();
        let disk = MemDisk::new(1 << 20);
        disk.write_at(&[7u8; 512], 0).unwrap();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let c = run(&m, &disk, vec![d(HDR, 16, 0), d(DATA, 513, W)], false);
        assert_eq!(
            c,
            Completion {
                status: 0,
                used_len: 513
            }
        );
        let mut back = [0u8; 513];
        m.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert!(back[..512].iter().all(|&b| b == 7));
        assert_eq!(back[512], 0, "status OK in the last byte");
    }

    #[test]
    fn malformed_chains_get_ioerr_or_no_status_but_never_panic() {
        let m = mem();
        let disk = MemDisk::new(1 << 20);
        header(&m, VIRTIO_BLK_T_IN, 0);
        // No writable descriptor at all: nowhere to put a status.
        assert_eq!(run(&m, &disk, vec![d(HDR, 16, 0)], false).used_len, 0);
        // Status outside guest memory.
        assert_eq!(
            run(&m, &disk, vec![d(HDR, 16, 0), d(0x200_000, 1, W)], false).used_len,
            0
        );
        // Short header.
        m.write_obj(0xaau8, GuestAddress(STATUS)).unwrap();
        let c = run(&m, &disk, vec![d(HDR, 8, 0), d(STATUS, 1, W)], false);
        assert_eq!(
            (c.status, status(&m)),
            (VIRTIO_BLK_S_IOERR as u8, VIRTIO_BLK_S_IOERR as u8)
        );
        // Readable descriptor after a writable one.
        let c = run(
            &m,
            &disk,
            vec![
                d(HDR, 16, 0),
                d(DATA, 512, W),
                d(DATA, 512, 0),
                d(STATUS, 1, W),
            ],
            false,
        );
        assert_eq!(c.status, VIRTIO_BLK_S_IOERR as u8);
        // IN with device-readable data (wrong direction).
        let c = run(
            &m,
            &disk,
            vec![d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 1, W)],
            false,
        );
        assert_eq!(c.status, VIRTIO_BLK_S_IOERR as u8);
        // Too many segments.
        let mut many = vec![d(HDR, 16, 0)];
        many.extend((0..9).map(|i| d(DATA + i * 512, 512, W)));
        many.push(d(STATUS, 1, W));
        assert_eq!(run(&m, &disk, many, false).status, VIRTIO_BLK_S_IOERR as u8);
        // Data buffer outside guest memory.
        let c = run(
            &m,
            &disk,
            vec![d(HDR, 16, 0), d(0xff_f000, 4096, W), d(STATUS, 1, W)],
            false,
        );
        assert_eq!(c.status, VIRTIO_BLK_S_IOERR as u8);
        // Length not a multiple of 512.
        let c = run(
            &m,
            &disk,
            vec![d(HDR, 16, 0), d(DATA, 100, W), d(STATUS, 1, W)],
            false,
        );
        assert_eq!(c.status, VIRTIO_BLK_S_IOERR as u8);
    }

    #[test]
    fn out_of_range_sectors_are_ioerr() {
        let m = mem();
        let disk = MemDisk::new(1 << 20);
        for sector in [2048u64, 2047, u64::MAX / 512, u64::MAX] {
            header(&m, VIRTIO_BLK_T_IN, sector);
            let c = run(
                &m,
                &disk,
                vec![d(HDR, 16, 0), d(DATA, 1024, W), d(STATUS, 1, W)],
                false,
            );
            assert_eq!(c.status, VIRTIO_BLK_S_IOERR as u8, "sector {sector}");
        }
    }

    #[test]
    fn unknown_type_is_unsupp_and_read_only_refuses_writes() {
        let m = mem();
        let disk = MemDisk::new(1 << 20);
        header(&m, 0x77, 0);
        let c = run(&m, &disk, vec![d(HDR, 16, 0), d(STATUS, 1, W)], false);
        assert_eq!(
            (c.status, status(&m)),
            (VIRTIO_BLK_S_UNSUPP as u8, VIRTIO_BLK_S_UNSUPP as u8)
        );
        header(&m, VIRTIO_BLK_T_OUT, 0);
        m.write_slice(&[5u8; 512], GuestAddress(DATA)).unwrap();
        let c = run(
            &m,
            &disk,
            vec![d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 1, W)],
            true,
        );
        assert_eq!(c.status, VIRTIO_BLK_S_IOERR as u8);
        assert!(disk.snapshot().iter().all(|&b| b == 0));
    }

    #[test]
    fn get_id_writes_the_serial() {
        let m = mem();
        let disk = MemDisk::new(4096);
        header(&m, VIRTIO_BLK_T_GET_ID, 0);
        let c = run(
            &m,
            &disk,
            vec![d(HDR, 16, 0), d(DATA, 20, W), d(STATUS, 1, W)],
            false,
        );
        assert_eq!(
            c,
            Completion {
                status: 0,
                used_len: 21
            }
        );
        let mut id = [0u8; 20];
        m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..10], b"serial-123");
        assert!(id[10..].iter().all(|&b| b == 0));
    }

    fn dwz_segment(m: &GuestMem, at: u64, sector: u64, num: u32, flags: u32) {
        m.write_obj(sector, GuestAddress(at)).unwrap();
        m.write_obj(num, GuestAddress(at + 8)).unwrap();
        m.write_obj(flags, GuestAddress(at + 12)).unwrap();
    }

    #[test]
    fn discard_and_write_zeroes() {
        let m = mem();
        let disk = MemDisk::new(1 << 20);
        disk.write_at(&[0xeeu8; 1 << 20], 0).unwrap();
        header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        dwz_segment(&m, DATA, 1, 2, DWZ_FLAG_UNMAP);
        dwz_segment(&m, DATA + 16, 10, 1, 0);
        let c = run(
            &m,
            &disk,
            vec![d(HDR, 16, 0), d(DATA, 32, 0), d(STATUS, 1, W)],
            false,
        );
        assert_eq!(c.status, 0);
        let s = disk.snapshot();
        for (i, &b) in s[..8192].iter().enumerate() {
            let zero = (512..1536).contains(&i) || (5120..5632).contains(&i);
            assert_eq!(b, if zero { 0 } else { 0xee }, "byte {i}");
        }
        // Discard with the UNMAP flag is UNSUPP (virtio spec); reserved flags too.
        header(&m, VIRTIO_BLK_T_DISCARD, 0);
        dwz_segment(&m, DATA, 0, 1, DWZ_FLAG_UNMAP);
        let c = run(
            &m,
            &disk,
            vec![d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)],
            false,
        );
        assert_eq!(c.status, VIRTIO_BLK_S_UNSUPP as u8);
        header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        dwz_segment(&m, DATA, 0, 1, 2);
        let c = run(
            &m,
            &disk,
            vec![d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)],
            false,
        );
        assert_eq!(c.status, VIRTIO_BLK_S_UNSUPP as u8);
        // A bad second segment fails the request before the first one touches the disk.
        header(&m, VIRTIO_BLK_T_DISCARD, 0);
        dwz_segment(&m, DATA, 100, 1, 0);
        dwz_segment(&m, DATA + 16, 1 << 40, 1, 0);
        let c = run(
            &m,
            &disk,
            vec![d(HDR, 16, 0), d(DATA, 32, 0), d(STATUS, 1, W)],
            false,
        );
        assert_eq!(c.status, VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(disk.snapshot()[100 * 512], 0xee);
        // A segment list far larger than advertised is refused before it is copied.
        let c = run(
            &m,
            &disk,
            vec![d(HDR, 16, 0), d(0, 0xf_0000, 0), d(STATUS, 1, W)],
            false,
        );
        assert_eq!(c.status, VIRTIO_BLK_S_IOERR as u8);
        // A payload that is not whole segments.
        let c = run(
            &m,
            &disk,
            vec![d(HDR, 16, 0), d(DATA, 20, 0), d(STATUS, 1, W)],
            false,
        );
        assert_eq!(c.status, VIRTIO_BLK_S_IOERR as u8);
    }

    #[test]
    fn chains_popped_from_a_mock_split_queue() {
        let m = mem();
        let disk = MemDisk::new(1 << 20);
        let vq = MockSplitQueue::new(&m, 16);
        header(&m, VIRTIO_BLK_T_OUT, 1);
        m.write_slice(&[0x5au8; 1024], GuestAddress(DATA)).unwrap();
        let f = VRING_DESC_F_NEXT as u16;
        let descs = [
            virtio_queue::desc::RawDescriptor::from(Descriptor::new(HDR, 16, f, 1)),
            virtio_queue::desc::RawDescriptor::from(Descriptor::new(DATA, 1024, f, 2)),
            virtio_queue::desc::RawDescriptor::from(Descriptor::new(STATUS, 1, W, 0)),
        ];
        vq.build_desc_chain(&descs).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.pop_descriptor_chain(&m).expect("a chain");
        let head = chain.head_index();
        let Parsed::Ok(req) = parse(&m, chain, LIMITS) else {
            panic!("parse")
        };
        assert_eq!(req.kind, RequestKind::Out);
        let c = execute(&m, &disk, &info(false), &req);
        q.add_used(&m, head, c.used_len).unwrap();
        assert_eq!(status(&m), 0);
        assert!(disk.snapshot()[512..1536].iter().all(|&b| b == 0x5a));
        assert_eq!(vq.used().idx().load(), 1);
        assert!(q.iter(&m).unwrap().next().is_none());
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn desc() -> impl Strategy<Value = (u64, u32, bool)> {
            (
                prop_oneof![
                    Just(HDR),
                    Just(DATA),
                    Just(STATUS),
                    0u64..0x100_000,
                    any::<u64>(),
                ],
                prop_oneof![Just(1u32), Just(16), Just(512), 0u32..70_000, any::<u32>()],
                any::<bool>(),
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// Any chain with any header: parsing and executing never panics, a status byte
            /// that exists is one of OK/IOERR/UNSUPP, and nothing beyond the disk is touched.
            #[test]
            fn arbitrary_chains_never_panic(
                descs in proptest::collection::vec(desc(), 0..12),
                req_type in prop_oneof![0u32..16, any::<u32>()],
                sector in prop_oneof![0u64..4096, any::<u64>()],
                payload in proptest::collection::vec(any::<u8>(), 0..64),
                ro in any::<bool>(),
            ) {
                let m = mem();
                let disk = MemDisk::new(1 << 20);
                header(&m, req_type, sector);
                m.write_slice(&payload, GuestAddress(DATA)).unwrap();
                let chain: Vec<Descriptor> =
                    descs.iter().map(|&(a, l, w)| d(a, l, if w { W } else { 0 })).collect();
                let c = run(&m, &disk, chain, ro);
                prop_assert!(c.status <= 2 || c.status == 0xff, "status {}", c.status);
                prop_assert_eq!(disk.capacity(), 1 << 20);
            }
        }
    }
}
