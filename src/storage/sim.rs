//! A simulated disk for power-loss tests ([`SimMedia`], a [`Media`]): it keeps, per file, the
//! content known durable apart from the writes since the file's last sync, and, per directory,
//! the entries made durable by a directory sync apart from the creations, renames and unlinks
//! since. At every sync it can record a crash point ([`Frozen`]): what is durable plus what is
//! in flight. A power cut at that point ([`Frozen::power_cut`]) yields a disk a real device may
//! have left: everything synced, plus any subset of the unsynced writes (applied in their
//! order, a write possibly torn at any byte), plus any subset of the unsynced directory
//! changes. The set of such disks is enumerated when small and sampled from a seed when large
//! ([`Frozen::cuts`]); a [`Cut`] rebuilds the same disk every time.
//!
//! Directories themselves are durable as soon as they are made (the code under test makes its
//! directories once, before any state). A sync can be left out on purpose
//! ([`SimMedia::drop_sync`]): the mutation check of docs/layers.md.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::durable::{DurableFile, Media, Open, SyncPoint};
use super::{check_range, BlockDevice};

/// One change of a file since its last sync.
#[derive(Debug, Clone)]
enum Op {
    Write { at: u64, data: Arc<[u8]> },
    SetLen(u64),
    Zero { at: u64, len: u64 },
}

/// One file: its durable content, its content as the code sees it, and the changes between.
#[derive(Debug, Clone, Default)]
struct Inode {
    durable: Arc<Vec<u8>>,
    live: Arc<Vec<u8>>,
    pending: Vec<Op>,
}

/// A change of directory entries not yet made durable: its entries set (to an inode) or removed
/// together (a rename is one change).
#[derive(Debug, Clone)]
struct DirOp {
    dir: PathBuf,
    entries: Vec<(PathBuf, Option<usize>)>,
}

#[derive(Debug, Default)]
struct Sim {
    inodes: Vec<Inode>,
    names: BTreeMap<PathBuf, usize>,
    durable_names: BTreeMap<PathBuf, usize>,
    dir_ops: Vec<DirOp>,
    dirs: BTreeSet<PathBuf>,
    /// The sync point left out (the mutation check), and how often it was.
    drop: Option<SyncPoint>,
    dropped: u64,
    /// The name the next file sync takes (set by [`Media::flush_device`]).
    label: Option<SyncPoint>,
    record: bool,
    step: u64,
    trace: Vec<CrashPoint>,
    /// The simulated machine's boot (a power cut boots it again).
    boot: u32,
}

/// The simulated disk (cheap to clone: clones share the disk).
#[derive(Debug, Clone, Default)]
pub struct SimMedia {
    sim: Arc<Mutex<Sim>>,
}

/// What is durable and what is in flight at one moment.
#[derive(Debug, Clone)]
pub struct Frozen {
    boot: u32,
    inodes: Vec<Inode>,
    durable_names: BTreeMap<PathBuf, usize>,
    dir_ops: Vec<DirOp>,
    dirs: BTreeSet<PathBuf>,
}

/// A recorded crash point: just before the sync `at` (`None`: the start of the step, before
/// it did anything, or the end of the run), during the step the test had set
/// ([`SimMedia::set_step`]).
#[derive(Debug, Clone)]
pub struct CrashPoint {
    pub index: usize,
    pub at: Option<SyncPoint>,
    pub step: u64,
    pub frozen: Frozen,
}

/// Which power-cut disk of a crash point: one of an enumeration, or one drawn from a seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// The mixed-radix number of the fates of the in-flight changes (0: all lost).
    Enumerated(u64),
    /// Every in-flight change survived.
    AllKept,
    /// Fates drawn from this seed.
    Seeded(u64),
}

/// What a power cut did to one in-flight change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Lost,
    Kept,
    /// A write only partly reached the disk (the seed says which part).
    Torn(u64),
}

fn lock(sim: &Mutex<Sim>) -> MutexGuard<'_, Sim> {
    sim.lock().unwrap_or_else(|e| e.into_inner())
}

fn parent(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_default()
}

