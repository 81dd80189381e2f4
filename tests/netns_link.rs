//! The replication link between two "hosts": the primary and the secondary each run in their
//! own network namespace, joined by a veth pair, and the link is made to misbehave.
//!
//! ```text
//!   root namespace: this test (vhost-user client, QMP clients, images, layer dirs: the unix
//!                   sockets and files are on the shared filesystem)
//!   ┌ netns <tag>-p ─────────────────┐  veth  ┌ netns <tag>-s ─────────────────────────────┐
//!   │ colo-blk --role primary        │        │ colo-blk --role secondary                  │
//!   │   --peer 10.250.K.2:PORT  ─────┼─ <tag>p ══ <tag>s ─┼─► 10.250.K.2:PORT (direct)     │
//!   │ 10.250.K.1/24                  │ (tc tbf,│  or    ┌─ fault proxy (a thread of this  │
//!   │                                │ link down)       │  test, setns'd here) ─► secondary│
//!   └────────────────────────────────┘        └────────────────────────────────────────────┘
//! ```
//!
//! The backends run with `ip netns exec`. Link cuts are `ip link set DEV down/up` on the
//! primary's end of the veth, rate limits are `tc qdisc ... tbf` on it (this kernel has no
//! netem). Delay, connection resets and flipped bytes come from a small TCP forwarder
//! ([`Proxy`]): a thread of this test process that enters the secondary's namespace with
//! `setns(2)` before it creates its sockets, so the primary's traffic to it crosses the veth and
//! its own connection to the secondary stays inside that namespace.
//!
//! Every test creates uniquely named namespaces and deletes them on drop (also on panic). Without
//! root or without working `ip netns`, the tests are skipped with a loud message, except in CI
//! (`CI` set), where they fail. The tests of this file run one at a time (a lock): they use short
//! link timeouts (heartbeat 100 ms, peer timeout 1 s) that a machine running several pairs at
//! once on two CPUs could miss.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::needs::Needs;
use common::pair::{assert_same_files, checkpoint, hot_writes, wait_connected, wait_in_sync, Node};
use common::{pattern, poll, Backend, Client, Qmp};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const DISK: u64 = 32 * MIB;
/// Hang guard for waits on a condition (not a synchronisation delay).
const GUARD: Duration = Duration::from_secs(60);
/// The peer timeout of both sides (the heartbeat is [`Node`]'s 100 ms).
const PEER_TIMEOUT_MS: u64 = 1000;

/// One test at a time in this file (see the module comment).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// ---- the two hosts ----

/// Two network namespaces joined by a veth pair; deleted on drop.
struct Net {
    /// Namespace of the primary / of the secondary.
    p: String,
    s: String,
    /// The veth ends (in `p` and in `s`).
    dev_p: String,
    dev_s: String,
    ip_p: String,
    ip_s: String,
    created: Vec<String>,
}

static NET_COUNTER: AtomicU32 = AtomicU32::new(0);

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Net {
    fn create() -> Result<Net, String> {
        remove_stale_namespaces();
        let pid = std::process::id();
        let n = NET_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag = format!("cbnt{pid}-{n}");
        // Interface names: at most 15 bytes.
        let short = format!("{}{n}", pid % 100_000);
        let k = 1 + (pid as usize * 7 + n as usize) % 250;
        let mut net = Net {
            p: format!("{tag}-p"),
            s: format!("{tag}-s"),
            dev_p: format!("cb{short}p"),
            dev_s: format!("cb{short}s"),
            ip_p: format!("10.250.{k}.1"),
            ip_s: format!("10.250.{k}.2"),
            created: Vec::new(),
        };
        for ns in [net.p.clone(), net.s.clone()] {
            run(&["ip", "netns", "add", &ns])?;
            net.created.push(ns.clone());
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        }
        run(&[
            "ip", "link", "add", &net.dev_p, "netns", &net.p, "type", "veth", "peer", "name",
            &net.dev_s, "netns", &net.s,
        ])?;
        for (ns, dev, ip) in [
            (&net.p, &net.dev_p, &net.ip_p),
            (&net.s, &net.dev_s, &net.ip_s),
        ] {
            run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                dev,
            ])?;
            run(&["ip", "-n", ns, "link", "set", dev, "up"])?;
        }
        eprintln!(
            "netns: {} ({} {}) <-veth-> {} ({} {})",
            net.p, net.dev_p, net.ip_p, net.s, net.dev_s, net.ip_s
        );
        Ok(net)
    }

    /// One end of the link up or down (the other end loses its carrier). Down at the
    /// primary's end, the primary's connects fail at once (no route); down at the secondary's
    /// end, the primary keeps its route and its packets go nowhere (a cable cut further away).
    fn link(&self, primary_end: bool, up: bool) {
        let state = if up { "up" } else { "down" };
        let (ns, dev) = if primary_end {
            (&self.p, &self.dev_p)
        } else {
            (&self.s, &self.dev_s)
        };
        run(&["ip", "-n", ns, "link", "set", dev, state]).unwrap();
        eprintln!("netns: {dev} {state}");
    }

    /// Limits what the primary sends over the link (tc tbf on its veth end).
    fn limit_rate(&self, rate: &str, burst: &str, latency: &str) {
        run(&[
            "tc",
            "-n",
            &self.p,
            "qdisc",
            "replace",
            "dev",
            &self.dev_p,
            "root",
            "tbf",
            "rate",
            rate,
            "burst",
            burst,
            "latency",
            latency,
        ])
        .unwrap();
        eprintln!(
            "netns: {} tbf rate {rate} burst {burst} latency {latency}",
            self.dev_p
        );
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end in it, and so the pair.
        for ns in self.created.drain(..) {
            if let Err(e) = run(&["ip", "netns", "del", &ns]) {
                eprintln!("netns: cleanup: {e}");
            }
        }
    }
}

