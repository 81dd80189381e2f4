//! Failback (issue 12, point 4): after a failover, the old primary's disk comes back as the
//! secondary of the survivor and is resynced incrementally from the union of both dirty
//! records (`--discard-my-data`), the survivor promoted in place (`replication-promote`) or
//! restarted as a primary; then the pair fails over again. Real `colo-blk` processes on
//! loopback, vhost-user clients for both VMs; disks compared byte for byte.

mod common;

use std::path::Path;

use common::pair::{
    self, assert_same, checkpoint, decision, kill9, prepare_checkpoint, query, read, seeded_writes,
    signal, wait_in_sync, write_all, Node, WriteReq,
};
use common::{Backend, Client, Qmp};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const DISK: u64 = 64 * MIB;

/// A secondary on `dir/image` with its own layer directory, QMP socket and vhost-user socket
/// (the Secondary VM's), named after `name`.
fn secondary(dir: &Path, name: &str, image: &str, extra: &[&str]) -> Backend {
    Node::secondary(dir, image, DISK, 0)
        .layers(&format!("layers-{name}"))
        .qmp(&format!("{name}.qmp"))
        .socket(&format!("{name}.sock"))
        .queues(4)
        .cluster_size("4K")
        .dirty_log_extent("256K")
        .peer_timeout_ms(20000)
        .args(extra)
        .start()
}

/// A primary on `dir/image` replicating to `port`.
fn primary(dir: &Path, name: &str, image: &str, port: u16, extra: &[&str]) -> Backend {
    Node::primary(dir, image, DISK, port)
        .socket(&format!("{name}.sock"))
        .qmp(&format!("{name}.qmp"))
        .queues(4)
        .dirty_log_extent("256K")
        // Long: a stopped secondary is not noticed before the test kills the primary.
        .peer_timeout_ms(20000)
        .args(extra)
        .start()
}

/// The QMP socket of the process named `name`.
fn qmp(dir: &Path, name: &str) -> Qmp {
    pair::qmp(dir, &format!("{name}.qmp"))
}

/// `n` writes of 4 to 64 KiB at seeded offsets within `[from, to)`, on four queues.
fn batch(seed: u64, n: usize, from: u64, to: u64) -> Vec<WriteReq> {
    seeded_writes(seed, n, &[4096, 16384, 65536], |_, r, len| {
        from + (r % ((to - from - len as u64) / 4096)) * 4096
    })
}

fn write_batch(c: &mut Client, seed: u64, n: usize, from: u64, to: u64) {
    write_all(c, &batch(seed, n, from, to));
}

/// The pair of the tests, up to the failover: P primary of S; writes, a checkpoint, more writes
/// (some reach S, then S is stopped and P writes regions S never sees, P is SIGKILLed while
/// still connected: its current generation is still the checkpoint's); S restarted on its
/// image and layers, failed over; the Secondary VM writes. Returns P's and S's disks after
/// that, and S's process.
struct Diverged {
    s: Backend,
    p_disk: Vec<u8>,
    s_disk: Vec<u8>,
    svm_writes: Vec<WriteReq>,
}

fn diverge(d: &Path, p_extra: &[&str], s_extra: &[&str]) -> Diverged {
    let mut sec = secondary(d, "s", "s.img", s_extra);
    let port = sec.listen_port();
    let mut p = primary(d, "p", "p.img", port, p_extra);
    let mut pq = qmp(d, "p");
    wait_in_sync(&mut pq);
    let mut c = Client::connect(&d.join("p.sock"), 4).unwrap();
    write_batch(&mut c, 1, 24, 0, DISK / 2);
    checkpoint(&mut pq);
    // Reach S (buffered in its hidden layer): acknowledged.
    write_batch(&mut c, 2, 24, 0, DISK / 2);
    prepare_checkpoint(&mut pq);
    // S stops; P keeps writing, also where nothing was written before (the last 16 MiB).
    signal(&sec, libc::SIGSTOP);
    write_batch(&mut c, 3, 16, DISK / 2, DISK);
    write_batch(&mut c, 4, 8, 0, DISK / 4);
    let st = query(&mut pq);
    assert_eq!(st["state"], "connected", "P must still be connected: {st}");
    let m = &st["metadata"];
    assert_eq!(
        m["current-generation"], m["bitmap-generation"],
        "P killed while its current generation is the one S holds (the hole of point 2)"
    );
    drop(c);
    kill9(&mut p);
    // S never reads what was in flight: it dies stopped, and restarts on its image and layers.
    kill9(&mut sec);
    drop((p, sec));
    let p_disk = read(&d.join("p.img"));
    let s = secondary(d, "s", "s.img", s_extra);
    let mut sq = qmp(d, "s");
    let r = sq.execute("replication-failover", json!({})).unwrap();
    assert!(r["restored-hidden-bytes"].as_u64().unwrap() > 0, "{r}");
    let mut svm = Client::connect(&d.join("s.sock"), 4).unwrap();
    // The Secondary VM writes over P's regions and its own.
    let svm_writes = batch(5, 24, DISK / 8, DISK * 5 / 8);
    write_all(&mut svm, &svm_writes);
    assert_eq!(svm.flush(0), 0);
    drop(svm);
    let s_disk = read(&d.join("s.img"));
    assert!(p_disk != s_disk);
    Diverged {
        s,
        p_disk,
        s_disk,
        svm_writes,
    }
}

