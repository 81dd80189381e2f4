//! Adaptive polling of a queue: how long its worker keeps looking at the avail ring after a
//! batch, instead of sleeping in epoll until the next kick.
//!
//! A worker that sleeps between batches pays for every batch twice: the driver's kick (an
//! eventfd write, a wake-up of the worker) and the worker's sleep. When requests come back-to-
//! back, a few microseconds of looking at the ring catch the next batch with neither, and
//! while the worker looks, the driver is told not to kick (VIRTIO_F_EVENT_IDX's avail_event is
//! left behind, or VRING_USED_F_NO_NOTIFY is set). It looks only while none of its requests is
//! in flight elsewhere (`BlkBackend::poll_queue`).
//!
//! The window tunes itself as QEMU's `poll-max-ns` does (util/aio-posix.c): after the worker
//! slept, the time from the start of its last look to the event that woke it (`block`) says
//! what a longer look would have caught. `block` within the window: right. `block` beyond the
//! maximum: no look would have caught it, the window drops to 0 (an idle queue costs no CPU).
//! `block` between: the window doubles, from 4 µs, up to the maximum. A look that found work is
//! not counted (the window was long enough). A maximum of 0 turns polling off.

use std::time::{Duration, Instant};

/// The first window after a shrink to 0 (QEMU's initial `poll_ns`).
const FIRST_WINDOW: Duration = Duration::from_micros(4);

/// One queue's polling window.
#[derive(Debug)]
pub(crate) struct AdaptivePoll {
    max: Duration,
    window: Duration,
    /// When the look that ended in sleep began (`None`: the worker did not sleep since).
    idle_since: Option<Instant>,
}

impl AdaptivePoll {
    /// A window that grows up to `max` (zero: never poll).
    pub(crate) fn new(max: Duration) -> Self {
        AdaptivePoll {
            max,
            window: Duration::ZERO,
            idle_since: None,
        }
    }

    /// An event woke the worker at `now`: adjusts the window by how long the worker waited,
    /// and returns the window to look for more work in.
    pub(crate) fn woke(&mut self, now: Instant) -> Duration {
        if let Some(since) = self.idle_since.take() {
            let block = now.saturating_duration_since(since);
            if block <= self.window {
                // Caught within the window (the look ended just before it): right size.
            } else if block > self.max {
                self.window = Duration::ZERO;
            } else if self.window < self.max {
                self.window = if self.window.is_zero() {
                    FIRST_WINDOW
                } else {
                    self.window * 2
                }
                .min(self.max);
            }
        }
        self.window
    }

    /// The worker looked from `since` for the whole window, found nothing and goes to sleep.
    pub(crate) fn sleeping(&mut self, since: Instant) {
        self.idle_since = Some(since);
    }

    /// The current window.
    #[cfg(test)]
    pub(crate) fn window(&self) -> Duration {
        self.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_micros(32);

    /// The worker sleeps at `t`, and an event comes `gap` later.
    fn sleep_then_wake(p: &mut AdaptivePoll, t: &mut Instant, gap: Duration) -> Duration {
        p.sleeping(*t);
        *t += gap;
        p.woke(*t)
    }

    #[test]
    fn back_to_back_events_grow_the_window_to_the_maximum() {
        let mut p = AdaptivePoll::new(MAX);
        let mut t = Instant::now();
        assert_eq!(p.woke(t), Duration::ZERO, "no history: no polling");
        let mut seen = Vec::new();
        for _ in 0..6 {
            // Each event comes just after the window closed, but within the maximum.
            let gap = (p.window() + Duration::from_micros(1)).min(MAX);
            seen.push(sleep_then_wake(&mut p, &mut t, gap).as_micros());
        }
        assert_eq!(seen, [4, 8, 16, 32, 32, 32]);
    }

    #[test]
    fn an_idle_queue_stops_polling_at_once() {
        let mut p = AdaptivePoll::new(MAX);
        let mut t = Instant::now();
        for _ in 0..4 {
            sleep_then_wake(&mut p, &mut t, Duration::from_micros(20));
        }
        assert_eq!(p.window(), MAX);
        let w = sleep_then_wake(&mut p, &mut t, Duration::from_millis(5));
        assert_eq!(w, Duration::ZERO);
        // And stays off while events stay rare.
        let w = sleep_then_wake(&mut p, &mut t, Duration::from_millis(5));
        assert_eq!(w, Duration::ZERO);
    }

    #[test]
    fn an_event_within_the_window_keeps_it() {
        let mut p = AdaptivePoll::new(MAX);
        let mut t = Instant::now();
        sleep_then_wake(&mut p, &mut t, Duration::from_micros(10));
        sleep_then_wake(&mut p, &mut t, Duration::from_micros(10));
        assert_eq!(p.window().as_micros(), 8);
        let w = sleep_then_wake(&mut p, &mut t, Duration::from_micros(8));
        assert_eq!(w.as_micros(), 8);
        // Waking without having slept (work found in the look) changes nothing either.
        assert_eq!(p.woke(t + Duration::from_secs(1)).as_micros(), 8);
    }

    #[test]
    fn a_zero_maximum_never_polls() {
        let mut p = AdaptivePoll::new(Duration::ZERO);
        let mut t = Instant::now();
        for gap in [1u64, 2, 3, 1000] {
            assert_eq!(
                sleep_then_wake(&mut p, &mut t, Duration::from_nanos(gap)),
                Duration::ZERO
            );
        }
    }
}
