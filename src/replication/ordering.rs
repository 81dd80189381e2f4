//! Ordering of overlapping changes on the primary, per interval (as DRBD's `drbd_interval.c`
//! finds conflicts per request, not under a global lock).
//!
//! A change is numbered, registered here and queued for the link under the primary's order
//! lock, which is held only for that. The local write then runs outside the lock, and waits
//! only for changes registered *before* it whose byte range overlaps its own and that are still
//! being applied. So overlapping changes take effect locally in sequence-number order, the
//! order the secondary applies them in, while a change to another range never waits behind a
//! slow or blocked one.
//!
//! ```text
//!  order lock:   [seq 7: register A 0..8K, queue] [seq 8: register B 4K..12K, queue] [seq 9: C 1M..]
//!  outside:       A writes ────────────────┐        B waits for A ─► B writes        C writes now
//!                                           └─ release A wakes B
//! ```
//!
//! Empty ranges (a flush) neither wait nor are waited for.

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex, MutexGuard};

/// The changes registered and not yet released, by registration order.
#[derive(Debug, Default)]
pub struct ChangeOrder {
    inner: Mutex<Registered>,
    released: Condvar,
}

#[derive(Debug, Default)]
struct Registered {
    next_ticket: u64,
    /// `ticket -> [start, end)` of every change still being applied.
    ranges: BTreeMap<u64, (u64, u64)>,
    /// Threads waiting in `wait_turn`: a release wakes them only when there are any (a
    /// condvar's notify is a futex call even with no waiter: one per write otherwise).
    waiting: usize,
}

impl Registered {
    /// Whether a change registered before `ticket` overlaps `[start, end)`.
    fn earlier_overlap(&self, ticket: u64, start: u64, end: u64) -> bool {
        start < end
            && self
                .ranges
                .range(..ticket)
                .any(|(_, &(s, e))| s < end && start < e)
    }
}

/// A registered change. Dropping it releases the range (also when the local write panics).
#[must_use = "a ticket releases its range when dropped"]
#[derive(Debug)]
pub struct Ticket<'a> {
    order: &'a ChangeOrder,
    id: u64,
    start: u64,
    end: u64,
}

impl ChangeOrder {
    /// An empty register.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Registered> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a change to `[offset, offset + len)`. Call it in sequence-number order (under
    /// the order lock that numbers the change); it never blocks on another change.
    pub fn register(&self, offset: u64, len: u64) -> Ticket<'_> {
        let end = offset.saturating_add(len);
        let mut reg = self.lock();
        let id = reg.next_ticket;
        reg.next_ticket += 1;
        if len > 0 {
            reg.ranges.insert(id, (offset, end));
        }
        Ticket {
            order: self,
            id,
            start: offset,
            end,
        }
    }

    /// Number of changes registered and not yet released.
    #[cfg(test)]
    pub fn in_progress(&self) -> usize {
        self.lock().ranges.len()
    }
}

impl Ticket<'_> {
    /// Waits until no change registered before this one that overlaps it is still in progress.
    pub fn wait_turn(&self) {
        let mut reg = self.order.lock();
        while reg.earlier_overlap(self.id, self.start, self.end) {
            reg.waiting += 1;
            reg = self
                .order
                .released
                .wait(reg)
                .unwrap_or_else(|e| e.into_inner());
            reg.waiting -= 1;
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut reg = self.order.lock();
        let wake = reg.ranges.remove(&self.id).is_some() && reg.waiting > 0;
        drop(reg);
        if wake {
            self.order.released.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn only_earlier_overlapping_changes_are_waited_for() {
        let order = ChangeOrder::new();
        let a = order.register(0, 8192);
        let b = order.register(4096, 8192);
        let c = order.register(1 << 20, 4096);
        let flush = order.register(0, 0);
        let reg = order.lock();
        assert!(!reg.earlier_overlap(a.id, a.start, a.end));
        assert!(reg.earlier_overlap(b.id, b.start, b.end));
        assert!(!reg.earlier_overlap(c.id, c.start, c.end));
        assert!(!reg.earlier_overlap(flush.id, flush.start, flush.end));
        drop(reg);
        assert_eq!(order.in_progress(), 3);
        drop(a);
        let reg = order.lock();
        assert!(!reg.earlier_overlap(b.id, b.start, b.end));
        drop(reg);
        // Adjacent ranges do not overlap.
        let d = order.register(12288, 4096);
        d.wait_turn();
        drop((b, c, d, flush));
        assert_eq!(order.in_progress(), 0);
    }

    /// A waiting overlapping change does not hold up a later non-overlapping one: the order of
    /// completion is C (free range), A (released by the test), B (waited for A).
    #[test]
    fn a_blocked_overlap_does_not_delay_other_ranges() {
        let order = Arc::new(ChangeOrder::new());
        let (done_tx, done_rx) = mpsc::channel::<char>();
        let a = order.register(0, 8192);
        let b_ticket_taken = {
            let (tx, rx) = mpsc::channel();
            let order = order.clone();
            let done = done_tx.clone();
            std::thread::spawn(move || {
                let b = order.register(4096, 4096);
                tx.send(()).unwrap();
                b.wait_turn();
                done.send('B').unwrap();
            });
            rx
        };
        b_ticket_taken.recv().unwrap();
        {
            let order = order.clone();
            let done = done_tx.clone();
            std::thread::spawn(move || {
                let c = order.register(65536, 4096);
                c.wait_turn();
                done.send('C').unwrap();
            });
        }
        // C must finish while A still holds its range (the bound only turns a hang into a failure).
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(30)), Ok('C'));
        done_tx.send('A').unwrap();
        drop(a);
        assert_eq!(done_rx.recv().unwrap(), 'A');
        assert_eq!(done_rx.recv().unwrap(), 'B');
    }
}
