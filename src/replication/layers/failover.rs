//! Failover: the Secondary VM's view committed to base cluster by cluster while it keeps
//! running, recorded so that a restarted secondary resumes it; the device the SVM's changes go
//! through afterwards.

use std::io;
use std::sync::{Arc, PoisonError, RwLockWriteGuard};

use super::state::SavedStage;
use super::{LayerError, LayeredDisk, Layers, Source, Stage, COMMIT_BATCH};
use crate::replication::dirty::{DirtyLog, LoggedDisk};
use crate::storage::durable::SyncPoint;
use crate::storage::BlockDevice;

impl LayeredDisk {
    /// Failover: commits the SVM's view to base and turns the disk into plain `base`.
    ///
    /// The primary stream and checkpoints are refused from the start, which the state file
    /// records. Every cluster held by a layer gets its view (active if present, else the oldest
    /// hidden layer holding it) written to base, a small batch of clusters per lock acquisition,
    /// so the SVM keeps being served meanwhile and sees the same content at every step. With no
    /// SVM writes this rolls the disk back to the last checkpoint. Base is synced, the state
    /// file says standalone, the layers are dropped, and from then on SVM I/O goes straight to
    /// base.
    ///
    /// Idempotent; after an I/O error or a restart, calling it again resumes the commit.
    pub fn failover(&self) -> Result<(), LayerError> {
        self.failover_logged(None)
    }

    /// [`LayeredDisk::failover`] that keeps a dirty record of the failed-over disk in `log`:
    /// before the commit writes its first cluster, the range of every cluster any layer holds
    /// (hidden ones it rolls back, active ones it commits) is durably set in the log, and the
    /// SVM's changes reach base through a [`LoggedDisk`] over it (recorded before written)
    /// from then on. On a resumed commit the clusters still buffered are recorded again
    /// (idempotent); those committed before were recorded by the first attempt.
    pub fn failover_logged(&self, log: Option<Arc<DirtyLog>>) -> Result<(), LayerError> {
        if !self.begin_failover(log, false)? {
            return Ok(());
        }
        let per_batch = (COMMIT_BATCH / self.cluster_size).max(1) as usize;
        let mut buf = Vec::new();
        while !self.commit_batch(per_batch, &mut buf)? {
            crate::faults::point("failover-batch");
            // Let waiting SVM requests have the lock before the next batch.
            std::thread::yield_now();
        }
        self.flush_base(SyncPoint::BaseFailoverEnd)?;
        let old = {
            let mut st = self.write_state();
            match &st.stage {
                Stage::Committing(l) if l.is_empty() => {
                    self.saved(st.group, st.epoch, SavedStage::Standalone, None)
                        .store(&*self.media, &self.dir)?;
                    match std::mem::replace(&mut st.stage, Stage::Standalone) {
                        Stage::Committing(l) => Some(l),
                        _ => None,
                    }
                }
                _ => None,
            }
        };
        if let Some(mut old) = old {
            old.discard_files();
            self.reap(old);
            log::info!("failover: done, serving the disk directly");
        }
        Ok(())
    }

    /// Refuses the primary stream from now on (recorded in the state file). Returns false if
    /// there is nothing to commit (a previous failover completed). With a log, the layers'
    /// ranges are recorded in it and the SVM's changes go through it, before the state file
    /// says committing (a crash in between: still buffering, the log holds extra bits).
    pub(super) fn begin_failover(
        &self,
        log: Option<Arc<DirtyLog>>,
        force: bool,
    ) -> Result<bool, LayerError> {
        let mut st = self.write_state();
        if st.needs_resync && !force && matches!(st.stage, Stage::Buffering(_)) {
            return Err(LayerError::NeedsResync);
        }
        if let Some(log) = log {
            if let Some(layers) = st.stage.layers() {
                let mut ranges: Vec<(u64, u64)> = Vec::new();
                let mut clusters: Vec<u64> = layers
                    .all()
                    .flat_map(|l| l.clusters.iter().copied())
                    .collect();
                clusters.sort_unstable();
                clusters.dedup();
                for c in clusters {
                    let (start, len) = self.span(c);
                    match ranges.last_mut() {
                        Some((o, l)) if *o + *l == start => *l += len as u64,
                        _ => ranges.push((start, len as u64)),
                    }
                }
                log::info!(
                    "failover: {} bytes of buffered clusters recorded in the dirty log {}",
                    ranges.iter().map(|r| r.1).sum::<u64>(),
                    log.path().display()
                );
                log.mark_ranges(&ranges)?;
            }
            crate::faults::point("failover-logged");
            let logged: Arc<dyn BlockDevice> = Arc::new(LoggedDisk::new(self.base.clone(), log));
            *self.through_mut() = Some(logged);
        }
        let (needs_resync, group, epoch) = (st.needs_resync, st.group, st.epoch);
        match &mut st.stage {
            Stage::Buffering(l) => {
                // The commit reads the layers after any crash: durable first, then recorded
                // (a restarted secondary resumes the commit).
                l.sync_hidden()?;
                // (`"open": null`: only a buffering disk is recorded open.)
                self.saved(group, epoch, SavedStage::Committing, Some(l))
                    .needing_resync(needs_resync)
                    .store(&*self.media, &self.dir)?;
                st.open = false;
                if let Stage::Buffering(l) = std::mem::replace(&mut st.stage, Stage::Standalone) {
                    st.stage = Stage::Committing(l);
                }
                log::info!("failover: committing the secondary's layers to the disk");
                Ok(true)
            }
            Stage::Committing(_) => Ok(true),
            Stage::Standalone => Ok(false),
        }
    }

