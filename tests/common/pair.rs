//! Test support for replication pairs: starting a primary or a secondary `colo-blk` in a test
//! directory ([`Node`]), the QMP calls the tests repeat (query, checkpoint, the secondary's
//! sync decision), seeded write batches, disk comparison and signals to a backend.

use std::path::{Path, PathBuf};
use std::time::Duration;

use colo_blk::replication::metadata::Generations;
use colo_blk::replication::protocol::{Frame, Hello, VERSION};
use serde_json::{json, Value};

use super::{pattern, poll, xorshift, Backend, Client, Qmp};

/// A path as a command-line argument.
pub fn s(p: &Path) -> String {
    p.display().to_string()
}

/// The options of one `colo-blk` process of a pair, files named relative to a test directory.
/// Every node has `--heartbeat-ms 100`, unless changed `--insecure-link` and
/// `--peer-timeout-ms 2000`; the rest is what the test asks for.
pub struct Node {
    dir: PathBuf,
    /// `--role` and the flag naming the other side's port (`--listen` or `--peer`).
    role: &'static str,
    host: String,
    port: u16,
    /// The network namespace to run in (`ip netns exec`).
    netns: Option<String>,
    image: String,
    size: u64,
    layers: Option<String>,
    qmp: Option<String>,
    socket: Option<String>,
    num_queues: Option<usize>,
    cluster_size: Option<&'static str>,
    dirty_log_extent: Option<&'static str>,
    peer_timeout_ms: u64,
    /// The link's security options; `None`: `--insecure-link`.
    security: Option<Vec<String>>,
    extra: Vec<String>,
    env: Vec<(String, String)>,
}

impl Node {
    fn new(role: &'static str, dir: &Path, image: &str, size: u64, port: u16) -> Node {
        Node {
            dir: dir.to_path_buf(),
            role,
            host: "127.0.0.1".to_string(),
            port,
            netns: None,
            image: image.to_string(),
            size,
            layers: None,
            qmp: None,
            socket: None,
            num_queues: None,
            cluster_size: None,
            dirty_log_extent: None,
            peer_timeout_ms: 2000,
            security: None,
            extra: Vec::new(),
            env: Vec::new(),
        }
    }

    /// A secondary on `dir/image` (created when missing) of `size` bytes, listening on
    /// 127.0.0.1:`port` (0: any free port).
    pub fn secondary(dir: &Path, image: &str, size: u64, port: u16) -> Node {
        Node::new("secondary", dir, image, size, port)
    }

    /// A primary on `dir/image` (created when missing) of `size` bytes, replicating to
    /// 127.0.0.1:`port`.
    pub fn primary(dir: &Path, image: &str, size: u64, port: u16) -> Node {
        Node::new("primary", dir, image, size, port)
    }

    /// A standalone backend on `dir/image` (created when missing) of `size` bytes: no link
    /// options at all.
    pub fn standalone(dir: &Path, image: &str, size: u64) -> Node {
        Node::new("standalone", dir, image, size, 0)
    }

    /// The address of `--listen` or `--peer` on `ip` instead of 127.0.0.1.
    pub fn host(mut self, ip: &str) -> Node {
        self.host = ip.to_string();
        self
    }

    /// Runs the process in the network namespace `ns`.
    pub fn netns(mut self, ns: &str) -> Node {
        self.netns = Some(ns.to_string());
        self
    }

    /// `--layer-dir dir/name` (a secondary's).
    pub fn layers(mut self, name: &str) -> Node {
        self.layers = Some(name.to_string());
        self
    }

    /// `--qmp dir/name`.
    pub fn qmp(mut self, name: &str) -> Node {
        self.qmp = Some(name.to_string());
        self
    }

    /// `--socket dir/name`: the vhost-user socket (the PVM's, or the Secondary VM's).
    pub fn socket(mut self, name: &str) -> Node {
        self.socket = Some(name.to_string());
        self
    }

    /// `--num-queues n`.
    pub fn queues(mut self, n: usize) -> Node {
        self.num_queues = Some(n);
        self
    }

    /// `--cluster-size size` (a secondary's).
    pub fn cluster_size(mut self, size: &'static str) -> Node {
        self.cluster_size = Some(size);
        self
    }

    /// `--dirty-log-extent size`.
    pub fn dirty_log_extent(mut self, size: &'static str) -> Node {
        self.dirty_log_extent = Some(size);
        self
    }

    /// `--peer-timeout-ms ms` instead of 2000.
    pub fn peer_timeout_ms(mut self, ms: u64) -> Node {
        self.peer_timeout_ms = ms;
        self
    }

