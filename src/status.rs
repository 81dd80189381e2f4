//! `colo-blk status QMP...`: one screen about one or more running colo-blk processes, like
//! `drbdadm status`: role, peer and link, protection (in sync / resyncing / unprotected since),
//! epoch, age of the last checkpoint, bytes since, window fill, layer sizes, device counters.
//!
//! It asks each QMP socket for `query-replication` and `query-stats`. `--json` prints the
//! answers (plus what this command derives from them) as one JSON object per refresh;
//! `--watch [SECS]` refreshes until interrupted. On a terminal, long operations get an
//! `indicatif` progress bar; otherwise they are plain lines.
//!
//! Progress is found by convention, so that a new long operation needs no change here: a
//! `query-replication` answer holding `X-total-bytes` and `X-remaining-bytes` (or
//! `X-done-bytes`) with work left is operation `X` (today `resync` on the primary and
//! `failover` on the secondary), `X-started-at` (seconds since the epoch) gives its rate and
//! ETA.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Map, Value};

use crate::replication::metrics::now_unix;

/// Options of `colo-blk status`.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// QMP sockets of colo-blk processes (--qmp of each), e.g. /run/colo/p.qmp /run/colo/s.qmp
    #[arg(value_name = "QMP")]
    pub sockets: Vec<PathBuf>,

    /// Print JSON (one object per refresh) instead of the text screen
    #[arg(long)]
    pub json: bool,

    /// Refresh every SECS seconds (default 2) until interrupted. Give SECS as --watch=SECS,
    /// or before the sockets
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2")]
    pub watch: Option<String>,

    /// How long to wait for each socket's answers
    #[arg(long, value_name = "MS", default_value = "5000")]
    pub timeout_ms: u64,
}

impl StatusArgs {
    /// The refresh interval, and the sockets. `--watch /run/p.qmp` took a socket path as
    /// SECS: it is given back to the sockets.
    pub fn resolve(&self) -> Result<(Option<Duration>, Vec<PathBuf>), String> {
        let mut sockets = self.sockets.clone();
        let watch = match &self.watch {
            None => None,
            Some(v) => match v.parse::<f64>() {
                Ok(s) if s > 0.0 && s.is_finite() => Some(Duration::from_secs_f64(s)),
                Ok(_) => return Err("--watch: SECS must be positive".into()),
                Err(_) => {
                    sockets.insert(0, PathBuf::from(v));
                    Some(Duration::from_secs(2))
                }
            },
        };
        if sockets.is_empty() {
            return Err(
                "name at least one QMP socket (the --qmp PATH of a colo-blk process)".into(),
            );
        }
        Ok((watch, sockets))
    }
}

/// A small synchronous QMP client (also `colo-blk reprotect`'s).
pub(crate) struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    pub(crate) fn connect(path: &Path, timeout: Duration) -> Result<Client, String> {
        let s = UnixStream::connect(path).map_err(|e| format!("cannot connect: {e}"))?;
        s.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let mut c = Client {
            reader: BufReader::new(s.try_clone().map_err(|e| e.to_string())?),
            writer: s,
        };
        let greeting = c.read()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("not a QMP greeting: {greeting}"));
        }
        c.execute("qmp_capabilities")?;
        Ok(c)
    }

    fn read(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("connection closed".into()),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("bad QMP line: {e}")),
            Err(e) => Err(format!("reading: {e}")),
        }
    }

    pub(crate) fn execute(&mut self, cmd: &str) -> Result<Value, String> {
        self.execute_with(cmd, json!({}))
    }

    /// Runs `cmd` with `args`; events that arrive meanwhile are skipped.
    pub(crate) fn execute_with(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
        let msg = json!({ "execute": cmd, "arguments": args });
        writeln!(self.writer, "{msg}").map_err(|e| format!("writing: {e}"))?;
        loop {
            let m = self.read()?;
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                return Err(format!("{cmd}: {}", e["desc"].as_str().unwrap_or("error")));
            }
            // Events are skipped.
        }
    }
}

