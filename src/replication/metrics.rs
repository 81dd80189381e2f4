//! Counters and timestamps of one replication endpoint for operators (`colo-blk status`, the
//! Prometheus endpoint, extra `query-replication` fields). Kept apart from the engines: each
//! engine calls one method of [`ReplicationMetrics`] where the thing happens, and reads it back
//! when it builds its status. Nothing here is on the guest's write path except
//! [`ReplicationMetrics::acked`] (one relaxed add per acknowledgement).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::histogram::{Histogram, HistogramSnapshot};

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[derive(Debug, Default, Clone, Copy)]
struct Times {
    /// When the endpoint lost protection (primary: not connected and in sync); `None` while
    /// protected.
    unprotected_since: Option<f64>,
    last_checkpoint_at: Option<f64>,
    /// The current resync: when it started and how many bytes it had to send.
    resync_started_at: Option<f64>,
    resync_total_bytes: u64,
    /// The failover in progress (or last done): when it started and what it had to commit.
    failover_started_at: Option<f64>,
    failover_total_bytes: u64,
    last_failover_seconds: Option<f64>,
}

/// What one endpoint counts (all methods take `&self`).
#[derive(Debug)]
pub struct ReplicationMetrics {
    checkpoints: AtomicU64,
    checkpoint_failures: AtomicU64,
    checkpoint_duration: Histogram,
    link_errors: AtomicU64,
    sessions: AtomicU64,
    acked_bytes: AtomicU64,
    failovers: AtomicU64,
    times: Mutex<Times>,
}

/// A copy of the counters (see [`ReplicationMetrics`]).
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsSnapshot {
    pub checkpoints: u64,
    pub checkpoint_failures: u64,
    pub checkpoint_duration: HistogramSnapshot,
    pub link_errors: u64,
    pub sessions: u64,
    pub acked_bytes: u64,
    pub failovers: u64,
    pub unprotected_since: Option<f64>,
    pub last_checkpoint_at: Option<f64>,
    pub resync_started_at: Option<f64>,
    pub resync_total_bytes: u64,
    pub failover_started_at: Option<f64>,
    pub failover_total_bytes: u64,
    pub last_failover_seconds: Option<f64>,
}

impl Default for ReplicationMetrics {
    fn default() -> Self {
        ReplicationMetrics::new()
    }
}

impl ReplicationMetrics {
    /// Fresh counters; the endpoint starts unprotected (nothing is in sync yet).
    pub fn new() -> Self {
        ReplicationMetrics {
            checkpoints: AtomicU64::new(0),
            checkpoint_failures: AtomicU64::new(0),
            checkpoint_duration: Histogram::default(),
            link_errors: AtomicU64::new(0),
            sessions: AtomicU64::new(0),
            acked_bytes: AtomicU64::new(0),
            failovers: AtomicU64::new(0),
            times: Mutex::new(Times {
                unprotected_since: Some(now_unix()),
                ..Times::default()
            }),
        }
    }

    fn times(&self) -> std::sync::MutexGuard<'_, Times> {
        self.times.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A checkpoint completed after `took`.
    pub fn checkpoint(&self, took: Duration) {
        self.checkpoints.fetch_add(1, Ordering::Relaxed);
        self.checkpoint_duration.record(took);
        self.times().last_checkpoint_at = Some(now_unix());
    }

    /// A checkpoint was attempted and failed (not connected, timeout, link lost).
    pub fn checkpoint_failed(&self) {
        self.checkpoint_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// A session passed its handshake; the primary resends `resync_bytes` first.
    pub fn connected(&self, resync_bytes: u64) {
        self.sessions.fetch_add(1, Ordering::Relaxed);
        let mut t = self.times();
        t.resync_started_at = Some(now_unix());
        t.resync_total_bytes = resync_bytes;
    }

    /// The peer is in sync (primary: the resync finished): protected from now on.
    pub fn in_sync(&self) {
        self.times().unprotected_since = None;
    }

    /// Protection is lost (the session ended, or replication was stopped).
    pub fn unprotected(&self) {
        let mut t = self.times();
        t.unprotected_since.get_or_insert_with(now_unix);
        t.resync_started_at = None;
        t.resync_total_bytes = 0;
    }

    /// A session failed or a peer was refused.
    pub fn link_error(&self) {
        self.link_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// The peer acknowledged `bytes` of stream (frame costs, as `bytes-sent-total` counts).
    pub fn acked(&self, bytes: u64) {
        self.acked_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A failover began with `bytes` of layers to commit.
    pub fn failover_started(&self, bytes: u64) {
        let mut t = self.times();
        t.failover_started_at = Some(now_unix());
        t.failover_total_bytes = bytes;
    }

    /// A failover completed after `took`.
    pub fn failover_done(&self, took: Duration) {
        self.failovers.fetch_add(1, Ordering::Relaxed);
        let mut t = self.times();
        t.last_failover_seconds = Some(took.as_secs_f64());
        t.unprotected_since.get_or_insert_with(now_unix);
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let t = *self.times();
        MetricsSnapshot {
            checkpoints: self.checkpoints.load(Ordering::Relaxed),
            checkpoint_failures: self.checkpoint_failures.load(Ordering::Relaxed),
            checkpoint_duration: self.checkpoint_duration.snapshot(),
            link_errors: self.link_errors.load(Ordering::Relaxed),
            sessions: self.sessions.load(Ordering::Relaxed),
            acked_bytes: self.acked_bytes.load(Ordering::Relaxed),
            failovers: self.failovers.load(Ordering::Relaxed),
            unprotected_since: t.unprotected_since,
            last_checkpoint_at: t.last_checkpoint_at,
            resync_started_at: t.resync_started_at,
            resync_total_bytes: t.resync_total_bytes,
            failover_started_at: t.failover_started_at,
            failover_total_bytes: t.failover_total_bytes,
            last_failover_seconds: t.last_failover_seconds,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protection_follows_sessions() {
        let m = ReplicationMetrics::new();
        assert!(m.snapshot().unprotected_since.is_some());
        m.connected(4096);
        let s = m.snapshot();
        assert_eq!((s.sessions, s.resync_total_bytes), (1, 4096));
        assert!(s.resync_started_at.is_some());
        m.in_sync();
        assert_eq!(m.snapshot().unprotected_since, None);
        m.checkpoint(Duration::from_millis(2));
        m.unprotected();
        m.link_error();
        let s = m.snapshot();
        assert!(s.unprotected_since.is_some() && s.last_checkpoint_at.is_some());
        assert_eq!(
            (s.checkpoints, s.link_errors, s.checkpoint_duration.count),
            (1, 1, 1)
        );
        assert_eq!(s.resync_started_at, None);
    }
}
