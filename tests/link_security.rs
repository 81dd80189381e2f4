//! The replication link against unauthenticated and wrongly authenticated peers: TLS with a
//! pre-shared key or certificates replicates; a wrong key, another CA's certificate, plain TCP
//! to a TLS listener and a replayed capture of an earlier session are refused, and none of them
//! changes a byte of the secondary's disk.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use colo_blk::replication::metadata::Generations;
use colo_blk::replication::protocol::Frame;
use common::pair::{checkpoint, primary_hello, read, strs, wait_connected, Node};
use common::{pattern, Backend, Client, Qmp};

const DISK: u64 = 8 << 20;

fn secondary(dir: &Path, security: &[&str]) -> (Backend, Qmp, u16) {
    let b = Node::secondary(dir, "secondary.img", DISK, 0)
        .layers("layers")
        .qmp("secondary.qmp")
        .cluster_size("4K")
        .security(security)
        .start();
    let port = b.listen_port();
    let q = b.qmp();
    (b, q, port)
}

fn primary(dir: &Path, port: u16, name: &str, security: &[&str]) -> (Backend, Qmp) {
    let b = Node::primary(dir, &format!("{name}.img"), DISK, port)
        .socket(&format!("{name}.sock"))
        .qmp(&format!("{name}.qmp"))
        .security(security)
        .start();
    let q = b.qmp();
    (b, q)
}

fn write_some(dir: &Path, name: &str, seed: u64) {
    let mut c = Client::connect(&dir.join(format!("{name}.sock")), 1).unwrap();
    for i in 0..16u64 {
        assert_eq!(c.write(0, i * 65536, &pattern(seed + i, 65536)), 0);
    }
    assert_eq!(c.flush(0), 0);
}

fn psk_file(dir: &Path, name: &str, secret: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, secret).unwrap();
    p.display().to_string()
}

/// A CA in `dir` and, per name, a certificate and key it signed (`NAME.crt`, `NAME.key`).
fn pki(dir: &Path, ca_name: &str, names: &[&str]) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, ca_name);
    let ca = p.self_signed(&key).unwrap();
    std::fs::write(dir.join(format!("{ca_name}.pem")), ca.pem()).unwrap();
    for name in names {
        let k = rcgen::KeyPair::generate().unwrap();
        let c = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .signed_by(&k, &ca, &key)
            .unwrap();
        std::fs::write(dir.join(format!("{name}.crt")), c.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), k.serialize_pem()).unwrap();
    }
}

/// The certificate options of `name` (`dir/NAME.crt`, `NAME.key`, trusting `dir/ca.pem`)
/// expecting the peer `peer`.
fn tls(dir: &Path, name: &str, peer: &str) -> Vec<String> {
    let f = |n: String| dir.join(n).display().to_string();
    vec![
        "--tls-cert".into(),
        f(format!("{name}.crt")),
        "--tls-key".into(),
        f(format!("{name}.key")),
        "--tls-ca".into(),
        f("ca.pem".into()),
        "--tls-peer-name".into(),
        peer.into(),
    ]
}

/// The secondary's next REPLICATION_ERROR says the TLS handshake failed.
fn expect_refusal(sq: &mut Qmp) {
    let ev = sq.wait_event("REPLICATION_ERROR");
    let e = ev["data"]["error"].as_str().unwrap_or_default().to_string();
    assert!(e.contains("TLS"), "{ev}");
}

#[test]
fn psk_replicates_and_a_wrong_psk_or_plain_tcp_changes_nothing() {
    let dir = common::tempdir();
    let d = dir.path();
    let good = psk_file(d, "good.psk", "a long shared secret for the pair");
    let bad = psk_file(d, "bad.psk", "a long shared secret for another pair");
    let (_s, mut sq, port) = secondary(d, &["--tls-psk-file", &good]);

    // A primary with the wrong key: refused before any frame, nothing written.
    let (intruder, _iq) = primary(d, port, "intruder", &["--tls-psk-file", &bad]);
    write_some(d, "intruder", 100);
    expect_refusal(&mut sq);
    drop(intruder);
    // Plain TCP speaking the protocol perfectly: refused too.
    {
        let mut t = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _ = t.write_all(&primary_hello(DISK, Generations::fresh_primary()).encode());
        let _ = t.write_all(&Frame::write(1, 0, vec![0xee; 4096]).encode());
        expect_refusal(&mut sq);
    }
    assert!(
        read(&d.join("secondary.img")).iter().all(|&b| b == 0),
        "an unauthenticated peer changed the secondary's disk"
    );

    // The right key replicates.
    let (_p, mut pq) = primary(d, port, "primary", &["--tls-psk-file", &good]);
    sq.wait_event("REPLICATION_PEER_CONNECTED");
    wait_connected(&mut pq);
    write_some(d, "primary", 200);
    checkpoint(&mut pq);
    assert!(read(&d.join("secondary.img")) == read(&d.join("primary.img")));
}

