//! A backend restart never breaks the guest (issue 21): QEMU 7.2 (TCG, `reconnect=1`, one queue)
//! runs a guest with 8 workers that write and read back their own 4 KiB records with O_DIRECT
//! and 4 workers reading 8 MiB at a time, on a standalone colo-blk disk made slow by the
//! backend's own fault injection (`COLO_BLK_IO_DELAY_MS`), so that requests are in flight and
//! complete out of order. colo-blk is SIGKILLed and restarted on the same socket and image ten
//! times, each time once the guest made progress since the last restart; QEMU reconnects and
//! hands the new process its inflight region (`INFLIGHT_SHMFD`, docs/inflight.md), which
//! resubmits what was in flight. The guest must see no I/O error and no stall, every read-back
//! must match, and at the end every record slot holds its last record, in the guest and in the
//! image. Run for the thread engine and for io_uring.
//!
//! QEMU's own `vhost VQ 0 ring restore failed` at each kill is expected: it cannot ask a dead
//! backend for its ring position, so it rewinds to the used index, which the inflight region
//! then corrects.
//!
//! Without QEMU or the guest the test is skipped loudly, unless `CI` is set: then it fails.

mod common;

use std::path::Path;
use std::time::Duration;

use common::needs::Needs;
use common::pair::{
    assert_same_files, checkpoint, kill9, qmp as qmp_at, query, wait_in_sync, Node,
};
use common::qemu::{run_vm_on, Proc};
use common::{tempdir, Backend};

/// A slow disk: every guest request waits 0 to 30 ms (the backend's fault injection).
const SLOW: [(&str, &str); 1] = [("COLO_BLK_IO_DELAY_MS", "15")];
/// The disk size of every backend here.
const SIZE: u64 = 128 << 20;

const WORKERS: u64 = 8;
const SLOTS: u64 = 8;
const ITERS: u64 = 24;
const RESTARTS: usize = 10;
const MARK: &str = "RST:";

/// The guest's script: see the module comment. Every failure is a `RST: FAIL` or `RST: IOERR`
/// line; `RST: PASS` ends a run without one.
fn guest_script() -> String {
    format!(
        r#"W={WORKERS}; K={SLOTS}; N={ITERS}
rec() {{ yes "W$1 S$2 I$3" | head -c 4096; }}
worker() {{
  w=$1; i=0
  while [ $i -lt $N ]; do
    s=$((w * K + i % K))
    rec $w $s $i >/tmp/w$w
    dd if=/tmp/w$w of=/dev/vda bs=4096 seek=$s count=1 oflag=direct 2>/tmp/e$w \
      || echo "{MARK} IOERR write w$w i$i $(cat /tmp/e$w)"
    dd if=/dev/vda of=/tmp/r$w bs=4096 skip=$s count=1 iflag=direct 2>/tmp/e$w \
      || echo "{MARK} IOERR read w$w i$i $(cat /tmp/e$w)"
    cmp -s /tmp/w$w /tmp/r$w || echo "{MARK} FAIL w$w i$i read back differs"
    i=$((i + 1))
    [ $((i % 2)) = 0 ] && echo "{MARK} progress w$w $i"
  done
}}
reader() {{
  while [ ! -e /tmp/stop ]; do
    dd if=/dev/vda of=/dev/null bs=1M count=8 skip=$((8 + $1 * 8)) iflag=direct 2>/tmp/q$1 \
      || echo "{MARK} IOERR big read $1 $(cat /tmp/q$1)"
  done
}}
echo "{MARK} start"
for r in 0 1 2 3; do reader $r & done
pids=""
for w in $(seq 0 $((W - 1))); do worker $w & pids="$pids $!"; done
for p in $pids; do wait $p; done
touch /tmp/stop; wait
for w in $(seq 0 $((W - 1))); do
  for k in $(seq 0 $((K - 1))); do
    s=$((w * K + k)); last=$(( (N - 1) - ((N - 1 - k) % K) ))
    rec $w $s $last >/tmp/x
    dd if=/dev/vda of=/tmp/y bs=4096 skip=$s count=1 iflag=direct 2>/dev/null
    cmp -s /tmp/x /tmp/y || echo "{MARK} FAIL slot $s does not hold record $last"
  done
done
echo "{MARK} verified"
"#
    )
}

/// The record the guest's `rec w s i` writes.
fn record(w: u64, s: u64, i: u64) -> Vec<u8> {
    let line = format!("W{w} S{s} I{i}\n");
    line.bytes().cycle().take(4096).collect()
}

