//! Inflight I/O tracking (vhost-user protocol feature `INFLIGHT_SHMFD`, spec section "Inflight
//! I/O tracking"; docs/inflight.md): a region shared with QEMU, which keeps it across backend
//! restarts, recording every request from its pop to its completion, so that a restarted
//! backend resubmits exactly the requests it had not completed, in the order it popped them.
//!
//! Layout per queue (split rings, as libvhost-user and the spec): a 16-byte header
//! `{features u64, version u16, desc_num u16, last_batch_head u16, used_idx u16}`, then
//! `desc_num` 16-byte states `{inflight u8, padding [u8; 5], next u16, counter u64}` indexed by
//! descriptor head; each queue's part is rounded up to 64 bytes.
//!
//! Protocol, all under the queue's vring lock (one writer per queue):
//! - pop of `head`: `counter` ← next counter, then `inflight` ← 1;
//! - completion of `head`: `last_batch_head` ← head; the used element and the ring's used index
//!   are published (`add_used`, one completion per index store); then `inflight` ← 0 and
//!   `used_idx` ← the new used index.
//!
//! Recovery at start ([`QueueInflight::recover`]): a region `used_idx` behind the ring's means
//! the crash came after the used index was published and before the region caught up: that
//! completion (`last_batch_head`) is done. Every state still inflight was popped and never
//! completed: the ring resumes at `used_idx + inflight` and they are resubmitted by counter.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress};

use crate::storage::GuestMem;

/// Bytes of a queue's header.
const HEADER: usize = 16;
/// Bytes of one descriptor's state.
const DESC_STATE: usize = 16;
/// The region format this backend writes.
const VERSION: u16 = 1;

/// Bytes of one queue's part of the region.
pub(crate) fn queue_region_size(queue_size: u16) -> usize {
    (HEADER + DESC_STATE * usize::from(queue_size)).div_ceil(64) * 64
}

/// Bytes of a region for `num_queues` queues of `queue_size` descriptors.
pub(crate) fn region_size(num_queues: u16, queue_size: u16) -> usize {
    usize::from(num_queues) * queue_region_size(queue_size)
}

/// What a restarted queue does before it pops new requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Recovery {
    /// Where popping resumes (`None`: where the front-end said; a fresh region).
    pub next_avail: Option<u16>,
    /// The heads popped and never completed, in the order they were popped.
    pub resubmit: Vec<u16>,
}

/// Why a front-end's inflight region or a chain recorded in it cannot be used. The region's
/// refusal becomes an `io::Error` at the vhost-user boundary (`set_inflight_fd`, which
/// refuses the message); a chain's is logged and its request completed without a status.
#[derive(Debug, thiserror::Error)]
pub(crate) enum InflightError {
    /// SET_INFLIGHT_FD names a region that does not fit its file or names no queue.
    #[error(
        "inflight region of {len} bytes at {offset} of a {file_len}-byte file for \
         {num_queues} queues of {queue_size} descriptors (needs {need})"
    )]
    Region {
        len: u64,
        offset: u64,
        file_len: u64,
        num_queues: u16,
        queue_size: u16,
        need: u64,
    },
    /// The region does not fit this process's address space or file offsets.
    #[error("region too large")]
    TooLarge,
    #[error("offset")]
    Offset,
    /// A resubmitted chain whose descriptors cannot be followed.
    #[error("chain at head {0} is malformed")]
    Malformed(u16),
    #[error("chain at head {0}: misplaced indirect table")]
    MisplacedIndirect(u16),
    #[error("indirect table too large")]
    IndirectTooLarge,
    #[error("descriptor address overflows")]
    AddressOverflow,
    #[error("descriptor {0}: {1}")]
    Descriptor(u16, vm_memory::GuestMemoryError),
    /// The file or the mapping failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl From<InflightError> for io::Error {
    fn from(e: InflightError) -> io::Error {
        match e {
            InflightError::Io(e) => e,
            e @ InflightError::Region { .. } => io::Error::new(io::ErrorKind::InvalidInput, e),
            e => io::Error::other(e),
        }
    }
}

/// The whole region: a shared mapping of the front-end's file.
pub(crate) struct InflightRegion {
    ptr: *mut u8,
    len: usize,
    queue_size: u16,
    num_queues: u16,
    /// The next pop counter of each queue.
    counters: Vec<AtomicU64>,
}

