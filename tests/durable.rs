//! Durability of the replication state (issue 9): primaries SIGKILLed mid-stream and restarted
//! on their image, blank / unrelated / split-brain disks, and online verify. Real `colo-blk`
//! processes on loopback; every test compares disks byte for byte.

mod common;

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use common::pair::{
    assert_same_files, checkpoint, decision, hot_writes, kill9, last_error, qmp, query, read,
    wait_in_sync, write_all, Node, WriteReq,
};
use common::{pattern, poll, Backend, Client, STARTUP_TIMEOUT};
use serde_json::json;

const MIB: u64 = 1 << 20;
const DISK: u64 = 16 * MIB;

/// Starts a secondary on `dir/image` (created when missing) listening on `port` (0: any),
/// with the layer directory of that image.
fn secondary(dir: &Path, image: &str, port: u16, extra: &[&str]) -> Backend {
    secondary_with_layers(dir, image, &format!("layers-{image}"), port, extra)
}

fn secondary_with_layers(
    dir: &Path,
    image: &str,
    layers: &str,
    port: u16,
    extra: &[&str],
) -> Backend {
    Node::secondary(dir, image, DISK, port)
        .layers(layers)
        .qmp("secondary.qmp")
        .cluster_size("4K")
        .args(extra)
        .start()
}

/// Starts a primary on `dir/image` (created when missing) replicating to `port`.
fn primary(dir: &Path, image: &str, port: u16, extra: &[&str]) -> Backend {
    Node::primary(dir, image, DISK, port)
        .socket("primary.sock")
        .qmp("primary.qmp")
        .queues(4)
        // Small extents: the lazy clearing and the re-marking are exercised on a small disk.
        .dirty_log_extent("256K")
        .args(extra)
        .start()
}

/// `n` random writes of several sizes on four queues, overlapping, seeded.
fn batch(seed: u64, n: usize) -> Vec<WriteReq> {
    hot_writes(seed, n, &[512, 4096, 16384, 65536], DISK)
}

fn write_batch(c: &mut Client, seed: u64, n: usize) {
    write_all(c, &batch(seed, n));
}

/// Test a: the primary is SIGKILLed at 21 points of a write stream on four queues (after 0 to
/// 6 completed batches, the next one in flight; with and without a checkpoint earlier in its
/// life) and restarted on its image; after reconnect + resync + checkpoint the secondary equals
/// the primary byte for byte every time.
#[test]
fn primary_sigkilled_mid_stream_resyncs_from_its_dirty_log() {
    let dir = common::tempdir();
    let d = dir.path();
    let sec = secondary(d, "secondary.img", 0, &[]);
    let port = sec.listen_port();
    let mut seed = 1u64;
    for point in 0..21u64 {
        let mut p = primary(d, "primary.img", port, &[]);
        let mut pq = qmp(d, "primary.qmp");
        wait_in_sync(&mut pq);
        // Every restart ends equal: resync, then a checkpoint, then the bytes.
        let epoch = checkpoint(&mut pq);
        assert_same_files(
            &d.join("secondary.img"),
            &d.join("primary.img"),
            &format!("kill point {point}, checkpoint {epoch} after the restart"),
        );
        let mut c = Client::connect(&d.join("primary.sock"), 4).unwrap();
        if point % 3 == 1 {
            // A checkpoint in this life: the dirty log clears lazily behind it.
            write_batch(&mut c, seed, 16);
            seed += 1;
            checkpoint(&mut pq);
        }
        // The stream: batches on four queues from another thread; the kill lands while the
        // batch after `batches` completed ones is in flight.
        let batches = point % 7;
        let (tx, rx) = mpsc::channel();
        let first = seed;
        seed += 100;
        std::thread::spawn(move || {
            let mut c = c;
            for b in 0.. {
                let _ = tx.send(b);
                // After the kill the client fails or never returns: this thread is abandoned.
                let _ = c.write_concurrently(&batch(first + b, 24));
            }
        });
        for _ in 0..=batches {
            rx.recv_timeout(Duration::from_secs(60))
                .expect("writer made no progress");
        }
        kill9(&mut p);
        drop(p);
    }
    let mut p = primary(d, "primary.img", port, &[]);
    let mut pq = qmp(d, "primary.qmp");
    wait_in_sync(&mut pq);
    checkpoint(&mut pq);
    assert_same_files(&d.join("secondary.img"), &d.join("primary.img"), "final");
    drop(sec);
    p.child.kill().unwrap();
}