/// Namespaces of earlier runs of this file that were killed before their drop (SIGKILL): named
/// `cbnt<pid>-...`, deleted when that pid is gone.
fn remove_stale_namespaces() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix("cbnt")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run(&["ip", "netns", "del", &name]);
        }
    }
}

/// The two hosts, or `None` (skipped, loudly) where this cannot run; in CI a failure.
fn hosts(test: &str) -> Option<Net> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let net = if root {
        Net::create()
    } else {
        Err("not root".to_string())
    };
    let why = net.as_ref().err().cloned().unwrap_or_default();
    let met = Needs::of(test)
        .root()
        .that(
            net.is_ok() || !root,
            format!("network namespaces, `ip netns` ({why})"),
        )
        .met();
    net.ok().filter(|_| met)
}

// ---- the fault proxy ----

/// How the proxy corrupts the primary → secondary direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Corrupt {
    /// Plain frames: parse the stream and flip one byte in the middle of the payload of the
    /// next WRITE frame (so the frame's checksum, not its header checks, must catch it).
    WritePayload,
    /// Opaque (TLS) stream: flip one byte in the middle of the next chunk of at least 1 KiB.
    AnyByte,
}

#[derive(Default)]
struct ProxyCtl {
    /// Added to each direction: a chunk is forwarded this long after it was read.
    delay: Mutex<Duration>,
    /// Corruption armed for the next opportunity (`Some`), disarmed once done.
    corrupt: Mutex<Option<Corrupt>>,
    /// `(disk offset, length)` of the WRITE frame corrupted in [`Corrupt::WritePayload`] mode.
    corrupted: Mutex<Option<(u64, u64)>>,
    corruptions: AtomicU32,
    /// While closed, new connections are accepted and closed at once. Closed by the proxy
    /// itself when it corrupts a byte, so the test can look at the secondary before the primary
    /// reconnects.
    gate_closed: AtomicBool,
    /// Open connections (both sockets of each), for [`Proxy::reset`].
    conns: Mutex<Vec<(TcpStream, TcpStream)>>,
    /// Connections forwarded since the proxy started / resets done / `forwarded` at the last
    /// reset.
    forwarded: AtomicU64,
    resets: AtomicU64,
    forwarded_at_reset: AtomicU64,
}

/// A TCP forwarder listening in a namespace (see the module comment).
struct Proxy {
    port: u16,
    ctl: Arc<ProxyCtl>,
}

/// Moves the calling thread into the network namespace `ns` (sockets it creates from then on
/// belong to that namespace).
fn enter_netns(ns: &str) {
    let f = std::fs::File::open(format!("/run/netns/{ns}")).expect("open /run/netns/NS");
    // SAFETY: setns on a valid namespace fd; affects only this thread.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns {ns}: {}", std::io::Error::last_os_error());
}

