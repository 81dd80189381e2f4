//! Dirty-page logging of read data, without QEMU: this file is a vhost-user front-end of its own
//! (the `vhost` crate's `Frontend`) against the real colo-blk binary, so that every request takes
//! a path the test chose, deterministically.
//!
//! While the front-end has acked `VHOST_F_LOG_ALL` and given a log (`SET_LOG_BASE` with
//! `LOG_SHMFD`; QEMU does this for migration, and all the time under COLO), the backend must set
//! the log bit of every guest page it writes. Status bytes and the used ring go through
//! vm-memory, which logs them itself; read data does not: the kernel writes it straight into
//! guest memory (`preadv` in `RawImage::read_to_guest`, src/storage/raw.rs, and io_uring READV,
//! whose pages `finish()` in src/vhost_user/uring_queue.rs marks). tests/migration_dirty_log.rs
//! covers this with a real guest, but the guest's reads mostly arrive one at a time and take
//! the synchronous path, so a ring path that forgets to log survives it. Here:
//!
//! - the guest memory (64 MiB memfd) and the log (a memfd, one bit per 4 KiB page) are mapped
//!   by the test; one split virtqueue is laid out by hand in it;
//! - each request is a 3-descriptor chain: 16-byte header (`VIRTIO_BLK_T_IN`), a 4 KiB
//!   device-writable data buffer on a page of its own (no header, status byte or ring on it,
//!   so only the data write can log it), a 1-byte status;
//! - batch tests: 32 reads on the avail ring, published with ONE index update and ONE kick, so
//!   the worker pops all 32 as one batch: with `--io-engine uring` they go to the io_uring,
//!   with `threads` to the I/O pool (31) and the worker (1), both via `read_to_guest`;
//! - lone-read tests: one read on an idle queue, which both engines run inline (`preadv`);
//! - every test checks status 0, used length, the data against the image, and that the log bit
//!   of every data page (and of the status and used-ring pages) is set; a failure names the
//!   unlogged pages. Completion is awaited on the call eventfd (timeout 30 s), re-reading the
//!   used index; no sleeps.
//!
//! The io_uring variants skip loudly when the kernel refuses io_uring (the backend's own probe),
//! except in CI, where that is a failure.
//!
//! Mutation check (by hand when this test was written):
//! - `finish()` in uring_queue.rs without its `mark_dirty(mem, &req.inp)`: the uring batch test
//!   FAILED (all 32 data pages unlogged); every other test passed;
//! - `read_to_guest` in raw.rs without its `mark_dirty` loop: both lone-read tests and the
//!   threads batch test FAILED; the uring batch test passed (it does not use that path).
//!
//! Intact, the whole file runs in well under a second of test time.

mod common;

use std::ffi::CStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use common::needs::Needs;
use common::{pattern, tempdir, Backend};
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserVringAddrFlags};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The vhost-user log's page size (one bit each).
const PAGE: u64 = 4096;
const GUEST_MEM: u64 = 64 << 20;
const IMAGE_SIZE: u64 = 16 << 20;
const IMAGE_SEED: u64 = 0xd127_1065;
const QUEUE_SIZE: u16 = 256;

// Guest-physical layout (memory region at 0). Rings, headers and status bytes each have pages
// of their own, away from the data pages.
/// 256 descriptors of 16 bytes: one page.
const DESC_TABLE: u64 = 0x0000;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
/// Request headers, 16 bytes per request slot.
const HEADERS: u64 = 0x4000;
/// Status bytes, one per request slot.
const STATUS: u64 = 0x5000;
/// Data buffers: slot `i` uses the page at `DATA + i * DATA_STRIDE` (distinct pages with
/// untouched pages between them).
const DATA: u64 = 1 << 20;
const DATA_STRIDE: u64 = 3 * PAGE;
/// Requests of the batch tests.
const BATCH: u16 = 32;
/// Longest wait for the backend's completions.
const TIMEOUT: Duration = Duration::from_secs(30);

/// A memfd of `len` bytes mapped shared into this process; the backend maps the same file.
struct Shm {
    fd: OwnedFd,
    ptr: *mut u8,
    len: usize,
}

