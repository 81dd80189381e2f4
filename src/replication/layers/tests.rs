//! Tests of the layered disk: a model-based proptest, unit tests and a concurrency test.
use super::*;
use crate::storage::{Change, RawImage, RawImageOptions};
use proptest::prelude::*;
use std::fs;
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
                if ld.begin_failover(None, false).unwrap() {
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
            needs_resync: false,
        };
        prop_assert_eq!(s, want, "op {}", i);
    }
    let _ = checkpoint;
    ld.flush().unwrap();
    drop(ld);
    // Old layers are gone; the current ones stay for a restart (none once standalone).
    let want = if mode == Mode::Standalone { 0 } else { 2 };
    prop_assert_eq!(layer_files(&ld_dir).len(), want, "layer files left behind");
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
    let hidden = &st.stage.layers().unwrap().hidden[0].layer;
    assert_eq!(hidden.clusters.len(), 128);
    use std::os::unix::fs::MetadataExt;
    // Only the index log (128 records of 24 bytes, after the data region) takes space.
    assert!(hidden.file.as_std().unwrap().metadata().unwrap().blocks() * 512 <= 4096);
    drop(st);
    assert_eq!(read(&ld, 0, 8 << 20), vec![0; 8 << 20]);
}

#[test]
fn originals_in_holes_of_base_are_zeros_without_being_read_or_stored() {
    let cs = 65536;
    let (tmp, base, ld) = setup(4 << 20, cs);
    let dir = tmp.path().join("layers");
    // Data in a few places of an otherwise sparse base: part of cluster 1, all of cluster 5,
    // the first 4 KiB of cluster 6, the last 512 bytes of cluster 20 and of the last cluster.
    let mut original = vec![0u8; 4 << 20];
    for (at, len) in [
        (70_000, 5_000),
        (5 * cs, cs),
        (6 * cs, 4096),
        (21 * cs - 512, 512),
        ((4 << 20) - 512, 512),
    ] {
        let (at, len) = (at as usize, len as usize);
        original[at..at + len].copy_from_slice(&pattern(1, at as u64, len));
        base.write_at(&original[at..at + len], at as u64).unwrap();
    }
    // One write over three quarters of it (three copy-before-write runs), one over the tail.
    ld.primary_write(0, &pattern(2, 0, 3 << 20)).unwrap();
    ld.primary_write((4 << 20) - 8192, &pattern(3, 0, 8192))
        .unwrap();
    assert_eq!(read_all(&ld), original, "SVM view is the checkpoint");
    let st = ld.read_state();
    let hidden = &st.stage.layers().unwrap().hidden[0].layer;
    assert_eq!(hidden.clusters.len(), 48 + 1);
    use std::os::unix::fs::MetadataExt;
    // Only the five clusters with data and the index log take space.
    let used = hidden.file.as_std().unwrap().metadata().unwrap().blocks() * 512;
    assert!(used <= 5 * cs + 8192, "hidden uses {used} bytes");
    drop(st);
    // The records of the zero clusters replay (their checksums are those of zeros).
    let ld = restart(&base, &dir, cs, ld);
    assert_eq!(read_all(&ld), original, "SVM view after a restart");
    ld.failover().unwrap();
    assert!(
        first_diff(&read_all(&*base), &original).is_none(),
        "failover restores the original"
    );
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
    // The current layers outlive the process (the state file names them); the stale file is
    // still not ours.
    assert_eq!(
        layer_files(&dir),
        ["active-0.img", "active-2.img", "hidden-2.img"]
    );
    assert_eq!(fs::read(dir.join("active-0.img")).unwrap(), b"not ours");
}

/// Checkpoint correctness with little and much buffered data. (Its cost does not depend on
/// the amount: `cargo bench --bench timing -- checkpoint-drop` measures it.)
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
                            let got = read(&*ld, first * RUN, ((last - first + 1) * RUN) as usize);
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

// ---- restart and COLO cuts ----

/// Opens the layer directory again as a restarted secondary does; the old process "died":
/// its disk is leaked, no destructor runs (as after SIGKILL).
fn restart(base: &Arc<RawImage>, dir: &Path, cs: u64, old: LayeredDisk) -> LayeredDisk {
    std::mem::forget(old);
    LayeredDisk::new(base.clone(), dir, cs).unwrap()
}