    /// The link's security options (e.g. `--tls-psk-file F`) instead of `--insecure-link`;
    /// empty: none at all (as an operator who forgot them).
    pub fn security(mut self, args: &[&str]) -> Node {
        self.security = Some(args.iter().map(|a| a.to_string()).collect());
        self
    }

    /// More arguments, after all the others.
    pub fn args(mut self, extra: &[&str]) -> Node {
        self.extra.extend(extra.iter().map(|a| a.to_string()));
        self
    }

    /// Environment variables for the process (e.g. `COLO_BLK_FAULT`).
    pub fn env(mut self, env: &[(&str, &str)]) -> Node {
        self.env
            .extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self
    }

    /// The command line of this node.
    pub fn command_line(&self) -> Vec<String> {
        let path = |name: &str| s(&self.dir.join(name));
        let mut args: Vec<String> = vec!["--role".into(), self.role.into()];
        args.extend(["--image".to_string(), path(&self.image)]);
        args.extend(["--size".to_string(), self.size.to_string()]);
        if self.role != "standalone" {
            args.extend(self.link_options());
        }
        for (flag, name) in [
            ("--layer-dir", &self.layers),
            ("--qmp", &self.qmp),
            ("--socket", &self.socket),
        ] {
            if let Some(name) = name {
                args.extend([flag.to_string(), path(name)]);
            }
        }
        if let Some(n) = self.num_queues {
            args.extend(["--num-queues".to_string(), n.to_string()]);
        }
        for (flag, size) in [
            ("--cluster-size", self.cluster_size),
            ("--dirty-log-extent", self.dirty_log_extent),
        ] {
            if let Some(size) = size {
                args.extend([flag.to_string(), size.to_string()]);
            }
        }
        args.extend(self.extra.iter().cloned());
        args
    }

    /// The replication link's options: the other side, security, heartbeat and timeout.
    fn link_options(&self) -> Vec<String> {
        let other = format!("{}:{}", self.host, self.port);
        let mut args = if self.role == "secondary" {
            vec!["--listen".to_string(), other]
        } else {
            vec!["--peer".to_string(), other]
        };
        match &self.security {
            Some(security) => args.extend(security.iter().cloned()),
            None => args.push("--insecure-link".into()),
        }
        args.extend([
            "--heartbeat-ms".to_string(),
            "100".to_string(),
            "--peer-timeout-ms".to_string(),
            self.peer_timeout_ms.to_string(),
        ]);
        args
    }

    /// Runs the process, which must fail at start-up; returns its stderr (see
    /// [`super::start_fails`]).
    pub fn start_fails(self) -> String {
        let args = self.command_line();
        super::start_fails(&strs(&args))
    }

    /// Starts the process and waits for its ready line.
    pub fn start(self) -> Backend {
        let args = self.command_line();
        let refs = strs(&args);
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        // Without a vhost-user socket the path is only recorded, never used.
        let socket = self
            .dir
            .join(self.socket.as_deref().unwrap_or("unused.sock"));
        match &self.netns {
            Some(ns) => Backend::start_in_netns(ns, &refs, &socket, &env),
            None => Backend::start_with_env(&refs, &socket, &env),
        }
    }
}

/// The HELLO of a hand-rolled primary of a `disk_size` disk: asynchronous, no dirty log, at
/// epoch 0, taking no DURABLE (a MARKER's ACK then means durable), announcing `gens` (`Generations::fresh_primary()`: what a primary on an image
/// colo-blk has just created announces).
pub fn primary_hello(disk_size: u64, gens: Generations) -> Frame {
    Frame::Hello(Hello {
        version: VERSION,
        disk_size,
        block_size: 512,
        epoch: 0,
        sync: false,
        dirty_log: false,
        takes_durable: false,
        gens,
    })
}

/// Borrowed strings of `args`, for APIs that take `&[&str]`.
pub fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Connects to the QMP socket `dir/name`.
pub fn qmp(dir: &Path, name: &str) -> Qmp {
    Qmp::connect(&dir.join(name))
}

/// `query-replication`.
pub fn query(q: &mut Qmp) -> Value {
    q.execute("query-replication", json!({})).unwrap()
}

/// Waits until `query-replication` satisfies `done`, and returns it: asks again after each
/// event (every change of the link's state comes with one), and leaves the events queued.
pub fn wait_state(q: &mut Qmp, done: impl Fn(&Value) -> bool) -> Value {
    loop {
        let before = q.events_received;
        let st = query(q);
        if done(&st) {
            return st;
        }
        // An event that came with the answer may be the change: ask again before waiting.
        if q.events_received == before {
            q.receive_event();
        }
    }
}