/// Test d1: a blank disk (not created by colo-blk, no metadata) is refused with an error naming
/// the flag; with the flag it is fully resynced, inconsistent until the first checkpoint (and
/// failover refuses it then, unless forced).
#[test]
fn blank_disk_is_refused_then_fully_synced_when_allowed() {
    let dir = common::tempdir();
    let d = dir.path();
    let junk = pattern(99, DISK as usize);
    std::fs::write(d.join("secondary.img"), &junk).unwrap();
    let mut sec = secondary(d, "secondary.img", 0, &[]);
    let port = sec.listen_port();
    let mut sq = qmp(d, "secondary.qmp");
    let mut p = primary(d, "primary.img", port, &[]);
    let (what, why) = decision(&mut sq);
    assert_eq!(what, "refused");
    assert!(why.contains("--allow-full-sync"), "{why}");
    let mut pq = qmp(d, "primary.qmp");
    assert_ne!(query(&mut pq)["state"], "connected");
    let err = match last_error(&mut pq) {
        e if e.is_empty() => pq.wait_event("REPLICATION_ERROR")["data"]["error"]
            .as_str()
            .unwrap()
            .to_string(),
        e => e,
    };
    assert!(err.contains("--allow-full-sync"), "{err}");
    assert!(
        read(&d.join("secondary.img")) == junk,
        "refused, yet written"
    );

    // Allowed: a full sync, and the disk is inconsistent until a checkpoint. Kill the primary
    // before that checkpoint: the secondary must not be failed over to as if it held one.
    let mut c = Client::connect(&d.join("primary.sock"), 4).unwrap();
    write_batch(&mut c, 5, 32);
    drop(c);
    sec.child.kill().unwrap();
    sec.child.wait().unwrap();
    let sec = secondary(d, "secondary.img", port, &["--allow-full-sync"]);
    let mut sq = qmp(d, "secondary.qmp");
    let (what, why) = decision(&mut sq);
    assert_eq!(what, "full-sync", "{why}");
    wait_in_sync(&mut pq);
    kill9(&mut p);
    drop(p);
    sq.wait_event("REPLICATION_PEER_LOST");
    let st = query(&mut sq);
    assert_eq!(st["consistency"], "inconsistent", "{st}");
    let e = sq.execute("replication-failover", json!({})).unwrap_err();
    assert!(e["desc"].as_str().unwrap().contains("inconsistent"), "{e}");

    // The primary comes back: the interrupted full sync restarts (no flag needed now), then
    // a checkpoint makes the disk consistent and equal.
    drop(sec);
    let _sec = secondary(d, "secondary.img", port, &[]);
    let mut sq = qmp(d, "secondary.qmp");
    let _p = primary(d, "primary.img", port, &[]);
    let (what, why) = decision(&mut sq);
    assert_eq!(what, "full-sync", "{why}");
    let mut pq = qmp(d, "primary.qmp");
    wait_in_sync(&mut pq);
    checkpoint(&mut pq);
    assert_eq!(query(&mut sq)["consistency"], "consistent");
    assert_same_files(
        &d.join("secondary.img"),
        &d.join("primary.img"),
        "after full sync",
    );
}

/// Test d2: another pair's disk is refused; with the flag it is fully resynced.
#[test]
fn unrelated_disk_is_refused_then_fully_synced_when_allowed() {
    let dir = common::tempdir();
    let d = dir.path();
    // The unrelated disk: another primary's, with its own generations and data.
    {
        let mut other = primary(d, "other.img", 1, &[]);
        let mut c = Client::connect(&d.join("primary.sock"), 4).unwrap();
        write_batch(&mut c, 77, 32);
        drop(c);
        kill9(&mut other);
    }
    std::fs::remove_file(d.join("other.img.colo-dirty")).unwrap();
    let before = read(&d.join("other.img"));
    let sec = secondary(d, "other.img", 0, &[]);
    let port = sec.listen_port();
    let mut sq = qmp(d, "secondary.qmp");
    let p = primary(d, "primary.img", port, &[]);
    let (what, why) = decision(&mut sq);
    assert_eq!(what, "refused");
    assert!(
        why.contains("unrelated") && why.contains("--allow-full-sync"),
        "{why}"
    );
    let mut pq = qmp(d, "primary.qmp");
    assert_ne!(query(&mut pq)["state"], "connected");
    assert!(read(&d.join("other.img")) == before, "refused, yet written");
    drop(sec);

    let _sec = secondary(d, "other.img", port, &["--allow-full-sync"]);
    let mut sq = qmp(d, "secondary.qmp");
    let (what, why) = decision(&mut sq);
    assert_eq!(what, "full-sync", "{why}");
    wait_in_sync(&mut pq);
    checkpoint(&mut pq);
    assert_same_files(
        &d.join("other.img"),
        &d.join("primary.img"),
        "after full sync",
    );
    drop(p);
}

