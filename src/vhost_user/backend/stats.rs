//! Per-queue counters: every backend of a [`Server`](crate::vhost_user::Server) counts into the
//! same [`StatsHandle`] (one `QueueStats` per virtqueue), so the numbers keep accumulating
//! across front-end reconnects (see the module comment of `backend`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

use super::{lock, IoEngine};
use crate::histogram::{Histogram, HistogramSnapshot};

/// One queue's counters, updated while the device runs.
#[derive(Debug, Default)]
pub(crate) struct QueueStats {
    requests: AtomicU64,
    errors: AtomicU64,
    pub(super) malformed: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    pub(super) resubmitted: AtomicU64,
    /// Time from execution start to completion of well-formed requests.
    latency: Histogram,
}

impl QueueStats {
    /// Counts the latency of a request whose execution began at `started`.
    pub(super) fn record_latency(&self, started: Instant) {
        self.latency.record(started.elapsed());
    }

    /// Counts one well-formed request; `data` is its `(read, written)` bytes.
    pub(super) fn count(&self, ok: bool, data: (u64, u64)) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if ok {
            self.bytes_read.fetch_add(data.0, Ordering::Relaxed);
            self.bytes_written.fetch_add(data.1, Ordering::Relaxed);
        } else {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn snapshot(&self) -> QueueStatsSnapshot {
        QueueStatsSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            malformed: self.malformed.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            resubmitted: self.resubmitted.load(Ordering::Relaxed),
        }
    }
}

/// A copy of one queue's counters (see the module comment for what each counts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct QueueStatsSnapshot {
    /// Well-formed requests completed.
    pub requests: u64,
    /// Well-formed requests completed with a status other than OK.
    pub errors: u64,
    /// Malformed chains (completed with IOERR or without a status byte).
    pub malformed: u64,
    /// Bytes of successful reads.
    pub bytes_read: u64,
    /// Bytes of successful writes.
    pub bytes_written: u64,
    /// Requests a previous process popped and never completed, run again by this one from the
    /// front-end's inflight region (docs/inflight.md).
    pub resubmitted: u64,
}

/// The per-queue counters of a device, shared by every connection's backend, and what the
/// device reports about its front-ends and I/O engine. Cheap to clone.
#[derive(Debug, Clone)]
pub struct StatsHandle {
    queues: Arc<[QueueStats]>,
    device: Arc<Mutex<DeviceReport>>,
}

/// What `query-stats` says about the device besides its queues.
#[derive(Debug, Default)]
struct DeviceReport {
    /// Why the latest front-end cannot be served (`front-end-error`).
    front_end_error: Option<String>,
    /// Front-end connections ended and finished with (`front-end-disconnects`).
    front_end_disconnects: u64,
    /// The I/O engine the server chose (`io-engine`).
    io_engine: Option<&'static str>,
}

impl StatsHandle {
    /// Zeroed counters for `num_queues` queues.
    pub(crate) fn new(num_queues: u16) -> Self {
        StatsHandle {
            queues: (0..num_queues).map(|_| QueueStats::default()).collect(),
            device: Arc::default(),
        }
    }

    /// Why the latest front-end cannot be served (its guest RAM is not shared), until a
    /// front-end's first request shows shared RAM (QMP `query-stats`, `front-end-error`).
    pub fn front_end_error(&self) -> Option<String> {
        lock(&self.device).front_end_error.clone()
    }

    pub(crate) fn set_front_end_error(&self, error: Option<String>) {
        lock(&self.device).front_end_error = error;
    }

    /// How many front-end connections ended and were finished with: their requests done, the
    /// disk flushed, the server back to waiting for the next front-end (QMP `query-stats`,
    /// `front-end-disconnects`).
    pub fn front_end_disconnects(&self) -> u64 {
        lock(&self.device).front_end_disconnects
    }

    pub(crate) fn count_front_end_disconnect(&self) {
        lock(&self.device).front_end_disconnects += 1;
    }

    /// The I/O engine serving the queues, `io_uring` or `threads` (QMP `query-stats`,
    /// `io-engine`); `None` before the server chose one.
    pub fn io_engine(&self) -> Option<&'static str> {
        lock(&self.device).io_engine
    }

    pub(crate) fn set_io_engine(&self, engine: IoEngine) {
        lock(&self.device).io_engine = Some(match engine {
            IoEngine::Uring => "io_uring",
            IoEngine::Auto | IoEngine::Threads => "threads",
        });
    }

    /// The counters of every queue, in queue order.
    pub fn queues(&self) -> Vec<QueueStatsSnapshot> {
        self.queues.iter().map(QueueStats::snapshot).collect()
    }

    /// The request latency histogram of every queue, in queue order.
    pub fn latencies(&self) -> Vec<HistogramSnapshot> {
        self.queues.iter().map(|q| q.latency.snapshot()).collect()
    }

    pub(super) fn queue(&self, index: usize) -> Option<&QueueStats> {
        self.queues.get(index)
    }

    #[cfg(test)]
    pub(crate) fn same_as(&self, other: &StatsHandle) -> bool {
        Arc::ptr_eq(&self.queues, &other.queues) && Arc::ptr_eq(&self.device, &other.device)
    }
}
