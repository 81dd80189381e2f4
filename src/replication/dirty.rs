//! A dirty bitmap: which chunks of the disk changed since the last completed checkpoint.
//!
//! The primary keeps one whether or not a secondary is connected, so that after the link
//! breaks, a (new) secondary can be brought back in sync by sending only these chunks.

/// One bit per `granularity` bytes of disk.
#[derive(Debug, Clone)]
pub struct DirtyBitmap {
    bits: Vec<u64>,
    granularity: u64,
    capacity: u64,
    count: u64,
}

impl DirtyBitmap {
    /// An empty bitmap for a disk of `capacity` bytes. `granularity` must be a power of two.
    pub fn new(capacity: u64, granularity: u64) -> Self {
        debug_assert!(granularity.is_power_of_two());
        let chunks = capacity.div_ceil(granularity);
        DirtyBitmap {
            bits: vec![0; chunks.div_ceil(64) as usize],
            granularity,
            capacity,
            count: 0,
        }
    }

    /// Marks every chunk `[offset, offset+len)` touches.
    pub fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 || offset >= self.capacity {
            return;
        }
        let end = offset.saturating_add(len).min(self.capacity);
        let first = offset / self.granularity;
        let last = (end - 1) / self.granularity;
        for chunk in first..=last {
            let (w, b) = ((chunk / 64) as usize, chunk % 64);
            if self.bits[w] & (1 << b) == 0 {
                self.bits[w] |= 1 << b;
                self.count += 1;
            }
        }
    }

    /// Marks the whole disk (a full resync).
    pub fn mark_all(&mut self) {
        self.mark(0, self.capacity);
    }

    /// Adds every chunk of `other` (same geometry) to this bitmap.
    pub fn merge(&mut self, other: &DirtyBitmap) {
        self.count = 0;
        for (a, b) in self.bits.iter_mut().zip(&other.bits) {
            *a |= *b;
            self.count += u64::from(a.count_ones());
        }
    }

    /// Takes the content, leaving an empty bitmap behind.
    pub fn take(&mut self) -> DirtyBitmap {
        let empty = DirtyBitmap::new(self.capacity, self.granularity);
        std::mem::replace(self, empty)
    }

    /// Number of dirty chunks.
    #[cfg(test)]
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Bytes covered by dirty chunks (the last chunk may be short).
    pub fn dirty_bytes(&self) -> u64 {
        self.ranges().map(|(_, l)| l).sum()
    }

    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Dirty byte ranges `(offset, len)`, one per chunk, in disk order.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.bits.iter().enumerate().flat_map(move |(w, &word)| {
            (0..64u64)
                .filter(move |b| word & (1 << b) != 0)
                .map(move |b| {
                    let off = (w as u64 * 64 + b) * self.granularity;
                    (off, self.granularity.min(self.capacity - off))
                })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_every_touched_chunk_and_clips_at_the_end() {
        let mut d = DirtyBitmap::new(10 * 4096 + 100, 4096);
        d.mark(4095, 2);
        d.mark(10 * 4096, 100);
        d.mark(u64::MAX - 1, 5);
        assert_eq!(
            d.ranges().collect::<Vec<_>>(),
            vec![(0, 4096), (4096, 4096), (40960, 100)]
        );
        assert_eq!(d.count(), 3);
        assert_eq!(d.dirty_bytes(), 8292);
        let taken = d.take();
        assert_eq!(d.count(), 0);
        d.mark(8192, 1);
        d.merge(&taken);
        assert_eq!(d.count(), 4);
    }
}
