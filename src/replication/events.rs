//! What replication reports: the QMP events both roles emit (one [`QmpEvent`] type each) and
//! the `query-replication` answers, as `Serialize` structs (kebab-case on the wire). The
//! replication code fills them; [`crate::qmp::EventSender::send`] and [`crate::control`] put
//! them on the socket.

use serde::Serialize;

use super::layers::{GroupCommitted, GroupPrepared};
use super::metadata::MetaStatus;
use crate::qmp::QmpEvent;

/// Which side of the pair speaks (the `role` member of events and `query-replication`).
/// Only the two ends of a link: a standalone process sends no replication event, and a
/// secondary promoted in place speaks as the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Side {
    Primary,
    Secondary,
}

/// `REPLICATION_PEER_CONNECTED`: a session passed its handshake.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PeerConnected {
    pub role: Side,
    pub peer: String,
    /// Primary only: bytes of the dirty record it resends first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resync_bytes: Option<u64>,
}

/// `REPLICATION_PEER_LOST`: a session that passed its handshake ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PeerLost {
    pub role: Side,
    pub reason: String,
    /// Primary only: bytes now tracked as dirty (to resync on reconnect).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_bytes: Option<u64>,
}

/// `REPLICATION_CHECKPOINT`: an epoch ended on this side.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Checkpoint {
    pub role: Side,
    pub epoch: u64,
}

/// `REPLICATION_RESYNC_DONE`: the primary resent its whole dirty record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResyncDone {
    pub role: Side,
}

/// `REPLICATION_ERROR`: a peer was refused or refused us.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Error {
    pub role: Side,
    pub error: String,
}

/// `REPLICATION_SYNC_DECISION`: what a connecting pair decided from its generations, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SyncDecision {
    pub role: Side,
    pub peer: String,
    /// `incremental`, `full-sync`, `incremental-failback`, `split-brain`, `full-sync-needed`,
    /// `inconsistent`, `same-disk` (the last four are refusals).
    pub decision: String,
    pub reason: String,
    /// The checkpoint the secondary's disk holds, by its generations (absent where a primary
    /// was refused before it learnt them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secondary_epoch: Option<u64>,
}

/// `REPLICATION_VERIFY_DONE`: an online verify ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VerifyDone {
    pub role: Side,
    pub ranges: u64,
    pub mismatches: u64,
    /// False when the link broke before every range was compared.
    pub complete: bool,
}

/// `REPLICATION_PROMOTED`: a failed-over secondary became the primary of a new pair without
/// a restart (`replication-promote`); its Secondary VM's writes are replicated from now on.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Promoted {
    /// The new secondary's replication address.
    pub peer: String,
    /// Bytes the failed-over disk's dirty log recorded (the first resync sends these).
    pub dirty_bytes: u64,
}

impl QmpEvent for Promoted {
    const NAME: &'static str = "REPLICATION_PROMOTED";
}
impl QmpEvent for SyncDecision {
    const NAME: &'static str = "REPLICATION_SYNC_DECISION";
}
impl QmpEvent for VerifyDone {
    const NAME: &'static str = "REPLICATION_VERIFY_DONE";
}
impl QmpEvent for PeerConnected {
    const NAME: &'static str = "REPLICATION_PEER_CONNECTED";
}
impl QmpEvent for PeerLost {
    const NAME: &'static str = "REPLICATION_PEER_LOST";
}
impl QmpEvent for Checkpoint {
    const NAME: &'static str = "REPLICATION_CHECKPOINT";
}
impl QmpEvent for ResyncDone {
    const NAME: &'static str = "REPLICATION_RESYNC_DONE";
}
impl QmpEvent for Error {
    const NAME: &'static str = "REPLICATION_ERROR";
}
impl QmpEvent for FailoverReport {
    const NAME: &'static str = "REPLICATION_FAILOVER_DONE";
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
    /// The last epoch the secondary made durable: `epoch`, or one less while the secondary
    /// syncs a COLO marker it already applied (docs/flush-policy.md, rule 11).
    pub durable_epoch: u64,
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
    /// Bytes the persistent dirty log records (`null` without one).
    pub dirty_log_bytes: Option<u64>,
    /// The last (or running) `replication-verify`.
    pub verify: Option<VerifyStatus>,
    /// The disk's replication metadata.
    pub metadata: MetaStatus,
    pub last_error: Option<String>,
    // ---- for operators (colo-blk status, metrics); timestamps are seconds since the epoch ----
    /// Since when the guest's writes are not protected (no secondary connected and in sync);
    /// `None` while protected.
    pub unprotected_since: Option<f64>,
    /// When the last checkpoint completed (`None`: none yet).
    pub last_checkpoint_at: Option<f64>,
    /// Checkpoints completed / refused or failed since start. Under QEMU's COLO every MARKER
    /// counts: the secondary's `checkpoints` and `colo.stops` say which were checkpoints.
    pub checkpoints: u64,
    pub checkpoint_failures: u64,
    /// Of the checkpoints, the MARKERs: device stops of the VM with dirty logging on (QEMU's
    /// COLO checkpoints, and any other stop during COLO, e.g. a user `stop`).
    pub markers: u64,
    /// The last handshake's decision (`incremental`, `incremental-failback`, `full-sync`) and
    /// its reason, as `REPLICATION_SYNC_DECISION` said; `None` before the first handshake.
    pub sync_decision: Option<String>,
    /// What the current session had to resend when it connected (with
    /// `resync-remaining-bytes`: the resync's progress), and when it started.
    pub resync_total_bytes: u64,
    pub resync_started_at: Option<f64>,
    /// Stream bytes the secondary acknowledged since start (same units as `bytes-sent-total`).
    pub bytes_acked_total: u64,
    /// Sessions that passed their handshake / sessions or handshakes that ended, since start.
    pub sessions: u64,
    pub link_errors: u64,
}

