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
//!   device (the log's [`LoggedDisk`], later a promoted primary) instead of directly.
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
//! (`state.rs`). docs/layers.md has the formats and why a crash at any point is recoverable.

mod layer;
mod state;

use std::collections::BTreeSet;
use std::fmt;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use layer::{Kind, Layer};
pub use state::{GroupCommitted, GroupPrepared, GroupRecord, Mark};
use state::{SavedHidden, SavedStage, SavedState};

use super::dirty::{DirtyLog, LoggedDisk};
use crate::storage::durable::{std_media, DurableFile, Media, SyncPoint};
use crate::storage::{check_range, fallocate, BlockDevice, Change, RawImage};

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
        let mut fresh = self.saved(
            GroupRecord::default(),
            saved.epoch,
            SavedStage::Buffering,
            Some(&layers),
        );
        fresh.needs_resync = true;
        fresh.store(&*self.media, &self.dir)?;
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
    fn apply_writes(&self, writes: &[Change<&[u8]>]) -> io::Result<()> {
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
            let mut saved = self.saved(group, epoch, SavedStage::Buffering, Some(layers));
            saved.needs_resync = st.needs_resync;
            saved.store(&*self.media, &self.dir)?;
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
            let mut saved = self.saved(group, epoch, SavedStage::Buffering, Some(layers));
            saved.needs_resync = needs_resync;
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
    fn cut(
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
    pub fn failover(&self) -> io::Result<()> {
        self.failover_logged(None)
    }

    /// [`LayeredDisk::failover`] that keeps a dirty record of the failed-over disk in `log`:
    /// before the commit writes its first cluster, the range of every cluster any layer holds
    /// (hidden ones it rolls back, active ones it commits) is durably set in the log, and the
    /// SVM's changes reach base through a [`LoggedDisk`] over it (recorded before written)
    /// from then on. On a resumed commit the clusters still buffered are recorded again
    /// (idempotent); those committed before were recorded by the first attempt.
    pub fn failover_logged(&self, log: Option<Arc<DirtyLog>>) -> io::Result<()> {
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
    fn begin_failover(&self, log: Option<Arc<DirtyLog>>, force: bool) -> io::Result<bool> {
        let mut st = self.write_state();
        if st.needs_resync && !force && matches!(st.stage, Stage::Buffering(_)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the secondary lost power while its layers held unsynced changes: its disk is \
                 no checkpoint until the primary has resent its changes and a checkpoint \
                 followed; fail over with force to take it as it is (crash-consistent)",
            ));
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
                let mut saved = self.saved(group, epoch, SavedStage::Committing, Some(l));
                saved.open = None;
                saved.needs_resync = needs_resync;
                saved.store(&*self.media, &self.dir)?;
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
    fn commit_batch(&self, max: usize, buf: &mut Vec<u8>) -> io::Result<bool> {
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

    fn through_mut(&self) -> RwLockWriteGuard<'_, Option<Arc<dyn BlockDevice>>> {
        self.through.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Routes the SVM's changes to base through `dev` from now on (a failed-over disk only:
    /// its dirty log's [`LoggedDisk`], or a promoted primary). Waits until the changes in
    /// flight are done and holds new ones back meanwhile; returns the previous device.
    pub fn set_through(
        &self,
        dev: Arc<dyn BlockDevice>,
    ) -> io::Result<Option<Arc<dyn BlockDevice>>> {
        if !self.is_failed_over() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the disk buffer has not failed over",
            ));
        }
        Ok(self.through_mut().replace(dev))
    }

    /// Like [`LayeredDisk::set_through`], with the new device made by `make` while the SVM's
    /// changes are held back (it sees the current one): what `make` reads of the disk's state
    /// cannot be changed by a write racing with the switch.
    pub fn replace_through(
        &self,
        make: impl FnOnce(Option<&Arc<dyn BlockDevice>>) -> io::Result<Arc<dyn BlockDevice>>,
    ) -> io::Result<()> {
        if !matches!(self.read_state().stage, Stage::Standalone) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the disk buffer has not finished its failover",
            ));
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
    /// A disk that [needs a resync](LayerStats::needs_resync) is refused unless `force`.
    pub fn prepare_failover(&self, log: Option<Arc<DirtyLog>>, force: bool) -> io::Result<()> {
        self.begin_failover(log, force).map(drop)
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
        let mut saved = self.saved(group, epoch, SavedStage::Buffering, Some(layers));
        saved.open = None;
        saved.needs_resync = needs_resync;
        saved.store(&*self.media, &self.dir)?;
        st.open = false;
        Ok(())
    }

    /// The device the SVM's changes go through, if any.
    pub fn through(&self) -> Option<Arc<dyn BlockDevice>> {
        self.through
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
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

    /// Copy-before-write: saves in `hidden` the current base content of every cluster of the
    /// range that it does not hold yet. Never touches a cluster it already holds.
    fn save_originals(&self, hidden: &mut Layer, offset: u64, len: u64) -> io::Result<()> {
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

    /// Reads the SVM's view, one I/O per run of clusters with the same source.
    fn read_view(&self, layers: &Layers, buf: &mut [u8], offset: u64) -> io::Result<()> {
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
    fn read_cluster(
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

    /// Failover step: writes the view of `cluster` to base and drops it from every layer.
    fn commit_cluster(
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

    /// An SVM write, write-zeroes or discard.
    fn svm_change(&self, change: Change<&[u8]>) -> io::Result<()> {
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
    fn apply_to_base(&self, change: Change<&[u8]>) -> io::Result<()> {
        let through = self.through.read().unwrap_or_else(PoisonError::into_inner);
        match &*through {
            Some(dev) => change.apply_to(&**dev),
            None => change.apply_to(&*self.base),
        }
    }

    /// Applies an SVM change to active. The partial clusters at both ends that active does not
    /// hold yet are first filled from the view (hidden, else base); then the change is applied
    /// in one I/O and every touched cluster becomes present.
    fn write_active(&self, layers: &mut Layers, change: Change<&[u8]>) -> io::Result<()> {
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
    fn flush_layers(&self) -> io::Result<()> {
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

fn replication_over() -> io::Error {
    io::Error::other("replication is over: the secondary has failed over")
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

#[cfg(test)]
mod tests;
