//! `colo-blk reprotect`: drives a failback (docs/user-guide.md, "Failback"). The old
//! primary's disk must already run as `--role secondary --discard-my-data` (its own process,
//! on its host); this command talks to the survivor only (and optionally checks the target):
//!
//! ```text
//!  survivor failed over? ── yes ─► replication-promote {"peer": PEER}   (in place, the VM runs)
//!            │ already a primary (restarted as --role primary): checked, nothing to do
//!  poll query-replication ─► "resync: N of M bytes" lines until connected and resynced
//!  replication-checkpoint ─► both disks equal: the first checkpoint of the new pair
//!  (--target QMP: its consistency must now be "consistent")
//!  stdout: {"reprotected": true, "promoted": ..., "epoch": ..., "resync-total-bytes": ...}
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::status::Client;

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

fn reprotect(a: &ReprotectArgs) -> Result<Value, String> {
    let t = Instant::now();
    let io_timeout = Duration::from_secs(30);
    let mut c = Client::connect(&a.survivor, io_timeout)
        .map_err(|e| format!("{}: {e}", a.survivor.display()))?;
    let st = c.execute("query-replication")?;
    let promoted = match (st["role"].as_str(), st["state"].as_str()) {
        (Some("secondary"), Some("failed-over")) => {
            eprintln!("promoting the survivor: primary of {}", a.peer);
            c.execute_with("replication-promote", json!({"peer": a.peer}))?;
            true
        }
        (Some("primary"), _) => {
            if st["peer"].as_str() != Some(a.peer.as_str()) {
                return Err(format!(
                    "the survivor is a primary of {} (not {}): restart it with --peer {}",
                    st["peer"], a.peer, a.peer
                ));
            }
            false
        }
        (role, state) => {
            return Err(format!(
                "the survivor is {} ({}), neither a failed-over secondary nor a primary",
                role.unwrap_or("?"),
                state.unwrap_or("?")
            ))
        }
    };
    let deadline = t + Duration::from_millis(a.timeout_ms);
    let mut last = None;
    let resync_total = loop {
        let st = c.execute("query-replication")?;
        let (total, left) = (
            u(&st, "resync-total-bytes"),
            u(&st, "resync-remaining-bytes"),
        );
        if st["state"] == "connected" {
            let line = format!("resync: {} of {total} bytes", total - left.min(total));
            if last.as_ref() != Some(&line) {
                eprintln!("{line}");
                last = Some(line);
            }
            if left == 0 {
                break total;
            }
        } else if let Some(e) = st["last-error"].as_str() {
            let line = format!("waiting for {}: {e}", a.peer);
            if last.as_ref() != Some(&line) {
                eprintln!("{line}");
                last = Some(line);
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "not in sync with {} after {} ms (state {}, last error {})",
                a.peer, a.timeout_ms, st["state"], st["last-error"]
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let epoch = c.execute_with("replication-checkpoint", json!({"timeout-ms": 60000}))?;
    let epoch = u(&epoch, "epoch");
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
        "promoted": promoted,
        "peer": a.peer,
        "epoch": epoch,
        "resync-total-bytes": resync_total,
        "duration-ms": t.elapsed().as_millis() as u64,
    }))
}