#[test]
fn a_restart_mid_epoch_keeps_the_rollback_and_the_flushed_svm_writes() {
    let (tmp, base, ld) = setup(1 << 20, 4096);
    let dir = tmp.path().join("layers");
    base.write_at(&pattern(1, 0, 1 << 20), 0).unwrap();
    ld.primary_write(0, &pattern(2, 0, 64 << 10)).unwrap();
    ld.checkpoint().unwrap();
    let at_checkpoint = read_all(&*base);
    ld.primary_write(8192, &pattern(3, 8192, 200_000)).unwrap();
    let svm = pattern(4, 0, 10_000);
    ld.write_at(&svm, 300_000).unwrap();
    ld.flush().unwrap();
    // Not flushed: may be forgotten by the restart.
    ld.write_at(&pattern(5, 0, 4096), 600 << 10).unwrap();
    let ld = restart(&base, &dir, 4096, ld);
    assert_eq!(ld.stats().epoch, 1);
    let mut want = at_checkpoint.clone();
    want[300_000..310_000].copy_from_slice(&svm);
    let view = read_all(&ld);
    let unflushed = (600 << 10)..(604 << 10);
    let mut masked = view.clone();
    masked[unflushed.clone()].copy_from_slice(&want[unflushed.clone()]);
    assert!(first_diff(&masked, &want).is_none(), "view after restart");
    // The stream goes on after the restart: copy-before-write still keeps the checkpoint.
    ld.primary_write(0, &pattern(6, 0, 1 << 20)).unwrap();
    ld.failover().unwrap();
    let mut disk = read_all(&*base);
    disk[unflushed.clone()].copy_from_slice(&want[unflushed]);
    assert!(first_diff(&disk, &want).is_none(), "failover after restart");
}

#[test]
fn an_interrupted_failover_resumes_after_a_restart() {
    let (tmp, base, ld) = setup(1 << 20, 4096);
    let dir = tmp.path().join("layers");
    base.write_at(&pattern(1, 0, 1 << 20), 0).unwrap();
    let at_checkpoint = read_all(&*base);
    ld.primary_write(0, &pattern(2, 0, 512 << 10)).unwrap();
    let svm = pattern(3, 0, 8192);
    ld.write_at(&svm, 100_000).unwrap();
    ld.flush().unwrap();
    let mut want = at_checkpoint.clone();
    want[100_000..108_192].copy_from_slice(&svm);
    assert!(ld.begin_failover(None, false).unwrap());
    ld.commit_batch(10, &mut Vec::new()).unwrap();
    // The SVM writes through a half-committed disk, flushes, and the process dies.
    let late = pattern(4, 0, 4096);
    ld.write_at(&late, 200 << 10).unwrap();
    ld.flush().unwrap();
    want[200 << 10..204 << 10].copy_from_slice(&late);
    let ld = restart(&base, &dir, 4096, ld);
    assert!(ld.failover_pending());
    assert!(ld.apply_primary(&Change::Flush).is_err(), "stream refused");
    assert!(
        first_diff(&read_all(&ld), &want).is_none(),
        "view mid-failover"
    );
    ld.failover().unwrap();
    assert!(!ld.failover_pending());
    assert!(first_diff(&read_all(&*base), &want).is_none());
    let ld = restart(&base, &dir, 4096, ld);
    assert!(ld.is_failed_over() && !ld.failover_pending());
    assert!(layer_files(&dir).is_empty());
}

fn mark(epoch: u64) -> Mark {
    Mark {
        epoch,
        bases: vec![Some(epoch as u16)],
    }
}

/// A COLO checkpoint: the SVM is stopped, the primary's marker starts a tentative cut, the
/// stream goes on, and the SVM restarts with the primary's state: the view is the disk at the
/// marker. Across a restart too.
#[test]
fn a_committed_cut_is_the_disk_at_the_marker() {
    let (tmp, base, ld) = setup(1 << 20, 4096);
    let dir = tmp.path().join("layers");
    base.write_at(&pattern(1, 0, 1 << 20), 0).unwrap();
    ld.primary_write(0, &pattern(2, 0, 100_000)).unwrap();
    ld.write_at(&pattern(3, 0, 5000), 500_000).unwrap();
    ld.mark(mark(1)).unwrap();
    let at_marker = read_all(&*base);
    ld.primary_write(50_000, &pattern(4, 0, 100_000)).unwrap();
    let ld = restart(&base, &dir, 4096, ld);
    assert_eq!(ld.marks(), [mark(1)]);
    ld.commit_mark(1).unwrap();
    assert_eq!(ld.stats().epoch, 1);
    assert_eq!(ld.stats().active_bytes, 0);
    assert_eq!(ld.marks(), [mark(1)], "the cut stays a possible cut");
    assert!(
        first_diff(&read_all(&ld), &at_marker).is_none(),
        "view is the cut"
    );
    ld.failover().unwrap();
    assert!(first_diff(&read_all(&*base), &at_marker).is_none());
    assert!(ld.commit_mark(1).is_err());
}