/// Closes a TCP socket with a reset (SO_LINGER 0) once its last descriptor goes.
fn set_linger_zero(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt with a valid fd and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

impl Proxy {
    /// Listens on `listen_ip` in namespace `ns` and forwards every connection to `upstream`
    /// (reached from inside `ns`).
    fn start(ns: &str, listen_ip: &str, upstream: SocketAddr) -> Proxy {
        let ctl = Arc::new(ProxyCtl::default());
        let (port_tx, port_rx) = mpsc::channel();
        let (ns, ip) = (ns.to_string(), listen_ip.to_string());
        let c = ctl.clone();
        std::thread::spawn(move || {
            enter_netns(&ns);
            let l = TcpListener::bind((ip.as_str(), 0)).expect("proxy bind");
            port_tx.send(l.local_addr().unwrap().port()).unwrap();
            for down in l.incoming() {
                let Ok(down) = down else { continue };
                if c.gate_closed.load(Ordering::SeqCst) {
                    set_linger_zero(&down);
                    continue; // dropped: closed with a reset
                }
                // Created in this thread: inside the namespace.
                let Ok(up) = TcpStream::connect(upstream) else {
                    continue;
                };
                let _ = down.set_nodelay(true);
                let _ = up.set_nodelay(true);
                c.conns
                    .lock()
                    .unwrap()
                    .push((down.try_clone().unwrap(), up.try_clone().unwrap()));
                c.forwarded.fetch_add(1, Ordering::SeqCst);
                let (d2, u2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
                pump(c.clone(), down, up, true);
                pump(c.clone(), u2, d2, false);
            }
        });
        let port = port_rx.recv_timeout(GUARD).expect("proxy port");
        Proxy { port, ctl }
    }

    fn set_delay(&self, d: Duration) {
        *self.ctl.delay.lock().unwrap() = d;
    }

    fn arm_corruption(&self, how: Corrupt) {
        *self.ctl.corrupt.lock().unwrap() = Some(how);
    }

    fn open_gate(&self) {
        self.ctl.gate_closed.store(false, Ordering::SeqCst);
    }

    /// Breaks every open connection abruptly: both sockets shut down and closed with a reset.
    fn reset(&self) {
        let mut guard = self.ctl.conns.lock().unwrap();
        let conns = std::mem::take(&mut *guard);
        self.ctl
            .forwarded_at_reset
            .store(self.forwarded(), Ordering::SeqCst);
        drop(guard);
        for (a, b) in &conns {
            set_linger_zero(a);
            set_linger_zero(b);
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
        self.ctl.resets.fetch_add(1, Ordering::SeqCst);
        eprintln!("proxy: reset {} connection(s)", conns.len());
    }

    fn forwarded(&self) -> u64 {
        self.ctl.forwarded.load(Ordering::SeqCst)
    }

    /// Waits until more than `n` connections were forwarded.
    fn wait_forwarded_more_than(&self, n: u64) {
        let what = "a new connection through the proxy";
        poll::until(what, GUARD, || self.forwarded() > n);
    }

    /// Waits until the armed corruption was done.
    fn wait_corrupted(&self, n: u32) {
        let what = "the proxy to corrupt a byte";
        poll::until(what, GUARD, || {
            self.ctl.corruptions.load(Ordering::SeqCst) >= n
        });
    }
}

/// Tracks frame boundaries of a plain stream (40-byte header, `payload_len` at 32..36, type at
/// 4) to find a WRITE payload to corrupt.
#[derive(Default)]
struct Frames {
    header: Vec<u8>,
    payload_left: usize,
    /// In a WRITE payload to corrupt: the byte `flip_at` bytes further is flipped.
    flip_at: Option<usize>,
}

/// Copies `from` → `to` in two threads (a reader and a writer that applies the delay), with the
/// proxy's faults when `forward` (primary → secondary).
fn pump(ctl: Arc<ProxyCtl>, mut from: TcpStream, mut to: TcpStream, forward: bool) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    {
        let ctl = ctl.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            let mut frames = Frames::default();
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let chunk = &mut buf[..n];
                if forward {
                    corrupt(&ctl, &mut frames, chunk);
                }
                let at = Instant::now() + *ctl.delay.lock().unwrap();
                if tx.send((at, chunk.to_vec())).is_err() {
                    break;
                }
            }
            let _ = from.shutdown(Shutdown::Read);
        });
    }
    std::thread::spawn(move || {
        for (at, data) in rx {
            let now = Instant::now();
            if at > now {
                // Fault injection (the link's latency), not synchronisation.
                std::thread::sleep(at - now);
            }
            if to.write_all(&data).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

fn corrupt(ctl: &ProxyCtl, frames: &mut Frames, chunk: &mut [u8]) {
    let armed = *ctl.corrupt.lock().unwrap();
    match armed {
        // Plain streams are followed from their first byte, so frame boundaries are known
        // when a corruption is armed (on a TLS stream this tracks nonsense, unused).
        None => track_frames(ctl, frames, chunk, false),
        Some(Corrupt::WritePayload) => track_frames(ctl, frames, chunk, true),
        Some(Corrupt::AnyByte) => {
            if chunk.len() >= 1024 {
                chunk[chunk.len() / 2] ^= 0xff;
                ctl.gate_closed.store(true, Ordering::SeqCst);
                *ctl.corrupt.lock().unwrap() = None;
                ctl.corruptions.fetch_add(1, Ordering::SeqCst);
                eprintln!("proxy: flipped a byte of a {} byte chunk", chunk.len());
            }
        }
    }
}

/// Follows frame boundaries through `chunk`; when `arm`, flips a byte in the middle of the
/// next WRITE frame's payload (recording its disk range) and disarms.
fn track_frames(ctl: &ProxyCtl, frames: &mut Frames, chunk: &mut [u8], arm: bool) {
    let mut i = 0;
    while i < chunk.len() {
        if frames.payload_left > 0 {
            let take = frames.payload_left.min(chunk.len() - i);
            if let Some(at) = frames.flip_at {
                if at < take {
                    chunk[i + at] ^= 0xff;
                    ctl.gate_closed.store(true, Ordering::SeqCst);
                    frames.flip_at = None;
                    *ctl.corrupt.lock().unwrap() = None;
                    ctl.corruptions.fetch_add(1, Ordering::SeqCst);
                } else {
                    frames.flip_at = Some(at - take);
                }
            }
            frames.payload_left -= take;
            i += take;
            continue;
        }
        let need = 40 - frames.header.len();
        let take = need.min(chunk.len() - i);
        frames.header.extend_from_slice(&chunk[i..i + take]);
        i += take;
        if frames.header.len() == 40 {
            let h = std::mem::take(&mut frames.header);
            let len = u32::from_le_bytes(h[32..36].try_into().unwrap()) as usize;
            frames.payload_left = len;
            // Type 3 = WRITE; with a payload worth corrupting.
            if arm && frames.flip_at.is_none() && h[4] == 3 && len >= 512 {
                let offset = u64::from_le_bytes(h[16..24].try_into().unwrap());
                *ctl.corrupted.lock().unwrap() = Some((offset, len as u64));
                frames.flip_at = Some(len / 2);
                eprintln!(
                    "proxy: {:?} flipping byte {} of the WRITE at {offset} (len {len})",
                    std::time::SystemTime::now(),
                    len / 2
                );
            }
        }
    }
}

// ---- the pair ----

/// Fields drop in order: the processes go before their namespaces and their directory.
struct Pair {
    primary: Option<Backend>,
    _secondary: Backend,
    pq: Qmp,
    sq: Qmp,
    proxy: Option<Proxy>,
    net: Net,
    dir: tempfile::TempDir,
}

#[derive(Clone, Copy, Default)]
struct PairOpts<'a> {
    /// TLS with a pre-shared key (`--tls-psk-file`) instead of `--insecure-link`.
    tls: bool,
    primary_extra: &'a [&'a str],
    /// Route the primary's connection through a [`Proxy`].
    proxy: bool,
}

impl Pair {
    /// Starts the secondary in the secondary's namespace, optionally a proxy in front of it, and
    /// the primary in the primary's namespace; returns once both sides report the link up.
    fn start(net: Net, dir: tempfile::TempDir, o: PairOpts<'_>) -> Pair {
        let d = dir.path();
        let psk = d.join("link.psk").display().to_string();
        std::fs::write(&psk, "a shared secret for the netns pair tests").unwrap();
        let secure = |node: Node| match o.tls {
            true => node.security(&["--tls-psk-file", &psk]),
            false => node,
        };
        let secondary = Node::secondary(d, "secondary.img", DISK, 0)
            .host(&net.ip_s)
            .layers("layers")
            .qmp("secondary.qmp")
            .cluster_size("4K")
            .peer_timeout_ms(PEER_TIMEOUT_MS);
        let secondary = secure(secondary).netns(&net.s).start();
        let mut sq = secondary.qmp();
        let sec_addr: SocketAddr = format!("{}:{}", net.ip_s, secondary.listen_port())
            .parse()
            .unwrap();
        let proxy = o.proxy.then(|| Proxy::start(&net.s, &net.ip_s, sec_addr));
        let port = proxy.as_ref().map_or(sec_addr.port(), |p| p.port);
        let primary = Node::primary(d, "primary.img", DISK, port)
            .host(&net.ip_s)
            .socket("primary.sock")
            .qmp("primary.qmp")
            .queues(4)
            .peer_timeout_ms(PEER_TIMEOUT_MS);
        let primary = secure(primary).args(o.primary_extra).netns(&net.p).start();
        let mut pq = primary.qmp();
        wait_connected(&mut pq);
        sq.wait_event("REPLICATION_PEER_CONNECTED");
        Pair {
            primary: Some(primary),
            _secondary: secondary,
            pq,
            sq,
            proxy,
            net,
            dir,
        }
    }

    fn path(&self, n: &str) -> PathBuf {
        self.dir.path().join(n)
    }

    fn client(&self) -> Client {
        Client::connect(&self.path("primary.sock"), 4).unwrap()
    }

    fn image(&self, n: &str) -> Vec<u8> {
        std::fs::read(self.path(n)).unwrap()
    }

    fn assert_disks_equal(&self, what: &str) {
        let (p, s) = (self.path("primary.img"), self.path("secondary.img"));
        assert_same_files(&p, &s, what);
    }

    fn pstatus(&mut self) -> Value {
        self.pq.execute("query-replication", json!({})).unwrap()
    }

    fn sstatus(&mut self) -> Value {
        self.sq.execute("query-replication", json!({})).unwrap()
    }

    /// Waits until the primary streams and has nothing left to resync (checkpoints possible).
    fn wait_in_sync(&mut self) {
        wait_in_sync(&mut self.pq);
    }

    fn checkpoint(&mut self) -> u64 {
        checkpoint(&mut self.pq)
    }

    /// Events of `name` received so far on `q` (removed from its queue).
    fn take_events(q: &mut Qmp, name: &str) -> Vec<Value> {
        let (hit, rest) = std::mem::take(&mut q.events)
            .into_iter()
            .partition(|e| e["event"] == name);
        q.events = rest;
        hit
    }
}

/// Random writes of several sizes on four queues, concurrently, partly overlapping; every
/// guest write must succeed.
fn random_batch(c: &mut Client, seed: u64, n: usize) {
    let writes = hot_writes(seed, n, &[512, 4096, 8192, 65536], DISK);
    for (i, r) in c.write_concurrently(&writes).into_iter().enumerate() {
        assert_eq!(r, 0, "guest write {i} of batch {seed} failed");
    }
}

/// A pair on two fresh hosts, or `None` when the test is skipped.
fn pair(test: &str, o: PairOpts<'_>) -> Option<Pair> {
    let net = hosts(test)?;
    Some(Pair::start(net, common::tempdir(), o))
}

// ---- the scenarios ----

/// 5 ms of delay each way and the connection reset every couple of seconds while the guest
/// writes: each reset is survived by a reconnect and a resync; after each round a checkpoint
/// succeeds and the disks are equal.
#[test]
fn delay_and_resets_reconnect_resync_and_checkpoint() {
    let _g = serial();
    let Some(mut p) = pair(
        "delay_and_resets",
        PairOpts {
            proxy: true,
            ..Default::default()
        },
    ) else {
        return;
    };
    let proxy = p.proxy.take().unwrap();
    proxy.set_delay(Duration::from_millis(5));
    let mut c = p.client();
    let mut seed = 0;
    for round in 1..=3u64 {
        // A reset every 1.5 s while the guest writes (fault timing, not synchronisation).
        let stop = Arc::new(AtomicBool::new(false));
        let resets_before = proxy.ctl.resets.load(Ordering::SeqCst);
        let resetter = {
            let stop = stop.clone();
            let ctl = proxy.ctl.clone();
            let port = proxy.port;
            std::thread::spawn(move || {
                let proxy = Proxy { port, ctl };
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1500));
                    if !stop.load(Ordering::SeqCst) {
                        proxy.reset();
                    }
                }
            })
        };
        // Write until two resets happened during this round, then a bit more.
        while proxy.ctl.resets.load(Ordering::SeqCst) < resets_before + 2 {
            seed += 1;
            random_batch(&mut c, seed, 32);
        }
        stop.store(true, Ordering::SeqCst);
        resetter.join().unwrap();
        seed += 1;
        random_batch(&mut c, seed, 32);
        // A connection made after the last reset: the old session is gone on the primary.
        proxy.wait_forwarded_more_than(proxy.ctl.forwarded_at_reset.load(Ordering::SeqCst));
        p.wait_in_sync();
        let epoch = p.checkpoint();
        assert_eq!(epoch, round);
        p.assert_disks_equal(&format!("round {round}"));
        let st = p.pstatus();
        assert_eq!(st["dirty-bytes"], 0, "{st}");
        let lost = Pair::take_events(&mut p.pq, "REPLICATION_PEER_LOST");
        let resynced = Pair::take_events(&mut p.pq, "REPLICATION_RESYNC_DONE");
        eprintln!(
            "round {round}: {} resets, {} PEER_LOST, {} RESYNC_DONE on the primary",
            proxy.ctl.resets.load(Ordering::SeqCst) - resets_before,
            lost.len(),
            resynced.len()
        );
        assert!(!lost.is_empty(), "round {round}: no REPLICATION_PEER_LOST");
        assert!(
            !resynced.is_empty(),
            "round {round}: no REPLICATION_RESYNC_DONE"
        );
    }
    drop(c);
    drop(proxy);
}

