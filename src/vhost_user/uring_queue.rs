//! The `uring` I/O engine of one virtqueue: the requests of a plain raw image go to an io_uring
//! ([`ImageRing`]) instead of blocking the worker or an I/O pool thread.
//!
//! The worker pops every available chain (`BlkBackend::pop_all`), turns each read, write and
//! flush into one SQE whose iovecs point straight into guest memory, runs anything else
//! (discard, write-zeroes, GET_ID, malformed chains, O_DIRECT requests that need a bounce
//! buffer) synchronously as before, and submits the whole batch with one `io_uring_enter`.
//! Buffered writes of 128 KiB or more skip the ring and go to the I/O pool (`BlkBackend`'s
//! `uring_kick`): io-wq would copy them into the page cache one at a time.
//! Completions are reaped in batches (right after the submission, and whenever the ring's
//! eventfd wakes the worker's epoll loop) and put on the used ring under one lock with one
//! notification.
//!
//! Each in-flight request occupies a [`Slot`] of a per-queue slab: its parsed [`Request`], a
//! reused iovec array and a guard that keeps the guest memory mapping alive until the CQE. After
//! warm-up no allocation happens here (the slab and the iovec arrays keep their capacity).
//! A read's pages are marked dirty in the vhost-user log when it completes, as the synchronous
//! path does: the kernel wrote them behind vm-memory's back.

use std::io;

use log::debug;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryLoadGuard};

use crate::storage::uring::{ImageRing, MAX_IOV};
use crate::storage::{BlockDevice, GuestMem, RawImage, SECTOR_SIZE};
use crate::virtio::request::{
    self, Completion, DeviceInfo, Parsed, Request, RequestError, RequestKind, Segment,
    MAX_REQUEST_BYTES,
};

/// Buffered reads at least this large go straight to io_uring's worker threads: they are
/// memory copies out of the page cache, which one queue's thread alone would do serially.
const PUNT_READ_BYTES: u32 = 128 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Flush,
}

/// One request in flight on the ring.
#[derive(Default)]
struct Slot {
    head: u16,
    op: Option<Op>,
    /// Bytes the read or write moves.
    len: u32,
    req: Option<Request>,
    /// The iovecs the SQE points to; cleared, not freed, between requests.
    iov: Vec<libc::iovec>,
    /// Keeps the memory the iovecs point into mapped until the completion.
    mem: Option<GuestMemoryLoadGuard<GuestMem>>,
    /// When the request was submitted (for the latency histogram).
    started: Option<std::time::Instant>,
}

/// What one completed request did.
pub(crate) struct Finished {
    pub head: u16,
    pub completion: Completion,
    /// Bytes of disk data moved: `(read, written)`, as [`Request::data_bytes`].
    pub data: (u64, u64),
    /// When it was submitted.
    pub started: std::time::Instant,
}

/// The ring and the in-flight requests of one queue.
pub(crate) struct UringQueue {
    pub(crate) ring: ImageRing,
    slots: Vec<Slot>,
    free: Vec<u32>,
    inflight: usize,
}

// SAFETY: the only members that are not `Send` are the iovecs' raw pointers, which point into
// guest memory that the slot's own `GuestMemoryLoadGuard` keeps mapped; they are only read by the
// kernel and are never dereferenced by this process. The queue is used under a `Mutex`.
unsafe impl Send for UringQueue {}

impl UringQueue {
    /// A ring for `image` with room for `queue_size` requests in one submission.
    pub(crate) fn new(image: &RawImage, queue_size: u16) -> io::Result<Self> {
        Ok(UringQueue {
            ring: ImageRing::new(image, u32::from(queue_size))?,
            slots: Vec::new(),
            free: Vec::new(),
            inflight: 0,
        })
    }

    /// Requests on the ring, not yet reaped.
    pub(crate) fn inflight(&self) -> usize {
        self.inflight
    }

    /// Queues `parsed` on the ring when it is a read, write or flush that the raw image can do
    /// directly on guest memory; gives it back otherwise (the caller runs it synchronously, and
    /// that path also produces every error status).
    pub(crate) fn try_push(
        &mut self,
        head: u16,
        parsed: Parsed,
        mem: &GuestMemoryLoadGuard<GuestMem>,
        image: &RawImage,
        info: &DeviceInfo,
    ) -> Result<(), Parsed> {
        let Parsed::Ok(req) = parsed else {
            return Err(parsed);
        };
        let writable = !info.read_only && !image.is_read_only();
        let op = match req.kind {
            RequestKind::In => Op::Read,
            RequestKind::Out if writable => Op::Write,
            RequestKind::Flush if writable => Op::Flush,
            _ => return Err(Parsed::Ok(req)),
        };
        let idx = match self.free.pop() {
            Some(i) => i as usize,
            None => {
                self.slots.push(Slot::default());
                self.slots.len() - 1
            }
        };
        let slot = &mut self.slots[idx];
        slot.iov.clear();
        let pushed = match op {
            Op::Flush => {
                slot.len = 0;
                self.ring.push_fdatasync(idx as u64)
            }
            Op::Read | Op::Write => {
                let segs = if op == Op::Read { &req.inp } else { &req.out };
                let Some((offset, len)) = fill_iov(mem, segs, &mut slot.iov, &req, image) else {
                    self.free.push(idx as u32);
                    return Err(Parsed::Ok(req));
                };
                slot.len = len;
                let (iov, n) = (slot.iov.as_ptr(), slot.iov.len() as u32);
                // SAFETY: the iovec array lives in the slot, which is neither touched nor
                // dropped until this request's completion is reaped (`Drop` waits for it), and
                // every iovec points into guest memory that `slot.mem` keeps mapped until then.
                unsafe {
                    if op == Op::Read {
                        let punt = !image.is_direct() && len >= PUNT_READ_BYTES;
                        self.ring.push_readv(iov, n, offset, idx as u64, punt)
                    } else {
                        self.ring.push_writev(iov, n, offset, idx as u64)
                    }
                }
            }
        };
        if let Err(e) = pushed {
            debug!("io_uring submission failed ({e}); running the request synchronously");
            self.free.push(idx as u32);
            return Err(Parsed::Ok(req));
        }
        slot.head = head;
        slot.op = Some(op);
        slot.req = Some(req);
        slot.mem = Some(mem.clone());
        slot.started = Some(std::time::Instant::now());
        self.inflight += 1;
        Ok(())
    }

