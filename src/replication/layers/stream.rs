//! The primary's stream on the secondary's disk: copy-before-write of every cluster a change
//! touches into the newest hidden layer (data, then index records, not synced: see the module
//! comment of `layers` and docs/flush-policy.md), then the change on base; a FLUSH syncs base.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::layer::{Kind, Layer};
use super::state::{SavedHidden, SavedStage};
use super::{replication_over, BatchError, GroupRecord, Hidden, LayeredDisk, Stage, COPY_CHUNK};
use crate::storage::durable::SyncPoint;
use crate::storage::{check_range, Change, RawImage};

impl LayeredDisk {
    /// Applies one change of the primary's stream (see [`LayeredDisk::apply_primary_batch`]).
    pub fn apply_primary(&self, change: &Change<&[u8]>) -> io::Result<()> {
        self.apply_primary_batch(std::slice::from_ref(change))
            .map_err(|e| e.error)
    }

    /// Applies changes of the primary's stream, in order: copy-before-write into the newest
    /// hidden layer of every cluster they touch, one sync of that layer, then the changes on
    /// base. A discard becomes a write-zeroes with unmap on base, so that base stays
    /// byte-identical to the primary's raw image, which reads zeros after a discard. A flush
    /// makes everything before it durable on base.
    ///
    /// On an error, [`BatchError::applied`] changes (a prefix) were applied: exactly those
    /// before an invalid one; after an I/O error, those before the failing run (a few after
    /// them may have reached base too, behind their saved originals). Fails once `failover()`
    /// has been called.
    pub fn apply_primary_batch(&self, changes: &[Change<&[u8]>]) -> Result<(), BatchError> {
        // Validate first: the changes before a bad one are still applied.
        let valid = changes
            .iter()
            .position(|c| {
                let (o, l) = c.range();
                check_range(self.capacity, o, l).is_err()
            })
            .unwrap_or(changes.len());
        let mut done = 0;
        for run in changes[..valid].split_inclusive(|c| matches!(c, Change::Flush)) {
            let fail = |error| BatchError {
                applied: done,
                error,
            };
            let (writes, flush) = match run.split_last() {
                Some((Change::Flush, rest)) => (rest, true),
                _ => (run, false),
            };
            self.apply_writes(writes).map_err(fail)?;
            if flush {
                if !matches!(self.read_state().stage, Stage::Buffering(_)) {
                    return Err(fail(replication_over()));
                }
                self.flush_base(SyncPoint::BasePrimaryFlush).map_err(fail)?;
            }
            done += run.len();
        }
        match changes.get(valid) {
            Some(bad) => {
                let (o, l) = bad.range();
                let error = check_range(self.capacity, o, l)
                    .err()
                    .unwrap_or_else(|| io::Error::other("invalid change"));
                Err(BatchError {
                    applied: valid,
                    error,
                })
            }
            None => Ok(()),
        }
    }

