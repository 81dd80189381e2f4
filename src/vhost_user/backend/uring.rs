//! The `--io-engine uring` path of a queue: its io_uring, the kick that pops chains onto it,
//! the completions reaped from it and put on the used ring in batches, the drain at a stop.

use std::io;
use std::sync::Arc;

use log::warn;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringT};
use virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK;
use vm_memory::GuestMemoryLoadGuard;
use vmm_sys_util::epoll::EventSet;

use super::stats::QueueStats;
use super::{lock, AfterPop, BlkBackend, Vring};
use crate::storage::{GuestMem, RawImage};
use crate::vhost_user::uring_queue::{Finished, UringQueue};
use crate::virtio::request::{Parsed, RequestKind};

/// One queue of the `uring` engine: its ring, the vring its completions go to (set at the first
/// event) and the completions waiting for the used ring.
pub(super) struct UringState {
    pub(super) queue: UringQueue,
    pub(super) vring: Option<Vring>,
    pub(super) done: Vec<(u16, u32)>,
}

/// The epoll `data` of every queue's ring eventfd, in that queue's worker (ids up to
/// `num_queues` belong to vhost-user-backend).
pub(super) fn uring_event_id(num_queues: usize) -> u16 {
    (num_queues + 1) as u16
}

impl BlkBackend {
    /// Whether this connection's queues run on io_uring.
    pub(crate) fn uses_uring(&self) -> bool {
        !self.shared.uring.is_empty()
    }

