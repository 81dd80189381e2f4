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
mod tests;