impl SimMedia {
    pub fn new() -> SimMedia {
        let m = SimMedia::default();
        m.sim().boot = 1;
        m
    }

    /// The disk as a process crash leaves it: everything written is there (the page cache
    /// survives), in the same boot.
    pub fn process_crash(&self) -> SimMedia {
        let frozen = self.sim().freeze();
        frozen.process_crash()
    }

    /// This disk as the code's [`Media`].
    pub fn media(&self) -> Arc<dyn Media> {
        Arc::new(self.clone())
    }

    fn sim(&self) -> MutexGuard<'_, Sim> {
        lock(&self.sim)
    }

    /// Puts a durable file `path` with `content` on the disk (the state before the test).
    pub fn install(&self, path: &Path, content: Vec<u8>) {
        let mut s = self.sim();
        s.add_dirs(&parent(path));
        let content = Arc::new(content);
        s.inodes.push(Inode {
            durable: content.clone(),
            live: content,
            pending: Vec::new(),
        });
        let ino = s.inodes.len() - 1;
        s.names.insert(path.to_path_buf(), ino);
        s.durable_names.insert(path.to_path_buf(), ino);
    }

    /// A disk image `path` on this media as a [`BlockDevice`] whose flush is a sync (the file
    /// must exist: [`SimMedia::install`]).
    pub fn block(&self, path: &Path) -> io::Result<Arc<SimBlock>> {
        let ino = self.sim().lookup(path)?;
        let file = SimFile {
            sim: self.sim.clone(),
            ino,
            writable: true,
        };
        let capacity = file.len()?;
        Ok(Arc::new(SimBlock { file, capacity }))
    }

    /// The content of `path` as the code sees it now.
    pub fn content(&self, path: &Path) -> io::Result<Vec<u8>> {
        let s = self.sim();
        let ino = s.lookup(path)?;
        Ok(s.inodes[ino].live.to_vec())
    }

    /// Records a crash point at every sync from now on.
    pub fn record(&self, on: bool) {
        self.sim().record = on;
    }

    /// Names the step the test is in (crash points carry it). While recording, the moment
    /// between two steps is a crash point too (`at: None`): a step that syncs nothing still
    /// gets its power cut.
    pub fn set_step(&self, step: u64) {
        let mut s = self.sim();
        s.step = step;
        if s.record {
            let frozen = s.freeze();
            let index = s.trace.len();
            s.trace.push(CrashPoint {
                index,
                at: None,
                step,
                frozen,
            });
        }
    }

    /// Leaves out every sync at `at` from now on (it returns success and does nothing).
    pub fn drop_sync(&self, at: Option<SyncPoint>) {
        self.sim().drop = at;
    }

    /// How many syncs were left out.
    pub fn dropped(&self) -> u64 {
        self.sim().dropped
    }

    /// The crash points recorded so far, and one for the current moment (the end of the run).
    pub fn take_trace(&self) -> Vec<CrashPoint> {
        let mut s = self.sim();
        let mut trace = std::mem::take(&mut s.trace);
        trace.push(CrashPoint {
            index: trace.len(),
            at: None,
            step: s.step,
            frozen: s.freeze(),
        });
        trace
    }
}

impl Sim {
    fn add_dirs(&mut self, dir: &Path) {
        for d in dir.ancestors() {
            self.dirs.insert(d.to_path_buf());
        }
    }

