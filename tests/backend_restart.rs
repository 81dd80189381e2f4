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

use std::time::Duration;

use common::qemu::{run_vm, Proc};
use common::{tempdir, Backend};

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

fn restarts_under_a_live_guest(engine: &str) {
    if !common::qemu::prerequisites("backend_restart", true) {
        return;
    }
    let guest = common::guest_dir();
    let dir = tempdir();
    let socket = dir.path().join("vhost.sock");
    let qmp = dir.path().join("colo-blk.qmp");
    let image = dir.path().join("disk.img");
    let args = [
        "--socket",
        socket.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--size",
        "128M",
        "--io-engine",
        engine,
        "--io-threads",
        "16",
        "--qmp",
        qmp.to_str().unwrap(),
    ];
    // Requests each process ran again from the region (QMP query-stats).
    let resubmitted = |qmp: &std::path::Path| -> u64 {
        let stats = common::Qmp::connect(qmp)
            .execute("query-stats", serde_json::json!({}))
            .unwrap();
        stats["queues"]
            .as_array()
            .unwrap()
            .iter()
            .map(|q| q["resubmitted"].as_u64().unwrap())
            .sum()
    };
    let mut total = 0;
    let slow = [("COLO_BLK_IO_DELAY_MS", "15")];
    let mut backend = Backend::start_with_env(&args, &socket, &slow);
    let mut vm: Proc = run_vm(
        dir.path(),
        "guest",
        &guest,
        std::slice::from_ref(&socket),
        "256M",
        &guest_script(),
        None,
    );
    vm.wait_marker(&format!("{MARK} start"), Duration::from_secs(120));
    for n in 0..RESTARTS {
        // The guest made progress on this backend: its requests are in flight (every I/O waits
        // 15 ms, twelve workers), some completed out of order. Then the process dies.
        vm.wait_marker(&format!("{MARK} progress"), Duration::from_secs(120));
        total += resubmitted(&qmp);
        // SAFETY: kill(2) with our child's pid.
        unsafe { libc::kill(backend.child.id() as i32, libc::SIGKILL) };
        let _ = backend.child.wait();
        assert!(
            vm.failures().is_empty(),
            "restart {n}: guest errors {:?}",
            vm.failures()
        );
        backend = Backend::start_with_env(&args, &socket, &slow);
    }
    vm.wait_marker(&format!("{MARK} verified"), Duration::from_secs(300));
    total += resubmitted(&qmp);
    eprintln!("{engine}: {RESTARTS} restarts, {total} requests resubmitted");
    // The fault was produced: requests were in flight at kills, and run again.
    assert!(total > 0, "{engine}: no restart found a request in flight");
    let status = vm.wait_exit(Duration::from_secs(60));
    let console: Vec<String> = vm.lines.iter().map(|l| l.1.clone()).collect();
    let broken: Vec<&String> = console
        .iter()
        .filter(|l| {
            l.contains("FAIL")
                || l.contains("IOERR")
                || l.contains("I/O error")
                || l.contains("is not a head")
        })
        .collect();
    assert!(broken.is_empty(), "{engine}: the guest saw {broken:?}");
    assert!(status.success(), "{engine}: guest run failed: {status}");
    drop(vm);
    assert!(backend.terminate().success());
    // The image holds every slot's last record.
    let data = std::fs::read(&image).unwrap();
    for w in 0..WORKERS {
        for k in 0..SLOTS {
            let s = w * SLOTS + k;
            let last = (ITERS - 1) - ((ITERS - 1 - k) % SLOTS);
            let at = (s * 4096) as usize;
            assert!(
                data[at..at + 4096] == record(w, s, last)[..],
                "{engine}: slot {s} of the image does not hold record {last}"
            );
        }
    }
}

#[test]
fn ten_backend_restarts_under_a_live_guest_with_io_threads() {
    restarts_under_a_live_guest("threads");
}

#[test]
fn ten_backend_restarts_under_a_live_guest_with_io_uring() {
    restarts_under_a_live_guest("uring");
}