impl Shm {
    fn new(name: &CStr, len: usize) -> Shm {
        // SAFETY: a NUL-terminated name; the call creates a new descriptor or fails.
        let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(
            raw >= 0,
            "memfd_create: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate(2) on our descriptor; no memory involved.
        let r = unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) };
        assert_eq!(r, 0, "ftruncate: {}", std::io::Error::last_os_error());
        // SAFETY: a new shared mapping of the whole file, at an address the kernel chooses.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert!(
            ptr != libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Shm {
            fd,
            ptr: ptr.cast(),
            len,
        }
    }

    fn check(&self, off: u64, len: usize) -> usize {
        let off = off as usize;
        assert!(off + len <= self.len, "{off:#x}+{len} outside the mapping");
        off
    }

    fn write(&self, off: u64, bytes: &[u8]) {
        let off = self.check(off, bytes.len());
        // SAFETY: inside the mapping (checked); the backend does not touch these bytes until
        // the request is published on the avail ring.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(off), bytes.len()) };
    }

    fn read(&self, off: u64, len: usize) -> Vec<u8> {
        let off = self.check(off, len);
        let mut v = vec![0u8; len];
        // SAFETY: inside the mapping (checked); read after the used index (acquire) said the
        // backend is done with them.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), v.as_mut_ptr(), len) };
        v
    }

    /// The 16-bit ring index at `off`, shared with the backend.
    fn index(&self, off: u64) -> &AtomicU16 {
        let off = self.check(off, 2);
        assert_eq!(off % 2, 0);
        // SAFETY: aligned, inside the mapping, which lives as long as `self`; the other side
        // accesses it atomically too (virtio-queue's loads and stores).
        unsafe { &*self.ptr.add(off).cast::<AtomicU16>() }
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer referenced.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A colo-blk process, connected, its one queue set up and enabled, logging on.
struct Device {
    engine: &'static str,
    /// The vhost-user connection (closed on drop).
    _fe: Frontend,
    mem: Shm,
    log: Shm,
    kick: EventFd,
    call: EventFd,
    image: Vec<u8>,
    next_avail: u16,
    _backend: Backend,
    _dir: tempfile::TempDir,
}

/// One read: request slot (descriptors `3 * slot ..`, header, status byte, data page) and sector.
#[derive(Debug, Clone, Copy)]
struct Read {
    slot: u16,
    sector: u64,
}

impl Read {
    fn head(self) -> u16 {
        3 * self.slot
    }
    fn data(self) -> u64 {
        DATA + u64::from(self.slot) * DATA_STRIDE
    }
    fn status(self) -> u64 {
        STATUS + u64::from(self.slot)
    }
}

/// The reads of request slots `slots`, at distinct 4 KiB-aligned sectors spread over the image.
fn reads(slots: std::ops::Range<u16>) -> Vec<Read> {
    let blocks = IMAGE_SIZE / PAGE;
    slots
        .map(|slot| Read {
            slot,
            sector: ((u64::from(slot) * 97 + 5) % blocks) * (PAGE / 512),
        })
        .collect()
}

impl Device {
    /// Starts colo-blk with `engine` and negotiates as QEMU does while it migrates; `None` when
    /// the engine is io_uring and the kernel refuses it (outside CI).
    fn start(engine: &'static str) -> Option<Device> {
        if engine == "uring" {
            let probe = colo_blk::storage::uring::probe();
            let why = probe
                .as_ref()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            if !Needs::of(&format!("vhost_user_dirty_log on {engine}"))
                .that(probe.is_ok(), format!("io_uring ({why})"))
                .met()
            {
                return None;
            }
        }
        let dir = tempdir();
        let sock = dir.path().join("vhost.sock");
        let img = dir.path().join("disk.img");
        let image = pattern(IMAGE_SEED, IMAGE_SIZE as usize);
        std::fs::write(&img, &image).unwrap();
        let qmp = dir.path().join("qmp.sock");
        let backend = Backend::start(
            &sock,
            &img,
            &[
                "--io-engine",
                engine,
                "--num-queues",
                "1",
                "--poll-max-ns",
                "0",
                "--qmp",
                qmp.to_str().unwrap(),
            ],
        );
        let want = if engine == "uring" {
            "io_uring"
        } else {
            "threads"
        };
        assert_eq!(
            backend.io_engine(),
            want,
            "{engine}: the engine the backend chose"
        );

        let mut fe = Frontend::connect(&sock, 1).expect("connect to colo-blk");
        fe.set_owner().expect("SET_OWNER");
        let offered = fe.get_features().expect("GET_FEATURES");
        let log_all = VhostUserVirtioFeatures::LOG_ALL.bits();
        let proto = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        assert_eq!(offered & log_all, log_all, "LOG_ALL not offered");
        assert_eq!(offered & proto, proto, "PROTOCOL_FEATURES not offered");
        let want_proto =
            VhostUserProtocolFeatures::LOG_SHMFD | VhostUserProtocolFeatures::REPLY_ACK;
        let pf = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        assert!(pf.contains(want_proto), "protocol features {pf:?}");
        fe.set_protocol_features(want_proto)
            .expect("SET_PROTOCOL_FEATURES");
        // Every message from here on waits for the backend's answer: the ring is set up when
        // the test kicks.
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let version_1 = offered & (1 << VIRTIO_F_VERSION_1);
        fe.set_features(log_all | proto | version_1)
            .expect("SET_FEATURES");

        let mem = Shm::new(c"guest-ram", GUEST_MEM as usize);
        fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: GUEST_MEM,
            userspace_addr: mem.ptr as u64,
            mmap_offset: 0,
            mmap_handle: mem.fd.as_raw_fd(),
        }])
        .expect("SET_MEM_TABLE");
        let log_len = (GUEST_MEM / PAGE).div_ceil(8);
        let log = Shm::new(c"dirty-log", log_len as usize);
        fe.set_log_base(
            0,
            Some(VhostUserDirtyLogRegion {
                mmap_size: log_len,
                mmap_offset: 0,
                mmap_handle: log.fd.as_raw_fd(),
            }),
        )
        .expect("SET_LOG_BASE");

        fe.set_vring_num(0, QUEUE_SIZE).expect("SET_VRING_NUM");
        let host = |gpa: u64| mem.ptr as u64 + gpa;
        fe.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: QUEUE_SIZE,
                flags: VhostUserVringAddrFlags::VHOST_VRING_F_LOG.bits(),
                desc_table_addr: host(DESC_TABLE),
                used_ring_addr: host(USED_RING),
                avail_ring_addr: host(AVAIL_RING),
                log_addr: Some(USED_RING),
            },
        )
        .expect("SET_VRING_ADDR");
        fe.set_vring_base(0, 0).expect("SET_VRING_BASE");
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        fe.set_vring_call(0, &call).expect("SET_VRING_CALL");
        fe.set_vring_kick(0, &kick).expect("SET_VRING_KICK");
        fe.set_vring_enable(0, true).expect("SET_VRING_ENABLE");
        Some(Device {
            engine,
            _fe: fe,
            mem,
            log,
            kick,
            call,
            image,
            next_avail: 0,
            _backend: backend,
            _dir: dir,
        })
    }

    fn logged(&self, gpa: u64) -> bool {
        let page = gpa / PAGE;
        self.log.read(page / 8, 1)[0] & (1 << (page % 8)) != 0
    }

    /// Writes descriptor `i`.
    fn desc(&self, i: u16, addr: u64, len: u32, flags: u32, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&(flags as u16).to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write(DESC_TABLE + 16 * u64::from(i), &d);
    }

    /// Lays out `r`'s chain (header, data page filled with 0xee, status 0xff); not yet available.
    fn put(&self, r: Read) {
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        hdr[8..16].copy_from_slice(&r.sector.to_le_bytes());
        let hdr_addr = HEADERS + 16 * u64::from(r.slot);
        self.mem.write(hdr_addr, &hdr);
        self.mem.write(r.data(), &[0xee; PAGE as usize]);
        self.mem.write(r.status(), &[0xff]);
        let (d, next, write) = (r.head(), VRING_DESC_F_NEXT, VRING_DESC_F_WRITE);
        self.desc(d, hdr_addr, 16, next, d + 1);
        self.desc(d + 1, r.data(), PAGE as u32, next | write, d + 2);
        self.desc(d + 2, r.status(), 1, write, 0);
    }

    /// Puts the chains of `rs` on the avail ring with ONE index update, then kicks once.
    fn submit(&mut self, rs: &[Read]) {
        for (k, r) in rs.iter().enumerate() {
            let pos = self.next_avail.wrapping_add(k as u16) % QUEUE_SIZE;
            self.mem
                .write(AVAIL_RING + 4 + 2 * u64::from(pos), &r.head().to_le_bytes());
        }
        self.next_avail = self.next_avail.wrapping_add(rs.len() as u16);
        self.mem
            .index(AVAIL_RING + 2)
            .store(self.next_avail, Ordering::Release);
        self.kick.write(1).expect("kick");
    }

    /// Waits until the used index reaches `want`: on the call eventfd, re-reading the index.
    fn wait_used(&self, want: u16) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let used = self.mem.index(USED_RING + 2).load(Ordering::Acquire);
            if used == want {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{}: used index {used} after {TIMEOUT:?}, want {want}",
                self.engine
            );
            let mut pfd = libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(1000) as libc::c_int) };
            assert!(r >= 0, "poll: {}", std::io::Error::last_os_error());
            // Consume the notification (EAGAIN when there was none).
            let _ = self.call.read();
        }
    }

    /// Runs `rs` as one batch and checks status, used ring, data and the dirty log.
    fn run_and_check(&mut self, rs: &[Read]) {
        let engine = self.engine;
        for r in rs {
            self.put(*r);
        }
        let dirty_before: Vec<u64> = rs
            .iter()
            .map(|r| r.data())
            .filter(|&p| self.logged(p))
            .collect();
        assert!(
            dirty_before.is_empty(),
            "{engine}: data pages logged before any request ran: {dirty_before:#x?}"
        );
        let first_used = self.mem.index(USED_RING + 2).load(Ordering::Acquire);
        self.submit(rs);
        self.wait_used(first_used.wrapping_add(rs.len() as u16));

        // The used ring holds every head once, each with 4 KiB + the status byte.
        let mut heads = Vec::new();
        for k in 0..rs.len() as u16 {
            let pos = first_used.wrapping_add(k) % QUEUE_SIZE;
            let e = self.mem.read(USED_RING + 4 + 8 * u64::from(pos), 8);
            let id = u32::from_le_bytes(e[0..4].try_into().unwrap());
            let len = u32::from_le_bytes(e[4..8].try_into().unwrap());
            assert_eq!(len, PAGE as u32 + 1, "{engine}: used length of head {id}");
            heads.push(id);
        }
        heads.sort_unstable();
        let mut want: Vec<u32> = rs.iter().map(|r| u32::from(r.head())).collect();
        want.sort_unstable();
        assert_eq!(heads, want, "{engine}: heads on the used ring");

        let mut unlogged = Vec::new();
        for r in rs {
            let status = self.mem.read(r.status(), 1)[0];
            assert_eq!(status, VIRTIO_BLK_S_OK as u8, "{engine}: status of {r:?}");
            let off = (r.sector * 512) as usize;
            let got = self.mem.read(r.data(), PAGE as usize);
            assert!(
                got[..] == self.image[off..off + PAGE as usize],
                "{engine}: {r:?} read other bytes than the image holds"
            );
            if !self.logged(r.data()) {
                unlogged.push(format!(
                    "slot {} (sector {}): page {} at {:#x}",
                    r.slot,
                    r.sector,
                    r.data() / PAGE,
                    r.data()
                ));
            }
        }
        assert!(
            unlogged.is_empty(),
            "{engine}: {} of {} data pages written by the backend are not in the dirty log:\n  {}",
            unlogged.len(),
            rs.len(),
            unlogged.join("\n  ")
        );
        // Written through vm-memory, which logs by itself.
        assert!(self.logged(STATUS), "{engine}: status page not logged");
        assert!(
            self.logged(USED_RING),
            "{engine}: used ring page not logged"
        );
    }
}

/// 32 reads, one kick: with `uring` they run on the io_uring (`finish()` must log them).
fn batch(engine: &'static str) {
    let Some(mut dev) = Device::start(engine) else {
        return;
    };
    dev.run_and_check(&reads(0..BATCH));
    // Still logged in a second batch on the same queue (the ring's slots reused).
    dev.run_and_check(&reads(BATCH..2 * BATCH));
}

/// One read on an idle queue: both engines run it inline (`read_to_guest`, `preadv`).
fn lone(engine: &'static str) {
    let Some(mut dev) = Device::start(engine) else {
        return;
    };
    dev.run_and_check(&reads(0..1));
    dev.run_and_check(&reads(1..2));
}

#[test]
fn batch_of_reads_on_io_uring_logs_every_data_page() {
    batch("uring");
}

#[test]
fn batch_of_reads_on_io_threads_logs_every_data_page() {
    batch("threads");
}

#[test]
fn lone_read_with_io_uring_engine_logs_its_data_page() {
    lone("uring");
}

#[test]
fn lone_read_with_threads_engine_logs_its_data_page() {
    lone("threads");
}