/// The link is down for longer than the peer timeout: the primary goes unprotected and keeps
/// serving; when the link returns it reconnects (TLS), resyncs only what changed, and the next
/// checkpoint makes the disks equal again.
#[test]
fn link_down_longer_than_the_peer_timeout_then_incremental_resync() {
    let _g = serial();
    let Some(mut p) = pair(
        "link_down",
        PairOpts {
            tls: true,
            ..Default::default()
        },
    ) else {
        return;
    };
    let mut c = p.client();
    random_batch(&mut c, 1, 64);
    assert_eq!(p.checkpoint(), 1);
    p.assert_disks_equal("checkpoint 1");

    p.net.link(false, false);
    random_batch(&mut c, 2, 32);
    let lost = p.pq.wait_event("REPLICATION_PEER_LOST");
    eprintln!("primary: {lost}");
    // The primary noticed the silence itself (the secondary reported nothing).
    let reason = lost["data"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("no heartbeat") && !reason.contains("peer reported"),
        "{lost}"
    );
    // Unprotected, still serving.
    for seed in 3..8 {
        random_batch(&mut c, seed, 32);
    }
    assert_eq!(c.flush(0), 0);
    let st = p.pstatus();
    assert_ne!(st["state"], "connected", "{st}");
    let dirty = st["dirty-bytes"].as_u64().unwrap();
    assert!(dirty > 0 && dirty < DISK, "{st}");
    let e =
        p.pq.execute("replication-checkpoint", json!({"timeout-ms": 500}));
    assert!(
        e.is_err(),
        "a checkpoint without a secondary succeeded: {e:?}"
    );
    let slost = p.sq.wait_event("REPLICATION_PEER_LOST");
    eprintln!("secondary: {slost}");

    // The first connection's event may still wait in the QMP buffer: only the next counts.
    p.pq.events
        .retain(|e| e["event"] != "REPLICATION_PEER_CONNECTED");
    p.net.link(false, true);
    let conn = p.pq.wait_event("REPLICATION_PEER_CONNECTED");
    let resync = conn["data"]["resync-bytes"].as_u64().unwrap();
    assert!(
        resync > 0 && resync < DISK,
        "resync must be incremental: {conn} (dirty before: {dirty})"
    );
    p.pq.wait_event("REPLICATION_RESYNC_DONE");
    p.wait_in_sync();
    assert_eq!(p.checkpoint(), 2);
    assert_eq!(p.pstatus()["dirty-bytes"], 0);
    p.assert_disks_equal("after the resync");
    assert_eq!(p.sstatus()["epoch"], 2);
}

