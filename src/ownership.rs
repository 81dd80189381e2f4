//! Exclusive ownership of the files a colo-blk process works on: the image, the replication
//! metadata, the dirty log, the layer directory and the sockets it listens on.
//!
//! Every one is locked with an open-file-description (OFD) lock, as QEMU locks its images: a
//! second process on the same file is refused at start, before it has read or written
//! anything, and the message names the holder's pid. Linux reports no pid for OFD locks in
//! `F_OFD_GETLK` or `/proc/locks`; it does list every lock under the holder's
//! `/proc/PID/fdinfo/FD`, which is where the holder is looked up (as `lslocks` does).
//!
//! The image is locked over its whole length, so QEMU's own tools refuse it too while colo-blk
//! serves it (`qemu-img info` says `Failed to get shared "write" lock`); a read-only export
//! takes a shared lock, so several read-only exports may share an image but no writer. A
//! directory and a socket are locked through a file beside them (`DIR/colo-blk.lock`,
//! `SOCKET.lock`), which stays behind after the process ends: the lock dies with the process
//! (even a SIGKILLed one), the file means nothing by itself. On a file system without locks
//! (NFS without lockd, some FUSE file systems) the process goes on unprotected and logs it, as
//! QEMU's `locking=auto` does.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Name of the lock file in a locked directory.
pub const DIR_LOCK_FILE: &str = "colo-blk.lock";

/// Why a file could not be taken.
#[derive(Debug, Error)]
pub enum OwnershipError {
    /// Another process holds a conflicting lock.
    #[error("{what} {path} is in use by {holder}; stop that process first (two processes on one {what} would corrupt it)")]
    InUse {
        what: &'static str,
        path: PathBuf,
        holder: Holder,
    },
    #[error("cannot lock {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// The process holding a lock, as far as Linux tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    Process { pid: u32, command: String },
    Unknown,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Process { pid, command } if command.is_empty() => write!(f, "pid {pid}"),
            Holder::Process { pid, command } => write!(f, "pid {pid} ({command})"),
            Holder::Unknown => {
                write!(
                    f,
                    "another process (not visible here: another container or user?)"
                )
            }
        }
    }
}

/// Shared (readers only) or exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    Shared,
    Exclusive,
}

/// A held lock; released when dropped (or when the process ends, however it ends).
#[derive(Debug)]
pub struct FileLock {
    _file: File,
    path: PathBuf,
}

impl FileLock {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Locks the existing file `path` over its whole length; `what` names it in errors ("image").
pub fn lock_file(
    path: &Path,
    what: &'static str,
    mode: LockMode,
) -> Result<FileLock, OwnershipError> {
    let io_err = |source| OwnershipError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(mode == LockMode::Exclusive)
        .open(path)
        .map_err(io_err)?;
    take(file, path, what, mode)
}

/// Locks `path`, creating it (empty) when missing: the lock file of a directory or a socket.
pub fn lock_or_create(path: &Path, what: &'static str) -> Result<FileLock, OwnershipError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|source| OwnershipError::Io {
            what,
            path: path.to_path_buf(),
            source,
        })?;
    take(file, path, what, LockMode::Exclusive)
}

/// Locks the directory `dir` through its [`DIR_LOCK_FILE`].
pub fn lock_dir(dir: &Path, what: &'static str) -> Result<FileLock, OwnershipError> {
    let lock = lock_or_create(&dir.join(DIR_LOCK_FILE), what)?;
    Ok(FileLock {
        path: dir.to_path_buf(),
        ..lock
    })
}

/// Locks the socket path `socket` through `SOCKET.lock`, before the socket is (re)bound: a
/// second process must not unlink a socket another one serves.
pub fn lock_socket(socket: &Path, what: &'static str) -> Result<FileLock, OwnershipError> {
    let mut name = socket.as_os_str().to_owned();
    name.push(".lock");
    let lock = lock_or_create(Path::new(&name), what)?;
    Ok(FileLock {
        path: socket.to_path_buf(),
        ..lock
    })
}

