//! The commands each role answers on its QMP control socket.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::histogram::HistogramSnapshot;
use crate::qmp::args::{opt_bool, opt_u64, reject_unknown as only};
use crate::qmp::{CommandHandler, QmpError};
use crate::replication::metrics::MetricsSnapshot;
use crate::replication::primary::Primary;
use crate::replication::secondary::Secondary;
use crate::vhost_user::{QueueStatsSnapshot, StatsHandle};

/// What this process is: the role object behind the QMP commands, status and metrics. Not
/// [`crate::cli::RoleArg`]: it holds the object, and a secondary promoted in place is a
/// primary from then on ([`Role::effective`]).
#[derive(Clone)]
pub enum Role {
    Standalone,
    Primary(Arc<Primary>),
    Secondary(Arc<Secondary>),
}

impl Role {
    /// What this process is now: a secondary promoted in place (`replication-promote`) is
    /// the primary it became (commands, status, metrics).
    pub fn effective(&self) -> Role {
        match self {
            Role::Secondary(s) => match s.promoted() {
                Some(p) => Role::Primary(p),
                None => self.clone(),
            },
            r => r.clone(),
        }
    }
}

/// The QMP command handler of a colo-blk process.
pub struct Controller {
    role: Role,
    /// The vhost-user device's per-queue counters, when this process serves a VM.
    stats: Option<StatsHandle>,
}

impl Controller {
    pub fn new(role: Role, stats: Option<StatsHandle>) -> Self {
        Controller { role, stats }
    }

    /// The role commands go to (see [`Role::effective`]).
    fn role(&self) -> Role {
        self.role.effective()
    }
}

/// `query-stats`: the device's counters per queue (empty when no VM is served), each with
/// its request latency histogram, and the replication counters of a primary or secondary.
#[derive(serde::Serialize)]
struct Stats {
    queues: Vec<QueueReport>,
    /// Why the latest front-end cannot be served (its guest RAM is not shared with us).
    #[serde(rename = "front-end-error", skip_serializing_if = "Option::is_none")]
    front_end_error: Option<String>,
    /// Front-end connections that ended and were finished with (the server waits for the next).
    #[serde(
        rename = "front-end-disconnects",
        skip_serializing_if = "Option::is_none"
    )]
    front_end_disconnects: Option<u64>,
    /// `io_uring` or `threads`: the I/O engine serving the queues.
    #[serde(rename = "io-engine", skip_serializing_if = "Option::is_none")]
    io_engine: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    replication: Option<Value>,
}

#[derive(serde::Serialize)]
struct QueueReport {
    #[serde(flatten)]
    counters: QueueStatsSnapshot,
    latency: HistogramSnapshot,
}

impl Controller {
    fn stats(&self) -> Stats {
        let queues = match &self.stats {
            Some(s) => s
                .queues()
                .into_iter()
                .zip(s.latencies())
                .map(|(counters, latency)| QueueReport { counters, latency })
                .collect(),
            None => Vec::new(),
        };
        let replication = match &self.role() {
            Role::Standalone => None,
            Role::Primary(p) => {
                let st = p.status();
                Some(with_counters(
                    json!({
                        "bytes-sent-total": st.bytes_sent_total,
                        "bytes-acked-total": st.bytes_acked_total,
                        "bytes-in-flight": st.bytes_in_flight,
                        "resync-total-bytes": st.resync_total_bytes,
                        "resync-remaining-bytes": st.resync_remaining_bytes,
                    }),
                    &p.metrics().snapshot(),
                ))
            }
            Role::Secondary(s) => {
                let st = s.status();
                Some(with_counters(
                    json!({
                        "bytes-received-total": st.bytes_received_total,
                        "hidden-bytes": st.hidden_bytes,
                        "active-bytes": st.active_bytes,
                        "failovers": st.failovers,
                        "failover-remaining-bytes": st.failover_remaining_bytes,
                    }),
                    &s.metrics().snapshot(),
                ))
            }
        };
        Stats {
            queues,
            front_end_error: self.stats.as_ref().and_then(|s| s.front_end_error()),
            front_end_disconnects: self.stats.as_ref().map(|s| s.front_end_disconnects()),
            io_engine: self.stats.as_ref().and_then(|s| s.io_engine()),
            replication,
        }
    }
}

/// `base` plus the counters both replication roles have.
fn with_counters(mut base: Value, m: &MetricsSnapshot) -> Value {
    if let Value::Object(o) = &mut base {
        o.insert("checkpoints".into(), m.checkpoints.into());
        o.insert("checkpoint-failures".into(), m.checkpoint_failures.into());
        o.insert(
            "checkpoint-duration".into(),
            serde_json::to_value(&m.checkpoint_duration).unwrap_or_default(),
        );
        o.insert("sessions".into(), m.sessions.into());
        o.insert("link-errors".into(), m.link_errors.into());
    }
    base
}

fn timeout(args: &Map<String, Value>) -> Result<Option<Duration>, QmpError> {
    Ok(opt_u64(args, "timeout-ms")?.map(Duration::from_millis))
}

/// A command's answer as JSON.
fn to_value(v: impl serde::Serialize) -> Result<Value, QmpError> {
    serde_json::to_value(v).map_err(generic)
}

fn generic(e: impl std::fmt::Display) -> QmpError {
    QmpError::Generic(e.to_string())
}

