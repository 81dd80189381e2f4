//! `colo-blk supervise`: automatic failover with fencing under QEMU's x-colo, on the Secondary
//! VM's host (docs/colo-with-qemu.md, "Continuous fault tolerance"). It decides that the
//! primary is gone when both the COLO stream (the SVM's QEMU emitted `COLO_EXIT` with reason
//! `error`, or it saw no checkpoint for `--checkpoint-timeout-ms`: a host that stops answering
//! sends no reset) and the replication link (the secondary backend is not `connected`) have
//! been lost for `--loss-timeout-ms`; then it runs the fence command before anything else. A failed fence
//! means no takeover: a loud error, the survivor waits, the fence is retried. After a fence
//! that succeeded: `x-colo-lost-heartbeat`, QEMU out of COLO, the backend's own failover
//! (checked). One JSON line per step on stdout.
//!
//! ```text
//!  Watching ──both lost──► Lost{since} ──loss timeout──► precheck (backend can take over?)
//!     ▲  link back            │                            │ no: say so, keep waiting
//!     └───────────────────────┘                            ▼
//!                         FenceFailed{retry at} ◄──fail── fence ──ok──► take over ─► exit 0
//! ```

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::status::Client;

/// Options of `colo-blk supervise`.
#[derive(Debug, Clone, clap::Args)]
pub struct SuperviseArgs {
    /// A QMP socket of the Secondary VM's QEMU, for this supervisor alone (a QEMU QMP socket
    /// serves one client at a time)
    #[arg(long, value_name = "QMP")]
    pub qemu_qmp: PathBuf,

    /// QMP socket of the secondary backend (colo-blk --role secondary)
    #[arg(long, value_name = "QMP")]
    pub backend_qmp: PathBuf,

    /// Fences the primary's host (power switch, BMC, cloud API); run with `sh -c`, with
    /// COLO_FENCE_PEER set; exit status 0 = fenced. Required: no takeover without a fence
    #[arg(long, value_name = "CMD")]
    pub fence_cmd: String,

    /// How long both the COLO stream and the replication link must stay lost
    #[arg(long, value_name = "MS", default_value = "3000")]
    pub loss_timeout_ms: u64,

    /// The COLO stream also counts as lost when the Secondary VM saw no checkpoint (QEMU's
    /// RESUME of it) for this long: more than x-checkpoint-delay plus a checkpoint's time
    #[arg(long, value_name = "MS", default_value = "10000")]
    pub checkpoint_timeout_ms: u64,

    /// A fence command still running after this long has failed (it is killed)
    #[arg(long, value_name = "MS", default_value = "60000")]
    pub fence_timeout_ms: u64,

    /// After a failed fence, try again after this long (while the primary stays lost)
    #[arg(long, value_name = "MS", default_value = "5000")]
    pub fence_retry_ms: u64,

    /// How often the backend is asked for its link's state
    #[arg(long, value_name = "MS", default_value = "200")]
    pub poll_ms: u64,
}

/// Prints one JSON line (stdout, flushed).
fn emit(event: &str, mut data: Value) {
    if let Value::Object(o) = &mut data {
        o.insert("event".into(), json!(event));
        o.insert(
            "time".into(),
            json!(crate::replication::metrics::now_unix()),
        );
    }
    println!("{data}");
    let _ = std::io::stdout().flush();
}

/// A QMP client that keeps the events it reads (QEMU's `COLO_EXIT`).
struct EventQmp {
    writer: UnixStream,
    rx: mpsc::Receiver<Value>,
    events: Vec<Value>,
}

impl EventQmp {
    fn connect(path: &Path) -> Result<EventQmp, String> {
        let s = UnixStream::connect(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut reader = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if tx.send(v).is_err() {
                        break;
                    }
                }
                line.clear();
            }
        });
        let mut q = EventQmp {
            writer: s,
            rx,
            events: Vec::new(),
        };
        let greeting = q.next(Duration::from_secs(30))?;
        if greeting.get("QMP").is_none() {
            return Err(format!("not a QMP greeting: {greeting}"));
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn next(&self, timeout: Duration) -> Result<Value, String> {
        self.rx.recv_timeout(timeout).map_err(|e| match e {
            mpsc::RecvTimeoutError::Timeout => "QEMU did not answer within 30 s".to_string(),
            mpsc::RecvTimeoutError::Disconnected => "QEMU's QMP connection closed".to_string(),
        })
    }

    fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
        let msg = json!({"execute": cmd, "arguments": args});
        writeln!(self.writer, "{msg}").map_err(|e| format!("writing to QEMU: {e}"))?;
        loop {
            let m = self.next(Duration::from_secs(30))?;
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                return Err(format!("{cmd}: {}", e["desc"].as_str().unwrap_or("error")));
            }
            self.events.push(m);
        }
    }

    /// The events received so far (and drops them); an error once the connection closed.
    fn events(&mut self) -> Result<Vec<Value>, String> {
        loop {
            match self.rx.try_recv() {
                Ok(v) if v.get("event").is_some() => self.events.push(v),
                Ok(_) => {}
                Err(mpsc::TryRecvError::Empty) => return Ok(std::mem::take(&mut self.events)),
                Err(mpsc::TryRecvError::Disconnected) => {
                    return Err("the Secondary VM's QEMU closed its QMP connection".into())
                }
            }
        }
    }
}

