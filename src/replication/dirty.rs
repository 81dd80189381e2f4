//! Dirty tracking on the primary (and on a failed-over secondary, which may become one).
//!
//! - [`DirtyBitmap`]: in memory, fine-grained: which chunks changed since the last completed
//!   checkpoint. The primary keeps one whether or not a secondary is connected, so that after
//!   the link breaks, a (new) secondary can be brought back in sync by sending only these chunks.
//! - [`DirtyLog`]: on disk, coarse (`--dirty-log-extent`, 4 MiB): a superset of the extents
//!   that may differ from the secondary's last checkpoint, so that a restarted primary knows what
//!   to resync. An extent's bit is set and synced *before* the first change touching it since
//!   the bit was last cleared proceeds (concurrent writers share one sync); bits are cleared
//!   lazily after checkpoints, only for extents untouched for a whole epoch.
//!
//! ```text
//!  submit(change) ─► log.record(range)  extent bit already on disk? ─ yes ─► go on (no I/O)
//!                                         └ no: set in memory, pwrite bitmap + fdatasync
//!                                           (one sync covers every writer waiting meanwhile)
//!  checkpoint marker ─► log.epoch_boundary()      touched(prev) := touched(cur), cur := ∅
//!  checkpoint done   ─► log.checkpoint_done()     clear on_disk ∖ (prev ∪ cur ∪ in flight)
//! ```
//!
//! - [`DirtyExtents`]: a log's bits as one value, what a failback's sync target sends its new
//!   primary (the PEER_DIRTY frame) so that the resync covers both sides' writes.
//! - [`LoggedDisk`]: a disk whose every change is recorded in a log first: the write path of a
//!   failed-over secondary (docs/replication-protocol.md, "Failback").

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

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::storage::durable::{std_media, DurableFile, Media, Open, SyncPoint};
use crate::storage::{BlockDevice, Change};

const LOG_MAGIC: &[u8; 8] = b"COLODLOG";
const LOG_VERSION: u32 = 1;
/// The bits start here (the header fills the first block).
const LOG_HEADER: u64 = 4096;

/// A plain bit set over extents.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: u64) -> Bits {
        Bits(vec![0; n.div_ceil(64) as usize])
    }
    fn get(&self, i: u64) -> bool {
        self.0[(i / 64) as usize] & (1 << (i % 64)) != 0
    }
    fn set(&mut self, i: u64) {
        self.0[(i / 64) as usize] |= 1 << (i % 64);
    }
    fn clear(&mut self, i: u64) {
        self.0[(i / 64) as usize] &= !(1 << (i % 64));
    }
    fn ones(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().enumerate().flat_map(|(w, &word)| {
            (0..64u64)
                .filter(move |b| word & (1 << b) != 0)
                .map(move |b| w as u64 * 64 + b)
        })
    }
    fn to_bytes(&self) -> Vec<u8> {
        self.0.iter().flat_map(|w| w.to_le_bytes()).collect()
    }
}

#[derive(Debug)]
struct LogState {
    /// What the file says (or will say once the pending sync is done).
    on_disk: Bits,
    /// Extents touched since the last checkpoint marker, and in the epoch before it.
    cur: Bits,
    prev: Bits,
    /// Checkpoint markers queued so far ([`DirtyLog::epoch_boundary`]).
    boundaries: u64,
    /// Changes registered per extent whose local write has not finished.
    in_flight: Vec<u32>,
    /// Bumped on every change of `on_disk`.
    generation: u64,
    /// The generation known durable (mirrors `DirtyLog::durable`, readable under this lock).
    synced: u64,
    /// A sync failed: the record can no longer be trusted, changes fail.
    broken: Option<String>,
}

impl LogState {
    /// Marks `extents` touched in the current epoch and set on disk; returns the generation
    /// the caller must see synced before it goes on (`None`: every bit is already durable). A
    /// bit another writer set may still be on its way to the disk: the caller then waits for
    /// that sync too, never only for the bit to be set in memory.
    fn touch(&mut self, extents: impl IntoIterator<Item = u64>) -> Option<u64> {
        let mut newly = false;
        for e in extents {
            self.cur.set(e);
            if !self.on_disk.get(e) {
                self.on_disk.set(e);
                newly = true;
            }
        }
        if newly {
            self.generation += 1;
        }
        (self.synced < self.generation).then_some(self.generation)
    }
}

