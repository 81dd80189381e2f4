//! The tests' one toolkit: start the real `colo-blk` binary ([`Backend`]; its command line from
//! [`pair::Node`]) and drive it with a real vhost-user-blk client (libblkio's pure-Rust `blkio`
//! crate, [`Client`]) and a QMP client ([`Qmp`]).
//!
//! - [`needs`]: what a test needs of the machine; skipped loudly outside CI, a failure in CI.
//! - [`poll`]: the one deadline loop (a hang guard, never an assertion about speed).
//! - [`pair`]: replication pairs: [`pair::Node`], the QMP waits and calls the tests repeat
//!   (state and events only: a test never waits on a log line), disk comparison.
//! - [`qemu`]: child processes whose output lines the tests wait on ([`qemu::Proc`]: QEMU
//!   guests, colo-ctl), booting the test guest, the guest's record writer.
//! - [`xcolo`]: what the x-colo tests share: the COLO QEMU, the migration into COLO, their
//!   guest's record writer.
//!
//! Every tests/*.rs file is a crate of its own that uses some of this: what one does not use
//! is allowed to be dead code.
#![allow(dead_code)]

pub mod needs;
pub mod pair;
pub mod poll;
pub mod qemu;
pub mod xcolo;

use std::io::{BufRead, BufReader};
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use blkio::{Blkio, Blkioq, MemoryRegion, ReqFlags};

/// How long to wait for a child process to announce something before the test fails.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `colo-blk` process. Killed on drop.
pub struct Backend {
    pub child: Child,
    pub socket: PathBuf,
    /// What the process logs (also echoed to the test's stderr): read only after it ended
    /// ([`Backend::terminate_with_log`]); tests wait on QMP, never on a log line.
    lines: mpsc::Receiver<String>,
    /// The `ready` object of the process's ready line on stdout.
    pub ready: serde_json::Value,
}

impl Backend {
    /// Starts `colo-blk` with `args` and waits for its ready line on stdout (every socket
    /// bound; see `print_ready` in src/main.rs and the README).
    pub fn start_with(args: &[&str], socket: &Path) -> Backend {
        Backend::start_with_env(args, socket, &[])
    }