/// Where the supervisor stands.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Watch {
    /// The primary is there (or only one of the two signs is lost).
    Watching,
    /// Both the COLO stream and the replication link lost since then.
    Lost { since: Instant },
    /// The fence failed; no takeover; tried again at `retry`.
    FenceFailed { retry: Instant },
}

/// Runs the command; the exit status (0 taken over, 1 failed or ended otherwise).
pub fn run(a: &SuperviseArgs) -> u8 {
    match supervise(a) {
        Ok(()) => 0,
        Err(e) => {
            emit("error", json!({"error": e}));
            eprintln!("colo-blk supervise: {e}");
            1
        }
    }
}

/// The signs of the primary, as last seen.
struct Signs {
    /// QEMU reported the COLO stream broken (`COLO_EXIT`, reason `error`).
    exited: bool,
    /// The Secondary VM's last checkpoint (its RESUME), or the supervisor's start.
    last_checkpoint: Instant,
    /// Said so once (`colo-stream-lost`), until a checkpoint comes again.
    said_lost: bool,
    link_up: bool,
    peer: String,
}

impl Signs {
    fn stream_lost(&self, a: &SuperviseArgs) -> bool {
        self.exited
            || self.last_checkpoint.elapsed() > Duration::from_millis(a.checkpoint_timeout_ms)
    }

    /// Says once that the stream is lost, and why.
    fn announce(&mut self, a: &SuperviseArgs) {
        if self.stream_lost(a) && !self.said_lost {
            self.said_lost = true;
            let why = if self.exited {
                "QEMU's COLO_EXIT (error)"
            } else {
                "no checkpoint within --checkpoint-timeout-ms"
            };
            emit("colo-stream-lost", json!({"why": why}));
        }
    }
}

fn supervise(a: &SuperviseArgs) -> Result<(), String> {
    let mut qemu = EventQmp::connect(&a.qemu_qmp)?;
    let mut backend = Client::connect(&a.backend_qmp, Duration::from_secs(30))
        .map_err(|e| format!("{}: {e}", a.backend_qmp.display()))?;
    let colo = qemu.execute("query-colo-status", json!({}))?;
    if colo["mode"] != "secondary" {
        return Err(format!(
            "the QEMU at {} is not a COLO secondary: {colo}",
            a.qemu_qmp.display()
        ));
    }
    let mut signs = Signs {
        exited: false,
        last_checkpoint: Instant::now(),
        said_lost: false,
        link_up: true,
        peer: String::new(),
    };
    let mut watch = Watch::Watching;
    let mut attempts = 0u32;
    emit("watching", json!({"loss-timeout-ms": a.loss_timeout_ms}));
    loop {
        observe(&mut qemu, &mut backend, &mut signs)?;
        signs.announce(a);
        watch = step(watch, &signs, a);
        let due = match watch {
            Watch::Lost { since } => since.elapsed() >= Duration::from_millis(a.loss_timeout_ms),
            Watch::FenceFailed { retry } => Instant::now() >= retry,
            Watch::Watching => false,
        };
        if due && can_take_over(&mut backend)? {
            attempts += 1;
            match fence(a, &signs.peer, attempts) {
                Ok(()) => return take_over(&mut qemu, &mut backend),
                Err(e) => {
                    emit("fence-failed", json!({"attempt": attempts, "error": e}));
                    eprintln!(
                        "colo-blk supervise: FENCE FAILED ({e}): NOT taking over; the Secondary \
                         VM waits, fence retried in {} ms",
                        a.fence_retry_ms
                    );
                    watch = Watch::FenceFailed {
                        retry: Instant::now() + Duration::from_millis(a.fence_retry_ms),
                    };
                }
            }
        }
        std::thread::sleep(Duration::from_millis(a.poll_ms));
    }
}

