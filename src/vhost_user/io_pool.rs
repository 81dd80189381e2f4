//! A process-wide pool of I/O threads that queue workers hand requests to when more than one is
//! pending, so that one virtqueue keeps several blocking `preadv`/`pwritev` calls in flight
//! (what qemu-storage-daemon's `aio=threads` does). A lone request runs inline on the queue's
//! worker thread instead: no hand-off latency at queue depth 1.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Fixed-size pool of I/O threads.
///
/// Jobs wait in one queue. A thread that takes a job while more are waiting wakes one idle
/// thread before it runs its own, and [`IoPool::spawn`] wakes one only when no wake-up is
/// already on its way: a burst of jobs wakes threads one after another, as many as the jobs
/// keep busy. Short jobs (page-cache writes, which ext4 serialises on the inode lock anyway)
/// are then run back to back by the few threads already awake instead of waking one sleeping
/// thread each; long ones (a disk's) still spread over as many threads as there are jobs.
pub(crate) struct IoPool {
    shared: Arc<Shared>,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Idle threads wait here for jobs.
    work: Condvar,
    /// `spawn` waits here while the queue is full.
    room: Condvar,
    /// Most jobs queued at once (a queue worker that outruns the pool waits).
    capacity: usize,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    /// Threads waiting on `work`.
    idle: usize,
    /// Callers of `spawn` waiting on `room`.
    full: usize,
    /// A thread was woken and has not taken the lock since: no second wake-up is needed yet.
    waking: bool,
    /// The pool was dropped: threads exit once the queue is empty.
    closed: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes one idle thread for the jobs waiting, unless one is being woken already.
    fn wake_one(&self, q: &mut Queue) {
        if !q.jobs.is_empty() && q.idle > 0 && !q.waking {
            q.waking = true;
            self.work.notify_one();
        }
    }
}

impl IoPool {
    /// Starts `threads` threads (at least one).
    pub(crate) fn new(threads: usize) -> std::io::Result<Arc<IoPool>> {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            work: Condvar::new(),
            room: Condvar::new(),
            capacity: threads * 64,
        });
        for i in 0..threads {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("colo-io-{i}"))
                .spawn(move || worker(&shared))?;
        }
        Ok(Arc::new(IoPool { shared }))
    }

    /// Runs `job` on a pool thread (waits while the queue is full).
    pub(crate) fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        let s = &*self.shared;
        let mut q = s.lock();
        while q.jobs.len() >= s.capacity {
            q.full += 1;
            q = s.room.wait(q).unwrap_or_else(|e| e.into_inner());
            q.full -= 1;
        }
        q.jobs.push_back(Box::new(job));
        s.wake_one(&mut q);
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.work.notify_all();
    }
}

fn worker(s: &Shared) {
    let mut q = s.lock();
    loop {
        if let Some(job) = q.jobs.pop_front() {
            if q.full > 0 {
                s.room.notify_one();
            }
            // More jobs than this thread: the next one starts on another thread.
            s.wake_one(&mut q);
            drop(q);
            job();
            q = s.lock();
            continue;
        }
        if q.closed {
            return;
        }
        q.idle += 1;
        q = s.work.wait(q).unwrap_or_else(|e| e.into_inner());
        q.idle -= 1;
        q.waking = false;
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

    /// Long jobs spread over the threads: with as many blocked jobs as threads, each runs on a
    /// thread of its own (else the barrier would never open), and jobs queued behind them
    /// (more than the queue holds, so `spawn` waits for room) all run once it opens.
    #[test]
    fn blocked_jobs_get_a_thread_each_and_the_queue_drains_behind_them() {
        const THREADS: usize = 4;
        let pool = IoPool::new(THREADS).unwrap();
        let inflight = Arc::new(InFlight::default());
        let barrier = Arc::new(std::sync::Barrier::new(THREADS + 1));
        let done = Arc::new(AtomicUsize::new(0));
        let queued = THREADS * 64 * 2;
        inflight.add(THREADS + queued);
        for _ in 0..THREADS {
            let (b, f) = (barrier.clone(), inflight.clone());
            pool.spawn(move || {
                b.wait();
                f.done();
            });
        }
        let spawner = {
            let (pool, inflight, done) = (pool.clone(), inflight.clone(), done.clone());
            std::thread::spawn(move || {
                for _ in 0..queued {
                    let (d, f) = (done.clone(), inflight.clone());
                    pool.spawn(move || {
                        d.fetch_add(1, Ordering::SeqCst);
                        f.done();
                    });
                }
            })
        };
        barrier.wait();
        spawner.join().unwrap();
        inflight.wait_idle();
        assert_eq!(done.load(Ordering::SeqCst), queued);
    }

    /// Dropping the pool ends its threads after the jobs already queued.
    #[test]
    fn dropping_the_pool_runs_what_is_queued() {
        let pool = IoPool::new(2).unwrap();
        let inflight = Arc::new(InFlight::default());
        let done = Arc::new(AtomicUsize::new(0));
        inflight.add(100);
        for _ in 0..100 {
            let (d, f) = (done.clone(), inflight.clone());
            pool.spawn(move || {
                d.fetch_add(1, Ordering::SeqCst);
                f.done();
            });
        }
        drop(pool);
        inflight.wait_idle();
        assert_eq!(done.load(Ordering::SeqCst), 100);
    }
}