/// The primary's persistent dirty record (see the module comment).
#[derive(Debug)]
pub struct DirtyLog {
    file: Option<Box<dyn DurableFile>>,
    path: PathBuf,
    extent: u64,
    capacity: u64,
    extents: u64,
    st: Mutex<LogState>,
    /// The generation of `on_disk` known durable; held across the write + sync.
    durable: Mutex<u64>,
}

/// Held while a recorded change is applied; dropping it counts the change as finished.
#[must_use]
#[derive(Debug)]
pub struct LogGuard<'a> {
    log: &'a DirtyLog,
    first: u64,
    last: u64,
}

impl Drop for LogGuard<'_> {
    fn drop(&mut self) {
        if self.first > self.last {
            return;
        }
        let mut st = self.log.lock();
        for e in self.first..=self.last {
            st.in_flight[e as usize] -= 1;
            st.cur.set(e);
        }
    }
}

impl DirtyLog {
    /// Opens (creating when missing) the log of a disk of `capacity` bytes. Returns it with the
    /// byte ranges it records as dirty. A log that is missing while `expect_existing` (the disk
    /// has replication history), or whose geometry differs, makes the whole disk dirty.
    pub fn open(
        path: &Path,
        capacity: u64,
        extent: u64,
        expect_existing: bool,
    ) -> io::Result<(DirtyLog, Vec<(u64, u64)>)> {
        Self::open_on(&*std_media(), path, capacity, extent, expect_existing)
    }

    /// [`DirtyLog::open`] on `media` (the simulated disk of the power-loss tests).
    pub fn open_on(
        media: &dyn Media,
        path: &Path,
        capacity: u64,
        extent: u64,
        expect_existing: bool,
    ) -> io::Result<(DirtyLog, Vec<(u64, u64)>)> {
        let extents = capacity.div_ceil(extent).max(1);
        let existed = media.exists(path);
        let named = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        let file = media.open(path, Open::Create).map_err(named)?;
        let mut raw = vec![0u8; file.len().map_err(named)? as usize];
        file.read_at(&mut raw, 0).map_err(named)?;
        let header = Self::header(capacity, extent);
        let mut bits = Bits::new(extents);
        let mut all = false;
        if existed && raw.len() >= LOG_HEADER as usize && raw[..header.len()] == header[..] {
            let body = &raw[LOG_HEADER as usize..];
            for (i, w) in bits.0.iter_mut().enumerate() {
                let mut b = [0u8; 8];
                if let Some(src) = body.get(i * 8..i * 8 + 8) {
                    b.copy_from_slice(src);
                }
                *w = u64::from_le_bytes(b);
            }
            // Bits past the end of the disk are not extents.
            for e in extents..bits.0.len() as u64 * 64 {
                bits.clear(e);
            }
        } else if existed && !raw.is_empty() {
            log::warn!(
                "{}: dirty log of another geometry or damaged: the whole disk counts as dirty",
                path.display()
            );
            all = true;
        } else if expect_existing {
            log::warn!(
                "{}: no dirty log for a disk with replication history: the whole disk counts \
                 as dirty",
                path.display()
            );
            all = true;
        }
        if all {
            for e in 0..extents {
                bits.set(e);
            }
        }
        let log = DirtyLog {
            file: Some(file),
            path: path.to_path_buf(),
            extent,
            capacity,
            extents,
            st: Mutex::new(LogState {
                on_disk: bits.clone(),
                cur: bits.clone(),
                prev: Bits::new(extents),
                boundaries: 0,
                in_flight: vec![0; extents as usize],
                generation: 1,
                synced: 0,
                broken: None,
            }),
            durable: Mutex::new(0),
        };
        // Write the header and the bits as they are now, durably, before any change.
        if let Some(f) = &log.file {
            f.write_at(&header, 0)?;
        }
        log.sync_to(1)?;
        if !existed {
            if let Some(dir) = path.parent() {
                // Best effort, as for the metadata file.
                let _ = media.sync_dir(dir, SyncPoint::DirtyDir);
            }
        }
        let ranges = bits
            .ones()
            .map(|e| (e * extent, extent.min(capacity - e * extent)))
            .collect();
        Ok((log, ranges))
    }