/// A partition while `replication-checkpoint` waits: it fails (timeout), the secondary keeps
/// its buffer whole (epoch and hidden bytes unchanged); `failover` then gives exactly the last
/// checkpoint, or, when the link returns instead, the next checkpoint succeeds.
fn partition_during_checkpoint(test: &str, failover: bool) {
    let _g = serial();
    let Some(mut p) = pair(test, PairOpts::default()) else {
        return;
    };
    let mut c = p.client();
    random_batch(&mut c, 10, 64);
    assert_eq!(p.checkpoint(), 1);
    p.assert_disks_equal("checkpoint 1");
    let at_checkpoint = p.image("primary.img");

    // Epoch 2's writes, all applied on the secondary (buffered in its hidden layer).
    random_batch(&mut c, 11, 64);
    p.pq.execute(
        "replication-prepare-checkpoint",
        json!({"timeout-ms": 60000}),
    )
    .unwrap();
    let before = p.sstatus();
    let hidden = before["hidden-bytes"].as_u64().unwrap();
    assert!(hidden > 0 && before["epoch"] == 1, "{before}");

    p.net.link(true, false);
    random_batch(&mut c, 12, 16);
    let e =
        p.pq.execute("replication-checkpoint", json!({"timeout-ms": 300}))
            .expect_err("a checkpoint across a partition succeeded");
    eprintln!("checkpoint during the partition: {e}");
    assert!(e.to_string().contains("timed out"), "{e}");
    let check = |st: &Value, when: &str| {
        assert_eq!(st["epoch"], 1, "{when}: {st}");
        assert_eq!(st["hidden-bytes"], hidden, "{when}: {st}");
    };
    check(&p.sstatus(), "after the failed checkpoint");
    assert_eq!(p.pstatus()["epoch"], 1);
    p.sq.wait_event("REPLICATION_PEER_LOST");
    check(&p.sstatus(), "after the secondary lost the primary");

    if failover {
        // The primary dies during the partition; the secondary takes over.
        drop(p.primary.take());
        let r = p.sq.execute("replication-failover", json!({})).unwrap();
        assert_eq!(r["epoch"], 1, "{r}");
        assert!(
            p.image("secondary.img") == at_checkpoint,
            "failover after a failed checkpoint must give the last checkpoint"
        );
        return;
    }
    p.pq.wait_event("REPLICATION_PEER_LOST");
    p.net.link(true, true);
    p.pq.wait_event("REPLICATION_RESYNC_DONE");
    p.wait_in_sync();
    random_batch(&mut c, 13, 16);
    // The failed attempt's number (2, if its frame was queued) is never used again.
    let epoch = p.checkpoint();
    assert!(epoch >= 2, "epoch {epoch}");
    p.assert_disks_equal("checkpoint after the partition");
    assert_eq!(p.sstatus()["epoch"], epoch);
}

