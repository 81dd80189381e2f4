//! Ownership and identity (issue 19, points 1 and 2), tried as an operator makes the mistakes:
//! a second process on an image, a socket or a layer directory another one uses; a layer
//! directory of another disk; a pair's disk served standalone for a while; an image changed by
//! another program while colo-blk was stopped. Each ends in a refusal naming the cause, or in
//! a resync that leaves both disks equal byte for byte: never in a pair reported in sync while
//! its disks differ.

mod common;

use std::path::Path;
use std::process::Command;

use common::pair::{
    assert_same_files, checkpoint, decision, hot_writes, prepare_checkpoint, qmp, query, read, s,
    wait_in_sync, write_all, Node,
};
use common::{pattern, Backend, Client};
use serde_json::json;

const MIB: u64 = 1 << 20;
const DISK: u64 = 16 * MIB;

/// A standalone process on `d/image` (of [`DISK`] bytes, or the size it has) serving
/// `d/socket`.
fn node(d: &Path, image: &str, socket: &str) -> Node {
    Node::standalone(d, image, DISK).socket(socket)
}

fn standalone(d: &Path, image: &str, socket: &str, extra: &[&str]) -> Backend {
    node(d, image, socket).queues(4).args(extra).start()
}

/// A secondary listening on `port` (0: any; a restart passes the port its primary knows).
fn secondary(d: &Path, image: &str, layers: &str, port: u16, extra: &[&str]) -> Node {
    Node::secondary(d, image, DISK, port)
        .layers(layers)
        .qmp(&format!("{image}.qmp"))
        .cluster_size("4K")
        .args(extra)
}

fn primary(d: &Path, port: u16) -> Backend {
    Node::primary(d, "p.img", DISK, port)
        .socket("p.sock")
        .qmp("p.qmp")
        .queues(4)
        .start()
}

/// Writes `n` seeded batches through `socket` and returns.
fn write_some(socket: &Path, seed: u64, n: usize) {
    let mut c = Client::connect(socket, 4).unwrap();
    write_all(&mut c, &hot_writes(seed, n, &[4096, 65536], DISK));
}

/// A pair in sync after `checkpoints` checkpoints with writes between them: the secondary and
/// the primary, the secondary's QMP socket `s.img.qmp`, the primary's `p.qmp`.
fn pair_in_sync(d: &Path, checkpoints: u64) -> (Backend, Backend) {
    let sec = secondary(d, "s.img", "layers", 0, &[]).start();
    let p = primary(d, sec.listen_port());
    let mut pq = qmp(d, "p.qmp");
    wait_in_sync(&mut pq);
    for i in 0..checkpoints {
        write_some(&d.join("p.sock"), 10 + i, 32);
        checkpoint(&mut pq);
    }
    assert_same_files(&d.join("s.img"), &d.join("p.img"), "in sync");
    (sec, p)
}

/// Restarts the secondary `sec` (refusing its primary) with `--allow-full-sync` on the same port:
/// a full resync, a checkpoint, and both disks equal.
fn full_resync_allowed(d: &Path, sec: Backend) {
    let port = sec.listen_port();
    drop(sec);
    let _sec = secondary(d, "s.img", "layers", port, &["--allow-full-sync"]).start();
    let mut sq = qmp(d, "s.img.qmp");
    let (what, why) = decision(&mut sq);
    assert_eq!(what, "full-sync", "{why}");
    let mut pq = qmp(d, "p.qmp");
    wait_in_sync(&mut pq);
    checkpoint(&mut pq);
    assert_same_files(&d.join("s.img"), &d.join("p.img"), "after the full resync");
}

/// Another program writes `len` bytes of `byte` at `offset` of `image`, as `dd` would.
fn dd(image: &Path, byte: u8, len: usize, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    f.write_all_at(&vec![byte; len], offset).unwrap();
}

