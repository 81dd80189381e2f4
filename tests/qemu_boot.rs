//! End-to-end test with a real QEMU front-end: boots a tiny Linux guest (built by
//! `qemu-scripts/build-guest.sh`) whose /dev/vda is served by `colo-blk` over vhost-user.
//!
//! 1. The guest writes a deterministic pattern to a few places of /dev/vda with
//!    `dd oflag=direct`, reads it back with `iflag=direct`, compares, and prints
//!    `COLO-TEST: PASS` (or `FAIL`) on the serial console before powering off.
//! 2. The host checks the image file byte for byte: pattern where written, zeros elsewhere.
//! 3. A second guest boots against the same, still running backend (a new vhost-user
//!    connection) and verifies the data again.
//!
//! The pattern is generated here ([`common::pattern`]) and handed to the guest as a file in an
//! extra initramfs archive (`run-vm.sh --file`), together with the guest script (`--script`).
//!
//! Without `qemu-system-x86_64` the test is skipped loudly, unless `CI` is set: then it fails.
//! Environment: `COLO_GUEST_DIR` (use a prebuilt guest there instead of building one),
//! `COLO_BLK_QEMU_TIMEOUT` (seconds per boot, default 120), `COLO_BLK_ACCEL` (see run-vm.sh).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::needs::Needs;
use common::qemu::Proc;
use common::{guest_dir, pattern, poll, tempdir, Backend};

const IMAGE_SIZE: u64 = 64 << 20;
const NUM_QUEUES: usize = 2;
const PATTERN_SEED: u64 = 0xC010_B10C;
const PASS: &str = "COLO-TEST: PASS";
const FAIL: &str = "COLO-TEST: FAIL";

/// Where the guest writes: (disk offset, length). All 512-byte aligned, as O_DIRECT on a
/// 512-byte-sector disk requires; a mix of small, unaligned-to-4K, large and end-of-disk I/O.
const SEGMENTS: &[(u64, usize)] = &[
    (0, 4096),
    ((1 << 20) + 1536, 2560),
    (5 << 20, 64 << 10),
    ((20 << 20) + 4096, 1 << 20),
    (IMAGE_SIZE - 8192, 8192),
];

/// A region the guest never writes; it must read back as zeros.
const ZERO_PROBE: (u64, usize) = (10 << 20, 64 << 10);

fn qemu_binary() -> String {
    std::env::var("QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into())
}

/// The QEMU binary, or `None` after saying loudly why the test is skipped (CI fails instead).
fn qemu_or_skip() -> Option<String> {
    let qemu = qemu_binary();
    Needs::of("qemu_boot").tools(&[&qemu]).met().then_some(qemu)
}

fn timeout_from_env(var: &str, default_secs: u64) -> Duration {
    let secs = std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_secs);
    Duration::from_secs(secs)
}

/// Shell lines that read every segment back with O_DIRECT and compare it with the pattern.
fn verify_commands(s: &mut String) {
    for (i, (off, len, poff)) in layout().into_iter().enumerate() {
        s.push_str(&format!(
            "dd if=/dev/vda of=/tmp/got bs={len} count=1 skip={off} iflag=skip_bytes,direct \
             2>/tmp/err || {{ echo \"COLO: read seg {i} failed: $(cat /tmp/err)\"; fail=1; }}\n\
             dd if=/colo/pattern.bin of=/tmp/exp bs={len} count=1 skip={poff} \
             iflag=skip_bytes 2>/dev/null\n\
             if cmp /tmp/exp /tmp/got; then echo \"COLO: seg {i} at {off} ({len} bytes) ok\"; \
             else echo \"COLO: seg {i} at {off} MISMATCH\"; fail=1; fi\n"
        ));
    }
    let (off, len) = ZERO_PROBE;
    s.push_str(&format!(
        "dd if=/dev/vda of=/tmp/got bs={len} count=1 skip={off} iflag=skip_bytes,direct \
         2>/dev/null\n\
         head -c {len} /dev/zero >/tmp/exp\n\
         if cmp /tmp/exp /tmp/got; then echo \"COLO: zero probe ok\"; \
         else echo \"COLO: zero probe at {off} MISMATCH\"; fail=1; fi\n"
    ));
}

/// (disk offset, length, offset in pattern.bin) for each segment.
fn layout() -> Vec<(u64, usize, usize)> {
    let mut poff = 0;
    SEGMENTS
        .iter()
        .map(|&(off, len)| {
            let r = (off, len, poff);
            poff += len;
            r
        })
        .collect()
}

fn pattern_bytes() -> Vec<u8> {
    pattern(PATTERN_SEED, SEGMENTS.iter().map(|s| s.1).sum())
}