/// A partition shorter than the peer timeout during a checkpoint: the connection survives, so
/// the CHECKPOINT frame the timed-out command queued still reaches the secondary when the link
/// returns. Whatever it did, its buffer is whole or cut completely (never half dropped), and
/// the next checkpoint succeeds with equal disks.
#[test]
fn short_partition_during_checkpoint_keeps_the_secondary_whole() {
    let _g = serial();
    let Some(mut p) = pair("short_partition", PairOpts::default()) else {
        return;
    };
    let mut c = p.client();
    random_batch(&mut c, 30, 64);
    assert_eq!(p.checkpoint(), 1);
    random_batch(&mut c, 31, 64);
    p.pq.execute(
        "replication-prepare-checkpoint",
        json!({"timeout-ms": 60000}),
    )
    .unwrap();
    let hidden = p.sstatus()["hidden-bytes"].as_u64().unwrap();
    p.net.link(true, false);
    let e =
        p.pq.execute("replication-checkpoint", json!({"timeout-ms": 200}))
            .expect_err("a checkpoint across a partition succeeded");
    assert!(e.to_string().contains("timed out"), "{e}");
    p.net.link(true, true);
    // The frame queued by the failed command is delivered now, or the link broke meanwhile
    // (on a stalled machine): wait until the primary has nothing in flight on a live link.
    poll::until("nothing in flight on a live link", GUARD, || {
        let st = p.pstatus();
        st["state"] == "connected"
            && st["resync-remaining-bytes"] == 0
            && st["bytes-in-flight"] == 0
    });
    let st = p.sstatus();
    eprintln!(
        "after a failed checkpoint and a short partition: primary epoch {}, secondary {st}",
        p.pstatus()["epoch"]
    );
    let whole = st["epoch"] == 1 && st["hidden-bytes"] == hidden;
    let cut = st["epoch"] == 2 && st["hidden-bytes"] == 0;
    assert!(
        whole || cut,
        "half-dropped buffer: {st} (hidden before: {hidden})"
    );
    assert_eq!(
        p.pstatus()["epoch"],
        1,
        "the failed checkpoint counted on the primary"
    );
    random_batch(&mut c, 32, 16);
    // The failed attempt's number 2 is never sent again (it may have cut the secondary).
    assert_eq!(p.checkpoint(), 3);
    assert_eq!(p.sstatus()["epoch"], 3);
    p.assert_disks_equal("checkpoint after the short partition");
}