    /// Copy-before-write and base writes of validated, flush-free changes.
    pub(super) fn apply_writes(&self, writes: &[Change<&[u8]>]) -> io::Result<()> {
        if writes.is_empty() {
            return Ok(());
        }
        let mut st = self.write_state();
        let epoch = st.epoch;
        if st.group.prepared.is_some() || !st.open {
            // Base is about to differ from a prepared group checkpoint, and the layers are
            // about to hold unsynced changes: both are recorded first, durably (a crash after
            // the change must not leave the prepared record standing, nor the layers trusted).
            let group = GroupRecord {
                prepared: None,
                ..st.group
            };
            let Stage::Buffering(layers) = &st.stage else {
                return Err(replication_over());
            };
            self.saved(group, epoch, SavedStage::Buffering, Some(layers))
                .needing_resync(st.needs_resync)
                .store(&*self.media, &self.dir)?;
            st.group = group;
            st.open = true;
        }
        let (group, needs_resync) = (st.group, st.needs_resync);
        let Stage::Buffering(layers) = &mut st.stage else {
            return Err(replication_over());
        };
        if !layers.pending.is_empty() {
            // The first change after tentative cuts: their rollback layer starts here.
            let mut fresh = Layer::create(
                &self.media,
                self.new_hidden_file(),
                Kind::Hidden,
                self.capacity,
                self.owner,
            )?;
            let mut saved = self
                .saved(group, epoch, SavedStage::Buffering, Some(layers))
                .needing_resync(needs_resync);
            saved.hidden.push(SavedHidden {
                file: fresh.file_name(),
                marks: layers.pending.clone(),
            });
            // Named first; on an error nothing changed (the file goes with `fresh`).
            saved.store(&*self.media, &self.dir)?;
            fresh.discard_on_drop = false;
            let marks = std::mem::take(&mut layers.pending);
            layers.hidden.push(Hidden {
                layer: fresh,
                marks,
            });
        }
        let hidden = layers.newest_hidden();
        for c in writes {
            let (offset, len) = c.range();
            self.save_originals(hidden, offset, len)?;
        }
        // The originals and their records are written (not synced) before base: a process
        // crash finds them in the page cache; a power loss drops the open layers anyway.
        hidden.write_records()?;
        for c in writes {
            match *c {
                Change::Write { offset, data } => self.base.write_at(data, offset)?,
                // (a raw image's fallocate refuses empty ranges)
                Change::WriteZeroes { len: 0, .. } | Change::Discard { len: 0, .. } => {}
                Change::WriteZeroes { offset, len, unmap } => {
                    self.base.write_zeroes(offset, len, unmap)?
                }
                Change::Discard { offset, len } => self.base.write_zeroes(offset, len, true)?,
                Change::Flush => {}
            }
        }
        Ok(())
    }

    /// Copy-before-write: saves in `hidden` the current base content of every cluster of the
    /// range that it does not hold yet. Never touches a cluster it already holds.
    pub(super) fn save_originals(
        &self,
        hidden: &mut Layer,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let cs = self.cluster_size;
        let range = self.clusters(offset, len);
        let max_run = (COPY_CHUNK / cs).max(1);
        let mut buf = Vec::new();
        let mut c = range.start;
        while c < range.end {
            if hidden.has(c) {
                c += 1;
                continue;
            }
            let mut end = c + 1;
            while end < range.end && end - c < max_run && !hidden.has(end) {
                end += 1;
            }
            let start = c * cs;
            let stop = (end * cs).min(self.capacity);
            match &self.cbw_reader {
                Some(f) => save_sparse_originals(hidden, f, start, stop, cs, &mut buf)?,
                None => {
                    buf.resize((stop - start) as usize, 0);
                    self.base.read_at(&mut buf, start)?;
                    hidden.save(&buf, c, cs as usize)?;
                }
            }
            c = end;
        }
        Ok(())
    }
}

/// Saves in `hidden` the originals of the clusters `[start, stop)` (`start` cluster-aligned,
/// `stop` aligned or the capacity), read from base through `f`, without reading the clusters
/// that lie wholly in a hole of base: their originals are zeros. On a fresh sparse disk that
/// is nearly every cluster a write touches first, and reading a hole is not free (the kernel
/// zero-fills and caches a page for every 4 KiB of it).
fn save_sparse_originals(
    hidden: &mut Layer,
    f: &File,
    start: u64,
    stop: u64,
    cs: u64,
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    let mut pos = start;
    while pos < stop {
        let data = RawImage::data_from(f, pos, stop);
        // The clusters wholly before the first data are zeros.
        let hole_end = if data >= stop {
            stop
        } else {
            pos + (data - pos) / cs * cs
        };
        if hole_end > pos {
            hidden.save_zeroes(pos / cs, (hole_end - pos) as usize, cs as usize)?;
            pos = hole_end;
            continue;
        }
        // `pos`'s cluster holds data: read up to the end of the cluster where the data ends.
        let data_end = RawImage::hole_from(f, data, stop);
        let read_end = (data_end.div_ceil(cs) * cs).max(pos + cs).min(stop);
        buf.resize((read_end - pos) as usize, 0);
        f.read_exact_at(buf, pos)?;
        hidden.save(buf, pos / cs, cs as usize)?;
        pos = read_end;
    }
    Ok(())
}
