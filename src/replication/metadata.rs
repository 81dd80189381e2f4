//! Replication metadata of one disk: its identity, the pair's generation history, the last
//! completed checkpoint and its role, kept in a small file beside the image (`IMAGE.colo-meta`),
//! and the decision both ends take from it on connect (see docs/replication-protocol.md,
//! "Identity and generations").
//!
//! ```text
//!  file (1024 bytes):  slot 0 [0..512)   slot 1 [512..1024)
//!  slot (little-endian): magic "COLOMETA" [0..8) | version u32 | seq u64 | disk size u64
//!        | role u8 [28] | roles[8] [29..37) | disk id u128 [37..53) | current | bitmap
//!        | source | epoch | history[4] (u64 each) | flags u32 [117..121) | last stop u8
//!        | stamp (size, mtime, ctime, inode: u64 each) [122..154) | zeros
//!        | crc32c of [0..508) (last 4 bytes)
//! ```
//!
//! An update writes the whole record into the slot *not* holding the newest valid copy (one
//! `pwrite` of 512 bytes, then `fdatasync`). A torn or lost write leaves the other slot, the
//! previous state, valid; the reader takes the valid slot with the higher sequence number.
//!
//! Generations are random 64-bit ids of a data lineage (DRBD's UUIDs): `current` names the data
//! on this disk; on a primary, `bitmap` names the generation a peer must hold for the dirty
//! record to cover every difference; `history` keeps older currents; on a secondary, `source`
//! names the primary generation whose stream it has applied since its last checkpoint.
//!
//! The decision table, [`decide_with`], is in `decide.rs`.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::storage::durable::{std_media, DurableFile, Media, Open, SyncPoint};

use serde::Serialize;

mod decide;
pub use decide::{
    decide, decide_with, Decision, Refusal, SyncPolicy, ALLOW_FULL_SYNC_FLAG, DISCARD_MY_DATA_FLAG,
};

/// The metadata's refusals, typed (the role transitions a disk's record does not allow, a
/// record that does not fit the image), and the media's errors. The texts are what operators
/// see; `io::Error` is made where the caller's I/O world begins (the primary's start, the
/// secondary's stream), with the refusals' kinds (`InvalidInput`, `InvalidData`).
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// A primary on a COLO secondary's disk that did not fail over.
    #[error(
        "this disk's replication metadata says it is a COLO secondary's disk, which holds no \
         checkpoint by itself: run replication-failover on that secondary first (or remove \
         the metadata file to start it as an unrelated disk)"
    )]
    SecondaryDisk,
    /// An unforced failover of an inconsistent disk (mid full sync or failback resync).
    #[error(
        "the secondary's disk is inconsistent (a full sync or a failback resync has not \
         reached a checkpoint): it holds no checkpoint to fail over to; use \
         replication-failover {{\"force\": true}} to take it anyway"
    )]
    Inconsistent,
    /// The end of an epoch of the primary's stream on a disk that failed over.
    #[error("failed over: no checkpoint of the primary any more")]
    FailedOver,
    /// The newest record describes a disk of another size.
    #[error("{}: the metadata describes a disk of {recorded} bytes, the image has {image}", path.display())]
    SizeMismatch {
        path: PathBuf,
        recorded: u64,
        image: u64,
    },
    /// The file holds no valid slot.
    #[error("{}: no valid metadata slot (remove the file to start over as an unrelated disk)", path.display())]
    NoValidSlot { path: PathBuf },
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl MetaError {
    /// The kind this error has as an `io::Error`.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            MetaError::SecondaryDisk | MetaError::Inconsistent => io::ErrorKind::InvalidInput,
            MetaError::SizeMismatch { .. } | MetaError::NoValidSlot { .. } => {
                io::ErrorKind::InvalidData
            }
            MetaError::FailedOver => io::ErrorKind::Other,
            MetaError::Io(e) => e.kind(),
        }
    }
}

impl From<MetaError> for io::Error {
    fn from(e: MetaError) -> io::Error {
        match e {
            MetaError::Io(e) => e,
            e => io::Error::new(e.kind(), e),
        }
    }
}

/// The secondary's failover carries the metadata's refusals as it carried them before they
/// were typed (`I/O: …`).
impl From<MetaError> for crate::replication::secondary::SecondaryError {
    fn from(e: MetaError) -> Self {
        Self::Io(e.into())
    }
}

/// The generation of a disk colo-blk created itself (all zeros): two such disks are equal.
pub const ZERO_GENERATION: u64 = 0x5a45_524f_5a45_524f; // "OREZOREZ"
/// Older generations remembered.
pub const HISTORY: usize = 4;

const MAGIC: &[u8; 8] = b"COLOMETA";
const FORMAT_VERSION: u32 = 1;
const SLOT: usize = 512;
/// Set on a secondary while its disk is the target of a full sync: it holds no checkpoint.
pub const FLAG_INCONSISTENT: u32 = 1;

/// What a disk was used as, recorded in its metadata (a code on disk). Not the process role
/// ([`crate::cli::RoleArg`]): a disk may have no role yet or have failed over, and a process
/// started with one role may find its disk recorded with another (e.g. a failback target).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskRole {
    /// No replication role yet.
    None,
    Primary,
    Secondary,
    /// A secondary that failed over: its own lineage now.
    FailedOver,
}

impl DiskRole {
    fn code(self) -> u8 {
        match self {
            DiskRole::None => 0,
            DiskRole::Primary => 1,
            DiskRole::Secondary => 2,
            DiskRole::FailedOver => 3,
        }
    }
    fn from_code(c: u8) -> DiskRole {
        match c {
            1 => DiskRole::Primary,
            2 => DiskRole::Secondary,
            3 => DiskRole::FailedOver,
            _ => DiskRole::None,
        }
    }
}

/// The generation information both ends exchange in HELLO / WELCOME.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Generations {
    pub disk_id: u128,
    pub current: u64,
    pub bitmap: u64,
    pub history: [u64; HISTORY],
    pub source: u64,
    /// Last completed checkpoint.
    pub epoch: u64,
    pub flags: u32,
}

