//! The commands each role answers on its QMP control socket.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::qmp::args::{opt_bool, opt_u64, reject_unknown as only};
use crate::qmp::{CommandHandler, QmpError};
use crate::replication::primary::Primary;
use crate::replication::secondary::Secondary;
use crate::vhost_user::{QueueStatsSnapshot, StatsHandle};

/// What this process is.
#[derive(Clone)]
pub enum Role {
    Standalone,
    Primary(Arc<Primary>),
    Secondary(Arc<Secondary>),
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
}

/// `query-stats`: the device's counters per queue (empty when no VM is served).
#[derive(serde::Serialize)]
struct Stats {
    queues: Vec<QueueStatsSnapshot>,
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
];
const SECONDARY: &[&str] = &["replication-do-checkpoint", "replication-failover"];

impl CommandHandler for Controller {
    fn commands(&self) -> Vec<&'static str> {
        let mut v = COMMON.to_vec();
        match self.role {
            Role::Standalone => {}
            Role::Primary(_) => v.extend_from_slice(PRIMARY),
            Role::Secondary(_) => v.extend_from_slice(SECONDARY),
        }
        v
    }

    fn execute(&self, name: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        match (name, &self.role) {
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
                to_value(Stats {
                    queues: self.stats.as_ref().map(|s| s.queues()).unwrap_or_default(),
                })
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
            ("replication-do-checkpoint", Role::Secondary(s)) => {
                only(args, &[])?;
                let epoch = s.do_checkpoint().map_err(generic)?;
                Ok(json!({"epoch": epoch}))
            }
            ("replication-failover", Role::Secondary(s)) => {
                only(args, &[])?;
                to_value(s.failover().map_err(generic)?)
            }
            (n, _) if PRIMARY.contains(&n) || SECONDARY.contains(&n) => Err(QmpError::Generic(
                format!("{n} is not available in this role"),
            )),
            (n, _) => Err(QmpError::CommandNotFound(n.to_string())),
        }
    }
}
