//! Checkpoints and cuts: the points where the Secondary VM's view becomes the primary's disk
//! and layers are dropped (a checkpoint, a committed group checkpoint, a committed COLO cut),
//! the COLO markers that make tentative cuts, and the group prepare record.

use std::io;

use super::state::{SavedHidden, SavedStage, SavedState};
use super::{
    replication_over, GroupCommitted, GroupPrepared, GroupRecord, LayeredDisk, Layers,
    Mark, Stage,
};
use crate::storage::durable::SyncPoint;

impl LayeredDisk {
    /// Checkpoint: base now equals the primary's disk and becomes the SVM's view; every layer
    /// is dropped. Base is synced, fresh empty layer files are swapped in and named in the state
    /// file, and the old files are unlinked by a background thread, so the call costs the same
    /// whatever the amount of buffered data.
    ///
    /// Fails once `failover()` has been called.
    pub fn checkpoint(&self) -> io::Result<()> {
        self.cut(None, None, None)
    }

    /// [`LayeredDisk::checkpoint`], naming the new epoch (the primary's number for it).
    pub fn checkpoint_as(&self, epoch: u64) -> io::Result<()> {
        self.cut(None, Some(epoch), None)
    }

    /// The consistency-group record (docs/consistency-groups.md) and the epoch, read together.
    pub fn group(&self) -> (u64, GroupRecord) {
        let st = self.read_state();
        (st.epoch, st.group)
    }

    /// Records, durably, that base is the disk of group checkpoint `group` (the primary's
    /// stream applied up to `applied_seq`; the caller guarantees that nothing else is being
    /// applied meanwhile). Replaces an earlier prepared record. Fails once `failover()` has
    /// been called.
    pub fn group_prepare(&self, group: u64, applied_seq: u64) -> io::Result<GroupPrepared> {
        // The record says base *is* that disk: base is made durable before the record can be
        // (found by the power-loss tests: a record over unsynced stream changes let a
        // restarted secondary commit a group checkpoint that lacks them).
        self.flush_base(SyncPoint::BaseGroupPrepare)?;
        let mut st = self.write_state();
        let (needs_resync, epoch, group_before) = (st.needs_resync, st.epoch, st.group);
        let Stage::Buffering(layers) = &mut st.stage else {
            return Err(replication_over());
        };
        // A prepared participant commits or rolls back after any crash: its layers are
        // trusted then, so they are made durable before the record says so.
        layers.sync_hidden()?;
        let prepared = GroupPrepared {
            group,
            epoch,
            applied_seq,
        };
        let record = GroupRecord {
            prepared: Some(prepared),
            ..group_before
        };
        let mut saved = self.saved(record, epoch, SavedStage::Buffering, Some(layers));
        saved.open = None;
        saved.needs_resync = needs_resync;
        saved.store(&*self.media, &self.dir)?;
        st.group = record;
        st.open = false;
        Ok(prepared)
    }

    /// Commits the prepared group checkpoint `group`: a [`LayeredDisk::checkpoint`] that
    /// happens only if the disk is still prepared for it at this epoch (checked under the same
    /// lock as the stream's writes); otherwise an `InvalidInput` error and nothing changed.
    /// Returns the new epoch.
    pub fn checkpoint_group(&self, group: u64) -> io::Result<u64> {
        self.cut(None, None, Some(group))?;
        Ok(self.read_state().epoch)
    }

    /// COLO: the primary's device stopped at `mark` while the SVM is stopped: a tentative
    /// cut. The disk can both still roll back to the last checkpoint (if this checkpoint is
    /// abandoned) and later be cut here ([`LayeredDisk::commit_mark`]): the next stream change
    /// starts a new hidden layer. Base is synced first, so everything before the marker is
    /// durable when the primary hears that it was applied; nothing else is written (a COLO
    /// checkpoint pause waits for this).
    pub fn mark(&self, mark: Mark) -> io::Result<()> {
        if !matches!(self.read_state().stage, Stage::Buffering(_)) {
            return Err(replication_over());
        }
        self.flush_base(SyncPoint::BaseMarker)?;
        let mut st = self.write_state();
        let Stage::Buffering(layers) = &mut st.stage else {
            return Err(replication_over());
        };
        layers.pending.push(mark);
        Ok(())
    }

    /// COLO: the SVM runs the primary's state of the tentative cut `epoch` ([`LayeredDisk::mark`]):
    /// the checkpoint is complete. The active layer and the hidden layers older than the cut
    /// are dropped; the view is now the primary's disk at the cut.
    pub fn commit_mark(&self, epoch: u64) -> io::Result<()> {
        self.cut(Some(epoch), Some(epoch), None)
    }

