//! The standalone backend, started as a real process and driven through a real vhost-user-blk
//! client (libblkio's pure-Rust `blkio` crate).

mod common;

use std::io::Read;

use common::pair::Node;
use common::{pattern, Backend, Client};

const MIB: u64 = 1 << 20;

fn setup(size: &str, extra: &[&str]) -> (tempfile::TempDir, Backend) {
    let dir = common::tempdir();
    let sock = dir.path().join("vhost.sock");
    let img = dir.path().join("disk.img");
    let mut args = vec!["--size", size];
    args.extend_from_slice(extra);
    let b = Backend::start(&sock, &img, &args);
    (dir, b)
}

fn image_bytes(dir: &tempfile::TempDir) -> Vec<u8> {
    let mut v = Vec::new();
    std::fs::File::open(dir.path().join("disk.img"))
        .unwrap()
        .read_to_end(&mut v)
        .unwrap();
    v
}

/// Writes of many sizes at many offsets, on every queue, read back equal through every queue
/// and equal in the image file after a flush.
fn random_writes_read_back(extra: &[&str]) {
    let (dir, b) = setup("64M", extra);
    let mut c = Client::connect(&b.socket, 4).expect("connect");
    assert_eq!(c.capacity(), 64 * MIB);
    let mut model = vec![0u8; (64 * MIB) as usize];
    let sizes = [
        512usize,
        1024,
        4096,
        4608,
        65536,
        131072 + 512,
        1 << 20,
        4 << 20,
    ];
    let mut rng = 0x1234_5678_u64;
    for i in 0..200u64 {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let len = sizes[(rng >> 33) as usize % sizes.len()];
        let max_sector = (64 * MIB as usize - len) / 512;
        let off = ((rng >> 7) as usize % max_sector) * 512;
        let data = pattern(i, len);
        let q = (i % 4) as usize;
        assert_eq!(c.write(q, off as u64, &data), 0, "write {i} at {off}+{len}");
        model[off..off + len].copy_from_slice(&data);
        // Read back through another queue.
        let back = c.read((q + 1) % 4, off as u64, len).expect("read");
        assert!(
            back == data,
            "read-back mismatch for write {i} at {off}+{len}"
        );
    }
    for q in 0..4 {
        assert_eq!(c.flush(q), 0);
    }
    // The whole disk, through the device and in the file.
    for chunk in 0..16u64 {
        let back = c
            .read((chunk % 4) as usize, chunk * 4 * MIB, (4 * MIB) as usize)
            .unwrap();
        let m = &model[(chunk * 4 * MIB) as usize..((chunk + 1) * 4 * MIB) as usize];
        assert!(
            back == m,
            "device content differs from the model in chunk {chunk}"
        );
    }
    assert!(
        image_bytes(&dir) == model,
        "image file differs from the model"
    );
}

#[test]
fn random_writes_on_every_queue_read_back_equal() {
    random_writes_read_back(&["--num-queues", "4"]);
}

#[test]
fn random_writes_with_o_direct() {
    random_writes_read_back(&["--num-queues", "4", "--direct"]);
}

#[test]
fn discard_and_write_zeroes_read_back_as_zeros() {
    let (dir, b) = setup("16M", &[]);
    let mut c = Client::connect(&b.socket, 1).unwrap();
    let data = pattern(7, (4 * MIB) as usize);
    assert_eq!(c.write(0, 0, &data), 0);
    assert_eq!(c.write_zeroes(0, 4096, 8192, false), 0);
    assert_eq!(c.write_zeroes(0, 65536, 65536, true), 0);
    assert_eq!(c.discard(0, MIB, MIB), 0);
    assert_eq!(c.flush(0), 0);
    let mut expect = data.clone();
    expect[4096..12288].fill(0);
    expect[65536..131072].fill(0);
    expect[MIB as usize..2 * MIB as usize].fill(0);
    assert!(c.read(0, 0, (4 * MIB) as usize).unwrap() == expect);
    assert!(image_bytes(&dir)[..(4 * MIB) as usize] == expect[..]);
}

#[test]
fn reads_and_writes_past_the_end_fail_and_the_device_keeps_working() {
    let (_dir, b) = setup("1M", &[]);
    let mut c = Client::connect(&b.socket, 1).unwrap();
    assert_ne!(
        c.read(0, MIB - 512, 1024).map(|_| 0).unwrap_or_else(|e| e),
        0
    );
    assert_ne!(c.write(0, MIB, &[1u8; 512]), 0);
    assert_ne!(c.write_zeroes(0, MIB - 512, 4096, false), 0);
    // Still serving.
    assert_eq!(c.write(0, MIB - 512, &[9u8; 512]), 0);
    assert_eq!(c.read(0, MIB - 512, 512).unwrap(), vec![9u8; 512]);
}

