//! Fault injection for crash tests: with `COLO_BLK_FAULT=NAME:N` in the environment, the
//! process aborts (as abruptly as SIGKILL: no destructor, no flush) the N-th time it reaches
//! the point `NAME`. Points: `failover-batch` (after each committed batch of a failover),
//! `failover-logged` (a failover recorded its ranges in the dirty log, before the state file
//! says committing).
//! Without the variable a point costs one relaxed atomic load.
//!
//! `COLO_BLK_IO_DELAY_MS=N` makes every guest data request wait 0 to 2N ms before its I/O (a
//! slow or network-backed disk): requests stay in flight and complete out of order, which the backend
//! restart tests need (tests/backend_restart.rs).

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

/// A slow disk (`COLO_BLK_IO_DELAY_MS=N`): waits before a guest request's I/O, between 0 and 2N
/// ms (the same pseudo-random sequence every run), so that requests overtake each other.
pub fn io_delay() {
    static DELAY: OnceLock<Option<u64>> = OnceLock::new();
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let Some(ms) = *DELAY.get_or_init(|| {
        let ms: u64 = std::env::var("COLO_BLK_IO_DELAY_MS").ok()?.parse().ok()?;
        (ms > 0).then_some(ms)
    }) else {
        return;
    };
    // splitmix64 of a counter: spread, reproducible.
    let mut x = SEQ
        .fetch_add(1, Ordering::Relaxed)
        .wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    std::thread::sleep(std::time::Duration::from_micros(x % (2 * ms * 1000)));
}
