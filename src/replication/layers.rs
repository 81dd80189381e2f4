//! The secondary's disk buffer: the hidden and active layers of QEMU's block replication design.
//!
//! ```text
//!   Secondary VM reads ──►  active  (SVM writes since the last checkpoint)
//!                             │ miss
//!                             ▼
//!                           hidden  (original content of clusters the primary changed
//!                             │ miss          since the last checkpoint)
//!                             ▼
//!   primary stream ──────►  base    (the secondary disk; always equals the primary's disk)
//! ```
//!
//! - The replicated write stream from the primary ([`LayeredDisk::apply_primary`])
//!   goes to `base`, after *copy-before-write*: every cluster it touches that the hidden layer
//!   does not hold yet in this epoch is read from `base` and saved in hidden first. Hidden never
//!   overwrites a cluster it already holds, so it keeps the content as of the last checkpoint.
//! - The Secondary VM sees [`LayeredDisk`] as a [`BlockDevice`]: per cluster, reads come from
//!   active if it holds the cluster, else hidden, else base. Its writes go to active (partial
//!   clusters are read-modify-written from that same view) and never reach base.
//! - [`LayeredDisk::checkpoint`] drops both layers in constant time: fresh empty layer files are
//!   swapped in and the old ones are unlinked and closed by a background thread.
//! - [`LayeredDisk::failover`] writes the SVM's view of every buffered cluster (active, else
//!   hidden) into base, cluster by cluster while the SVM keeps running, and then serves the SVM
//!   straight from base: it is a plain standalone disk again.
//!
//! Each layer is a sparse file the size of the disk, holding its data at the same offset as on
//! the disk, plus an in-memory set of the clusters it holds: memory grows with the buffered data,
//! not with the disk, and the data itself never lives in RAM.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::storage::{check_range, fallocate, BlockDevice, Change};

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

/// A snapshot of the layered disk's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerStats {
    /// Bytes held by the hidden layer (clusters saved by copy-before-write this epoch).
    pub hidden_bytes: u64,
    /// Bytes held by the active layer (clusters the SVM wrote this epoch).
    pub active_bytes: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Number of checkpoints taken so far.
    pub epoch: u64,
    /// `failover()` has been called: the primary stream and checkpoints are refused. While the
    /// commit runs, `hidden_bytes + active_bytes` is what is left to commit.
    pub failed_over: bool,
}

/// One layer: a sparse file the size of the disk and the set of clusters it holds.
struct Layer {
    file: File,
    path: PathBuf,
    /// Indices of the clusters present in this layer.
    clusters: BTreeSet<u64>,
    /// No write to the file ever failed, so the regions of clusters that are not present are
    /// still holes of the fresh file (they read back as zeros): storing an all-zero cluster
    /// needs no write. Only used for hidden, whose absent clusters are written exactly once.
    pristine: bool,
}

impl Layer {
    fn create(path: PathBuf, size: u64) -> io::Result<Layer> {
        // std opens with O_CLOEXEC.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        // From here on, dropping the layer removes the file.
        let layer = Layer {
            file,
            path,
            clusters: BTreeSet::new(),
            pristine: true,
        };
        layer.file.set_len(size)?;
        Ok(layer)
    }

    fn has(&self, cluster: u64) -> bool {
        self.clusters.contains(&cluster)
    }

    /// Stores cluster-aligned `data` at `offset`. On a pristine layer, all-zero clusters are not
    /// written (their region of the file is still a hole).
    fn store(&mut self, data: &[u8], offset: u64, cluster_size: usize) -> io::Result<()> {
        let r = if self.pristine {
            self.store_nonzero(data, offset, cluster_size)
        } else {
            self.file.write_all_at(data, offset)
        };
        if r.is_err() {
            self.pristine = false;
        }
        r
    }

    fn store_nonzero(&self, data: &[u8], offset: u64, cluster_size: usize) -> io::Result<()> {
        let mut i = 0;
        while i < data.len() {
            let e = (i + cluster_size).min(data.len());
            if is_zero(&data[i..e]) {
                i = e;
                continue;
            }
            // Extend the run of non-zero clusters and write it in one go.
            let mut j = e;
            while j < data.len() {
                let e = (j + cluster_size).min(data.len());
                if is_zero(&data[j..e]) {
                    break;
                }
                j = e;
            }
            self.file.write_all_at(&data[i..j], offset + i as u64)?;
            i = j;
        }
        Ok(())
    }
}

impl Drop for Layer {
    fn drop(&mut self) {
        // Unlink now; the blocks are freed when `file` is closed right after.
        if let Err(e) = fs::remove_file(&self.path) {
            log::warn!("cannot remove layer file {}: {e}", self.path.display());
        }
    }
}

/// The two layers of one epoch.
struct Layers {
    hidden: Layer,
    active: Layer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Active,
    Hidden,
    Base,
}

impl Layers {
    /// Where the SVM's view of `cluster` lives.
    fn source(&self, cluster: u64) -> Source {
        if self.active.has(cluster) {
            Source::Active
        } else if self.hidden.has(cluster) {
            Source::Hidden
        } else {
            Source::Base
        }
    }

    /// The lowest cluster either layer holds.
    fn first_cluster(&self) -> Option<u64> {
        match (self.active.clusters.first(), self.hidden.clusters.first()) {
            (Some(&a), Some(&h)) => Some(a.min(h)),
            (a, h) => a.or(h).copied(),
        }
    }