    /// Registers every queue's ring eventfd with that queue's worker epoll loop (the daemon's
    /// `get_epoll_handlers()`, one per worker thread, in queue order). Call before the daemon
    /// starts.
    pub(crate) fn register_uring_listeners(
        &self,
        handlers: &[Arc<VringEpollHandler<BlkBackend>>],
    ) -> io::Result<()> {
        let id = u64::from(uring_event_id(self.num_queues()));
        for (q, state) in self.shared.uring.iter().enumerate() {
            let fd = lock(state).queue.ring.eventfd();
            let Some(h) = handlers.get(q) else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("no worker for queue {q}"),
                ));
            };
            h.register_listener(fd, EventSet::IN, id)?;
        }
        Ok(())
    }

    /// Puts a batch of completed chains on the used ring under one lock, with at most one
    /// notification, and counts them done.
    fn complete_batch(&self, queue: usize, vring: &Vring, done: &mut Vec<(u16, u32)>) {
        if done.is_empty() {
            return;
        }
        let region = self.inflight_region();
        let mut state = vring.get_mut();
        for &(head, used_len) in done.iter() {
            if let Err(e) = Self::add_used(&mut state, region.as_deref(), queue, head, used_len) {
                warn!("add_used({head}) failed: {e:?}");
            }
        }
        self.notify_if_wanted(&mut state);
        drop(state);
        if let Some(f) = self.shared.inflight.get(queue) {
            f.done_n(done.len());
        }
        done.clear();
    }

    /// Reaps the ring's available completions onto `st.done`.
    fn uring_reap(&self, queue: usize, st: &mut UringState) {
        let stats = self.shared.stats.queue(queue);
        let UringState { queue: q, done, .. } = st;
        q.reap(self.shared.disk.as_ref(), &self.shared.info, |f| {
            uring_finished(stats, done, f)
        });
    }

    /// Completes what is done and, while requests remain on the ring, leaves the ring's eventfd
    /// on so that the worker's epoll loop wakes up for them.
    fn uring_complete_and_arm(&self, queue: usize, st: &mut UringState) {
        loop {
            // Entries left queued by a submission the kernel refused (-EBUSY: completion ring
            // and overflow list full) go in now that there is room (no system call otherwise).
            if let Err(e) = st.queue.ring.submit(0) {
                warn!("io_uring submission failed: {e}");
            }
            self.uring_reap(queue, st);
            if let Some(vring) = st.vring.as_ref() {
                self.complete_batch(queue, vring, &mut st.done);
            }
            if st.queue.inflight() == 0 {
                return;
            }
            st.queue.ring.set_eventfd(true);
            // A completion posted before the eventfd went on signalled nothing: look again.
            if !st.queue.ring.has_completions() {
                return;
            }
            st.queue.ring.set_eventfd(false);
        }
    }

    /// A kick with the `uring` engine: pops every chain, queues reads, writes and flushes on the
    /// ring and runs the rest here, submits the batch with one system call, then completes
    /// whatever is done with one used-ring update. A lone request on an idle queue runs here
    /// synchronously instead (queue depth 1 pays no ring round trip), and buffered writes of
    /// [`POOL_WRITE_BYTES`] or more go to the I/O pool.
    pub(super) fn uring_kick(
        &self,
        queue: usize,
        vring: &Vring,
        mem: &GuestMemoryLoadGuard<GuestMem>,
        after: AfterPop,
    ) -> io::Result<()> {
        let (Some(state), Some(image)) = (
            self.shared.uring.get(queue),
            self.shared.disk.as_raw_image(),
        ) else {
            return Ok(());
        };
        let mut guard = lock(state);
        let st = &mut *guard;
        st.queue.ring.set_eventfd(false);
        if st.vring.is_none() {
            st.vring = Some(vring.clone());
        }
        let batch = self.pop_all(queue, vring, mem, after)?;
        let mem = &self.mem_now(mem.clone());
        let stats = self.shared.stats.queue(queue);
        // A lone request (queue depth 1) runs synchronously right here, as with the thread
        // engine: one preadv/pwritev is the cheapest way to do it, while io_uring would hand a
        // buffered write (and any read that would block) to one of its worker threads.
        let alone = batch.len() == 1 && st.queue.inflight() == 0;
        for (head, parsed) in batch {
            let parsed = if alone {
                parsed
            } else if let (Some(pool), true) =
                (self.pool.as_ref(), copies_to_page_cache(&parsed, image))
            {
                // A large buffered write is a page-cache memcpy that io_uring would run on its
                // io-wq, one write to the file at a time (ext4 has no async buffered writes and
                // io-wq serialises writes to one regular file): the pool copies several at once.
                let (me, vring, mem) = (self.clone(), vring.clone(), mem.clone());
                pool.spawn(move || {
                    let stats = me.shared.stats.queue(queue);
                    let c = Self::run_chain(&me.shared, &mem, head, parsed, stats);
                    me.complete(queue, &vring, head, c.used_len);
                });
                continue;
            } else {
                crate::faults::io_delay();
                match st
                    .queue
                    .try_push(head, parsed, mem, image, &self.shared.info)
                {
                    Ok(()) => continue,
                    Err(parsed) => parsed,
                }
            };
            let c = Self::run_chain(&self.shared, mem, head, parsed, stats);
            st.done.push((head, c.used_len));
        }
        if let Err(e) = st.queue.ring.submit(0) {
            warn!("io_uring submission failed: {e}");
        }
        self.uring_complete_and_arm(queue, st);
        Ok(())
    }

    /// The ring's eventfd fired: reap and complete.
    pub(super) fn uring_event(&self, queue: usize) {
        let Some(state) = self.shared.uring.get(queue) else {
            return;
        };
        let mut guard = lock(state);
        let st = &mut *guard;
        st.queue.ring.consume_eventfd();
        st.queue.ring.set_eventfd(false);
        self.uring_complete_and_arm(queue, st);
    }

    /// Waits for every request on `queue`'s ring and completes it on the used ring.
    pub(super) fn uring_drain(&self, queue: usize) {
        let Some(state) = self.shared.uring.get(queue) else {
            return;
        };
        let mut guard = lock(state);
        let st = &mut *guard;
        let stats = self.shared.stats.queue(queue);
        let UringState {
            queue: q,
            vring,
            done,
        } = st;
        q.drain(self.shared.disk.as_ref(), &self.shared.info, |f| {
            uring_finished(stats, done, f)
        });
        match vring.as_ref() {
            Some(v) => self.complete_batch(queue, v, done),
            None => done.clear(),
        }
    }
}

/// Buffered writes at least this large go to the I/O pool under the `uring` engine.
const POOL_WRITE_BYTES: u64 = 128 << 10;

/// Whether `parsed` is a write of at least [`POOL_WRITE_BYTES`] into the page cache of `image`.
fn copies_to_page_cache(parsed: &Parsed, image: &RawImage) -> bool {
    matches!(parsed, Parsed::Ok(r) if r.kind == RequestKind::Out
        && !image.is_direct()
        && r.data_bytes().1 >= POOL_WRITE_BYTES)
}

/// Counts a reaped request and queues it for the used ring.
fn uring_finished(stats: Option<&QueueStats>, done: &mut Vec<(u16, u32)>, f: Finished) {
    if let Some(st) = stats {
        st.record_latency(f.started);
        st.count(f.completion.status == VIRTIO_BLK_S_OK as u8, f.data);
    }
    done.push((f.head, f.completion.used_len));
}