/// An abandoned checkpoint (the primary died before the SVM got its state): the tentative cuts
/// change nothing; failover gives the last checkpoint plus the SVM's writes.
#[test]
fn abandoned_cuts_keep_the_last_checkpoint() {
    let (_tmp, base, ld) = setup(1 << 20, 4096);
    base.write_at(&pattern(1, 0, 1 << 20), 0).unwrap();
    let at_checkpoint = read_all(&*base);
    ld.primary_write(0, &pattern(2, 0, 100_000)).unwrap();
    let svm = pattern(3, 0, 5000);
    ld.write_at(&svm, 500_000).unwrap();
    ld.mark(mark(1)).unwrap();
    ld.primary_write(50_000, &pattern(4, 0, 100_000)).unwrap();
    ld.mark(mark(2)).unwrap();
    ld.primary_write(0, &pattern(5, 0, 300_000)).unwrap();
    assert_eq!(ld.marks(), [mark(1), mark(2)]);
    let mut want = at_checkpoint.clone();
    want[500_000..505_000].copy_from_slice(&svm);
    assert!(
        first_diff(&read_all(&ld), &want).is_none(),
        "view unchanged"
    );
    assert!(ld.commit_mark(7).is_err(), "no such cut");
    ld.failover().unwrap();
    assert!(first_diff(&read_all(&*base), &want).is_none());
}

#[test]
fn a_layer_directory_of_another_geometry_is_refused() {
    let (tmp, base, ld) = setup(1 << 20, 4096);
    drop(ld);
    let e = LayeredDisk::new(base, tmp.path().join("layers"), 8192).unwrap_err();
    assert!(e.to_string().contains("--cluster-size"), "{e}");
}

/// A marker with no stream change after it costs no layer; cutting there is a plain checkpoint
/// at that epoch, and later markers stay tentative.
#[test]
fn cuts_at_idle_markers_and_later_marks_stay_tentative() {
    let (tmp, base, ld) = setup(1 << 20, 4096);
    let dir = tmp.path().join("layers");
    base.write_at(&pattern(1, 0, 1 << 20), 0).unwrap();
    ld.primary_write(0, &pattern(2, 0, 100_000)).unwrap();
    ld.write_at(&pattern(3, 0, 5000), 500_000).unwrap();
    ld.mark(mark(4)).unwrap();
    ld.mark(mark(5)).unwrap();
    let files = layer_files(&dir);
    assert_eq!(files.len(), 2, "idle markers create no layer: {files:?}");
    assert_eq!(ld.marks(), [mark(4), mark(5)]);
    let at_markers = read_all(&*base);
    ld.commit_mark(4).unwrap();
    assert_eq!(ld.marks(), [mark(4), mark(5)]);
    assert_eq!(ld.stats().epoch, 4);
    assert!(first_diff(&read_all(&ld), &at_markers).is_none());
    // A pending marker is forgotten by a crash; the rollback data is not, nor the cuts the
    // epoch's first layer starts at.
    ld.primary_write(8192, &pattern(6, 0, 8192)).unwrap();
    ld.mark(mark(6)).unwrap();
    let ld = restart(&base, &dir, 4096, ld);
    assert_eq!(ld.marks(), [mark(4), mark(5)]);
    ld.failover().unwrap();
    assert!(first_diff(&read_all(&*base), &at_markers).is_none());
}