#[test]
fn partition_during_checkpoint_then_failover_gives_the_last_checkpoint() {
    partition_during_checkpoint("partition_then_failover", true);
}

#[test]
fn partition_during_checkpoint_then_the_next_checkpoint_succeeds() {
    partition_during_checkpoint("partition_then_link_returns", false);
}

fn vm_rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// A secondary behind a 20 Mbit/s link with `--window 4M`: guest writes wait for the window,
/// the bytes in flight never exceed it (plus one frame), and the primary's memory does not grow
/// with what the guest writes.
#[test]
fn slow_link_bounds_the_window_and_the_primarys_memory() {
    const WINDOW: u64 = 4 * MIB;
    const WRITE: usize = MIB as usize;
    const TOTAL: u64 = 32 * MIB;
    let _g = serial();
    let Some(mut p) = pair(
        "slow_link",
        PairOpts {
            primary_extra: &["--window", "4M"],
            ..Default::default()
        },
    ) else {
        return;
    };
    let pid = p.primary.as_ref().unwrap().child.id();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(
        comm.trim(),
        "colo-blk",
        "ip netns exec should exec colo-blk"
    );
    let mut c = p.client();
    // Warm-up at full speed: the client's buffer is mapped and touched by the backend, the
    // threads are up.
    let writes: Vec<_> = (0..4)
        .map(|q| (q, q as u64 * WRITE as u64, pattern(q as u64, WRITE)))
        .collect();
    assert!(c.write_concurrently(&writes).iter().all(|&r| r == 0));
    assert_eq!(p.checkpoint(), 1);
    let baseline = vm_rss_kib(pid);

    p.net.limit_rate("20mbit", "32kb", "100ms");
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        let qmp = p.path("primary.qmp");
        std::thread::spawn(move || {
            let mut q = Qmp::connect(&qmp);
            let (mut max_in_flight, mut max_rss, mut samples) = (0u64, 0u64, 0u64);
            while !stop.load(Ordering::SeqCst) {
                let st = q.execute("query-replication", json!({})).unwrap();
                max_in_flight = max_in_flight.max(st["bytes-in-flight"].as_u64().unwrap());
                max_rss = max_rss.max(vm_rss_kib(pid));
                samples += 1;
                // Sampling period.
                std::thread::sleep(Duration::from_millis(20));
            }
            (max_in_flight, max_rss, samples)
        })
    };
    let mut written = 0u64;
    let mut i = 4u64;
    while written < TOTAL {
        let writes: Vec<_> = (0..4)
            .map(|q| {
                i += 1;
                (q, (i * WRITE as u64) % DISK, pattern(100 + i, WRITE))
            })
            .collect();
        for r in c.write_concurrently(&writes) {
            assert_eq!(r, 0, "a guest write failed behind the slow link");
        }
        written += 4 * WRITE as u64;
    }
    stop.store(true, Ordering::SeqCst);
    let (max_in_flight, max_rss, samples) = sampler.join().unwrap();
    let grown = max_rss.saturating_sub(baseline);
    eprintln!(
        "slow link: {written} bytes written; {samples} samples: bytes-in-flight max {max_in_flight} \
         (window {WINDOW}); VmRSS baseline {baseline} KiB, max {max_rss} KiB (+{grown} KiB)"
    );
    // One frame: header + a 1 MiB payload.
    assert!(
        max_in_flight <= WINDOW + 40 + WRITE as u64,
        "bytes in flight {max_in_flight} above the window"
    );
    assert!(
        max_in_flight >= WINDOW / 2,
        "the window never filled ({max_in_flight}): the link was not the bottleneck"
    );
    // What the primary may hold beyond the baseline: the window's frames (4 MiB), the writer's
    // buffers (at most 4 MiB, generous: since main's vectored writer it copies only headers),
    // and allocator slack (8 MiB). Buffering the stream instead would grow by up to 28 MiB here.
    let bound_kib = (WINDOW + 4 * MIB + 8 * MIB) / 1024;
    assert!(
        grown <= bound_kib,
        "the primary grew by {grown} KiB (bound {bound_kib} KiB) while the guest wrote {written} bytes"
    );
    p.checkpoint();
    p.assert_disks_equal("after the slow link drained");
}