/// Progress of `replication-verify`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VerifyStatus {
    /// `running`, `done` or `aborted`.
    pub state: &'static str,
    pub ranges_total: u64,
    pub ranges_sent: u64,
    pub ranges_compared: u64,
    pub mismatches: u64,
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
    /// `consistent`; `inconsistent` while a full sync has not reached a checkpoint;
    /// `needs-resync` after a power loss dropped layers that held unsynced changes, until the
    /// primary's resync and the next checkpoint. Neither holds a checkpoint: failover refuses
    /// them unless forced.
    pub consistency: &'static str,
    /// The disk's replication metadata.
    pub metadata: MetaStatus,
    pub last_error: Option<String>,
    // ---- for operators (colo-blk status, metrics); timestamps are seconds since the epoch ----
    /// Since when no primary streams to this secondary (`None` while one does).
    pub unprotected_since: Option<f64>,
    /// When the last checkpoint completed (`None`: none yet).
    pub last_checkpoint_at: Option<f64>,
    pub checkpoints: u64,
    /// Sessions that passed their handshake / sessions that failed or primaries refused.
    pub sessions: u64,
    pub link_errors: u64,
    /// A failover's commit: layer bytes it started with, bytes still to commit (0 when none
    /// runs), and when it started.
    pub failover_total_bytes: u64,
    pub failover_remaining_bytes: u64,
    pub failover_started_at: Option<f64>,
    /// Failovers completed by this process (0 or 1).
    pub failovers: u64,
    /// Bytes of this disk's own dirty record, read at start and offered to the primary of a
    /// failback (`--discard-my-data`, PEER_DIRTY); `None` without one.
    pub own_dirty_bytes: Option<u64>,
    /// Consistency groups (docs/consistency-groups.md).
    pub group: GroupStatus,
    /// The Secondary VM under QEMU's COLO (docs/colo-with-qemu.md).
    pub colo: ColoStatus,
}

/// The `colo` object of the secondary's `query-replication`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct ColoStatus {
    /// Markers that arrived while the Secondary VM ran: stops of the primary that were not a
    /// checkpoint's (a user `stop`, a guest reset, a migration), counted apart from checkpoints.
    pub stops: u64,
    /// The epochs of the cuts a restart of the Secondary VM can take now, oldest first.
    pub cuts: Vec<u64>,
    /// Why the Secondary VM's memory and its disk do not match (`None`: they do); a failover
    /// is refused meanwhile unless forced.
    pub svm_mismatch: Option<String>,
}

/// The `group` object of the secondary's `query-replication`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct GroupStatus {
    /// The group checkpoint the disk is at now (a failover keeps it), or `None`: the last
    /// checkpoint was not a group checkpoint (or none was ever taken).
    pub current: Option<u64>,
    /// The last group checkpoint committed here, with the layer epoch it became.
    pub committed: Option<GroupCommitted>,
    /// The group checkpoint this disk is prepared for (nothing applied since the prepare).
    pub prepared: Option<GroupPrepared>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn data<E: QmpEvent>(e: &E) -> (&'static str, serde_json::Value) {
        (E::NAME, serde_json::to_value(e).unwrap())
    }

    #[test]
    fn events_serialise_as_before() {
        let cases = [
            (
                data(&PeerConnected {
                    role: Side::Primary,
                    peer: "1.2.3.4:5".into(),
                    resync_bytes: Some(7),
                }),
                json!({"role": "primary", "peer": "1.2.3.4:5", "resync-bytes": 7}),
            ),
            (
                data(&PeerConnected {
                    role: Side::Secondary,
                    peer: "x".into(),
                    resync_bytes: None,
                }),
                json!({"role": "secondary", "peer": "x"}),
            ),
            (
                data(&PeerLost {
                    role: Side::Primary,
                    reason: "r".into(),
                    dirty_bytes: Some(0),
                }),
                json!({"role": "primary", "reason": "r", "dirty-bytes": 0}),
            ),
            (
                data(&Checkpoint {
                    role: Side::Secondary,
                    epoch: 3,
                }),
                json!({"role": "secondary", "epoch": 3}),
            ),
            (
                data(&ResyncDone {
                    role: Side::Primary,
                }),
                json!({"role": "primary"}),
            ),
            (
                data(&SyncDecision {
                    role: Side::Primary,
                    peer: "p".into(),
                    decision: "incremental".into(),
                    reason: "r".into(),
                    secondary_epoch: Some(4),
                }),
                json!({"role": "primary", "peer": "p", "decision": "incremental",
                       "reason": "r", "secondary-epoch": 4}),
            ),
            (
                data(&SyncDecision {
                    role: Side::Primary,
                    peer: "p".into(),
                    decision: "refused".into(),
                    reason: "r".into(),
                    secondary_epoch: None,
                }),
                json!({"role": "primary", "peer": "p", "decision": "refused", "reason": "r"}),
            ),
            (
                data(&Error {
                    role: Side::Secondary,
                    error: "e".into(),
                }),
                json!({"role": "secondary", "error": "e"}),
            ),
            (
                data(&FailoverReport {
                    epoch: 2,
                    duration_ms: 1.5,
                    committed_active_bytes: 3,
                    restored_hidden_bytes: 4,
                }),
                json!({"epoch": 2, "duration-ms": 1.5, "committed-active-bytes": 3,
                       "restored-hidden-bytes": 4}),
            ),
        ];
        for ((name, got), want) in cases {
            assert_eq!(got, want, "{name}");
        }
    }
}
