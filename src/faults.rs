//! Fault injection for crash tests: with `COLO_BLK_FAULT=NAME:N` in the environment, the
//! process aborts (as abruptly as SIGKILL: no destructor, no flush) the N-th time it reaches
//! the point `NAME`. Points: `failover-batch` (after each committed batch of a failover),
//! `failover-logged` (a failover recorded its ranges in the dirty log, before the state file
//! says committing).
//! Without the variable a point costs one relaxed atomic load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

struct Fault {
    name: String,
    at: u64,
    seen: AtomicU64,
}

fn fault() -> Option<&'static Fault> {
    static FAULT: OnceLock<Option<Fault>> = OnceLock::new();
    FAULT
        .get_or_init(|| {
            let spec = std::env::var("COLO_BLK_FAULT").ok()?;
            let (name, at) = spec.split_once(':')?;
            Some(Fault {
                name: name.to_string(),
                at: at.parse().ok()?,
                seen: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Reaching the point `name`: aborts the process if the fault says so.
pub fn point(name: &str) {
    if let Some(f) = fault() {
        if f.name == name && f.seen.fetch_add(1, Ordering::Relaxed) + 1 == f.at {
            eprintln!("colo-blk: fault injected at {name}:{}", f.at);
            std::process::abort();
        }
    }
}