/// Reads QEMU's events and the backend's link state into `signs`.
fn observe(qemu: &mut EventQmp, backend: &mut Client, signs: &mut Signs) -> Result<(), String> {
    for e in qemu.events()? {
        if e["event"] == "RESUME" && !signs.exited {
            signs.last_checkpoint = Instant::now();
            if std::mem::take(&mut signs.said_lost) {
                emit("colo-stream-back", json!({}));
            }
        }
        if e["event"] == "COLO_EXIT" {
            let reason = e["data"]["reason"].as_str().unwrap_or("?");
            if reason != "error" {
                return Err(format!(
                    "COLO ended on this side without a failure ({e}): not supervising any more"
                ));
            }
            signs.exited = true;
        }
    }
    let st = backend.execute("query-replication")?;
    if st["state"] == "failed-over" {
        return Err("the secondary backend failed over without this supervisor".into());
    }
    let up = st["state"] == "connected";
    if up != signs.link_up {
        emit(
            if up { "link-back" } else { "link-lost" },
            json!({"last-error": st["last-error"]}),
        );
    }
    signs.link_up = up;
    if let Some(p) = st["peer-address"].as_str() {
        signs.peer = p.to_string();
    }
    Ok(())
}

/// The decision rule: lost when both signs are.
fn step(watch: Watch, signs: &Signs, a: &SuperviseArgs) -> Watch {
    let stream_lost = signs.stream_lost(a);
    let both = stream_lost && !signs.link_up;
    match watch {
        _ if !both => {
            if watch != Watch::Watching {
                emit("primary-back", json!({"stream-lost": stream_lost}));
            }
            if stream_lost && watch != Watch::Watching {
                eprintln!(
                    "colo-blk supervise: the COLO stream is lost but the replication link is \
                     up: not taking over (decide by hand)"
                );
            }
            Watch::Watching
        }
        Watch::Watching => {
            emit("primary-lost", json!({"decision-in-ms": a.loss_timeout_ms}));
            Watch::Lost {
                since: Instant::now(),
            }
        }
        w => w,
    }
}

/// Whether the backend would take over now (it holds a checkpoint that matches its VM);
/// otherwise says so (once per call) and the supervisor keeps waiting, without fencing.
fn can_take_over(backend: &mut Client) -> Result<bool, String> {
    let st = backend.execute("query-replication")?;
    let mismatch = st["colo"]["svm-mismatch"].as_str();
    if st["consistency"] != "consistent" || mismatch.is_some() {
        let why = mismatch.unwrap_or("the disk holds no checkpoint (inconsistent)");
        emit("cannot-take-over", json!({"why": why}));
        eprintln!("colo-blk supervise: the primary is lost but this side cannot take over: {why}");
        return Ok(false);
    }
    Ok(true)
}

/// Runs the fence command; `Ok` only for exit status 0 within the timeout.
fn fence(a: &SuperviseArgs, peer: &str, attempt: u32) -> Result<(), String> {
    emit("fencing", json!({"attempt": attempt, "peer": peer}));
    let t = Instant::now();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(&a.fence_cmd)
        .env("COLO_FENCE_PEER", peer)
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run the fence command: {e}"))?;
    let deadline = t + Duration::from_millis(a.fence_timeout_ms);
    loop {
        match child.try_wait() {
            Ok(Some(s)) if s.success() => {
                emit("fenced", json!({"ms": t.elapsed().as_millis() as u64}));
                return Ok(());
            }
            Ok(Some(s)) => return Err(format!("the fence command failed: {s}")),
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the fence command did not finish within {} ms (killed)",
                    a.fence_timeout_ms
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("waiting for the fence command: {e}")),
        }
    }
}