/// Encoded size of [`Generations`].
pub const GENERATIONS_LEN: usize = 16 + 8 * 4 + 8 * HISTORY + 4;

impl Generations {
    /// What a primary whose image colo-blk has just created announces (tests and tools): a
    /// freshly created secondary needs only its dirty record.
    pub fn fresh_primary() -> Generations {
        Generations {
            disk_id: random_u128(),
            current: new_generation(),
            bitmap: ZERO_GENERATION,
            ..Default::default()
        }
    }

    pub fn inconsistent(&self) -> bool {
        self.flags & FLAG_INCONSISTENT != 0
    }

    /// Whether `g` is this side's current, bitmap or a remembered generation. The generation
    /// of a created disk is no common ancestor: two disks written since are unrelated.
    pub fn knows(&self, g: u64) -> bool {
        g != 0
            && g != ZERO_GENERATION
            && (g == self.current || g == self.bitmap || self.history.contains(&g))
    }

    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.disk_id.to_le_bytes());
        for v in [self.current, self.bitmap, self.source, self.epoch] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for h in self.history {
            out.extend_from_slice(&h.to_le_bytes());
        }
        out.extend_from_slice(&self.flags.to_le_bytes());
    }

    /// Decodes exactly [`GENERATIONS_LEN`] bytes.
    pub fn decode(b: &[u8]) -> Option<Generations> {
        if b.len() != GENERATIONS_LEN {
            return None;
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
        let mut history = [0u64; HISTORY];
        for (i, h) in history.iter_mut().enumerate() {
            *h = u64_at(48 + 8 * i);
        }
        Some(Generations {
            disk_id: u128::from_le_bytes(b[..16].try_into().ok()?),
            current: u64_at(16),
            bitmap: u64_at(24),
            source: u64_at(32),
            epoch: u64_at(40),
            history,
            flags: u32::from_le_bytes(b[48 + 8 * HISTORY..].try_into().ok()?),
        })
    }
}

/// What the image file looked like when a process last stopped cleanly: a later start that
/// finds another size, mtime, ctime or inode knows that another program changed the image in
/// between (a copy restored with its old mtime still has a new ctime).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImageStamp {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub inode: u64,
}

/// Encoded size of [`ImageStamp`].
const STAMP_LEN: usize = 32;

impl ImageStamp {
    /// The stamp of the image at `path`; `None` for a block device, whose node's times do not
    /// change when it is written.
    pub fn of(path: &Path) -> io::Result<Option<ImageStamp>> {
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(path)?;
        if !md.is_file() {
            return Ok(None);
        }
        let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
        Ok(Some(ImageStamp {
            size: md.len(),
            mtime_ns: ns(md.mtime(), md.mtime_nsec()),
            ctime_ns: ns(md.ctime(), md.ctime_nsec()),
            inode: md.ino(),
        }))
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.mtime_ns.to_le_bytes());
        out.extend_from_slice(&self.ctime_ns.to_le_bytes());
        out.extend_from_slice(&self.inode.to_le_bytes());
    }

    fn decode(b: &[u8]) -> Option<ImageStamp> {
        let at = |o: usize| -> Option<[u8; 8]> { b.get(o..o + 8)?.try_into().ok() };
        Some(ImageStamp {
            size: u64::from_le_bytes(at(0)?),
            mtime_ns: i64::from_le_bytes(at(8)?),
            ctime_ns: i64::from_le_bytes(at(16)?),
            inode: u64::from_le_bytes(at(24)?),
        })
    }
}

/// How the last process on this disk ended, as far as the image's own state goes (local to
/// this host; never sent to the peer).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LastStop {
    /// A process runs (or ran and did not stop cleanly: a crash or power loss). Nothing can be
    /// said about changes by other programs since.
    #[default]
    Running,
    /// The last process stopped cleanly and the image then looked like this.
    Clean(ImageStamp),
}

/// What [`MetaStore::start_run`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outside {
    /// Nothing says another program changed the image.
    Unchanged,
    /// The last process stopped cleanly and the image changed since (`was`, `now`).
    Changed { was: ImageStamp, now: ImageStamp },
    /// The last process did not stop cleanly: changes since cannot be seen.
    Unknown,
}

/// The whole metadata record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    pub gens: Generations,
    pub disk_size: u64,
    pub role: DiskRole,
    /// Newest first.
    pub roles: [DiskRole; 8],
    /// How the last process ended (slots written before this field read as `Running`).
    pub last_stop: LastStop,
    seq: u64,
}

impl Metadata {
    fn fresh(disk_size: u64, current: u64) -> Metadata {
        Metadata {
            gens: Generations {
                disk_id: random_u128(),
                current,
                ..Default::default()
            },
            disk_size,
            role: DiskRole::None,
            roles: [DiskRole::None; 8],
            last_stop: LastStop::Running,
            seq: 0,
        }
    }

    /// The image was written outside the pair (by a standalone process, or by another program
    /// while no colo-blk ran): no record says where, so this disk is no longer a copy of any
    /// generation. A secondary's disk holds no checkpoint (inconsistent: a failover to it is
    /// refused, the primary resyncs it fully); a primary's or failed-over disk takes a new
    /// generation that no peer holds (`bitmap = 0`: a peer needs a full sync); a disk without
    /// a role has unknown content.
    fn changed_outside(&mut self) {
        match self.role {
            DiskRole::Secondary => self.gens.flags |= FLAG_INCONSISTENT,
            DiskRole::Primary | DiskRole::FailedOver => {
                self.new_current();
                self.gens.bitmap = 0;
            }
            DiskRole::None => self.gens.current = 0,
        }
    }

    fn set_role(&mut self, role: DiskRole) {
        if self.role != role {
            self.roles.copy_within(0..7, 1);
            self.roles[0] = role;
            self.role = role;
        }
    }

