//! Inflight recovery on a queue (docs/inflight.md): where the previous process left the ring,
//! the completions recorded in the front-end's region around each used-index store, and the
//! requests run again at the first pop after a restart.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::{debug, warn};
use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::GuestMemoryLoadGuard;

use super::{BlkBackend, Vring, VringStateGuard};
use crate::storage::GuestMem;
use crate::vhost_user::inflight::{self as inflight_io, InflightRegion};
use crate::virtio::request::{self, Parsed};

impl BlkBackend {
    /// Where the previous process of this device left `queue`, from the inflight region, while
    /// this connection's recovery of the queue is still to come.
    pub(super) fn previous_position(
        &self,
        queue: usize,
        vring: &Vring,
        mem: &GuestMemoryLoadGuard<GuestMem>,
    ) -> Option<u16> {
        if !self
            .shared
            .recover_pending
            .get(queue)?
            .load(Ordering::Acquire)
        {
            return None;
        }
        let region = self.inflight_region()?;
        let used = vring
            .get_ref()
            .get_queue()
            .used_idx(&**mem, Ordering::Acquire)
            .ok()?
            .0;
        region.queue(queue)?.previous_position(used)
    }

    /// The front-end's inflight region, if it keeps one.
    pub(super) fn inflight_region(&self) -> Option<Arc<InflightRegion>> {
        self.shared
            .inflight_region
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Puts `head` on the used ring, recording it in the inflight region around the store of
    /// the used index (docs/inflight.md). One completion per index store: a crash leaves at
    /// most `last_batch_head` published and still marked.
    pub(super) fn add_used(
        state: &mut VringStateGuard<'_>,
        region: Option<&InflightRegion>,
        queue: usize,
        head: u16,
        used_len: u32,
    ) -> Result<(), virtio_queue::Error> {
        let q = region.and_then(|r| r.queue(queue));
        if let Some(q) = &q {
            q.before_used(head);
        }
        state.add_used(head, used_len)?;
        if let Some(q) = &q {
            q.after_used(head, state.get_queue().next_used());
        }
        Ok(())
    }

    /// At the first pop after the queue started with an inflight region: resumes the ring
    /// after every request popped before a restart, and puts the ones never completed first in
    /// `batch`, in the order they were popped.
    pub(super) fn recover_inflight(
        &self,
        queue: usize,
        state: &mut VringStateGuard<'_>,
        mem: &GuestMemoryLoadGuard<GuestMem>,
        batch: &mut Vec<(u16, Parsed)>,
    ) {
        let Some(pending) = self.shared.recover_pending.get(queue) else {
            return;
        };
        if !pending.swap(false, Ordering::AcqRel) {
            return;
        }
        let region = self.inflight_region();
        let Some(q) = region.as_ref().and_then(|r| r.queue(queue)) else {
            return;
        };
        let ring = state.get_queue();
        let (used, avail) = match (
            ring.used_idx(&**mem, Ordering::Acquire),
            ring.avail_idx(&**mem, Ordering::Acquire),
        ) {
            (Ok(u), Ok(a)) => (u.0, a.0),
            (Err(e), _) | (_, Err(e)) => {
                warn!("queue {queue}: cannot read the ring for inflight recovery: {e:?}");
                return;
            }
        };
        let rec = q.recover(used, avail);
        let Some(next_avail) = rec.next_avail else {
            return;
        };
        let was = state.get_queue().next_avail();
        if next_avail != was || !rec.resubmit.is_empty() {
            warn!(
                "queue {queue}: the ring resumes at {next_avail} (the front-end said {was}); {} \
                 request(s) in flight when the previous back-end stopped run again (inflight \
                 tracking)",
                rec.resubmit.len()
            );
        }
        state.get_queue_mut().set_next_avail(next_avail);
        if next_avail != was {
            // Completions the previous back-end published after the front-end had gone (a
            // SIGTERM drains them) interrupted nobody: one interrupt now, or the guest waits
            // for them forever. (A spurious one costs the guest a look at its used ring.)
            if let Err(e) = state.signal_used_queue() {
                debug!("signalling the used queue failed: {e}");
            }
        }
        if let Some(st) = self.shared.stats.queue(queue) {
            st.resubmitted
                .fetch_add(rec.resubmit.len() as u64, Ordering::Relaxed);
        }
        let table = vm_memory::GuestAddress(state.get_queue().desc_table());
        let size = state.get_queue().size();
        for head in rec.resubmit {
            let parsed = match inflight_io::chain_at(mem, table, size, head) {
                Ok(descs) => request::parse(mem, descs.into_iter(), self.shared.limits),
                Err(why) => {
                    warn!("queue {queue}: resubmitted request at head {head}: {why}");
                    Parsed::NoStatus {
                        why: "a resubmitted chain that cannot be read",
                    }
                }
            };
            batch.push((head, parsed));
        }
    }
}
