//! Checkpoints and cuts: the points where the Secondary VM's view becomes the primary's disk
//! and layers are dropped (a checkpoint, a committed group checkpoint, a committed COLO cut),
//! the COLO markers that make tentative cuts, and the group prepare record.

use super::state::{SavedHidden, SavedStage, SavedState};
use super::{
    GroupCommitted, GroupPrepared, GroupRecord, LayerError, LayeredDisk, Layers, Mark, Stage,
};
use crate::storage::durable::SyncPoint;

impl LayeredDisk {
    /// Checkpoint: base now equals the primary's disk and becomes the SVM's view; every layer
    /// is dropped. Base is synced, fresh empty layer files are swapped in and named in the state
    /// file, and the old files are unlinked by a background thread, so the call costs the same
    /// whatever the amount of buffered data.
    ///
    /// Fails once `failover()` has been called.
    pub fn checkpoint(&self) -> Result<(), LayerError> {
        self.cut(Cut::Checkpoint { epoch: None })
    }

    /// [`LayeredDisk::checkpoint`], naming the new epoch (the primary's number for it).
    pub fn checkpoint_as(&self, epoch: u64) -> Result<(), LayerError> {
        self.cut(Cut::Checkpoint { epoch: Some(epoch) })
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
    pub fn group_prepare(&self, group: u64, applied_seq: u64) -> Result<GroupPrepared, LayerError> {
        // The record says base *is* that disk: base is made durable before the record can be
        // (found by the power-loss tests: a record over unsynced stream changes let a
        // restarted secondary commit a group checkpoint that lacks them).
        self.flush_base(SyncPoint::BaseGroupPrepare)?;
        let mut st = self.write_state();
        let (needs_resync, epoch, group_before) = (st.needs_resync, st.epoch, st.group);
        let Stage::Buffering(layers) = &mut st.stage else {
            return Err(LayerError::ReplicationOver);
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
        self.saved(record, epoch, SavedStage::Buffering, Some(layers))
            .synced()
            .needing_resync(needs_resync)
            .store(&*self.media, &self.dir)?;
        st.group = record;
        st.open = false;
        Ok(prepared)
    }

    /// Commits the prepared group checkpoint `group`: a [`LayeredDisk::checkpoint`] that
    /// happens only if the disk is still prepared for it at this epoch (checked under the same
    /// lock as the stream's writes); otherwise [`LayerError::NotPrepared`] and nothing changed.
    /// Returns the new epoch.
    pub fn checkpoint_group(&self, group: u64) -> Result<u64, LayerError> {
        self.cut(Cut::Group(group))?;
        Ok(self.read_state().epoch)
    }

    /// COLO: the primary's device stopped at `mark` while the SVM is stopped: a tentative
    /// cut. The disk can both still roll back to the last checkpoint (if this checkpoint is
    /// abandoned) and later be cut here ([`LayeredDisk::commit_mark`]): the next stream change
    /// starts a new hidden layer. Nothing is written or synced (a COLO checkpoint pause waits
    /// for this): [`LayeredDisk::sync_marked`] makes the stream up to here durable, after the
    /// primary heard that the marker was applied (docs/flush-policy.md, rule 11).
    pub fn mark(&self, mark: Mark) -> Result<(), LayerError> {
        let mut st = self.write_state();
        let Stage::Buffering(layers) = &mut st.stage else {
            return Err(LayerError::ReplicationOver);
        };
        layers.pending.push(mark);
        Ok(())
    }

    /// Makes base durable up to the last [`LayeredDisk::mark`] (and whatever the stream wrote
    /// after it): what the secondary promises when it sends DURABLE for a marker, or, for a
    /// primary that does not take DURABLE, before it acknowledges the marker at all.
    pub fn sync_marked(&self) -> Result<(), LayerError> {
        Ok(self.flush_base(SyncPoint::BaseMarker)?)
    }

    /// COLO: the SVM runs the primary's state of the tentative cut `epoch` ([`LayeredDisk::mark`]):
    /// the checkpoint is complete. The active layer and the hidden layers older than the cut
    /// are dropped; the view is now the primary's disk at the cut.
    ///
    /// Its refusals ([`LayerError::NoTentativeCut`], [`LayerError::ReplicationOver`]) are only
    /// reported (the Secondary VM's disk then does not match its memory), so this is where they
    /// become `io::Error`s.
    pub fn commit_mark(&self, epoch: u64) -> std::io::Result<()> {
        Ok(self.cut(Cut::Mark(epoch))?)
    }

    /// Carries out `cut`: base is synced (what the cut keeps is durable before the layers
    /// holding the rest go), fresh layer files are made, and under the lock the plan is
    /// recorded in the state file, then swapped in; the old files go to the reaper.
    pub(super) fn cut(&self, cut: Cut) -> Result<(), LayerError> {
        if !matches!(self.read_state().stage, Stage::Buffering(_)) {
            return Err(LayerError::ReplicationOver);
        }
        self.flush_base(SyncPoint::BaseCheckpoint)?;
        // Create the new files before taking the lock, so the swap is all the lock covers.
        let fresh = self.create_layers()?;
        let mut st = self.write_state();
        let (epoch_before, group_before) = (st.epoch, st.group);
        let Stage::Buffering(layers) = &mut st.stage else {
            return Err(LayerError::ReplicationOver);
        };
        let plan = CutPlan::new(cut, layers, epoch_before, group_before)?;
        // The layers after the cut, recorded first: on an error nothing has changed.
        self.saved_after(&plan, layers, &fresh)
            .store(&*self.media, &self.dir)?;
        let mut old = plan.swap(layers, fresh);
        st.epoch = plan.epoch;
        st.group = plan.group;
        st.open = true;
        st.needs_resync = false;
        drop(st);
        old.discard_files();
        self.reap(old);
        Ok(())
    }

    /// The state file after `plan`: the new epoch and group record, the fresh active layer,
    /// the kept hidden layers (or the fresh one), open in this boot.
    fn saved_after(&self, plan: &CutPlan, layers: &Layers, fresh: &Layers) -> SavedState {
        let hidden = if plan.keep_from < layers.hidden.len() {
            layers.hidden[plan.keep_from..]
                .iter()
                .enumerate()
                .map(|(i, h)| SavedHidden {
                    file: h.layer.file_name(),
                    // The kept layer becomes the epoch's first.
                    marks: if i == 0 {
                        plan.marks_from_cut(&h.marks)
                    } else {
                        h.marks.clone()
                    },
                })
                .collect()
        } else {
            fresh
                .hidden
                .iter()
                .map(|h| SavedHidden {
                    file: h.layer.file_name(),
                    marks: plan.fresh_marks.clone(),
                })
                .collect()
        };
        let mut saved = self.saved(plan.group, plan.epoch, SavedStage::Buffering, None);
        saved.active = Some(fresh.active.file_name());
        saved.hidden = hidden;
        saved
    }
}

/// The kinds of cut: where the Secondary VM's new view comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cut {
    /// Every layer dropped: base is the primary's disk. The new epoch is `epoch` (the
    /// primary's number), else the next one. A disk prepared for a group checkpoint at the
    /// current epoch commits it.
    Checkpoint { epoch: Option<u64> },
    /// A checkpoint that happens only if the disk is prepared for group checkpoint `group` at
    /// the current epoch (docs/consistency-groups.md); it commits that group checkpoint.
    Group(u64),
    /// COLO: the SVM runs the primary's state of the tentative cut at marker `epoch`: the
    /// active layer and the hidden layers before the cut go; the new epoch is `epoch`. A
    /// prepared group record is dropped.
    Mark(u64),
}

/// What a cut does to the layers, planned from the state under the lock before anything is
/// written (pure: an error leaves everything as it was).
struct CutPlan {
    cut: Cut,
    epoch: u64,
    group: GroupRecord,
    /// The first hidden layer kept (`hidden.len()`: none; a fresh one starts the epoch).
    keep_from: usize,
    /// A cut at a pending marker (no change came after it): the fresh first layer starts
    /// there, with the pending markers from the cut on.
    cut_pending: bool,
    fresh_marks: Vec<Mark>,
}

impl CutPlan {
    fn new(
        cut: Cut,
        layers: &Layers,
        epoch_before: u64,
        group_before: GroupRecord,
    ) -> Result<CutPlan, LayerError> {
        if let Cut::Group(g) = cut {
            match group_before.prepared {
                Some(p) if p.group == g && p.epoch == epoch_before => {}
                prepared => {
                    return Err(LayerError::NotPrepared {
                        group: g,
                        epoch: epoch_before,
                        prepared,
                    })
                }
            }
        }
        let has = |marks: &[Mark], e: u64| marks.iter().any(|m| m.epoch == e);
        let (epoch, keep_from, cut_pending) = match cut {
            Cut::Checkpoint { epoch } => (
                epoch.unwrap_or(epoch_before + 1),
                layers.hidden.len(),
                false,
            ),
            Cut::Group(_) => (epoch_before + 1, layers.hidden.len(), false),
            Cut::Mark(e) if has(&layers.pending, e) => (e, layers.hidden.len(), true),
            Cut::Mark(e) => {
                let at = layers.hidden.iter().position(|h| has(&h.marks, e));
                let at = at.ok_or(LayerError::NoTentativeCut(e))?;
                (e, at, false)
            }
        };
        let group = match (cut, group_before.prepared) {
            (Cut::Mark(_), _) | (_, None) => GroupRecord {
                prepared: None,
                ..group_before
            },
            (_, Some(p)) if p.epoch == epoch_before => GroupRecord {
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
        let mut plan = CutPlan {
            cut,
            epoch,
            group,
            keep_from,
            cut_pending,
            fresh_marks: Vec::new(),
        };
        if cut_pending {
            plan.fresh_marks = plan.marks_from_cut(&layers.pending);
        }
        Ok(plan)
    }

    /// The markers from the cut on: this cut and the later ones stay possible cuts (QEMU may
    /// give the SVM the state of the same point again, or of a later stop). None for a
    /// checkpoint.
    fn marks_from_cut(&self, marks: &[Mark]) -> Vec<Mark> {
        match self.cut {
            Cut::Mark(e) => marks.iter().skip_while(|m| m.epoch != e).cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// Swaps `fresh` in for what the cut drops; returns the dropped layers (and the fresh
    /// hidden layer, when a kept one starts the epoch instead).
    fn swap(&self, layers: &mut Layers, fresh: Layers) -> Layers {
        let Layers {
            active: mut fresh_active,
            hidden: fresh_hidden,
            ..
        } = fresh;
        let mut kept = layers.hidden.split_off(self.keep_from);
        let mut unused = Vec::new();
        if kept.is_empty() {
            kept = fresh_hidden;
            kept[0].marks = self.fresh_marks.clone();
        } else {
            unused = fresh_hidden;
            kept[0].marks = self.marks_from_cut(&kept[0].marks);
        }
        // Pending markers after a cut in a layer are newer than it: they stay pending.
        if !matches!(self.cut, Cut::Mark(_)) || self.cut_pending {
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
        old.hidden.append(&mut unused);
        old
    }
}