    /// Reaps every completion available now and finishes those requests (status byte, dirty
    /// log); `f` gets each one for the used ring and the counters.
    pub(crate) fn reap(
        &mut self,
        disk: &dyn BlockDevice,
        info: &DeviceInfo,
        mut f: impl FnMut(Finished),
    ) -> usize {
        let UringQueue {
            ring,
            slots,
            free,
            inflight,
        } = self;
        ring.reap(|user_data, res| {
            let idx = user_data as usize;
            let Some(slot) = slots.get_mut(idx) else {
                return;
            };
            let (Some(op), Some(req), Some(mem)) =
                (slot.op.take(), slot.req.take(), slot.mem.take())
            else {
                return;
            };
            let completion = finish(op, slot.len, res, &mem, &req, disk, info);
            f(Finished {
                head: slot.head,
                completion,
                data: req.data_bytes(),
                started: slot.started.take().unwrap_or_else(std::time::Instant::now),
            });
            free.push(idx as u32);
            *inflight -= 1;
        })
    }

    /// Waits for and finishes every request on the ring.
    pub(crate) fn drain(
        &mut self,
        disk: &dyn BlockDevice,
        info: &DeviceInfo,
        mut f: impl FnMut(Finished),
    ) {
        while self.inflight > 0 {
            if let Err(e) = self.ring.submit(1) {
                log::warn!("waiting for io_uring completions failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            self.reap(disk, info, &mut f);
        }
    }
}

impl Drop for UringQueue {
    fn drop(&mut self) {
        // The kernel may still write into guest memory that the slots keep mapped: wait for it
        // (the backend drains before it lets a queue go; this is the last line of defence).
        while self.inflight > 0 {
            if self.ring.submit(1).is_err() {
                break;
            }
            let UringQueue {
                ring,
                slots,
                inflight,
                ..
            } = self;
            ring.reap(|user_data, _| {
                if let Some(s) = slots.get_mut(user_data as usize) {
                    s.mem = None;
                    s.req = None;
                    s.op = None;
                }
                *inflight -= 1;
            });
        }
    }
}

/// Fills `iov` with the guest buffers of a read or write and checks what the synchronous path
/// checks (buffers inside guest memory, whole sectors, size limit, range, O_DIRECT alignment);
/// returns `(offset, len)`, or `None` when the request must take the synchronous path.
fn fill_iov(
    mem: &GuestMem,
    segs: &[Segment],
    iov: &mut Vec<libc::iovec>,
    req: &Request,
    image: &RawImage,
) -> Option<(u64, u32)> {
    let mut len = 0usize;
    for s in segs {
        if s.len == 0 {
            continue;
        }
        for piece in mem.get_slices(s.addr, s.len as usize) {
            let piece = piece.ok()?;
            iov.push(libc::iovec {
                // The pointer of a plain mmap-backed slice; it stays valid while the memory
                // guard of the slot is held.
                iov_base: piece.ptr_guard_mut().as_ptr() as *mut libc::c_void,
                iov_len: piece.len(),
            });
            len += piece.len();
        }
    }
    if len == 0 || len as u64 % SECTOR_SIZE != 0 || len > MAX_REQUEST_BYTES || iov.len() > MAX_IOV {
        return None;
    }
    let offset = req.sector.checked_mul(SECTOR_SIZE)?;
    crate::storage::check_range(image.capacity(), offset, len as u64).ok()?;
    let addrs = iov.iter().map(|v| (v.iov_base as usize, v.iov_len));
    if !image.aligned(offset, len, addrs) {
        return None;
    }
    Some((offset, len as u32))
}

/// Marks the guest pages of `segs` dirty in the vhost-user log.
fn mark_dirty(mem: &GuestMem, segs: &[Segment]) {
    for s in segs {
        if s.len == 0 {
            continue;
        }
        for piece in mem.get_slices(s.addr, s.len as usize).flatten() {
            piece.bitmap().mark_dirty(0, piece.len());
        }
    }
}

/// Turns a CQE result into the request's completion. A short transfer (a file that shrank under
/// us, a write cut short) or an interrupted one is redone synchronously from the start, which
/// gives exactly the synchronous path's result.
fn finish(
    op: Op,
    len: u32,
    res: i32,
    mem: &GuestMem,
    req: &Request,
    disk: &dyn BlockDevice,
    info: &DeviceInfo,
) -> Completion {
    if op == Op::Read {
        // Whatever the outcome, the kernel may have written into these pages.
        mark_dirty(mem, &req.inp);
    }
    let want = if op == Op::Flush { 0 } else { len as i32 };
    if res == want {
        let written = if op == Op::Read { len } else { 0 };
        return request::complete(mem, req.status, Ok(written));
    }
    if res >= 0 || res == -libc::EINTR || res == -libc::EAGAIN {
        return request::execute(mem, disk, info, req);
    }
    let e = RequestError::Io {
        op: match op {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
        },
        source: io::Error::from_raw_os_error(-res),
    };
    debug!("request {:?} sector {} failed: {e}", req.kind, req.sector);
    request::complete(mem, req.status, Err(e))
}