#[test]
fn certificates_of_another_ca_are_refused() {
    let dir = common::tempdir();
    let d = dir.path();
    pki(d, "ca", &["primary.colo", "secondary.colo"]);
    pki(d, "other-ca", &["intruder.colo"]);
    let secondary_tls = tls(d, "secondary.colo", "primary.colo");
    let (_s, mut sq, port) = secondary(d, &strs(&secondary_tls));
    // An intruder with a certificate of another CA (it trusts ours, to get that far).
    let intruder_tls = tls(d, "intruder.colo", "secondary.colo");
    let (intruder, _iq) = primary(d, port, "intruder", &strs(&intruder_tls));
    write_some(d, "intruder", 300);
    expect_refusal(&mut sq);
    drop(intruder);
    assert!(read(&d.join("secondary.img")).iter().all(|&b| b == 0));

    let primary_tls = tls(d, "primary.colo", "secondary.colo");
    let (_p, mut pq) = primary(d, port, "primary", &strs(&primary_tls));
    sq.wait_event("REPLICATION_PEER_CONNECTED");
    wait_connected(&mut pq);
    write_some(d, "primary", 400);
    checkpoint(&mut pq);
    assert!(read(&d.join("secondary.img")) == read(&d.join("primary.img")));
}

/// A recording proxy captures a real session's bytes from the primary; replayed to the
/// secondary later, they are refused (TLS 1.3: a fresh handshake every time) and change nothing.
#[test]
fn a_replayed_capture_of_a_session_is_refused() {
    let dir = common::tempdir();
    let d = dir.path();
    let good = psk_file(d, "good.psk", "a long shared secret for the pair");
    let (s, mut sq, port) = secondary(d, &["--tls-psk-file", &good]);

    // primary → proxy → secondary, recording what the primary sends.
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_port = proxy.local_addr().unwrap().port();
    let captured = Arc::new(Mutex::new(Vec::new()));
    {
        let captured = captured.clone();
        std::thread::spawn(move || {
            let (mut from_primary, _) = proxy.accept().unwrap();
            let mut to_secondary = TcpStream::connect(("127.0.0.1", port)).unwrap();
            let mut back = to_secondary.try_clone().unwrap();
            let mut primary_w = from_primary.try_clone().unwrap();
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut back, &mut primary_w);
            });
            let mut buf = [0u8; 65536];
            while let Ok(n) = from_primary.read(&mut buf) {
                if n == 0 {
                    break;
                }
                captured.lock().unwrap().extend_from_slice(&buf[..n]);
                if to_secondary.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
    let (p, mut pq) = primary(d, proxy_port, "primary", &["--tls-psk-file", &good]);
    sq.wait_event("REPLICATION_PEER_CONNECTED");
    wait_connected(&mut pq);
    write_some(d, "primary", 500);
    checkpoint(&mut pq);
    drop(p);
    sq.wait_event("REPLICATION_PEER_LOST");
    let before = read(&d.join("secondary.img"));
    // Make the disk differ from what the capture would write, then replay it.
    let capture = captured.lock().unwrap().clone();
    assert!(
        capture.len() > 16 * 65536,
        "capture too short: {}",
        capture.len()
    );
    {
        let mut t = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _ = t.write_all(&capture);
        expect_refusal(&mut sq);
    }
    assert!(
        read(&d.join("secondary.img")) == before,
        "the replay changed the disk"
    );
    drop(s);
}
