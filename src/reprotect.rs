//! `colo-blk reprotect`: drives a re-protect after a failover (docs/user-guide.md, "Failing
//! back"; under QEMU's x-colo docs/colo-with-qemu.md, "Continuous fault tolerance"). The old
//! primary's disk must already run as `--role secondary --discard-my-data` (its own process,
//! on its host, with a new Secondary VM's QEMU waiting with `-incoming` under x-colo); this
//! command talks to the survivor (and optionally checks the target):
//!
//! ```text
//!  survivor failed over? ── yes ─► replication-promote {"peer": PEER}   (in place, the VM runs)
//!            │ already a primary of PEER (promoted earlier, or restarted): nothing to do
//!  poll query-replication ─► "resync: P% (N of M), R/s, ETA" lines until connected and resynced
//!  disk-only: replication-checkpoint ─► both disks equal: the first checkpoint of the new pair
//!  --x-colo:  [--qemu-qmp: x-colo capabilities + migrate on the survivor's QEMU, wait "colo"]
//!             wait for QEMU's first COLO checkpoint (the target's checkpoints, or two MARKERs)
//!  (--target QMP: its consistency must now be "consistent")
//!  stdout: {"reprotected": true, "promoted": ..., "epoch": ..., "resync-total-bytes": ...}
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::status::{progress_line, progress_of, Client, Progress};

/// Options of `colo-blk reprotect`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReprotectArgs {
    /// QMP socket of the survivor (the failed-over secondary, or its restart as a primary)
    #[arg(long, value_name = "QMP")]
    pub survivor: PathBuf,

    /// Replication address (HOST:PORT) of the old primary's disk, now a secondary
    #[arg(long, value_name = "HOST:PORT")]
    pub peer: String,

    /// QMP socket of that secondary: checked consistent after the first checkpoint
    #[arg(long, value_name = "QMP")]
    pub target: Option<PathBuf>,

    /// Give up when the pair is not in sync after this long
    #[arg(long, value_name = "MS", default_value = "600000")]
    pub timeout_ms: u64,

    /// Under QEMU's x-colo: QEMU's checkpoints are the pair's (no replication-checkpoint);
    /// the command returns once the first COLO checkpoint completed
    #[arg(long)]
    pub x_colo: bool,

    /// With --x-colo: QMP socket of the survivor's QEMU, to set x-colo and migrate to the new
    /// Secondary VM (otherwise the operator migrates, and this command waits)
    #[arg(long, value_name = "QMP", requires_all = ["x_colo", "migrate_uri"])]
    pub qemu_qmp: Option<PathBuf>,

    /// With --qemu-qmp: where the new Secondary VM's QEMU waits (`migrate-incoming`)
    #[arg(long, value_name = "URI", requires = "qemu_qmp")]
    pub migrate_uri: Option<String>,

    /// With --qemu-qmp: x-checkpoint-delay (ms) of the new COLO session
    #[arg(long, value_name = "MS", default_value = "2000")]
    pub checkpoint_delay: u64,
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

/// Runs the command; the exit status (0 done, 1 failed).
pub fn run(a: &ReprotectArgs) -> u8 {
    match reprotect(a) {
        Ok(report) => {
            println!("{report}");
            0
        }
        Err(e) => {
            println!("{}", json!({"reprotected": false, "error": e}));
            eprintln!("colo-blk reprotect: {e}");
            1
        }
    }
}

/// Prints `line` on stderr unless it repeats the last one.
struct Lines(Option<String>);

impl Lines {
    fn say(&mut self, line: String) {
        if self.0.as_ref() != Some(&line) {
            eprintln!("{line}");
            self.0 = Some(line);
        }
    }
}

