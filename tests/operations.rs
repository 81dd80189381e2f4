//! Operating colo-blk: the Prometheus endpoint (`--metrics`), `colo-blk status`, and systemd's
//! readiness protocol, against the real binary.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::pair::Node;
use common::{pattern, poll, Backend, Client, Qmp, STARTUP_TIMEOUT};
use serde_json::{json, Value};

/// `GET path` over plain TCP; returns the status line and the body.
fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.lines().next().unwrap_or_default().to_string();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("Content-Length")
        .parse()
        .unwrap();
    assert_eq!(body.len(), len, "Content-Length matches the body");
    (status, body.to_string())
}

/// The value of the sample `name{labels}` (exact match of the part before the value).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {series} in\n{text}"))
        .parse()
        .unwrap()
}

fn scrape(addr: &str) -> String {
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    body
}

#[test]
fn metrics_follow_a_clients_writes_and_reads() {
    let dir = common::tempdir();
    let b = Node::standalone(dir.path(), "disk.img", 8 << 20)
        .socket("vhost.sock")
        .queues(2)
        .qmp("s.qmp")
        .args(&["--metrics", "127.0.0.1:0"])
        .start();
    let addr = b.ready["metrics"]
        .as_str()
        .expect("metrics address in the ready line");
    let addr = addr.to_string();
    let q0 = "colo_blk_queue_requests_total{queue=\"0\"}";
    let before = scrape(&addr);
    assert_eq!(sample(&before, q0), 0.0);
    assert!(before.contains("colo_blk_info{role=\"standalone\""));

    let mut c = Client::connect(&b.socket, 2).expect("connect");
    for i in 0..10u64 {
        assert_eq!(c.write(0, i * 4096, &pattern(i, 4096)), 0);
    }
    let mid = scrape(&addr);
    assert_eq!(sample(&mid, q0), 10.0);
    assert_eq!(
        sample(&mid, "colo_blk_queue_written_bytes_total{queue=\"0\"}"),
        40960.0
    );
    assert_eq!(
        sample(
            &mid,
            "colo_blk_queue_request_duration_seconds_count{queue=\"0\"}"
        ),
        10.0
    );
    assert_eq!(
        sample(
            &mid,
            "colo_blk_queue_request_duration_seconds_bucket{queue=\"0\",le=\"+Inf\"}"
        ),
        10.0
    );
    assert!(
        sample(
            &mid,
            "colo_blk_queue_request_duration_seconds_sum{queue=\"0\"}"
        ) > 0.0
    );
    for i in 0..3u64 {
        c.read(1, i * 4096, 8192).unwrap();
    }
    let after = scrape(&addr);
    assert_eq!(
        sample(&after, "colo_blk_queue_requests_total{queue=\"1\"}"),
        3.0
    );
    assert_eq!(
        sample(&after, "colo_blk_queue_read_bytes_total{queue=\"1\"}"),
        3.0 * 8192.0
    );
    assert_eq!(sample(&after, q0), 10.0);

    // QMP query-stats carries the same histogram.
    let mut q = b.qmp();
    let stats = q.execute("query-stats", json!({})).unwrap();
    assert_eq!(stats["queues"][0]["requests"], 10);
    assert_eq!(stats["queues"][0]["latency"]["count"], 10);
    assert_eq!(stats["queues"][1]["latency"]["count"], 3);
    assert!(stats.get("replication").is_none());

    // Anything else is not found; a non-GET is refused.
    assert_eq!(http_get(&addr, "/").0, "HTTP/1.1 404 Not Found");
    let mut s = TcpStream::connect(&addr).unwrap();
    write!(s, "POST /metrics HTTP/1.1\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 405"), "{resp}");
}

fn start_pair(dir: &Path) -> (Backend, Backend) {
    let metrics = ["--metrics", "127.0.0.1:0"];
    let secondary = Node::secondary(dir, "s.img", 16 << 20, 0)
        .layers("layers")
        .qmp("s.qmp")
        .cluster_size("4K")
        .args(&metrics)
        .start();
    let primary = Node::primary(dir, "p.img", 16 << 20, secondary.listen_port())
        .socket("p.sock")
        .qmp("p.qmp")
        .args(&metrics)
        .start();
    (primary, secondary)
}

