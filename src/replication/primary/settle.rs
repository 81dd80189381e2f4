//! Rule 11 of docs/flush-policy.md on the primary: an epoch that a MARKER ended is over for
//! QEMU once the secondary *applied* the marker (the Primary VM's pause ends at that ACK), and
//! *settled* once the secondary says base is durable up to it (DURABLE). Until then the epoch's
//! changes stay in a record of their own ([`Owed`]), given back to the dirty record if the
//! session ends first (a secondary that lost power then gets them again); the checkpoint is
//! recorded in the metadata and clears the dirty log only when it is settled.
//!
//! Nothing waits for DURABLE: a device stop of N queues sends N markers, and the secondary syncs
//! beside its applier, so a marker never queues behind the previous one's sync. Markers that
//! follow an owed one are folded into it (one record, the union of their changes) and settle
//! at the DURABLE of the newest; a DURABLE of an older one is superseded and ignored. A
//! CHECKPOINT, whose ACK means durable, settles what is owed with its own epoch. The dirty log
//! is cleared for a settled marker only while at most one boundary followed it
//! ([`DirtyLog::checkpoint_done_at`]), so its two epochs always cover what may be resent.
//!
//! A secondary of an older build never sends DURABLE (its WELCOME does not say it does): its
//! ACK of a marker means durable, and the epoch settles at the ACK as before.
//!
//! [`DirtyLog::checkpoint_done_at`]: crate::replication::dirty::DirtyLog::checkpoint_done_at

use std::sync::Arc;

use super::{Primary, Sent, State};
use crate::replication::dirty::DirtyBitmap;
use crate::replication::protocol::ProtocolError;

/// The changes of ended epochs, while they may still have to be resent.
#[derive(Debug)]
pub(super) struct EpochChanges {
    pub dirty: DirtyBitmap,
    /// Stream bytes sent in those epochs (`bytes-sent-since-checkpoint`).
    pub sent: u64,
}

impl EpochChanges {
    fn fold(&mut self, other: EpochChanges) {
        self.dirty.merge(&other.dirty);
        self.sent += other.sent;
    }
}

/// What recording a settled checkpoint writes (the metadata, then the dirty log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct CheckpointRecord {
    pub epoch: u64,
    /// The generation the secondary holds there: the metadata's `current` when the epoch's
    /// end was queued (a link loss meanwhile may have made a new one since).
    pub holds: u64,
    /// The dirty log's boundary of the epoch's end (`None`: no log).
    pub boundary: Option<u64>,
}

/// Markers acknowledged and not yet durable: the newest, and the changes of all of them.
#[derive(Debug)]
pub(super) struct Owed {
    latest: Sent,
    record: CheckpointRecord,
    changes: EpochChanges,
}

impl Owed {
    /// Bytes a resync would send now: `dirty` and the owed changes together.
    pub(super) fn dirty_bytes_with(&self, dirty: &DirtyBitmap) -> u64 {
        let mut all = dirty.clone();
        all.merge(&self.changes.dirty);
        all.dirty_bytes()
    }
}

/// Whether ended epochs still wait for the secondary's DURABLE.
#[derive(Debug, Default)]
pub(super) enum Settling {
    /// Nothing owed.
    #[default]
    Settled,
    Owed(Owed),
}

/// How an epoch whose end was just queued settles.
pub(super) enum Settles {
    /// At the ACK of its end: these changes are forgotten and this is recorded then (given
    /// back if the end is not acknowledged).
    AtAck(EpochChanges, CheckpointRecord),
    /// At DURABLE (kept in [`Settling::Owed`]).
    AtDurable,
}