    fn lookup(&self, path: &Path) -> io::Result<usize> {
        self.names.get(path).copied().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{}: no such file (simulated)", path.display()),
            )
        })
    }

    fn dir_change(&mut self, path: &Path, entries: Vec<(PathBuf, Option<usize>)>) {
        for (p, ino) in &entries {
            match ino {
                Some(i) => self.names.insert(p.clone(), *i),
                None => self.names.remove(p),
            };
        }
        self.dir_ops.push(DirOp {
            dir: parent(path),
            entries,
        });
    }

    fn create(&mut self, path: &Path) -> io::Result<usize> {
        if !self.dirs.contains(&parent(path)) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{}: no such directory (simulated)", parent(path).display()),
            ));
        }
        self.inodes.push(Inode::default());
        let ino = self.inodes.len() - 1;
        self.dir_change(path, vec![(path.to_path_buf(), Some(ino))]);
        Ok(ino)
    }

    /// A sync at `default` (or at the label a device flush gave it): false when it is left
    /// out; otherwise the crash point just before it is recorded.
    fn sync_event(&mut self, default: SyncPoint) -> bool {
        let at = self.label.take().unwrap_or(default);
        if self.drop == Some(at) {
            self.dropped += 1;
            return false;
        }
        if self.record {
            let frozen = self.freeze();
            self.trace.push(CrashPoint {
                index: self.trace.len(),
                at: Some(at),
                step: self.step,
                frozen,
            });
        }
        true
    }

    fn sync_file(&mut self, ino: usize, at: SyncPoint) {
        if self.sync_event(at) {
            let i = &mut self.inodes[ino];
            i.durable = i.live.clone();
            i.pending.clear();
        }
    }

    fn change(&mut self, ino: usize, op: Op) {
        let i = &mut self.inodes[ino];
        apply(Arc::make_mut(&mut i.live), &op, Fate::Kept);
        i.pending.push(op);
    }

    fn freeze(&self) -> Frozen {
        Frozen {
            boot: self.boot,
            inodes: self.inodes.clone(),
            durable_names: self.durable_names.clone(),
            dir_ops: self.dir_ops.clone(),
            dirs: self.dirs.clone(),
        }
    }
}

/// Applies `op` to `content` as `fate` says.
fn apply(content: &mut Vec<u8>, op: &Op, fate: Fate) {
    if fate == Fate::Lost {
        return;
    }
    match op {
        Op::SetLen(len) => content.resize(*len as usize, 0),
        Op::Zero { at, len } => {
            let end = (at + len).min(content.len() as u64);
            if *at < end {
                content[*at as usize..end as usize].fill(0);
            }
        }
        Op::Write { at, data } => {
            let end = *at as usize + data.len();
            if content.len() < end {
                content.resize(end, 0);
            }
            let dst = &mut content[*at as usize..end];
            match fate {
                Fate::Torn(seed) => torn_copy(dst, data, *at, seed),
                _ => dst.copy_from_slice(data),
            }
        }
    }
}

/// A torn write: seed 0 writes the first half (whole 512-byte sectors when it spans two or
/// more), any other seed writes each sector with even odds and cuts one sector at a random byte.
fn torn_copy(dst: &mut [u8], data: &[u8], at: u64, seed: u64) {
    if seed == 0 {
        let half = if data.len() >= 1024 {
            data.len() / 2 / 512 * 512
        } else {
            data.len() / 2
        };
        dst[..half].copy_from_slice(&data[..half]);
        return;
    }
    let mut rng = Rng(seed);
    // Sector boundaries are the file's (multiples of 512), not the write's.
    let mut pos = 0usize;
    let cut_sector = rng.below(data.len().div_ceil(512) as u64 + 1) as usize;
    let mut n = 0usize;
    while pos < data.len() {
        let end = ((at as usize + pos) / 512 * 512 + 512 - at as usize).min(data.len());
        if n == cut_sector {
            let keep = rng.below((end - pos) as u64) as usize;
            dst[pos..pos + keep].copy_from_slice(&data[pos..pos + keep]);
        } else if rng.below(2) == 1 {
            dst[pos..end].copy_from_slice(&data[pos..end]);
        }
        pos = end;
        n += 1;
    }
}

/// splitmix64: the seeds' random numbers (no dependency, the same on every platform).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

/// Mixes numbers into one seed (a crash point's and a state's number into the run's seed).
pub fn mix_seed(parts: &[u64]) -> u64 {
    let mut r = Rng(0x5eed);
    for p in parts {
        r.0 ^= *p;
        r.next();
    }
    r.next()
}

impl Frozen {
    /// The inodes whose changes matter: named, or named by an in-flight directory change.
    fn relevant(&self) -> BTreeSet<usize> {
        let mut s: BTreeSet<usize> = self.durable_names.values().copied().collect();
        for op in &self.dir_ops {
            s.extend(op.entries.iter().filter_map(|(_, i)| *i));
        }
        s
    }