/// Requests the process behind QMP socket `qmp` ran again from the inflight region.
fn resubmitted(qmp: &Path) -> u64 {
    let stats = common::Qmp::connect(qmp)
        .execute("query-stats", serde_json::json!({}))
        .unwrap();
    stats["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["resubmitted"].as_u64().unwrap())
        .sum()
}

/// Boots the guest on `socket`, served by what `start` starts (the backend whose QMP socket is
/// `qmp`), SIGKILLs and restarts it [`RESTARTS`] times after guest progress, and checks the
/// guest saw nothing. Returns the last backend, the requests resubmitted in all.
fn guest_under_restarts(
    signal: i32,
    qemu: Option<&str>,
    dir: &Path,
    socket: &Path,
    qmp: &Path,
    what: &str,
    start: impl Fn() -> Backend,
) -> (Backend, u64) {
    let guest = common::guest_dir();
    let mut backend = start();
    let mut vm: Proc = run_vm_on(
        qemu,
        dir,
        "guest",
        &guest,
        &[socket.to_path_buf()],
        "256M",
        &guest_script(),
        None,
    );
    vm.wait_marker(&format!("{MARK} start"), Duration::from_secs(120));
    let mut total = 0;
    for n in 0..RESTARTS {
        // The guest made progress on this backend: its requests are in flight (every I/O waits
        // up to 30 ms, twelve workers), some completed out of order. Then the process dies.
        vm.wait_marker(&format!("{MARK} progress"), Duration::from_secs(120));
        total += resubmitted(qmp);
        common::pair::signal(&backend, signal);
        let _ = backend.child.wait();
        assert!(
            vm.failures().is_empty(),
            "{what}, restart {n}: guest errors {:?}",
            vm.failures()
        );
        backend = start();
        // Only progress made from now on counts for the next restart.
        vm.drain();
    }
    vm.wait_marker(&format!("{MARK} verified"), Duration::from_secs(300));
    total += resubmitted(qmp);
    let status = vm.wait_exit(Duration::from_secs(60));
    let broken: Vec<&String> = vm
        .lines
        .iter()
        .map(|l| &l.1)
        .filter(|l| {
            l.contains("FAIL")
                || l.contains("IOERR")
                || l.contains("I/O error")
                || l.contains("is not a head")
        })
        .collect();
    assert!(broken.is_empty(), "{what}: the guest saw {broken:?}");
    assert!(status.success(), "{what}: guest run failed: {status}");
    eprintln!("{what}: {RESTARTS} restarts, {total} requests resubmitted");
    // The fault was produced: requests were in flight at kills, and run again. (A SIGTERM
    // completes them first: nothing is left to run again.)
    if signal == libc::SIGKILL {
        assert!(total > 0, "{what}: no restart found a request in flight");
    }
    (backend, total)
}

/// Every record slot of `data` (an image, or a disk as the guest saw it) holds its last record.
fn assert_records(data: &[u8], what: &str) {
    for w in 0..WORKERS {
        for k in 0..SLOTS {
            let s = w * SLOTS + k;
            let last = (ITERS - 1) - ((ITERS - 1 - k) % SLOTS);
            let at = (s * 4096) as usize;
            assert!(
                data[at..at + 4096] == record(w, s, last)[..],
                "{what}: slot {s} does not hold record {last}"
            );
        }
    }
}

fn restarts_under_a_live_guest(engine: &str, qemu: Option<&str>, signal: i32) {
    let dir = tempdir();
    let socket = dir.path().join("vhost.sock");
    let qmp = dir.path().join("colo-blk.qmp");
    let image = dir.path().join("disk.img");
    let start = || {
        Node::standalone(dir.path(), "disk.img", SIZE)
            .socket("vhost.sock")
            .qmp("colo-blk.qmp")
            .args(&["--io-engine", engine, "--io-threads", "16"])
            .env(&SLOW)
            .start()
    };
    let (backend, _) = guest_under_restarts(signal, qemu, dir.path(), &socket, &qmp, engine, start);
    assert!(backend.terminate().success());
    assert_records(&std::fs::read(&image).unwrap(), engine);
}

#[test]
fn ten_backend_restarts_under_a_live_guest_with_io_threads() {
    if common::qemu::prerequisites("backend_restart", true) {
        restarts_under_a_live_guest("threads", None, libc::SIGKILL);
    }
}

#[test]
fn ten_backend_restarts_under_a_live_guest_with_io_uring() {
    if common::qemu::prerequisites("backend_restart", true) {
        restarts_under_a_live_guest("uring", None, libc::SIGKILL);
    }
}

/// The same under QEMU 11 (`COLO_QEMU`, installed by .ci/run), whose reconnect option and
/// vhost-user front-end differ from 7.2's.
#[test]
fn ten_backend_restarts_under_a_live_guest_on_qemu_11() {
    let qemu = common::xcolo::colo_qemu();
    if Needs::of("backend_restart on QEMU 11")
        .tools(&[&qemu])
        .python("qemu.qmp")
        .met()
    {
        restarts_under_a_live_guest("threads", Some(&qemu), libc::SIGKILL);
    }
}

/// A replicating primary restarted under the Primary VM: the guest sees nothing, the
/// restarted primary resyncs the secondary from its dirty log, and a checkpoint after the
/// guest is done makes the two disks equal byte for byte.
#[test]
fn ten_primary_restarts_under_a_live_pvm() {
    if !common::qemu::prerequisites("backend_restart", true) {
        return;
    }
    let dir = tempdir();
    let secondary = Node::secondary(dir.path(), "s.img", SIZE, 0)
        .layers("layers")
        .qmp("s.qmp")
        .start();
    let port = secondary.listen_port();
    let socket = dir.path().join("p.sock");
    let start = || {
        Node::primary(dir.path(), "p.img", SIZE, port)
            .socket("p.sock")
            .qmp("p.qmp")
            .args(&["--io-threads", "16"])
            .env(&SLOW)
            .start()
    };
    let (primary, _) = guest_under_restarts(
        libc::SIGKILL,
        None,
        dir.path(),
        &socket,
        &dir.path().join("p.qmp"),
        "primary",
        start,
    );
    let mut pq = qmp_at(dir.path(), "p.qmp");
    wait_in_sync(&mut pq);
    checkpoint(&mut pq);
    assert!(primary.terminate().success());
    assert!(secondary.terminate().success());
    assert_records(&std::fs::read(dir.path().join("p.img")).unwrap(), "primary");
    assert_same_files(
        &dir.path().join("p.img"),
        &dir.path().join("s.img"),
        "after the checkpoint",
    );
}

/// A secondary restarted under the Secondary VM (the primary connected): the SVM sees
/// nothing, the restarted secondary keeps its layers and epoch, and a failover commits exactly
/// what the SVM wrote.
#[test]
fn ten_secondary_restarts_under_a_live_svm() {
    if !common::qemu::prerequisites("backend_restart", true) {
        return;
    }
    let dir = tempdir();
    let start_secondary = |port: u16| {
        Node::secondary(dir.path(), "s.img", SIZE, port)
            .layers("layers")
            .qmp("s.qmp")
            .socket("svm.sock")
            .args(&["--io-threads", "16"])
            .env(&SLOW)
            .start()
    };
    let first = start_secondary(0);
    let port = first.listen_port();
    let primary = Node::primary(dir.path(), "p.img", SIZE, port)
        .socket("p.sock")
        .qmp("p.qmp")
        .start();
    let mut pq = qmp_at(dir.path(), "p.qmp");
    wait_in_sync(&mut pq);
    let epoch = checkpoint(&mut pq);
    kill9(&mut { first });
    let (secondary, _) = guest_under_restarts(
        libc::SIGKILL,
        None,
        dir.path(),
        &dir.path().join("svm.sock"),
        &dir.path().join("s.qmp"),
        "secondary",
        || start_secondary(port),
    );
    let mut sq = qmp_at(dir.path(), "s.qmp");
    let st = query(&mut sq);
    assert_eq!(st["epoch"].as_u64(), Some(epoch), "{st}");
    sq.execute("replication-failover", serde_json::json!({}))
        .unwrap();
    assert!(secondary.terminate().success());
    assert!(primary.terminate().success());
    assert_records(
        &std::fs::read(dir.path().join("s.img")).unwrap(),
        "secondary",
    );
}

/// An upgrade in place (`systemctl restart`): SIGTERM completes what is in flight, syncs and
/// exits; the next process serves the same guest.
#[test]
fn ten_sigterm_restarts_under_a_live_guest() {
    if common::qemu::prerequisites("backend_restart", true) {
        restarts_under_a_live_guest("threads", None, libc::SIGTERM);
    }
}