/// Test d3: after a failover both disks wrote since their last common generation. The old
/// primary coming back to the failed-over disk, and the failed-over disk as the new primary of
/// the old primary's disk: both refused as split brain, even with --allow-full-sync, and
/// neither disk changes.
#[test]
fn split_brain_is_refused_both_ways_and_nothing_is_overwritten() {
    let dir = common::tempdir();
    let d = dir.path();
    let mut sec = secondary(d, "secondary.img", 0, &[]);
    let port = sec.listen_port();
    let mut sq = qmp(d, "secondary.qmp");
    let mut p = primary(d, "primary.img", port, &[]);
    let mut pq = qmp(d, "primary.qmp");
    wait_in_sync(&mut pq);
    let mut c = Client::connect(&d.join("primary.sock"), 4).unwrap();
    write_batch(&mut c, 1, 32);
    checkpoint(&mut pq);
    write_batch(&mut c, 2, 32);
    drop(c);
    kill9(&mut p);
    sq.wait_event("REPLICATION_PEER_LOST");
    sq.execute("replication-failover", json!({})).unwrap();
    kill9(&mut sec);
    drop((p, sec));
    let (old_primary, failed_over) = (read(&d.join("primary.img")), read(&d.join("secondary.img")));
    assert!(old_primary != failed_over);

    // 1a. The failed-over secondary restarted: its disk buffer says failed over, it takes no
    // stream at all (it does not even listen).
    let sec = secondary(d, "secondary.img", port, &["--allow-full-sync"]);
    let p = primary(d, "primary.img", port, &[]);
    let what = "the failed-over secondary to close its replication port";
    poll::until(what, STARTUP_TIMEOUT, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
    });
    let mut pq = qmp(d, "primary.qmp");
    assert_ne!(query(&mut pq)["state"], "connected");
    drop((p, sec));

    // 1b. The failed-over disk as a secondary with new layers (its image alone); the old
    // primary comes back.
    let sec = secondary_with_layers(
        d,
        "secondary.img",
        "new-layers",
        port,
        &["--allow-full-sync"],
    );
    assert_split_brain(d, sec, "primary.img", port);
    assert!(read(&d.join("primary.img")) == old_primary);
    assert!(read(&d.join("secondary.img")) == failed_over);

    // 2. The failed-over disk is the new primary; the old primary's disk its secondary.
    let sec = secondary(d, "primary.img", port, &["--allow-full-sync"]);
    assert_split_brain(d, sec, "secondary.img", port);
    assert!(read(&d.join("primary.img")) == old_primary);
    assert!(read(&d.join("secondary.img")) == failed_over);
}

/// A primary on `image` connecting to the running secondary `sec` is refused as a split
/// brain and never connected; both processes end.
fn assert_split_brain(d: &Path, sec: Backend, image: &str, port: u16) {
    let mut sq = qmp(d, "secondary.qmp");
    let p = primary(d, image, port, &[]);
    let (what, why) = decision(&mut sq);
    assert_eq!(what, "refused");
    assert!(why.contains("split brain"), "{why}");
    let mut pq = qmp(d, "primary.qmp");
    assert_ne!(query(&mut pq)["state"], "connected");
    drop((p, sec));
}

/// Test e: verify while the guest writes finds nothing; one sector corrupted in the secondary's
/// image is found, marked dirty and repaired by the resync that follows.
#[test]
fn verify_finds_a_corrupted_sector_and_the_resync_repairs_it() {
    let dir = common::tempdir();
    let d = dir.path();
    let _sec = secondary(d, "secondary.img", 0, &[]);
    let port = _sec.listen_port();
    let _p = primary(d, "primary.img", port, &[]);
    let mut pq = qmp(d, "primary.qmp");
    wait_in_sync(&mut pq);
    let mut c = Client::connect(&d.join("primary.sock"), 4).unwrap();
    write_batch(&mut c, 3, 64);
    checkpoint(&mut pq);

    // While running: writes go on during the verify; the stream order keeps it exact.
    let r = pq.execute("replication-verify", json!({})).unwrap();
    assert_eq!(r["ranges"], DISK / MIB);
    for b in 0..8 {
        write_batch(&mut c, 10 + b, 16);
    }
    let ev = pq.wait_event("REPLICATION_VERIFY_DONE");
    assert_eq!(ev["data"]["ranges"], DISK / MIB, "{ev}");
    assert_eq!(ev["data"]["mismatches"], 0, "{ev}");
    checkpoint(&mut pq);
    assert_same_files(&d.join("secondary.img"), &d.join("primary.img"), "before");

    // One corrupted sector on the secondary.
    let at = 5 * MIB + 3 * 512;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.join("secondary.img"))
            .unwrap();
        f.write_all_at(&[0xa5; 512], at).unwrap();
    }
    assert!(read(&d.join("secondary.img")) != read(&d.join("primary.img")));
    pq.events.clear();
    pq.execute("replication-verify", json!({})).unwrap();
    let ev = pq.wait_event("REPLICATION_VERIFY_DONE");
    assert_eq!(ev["data"]["mismatches"], 1, "{ev}");
    assert_eq!(ev["data"]["complete"], true, "{ev}");
    let st = query(&mut pq);
    assert_eq!(st["verify"]["state"], "done", "{st}");
    assert_eq!(st["verify"]["ranges-compared"], DISK / MIB, "{st}");
    pq.wait_event("REPLICATION_RESYNC_DONE");
    checkpoint(&mut pq);
    assert_same_files(
        &d.join("secondary.img"),
        &d.join("primary.img"),
        "after repair",
    );
    pq.execute("replication-verify", json!({})).unwrap();
    let ev = pq.wait_event("REPLICATION_VERIFY_DONE");
    assert_eq!(ev["data"]["mismatches"], 0, "{ev}");
}
