//! Server tests over real unix/TCP sockets and in-memory pipes, with a mock handler.

use super::*;
use std::sync::{Condvar, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::UnixStream;

/// Failure guard only: every wait below normally ends as soon as the awaited reply arrives.
const GUARD: Duration = Duration::from_secs(20);

struct Mock {
    events: EventSender,
    gate: Mutex<bool>,
    gate_cv: Condvar,
}

impl Mock {
    fn new(events: EventSender) -> Self {
        Mock {
            events,
            gate: Mutex::new(false),
            gate_cv: Condvar::new(),
        }
    }
}

impl CommandHandler for Mock {
    fn commands(&self) -> Vec<&'static str> {
        vec![
            "echo",
            "fire-event",
            "fail",
            "panic",
            "wait-gate",
            "open-gate",
            "query-version",
        ]
    }

    fn execute(&self, name: &str, a: &Map<String, Value>) -> Result<Value, QmpError> {
        match name {
            "echo" => Ok(Value::Object(a.clone())),
            "fire-event" => {
                args::reject_unknown(a, &["name", "data"])?;
                let event = args::str(a, "name")?;
                self.events
                    .emit(event, a.get("data").cloned().unwrap_or(Value::Null));
                Ok(Value::Null)
            }
            "fail" => Err(QmpError::DeviceNotFound("no node 'x'".into())),
            "panic" => panic!("mock handler panics on purpose"),
            "wait-gate" => {
                let open = self.gate.lock().unwrap();
                let (open, _) = self
                    .gate_cv
                    .wait_timeout_while(open, GUARD, |o| !*o)
                    .unwrap();
                if *open {
                    Ok(json!("passed"))
                } else {
                    Err(QmpError::Generic("gate never opened".into()))
                }
            }
            "open-gate" => {
                *self.gate.lock().unwrap() = true;
                self.gate_cv.notify_all();
                Ok(Value::Null)
            }
            other => Err(QmpError::CommandNotFound(other.into())),
        }
    }
}

/// Lists "quit" and "query-status" to hook them; vetoes quit unless `force` is true.
struct Hooks;

