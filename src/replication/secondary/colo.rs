//! The Secondary VM under COLO (docs/colo-with-qemu.md): what its device tells the secondary
//! (QEMU stops and restarts it, switches its dirty logging), the COLO markers of the stream
//! (tentative cuts), which cut a restart takes ([`Restarted::decide`]), a Secondary VM whose
//! memory does not match its disk, and leaving COLO (a failover).

use std::io;
use std::sync::Arc;
use std::time::Instant;

use log::{error, info};

use super::restart::{Restart, Restarted};
use super::{Peer, Secondary, Stage};
use crate::replication::events::{self, Side};
use crate::replication::protocol::Mark;

/// The Secondary VM's device, as QEMU drives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Svm {
    /// Stopped by QEMU (a COLO checkpoint begins), or not started yet: `own` is where each
    /// queue stood when it stopped (empty when it never ran).
    Stopped { own: Vec<Option<u16>> },
    /// Running since its restart.
    Running,
}

/// What the secondary knows of the Secondary VM.
#[derive(Debug)]
pub(super) struct SvmState {
    pub device: Svm,
    /// Its device logs dirty pages: QEMU runs it in COLO. Switched off by QEMU when the
    /// Secondary VM leaves COLO (a failover).
    pub in_colo: bool,
    /// Markers that arrived while the Secondary VM ran (not a checkpoint's stop).
    pub stops: u64,
    /// Why the Secondary VM's memory and its disk do not match (`None`: they do).
    pub mismatch: Option<String>,
}

impl Default for SvmState {
    fn default() -> Self {
        SvmState {
            device: Svm::Stopped { own: Vec::new() },
            in_colo: false,
            stops: 0,
            mismatch: None,
        }
    }
}

impl Secondary {
    /// A COLO marker (docs/colo-with-qemu.md): with a Secondary VM, a tentative cut its next
    /// restart decides, whether it is stopped (a checkpoint's stop) or runs (another stop of
    /// the primary, e.g. a user `stop`: if the primary stays stopped, QEMU's next checkpoint
    /// gives the Secondary VM the state of this point); without one, a checkpoint of the disk.
    /// Returns whether base is durable up to the marker and the epoch recorded (a checkpoint
    /// is); a tentative cut is neither ([`Secondary::marker_durable`] does both).
    pub(super) fn apply_marker(&self, mark: &Mark) -> io::Result<bool> {
        if !self.opts.serves_vm {
            let t = Instant::now();
            self.disk.checkpoint_as(mark.epoch)?;
            self.meta.checkpoint_done(mark.epoch)?;
            self.state().bytes_since_checkpoint = 0;
            self.metrics.checkpoint(t.elapsed());
            info!("marker {}: checkpoint (no Secondary VM)", mark.epoch);
            self.events.send(&events::Checkpoint {
                role: Side::Secondary,
                epoch: mark.epoch,
            });
            return Ok(true);
        }
        self.disk.mark(mark.clone())?;
        let mut st = self.state();
        match st.svm.device {
            Svm::Stopped { .. } => info!(
                "marker {}: tentative cut (the Secondary VM is stopped)",
                mark.epoch
            ),
            Svm::Running => {
                st.svm.stops += 1;
                info!(
                    "marker {}: the primary stopped while the Secondary VM runs (not a \
                     checkpoint's stop): kept as a tentative cut for QEMU's next checkpoint",
                    mark.epoch
                );
            }
        }
        Ok(false)
    }

    /// Makes a tentative cut's marker durable: base synced up to it, then the epoch recorded
    /// in the metadata (never ahead of the durable base: rule 5 of the handshake).
    pub(super) fn marker_durable(&self, epoch: u64) -> io::Result<()> {
        self.disk.sync_marked()?;
        self.meta.stream_epoch(epoch)?;
        Ok(())
    }

    /// The Secondary VM's queue `queue` runs again, from `next_avail`; on the first queue of a
    /// restart in COLO, decides what the restart is ([`Restarted::decide`]): QEMU gave it the
    /// primary's state of a tentative cut → the cut becomes the checkpoint before any request
    /// runs; it resumed its own state or reset its device → nothing changes; neither → refused
    /// loudly: the disk stays at the last checkpoint and a failover is refused until a later
    /// checkpoint matches again.
    fn svm_starting(&self, queue: u16, next_avail: u16) {
        let (own, link_alive, in_colo) = {
            let mut st = self.state();
            let Svm::Stopped { own } = std::mem::replace(&mut st.svm.device, Svm::Running) else {
                return;
            };
            let link_alive = matches!(st.peer, Peer::Streaming(_));
            (own, link_alive, st.svm.in_colo)
        };
        if self.failing_or_failed_over() || !in_colo {
            return;
        }
        let marks = self.disk.marks();
        let restarted = Restarted {
            queue,
            at: next_avail,
            own: own.get(usize::from(queue)).copied().flatten(),
            marks: &marks,
            link_alive,
        };
        let epoch = self.disk.stats().epoch;
        match restarted.decide() {
            Restart::Cut(cut) => self.take_cut(cut),
            Restart::Own => info!(
                "the Secondary VM resumed its own state (queue {queue} at {next_avail}); the \
                 disk stays at checkpoint {epoch}"
            ),
            Restart::Reset => info!(
                "the Secondary VM's guest reset its device (queue {queue} at 0); the disk \
                 stays at checkpoint {epoch}"
            ),
            Restart::First => info!(
                "the Secondary VM's device starts (queue {queue} at {next_avail}); the disk is \
                 checkpoint {epoch}"
            ),
            Restart::Unmatched => self.svm_mismatch(format!(
                "QEMU restarted the Secondary VM's queue {queue} at {next_avail}, which is \
                 neither its own position ({}) nor that of a stop of the primary this \
                 secondary can cut its disk at (cuts: {}); its disk stays at checkpoint \
                 {epoch}",
                restarted.own.map_or("unknown".into(), |o| o.to_string()),
                describe_cuts(&marks, queue),
            )),
        }
    }