/// A long operation in progress.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub what: String,
    pub total: u64,
    pub done: u64,
    /// Bytes per second since it started, when known.
    pub rate: Option<f64>,
}

impl Progress {
    pub fn percent(&self) -> f64 {
        if self.total == 0 {
            100.0
        } else {
            self.done as f64 * 100.0 / self.total as f64
        }
    }

    pub fn eta_seconds(&self) -> Option<f64> {
        match self.rate {
            Some(r) if r > 0.0 => Some((self.total - self.done) as f64 / r),
            _ => None,
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "what": self.what,
            "total-bytes": self.total,
            "done-bytes": self.done,
            "percent": (self.percent() * 10.0).round() / 10.0,
            "rate-bytes-per-second": self.rate.map(|r| r.round()),
            "eta-seconds": self.eta_seconds().map(|e| e.round()),
        })
    }
}

fn u(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn f(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn s<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// The operations in progress in a `query-replication` answer (see the module comment).
pub fn progress_of(rep: &Value, now: f64) -> Vec<Progress> {
    let Some(obj) = rep.as_object() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for key in obj.keys() {
        let Some(what) = key.strip_suffix("-total-bytes") else {
            continue;
        };
        let total = u(rep, key);
        let done = if let Some(r) = obj
            .get(&format!("{what}-remaining-bytes"))
            .and_then(Value::as_u64)
        {
            total.saturating_sub(r)
        } else if let Some(d) = obj
            .get(&format!("{what}-done-bytes"))
            .and_then(Value::as_u64)
        {
            d.min(total)
        } else {
            continue;
        };
        if total == 0 || done >= total {
            continue;
        }
        let rate = f(rep, &format!("{what}-started-at"))
            .map(|t| now - t)
            .filter(|&el| el > 0.05)
            .map(|el| done as f64 / el);
        out.push(Progress {
            what: what.to_string(),
            total,
            done,
            rate,
        });
    }
    out
}

/// One socket's answers, or why there are none.
#[derive(Debug, Clone)]
pub struct Report {
    pub socket: PathBuf,
    pub answer: Result<(Value, Value), String>,
}

/// Asks one socket for `query-replication` and `query-stats`.
pub fn query(socket: &Path, timeout: Duration) -> Report {
    let answer = Client::connect(socket, timeout).and_then(|mut c| {
        let rep = c.execute("query-replication")?;
        let stats = c.execute("query-stats")?;
        Ok((rep, stats))
    });
    Report {
        socket: socket.to_path_buf(),
        answer,
    }
}

/// In one word: `standalone`, `in-sync`, `resyncing`, `unprotected`, `receiving`, `waiting`,
/// `failing-over`, `failed-over` (or `unreachable`).
pub fn summary(rep: &Value) -> &'static str {
    let state = s(rep, "state").unwrap_or("");
    match (s(rep, "role"), state) {
        (Some("primary"), "connected") if u(rep, "resync-remaining-bytes") > 0 => "resyncing",
        (Some("primary"), "connected") if rep["unprotected-since"].is_null() => "in-sync",
        (Some("primary"), "connected") => "resyncing",
        (Some("primary"), _) => "unprotected",
        (Some("secondary"), "connected") => "receiving",
        (Some("secondary"), "failed-over") if u(rep, "failover-remaining-bytes") > 0 => {
            "failing-over"
        }
        (Some("secondary"), "failed-over") => "failed-over",
        (Some("secondary"), _) => "waiting",
        _ => "standalone",
    }
}

/// Whether the VM this disk serves is protected (both hosts answer the same way):
/// `protected`, `re-protecting` (a resync or a failback whose first checkpoint is still to
/// come, with the resync's percent), `unprotected` (since when, if known) or `none`
/// (standalone).
#[derive(Debug, Clone, PartialEq)]
pub struct Protection {
    pub state: &'static str,
    pub since: Option<f64>,
    pub percent: Option<f64>,
}

pub fn protection(rep: &Value, now: f64) -> Protection {
    let since = f(rep, "unprotected-since");
    let percent = || {
        let total = u(rep, "resync-total-bytes");
        let left = u(rep, "resync-remaining-bytes").min(total);
        Some(
            match progress_of(rep, now)
                .into_iter()
                .find(|p| p.what == "resync")
            {
                Some(p) => p.percent(),
                None if total > 0 => (total - left) as f64 * 100.0 / total as f64,
                None => 100.0,
            },
        )
    };
    let (state, since, percent) = match summary(rep) {
        "in-sync" => ("protected", None, None),
        "resyncing" => ("re-protecting", since, percent()),
        "unprotected" | "waiting" => ("unprotected", since, None),
        "receiving" if rep["consistency"] == "inconsistent" => ("re-protecting", None, None),
        "receiving" => ("protected", None, None),
        "failing-over" | "failed-over" => {
            ("unprotected", f(rep, "failover-started-at").or(since), None)
        }
        _ => ("none", None, None),
    };
    Protection {
        state,
        since,
        percent,
    }
}

/// The protection line of the text screen.
fn protection_line(rep: &Value, now: f64) -> String {
    let p = protection(rep, now);
    let mut line = format!("  protection: {}", p.state.to_uppercase());
    if let Some(pc) = p.percent {
        line.push_str(&format!(
            " (resync {pc:.1}%, protected at the first checkpoint)"
        ));
    }
    if let Some(t) = p.since {
        line.push_str(&format!(" since {} ({} ago)", utc(t), duration(now - t)));
    }
    line.push('\n');
    line
}

/// The JSON of one report (what `--json` prints per socket).
pub fn report_json(r: &Report, now: f64) -> Value {
    match &r.answer {
        Err(e) => json!({"qmp": r.socket, "summary": "unreachable", "error": e}),
        Ok((rep, stats)) => {
            let mut o = Map::new();
            o.insert("qmp".into(), json!(r.socket));
            o.insert(
                "role".into(),
                rep.get("role").cloned().unwrap_or(Value::Null),
            );
            o.insert("summary".into(), json!(summary(rep)));
            let p = protection(rep, now);
            o.insert(
                "protection".into(),
                json!({"state": p.state, "since": p.since, "percent": p.percent}),
            );
            if let Some(t) = f(rep, "last-checkpoint-at") {
                o.insert("last-checkpoint-age-seconds".into(), json!(now - t));
            }
            if let Some(t) = f(rep, "unprotected-since") {
                o.insert("unprotected-for-seconds".into(), json!(now - t));
            }
            let progress: Vec<Value> = progress_of(rep, now)
                .iter()
                .map(Progress::to_json)
                .collect();
            o.insert("progress".into(), Value::Array(progress));
            o.insert("replication".into(), rep.clone());
            o.insert("stats".into(), stats.clone());
            Value::Object(o)
        }
    }
}

/// `1536` → `1.5 KiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// `3725.2` → `1h02m`, `75` → `1m15s`, `0.42` → `0.4s`.
pub fn duration(secs: f64) -> String {
    let secs = secs.max(0.0);
    if secs < 10.0 {
        return format!("{secs:.1}s");
    }
    let t = secs.round() as u64;
    match t {
        0..=59 => format!("{t}s"),
        60..=3599 => format!("{}m{:02}s", t / 60, t % 60),
        3600..=86399 => format!("{}h{:02}m", t / 3600, t % 3600 / 60),
        _ => format!("{}d{:02}h", t / 86400, t % 86400 / 3600),
    }
}

/// Seconds since the epoch as `2025-01-31T12:34:56Z`.
pub fn utc(ts: f64) -> String {
    let t = ts.max(0.0) as i64;
    let (days, rem) = (t.div_euclid(86400), t.rem_euclid(86400));
    // Civil from days (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The progress line of an operation (the plain form of its bar).
pub fn progress_line(p: &Progress) -> String {
    let mut line = format!(
        "{} {:.1}% ({} of {})",
        p.what,
        p.percent(),
        bytes(p.done),
        bytes(p.total)
    );
    if let Some(r) = p.rate {
        line.push_str(&format!(", {}/s", bytes(r as u64)));
    }
    if let Some(e) = p.eta_seconds() {
        line.push_str(&format!(", ETA {}", duration(e)));
    }
    line
}

/// The text screen of one report. Progress lines are included when `with_progress`.
pub fn report_text(r: &Report, now: f64, with_progress: bool) -> String {
    let mut out = String::new();
    let (rep, stats) = match &r.answer {
        Err(e) => return format!("{}: unreachable: {e}\n", r.socket.display()),
        Ok(a) => a,
    };
    let role = s(rep, "role").unwrap_or("?");
    let mut head = format!("{} role:{role}", r.socket.display());
    if role != "standalone" {
        head.push_str(&format!(" epoch:{}", u(rep, "epoch")));
    }
    out.push_str(&head);
    out.push('\n');
    if role != "standalone" {
        out.push_str(&protection_line(rep, now));
    }
    match role {
        "primary" => primary_text(rep, now, &mut out),
        "secondary" => secondary_text(rep, now, &mut out),
        _ => {}
    }
    device_text(stats, &mut out);
    if with_progress {
        for p in progress_of(rep, now) {
            out.push_str(&format!("  {}\n", progress_line(&p)));
        }
    }
    out
}

/// When `key` (a timestamp of `rep`) was: in UTC, and how long before `now`.
fn ago(rep: &Value, now: f64, key: &str) -> Option<(String, String)> {
    f(rep, key).map(|t| (utc(t), duration(now - t)))
}

/// A primary's lines of the screen: its link, its disk's protection, checkpoints, window.
fn primary_text(rep: &Value, now: f64, out: &mut String) {
    let peer = s(rep, "peer-address").or(s(rep, "peer")).unwrap_or("?");
    out.push_str(&format!(
        "  peer {peer} link:{} mode:{} sessions:{} link-errors:{}\n",
        s(rep, "state").unwrap_or("?"),
        s(rep, "mode").unwrap_or("?"),
        u(rep, "sessions"),
        u(rep, "link-errors"),
    ));
    let prot = match summary(rep) {
        "in-sync" => "in sync (protected)".to_string(),
        "resyncing" => "resyncing (unprotected until it completes)".to_string(),
        _ => "UNPROTECTED".to_string(),
    };
    let since = match ago(rep, now, "unprotected-since") {
        Some((at, d)) if summary(rep) != "in-sync" => format!(" since {at} ({d} ago)"),
        _ => String::new(),
    };
    out.push_str(&format!("  disk: {prot}{since}\n"));
    if let Some(e) = s(rep, "last-error").filter(|_| summary(rep) != "in-sync") {
        out.push_str(&format!("  last error: {e}\n"));
    }
    let cp = match ago(rep, now, "last-checkpoint-at") {
        Some((_, d)) => format!("{d} ago"),
        None => "none yet".into(),
    };
    let window = u(rep, "window-bytes");
    let inflight = u(rep, "bytes-in-flight");
    let fill = if window > 0 {
        inflight as f64 * 100.0 / window as f64
    } else {
        0.0
    };
    // Under QEMU's COLO every device stop ends an epoch; the secondary tells which
    // were checkpoints and which other stops (a user stop).
    let markers = match u(rep, "markers") {
        0 => String::new(),
        m => format!(" (markers:{m}: checkpoints and other stops, see the secondary)"),
    };
    out.push_str(&format!(
        "  last checkpoint: {cp}, {} sent since, {} dirty; checkpoints:{} failed:{}{markers}\n",
        bytes(u(rep, "bytes-sent-since-checkpoint")),
        bytes(u(rep, "dirty-bytes")),
        u(rep, "checkpoints"),
        u(rep, "checkpoint-failures"),
    ));
    out.push_str(&format!(
        "  window: {fill:.1}% ({} of {} in flight), sent {} acked {}\n",
        bytes(inflight),
        bytes(window),
        bytes(u(rep, "bytes-sent-total")),
        bytes(u(rep, "bytes-acked-total")),
    ));
}

/// A secondary's lines of the screen: its link, its disk, checkpoints and COLO stops, layers.
fn secondary_text(rep: &Value, now: f64, out: &mut String) {
    let peer = s(rep, "peer-address").unwrap_or("-");
    out.push_str(&format!(
        "  peer {peer} link:{} listen:{} sessions:{} link-errors:{}\n",
        s(rep, "state").unwrap_or("?"),
        s(rep, "listen").unwrap_or("?"),
        u(rep, "sessions"),
        u(rep, "link-errors"),
    ));
    let state = match summary(rep) {
        "receiving" => "receiving the primary's stream".to_string(),
        "failing-over" => "FAILING OVER (committing the layers)".to_string(),
        "failed-over" => "failed over: the disk is this side's own".to_string(),
        _ => match ago(rep, now, "unprotected-since") {
            Some((at, d)) => format!("waiting for the primary since {at} ({d} ago)"),
            None => "waiting for the primary".to_string(),
        },
    };
    out.push_str(&format!("  disk: {state}\n"));
    if let Some(e) = s(rep, "last-error").filter(|_| summary(rep) != "receiving") {
        out.push_str(&format!("  last error: {e}\n"));
    }
    let cp = match ago(rep, now, "last-checkpoint-at") {
        Some((_, d)) => format!("{d} ago"),
        None => "none yet".into(),
    };
    let colo = rep.get("colo").cloned().unwrap_or_default();
    out.push_str(&format!(
        "  last checkpoint: {cp}, {} received since; checkpoints:{} stops:{}\n",
        bytes(u(rep, "bytes-received-since-checkpoint")),
        u(rep, "checkpoints"),
        u(&colo, "stops"),
    ));
    if let Some(why) = s(&colo, "svm-mismatch") {
        out.push_str(&format!(
            "  SECONDARY VM: its memory does not match its disk, failover refused: {why}\n"
        ));
    }
    out.push_str(&format!(
        "  layers: hidden {}, active {} (cluster {})\n",
        bytes(u(rep, "hidden-bytes")),
        bytes(u(rep, "active-bytes")),
        bytes(u(rep, "cluster-size")),
    ));
}

/// The device line: every queue's counters summed (none when the device has no queue).
fn device_text(stats: &Value, out: &mut String) {
    if let Some(queues) = stats.get("queues").and_then(Value::as_array) {
        if !queues.is_empty() {
            let sum = |k: &str| queues.iter().map(|q| u(q, k)).sum::<u64>();
            out.push_str(&format!(
                "  device: {} queues, {} requests ({} errors), {} read, {} written\n",
                queues.len(),
                sum("requests"),
                sum("errors") + sum("malformed"),
                bytes(sum("bytes-read")),
                bytes(sum("bytes-written")),
            ));
        }
    }
}

/// Runs `colo-blk status`; returns the process exit code (1 when a socket did not answer).
pub fn run(args: &StatusArgs) -> u8 {
    let (watch, sockets) = match args.resolve() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("colo-blk status: {e}");
            return 2;
        }
    };
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let tty = std::io::stdout().is_terminal();
    let mut screen = Screen::new(tty && !args.json && watch.is_some());
    loop {
        let reports: Vec<Report> = sockets.iter().map(|s| query(s, timeout)).collect();
        let now = now_unix();
        let failed = reports.iter().any(|r| r.answer.is_err());
        if args.json {
            let doc = json!({
                "time": now,
                "disks": reports.iter().map(|r| report_json(r, now)).collect::<Vec<_>>(),
            });
            println!("{doc}");
        } else if screen.live() {
            screen.draw(&reports, now);
        } else {
            let mut out = String::new();
            for r in &reports {
                out.push_str(&report_text(r, now, !tty));
            }
            print!("{out}");
            if tty {
                // One-shot on a terminal: the operations as bars, drawn once.
                for r in &reports {
                    if let Ok((rep, _)) = &r.answer {
                        for p in progress_of(rep, now) {
                            let bar = new_bar(ProgressDrawTarget::stdout(), &p);
                            bar.abandon();
                        }
                    }
                }
            }
            if watch.is_some() {
                println!();
            }
        }
        let _ = std::io::stdout().flush();
        match watch {
            Some(d) => std::thread::sleep(d),
            None => return u8::from(failed),
        }
    }
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("  {prefix:<10} [{bar:40}] {percent:>3}% {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

fn new_bar(target: ProgressDrawTarget, p: &Progress) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(p.total), target);
    bar.set_style(bar_style());
    update_bar(&bar, p);
    bar
}