    fn header(capacity: u64, extent: u64) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(LOG_MAGIC);
        h.extend_from_slice(&LOG_VERSION.to_le_bytes());
        h.extend_from_slice(&extent.to_le_bytes());
        h.extend_from_slice(&capacity.to_le_bytes());
        let crc = crc32c::crc32c(&h);
        h.extend_from_slice(&crc.to_le_bytes());
        h
    }

    fn lock(&self) -> MutexGuard<'_, LogState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn extent(&self) -> u64 {
        self.extent
    }

    fn span(&self, offset: u64, len: u64) -> (u64, u64) {
        if len == 0 || offset >= self.capacity {
            return (1, 0);
        }
        let end = offset.saturating_add(len).min(self.capacity);
        (offset / self.extent, (end - 1) / self.extent)
    }

    /// Records that `[offset, offset+len)` is about to change: returns once every extent it
    /// touches is durably marked. Cheap when they already are (no I/O).
    pub fn record(&self, offset: u64, len: u64) -> io::Result<LogGuard<'_>> {
        let (first, last) = self.span(offset, len);
        let need = {
            let mut st = self.lock();
            if let Some(e) = &st.broken {
                return Err(io::Error::other(format!("dirty log: {e}")));
            }
            for e in first..=last {
                st.in_flight[e as usize] += 1;
            }
            st.touch(first..=last)
        };
        let guard = LogGuard {
            log: self,
            first,
            last,
        };
        if let Some(g) = need {
            self.sync_to(g)?;
        }
        Ok(guard)
    }

    /// Makes generation `g` of the bits durable (or a later one). Whoever holds `durable`
    /// writes the newest bits for everyone waiting (group commit).
    fn sync_to(&self, g: u64) -> io::Result<()> {
        let mut durable = self.durable.lock().unwrap_or_else(|e| e.into_inner());
        if *durable >= g {
            return Ok(());
        }
        let (gen, bytes) = {
            let st = self.lock();
            (st.generation, st.on_disk.to_bytes())
        };
        let r = match &self.file {
            Some(f) => f
                .write_at(&bytes, LOG_HEADER)
                .and_then(|()| f.sync_data(SyncPoint::DirtyBits)),
            None => Ok(()),
        };
        match r {
            Ok(()) => {
                *durable = gen;
                let mut st = self.lock();
                st.synced = st.synced.max(gen);
                Ok(())
            }
            Err(e) => {
                let msg = format!("{}: {e}", self.path.display());
                self.lock().broken = Some(msg.clone());
                Err(io::Error::new(e.kind(), msg))
            }
        }
    }

    /// A checkpoint marker was queued: the changes from now on belong to the next epoch.
    /// Returns the boundary's number (1, 2, ...).
    pub fn epoch_boundary(&self) -> u64 {
        let mut st = self.lock();
        let cur = std::mem::replace(&mut st.cur, Bits::new(self.extents));
        st.prev = cur;
        st.boundaries += 1;
        st.boundaries
    }

    /// A checkpoint completed (and was recorded in the metadata): clears the extents nobody
    /// touched in this epoch or the one before and no change is still applying to. Writers of
    /// other extents never wait for this.
    pub fn checkpoint_done(&self) -> io::Result<()> {
        self.checkpoint_done_at(u64::MAX)
    }

    /// [`DirtyLog::checkpoint_done`] for the checkpoint whose marker was boundary `at`: clears
    /// only while at most one boundary followed it (the two epochs kept, `prev` and `cur`,
    /// then still hold every change since that marker); otherwise a later one will.
    pub fn checkpoint_done_at(&self, at: u64) -> io::Result<()> {
        let g = {
            let mut st = self.lock();
            if st.boundaries > at.saturating_add(1) {
                return Ok(());
            }
            let clear: Vec<u64> = st
                .on_disk
                .ones()
                .filter(|&e| !st.cur.get(e) && !st.prev.get(e) && st.in_flight[e as usize] == 0)
                .collect();
            if clear.is_empty() {
                return Ok(());
            }
            for e in clear {
                st.on_disk.clear(e);
            }
            st.generation += 1;
            st.generation
        };
        self.sync_to(g)
    }

    /// A fresh log at `path` (created, or reset when it exists: whatever it recorded before
    /// is forgotten) with no bit set, durable before it returns. A failover starts the
    /// failed-over disk's record this way (then [`DirtyLog::mark_ranges`]).
    pub fn create_reset(path: &Path, capacity: u64, extent: u64) -> io::Result<DirtyLog> {
        Self::create_reset_on(&*std_media(), path, capacity, extent)
    }

    /// [`DirtyLog::create_reset`] on `media`.
    pub fn create_reset_on(
        media: &dyn Media,
        path: &Path,
        capacity: u64,
        extent: u64,
    ) -> io::Result<DirtyLog> {
        {
            let f = media
                .open(path, Open::Truncate)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            f.sync_all(SyncPoint::DirtyBits)?;
        }
        let (log, ranges) = DirtyLog::open_on(media, path, capacity, extent, false)?;
        debug_assert!(ranges.is_empty());
        if let Some(dir) = path.parent() {
            let _ = media.sync_dir(dir, SyncPoint::DirtyDir);
        }
        Ok(log)
    }

    /// Durably sets the bits of every extent the ranges touch (one write and sync for all).
    /// They count as touched in the current epoch.
    pub fn mark_ranges(&self, ranges: &[(u64, u64)]) -> io::Result<()> {
        let g = {
            let mut st = self.lock();
            if let Some(e) = &st.broken {
                return Err(io::Error::other(format!("dirty log: {e}")));
            }
            let extents = ranges.iter().flat_map(|&(offset, len)| {
                let (first, last) = self.span(offset, len);
                first..=last
            });
            st.touch(extents)
        };
        match g {
            Some(g) => self.sync_to(g),
            None => Ok(()),
        }
    }

    /// The byte ranges recorded on disk, one per extent (the last one may be short).
    pub fn recorded_ranges(&self) -> Vec<(u64, u64)> {
        let st = self.lock();
        st.on_disk
            .ones()
            .map(|e| {
                (
                    e * self.extent,
                    self.extent.min(self.capacity - e * self.extent),
                )
            })
            .collect()
    }

    /// The recorded extents as one value (what PEER_DIRTY carries).
    pub fn extents(&self) -> DirtyExtents {
        let st = self.lock();
        DirtyExtents::from_extents(self.extent, self.capacity, st.on_disk.ones())
    }

    /// Reads the log at `path` without changing it: its extents, when the file is a valid log
    /// of a disk of `capacity` bytes; `None` when it is missing, damaged or of another disk
    /// size (the caller then has no usable record). A sync target of a failback sends this.
    pub fn peek(path: &Path, capacity: u64) -> io::Result<Option<DirtyExtents>> {
        let raw = match std::fs::read(path) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        };
        if raw.len() < 28 {
            return Ok(None);
        }
        let extent = u64::from_le_bytes(raw[12..20].try_into().unwrap_or_default());
        if !extent.is_power_of_two() || extent < 512 {
            return Ok(None);
        }
        let header = Self::header(capacity, extent);
        if raw.len() < LOG_HEADER as usize || raw[..header.len()] != header[..] {
            return Ok(None);
        }
        let extents = capacity.div_ceil(extent).max(1);
        let body = &raw[LOG_HEADER as usize..];
        let ones = (0..extents).filter(|&e| {
            body.get((e / 8) as usize)
                .is_some_and(|b| b & (1 << (e % 8)) != 0)
        });
        Ok(Some(DirtyExtents::from_extents(extent, capacity, ones)))
    }

    /// Extents recorded on disk (tests and status).
    pub fn recorded_bytes(&self) -> u64 {
        let st = self.lock();
        st.on_disk
            .ones()
            .map(|e| self.extent.min(self.capacity - e * self.extent))
            .sum()
    }
}