/// `replication-promote` of the survivor, to a new secondary listening on `port`.
fn promote(sq: &mut Qmp, port: u16) -> Value {
    sq.execute(
        "replication-promote",
        json!({"peer": format!("127.0.0.1:{port}")}),
    )
    .unwrap()
}

/// The old primary's disk as the secondary of the failed-over one.
fn old_primary_as_secondary(d: &Path, extra: &[&str]) -> (Backend, Qmp) {
    let mut args = vec!["--discard-my-data"];
    args.extend_from_slice(extra);
    let b = secondary(d, "p2", "p.img", &args);
    let q = qmp(d, "p2");
    (b, q)
}

/// Failback, then fail over again. `live`: the survivor is promoted in place
/// (`replication-promote`); otherwise it is restarted as a primary on its image.
fn failback(live: bool) {
    let dir = common::tempdir();
    let d = dir.path();
    let Diverged {
        s,
        p_disk: _,
        s_disk,
        svm_writes,
    } = diverge(d, &[], &[]);
    let (p2, mut p2q) = old_primary_as_secondary(d, &[]);
    let m = query(&mut p2q)["metadata"].clone();
    assert_ne!(
        m["current-generation"], m["bitmap-generation"],
        "started as a secondary, the old primary took a new generation: {m}"
    );
    let port = p2.listen_port();
    let (mut sp, mut spq, sock) = if live {
        let mut sq = qmp(d, "s");
        let r = promote(&mut sq, port);
        assert_eq!(r["role"], "primary", "{r}");
        sq.wait_event("REPLICATION_PROMOTED");
        (s, sq, d.join("s.sock"))
    } else {
        let mut s = s;
        // A clean stop: SIGTERM, then the same image, metadata and dirty log as a primary.
        signal(&s, libc::SIGTERM);
        s.child.wait().unwrap();
        drop(s);
        assert_same(&read(&d.join("s.img")), &s_disk, "S stopped");
        let sp = primary(d, "s3", "s.img", port, &[]);
        let q = qmp(d, "s3");
        (sp, q, d.join("s3.sock"))
    };
    let (what, why) = decision(&mut p2q);
    assert_eq!(what, "incremental-failback", "{why}");
    let st = wait_in_sync(&mut spq);
    let resync = st["resync-total-bytes"].as_u64().unwrap();
    eprintln!("failback resync: {resync} bytes of a {DISK}-byte disk (live: {live})");
    assert!(
        resync > 0 && resync < DISK / 2,
        "not incremental: {resync} bytes"
    );
    assert_eq!(query(&mut p2q)["consistency"], "inconsistent");
    // The survivor's VM keeps writing through the new primary.
    let mut vm = Client::connect(&sock, 4).unwrap();
    for (q, off, data) in &svm_writes {
        assert_eq!(
            &vm.read(*q, *off, data.len()).unwrap(),
            data,
            "SVM data at {off}"
        );
    }
    write_batch(&mut vm, 6, 16, 0, DISK);
    let epoch = checkpoint(&mut spq);
    assert_eq!(query(&mut p2q)["consistency"], "consistent");
    // No write runs now: both images are the checkpoint.
    let at_checkpoint = read(&d.join("s.img"));
    assert_same(
        &read(&d.join("p.img")),
        &at_checkpoint,
        "after the failback checkpoint",
    );
    eprintln!("failback: equal disks at checkpoint {epoch}");
    // More writes reach P's layers, then the survivor dies and P fails over to the checkpoint.
    write_batch(&mut vm, 7, 16, 0, DISK);
    prepare_checkpoint(&mut spq);
    drop(vm);
    kill9(&mut sp);
    drop(sp);
    let r = p2q.execute("replication-failover", json!({})).unwrap();
    assert!(r["restored-hidden-bytes"].as_u64().unwrap() > 0, "{r}");
    assert_same(
        &read(&d.join("p.img")),
        &at_checkpoint,
        "P failed over: the survivor's disk at the last checkpoint",
    );
    drop(p2);
}