/// What the survivor is: promotes a failed-over secondary; `Ok(Some(dirty bytes))` when it
/// did, `Ok(None)` when it already is the primary of `--peer`.
fn promote_if_needed(c: &mut Client, a: &ReprotectArgs) -> Result<Option<u64>, String> {
    let st = c.execute("query-replication")?;
    match (st["role"].as_str(), st["state"].as_str()) {
        (Some("secondary"), Some("failed-over")) => {
            eprintln!(
                "the survivor failed over: promoting it in place, primary of {}",
                a.peer
            );
            let r = c.execute_with("replication-promote", json!({"peer": a.peer}))?;
            Ok(Some(u(&r, "dirty-bytes")))
        }
        (Some("primary"), _) if st["peer"].as_str() == Some(a.peer.as_str()) => {
            eprintln!("the survivor already is the primary of {}", a.peer);
            Ok(None)
        }
        (Some("primary"), _) => Err(format!(
            "the survivor is a primary of {} (not {}): restart it with --peer {}",
            st["peer"], a.peer, a.peer
        )),
        (role, state) => Err(format!(
            "the survivor is {} ({}), neither a failed-over secondary nor a primary",
            role.unwrap_or("?"),
            state.unwrap_or("?")
        )),
    }
}

/// The resync as it ended: bytes resent and the handshake's decision.
struct Resync {
    total: u64,
    decision: String,
}