/// A set of dirty extents of a disk: `extent` bytes per bit, bit `i` of byte `i / 8` (least
/// significant first) for extent `i`. What the PEER_DIRTY frame carries; built only through
/// [`DirtyExtents::from_extents`] or the checked [`DirtyExtents::decode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyExtents {
    extent: u64,
    disk_size: u64,
    bits: Vec<u8>,
}

/// Why a PEER_DIRTY payload is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ExtentsError {
    #[error("extent size is not a power of two of at least 512 bytes")]
    BadExtent,
    #[error("disk size is 0")]
    EmptyDisk,
    #[error("bitmap length does not match the disk size and extent size")]
    BadLength,
    #[error("bits set past the last extent")]
    TrailingBits,
}

impl DirtyExtents {
    /// The extents `ones` (indexes below the disk's extent count; others are ignored).
    pub fn from_extents(extent: u64, disk_size: u64, ones: impl Iterator<Item = u64>) -> Self {
        let n = disk_size.div_ceil(extent.max(1)).max(1);
        let mut bits = vec![0u8; n.div_ceil(8) as usize];
        for e in ones.filter(|&e| e < n) {
            bits[(e / 8) as usize] |= 1 << (e % 8);
        }
        DirtyExtents {
            extent,
            disk_size,
            bits,
        }
    }