    /// [`Backend::start_with`] with extra environment variables (e.g. `COLO_BLK_FAULT`).
    pub fn start_with_env(args: &[&str], socket: &Path, env: &[(&str, &str)]) -> Backend {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_colo-blk"));
        cmd.args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied());
        Backend::spawn(cmd, socket)
    }

    /// [`Backend::start_with`] inside the network namespace `netns` (`ip netns exec`, which
    /// execs colo-blk: the child's pid is colo-blk's).
    pub fn start_in_netns(
        netns: &str,
        args: &[&str],
        socket: &Path,
        env: &[(&str, &str)],
    ) -> Backend {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns, env!("CARGO_BIN_EXE_colo-blk")])
            .args(args)
            .envs(env.iter().copied());
        Backend::spawn(cmd, socket)
    }

    /// Spawns `cmd` (colo-blk, possibly behind a wrapper that execs it) and waits for its
    /// ready line.
    fn spawn(mut cmd: Command, socket: &Path) -> Backend {
        if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
            cmd.env("RUST_LOG", "info");
        }
        let mut child = cmd
            .stderr(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn colo-blk");
        let stdout = child.stdout.take().expect("stdout");
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = ready_tx.send(line);
            }
        });
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[colo-blk] {line}");
                let _ = tx.send(line);
            }
        });
        let line = match ready_rx.recv_timeout(STARTUP_TIMEOUT) {
            Ok(line) => line,
            Err(e) => panic!("colo-blk printed no ready line: {e}"),
        };
        let mut v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("ready line {line:?}: {e}"));
        Backend {
            child,
            socket: socket.to_path_buf(),
            lines: rx,
            ready: v["ready"].take(),
        }
    }

    /// Starts a standalone backend serving `image` on `socket`.
    pub fn start(socket: &Path, image: &Path, extra: &[&str]) -> Backend {
        let mut args = vec![
            "--socket".to_string(),
            socket.display().to_string(),
            "--image".to_string(),
            image.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        Backend::start_with(&refs, socket)
    }

    /// The port of the secondary's replication listener (from the ready line).
    pub fn listen_port(&self) -> u16 {
        let listen = self.ready["listen"].as_str().expect("no listen address");
        let port = listen.rsplit(':').next().expect("port");
        port.parse().expect("port number")
    }

    /// Sends SIGTERM and returns the exit status; a process still running after a hang guard
    /// fails the test (and is killed).
    pub fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) with a pid we own; no memory involved.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let st = poll::value(
            "colo-blk to exit after SIGTERM",
            4 * STARTUP_TIMEOUT,
            || self.child.try_wait().expect("wait"),
        );
        std::mem::forget(self);
        st
    }

    /// [`Backend::terminate`], then every line the process logged (read to the end of its
    /// output, so nothing is waited for).
    pub fn terminate_with_log(mut self) -> (std::process::ExitStatus, Vec<String>) {
        let (tx, lines) = mpsc::channel();
        let lines = std::mem::replace(&mut self.lines, lines);
        drop(tx);
        let status = self.terminate();
        (status, lines.iter().collect())
    }

    /// A QMP connection to this process's `--qmp` socket (named by its ready line).
    pub fn qmp(&self) -> Qmp {
        let path = self.ready["qmp"]
            .as_str()
            .expect("colo-blk runs without --qmp");
        Qmp::connect(Path::new(path))
    }

    /// `query-stats`.
    pub fn stats(&self) -> serde_json::Value {
        self.qmp()
            .execute("query-stats", serde_json::json!({}))
            .expect("query-stats")
    }

    /// The I/O engine serving the queues (`query-stats`: `io_uring` or `threads`).
    pub fn io_engine(&self) -> String {
        let stats = self.stats();
        let engine = stats["io-engine"].as_str();
        engine
            .unwrap_or_else(|| panic!("no io-engine: {stats}"))
            .to_string()
    }

    /// Waits until `n` front-end connections have ended and the process is done with them
    /// (`query-stats`: `front-end-disconnects`): it waits for the next front-end.
    pub fn wait_front_end_disconnects(&self, n: u64) {
        let mut q = self.qmp();
        let what = format!("front-end disconnect {n} to be finished with (query-stats)");
        poll::until(&what, 4 * STARTUP_TIMEOUT, || {
            let stats = q.execute("query-stats", serde_json::json!({})).unwrap();
            stats["front-end-disconnects"].as_u64() >= Some(n)
        });
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `colo-blk` with `args`, which must fail at start-up; returns its stderr. Fails the
/// test (after killing it) when it prints its ready line instead, or neither exits nor
/// prints within [`STARTUP_TIMEOUT`] (a hang guard).
pub fn start_fails(args: &[&str]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_colo-blk"))
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn colo-blk");
    // Its stdout ends when it exits, or holds the ready line when it started.
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let ready = rx.recv_timeout(STARTUP_TIMEOUT);
    let refused = matches!(&ready, Ok(line) if line.is_empty());
    if !refused {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        refused && !out.status.success(),
        "{args:?} was not refused ({ready:?}): {err}"
    );
    err
}

/// A connected vhost-user-blk client with one shared I/O buffer.
pub struct Client {
    pub blkio: Blkio,
    pub queues: Vec<Blkioq>,
    pub buf: MemoryRegion,
}

/// Size of the client's I/O buffer.
pub const CLIENT_BUF: usize = 8 << 20;

impl Client {
    pub fn connect(socket: &Path, num_queues: usize) -> Result<Client, blkio::Error> {
        Client::connect_with(socket, num_queues, false)
    }

    /// Connects; a read-only device accepts only read-only clients.
    pub fn connect_with(
        socket: &Path,
        num_queues: usize,
        read_only: bool,
    ) -> Result<Client, blkio::Error> {
        let mut b = Blkio::new("virtio-blk-vhost-user")?;
        b.set_str("path", &socket.display().to_string())?;
        if read_only {
            b.set_bool("read-only", true)?;
        }
        b.connect()?;
        b.set_i32("num-queues", num_queues as i32)?;
        let out = b.start()?;
        let buf = b.alloc_mem_region(CLIENT_BUF)?;
        b.map_mem_region(&buf)?;
        Ok(Client {
            blkio: b,
            queues: out.queues,
            buf,
        })
    }

    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").expect("capacity")
    }

    fn buf_ptr(&self, off: usize) -> *mut u8 {
        assert!(off < CLIENT_BUF);
        (self.buf.addr + off) as *mut u8
    }

    fn wait_one(&mut self, q: usize) -> i32 {
        let mut c = [MaybeUninit::<blkio::Completion>::uninit()];
        let n = self.queues[q].do_io(&mut c, 1, None, None).expect("do_io");
        assert_eq!(n, 1);
        // SAFETY: do_io initialised the first n completions.
        unsafe { c[0].assume_init_ref() }.ret
    }

    /// Writes `data` at `offset` through queue `q`; returns blkio's result (0 or -errno).
    pub fn write(&mut self, q: usize, offset: u64, data: &[u8]) -> i32 {
        assert!(data.len() <= CLIENT_BUF);
        // SAFETY: the region is CLIENT_BUF bytes of memory we own and nothing else uses now.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.buf_ptr(0), data.len()) };
        let p = self.buf_ptr(0);
        self.queues[q].write(offset, p, data.len(), 0, ReqFlags::empty());
        self.wait_one(q)
    }

    /// Reads `len` bytes at `offset` through queue `q`.
    pub fn read(&mut self, q: usize, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
        assert!(len <= CLIENT_BUF);
        let p = self.buf_ptr(0);
        self.queues[q].read(offset, p, len, 0, ReqFlags::empty());
        let r = self.wait_one(q);
        if r != 0 {
            return Err(r);
        }
        let mut out = vec![0u8; len];
        // SAFETY: as in write(); the device filled len bytes.
        unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), len) };
        Ok(out)
    }

    /// Submits all writes at once (each on its queue, overlapping allowed), then waits for all.
    /// Returns the results in submission order.
    pub fn write_concurrently(&mut self, writes: &[(usize, u64, Vec<u8>)]) -> Vec<i32> {
        let total: usize = writes.iter().map(|w| w.2.len()).sum();
        assert!(total <= CLIENT_BUF);
        let mut pos = 0;
        let mut per_queue = vec![0usize; self.queues.len()];
        for (i, (q, off, data)) in writes.iter().enumerate() {
            let p = self.buf_ptr(pos);
            // SAFETY: [pos, pos+len) lies inside the region (checked above) and is not shared.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
            self.queues[*q].write(*off, p, data.len(), i, ReqFlags::empty());
            per_queue[*q] += 1;
            pos += data.len();
        }
        self.complete(&per_queue, writes.len())
    }

    /// Waits for `per_queue[q]` completions on each queue `q` of requests submitted with
    /// user data `0..n`; returns their results by user data.
    pub fn complete(&mut self, per_queue: &[usize], n: usize) -> Vec<i32> {
        let mut results = vec![i32::MIN; n];
        for (q, &want) in per_queue.iter().enumerate() {
            let mut done = 0;
            while done < want {
                let mut c = [const { MaybeUninit::<blkio::Completion>::uninit() }; 64];
                let got = self.queues[q].do_io(&mut c, 1, None, None).expect("do_io");
                for slot in &c[..got] {
                    // SAFETY: do_io initialised the first `got` completions.
                    let comp = unsafe { slot.assume_init_ref() };
                    results[comp.user_data] = comp.ret;
                }
                done += got;
            }
        }
        results
    }

    pub fn flush(&mut self, q: usize) -> i32 {
        self.queues[q].flush(0, ReqFlags::empty());
        self.wait_one(q)
    }

    pub fn discard(&mut self, q: usize, offset: u64, len: u64) -> i32 {
        self.queues[q].discard(offset, len, 0, ReqFlags::empty());
        self.wait_one(q)
    }

    pub fn write_zeroes(&mut self, q: usize, offset: u64, len: u64, unmap: bool) -> i32 {
        let flags = if unmap {
            ReqFlags::empty()
        } else {
            ReqFlags::NO_UNMAP
        };
        self.queues[q].write_zeroes(offset, len, 0, flags);
        self.wait_one(q)
    }
}