    fn is_empty(&self) -> bool {
        self.active.clusters.is_empty() && self.hidden.clusters.is_empty()
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
}

/// The secondary's disk: the hidden and active layers over the secondary disk (`base`).
///
/// All methods take `&self` and are internally synchronised: the thread applying the primary's
/// stream, the SVM's queue threads and the thread driving checkpoints and failover can share it.
/// SVM reads run concurrently with each other; everything else is serialised by one lock (held
/// per request, or per small batch of clusters during failover).
pub struct LayeredDisk {
    base: Arc<dyn BlockDevice>,
    dir: PathBuf,
    capacity: u64,
    cluster_size: u64,
    state: RwLock<State>,
    next_file: AtomicU64,
    reaper_tx: Option<mpsc::Sender<Layers>>,
    reaper: Option<JoinHandle<()>>,
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
    /// Builds the layers over `base` in `dir` (created if missing), with `cluster_size` bytes
    /// per cluster: a power of two between [`MIN_CLUSTER_SIZE`] and [`MAX_CLUSTER_SIZE`]
    /// ([`DEFAULT_CLUSTER_SIZE`] is a good choice).
    ///
    /// The layer files are `dir/hidden-<n>.img` and `dir/active-<n>.img` (a fresh pair per
    /// checkpoint, `n` never reusing an existing file); they are removed when dropped.
    pub fn new(
        base: Arc<dyn BlockDevice>,
        dir: impl AsRef<Path>,
        cluster_size: u64,
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
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir)?;
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
        let mut disk = LayeredDisk {
            capacity: base.capacity(),
            base,
            dir,
            cluster_size,
            state: RwLock::new(State {
                stage: Stage::Standalone,
                epoch: 0,
            }),
            next_file: AtomicU64::new(0),
            reaper_tx: Some(tx),
            reaper: Some(reaper),
        };
        let layers = disk.create_layers()?;
        disk.state
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .stage = Stage::Buffering(layers);
        Ok(disk)
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    /// Whether `failover()` has been called (the primary stream is refused from then on).
    #[cfg(test)]
    fn is_failed_over(&self) -> bool {
        !matches!(self.read_state().stage, Stage::Buffering(_))
    }

    /// Current sizes and state.
    pub fn stats(&self) -> LayerStats {
        let st = self.read_state();
        let (hidden_bytes, active_bytes) = match st.stage.layers() {
            Some(l) => (self.layer_bytes(&l.hidden), self.layer_bytes(&l.active)),
            None => (0, 0),
        };
        LayerStats {
            hidden_bytes,
            active_bytes,
            cluster_size: self.cluster_size,
            epoch: st.epoch,
            failed_over: !matches!(st.stage, Stage::Buffering(_)),
        }
    }

    /// Applies a change of the primary's stream: copy-before-write into hidden of every
    /// cluster it touches, then the change on base. A discard becomes a write-zeroes with unmap
    /// on base, so that base stays byte-identical to the primary's raw image, which reads zeros
    /// after a discard. A flush makes base and both layers durable.
    ///
    /// Fails once `failover()` has been called.
    pub fn apply_primary(&self, change: &Change<&[u8]>) -> io::Result<()> {
        if let Change::Flush = change {
            if !matches!(self.read_state().stage, Stage::Buffering(_)) {
                return Err(replication_over());
            }
            return self.flush();
        }
        let (offset, len) = change.range();
        check_range(self.capacity, offset, len)?;
        let mut st = self.write_state();
        let Stage::Buffering(layers) = &mut st.stage else {
            return Err(replication_over());
        };
        if len == 0 {
            return Ok(()); // (a raw image's fallocate refuses empty ranges)
        }
        self.save_originals(&mut layers.hidden, offset, len)?;
        match *change {
            Change::Write { offset, data } => self.base.write_at(data, offset),
            Change::WriteZeroes { offset, len, unmap } => {
                self.base.write_zeroes(offset, len, unmap)
            }
            Change::Discard { offset, len } => self.base.write_zeroes(offset, len, true),
            Change::Flush => unreachable!("handled above"),
        }
    }

    /// Checkpoint: base now equals the primary's disk and becomes the SVM's view; both layers
    /// are dropped. Fresh empty layer files are swapped in under the lock and the old ones are
    /// unlinked and closed by a background thread, so the call costs the same whatever the
    /// amount of buffered data.
    ///
    /// Fails once `failover()` has been called.
    pub fn checkpoint(&self) -> io::Result<()> {
        if !matches!(self.read_state().stage, Stage::Buffering(_)) {
            return Err(replication_over());
        }
        // Create the new files before taking the lock, so the swap is all the lock covers.
        let fresh = self.create_layers()?;
        let old = {
            let mut st = self.write_state();
            let Stage::Buffering(layers) = &mut st.stage else {
                drop(st);
                drop(fresh);
                return Err(replication_over());
            };
            let old = std::mem::replace(layers, fresh);
            st.epoch += 1;
            old
        };
        self.reap(old);
        Ok(())
    }

    /// Failover: commits the SVM's view to base and turns the disk into plain `base`.
    ///
    /// The primary stream and checkpoints are refused from the start. Every cluster held by a
    /// layer gets its view (active if present, else hidden) written to base, a small batch of
    /// clusters per lock acquisition, so the SVM keeps being served meanwhile and sees the same
    /// content at every step. With no SVM writes this rolls the disk back to the last
    /// checkpoint. Base is flushed, the layers are dropped, and from then on SVM I/O goes
    /// straight to base.
    ///
    /// Idempotent; after an I/O error, calling it again resumes the commit.
    pub fn failover(&self) -> io::Result<()> {
        if !self.begin_failover() {
            return Ok(());
        }
        let per_batch = (COMMIT_BATCH / self.cluster_size).max(1) as usize;
        let mut buf = Vec::new();
        while !self.commit_batch(per_batch, &mut buf)? {
            // Let waiting SVM requests have the lock before the next batch.
            std::thread::yield_now();
        }
        self.base.flush()?;
        let old = {
            let mut st = self.write_state();
            match std::mem::replace(&mut st.stage, Stage::Standalone) {
                Stage::Committing(l) if l.is_empty() => Some(l),
                other => {
                    st.stage = other;
                    None
                }
            }
        };
        if let Some(old) = old {
            self.reap(old);
            log::info!("failover: done, serving the disk directly");
        }
        Ok(())
    }