    /// Takes a new current generation (the old one goes into the history).
    fn new_current(&mut self) {
        let g = &mut self.gens;
        if g.current != 0 {
            g.history.copy_within(0..HISTORY - 1, 1);
            g.history[0] = g.current;
        }
        g.current = new_generation();
    }

    fn encode(&self) -> [u8; SLOT] {
        let mut v = Vec::with_capacity(SLOT);
        v.extend_from_slice(MAGIC);
        v.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        v.extend_from_slice(&self.seq.to_le_bytes());
        v.extend_from_slice(&self.disk_size.to_le_bytes());
        v.push(self.role.code());
        v.extend(self.roles.iter().map(|r| r.code()));
        self.gens.encode_into(&mut v);
        // Appended after the generations: older builds ignore it (the crc covers the slot).
        match self.last_stop {
            LastStop::Running => v.extend_from_slice(&[0u8; 1 + STAMP_LEN]),
            LastStop::Clean(stamp) => {
                v.push(1);
                stamp.encode_into(&mut v);
            }
        }
        let mut out = [0u8; SLOT];
        out[..v.len()].copy_from_slice(&v);
        let crc = crc32c::crc32c(&out[..SLOT - 4]);
        out[SLOT - 4..].copy_from_slice(&crc.to_le_bytes());
        out
    }

    fn decode(b: &[u8]) -> Option<Metadata> {
        if b.len() != SLOT || &b[..8] != MAGIC {
            return None;
        }
        let crc = u32::from_le_bytes(b[SLOT - 4..].try_into().ok()?);
        if crc != crc32c::crc32c(&b[..SLOT - 4]) {
            return None;
        }
        if u32::from_le_bytes(b[8..12].try_into().ok()?) != FORMAT_VERSION {
            return None;
        }
        let mut roles = [DiskRole::None; 8];
        for (i, r) in roles.iter_mut().enumerate() {
            *r = DiskRole::from_code(b[29 + i]);
        }
        let tail = 37 + GENERATIONS_LEN;
        let last_stop = match b[tail] {
            1 => LastStop::Clean(ImageStamp::decode(&b[tail + 1..tail + 1 + STAMP_LEN])?),
            _ => LastStop::Running,
        };
        Some(Metadata {
            last_stop,
            seq: u64::from_le_bytes(b[12..20].try_into().ok()?),
            disk_size: u64::from_le_bytes(b[20..28].try_into().ok()?),
            role: DiskRole::from_code(b[28]),
            roles,
            gens: Generations::decode(&b[37..37 + GENERATIONS_LEN])?,
        })
    }
}

/// The metadata of one disk, in memory and (unless in-memory) in its file.
#[derive(Debug)]
pub struct MetaStore {
    file: Option<(Box<dyn DurableFile>, PathBuf)>,
    media: Arc<dyn Media>,
    meta: Mutex<Metadata>,
}

/// A `query-replication` view of the metadata.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MetaStatus {
    pub disk_id: String,
    pub current_generation: String,
    pub bitmap_generation: String,
    pub history: Vec<String>,
    pub checkpoint_epoch: u64,
    pub disk_role: DiskRole,
    pub inconsistent: bool,
}

fn hex(g: u64) -> String {
    format!("{g:016x}")
}

impl MetaStore {
    /// Opens `path` for a disk of `disk_size` bytes. Without a file (or when `created` says
    /// colo-blk has just created the image, so it is all zeros) a fresh record is written: its
    /// current generation is [`ZERO_GENERATION`] for a created image and 0 (unknown content)
    /// otherwise.
    pub fn open(path: &Path, disk_size: u64, created: bool) -> io::Result<MetaStore> {
        Self::open_on(std_media(), path, disk_size, created)
    }

    /// [`MetaStore::open`] on `media` (the simulated disk of the power-loss tests).
    pub fn open_on(
        media: Arc<dyn Media>,
        path: &Path,
        disk_size: u64,
        created: bool,
    ) -> io::Result<MetaStore> {
        let named = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        let file = media.open(path, Open::Create).map_err(named)?;
        let mut raw = vec![0u8; file.len().map_err(named)? as usize];
        file.read_at(&mut raw, 0).map_err(named)?;
        let slots: Vec<Metadata> = raw
            .chunks(SLOT)
            .take(2)
            .filter_map(Metadata::decode)
            .collect();
        let newest = slots.into_iter().max_by_key(|m| m.seq);
        let meta = match newest {
            Some(m) if !created => {
                if m.disk_size != disk_size {
                    return Err(MetaError::SizeMismatch {
                        path: path.to_path_buf(),
                        recorded: m.disk_size,
                        image: disk_size,
                    }
                    .into());
                }
                m
            }
            None if !raw.is_empty() && !created => {
                return Err(MetaError::NoValidSlot {
                    path: path.to_path_buf(),
                }
                .into())
            }
            _ => {
                let fresh = Metadata::fresh(disk_size, if created { ZERO_GENERATION } else { 0 });
                let store = MetaStore {
                    file: Some((file, path.to_path_buf())),
                    media,
                    meta: Mutex::new(fresh.clone()),
                };
                // The record as written (its sequence number), so that the next update goes
                // to the other slot, not over this one (found by the power-loss tests: a torn
                // first update left no valid slot).
                let written = store.write(fresh)?;
                *store.lock() = written;
                if let Some(dir) = path.parent() {
                    // Best effort, as before: the record itself is synced.
                    let _ = store.media.sync_dir(dir, SyncPoint::MetaDir);
                }
                return Ok(store);
            }
        };
        Ok(MetaStore {
            file: Some((file, path.to_path_buf())),
            media,
            meta: Mutex::new(meta),
        })
    }