/// Flipped bytes on the wire. With `--insecure-link` the frame checksum rejects the frame; with
/// TLS the record layer does. Either way the link breaks, nothing of the bad frame is applied,
/// the primary reconnects and resyncs, and the next checkpoint makes the disks equal.
fn flipped_bytes(test: &str, tls: bool) {
    let _g = serial();
    let Some(mut p) = pair(
        test,
        PairOpts {
            tls,
            proxy: true,
            ..Default::default()
        },
    ) else {
        return;
    };
    let proxy = p.proxy.take().unwrap();
    let mut c = p.client();
    random_batch(&mut c, 20, 32);
    assert_eq!(p.checkpoint(), 1);
    p.assert_disks_equal("checkpoint 1");

    for round in 1..=2u32 {
        // The disks are equal here (the last checkpoint).
        let before = p.image("primary.img");
        // The proxy closes its gate when it corrupts: no reconnection until the secondary's
        // disk was checked.
        proxy.arm_corruption(if tls {
            Corrupt::AnyByte
        } else {
            Corrupt::WritePayload
        });
        // 1 MiB writes to regions of the disk not written in this epoch: one frame each.
        let base = 16 * MIB;
        for k in 0..8u64 {
            let off = base + k * MIB;
            assert_eq!(
                c.write(0, off, &pattern(1000 * round as u64 + k, MIB as usize)),
                0
            );
        }
        proxy.wait_corrupted(round);
        // (A link declared dead by a stalled machine before the corruption is not the one.)
        let (lost, reason) = loop {
            let lost = p.sq.wait_event("REPLICATION_PEER_LOST");
            let reason = lost["data"]["reason"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if !reason.contains("no heartbeat") {
                break (lost, reason);
            }
            eprintln!("round {round}: ignoring a timeout before the corruption: {lost}");
        };
        eprintln!("round {round}: secondary: {lost}");
        if tls {
            assert!(
                !reason.contains("checksum"),
                "TLS should reject it first: {lost}"
            );
        } else {
            assert!(reason.contains("checksum"), "{lost}");
        }
        p.pq.wait_event("REPLICATION_PEER_LOST");
        // Nothing of a bad frame applied: every 1 MiB region holds either its content at the
        // last checkpoint or the primary's.
        let (pi, si) = (p.image("primary.img"), p.image("secondary.img"));
        if let Some((off, len)) = *proxy.ctl.corrupted.lock().unwrap() {
            let r = off as usize..(off + len) as usize;
            assert!(
                si[r.clone()] != pi[r],
                "the corrupted frame at {off} was applied"
            );
        }
        for k in 0..8u64 {
            let r = (base + k * MIB) as usize..(base + (k + 1) * MIB) as usize;
            assert!(
                si[r.clone()] == pi[r.clone()] || si[r.clone()] == before[r],
                "round {round}: region {k} holds neither the old nor the new data"
            );
        }
        let forwarded = proxy.forwarded();
        proxy.open_gate();
        proxy.wait_forwarded_more_than(forwarded);
        p.wait_in_sync();
        assert_eq!(p.checkpoint(), 1 + round as u64);
        p.assert_disks_equal(&format!("round {round}, after the resync"));
    }
    drop(c);
    drop(proxy);
}

#[test]
fn flipped_bytes_are_rejected_by_the_frame_checksum() {
    flipped_bytes("flipped_bytes_insecure", false);
}

#[test]
fn flipped_bytes_are_rejected_by_tls() {
    flipped_bytes("flipped_bytes_tls", true);
}