const COMMON: &[&str] = &["query-status", "query-replication", "query-stats", "quit"];
const PRIMARY: &[&str] = &[
    "replication-prepare-checkpoint",
    "replication-do-checkpoint",
    "replication-checkpoint",
    "replication-stop",
    "replication-start",
    "replication-verify",
];
const SECONDARY: &[&str] = &[
    "replication-do-checkpoint",
    "replication-prepare",
    "replication-failover",
    "replication-promote",
];

impl CommandHandler for Controller {
    fn commands(&self) -> Vec<&'static str> {
        let mut v = COMMON.to_vec();
        match self.role() {
            Role::Standalone => {}
            Role::Primary(_) => v.extend_from_slice(PRIMARY),
            Role::Secondary(_) => v.extend_from_slice(SECONDARY),
        }
        v
    }

    fn execute(&self, name: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let role = self.role();
        match (name, &role) {
            ("query-status", _) => {
                only(args, &[])?;
                Ok(json!({"status": "running", "running": true, "singlestep": false}))
            }
            ("quit", _) => {
                // The QMP server replies, then the process stops like on SIGTERM.
                only(args, &[])?;
                Ok(json!({}))
            }
            ("query-stats", _) => {
                only(args, &[])?;
                to_value(self.stats())
            }
            ("query-replication", Role::Standalone) => {
                only(args, &[])?;
                Ok(json!({"role": "standalone", "state": "none"}))
            }
            ("query-replication", Role::Primary(p)) => {
                only(args, &[])?;
                to_value(p.status())
            }
            ("query-replication", Role::Secondary(s)) => {
                only(args, &[])?;
                to_value(s.status())
            }
            ("replication-prepare-checkpoint", Role::Primary(p)) => {
                only(args, &["timeout-ms"])?;
                p.prepare_checkpoint(timeout(args)?).map_err(generic)?;
                Ok(json!({}))
            }
            ("replication-do-checkpoint", Role::Primary(p)) => {
                only(args, &[])?;
                let epoch = p.do_checkpoint().map_err(generic)?;
                Ok(json!({"epoch": epoch}))
            }
            ("replication-checkpoint", Role::Primary(p)) => {
                only(args, &["timeout-ms"])?;
                let epoch = p.checkpoint(timeout(args)?).map_err(generic)?;
                Ok(json!({"epoch": epoch}))
            }
            ("replication-stop", Role::Primary(p)) => {
                only(args, &[])?;
                p.stop();
                Ok(json!({}))
            }
            ("replication-start", Role::Primary(p)) => {
                only(args, &["full"])?;
                p.start(opt_bool(args, "full")?.unwrap_or(false));
                Ok(json!({}))
            }
            ("replication-verify", Role::Primary(p)) => {
                only(args, &[])?;
                let ranges = p.verify().map_err(generic)?;
                Ok(json!({"ranges": ranges}))
            }
            ("replication-do-checkpoint", Role::Secondary(s)) => {
                only(args, &["group"])?;
                let epoch = match opt_u64(args, "group")? {
                    Some(g) => s.commit_group(g),
                    None => s.do_checkpoint(),
                }
                .map_err(generic)?;
                Ok(json!({"epoch": epoch}))
            }
            ("replication-prepare", Role::Secondary(s)) => {
                only(args, &["group", "applied-seq"])?;
                let group = crate::qmp::args::u64(args, "group")?;
                let seq = crate::qmp::args::u64(args, "applied-seq")?;
                let p = s.prepare_group(group, seq).map_err(generic)?;
                to_value(p)
            }
            ("replication-failover", Role::Secondary(s)) => {
                only(args, &["force"])?;
                let report = if opt_bool(args, "force")?.unwrap_or(false) {
                    s.force_failover()
                } else {
                    s.failover()
                };
                to_value(report.map_err(generic)?)
            }
            ("replication-promote", Role::Secondary(s)) => {
                only(args, &["peer"])?;
                let peer = args
                    .get("peer")
                    .and_then(Value::as_str)
                    .ok_or_else(|| QmpError::Generic("'peer' (HOST:PORT) is required".into()))?;
                let p = s.promote(peer).map_err(generic)?;
                Ok(json!({"role": "primary", "peer": peer, "dirty-bytes": p.status().dirty_bytes}))
            }
            (n, _) if PRIMARY.contains(&n) || SECONDARY.contains(&n) => Err(QmpError::Generic(
                format!("{n} is not available in this role"),
            )),
            (n, _) => Err(QmpError::CommandNotFound(n.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::uring::IoEngine;

    /// A served device's `query-stats` carries the engine and the finished front-end
    /// connections next to its queues; without a device neither is there.
    #[test]
    fn query_stats_names_the_io_engine_and_the_front_end_disconnects() {
        let stats = StatsHandle::new(1);
        stats.set_io_engine(IoEngine::Uring);
        stats.count_front_end_disconnect();
        let c = Controller::new(Role::Standalone, Some(stats));
        let v = c.execute("query-stats", &Map::new()).unwrap();
        assert_eq!(v["io-engine"], "io_uring", "{v}");
        assert_eq!(v["front-end-disconnects"], 1, "{v}");
        assert_eq!(v["queues"].as_array().map(Vec::len), Some(1), "{v}");
        let none = Controller::new(Role::Standalone, None);
        let v = none.execute("query-stats", &Map::new()).unwrap();
        assert_eq!(v, json!({"queues": []}));
    }
}