/// Polls the survivor until connected and resynced, printing progress (percent, rate, ETA).
fn wait_resync(c: &mut Client, a: &ReprotectArgs, deadline: Instant) -> Result<Resync, String> {
    let mut lines = Lines(None);
    loop {
        let st = c.execute("query-replication")?;
        let (total, left) = (
            u(&st, "resync-total-bytes"),
            u(&st, "resync-remaining-bytes"),
        );
        if st["state"] == "connected" {
            let p = progress_of(&st, crate::replication::metrics::now_unix())
                .pop()
                .unwrap_or(Progress {
                    what: "resync".into(),
                    total,
                    done: total - left.min(total),
                    rate: None,
                });
            // "resync: 42.0% (1.3 MiB of 3.1 MiB), 12.0 MiB/s, ETA 0.2s"
            lines.say(progress_line(&p).replacen("resync ", "resync: ", 1));
            if left == 0 {
                let decision = st["sync-decision"].as_str().unwrap_or("?").to_string();
                return Ok(Resync { total, decision });
            }
        } else if let Some(e) = st["last-error"].as_str() {
            lines.say(format!("waiting for {}: {e}", a.peer));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "not in sync with {} after {} ms (state {}, last error {})",
                a.peer, a.timeout_ms, st["state"], st["last-error"]
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn reprotect(a: &ReprotectArgs) -> Result<Value, String> {
    let t = Instant::now();
    let io_timeout = Duration::from_secs(30);
    let mut c = Client::connect(&a.survivor, io_timeout)
        .map_err(|e| format!("{}: {e}", a.survivor.display()))?;
    // The target's own record (what the union adds to the survivor's), before the handshake.
    let target_dirty = match &a.target {
        Some(t) => Client::connect(t, io_timeout)
            .and_then(|mut tc| tc.execute("query-replication"))
            .map_err(|e| format!("{}: {e}", t.display()))?["own-dirty-bytes"]
            .as_u64(),
        None => None,
    };
    let promoted = promote_if_needed(&mut c, a)?;
    let deadline = t + Duration::from_millis(a.timeout_ms);
    let resync = wait_resync(&mut c, a, deadline)?;
    let full = resync.decision.starts_with("full-sync");
    if full {
        eprintln!(
            "FULL resync: the generations demanded it ({})",
            resync.decision
        );
    }
    let resync_ms = t.elapsed().as_millis() as u64;
    let epoch = if a.x_colo {
        if let Some(q) = &a.qemu_qmp {
            migrate_into_colo(q, a, deadline)?;
        }
        first_colo_checkpoint(&mut c, a, deadline)?
    } else {
        let r = c.execute_with("replication-checkpoint", json!({"timeout-ms": 60000}))?;
        u(&r, "epoch")
    };
    eprintln!("checkpoint {epoch}: the pair is protected");
    if let Some(target) = &a.target {
        let mut tc = Client::connect(target, io_timeout)
            .map_err(|e| format!("{}: {e}", target.display()))?;
        let ts = tc.execute("query-replication")?;
        if ts["consistency"] != "consistent" {
            return Err(format!(
                "the target is {} after checkpoint {epoch}",
                ts["consistency"]
            ));
        }
    }
    Ok(json!({
        "reprotected": true,
        "promoted": promoted.is_some(),
        "survivor-dirty-bytes": promoted,
        "target-own-dirty-bytes": target_dirty,
        "dirty-total-bytes": promoted.map(|p| p + target_dirty.unwrap_or(0)),
        "peer": a.peer,
        "epoch": epoch,
        "resync-total-bytes": resync.total,
        "sync-decision": resync.decision,
        "full-sync": full,
        "resync-done-ms": resync_ms,
        "duration-ms": t.elapsed().as_millis() as u64,
    }))
}

/// The x-colo QMP sequence on the survivor's QEMU (the new Secondary VM's QEMU already waits
/// with `migrate-incoming`): capabilities, x-checkpoint-delay, `migrate`; waits for "colo".
fn migrate_into_colo(
    q: &std::path::Path,
    a: &ReprotectArgs,
    deadline: Instant,
) -> Result<(), String> {
    let uri = a.migrate_uri.as_deref().unwrap_or_default();
    let mut vm =
        Client::connect(q, Duration::from_secs(30)).map_err(|e| format!("{}: {e}", q.display()))?;
    let caps = json!({"capabilities": [
        {"capability": "return-path", "state": true},
        {"capability": "x-colo", "state": true}]});
    vm.execute_with("migrate-set-capabilities", caps)?;
    vm.execute_with(
        "migrate-set-parameters",
        json!({"x-checkpoint-delay": a.checkpoint_delay}),
    )?;
    vm.execute_with("migrate", json!({"uri": uri}))?;
    eprintln!("migrating the survivor's VM to {uri} with x-colo");
    loop {
        let m = vm.execute("query-migrate")?;
        match m["status"].as_str() {
            Some("colo") => return Ok(()),
            Some("failed") | Some("cancelled") => {
                return Err(format!("the migration into COLO ended: {m}"))
            }
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(format!("not in COLO after {} ms: {m}", a.timeout_ms));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for QEMU's first COLO checkpoint of the new pair: the target's first checkpoint when
/// its socket is given, else the second MARKER the target acknowledged since now (QEMU starts
/// a checkpoint only once the Secondary VM loaded the previous one). Returns the epoch.
fn first_colo_checkpoint(
    c: &mut Client,
    a: &ReprotectArgs,
    deadline: Instant,
) -> Result<u64, String> {
    let mut target = match &a.target {
        Some(t) => Some(
            Client::connect(t, Duration::from_secs(30))
                .map_err(|e| format!("{}: {e}", t.display()))?,
        ),
        None => None,
    };
    let markers0 = u(&c.execute("query-replication")?, "markers");
    eprintln!("waiting for QEMU's first COLO checkpoint");
    loop {
        let st = c.execute("query-replication")?;
        let done = match target.as_mut() {
            Some(tc) => {
                let ts = tc.execute("query-replication")?;
                u(&ts, "checkpoints") >= 1 && ts["consistency"] == "consistent"
            }
            None => u(&st, "markers") >= markers0 + 2,
        };
        if done {
            return Ok(u(&st, "epoch"));
        }
        if st["state"] != "connected" {
            return Err(format!(
                "the link to {} broke before the first checkpoint: {}",
                a.peer, st["last-error"]
            ));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no COLO checkpoint within {} ms (is the survivor's QEMU migrating with x-colo?)",
                a.timeout_ms
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
