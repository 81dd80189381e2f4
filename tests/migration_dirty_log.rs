//! Dirty-page logging during a live migration (VHOST_F_LOG_ALL + LOG_SHMFD), with a real QEMU.
//!
//! Every byte colo-blk writes into guest RAM (read data via `preadv` straight into guest memory,
//! status bytes, used ring) must be logged in the dirty bitmap while QEMU migrates, or the
//! destination ends up with stale pages.
//!
//! Setup (as qemu-scripts/qemu-migrate-try.sh): two standalone colo-blk processes on ONE image
//! (both `--share-rw`: without it the second is refused, the image being locked by the first),
//! a source QEMU and a destination QEMU started with `-incoming`. The host fills the image with a
//! deterministic pattern and hands the guest the md5 of each 16 MiB window. The guest loops
//! forever; round `k` reads window `k % 3`:
//!
//! 1. `CACHED k OK|BAD`: md5 of the previous round's window read again through the page
//!    cache, without dropping it. Those page-cache pages were filled by the backend (DMA-like
//!    `preadv` into guest RAM) in the previous round, possibly on the source while migration
//!    ran; on the destination they are exactly what an unlogged backend write leaves stale.
//!    The windows differ, so a stale page (older content of a reused page frame) shows up.
//!    `SHM k OK|BAD`: the same for the tmpfs copy /dev/shm/copy made in the previous round.
//! 2. drop the page cache, `dd` the window from /dev/vda (buffered: the backend fills fresh
//!    page-cache pages) into /dev/shm/copy, md5 it: `ROUND k OK|BAD`.
//!
//! (`dd iflag=direct` would not do: the backend then fills dd's reused 1 MiB buffer, and the
//! copy in tmpfs is written by the guest CPU, which QEMU tracks itself. Only a stop in the
//! window between the DMA and the copy could show a missing log entry.)
//!
//! The guest kernel runs with `init_on_alloc=0 init_on_free=0`: Debian's kernel zeroes every
//! page it allocates, a CPU write that QEMU logs itself and that would hide most missing backend
//! log entries (with it, the mutant below survived 3 of 3 runs).
//!
//! Mutation check (done by hand when this test was written): with the `mark_dirty` loop in
//! `RawImage::read_to_guest` (src/storage/raw.rs) commented out, the destination printed
//! `CACHED k BAD` in 6 of 6 runs; intact, the test passed every time (~8-12 s).
//!
//! Once the source printed its first round, the host starts the migration over QMP with a low
//! bandwidth so that it spans several rounds, then raises the allowed downtime so it converges,
//! and polls `query-migrate` until `completed`. The destination guest must then print its
//! CACHED/SHM check and at least two more `ROUND k OK`, and nothing BAD anywhere.
//!
//! Without `qemu-system-x86_64` the test is skipped loudly, unless `CI` is set: then it fails.
//! Environment: `COLO_GUEST_DIR` (prebuilt guest), `COLO_BLK_ACCEL` (see run-vm.sh).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::needs::Needs;
use common::qemu::Proc;
use common::{pattern, poll, tempdir, Backend, Qmp};
use serde_json::json;

const WINDOW_MIB: u64 = 16;
const WINDOWS: u64 = 3;
const IMAGE_SIZE: u64 = (WINDOW_MIB * WINDOWS) << 20;
const PATTERN_SEED: u64 = 0x00D1_2770_61AA;

/// The lines of `vm` (received so far) that say the guest saw wrong data.
fn bad_lines(vm: &Proc) -> Vec<&String> {
    vm.lines
        .iter()
        .map(|l| &l.1)
        .filter(|l| is_bad(l))
        .collect()
}

fn is_marker(line: &str, kind: &str, verdict: &str) -> bool {
    let mut w = line.split_whitespace();
    w.next() == Some(kind) && w.next().is_some() && w.next() == Some(verdict)
}

fn is_bad(line: &str) -> bool {
    ["ROUND", "CACHED", "SHM"]
        .iter()
        .any(|k| is_marker(line, k, "BAD"))
}

fn guest_script() -> String {
    format!(
        r#"mkdir -p /dev/shm
mount -t tmpfs tmpfs /dev/shm || echo "MIGTEST: no tmpfs"
exp() {{ sed -n "$(($1 + 1))p" /colo/md5s; }}
sum() {{ md5sum | cut -d' ' -f1; }}
k=0
prev=-1
while true; do
  k=$((k + 1))
  w=$((k % {WINDOWS}))
  if [ $prev -ge 0 ]; then
    got=$(dd if=/dev/vda bs=1M count={WINDOW_MIB} skip=$((prev * {WINDOW_MIB})) 2>/dev/null | sum)
    if [ "$got" = "$(exp $prev)" ]; then echo "CACHED $k OK"; else echo "CACHED $k BAD $got"; fi
    got=$(sum </dev/shm/copy)
    if [ "$got" = "$(exp $prev)" ]; then echo "SHM $k OK"; else echo "SHM $k BAD $got"; fi
  fi
  echo 1 >/proc/sys/vm/drop_caches
  dd if=/dev/vda of=/dev/shm/copy bs=1M count={WINDOW_MIB} skip=$((w * {WINDOW_MIB})) 2>/dev/null
  got=$(sum </dev/shm/copy)
  if [ "$got" = "$(exp $w)" ]; then echo "ROUND $k OK"; else echo "ROUND $k BAD $got"; fi
  prev=$w
done
"#
    )
}

