//! The storage seam of the state that must survive a power loss: the replication metadata,
//! the layer directory (its state file, the layer files and their index records) and the
//! flushes of the disk under them all go through a [`Media`] and the [`DurableFile`]s it opens.
//!
//! - [`StdMedia`]: production, plain `std::fs` files: each call is the one syscall the code
//!   made before the seam (no extra copy, no extra syscall).
//! - [`super::sim::SimMedia`]: a simulated disk for tests, which keeps what was synced apart
//!   from what was only written and yields, on a power cut, the states a real device may leave.
//!
//! Every sync names its [`SyncPoint`], the place in the code that needs it: the simulated disk
//! records crash points by it and can leave one out (the mutation check, docs/layers.md).

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use super::{fallocate, BlockDevice};

/// A sync the durable-state code depends on (docs/layers.md, "What is synced when", lists
/// each with the test that fails without it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SyncPoint {
    /// A metadata slot after its `pwrite` (`MetaStore`).
    MetaSlot,
    /// The directory of a newly created metadata file.
    MetaDir,
    /// `layers.state.tmp` before it is renamed over `layers.state`.
    StateTmp,
    /// The layer directory after that rename.
    StateDir,
    /// Every hidden layer's saved originals and index records, before the state file says
    /// the layers are synced (`"open": null`: a group prepare, a failover's start, a clean
    /// close). Never per batch of the stream (docs/flush-policy.md).
    Hidden,
    /// An active layer's data, before its index records are written (SVM flush).
    ActiveData,
    /// An active layer's index records (SVM flush).
    ActiveIndex,
    /// Base at a FLUSH of the primary's stream.
    BasePrimaryFlush,
    /// Base at a COLO marker.
    BaseMarker,
    /// Base at a checkpoint (or a committed cut), before the state file drops the layers.
    BaseCheckpoint,
    /// Base before the state file records a prepared group checkpoint.
    BaseGroupPrepare,
    /// Base during a failover's commit, before the records of committed clusters (SVM flush).
    BaseCommit,
    /// Base at the end of a failover, before the state file says standalone.
    BaseFailoverEnd,
    /// Base at an SVM flush once the disk serves the SVM directly.
    BaseSvmFlush,
    /// The dirty log's bits after their `pwrite` (before the change they cover).
    DirtyBits,
    /// The directory of a newly created dirty log.
    DirtyDir,
    /// A device flush not named by its caller.
    Device,
}

impl SyncPoint {
    /// Every sync point, in the order of the table in docs/layers.md.
    pub const ALL: [SyncPoint; 17] = [
        SyncPoint::MetaSlot,
        SyncPoint::MetaDir,
        SyncPoint::StateTmp,
        SyncPoint::StateDir,
        SyncPoint::Hidden,
        SyncPoint::ActiveData,
        SyncPoint::ActiveIndex,
        SyncPoint::BasePrimaryFlush,
        SyncPoint::BaseMarker,
        SyncPoint::BaseCheckpoint,
        SyncPoint::BaseGroupPrepare,
        SyncPoint::BaseCommit,
        SyncPoint::BaseFailoverEnd,
        SyncPoint::BaseSvmFlush,
        SyncPoint::DirtyBits,
        SyncPoint::DirtyDir,
        SyncPoint::Device,
    ];

    /// The point named `name` (its `Debug` spelling, as the mutation script passes it).
    pub fn from_name(name: &str) -> Option<SyncPoint> {
        SyncPoint::ALL
            .into_iter()
            .find(|p| format!("{p:?}").eq_ignore_ascii_case(name))
    }
}

/// How a file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// An existing file, read only.
    Read,
    /// An existing file, read and write.
    Write,
    /// Read and write, created when missing (never truncated).
    Create,
    /// Read and write; fails with `AlreadyExists` if the file exists.
    CreateNew,
    /// Write, created when missing, truncated to zero length.
    Truncate,
}

/// A file of durable state. Reads and writes are positional and complete (a read past the end
/// fails with `UnexpectedEof`); nothing written is durable before a sync.
// A file of durable state has a length, not emptiness: no `is_empty`.
#[allow(clippy::len_without_is_empty)]
pub trait DurableFile: Send + Sync + fmt::Debug {
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// The file's length.
    fn len(&self) -> io::Result<u64>;
    /// Sets the file's length (extending with zeros).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes `[offset, offset + len)` read back as zeros, keeping the size; an error for which
    /// [`fallocate::is_unsupported`] holds when the file system cannot.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// `fdatasync`: the data written so far, and the size, are durable.
    fn sync_data(&self, at: SyncPoint) -> io::Result<()>;
    /// `fsync`: as [`DurableFile::sync_data`], with all of the inode.
    fn sync_all(&self, at: SyncPoint) -> io::Result<()>;
    /// The std file behind it, if there is one (tests look at its allocated blocks).
    fn as_std(&self) -> Option<&File> {
        None
    }
}