    /// Checks a received payload: a valid extent size, exactly one bit per extent (rounded up
    /// to a byte), nothing set past the last extent. `bits.len()` is bounded by the frame's
    /// payload limit before this is called.
    pub fn decode(extent: u64, disk_size: u64, bits: &[u8]) -> Result<Self, ExtentsError> {
        if !extent.is_power_of_two() || extent < 512 {
            return Err(ExtentsError::BadExtent);
        }
        if disk_size == 0 {
            return Err(ExtentsError::EmptyDisk);
        }
        let n = disk_size.div_ceil(extent);
        if n.div_ceil(8) != bits.len() as u64 {
            return Err(ExtentsError::BadLength);
        }
        if n % 8 != 0 {
            if let Some(last) = bits.last() {
                if last >> (n % 8) != 0 {
                    return Err(ExtentsError::TrailingBits);
                }
            }
        }
        Ok(DirtyExtents {
            extent,
            disk_size,
            bits: bits.to_vec(),
        })
    }

    pub fn extent(&self) -> u64 {
        self.extent
    }

    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// The encoded bitmap.
    pub fn bits(&self) -> &[u8] {
        &self.bits
    }

    /// The dirty byte ranges, one per extent, in disk order (the last one may be short).
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let n = self.disk_size.div_ceil(self.extent);
        (0..n)
            .filter(|&e| self.bits[(e / 8) as usize] & (1 << (e % 8)) != 0)
            .map(|e| {
                let off = e * self.extent;
                (off, self.extent.min(self.disk_size - off))
            })
    }

    /// Bytes the set extents cover.
    pub fn dirty_bytes(&self) -> u64 {
        self.ranges().map(|(_, l)| l).sum()
    }
}

/// A disk whose every change is durably recorded in a dirty log before it reaches the disk
/// (the same rule as the primary's [`DirtyLog::record`]): a failed-over secondary's writes, so
/// that it can later resync its old primary incrementally.
pub struct LoggedDisk {
    disk: Arc<dyn BlockDevice>,
    log: Arc<DirtyLog>,
}

impl LoggedDisk {
    pub fn new(disk: Arc<dyn BlockDevice>, log: Arc<DirtyLog>) -> Self {
        LoggedDisk { disk, log }
    }

    pub fn log(&self) -> &Arc<DirtyLog> {
        &self.log
    }

    fn change(&self, change: Change<&[u8]>) -> io::Result<()> {
        let (offset, len) = change.range();
        let _logged = self.log.record(offset, len)?;
        change.apply_to(&*self.disk)
    }
}

impl BlockDevice for LoggedDisk {
    fn capacity(&self) -> u64 {
        self.disk.capacity()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.disk.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.change(Change::Write { offset, data: buf })
    }