    /// Refuses the primary stream from now on. Returns false if there is nothing to commit
    /// (a previous failover completed).
    fn begin_failover(&self) -> bool {
        let mut st = self.write_state();
        match std::mem::replace(&mut st.stage, Stage::Standalone) {
            Stage::Buffering(l) => {
                st.stage = Stage::Committing(l);
                log::info!("failover: committing the secondary's layers to the disk");
                true
            }
            Stage::Committing(l) => {
                st.stage = Stage::Committing(l);
                true
            }
            Stage::Standalone => false,
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

    fn read_state(&self) -> RwLockReadGuard<'_, State> {
        // The state is consistent even if a holder panicked: maps are updated after the I/O.
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn create_layers(&self) -> io::Result<Layers> {
        loop {
            let n = self.next_file.fetch_add(1, Ordering::Relaxed);
            let create =
                |kind: &str| Layer::create(self.dir.join(format!("{kind}-{n}.img")), self.capacity);
            let hidden = match create("hidden") {
                Ok(l) => l,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            };
            let active = match create("active") {
                Ok(l) => l,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            };
            return Ok(Layers { hidden, active });
        }
    }

    /// Hands old layers to the background thread that unlinks and closes them.
    fn reap(&self, layers: Layers) {
        if let Some(tx) = &self.reaper_tx {
            if let Err(mpsc::SendError(layers)) = tx.send(layers) {
                drop(layers);
            }
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

    /// Copy-before-write: saves in hidden the current base content of every cluster of the
    /// range that hidden does not hold yet. Never touches a cluster hidden already holds.
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
            buf.resize((stop - start) as usize, 0);
            self.base.read_at(&mut buf, start)?;
            hidden.store(&buf, start, cs as usize)?;
            hidden.clusters.extend(c..end);
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
            match src {
                Source::Active => layers.active.file.read_exact_at(dst, pos)?,
                Source::Hidden => layers.hidden.file.read_exact_at(dst, pos)?,
                Source::Base => self.base.read_at(dst, pos)?,
            }
            pos = run_end;
        }
        Ok(())
    }

    /// Reads one cluster of the view from a layer (not from base) into `buf`.
    fn read_layer_cluster(
        &self,
        layers: &Layers,
        src: Source,
        cluster: u64,
        buf: &mut Vec<u8>,
    ) -> io::Result<()> {
        let (start, len) = self.span(cluster);
        buf.resize(len, 0);
        match src {
            Source::Active => layers.active.file.read_exact_at(buf, start),
            Source::Hidden => layers.hidden.file.read_exact_at(buf, start),
            Source::Base => self.base.read_at(buf, start),
        }
    }

    /// Failover step: writes the view of `cluster` to base and drops it from both layers.
    fn commit_cluster(
        &self,
        layers: &mut Layers,
        cluster: u64,
        buf: &mut Vec<u8>,
    ) -> io::Result<()> {
        let src = layers.source(cluster);
        if src != Source::Base {
            self.read_layer_cluster(layers, src, cluster, buf)?;
            self.base.write_at(buf, cluster * self.cluster_size)?;
        }
        layers.active.clusters.remove(&cluster);
        layers.hidden.clusters.remove(&cluster);
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

    fn apply_to_base(&self, change: Change<&[u8]>) -> io::Result<()> {
        change.apply_to(&*self.base)
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
            self.read_layer_cluster(layers, src, c, &mut buf)?;
            layers.active.file.write_all_at(&buf, start)?;
            layers.active.clusters.insert(c);
        }
        match change {
            Change::Write { data, .. } => layers.active.file.write_all_at(data, offset)?,
            // Discard on the SVM side reads back as zeros too: deterministic.
            Change::WriteZeroes { .. } | Change::Discard { .. } => {
                zero_file_range(&layers.active.file, offset, len)?
            }
            Change::Flush => {}
        }
        layers.active.clusters.extend(range);
        Ok(())
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
        // Sync duplicates of the layer descriptors outside the lock: a long fsync must not
        // stall the primary stream (and, behind its waiting write lock, the SVM's reads).
        let files = {
            let st = self.read_state();
            match st.stage.layers() {
                Some(l) => Some((l.active.file.try_clone()?, l.hidden.file.try_clone()?)),
                None => None,
            }
        };
        if let Some((active, hidden)) = files {
            active.sync_data()?;
            hidden.sync_data()?;
        }
        self.base.flush()
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
        drop(std::mem::replace(&mut st.stage, Stage::Standalone));
        // Closing the channel ends the reaper once it has dropped what it was given.
        drop(self.reaper_tx.take());
        if let Some(h) = self.reaper.take() {
            let _ = h.join();
        }
    }
}

fn replication_over() -> io::Error {
    io::Error::other("replication is over: the secondary has failed over")
}

fn is_zero(data: &[u8]) -> bool {
    data.iter().all(|&b| b == 0)
}

/// Makes `[offset, offset + len)` of a layer file read back as zeros, freeing the blocks when
/// the file system can.
fn zero_file_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    match fallocate::punch_hole(file, offset, len) {
        Err(e) if fallocate::is_unsupported(&e) => {}
        r => return r,
    }
    let zeros = vec![0u8; ZERO_CHUNK.min(len as usize)];
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let n = (end - pos).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{RawImage, RawImageOptions};
    use proptest::prelude::*;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    const SECTOR: u64 = 512;

    /// The primary stream's changes, one per kind.
    impl LayeredDisk {
        fn primary_write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
            self.apply_primary(&Change::Write { offset, data })
        }
        fn primary_write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
            self.apply_primary(&Change::WriteZeroes { offset, len, unmap })
        }
        fn primary_discard(&self, offset: u64, len: u64) -> io::Result<()> {
            self.apply_primary(&Change::Discard { offset, len })
        }
    }

