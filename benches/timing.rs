//! Timing measurements of the replication internals; they print numbers and assert nothing
//! about speed (docs/performance.md quotes them):
//!
//! - `checkpoint-drop`: what a checkpoint of the secondary's disk buffer costs with 1 MiB and
//!   1 GiB buffered, and how long the background drop of the old layer (unlink, then the close
//!   that frees the blocks) takes. `COLO_TIMING_DIR` puts the files on another file system
//!   than the temporary directory's.
//! - `dirty-log-fast-path`: the cost of recording a change in the persistent dirty log when
//!   its extent is already on disk (the steady state of random writes over a working set).
//!
//! ```text
//! cargo bench --bench timing [-- checkpoint-drop | dirty-log-fast-path]
//! ```
//!
//! Without a name both run. Exit status: 0 on success, 1 on an I/O error, 2 on a usage error.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use colo_blk::replication::layers::LayeredDisk;
use colo_blk::replication::DirtyLog;
use colo_blk::storage::{BlockDevice, Change, RawImage, RawImageOptions};

/// One measurement: it prints what it measured.
type Measurement = fn() -> io::Result<()>;

/// The measurements, by name.
const MEASUREMENTS: &[(&str, Measurement)] = &[
    ("checkpoint-drop", checkpoint_drop),
    ("dirty-log-fast-path", dirty_log_fast_path),
];

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; every other argument names a measurement.
    let names: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    for name in &names {
        if !MEASUREMENTS.iter().any(|(n, _)| n == name) {
            let known: Vec<&str> = MEASUREMENTS.iter().map(|(n, _)| *n).collect();
            eprintln!("timing: unknown measurement {name:?} (known: {known:?})");
            return ExitCode::from(2);
        }
    }
    for (name, run) in MEASUREMENTS {
        if names.is_empty() || names.iter().any(|n| n == name) {
            println!("== {name}");
            if let Err(e) = run() {
                eprintln!("timing: {name}: {e}");
                return ExitCode::from(1);
            }
        }
    }
    ExitCode::SUCCESS
}

/// A temporary directory in `COLO_TIMING_DIR`, or in the system's temporary directory.
fn scratch() -> io::Result<tempfile::TempDir> {
    match std::env::var_os("COLO_TIMING_DIR").map(PathBuf::from) {
        Some(root) => tempfile::tempdir_in(root),
        None => tempfile::tempdir(),
    }
}

/// Writes `size` bytes of `byte` through `write(offset, chunk)`, 8 MiB at a time.
fn fill(
    size: u64,
    byte: u8,
    mut write: impl FnMut(u64, &[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let chunk = vec![byte; 8 << 20];
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(chunk.len() as u64);
        write(pos, &chunk[..n as usize])?;
        pos += n;
    }
    Ok(())
}

fn checkpoint_drop() -> io::Result<()> {
    for size in [1u64 << 20, 1 << 30] {
        let tmp = scratch()?;
        for synced in [true, false] {
            drop_layer_file(tmp.path(), size, synced)?;
        }
        checkpoint_with(tmp.path(), size)?;
    }
    Ok(())
}

/// Removing one layer-like file with `size` bytes of data, written back to disk or still dirty
/// in the page cache: the unlink, then the close of the last descriptor (which frees the
/// blocks).
fn drop_layer_file(dir: &Path, size: u64, synced: bool) -> io::Result<()> {
    let path = dir.join("hidden-x.img");
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)?;
    fill(size, 0x5a, |pos, data| file.write_all_at(data, pos))?;
    if synced {
        file.sync_all()?;
    }
    let t = Instant::now();
    fs::remove_file(&path)?;
    let unlink = t.elapsed();
    let t = Instant::now();
    drop(file);
    let close = t.elapsed();
    let state = if synced { "synced" } else { "dirty" };
    println!(
        "{:>5} MiB layer file ({state}): unlink {unlink:?}, close {close:?}",
        size >> 20
    );
    Ok(())
}

/// `checkpoint()` with `size` bytes in hidden: how long the call takes, and how long until the
/// background thread removed the old files.
fn checkpoint_with(dir: &Path, size: u64) -> io::Result<()> {
    let base = Arc::new(RawImage::open(&RawImageOptions {
        path: dir.join("disk.img"),
        read_only: false,
        direct: false,
        create_size: Some(size),
    })?);
    let layers = dir.join("layers");
    let ld = LayeredDisk::new(base.clone(), &layers, 65536)?;
    fill(size, 0x5a, |pos, data| base.write_at(data, pos))?;
    fill(size, 0xa5, |offset, data| {
        ld.apply_primary(&Change::Write { offset, data })
    })?;
    ld.flush()?;
    let t = Instant::now();
    ld.checkpoint()?;
    let call = t.elapsed();
    while layer_files(&layers)? != ["active-1.img", "hidden-1.img"] {
        std::thread::sleep(Duration::from_micros(100));
    }
    let reaped = t.elapsed();
    println!(
        "{:>5} MiB buffered: checkpoint() returned in {call:?}, old layers gone after \
         {reaped:?}",
        size >> 20
    );
    Ok(())
}

/// The layer files in `dir`, sorted.
fn layer_files(dir: &Path) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with("hidden-") || name.starts_with("active-") {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

fn dirty_log_fast_path() -> io::Result<()> {
    let dir = tempfile::tempdir()?;
    let cap = 1 << 30;
    let (log, _) = DirtyLog::open(&dir.path().join("d"), cap, 4 << 20, false)?;
    let n = 2_000_000u64;
    let offsets: Vec<u64> = (0..n).map(|i| (i * 7919 * 4096) % cap).collect();
    // Warm-up: every extent recorded once (256 syncs).
    for e in 0..256 {
        drop(log.record(e * (4 << 20), 4096)?);
    }
    let t = Instant::now();
    for &o in &offsets {
        drop(log.record(o, 4096)?);
    }
    let per = t.elapsed().as_nanos() as f64 / n as f64;
    println!("dirty log fast path: {per:.1} ns per 4 KiB change (no I/O)");
    Ok(())
}