#[test]
fn a_second_process_on_an_image_is_refused_naming_the_holder() {
    let dir = common::tempdir();
    let d = dir.path();
    let a = standalone(d, "a.img", "a.sock", &[]);
    let mut c = Client::connect(&d.join("a.sock"), 1).unwrap();
    let data = pattern(7, 65536);
    assert_eq!(c.write(0, 4096, &data), 0);

    let err = node(d, "a.img", "b.sock").start_fails();
    let pid = a.child.id();
    assert!(
        err.contains("image") && err.contains(&format!("pid {pid}")),
        "{err}"
    );
    // A read-only export is refused too while a writer has it.
    let err = node(d, "a.img", "b.sock")
        .args(&["--read-only"])
        .start_fails();
    assert!(err.contains(&format!("pid {pid}")), "{err}");
    // QEMU's own tools see the lock too (qemu-io writing at the offset of our data).
    if common::in_path("qemu-io") {
        let out = Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "write -P 0x66 4096 4096",
                &s(&d.join("a.img")),
            ])
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(e.contains("lock"), "qemu-io wrote a served image: {e}");
    }
    // The first process was not disturbed.
    assert_eq!(c.read(0, 4096, 65536).unwrap(), data);
    drop(c);
    assert!(a.terminate().success());
    // Once it is gone the image is free again.
    let b = standalone(d, "a.img", "b.sock", &[]);
    let mut c = Client::connect(&d.join("b.sock"), 1).unwrap();
    assert_eq!(c.read(0, 4096, 65536).unwrap(), data);
    drop(c);
    assert!(b.terminate().success());
}

#[test]
fn a_second_process_cannot_take_over_a_served_socket() {
    let dir = common::tempdir();
    let d = dir.path();
    let a = node(d, "a.img", "shared.sock")
        .queues(4)
        .qmp("a.qmp")
        .start();
    let pid = a.child.id();
    let err = Node::standalone(d, "b.img", MIB)
        .socket("shared.sock")
        .start_fails();
    assert!(
        err.contains("vhost-user socket") && err.contains(&format!("pid {pid}")),
        "{err}"
    );
    let err = Node::standalone(d, "b.img", MIB)
        .socket("b.sock")
        .qmp("a.qmp")
        .start_fails();
    assert!(err.contains("QMP socket"), "{err}");
    // Both sockets still lead to the first process.
    let c = Client::connect(&d.join("shared.sock"), 1).unwrap();
    assert_eq!(c.capacity(), DISK);
    let mut q = common::Qmp::connect(&d.join("a.qmp"));
    q.execute("query-status", json!({})).unwrap();
    drop(c);
    assert!(a.terminate().success());
}

#[test]
fn a_layer_directory_serves_one_disk_and_is_never_emptied_for_another() {
    let dir = common::tempdir();
    let d = dir.path();
    let (sec, p) = pair_in_sync(d, 2);
    // Rollback data in the layers: writes after the checkpoint.
    write_some(&d.join("p.sock"), 50, 32);
    let mut pq = qmp(d, "p.qmp");
    prepare_checkpoint(&mut pq);
    let layer_files = || {
        let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(d.join("layers"))
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    read(&e.path()),
                )
            })
            .collect();
        v.sort();
        v
    };

    // Another secondary (another image, another port) on the same directory, while the first
    // runs: refused by the lock.
    let other = || secondary(d, "t.img", "layers", 0, &[]);
    let err = other().start_fails();
    assert!(
        err.contains("layer directory") && err.contains(&format!("pid {}", sec.child.id())),
        "{err}"
    );

    // The first one stopped: the directory is free, but it belongs to s.img's disk.
    drop(p);
    assert!(sec.terminate().success());
    let before = layer_files();
    assert!(before.iter().any(|(n, _)| n.starts_with("hidden-")));
    let err = other().start_fails();
    assert!(err.contains("belongs to disk"), "{err}");
    assert!(
        layer_files() == before,
        "a refused start changed the layers"
    );

    // Its own disk reopens it as it was.
    let sec = secondary(d, "s.img", "layers", 0, &[]).start();
    let mut sq = qmp(d, "s.img.qmp");
    let st = query(&mut sq);
    assert!(st["hidden-bytes"].as_u64().unwrap() > 0, "{st}");
    drop(sec);
}

/// Reproduction 3 of the issue: a pair's disk served standalone for a while, then the primary
/// started again. Refused without --detach-replication; with it, the pair never reports in
/// sync without a full resync, and after it the disks are equal.
#[test]
fn a_pair_disk_served_standalone_needs_a_full_resync() {
    let dir = common::tempdir();
    let d = dir.path();
    let (sec, p) = pair_in_sync(d, 4);
    assert!(p.terminate().success());

    let err = node(d, "p.img", "m.sock").start_fails();
    assert!(err.contains("--detach-replication"), "{err}");
    // Read-only maintenance is fine.
    let ro = standalone(d, "p.img", "m.sock", &["--read-only"]);
    drop(ro);
    let m = standalone(d, "p.img", "m.sock", &["--detach-replication"]);
    write_some(&d.join("m.sock"), 77, 64);
    assert!(m.terminate().success());
    assert!(read(&d.join("p.img")) != read(&d.join("s.img")));

    // The primary again: the secondary refuses the incremental resync that would miss the
    // standalone writes.
    let mut sq = qmp(d, "s.img.qmp");
    let p = primary(d, sec.listen_port());
    let (what, why) = decision(&mut sq);
    assert_eq!(what, "refused", "{why}");
    assert!(why.contains("--allow-full-sync"), "{why}");
    let mut pq = qmp(d, "p.qmp");
    assert_ne!(query(&mut pq)["state"], "connected");
    let e = pq
        .execute("replication-checkpoint", json!({"timeout-ms": 2000}))
        .unwrap_err();
    assert!(!e.to_string().is_empty());

    // Allowed: a full resync, then equal disks.
    full_resync_allowed(d, sec);
    drop(p);
}

