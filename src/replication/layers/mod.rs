//! The secondary's disk buffer: the hidden and active layers of QEMU's block replication design,
//! kept on disk so that a restarted secondary still holds them.
//!
//! ```text
//!   Secondary VM reads ──►  active  (SVM writes since the last checkpoint)
//!                             │ miss
//!                             ▼
//!                           hidden 0 … hidden n  (originals of clusters the primary changed
//!                             │ miss                since the last checkpoint; a new hidden
//!                             ▼                     layer starts at each tentative COLO cut)
//!   primary stream ──────►  base    (the secondary disk; always equals the primary's disk)
//! ```
//!
//! - The replicated stream from the primary ([`LayeredDisk::apply_primary_batch`]) goes to
//!   `base`, after *copy-before-write*: every cluster it touches that the newest hidden layer does
//!   not hold yet is read from `base` and saved there first (data, then its index records),
//!   then base is written. Nothing of it is synced: a process crash finds every write in the
//!   page cache, and after a power loss the layers are not trusted (below). A hidden layer never
//!   overwrites a cluster it holds.
//! - The Secondary VM sees [`LayeredDisk`] as a [`BlockDevice`]: per cluster, reads come from
//!   active if it holds the cluster, else from the oldest hidden layer holding it, else base. Its
//!   writes go to active (partial clusters are read-modify-written from that same view) and never
//!   reach base.
//! - [`LayeredDisk::checkpoint`] drops every layer cheaply: fresh empty layer files are swapped
//!   in, the state file names them, and the old files are unlinked by a background thread.
//! - COLO ([`LayeredDisk::mark`], [`LayeredDisk::commit_mark`]): while the SVM is stopped for a
//!   checkpoint, each primary device stop starts a new hidden layer (a tentative cut); when the
//!   SVM restarts with the primary's state of one of them, the layers before it are dropped. Until
//!   then the view is still the last checkpoint, so an abandoned checkpoint loses nothing.
//! - [`LayeredDisk::failover`] writes the SVM's view of every buffered cluster into base, cluster
//!   by cluster while the SVM keeps running, and then serves the SVM straight from base. It is
//!   recorded before it starts and resumes when a restarted secondary opens the directory.
//!   [`LayeredDisk::failover_logged`] first records every range the commit will write in a dirty
//!   log, and from then on the SVM's changes reach base through a [`LayeredDisk::set_through`]
//!   device (the log's [`LoggedDisk`](crate::replication::dirty::LoggedDisk), later a promoted
//!   primary) instead of directly.
//!
//! Durability follows docs/flush-policy.md (DRBD's single-fault model): base is synced at the
//! boundaries the primary relies on (its FLUSH, a marker, a checkpoint); the layers are synced
//! only where a power loss must find them (a group prepare, a failover's start, a clean
//! [`LayeredDisk::close`]). The state file says which: `"open": boot` while the layers may hold
//! unsynced changes of that boot. A reopen after a power loss (another boot) while open drops
//! the layers and reports [`LayerStats::needs_resync`]: the primary's resync makes base its
//! disk again, a failover is refused unless forced, and the next checkpoint clears it.
//!
//! Each layer is a sparse file the size of the disk holding its data at the disk's offsets, with
//! its index log after the data (`layer.rs`); `layers.state` names the current files
//! (`state.rs`). This file opens and reopens the directory; the jobs on an open disk are in
//! `stream.rs` (the primary's stream, copy-before-write), `svm.rs` (the Secondary VM's reads,
//! writes and flushes), `cut.rs` (checkpoints, COLO markers and cuts, group prepare) and
//! `failover.rs`. docs/layers.md has the formats and why a crash at any point is recoverable.

mod cut;
mod error;
mod failover;
mod layer;
mod state;
mod stream;
mod svm;

use std::collections::BTreeSet;
use std::fmt;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::Instant;

pub use error::LayerError;
use layer::{Kind, Layer};
pub use state::{GroupCommitted, GroupPrepared, GroupRecord, Mark};
use state::{SavedHidden, SavedStage, SavedState};

use crate::storage::durable::{std_media, Media, SyncPoint};
use crate::storage::{BlockDevice, RawImage};

