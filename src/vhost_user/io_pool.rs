//! A process-wide pool of I/O threads that queue workers hand requests to when more than one is
//! pending, so that one virtqueue keeps several blocking `preadv`/`pwritev` calls in flight
//! (what qemu-storage-daemon's `aio=threads` does). A lone request runs inline on the queue's
//! worker thread instead: no hand-off latency at queue depth 1.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};

use log::warn;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Fixed-size pool of I/O threads.
pub(crate) struct IoPool {
    tx: SyncSender<Job>,
}

impl IoPool {
    /// Starts `threads` threads (at least one).
    pub(crate) fn new(threads: usize) -> std::io::Result<Arc<IoPool>> {
        let threads = threads.max(1);
        // Bounded: a queue worker that outruns the pool waits instead of queueing without end.
        let (tx, rx) = sync_channel::<Job>(threads * 64);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("colo-io-{i}"))
                .spawn(move || worker(rx))?;
        }
        Ok(Arc::new(IoPool { tx }))
    }

    /// Runs `job` on a pool thread; runs it here if the pool is gone.
    pub(crate) fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        if let Err(e) = self.tx.send(Box::new(job)) {
            warn!("I/O pool stopped; running the request inline");
            (e.0)();
        }
    }
}

fn worker(rx: Arc<Mutex<Receiver<Job>>>) {
    loop {
        let job = match rx.lock() {
            Ok(r) => r.recv(),
            Err(_) => return,
        };
        match job {
            Ok(job) => job(),
            Err(_) => return,
        }
    }
}

/// Counts requests a device has popped but not completed, so that a disconnect or shutdown can
/// wait until every one of them is completed.
#[derive(Default)]
pub(crate) struct InFlight {
    /// (requests in flight, threads waiting in `wait_idle`)
    count: Mutex<(usize, usize)>,
    idle: Condvar,
}

impl InFlight {
    /// Counts `n` more requests in flight.
    pub(crate) fn add(&self, n: usize) {
        self.count.lock().unwrap_or_else(|e| e.into_inner()).0 += n;
    }

    /// Counts one request completed.
    /// Whether none of the queue's requests is in flight.
    pub(crate) fn is_idle(&self) -> bool {
        self.count.lock().unwrap_or_else(|e| e.into_inner()).0 == 0
    }

    pub(crate) fn done(&self) {
        self.done_n(1);
    }

    /// Counts `n` requests completed. Wakes waiters only when there are any (otherwise every
    /// completion would cost a futex call).
    pub(crate) fn done_n(&self, n: usize) {
        let mut c = self.count.lock().unwrap_or_else(|e| e.into_inner());
        c.0 = c.0.saturating_sub(n);
        if c.0 == 0 && c.1 > 0 {
            self.idle.notify_all();
        }
    }

    /// Blocks until no request is in flight.
    pub(crate) fn wait_idle(&self) {
        let mut c = self.count.lock().unwrap_or_else(|e| e.into_inner());
        c.1 += 1;
        while c.0 > 0 {
            c = self.idle.wait(c).unwrap_or_else(|e| e.into_inner());
        }
        c.1 -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_job_runs_and_wait_idle_sees_them_done() {
        let pool = IoPool::new(4).unwrap();
        let inflight = Arc::new(InFlight::default());
        let done = Arc::new(AtomicUsize::new(0));
        inflight.add(1000);
        for _ in 0..1000 {
            let (d, f) = (done.clone(), inflight.clone());
            pool.spawn(move || {
                d.fetch_add(1, Ordering::SeqCst);
                f.done();
            });
        }
        inflight.wait_idle();
        assert_eq!(done.load(Ordering::SeqCst), 1000);
    }
}