#[test]
fn read_only_export_refuses_writes() {
    let dir = common::tempdir();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, pattern(3, MIB as usize)).unwrap();
    let sock = dir.path().join("vhost.sock");
    let b = Backend::start(&sock, &img, &["--read-only"]);
    // The device advertises VIRTIO_BLK_F_RO: a read-write client is refused at connect time.
    assert!(Client::connect(&b.socket, 1).is_err());
    let mut c = Client::connect_with(&b.socket, 1, true).unwrap();
    assert_ne!(c.write(0, 0, &[0u8; 4096]), 0);
    assert_eq!(
        c.read(0, 0, 4096).unwrap(),
        pattern(3, MIB as usize)[..4096].to_vec()
    );
    assert_eq!(image_bytes(&dir), pattern(3, MIB as usize));
}

#[test]
fn data_survives_three_reconnects() {
    let (dir, b) = setup("8M", &["--num-queues", "2"]);
    for round in 0..3u64 {
        let mut c = Client::connect(&b.socket, 2).expect("reconnect");
        if round > 0 {
            let prev = c.read(1, (round - 1) * MIB, MIB as usize).unwrap();
            assert!(
                prev == pattern(round - 1, MIB as usize),
                "round {round}: earlier data lost"
            );
        }
        assert_eq!(
            c.write(
                (round % 2) as usize,
                round * MIB,
                &pattern(round, MIB as usize)
            ),
            0
        );
        drop(c);
    }
    let img = image_bytes(&dir);
    for round in 0..3u64 {
        let r = (round * MIB) as usize..((round + 1) * MIB) as usize;
        assert!(img[r] == pattern(round, MIB as usize)[..]);
    }
}

#[test]
fn sigterm_syncs_and_exits_zero() {
    let (dir, b) = setup("4M", &[]);
    let mut c = Client::connect(&b.socket, 1).unwrap();
    assert_eq!(c.write(0, 8192, &pattern(5, 65536)), 0);
    let status = b.terminate();
    assert!(status.success(), "exit status {status:?}");
    drop(c);
    assert!(image_bytes(&dir)[8192..8192 + 65536] == pattern(5, 65536)[..]);
}

#[test]
fn sigterm_without_a_client_exits_zero() {
    let (_dir, b) = setup("4M", &[]);
    assert!(b.terminate().success());
}

/// SIGTERM stops the process whatever became of its socket path: removed, or replaced by
/// another file (it used to wake its accept() by connecting to the path, and waited forever
/// when that failed). Exit 0, and what the client wrote is in the image.
#[test]
fn sigterm_stops_when_the_socket_path_is_gone_or_replaced() {
    for replaced in [false, true] {
        let dir = common::tempdir();
        let (sock, img) = (dir.path().join("vhost.sock"), dir.path().join("disk.img"));
        let qmp = dir.path().join("qmp.sock");
        let extra = ["--size", "4M", "--qmp", qmp.to_str().unwrap()];
        let b = Backend::start(&sock, &img, &extra);
        let mut c = Client::connect(&b.socket, 1).unwrap();
        assert_eq!(c.write(0, 8192, &pattern(6, 65536)), 0);
        drop(c);
        // Done with the client: the server waits in accept() for the next front-end.
        b.wait_front_end_disconnects(1);
        std::fs::remove_file(&b.socket).unwrap();
        if replaced {
            std::fs::write(&b.socket, b"not a socket").unwrap();
        }
        let status = b.terminate();
        assert!(
            status.success(),
            "replaced {replaced}: exit status {status:?}"
        );
        assert!(image_bytes(&dir)[8192..8192 + 65536] == pattern(6, 65536)[..]);
    }
}

/// `--size` on an existing image must be its size, in every role: another size is an error
/// naming both (it used to be ignored in silence); the same size starts as before.
#[test]
fn a_size_that_disagrees_with_the_image_is_an_error_naming_both() {
    let dir = common::tempdir();
    let d = dir.path();
    let img = d.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    let node = |role: &str, size: u64| match role {
        "standalone" => Node::standalone(d, "disk.img", size).socket("vhost.sock"),
        "primary" => Node::primary(d, "disk.img", size, 9).socket("vhost.sock"),
        _ => Node::secondary(d, "disk.img", size, 0).layers("layers"),
    };
    for role in ["standalone", "primary", "secondary"] {
        let err = node(role, 8 * MIB).start_fails();
        assert!(
            err.contains("--size 8.0 MiB (8388608 bytes)")
                && err.contains("which is 4.0 MiB (4194304 bytes)"),
            "{role}: {err}"
        );
        assert_eq!(std::fs::metadata(&img).unwrap().len(), 4 * MIB);
        // The size it has, given again (as scripts restarting a backend do), starts.
        let b = node(role, 4 * MIB).start();
        assert!(b.terminate().success(), "{role}");
    }
}