/// Another program writes a primary's image while colo-blk is stopped: the next start sees it
/// (size, mtime, ctime and inode recorded at the clean stop) and the pair resyncs fully. The
/// same stop and start without the write stays incremental.
#[test]
fn an_image_changed_while_stopped_is_detected() {
    let dir = common::tempdir();
    let d = dir.path();
    let (sec, p) = pair_in_sync(d, 2);
    let port = sec.listen_port();
    let mut sq = qmp(d, "s.img.qmp");

    // Unchanged: incremental.
    assert!(p.terminate().success());
    sq.events.clear();
    let p = primary(d, port);
    let (what, why) = decision(&mut sq);
    assert_eq!(what, "incremental", "{why}");
    wait_in_sync(&mut qmp(d, "p.qmp"));
    assert!(p.terminate().success());

    // Changed by "dd" in between: refused until a full resync is allowed.
    dd(&d.join("p.img"), 0x5a, 4096, 3 * MIB);
    sq.events.clear();
    let p = primary(d, port);
    let (what, why) = decision(&mut sq);
    assert_eq!(what, "refused", "{why}");
    full_resync_allowed(d, sec);
    drop(p);
}

/// The secondary's image changed while it was stopped: it holds no checkpoint any more, so a
/// failover to it is refused, and the primary resyncs it fully at the next connect.
#[test]
fn a_secondary_image_changed_while_stopped_is_inconsistent() {
    let dir = common::tempdir();
    let d = dir.path();
    let (sec, p) = pair_in_sync(d, 2);
    drop(p);
    assert!(sec.terminate().success());
    dd(&d.join("s.img"), 0x33, 512, 5 * MIB);
    let sec = secondary(d, "s.img", "layers", 0, &[]).start();
    let mut sq = qmp(d, "s.img.qmp");
    assert_eq!(query(&mut sq)["consistency"], "inconsistent");
    let e = sq.execute("replication-failover", json!({})).unwrap_err();
    assert!(e["desc"].as_str().unwrap().contains("inconsistent"), "{e}");

    let p = primary(d, sec.listen_port());
    let (what, why) = decision(&mut sq);
    assert_eq!(what, "full-sync", "{why}");
    let mut pq = qmp(d, "p.qmp");
    wait_in_sync(&mut pq);
    checkpoint(&mut pq);
    assert_eq!(query(&mut sq)["consistency"], "consistent");
    assert_same_files(&d.join("s.img"), &d.join("p.img"), "after the full resync");
    drop((p, sec));
}

/// A live migration's two backends on one shared image (`--share-rw`, as QEMU's share-rw=on)
/// run side by side; an exclusive writer is still refused while they do, and a replicated
/// disk cannot be shared.
#[test]
fn share_rw_backends_share_an_image_and_keep_exclusive_writers_out() {
    let dir = common::tempdir();
    let d = dir.path();
    let src = standalone(d, "m.img", "src.sock", &["--share-rw"]);
    let dst = standalone(d, "m.img", "dst.sock", &["--share-rw"]);
    let data = pattern(3, 8192);
    let mut c = Client::connect(&d.join("src.sock"), 1).unwrap();
    assert_eq!(c.write(0, 0, &data), 0);
    assert_eq!(c.flush(0), 0);
    drop(c);
    let mut c = Client::connect(&d.join("dst.sock"), 1).unwrap();
    assert_eq!(c.read(0, 0, 8192).unwrap(), data);
    drop(c);
    let err = node(d, "m.img", "x.sock").start_fails();
    assert!(err.contains("in use by pid"), "{err}");
    let err = Node::primary(d, "m.img", DISK, 9)
        .socket("p.sock")
        .args(&["--share-rw"])
        .start_fails();
    assert!(err.contains("--share-rw only applies"), "{err}");
    drop((src, dst));
}
