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
/// Largest data transfer of one request. Linux guests send at most a few MiB; the cap keeps a
/// hostile chain from making the host allocate gigabytes for a bounce buffer.
pub const MAX_REQUEST_BYTES: usize = 128 << 20;

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
            if len > MAX_REQUEST_BYTES {
                return Err(invalid("read larger than the per-request limit"));
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
            if len > MAX_REQUEST_BYTES {
                return Err(invalid("write larger than the per-request limit"));
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
            // Bound the segment list before copying it out of guest memory.
            let raw_len: u64 = req.out.iter().map(|s| u64::from(s.len)).sum();
            if raw_len > u64::from(info.max_dwz_segments) * DWZ_SEGMENT_LEN as u64 {
                return Err(invalid("too many discard/write-zeroes segments"));
            }
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