impl CommandHandler for Hooks {
    fn commands(&self) -> Vec<&'static str> {
        vec!["quit", "query-status"]
    }

    fn execute(&self, name: &str, a: &Map<String, Value>) -> Result<Value, QmpError> {
        match name {
            "quit" if args::opt_bool(a, "force")? == Some(true) => Ok(json!("ignored")),
            "quit" => Err(QmpError::Generic("replication still active".into())),
            "query-status" => Ok(json!({"status": "paused", "running": false})),
            other => Err(QmpError::CommandNotFound(other.into())),
        }
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    server: Arc<QmpServer>,
    task: JoinHandle<io::Result<()>>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn start_with(handler: impl FnOnce(EventSender) -> Arc<dyn CommandHandler>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let events = EventSender::new();
    let server = Arc::new(QmpServer::new(
        handler(events.clone()),
        events,
        QmpVersion::default(),
    ));
    let listener = QmpServer::bind_unix(&path).unwrap();
    let task = tokio::spawn(server.clone().serve_unix_listener(listener));
    Fixture {
        _dir: dir,
        path,
        server,
        task,
    }
}

fn start() -> Fixture {
    start_with(|ev| Arc::new(Mock::new(ev)))
}

struct Client {
    rd: BufReader<Box<dyn AsyncRead + Unpin + Send>>,
    wr: Box<dyn AsyncWrite + Unpin + Send>,
}

impl Client {
    /// Connects and returns the client with the greeting.
    async fn connect(path: &Path) -> (Client, Value) {
        let (rd, wr) = UnixStream::connect(path).await.unwrap().into_split();
        Client::over(rd, wr).await
    }

    async fn over(
        rd: impl AsyncRead + Unpin + Send + 'static,
        wr: impl AsyncWrite + Unpin + Send + 'static,
    ) -> (Client, Value) {
        let mut c = Client {
            rd: BufReader::new(Box::new(rd)),
            wr: Box::new(wr),
        };
        let greeting = c.recv().await;
        (c, greeting)
    }

    async fn negotiated(path: &Path) -> Client {
        let (mut c, _) = Client::connect(path).await;
        assert_eq!(
            c.cmd(json!({"execute": "qmp_capabilities"})).await,
            json!({"return": {}})
        );
        c
    }

    async fn send(&mut self, raw: &[u8]) {
        tokio::time::timeout(GUARD, self.wr.write_all(raw))
            .await
            .expect("server not reading")
            .unwrap();
    }

    /// Next message; `None` at EOF.
    async fn try_recv(&mut self) -> Option<Value> {
        let mut line = String::new();
        let n = tokio::time::timeout(GUARD, self.rd.read_line(&mut line))
            .await
            .expect("no message from the server in time")
            .unwrap();
        if n == 0 {
            return None;
        }
        assert!(line.ends_with("\r\n"), "not CRLF-terminated: {line:?}");
        Some(serde_json::from_str(&line).unwrap())
    }

    async fn recv(&mut self) -> Value {
        self.try_recv().await.expect("server closed the connection")
    }

    async fn cmd(&mut self, req: Value) -> Value {
        let mut s = req.to_string();
        s.push('\n');
        self.send(s.as_bytes()).await;
        self.recv().await
    }
}

fn err(class: &str, desc: &str) -> Value {
    json!({"error": {"class": class, "desc": desc}})
}

#[tokio::test]
async fn greeting_negotiation_commands_and_id_echo() {
    let f = start();
    let (mut c, greeting) = Client::connect(&f.path).await;
    let v = QmpVersion::default();
    assert_eq!(
        greeting,
        json!({"QMP": {"version": {"qemu": {"major": v.major, "minor": v.minor, "micro": v.micro},
                                   "package": format!("colo-blk {}", env!("CARGO_PKG_VERSION"))},
                       "capabilities": []}})
    );
    assert_eq!(
        c.cmd(json!({"execute": "qmp_capabilities", "arguments": {"enable": []}, "id": 1}))
            .await,
        json!({"return": {}, "id": 1})
    );

    let reply = c.cmd(json!({"execute": "query-commands", "id": "q"})).await;
    assert_eq!(reply["id"], "q");
    let names: Vec<&str> = reply["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    // Built-ins first; the handler's duplicate "query-version" is listed once.
    assert_eq!(
        names,
        [
            "qmp_capabilities",
            "query-commands",
            "query-version",
            "query-status",
            "quit",
            "echo",
            "fire-event",
            "fail",
            "panic",
            "wait-gate",
            "open-gate"
        ]
    );

    let id = json!({"nested": [1, "two", null]});
    assert_eq!(
        c.cmd(json!({"execute": "echo", "arguments": {"x": [1, 2]}, "id": id}))
            .await,
        json!({"return": {"x": [1, 2]}, "id": id})
    );
    // No arguments: the handler sees an empty map; no id: none echoed.
    assert_eq!(
        c.cmd(json!({"execute": "echo"})).await,
        json!({"return": {}})
    );
    // Null results become {}.
    assert_eq!(
        c.cmd(json!({"execute": "open-gate"})).await,
        json!({"return": {}})
    );
    // Errors carry the class and the id.
    assert_eq!(
        c.cmd(json!({"execute": "fail", "id": 7})).await,
        json!({"error": {"class": "DeviceNotFound", "desc": "no node 'x'"}, "id": 7})
    );
    assert_eq!(
        c.cmd(json!({"execute": "fire-event", "arguments": {"nme": "X"}, "id": 8}))
            .await,
        json!({"error": {"class": "GenericError", "desc": "Parameter 'nme' is unexpected"}, "id": 8})
    );
    assert_eq!(
        c.cmd(json!({"execute": "nope", "id": 9})).await,
        json!({"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}, "id": 9})
    );
    // Built-ins.
    assert_eq!(
        c.cmd(json!({"execute": "query-version"})).await,
        json!({"return": v.to_json()})
    );
    assert_eq!(
        c.cmd(json!({"execute": "query-status"})).await,
        json!({"return": {"status": "running", "running": true, "singlestep": false}})
    );
    assert_eq!(
        c.cmd(json!({"execute": "query-version", "arguments": {"a": 1}}))
            .await,
        err("GenericError", "Parameter 'a' is unexpected")
    );
    assert_eq!(
        c.cmd(json!({"execute": "qmp_capabilities", "id": 2})).await,
        json!({"error": {"class": "CommandNotFound",
                         "desc": "Capabilities negotiation is already complete, command ignored"},
               "id": 2})
    );
}

#[tokio::test]
async fn commands_before_negotiation_are_rejected() {
    let f = start();
    let (mut c, _) = Client::connect(&f.path).await;
    let expecting = "Expecting capabilities negotiation with 'qmp_capabilities'";
    for name in ["echo", "query-commands", "quit", "nope"] {
        assert_eq!(
            c.cmd(json!({"execute": name, "id": name})).await,
            json!({"error": {"class": "CommandNotFound", "desc": expecting}, "id": name})
        );
    }
    assert!(!f.server.is_quit_requested());
    // Malformed requests get their own errors even before negotiation.
    assert_eq!(
        c.cmd(json!({"arguments": {}})).await,
        err("GenericError", "QMP input lacks member 'execute'")
    );
    // Bad capability lists are refused and leave the client un-negotiated.
    assert_eq!(
        c.cmd(json!({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}))
            .await,
        err("GenericError", "Capability 'oob' not available")
    );
    assert_eq!(
        c.cmd(json!({"execute": "qmp_capabilities", "arguments": {"enable": ["foo"]}}))
            .await,
        err(
            "GenericError",
            "Parameter 'enable[0]' does not accept value 'foo'"
        )
    );
    assert_eq!(
        c.cmd(json!({"execute": "qmp_capabilities", "arguments": {"enable": ["oob", 3]}}))
            .await,
        err(
            "GenericError",
            "Invalid parameter type for 'enable[1]', expected: string"
        )
    );
    assert_eq!(
        c.cmd(json!({"execute": "qmp_capabilities", "arguments": {"enable": "oob"}}))
            .await,
        err(
            "GenericError",
            "Invalid parameter type for 'enable', expected: array"
        )
    );
    assert_eq!(
        c.cmd(json!({"execute": "qmp_capabilities", "arguments": {"x": 1}}))
            .await,
        err("GenericError", "Parameter 'x' is unexpected")
    );
    assert_eq!(
        c.cmd(json!({"execute": "echo"})).await,
        err("CommandNotFound", expecting)
    );
    assert_eq!(
        c.cmd(json!({"execute": "qmp_capabilities"})).await,
        json!({"return": {}})
    );
    assert_eq!(
        c.cmd(json!({"execute": "echo"})).await,
        json!({"return": {}})
    );
}

#[tokio::test]
async fn malformed_input_gets_errors_and_the_connection_survives() {
    let f = start();
    let mut c = Client::negotiated(&f.path).await;

    c.send(b"{\"execute\": nonsense}\n").await;
    let reply = c.recv().await;
    assert_eq!(reply["error"]["class"], "GenericError");
    let desc = reply["error"]["desc"].as_str().unwrap();
    assert!(desc.starts_with("JSON parse error, "), "{desc}");
    assert!(reply.get("id").is_none());
    assert_eq!(
        c.cmd(json!({"execute": "echo", "id": 1})).await,
        json!({"return": {}, "id": 1})
    );

    // An error in the middle of a line discards the rest of that line only.
    c.send(b"}}} {\"execute\": \"echo\"}\n{\"execute\": \"echo\", \"id\": 2}\n")
        .await;
    assert_eq!(c.recv().await["error"]["class"], "GenericError");
    assert_eq!(c.recv().await, json!({"return": {}, "id": 2}));

    // A broken line split across writes: the tail is skipped without a second error.
    c.send(b"{\"execute\": \"echo\" ] \"tail").await;
    assert_eq!(c.recv().await["error"]["class"], "GenericError");
    c.send(b" of the broken line\"}\n{\"execute\": \"echo\", \"id\": 3}\n")
        .await;
    assert_eq!(c.recv().await, json!({"return": {}, "id": 3}));

    let cases = [
        (json!([1, 2]), "QMP input must be a JSON object", false),
        (json!("execute"), "QMP input must be a JSON object", false),
        (json!({"id": 4}), "QMP input lacks member 'execute'", true),
        (
            json!({"execute": 5, "id": 4}),
            "QMP input member 'execute' must be a string",
            true,
        ),
        (
            json!({"execute": "echo", "arguments": [1], "id": 4}),
            "QMP input member 'arguments' must be an object",
            true,
        ),
        (
            json!({"execute": "echo", "foo": 1, "id": 4}),
            "QMP input member 'foo' is unexpected",
            true,
        ),
        (
            json!({"exec-oob": "echo", "id": 4}),
            "QMP input member 'exec-oob' is unexpected",
            true,
        ),
    ];
    for (req, desc, echoes_id) in cases {
        let mut want = err("GenericError", desc);
        if echoes_id {
            want["id"] = json!(4);
        }
        assert_eq!(c.cmd(req).await, want);
    }

    // Invalid UTF-8 and deep nesting are parse errors too, never panics.
    c.send(b"{\"execute\": \"\xff\xfe\"}\n").await;
    assert_eq!(c.recv().await["error"]["class"], "GenericError");
    let deep = format!("{}{}\n", "[".repeat(10_000), "]".repeat(10_000));
    c.send(deep.as_bytes()).await;
    assert_eq!(c.recv().await["error"]["class"], "GenericError");

    // A panicking handler is an error reply, not a dead connection.
    let reply = c.cmd(json!({"execute": "panic", "id": 5})).await;
    assert_eq!(
        reply,
        json!({"error": {"class": "GenericError", "desc": "internal error while executing 'panic'"}, "id": 5})
    );
    assert_eq!(
        c.cmd(json!({"execute": "echo", "id": 6})).await,
        json!({"return": {}, "id": 6})
    );
}

#[tokio::test]
async fn requests_are_framed_by_json_not_by_writes() {
    let f = start();
    let mut c = Client::negotiated(&f.path).await;

    // Two objects in one write, without a separator.
    c.send(br#"{"execute": "echo", "id": 1}{"execute": "echo", "id": 2}"#)
        .await;
    assert_eq!(c.recv().await, json!({"return": {}, "id": 1}));
    assert_eq!(c.recv().await, json!({"return": {}, "id": 2}));

    // One object split across reads and lines: a 1-byte pipe makes every write wait
    // until the server has read the previous byte.
    let events = EventSender::new();
    let server = Arc::new(QmpServer::new(
        Arc::new(Mock::new(events.clone())),
        events,
        QmpVersion::default(),
    ));
    let (near, far) = tokio::io::duplex(1);
    let conn = tokio::spawn(server.serve_connection(far));
    let (rd, wr) = tokio::io::split(near);
    let (mut p, _) = Client::over(rd, wr).await;
    let req = b"{\"execute\":\r\n \"qmp_capabilities\"} {\"execute\": \"echo\", \"arguments\": {\"s\": \"a\\u00e9\xe2\x82\xac\"},\n \"id\": 3}";
    // Write from another task: replies come back through a 1-byte pipe too.
    let mut wr = std::mem::replace(&mut p.wr, Box::new(tokio::io::sink()));
    let writer = tokio::spawn(async move { wr.write_all(req).await.unwrap() });
    assert_eq!(p.recv().await, json!({"return": {}}));
    assert_eq!(p.recv().await, json!({"return": {"s": "aé€"}, "id": 3}));
    writer.await.unwrap();
    drop(p);
    conn.await.unwrap().unwrap();

    // Replies keep request order even when a later one is ready first.
    c.send(br#"{"execute": "open-gate", "id": 4} {"execute": "wait-gate", "id": 5} {"execute": "query-version", "id": 6}"#)
        .await;
    assert_eq!(c.recv().await, json!({"return": {}, "id": 4}));
    assert_eq!(c.recv().await, json!({"return": "passed", "id": 5}));
    assert_eq!(c.recv().await["id"], 6);
}

#[tokio::test]
async fn oversized_request_is_refused_and_disconnected() {
    let f = start();
    let Client { mut rd, mut wr } = Client::negotiated(&f.path).await;
    let mut big = b"{\"execute\": \"echo\", \"arguments\": {\"s\": \"".to_vec();
    big.resize(MAX_REQUEST_BYTES + 64 * 1024, b'a');
    // The server stops reading at the limit, so this write may fail: ignore that.
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&big).await;
    });
    let mut line = String::new();
    tokio::time::timeout(GUARD, rd.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    let reply: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(reply["error"]["class"], "GenericError");
    assert!(reply["error"]["desc"].as_str().unwrap().contains("exceeds"));
    line.clear();
    let n = tokio::time::timeout(GUARD, rd.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0, "connection closed");
    drop(rd);
    writer.await.unwrap();

    // Other clients are unaffected.
    let mut d = Client::negotiated(&f.path).await;
    assert_eq!(
        d.cmd(json!({"execute": "echo"})).await,
        json!({"return": {}})
    );
}

impl Client {
    /// An event and a reply that may arrive in either order (the event was emitted while
    /// the command ran).
    async fn recv_event_and_reply(&mut self) -> (Value, Value) {
        let (first, second) = (self.recv().await, self.recv().await);
        if first.get("event").is_some() {
            (first, second)
        } else {
            (second, first)
        }
    }
}

fn assert_event(ev: &Value, name: &str, data: Option<Value>) {
    assert_eq!(ev["event"], name, "{ev}");
    assert_eq!(ev.get("data").cloned(), data, "{ev}");
    let ts = &ev["timestamp"];
    let secs = ts["seconds"].as_u64().expect("seconds");
    let micros = ts["microseconds"].as_u64().expect("microseconds");
    assert!(micros < 1_000_000);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        secs <= now && secs + 3600 > now,
        "wall clock timestamp: {ev}"
    );
    assert_eq!(ts.as_object().unwrap().len(), 2);
    assert_eq!(
        ev.as_object().unwrap().len(),
        if data.is_some() { 3 } else { 2 }
    );
}

#[tokio::test]
async fn events_reach_negotiated_clients_only() {
    let f = start();
    let mut a = Client::negotiated(&f.path).await;
    let (mut b, _) = Client::connect(&f.path).await;

    // Emitted by a command on the handler's blocking thread.
    a.send(b"{\"execute\": \"fire-event\", \"arguments\": {\"name\": \"RESUME\"}, \"id\": 1}\n")
        .await;
    let (ev, reply) = a.recv_event_and_reply().await;
    assert_eq!(reply, json!({"return": {}, "id": 1}));
    assert_event(&ev, "RESUME", None);

    // Emitted from outside any command, with data.
    f.server.events().emit(
        "BLOCK_JOB_COMPLETED",
        json!({"device": "colo0", "len": 4096}),
    );
    assert_event(
        &a.recv().await,
        "BLOCK_JOB_COMPLETED",
        Some(json!({"device": "colo0", "len": 4096})),
    );

    // `b` was not negotiated when those were sent: its next message is its own reply.
    assert_eq!(
        b.cmd(json!({"execute": "qmp_capabilities", "id": "b"}))
            .await,
        json!({"return": {}, "id": "b"})
    );
    f.server.events().emit("STOP", Value::Null);
    assert_event(&a.recv().await, "STOP", None);
    assert_event(&b.recv().await, "STOP", None);

    // Events flow while a command of the same client is blocked.
    a.send(b"{\"execute\": \"wait-gate\", \"id\": 2}\n").await;
    b.send(b"{\"execute\": \"fire-event\", \"arguments\": {\"name\": \"WHILE_BLOCKED\", \"data\": {}}}\n")
        .await;
    let (ev, reply) = b.recv_event_and_reply().await;
    assert_event(&ev, "WHILE_BLOCKED", Some(json!({})));
    assert_eq!(reply, json!({"return": {}}));
    assert_event(&a.recv().await, "WHILE_BLOCKED", Some(json!({})));
    assert_eq!(
        b.cmd(json!({"execute": "open-gate"})).await,
        json!({"return": {}})
    );
    assert_eq!(a.recv().await, json!({"return": "passed", "id": 2}));
}

#[tokio::test]
async fn lagging_client_misses_events_but_stays_connected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let events = EventSender::with_capacity(2);
    let server = Arc::new(QmpServer::new(
        Arc::new(Mock::new(events.clone())),
        events.clone(),
        QmpVersion::default(),
    ));
    let listener = QmpServer::bind_unix(&path).unwrap();
    let task = tokio::spawn(server.clone().serve_unix_listener(listener));
    let mut c = Client::negotiated(&path).await;
    // `#[tokio::test]` runs everything on this one thread: the connection task cannot
    // forward anything while this loop emits, so all but the newest 2 events are lost.
    for i in 0..50 {
        events.emit("TICK", json!({"i": i}));
    }
    c.send(b"{\"execute\": \"echo\"}\n").await;
    let mut ticks = Vec::new();
    let mut replies = Vec::new();
    while ticks.len() < 2 || replies.is_empty() {
        let m = c.recv().await;
        match m.get("event") {
            Some(_) => ticks.push(m["data"]["i"].as_u64().unwrap()),
            None => replies.push(m),
        }
    }
    assert_eq!(ticks, [48, 49]);
    assert_eq!(replies, [json!({"return": {}})]);
    assert_eq!(
        c.cmd(json!({"execute": "echo"})).await,
        json!({"return": {}})
    );
    task.abort();
}

#[tokio::test]
async fn clients_are_independent() {
    let f = start();
    // A client that hangs up mid-request, one that hangs up while its command runs, and
    // one that never negotiates.
    {
        let (mut c, _) = Client::connect(&f.path).await;
        c.send(b"{\"execute\": \"qmp_capa").await;
    }
    let (_idle, _) = Client::connect(&f.path).await;
    let mut a = Client::negotiated(&f.path).await;
    let mut b = Client::negotiated(&f.path).await;
    a.send(b"{\"execute\": \"wait-gate\", \"id\": \"a\"}\n")
        .await;
    // `a` is blocked in the handler; `b` is served meanwhile and releases it.
    assert_eq!(
        b.cmd(json!({"execute": "echo", "id": "b"})).await["id"],
        "b"
    );
    assert_eq!(
        b.cmd(json!({"execute": "open-gate"})).await,
        json!({"return": {}})
    );
    assert_eq!(a.recv().await, json!({"return": "passed", "id": "a"}));
    drop(a);
    assert_eq!(b.cmd(json!({"execute": "echo", "id": 2})).await["id"], 2);
}

#[tokio::test]
async fn quit_is_replied_then_signalled() {
    let f = start();
    let mut c = Client::negotiated(&f.path).await;
    assert!(!f.server.is_quit_requested());
    assert_eq!(
        c.cmd(json!({"execute": "quit", "arguments": {"now": true}}))
            .await,
        err("GenericError", "Parameter 'now' is unexpected")
    );
    assert!(!f.server.is_quit_requested());
    assert_eq!(
        c.cmd(json!({"execute": "quit", "id": 1})).await,
        json!({"return": {}, "id": 1})
    );
    tokio::time::timeout(GUARD, f.server.quit_requested())
        .await
        .unwrap();
    assert!(f.server.is_quit_requested());
}

#[tokio::test]
async fn handler_can_hook_quit_and_query_status() {
    let f = start_with(|_| Arc::new(Hooks));
    let mut c = Client::negotiated(&f.path).await;
    assert_eq!(
        c.cmd(json!({"execute": "query-status"})).await,
        json!({"return": {"status": "paused", "running": false}})
    );
    let names = c.cmd(json!({"execute": "query-commands"})).await["return"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(names, BUILTIN_COMMANDS.len(), "hooks are not listed twice");
    assert_eq!(
        c.cmd(json!({"execute": "quit"})).await,
        err("GenericError", "replication still active")
    );
    assert!(!f.server.is_quit_requested());
    assert_eq!(
        c.cmd(json!({"execute": "quit", "arguments": {"force": "yes"}}))
            .await,
        err(
            "GenericError",
            "Invalid parameter type for 'force', expected: boolean"
        )
    );
    // The handler's value is not returned: quit always answers {}.
    assert_eq!(
        c.cmd(json!({"execute": "quit", "arguments": {"force": true}}))
            .await,
        json!({"return": {}})
    );
    tokio::time::timeout(GUARD, f.server.quit_requested())
        .await
        .unwrap();
}

#[tokio::test]
async fn serve_unix_replaces_stale_socket_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists(), "stale socket file left behind");

    let events = EventSender::new();
    let server = Arc::new(QmpServer::new(
        Arc::new(Mock::new(events.clone())),
        events,
        QmpVersion::default(),
    ));
    let mut serve = Box::pin(server.serve_unix(&path));
    // The first poll binds the socket synchronously.
    tokio::select! {
        biased;
        res = &mut serve => panic!("server ended: {res:?}"),
        _ = std::future::ready(()) => {}
    }
    let mut c = tokio::select! {
        res = &mut serve => panic!("server ended: {res:?}"),
        c = Client::negotiated(&path) => c,
    };
    let reply = tokio::select! {
        res = &mut serve => panic!("server ended: {res:?}"),
        r = c.cmd(json!({"execute": "echo", "id": 1})) => r,
    };
    assert_eq!(reply, json!({"return": {}, "id": 1}));

    drop(serve);
    assert!(!path.exists(), "socket removed when serving stops");
    assert!(
        c.try_recv().await.is_none(),
        "connections closed when serving stops"
    );

    // A regular file is never removed.
    std::fs::write(&path, b"data").unwrap();
    let e = QmpServer::bind_unix(&path).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
    assert_eq!(std::fs::read(&path).unwrap(), b"data");
}

#[tokio::test]
async fn serves_tcp() {
    let events = EventSender::new();
    let server = Arc::new(QmpServer::new(
        Arc::new(Mock::new(events.clone())),
        events,
        QmpVersion::default(),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(server.serve_tcp(listener));
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (rd, mut wr) = tokio::io::split(stream);
    let mut rd = BufReader::new(rd);
    let mut line = String::new();
    for req in [
        "",
        "{\"execute\": \"qmp_capabilities\"}\n",
        "{\"execute\": \"echo\", \"id\": 1}\n",
    ] {
        wr.write_all(req.as_bytes()).await.unwrap();
        line.clear();
        tokio::time::timeout(GUARD, rd.read_line(&mut line))
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(
        serde_json::from_str::<Value>(&line).unwrap(),
        json!({"return": {}, "id": 1})
    );
    task.abort();
}