impl Primary {
    /// The epoch `epoch` ends with the frame `end` just queued (state lock held, order lock
    /// held): its changes leave the dirty record. A MARKER to a secondary that sends DURABLE
    /// is owed (folded into what is owed already); anything else settles at its ACK, with
    /// what was owed.
    pub(super) fn end_epoch_changes(
        &self,
        st: &mut State,
        end: Sent,
        epoch: u64,
        is_marker: bool,
    ) -> Settles {
        let mut changes = EpochChanges {
            dirty: self.dirty().take(),
            sent: std::mem::take(&mut st.sent_since_checkpoint),
        };
        let record = CheckpointRecord {
            epoch,
            holds: self.meta.gens().current,
            boundary: self.log.as_ref().map(|l| l.epoch_boundary()),
        };
        // What markers still owe settles with this end: one record of all the changes.
        if let Settling::Owed(owed) = std::mem::take(&mut st.settling) {
            changes.fold(owed.changes);
        }
        let early = st.link.session().is_some_and(|s| s.sends_durable);
        if !(is_marker && early) {
            return Settles::AtAck(changes, record);
        }
        st.settling = Settling::Owed(Owed {
            latest: end,
            record,
            changes,
        });
        Settles::AtDurable
    }

    /// The changes of an epoch that did not end (or whose end is not durable) go back into
    /// the dirty record.
    pub(super) fn give_back(&self, changes: EpochChanges) {
        self.dirty().merge(&changes.dirty);
        self.state().sent_since_checkpoint += changes.sent;
    }

    /// Session `id` ended: what it still owed DURABLE for is given back.
    pub(super) fn unsettle(&self, id: u64) {
        let owed = {
            let mut st = self.state();
            match &st.settling {
                Settling::Owed(o) if o.latest.session == id => std::mem::take(&mut st.settling),
                _ => return,
            }
        };
        if let Settling::Owed(o) = owed {
            log::warn!(
                "checkpoint {} was applied but never made durable by the secondary: its \
                 changes stay dirty",
                o.record.epoch
            );
            self.give_back(o.changes);
        }
    }

    /// DURABLE `seq`/`epoch` of session `id`. For the newest owed marker: settled (its
    /// changes forgotten), recorded off the link task. For an older or already settled one:
    /// nothing (superseded). For a frame not acknowledged yet: the link breaks.
    pub(super) fn durable(
        self: &Arc<Self>,
        id: u64,
        seq: u64,
        epoch: u64,
    ) -> Result<(), ProtocolError> {
        let record = {
            let mut st = self.state();
            let acked = st
                .link
                .session()
                .filter(|s| s.id == id)
                .map(|s| s.acked_seq);
            if acked < Some(seq) {
                return Err(ProtocolError::UnexpectedDurable { seq, epoch });
            }
            match &st.settling {
                Settling::Owed(o) if o.latest == (Sent { session: id, seq }) => {
                    if o.record.epoch != epoch {
                        return Err(ProtocolError::UnexpectedDurable { seq, epoch });
                    }
                }
                _ => return Ok(()), // superseded, or settled by a CHECKPOINT
            }
            let Settling::Owed(o) = std::mem::take(&mut st.settling) else {
                return Ok(());
            };
            // (A marker whose wait timed out may be applied and made durable later.)
            st.epoch = st.epoch.max(epoch);
            st.durable_epoch = st.durable_epoch.max(epoch);
            o.record
        };
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.checkpoint_recorded(record));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::mpsc;

    use super::super::{Link, PrimaryOptions, ReplicationError, Session};
    use super::*;
    use crate::qmp::EventSender;
    use crate::replication::protocol::Frame;
    use crate::replication::tls::LinkSecurity;
    use crate::storage::{BlockDevice, MemDisk};

    /// A primary streaming to a test session 1 whose secondary sends DURABLE or not; the
    /// session's frames come out of the receiver.
    fn primary(sends_durable: bool) -> (Arc<Primary>, mpsc::UnboundedReceiver<Frame>) {
        let opts = PrimaryOptions {
            peer: "127.0.0.1:1".into(),
            window_bytes: 1 << 30,
            sync: false,
            heartbeat_interval: Duration::from_secs(1),
            // Only the test that expects a timeout reaches it.
            peer_timeout: Duration::from_secs(2),
            reconnect_interval: Duration::from_secs(1),
            dirty_granularity: 4096,
            block_size: 512,
            security: LinkSecurity::Insecure,
        };
        let primary = Primary::new(Arc::new(MemDisk::new(1 << 20)), opts, EventSender::new());
        let (tx, rx) = mpsc::unbounded_channel();
        let mut session = Session::new(1, tx, "test".into(), 0);
        session.sends_durable = sends_durable;
        primary.state().link = Link::Connected(session);
        (primary, rx)
    }