fn script_header() -> String {
    format!(
        "fail=0\n\
         sectors=$(cat /sys/block/vda/size 2>/dev/null)\n\
         echo \"COLO: /dev/vda has $sectors sectors\"\n\
         [ \"$sectors\" = {sectors} ] || {{ echo \"COLO: expected {sectors} sectors\"; fail=1; }}\n\
         nq=$(ls /sys/block/vda/mq | wc -l)\n\
         echo \"COLO: $nq hardware queues, $(nproc) cpus\"\n\
         [ \"$nq\" = {NUM_QUEUES} ] || {{ echo \"COLO: expected {NUM_QUEUES} queues\"; fail=1; }}\n",
        sectors = IMAGE_SIZE / 512
    )
}

fn script_footer() -> String {
    format!("if [ $fail = 0 ]; then echo \"{PASS}\"; else echo \"{FAIL}\"; fi\n")
}

/// Boot 1: write the segments (alternating CPUs, so both queues carry requests), read back.
fn write_script() -> String {
    let mut s = script_header();
    for (i, (off, len, poff)) in layout().into_iter().enumerate() {
        let cpu_mask = 1 << (i % NUM_QUEUES);
        s.push_str(&format!(
            "taskset {cpu_mask} dd if=/colo/pattern.bin of=/dev/vda bs={len} count=1 \
             skip={poff} seek={off} iflag=skip_bytes oflag=seek_bytes,direct conv=fsync \
             2>/tmp/err || {{ echo \"COLO: write seg {i} failed: $(cat /tmp/err)\"; fail=1; }}\n"
        ));
    }
    verify_commands(&mut s);
    // Both queues must have carried requests: each has its own MSI-X vector, named
    // virtioN-req.Q in /proc/interrupts; count its interrupts over all CPUs.
    s.push_str(&format!(
        "awk '/virtio[0-9]+-req\\./ {{ n = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) \
         n += $i; print $NF, n }}' /proc/interrupts >/tmp/irqs\n\
         for q in $(seq 0 {last}); do \
         n=$(awk -v q=req.$q 'substr($1, length($1) - length(q) + 1) == q {{ print $2 }}' /tmp/irqs); \
         echo \"COLO: queue $q completed with ${{n:-no}} interrupts\"; \
         [ \"${{n:-0}}\" -gt 0 ] || {{ echo \"COLO: queue $q unused\"; fail=1; }}; done\n",
        last = NUM_QUEUES - 1
    ));
    s.push_str(&script_footer());
    s
}

/// Boot 2: only verify.
fn verify_script() -> String {
    let mut s = script_header();
    verify_commands(&mut s);
    s.push_str(&script_footer());
    s
}

/// Boots the guest on `socket` running `script`, until QEMU exits; returns the finished
/// process (its output and status) and how long it ran.
fn boot(guest: &Path, socket: &Path, script: &Path, pattern_file: &Path) -> (Proc, Duration) {
    let mut cmd = Command::new("bash");
    cmd.arg(common::repo().join("qemu-scripts/run-vm.sh"))
        .arg("--guest")
        .arg(guest)
        .arg("--socket")
        .arg(socket)
        .arg("--num-queues")
        .arg(NUM_QUEUES.to_string())
        .arg("--smp")
        .arg(NUM_QUEUES.to_string())
        .arg("--script")
        .arg(script)
        .arg("--file")
        .arg(pattern_file);
    let started = Instant::now();
    let mut vm = Proc::spawn(cmd, "guest");
    vm.wait_exit(timeout_from_env("COLO_BLK_QEMU_TIMEOUT", 120));
    let elapsed = started.elapsed();
    eprintln!("qemu_boot: QEMU ran for {elapsed:.1?}");
    (vm, elapsed)
}

fn assert_passed(what: &str, run: &Proc) {
    assert!(
        run.has_line(PASS) && !run.has_line(FAIL),
        "{what}: the guest did not report {PASS:?}. Last output:\n{}",
        run.tail()
    );
    let status = run.exited.expect("QEMU exited");
    assert!(
        status.success(),
        "{what}: QEMU exited with {status}. Last output:\n{}",
        run.tail()
    );
}

/// The image must hold the pattern exactly where the guest wrote it, and zeros elsewhere.
fn check_image(image: &Path, pat: &[u8]) {
    let data = std::fs::read(image).expect("read image");
    assert_eq!(data.len() as u64, IMAGE_SIZE, "image size");
    let mut expected = vec![0u8; IMAGE_SIZE as usize];
    for (off, len, poff) in layout() {
        expected[off as usize..off as usize + len].copy_from_slice(&pat[poff..poff + len]);
    }
    if data == expected {
        return;
    }
    if let Some(pos) = data.iter().zip(&expected).position(|(a, b)| a != b) {
        panic!(
            "image differs from the expected pattern at byte {pos}: {:#04x} != {:#04x}",
            data[pos], expected[pos]
        );
    }
}