/// md5 of `data` by the host's `md5sum` (coreutils), as the guest's busybox prints it.
fn md5_hex(data: &[u8]) -> String {
    use std::io::Write;
    let mut c = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn md5sum");
    c.stdin.take().unwrap().write_all(data).unwrap();
    let out = c.wait_with_output().expect("md5sum");
    assert!(out.status.success(), "md5sum failed");
    String::from_utf8(out.stdout).unwrap()[..32].to_string()
}

#[test]
fn backend_writes_during_migration_reach_the_destination() {
    if !Needs::of("migration_dirty_log")
        .tools(&["qemu-system-x86_64"])
        .met()
    {
        return;
    }
    let started = Instant::now();
    let guest = common::guest_dir();
    let dir = tempdir();
    let p = |n: &str| dir.path().join(n);

    // The image: a pattern; the guest gets the md5 of each window.
    let data = pattern(PATTERN_SEED, IMAGE_SIZE as usize);
    std::fs::write(p("disk.img"), &data).unwrap();
    let win = (WINDOW_MIB << 20) as usize;
    let md5s: String = data.chunks(win).map(|c| md5_hex(c) + "\n").collect();
    std::fs::write(p("md5s"), md5s).unwrap();
    std::fs::write(p("test.sh"), guest_script()).unwrap();

    let size = format!("{}M", IMAGE_SIZE >> 20);
    let _src_backend = Backend::start(
        &p("src.sock"),
        &p("disk.img"),
        &["--size", &size, "--num-queues", "1", "--share-rw"],
    );
    let _dst_backend = Backend::start(
        &p("dst.sock"),
        &p("disk.img"),
        &["--size", &size, "--num-queues", "1", "--share-rw"],
    );

    let port = common::free_port();
    let vm = |name: &'static str, extra: &[&str]| {
        let mut cmd = Command::new("bash");
        cmd.arg(common::repo().join("qemu-scripts/run-vm.sh"))
            .arg("--guest")
            .arg(&guest)
            .arg("--socket")
            .arg(p(&format!("{name}.sock")))
            .args(["--num-queues", "1", "--smp", "1", "--mem", "192M"])
            .args(["--append", "init_on_alloc=0 init_on_free=0"])
            .arg("--script")
            .arg(p("test.sh"))
            .arg("--file")
            .arg(p("md5s"))
            .arg("--qmp")
            .arg(p(&format!("{name}.qmp")))
            .arg("--")
            .args(extra);
        Proc::spawn(cmd, name)
    };
    let mut src = vm("src", &[]);
    let incoming = format!("tcp:127.0.0.1:{port}");
    let mut dst = vm("dst", &["-incoming", &incoming]);

    src.wait_count("ROUND OK", 1, Duration::from_secs(60), |l| {
        is_marker(l, "ROUND", "OK")
    });
    let booted = started.elapsed();

    let rounds = |vm: &Proc| {
        vm.lines
            .iter()
            .filter(|l| is_marker(&l.1, "ROUND", "OK"))
            .count()
    };
    src.drain();
    let rounds_before = rounds(&src);
    let mut qmp = Qmp::connect(&p("src.qmp"));
    // Slow enough that several rounds run while RAM is being sent.
    qmp.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": 16 << 20, "downtime-limit": 300}),
    )
    .expect("migrate-set-parameters");
    qmp.execute("migrate", json!({"uri": incoming}))
        .expect("migrate");
    let mig_start = Instant::now();
    let mut raised = false;
    poll::until("the migration to complete", Duration::from_secs(50), || {
        let r = qmp
            .execute("query-migrate", json!({}))
            .expect("query-migrate");
        let status = r["status"].as_str().unwrap_or("?").to_string();
        match status.as_str() {
            "completed" => return true,
            "setup" | "active" | "device" | "pre-switchover" => {}
            _ => panic!("migration ended in {status}: {r}"),
        }
        src.drain();
        let rounds_during = rounds(&src) - rounds_before;
        // After a few rounds under migration, let it converge.
        if !raised && (rounds_during >= 3 || mig_start.elapsed() > Duration::from_secs(20)) {
            qmp.execute(
                "migrate-set-parameters",
                json!({"max-bandwidth": 1u64 << 30, "downtime-limit": 5000}),
            )
            .expect("migrate-set-parameters");
            raised = true;
            eprintln!(
                "migration_dirty_log: {rounds_during} rounds ran under migration; letting it converge"
            );
        }
        false
    });
    let migrated = mig_start.elapsed();
    // The source is paused now: every round it printed ran before the switchover. It quits,
    // and its console is read to the end.
    let _ = qmp.execute_or_disconnect("quit", json!({}));
    src.wait_exit(Duration::from_secs(60));
    let rounds_during = rounds(&src) - rounds_before;
    eprintln!("migration_dirty_log: migration completed in {migrated:.1?}");

    // On the destination: the checks of data filled on the source, then two fresh rounds.
    dst.wait_count("CACHED/SHM", 2, Duration::from_secs(40), |l| {
        ["CACHED", "SHM"].iter().any(|k| l.starts_with(k))
    });
    dst.wait_count("ROUND OK", 2, Duration::from_secs(40), |l| {
        is_marker(l, "ROUND", "OK")
    });
    dst.drain();
    assert!(
        rounds_during >= 1,
        "no guest round overlapped the migration; the test proves nothing"
    );
    let bad: Vec<_> = bad_lines(&src).into_iter().chain(bad_lines(&dst)).collect();
    assert!(
        bad.is_empty(),
        "guest saw wrong data (dirty log incomplete?): {bad:?}\nsource:\n{}\ndestination:\n{}",
        src.tail(),
        dst.tail()
    );
    eprintln!(
        "migration_dirty_log: boot {booted:.1?}, migration {migrated:.1?} ({rounds_during} rounds during it), total {:.1?}",
        started.elapsed()
    );
}
