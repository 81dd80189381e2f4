//! Events: [`EventSender`] broadcasts `{"event", "data", "timestamp"}` lines to every
//! negotiated client; [`QmpEvent`] lets a module define an event as a serializable type.
//!
//! Key order on the wire: the crate uses serde_json without its `preserve_order` feature (no
//! dependency enables it either, see `cargo tree -e features -i serde_json`), so every JSON
//! object goes through a sorted `BTreeMap`: an event line is
//! `{"data":{..sorted..},"event":"NAME","timestamp":{"microseconds":US,"seconds":S}}`, and
//! `json!` literals lose their written order. [`EventSender::send`] converts the event with
//! `serde_json::to_value` and then takes the same path as [`EventSender::emit`], so a derived
//! struct gives exactly the line of the equivalent `json!` value whatever the field order.
//! No test or client depends on the order (they all parse the JSON); QEMU itself writes
//! `timestamp` first, which QMP clients do not rely on either.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{json, Map, Value};
use tokio::sync::broadcast;

use super::to_line;

/// Events buffered per client by [`EventSender::new`]; a client further behind misses events.
pub const DEFAULT_EVENT_CAPACITY: usize = 256;

/// An event with a fixed name whose `data` member is the serialized value.
///
/// Define events as types instead of building `json!` values:
///
/// ```
/// use colo_blk::qmp::{EventSender, QmpEvent};
///
/// /// `{"event": "COLO_BLK_EXAMPLE", "data": {"node-name": ..., "last-seq": ...}, ...}`
/// #[derive(serde::Serialize)]
/// #[serde(rename_all = "kebab-case")]
/// struct Example<'a> {
///     node_name: &'a str,
///     last_seq: u64,
///     /// Left out of `data` when `None` (QEMU's convention for optional members).
///     #[serde(skip_serializing_if = "Option::is_none")]
///     error: Option<String>,
/// }
///
/// impl QmpEvent for Example<'_> {
///     const NAME: &'static str = "COLO_BLK_EXAMPLE";
/// }
///
/// let events = EventSender::new();
/// events.send(&Example { node_name: "colo0", last_seq: 7, error: None });
/// ```
///
/// A type serializing to `null` (a unit struct `struct Stop;`) leaves `data` out, like
/// `emit(name, Value::Null)`; an empty braced struct `struct E {}` gives `"data": {}`.
pub trait QmpEvent: Serialize {
    /// The event name on the wire, e.g. `"BLOCK_JOB_COMPLETED"`.
    const NAME: &'static str;
}

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
        self.broadcast(event_line(event, data, SystemTime::now()));
    }

    /// Sends the typed event `event` (see [`QmpEvent`]): the same line as
    /// `emit(E::NAME, serde_json::to_value(event))`. Never blocks and never fails: an event
    /// whose `Serialize` impl errors (e.g. a map with non-string keys, a bug in the type) is
    /// logged and dropped.
    pub fn send<E: QmpEvent>(&self, event: &E) {
        if let Some(line) = typed_event_line(event, SystemTime::now()) {
            self.broadcast(line);
        }
    }

    fn broadcast(&self, line: String) {
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

fn typed_event_line<E: QmpEvent>(event: &E, at: SystemTime) -> Option<String> {
    match serde_json::to_value(event) {
        Ok(data) => Some(event_line(E::NAME, data, at)),
        Err(e) => {
            log::error!("qmp: event {} dropped: cannot serialize it: {e}", E::NAME);
            None
        }
    }
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

    #[derive(Serialize)]
    #[serde(rename_all = "kebab-case")]
    struct ReplicationState<'a> {
        // Deliberately not in alphabetical order.
        node_name: &'a str,
        last_seq: u64,
        peer: Peer,
        error: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'a str>,
    }

    #[derive(Serialize)]
    #[serde(rename_all = "kebab-case")]
    struct Peer {
        port: u16,
        host_name: String,
    }

    impl QmpEvent for ReplicationState<'_> {
        const NAME: &'static str = "COLO_BLK_REPLICATION_STATE";
    }

    #[derive(Serialize)]
    struct Stop;

    impl QmpEvent for Stop {
        const NAME: &'static str = "STOP";
    }

    #[derive(Serialize)]
    struct NoFields {}

    impl QmpEvent for NoFields {
        const NAME: &'static str = "NO_FIELDS";
    }

    #[test]
    fn derived_event_gives_the_json_macro_line() {
        let at = UNIX_EPOCH + Duration::from_micros(1_500_002);
        let ev = ReplicationState {
            node_name: "colo0",
            last_seq: 7,
            peer: Peer {
                port: 9000,
                host_name: "secondary".into(),
            },
            error: None,
            reason: None,
        };
        let typed = typed_event_line(&ev, at).unwrap();
        let by_hand = event_line(
            "COLO_BLK_REPLICATION_STATE",
            json!({"node-name": "colo0", "last-seq": 7,
                   "peer": {"port": 9000, "host-name": "secondary"}, "error": null}),
            at,
        );
        assert_eq!(typed, by_hand);
        // The exact bytes: keys sorted at every level (serde_json without `preserve_order`).
        // If this changes, a dependency turned `preserve_order` on and the wire order moved.
        assert_eq!(
            typed,
            "{\"data\":{\"error\":null,\"last-seq\":7,\"node-name\":\"colo0\",\
             \"peer\":{\"host-name\":\"secondary\",\"port\":9000}},\
             \"event\":\"COLO_BLK_REPLICATION_STATE\",\
             \"timestamp\":{\"microseconds\":500002,\"seconds\":1}}\r\n"
        );

        // Data-less events: a unit struct is `emit(name, Null)`, an empty struct is `{}`.
        assert_eq!(
            typed_event_line(&Stop, at).unwrap(),
            event_line("STOP", Value::Null, at)
        );
        assert_eq!(
            typed_event_line(&NoFields {}, at).unwrap(),
            event_line("NO_FIELDS", json!({}), at)
        );
    }

    #[test]
    fn send_reaches_subscribers() {
        let events = EventSender::new();
        events.send(&Stop); // nobody listens: fine
        let mut rx = events.subscribe();
        events.send(&ReplicationState {
            node_name: "n",
            last_seq: 1,
            peer: Peer {
                port: 1,
                host_name: "h".into(),
            },
            error: Some("boom".into()),
            reason: Some("why"),
        });
        let line = rx.try_recv().unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["event"], "COLO_BLK_REPLICATION_STATE");
        assert_eq!(
            v["data"],
            json!({"node-name": "n", "last-seq": 1, "peer": {"port": 1, "host-name": "h"},
                   "error": "boom", "reason": "why"})
        );
        assert!(rx.try_recv().is_err(), "one line per event");
    }

    #[test]
    fn unserializable_event_is_dropped() {
        struct Bad;
        impl Serialize for Bad {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("no"))
            }
        }
        impl QmpEvent for Bad {
            const NAME: &'static str = "BAD";
        }
        let events = EventSender::new();
        let mut rx = events.subscribe();
        events.send(&Bad);
        events.emit("AFTER", Value::Null);
        let v: Value = serde_json::from_str(&rx.try_recv().unwrap()).unwrap();
        assert_eq!(v["event"], "AFTER");
    }
}
