//! Arbitrary descriptor chains over mock guest memory → the virtio-blk request parser and
//! executor, against a 128 KiB in-memory disk that panics on any access beyond its end.
//!
//! The chain is written into a split queue's descriptor table (linked in order, or with the
//! fuzzer's own NEXT flags and indices, plus an optional indirect table) and popped by
//! virtio-queue, as the backend does. Guest memory has two adjacent regions and a third one
//! after a hole, so segments can straddle regions or fall into the hole.
//!
//! Invariants: no panic; a malformed chain with a status byte completes with IOERR; a request
//! completes with OK, IOERR or UNSUPP, the same byte is in guest memory and the used length
//! counts it; a failed request or a read/GET_ID/flush leaves the disk unchanged; an OK write
//! changed exactly `[sector * 512, + data length)`, inside the disk, to the guest's data; an
//! OK discard/write-zeroes only zeroed bytes; an OK read put the disk's bytes in the guest's
//! buffers (checked when the buffers do not overlap) and the used length counts them.

#![no_main]

mod common;

use arbitrary::Arbitrary;
use colo_blk::virtio::fuzzing::{
    complete_malformed, execute, parse, Device, FuzzParsed, GuestMemory, Kind,
};
use libfuzzer_sys::fuzz_target;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend as _};

const DISK: usize = 128 << 10;
const QUEUE: u16 = 16;
const HDR: u64 = 0x1000;
const INDIRECT: u64 = 0x10_000;
const DWZ: u64 = 0x20_000;
const STATUS: u64 = 0x30_000;
/// Data buffers start 4 KiB before the boundary between the two adjacent regions.
const DATA: u64 = 0x3f_000;
const REGIONS: [(u64, usize); 3] = [(0, 0x40_000), (0x40_000, 0x40_000), (0x90_000, 0x10_000)];

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addr {
    Hdr,
    Data(u16),
    Dwz(u8),
    Status,
    Indirect,
    Near(u32),
    Any(u64),
}

