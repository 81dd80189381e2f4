//! A fixed-bucket histogram of atomics: recording is a few relaxed atomic adds (no lock, no
//! allocation), so it can sit on the request path. Buckets are cumulative upper bounds in
//! microseconds, as Prometheus histograms want them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

/// Upper bounds of the buckets, in microseconds (the last, implicit bucket is `+Inf`).
pub const BUCKETS_US: [u64; 16] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    1_000_000, 5_000_000,
];

/// Counts of durations per bucket, their number and their sum.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per bucket (not cumulative); index `BUCKETS_US.len()` is `+Inf`.
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    /// Records one duration.
    pub fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = BUCKETS_US.partition_point(|&b| b < us);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// A copy of the counts, cumulative per bucket.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut acc = 0;
        let mut cumulative = Vec::with_capacity(BUCKETS_US.len());
        for b in &self.buckets[..BUCKETS_US.len()] {
            acc += b.load(Ordering::Relaxed);
            cumulative.push(acc);
        }
        HistogramSnapshot {
            count: self.count.load(Ordering::Relaxed),
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            bucket_le_us: BUCKETS_US.to_vec(),
            cumulative,
        }
    }
}

/// A histogram's counts (the QMP `query-stats` shape, kebab-case).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct HistogramSnapshot {
    /// Durations recorded.
    pub count: u64,
    /// Their sum, in seconds.
    pub sum_seconds: f64,
    /// Bucket upper bounds in microseconds (a last `+Inf` bucket equals `count`).
    pub bucket_le_us: Vec<u64>,
    /// Durations at most each bound (cumulative).
    pub cumulative: Vec<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_upper_bounds() {
        let h = Histogram::default();
        h.record(Duration::from_micros(10)); // le 10
        h.record(Duration::from_micros(11)); // le 25
        h.record(Duration::from_millis(3)); // le 5000
        h.record(Duration::from_secs(60)); // +Inf only
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.cumulative[0], 1);
        assert_eq!(s.cumulative[1], 2);
        assert_eq!(s.cumulative[7], 2); // le 2500
        assert_eq!(s.cumulative[8], 3); // le 5000
        assert_eq!(*s.cumulative.last().unwrap(), 3);
        assert!((s.sum_seconds - 60.003021).abs() < 1e-9);
    }
}