    /// How many outcomes each in-flight change has: directory changes first, then the files'.
    fn radices(&self) -> Vec<u64> {
        let mut r = vec![2u64; self.dir_ops.len()];
        for ino in self.relevant() {
            for op in &self.inodes[ino].pending {
                r.push(match op {
                    Op::Write { data, .. } if data.len() > 1 => 3,
                    _ => 2,
                });
            }
        }
        r
    }

    /// How many changes were in flight.
    pub fn in_flight(&self) -> usize {
        self.radices().len()
    }

    /// The power cuts to try here: all of them when there are at most `enum_max`, otherwise
    /// "all kept", "all lost" and `samples` drawn from seeds derived from `seed`.
    pub fn cuts(&self, seed: u64, samples: u64, enum_max: u64) -> Vec<Cut> {
        let total = self.radices().iter().try_fold(1u64, |acc, r| {
            acc.checked_mul(*r).filter(|t| *t <= enum_max)
        });
        match total {
            Some(n) => (0..n).map(Cut::Enumerated).collect(),
            None => [Cut::Enumerated(0), Cut::AllKept]
                .into_iter()
                .chain((0..samples).map(|i| Cut::Seeded(mix_seed(&[seed, i]))))
                .collect(),
        }
    }

    fn fates(&self, cut: Cut) -> Vec<Fate> {
        let radices = self.radices();
        let mut rng = Rng(match cut {
            Cut::Seeded(s) => s,
            _ => 0,
        });
        let mut num = match cut {
            Cut::Enumerated(n) => n,
            _ => 0,
        };
        radices
            .iter()
            .map(|&r| match cut {
                Cut::AllKept => Fate::Kept,
                Cut::Enumerated(_) => {
                    let d = num % r;
                    num /= r;
                    [Fate::Lost, Fate::Kept, Fate::Torn(0)][d as usize]
                }
                Cut::Seeded(_) => match rng.below(10) {
                    0..=3 => Fate::Lost,
                    4..=7 => Fate::Kept,
                    _ if r == 3 => Fate::Torn(rng.next() | 1),
                    _ => Fate::Kept,
                },
            })
            .collect()
    }

    /// The disk a power cut here leaves (see the module comment), as a fresh simulated disk
    /// with nothing in flight.
    /// The disk a process crash at this point leaves: everything written is there (the page
    /// cache survives), names as the process saw them, in the same boot.
    pub fn process_crash(&self) -> SimMedia {
        let mut names = self.durable_names.clone();
        for op in &self.dir_ops {
            for (p, ino) in &op.entries {
                match ino {
                    Some(i) => names.insert(p.clone(), *i),
                    None => names.remove(p),
                };
            }
        }
        let inodes = self
            .inodes
            .iter()
            .map(|i| Inode {
                durable: i.live.clone(),
                live: i.live.clone(),
                pending: Vec::new(),
            })
            .collect();
        let sim = Sim {
            inodes,
            names: names.clone(),
            durable_names: names,
            dirs: self.dirs.clone(),
            boot: self.boot,
            ..Sim::default()
        };
        SimMedia {
            sim: Arc::new(Mutex::new(sim)),
        }
    }

    pub fn power_cut(&self, cut: Cut) -> SimMedia {
        let fates = self.fates(cut);
        let mut fates = fates.into_iter();
        let mut names = self.durable_names.clone();
        for op in &self.dir_ops {
            if fates.next() == Some(Fate::Kept) {
                for (p, ino) in &op.entries {
                    match ino {
                        Some(i) => names.insert(p.clone(), *i),
                        None => names.remove(p),
                    };
                }
            }
        }
        let relevant = self.relevant();
        let mut inodes = Vec::with_capacity(self.inodes.len());
        for (ino, i) in self.inodes.iter().enumerate() {
            let mut content = (*i.durable).clone();
            if relevant.contains(&ino) {
                for op in &i.pending {
                    apply(&mut content, op, fates.next().unwrap_or(Fate::Lost));
                }
            }
            let content = Arc::new(content);
            inodes.push(Inode {
                durable: content.clone(),
                live: content,
                pending: Vec::new(),
            });
        }
        let sim = Sim {
            inodes,
            names: names.clone(),
            durable_names: names,
            dirs: self.dirs.clone(),
            boot: self.boot.wrapping_add(1) | 1,
            ..Sim::default()
        };
        SimMedia {
            sim: Arc::new(Mutex::new(sim)),
        }
    }
}