// SAFETY: the mapping lives as long as the value; each queue's part is written only under that
// queue's vring lock, and every access is an atomic load or store.
unsafe impl Send for InflightRegion {}
// SAFETY: as above.
unsafe impl Sync for InflightRegion {}

impl std::fmt::Debug for InflightRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightRegion")
            .field("len", &self.len)
            .field("queues", &self.num_queues)
            .field("queue_size", &self.queue_size)
            .finish()
    }
}

impl InflightRegion {
    /// A new, zeroed region in a memfd (GET_INFLIGHT_FD), returned with its file.
    pub(crate) fn create_file(num_queues: u16, queue_size: u16) -> io::Result<(u64, File)> {
        let size = region_size(num_queues, queue_size) as u64;
        // SAFETY: a NUL-terminated name and valid flags; the result is checked.
        let fd = unsafe { libc::memfd_create(c"colo-blk-inflight".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(size)?;
        Ok((size, file))
    }

    /// Maps `len` bytes of `file` from `offset` (SET_INFLIGHT_FD), which must hold
    /// `num_queues` queues of `queue_size` descriptors.
    pub(crate) fn map(
        file: &File,
        len: u64,
        offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<InflightRegion, InflightError> {
        let need = region_size(num_queues, queue_size) as u64;
        // The file must hold what is mapped: a page beyond its end would be SIGBUS, not an
        // error. Only `need` bytes are mapped, whatever the front-end says the size is.
        let file_len = file.metadata()?.len();
        if len < need
            || queue_size == 0
            || num_queues == 0
            || offset.checked_add(need).is_none_or(|end| end > file_len)
        {
            return Err(InflightError::Region {
                len,
                offset,
                file_len,
                num_queues,
                queue_size,
                need,
            });
        }
        let len = usize::try_from(need).map_err(|_| InflightError::TooLarge)?;
        let offset = libc::off_t::try_from(offset).map_err(|_| InflightError::Offset)?;
        // SAFETY: a shared read-write mapping of a file we hold, of a checked length; the
        // result is checked and unmapped on drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error().into());
        }
        Ok(InflightRegion {
            ptr: ptr.cast(),
            len,
            queue_size,
            num_queues,
            counters: (0..num_queues).map(|_| AtomicU64::new(1)).collect(),
        })
    }

    /// The part of queue `q`, if the region has it.
    pub(crate) fn queue(&self, q: usize) -> Option<QueueInflight<'_>> {
        if q >= usize::from(self.num_queues) {
            return None;
        }
        let base = q * queue_region_size(self.queue_size);
        Some(QueueInflight {
            region: self,
            base,
            counter: &self.counters[q],
        })
    }

    fn u8_at(&self, off: usize) -> &AtomicU8 {
        assert!(off < self.len);
        // SAFETY: in bounds of the mapping, which outlives `self`'s borrows.
        unsafe { &*(self.ptr.add(off) as *const AtomicU8) }
    }

    fn u16_at(&self, off: usize) -> &AtomicU16 {
        assert!(off + 2 <= self.len && off % 2 == 0);
        // SAFETY: in bounds and aligned (the mapping is page-aligned, offsets even).
        unsafe { &*(self.ptr.add(off) as *const AtomicU16) }
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        assert!(off + 8 <= self.len && off % 8 == 0);
        // SAFETY: in bounds and aligned (the mapping is page-aligned, offsets multiples of 8).
        unsafe { &*(self.ptr.add(off) as *const AtomicU64) }
    }
}

impl Drop for InflightRegion {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// One queue's part of the region. Every write goes through the queue's vring lock.
pub(crate) struct QueueInflight<'a> {
    region: &'a InflightRegion,
    base: usize,
    counter: &'a AtomicU64,
}

const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;

impl QueueInflight<'_> {
    fn desc(&self, head: u16) -> usize {
        self.base + HEADER + DESC_STATE * usize::from(head)
    }

    fn inflight(&self, head: u16) -> &AtomicU8 {
        self.region.u8_at(self.desc(head))
    }

    fn desc_counter(&self, head: u16) -> &AtomicU64 {
        self.region.u64_at(self.desc(head) + 8)
    }

    fn header_u16(&self, off: usize) -> &AtomicU16 {
        self.region.u16_at(self.base + off)
    }

