//! The device's stop/start cycle as QEMU drives it, told to a [`DeviceObserver`] so that
//! replication can follow QEMU's own COLO checkpoints (docs/colo-with-qemu.md).
//!
//! What the backend sees (measured with QEMU 11, docs/colo-with-qemu.md): a VM stop sends
//! `GET_VRING_BASE` for every queue (after `SET_VRING_ENABLE 0`); a start sends `SET_FEATURES`
//! (with `VHOST_F_LOG_ALL` while migration or COLO logs dirty pages), then per queue
//! `SET_VRING_BASE`, `SET_VRING_KICK`, ..., `SET_VRING_ENABLE 1`. The hooks:
//!
//! - `SET_FEATURES` → [`DeviceObserver::log_all`] when dirty logging is switched on or off;
//! - `SET_VRING_KICK` of queue q → q runs (until its `GET_VRING_BASE`);
//! - `GET_VRING_BASE` of queue q, once its requests completed → [`DeviceObserver::queue_stopped`]
//!   with every queue's last known position, and whether it was the last running queue (the
//!   end of a device stop); the front-end's answer waits for it;
//! - the first batch a queue pops after it was stopped (or ever) →
//!   [`DeviceObserver::queue_starting`] with the position QEMU restarted it from; the queue's
//!   requests wait for it.
//!
//! A queue's position is its `next_avail`, recorded under the vring lock after every pop, so at
//! `GET_VRING_BASE` (the ring no longer ready, its requests drained) it is exactly the value the
//! front-end reads.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// Told about the device's life (all methods default to doing nothing).
pub trait DeviceObserver: Send + Sync {
    /// The front-end switched dirty logging (`VHOST_F_LOG_ALL`) on or off.
    fn log_all(&self, _on: bool) {}

    /// Queue `queue` was stopped (`GET_VRING_BASE`) and none of its requests is in flight.
    /// `bases[q]` is each queue's position, `None` for a queue that never ran on this
    /// connection. `last`: no other queue the front-end started (`SET_VRING_KICK`) still runs,
    /// so a device stop (QEMU stops the queues one after another) is complete. Runs on the
    /// vhost-user thread: the front-end waits for it.
    fn queue_stopped(&self, _queue: u16, _bases: &[Option<u16>], _log_all: bool, _last: bool) {}

    /// Queue `queue` is about to run its first requests since it was (re)started, from
    /// position `next_avail`. Runs on the queue's worker: its requests wait for it.
    fn queue_starting(&self, _queue: u16, _next_avail: u16) {}

    /// Before `queue_starting`, when this process has not run queue `queue` yet but the
    /// front-end's inflight region says where a previous process of this device left it
    /// (`at`: every request it popped, completed or not; docs/inflight.md).
    fn queue_previous(&self, _queue: u16, _at: u16) {}
}

#[derive(Debug, Clone, Copy)]
struct QueueRun {
    /// Last known `next_avail`.
    base: Option<u16>,
    /// Stopped, or never started: the next pop is a (re)start.
    stopped: bool,
    /// Started by the front-end (`SET_VRING_KICK`) and not stopped since (`GET_VRING_BASE`).
    running: bool,
}

#[derive(Debug)]
struct Cycle {
    log_all: bool,
    queues: Vec<QueueRun>,
}

/// One connection's view of the cycle.
pub(crate) struct Lifecycle {
    cycle: Mutex<Cycle>,
    observer: OnceLock<Arc<dyn DeviceObserver>>,
}

impl Lifecycle {
    pub(crate) fn new(num_queues: u16) -> Self {
        Lifecycle {
            cycle: Mutex::new(Cycle {
                log_all: false,
                queues: vec![
                    QueueRun {
                        base: None,
                        stopped: true,
                        running: false,
                    };
                    usize::from(num_queues)
                ],
            }),
            observer: OnceLock::new(),
        }
    }

    /// Who is told (set once, before the connection serves requests).
    pub(crate) fn set_observer(&self, observer: Arc<dyn DeviceObserver>) {
        let _ = self.observer.set(observer);
    }

    fn lock(&self) -> MutexGuard<'_, Cycle> {
        self.cycle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `SET_FEATURES` with `features`.
    pub(crate) fn features(&self, log_all: bool) {
        let changed = {
            let mut c = self.lock();
            std::mem::replace(&mut c.log_all, log_all) != log_all
        };
        if changed {
            if let Some(o) = self.observer.get() {
                o.log_all(log_all);
            }
        }
    }