/// Default cluster size: 64 KiB.
///
/// The cluster is the unit of copy-before-write, of the SVM's read-modify-write and of the
/// in-memory maps. Smaller clusters copy less data around small writes (a 4 KiB primary write
/// saves one whole cluster in hidden; a 512-byte SVM write reads and writes one whole cluster
/// in active) but need more map entries (one per cluster and layer, ~10-20 bytes each) and
/// more syscalls for large I/O. 64 KiB is QEMU's qcow2 default and a good middle ground.
pub const DEFAULT_CLUSTER_SIZE: u64 = 64 * 1024;
/// Smallest accepted cluster size (one page, the largest logical block size in use).
pub const MIN_CLUSTER_SIZE: u64 = 4096;
/// Largest accepted cluster size (bounds the per-request bounce buffers).
pub const MAX_CLUSTER_SIZE: u64 = 16 << 20;

/// Copy-before-write reads runs of missing clusters from base in chunks of at most this size.
const COPY_CHUNK: u64 = 1 << 20;
/// Failover commits at most this much data (or one cluster) per lock acquisition.
const COMMIT_BATCH: u64 = 256 << 10;
/// Zero buffer size for file ranges that cannot be hole-punched.
const ZERO_CHUNK: usize = 1 << 20;

/// A batch of the primary's stream that failed part way.
#[derive(Debug)]
pub struct BatchError {
    /// How many changes at the start of the batch were applied.
    pub applied: usize,
    pub error: io::Error,
}

/// A snapshot of the layered disk's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerStats {
    /// Bytes held by the hidden layers (clusters saved by copy-before-write this epoch).
    pub hidden_bytes: u64,
    /// Bytes held by the active layer (clusters the SVM wrote this epoch).
    pub active_bytes: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// The epoch of the last checkpoint.
    pub epoch: u64,
    /// `failover()` has been called: the primary stream and checkpoints are refused. While the
    /// commit runs, `hidden_bytes + active_bytes` is what is left to commit.
    pub failed_over: bool,
    /// The layers were dropped after a power loss while they held unsynced changes: the view
    /// is base as the power cut left it, no checkpoint. A failover is refused unless forced;
    /// the next checkpoint (after the primary's resync) clears it.
    pub needs_resync: bool,
}

/// A hidden layer and the COLO markers it started at (none for the epoch's first).
struct Hidden {
    layer: Layer,
    marks: Vec<Mark>,
}

/// The layers of one epoch.
struct Layers {
    active: Layer,
    /// Oldest first; never empty.
    hidden: Vec<Hidden>,
    /// Markers received since the last stream change: the disk at each of them is the disk
    /// now. The next change of the stream starts a hidden layer for them. Kept in memory only:
    /// after a crash they are unknown, and a Secondary VM restarting from one of them is
    /// refused rather than served a disk that does not match (see secondary.rs).
    pending: Vec<Mark>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Active,
    Hidden(usize),
    Base,
}

impl Layers {
    /// Where the SVM's view of `cluster` lives.
    fn source(&self, cluster: u64) -> Source {
        if self.active.has(cluster) {
            return Source::Active;
        }
        match self.hidden.iter().position(|h| h.layer.has(cluster)) {
            Some(i) => Source::Hidden(i),
            None => Source::Base,
        }
    }

    fn layer(&self, src: Source) -> Option<&Layer> {
        match src {
            Source::Active => Some(&self.active),
            Source::Hidden(i) => self.hidden.get(i).map(|h| &h.layer),
            Source::Base => None,
        }
    }

    /// The layer copy-before-write saves into.
    fn newest_hidden(&mut self) -> &mut Layer {
        let last = self.hidden.len() - 1;
        &mut self.hidden[last].layer
    }

    fn all(&self) -> impl Iterator<Item = &Layer> {
        std::iter::once(&self.active).chain(self.hidden.iter().map(|h| &h.layer))
    }

    /// The lowest cluster any layer holds.
    fn first_cluster(&self) -> Option<u64> {
        self.all().filter_map(|l| l.clusters.first().copied()).min()
    }

