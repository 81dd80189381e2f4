//! The Secondary VM's side of the layered disk: reads of the view (active, else the oldest
//! hidden layer holding the cluster, else base), writes into active (read-modify-write of
//! partial clusters), its flushes, and the [`BlockDevice`] it is served through.

use std::io;
use std::sync::PoisonError;

use super::{LayeredDisk, Layers, Source, Stage, ZERO_CHUNK};
use crate::storage::durable::{DurableFile, SyncPoint};
use crate::storage::{check_range, fallocate, BlockDevice, Change};

impl LayeredDisk {
    /// Reads the SVM's view, one I/O per run of clusters with the same source.
    pub(super) fn read_view(&self, layers: &Layers, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let cs = self.cluster_size;
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let src = layers.source(pos / cs);
            let mut run_end = ((pos / cs + 1) * cs).min(end);
            while run_end < end && layers.source(run_end / cs) == src {
                run_end = (run_end + cs).min(end);
            }
            let dst = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
            match layers.layer(src) {
                Some(l) => l.file.read_at(dst, pos)?,
                None => self.base.read_at(dst, pos)?,
            }
            pos = run_end;
        }
        Ok(())
    }

    /// Reads one cluster of the view from `src` into `buf`.
    pub(super) fn read_cluster(
        &self,
        layers: &Layers,
        src: Source,
        cluster: u64,
        buf: &mut Vec<u8>,
    ) -> io::Result<()> {
        let (start, len) = self.span(cluster);
        buf.resize(len, 0);
        match layers.layer(src) {
            Some(l) => l.file.read_at(buf, start),
            None => self.base.read_at(buf, start),
        }
    }

    /// An SVM write, write-zeroes or discard.
    pub(super) fn svm_change(&self, change: Change<&[u8]>) -> io::Result<()> {
        let (offset, len) = change.range();
        check_range(self.capacity, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if matches!(self.read_state().stage, Stage::Standalone) {
            // Standalone for good: no lock needed.
            return self.apply_to_base(change);
        }
        let mut st = self.write_state();
        match &mut st.stage {
            Stage::Standalone => {
                drop(st);
                self.apply_to_base(change)
            }
            Stage::Committing(layers) => {
                // Committing: fold the touched clusters into base first, then write through.
                let mut buf = Vec::new();
                for c in self.clusters(offset, len) {
                    self.commit_cluster(layers, c, &mut buf)?;
                }
                self.apply_to_base(change)
            }
            Stage::Buffering(layers) => self.write_active(layers, change),
        }
    }

    /// A change of the SVM that reaches base: through the failed-over disk's device (held
    /// for the whole change, see [`LayeredDisk::set_through`]) or directly.
    pub(super) fn apply_to_base(&self, change: Change<&[u8]>) -> io::Result<()> {
        let through = self.through.read().unwrap_or_else(PoisonError::into_inner);
        match &*through {
            Some(dev) => change.apply_to(&**dev),
            None => change.apply_to(&*self.base),
        }
    }

    /// Applies an SVM change to active. The partial clusters at both ends that active does not
    /// hold yet are first filled from the view (hidden, else base); then the change is applied
    /// in one I/O and every touched cluster becomes present.
    pub(super) fn write_active(
        &self,
        layers: &mut Layers,
        change: Change<&[u8]>,
    ) -> io::Result<()> {
        let (offset, len) = change.range();
        let range = self.clusters(offset, len);
        let end = offset + len;
        let mut buf = Vec::new();
        for c in [range.start, range.end - 1] {
            let (start, clen) = self.span(c);
            let covered = offset <= start && end >= start + clen as u64;
            if covered || layers.active.has(c) {
                continue;
            }
            let src = layers.source(c);
            self.read_cluster(layers, src, c, &mut buf)?;
            layers.active.file.write_at(&buf, start)?;
            layers.active.add(c)?;
        }
        match change {
            Change::Write { data, .. } => layers.active.file.write_at(data, offset)?,
            // Discard on the SVM side reads back as zeros too: deterministic.
            Change::WriteZeroes { .. } | Change::Discard { .. } => {
                zero_file_range(&*layers.active.file, offset, len)?
            }
            Change::Flush => {}
        }
        for c in range {
            layers.active.add(c)?;
        }
        Ok(())
    }

    /// Makes the SVM's completed writes durable, with their index records; during a failover,
    /// also the record of what was committed (after base, see [`Self::commit_cluster`]).
    pub(super) fn flush_layers(&self) -> io::Result<()> {
        let mut st = self.write_state();
        match &mut st.stage {
            Stage::Buffering(layers) => {
                for h in &mut layers.hidden {
                    if h.layer.has_pending() {
                        h.layer.sync()?;
                    }
                }
                layers.active.sync()
            }
            Stage::Committing(layers) => {
                self.flush_base(SyncPoint::BaseCommit)?;
                layers.active.sync()
            }
            Stage::Standalone => Ok(()),
        }
    }
}

impl BlockDevice for LayeredDisk {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.capacity, offset, buf.len() as u64)?;
        let st = self.read_state();
        match st.stage.layers() {
            Some(layers) => self.read_view(layers, buf, offset),
            None => {
                drop(st);
                self.base.read_at(buf, offset)
            }
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.svm_change(Change::Write { offset, data: buf })
    }

    fn flush(&self) -> io::Result<()> {
        self.flush_layers()?;
        let through = self.through.read().unwrap_or_else(PoisonError::into_inner);
        match &*through {
            Some(dev) => self.media.flush_device(&**dev, SyncPoint::BaseSvmFlush),
            None => self.flush_base(SyncPoint::BaseSvmFlush),
        }
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.svm_change(Change::Discard { offset, len })
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.svm_change(Change::WriteZeroes { offset, len, unmap })
    }
}

/// Makes `[offset, offset + len)` of a layer file read back as zeros, freeing the blocks when
/// the file system can.
fn zero_file_range(file: &dyn DurableFile, offset: u64, len: u64) -> io::Result<()> {
    match file.punch_hole(offset, len) {
        Err(e) if fallocate::is_unsupported(&e) => {}
        r => return r,
    }
    let zeros = vec![0u8; ZERO_CHUNK.min(len as usize)];
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let n = (end - pos).min(zeros.len() as u64) as usize;
        file.write_at(&zeros[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}