    /// The Secondary VM runs the primary's state of the tentative cut `cut`: it becomes the
    /// checkpoint, and the Secondary VM's memory and disk match again.
    fn take_cut(&self, cut: u64) {
        let t = Instant::now();
        let r = self
            .disk
            .commit_mark(cut)
            .and_then(|()| self.meta.checkpoint_done(cut).map(drop));
        if let Err(e) = r {
            return self.svm_mismatch(format!(
                "cannot make tentative cut {cut} the checkpoint: {e}"
            ));
        }
        {
            let mut st = self.state();
            st.bytes_since_checkpoint = 0;
            st.svm.mismatch = None;
        }
        self.metrics.checkpoint(t.elapsed());
        info!("checkpoint {cut}: the Secondary VM runs the primary's state");
        self.events.send(&events::Checkpoint {
            role: Side::Secondary,
            epoch: cut,
        });
    }

    /// The Secondary VM's memory and disk do not match: REPLICATION_ERROR, and failovers are
    /// refused (unless forced) until a checkpoint matches again.
    fn svm_mismatch(&self, why: String) {
        self.state().svm.mismatch = Some(why.clone());
        self.report_svm_error(format!(
            "{why}: the Secondary VM's memory does not match its disk; a failover to it is \
             refused unless forced, until a later checkpoint matches"
        ));
    }

    fn report_svm_error(&self, error: String) {
        error!("{error}");
        self.state().last_error = Some(error.clone());
        self.events.send(&events::Error {
            role: Side::Secondary,
            error,
        });
    }

    /// Whether a failover began (or is done): no stream is taken any more.
    fn failing_or_failed_over(&self) -> bool {
        self.state().stage != Stage::Receiving
    }

    /// The Secondary VM's device switched dirty logging: off after on means QEMU ended COLO on
    /// the Secondary VM (failover), so the disk becomes its own.
    fn svm_dirty_logging(self: &Arc<Self>, on: bool) {
        let was = std::mem::replace(&mut self.state().svm.in_colo, on);
        if was && !on && !self.failing_or_failed_over() {
            info!("the Secondary VM left COLO: failing over");
            let me = self.clone();
            let spawned = std::thread::Builder::new()
                .name("colo-failover".into())
                .spawn(move || {
                    if let Err(e) = me.failover() {
                        me.report_svm_error(format!(
                            "the Secondary VM left COLO, but its disk was not failed over: {e}"
                        ));
                    }
                });
            if let Err(e) = spawned {
                error!("cannot start the failover: {e}");
            }
        }
    }
}

/// The cuts' epochs and positions of `queue`, for a message.
fn describe_cuts(marks: &[Mark], queue: u16) -> String {
    if marks.is_empty() {
        return "none".into();
    }
    let pos = |m: &Mark| match m.bases.get(usize::from(queue)).copied().flatten() {
        Some(b) => b.to_string(),
        None => "any".into(),
    };
    marks
        .iter()
        .map(|m| format!("{} at {}", m.epoch, pos(m)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The Secondary VM's device tells the secondary when QEMU stops and restarts it.
pub struct SvmDevice(pub Arc<Secondary>);

impl crate::vhost_user::DeviceObserver for SvmDevice {
    fn log_all(&self, on: bool) {
        self.0.svm_dirty_logging(on);
    }

    fn queue_stopped(&self, queue: u16, bases: &[Option<u16>], log_all: bool, last: bool) {
        if let Some(p) = self.0.promoted() {
            // Promoted: this VM is the primary's now (a COLO checkpoint of the new pair).
            let device = crate::replication::primary::PrimaryDevice(p);
            crate::vhost_user::DeviceObserver::queue_stopped(&device, queue, bases, log_all, last);
            return;
        }
        self.0.state().svm.device = Svm::Stopped {
            own: bases.to_vec(),
        };
    }

    fn queue_starting(&self, queue: u16, next_avail: u16) {
        self.0.svm_starting(queue, next_avail);
    }

    fn queue_previous(&self, queue: u16, at: u16) {
        // A restarted secondary (an upgrade, a crash): where its previous process left the
        // Secondary VM's queue is its own position, as if this process had stopped it there.
        if let Svm::Stopped { own } = &mut self.0.state().svm.device {
            let q = usize::from(queue);
            if own.len() <= q {
                own.resize(q + 1, None);
            }
            if own[q].is_none() {
                own[q] = Some(at);
            }
        }
    }
}