/// The xorshift sequence of `seed`: deterministic pseudo-random numbers, so failures reproduce.
pub fn xorshift(seed: u64) -> impl Iterator<Item = u64> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    std::iter::repeat_with(move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    })
}

/// Deterministic pseudo-random bytes (the low bytes of [`xorshift`]), so failures reproduce.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    xorshift(seed).take(len).map(|x| x as u8).collect()
}

/// A fresh temporary directory for one test.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// A minimal synchronous QMP client for tests (the python `qemu.qmp` client is tested too).
pub struct Qmp {
    reader: BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
    /// Events received while waiting for replies.
    pub events: Vec<serde_json::Value>,
    /// How many events arrived on this connection so far (taken from `events` or not).
    pub events_received: u64,
}

/// Connects to the unix socket `path`. A server binds (the path appears) before it listens:
/// a connect in between is refused, and is retried for a while (a polling interval, not
/// synchronisation).
pub fn connect_unix(path: &Path) -> std::os::unix::net::UnixStream {
    let what = format!("{} to accept connections", path.display());
    poll::value(
        &what,
        STARTUP_TIMEOUT,
        || match std::os::unix::net::UnixStream::connect(path) {
            Ok(s) => Some(s),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => None,
            Err(e) => panic!("connect to {}: {e}", path.display()),
        },
    )
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities.
    pub fn connect(path: &Path) -> Qmp {
        let s = connect_unix(path);
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut q = Qmp {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
            events: Vec::new(),
            events_received: 0,
        };
        // QEMU may write an event before the greeting when a client connects right after
        // another left (its monitor is still in command mode until the new connection's
        // OPENED event runs): such events are kept like any other.
        let greeting = loop {
            let msg = q.read_msg();
            if msg.get("event").is_none() {
                break msg;
            }
            q.keep_event(msg);
        };
        assert!(greeting.get("QMP").is_some(), "greeting: {greeting}");
        q.execute("qmp_capabilities", serde_json::json!({}))
            .expect("qmp_capabilities");
        q
    }

    fn read_msg(&mut self) -> serde_json::Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read QMP");
        assert!(n > 0, "QMP connection closed");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad QMP line {line:?}: {e}"))
    }

    /// Runs a command; `Err` holds the error object.
    /// Sends a command whose reply may never come (the process may die running it): the
    /// reply, or `None` when the connection closes first.
    pub fn execute_or_disconnect(
        &mut self,
        cmd: &str,
        args: serde_json::Value,
    ) -> Option<Result<serde_json::Value, serde_json::Value>> {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.execute(cmd, args)));
        r.ok()
    }

    pub fn execute(
        &mut self,
        cmd: &str,
        args: serde_json::Value,
    ) -> Result<serde_json::Value, serde_json::Value> {
        use std::io::Write;
        let msg = serde_json::json!({"execute": cmd, "arguments": args});
        writeln!(self.writer, "{msg}").expect("write QMP");
        loop {
            let m = self.read_msg();
            if m.get("event").is_some() {
                self.keep_event(m);
                continue;
            }
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                return Err(e.clone());
            }
            panic!("unexpected QMP message {m}");
        }
    }

    /// Waits for an event (returns it), keeping earlier ones.
    pub fn wait_event(&mut self, name: &str) -> serde_json::Value {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return self.events.remove(i);
        }
        loop {
            let m = self.read_msg();
            if m["event"] == name {
                self.events_received += 1;
                return m;
            }
            if m.get("event").is_some() {
                self.keep_event(m);
            }
        }
    }

    /// Blocks until the next event arrives, and keeps it in [`Qmp::events`].
    pub fn receive_event(&mut self) {
        let m = self.read_msg();
        assert!(m.get("event").is_some(), "unexpected QMP message {m}");
        self.keep_event(m);
    }

    fn keep_event(&mut self, event: serde_json::Value) {
        self.events_received += 1;
        self.events.push(event);
    }
}