#[test]
fn bad_command_line_is_a_one_line_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_colo-blk"))
        .args([
            "--socket",
            "/nonexistent/x.sock",
            "--image",
            "/tmp/x.img",
            "--num-queues",
            "0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("number of queues"), "{err}");
}

/// QMP `query-stats` counts what a client did, per queue.
#[test]
fn query_stats_counts_requests_and_bytes_per_queue() {
    let dir = common::tempdir();
    let b = Node::standalone(dir.path(), "disk.img", 8 * MIB)
        .socket("vhost.sock")
        .queues(2)
        .qmp("s.qmp")
        .start();
    let mut c = Client::connect(&b.socket, 2).expect("connect");
    for i in 0..10u64 {
        assert_eq!(c.write(0, i * 4096, &pattern(i, 4096)), 0);
    }
    for i in 0..3u64 {
        assert_eq!(c.read(1, i * 4096, 8192).unwrap(), {
            let mut v = pattern(i, 4096);
            v.extend(pattern(i + 1, 4096));
            v
        });
    }
    let stats = b.stats();
    let queues = stats["queues"].as_array().unwrap();
    assert_eq!(queues.len(), 2);
    assert_eq!(queues[0]["requests"], 10);
    assert_eq!(queues[0]["bytes-written"], 10 * 4096);
    assert_eq!(queues[0]["bytes-read"], 0);
    assert_eq!(queues[1]["requests"], 3);
    assert_eq!(queues[1]["bytes-read"], 3 * 8192);
    assert_eq!(queues[1]["errors"], 0);
}

/// The QMP socket is owner-only unless `--qmp-mode` says otherwise.
#[test]
fn the_qmp_socket_is_owner_only_by_default() {
    use std::os::unix::fs::PermissionsExt;
    for (extra, want) in [(None, 0o600), (Some("660"), 0o660)] {
        let dir = common::tempdir();
        let qmp = dir.path().join("s.qmp");
        let qmp_s = qmp.display().to_string();
        let mut args = vec!["--size", "1M", "--qmp", &qmp_s];
        if let Some(m) = extra {
            args.extend_from_slice(&["--qmp-mode", m]);
        }
        let _b = Backend::start(
            &dir.path().join("vhost.sock"),
            &dir.path().join("disk.img"),
            &args,
        );
        let mode = std::fs::metadata(&qmp).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, want, "{extra:?}");
        common::Qmp::connect(&qmp);
    }
}

/// `--socket-mode` and `--socket-group` (as a QEMU of another user, libvirt's, needs them)
/// and `--qmp-group` give the sockets their mode and group; the vhost-user socket still serves
/// and is removed at exit.
#[test]
fn the_socket_mode_and_group_options_set_them() {
    use std::os::unix::fs::MetadataExt;
    // Root may give any group; others only their own.
    // SAFETY: geteuid(2) and getegid(2) have no preconditions.
    let gid = if unsafe { libc::geteuid() } == 0 {
        54321
    } else {
        // SAFETY: as above.
        unsafe { libc::getegid() }
    };
    let dir = common::tempdir();
    let node = || Node::standalone(dir.path(), "disk.img", MIB).socket("vhost.sock");
    let p = |n: &str| dir.path().join(n).display().to_string();
    let (sock, qmp, g) = (p("vhost.sock"), p("s.qmp"), gid.to_string());
    for (extra, want) in [
        (vec!["--socket-group", &g], 0o660),
        (vec!["--socket-mode", "666", "--socket-group", &g], 0o666),
    ] {
        let b = node()
            .qmp("s.qmp")
            .args(&["--qmp-mode", "660", "--qmp-group", &g])
            .args(&extra)
            .start();
        for (path, mode) in [(&sock, want), (&qmp, 0o660)] {
            let md = std::fs::metadata(path).unwrap();
            assert_eq!(
                (md.mode() & 0o777, md.gid()),
                (mode, gid),
                "{path} {extra:?}"
            );
        }
        let mut c = Client::connect(&b.socket, 1).unwrap();
        assert_eq!(c.write(0, 0, &pattern(1, 4096)), 0);
        drop(c);
        assert!(b.terminate().success());
        assert!(!std::path::Path::new(&sock).exists(), "socket left behind");
    }
    let err = node()
        .args(&["--socket-group", "no-such-group-colo"])
        .start_fails();
    assert!(
        err.contains("--socket-group: no group named 'no-such-group-colo'"),
        "{err}"
    );
}

/// A client's first write right after it mapped its buffer (ADD_MEM_REG, acknowledged) must
/// find that memory: the request runs on the memory map as it is when it is executed, not on
/// one loaded before the region was added. Standalone and a secondary serving an SVM, 40
/// connections each (failed within ~15 before the fix).
#[test]
fn the_first_write_after_mapping_a_buffer_sees_it() {
    for role in ["standalone", "secondary"] {
        for i in 0..40 {
            let dir = common::tempdir();
            let d = dir.path();
            let node = match role {
                "standalone" => Node::standalone(d, "disk.img", 32 * MIB),
                _ => Node::secondary(d, "disk.img", 32 * MIB, 0).layers("layers"),
            };
            let b = node.socket("vhost.sock").start();
            let mut c = Client::connect(&b.socket, 1).unwrap();
            assert_eq!(
                c.write(0, 2000 * 4096, &pattern(i, 4096)),
                0,
                "{role}: connection {i}"
            );
        }
    }
}