    fn flush(&self) -> io::Result<()> {
        self.disk.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.change(Change::Discard { offset, len })
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.change(Change::WriteZeroes { offset, len, unmap })
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

    #[test]
    fn dirty_log_records_before_writes_and_clears_lazily() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.colo-dirty");
        let cap = 10 * 4096 + 100;
        let (log, ranges) = DirtyLog::open(&path, cap, 4096, false).unwrap();
        assert!(ranges.is_empty());
        drop(log.record(5000, 4096).unwrap()); // extents 1 and 2
        let g = log.record(10 * 4096, 50).unwrap(); // extent 10 (short), still applying
        assert_eq!(log.recorded_bytes(), 2 * 4096 + 100);
        // Reopened as after a crash: the same extents.
        let (_again, ranges) = DirtyLog::open(&path, cap, 4096, true).unwrap();
        assert_eq!(ranges, vec![(4096, 4096), (8192, 4096), (40960, 100)]);
        // Checkpoint 1: everything was touched in this epoch, nothing is cleared.
        log.epoch_boundary();
        log.checkpoint_done().unwrap();
        assert_eq!(log.recorded_bytes(), 2 * 4096 + 100);
        // Checkpoint 2 with extent 1 touched again: 2 is cleared, 10 is still applying.
        drop(log.record(4096, 1).unwrap());
        log.epoch_boundary();
        log.checkpoint_done().unwrap();
        log.epoch_boundary();
        log.checkpoint_done().unwrap();
        assert_eq!(log.recorded_bytes(), 100);
        drop(g);
        log.epoch_boundary();
        log.checkpoint_done().unwrap();
        log.epoch_boundary();
        log.checkpoint_done().unwrap();
        assert_eq!(log.recorded_bytes(), 0);
        let (_again, ranges) = DirtyLog::open(&path, cap, 4096, true).unwrap();
        assert!(ranges.is_empty());
        // Another geometry, or a missing log for a disk with history: all dirty.
        let (_l, ranges) = DirtyLog::open(&path, cap, 8192, true).unwrap();
        assert_eq!(ranges.len(), 6);
        let (_l, ranges) = DirtyLog::open(&dir.path().join("x"), cap, 4096, true).unwrap();
        assert_eq!(ranges.len(), 11);
    }

