//! The QMP server against stock python clients: `qemu.qmp`'s `QMPClient`, its legacy
//! synchronous wrapper and `qmp-shell` (driven by tests/qmp_client.py).
//!
//! Needs `python3` with `qemu.qmp` (`pip install qemu.qmp`). Without it the test prints
//! "SKIPPED" and passes, except when the environment variable `CI` is set: then it fails.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use colo_blk::qmp::{args, CommandHandler, EventSender, QmpError, QmpServer, QmpVersion};
use common::needs::Needs;
use serde_json::{Map, Value};

struct TestHandler {
    events: EventSender,
}

impl CommandHandler for TestHandler {
    fn commands(&self) -> Vec<&'static str> {
        vec!["echo", "fire-event"]
    }

    fn execute(&self, name: &str, a: &Map<String, Value>) -> Result<Value, QmpError> {
        match name {
            "echo" => Ok(Value::Object(a.clone())),
            "fire-event" => {
                args::reject_unknown(a, &["name", "data"])?;
                let event = args::str(a, "name")?;
                let data = a.get("data").cloned().unwrap_or(Value::Null);
                self.events.emit(event, data);
                Ok(Value::Null)
            }
            other => Err(QmpError::CommandNotFound(other.into())),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_python_qmp_clients() {
    if !Needs::of("stock_python_qmp_clients")
        .python("qemu.qmp, qemu.qmp.legacy, qemu.qmp.qmp_shell")
        .met()
    {
        return;
    }

    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let events = EventSender::new();
    let server = Arc::new(QmpServer::new(
        Arc::new(TestHandler {
            events: events.clone(),
        }),
        events,
        QmpVersion::default(),
    ));
    let listener = QmpServer::bind_unix(&sock).unwrap();
    let serving = tokio::spawn(server.clone().serve_unix_listener(listener));

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/qmp_client.py");
    let sock_arg = sock.clone();
    // The script bounds its own run time (per-step timeouts and a hard alarm).
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .arg(sock_arg)
            .output()
            .expect("run python3")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("--- qmp_client.py stdout ---\n{stdout}--- stderr ---\n{stderr}");
    assert!(out.status.success(), "qmp_client.py failed: {}", out.status);
    assert!(stdout.contains("qmp_client: ALL OK"));

    // The script's last step was `quit`.
    tokio::time::timeout(Duration::from_secs(20), server.quit_requested())
        .await
        .expect("quit signalled");
    serving.abort();
}