    fn valid(&self, head: u16) -> bool {
        head < self.region.queue_size
    }

    /// `head` was popped: it is in flight from now on.
    pub(crate) fn pop(&self, head: u16) {
        if !self.valid(head) {
            return;
        }
        let c = self.counter.fetch_add(1, Ordering::Relaxed);
        self.desc_counter(head).store(c, Ordering::Release);
        self.inflight(head).store(1, Ordering::Release);
    }

    /// Before `head`'s completion is published on the used ring.
    pub(crate) fn before_used(&self, head: u16) {
        if self.valid(head) {
            self.header_u16(OFF_LAST_BATCH_HEAD)
                .store(head, Ordering::Release);
        }
    }

    /// After the used ring's index became `used_idx`, publishing `head`'s completion.
    pub(crate) fn after_used(&self, head: u16, used_idx: u16) {
        if self.valid(head) {
            self.inflight(head).store(0, Ordering::Release);
        }
        self.header_u16(OFF_USED_IDX)
            .store(used_idx, Ordering::Release);
    }

    /// Whether the region was written for this queue size.
    fn initialised(&self) -> bool {
        self.header_u16(OFF_VERSION).load(Ordering::Acquire) == VERSION
            && self.header_u16(OFF_DESC_NUM).load(Ordering::Acquire) == self.region.queue_size
    }

    /// How many heads are in flight.
    fn in_flight(&self) -> usize {
        (0..self.region.queue_size)
            .filter(|&h| self.inflight(h).load(Ordering::Acquire) == 1)
            .count()
    }

    /// Whether the region describes the ring whose used index is `ring_used_idx`: the same
    /// used index, or one more with the last completion still marked (a torn completion).
    /// Not after QEMU replaced the ring under it (a COLO checkpoint loaded while the back-end
    /// was away): that ring's requests are not this region's.
    fn describes(&self, ring_used_idx: u16) -> bool {
        let used = self.header_u16(OFF_USED_IDX).load(Ordering::Acquire);
        let head = self.header_u16(OFF_LAST_BATCH_HEAD).load(Ordering::Acquire);
        used == ring_used_idx
            || (ring_used_idx == used.wrapping_add(1)
                && self.valid(head)
                && self.inflight(head).load(Ordering::Acquire) == 1)
    }

    /// Where the back-end that wrote this region left the queue, as the front-end resumes it:
    /// the ring's used index when the region describes that ring (QEMU rewinds to it; the
    /// requests in flight run again from the region), else the region's own used index plus
    /// its requests in flight (another ring's position). `None` for a region never
    /// initialised for this queue size.
    pub(crate) fn previous_position(&self, ring_used_idx: u16) -> Option<u16> {
        if !self.initialised() {
            return None;
        }
        if self.describes(ring_used_idx) {
            return Some(ring_used_idx);
        }
        let used = self.header_u16(OFF_USED_IDX).load(Ordering::Acquire);
        Some(used.wrapping_add(self.in_flight() as u16))
    }

    /// Forgets everything in flight: the region describes the ring at `ring_used_idx`.
    fn reset(&self, ring_used_idx: u16) {
        let size = self.region.queue_size;
        self.header_u16(OFF_VERSION).store(0, Ordering::Release);
        for h in 0..size {
            self.inflight(h).store(0, Ordering::Relaxed);
        }
        self.header_u16(OFF_DESC_NUM).store(size, Ordering::Relaxed);
        self.header_u16(OFF_USED_IDX)
            .store(ring_used_idx, Ordering::Relaxed);
        self.header_u16(OFF_VERSION)
            .store(VERSION, Ordering::Release);
        self.counter.store(1, Ordering::Relaxed);
    }

