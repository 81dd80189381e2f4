//! Parsing and executing virtio-blk requests.
//!
//! This is the one place where a guest-controlled descriptor chain is interpreted. A chain is
//! treated as two byte streams: the device-readable descriptors (header, then OUT data or
//! discard/write-zeroes segments) followed by the device-writable ones (IN data or the GET_ID
//! string, then the status byte, which is the last writable byte). Every malformed chain is
//! turned into an error status when a status byte exists, or into a zero-length completion when
//! it does not, so that a bad request never panics the process nor stalls the queue.

use std::io;

use log::{debug, warn};
use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::storage::{BlockDevice, GuestMem, GuestSlice, SECTOR_SIZE};

/// Size of `struct virtio_blk_outhdr`.
const HEADER_LEN: usize = 16;
/// Size of `struct virtio_blk_discard_write_zeroes`.
const DWZ_SEGMENT_LEN: usize = 16;
const DWZ_FLAG_UNMAP: u32 = 1;

/// A request type the device understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
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
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A well-formed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    pub sector: u64,
    /// Device-readable data after the header (OUT data, discard/write-zeroes segments).
    pub out: Vec<Segment>,
    /// Device-writable data before the status byte (IN data, GET_ID buffer).
    pub inp: Vec<Segment>,
    pub status: GuestAddress,
}

/// The outcome of parsing a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A request to execute.
    Ok(Request),
    /// A chain with a status byte but a malformed body: complete it with `IOERR`.
    Malformed {
        status: GuestAddress,
        why: &'static str,
    },
    /// A chain without a usable status byte: complete it with length 0.
    NoStatus { why: &'static str },
}

/// Limits the parser enforces (they match what the config space advertises).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most data segments in one request (the config space's `seg_max`).
    pub seg_max: u32,
}