/// A marker from a stop of the primary while the SVM runs (a user `stop`): the SVM keeps
/// writing into active, and the stream may go on (`cont`) or not. Cutting there later drops all
/// of active (the SVM's writes before and after the marker alike) and the rollback data before
/// it: the view is the primary's disk at the marker. The cut stays possible: QEMU may load the
/// same point's state again at its next checkpoint (the primary still stopped), after the SVM
/// wrote again; a later marker can still be cut too.
#[test]
fn a_cut_at_a_stop_stays_possible_while_the_svm_writes() {
    let (_tmp, base, ld) = setup(1 << 20, 4096);
    base.write_at(&pattern(1, 0, 1 << 20), 0).unwrap();
    ld.primary_write(0, &pattern(2, 0, 100_000)).unwrap();
    ld.write_at(&pattern(3, 0, 5000), 500_000).unwrap();
    ld.mark(mark(1)).unwrap();
    let at_stop = read_all(&*base);
    // The SVM runs on: its writes go to active, over the marker's clusters too.
    ld.write_at(&pattern(4, 0, 70_000), 30_000).unwrap();
    ld.commit_mark(1).unwrap();
    assert_eq!((ld.stats().epoch, ld.stats().active_bytes), (1, 0));
    assert!(
        first_diff(&read_all(&ld), &at_stop).is_none(),
        "the stop's disk"
    );
    // The SVM runs the stop's state and writes; QEMU loads the same state again.
    ld.write_at(&pattern(5, 0, 9000), 600_000).unwrap();
    assert_eq!(ld.marks(), [mark(1)]);
    ld.commit_mark(1).unwrap();
    assert!(first_diff(&read_all(&ld), &at_stop).is_none(), "again");
    // `cont`: the stream goes on; a later stop is a cut, and the first still rolls back.
    ld.primary_write(200_000, &pattern(6, 0, 50_000)).unwrap();
    ld.mark(mark(2)).unwrap();
    let at_second = read_all(&*base);
    ld.primary_write(0, &pattern(7, 0, 300_000)).unwrap();
    ld.write_at(&pattern(8, 0, 4096), 700_000).unwrap();
    assert_eq!(ld.marks(), [mark(1), mark(2)]);
    assert!(first_diff(&read_all(&ld)[..600_000], &at_stop[..600_000]).is_none());
    ld.commit_mark(2).unwrap();
    assert_eq!(ld.marks(), [mark(2)]);
    assert!(first_diff(&read_all(&ld), &at_second).is_none());
}

/// A batch with an invalid change: the ones before it are applied, and the error says how many.
#[test]
fn a_batch_reports_how_much_of_it_was_applied() {
    let (_tmp, base, ld) = setup(1 << 20, 4096);
    let one = [1u8; 512];
    let two = [2u8; 512];
    let batch = [
        Change::Write {
            offset: 0,
            data: &one[..],
        },
        Change::Flush,
        Change::Write {
            offset: 4096,
            data: &two[..],
        },
        Change::WriteZeroes {
            offset: (1 << 20) - 512,
            len: 1024,
            unmap: false,
        },
        Change::Write {
            offset: 8192,
            data: &two[..],
        },
    ];
    let e = ld.apply_primary_batch(&batch).unwrap_err();
    assert_eq!(e.applied, 3);
    assert_eq!(e.error.kind(), io::ErrorKind::InvalidInput);
    assert_eq!(read(&*base, 0, 512), one);
    assert_eq!(read(&*base, 4096, 512), two);
    assert_eq!(read(&*base, 8192, 512), [0u8; 512]);
}