    /// At a start of the queue, with the ring's used index as the guest sees it: what the
    /// queue resubmits and where it resumes (see the module comment). A fresh region is
    /// initialised instead.
    pub(crate) fn recover(&self, ring_used_idx: u16, ring_avail_idx: u16) -> Recovery {
        let nothing = Recovery {
            next_avail: None,
            resubmit: Vec::new(),
        };
        let size = self.region.queue_size;
        // New (zeroed), written for another queue size, or for another ring (QEMU replaced
        // it: its in-flight heads are not this ring's), or naming more requests in flight
        // than the guest has offered: nothing is known in flight, the queue starts where the
        // front-end says.
        let offered = ring_avail_idx.wrapping_sub(ring_used_idx);
        if !self.initialised()
            || !self.describes(ring_used_idx)
            || offered > size
            || self.in_flight() > usize::from(offered) + 1
        {
            self.reset(ring_used_idx);
            return nothing;
        }
        let region_used = self.header_u16(OFF_USED_IDX).load(Ordering::Acquire);
        if region_used != ring_used_idx {
            // The completion of last_batch_head reached the guest; its state did not follow.
            let head = self.header_u16(OFF_LAST_BATCH_HEAD).load(Ordering::Acquire);
            if self.valid(head) {
                self.inflight(head).store(0, Ordering::Release);
            }
            self.header_u16(OFF_USED_IDX)
                .store(ring_used_idx, Ordering::Release);
        }
        let mut pending: Vec<(u64, u16)> = (0..size)
            .filter(|&h| self.inflight(h).load(Ordering::Acquire) == 1)
            .map(|h| (self.desc_counter(h).load(Ordering::Acquire), h))
            .collect();
        pending.sort_unstable();
        let next = pending.last().map_or(1, |&(c, _)| c.wrapping_add(1));
        self.counter.store(next, Ordering::Relaxed);
        // Every avail entry before this was popped: the completed ones are counted in the used
        // index, the others are in flight. (Not QEMU's base: a front-end that lost the
        // back-end rewinds to the used index it read then, and a back-end that went on
        // completing requests after the disconnect, as a SIGTERM drains them, moved it since.)
        Recovery {
            next_avail: Some(ring_used_idx.wrapping_add(pending.len() as u16)),
            resubmit: pending.into_iter().map(|(_, h)| h).collect(),
        }
    }
}