    /// Syncs every hidden layer (data and index records): a boundary after which a power
    /// loss must find them.
    fn sync_hidden(&mut self) -> io::Result<()> {
        for h in &mut self.hidden {
            if h.layer.is_unsynced() {
                h.layer.sync()?;
            }
        }
        Ok(())
    }

    fn is_empty(&self) -> bool {
        self.all().all(|l| l.clusters.is_empty())
    }

    /// Drops `cluster` from every layer (it was committed to base).
    fn remove(&mut self, cluster: u64) {
        self.active.clusters.remove(&cluster);
        for h in &mut self.hidden {
            h.layer.clusters.remove(&cluster);
        }
    }

    /// From now on the files outlive the process (the state file names them).
    fn keep_files(&mut self) {
        self.active.discard_on_drop = false;
        for h in &mut self.hidden {
            h.layer.discard_on_drop = false;
        }
    }

    /// These layers are no longer needed: their files go when they are dropped.
    fn discard_files(&mut self) {
        self.active.discard_on_drop = true;
        for h in &mut self.hidden {
            h.layer.discard_on_drop = true;
        }
    }
}

/// Where the disk buffer stands (QEMU `block/replication.c` has the same three stages).
enum Stage {
    /// Replicating: the primary's stream goes to base behind hidden, the SVM writes to active.
    Buffering(Layers),
    /// `failover()` started: the stream and checkpoints are refused; the layers only shrink
    /// as their clusters are committed to base.
    Committing(Layers),
    /// Failover committed everything: the disk is plain `base`.
    Standalone,
}

impl Stage {
    fn layers(&self) -> Option<&Layers> {
        match self {
            Stage::Buffering(l) | Stage::Committing(l) => Some(l),
            Stage::Standalone => None,
        }
    }
}

struct State {
    stage: Stage,
    epoch: u64,
    /// Consistency groups: the last group checkpoint and the one prepared (layers.state).
    group: GroupRecord,
    /// The state file says `"open"` in this boot: changes may go to the layers unsynced.
    /// False after a state file that says the layers are synced (`"open": null`): the next
    /// stream change records `"open"` first.
    open: bool,
    /// See [`LayerStats::needs_resync`] (recorded in the state file).
    needs_resync: bool,
}

/// The secondary's disk: the hidden and active layers over the secondary disk (`base`).
///
/// All methods take `&self` and are internally synchronised: the thread applying the primary's
/// stream, the SVM's queue threads and the thread driving checkpoints and failover can share it.
/// SVM reads run concurrently with each other; everything else is serialised by one lock (held
/// per request or batch, or per small batch of clusters during failover).
pub struct LayeredDisk {
    base: Arc<dyn BlockDevice>,
    /// The base image opened a second time without readahead, for copy-before-write reads
    /// ([`RawImage::random_reader`]); `None`: they go through `base`.
    cbw_reader: Option<File>,
    /// Where the layer directory lives (the file system; a simulated disk in the power-loss
    /// tests). `base` is flushed through it, naming why ([`SyncPoint`]).
    media: Arc<dyn Media>,
    dir: PathBuf,
    capacity: u64,
    cluster_size: u64,
    /// The disk id of `base` (replication metadata; 0: unknown): recorded in `layers.state` and
    /// every layer file, checked when they are opened.
    owner: u128,
    state: RwLock<State>,
    next_file: AtomicU64,
    reaper_tx: Option<mpsc::Sender<Layers>>,
    reaper: Option<JoinHandle<()>>,
    /// Where the SVM's changes to base go once a failover started (`None`: base itself). Each
    /// change holds the read lock while it runs, so replacing it waits for the changes in
    /// flight and holds new ones back (stop the world, see [`LayeredDisk::set_through`]).
    through: RwLock<Option<Arc<dyn BlockDevice>>>,
}

impl fmt::Debug for LayeredDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayeredDisk")
            .field("dir", &self.dir)
            .field("capacity", &self.capacity)
            .field("cluster_size", &self.cluster_size)
            .field("stats", &self.stats())
            .finish()
    }
}