/// Splits a chain into a [`Request`].
pub fn parse(mem: &GuestMem, descs: impl Iterator<Item = Descriptor>, limits: Limits) -> Parsed {
    let mut readable: Vec<Segment> = Vec::new();
    let mut writable: Vec<Segment> = Vec::new();
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
    if !order_ok {
        return Parsed::Malformed {
            status,
            why: "device-readable descriptor after a writable one",
        };
    }

    // The header: the first 16 readable bytes, possibly split over descriptors.
    let mut header = [0u8; HEADER_LEN];
    let out = match take_prefix(mem, &readable, &mut header) {
        Some(rest) => rest,
        None => {
            return Parsed::Malformed {
                status,
                why: "request header is short or unreadable",
            }
        }
    };
    let kind = RequestKind::from_raw(u32::from_le_bytes([
        header[0], header[1], header[2], header[3],
    ]));
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
    let inp = writable;

    if out.len() + inp.len() > limits.seg_max as usize {
        return Parsed::Malformed {
            status,
            why: "more data segments than seg_max",
        };
    }
    let wrong_direction = match kind {
        RequestKind::In | RequestKind::GetId => !out.is_empty(),
        RequestKind::Out | RequestKind::Discard | RequestKind::WriteZeroes | RequestKind::Flush => {
            !inp.is_empty()
        }
        RequestKind::Unsupported(_) => false,
    };
    if wrong_direction {
        return Parsed::Malformed {
            status,
            why: "data descriptor has the wrong direction",
        };
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
fn take_prefix(mem: &GuestMem, segs: &[Segment], buf: &mut [u8]) -> Option<Vec<Segment>> {
    let mut filled = 0;
    let mut rest = Vec::new();
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
pub struct Completion {
    pub status: u8,
    /// Bytes written into the device-writable part of the chain, status byte included.
    pub used_len: u32,
}

/// Device-wide facts the executor needs.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub read_only: bool,
    /// The GET_ID string (at most 20 bytes).
    pub serial: Vec<u8>,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_dwz_segments: u32,
}

/// Executes a request against `disk` and writes its status byte.
pub fn execute(
    mem: &GuestMem,
    disk: &dyn BlockDevice,
    info: &DeviceInfo,
    req: &Request,
) -> Completion {
    let (status, data_len) = match run(mem, disk, info, req) {
        Ok(n) => (VIRTIO_BLK_S_OK, n),
        Err(ReqError::Unsupported) => (VIRTIO_BLK_S_UNSUPP, 0),
        Err(ReqError::Io(e)) => {
            debug!("request {:?} sector {} failed: {e}", req.kind, req.sector);
            (VIRTIO_BLK_S_IOERR, 0)
        }
    };
    let status = status as u8;
    if let Err(e) = mem.write_obj(status, req.status) {
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

/// Completes a malformed chain whose status byte is known.
pub fn fail(mem: &GuestMem, status: GuestAddress) -> Completion {
    let s = VIRTIO_BLK_S_IOERR as u8;
    match mem.write_obj(s, status) {
        Ok(()) => Completion {
            status: s,
            used_len: 1,
        },
        Err(_) => Completion {
            status: s,
            used_len: 0,
        },
    }
}

enum ReqError {
    Unsupported,
    Io(io::Error),
}

impl From<io::Error> for ReqError {
    fn from(e: io::Error) -> Self {
        ReqError::Io(e)
    }
}

fn invalid(msg: &str) -> ReqError {
    ReqError::Io(io::Error::new(io::ErrorKind::InvalidInput, msg.to_string()))
}

/// Turns segments into guest slices; fails when any is outside guest memory.
fn slices<'m>(mem: &'m GuestMem, segs: &[Segment]) -> Result<Vec<GuestSlice<'m>>, ReqError> {
    let mut out = Vec::with_capacity(segs.len());
    for s in segs {
        if s.len == 0 {
            continue;
        }
        // A segment may straddle two memory regions: take it piecewise.
        for piece in mem.get_slices(s.addr, s.len as usize) {
            out.push(piece.map_err(|_| invalid("data buffer outside guest memory"))?);
        }
    }
    Ok(out)
}

fn byte_range(sector: u64, len: u64, capacity: u64) -> Result<u64, ReqError> {
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or_else(|| invalid("sector overflows"))?;
    crate::storage::check_range(capacity, offset, len)?;
    Ok(offset)
}

fn run(
    mem: &GuestMem,
    disk: &dyn BlockDevice,
    info: &DeviceInfo,
    req: &Request,
) -> Result<u32, ReqError> {
    match req.kind {
        RequestKind::In => {
            let bufs = slices(mem, &req.inp)?;
            let len = crate::storage::total_len(&bufs);
            if len as u64 % SECTOR_SIZE != 0 {
                return Err(invalid("read length is not a multiple of 512"));
            }
            let offset = byte_range(req.sector, len as u64, disk.capacity())?;
            disk.read_to_guest(offset, &bufs)?;
            u32::try_from(len).map_err(|_| invalid("read too long"))
        }
        RequestKind::Out => {
            if info.read_only {
                return Err(invalid("write to a read-only device"));
            }
            let bufs = slices(mem, &req.out)?;
            let len = crate::storage::total_len(&bufs);
            if len as u64 % SECTOR_SIZE != 0 {
                return Err(invalid("write length is not a multiple of 512"));
            }
            let offset = byte_range(req.sector, len as u64, disk.capacity())?;
            disk.write_from_guest(offset, &bufs)?;
            Ok(0)
        }
        RequestKind::Flush => {
            disk.flush()?;
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
                    .map_err(|_| invalid("GET_ID buffer"))?
                    .copy_from(&id[written..written + n]);
                written += n;
            }
            Ok(written as u32)
        }
        RequestKind::Discard | RequestKind::WriteZeroes => {
            if info.read_only {
                return Err(invalid("discard/write-zeroes on a read-only device"));
            }
            let zeroes = req.kind == RequestKind::WriteZeroes;
            let bufs = slices(mem, &req.out)?;
            let raw = crate::storage::gather(&bufs);
            if raw.is_empty() || raw.len() % DWZ_SEGMENT_LEN != 0 {
                return Err(invalid(
                    "discard/write-zeroes payload is not a list of segments",
                ));
            }
            if raw.len() / DWZ_SEGMENT_LEN > info.max_dwz_segments as usize {
                return Err(invalid("too many discard/write-zeroes segments"));
            }
            let max = if zeroes {
                info.max_write_zeroes_sectors
            } else {
                info.max_discard_sectors
            };
            // Validate every segment before touching the disk.
            let mut ranges = Vec::new();
            for seg in raw.chunks_exact(DWZ_SEGMENT_LEN) {
                let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or([0; 8]));
                let num = u32::from_le_bytes(seg[8..12].try_into().unwrap_or([0; 4]));
                let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or([0; 4]));
                let unmap = flags & DWZ_FLAG_UNMAP != 0;
                if flags & !DWZ_FLAG_UNMAP != 0 || (!zeroes && unmap) {
                    return Err(ReqError::Unsupported);
                }
                if num > max {
                    return Err(invalid(
                        "discard/write-zeroes segment larger than advertised",
                    ));
                }
                let len = u64::from(num) * SECTOR_SIZE;
                let offset = byte_range(sector, len, disk.capacity())?;
                ranges.push((offset, len, unmap));
            }
            for (offset, len, unmap) in ranges {
                if zeroes {
                    disk.write_zeroes(offset, len, unmap)?;
                } else {
                    disk.discard(offset, len)?;
                }
            }
            Ok(0)
        }
        RequestKind::Unsupported(t) => {
            debug!("unsupported request type {t}");
            Err(ReqError::Unsupported)
        }
    }
}