    /// Writes `ranges` through the primary, then stops the device: the MARKER is acknowledged
    /// as soon as it is queued (what the secondary does once it applied it). Returns the
    /// marker's sequence number.
    fn write_and_mark(
        p: &Arc<Primary>,
        rx: &mut mpsc::UnboundedReceiver<Frame>,
        ranges: &[u64],
    ) -> u64 {
        for &offset in ranges {
            let disk = super::super::ReplicatedDisk::new(p.clone());
            disk.write_at(&[7; 4096], offset).unwrap();
        }
        let stopper = {
            let p = p.clone();
            std::thread::spawn(move || p.device_stopped(&[Some(3)], true))
        };
        let seq = loop {
            match rx.blocking_recv().expect("a frame") {
                Frame::Marker { seq, .. } => break seq,
                _ => continue,
            }
        };
        p.acked(1, seq).unwrap();
        stopper.join().unwrap().unwrap();
        seq
    }

    fn recorded_epoch(p: &Primary) -> u64 {
        p.meta.get().gens.epoch
    }

    /// Waits until checkpoint `epoch` is recorded (DURABLE records off the link task).
    fn wait_recorded(p: &Primary, epoch: u64) {
        let mut st = p.state();
        while st.recorded_epoch < epoch {
            st = p.cond.wait(st).unwrap();
        }
    }