/// Forwards a child's stdout and stderr, line by line, to the test's stderr (prefixed) and to
/// the returned channel, each line with the wall-clock time it arrived (seconds since the epoch).
/// Lines are read as bytes: a serial console carries escape sequences that are not UTF-8.
pub fn forward_output(child: &mut Child, prefix: String) -> mpsc::Receiver<(f64, String)> {
    use std::io::Read;
    let (tx, rx) = mpsc::channel();
    let mut pipes: Vec<Box<dyn Read + Send>> = Vec::new();
    if let Some(p) = child.stdout.take() {
        pipes.push(Box::new(p));
    }
    if let Some(p) = child.stderr.take() {
        pipes.push(Box::new(p));
    }
    for pipe in pipes {
        let tx = tx.clone();
        let prefix = prefix.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(pipe);
            let mut buf = Vec::new();
            while r
                .read_until(b'\n', &mut buf)
                .map(|n| n > 0)
                .unwrap_or(false)
            {
                let line = String::from_utf8_lossy(&buf)
                    .trim_end_matches(['\r', '\n'])
                    .to_string();
                eprintln!("{prefix} {line}");
                buf.clear();
                if tx.send((wall_clock(), line)).is_err() {
                    break;
                }
            }
        });
    }
    rx
}

/// The wall-clock time in seconds since the Unix epoch (as QMP events' timestamps).
pub fn wall_clock() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether `bin` (a path, or a name looked up in PATH) is an existing file.
pub fn in_path(bin: &str) -> bool {
    if bin.contains('/') {
        return Path::new(bin).is_file();
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

/// Builds (or reuses) the QEMU test guest; `COLO_GUEST_DIR` points at a prebuilt one.
pub fn guest_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("COLO_GUEST_DIR") {
        return PathBuf::from(dir);
    }
    let dir = repo().join("qemu-scripts/guest");
    let mut cmd = Command::new("bash");
    cmd.arg(repo().join("qemu-scripts/build-guest.sh"))
        .arg(&dir);
    let mut build = qemu::Proc::spawn(cmd, "build-guest");
    let st = build.wait_exit(Duration::from_secs(600));
    assert!(st.success(), "qemu-scripts/build-guest.sh failed ({st})");
    dir
}

/// Starts `cmd` in its own process group (so the whole group can be killed), stdin closed,
/// with its output forwarded as by [`forward_output`].
pub fn spawn_group(cmd: Command, prefix: &str) -> (Child, mpsc::Receiver<(f64, String)>) {
    spawn_group_stdin(cmd, prefix, Stdio::null())
}

/// [`spawn_group`] with `stdin` as the child's standard input (e.g. a pipe to a guest's serial
/// console).
pub fn spawn_group_stdin(
    mut cmd: Command,
    prefix: &str,
    stdin: Stdio,
) -> (Child, mpsc::Receiver<(f64, String)>) {
    use std::os::unix::process::CommandExt;
    let mut child = cmd
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {prefix} {cmd:?}: {e}"));
    let rx = forward_output(&mut child, prefix.to_string());
    (child, rx)
}