    /// Deterministic bytes for a write: depend on the seed and the absolute disk offset.
    fn pattern(seed: u32, offset: u64, len: usize) -> Vec<u8> {
        (0..len as u64)
            .map(|i| {
                let x = (offset + i)
                    .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    .wrapping_add(u64::from(seed).wrapping_mul(0x2545_f491_4f6c_dd1d));
                (x >> 56) as u8 | 1 // never zero, so zero-skipping cannot hide bugs
            })
            .collect()
    }

    fn raw(dir: &Path, size: u64) -> Arc<RawImage> {
        Arc::new(
            RawImage::open(&RawImageOptions {
                path: dir.join("disk.img"),
                read_only: false,
                direct: false,
                create_size: Some(size),
            })
            .unwrap(),
        )
    }

    fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
        let mut v = vec![0u8; dev.capacity() as usize];
        dev.read_at(&mut v, 0).unwrap();
        v
    }

    fn read(dev: &dyn BlockDevice, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        dev.read_at(&mut v, offset).unwrap();
        v
    }

    fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
        if a == b {
            return None; // memcmp: fast even in debug builds
        }
        if a.len() != b.len() {
            return Some(a.len().min(b.len()));
        }
        a.iter().zip(b).position(|(x, y)| x != y)
    }

    fn layer_files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .map(|rd| {
                rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("hidden-") || n.starts_with("active-"))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Waits for the reaper to remove old layer files.
    fn wait_for_files(dir: &Path, want: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let files = layer_files(dir);
            if files == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "layer files {files:?}, want {want:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    // ---- model-based test ----

    #[derive(Debug, Clone)]
    enum Op {
        PrimaryWrite {
            sector: u64,
            sectors: u64,
            seed: u32,
        },
        PrimaryZeroes {
            sector: u64,
            sectors: u64,
            unmap: bool,
        },
        PrimaryDiscard {
            sector: u64,
            sectors: u64,
        },
        SvmWrite {
            sector: u64,
            sectors: u64,
            seed: u32,
        },
        SvmZeroes {
            sector: u64,
            sectors: u64,
            unmap: bool,
        },
        SvmDiscard {
            sector: u64,
            sectors: u64,
        },
        SvmRead {
            sector: u64,
            sectors: u64,
        },
        Checkpoint,
        /// Starts the failover and commits only this many clusters: the SVM then runs on a
        /// half-committed disk until a full `Failover`.
        FailoverPartial {
            clusters: u8,
        },
        Failover,
    }

    fn op_strategy() -> impl Strategy<Value = Op> {
        // Offsets and lengths in sectors: unaligned to clusters, sometimes spanning several.
        let range = (0u64..512, prop_oneof![3 => 0u64..24, 1 => 0u64..200]);
        prop_oneof![
            5 => (range.clone(), any::<u32>())
                .prop_map(|((sector, sectors), seed)| Op::PrimaryWrite { sector, sectors, seed }),
            1 => (range.clone(), any::<bool>())
                .prop_map(|((sector, sectors), unmap)| Op::PrimaryZeroes { sector, sectors, unmap }),
            1 => range.clone().prop_map(|(sector, sectors)| Op::PrimaryDiscard { sector, sectors }),
            4 => (range.clone(), any::<u32>())
                .prop_map(|((sector, sectors), seed)| Op::SvmWrite { sector, sectors, seed }),
            1 => (range.clone(), any::<bool>())
                .prop_map(|((sector, sectors), unmap)| Op::SvmZeroes { sector, sectors, unmap }),
            1 => range.clone().prop_map(|(sector, sectors)| Op::SvmDiscard { sector, sectors }),
            3 => range.prop_map(|(sector, sectors)| Op::SvmRead { sector, sectors }),
            1 => Just(Op::Checkpoint),
            1 => (0u8..8).prop_map(|clusters| Op::FailoverPartial { clusters }),
            1 => Just(Op::Failover),
        ]
    }

    /// Runs `ops` against a LayeredDisk and the reference model:
    /// - `primary`: the primary's disk (base must equal it until failover);
    /// - `checkpoint`: the primary's disk at the last checkpoint;
    /// - `view`: the SVM's view, i.e. `checkpoint` with the SVM's writes since applied
    ///   (after failover, base must equal it);
    /// - `hidden`, `active`: the clusters each layer must hold (for `stats()`).
    fn run_model(cluster_size: u64, capacity: u64, ops: &[Op]) -> Result<(), TestCaseError> {
        #[derive(PartialEq)]
        enum Mode {
            Replicating,
            Committing,
            Standalone,
        }
        let tmp = tempfile::tempdir().unwrap();
        let base = raw(tmp.path(), capacity);
        let initial = pattern(0xa5a5, 0, capacity as usize);
        base.write_at(&initial, 0).unwrap();
        // Leave a zero hole in the initial disk to exercise hidden's zero-cluster skipping.
        base.write_zeroes(capacity / 4, capacity / 8, true).unwrap();
        let mut primary = read_all(&*base);
        let ld_dir = tmp.path().join("layers");
        let ld = LayeredDisk::new(base.clone(), &ld_dir, cluster_size).unwrap();
        let mut checkpoint = primary.clone();
        let mut view = primary.clone();
        let mut hidden = BTreeSet::new();
        let mut active = BTreeSet::new();
        let mut mode = Mode::Replicating;
        let mut epoch = 0;
        let cap_sectors = capacity / SECTOR;
        let clip = |sector: u64, sectors: u64| {
            let sector = sector % cap_sectors;
            let sectors = sectors.min(cap_sectors - sector);
            ((sector * SECTOR) as usize, (sectors * SECTOR) as usize)
        };
        let clusters = |off: usize, len: usize| ld.clusters(off as u64, len as u64);
        let bytes = |set: &BTreeSet<u64>| -> u64 {
            set.iter()
                .map(|&c| cluster_size.min(capacity - c * cluster_size))
                .sum()
        };

        for (i, op) in ops.iter().enumerate() {
            let streaming = mode == Mode::Replicating;
            // Applies a primary op's outcome to the model.
            let mut primary_op = |r: io::Result<()>, off: usize, data: Option<&[u8]>, len| {
                if !streaming {
                    prop_assert!(r.is_err(), "op {i}: stream accepted after failover");
                    return Ok(());
                }
                r.unwrap();
                match data {
                    Some(d) => primary[off..off + len].copy_from_slice(d),
                    None => primary[off..off + len].fill(0),
                }
                hidden.extend(clusters(off, len));
                Ok(())
            };
            match *op {
                Op::PrimaryWrite {
                    sector,
                    sectors,
                    seed,
                } => {
                    let (off, len) = clip(sector, sectors);
                    let data = pattern(seed, off as u64, len);
                    primary_op(ld.primary_write(off as u64, &data), off, Some(&data), len)?;
                }
                Op::PrimaryZeroes {
                    sector,
                    sectors,
                    unmap,
                } => {
                    let (off, len) = clip(sector, sectors);
                    let r = ld.primary_write_zeroes(off as u64, len as u64, unmap);
                    primary_op(r, off, None, len)?;
                }
                Op::PrimaryDiscard { sector, sectors } => {
                    let (off, len) = clip(sector, sectors);
                    primary_op(ld.primary_discard(off as u64, len as u64), off, None, len)?;
                }
                Op::SvmWrite { .. } | Op::SvmZeroes { .. } | Op::SvmDiscard { .. } => {
                    let (off, len, data) = match *op {
                        Op::SvmWrite {
                            sector,
                            sectors,
                            seed,
                        } => {
                            let (off, len) = clip(sector, sectors);
                            let data = pattern(seed ^ 0x5555, off as u64, len);
                            ld.write_at(&data, off as u64).unwrap();
                            (off, len, Some(data))
                        }
                        Op::SvmZeroes {
                            sector,
                            sectors,
                            unmap,
                        } => {
                            let (off, len) = clip(sector, sectors);
                            ld.write_zeroes(off as u64, len as u64, unmap).unwrap();
                            (off, len, None)
                        }
                        Op::SvmDiscard { sector, sectors } => {
                            let (off, len) = clip(sector, sectors);
                            ld.discard(off as u64, len as u64).unwrap();
                            (off, len, None)
                        }
                        _ => unreachable!(),
                    };
                    match data {
                        Some(d) => view[off..off + len].copy_from_slice(&d),
                        None => view[off..off + len].fill(0),
                    }
                    match mode {
                        Mode::Replicating => active.extend(clusters(off, len)),
                        Mode::Committing => {
                            for c in clusters(off, len) {
                                active.remove(&c);
                                hidden.remove(&c);
                            }
                        }
                        Mode::Standalone => {}
                    }
                }
                Op::SvmRead { sector, sectors } => {
                    let (off, len) = clip(sector, sectors);
                    let got = read(&ld, off as u64, len);
                    prop_assert!(
                        first_diff(&got, &view[off..off + len]).is_none(),
                        "op {i}: SVM read {off}+{len} differs at +{:?}",
                        first_diff(&got, &view[off..off + len])
                    );
                }
                Op::Checkpoint => {
                    let r = ld.checkpoint();
                    if streaming {
                        r.unwrap();
                        epoch += 1;
                        checkpoint = primary.clone();
                        view = checkpoint.clone();
                        hidden.clear();
                        active.clear();
                    } else {
                        prop_assert!(r.is_err(), "op {i}: checkpoint accepted after failover");
                    }
                }
                Op::FailoverPartial { clusters: n } => {
                    if ld.begin_failover() {
                        mode = Mode::Committing;
                        ld.commit_batch(n as usize, &mut Vec::new()).unwrap();
                        for _ in 0..n {
                            let first = active.union(&hidden).next().copied();
                            if let Some(c) = first {
                                active.remove(&c);
                                hidden.remove(&c);
                            }
                        }
                    }
                }
                Op::Failover => {
                    ld.failover().unwrap();
                    mode = Mode::Standalone;
                    hidden.clear();
                    active.clear();
                }
            }

            // Invariants after every step.
            let base_now = read_all(&*base);
            match mode {
                Mode::Replicating => prop_assert!(
                    first_diff(&base_now, &primary).is_none(),
                    "op {i} ({op:?}): base differs from the primary disk at byte {:?}",
                    first_diff(&base_now, &primary)
                ),
                // Half committed: base is a mix; only the view is defined.
                Mode::Committing => {}
                Mode::Standalone => prop_assert!(
                    first_diff(&base_now, &view).is_none(),
                    "op {i} ({op:?}): base differs from the SVM view at byte {:?}",
                    first_diff(&base_now, &view)
                ),
            }
            let view_now = read_all(&ld);
            prop_assert!(
                first_diff(&view_now, &view).is_none(),
                "op {i} ({op:?}): SVM view differs at byte {:?}",
                first_diff(&view_now, &view)
            );
            let s = ld.stats();
            let want = LayerStats {
                hidden_bytes: bytes(&hidden),
                active_bytes: bytes(&active),
                cluster_size,
                epoch,
                failed_over: mode != Mode::Replicating,
            };
            prop_assert_eq!(s, want, "op {}", i);
        }
        let _ = checkpoint;
        ld.flush().unwrap();
        drop(ld);
        prop_assert!(layer_files(&ld_dir).is_empty(), "layer files left behind");
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn model(
            cluster_size in prop_oneof![Just(4096u64), Just(8192u64)],
            short_tail in any::<bool>(),
            ops in prop::collection::vec(op_strategy(), 1..60),
        ) {
            // 256 KiB, or cut short so that the last cluster is partial.
            let capacity = if short_tail { (256 << 10) - 1536 } else { 256 << 10 };
            run_model(cluster_size, capacity, &ops)?;
        }
    }

    // ---- unit tests ----

    fn setup(capacity: u64, cluster_size: u64) -> (tempfile::TempDir, Arc<RawImage>, LayeredDisk) {
        let tmp = tempfile::tempdir().unwrap();
        let base = raw(tmp.path(), capacity);
        let ld = LayeredDisk::new(base.clone(), tmp.path().join("layers"), cluster_size).unwrap();
        (tmp, base, ld)
    }

    #[test]
    fn copy_before_write_never_overwrites_hidden() {
        let (_t, base, ld) = setup(1 << 20, 65536);
        let original = pattern(1, 0, 1 << 20);
        base.write_at(&original, 0).unwrap();
        // Two primary writes to the same cluster: hidden must keep the first original.
        ld.primary_write(65536 + 512, &pattern(2, 0, 8192)).unwrap();
        ld.primary_write(65536, &pattern(3, 0, 65536 * 2)).unwrap();
        ld.primary_write_zeroes(65536 + 4096, 4096, false).unwrap();
        ld.primary_discard(65536, 512).unwrap();
        assert_eq!(
            read(&ld, 0, 1 << 20),
            original,
            "SVM view is the checkpoint"
        );
        assert_eq!(ld.stats().hidden_bytes, 2 * 65536);
        ld.failover().unwrap();
        assert_eq!(read_all(&*base), original, "failover restores the original");
    }

    #[test]
    fn checkpoint_then_failover_rolls_back_to_the_checkpoint() {
        let (_t, base, ld) = setup(1 << 20, 4096);
        base.write_at(&pattern(1, 0, 1 << 20), 0).unwrap();
        ld.primary_write(10_000, &pattern(2, 10_000, 50_000))
            .unwrap();
        ld.checkpoint().unwrap();
        let at_checkpoint = read_all(&*base);
        assert_eq!(read_all(&ld), at_checkpoint);
        ld.primary_write(20_480, &pattern(3, 20_480, 70_000))
            .unwrap();
        ld.primary_write(20_992, &pattern(4, 20_992, 1024)).unwrap();
        assert_eq!(read_all(&ld), at_checkpoint);
        ld.failover().unwrap();
        assert_eq!(read_all(&*base), at_checkpoint);
        assert_eq!(ld.stats().epoch, 1);
    }

    #[test]
    fn svm_writes_stay_off_base_until_failover() {
        let (_t, base, ld) = setup(1 << 20, 65536);
        let original = pattern(1, 0, 1 << 20);
        base.write_at(&original, 0).unwrap();
        // SVM writes a partial cluster; the primary then changes the same cluster.
        let svm = pattern(7, 0, 1000);
        ld.write_at(&svm, 70_000).unwrap();
        ld.primary_write(65536, &pattern(8, 0, 65536)).unwrap();
        assert_eq!(read_all(&*base)[65536..131072], pattern(8, 0, 65536)[..]);
        let mut want = original.clone();
        want[70_000..71_000].copy_from_slice(&svm);
        assert_eq!(read_all(&ld), want);
        assert_eq!(ld.stats().active_bytes, 65536);
        ld.failover().unwrap();
        assert_eq!(read_all(&*base), want);
        // Standalone from now on: plain reads and writes on base.
        ld.write_at(&[9; 512], 0).unwrap();
        want[..512].fill(9);
        assert_eq!(read_all(&*base), want);
        assert_eq!(read_all(&ld), want);
    }

    #[test]
    fn hidden_does_not_store_zero_clusters() {
        let (_t, _base, ld) = setup(16 << 20, 65536);
        // The base is a fresh sparse image: the originals are all zeros.
        ld.primary_write(0, &vec![0xee; 8 << 20]).unwrap();
        let st = ld.read_state();
        let hidden = &st.stage.layers().unwrap().hidden;
        assert_eq!(hidden.clusters.len(), 128);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(hidden.file.metadata().unwrap().blocks(), 0);
        drop(st);
        assert_eq!(read(&ld, 0, 8 << 20), vec![0; 8 << 20]);
    }

    #[test]
    fn stream_and_checkpoint_refused_after_failover() {
        let (_t, _base, ld) = setup(1 << 20, 4096);
        ld.failover().unwrap();
        ld.failover().unwrap();
        assert!(ld.is_failed_over());
        assert!(ld.primary_write(0, &[1; 512]).is_err());
        assert!(ld.primary_write_zeroes(0, 512, false).is_err());
        assert!(ld.primary_discard(0, 512).is_err());
        assert!(ld.checkpoint().is_err());
        let s = ld.stats();
        assert!(s.failed_over);
        assert_eq!((s.hidden_bytes, s.active_bytes), (0, 0));
    }

    #[test]
    fn out_of_range_is_an_error() {
        let (_t, _base, ld) = setup(1 << 20, 4096);
        let cap = 1u64 << 20;
        let inval = |r: io::Result<()>| {
            assert_eq!(r.unwrap_err().kind(), io::ErrorKind::InvalidInput);
        };
        for failed_over in [false, true] {
            if failed_over {
                ld.failover().unwrap();
            }
            let mut buf = [0u8; 512];
            inval(ld.read_at(&mut buf, cap - 511));
            inval(ld.read_at(&mut buf, u64::MAX - 10));
            inval(ld.write_at(&buf, cap));
            inval(ld.write_at(&buf, u64::MAX));
            inval(ld.write_zeroes(cap - 512, 1024, true));
            inval(ld.discard(u64::MAX, 2));
            if !failed_over {
                inval(ld.primary_write(cap - 1, &buf));
                inval(ld.primary_write(u64::MAX - 100, &buf));
                inval(ld.primary_write_zeroes(0, cap + 1, false));
                inval(ld.primary_discard(cap, 1));
                inval(ld.primary_discard(1, u64::MAX));
            }
            // Empty requests at the very end are fine.
            ld.read_at(&mut [], cap).unwrap();
            ld.write_at(&[], cap).unwrap();
        }
    }

    #[test]
    fn invalid_cluster_sizes_are_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let base = raw(tmp.path(), 1 << 20);
        for cs in [0, 512, 2048, 3 * 4096, 65537, MAX_CLUSTER_SIZE * 2] {
            let err = LayeredDisk::new(base.clone(), tmp.path().join("l"), cs).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{cs}");
        }
        let ld = LayeredDisk::new(base, tmp.path().join("l"), DEFAULT_CLUSTER_SIZE).unwrap();
        assert_eq!(ld.cluster_size(), DEFAULT_CLUSTER_SIZE);
    }

    #[test]
    fn layer_files_are_named_rotated_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let base = raw(tmp.path(), 1 << 20);
        let dir = tmp.path().join("layers");
        // A stale file with a colliding name is skipped, never clobbered.
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("active-0.img"), b"not ours").unwrap();
        let ld = LayeredDisk::new(base, &dir, 4096).unwrap();
        assert_eq!(
            layer_files(&dir),
            ["active-0.img", "active-1.img", "hidden-1.img"]
        );
        ld.primary_write(0, &[1; 8192]).unwrap();
        ld.checkpoint().unwrap();
        wait_for_files(&dir, &["active-0.img", "active-2.img", "hidden-2.img"]);
        assert_eq!(
            fs::metadata(dir.join("hidden-2.img")).unwrap().len(),
            1 << 20
        );
        drop(ld);
        assert_eq!(layer_files(&dir), ["active-0.img"]);
        assert_eq!(fs::read(dir.join("active-0.img")).unwrap(), b"not ours");
    }

    /// Checkpoint correctness with little and much buffered data. (Its cost does not depend on
    /// the amount: see `checkpoint_drop_timing`, which is ignored because it measures.)
    #[test]
    fn checkpoint_drops_small_and_large_buffers() {
        for buffered in [1u64 << 20, 64 << 20] {
            let (tmp, base, ld) = setup(buffered + (1 << 20), 65536);
            let dir = tmp.path().join("layers");
            let original = vec![0x11u8; buffered as usize];
            base.write_at(&original, 0).unwrap();
            ld.primary_write(0, &vec![0x22; buffered as usize]).unwrap();
            ld.write_at(&[0x33; 1 << 20], 512).unwrap();
            let s = ld.stats();
            assert_eq!(s.hidden_bytes, buffered);
            assert_eq!(s.active_bytes, (1 << 20) + 65536);
            ld.checkpoint().unwrap();
            let s = ld.stats();
            assert_eq!((s.hidden_bytes, s.active_bytes, s.epoch), (0, 0, 1));
            wait_for_files(&dir, &["active-1.img", "hidden-1.img"]);
            // The view is now the primary's disk; a failover right away changes nothing.
            let at_checkpoint = read_all(&*base);
            assert_eq!(read_all(&ld), at_checkpoint);
            ld.failover().unwrap();
            assert_eq!(read_all(&*base), at_checkpoint);
            wait_for_files(&dir, &[]);
        }
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            // xorshift64*
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// The primary stream, three SVM queue threads and then a failover, all at once. The SVM
    /// threads own interleaved 1536-byte runs of the first 2 MiB (so they share clusters and
    /// race on read-modify-write) and check that they read back their own writes, never the
    /// primary's. At the end the disk holds the SVM's writes and, elsewhere, the content of
    /// the last checkpoint (the initial disk).
    #[test]
    fn concurrent_stream_svm_and_failover() {
        const CAP: u64 = 4 << 20;
        const RUN: u64 = 1536;
        const THREADS: u64 = 3;
        const OWNED: u64 = 2 << 20;
        let (_t, base, ld) = setup(CAP, 4096);
        let initial = pattern(42, 0, CAP as usize);
        base.write_at(&initial, 0).unwrap();
        let ld = Arc::new(ld);
        let stop = Arc::new(AtomicBool::new(false));
        let runs = OWNED / RUN;

        let svm: Vec<_> = (0..THREADS)
            .map(|t| {
                let ld = ld.clone();
                let stop = stop.clone();
                let mut model = initial.clone();
                std::thread::spawn(move || {
                    let mut rng = Rng(0x1234 + t);
                    let mine = |r: u64| r % THREADS == t;
                    let mut ops = 0u64;
                    while !stop.load(Ordering::Relaxed) || ops < 200 {
                        ops += 1;
                        let r = rng.below(runs / THREADS) * THREADS + t;
                        let off = r * RUN;
                        match rng.below(4) {
                            0 | 1 => {
                                let data = pattern(rng.next() as u32, off, RUN as usize);
                                ld.write_at(&data, off).unwrap();
                                model[off as usize..(off + RUN) as usize].copy_from_slice(&data);
                            }
                            2 => {
                                ld.write_zeroes(off, RUN, rng.below(2) == 0).unwrap();
                                model[off as usize..(off + RUN) as usize].fill(0);
                            }
                            _ => {
                                // A read over many runs; only ours are checked.
                                let first = r.saturating_sub(20);
                                let last = (r + 20).min(runs - 1);
                                let got =
                                    read(&*ld, first * RUN, ((last - first + 1) * RUN) as usize);
                                for rr in (first..=last).filter(|&rr| mine(rr)) {
                                    let a = ((rr - first) * RUN) as usize;
                                    let b = (rr * RUN) as usize;
                                    assert_eq!(
                                        got[a..a + RUN as usize],
                                        model[b..b + RUN as usize],
                                        "thread {t} run {rr}"
                                    );
                                }
                            }
                        }
                    }
                    model
                })
            })
            .collect();

        let primary = {
            let ld = ld.clone();
            let mut model = initial.clone();
            std::thread::spawn(move || {
                let mut rng = Rng(99);
                for _ in 0..400 {
                    let off = rng.below(CAP / SECTOR) * SECTOR;
                    let len = ((1 + rng.below(128)) * SECTOR).min(CAP - off);
                    if rng.below(5) == 0 {
                        ld.primary_write_zeroes(off, len, false).unwrap();
                        model[off as usize..(off + len) as usize].fill(0);
                    } else {
                        let data = pattern(rng.next() as u32, off, len as usize);
                        ld.primary_write(off, &data).unwrap();
                        model[off as usize..(off + len) as usize].copy_from_slice(&data);
                    }
                }
                model
            })
        };
        let primary_model = primary.join().unwrap();
        assert!(first_diff(&read_all(&*base), &primary_model).is_none());

        ld.failover().unwrap();
        stop.store(true, Ordering::Relaxed);
        let models: Vec<Vec<u8>> = svm.into_iter().map(|h| h.join().unwrap()).collect();

        let disk = read_all(&*base);
        for (i, &byte) in disk.iter().enumerate() {
            let pos = i as u64;
            let want = if pos < OWNED {
                models[((pos / RUN) % THREADS) as usize][i]
            } else {
                initial[i]
            };
            assert_eq!(byte, want, "byte {i}");
        }
        assert_eq!(ld.stats().hidden_bytes + ld.stats().active_bytes, 0);
    }

    /// Measures what a checkpoint costs with 1 MiB and 1 GiB buffered, and how long the
    /// background drop of the old layer (unlink + close of the file) takes.
    /// Run: `cargo test --lib layers::tests::checkpoint_drop_timing -- --ignored --nocapture`
    /// (set COLO_TIMING_DIR to measure on another file system than the temp dir's).
    #[test]
    #[ignore]
    fn checkpoint_drop_timing() {
        let root = std::env::var_os("COLO_TIMING_DIR").map(PathBuf::from);
        for size in [1u64 << 20, 1 << 30] {
            let tmp = match &root {
                Some(r) => tempfile::tempdir_in(r).unwrap(),
                None => tempfile::tempdir().unwrap(),
            };
            let chunk = vec![0x5au8; 8 << 20];

            // 1. Removing one layer-like file with `size` bytes of data, written back to disk
            //    or still dirty in the page cache: the unlink, then the close of the last
            //    descriptor (which frees the blocks).
            for synced in [true, false] {
                let path = tmp.path().join("hidden-x.img");
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .unwrap();
                let mut pos = 0;
                while pos < size {
                    let n = (size - pos).min(chunk.len() as u64);
                    file.write_all_at(&chunk[..n as usize], pos).unwrap();
                    pos += n;
                }
                if synced {
                    file.sync_all().unwrap();
                }
                let t = Instant::now();
                fs::remove_file(&path).unwrap();
                let unlink = t.elapsed();
                let t = Instant::now();
                drop(file);
                let close = t.elapsed();
                eprintln!(
                    "{:>5} MiB layer file ({}): unlink {unlink:?}, close {close:?}",
                    size >> 20,
                    if synced { "synced" } else { "dirty" }
                );
            }

            // 2. checkpoint() with `size` bytes in hidden: call time, and time until the
            //    background thread has removed the old files.
            let base = raw(tmp.path(), size);
            let ld = LayeredDisk::new(base.clone(), tmp.path().join("layers"), 65536).unwrap();
            let mut pos = 0;
            while pos < size {
                let n = (size - pos).min(chunk.len() as u64);
                base.write_at(&chunk[..n as usize], pos).unwrap();
                pos += n;
            }
            let other = vec![0xa5u8; 8 << 20];
            let mut pos = 0;
            while pos < size {
                let n = (size - pos).min(other.len() as u64);
                ld.primary_write(pos, &other[..n as usize]).unwrap();
                pos += n;
            }
            ld.flush().unwrap();
            assert_eq!(ld.stats().hidden_bytes, size);
            let t = Instant::now();
            ld.checkpoint().unwrap();
            let call = t.elapsed();
            let dir = tmp.path().join("layers");
            while layer_files(&dir) != ["active-1.img", "hidden-1.img"] {
                std::thread::sleep(Duration::from_micros(100));
            }
            let reaped = t.elapsed();
            eprintln!(
                "{:>5} MiB buffered: checkpoint() returned in {call:?}, \
                 old layers gone after {reaped:?}",
                size >> 20
            );
        }
    }
}