    /// The Primary VM's pause ends at the marker's ACK, but the epoch's changes stay held and
    /// the checkpoint unrecorded until DURABLE; then both happen.
    #[test]
    fn a_marker_settles_at_its_durable_not_at_its_ack() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let _rt = rt.enter();
        let (p, mut rx) = primary(true);
        let seq = write_and_mark(&p, &mut rx, &[0, 8192]);
        let st = p.status();
        assert_eq!((st.epoch, st.durable_epoch, recorded_epoch(&p)), (1, 0, 0));
        assert_eq!(st.dirty_bytes, 8192, "what a resync would send");
        assert_eq!(p.dirty().dirty_bytes(), 0, "held apart until DURABLE");
        // Not acknowledged yet, or another epoch for it: the link breaks, nothing settles.
        assert!(p.durable(1, seq + 1, 2).is_err());
        assert!(p.durable(1, seq, 2).is_err());
        assert!(p.durable(2, seq, 1).is_err());
        assert!(matches!(p.state().settling, Settling::Owed(_)));
        p.durable(1, seq, 1).unwrap();
        wait_recorded(&p, 1);
        let st = p.status();
        assert_eq!((st.epoch, st.durable_epoch, recorded_epoch(&p)), (1, 1, 1));
        assert_eq!(st.dirty_bytes, 0);
        // A second DURABLE for it changes nothing.
        p.durable(1, seq, 1).unwrap();
        assert!(matches!(p.state().settling, Settling::Settled));
    }

    /// The link drops after the marker's ACK, before DURABLE: the epoch's changes are dirty
    /// again (a secondary that lost power gets them resent) and nothing is recorded.
    #[test]
    fn an_epoch_not_durable_when_the_link_drops_is_resent() {
        let (p, mut rx) = primary(true);
        write_and_mark(&p, &mut rx, &[0, 65536]);
        assert_eq!(p.dirty().dirty_bytes(), 0, "held apart until DURABLE");
        p.link_down("test: link cut");
        let st = p.status();
        assert_eq!(
            (st.dirty_bytes, st.durable_epoch, recorded_epoch(&p)),
            (8192, 0, 0)
        );
        assert!(matches!(p.state().settling, Settling::Settled));
    }

    /// A device stop of two queues sends two markers: the second does not wait for the
    /// first's DURABLE (a sync in the pause); both epochs are owed together and settle at the
    /// newest's DURABLE, the older one's being superseded.
    #[test]
    fn markers_fold_and_settle_at_the_newest_durable() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let _rt = rt.enter();
        let (p, mut rx) = primary(true);
        let first = write_and_mark(&p, &mut rx, &[0]);
        let second = write_and_mark(&p, &mut rx, &[8192]);
        let st = p.status();
        assert_eq!((st.epoch, st.durable_epoch, st.dirty_bytes), (2, 0, 8192));
        p.durable(1, first, 1).unwrap();
        assert!(
            matches!(p.state().settling, Settling::Owed(_)),
            "superseded"
        );
        assert_eq!(p.status().dirty_bytes, 8192);
        p.durable(1, second, 2).unwrap();
        wait_recorded(&p, 2);
        let st = p.status();
        assert_eq!(
            (st.durable_epoch, st.dirty_bytes, recorded_epoch(&p)),
            (2, 0, 2)
        );
    }

    /// A device stop of two queues: the first queue's marker is only queued (nothing
    /// acknowledges it here), the last one's is waited for and its DURABLE settles both. A
    /// secondary without DURABLE is waited for at every queue (here: never acknowledged, so
    /// the first queue's stop times out).
    #[test]
    fn only_the_last_queue_of_a_stop_waits() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let _rt = rt.enter();
        let (p, mut rx) = primary(true);
        let disk = super::super::ReplicatedDisk::new(p.clone());
        disk.write_at(&[7; 4096], 0).unwrap();
        assert_eq!(p.device_stopped(&[Some(3), None], false).unwrap(), 1);
        while !matches!(rx.blocking_recv(), Some(Frame::Marker { .. })) {}
        let last = write_and_mark(&p, &mut rx, &[8192]);
        let st = p.status();
        assert_eq!((st.epoch, st.durable_epoch, st.dirty_bytes), (2, 0, 8192));
        p.durable(1, last, 2).unwrap();
        wait_recorded(&p, 2);
        assert_eq!(p.status().dirty_bytes, 0);

        let (old, _rx) = primary(false);
        let r = old.device_stopped(&[Some(3), None], false);
        assert!(matches!(r, Err(ReplicationError::Timeout(_))), "{r:?}");
    }

    /// A CHECKPOINT's ACK means durable: it settles what markers still owed, and their late
    /// DURABLE changes nothing.
    #[test]
    fn a_checkpoint_settles_what_markers_owe() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let _rt = rt.enter();
        let (p, mut rx) = primary(true);
        let marker = write_and_mark(&p, &mut rx, &[0]);
        let checkpoint = {
            let p = p.clone();
            std::thread::spawn(move || p.checkpoint(None))
        };
        let seq = loop {
            match rx.blocking_recv().expect("a frame") {
                Frame::Checkpoint { seq, .. } => break seq,
                _ => continue,
            }
        };
        p.acked(1, seq).unwrap();
        assert_eq!(checkpoint.join().unwrap().unwrap(), 2);
        let st = p.status();
        assert_eq!(
            (st.durable_epoch, st.dirty_bytes, recorded_epoch(&p)),
            (2, 0, 2)
        );
        p.durable(1, marker, 1).unwrap();
        assert_eq!(recorded_epoch(&p), 2);
    }

    /// A secondary of an older build (no DURABLE in its WELCOME): its ACK means durable, so
    /// the epoch settles and is recorded at the ACK.
    #[test]
    fn without_durable_the_ack_settles_the_epoch() {
        let (p, mut rx) = primary(false);
        write_and_mark(&p, &mut rx, &[0]);
        let st = p.status();
        assert_eq!((st.epoch, st.durable_epoch, recorded_epoch(&p)), (1, 1, 1));
        assert!(matches!(p.state().settling, Settling::Settled));
        write_and_mark(&p, &mut rx, &[4096]);
        assert_eq!(p.status().durable_epoch, 2);
    }
}