/// Where durable state lives: files by path, and their directories.
pub trait Media: Send + Sync + fmt::Debug {
    /// Opens `path`.
    fn open(&self, path: &Path, how: Open) -> io::Result<Box<dyn DurableFile>>;
    /// The whole content of `path`.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let f = self.open(path, Open::Read)?;
        let mut buf = vec![0u8; f.len()? as usize];
        f.read_at(&mut buf, 0)?;
        Ok(buf)
    }
    /// Whether `path` exists.
    fn exists(&self, path: &Path) -> bool;
    /// Renames `from` to `to` (replacing it), in the same directory.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Unlinks `path`.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Makes the entries of `dir` durable (creations, renames and unlinks in it).
    fn sync_dir(&self, dir: &Path, at: SyncPoint) -> io::Result<()>;
    /// The names of the entries of `dir`.
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Creates `dir` and its parents.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// A tag of the current boot of the machine (0: unknown). Writes made in this boot are
    /// still in the page cache after a process crash, so records written without a sync can be
    /// trusted by a process of the same boot, never after a power loss or a reboot.
    fn boot_tag(&self) -> u32 {
        static TAG: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
        *TAG.get_or_init(|| match fs::read("/proc/sys/kernel/random/boot_id") {
            Ok(id) if !id.is_empty() => crc32c::crc32c(&id) | 1,
            _ => 0,
        })
    }
    /// Whether slow unlinks may run on a background thread (the simulated disk wants every
    /// change in one deterministic order, so that a seed reproduces a power cut).
    fn background_unlinks(&self) -> bool {
        true
    }
    /// Flushes `dev`, a disk kept on this media, for the reason `at`.
    fn flush_device(&self, dev: &dyn BlockDevice, _at: SyncPoint) -> io::Result<()> {
        dev.flush()
    }
}

/// Production media: the file system, through `std::fs`.
#[derive(Debug, Clone, Copy, Default)]
pub struct StdMedia;

/// The production media, shared.
pub fn std_media() -> Arc<dyn Media> {
    Arc::new(StdMedia)
}

impl Media for StdMedia {
    fn open(&self, path: &Path, how: Open) -> io::Result<Box<dyn DurableFile>> {
        let mut o = OpenOptions::new();
        match how {
            Open::Read => o.read(true),
            Open::Write => o.read(true).write(true),
            Open::Create => o.read(true).write(true).create(true).truncate(false),
            Open::CreateNew => o.read(true).write(true).create_new(true),
            Open::Truncate => o.write(true).create(true).truncate(true),
        };
        Ok(Box::new(StdFile(o.open(path)?)))
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path, _at: SyncPoint) -> io::Result<()> {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        File::open(dir)?.sync_all()
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        Ok(fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect())
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }
}

/// A std file as a [`DurableFile`].
#[derive(Debug)]
pub struct StdFile(pub File);

impl DurableFile for StdFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        fallocate::punch_hole(&self.0, offset, len)
    }

    fn sync_data(&self, _at: SyncPoint) -> io::Result<()> {
        self.0.sync_data()
    }

    fn sync_all(&self, _at: SyncPoint) -> io::Result<()> {
        self.0.sync_all()
    }

    fn as_std(&self) -> Option<&File> {
        Some(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn std_media_round_trips_and_names_every_sync_point() {
        let dir = tempfile::tempdir().unwrap();
        let m = StdMedia;
        let p = dir.path().join("f");
        let f = m.open(&p, Open::CreateNew).unwrap();
        f.write_at(b"hello", 3).unwrap();
        f.sync_data(SyncPoint::Device).unwrap();
        assert_eq!(m.read(&p).unwrap(), b"\0\0\0hello");
        assert!(m.open(&p, Open::CreateNew).is_err());
        m.rename(&p, &dir.path().join("g")).unwrap();
        m.sync_dir(dir.path(), SyncPoint::StateDir).unwrap();
        assert_eq!(m.list_dir(dir.path()).unwrap(), ["g"]);
        let mut b = [0u8; 4];
        let e = f.read_at(&mut b, 6).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        for p in SyncPoint::ALL {
            assert_eq!(SyncPoint::from_name(&format!("{p:?}")), Some(p));
        }
    }
}