impl Addr {
    fn get(self) -> u64 {
        match self {
            Addr::Hdr => HDR,
            Addr::Data(o) => DATA + u64::from(o),
            Addr::Dwz(o) => DWZ + u64::from(o),
            Addr::Status => STATUS,
            Addr::Indirect => INDIRECT,
            Addr::Near(a) => u64::from(a % 0xc0_000),
            Addr::Any(a) => a,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Len {
    One,
    Header,
    Sectors(u8),
    Small(u16),
    Any(u32),
}

impl Len {
    fn get(self) -> u32 {
        match self {
            Len::One => 1,
            Len::Header => 16,
            Len::Sectors(n) => u32::from(n % 20) * 512,
            Len::Small(n) => u32::from(n),
            Len::Any(n) => n,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Desc {
    addr: Addr,
    len: Len,
    write: bool,
    indirect: bool,
    /// For unlinked chains: the NEXT flag and index as given.
    next: Option<u8>,
}

#[derive(Arbitrary, Debug)]
enum ReqType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Raw(u32),
}

#[derive(Arbitrary, Debug)]
enum Sector {
    Small(u8),
    NearEnd(u8),
    Any(u64),
}

#[derive(Arbitrary, Debug)]
struct DwzSeg {
    sector: Sector,
    num: u16,
    flags: u8,
}

#[derive(Arbitrary, Debug)]
struct Input {
    req_type: ReqType,
    sector: Sector,
    /// Bytes 4..8 of the header (reserved/ioprio).
    ioprio: u32,
    read_only: bool,
    seg_max: u8,
    max_dwz_segments: u8,
    max_sectors: u16,
    /// Link the descriptors in order (like a driver) rather than as given.
    linked: bool,
    descs: Vec<Desc>,
    indirect_table: Vec<Desc>,
    dwz: Vec<DwzSeg>,
    data: Vec<u8>,
}

impl Sector {
    fn get(&self) -> u64 {
        let sectors = (DISK / 512) as u64;
        match self {
            Sector::Small(s) => u64::from(*s),
            Sector::NearEnd(s) => sectors.wrapping_sub(u64::from(*s % 32)),
            Sector::Any(s) => *s,
        }
    }
}

fn raw(d: &Desc, i: usize, n: usize, linked: bool) -> RawDescriptor {
    let mut flags = 0u16;
    if d.write {
        flags |= VRING_DESC_F_WRITE as u16;
    }
    if d.indirect {
        flags |= VRING_DESC_F_INDIRECT as u16;
    }
    let next = if linked {
        if i + 1 < n {
            flags |= VRING_DESC_F_NEXT as u16;
        }
        (i + 1) as u16
    } else if let Some(next) = d.next {
        flags |= VRING_DESC_F_NEXT as u16;
        u16::from(next)
    } else {
        0
    };
    RawDescriptor::from(Descriptor::new(d.addr.get(), d.len.get(), flags, next))
}

/// Reads guest segments into one buffer (None if any is outside guest memory).
fn gather(mem: &GuestMemory, segs: &[(u64, u32)]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for &(a, l) in segs {
        // Check before allocating: a segment may claim up to 4 GiB.
        if !mem.check_range(GuestAddress(a), l as usize) {
            return None;
        }
        let mut b = vec![0u8; l as usize];
        mem.read_slice(&mut b, GuestAddress(a)).ok()?;
        out.extend_from_slice(&b);
    }
    Some(out)
}

fn run(input: Input) {
    let ranges: Vec<(GuestAddress, usize)> =
        REGIONS.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    let mem = GuestMemory::from_ranges(&ranges).expect("guest memory");

    // Header, data, discard/write-zeroes segments.
    let t = match input.req_type {
        ReqType::In => VIRTIO_BLK_T_IN,
        ReqType::Out => VIRTIO_BLK_T_OUT,
        ReqType::Flush => VIRTIO_BLK_T_FLUSH,
        ReqType::GetId => VIRTIO_BLK_T_GET_ID,
        ReqType::Discard => VIRTIO_BLK_T_DISCARD,
        ReqType::WriteZeroes => VIRTIO_BLK_T_WRITE_ZEROES,
        ReqType::Raw(t) => t,
    };
    mem.write_obj(t.to_le(), GuestAddress(HDR)).unwrap();
    mem.write_obj(input.ioprio, GuestAddress(HDR + 4)).unwrap();
    mem.write_obj(input.sector.get().to_le(), GuestAddress(HDR + 8))
        .unwrap();
    let data = &input.data[..input.data.len().min(64 << 10)];
    mem.write_slice(data, GuestAddress(DATA)).unwrap();
    for (i, s) in input.dwz.iter().take(16).enumerate() {
        let at = DWZ + 16 * i as u64;
        mem.write_obj(s.sector.get().to_le(), GuestAddress(at))
            .unwrap();
        mem.write_obj(u32::from(s.num).to_le(), GuestAddress(at + 8))
            .unwrap();
        mem.write_obj(u32::from(s.flags).to_le(), GuestAddress(at + 12))
            .unwrap();
    }
    mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();

    // The chain, in the queue's descriptor table (and the indirect table).
    let vq = MockSplitQueue::new(&mem, QUEUE);
    let descs = &input.descs[..input.descs.len().min(QUEUE as usize)];
    if descs.is_empty() {
        return;
    }
    for (i, d) in descs.iter().enumerate() {
        vq.desc_table()
            .store(i as u16, raw(d, i, descs.len(), input.linked))
            .unwrap();
    }
    let ind = &input.indirect_table[..input.indirect_table.len().min(32)];
    for (i, d) in ind.iter().enumerate() {
        let r = raw(d, i, ind.len(), input.linked);
        mem.write_obj(r, GuestAddress(INDIRECT + 16 * i as u64))
            .unwrap();
    }
    mem.write_obj(0u16, vq.avail_addr().unchecked_add(4))
        .unwrap();
    mem.write_obj(1u16, vq.avail_addr().unchecked_add(2))
        .unwrap();
    let mut q: Queue = vq.create_queue().expect("queue");
    let Some(chain) = q.pop_descriptor_chain(&mem) else {
        return;
    };

    let disk = common::StrictDisk::new(common::pattern(DISK));
    let before = disk.snapshot();
    let device = Device {
        read_only: input.read_only,
        serial: b"fuzz-serial-0123456789".to_vec(),
        max_discard_sectors: u32::from(input.max_sectors),
        max_write_zeroes_sectors: u32::from(input.max_sectors) * 3,
        max_dwz_segments: u32::from(input.max_dwz_segments % 8),
    };
    let seg_max = u32::from(input.seg_max % 12);
    let status_byte = |a: u64| mem.read_obj::<u8>(GuestAddress(a)).expect("status byte");

    match parse(&mem, chain, seg_max) {
        FuzzParsed::NoStatus => assert_eq!(disk.snapshot(), before),
        FuzzParsed::Malformed(st) => {
            assert_eq!(complete_malformed(&mem, st), (VIRTIO_BLK_S_IOERR as u8, 1));
            assert_eq!(status_byte(st), VIRTIO_BLK_S_IOERR as u8);
            assert_eq!(disk.snapshot(), before);
        }
        FuzzParsed::Request(r) => {
            let out_data = gather(&mem, &r.out_segments());
            let (status, used) = execute(&mem, &disk, &device, &r);
            assert!(
                [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP]
                    .contains(&u32::from(status)),
                "status {status}"
            );
            assert_eq!(status_byte(r.status_addr()), status);
            if std::env::var_os("COLO_FUZZ_SUMMARY").is_some() {
                // For picking seeds and triage: what the input turned into.
                eprintln!(
                    "summary: {:?} sector {} status {status} used {used}",
                    r.kind(),
                    r.sector()
                );
            }
            let after = disk.snapshot();
            if status != VIRTIO_BLK_S_OK as u8 {
                assert_eq!(used, 1);
                assert_eq!(after, before, "a failed request changed the disk");
                return;
            }
            let in_len: u64 = r.in_segments().iter().map(|s| u64::from(s.1)).sum();
            match r.kind() {
                Kind::Out => {
                    assert!(!input.read_only);
                    let data = out_data.expect("an OK write's data is in guest memory");
                    let off = r.sector().checked_mul(512).expect("offset overflows");
                    let end = off + data.len() as u64;
                    assert!(
                        end <= DISK as u64,
                        "OK write beyond the disk: {off}+{}",
                        data.len()
                    );
                    let (off, end) = (off as usize, end as usize);
                    assert_eq!(&after[off..end], &data[..], "written data");
                    assert_eq!(&after[..off], &before[..off]);
                    assert_eq!(&after[end..], &before[end..]);
                    assert_eq!(used, 1);
                }
                Kind::Discard | Kind::WriteZeroes => {
                    assert!(!input.read_only);
                    for (i, (a, b)) in before.iter().zip(&after).enumerate() {
                        assert!(a == b || *b == 0, "byte {i} changed to {b}");
                    }
                    assert_eq!(used, 1);
                }
                Kind::In => {
                    assert_eq!(after, before, "a read changed the disk");
                    assert_eq!(u64::from(used), in_len + 1);
                    let off = (r.sector() * 512) as usize;
                    assert!(off + in_len as usize <= DISK);
                    // Compare when no buffer byte (nor the status byte) is written twice.
                    let mut spans: Vec<(u64, u64)> = r
                        .in_segments()
                        .iter()
                        .map(|&(a, l)| (a, a + u64::from(l)))
                        .collect();
                    spans.push((r.status_addr(), r.status_addr() + 1));
                    spans.sort();
                    if spans.windows(2).all(|w| w[0].1 <= w[1].0) {
                        let got = gather(&mem, &r.in_segments()).expect("read buffers");
                        assert_eq!(&got[..], &before[off..off + in_len as usize], "read data");
                    }
                }
                Kind::GetId => {
                    assert_eq!(after, before);
                    assert_eq!(u64::from(used), in_len.min(20) + 1);
                }
                Kind::Flush => {
                    assert_eq!(after, before);
                    assert_eq!(used, 1);
                }
                Kind::Unsupported(t) => panic!("unsupported type {t} completed OK"),
            }
        }
    }
}

fuzz_target!(|input: Input| run(input));
