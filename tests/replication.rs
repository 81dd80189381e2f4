//! Primary and secondary as two real processes on loopback, driven with a real vhost-user-blk
//! client and the QMP control sockets. Every test compares disks byte for byte.

mod common;

use std::path::{Path, PathBuf};

use common::needs::Needs;
use common::pair::{
    checkpoint, hot_writes, kill9, prepare_checkpoint, primary_hello, query, read, signal,
    wait_connected, write_all, Node,
};
use common::{pattern, poll, Backend, Client, Qmp, STARTUP_TIMEOUT};
use serde_json::json;

const MIB: u64 = 1 << 20;
const DISK: u64 = 32 * MIB;

struct Pair {
    dir: tempfile::TempDir,
    primary: Option<Backend>,
    secondary: Option<Backend>,
    port: u16,
}

impl Pair {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Starts a secondary (optionally with a Secondary VM socket) and returns it with its port.
fn start_secondary(
    dir: &Path,
    image: &str,
    svm: bool,
    port: u16,
    extra: &[&str],
) -> (Backend, u16) {
    start_secondary_env(dir, image, svm, port, extra, &[])
}

/// [`start_secondary`] with extra environment variables for the process.
fn start_secondary_env(
    dir: &Path,
    image: &str,
    svm: bool,
    port: u16,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Backend, u16) {
    let mut node = Node::secondary(dir, image, DISK, port)
        .layers("layers")
        .qmp("secondary.qmp")
        .cluster_size("4K");
    if svm {
        node = node.socket("svm.sock").queues(2);
    }
    let b = node.args(extra).env(env).start();
    let port = b.listen_port();
    (b, port)
}

fn start_primary(dir: &Path, port: u16, extra: &[&str]) -> Backend {
    Node::primary(dir, "primary.img", DISK, port)
        .socket("primary.sock")
        .qmp("primary.qmp")
        .queues(4)
        .args(extra)
        .start()
}

/// A connected pair; returns it with a QMP client on each side, after the link is up.
fn pair(svm: bool, primary_extra: &[&str]) -> (Pair, Qmp, Qmp) {
    let dir = common::tempdir();
    let (secondary, port) = start_secondary(dir.path(), "secondary.img", svm, 0, &[]);
    let mut sq = Qmp::connect(&dir.path().join("secondary.qmp"));
    let primary = start_primary(dir.path(), port, primary_extra);
    let mut pq = Qmp::connect(&dir.path().join("primary.qmp"));
    wait_connected(&mut pq);
    sq.wait_event("REPLICATION_PEER_CONNECTED");
    (
        Pair {
            dir,
            primary: Some(primary),
            secondary: Some(secondary),
            port,
        },
        pq,
        sq,
    )
}

/// Random writes of several sizes, submitted concurrently on four queues, overlapping.
fn random_batch(c: &mut Client, seed: u64, n: usize) {
    write_all(c, &hot_writes(seed, n, &[512, 4096, 8192, 65536], DISK));
}

#[test]
fn secondary_equals_primary_at_every_checkpoint() {
    let (p, mut pq, _sq) = pair(false, &[]);
    let mut c = Client::connect(&p.path("primary.sock"), 4).unwrap();
    for round in 0..4u64 {
        for batch in 0..8 {
            random_batch(&mut c, round * 100 + batch, 32);
        }
        assert_eq!(c.write_zeroes(0, round * MIB, 64 * 1024, false), 0);
        assert_eq!(c.discard(1, 3 * MIB + round * 8192, 4096), 0);
        let sent = query(&mut pq)["bytes-sent-since-checkpoint"]
            .as_u64()
            .unwrap();
        assert!(sent > 0);
        assert_eq!(checkpoint(&mut pq), round + 1);
        let q = query(&mut pq);
        assert_eq!(q["bytes-sent-since-checkpoint"], 0);
        assert_eq!(q["bytes-in-flight"], 0);
        assert!(
            read(&p.path("secondary.img")) == read(&p.path("primary.img")),
            "round {round}: secondary differs from primary at the checkpoint"
        );
    }
}

#[test]
fn sync_mode_and_prepare_then_do_checkpoint() {
    let (p, mut pq, mut sq) = pair(false, &["--sync"]);
    let mut c = Client::connect(&p.path("primary.sock"), 4).unwrap();
    random_batch(&mut c, 9, 64);
    assert_eq!(c.flush(0), 0);
    prepare_checkpoint(&mut pq);
    // Everything is applied on the secondary: the disks are already equal.
    assert!(read(&p.path("secondary.img")) == read(&p.path("primary.img")));
    assert_eq!(
        pq.execute("replication-do-checkpoint", json!({})).unwrap()["epoch"],
        1
    );
    assert_eq!(
        sq.execute("replication-do-checkpoint", json!({})).unwrap()["epoch"],
        1
    );
    let s = query(&mut sq);
    assert_eq!(s["hidden-bytes"], 0);
}

#[test]
fn secondary_vm_writes_are_buffered_dropped_at_checkpoint_and_kept_by_failover() {
    let (p, mut pq, mut sq) = pair(true, &[]);
    let mut pc = Client::connect(&p.path("primary.sock"), 4).unwrap();
    let mut svm = Client::connect(&p.path("svm.sock"), 2).unwrap();
    // Epoch 1: primary and SVM both write, partly the same blocks.
    assert_eq!(pc.write(0, 0, &pattern(1, 256 * 1024)), 0);
    assert_eq!(svm.write(0, 128 * 1024, &pattern(2, 256 * 1024)), 0);
    assert_eq!(
        svm.read(1, 128 * 1024, 256 * 1024).unwrap(),
        pattern(2, 256 * 1024)
    );
    // The SVM sees its own writes over the checkpoint state (zeros), not the primary's stream.
    assert_eq!(svm.read(0, 0, 4096).unwrap(), vec![0u8; 4096]);
    checkpoint(&mut pq);
    // After the checkpoint the SVM's writes are gone: it sees the primary's disk.
    let primary_now = read(&p.path("primary.img"));
    assert!(svm.read(0, 0, 512 * 1024).unwrap() == primary_now[..512 * 1024]);
    assert!(read(&p.path("secondary.img")) == primary_now);

    // Epoch 2: more writes on both sides, then failover.
    assert_eq!(pc.write(1, 64 * 1024, &pattern(3, 128 * 1024)), 0);
    assert_eq!(svm.write(1, MIB + 512, &pattern(4, 8192 + 1024)), 0);
    assert_eq!(svm.write(0, 32 * 1024, &pattern(5, 4096)), 0);
    prepare_checkpoint(&mut pq);
    let r = sq.execute("replication-failover", json!({})).unwrap();
    assert!(r["duration-ms"].as_f64().is_some());
    let mut expect = primary_now.clone();
    expect[MIB as usize + 512..MIB as usize + 512 + 9216].copy_from_slice(&pattern(4, 9216));
    expect[32 * 1024..36 * 1024].copy_from_slice(&pattern(5, 4096));
    assert!(
        read(&p.path("secondary.img")) == expect,
        "disk != checkpoint + SVM writes"
    );
    // The SVM keeps being served, now straight from the disk.
    assert_eq!(svm.read(0, MIB + 512, 9216).unwrap(), pattern(4, 9216));
    assert_eq!(svm.write(0, 0, &pattern(6, 4096)), 0);
    assert_eq!(svm.flush(0), 0);
    assert_eq!(read(&p.path("secondary.img"))[..4096], pattern(6, 4096)[..]);
    assert!(sq.execute("replication-failover", json!({})).is_err());
}

#[test]
fn primary_killed_mid_stream_failover_restores_the_last_checkpoint() {
    let (mut p, mut pq, mut sq) = pair(false, &["--window", "4M"]);
    let mut c = Client::connect(&p.path("primary.sock"), 4).unwrap();
    for b in 0..4 {
        random_batch(&mut c, 50 + b, 32);
    }
    checkpoint(&mut pq);
    let at_checkpoint = read(&p.path("primary.img"));
    // Keep writing, then kill the primary without warning.
    for b in 0..6 {
        random_batch(&mut c, 70 + b, 32);
    }
    let mut primary = p.primary.take().unwrap();
    primary.child.kill().unwrap();
    primary.child.wait().unwrap();
    sq.wait_event("REPLICATION_PEER_LOST");
    sq.execute("replication-failover", json!({})).unwrap();
    assert!(
        read(&p.path("secondary.img")) == at_checkpoint,
        "after failover the secondary must hold exactly the last checkpoint"
    );
    drop(primary);
}

#[test]
fn secondary_killed_primary_keeps_serving_and_resyncs_a_new_secondary() {
    let (mut p, mut pq, _sq) = pair(false, &[]);
    let mut c = Client::connect(&p.path("primary.sock"), 4).unwrap();
    random_batch(&mut c, 1, 32);
    checkpoint(&mut pq);
    let mut secondary = p.secondary.take().unwrap();
    secondary.child.kill().unwrap();
    secondary.child.wait().unwrap();
    // The guest's writes keep succeeding.
    for b in 0..4 {
        random_batch(&mut c, 200 + b, 32);
    }
    let lost = pq.wait_event("REPLICATION_PEER_LOST");
    assert!(lost["timestamp"]["seconds"].as_u64().is_some());
    // Forget the first connection's events; the next ones belong to the new secondary.
    pq.events.clear();
    random_batch(&mut c, 300, 32);
    let q = query(&mut pq);
    assert_ne!(q["state"], "connected");
    assert!(q["dirty-bytes"].as_u64().unwrap() > 0);
    assert!(pq
        .execute("replication-checkpoint", json!({"timeout-ms": 1000}))
        .is_err());

    // The secondary comes back on the same port with the disk of the last checkpoint
    // (plus whatever it applied before dying): only the dirty blocks are sent again.
    let (secondary, _) = start_secondary(p.dir.path(), "secondary.img", false, p.port, &[]);
    p.secondary = Some(secondary);
    pq.wait_event("REPLICATION_PEER_CONNECTED");
    pq.wait_event("REPLICATION_RESYNC_DONE");
    random_batch(&mut c, 400, 16);
    checkpoint(&mut pq);
    assert!(read(&p.path("secondary.img")) == read(&p.path("primary.img")));
}

#[test]
fn mismatched_disk_size_is_refused_with_a_clear_error() {
    let dir = common::tempdir();
    // A secondary disk of another size (its own --size agrees with it).
    let _s = Node::secondary(dir.path(), "secondary.img", DISK / 2, 0)
        .layers("layers")
        .qmp("secondary.qmp")
        .cluster_size("4K")
        .start();
    let port = _s.listen_port();
    let mut sq = Qmp::connect(&dir.path().join("secondary.qmp"));
    let _p = start_primary(dir.path(), port, &[]);
    let ev = sq.wait_event("REPLICATION_ERROR");
    assert!(
        ev["data"]["error"]
            .as_str()
            .unwrap()
            .contains("disk size mismatch"),
        "{ev}"
    );
    let mut pq = Qmp::connect(&dir.path().join("primary.qmp"));
    let q = query(&mut pq);
    assert_ne!(q["state"], "connected");
    // The primary reports the refusal too (its event may predate our QMP connection).
    let err = match q["last-error"].as_str() {
        Some(e) => e.to_string(),
        None => pq.wait_event("REPLICATION_ERROR")["data"]["error"]
            .as_str()
            .unwrap()
            .to_string(),
    };
    assert!(err.contains("disk size mismatch"), "{err}");
}

#[test]
fn qmp_errors_are_reported_not_fatal() {
    let (_p, mut pq, mut sq) = pair(false, &[]);
    let e = pq
        .execute("replication-checkpoint", json!({"timeout-ms": "soon"}))
        .unwrap_err();
    assert_eq!(e["class"], "GenericError");
    let e = pq
        .execute("replication-checkpoint", json!({"bogus": 1}))
        .unwrap_err();
    assert_eq!(e["class"], "GenericError");
    // A primary-only command is not there on the secondary.
    let e = sq.execute("replication-checkpoint", json!({})).unwrap_err();
    assert_eq!(e["class"], "CommandNotFound");
    let e = pq.execute("no-such-command", json!({})).unwrap_err();
    assert_eq!(e["class"], "CommandNotFound");
    assert_eq!(
        pq.execute("query-status", json!({})).unwrap()["running"],
        true
    );
}

/// A hand-rolled primary: the secondary must reject corrupted and out-of-order frames before
/// they reach its disk, and say why.
#[test]
fn corrupted_or_out_of_order_frames_never_reach_the_secondary_disk() {
    use colo_blk::replication::protocol::{Frame, HEADER_LEN};
    use std::io::{Read, Write};
    use std::net::TcpStream;

    let dir = common::tempdir();
    let (_s, port) = start_secondary(dir.path(), "secondary.img", false, 0, &[]);
    let mut sq = Qmp::connect(&dir.path().join("secondary.qmp"));
    // One hand-rolled primary reconnecting (a different one would be refused: its generations
    // do not cover what the first one sent).
    let gens = colo_blk::replication::metadata::Generations::fresh_primary();
    let connect = || {
        let mut t = TcpStream::connect(("127.0.0.1", port)).unwrap();
        t.write_all(&primary_hello(DISK, gens).encode()).unwrap();
        let mut h = [0u8; HEADER_LEN];
        t.read_exact(&mut h).unwrap();
        let raw = Frame::parse_header(&h).unwrap();
        let mut payload = vec![0u8; raw.payload_len];
        t.read_exact(&mut payload).unwrap();
        assert!(matches!(
            Frame::from_parts(raw, payload).unwrap(),
            Frame::Welcome(_)
        ));
        t
    };
    let good = |seq: u64, off: u64| Frame::write(seq, off, pattern(seq, 4096)).encode();

    // 1. A frame whose payload was damaged on the way.
    let mut t = connect();
    t.write_all(&good(1, 0)).unwrap();
    let mut bad = good(2, 8192);
    bad[HEADER_LEN + 100] ^= 0x40;
    t.write_all(&bad).unwrap();
    let ev = sq.wait_event("REPLICATION_PEER_LOST");
    assert!(
        ev["data"]["reason"].as_str().unwrap().contains("checksum"),
        "{ev}"
    );
    // 2. A sequence gap.
    let mut t = connect();
    t.write_all(&good(1, 16384)).unwrap();
    t.write_all(&good(3, 24576)).unwrap();
    let ev = sq.wait_event("REPLICATION_PEER_LOST");
    assert!(
        ev["data"]["reason"].as_str().unwrap().contains("sequence"),
        "{ev}"
    );
    // 3. Garbage instead of a header.
    let mut t = connect();
    t.write_all(&[0x55u8; 64]).unwrap();
    let ev = sq.wait_event("REPLICATION_PEER_LOST");
    assert!(
        ev["data"]["reason"].as_str().unwrap().contains("magic"),
        "{ev}"
    );
    // 4. A write past the end of the disk: refused by the applier, link broken.
    let mut t = connect();
    t.write_all(&Frame::write(1, DISK - 512, vec![1; 4096]).encode())
        .unwrap();
    let ev = sq.wait_event("REPLICATION_PEER_LOST");
    assert!(
        ev["data"]["reason"]
            .as_str()
            .unwrap()
            .contains("cannot apply"),
        "{ev}"
    );
    drop(t);

    // Only the good frames reached the disk.
    let disk = read(&dir.path().join("secondary.img"));
    assert_eq!(disk[..4096], pattern(1, 4096)[..]);
    assert!(
        disk[8192..12288].iter().all(|&b| b == 0),
        "corrupted frame reached the disk"
    );
    assert_eq!(disk[16384..20480], pattern(1, 4096)[..]);
    assert!(
        disk[24576..28672].iter().all(|&b| b == 0),
        "out-of-order frame reached the disk"
    );
    assert!(disk[(DISK - 512) as usize..].iter().all(|&b| b == 0));
    // And the rollback restores the checkpoint (all zeros).
    sq.execute("replication-failover", json!({})).unwrap();
    assert!(read(&dir.path().join("secondary.img"))
        .iter()
        .all(|&b| b == 0));
}

/// A peer that stops answering (not a closed socket) is detected through heartbeats.
#[test]
fn a_frozen_secondary_is_declared_lost_by_heartbeat() {
    let (mut p, mut pq, _sq) = pair(false, &[]);
    let mut c = Client::connect(&p.path("primary.sock"), 4).unwrap();
    random_batch(&mut c, 5, 16);
    let s = p.secondary.as_mut().unwrap();
    signal(s, libc::SIGSTOP);
    let ev = pq.wait_event("REPLICATION_PEER_LOST");
    assert!(
        ev["data"]["reason"].as_str().unwrap().contains("heartbeat"),
        "{ev}"
    );
    // The guest's writes keep completing, tracked as dirty.
    random_batch(&mut c, 6, 16);
    assert!(query(&mut pq)["dirty-bytes"].as_u64().unwrap() > 0);
    signal(s, libc::SIGCONT);
}

/// The stock python QMP client (`qemu.qmp`, as used by QEMU's own tooling) drives a checkpoint.
#[test]
fn stock_python_qmp_client_drives_a_checkpoint() {
    if !Needs::of("stock_python_qmp_client_drives_a_checkpoint")
        .python("qemu.qmp")
        .met()
    {
        return;
    }
    let (p, _pq, _sq) = pair(false, &[]);
    let mut c = Client::connect(&p.path("primary.sock"), 4).unwrap();
    random_batch(&mut c, 77, 16);
    let out = std::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/qmp_replication.py"
        ))
        .arg(p.path("primary.qmp"))
        .arg(p.path("secondary.qmp"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("qmp_replication: OK"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(read(&p.path("secondary.img")) == read(&p.path("primary.img")));
}

/// SIGTERM on either side of a pair: clean exit 0, nothing lost on the primary's disk.
#[test]
fn sigterm_stops_both_roles_cleanly() {
    let (mut p, _pq, _sq) = pair(false, &[]);
    let mut c = Client::connect(&p.path("primary.sock"), 4).unwrap();
    assert_eq!(c.write(0, 12288, &pattern(42, 8192)), 0);
    assert!(p.primary.take().unwrap().terminate().success());
    assert!(p.secondary.take().unwrap().terminate().success());
    assert_eq!(
        read(&p.path("primary.img"))[12288..20480],
        pattern(42, 8192)[..]
    );
}

/// Many concurrent writes on four queues to the same few blocks: whatever order they took
/// effect in on the primary, the secondary must end identical.
#[test]
fn overlapping_concurrent_writes_end_identical() {
    let (p, mut pq, _sq) = pair(false, &[]);
    let mut c = Client::connect(&p.path("primary.sock"), 4).unwrap();
    for batch in 0..40u64 {
        let writes: Vec<_> = (0..64u64)
            .map(|i| {
                let len = [4096usize, 8192, 16384, 512][(i % 4) as usize];
                let off = ((batch * 7 + i * 13) % 24) * 4096;
                ((i % 4) as usize, off, pattern(batch * 100 + i, len))
            })
            .collect();
        for r in c.write_concurrently(&writes) {
            assert_eq!(r, 0);
        }
    }
    checkpoint(&mut pq);
    assert!(read(&p.path("secondary.img")) == read(&p.path("primary.img")));
}

/// Issue 9 b: the secondary is SIGKILLed mid-epoch and restarted on its image and layer
/// directory; the primary resyncs it, then the primary is lost: failover gives exactly the last
/// checkpoint (plus the Secondary VM's flushed writes when it has some).
#[test]
fn a_restarted_secondary_still_fails_over_to_the_last_checkpoint() {
    for svm_writes in [false, true] {
        let (mut p, mut pq, _sq) = pair(svm_writes, &[]);
        let mut c = Client::connect(&p.path("primary.sock"), 4).unwrap();
        for b in 0..4 {
            random_batch(&mut c, 500 + b, 32);
        }
        checkpoint(&mut pq);
        let mut expect = read(&p.path("primary.img"));
        if svm_writes {
            let mut svm = Client::connect(&p.path("svm.sock"), 2).unwrap();
            for (i, off) in [0u64, 3 * MIB + 512, 17 * MIB].into_iter().enumerate() {
                let data = pattern(900 + i as u64, 12288);
                assert_eq!(svm.write(i % 2, off, &data), 0);
                expect[off as usize..off as usize + data.len()].copy_from_slice(&data);
            }
            assert_eq!(svm.flush(0), 0);
        }
        for b in 0..4 {
            random_batch(&mut c, 600 + b, 32);
        }
        // Everything so far is applied on the secondary (not checkpointed).
        prepare_checkpoint(&mut pq);
        kill9(&mut p.secondary.take().expect("running"));
        pq.events.clear();
        let (secondary, _) =
            start_secondary(p.dir.path(), "secondary.img", svm_writes, p.port, &[]);
        p.secondary = Some(secondary);
        let mut sq = Qmp::connect(&p.path("secondary.qmp"));
        let st = query(&mut sq);
        assert_eq!(st["epoch"], 1, "{st}");
        pq.wait_event("REPLICATION_RESYNC_DONE");
        for b in 0..2 {
            random_batch(&mut c, 700 + b, 32);
        }
        prepare_checkpoint(&mut pq);
        kill9(&mut p.primary.take().expect("running"));
        sq.wait_event("REPLICATION_PEER_LOST");
        sq.execute("replication-failover", json!({})).unwrap();
        assert!(
            read(&p.path("secondary.img")) == expect,
            "failover after a secondary restart (svm writes: {svm_writes}) is not the last \
             checkpoint"
        );
    }
}

/// Issue 9 c: the secondary dies in the middle of a failover (fault injected after the second
/// committed batch); restarted, it resumes the failover and the disk is exactly the checkpoint
/// plus the Secondary VM's writes.
#[test]
fn a_failover_interrupted_by_a_crash_completes_after_the_restart() {
    let dir = common::tempdir();
    let (secondary, port) = start_secondary_env(
        dir.path(),
        "secondary.img",
        true,
        0,
        &[],
        &[("COLO_BLK_FAULT", "failover-batch:2")],
    );
    let mut sq = Qmp::connect(&dir.path().join("secondary.qmp"));
    let primary = start_primary(dir.path(), port, &[]);
    let mut pq = Qmp::connect(&dir.path().join("primary.qmp"));
    wait_connected(&mut pq);
    let mut p = Pair {
        dir,
        primary: Some(primary),
        secondary: Some(secondary),
        port,
    };
    let mut c = Client::connect(&p.path("primary.sock"), 4).unwrap();
    random_batch(&mut c, 800, 32);
    checkpoint(&mut pq);
    let mut expect = read(&p.path("primary.img"));
    let mut svm = Client::connect(&p.path("svm.sock"), 2).unwrap();
    let data = pattern(801, 2 * MIB as usize);
    assert_eq!(svm.write(0, 5 * MIB, &data), 0);
    assert_eq!(svm.flush(0), 0);
    expect[5 * MIB as usize..7 * MIB as usize].copy_from_slice(&data);
    // Enough rollback data for several commit batches.
    for b in 0..8 {
        random_batch(&mut c, 810 + b, 32);
    }
    prepare_checkpoint(&mut pq);
    kill9(&mut p.primary.take().expect("running"));
    sq.wait_event("REPLICATION_PEER_LOST");
    assert!(
        sq.execute_or_disconnect("replication-failover", json!({}))
            .is_none(),
        "the fault must stop the failover"
    );
    let mut s = p.secondary.take().unwrap();
    let status = s.child.wait().unwrap();
    assert!(!status.success(), "secondary survived the injected fault");
    drop(svm);
    let (secondary, _) = start_secondary(p.dir.path(), "secondary.img", true, p.port, &[]);
    let mut sq = Qmp::connect(&p.path("secondary.qmp"));
    // No command asks for it: the restarted process resumes the failover by itself.
    let what = "the restarted secondary to finish the failover it resumed";
    poll::until(what, 4 * STARTUP_TIMEOUT, || {
        query(&mut sq)["failovers"] == 1
    });
    let st = query(&mut sq);
    assert_eq!(st["state"], "failed-over", "{st}");
    assert!(
        read(&p.path("secondary.img")) == expect,
        "the resumed failover is not the checkpoint plus the SVM's writes"
    );
    p.secondary = Some(secondary);
}