/// Polls `query-replication` until `done` holds, for fields that change without an event;
/// returns it. Fails naming `what` when `limit` passes first (a hang guard).
pub fn poll_state(
    q: &mut Qmp,
    what: &str,
    limit: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    poll::value(what, limit, || Some(query(q)).filter(|st| done(st)))
}

/// Waits until the primary is connected and resynced (checkpoints possible), and returns its
/// state then.
pub fn wait_in_sync(pq: &mut Qmp) -> Value {
    wait_state(pq, |st| {
        st["state"] == "connected" && st["resync-remaining-bytes"] == 0
    })
}

/// Waits until the primary (or the secondary) is connected.
pub fn wait_connected(q: &mut Qmp) {
    wait_state(q, |st| st["state"] == "connected");
}

/// `replication-checkpoint` (60 s timeout); returns the new epoch.
pub fn checkpoint(pq: &mut Qmp) -> u64 {
    pq.execute("replication-checkpoint", json!({"timeout-ms": 60000}))
        .unwrap()["epoch"]
        .as_u64()
        .unwrap()
}

/// `replication-prepare-checkpoint` (60 s timeout): everything written so far is applied on
/// the secondary, not yet checkpointed.
pub fn prepare_checkpoint(pq: &mut Qmp) {
    pq.execute(
        "replication-prepare-checkpoint",
        json!({"timeout-ms": 60000}),
    )
    .unwrap();
}

/// Waits for the secondary's decision event: (decision, reason).
pub fn decision(sq: &mut Qmp) -> (String, String) {
    let ev = sq.wait_event("REPLICATION_SYNC_DECISION");
    (
        ev["data"]["decision"].as_str().unwrap().to_string(),
        ev["data"]["reason"].as_str().unwrap().to_string(),
    )
}

/// The last `REPLICATION_SYNC_DECISION` reason, or the last error, as seen by a query (empty
/// when there is none).
pub fn last_error(q: &mut Qmp) -> String {
    query(q)["last-error"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// A whole file.
pub fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

/// Two disks are equal byte for byte; else the first differing byte is named.
pub fn assert_same(a: &[u8], b: &[u8], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: sizes differ");
    if let Some(i) = a.iter().zip(b).position(|(p, q)| p != q) {
        panic!("{what}: the disks differ first at byte {i}");
    }
}

/// [`assert_same`] on two image files.
pub fn assert_same_files(a: &Path, b: &Path, what: &str) {
    assert_same(&read(a), &read(b), what);
}

/// One write of a batch: (queue, offset, data).
pub type WriteReq = (usize, u64, Vec<u8>);

/// `n` seeded writes on four queues (write `i` on queue `i % 4`, data
/// `pattern(seed * 1000 + i)`): a xorshift state `x` steps once a write, the length is
/// `lens[x % lens.len()]` and the offset `offset(i, x >> 8, len)`.
pub fn seeded_writes(
    seed: u64,
    n: usize,
    lens: &[usize],
    offset: impl Fn(usize, u64, usize) -> u64,
) -> Vec<WriteReq> {
    xorshift(seed)
        .take(n)
        .enumerate()
        .map(|(i, x)| {
            let len = lens[(x % lens.len() as u64) as usize];
            (
                i % 4,
                offset(i, x >> 8, len),
                pattern(seed * 1000 + i as u64, len),
            )
        })
        .collect()
}

/// [`seeded_writes`] of the `lens` sizes at 512-byte aligned offsets, every other one in the
/// first MiB (a small hot area makes overlaps between concurrent writes common), the others
/// anywhere on a `disk`-byte disk.
pub fn hot_writes(seed: u64, n: usize, lens: &[usize], disk: u64) -> Vec<WriteReq> {
    seeded_writes(seed, n, lens, |i, r, len| {
        let span = if i % 2 == 0 { 1 << 20 } else { disk };
        (r % ((span - len as u64) / 512)) * 512
    })
}

/// Submits `writes` concurrently and asserts every one succeeded.
pub fn write_all(c: &mut Client, writes: &[WriteReq]) {
    for r in c.write_concurrently(writes) {
        assert_eq!(r, 0);
    }
}

/// Sends `sig` to a backend.
pub fn signal(b: &Backend, sig: i32) {
    // SAFETY: kill(2) on a child we own.
    unsafe { libc::kill(b.child.id() as i32, sig) };
}

/// SIGKILLs a backend and reaps it.
pub fn kill9(b: &mut Backend) {
    signal(b, libc::SIGKILL);
    b.child.wait().unwrap();
}
