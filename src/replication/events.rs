//! What replication reports: the QMP events both roles emit and the `query-replication`
//! answers, as `Serialize` structs (kebab-case on the wire). The replication code fills them;
//! [`crate::control`] and [`crate::qmp`] put them on the socket.

use serde::Serialize;

use crate::qmp::EventSender;

/// Which side of the pair speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Side {
    Primary,
    Secondary,
}

/// A replication event.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Event {
    /// `REPLICATION_PEER_CONNECTED`
    PeerConnected {
        role: Side,
        peer: String,
        #[serde(rename = "resync-bytes", skip_serializing_if = "Option::is_none")]
        resync_bytes: Option<u64>,
    },
    /// `REPLICATION_PEER_LOST`
    PeerLost {
        role: Side,
        reason: String,
        #[serde(rename = "dirty-bytes", skip_serializing_if = "Option::is_none")]
        dirty_bytes: Option<u64>,
    },
    /// `REPLICATION_CHECKPOINT`
    Checkpoint { role: Side, epoch: u64 },
    /// `REPLICATION_RESYNC_DONE`
    ResyncDone { role: Side },
    /// `REPLICATION_ERROR`
    Error { role: Side, error: String },
    /// `REPLICATION_FAILOVER_DONE`
    FailoverDone(FailoverReport),
}

/// What a failover did (the event's data and the command's return value).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct FailoverReport {
    /// The checkpoint the disk was rolled back to (plus the SVM's writes, if any).
    pub epoch: u64,
    pub duration_ms: f64,
    pub committed_active_bytes: u64,
    pub restored_hidden_bytes: u64,
}

impl Event {
    /// The QMP event name.
    pub fn name(&self) -> &'static str {
        match self {
            Event::PeerConnected { .. } => "REPLICATION_PEER_CONNECTED",
            Event::PeerLost { .. } => "REPLICATION_PEER_LOST",
            Event::Checkpoint { .. } => "REPLICATION_CHECKPOINT",
            Event::ResyncDone { .. } => "REPLICATION_RESYNC_DONE",
            Event::Error { .. } => "REPLICATION_ERROR",
            Event::FailoverDone(_) => "REPLICATION_FAILOVER_DONE",
        }
    }

    /// Sends the event to every QMP client.
    pub fn emit(&self, events: &EventSender) {
        match serde_json::to_value(self) {
            Ok(data) => events.emit(self.name(), data),
            Err(e) => log::error!("cannot encode event {}: {e}", self.name()),
        }
    }
}

/// `query-replication` on a primary.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PrimaryStatus {
    pub role: Side,
    /// `connecting`, `connected` or `stopped`.
    pub state: &'static str,
    /// The configured secondary (`--peer`).
    pub peer: String,
    /// The secondary's address while connected.
    pub peer_address: Option<String>,
    /// `async` or `sync`.
    pub mode: &'static str,
    pub epoch: u64,
    pub bytes_sent_since_checkpoint: u64,
    pub bytes_sent_total: u64,
    pub bytes_in_flight: u64,
    pub frames_in_flight: u64,
    pub window_bytes: u64,
    pub last_seq: u64,
    pub acked_seq: u64,
    pub resync_remaining_bytes: u64,
    pub dirty_bytes: u64,
    pub dirty_granularity: u64,
    pub last_error: Option<String>,
}

/// `query-replication` on a secondary.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SecondaryStatus {
    pub role: Side,
    /// `waiting`, `connected` or `failed-over`.
    pub state: &'static str,
    pub peer_address: Option<String>,
    pub listen: String,
    pub epoch: u64,
    pub applied_seq: u64,
    pub bytes_received_since_checkpoint: u64,
    pub bytes_received_total: u64,
    pub hidden_bytes: u64,
    pub active_bytes: u64,
    pub cluster_size: u64,
    pub last_error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_serialise_as_before() {
        let cases = [
            (
                Event::PeerConnected {
                    role: Side::Primary,
                    peer: "1.2.3.4:5".into(),
                    resync_bytes: Some(7),
                },
                json!({"role": "primary", "peer": "1.2.3.4:5", "resync-bytes": 7}),
            ),
            (
                Event::PeerConnected {
                    role: Side::Secondary,
                    peer: "x".into(),
                    resync_bytes: None,
                },
                json!({"role": "secondary", "peer": "x"}),
            ),
            (
                Event::PeerLost {
                    role: Side::Primary,
                    reason: "r".into(),
                    dirty_bytes: Some(0),
                },
                json!({"role": "primary", "reason": "r", "dirty-bytes": 0}),
            ),
            (
                Event::Checkpoint {
                    role: Side::Secondary,
                    epoch: 3,
                },
                json!({"role": "secondary", "epoch": 3}),
            ),
            (
                Event::ResyncDone {
                    role: Side::Primary,
                },
                json!({"role": "primary"}),
            ),
            (
                Event::FailoverDone(FailoverReport {
                    epoch: 2,
                    duration_ms: 1.5,
                    committed_active_bytes: 3,
                    restored_hidden_bytes: 4,
                }),
                json!({"epoch": 2, "duration-ms": 1.5, "committed-active-bytes": 3,
                       "restored-hidden-bytes": 4}),
            ),
        ];
        for (event, want) in cases {
            assert_eq!(
                serde_json::to_value(&event).unwrap(),
                want,
                "{}",
                event.name()
            );
        }
    }
}
