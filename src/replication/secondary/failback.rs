//! Failback on the secondary's side (docs/replication-protocol.md, "Failback"):
//!
//! - as a **sync target** (`--discard-my-data`): the disk's own dirty record, read at start
//!   from its dirty log, is offered to a primary that diverged from the same generation (the
//!   PEER_DIRTY frame after WELCOME);
//! - as a **failed-over disk**: its dirty log (`IMAGE.colo-dirty`) records every range the
//!   failover commits and every later write before it reaches the disk, so that the old
//!   primary can later be resynced incrementally;
//! - **promotion** (`replication-promote`): the failed-over disk becomes the primary of a new
//!   pair in place, its dirty log handed to a [`Primary`] on the same image, while the
//!   Secondary VM keeps running.
//!
//! ```text
//!  failover ─► log reset + buffered clusters' bits (fsync) ─► metadata: failed over,
//!              bitmap = checkpoint generation ─► commit ─► SVM writes: log, then base
//!  promote  ─► [SVM writes held back, in-flight ones drained] Primary::open_shared(log bits),
//!              SVM writes through the primary from now on ─► link task connects to the peer
//! ```

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use log::info;

use super::{Secondary, SecondaryError, Stage};
use crate::replication::dirty::{DirtyExtents, DirtyLog, LoggedDisk};
use crate::replication::events;
use crate::replication::metadata::DiskRole;
use crate::replication::primary::{Primary, PrimaryOptions, ReplicatedDisk};
use crate::storage::BlockDevice;

/// Where the failed-over disk keeps its dirty log.
#[derive(Debug, Clone)]
pub struct FailoverLogSpec {
    pub path: PathBuf,
    /// Bytes per bit (`--dirty-log-extent`).
    pub extent: u64,
}

/// Builds a primary's options for a `--peer` address.
pub type PrimaryOptionsFor = Box<dyn Fn(&str) -> io::Result<PrimaryOptions> + Send + Sync>;

/// How this process may become a primary in place.
pub struct Promotion {
    /// The primary's options for a given `--peer` (the link protection, window, timeouts of
    /// this process).
    pub options: PrimaryOptionsFor,
    /// Where the primary's link task runs.
    pub runtime: tokio::runtime::Handle,
}

/// A [`Secondary`]'s failback settings, fixed at start ([`Secondary::new`]). The default:
/// no `--discard-my-data`, no own record, no dirty log, no promotion.
#[derive(Default)]
pub struct FailbackOptions {
    /// `--discard-my-data`: a full sync may overwrite this disk's divergent changes.
    pub discard_my_data: bool,
    /// This disk's own dirty record, its dirty log as [`DirtyLog::peek`] read it at start
    /// (`None`: none usable); offered to the primary of a failback.
    pub own_dirty: Option<DirtyExtents>,
    /// Where a failover keeps the failed-over disk's dirty log (`None`: `--no-dirty-log`: no
    /// log, and the failed-over disk's bitmap is 0: the old primary then needs a full sync).
    pub failover_log: Option<FailoverLogSpec>,
    /// How this process may become a primary in place (`None`: `replication-promote` is
    /// refused).
    pub promotion: Option<Promotion>,
}

/// The failback settings and state of a [`Secondary`].
pub(super) struct Failback {
    opts: FailbackOptions,
    /// The failed-over disk's log, once the failover opened it.
    log: OnceLock<Arc<DirtyLog>>,
    /// The primary this process became (`replication-promote`).
    promoted: OnceLock<Arc<Primary>>,
    /// Held through a promotion: one at a time.
    promoting: Mutex<()>,
}

impl Failback {
    pub(super) fn new(opts: FailbackOptions) -> Self {
        Failback {
            opts,
            log: OnceLock::new(),
            promoted: OnceLock::new(),
            promoting: Mutex::new(()),
        }
    }
}

impl Secondary {
    pub(super) fn discard_my_data(&self) -> bool {
        self.fb.opts.discard_my_data
    }

    pub(super) fn own_dirty(&self) -> Option<&DirtyExtents> {
        self.fb.opts.own_dirty.as_ref()
    }

    /// Whether this disk's failover keeps a dirty log: a consistent secondary's (its
    /// checkpoint is the common generation), or a failed-over disk that recorded one. Never a
    /// disk that did not take a stream as a secondary (e.g. a primary's disk started as a
    /// secondary and failed over at once): its log is its own record as a primary and is left
    /// alone (its failover names no ancestor).
    pub(super) fn failover_log_applies(&self) -> bool {
        let m = self.meta.get();
        self.meta.failover_keeps_ancestor()
            || (m.role == DiskRole::FailedOver && m.gens.bitmap != 0)
    }