#[test]
fn qemu_guest_writes_and_reads_back_across_reconnect() {
    if qemu_or_skip().is_none() {
        return;
    }

    let guest = guest_dir();
    let dir = tempdir();
    let socket = dir.path().join("vhost.sock");
    let image = dir.path().join("disk.img");
    let pattern_file = dir.path().join("pattern.bin");
    let write_sh = dir.path().join("write.sh");
    let verify_sh = dir.path().join("verify.sh");
    let pat = pattern_bytes();
    std::fs::write(&pattern_file, &pat).unwrap();
    std::fs::write(&write_sh, write_script()).unwrap();
    std::fs::write(&verify_sh, verify_script()).unwrap();

    let qmp = dir.path().join("b.qmp");
    let queues = NUM_QUEUES.to_string();
    let extra = [
        "--size",
        "64M",
        "--num-queues",
        &queues,
        "--qmp",
        qmp.to_str().unwrap(),
    ];
    let mut backend = Backend::start(&socket, &image, &extra);

    // Boot 1: write and read back.
    let (run1, boot1) = boot(&guest, &socket, &write_sh, &pattern_file);
    assert_passed("first boot (write)", &run1);
    // The backend notices QEMU left and is ready for the next front-end.
    backend.wait_front_end_disconnects(1);
    check_image(&image, &pat);

    // Boot 2: a new connection to the same backend process sees the same data.
    let (run2, boot2) = boot(&guest, &socket, &verify_sh, &pattern_file);
    assert_passed("second boot (verify after reconnect)", &run2);
    backend.wait_front_end_disconnects(2);
    check_image(&image, &pat);

    assert!(
        backend.child.try_wait().expect("try_wait").is_none(),
        "colo-blk exited"
    );
    let st = backend.terminate();
    assert!(st.success(), "colo-blk exited with {st} on SIGTERM");
    eprintln!("qemu_boot: boot 1 {boot1:.1?}, boot 2 {boot2:.1?}");
}

/// Guest RAM that QEMU does not share with the backend gets one clear error naming
/// `memory-backend-memfd,share=on`, in the backend's log and in QMP `query-stats`
/// (`front-end-error`): a memfd with `share=off` (QEMU sends it but maps it privately: the
/// guest's first request is never seen) and RAM without a memory backend (QEMU sends no memory
/// at all; the connection fails at SET_VRING_ADDR). With `share=on` there is none. No guest
/// kernel is needed: SeaBIOS's virtio-blk driver kicks the queue while it looks for a boot disk.
#[test]
fn guest_ram_that_is_not_shared_is_one_clear_error() {
    let Some(qemu) = qemu_or_skip() else {
        return;
    };
    let memfd = |share: &str| {
        vec![
            "-object".to_string(),
            format!("memory-backend-memfd,id=mem,size=128M,share={share}"),
            "-machine".to_string(),
            "memory-backend=mem".to_string(),
        ]
    };
    let cases = [
        (
            "share=off",
            memfd("off"),
            Some("the front-end's guest RAM is not shared"),
        ),
        (
            "no memory backend",
            vec![],
            Some("the front-end shared no guest memory"),
        ),
        ("share=on", memfd("on"), None),
    ];
    for (case, memory, expected) in cases {
        let dir = tempdir();
        let (socket, qmp) = (dir.path().join("vhost.sock"), dir.path().join("b.qmp"));
        let qmp_arg = qmp.display().to_string();
        let backend = Backend::start(
            &socket,
            &dir.path().join("disk.img"),
            &["--size", "16M", "--qmp", &qmp_arg],
        );
        let mut cmd = Command::new(&qemu);
        cmd.args(["-machine", "q35,accel=tcg", "-m", "128M", "-nodefaults"])
            .args(["-display", "none", "-no-reboot"])
            .args(&memory)
            .arg("-chardev")
            .arg(format!("socket,id=vub,path={}", socket.display()))
            .args(["-device", "vhost-user-blk-pci,chardev=vub,num-queues=1"]);
        let mut vm = Proc::spawn(cmd, case);
        let mut q = common::Qmp::connect(&qmp);
        // The error, or (share=on) SeaBIOS's first reads completing.
        let what = format!("{case}: an error or a completed request in query-stats");
        let stats = poll::value(&what, common::STARTUP_TIMEOUT, || {
            let s = q.execute("query-stats", serde_json::json!({})).unwrap();
            let error = s["front-end-error"].as_str();
            let seen = match expected {
                Some(message) => error.is_some_and(|e| e.contains(message)),
                None => s["queues"][0]["requests"].as_u64() > Some(0),
            };
            seen.then_some(s)
        });
        let error = stats.get("front-end-error").and_then(|e| e.as_str());
        match expected {
            Some(_) => assert!(
                error.is_some_and(|e| e.contains("memory-backend-memfd,id=mem,size=RAM,share=on")),
                "{case}: {stats}"
            ),
            None => assert_eq!(error, None, "{case}: {stats}"),
        }
        // The same error in the backend's log, at level ERROR (read after the process ended).
        if let Some(message) = expected {
            vm.kill();
            let (_, log) = backend.terminate_with_log();
            assert!(
                log.iter().any(|l| l.contains("ERROR")
                    && l.contains(message)
                    && l.contains("memory-backend-memfd,id=mem")),
                "{case}: {log:?}"
            );
        }
    }
}