fn take(
    file: File,
    path: &Path,
    what: &'static str,
    mode: LockMode,
) -> Result<FileLock, OwnershipError> {
    // SAFETY: an all-zero `flock` is a valid value of this plain C struct.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = match mode {
        LockMode::Shared => libc::F_RDLCK,
        LockMode::Exclusive => libc::F_WRLCK,
    } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // l_start = 0, l_len = 0: the whole file, however long it grows.
    // SAFETY: fcntl(2) on an fd we own with a pointer to a live, initialised `flock`.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r == 0 {
        return Ok(FileLock {
            _file: file,
            path: path.to_path_buf(),
        });
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // A file system without locks (NFS without lockd, some FUSE): as QEMU's locking=auto,
        // go on unprotected, and say so.
        Some(libc::ENOLCK) | Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
            log::warn!(
                "cannot lock {what} {}: {e}; its file system does not support locks, so nothing \
                 keeps a second process off it",
                path.display()
            );
            Ok(FileLock {
                _file: file,
                path: path.to_path_buf(),
            })
        }
        Some(libc::EAGAIN) | Some(libc::EACCES) => Err(OwnershipError::InUse {
            what,
            path: path.to_path_buf(),
            holder: file.metadata().map_or(Holder::Unknown, |m| holder_of(&m)),
        }),
        _ => Err(OwnershipError::Io {
            what,
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

/// The process whose `/proc/PID/fdinfo` lists a lock on the file of `md` (not this process).
fn holder_of(md: &std::fs::Metadata) -> Holder {
    let (major, minor) = (libc::major(md.dev()), libc::minor(md.dev()));
    let key = format!("{major:02x}:{minor:02x}:{} ", md.ino());
    let me = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Holder::Unknown;
    };
    for p in procs.filter_map(Result::ok) {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me || !holds_lock(&p.path().join("fdinfo"), &key) {
            continue;
        }
        let command = std::fs::read(p.path().join("cmdline"))
            .map(|c| {
                c.split(|&b| b == 0)
                    .filter(|a| !a.is_empty())
                    .map(String::from_utf8_lossy)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        return Holder::Process { pid, command };
    }
    Holder::Unknown
}

/// Whether one of the fdinfo files in `dir` has a `lock:` line naming `key` (`MAJ:MIN:INODE `).
fn holds_lock(dir: &Path, key: &str) -> bool {
    let Ok(fds) = std::fs::read_dir(dir) else {
        return false;
    };
    fds.filter_map(Result::ok).any(|fd| {
        std::fs::read_to_string(fd.path())
            .map(|s| s.lines().any(|l| l.starts_with("lock:") && l.contains(key)))
            .unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn a_second_description_is_refused_and_a_dropped_lock_frees_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, b"data").unwrap();
        let held = lock_file(&path, "image", LockMode::Exclusive).unwrap();
        // OFD locks conflict between open file descriptions, even in one process.
        let e = lock_file(&path, "image", LockMode::Exclusive).unwrap_err();
        assert!(matches!(e, OwnershipError::InUse { .. }), "{e}");
        assert!(lock_file(&path, "image", LockMode::Shared).is_err());
        drop(held);
        let a = lock_file(&path, "image", LockMode::Shared).unwrap();
        let _b = lock_file(&path, "image", LockMode::Shared).unwrap();
        assert!(lock_file(&path, "image", LockMode::Exclusive).is_err());
        drop(a);
    }

    #[test]
    fn the_holder_is_named_by_pid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, b"data").unwrap();
        // A child process that holds an OFD lock (flock(1) takes flock locks, not these):
        // python's fcntl does.
        let script = format!(
            "import fcntl,os,struct,sys\nfd=os.open({:?},os.O_RDWR)\n\
             fcntl.fcntl(fd,fcntl.F_OFD_SETLK,struct.pack('hhqqi',fcntl.F_WRLCK,0,0,0,0))\n\
             print('locked',flush=True)\nsys.stdin.read()\n",
            path.display().to_string()
        );
        let Ok(mut child) = Command::new("python3")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
        else {
            eprintln!("SKIP the_holder_is_named_by_pid: no python3");
            return;
        };
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "locked");
        let e = lock_file(&path, "image", LockMode::Exclusive).unwrap_err();
        drop(child.stdin.take());
        let _ = child.wait();
        match e {
            OwnershipError::InUse {
                holder: Holder::Process { pid, .. },
                ..
            } => assert_eq!(pid, child.id()),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn dir_and_socket_locks_use_a_file_beside_them() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_dir(dir.path(), "layer directory").unwrap();
        assert!(dir.path().join(DIR_LOCK_FILE).exists());
        let e = lock_dir(dir.path(), "layer directory").unwrap_err();
        assert!(e.to_string().contains("layer directory"), "{e}");
        assert_eq!(held.path(), dir.path());
        let sock = dir.path().join("s.sock");
        let _s = lock_socket(&sock, "vhost-user socket").unwrap();
        assert!(lock_socket(&sock, "vhost-user socket").is_err());
        assert!(dir.path().join("s.sock.lock").exists());
    }
}