/// (a) Failback with the survivor promoted in place, then failover again.
#[test]
fn failback_with_live_promotion_resyncs_incrementally_and_fails_over_again() {
    failback(true);
}

/// (a') The same with the survivor restarted as a primary on its image.
#[test]
fn failback_through_a_restart_as_primary_resyncs_incrementally() {
    failback(false);
}

/// (b) Without `--discard-my-data` the old primary is refused as a split brain, and neither
/// disk changes.
#[test]
fn failback_without_discard_my_data_is_a_split_brain() {
    let dir = common::tempdir();
    let d = dir.path();
    let Diverged {
        s, p_disk, s_disk, ..
    } = diverge(d, &[], &[]);
    let p2 = secondary(d, "p2", "p.img", &["--allow-full-sync"]);
    let mut p2q = qmp(d, "p2");
    let port = p2.listen_port();
    let mut sq = qmp(d, "s");
    promote(&mut sq, port);
    let (what, why) = decision(&mut p2q);
    assert_eq!(what, "refused");
    assert!(why.contains("split brain"), "{why}");
    assert!(why.contains("--discard-my-data"), "{why}");
    assert_ne!(query(&mut sq)["state"], "connected");
    drop((p2, s));
    assert!(read(&d.join("p.img")) == p_disk, "P's disk changed");
    assert!(read(&d.join("s.img")) == s_disk, "S's disk changed");
}

/// (d) The old primary has no dirty log of its own: with `--discard-my-data` alone it is
/// refused (the message names `--allow-full-sync`); with both flags it is fully synced.
#[test]
fn failback_without_the_old_primarys_dirty_log_needs_a_full_sync() {
    let dir = common::tempdir();
    let d = dir.path();
    let Diverged { s, .. } = diverge(d, &[], &[]);
    std::fs::remove_file(d.join("p.img.colo-dirty")).unwrap();
    let (p2, mut p2q) = old_primary_as_secondary(d, &[]);
    let port = p2.listen_port();
    let mut sq = qmp(d, "s");
    promote(&mut sq, port);
    let (what, why) = decision(&mut p2q);
    assert_eq!(what, "refused");
    assert!(why.contains("--allow-full-sync"), "{why}");
    drop(p2);
    let (p2, mut p2q) = old_primary_as_secondary(d, &["--allow-full-sync"]);
    // The promoted primary retries the old address; the new process listens elsewhere, so a
    // restarted survivor is pointed at it.
    let port = p2.listen_port();
    signal(&s, libc::SIGTERM);
    let mut s = s;
    s.child.wait().unwrap();
    drop(s);
    let _sp = primary(d, "s3", "s.img", port, &[]);
    let mut spq = qmp(d, "s3");
    let (what, why) = decision(&mut p2q);
    assert_eq!(what, "full-sync", "{why}");
    let st = wait_in_sync(&mut spq);
    assert_eq!(st["resync-total-bytes"].as_u64().unwrap(), DISK);
    checkpoint(&mut spq);
    assert_same(
        &read(&d.join("p.img")),
        &read(&d.join("s.img")),
        "full failback",
    );
}

/// (c) The hole of a primary killed while connected: its current generation is still the one
/// the survivor's bitmap names, although it wrote beyond it (regions the survivor never saw).
/// Taken for a copy of that generation, it would get only the survivor's dirty record
/// (rule 5) and keep its own writes: the disks would differ. It takes a new generation when
/// it starts as a secondary, so the decision is the failback and the disks end equal.
#[test]
fn an_old_primary_killed_while_connected_is_not_taken_for_a_copy() {
    let dir = common::tempdir();
    let d = dir.path();
    let Diverged { s, .. } = diverge(d, &[], &[]);
    let (p2, mut p2q) = old_primary_as_secondary(d, &[]);
    let port = p2.listen_port();
    // The driver: promote, wait for the resync, first checkpoint, check the target.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_colo-blk"))
        .args([
            "reprotect",
            "--survivor",
            &pair::s(&d.join("s.qmp")),
            "--target",
            &pair::s(&d.join("p2.qmp")),
        ])
        .args(["--peer", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("reprotect: {report}");
    assert!(out.status.success(), "{report}");
    assert_eq!(report["promoted"], true);
    assert!(report["epoch"].as_u64().unwrap() >= 2, "{report}");
    let resync = report["resync-total-bytes"].as_u64().unwrap();
    assert!(resync > 0 && resync < DISK / 2, "{report}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("resync: "));
    assert_same(
        &read(&d.join("p.img")),
        &read(&d.join("s.img")),
        "the old primary's own writes were resent",
    );
    let (what, why) = decision(&mut p2q);
    assert_eq!(what, "incremental-failback", "{why}");
    drop((p2, s));
}