impl Media for SimMedia {
    fn open(&self, path: &Path, how: Open) -> io::Result<Box<dyn DurableFile>> {
        let mut s = self.sim();
        let found = s.names.get(path).copied();
        let ino = match (how, found) {
            (Open::CreateNew, Some(_)) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{}: exists (simulated)", path.display()),
                ))
            }
            (Open::Read | Open::Write, None) => s.lookup(path)?,
            (_, Some(ino)) => ino,
            (_, None) => s.create(path)?,
        };
        if how == Open::Truncate && found.is_some() {
            s.change(ino, Op::SetLen(0));
        }
        Ok(Box::new(SimFile {
            sim: self.sim.clone(),
            ino,
            writable: how != Open::Read,
        }))
    }

    fn exists(&self, path: &Path) -> bool {
        let s = self.sim();
        s.names.contains_key(path) || s.dirs.contains(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.sim();
        let ino = s.lookup(from)?;
        s.dir_change(
            to,
            vec![(from.to_path_buf(), None), (to.to_path_buf(), Some(ino))],
        );
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut s = self.sim();
        s.lookup(path)?;
        s.dir_change(path, vec![(path.to_path_buf(), None)]);
        Ok(())
    }

    fn sync_dir(&self, dir: &Path, at: SyncPoint) -> io::Result<()> {
        let mut s = self.sim();
        if !s.sync_event(at) {
            return Ok(());
        }
        let (done, left): (Vec<DirOp>, Vec<DirOp>) = std::mem::take(&mut s.dir_ops)
            .into_iter()
            .partition(|o| o.dir == dir);
        s.dir_ops = left;
        for op in done {
            for (p, ino) in op.entries {
                match ino {
                    Some(i) => s.durable_names.insert(p, i),
                    None => s.durable_names.remove(&p),
                };
            }
        }
        Ok(())
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let s = self.sim();
        if !s.dirs.contains(dir) {
            return Err(io::Error::new(io::ErrorKind::NotFound, "no such directory"));
        }
        Ok(s.names
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .collect())
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.sim().add_dirs(dir);
        Ok(())
    }

    fn background_unlinks(&self) -> bool {
        false
    }

    fn boot_tag(&self) -> u32 {
        self.sim().boot
    }

    fn flush_device(&self, dev: &dyn BlockDevice, at: SyncPoint) -> io::Result<()> {
        self.sim().label = Some(at);
        let r = dev.flush();
        self.sim().label = None;
        r
    }
}

/// A file of the simulated disk.
pub struct SimFile {
    sim: Arc<Mutex<Sim>>,
    ino: usize,
    writable: bool,
}

impl fmt::Debug for SimFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SimFile({})", self.ino)
    }
}

impl SimFile {
    fn check_writable(&self) -> io::Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(io::Error::new(io::ErrorKind::PermissionDenied, "read only"))
        }
    }
}

impl DurableFile for SimFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let s = lock(&self.sim);
        let live = &s.inodes[self.ino].live;
        let end = offset as usize + buf.len();
        if end > live.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end (simulated)",
            ));
        }
        buf.copy_from_slice(&live[offset as usize..end]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_writable()?;
        lock(&self.sim).change(
            self.ino,
            Op::Write {
                at: offset,
                data: buf.into(),
            },
        );
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(lock(&self.sim).inodes[self.ino].live.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check_writable()?;
        lock(&self.sim).change(self.ino, Op::SetLen(len));
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        lock(&self.sim).change(self.ino, Op::Zero { at: offset, len });
        Ok(())
    }

    fn sync_data(&self, at: SyncPoint) -> io::Result<()> {
        lock(&self.sim).sync_file(self.ino, at);
        Ok(())
    }

    fn sync_all(&self, at: SyncPoint) -> io::Result<()> {
        self.sync_data(at)
    }
}