impl LayeredDisk {
    /// Opens the layers over `base` in `dir` (created if missing), with `cluster_size` bytes
    /// per cluster: a power of two between [`MIN_CLUSTER_SIZE`] and [`MAX_CLUSTER_SIZE`]
    /// ([`DEFAULT_CLUSTER_SIZE`] is a good choice).
    ///
    /// A directory that holds a state file is reopened as it was left: the same epoch, the same
    /// buffered clusters (rollback data and SVM writes), a failover in progress still in
    /// progress (call [`LayeredDisk::failover`] to finish it). Otherwise fresh layers are made.
    /// The layer files are `dir/hidden-<n>.img` and `dir/active-<n>.img`.
    pub fn new(
        base: Arc<dyn BlockDevice>,
        dir: impl AsRef<Path>,
        cluster_size: u64,
    ) -> io::Result<Self> {
        Self::new_owned(base, dir, cluster_size, 0)
    }

    /// [`LayeredDisk::new`] for the disk with id `owner` (its replication metadata's): a
    /// directory whose state file or layer files belong to another disk is refused before
    /// anything in it is changed.
    pub fn new_owned(
        base: Arc<dyn BlockDevice>,
        dir: impl AsRef<Path>,
        cluster_size: u64,
        owner: u128,
    ) -> io::Result<Self> {
        Self::open_on(std_media(), base, dir.as_ref(), cluster_size, owner)
    }

