//! A QMP-compatible control server (QEMU Machine Protocol).
//!
//! Each process exposes its control commands through a [`CommandHandler`] served by a
//! [`QmpServer`] on a unix (or TCP) socket. The wire protocol follows QEMU's
//! `docs/interop/qmp-spec.rst` closely enough for stock clients (python `qemu.qmp`
//! `QMPClient`, `qmp-shell`) to work unchanged:
//!
//! - On connect the server sends the greeting
//!   `{"QMP": {"version": {"qemu": {"major": ..., "minor": ..., "micro": ...}, "package": "colo-blk X.Y.Z"}, "capabilities": []}}`.
//! - Until the client runs `qmp_capabilities`, every other command fails with class
//!   `CommandNotFound` ("Expecting capabilities negotiation with 'qmp_capabilities'").
//! - Requests are JSON objects `{"execute": NAME, "arguments": {...}, "id": ANY}`; several may
//!   share a line and one may span lines or writes. Replies are `{"return": VALUE, "id": ...}`
//!   or `{"error": {"class": ..., "desc": ...}, "id": ...}` (`id` only when the request had
//!   one), one per line, terminated by `"\r\n"` like QEMU.
//! - Events `{"event": NAME, "data": {...}, "timestamp": {"seconds": S, "microseconds": US}}`
//!   go to every negotiated client, interleaved with replies.
//!
//! Commands of one client run one at a time and in order, each on a blocking thread; different
//! clients run concurrently and never affect each other.
//!
//! Built-in commands:
//! - `qmp_capabilities` (optional `enable` list; no capability is offered, so any entry fails),
//! - `query-commands` (built-ins plus [`CommandHandler::commands`]),
//! - `query-version` (`{"qemu": {"major", "minor", "micro"}, "package"}`),
//! - `query-status`: delegated to the handler when it lists `"query-status"`, otherwise
//!   `{"status": "running", "running": true, "singlestep": false}`,
//! - `quit`: when the handler lists `"quit"`, `handler.execute("quit", args)` runs first and an
//!   `Err` vetoes the quit (the error goes to the client). Then the client gets `{}` and, once
//!   that reply is written, [`QmpServer::quit_requested`] resolves: the process decides how to
//!   exit (the server itself never exits the process).
//!
//! Any other name is passed to the handler if [`CommandHandler::commands`] lists it, and is
//! `CommandNotFound` otherwise.
//!
//! Layout: [`args`] (argument helpers for handlers), `events` ([`EventSender`], [`QmpEvent`]
//! and the event lines), `input` (splitting the byte stream into requests), `server`
//! ([`QmpServer`]: listeners, connections, dispatch and the built-in commands); the hidden
//! `fuzzing` module exposes the request splitter and an in-memory session to fuzz targets.

use serde_json::{json, Map, Value};

pub mod args;
mod events;
#[doc(hidden)]
pub mod fuzzing;
mod input;
mod server;

pub use events::{EventSender, QmpEvent, DEFAULT_EVENT_CAPACITY};
pub use server::{QmpServer, QmpVersion, BUILTIN_COMMANDS};

/// Errors a command returns; mapped to `{"error": {"class": ..., "desc": ...}}`.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Class `GenericError`.
    #[error("{0}")]
    Generic(String),
    /// Class `CommandNotFound`; the payload is the command name.
    #[error("The command {0} has not been found")]
    CommandNotFound(String),
    /// A missing, unexpected or ill-typed argument. Class `GenericError`.
    #[error("{0}")]
    InvalidParameter(String),
    /// Class `DeviceNotFound` (e.g. an unknown block node name).
    #[error("{0}")]
    DeviceNotFound(String),
}

impl QmpError {
    /// The QMP error class put on the wire.
    pub fn class(&self) -> &'static str {
        match self {
            QmpError::Generic(_) | QmpError::InvalidParameter(_) => "GenericError",
            QmpError::CommandNotFound(_) => "CommandNotFound",
            QmpError::DeviceNotFound(_) => "DeviceNotFound",
        }
    }

    /// The `{"class": ..., "desc": ...}` object of an error reply.
    pub fn to_json(&self) -> Value {
        json!({"class": self.class(), "desc": self.to_string()})
    }
}

/// What a process exposes through its control socket.
///
/// `execute` is called on a blocking thread (`tokio::task::spawn_blocking`): implementations
/// may block (e.g. wait for replication acks).
pub trait CommandHandler: Send + Sync + 'static {
    /// Extra command names (beyond [`BUILTIN_COMMANDS`]) for `query-commands`. Only listed
    /// names are passed to [`execute`](Self::execute). Listing `"query-status"` or `"quit"`
    /// hooks those built-ins (see the module docs).
    fn commands(&self) -> Vec<&'static str>;

    /// Runs one command; `args` is the `"arguments"` object (empty map if absent).
    /// `Ok(Value::Null)` is sent as `{}` (QEMU's reply for commands without a result).
    fn execute(&self, name: &str, args: &Map<String, Value>) -> Result<Value, QmpError>;
}

/// One wire message: compact JSON terminated by `"\r\n"`.
pub(crate) fn to_line(v: &Value) -> String {
    let mut s = serde_json::to_string(v).unwrap_or_else(|_| "{}".into());
    s.push_str("\r\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_classes() {
        assert_eq!(QmpError::Generic("x".into()).class(), "GenericError");
        assert_eq!(
            QmpError::InvalidParameter("x".into()).class(),
            "GenericError"
        );
        assert_eq!(
            QmpError::DeviceNotFound("x".into()).class(),
            "DeviceNotFound"
        );
        assert_eq!(
            QmpError::CommandNotFound("foo".into()).to_json(),
            json!({"class": "CommandNotFound", "desc": "The command foo has not been found"})
        );
    }
}