/// The descriptors of the chain at `head` of a split ring whose table is at `desc_table`, as a
/// pop would yield them (an indirect table's entries instead of the descriptor naming it), for a
/// resubmitted request: virtio-queue builds chains only for heads it pops itself.
pub(crate) fn chain_at(
    mem: &GuestMem,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
) -> Result<Vec<Descriptor>, InflightError> {
    let read = |table: GuestAddress, i: u16| -> Result<Descriptor, InflightError> {
        let addr = table
            .checked_add(u64::from(i) * 16)
            .ok_or(InflightError::AddressOverflow)?;
        mem.read_obj::<Descriptor>(addr)
            .map_err(|e| InflightError::Descriptor(i, e))
    };
    let mut out = Vec::new();
    let (mut table, mut size, mut i) = (desc_table, queue_size, head);
    let mut indirect = false;
    loop {
        if i >= size || out.len() > usize::from(size) {
            return Err(InflightError::Malformed(head));
        }
        let d = read(table, i)?;
        if d.refers_to_indirect_table() {
            if indirect || !out.is_empty() {
                return Err(InflightError::MisplacedIndirect(head));
            }
            indirect = true;
            table = d.addr();
            size = u16::try_from(d.len() / 16).map_err(|_| InflightError::IndirectTooLarge)?;
            i = 0;
            continue;
        }
        out.push(d);
        if !d.has_next() {
            return Ok(out);
        }
        i = d.next();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn region(queue_size: u16) -> (File, InflightRegion) {
        let (size, file) = InflightRegion::create_file(2, queue_size).unwrap();
        let r = InflightRegion::map(&file, size, 0, 2, queue_size).unwrap();
        (file, r)
    }

    /// A split ring as the guest sees it: the avail ring, the used ring and its index.
    #[derive(Default, Clone)]
    struct Ring {
        avail: Vec<u16>,
        used: Vec<u16>,
    }

    /// One backend life: pops from `next_avail`, completes in the order `order` says, and
    /// stops (crashes) after `steps` region or ring stores.
    struct Backend {
        next_avail: u16,
        popped: Vec<u16>,
    }

    /// Where in a completion the crash comes.
    #[derive(Debug, Clone, Copy)]
    enum Crash {
        AfterPop,
        BeforeUsedElement,
        AfterUsedElement,
        AfterUsedIndex,
        Done,
    }

    /// Runs one life: pop `pops` requests, then complete `completions` of the popped ones
    /// (by index into what is in flight), crashing at `crash` in the last completion.
    fn life(
        q: &QueueInflight<'_>,
        ring: &mut Ring,
        be: &mut Backend,
        pops: usize,
        completions: &[usize],
        crash: Crash,
    ) {
        for _ in 0..pops {
            if usize::from(be.next_avail) >= ring.avail.len() {
                break;
            }
            let head = ring.avail[usize::from(be.next_avail)];
            q.pop(head);
            be.popped.push(head);
            be.next_avail += 1;
        }
        if matches!(crash, Crash::AfterPop) {
            return;
        }
        for (i, &pick) in completions.iter().enumerate() {
            if be.popped.is_empty() {
                return;
            }
            let last = i + 1 == completions.len();
            let head = be.popped.remove(pick % be.popped.len());
            q.before_used(head);
            if last && matches!(crash, Crash::BeforeUsedElement) {
                return;
            }
            // add_used: the element, then the index (one completion per index store).
            ring.used.push(head);
            if last && matches!(crash, Crash::AfterUsedElement) {
                // The element is written, the index not: the guest sees nothing.
                ring.used.pop();
                return;
            }
            let used_idx = ring.used.len() as u16;
            if last && matches!(crash, Crash::AfterUsedIndex) {
                return;
            }
            q.after_used(head, used_idx);
        }
    }

    /// After any crash and the recovery, every request completes exactly once.
    fn check(queue_size: u16, lives: &[(usize, Vec<usize>, Crash)]) {
        let (_f, r) = region(queue_size);
        let q = r.queue(1).unwrap();
        let requests = usize::from(queue_size) * 3;
        // The guest offers `requests` requests on heads that are free (one per ring slot).
        let mut ring = Ring::default();
        let mut free: Vec<u16> = (0..queue_size).rev().collect();
        let mut offered = 0usize;
        let mut next_avail = 0u16;
        let mut resubmit: Vec<u16> = Vec::new();
        q.recover(0, 0);
        for (pops, completions, crash) in lives {
            // The guest refills the avail ring with freed heads.
            let used: Vec<u16> = ring.used.clone();
            while offered < requests {
                let Some(h) = free.pop() else { break };
                ring.avail.push(h);
                offered += 1;
            }
            let mut be = Backend {
                next_avail,
                popped: resubmit.clone(),
            };
            life(&q, &mut ring, &mut be, *pops, completions, *crash);
            // The guest frees what completed.
            for &h in &ring.used[used.len()..] {
                free.insert(0, h);
            }
            // A restart: what the region says.
            let rec = q.recover(ring.used.len() as u16, ring.avail.len() as u16);
            next_avail = rec.next_avail.unwrap_or(ring.used.len() as u16);
            resubmit = rec.resubmit.clone();
            // Exactly the heads popped and not completed, in pop order.
            let popped_total = usize::from(next_avail);
            assert_eq!(popped_total, ring.used.len() + resubmit.len(), "{lives:?}");
        }
        // A last life completes everything.
        let mut be = Backend {
            next_avail,
            popped: resubmit,
        };
        let n = ring.avail.len();
        life(&q, &mut ring, &mut be, n, &vec![0; 4 * n], Crash::Done);
        // Every offered request completed exactly once.
        let mut seen = ring.used.clone();
        seen.sort_unstable();
        let mut want = ring.avail.clone();
        want.sort_unstable();
        assert_eq!(seen, want, "{lives:?}");
    }

    /// A front-end's region that does not fit its file, or names no queue, is refused (a
    /// mapping past the end of the file would crash the process at its first access).
    #[test]
    fn a_region_that_does_not_fit_its_file_is_refused() {
        let (size, file) = InflightRegion::create_file(2, 8).unwrap();
        assert!(InflightRegion::map(&file, size, 0, 2, 8).is_ok());
        assert!(InflightRegion::map(&file, size * 4, 0, 8, 8).is_err());
        assert!(InflightRegion::map(&file, size, 4096, 2, 8).is_err());
        assert!(InflightRegion::map(&file, size, u64::MAX - 10, 2, 8).is_err());
        assert!(InflightRegion::map(&file, size, 0, 0, 8).is_err());
        assert!(InflightRegion::map(&file, size, 0, 2, 0).is_err());
        assert!(InflightRegion::map(&file, size - 1, 0, 2, 8).is_err());
    }

    #[test]
    fn a_fresh_region_is_initialised_and_resubmits_nothing() {
        let (_f, r) = region(8);
        let q = r.queue(0).unwrap();
        assert_eq!(
            q.recover(5, 5),
            Recovery {
                next_avail: None,
                resubmit: vec![]
            }
        );
        assert!(r.queue(2).is_none());
    }

    #[test]
    fn a_crash_at_each_step_of_a_completion_is_recovered() {
        for crash in [
            Crash::AfterPop,
            Crash::BeforeUsedElement,
            Crash::AfterUsedElement,
            Crash::AfterUsedIndex,
            Crash::Done,
        ] {
            // Four popped, completed out of order (third, first), crash in the second.
            check(8, &[(4, vec![2, 0], crash)]);
        }
    }

    #[test]
    fn resubmission_is_in_pop_order() {
        let (_f, r) = region(8);
        let q = r.queue(0).unwrap();
        q.recover(0, 0);
        for h in [5, 2, 7, 1] {
            q.pop(h);
        }
        q.before_used(7);
        q.after_used(7, 1);
        assert_eq!(
            q.recover(1, 4),
            Recovery {
                next_avail: Some(4),
                resubmit: vec![5, 2, 1]
            }
        );
        // The used index published, the region not updated: 2 is done.
        q.before_used(2);
        assert_eq!(q.recover(2, 4).resubmit, vec![5, 1]);
    }

    /// A back-end stopped by SIGTERM completes what is in flight after the front-end went
    /// (which rewound to the used index it read then): the ring resumes at the used index
    /// as it is now, whatever the front-end says.
    #[test]
    fn the_ring_resumes_at_the_used_index_with_nothing_in_flight() {
        let (_f, r) = region(8);
        let q = r.queue(0).unwrap();
        q.recover(0, 0);
        for (i, h) in [3u16, 4].into_iter().enumerate() {
            q.pop(h);
            q.before_used(h);
            q.after_used(h, i as u16 + 1);
        }
        assert_eq!(
            q.recover(2, 2),
            Recovery {
                next_avail: Some(2),
                resubmit: vec![]
            }
        );
    }

    #[test]
    fn the_previous_position_counts_every_request_popped() {
        let (_f, r) = region(8);
        let q = r.queue(0).unwrap();
        assert_eq!(q.previous_position(10), None);
        q.recover(10, 10);
        assert_eq!(q.previous_position(10), Some(10));
        for h in [1u16, 2, 3] {
            q.pop(h);
        }
        q.before_used(2);
        q.after_used(2, 11);
        // The same ring: where QEMU resumes it (its used index).
        assert_eq!(q.previous_position(11), Some(11));
        // A torn completion (published, not cleared): the same ring.
        q.before_used(1);
        assert_eq!(q.previous_position(12), Some(12));
        // Another ring (QEMU loaded another state): the region's own position.
        assert_eq!(q.previous_position(40), Some(13));
    }

    /// After QEMU replaced the ring (a COLO checkpoint loaded while the back-end was away),
    /// the region's heads are another ring's: nothing is resubmitted, the queue starts where
    /// QEMU says, and the region describes the new ring from then on.
    #[test]
    fn a_region_of_another_ring_is_reset_not_replayed() {
        let (_f, r) = region(8);
        let q = r.queue(0).unwrap();
        q.recover(100, 100);
        for h in [1u16, 2] {
            q.pop(h);
        }
        let nothing = Recovery {
            next_avail: None,
            resubmit: vec![],
        };
        assert_eq!(q.recover(40, 40), nothing);
        assert_eq!(q.previous_position(40), Some(40));
        // More in flight than the guest offered: not this ring either.
        q.pop(3);
        q.pop(4);
        q.pop(5);
        assert_eq!(q.recover(40, 41), nothing);
    }

    proptest! {
        #[test]
        fn any_crash_sequence_completes_every_request_once(
            lives in proptest::collection::vec(
                (0usize..10, proptest::collection::vec(0usize..10, 0..8), 0u8..5),
                1..6,
            )
        ) {
            let lives: Vec<(usize, Vec<usize>, Crash)> = lives
                .into_iter()
                .map(|(p, c, k)| {
                    let crash = [
                        Crash::AfterPop,
                        Crash::BeforeUsedElement,
                        Crash::AfterUsedElement,
                        Crash::AfterUsedIndex,
                        Crash::Done,
                    ][usize::from(k)];
                    (p, c, crash)
                })
                .collect();
            check(8, &lives);
        }
    }
}