/// A disk image on the simulated disk: a [`BlockDevice`] whose flush syncs the file.
#[derive(Debug)]
pub struct SimBlock {
    file: SimFile,
    capacity: u64,
}

impl BlockDevice for SimBlock {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.capacity, offset, buf.len() as u64)?;
        self.file.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_range(self.capacity, offset, buf.len() as u64)?;
        self.file.write_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data(SyncPoint::Device)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        check_range(self.capacity, offset, len)?;
        self.file.punch_hole(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PathBuf {
        Path::new("/d").join(s)
    }

    #[test]
    fn synced_writes_survive_every_cut_and_unsynced_ones_may_not() {
        let m = SimMedia::new();
        m.create_dir_all(Path::new("/d")).unwrap();
        m.record(true);
        let f = m.open(&p("a"), Open::CreateNew).unwrap();
        f.write_at(b"one", 0).unwrap();
        f.sync_data(SyncPoint::Device).unwrap();
        m.sync_dir(Path::new("/d"), SyncPoint::StateDir).unwrap();
        f.write_at(b"TWO", 0).unwrap();
        let trace = m.take_trace();
        assert_eq!(trace.len(), 3);
        // Before the file's sync: the create and the write are in flight (2 x 3 outcomes).
        assert_eq!(trace[0].frozen.cuts(1, 0, 64).len(), 6);
        let end = &trace[2].frozen;
        let mut seen = BTreeSet::new();
        for cut in end.cuts(7, 0, 64) {
            let disk = end.power_cut(cut);
            seen.insert(disk.content(&p("a")).unwrap());
        }
        let want: BTreeSet<Vec<u8>> = [b"one".to_vec(), b"TWO".to_vec(), b"Tne".to_vec()]
            .into_iter()
            .collect();
        assert_eq!(seen, want);
        // Before the directory sync, the file may be gone.
        let d = trace[1].frozen.power_cut(Cut::Enumerated(0));
        assert!(!d.exists(&p("a")));
    }

    #[test]
    fn renames_and_unlinks_wait_for_the_directory_sync_and_seeds_reproduce() {
        let m = SimMedia::new();
        m.install(&p("old"), b"old".to_vec());
        let f = m.open(&p("tmp"), Open::Truncate).unwrap();
        f.write_at(&[7u8; 4096], 0).unwrap();
        f.sync_all(SyncPoint::StateTmp).unwrap();
        m.rename(&p("tmp"), &p("old")).unwrap();
        let fr = m.take_trace().pop().unwrap().frozen;
        let cuts = fr.cuts(1, 16, 1);
        assert_eq!(cuts.len(), 18);
        for cut in cuts {
            let a = fr.power_cut(cut).content(&p("old")).unwrap();
            let b = fr.power_cut(cut).content(&p("old")).unwrap();
            assert_eq!(a, b, "{cut:?} reproduces");
            assert!(a == b"old" || a == [7u8; 4096], "{cut:?}");
        }
        let mut b = [0u8; 4];
        let e = m.open(&p("old"), Open::Read).unwrap();
        assert_eq!(
            e.read_at(&mut b, 4095).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn a_dropped_sync_leaves_the_writes_in_flight() {
        let m = SimMedia::new();
        m.install(&p("x"), vec![0; 8]);
        m.drop_sync(Some(SyncPoint::Hidden));
        let f = m.open(&p("x"), Open::Write).unwrap();
        f.write_at(&[1; 8], 0).unwrap();
        f.sync_data(SyncPoint::Hidden).unwrap();
        assert_eq!(m.dropped(), 1);
        let fr = m.take_trace().pop().unwrap().frozen;
        assert_eq!(fr.in_flight(), 1);
        assert_eq!(
            fr.power_cut(Cut::Enumerated(0)).content(&p("x")).unwrap(),
            [0; 8]
        );
    }
}