/// Every extent where the disk may differ from the checkpoint (the primary's changes the
/// failover rolls back, the SVM's writes it commits, the SVM's writes after it) is in the
/// failed-over disk's dirty log before base changes there; across a crash mid-commit too
/// (the resumed commit records what is still buffered again, the log keeps the rest).
#[test]
fn a_logged_failover_records_every_range_it_and_the_svm_write() {
    let (tmp, base, ld) = setup(1 << 20, 4096);
    let dir = tmp.path().join("layers");
    let log_path = tmp.path().join("disk.colo-dirty");
    base.write_at(&pattern(1, 0, 1 << 20), 0).unwrap();
    ld.checkpoint().unwrap();
    let at_checkpoint = read_all(&*base);
    // The primary changed [0, 64K) and [512K, 520K) after the checkpoint; the SVM wrote
    // [128K, 136K) (flushed) and [900K, 901K).
    ld.primary_write(0, &pattern(2, 0, 64 << 10)).unwrap();
    ld.primary_write(512 << 10, &pattern(3, 0, 8 << 10))
        .unwrap();
    ld.write_at(&pattern(4, 0, 8 << 10), 128 << 10).unwrap();
    ld.write_at(&pattern(5, 0, 1024), 900 << 10).unwrap();
    ld.flush().unwrap();
    let recorded = |path: &Path| -> Vec<u64> {
        crate::replication::dirty::DirtyLog::peek(path, 1 << 20)
            .unwrap()
            .unwrap()
            .ranges()
            .map(|(o, _)| o / 4096)
            .collect()
    };
    let log = Arc::new(
        crate::replication::dirty::DirtyLog::create_reset(&log_path, 1 << 20, 4096).unwrap(),
    );
    // Crash point 1: recorded and committing, nothing committed yet.
    ld.prepare_failover(Some(log.clone()), false).unwrap();
    // Extents of 4K: primary [0, 16) and [128, 130), SVM [32, 34) and 225.
    let mut want_set: BTreeSet<u64> = (0..16).chain(128..130).chain(32..34).collect();
    want_set.insert(225);
    let on_disk: BTreeSet<u64> = recorded(&log_path).into_iter().collect();
    assert_eq!(
        on_disk, want_set,
        "the buffered clusters, before any commit"
    );
    // Crash point 2: part of the commit done, the process dies, a new one resumes.
    ld.commit_batch(3, &mut Vec::new()).unwrap();
    drop(log);
    let ld = restart(&base, &dir, 4096, ld);
    assert!(ld.failover_pending());
    let (log, _) =
        crate::replication::dirty::DirtyLog::open(&log_path, 1 << 20, 4096, true).unwrap();
    ld.failover_logged(Some(Arc::new(log))).unwrap();
    // After the failover the SVM writes go through the log.
    ld.write_at(&pattern(6, 0, 4096), 700 << 10).unwrap();
    ld.write_zeroes(800 << 10, 4096, false).unwrap();
    want_set.insert(175);
    want_set.insert(200);
    let on_disk: BTreeSet<u64> = recorded(&log_path).into_iter().collect();
    assert_eq!(
        on_disk, want_set,
        "after the resumed commit and later writes"
    );
    // The invariant itself: every extent where the disk differs from the checkpoint is set.
    let now = read_all(&*base);
    for e in 0..256u64 {
        let r = (e * 4096) as usize..((e + 1) * 4096) as usize;
        if now[r.clone()] != at_checkpoint[r] {
            assert!(
                on_disk.contains(&e),
                "extent {e} changed but is not recorded"
            );
        }
    }
    // A crash before the state file said committing (the log was written, the layers not
    // touched): a plain secondary again, whose next failover resets the log.
    let (tmp2, base2, ld2) = setup(1 << 20, 4096);
    ld2.write_at(&pattern(7, 0, 4096), 0).unwrap();
    let path2 = tmp2.path().join("d.colo-dirty");
    let l2 = crate::replication::dirty::DirtyLog::create_reset(&path2, 1 << 20, 4096).unwrap();
    l2.mark_ranges(&[(0, 4096)]).unwrap(); // what begin_failover writes first
    let ld2 = restart(&base2, &tmp2.path().join("layers"), 4096, ld2);
    assert!(!ld2.is_failed_over());
    drop(l2);
    let l2 = crate::replication::dirty::DirtyLog::create_reset(&path2, 1 << 20, 4096).unwrap();
    assert_eq!(l2.recorded_bytes(), 0);
}

// ---- consistency groups ----

/// A prepared group checkpoint survives a restart and is then committed; a stream change after
/// a prepare removes the record (durably), so a later commit is refused and changes nothing; a
/// plain checkpoint while prepared commits it; a COLO cut drops it.
#[test]
fn group_prepare_survives_restarts_and_stream_changes_cancel_it() {
    let (tmp, base, ld) = setup(1 << 20, 4096);
    let dir = tmp.path().join("layers");
    base.write_at(&pattern(1, 0, 1 << 20), 0).unwrap();
    ld.primary_write(0, &pattern(2, 0, 64 << 10)).unwrap();
    let prepared = ld.group_prepare(7, 42).unwrap();
    assert_eq!(
        prepared,
        GroupPrepared {
            group: 7,
            epoch: 0,
            applied_seq: 42
        }
    );
    let at_prepare = read_all(&*base);
    let ld = restart(&base, &dir, 4096, ld);
    assert_eq!(ld.group().1.prepared, Some(prepared));
    // Not the prepared group: refused, nothing changed.
    let e = ld.checkpoint_group(8).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
    assert!(
        matches!(e, LayerError::NotPrepared { group: 8, epoch: 0, prepared: Some(p) } if p == prepared),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "not prepared for group checkpoint 8 at epoch 0 (prepared: Some(GroupPrepared { \
         group: 7, epoch: 0, applied_seq: 42 }))"
    );
    assert_eq!(ld.stats().epoch, 0);
    assert_eq!(ld.checkpoint_group(7).unwrap(), 1);
    assert_eq!(
        ld.group(),
        (
            1,
            GroupRecord {
                committed: Some(GroupCommitted { group: 7, epoch: 1 }),
                prepared: None
            }
        )
    );
    let ld = restart(&base, &dir, 4096, ld);
    assert_eq!(
        ld.group().1.committed,
        Some(GroupCommitted { group: 7, epoch: 1 })
    );
    // Prepared again, then a stream change: the record is gone, also after a restart.
    ld.group_prepare(8, 50).unwrap();
    ld.primary_write(4096, &pattern(3, 4096, 8192)).unwrap();
    assert_eq!(ld.group().1.prepared, None);
    let ld = restart(&base, &dir, 4096, ld);
    assert_eq!(ld.group().1.prepared, None);
    assert!(ld.checkpoint_group(8).is_err());
    assert_eq!(ld.stats().epoch, 1);
    // The rollback still goes to the committed group checkpoint.
    ld.failover().unwrap();
    assert!(first_diff(&read_all(&*base), &at_prepare).is_none());
    assert_eq!(
        ld.group().1.committed,
        Some(GroupCommitted { group: 7, epoch: 1 })
    );
}