fn update_bar(bar: &ProgressBar, p: &Progress) {
    bar.set_length(p.total);
    bar.set_position(p.done);
    bar.set_prefix(p.what.clone());
    let mut msg = format!("{} of {}", bytes(p.done), bytes(p.total));
    if let Some(r) = p.rate {
        msg.push_str(&format!(" {}/s", bytes(r as u64)));
    }
    if let Some(e) = p.eta_seconds() {
        msg.push_str(&format!(" ETA {}", duration(e)));
    }
    bar.set_message(msg);
}

/// The live `--watch` screen on a terminal: per socket, a text block and a bar for each
/// operation in progress, redrawn in place.
struct Screen {
    multi: Option<MultiProgress>,
    /// Per socket: its text block and its operations' bars.
    blocks: Vec<(ProgressBar, HashMap<String, ProgressBar>)>,
}

impl Screen {
    fn new(live: bool) -> Screen {
        Screen {
            multi: live.then(MultiProgress::new),
            blocks: Vec::new(),
        }
    }

    fn live(&self) -> bool {
        self.multi.is_some()
    }

    fn draw(&mut self, reports: &[Report], now: f64) {
        let Some(multi) = &self.multi else {
            return;
        };
        while self.blocks.len() < reports.len() {
            let text = multi.add(ProgressBar::new_spinner());
            text.set_style(
                ProgressStyle::with_template("{msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            self.blocks.push((text, HashMap::new()));
        }
        for (r, (text, bars)) in reports.iter().zip(&mut self.blocks) {
            text.set_message(report_text(r, now, false).trim_end().to_string());
            let ops = match &r.answer {
                Ok((rep, _)) => progress_of(rep, now),
                Err(_) => Vec::new(),
            };
            bars.retain(|what, bar| {
                let keep = ops.iter().any(|p| &p.what == what);
                if !keep {
                    bar.finish_and_clear();
                    multi.remove(bar);
                }
                keep
            });
            for p in &ops {
                match bars.get(&p.what) {
                    Some(bar) => update_bar(bar, p),
                    None => {
                        let bar =
                            multi.insert_after(text, new_bar(ProgressDrawTarget::hidden(), p));
                        bars.insert(p.what.clone(), bar);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_by_convention() {
        let rep = json!({
            "role": "primary", "state": "connected",
            "resync-total-bytes": 1000, "resync-remaining-bytes": 250, "resync-started-at": 100.0,
            "verify-total-bytes": 10, "verify-done-bytes": 5,
            "failover-total-bytes": 0, "failover-remaining-bytes": 0,
        });
        let mut p = progress_of(&rep, 110.0);
        p.sort_by(|a, b| a.what.cmp(&b.what));
        assert_eq!(p.len(), 2);
        assert_eq!(
            (p[0].what.as_str(), p[0].done, p[0].total),
            ("resync", 750, 1000)
        );
        assert_eq!(p[0].rate, Some(75.0));
        assert_eq!(p[0].eta_seconds(), Some(250.0 / 75.0));
        assert_eq!((p[1].what.as_str(), p[1].percent()), ("verify", 50.0));
        assert_eq!(summary(&rep), "resyncing");
        assert!(progress_line(&p[0]).starts_with("resync 75.0% (750 B of 1000 B), 75 B/s, ETA"));
    }

    /// Under QEMU's COLO a stop of the primary that is not a checkpoint is counted apart, and
    /// a Secondary VM whose memory does not match its disk is said so.
    #[test]
    fn colo_stops_are_counted_apart_from_checkpoints() {
        let report = |rep: Value| Report {
            socket: "/s.qmp".into(),
            answer: Ok((rep, json!({}))),
        };
        let p = report_text(
            &report(json!({"role": "primary", "epoch": 5, "checkpoints": 5, "markers": 5})),
            0.0,
            false,
        );
        assert!(
            p.contains("checkpoints:5 failed:0 (markers:5: checkpoints and other stops"),
            "{p}"
        );
        let colo = json!({"stops": 1, "cuts": [5], "svm-mismatch": "queue 0 at 13"});
        let s = report_text(
            &report(json!({"role": "secondary", "epoch": 5, "checkpoints": 4, "colo": colo})),
            0.0,
            false,
        );
        assert!(s.contains("checkpoints:4 stops:1"), "{s}");
        assert!(
            s.contains("memory does not match its disk, failover refused: queue 0 at 13"),
            "{s}"
        );
    }

    /// `protection` on both hosts: a survivor after its failover, the promoted survivor
    /// resyncing, the new secondary before and after its first checkpoint.
    #[test]
    fn protection_through_a_reprotect() {
        let failed = json!({"role": "secondary", "state": "failed-over",
                            "failover-started-at": 50.0, "unprotected-since": 40.0});
        let p = protection(&failed, 100.0);
        assert_eq!((p.state, p.since), ("unprotected", Some(50.0)));
        let resync = json!({"role": "primary", "state": "connected", "unprotected-since": 50.0,
                            "resync-total-bytes": 400, "resync-remaining-bytes": 100,
                            "resync-started-at": 90.0});
        let p = protection(&resync, 100.0);
        assert_eq!((p.state, p.percent), ("re-protecting", Some(75.0)));
        let waiting_cp = json!({"role": "primary", "state": "connected", "unprotected-since": 50.0,
                                "resync-total-bytes": 400, "resync-remaining-bytes": 0});
        assert_eq!(protection(&waiting_cp, 100.0).percent, Some(100.0));
        let synced = json!({"role": "primary", "state": "connected"});
        assert_eq!(protection(&synced, 100.0).state, "protected");
        let target =
            json!({"role": "secondary", "state": "connected", "consistency": "inconsistent"});
        assert_eq!(protection(&target, 100.0).state, "re-protecting");
        let r = Report {
            socket: "/s.qmp".into(),
            answer: Ok((resync, json!({}))),
        };
        let text = report_text(&r, 100.0, false);
        assert!(
            text.contains("protection: RE-PROTECTING (resync 75.0%"),
            "{text}"
        );
        assert_eq!(
            report_json(&r, 100.0)["protection"]["state"],
            "re-protecting"
        );
    }

    #[test]
    fn formats() {
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(10), "10 B");
        assert_eq!(duration(75.0), "1m15s");
        assert_eq!(duration(0.42), "0.4s");
        assert_eq!(duration(3725.0), "1h02m");
        assert_eq!(utc(0.0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(1_709_210_096.0), "2024-02-29T12:34:56Z");
    }

    #[test]
    fn watch_takes_back_a_socket_path() {
        let a = StatusArgs {
            sockets: vec!["/b".into()],
            json: false,
            watch: Some("/a".into()),
            timeout_ms: 1,
        };
        let (w, s) = a.resolve().unwrap();
        assert_eq!(w, Some(Duration::from_secs(2)));
        assert_eq!(s, vec![PathBuf::from("/a"), PathBuf::from("/b")]);
    }

    /// The whole text screen of each role, byte for byte (a primary resyncing with a last
    /// error, a secondary failing over with a Secondary VM that does not match, a standalone
    /// device, an unreachable socket).
    #[test]
    fn report_text_is_pinned() {
        let report = |rep: Value, stats: Value| Report {
            socket: "/s.qmp".into(),
            answer: Ok((rep, stats)),
        };
        let queues = json!({"queues": [
            {"requests": 10, "errors": 1, "malformed": 1, "bytes-read": 4096, "bytes-written": 1536},
            {"requests": 5, "errors": 0, "malformed": 0, "bytes-read": 0, "bytes-written": 512},
        ]});
        let primary = json!({"role": "primary", "epoch": 7, "peer-address": "10.0.0.2:9000",
            "state": "connected", "mode": "colo", "sessions": 3, "link-errors": 2,
            "unprotected-since": 1000.0, "last-error": "link reset",
            "last-checkpoint-at": 1090.0, "window-bytes": 4096, "bytes-in-flight": 1024,
            "markers": 4, "bytes-sent-since-checkpoint": 2048, "dirty-bytes": 65536,
            "checkpoints": 9, "checkpoint-failures": 1, "bytes-sent-total": 1 << 30,
            "bytes-acked-total": 1 << 20, "resync-total-bytes": 1000,
            "resync-remaining-bytes": 250, "resync-started-at": 1050.0});
        let secondary = json!({"role": "secondary", "epoch": 8, "state": "failed-over",
            "listen": "0.0.0.0:9000", "sessions": 1, "link-errors": 0,
            "failover-started-at": 1080.0, "failover-total-bytes": 100,
            "failover-remaining-bytes": 40, "last-error": "peer gone",
            "bytes-received-since-checkpoint": 3000, "checkpoints": 6,
            "hidden-bytes": 131072, "active-bytes": 0, "cluster-size": 65536,
            "colo": {"stops": 2, "svm-mismatch": "queue 0 at 13"}});
        let waiting = json!({"role": "secondary", "epoch": 0, "state": "listening"});
        let standalone = json!({"role": "standalone"});
        let mut all = String::new();
        for (rep, progress) in [
            (primary, true),
            (secondary, true),
            (waiting, false),
            (standalone, false),
        ] {
            all.push_str(&report_text(&report(rep, queues.clone()), 1100.0, progress));
        }
        all.push_str(&report_text(
            &Report {
                socket: "/gone.qmp".into(),
                answer: Err("connection refused".into()),
            },
            1100.0,
            true,
        ));
        assert_eq!(all, PINNED);
    }

    const PINNED: &str = r#"/s.qmp role:primary epoch:7
  protection: RE-PROTECTING (resync 75.0%, protected at the first checkpoint) since 1970-01-01T00:16:40Z (1m40s ago)
  peer 10.0.0.2:9000 link:connected mode:colo sessions:3 link-errors:2
  disk: resyncing (unprotected until it completes) since 1970-01-01T00:16:40Z (1m40s ago)
  last error: link reset
  last checkpoint: 10s ago, 2.0 KiB sent since, 64.0 KiB dirty; checkpoints:9 failed:1 (markers:4: checkpoints and other stops, see the secondary)
  window: 25.0% (1.0 KiB of 4.0 KiB in flight), sent 1.0 GiB acked 1.0 MiB
  device: 2 queues, 15 requests (2 errors), 4.0 KiB read, 2.0 KiB written
  resync 75.0% (750 B of 1000 B), 15 B/s, ETA 17s
/s.qmp role:secondary epoch:8
  protection: UNPROTECTED since 1970-01-01T00:18:00Z (20s ago)
  peer - link:failed-over listen:0.0.0.0:9000 sessions:1 link-errors:0
  disk: FAILING OVER (committing the layers)
  last error: peer gone
  last checkpoint: none yet, 2.9 KiB received since; checkpoints:6 stops:2
  SECONDARY VM: its memory does not match its disk, failover refused: queue 0 at 13
  layers: hidden 128.0 KiB, active 0 B (cluster 64.0 KiB)
  device: 2 queues, 15 requests (2 errors), 4.0 KiB read, 2.0 KiB written
  failover 60.0% (60 B of 100 B), 3 B/s, ETA 13s
/s.qmp role:secondary epoch:0
  protection: UNPROTECTED
  peer - link:listening listen:? sessions:0 link-errors:0
  disk: waiting for the primary
  last checkpoint: none yet, 0 B received since; checkpoints:0 stops:0
  layers: hidden 0 B, active 0 B (cluster 0 B)
  device: 2 queues, 15 requests (2 errors), 4.0 KiB read, 2.0 KiB written
/s.qmp role:standalone
  device: 2 queues, 15 requests (2 errors), 4.0 KiB read, 2.0 KiB written
/gone.qmp: unreachable: connection refused
"#;
}