    /// A checkpoint settled late (a COLO marker's DURABLE after more markers) clears the log
    /// only while its two epochs still hold every change since that marker.
    #[test]
    fn a_late_checkpoint_clears_only_what_its_marker_covers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.colo-dirty");
        let (log, _) = DirtyLog::open(&path, 1 << 20, 4096, false).unwrap();
        drop(log.record(0, 1).unwrap()); // extent 0, epoch of marker m1
        let m1 = log.epoch_boundary();
        drop(log.record(4096, 1).unwrap()); // extent 1, between m1 and m2 (not durable)
        let m2 = log.epoch_boundary();
        log.epoch_boundary(); // m3: prev = extent-less epoch, extent 1 is in neither set
        log.checkpoint_done_at(m1).unwrap();
        assert_eq!(
            log.recorded_bytes(),
            2 * 4096,
            "m1's checkpoint forgot m2's epoch"
        );
        log.checkpoint_done_at(m2).unwrap();
        assert_eq!(log.recorded_bytes(), 0);
    }

    /// A writer whose extent another writer marked a moment ago, but whose sync has not
    /// finished, must not go ahead before that bit is durable.
    #[test]
    fn a_bit_set_but_not_yet_synced_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.colo-dirty");
        let (log, _) = DirtyLog::open(&path, 1 << 20, 4096, false).unwrap();
        {
            // Writer A's first half: the bit is set in memory, its sync still to come.
            let mut st = log.lock();
            st.on_disk.set(3);
            st.generation += 1;
        }
        // Writer B to the same extent.
        let _guard = log.record(3 * 4096, 512).unwrap();
        let st = log.lock();
        assert_eq!(st.synced, st.generation, "B went ahead of A's sync");
        drop(st);
        // And the file says so.
        drop(_guard);
        let (_again, ranges) = DirtyLog::open(&path, 1 << 20, 4096, true).unwrap();
        assert!(ranges.contains(&(3 * 4096, 4096)), "{ranges:?}");
    }

    #[test]
    fn extents_round_trip_and_forged_payloads_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.colo-dirty");
        let cap = 10 * 4096 + 100; // 11 extents of 4 KiB, the last one short
        let (log, _) = DirtyLog::open(&path, cap, 4096, false).unwrap();
        log.mark_ranges(&[(0, 1), (5 * 4096, 8192), (cap - 1, 1)])
            .unwrap();
        let x = log.extents();
        assert_eq!(
            x.ranges().collect::<Vec<_>>(),
            vec![(0, 4096), (20480, 4096), (24576, 4096), (40960, 100)]
        );
        assert_eq!(DirtyLog::peek(&path, cap).unwrap(), Some(x.clone()));
        assert_eq!(
            DirtyLog::peek(&path, cap + 4096).unwrap(),
            None,
            "other size"
        );
        assert_eq!(DirtyLog::peek(&dir.path().join("none"), cap).unwrap(), None);
        let back = DirtyExtents::decode(x.extent(), x.disk_size(), x.bits()).unwrap();
        assert_eq!(back, x);
        // Forged or damaged: every one an error.
        assert_eq!(
            DirtyExtents::decode(4095, cap, x.bits()),
            Err(ExtentsError::BadExtent)
        );
        assert_eq!(
            DirtyExtents::decode(0, cap, x.bits()),
            Err(ExtentsError::BadExtent)
        );
        assert_eq!(
            DirtyExtents::decode(4096, 0, &[]),
            Err(ExtentsError::EmptyDisk)
        );
        assert_eq!(
            DirtyExtents::decode(4096, cap, &x.bits()[..1]),
            Err(ExtentsError::BadLength)
        );
        assert_eq!(
            DirtyExtents::decode(4096, cap, &[0, 0, 0]),
            Err(ExtentsError::BadLength)
        );
        assert_eq!(
            DirtyExtents::decode(4096, cap, &[0, 0x08]),
            Err(ExtentsError::TrailingBits)
        );
        assert_eq!(
            DirtyExtents::decode(512, u64::MAX, &[0; 8]),
            Err(ExtentsError::BadLength)
        );
        // A reset forgets everything.
        drop(log);
        let log = DirtyLog::create_reset(&path, cap, 4096).unwrap();
        assert_eq!(log.recorded_bytes(), 0);
        assert_eq!(
            DirtyLog::peek(&path, cap).unwrap().unwrap().dirty_bytes(),
            0
        );
    }

    #[test]
    fn a_logged_disk_records_before_it_writes() {
        struct Spy(Arc<DirtyLog>, std::sync::Mutex<Vec<bool>>);
        impl BlockDevice for Spy {
            fn capacity(&self) -> u64 {
                1 << 20
            }
            fn read_at(&self, _: &mut [u8], _: u64) -> io::Result<()> {
                Ok(())
            }
            fn write_at(&self, _: &[u8], offset: u64) -> io::Result<()> {
                let on = self
                    .0
                    .recorded_ranges()
                    .iter()
                    .any(|&(o, l)| o <= offset && offset < o + l);
                self.1.lock().unwrap().push(on);
                Ok(())
            }
            fn flush(&self) -> io::Result<()> {
                Ok(())
            }
            fn discard(&self, _: u64, _: u64) -> io::Result<()> {
                Ok(())
            }
            fn write_zeroes(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
                Ok(())
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.colo-dirty");
        let log = Arc::new(DirtyLog::create_reset(&path, 1 << 20, 4096).unwrap());
        let spy = Arc::new(Spy(log.clone(), Default::default()));
        let disk = LoggedDisk::new(spy.clone(), log.clone());
        disk.write_at(&[1; 512], 8192).unwrap();
        disk.write_zeroes(65536, 4096, false).unwrap();
        assert_eq!(*spy.1.lock().unwrap(), vec![true]);
        let on_disk = DirtyLog::peek(&path, 1 << 20).unwrap().unwrap();
        assert_eq!(
            on_disk.ranges().collect::<Vec<_>>(),
            vec![(8192, 4096), (65536, 4096)]
        );
    }
}