/// `colo-blk status ARGS`: exit code and stdout.
fn status(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_colo-blk"))
        .arg("status")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run colo-blk status");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!(
        "[status {args:?}] {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), stdout)
}

#[test]
fn status_and_metrics_of_a_pair() {
    let dir = common::tempdir();
    let (primary, secondary) = start_pair(dir.path());
    let p_qmp = dir.path().join("p.qmp");
    let s_qmp = dir.path().join("s.qmp");
    let mut pq = Qmp::connect(&p_qmp);
    poll::until("the primary in sync", STARTUP_TIMEOUT, || {
        let st = pq.execute("query-replication", json!({})).unwrap();
        st["state"] == "connected" && st["unprotected-since"].is_null()
    });
    let st = pq.execute("query-replication", json!({})).unwrap();
    assert_eq!(st["sessions"], 1);
    assert_eq!(st["checkpoints"], 0);
    assert!(st["last-checkpoint-at"].is_null());

    // 64 KiB of writes, acknowledged, then a checkpoint.
    let mut c = Client::connect(&primary.socket, 1).expect("connect");
    for i in 0..16u64 {
        assert_eq!(c.write(0, i * 4096, &pattern(i, 4096)), 0);
    }
    let epoch = pq.execute("replication-checkpoint", json!({})).unwrap();
    assert_eq!(epoch["epoch"], 1);
    let st = pq.execute("query-replication", json!({})).unwrap();
    assert_eq!(st["checkpoints"], 1);
    assert!(st["last-checkpoint-at"].as_f64().unwrap() > 1.0e9);
    assert_eq!(st["bytes-acked-total"], st["bytes-sent-total"]);

    let p_m = primary.ready["metrics"].as_str().unwrap().to_string();
    let text = scrape(&p_m);
    assert_eq!(sample(&text, "colo_blk_replication_connected"), 1.0);
    assert_eq!(sample(&text, "colo_blk_replication_protected"), 1.0);
    assert_eq!(sample(&text, "colo_blk_replication_checkpoints_total"), 1.0);
    assert_eq!(sample(&text, "colo_blk_replication_epoch"), 1.0);
    assert_eq!(
        sample(
            &text,
            "colo_blk_replication_checkpoint_duration_seconds_count"
        ),
        1.0
    );
    let sent = sample(&text, "colo_blk_replication_sent_bytes_total");
    // 16 frames of 4 KiB data plus headers, and the checkpoint frame.
    assert!(sent > 16.0 * 4096.0, "{sent}");
    assert_eq!(
        sample(&text, "colo_blk_replication_acked_bytes_total"),
        sent
    );
    assert_eq!(sample(&text, "colo_blk_replication_in_flight_bytes"), 0.0);
    assert_eq!(
        sample(&text, "colo_blk_queue_written_bytes_total{queue=\"0\"}"),
        65536.0
    );
    let s_m = secondary.ready["metrics"].as_str().unwrap().to_string();
    let text = scrape(&s_m);
    assert_eq!(
        sample(&text, "colo_blk_replication_received_bytes_total"),
        65536.0
    );
    assert_eq!(sample(&text, "colo_blk_replication_checkpoints_total"), 1.0);
    assert_eq!(sample(&text, "colo_blk_layer_bytes{layer=\"hidden\"}"), 0.0);
    assert_eq!(sample(&text, "colo_blk_replication_failovers_total"), 0.0);

    // status --json: both sides, derived fields.
    let p_s = p_qmp.display().to_string();
    let s_s = s_qmp.display().to_string();
    let (code, out) = status(&["--json", &p_s, &s_s]);
    assert_eq!(code, 0);
    let doc: Value = serde_json::from_str(out.trim()).unwrap();
    let disks = doc["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2);
    assert_eq!(disks[0]["role"], "primary");
    assert_eq!(disks[0]["summary"], "in-sync");
    assert_eq!(disks[0]["replication"]["epoch"], 1);
    assert!(disks[0]["last-checkpoint-age-seconds"].as_f64().unwrap() >= 0.0);
    assert_eq!(disks[0]["stats"]["queues"][0]["bytes-written"], 65536);
    assert_eq!(disks[1]["role"], "secondary");
    assert_eq!(disks[1]["summary"], "receiving");
    assert_eq!(disks[1]["replication"]["checkpoints"], 1);

    // The text screen (stdout is a pipe: plain lines).
    let (code, out) = status(&[&p_s, &s_s]);
    assert_eq!(code, 0);
    assert!(out.contains("role:primary epoch:1"), "{out}");
    assert!(out.contains("disk: in sync (protected)"), "{out}");
    assert!(out.contains("window: 0.0%"), "{out}");
    assert!(out.contains("role:secondary epoch:1"), "{out}");
    assert!(out.contains("layers: hidden 0 B, active 0 B"), "{out}");

    // The secondary goes away: the primary is unprotected, and says since when.
    secondary.terminate();
    poll::until("the primary unprotected", STARTUP_TIMEOUT, || {
        let st = pq.execute("query-replication", json!({})).unwrap();
        st["state"] != "connected" && st["unprotected-since"].as_f64().is_some()
    });
    let (code, out) = status(&[&p_s, &s_s]);
    assert_eq!(code, 1, "one socket is gone");
    assert!(out.contains("disk: UNPROTECTED since "), "{out}");
    assert!(out.contains("s.qmp: unreachable"), "{out}");
    let text = scrape(&p_m);
    assert_eq!(sample(&text, "colo_blk_replication_protected"), 0.0);
    assert!(sample(&text, "colo_blk_replication_unprotected_since_seconds") > 1.0e9);
    assert!(sample(&text, "colo_blk_replication_link_errors_total") >= 1.0);

    // --watch=SECS with plain output refreshes (stopped by the test after two screens).
    let mut child = Command::new(env!("CARGO_BIN_EXE_colo-blk"))
        .args(["status", "--watch=0.2", &p_s])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while seen.matches("role:primary").count() < 2 {
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "status --watch ended: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn status_without_a_socket_is_a_usage_error() {
    let (code, _) = status(&[]);
    assert_eq!(code, 2);
    // The serving invocation still needs --image.
    let out = Command::new(env!("CARGO_BIN_EXE_colo-blk"))
        .args(["--socket", "/tmp/x.sock"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--image"));
}

/// `Type=notify`: READY=1 arrives once the vhost-user and QMP sockets accept connections,
/// STOPPING=1 when the process shuts down.
#[test]
fn systemd_notify_ready_when_the_sockets_are_up() {
    let dir = common::tempdir();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(common::STARTUP_TIMEOUT))
        .unwrap();
    let sock = dir.path().join("vhost.sock");
    let qmp = dir.path().join("s.qmp");
    let node = Node::standalone(dir.path(), "disk.img", 1 << 20)
        .socket("vhost.sock")
        .qmp("s.qmp");
    let mut child = Command::new(env!("CARGO_BIN_EXE_colo-blk"))
        .args(node.command_line())
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = notify
        .recv(&mut buf)
        .expect("READY=1 within the startup timeout");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg:?}");
    // At that moment both sockets accept connections.
    UnixStream::connect(&sock).expect("vhost-user socket connectable at READY=1");
    UnixStream::connect(&qmp).expect("QMP socket connectable at READY=1");
    // SAFETY: kill(2) with the pid of our child; no memory involved.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let n = notify.recv(&mut buf).expect("STOPPING=1");
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(child.wait().unwrap().success());
}

/// "Address already in use" names the option and the address (it used to be the bare OS error).
#[test]
fn an_address_in_use_names_the_option_and_the_address() {
    let dir = common::tempdir();
    let d = dir.path();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let secondary = Node::secondary(d, "disk.img", 1 << 20, addr.port()).layers("layers");
    // One image each: the failed secondary leaves its replication metadata, which keeps a
    // standalone process off that image.
    let metrics = Node::standalone(d, "disk2.img", 1 << 20)
        .socket("vhost.sock")
        .args(&["--metrics", &addr.to_string()]);
    for (option, node) in [("--listen", secondary), ("--metrics", metrics)] {
        let err = node.start_fails();
        assert!(
            err.contains(&format!("cannot listen on {option} {addr}: "))
                && err.contains("Address already in use"),
            "{option}: {err}"
        );
    }
}
