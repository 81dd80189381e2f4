//! The one deadline loop of the tests: look again until a condition holds, and fail with a
//! clear message when a hang guard passes first. The limit only stops a hung test; it is
//! never an assertion about speed, so it is generous.

use std::time::{Duration, Instant};

/// How long to wait between two looks: a polling interval, not synchronisation.
const INTERVAL: Duration = Duration::from_millis(10);

/// Calls `probe` until it returns `Some`, and returns that. Fails the test, naming `what`,
/// when `limit` passes first.
pub fn value<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "gave up waiting for {what} after {limit:?} (a hang guard)"
        );
        std::thread::sleep(INTERVAL);
    }
}

/// Calls `done` until it returns true; fails the test, naming `what`, when `limit` passes
/// first.
pub fn until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    value(what, limit, || done().then_some(()))
}