    /// [`LayeredDisk::new_owned`] with the layer directory on `media` (the simulated disk of
    /// the power-loss tests; `base` lives there too).
    pub fn open_on(
        media: Arc<dyn Media>,
        base: Arc<dyn BlockDevice>,
        dir: &Path,
        cluster_size: u64,
        owner: u128,
    ) -> io::Result<Self> {
        if !cluster_size.is_power_of_two()
            || !(MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&cluster_size)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "cluster size {cluster_size} must be a power of two between \
                     {MIN_CLUSTER_SIZE} and {MAX_CLUSTER_SIZE}"
                ),
            ));
        }
        let dir = dir.to_path_buf();
        media.create_dir_all(&dir)?;
        let saved = SavedState::load(&*media, &dir)?;
        let next_file = layer::layer_files(&media, &dir)?
            .iter()
            .filter_map(|n| file_number(n))
            .max()
            .map_or(0, |n| n + 1);
        let (reaper_tx, reaper) = if media.background_unlinks() {
            let (tx, rx) = mpsc::channel::<Layers>();
            let reaper = std::thread::Builder::new()
                .name("colo-layer-reaper".into())
                .spawn(move || {
                    for layers in rx {
                        let t = Instant::now();
                        drop(layers);
                        log::debug!("dropped old layers in {:?}", t.elapsed());
                    }
                })?;
            (Some(tx), Some(reaper))
        } else {
            (None, None)
        };
        let cbw_reader = base.as_raw_image().and_then(RawImage::random_reader);
        let mut disk = LayeredDisk {
            capacity: base.capacity(),
            base,
            cbw_reader,
            media,
            dir,
            cluster_size,
            owner,
            state: RwLock::new(State {
                stage: Stage::Standalone,
                epoch: 0,
                group: GroupRecord::default(),
                open: false,
                needs_resync: false,
            }),
            next_file: AtomicU64::new(next_file),
            reaper_tx,
            reaper,
            through: RwLock::new(None),
        };
        let state = match saved {
            Some(saved) => disk.reopen(saved)?,
            None => {
                let mut layers = disk.create_layers()?;
                disk.saved(
                    GroupRecord::default(),
                    0,
                    SavedStage::Buffering,
                    Some(&layers),
                )
                .store(&*disk.media, &disk.dir)?;
                layers.keep_files();
                State {
                    stage: Stage::Buffering(layers),
                    epoch: 0,
                    group: GroupRecord::default(),
                    open: true,
                    needs_resync: false,
                }
            }
        };
        *disk.state.get_mut().unwrap_or_else(PoisonError::into_inner) = state;
        Ok(disk)
    }

    /// Rebuilds the state a previous process left in the directory.
    fn reopen(&self, saved: SavedState) -> io::Result<State> {
        if saved.capacity != self.capacity || saved.cluster_size != self.cluster_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "the layer directory {} belongs to a {}-byte disk with {}-byte clusters \
                     (this disk: {} bytes, --cluster-size {}); use that cluster size, or a new \
                     directory for a new disk",
                    self.dir.display(),
                    saved.capacity,
                    saved.cluster_size,
                    self.capacity,
                    self.cluster_size
                ),
            ));
        }
        self.check_owner(saved.disk_id.as_deref())?;
        let boot = self.media.boot_tag();
        let lost_power = saved.open.is_some_and(|b| b == 0 || b != boot);
        if lost_power && saved.stage == SavedStage::Buffering {
            return self.reopen_after_power_loss(saved);
        }
        let mut named: Vec<String> = saved.hidden.iter().map(|h| h.file.clone()).collect();
        named.extend(saved.active.clone());
        // Layer files not named are left-overs of a crash between creating and naming them
        // (or of removing them after a checkpoint): this disk's own, never another's.
        let strays: Vec<String> = layer::layer_files(&self.media, &self.dir)?
            .into_iter()
            .filter(|f| !named.contains(f))
            .collect();
        for f in &strays {
            let path = self.dir.join(f);
            match Layer::owner_of(&self.media, &path, self.capacity)? {
                Some(o) if self.owner != 0 && o != self.owner => {
                    return Err(layer::foreign_layer(&path, o, self.owner))
                }
                _ => {}
            }
        }
        for f in strays {
            log::info!("removing stray layer file {f}");
            self.media.remove_file(&self.dir.join(&f))?;
        }
        let stage = match (saved.stage, saved.active) {
            (SavedStage::Standalone, _) => Stage::Standalone,
            (stage, Some(active)) if !saved.hidden.is_empty() => {
                let mut removed = BTreeSet::new();
                let mut hidden = Vec::new();
                for h in saved.hidden {
                    let layer = self.open_layer(&h.file, Kind::Hidden, &mut removed)?;
                    hidden.push(Hidden {
                        layer,
                        marks: h.marks,
                    });
                }
                let active = self.open_layer(&active, Kind::Active, &mut removed)?;
                let mut layers = Layers {
                    active,
                    hidden,
                    pending: Vec::new(),
                };
                for c in removed {
                    layers.remove(c);
                }
                if stage == SavedStage::Committing {
                    Stage::Committing(layers)
                } else {
                    Stage::Buffering(layers)
                }
            }
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}/{} names no layers",
                        self.dir.display(),
                        state::STATE_FILE
                    ),
                ))
            }
        };
        let st = State {
            stage,
            epoch: saved.epoch,
            group: saved.group,
            open: saved.open.is_some(),
            needs_resync: saved.needs_resync,
        };
        let stats = self.stats_of(&st);
        log::info!(
            "layers reopened: epoch {}, {} bytes of rollback data, {} bytes of Secondary VM \
             writes{}",
            st.epoch,
            stats.hidden_bytes,
            stats.active_bytes,
            match st.stage {
                Stage::Committing(_) => ", failover in progress",
                Stage::Standalone => ", failed over",
                Stage::Buffering(_) => "",
            }
        );
        Ok(st)
    }

    /// The layers were open (held unsynced changes) when the machine lost power: nothing in
    /// them is trusted. One state file change names fresh empty layers, keeps the epoch and
    /// records `needs_resync`; then the old files go. A crash before the rename finds the old
    /// state and starts again; after it, the flag.
    fn reopen_after_power_loss(&self, saved: SavedState) -> io::Result<State> {
        for f in layer::layer_files(&self.media, &self.dir)? {
            let path = self.dir.join(&f);
            match Layer::owner_of(&self.media, &path, self.capacity)? {
                Some(o) if self.owner != 0 && o != self.owner => {
                    return Err(layer::foreign_layer(&path, o, self.owner))
                }
                _ => {}
            }
        }
        let mut layers = self.create_layers()?;
        self.saved(
            GroupRecord::default(),
            saved.epoch,
            SavedStage::Buffering,
            Some(&layers),
        )
        .needing_resync(true)
        .store(&*self.media, &self.dir)?;
        layers.keep_files();
        let keep: Vec<String> = layers.all().map(Layer::file_name).collect();
        for f in layer::layer_files(&self.media, &self.dir)? {
            if !keep.contains(&f) {
                self.media.remove_file(&self.dir.join(&f))?;
            }
        }
        log::warn!(
            "layers reopened after a power loss while they held unsynced changes (epoch {}): \
             dropped; the Secondary VM's view is no checkpoint until the primary has resent \
             its changes and the next checkpoint; a failover is refused until then unless forced",
            saved.epoch
        );
        Ok(State {
            stage: Stage::Buffering(layers),
            epoch: saved.epoch,
            group: GroupRecord::default(),
            open: true,
            needs_resync: true,
        })
    }

    fn open_layer(&self, name: &str, kind: Kind, removed: &mut BTreeSet<u64>) -> io::Result<Layer> {
        Layer::open(
            &self.media,
            self.dir.join(name),
            kind,
            self.capacity,
            self.cluster_size,
            self.owner,
            removed,
        )
    }

    /// Refuses a state file that names another disk (`recorded`, 32 hex digits). A state file
    /// without a disk id (written before ids were recorded) is adopted.
    fn check_owner(&self, recorded: Option<&str>) -> io::Result<()> {
        let Some(recorded) = recorded else {
            return Ok(());
        };
        if self.owner == 0 || u128::from_str_radix(recorded, 16).ok() == Some(self.owner) {
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the layer directory {} belongs to disk {recorded}, not to this disk \
                 ({:032x}); nothing in it was changed. Each disk needs a --layer-dir of its \
                 own: if that disk is gone for good, empty the directory (its rollback data \
                 is lost with it), or use a new one",
                self.dir.display(),
                self.owner
            ),
        ))
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    /// Whether `failover()` has been called (the primary stream is refused from then on).
    pub fn is_failed_over(&self) -> bool {
        !matches!(self.read_state().stage, Stage::Buffering(_))
    }

    /// Whether a failover started and has not completed (a restarted secondary resumes it).
    pub fn failover_pending(&self) -> bool {
        matches!(self.read_state().stage, Stage::Committing(_))
    }

    /// Current sizes and state.
    pub fn stats(&self) -> LayerStats {
        self.stats_of(&self.read_state())
    }

    fn stats_of(&self, st: &State) -> LayerStats {
        let (hidden_bytes, active_bytes) = match st.stage.layers() {
            Some(l) => (
                l.hidden.iter().map(|h| self.layer_bytes(&h.layer)).sum(),
                self.layer_bytes(&l.active),
            ),
            None => (0, 0),
        };
        LayerStats {
            hidden_bytes,
            active_bytes,
            cluster_size: self.cluster_size,
            epoch: st.epoch,
            failed_over: !matches!(st.stage, Stage::Buffering(_)),
            needs_resync: st.needs_resync,
        }
    }

    /// The tentative COLO cuts (markers received while the SVM was stopped), oldest first.
    pub fn marks(&self) -> Vec<Mark> {
        match self.read_state().stage.layers() {
            Some(l) => l
                .hidden
                .iter()
                .flat_map(|h| h.marks.iter().cloned())
                .chain(l.pending.iter().cloned())
                .collect(),
            None => Vec::new(),
        }
    }

    /// A clean stop: the layers are synced and the state file says so (`"open": null`), so
    /// that a power loss before the next start needs no resync. Changes after it reopen the
    /// layers as usual.
    pub fn close(&self) -> io::Result<()> {
        let mut st = self.write_state();
        if !st.open {
            return Ok(());
        }
        let (group, epoch, needs_resync) = (st.group, st.epoch, st.needs_resync);
        let Stage::Buffering(layers) = &mut st.stage else {
            return Ok(());
        };
        layers.sync_hidden()?;
        self.saved(group, epoch, SavedStage::Buffering, Some(layers))
            .synced()
            .needing_resync(needs_resync)
            .store(&*self.media, &self.dir)?;
        st.open = false;
        Ok(())
    }

    /// Flushes base for the reason `at`.
    fn flush_base(&self, at: SyncPoint) -> io::Result<()> {
        self.media.flush_device(&*self.base, at)
    }

    fn read_state(&self) -> RwLockReadGuard<'_, State> {
        // The state is consistent even if a holder panicked: maps are updated after the I/O.
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// What the state file says for these layers.
    fn saved(
        &self,
        group: GroupRecord,
        epoch: u64,
        stage: SavedStage,
        layers: Option<&Layers>,
    ) -> SavedState {
        let mut saved = SavedState::new(self.capacity, self.cluster_size);
        saved.disk_id = (self.owner != 0).then(|| format!("{:032x}", self.owner));
        saved.epoch = epoch;
        saved.group = group;
        saved.stage = stage;
        // Only a buffering disk takes unsynced changes; a failover records `null` after
        // syncing the layers it commits from.
        saved.open = (stage == SavedStage::Buffering).then(|| self.media.boot_tag());
        if let Some(l) = layers {
            saved.active = Some(l.active.file_name());
            saved.hidden = l
                .hidden
                .iter()
                .map(|h| SavedHidden {
                    file: h.layer.file_name(),
                    marks: h.marks.clone(),
                })
                .collect();
        }
        saved
    }

    /// A fresh file name for a hidden layer of a tentative cut.
    fn new_hidden_file(&self) -> PathBuf {
        loop {
            let n = self.next_file.fetch_add(1, Ordering::Relaxed);
            let path = self.dir.join(format!("hidden-{n}.img"));
            if !self.media.exists(&path) {
                return path;
            }
        }
    }

    /// A fresh pair of empty layers, `hidden-<n>.img` and `active-<n>.img` (`n` never reusing
    /// an existing file's name).
    fn create_layers(&self) -> io::Result<Layers> {
        loop {
            let n = self.next_file.fetch_add(1, Ordering::Relaxed);
            let create = |kind: &str, k: Kind| {
                Layer::create(
                    &self.media,
                    self.dir.join(format!("{kind}-{n}.img")),
                    k,
                    self.capacity,
                    self.owner,
                )
            };
            let hidden = match create("hidden", Kind::Hidden) {
                Ok(l) => l,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            };
            let active = match create("active", Kind::Active) {
                Ok(l) => l,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            };
            return Ok(Layers {
                active,
                hidden: vec![Hidden {
                    layer: hidden,
                    marks: Vec::new(),
                }],
                pending: Vec::new(),
            });
        }
    }

    /// Hands old layers to the background thread that unlinks and closes them.
    fn reap(&self, layers: Layers) {
        match &self.reaper_tx {
            Some(tx) => {
                if let Err(mpsc::SendError(layers)) = tx.send(layers) {
                    drop(layers);
                }
            }
            None => drop(layers),
        }
    }

    /// Indices of the clusters `[offset, offset + len)` touches (the range is checked).
    fn clusters(&self, offset: u64, len: u64) -> Range<u64> {
        if len == 0 {
            return 0..0;
        }
        offset / self.cluster_size..(offset + len - 1) / self.cluster_size + 1
    }

    /// Offset and length of a cluster (the last one may be cut short by the capacity).
    fn span(&self, cluster: u64) -> (u64, usize) {
        let start = cluster * self.cluster_size;
        (start, self.cluster_size.min(self.capacity - start) as usize)
    }

    fn layer_bytes(&self, layer: &Layer) -> u64 {
        let mut bytes = layer.clusters.len() as u64 * self.cluster_size;
        let tail = self.capacity % self.cluster_size;
        if tail != 0 && layer.has(self.capacity / self.cluster_size) {
            bytes -= self.cluster_size - tail;
        }
        bytes
    }
}

impl Drop for LayeredDisk {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        // The current layers stay on disk: the state file names them.
        drop(std::mem::replace(&mut st.stage, Stage::Standalone));
        // Closing the channel ends the reaper once it has dropped what it was given.
        drop(self.reaper_tx.take());
        if let Some(h) = self.reaper.take() {
            let _ = h.join();
        }
    }
}

/// The number in a layer file's name (`hidden-12.img` → 12).
fn file_number(name: &str) -> Option<u64> {
    name.strip_suffix(".img")?.rsplit('-').next()?.parse().ok()
}

/// [`LayerError::ReplicationOver`] where the stream's `io::Error`s are made.
fn replication_over() -> io::Error {
    LayerError::ReplicationOver.into()
}

#[cfg(test)]
mod tests;
