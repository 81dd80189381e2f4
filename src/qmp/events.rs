//! Events: [`EventSender`] broadcasts `{"event", "data", "timestamp"}` lines to every
//! negotiated client.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};
use tokio::sync::broadcast;

use super::to_line;

/// Events buffered per client by [`EventSender::new`]; a client further behind misses events.
pub const DEFAULT_EVENT_CAPACITY: usize = 256;

/// Broadcasts asynchronous events to every client that finished capability negotiation.
///
/// Clones share one channel. [`emit`](Self::emit) never blocks and never fails, even when
/// nobody listens; a client more than the channel capacity behind misses the oldest events
/// (logged as a warning).
#[derive(Clone)]
pub struct EventSender {
    tx: broadcast::Sender<Arc<str>>,
}

impl EventSender {
    /// A sender buffering [`DEFAULT_EVENT_CAPACITY`] events per client.
    pub fn new() -> Self {
        Self::with_capacity(DEFAULT_EVENT_CAPACITY)
    }

    /// A sender buffering `capacity` (at least 1) events per client.
    pub fn with_capacity(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        EventSender { tx }
    }

    /// Sends `{"event": event, "data": data, "timestamp": now}` to every negotiated client.
    /// `Value::Null` data leaves the `data` member out, as QEMU does for data-less events.
    pub fn emit(&self, event: &str, data: Value) {
        let line = event_line(event, data, SystemTime::now());
        // Err only means nobody is listening.
        let _ = self.tx.send(line.into());
    }

    pub(super) fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.tx.subscribe()
    }
}

impl Default for EventSender {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for EventSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSender")
            .field("receivers", &self.tx.receiver_count())
            .finish()
    }
}

fn event_line(event: &str, data: Value, at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let mut msg = Map::new();
    msg.insert("event".into(), Value::String(event.into()));
    if !data.is_null() {
        msg.insert("data".into(), data);
    }
    msg.insert(
        "timestamp".into(),
        json!({"seconds": since.as_secs(), "microseconds": since.subsec_micros()}),
    );
    to_line(&Value::Object(msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emit_without_listeners_and_event_line() {
        let events = EventSender::default();
        events.emit("NOBODY_LISTENS", json!({}));
        let line = event_line(
            "E",
            json!({"k": 1}),
            UNIX_EPOCH + Duration::from_micros(1_500_002),
        );
        assert!(line.ends_with("\r\n"));
        assert_eq!(
            serde_json::from_str::<Value>(&line).unwrap(),
            json!({"event": "E", "data": {"k": 1}, "timestamp": {"seconds": 1, "microseconds": 500_002}})
        );
    }
}