    /// Commits up to `max` clusters, lowest first, under one lock acquisition. While
    /// committing the layers only shrink. Returns true when nothing is left.
    pub(super) fn commit_batch(&self, max: usize, buf: &mut Vec<u8>) -> io::Result<bool> {
        let mut st = self.write_state();
        let Stage::Committing(layers) = &mut st.stage else {
            return Ok(true); // a concurrent failover() finished the job
        };
        for _ in 0..max {
            match layers.first_cluster() {
                Some(c) => self.commit_cluster(layers, c, buf)?,
                None => return Ok(true),
            }
        }
        Ok(layers.is_empty())
    }

    /// Commits at most `max` clusters of a started failover (the power-loss tests stop a
    /// failover half way, as a crash or a slow commit does).
    #[cfg(test)]
    pub(crate) fn commit_some(&self, max: usize) -> io::Result<bool> {
        self.commit_batch(max, &mut Vec::new())
    }

    pub(super) fn through_mut(&self) -> RwLockWriteGuard<'_, Option<Arc<dyn BlockDevice>>> {
        self.through.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Routes the SVM's changes to base through `dev` from now on (a failed-over disk only:
    /// its dirty log's [`LoggedDisk`], or a promoted primary). Waits until the changes in
    /// flight are done and holds new ones back meanwhile; returns the previous device.
    pub fn set_through(
        &self,
        dev: Arc<dyn BlockDevice>,
    ) -> Result<Option<Arc<dyn BlockDevice>>, LayerError> {
        if !self.is_failed_over() {
            return Err(LayerError::NotFailedOver);
        }
        Ok(self.through_mut().replace(dev))
    }

    /// Like [`LayeredDisk::set_through`], with the new device made by `make` while the SVM's
    /// changes are held back (it sees the current one): what `make` reads of the disk's state
    /// cannot be changed by a write racing with the switch.
    pub fn replace_through(
        &self,
        make: impl FnOnce(Option<&Arc<dyn BlockDevice>>) -> io::Result<Arc<dyn BlockDevice>>,
    ) -> Result<(), LayerError> {
        if !matches!(self.read_state().stage, Stage::Standalone) {
            return Err(LayerError::FailoverUnfinished);
        }
        let mut through = self.through_mut();
        let dev = make(through.as_ref())?;
        *through = Some(dev);
        Ok(())
    }

    /// Starts a failover without committing anything yet: the stream is refused from now on
    /// and, with `log`, the buffered ranges are recorded in it and the SVM's changes go
    /// through it (see [`LayeredDisk::failover_logged`], which continues from here).
    ///
    /// A disk that [needs a resync](super::LayerStats::needs_resync) is refused unless `force`.
    pub fn prepare_failover(
        &self,
        log: Option<Arc<DirtyLog>>,
        force: bool,
    ) -> Result<(), LayerError> {
        self.begin_failover(log, force).map(drop)
    }

    /// The device the SVM's changes go through, if any.
    pub fn through(&self) -> Option<Arc<dyn BlockDevice>> {
        self.through
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Failover step: writes the view of `cluster` to base and drops it from every layer.
    pub(super) fn commit_cluster(
        &self,
        layers: &mut Layers,
        cluster: u64,
        buf: &mut Vec<u8>,
    ) -> io::Result<()> {
        let src = layers.source(cluster);
        if src != Source::Base {
            self.read_cluster(layers, src, cluster, buf)?;
            self.base.write_at(buf, cluster * self.cluster_size)?;
        }
        layers.remove(cluster);
        // Logged at the next flush, after base: an SVM write flushed over the committed cluster
        // is never overwritten by a resumed failover.
        layers.active.note_removed(cluster);
        Ok(())
    }
}