/// After a fence: `x-colo-lost-heartbeat`, QEMU out of COLO, the backend's failover.
fn take_over(qemu: &mut EventQmp, backend: &mut Client) -> Result<(), String> {
    let t = Instant::now();
    qemu.execute("x-colo-lost-heartbeat", json!({}))?;
    let deadline = t + Duration::from_secs(60);
    while qemu.execute("query-colo-status", json!({}))?["mode"] != "none" {
        if Instant::now() > deadline {
            return Err("QEMU did not leave COLO within 60 s of x-colo-lost-heartbeat".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out_ms = t.elapsed().as_millis() as u64;
    // QEMU switched dirty logging off on the SVM: the backend fails over by itself.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (st, manual) = loop {
        let st = backend.execute("query-replication")?;
        if st["state"] == "failed-over" && st["failover-remaining-bytes"] == 0 {
            break (st, false);
        }
        if Instant::now() > deadline {
            eprintln!("colo-blk supervise: the backend did not fail over by itself: sending replication-failover");
            backend.execute("replication-failover")?;
            break (backend.execute("query-replication")?, true);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    emit(
        "taken-over",
        json!({"left-colo-ms": out_ms, "epoch": st["epoch"], "manual": manual,
               "ms": t.elapsed().as_millis() as u64}),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(fence: &str, timeout_ms: u64) -> SuperviseArgs {
        SuperviseArgs {
            qemu_qmp: "/nonexistent/qemu.qmp".into(),
            backend_qmp: "/nonexistent/backend.qmp".into(),
            fence_cmd: fence.into(),
            loss_timeout_ms: 1000,
            checkpoint_timeout_ms: 60_000,
            fence_timeout_ms: timeout_ms,
            fence_retry_ms: 500,
            poll_ms: 10,
        }
    }

    fn signs(stream_lost: bool, link_up: bool) -> Signs {
        Signs {
            exited: stream_lost,
            last_checkpoint: Instant::now(),
            said_lost: false,
            link_up,
            peer: "h:1".into(),
        }
    }

    /// The rule: lost only when both the COLO stream and the link are; the link's return
    /// ends a loss (also after a failed fence).
    #[test]
    fn lost_only_when_both_are_lost() {
        let a = args("true", 1000);
        assert_eq!(
            step(Watch::Watching, &signs(true, true), &a),
            Watch::Watching
        );
        assert_eq!(
            step(Watch::Watching, &signs(false, false), &a),
            Watch::Watching
        );
        let lost = step(Watch::Watching, &signs(true, false), &a);
        assert!(matches!(lost, Watch::Lost { .. }));
        assert_eq!(
            step(lost, &signs(true, false), &a),
            lost,
            "the loss keeps its start"
        );
        assert_eq!(step(lost, &signs(true, true), &a), Watch::Watching);
        let failed = Watch::FenceFailed {
            retry: Instant::now(),
        };
        assert_eq!(step(failed, &signs(true, false), &a), failed);
        assert_eq!(step(failed, &signs(true, true), &a), Watch::Watching);
    }

    /// A stream that goes silent (no checkpoint for the timeout) is lost like a broken one:
    /// a host that stops answering sends no reset.
    #[test]
    fn a_silent_stream_is_lost() {
        let mut a = args("true", 1000);
        a.checkpoint_timeout_ms = 50;
        let mut s = signs(false, false);
        assert!(!s.stream_lost(&a));
        s.last_checkpoint = Instant::now() - Duration::from_millis(51);
        assert!(s.stream_lost(&a));
        assert!(matches!(step(Watch::Watching, &s, &a), Watch::Lost { .. }));
        s.last_checkpoint = Instant::now();
        assert_eq!(step(Watch::Watching, &s, &a), Watch::Watching);
    }

    /// Only exit status 0 within the timeout is a fence; the peer is in the environment.
    #[test]
    fn a_fence_succeeds_only_with_status_zero_in_time() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("peer");
        let ok = args(
            &format!("echo \"$COLO_FENCE_PEER\" >{}", out.display()),
            10_000,
        );
        fence(&ok, "10.0.0.1:7790", 1).unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "10.0.0.1:7790\n");
        let e = fence(&args("exit 3", 10_000), "p", 1).unwrap_err();
        assert!(e.contains("failed") && e.contains('3'), "{e}");
        let e = fence(&args("sleep 30", 100), "p", 1).unwrap_err();
        assert!(e.contains("did not finish within 100 ms"), "{e}");
        let e = fence(&args("/nonexistent/fence", 10_000), "p", 1).unwrap_err();
        assert!(e.contains("failed"), "{e}");
    }

    /// A socket that is not there, or not QMP, is a clear error (exit status 1), no panic.
    #[test]
    fn bad_sockets_are_clear_errors() {
        assert_eq!(run(&args("true", 1000)), 1);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not-qmp.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                // Buffered before the close: the client reads it first.
                let _ = s.write_all(b"{\"hello\": 1}\n");
            }
        });
        let mut a = args("true", 1000);
        a.qemu_qmp = path;
        let e = supervise(&a).unwrap_err();
        assert!(e.contains("not a QMP greeting"), "{e}");
    }
}