    /// Drops the active layer and the hidden layers before the cut at `mark` (all of them
    /// without one, or when the cut is still pending: no change came after it); the new epoch
    /// is `epoch` (the next one without). With `require_group`, only if the disk is prepared
    /// for that group checkpoint at the current epoch. A full cut while prepared makes the
    /// prepared group checkpoint the committed one; a COLO cut drops the prepared record.
    pub(super) fn cut(
        &self,
        mark: Option<u64>,
        epoch: Option<u64>,
        require_group: Option<u64>,
    ) -> io::Result<()> {
        if !matches!(self.read_state().stage, Stage::Buffering(_)) {
            return Err(replication_over());
        }
        // What the cut keeps must be durable before the layers holding the rest go.
        self.flush_base(SyncPoint::BaseCheckpoint)?;
        // Create the new files before taking the lock, so the swap is all the lock covers.
        let Layers {
            active: mut fresh_active,
            hidden: fresh_hidden,
            ..
        } = self.create_layers()?;
        let mut st = self.write_state();
        let epoch_before = st.epoch;
        if let Some(g) = require_group {
            match st.group.prepared {
                Some(p) if p.group == g && p.epoch == epoch_before => {}
                other => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "not prepared for group checkpoint {g} at epoch {epoch_before} \
                             (prepared: {other:?})"
                        ),
                    ))
                }
            }
        }
        let group_before = st.group;
        let Stage::Buffering(layers) = &mut st.stage else {
            return Err(replication_over());
        };
        let has = |marks: &[Mark], e: u64| marks.iter().any(|m| m.epoch == e);
        let keep_from = match mark {
            None => layers.hidden.len(),
            Some(e) if has(&layers.pending, e) => layers.hidden.len(),
            Some(e) => layers
                .hidden
                .iter()
                .position(|h| has(&h.marks, e))
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("no tentative cut for epoch {e}"),
                    )
                })?,
        };
        // This cut and the later ones stay possible cuts: QEMU may give the SVM the state of
        // the same point again (the PVM stayed stopped), or of a later stop.
        let from_cut = |marks: &[Mark]| -> Vec<Mark> {
            match mark {
                Some(e) => marks.iter().skip_while(|m| m.epoch != e).cloned().collect(),
                None => Vec::new(),
            }
        };
        // A cut at a pending marker: the fresh first layer starts there, with the pending
        // markers from the cut on (no change came between them).
        let cut_pending = mark.is_some_and(|e| has(&layers.pending, e));
        let fresh_marks = if cut_pending {
            from_cut(&layers.pending)
        } else {
            Vec::new()
        };
        let epoch = epoch.unwrap_or(epoch_before + 1);
        let group = match (mark, group_before.prepared) {
            (None, Some(p)) if p.epoch == epoch_before => GroupRecord {
                committed: Some(GroupCommitted {
                    group: p.group,
                    epoch,
                }),
                prepared: None,
            },
            _ => GroupRecord {
                prepared: None,
                ..group_before
            },
        };
        // The layers after the cut, recorded first: on an error nothing has changed.
        let kept_names: Vec<SavedHidden> = if keep_from < layers.hidden.len() {
            layers.hidden[keep_from..]
                .iter()
                .enumerate()
                .map(|(i, h)| SavedHidden {
                    file: h.layer.file_name(),
                    // The kept layer becomes the epoch's first.
                    marks: if i == 0 {
                        from_cut(&h.marks)
                    } else {
                        h.marks.clone()
                    },
                })
                .collect()
        } else {
            fresh_hidden
                .iter()
                .map(|h| SavedHidden {
                    file: h.layer.file_name(),
                    marks: fresh_marks.clone(),
                })
                .collect()
        };
        let mut saved = SavedState::new(self.capacity, self.cluster_size);
        saved.disk_id = (self.owner != 0).then(|| format!("{:032x}", self.owner));
        saved.epoch = epoch;
        saved.active = Some(fresh_active.file_name());
        saved.hidden = kept_names;
        saved.group = group;
        saved.open = Some(self.media.boot_tag());
        saved.store(&*self.media, &self.dir)?;

        let mut kept = layers.hidden.split_off(keep_from);
        let mut unused = Vec::new();
        if kept.is_empty() {
            kept = fresh_hidden;
            kept[0].marks = fresh_marks;
        } else {
            unused = fresh_hidden;
            kept[0].marks = from_cut(&kept[0].marks);
        }
        // Pending markers after a cut in a layer are newer than it: they stay pending.
        if mark.is_none() || cut_pending {
            layers.pending.clear();
        }
        for h in &mut kept {
            h.layer.discard_on_drop = false;
        }
        fresh_active.discard_on_drop = false;
        let mut old = Layers {
            active: std::mem::replace(&mut layers.active, fresh_active),
            hidden: std::mem::replace(&mut layers.hidden, kept),
            pending: Vec::new(),
        };
        st.epoch = epoch;
        st.group = group;
        st.open = true;
        st.needs_resync = false;
        drop(st);
        old.hidden.append(&mut unused);
        old.discard_files();
        self.reap(old);
        Ok(())
    }
}