    /// The failover's dirty log: reset (a new failover: what it recorded before is about
    /// another lineage) or reopened as it is (a failover a previous process started, or
    /// finished: its bits are this disk's record; missing, everything counts as dirty).
    pub(super) fn failover_log(&self, resume: bool) -> io::Result<Option<Arc<DirtyLog>>> {
        if let Some(l) = self.fb.log.get() {
            return Ok(Some(l.clone()));
        }
        let Some(spec) = &self.fb.opts.failover_log else {
            return Ok(None);
        };
        let cap = self.disk.capacity();
        let log = if resume {
            let (log, ranges) = DirtyLog::open(&spec.path, cap, spec.extent, true)?;
            info!(
                "failed-over disk's dirty log {} reopened ({} extents recorded)",
                spec.path.display(),
                ranges.len()
            );
            log
        } else {
            info!(
                "failover: the dirty log {} starts anew",
                spec.path.display()
            );
            DirtyLog::create_reset(&spec.path, cap, spec.extent)?
        };
        // Opened once: a second failover call (a resumed commit) takes this one.
        Ok(Some(self.fb.log.get_or_init(|| Arc::new(log)).clone()))
    }

    /// At start, for a disk buffer that failed over (or is failing over) in a previous
    /// process: reopens the dirty log and routes the Secondary VM's writes through it, before
    /// the Secondary VM can write anything. A failed-over disk whose metadata names no common
    /// generation (bitmap 0) keeps no log.
    pub fn reopen_failover_log(&self) -> io::Result<()> {
        let stage = self.state().stage;
        if stage == Stage::Receiving {
            return Ok(());
        }
        if !self.failover_log_applies() {
            return Ok(());
        }
        let Some(log) = self.failover_log(true)? else {
            return Ok(());
        };
        if stage == Stage::FailingOver {
            // Records the clusters still buffered and installs the log's write path.
            // Resumed: the failover was decided (and forced, if it was) before the crash.
            self.disk.prepare_failover(Some(log), true)?;
        } else {
            let dev: Arc<dyn BlockDevice> = Arc::new(LoggedDisk::new(self.base_disk()?, log));
            self.disk.set_through(dev)?;
        }
        Ok(())
    }

    fn base_disk(&self) -> io::Result<Arc<dyn BlockDevice>> {
        self.base.clone().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                "no image under the disk buffer (an in-memory secondary)",
            )
        })
    }

    /// The primary this process became (`replication-promote`), if it did.
    pub fn promoted(&self) -> Option<Arc<Primary>> {
        self.fb.promoted.get().cloned()
    }

    /// `replication-promote {"peer": "HOST:PORT"}`: a failed-over secondary becomes the
    /// primary of a new pair without a restart. The Secondary VM's writes are held back and
    /// the ones in flight drained; a [`Primary`] opens on the same image with the failed-over
    /// disk's dirty log (its bits become the primary's dirty record; the metadata keeps the
    /// common generation as bitmap); from then on every write of the Secondary VM goes through
    /// that primary. Its link task then connects to `peer`.
    pub fn promote(&self, peer: &str) -> Result<Arc<Primary>, SecondaryError> {
        let invalid = SecondaryError::CannotPromote;
        let _one = self.fb.promoting.lock().unwrap_or_else(|e| e.into_inner());
        if self.fb.promoted.get().is_some() {
            return Err(invalid("already promoted: this process is a primary"));
        }
        match self.state().stage {
            Stage::FailedOver => {}
            Stage::FailingOver => {
                return Err(invalid(
                    "the failover is still committing the layers: promote when it is done \
                     (REPLICATION_FAILOVER_DONE)",
                ))
            }
            Stage::Receiving => {
                return Err(invalid(
                    "only a failed-over secondary can be promoted: run replication-failover \
                     first",
                ))
            }
        }
        let Some(promotion) = self.fb.opts.promotion.as_ref() else {
            return Err(invalid(
                "this process cannot be promoted (no promotion set up)",
            ));
        };
        let opts = (promotion.options)(peer)?;
        let base = self.base_disk()?;
        let log = self.fb.log.get().cloned();
        let mut made = None;
        // Stop the world: no write of the Secondary VM runs while the primary takes over.
        self.disk.replace_through(|_old| {
            let ranges = log
                .as_ref()
                .map(|l| l.recorded_ranges())
                .unwrap_or_default();
            let primary = Primary::open_shared(
                base.clone(),
                opts,
                self.events.clone(),
                self.meta.clone(),
                log.clone().map(|l| (l, ranges)),
            )?;
            made = Some(primary.clone());
            Ok(Arc::new(ReplicatedDisk::new(primary)))
        })?;
        let primary = made.ok_or_else(|| invalid("promotion did not complete"))?;
        let _ = self.fb.promoted.set(primary.clone());
        promotion.runtime.spawn(primary.clone().run_link());
        let dirty_bytes = primary.status().dirty_bytes;
        info!("promoted: primary of a new pair with secondary {peer} ({dirty_bytes} bytes dirty)");
        self.events.send(&events::Promoted {
            peer: peer.to_string(),
            dirty_bytes,
        });
        Ok(primary)
    }
}