#[test]
fn a_checkpoint_while_prepared_commits_the_group_and_a_colo_cut_does_not() {
    let (_t, _base, ld) = setup(1 << 20, 4096);
    ld.group_prepare(3, 1).unwrap();
    ld.checkpoint_as(5).unwrap();
    assert_eq!(
        ld.group(),
        (
            5,
            GroupRecord {
                committed: Some(GroupCommitted { group: 3, epoch: 5 }),
                prepared: None
            }
        )
    );
    ld.group_prepare(4, 2).unwrap();
    ld.mark(mark(6)).unwrap();
    ld.commit_mark(6).unwrap();
    assert_eq!(ld.group().1.prepared, None);
    assert_eq!(
        ld.group().1.committed,
        Some(GroupCommitted { group: 3, epoch: 5 })
    );
}

/// A layer directory belongs to one disk (issue 19): another disk's state file or layer file
/// is refused before anything in the directory changes; its own disk reopens it.
#[test]
fn a_layer_directory_of_another_disk_is_refused_and_left_as_it_is() {
    const A: u128 = 0xaaaa_0000_0000_0000_0000_0000_0000_0001;
    const B: u128 = 0xbbbb_0000_0000_0000_0000_0000_0000_0002;
    let tmp = tempfile::tempdir().unwrap();
    let base = raw(tmp.path(), 1 << 20);
    let dir = tmp.path().join("layers");
    {
        let disk = LayeredDisk::new_owned(base.clone(), &dir, 4096, A).unwrap();
        disk.primary_write(0, &pattern(1, 0, 8192)).unwrap();
    }
    let snapshot = || {
        let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| {
                (
                    e.file_name().into_string().unwrap(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let before = snapshot();
    assert!(std::fs::read_to_string(dir.join(state::STATE_FILE))
        .unwrap()
        .contains(&format!("{A:032x}")));

    // The state file names disk A.
    let e = LayeredDisk::new_owned(base.clone(), &dir, 4096, B).unwrap_err();
    assert!(e.to_string().contains("the layer directory"), "{e}");
    assert!(snapshot() == before);
    // Without the state file's id (as an older build wrote it), each layer file still names A.
    let st = dir.join(state::STATE_FILE);
    let text = std::fs::read_to_string(&st).unwrap();
    let mut without_id: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(without_id["disk_id"].is_string(), "{text}");
    without_id.as_object_mut().unwrap().remove("disk_id");
    std::fs::write(&st, without_id.to_string()).unwrap();
    let e = LayeredDisk::new_owned(base.clone(), &dir, 4096, B).unwrap_err();
    assert!(e.to_string().contains("layer file"), "{e}");
    std::fs::write(&st, &text).unwrap();
    assert!(snapshot() == before);

    // A stray layer file of disk B in A's directory is not removed as a crash left-over.
    drop(
        Layer::create(
            &std_media(),
            dir.join("hidden-99.img"),
            Kind::Hidden,
            1 << 20,
            B,
        )
        .map(|mut l| {
            l.discard_on_drop = false;
            l
        }),
    );
    let e = LayeredDisk::new_owned(base.clone(), &dir, 4096, A).unwrap_err();
    assert!(e.to_string().contains("layer file"), "{e}");
    assert!(dir.join("hidden-99.img").exists());
    std::fs::remove_file(dir.join("hidden-99.img")).unwrap();

    // Disk A reopens its layers with the rollback data.
    let disk = LayeredDisk::new_owned(base, &dir, 4096, A).unwrap();
    assert!(disk.stats().hidden_bytes > 0);
}