    /// A record that lives only in memory, as for a disk colo-blk just created (unit tests).
    pub fn in_memory(disk_size: u64) -> MetaStore {
        MetaStore {
            file: None,
            media: std_media(),
            meta: Mutex::new(Metadata::fresh(disk_size, ZERO_GENERATION)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Metadata> {
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self) -> Metadata {
        self.lock().clone()
    }

    pub fn gens(&self) -> Generations {
        self.lock().gens
    }

    pub fn path(&self) -> Option<&Path> {
        self.file.as_ref().map(|(_, p)| p.as_path())
    }

    /// Writes `m` (with the next sequence number) to the other slot and syncs it.
    fn write(&self, m: Metadata) -> io::Result<Metadata> {
        let mut m = m;
        m.seq += 1;
        if let Some((f, path)) = &self.file {
            let slot = (m.seq % 2) * SLOT as u64;
            f.write_at(&m.encode(), slot)
                .and_then(|()| f.sync_data(SyncPoint::MetaSlot))
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        }
        Ok(m)
    }

    /// Applies `f` to a copy, makes it durable, then publishes it. Holding the lock across the
    /// write keeps updates in order.
    pub fn update(&self, f: impl FnOnce(&mut Metadata)) -> io::Result<Metadata> {
        let mut guard = self.lock();
        let mut m = guard.clone();
        f(&mut m);
        if m == *guard {
            return Ok(m);
        }
        let written = self.write(m)?;
        *guard = written.clone();
        Ok(written)
    }

    // ---- every process on this disk ----

    /// A process starts on this image (before it writes it): compares the image with the
    /// stamp of the last clean stop and, when another program changed it since, records that
    /// (see `Metadata::changed_outside`); then records that a process runs.
    pub fn start_run(&self, now: Option<ImageStamp>) -> io::Result<Outside> {
        let m = self.get();
        let outside = match (m.last_stop, now) {
            (LastStop::Running, _) => Outside::Unknown,
            (LastStop::Clean(was), Some(now)) if was != now => Outside::Changed { was, now },
            (LastStop::Clean(_), _) => Outside::Unchanged,
        };
        self.update(|m| {
            if matches!(outside, Outside::Changed { .. }) {
                m.changed_outside();
            }
            m.last_stop = LastStop::Running;
        })?;
        Ok(outside)
    }

    /// A standalone process is about to write this image outside the pair
    /// (`--detach-replication`): recorded before its first write.
    pub fn detach(&self) -> io::Result<Metadata> {
        self.update(|m| {
            m.changed_outside();
            m.last_stop = LastStop::Running;
        })
    }

    /// The process stopped cleanly: nothing writes the image any more, and it looks like
    /// `stamp` (`None`: a block device, nothing to compare at the next start).
    pub fn clean_stop(&self, stamp: Option<ImageStamp>) -> io::Result<Metadata> {
        self.update(|m| {
            if let Some(stamp) = stamp {
                m.last_stop = LastStop::Clean(stamp);
            }
        })
    }

    // ---- the primary's transitions ----

    /// A primary starts on this disk: refuses a secondary's disk that did not fail over (its
    /// base may be mid-epoch), and takes a new current generation when the current one is the
    /// peer's (it is about to write unconnected). `dirty_log` says whether a persistent dirty
    /// record exists; without one no peer can be resynced incrementally.
    pub fn primary_start(&self, dirty_log: bool) -> Result<Metadata, MetaError> {
        let m = self.get();
        if m.role == DiskRole::Secondary {
            return Err(MetaError::SecondaryDisk);
        }
        Ok(self.update(|m| {
            m.set_role(DiskRole::Primary);
            if m.gens.current == ZERO_GENERATION {
                // Created by colo-blk and never written: a fresh disk is the peer's equal.
                m.gens.bitmap = ZERO_GENERATION;
                m.new_current();
            } else {
                if m.gens.current == 0 || m.gens.current == m.gens.bitmap {
                    m.new_current();
                }
                if !dirty_log {
                    // What changed before this start is not known: no peer is covered.
                    m.gens.bitmap = 0;
                }
            }
            m.gens.flags &= !FLAG_INCONSISTENT;
        })?)
    }

    /// The primary lost its secondary: it writes unconnected from now on.
    pub fn primary_diverge(&self) -> io::Result<Metadata> {
        self.update(|m| {
            if m.gens.current == m.gens.bitmap {
                m.new_current();
            }
        })
    }

    /// A checkpoint completed on the primary: the secondary holds `current` at `epoch`.
    pub fn primary_checkpoint(&self, epoch: u64) -> io::Result<Metadata> {
        self.update(|m| {
            m.gens.bitmap = m.gens.current;
            m.gens.epoch = m.gens.epoch.max(epoch);
        })
    }

    /// A checkpoint completed on the primary: the secondary holds generation `holds` at
    /// `epoch` (the `current` when the checkpoint's end was queued: a link loss recorded since
    /// may have made a new one, which the secondary does not hold).
    pub fn primary_checkpoint_of(&self, epoch: u64, holds: u64) -> io::Result<Metadata> {
        self.update(|m| {
            m.gens.bitmap = holds;
            m.gens.epoch = m.gens.epoch.max(epoch);
        })
    }

    // ---- the secondary's transitions ----

    /// A disk starts as a secondary, before it answers any HELLO. A primary's disk whose
    /// current generation is still the one its peer holds (it was killed while connected,
    /// after a checkpoint) has written beyond it since (its dirty log says where): it takes a
    /// new current generation, keeping the bitmap, so that no primary mistakes it for a copy
    /// of that generation (which would resync only the primary's own dirty record).
    pub fn secondary_start(&self) -> io::Result<Metadata> {
        self.update(|m| {
            if m.role == DiskRole::Primary && m.gens.current == m.gens.bitmap && m.gens.current != 0
            {
                m.new_current();
            }
        })
    }

    /// A primary's stream is accepted: record its generation as the source before any frame is
    /// applied; for a full sync (or a failback) also mark the disk inconsistent. The disk's own
    /// dirty record (from a life as primary) is no longer about this disk's data: `bitmap = 0`,
    /// so it is never used again (a later failover starts a new one).
    pub fn secondary_accept(&self, primary: &Generations, full: bool) -> io::Result<Metadata> {
        self.update(|m| {
            m.set_role(DiskRole::Secondary);
            m.gens.source = primary.current;
            m.gens.bitmap = 0;
            if full {
                m.gens.flags |= FLAG_INCONSISTENT;
            }
        })
    }

    /// The secondary applied the end of epoch `epoch` (a CHECKPOINT or MARKER frame), before
    /// acknowledging it: its disk now holds the source's data at that point, so it adopts the
    /// source's generation and epoch. Whether the layers made it a checkpoint does not matter
    /// here (the dirty records are about the disk); [`MetaStore::checkpoint_done`] is the one
    /// that also ends an inconsistent full sync.
    pub fn stream_epoch(&self, epoch: u64) -> io::Result<Metadata> {
        self.adopt(epoch, false)
    }

    /// A checkpoint completed on the secondary: its disk is the source's checkpoint `epoch`.
    pub fn checkpoint_done(&self, epoch: u64) -> io::Result<Metadata> {
        self.adopt(epoch, true)
    }

    fn adopt(&self, epoch: u64, checkpoint: bool) -> io::Result<Metadata> {
        if self.get().role == DiskRole::FailedOver {
            return Err(MetaError::FailedOver.into());
        }
        self.update(|m| {
            let g = &mut m.gens;
            if g.source != 0 && g.source != g.current {
                if g.current != 0 && g.current != ZERO_GENERATION {
                    g.history.copy_within(0..HISTORY - 1, 1);
                    g.history[0] = g.current;
                }
                g.current = g.source;
            }
            g.epoch = g.epoch.max(epoch);
            if checkpoint {
                g.flags &= !FLAG_INCONSISTENT;
            }
        })
    }

    /// Whether a failover may start: refuses an inconsistent disk unless `force`.
    pub fn failover_check(&self, force: bool) -> Result<(), MetaError> {
        let m = self.get();
        if m.role != DiskRole::FailedOver && m.gens.inconsistent() && !force {
            return Err(MetaError::Inconsistent);
        }
        Ok(())
    }

    /// Whether the failover about to be recorded by [`MetaStore::failover`] can name a common
    /// generation: a consistent secondary's checkpoint.
    pub fn failover_keeps_ancestor(&self) -> bool {
        let m = self.get();
        m.role == DiskRole::Secondary && !m.gens.inconsistent() && m.gens.current != 0
    }

    /// Before a failover commits anything: refuses an inconsistent disk unless `force`, then
    /// records the new lineage (a new current generation). With `dirty_log` (the failed-over
    /// disk's dirty log already records every range the commit will write) the bitmap names
    /// the checkpoint generation it diverges from (the pair's common ancestor, see
    /// [`MetaStore::failover_keeps_ancestor`]); without one no peer is covered (`bitmap = 0`).
    pub fn failover(&self, force: bool, dirty_log: bool) -> Result<Metadata, MetaError> {
        let m = self.get();
        if m.role == DiskRole::FailedOver {
            return Ok(m); // resuming an interrupted failover
        }
        self.failover_check(force)?;
        let ancestor = dirty_log && self.failover_keeps_ancestor();
        Ok(self.update(|m| {
            let before = m.gens.current;
            m.set_role(DiskRole::FailedOver);
            m.new_current();
            m.gens.bitmap = if ancestor { before } else { 0 };
            m.gens.source = 0;
            m.gens.flags &= !FLAG_INCONSISTENT;
        })?)
    }

    pub fn status(&self) -> MetaStatus {
        let m = self.get();
        MetaStatus {
            disk_id: format!("{:032x}", m.gens.disk_id),
            current_generation: hex(m.gens.current),
            bitmap_generation: hex(m.gens.bitmap),
            history: m
                .gens
                .history
                .iter()
                .filter(|&&g| g != 0)
                .map(|&g| hex(g))
                .collect(),
            checkpoint_epoch: m.gens.epoch,
            disk_role: m.role,
            inconsistent: m.gens.inconsistent(),
        }
    }
}

/// The default metadata path of an image: `IMAGE.colo-meta`.
pub fn default_path(image: &Path, suffix: &str) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    let ok = File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok();
    if !ok {
        // No /dev/urandom: time, pid and a counter, mixed.
        use std::sync::atomic::{AtomicU64, Ordering};
        static N_: AtomicU64 = AtomicU64::new(0);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let mut x = t ^ (u64::from(std::process::id()) << 32) ^ N_.fetch_add(1, Ordering::Relaxed);
        for byte in b.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *byte = x as u8;
        }
    }
    b
}

fn random_u128() -> u128 {
    u128::from_le_bytes(random_bytes())
}

/// A new random generation id (never 0 nor [`ZERO_GENERATION`]).
pub fn new_generation() -> u64 {
    loop {
        let g = u64::from_le_bytes(random_bytes());
        if g != 0 && g != ZERO_GENERATION {
            return g;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::os::unix::fs::FileExt;

    fn p(current: u64, bitmap: u64, history: &[u64], epoch: u64) -> Generations {
        let mut h = [0; HISTORY];
        h[..history.len()].copy_from_slice(history);
        Generations {
            disk_id: 1,
            current,
            bitmap,
            history: h,
            source: 0,
            epoch,
            flags: 0,
        }
    }

    fn s(current: u64, history: &[u64], source: u64, epoch: u64, flags: u32) -> Generations {
        let mut g = p(current, 0, history, epoch);
        g.disk_id = 2;
        g.source = source;
        g.flags = flags;
        g
    }

    #[test]
    fn decision_table() {
        use Decision::*;
        let z = ZERO_GENERATION;
        let cases: Vec<(&str, Generations, Generations, bool, &str)> = vec![
            // Two fresh disks colo-blk created: equal (zeros), incremental.
            (
                "fresh pair",
                p(10, z, &[], 0),
                s(z, &[], 0, 0, 0),
                false,
                "incremental",
            ),
            // Connected pair after a link loss: the primary took a new current.
            (
                "link loss",
                p(11, 10, &[10], 3),
                s(10, &[], 10, 3, 0),
                false,
                "incremental",
            ),
            // Primary crashed before it recorded checkpoint 4 the secondary completed.
            (
                "p behind",
                p(11, 10, &[10], 3),
                s(10, &[], 10, 4, 0),
                false,
                "incremental",
            ),
            // Primary restarted twice without a session in between.
            (
                "two restarts",
                p(11, 10, &[10], 3),
                s(10, &[], 11, 3, 0),
                false,
                "incremental",
            ),
            // Secondary's disk older than the primary's last checkpoint.
            (
                "old copy",
                p(11, 10, &[10], 5),
                s(10, &[], 10, 3, 0),
                false,
                "full-sync-needed",
            ),
            (
                "old copy allowed",
                p(11, 10, &[10], 5),
                s(10, &[], 10, 3, 0),
                true,
                "full-sync",
            ),
            // A blank disk (no metadata): never in sync.
            (
                "blank",
                p(11, 10, &[10], 3),
                s(0, &[], 0, 0, 0),
                false,
                "full-sync-needed",
            ),
            (
                "blank allowed",
                p(11, 10, &[10], 3),
                s(0, &[], 0, 0, 0),
                true,
                "full-sync",
            ),
            // A fresh disk against a primary that checkpointed since its creation.
            (
                "fresh vs old",
                p(11, 10, &[10], 3),
                s(z, &[], 0, 0, 0),
                false,
                "full-sync-needed",
            ),
            // Another pair's disk.
            (
                "unrelated",
                p(11, 10, &[10], 3),
                s(77, &[76], 77, 9, 0),
                false,
                "full-sync-needed",
            ),
            (
                "unrelated allowed",
                p(11, 10, &[10], 3),
                s(77, &[76], 77, 9, 0),
                true,
                "full-sync",
            ),
            // A fresh secondary that took another (fresh) primary's stream, then this one.
            (
                "other source",
                p(11, z, &[], 0),
                s(z, &[], 99, 0, 0),
                false,
                "full-sync-needed",
            ),
            // The secondary failed over (new current 20, old 10 in its history); the old
            // primary comes back: split brain, even when full sync is allowed.
            (
                "split brain",
                p(11, 10, &[10], 3),
                s(20, &[10], 0, 3, 0),
                false,
                "split-brain",
            ),
            (
                "split brain forced",
                p(11, 10, &[10], 3),
                s(20, &[10], 0, 3, 0),
                true,
                "split-brain",
            ),
            // The failed-over side became primary; the old primary's disk is the secondary.
            (
                "old primary as secondary",
                p(21, 0, &[20, 10], 3),
                {
                    let mut g = s(11, &[10], 0, 3, 0);
                    g.bitmap = 10;
                    g
                },
                true,
                "split-brain",
            ),
            // Another primary's disk, created by colo-blk too: unrelated, not a split brain.
            (
                "another fresh primary",
                p(10, z, &[z], 0),
                {
                    let mut g = s(66, &[z], 0, 0, 0);
                    g.bitmap = z;
                    g
                },
                false,
                "full-sync-needed",
            ),
            // A stale secondary: the primary has since checkpointed with another one.
            (
                "stale",
                p(12, 12, &[11, 10], 6),
                s(10, &[], 10, 3, 0),
                false,
                "full-sync-needed",
            ),
            // Interrupted full sync from this primary: restarts without the flag.
            (
                "resume full",
                p(12, 11, &[11], 3),
                s(z, &[], 11, 0, FLAG_INCONSISTENT),
                false,
                "full-sync",
            ),
            // Interrupted full sync from someone else.
            (
                "foreign inconsistent",
                p(12, 11, &[11], 3),
                s(z, &[], 55, 0, FLAG_INCONSISTENT),
                false,
                "inconsistent",
            ),
            (
                "foreign inconsistent allowed",
                p(12, 11, &[11], 3),
                s(z, &[], 55, 0, FLAG_INCONSISTENT),
                true,
                "full-sync",
            ),
        ];
        for (name, pg, sg, allow, want) in cases {
            let d = decide(&pg, &sg, allow);
            assert_eq!(d.name(), want, "{name}: {d:?}");
            if let Refuse(Refusal::FullSyncNeeded, why) = &d {
                assert!(why.contains(ALLOW_FULL_SYNC_FLAG), "{name}: {why}");
            }
            assert!(!matches!(d, Incremental(_) if sg.current == 0), "{name}");
        }
        let mut same = s(10, &[], 10, 3, 0);
        same.disk_id = 1;
        assert_eq!(
            decide(&p(11, 10, &[10], 3), &same, true).name(),
            "same-disk"
        );
    }

    #[test]
    fn failback_rules() {
        // The survivor failed over from checkpoint generation 10 (bitmap 10, new current 30);
        // the old primary wrote beyond 10 too (new current 31 at its start as a secondary).
        let survivor = p(30, 10, &[10], 3);
        let old = {
            let mut g = s(31, &[10], 0, 3, 0);
            g.bitmap = 10;
            g
        };
        let all = SyncPolicy {
            allow_full: false,
            discard_my_data: true,
            primary_dirty_log: true,
            secondary_dirty_log: true,
        };
        let cases: Vec<(&str, Generations, Generations, SyncPolicy, &str)> = vec![
            ("failback", survivor, old, all, "incremental-failback"),
            (
                "failback, full allowed too",
                survivor,
                old,
                SyncPolicy {
                    allow_full: true,
                    ..all
                },
                "incremental-failback",
            ),
            (
                "no discard: split brain as before",
                survivor,
                old,
                SyncPolicy {
                    discard_my_data: false,
                    allow_full: true,
                    ..all
                },
                "split-brain",
            ),
            (
                "secondary has no log",
                survivor,
                old,
                SyncPolicy {
                    secondary_dirty_log: false,
                    ..all
                },
                "full-sync-needed",
            ),
            (
                "secondary has no log, full allowed",
                survivor,
                old,
                SyncPolicy {
                    secondary_dirty_log: false,
                    allow_full: true,
                    ..all
                },
                "full-sync",
            ),
            (
                "primary has no log",
                survivor,
                old,
                SyncPolicy {
                    primary_dirty_log: false,
                    ..all
                },
                "full-sync-needed",
            ),
            (
                "survivor without a dirty log (bitmap 0)",
                p(30, 0, &[10], 3),
                old,
                all,
                "full-sync-needed",
            ),
            (
                "survivor without a dirty log, full allowed",
                p(30, 0, &[10], 3),
                old,
                SyncPolicy {
                    allow_full: true,
                    ..all
                },
                "full-sync",
            ),
            // The hole of a primary killed while connected: without its new generation at its
            // start as secondary it would look like a copy of 10 (rule 5, missing its writes);
            // decide() cannot see that, secondary_start() prevents it (test below).
            (
                "old primary still at 10 (not started through secondary_start)",
                survivor,
                {
                    let mut g = s(10, &[], 0, 3, 0);
                    g.bitmap = 10;
                    g
                },
                all,
                "incremental",
            ),
            // A bitmap that is the created-disk generation is no common ancestor.
            (
                "zero generation is no ancestor",
                p(30, ZERO_GENERATION, &[], 0),
                {
                    let mut g = s(31, &[ZERO_GENERATION], 0, 0, 0);
                    g.bitmap = ZERO_GENERATION;
                    g
                },
                all,
                "full-sync-needed",
            ),
            // An interrupted failback: the target is inconsistent, rule 2 restarts in full.
            (
                "interrupted failback",
                survivor,
                {
                    let mut g = s(31, &[10], 30, 3, FLAG_INCONSISTENT);
                    g.bitmap = 0;
                    g
                },
                all,
                "full-sync",
            ),
            // Discard given to a plain incremental case: nothing to discard, rule 5.
            (
                "discard on a clean copy",
                p(11, 10, &[10], 3),
                s(10, &[], 10, 3, 0),
                all,
                "incremental",
            ),
        ];
        for (name, pg, sg, policy, want) in cases {
            let d = decide_with(&pg, &sg, &policy);
            assert_eq!(d.name(), want, "{name}: {d:?}");
            if let Decision::Refuse(Refusal::FullSyncNeeded, why) = &d {
                assert!(why.contains(ALLOW_FULL_SYNC_FLAG), "{name}: {why}");
            }
            if let Decision::Refuse(Refusal::SplitBrain, why) = &d {
                assert!(why.contains(DISCARD_MY_DATA_FLAG), "{name}: {why}");
            }
            assert!(d.overwrites() == matches!(d, Decision::Full(_) | Decision::Failback(_)));
        }
    }

    #[test]
    fn failover_records_the_common_ancestor_and_a_primary_diverges_at_secondary_start() {
        let primary = Generations::fresh_primary();
        // Failover with a dirty log: bitmap = the checkpoint generation.
        let st = MetaStore::in_memory(1 << 20);
        st.secondary_accept(&primary, false).unwrap();
        st.checkpoint_done(1).unwrap();
        let f = st.failover(false, true).unwrap();
        assert_eq!(f.gens.bitmap, primary.current);
        assert_ne!(f.gens.current, primary.current);
        // Resumed: unchanged.
        assert_eq!(st.failover(false, true).unwrap(), f);
        // Started as primary: the bitmap is kept (the dirty log covers since then).
        let p = st.primary_start(true).unwrap();
        assert_eq!(
            (p.gens.current, p.gens.bitmap),
            (f.gens.current, primary.current)
        );
        // Without a log: no ancestor.
        let st = MetaStore::in_memory(1 << 20);
        st.secondary_accept(&primary, false).unwrap();
        st.checkpoint_done(1).unwrap();
        assert_eq!(st.failover(false, false).unwrap().gens.bitmap, 0);
        // A forced failover of an inconsistent disk: no ancestor either.
        let st = MetaStore::in_memory(1 << 20);
        st.secondary_accept(&primary, true).unwrap();
        let e = st.failover(false, true).unwrap_err();
        assert!(matches!(e, MetaError::Inconsistent), "{e}");
        assert_eq!(
            e.to_string(),
            "the secondary's disk is inconsistent (a full sync or a failback resync has not \
             reached a checkpoint): it holds no checkpoint to fail over to; use \
             replication-failover {\"force\": true} to take it anyway"
        );
        assert_eq!(st.failover(true, true).unwrap().gens.bitmap, 0);

        // A primary killed while connected (current == bitmap) started as a secondary: a new
        // current, the bitmap kept.
        let st = MetaStore::in_memory(1 << 20);
        st.primary_start(true).unwrap();
        let c = st.primary_checkpoint(4).unwrap();
        assert_eq!(c.gens.current, c.gens.bitmap);
        let s2 = st.secondary_start().unwrap();
        assert_ne!(s2.gens.current, c.gens.current);
        assert_eq!(s2.gens.bitmap, c.gens.bitmap);
        assert_eq!(s2.gens.history[0], c.gens.current);
        // Idempotent, and nothing for a disk that is not a primary's.
        assert_eq!(st.secondary_start().unwrap(), s2);
        // Accepting a stream retires the disk's own record.
        let a = st.secondary_accept(&primary, true).unwrap();
        assert_eq!(a.gens.bitmap, 0);
    }

    #[test]
    fn slots_survive_a_torn_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.colo-meta");
        let st = MetaStore::open(&path, 1 << 20, true).unwrap();
        assert_eq!(st.gens().current, ZERO_GENERATION);
        let a = st.primary_start(true).unwrap();
        assert_ne!(a.gens.current, ZERO_GENERATION);
        assert_eq!(a.gens.history[0], ZERO_GENERATION);
        let b = st.primary_checkpoint(5).unwrap();
        drop(st);
        // Reopened: the newest slot.
        let st = MetaStore::open(&path, 1 << 20, false).unwrap();
        assert_eq!(st.get(), b);
        drop(st);
        // Tear the newest slot: the previous state comes back.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        let newest = (b.seq % 2) * SLOT as u64;
        f.write_all_at(&[0xff; 100], newest + 40).unwrap();
        let st = MetaStore::open(&path, 1 << 20, false).unwrap();
        assert_eq!(st.get(), a);
        // A wrong size is an error, not a silent reset.
        assert!(MetaStore::open(&path, 2 << 20, false).is_err());
        // Unknown content: generation 0.
        let other = MetaStore::open(&dir.path().join("o.colo-meta"), 1 << 20, false).unwrap();
        assert_eq!(other.gens().current, 0);
    }

    #[test]
    fn transitions() {
        let st = MetaStore::in_memory(1 << 20);
        // A secondary takes a stream, checkpoints: it now holds the primary's generation.
        let primary = Generations::fresh_primary();
        st.secondary_accept(&primary, true).unwrap();
        assert!(st.gens().inconsistent());
        assert!(matches!(
            st.failover(false, false),
            Err(MetaError::Inconsistent)
        ));
        // A marker the layers did not make a checkpoint: still inconsistent.
        let m = st.stream_epoch(1).unwrap();
        assert!(m.gens.inconsistent());
        assert!(matches!(
            st.failover(false, false),
            Err(MetaError::Inconsistent)
        ));
        let m = st.checkpoint_done(1).unwrap();
        assert_eq!((m.gens.current, m.gens.epoch), (primary.current, 1));
        assert!(!m.gens.inconsistent());
        // Failover: a new lineage, the old one remembered; a restart as primary is allowed.
        let f = st.failover(false, false).unwrap();
        assert_ne!(f.gens.current, primary.current);
        assert_eq!(f.gens.history[0], primary.current);
        assert_eq!(f.role, DiskRole::FailedOver);
        assert_eq!(
            f.roles[..3],
            [DiskRole::FailedOver, DiskRole::Secondary, DiskRole::None]
        );
        let p = st.primary_start(true).unwrap();
        assert_eq!(
            p.gens.current, f.gens.current,
            "not the peer's: no new generation"
        );
        // A secondary's disk cannot start as a primary.
        let s2 = MetaStore::in_memory(1 << 20);
        s2.secondary_accept(&primary, false).unwrap();
        let e = s2.primary_start(true).unwrap_err();
        assert!(matches!(e, MetaError::SecondaryDisk), "{e}");
        assert_eq!(io::Error::from(e).kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn generations_round_trip() {
        let g = Generations {
            disk_id: u128::MAX - 5,
            current: 1,
            bitmap: 2,
            history: [3, 4, 5, 6],
            source: 7,
            epoch: 8,
            flags: FLAG_INCONSISTENT,
        };
        let mut v = Vec::new();
        g.encode_into(&mut v);
        assert_eq!(v.len(), GENERATIONS_LEN);
        assert_eq!(Generations::decode(&v), Some(g));
    }

    /// The clean-stop stamp round-trips; a slot written before it existed (zeros there) reads
    /// as "running", so an upgrade never claims a clean stop it did not see; a changed image
    /// is recorded per role as the issue asks.
    #[test]
    fn outside_changes_are_recorded_per_role() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        let stamp = ImageStamp {
            size: 1 << 20,
            mtime_ns: 1_700_000_000_123_456_789,
            ctime_ns: 1_700_000_000_223_456_789,
            inode: 42,
        };
        let store = MetaStore::open(&path, 1 << 20, true).unwrap();
        assert_eq!(store.start_run(Some(stamp)).unwrap(), Outside::Unknown);
        store.primary_start(true).unwrap();
        store.primary_checkpoint(3).unwrap();
        store.clean_stop(Some(stamp)).unwrap();
        drop(store);
        let store = MetaStore::open(&path, 1 << 20, false).unwrap();
        assert_eq!(store.get().last_stop, LastStop::Clean(stamp));
        // The same image: nothing changes.
        let g = store.gens();
        assert_eq!(store.start_run(Some(stamp)).unwrap(), Outside::Unchanged);
        assert_eq!(store.gens(), g);
        // Changed after a clean stop: a primary's disk takes a new generation no peer holds.
        store.clean_stop(Some(stamp)).unwrap();
        let now = ImageStamp {
            ctime_ns: stamp.ctime_ns + 1,
            ..stamp
        };
        assert!(matches!(
            store.start_run(Some(now)).unwrap(),
            Outside::Changed { .. }
        ));
        let after = store.gens();
        assert_ne!(after.current, g.current);
        assert_eq!(after.bitmap, 0);
        assert!(after.history.contains(&g.current));
        assert_eq!(store.get().last_stop, LastStop::Running);
        // A crash since: nothing can be said.
        assert_eq!(store.start_run(Some(now)).unwrap(), Outside::Unknown);

        // A secondary's disk becomes inconsistent; a disk without a role, unknown.
        let mut m = Metadata::fresh(1 << 20, ZERO_GENERATION);
        m.set_role(DiskRole::Secondary);
        m.changed_outside();
        assert!(m.gens.inconsistent());
        let mut m = Metadata::fresh(1 << 20, ZERO_GENERATION);
        m.changed_outside();
        assert_eq!(m.gens.current, 0);

        // An older build's slot: the bytes after the generations are zeros.
        let mut old = Metadata::fresh(1 << 20, ZERO_GENERATION);
        old.last_stop = LastStop::Clean(stamp);
        let mut b = old.encode();
        let tail = 37 + GENERATIONS_LEN;
        b[tail..tail + 1 + STAMP_LEN].fill(0);
        let crc = crc32c::crc32c(&b[..SLOT - 4]);
        b[SLOT - 4..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(Metadata::decode(&b).unwrap().last_stop, LastStop::Running);
    }
}