    /// Before a queue pops: `next_avail` reads its position. Calls the observer when this is
    /// the queue's first run since it was stopped.
    pub(crate) fn before_pop(&self, queue: u16, next_avail: impl FnOnce() -> u16) {
        let starting = {
            let mut c = self.lock();
            match c.queues.get_mut(usize::from(queue)) {
                Some(q) if q.stopped => {
                    q.stopped = false;
                    let at = next_avail();
                    q.base = Some(at);
                    Some(at)
                }
                _ => None,
            }
        };
        if let (Some(at), Some(o)) = (starting, self.observer.get()) {
            o.queue_starting(queue, at);
        }
    }

    /// The inflight region says a previous process left `queue` at `at` (see
    /// [`DeviceObserver::queue_previous`]): told when the queue has not run in this process.
    pub(crate) fn previous(&self, queue: u16, at: u16) {
        let unknown = self
            .lock()
            .queues
            .get(usize::from(queue))
            .is_some_and(|q| q.stopped && q.base.is_none());
        if let (true, Some(o)) = (unknown, self.observer.get()) {
            o.queue_previous(queue, at);
        }
    }

    /// After a queue popped (under its vring lock): its position now.
    pub(crate) fn after_pop(&self, queue: u16, next_avail: u16) {
        if let Some(q) = self.lock().queues.get_mut(usize::from(queue)) {
            q.base = Some(next_avail);
        }
    }

    /// `SET_VRING_KICK` of `queue`: the front-end (re)started it.
    pub(crate) fn started(&self, queue: u16) {
        if let Some(q) = self.lock().queues.get_mut(usize::from(queue)) {
            q.running = true;
        }
    }

    /// `GET_VRING_BASE` of `queue`, its requests drained.
    pub(crate) fn stopped(&self, queue: u16) {
        let (bases, log_all, last) = {
            let mut c = self.lock();
            if let Some(q) = c.queues.get_mut(usize::from(queue)) {
                q.stopped = true;
                q.running = false;
            }
            let bases: Vec<Option<u16>> = c.queues.iter().map(|q| q.base).collect();
            (bases, c.log_all, !c.queues.iter().any(|q| q.running))
        };
        if let Some(o) = self.observer.get() {
            o.queue_stopped(queue, &bases, log_all, last);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Record(Mutex<Vec<String>>);

    impl DeviceObserver for Record {
        fn log_all(&self, on: bool) {
            self.0.lock().unwrap().push(format!("log_all {on}"));
        }
        fn queue_stopped(&self, queue: u16, bases: &[Option<u16>], log_all: bool, last: bool) {
            let last = if last { " last" } else { "" };
            self.0
                .lock()
                .unwrap()
                .push(format!("stopped {queue} {bases:?} {log_all}{last}"));
        }
        fn queue_starting(&self, queue: u16, next_avail: u16) {
            self.0
                .lock()
                .unwrap()
                .push(format!("starting {queue} {next_avail}"));
        }
    }

    #[test]
    fn a_stop_start_cycle_is_reported_once_per_queue() {
        let rec = Arc::new(Record::default());
        let lc = Lifecycle::new(2);
        lc.set_observer(rec.clone());
        lc.features(true);
        lc.features(true);
        lc.started(0);
        lc.started(1);
        lc.before_pop(0, || 5);
        lc.after_pop(0, 9);
        lc.before_pop(0, || unreachable!("not a restart"));
        lc.after_pop(0, 12);
        lc.stopped(0);
        lc.stopped(1);
        lc.before_pop(1, || 3);
        lc.features(false);
        assert_eq!(
            *rec.0.lock().unwrap(),
            [
                "log_all true",
                "starting 0 5",
                "stopped 0 [Some(12), None] true",
                "stopped 1 [Some(12), None] true last",
                "starting 1 3",
                "log_all false",
            ]
        );
    }

    /// The last running queue's stop ends a device stop: a queue the front-end never started
    /// does not count, and a queue restarted and stopped alone (another still stopped) is
    /// its own device stop.
    #[test]
    fn the_last_running_queue_ends_a_device_stop() {
        let rec = Arc::new(Record::default());
        let lc = Lifecycle::new(3);
        lc.set_observer(rec.clone());
        lc.started(0);
        lc.started(1); // queue 2 never started (a device of 3 queues, 2 kicked)
        lc.stopped(0);
        lc.stopped(1);
        lc.started(1);
        lc.stopped(1);
        assert_eq!(
            *rec.0.lock().unwrap(),
            [
                "stopped 0 [None, None, None] false",
                "stopped 1 [None, None, None] false last",
                "stopped 1 [None, None, None] false last",
            ]
        );
    }
}
