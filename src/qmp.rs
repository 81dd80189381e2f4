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

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{broadcast, watch};
use tokio::task::{JoinHandle, JoinSet};

/// Largest incomplete request the server buffers; a client exceeding it gets an error and is
/// disconnected.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// How long a connection closed for an oversized request keeps discarding input.
const LINGER: Duration = Duration::from_secs(2);

/// Events buffered per client by [`EventSender::new`]; a client further behind misses events.
pub const DEFAULT_EVENT_CAPACITY: usize = 256;

/// Commands the server implements itself, in the order `query-commands` lists them.
pub const BUILTIN_COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-commands",
    "query-version",
    "query-status",
    "quit",
];

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

/// Argument helpers for [`CommandHandler`] implementations, with QEMU's error wording.
pub mod args {
    use super::QmpError;
    use serde_json::{Map, Value};

    fn bad_type(name: &str, expected: &str) -> QmpError {
        QmpError::InvalidParameter(format!(
            "Invalid parameter type for '{name}', expected: {expected}"
        ))
    }

    /// Fails with "Parameter 'x' is unexpected" for any key not in `allowed`.
    pub fn reject_unknown(args: &Map<String, Value>, allowed: &[&str]) -> Result<(), QmpError> {
        match args.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(k) => Err(QmpError::InvalidParameter(format!(
                "Parameter '{k}' is unexpected"
            ))),
            None => Ok(()),
        }
    }

    /// An optional string argument.
    pub fn opt_str<'a>(
        args: &'a Map<String, Value>,
        name: &str,
    ) -> Result<Option<&'a str>, QmpError> {
        match args.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(bad_type(name, "string")),
        }
    }

    /// A required string argument ("Parameter 'x' is missing" when absent).
    pub fn str<'a>(args: &'a Map<String, Value>, name: &str) -> Result<&'a str, QmpError> {
        opt_str(args, name)?.ok_or_else(|| missing(name))
    }

    /// An optional boolean argument.
    pub fn opt_bool(args: &Map<String, Value>, name: &str) -> Result<Option<bool>, QmpError> {
        match args.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(bad_type(name, "boolean")),
        }
    }

    /// An optional non-negative integer argument.
    pub fn opt_u64(args: &Map<String, Value>, name: &str) -> Result<Option<u64>, QmpError> {
        match args.get(name) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| bad_type(name, "uint64")),
        }
    }

    /// A required non-negative integer argument.
    pub fn u64(args: &Map<String, Value>, name: &str) -> Result<u64, QmpError> {
        opt_u64(args, name)?.ok_or_else(|| missing(name))
    }

    /// The "Parameter 'x' is missing" error.
    pub fn missing(name: &str) -> QmpError {
        QmpError::InvalidParameter(format!("Parameter '{name}' is missing"))
    }
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
        let line = event_line(event, data, SystemTime::now());
        // Err only means nobody is listening.
        let _ = self.tx.send(line.into());
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
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

/// One wire message: compact JSON terminated by `"\r\n"`.
fn to_line(v: &Value) -> String {
    let mut s = serde_json::to_string(v).unwrap_or_else(|_| "{}".into());
    s.push_str("\r\n");
    s
}

/// The version a server announces in its greeting and `query-version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpVersion {
    pub major: u64,
    pub minor: u64,
    pub micro: u64,
    /// Free-form package string, e.g. `"colo-blk 0.1.0"`.
    pub package: String,
}

impl QmpVersion {
    /// The `{"qemu": {...}, "package": ...}` object.
    pub fn to_json(&self) -> Value {
        json!({
            "qemu": {"major": self.major, "minor": self.minor, "micro": self.micro},
            "package": self.package,
        })
    }
}

impl Default for QmpVersion {
    /// This crate's version, package `"colo-blk X.Y.Z"`.
    fn default() -> Self {
        QmpVersion {
            major: env!("CARGO_PKG_VERSION_MAJOR").parse().unwrap_or(0),
            minor: env!("CARGO_PKG_VERSION_MINOR").parse().unwrap_or(0),
            micro: env!("CARGO_PKG_VERSION_PATCH").parse().unwrap_or(0),
            package: concat!(env!("CARGO_PKG_NAME"), " ", env!("CARGO_PKG_VERSION")).into(),
        }
    }
}

/// A QMP server: accepts clients and runs their commands through a [`CommandHandler`].
pub struct QmpServer {
    handler: Arc<dyn CommandHandler>,
    events: EventSender,
    version: QmpVersion,
    quit: watch::Sender<bool>,
}

impl QmpServer {
    /// A server for `handler`; `events` is (a clone of) the sender the process emits with.
    pub fn new(handler: Arc<dyn CommandHandler>, events: EventSender, version: QmpVersion) -> Self {
        QmpServer {
            handler,
            events,
            version,
            quit: watch::channel(false).0,
        }
    }

    /// The server's event sender.
    pub fn events(&self) -> &EventSender {
        &self.events
    }

    /// Binds a unix socket at `path`, first removing a stale socket file there (any other kind
    /// of existing file is an `AlreadyExists` error). Must be called inside a tokio runtime.
    /// Binding before serving lets callers connect as soon as this returns.
    pub fn bind_unix(path: &Path) -> io::Result<UnixListener> {
        match std::fs::symlink_metadata(path) {
            Ok(md) if md.file_type().is_socket() => std::fs::remove_file(path)?,
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        UnixListener::bind(path)
    }

    /// Binds `path` (see [`bind_unix`](Self::bind_unix)) and serves it until the returned
    /// future is dropped, which also closes every connection and removes the socket file.
    pub async fn serve_unix(self: Arc<Self>, path: &Path) -> io::Result<()> {
        let listener = Self::bind_unix(path)?;
        let _unlink = UnlinkOnDrop(path.to_path_buf());
        self.serve_unix_listener(listener).await
    }

    /// Serves an already bound unix listener until the returned future is dropped (which
    /// closes every connection).
    pub async fn serve_unix_listener(self: Arc<Self>, listener: UnixListener) -> io::Result<()> {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                res = listener.accept() => match res {
                    Ok((stream, _)) => {
                        conns.spawn(self.clone().serve_connection(stream));
                    }
                    Err(e) => accept_failed(e).await,
                },
                Some(res) = conns.join_next(), if !conns.is_empty() => log_conn_end(res),
            }
        }
    }

    /// Serves a TCP listener until the returned future is dropped (which closes every
    /// connection).
    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener) -> io::Result<()> {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                res = listener.accept() => match res {
                    Ok((stream, _)) => {
                        let _ = stream.set_nodelay(true);
                        conns.spawn(self.clone().serve_connection(stream));
                    }
                    Err(e) => accept_failed(e).await,
                },
                Some(res) = conns.join_next(), if !conns.is_empty() => log_conn_end(res),
            }
        }
    }

    /// Speaks QMP on one connected stream until the client hangs up, an I/O error occurs or
    /// the client sends an oversized request. Dropping the future closes the connection.
    pub async fn serve_connection<S>(self: Arc<Self>, stream: S) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        Connection {
            server: self,
            rd,
            wr,
            input: InputBuffer::new(MAX_REQUEST_BYTES),
            negotiated: false,
            events: None,
        }
        .run()
        .await
    }

    /// Resolves once a client's `quit` succeeded and its `{}` reply was written (immediately if
    /// that already happened).
    pub async fn quit_requested(&self) {
        let mut rx = self.quit.subscribe();
        // Err is impossible: `self` owns the sender.
        let _ = rx.wait_for(|q| *q).await;
    }

    /// Whether a client's `quit` has succeeded.
    pub fn is_quit_requested(&self) -> bool {
        *self.quit.borrow()
    }

    fn greeting(&self) -> Value {
        json!({"QMP": {"version": self.version.to_json(), "capabilities": []}})
    }

    fn handler_lists(&self, name: &str) -> bool {
        self.handler.commands().contains(&name)
    }

    fn command_list(&self) -> Value {
        let mut names: Vec<&str> = BUILTIN_COMMANDS.to_vec();
        for name in self.handler.commands() {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        Value::Array(names.into_iter().map(|n| json!({"name": n})).collect())
    }
}

struct UnlinkOnDrop(PathBuf);

impl Drop for UnlinkOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn accept_failed(e: io::Error) {
    log::warn!("qmp: accept failed: {e}");
    // Back off so that e.g. EMFILE does not turn into a busy loop.
    tokio::time::sleep(Duration::from_millis(50)).await;
}

fn log_conn_end(res: Result<io::Result<()>, tokio::task::JoinError>) {
    match res {
        Ok(Ok(())) => log::debug!("qmp: client disconnected"),
        Ok(Err(e)) => log::debug!("qmp: client connection ended: {e}"),
        Err(e) => log::warn!("qmp: client task failed: {e}"),
    }
}

/// The outcome of a valid request.
enum Action {
    /// Reply `{"return": value}` now.
    Reply(Value),
    /// A command was started on a blocking thread.
    Run(Running),
}

/// What the connection loop should do with one parsed request.
enum Step {
    /// Write this reply now.
    Reply(Value),
    /// A handler command is running on a blocking thread.
    Run(Running),
}

struct Running {
    task: JoinHandle<Result<Value, QmpError>>,
    name: String,
    id: Option<Value>,
    quit: bool,
}

struct Connection<R, W> {
    server: Arc<QmpServer>,
    rd: R,
    wr: W,
    input: InputBuffer,
    negotiated: bool,
    events: Option<broadcast::Receiver<Arc<str>>>,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Connection<R, W> {
    async fn run(mut self) -> io::Result<()> {
        let greeting = to_line(&self.server.greeting());
        self.write(&greeting).await?;

        let mut chunk = vec![0u8; 16 * 1024];
        let mut running: Option<Running> = None;
        let mut eof = false;
        loop {
            // Handle buffered requests until one needs the handler (commands of one client
            // run one at a time, in order).
            while running.is_none() {
                match self.input.next() {
                    None => break,
                    Some(Input::Request(v)) => match self.dispatch(v) {
                        Step::Reply(reply) => self.write(&to_line(&reply)).await?,
                        Step::Run(r) => running = Some(r),
                    },
                    Some(Input::ParseError(desc)) => {
                        let reply = error_reply(None, WireError::generic(desc));
                        self.write(&to_line(&reply)).await?;
                    }
                    Some(Input::TooLarge) => {
                        let err = WireError::generic(format!(
                            "JSON parse error, request exceeds {MAX_REQUEST_BYTES} bytes"
                        ));
                        self.write(&to_line(&error_reply(None, err))).await?;
                        self.lingering_close(&mut chunk).await;
                        return Ok(());
                    }
                }
            }
            if eof && running.is_none() {
                return Ok(());
            }

            tokio::select! {
                res = join_running(&mut running) => {
                    let r = running.take().expect("select guard: a command is running");
                    let reply = match res {
                        Ok(Ok(_)) if r.quit => ok_reply(r.id, json!({})),
                        Ok(Ok(v)) => ok_reply(r.id, if v.is_null() { json!({}) } else { v }),
                        Ok(Err(e)) => error_reply(r.id, e.into()),
                        Err(e) => {
                            log::error!("qmp: command '{}' failed: {e}", r.name);
                            let err = WireError::generic(format!(
                                "internal error while executing '{}'", r.name
                            ));
                            error_reply(r.id, err)
                        }
                    };
                    let quit = r.quit && reply.get("return").is_some();
                    let written = self.write(&to_line(&reply)).await;
                    if quit {
                        // Accepted: signal it even if the client is already gone.
                        self.server.quit.send_replace(true);
                    }
                    written?;
                }
                res = self.rd.read(&mut chunk), if running.is_none() && !eof => {
                    match res? {
                        0 => eof = true,
                        n => self.input.push(&chunk[..n]),
                    }
                }
                ev = recv_event(&mut self.events) => match ev {
                    Ok(line) => self.write(&line).await?,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        log::warn!("qmp: slow client missed {n} events");
                    }
                    Err(broadcast::error::RecvError::Closed) => self.events = None,
                },
            }
        }
    }

    /// Closes after an error without losing it: closing a socket with unread input makes
    /// the peer's reads fail (ECONNRESET), possibly before it read our last reply. So signal
    /// EOF, then discard input until the client closes too (bounded in time).
    async fn lingering_close(&mut self, chunk: &mut [u8]) {
        let _ = self.wr.shutdown().await;
        let drain = async {
            while let Ok(n) = self.rd.read(chunk).await {
                if n == 0 {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(LINGER, drain).await;
    }

    async fn write(&mut self, line: &str) -> io::Result<()> {
        self.wr.write_all(line.as_bytes()).await?;
        self.wr.flush().await
    }

    fn dispatch(&mut self, request: Value) -> Step {
        let Value::Object(request) = request else {
            let err = WireError::generic("QMP input must be a JSON object");
            return Step::Reply(error_reply(None, err));
        };
        let id = request.get("id").cloned();
        match self.check_and_run(&request) {
            Ok(Action::Run(run)) => Step::Run(Running { id, ..run }),
            Ok(Action::Reply(v)) => Step::Reply(ok_reply(id, v)),
            Err(e) => Step::Reply(error_reply(id, e)),
        }
    }

    /// Validates one request object (QEMU's checks and wording) and runs it.
    fn check_and_run(&mut self, request: &Map<String, Value>) -> Result<Action, WireError> {
        for (key, value) in request {
            match key.as_str() {
                "execute" if !value.is_string() => {
                    return Err(WireError::generic(
                        "QMP input member 'execute' must be a string",
                    ))
                }
                "arguments" if !value.is_object() => {
                    return Err(WireError::generic(
                        "QMP input member 'arguments' must be an object",
                    ))
                }
                "execute" | "arguments" | "id" => {}
                // Includes "exec-oob": out-of-band execution is never offered.
                other => {
                    return Err(WireError::generic(format!(
                        "QMP input member '{other}' is unexpected"
                    )))
                }
            }
        }
        let Some(Value::String(name)) = request.get("execute") else {
            return Err(WireError::generic("QMP input lacks member 'execute'"));
        };
        let empty = Map::new();
        let args = match request.get("arguments") {
            Some(Value::Object(a)) => a,
            _ => &empty,
        };

        if !self.negotiated {
            if name != "qmp_capabilities" {
                return Err(WireError::not_found(
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                ));
            }
            check_capabilities(args)?;
            self.negotiated = true;
            // Subscribe before the reply goes out: the client sees every event emitted after
            // it reads the reply.
            self.events = Some(self.server.events.subscribe());
            return Ok(Action::Reply(json!({})));
        }

        let server = &self.server;
        match name.as_str() {
            "qmp_capabilities" => {
                check_capabilities(args)?;
                Err(WireError::not_found(
                    "Capabilities negotiation is already complete, command ignored",
                ))
            }
            "query-commands" => {
                args::reject_unknown(args, &[])?;
                Ok(Action::Reply(server.command_list()))
            }
            "query-version" => {
                args::reject_unknown(args, &[])?;
                Ok(Action::Reply(server.version.to_json()))
            }
            "query-status" if !server.handler_lists("query-status") => {
                args::reject_unknown(args, &[])?;
                Ok(Action::Reply(
                    json!({"status": "running", "running": true, "singlestep": false}),
                ))
            }
            "quit" if !server.handler_lists("quit") => {
                args::reject_unknown(args, &[])?;
                Ok(Action::Run(self.spawn("quit", None, true)))
            }
            "quit" => Ok(Action::Run(self.spawn("quit", Some(args.clone()), true))),
            other if server.handler_lists(other) => {
                Ok(Action::Run(self.spawn(other, Some(args.clone()), false)))
            }
            other => Err(QmpError::CommandNotFound(other.into()).into()),
        }
    }

    /// Starts `name` on a blocking thread; `args: None` means "nothing to run, succeed".
    fn spawn(&self, name: &str, args: Option<Map<String, Value>>, quit: bool) -> Running {
        let handler = self.server.handler.clone();
        let cmd = name.to_string();
        let task = tokio::task::spawn_blocking(move || match args {
            Some(args) => handler.execute(&cmd, &args),
            None => Ok(Value::Null),
        });
        Running {
            task,
            name: name.into(),
            id: None,
            quit,
        }
    }
}

/// Validates `qmp_capabilities` arguments. QEMU knows the capability `oob`; this server
/// offers none, so every requested capability is refused.
fn check_capabilities(args: &Map<String, Value>) -> Result<(), QmpError> {
    args::reject_unknown(args, &["enable"])?;
    let Some(enable) = args.get("enable") else {
        return Ok(());
    };
    let Value::Array(list) = enable else {
        return Err(QmpError::InvalidParameter(
            "Invalid parameter type for 'enable', expected: array".into(),
        ));
    };
    // Like QEMU: first the whole list must parse as known capabilities...
    for (i, cap) in list.iter().enumerate() {
        match cap {
            Value::String(cap) if cap == "oob" => {}
            Value::String(cap) => {
                return Err(QmpError::InvalidParameter(format!(
                    "Parameter 'enable[{i}]' does not accept value '{cap}'"
                )))
            }
            _ => {
                return Err(QmpError::InvalidParameter(format!(
                    "Invalid parameter type for 'enable[{i}]', expected: string"
                )))
            }
        }
    }
    // ...then each must be offered, and none is.
    match list.first() {
        Some(_) => Err(QmpError::Generic("Capability 'oob' not available".into())),
        None => Ok(()),
    }
}

/// An error as put on the wire: built-in replies use QEMU's exact classes and wording.
#[derive(Debug)]
struct WireError {
    class: &'static str,
    desc: String,
}

impl WireError {
    fn generic(desc: impl Into<String>) -> Self {
        WireError {
            class: "GenericError",
            desc: desc.into(),
        }
    }

    /// `CommandNotFound` with a whole-sentence description (QEMU's negotiation messages).
    fn not_found(desc: &str) -> Self {
        WireError {
            class: "CommandNotFound",
            desc: desc.into(),
        }
    }
}

impl From<QmpError> for WireError {
    fn from(e: QmpError) -> Self {
        WireError {
            class: e.class(),
            desc: e.to_string(),
        }
    }
}

fn ok_reply(id: Option<Value>, v: Value) -> Value {
    let mut m = Map::new();
    m.insert("return".into(), v);
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

fn error_reply(id: Option<Value>, e: WireError) -> Value {
    let mut m = Map::new();
    m.insert("error".into(), json!({"class": e.class, "desc": e.desc}));
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

/// Waits for the running command; pending forever when none runs (the `select!` guard).
async fn join_running(
    running: &mut Option<Running>,
) -> Result<Result<Value, QmpError>, tokio::task::JoinError> {
    match running {
        Some(r) => (&mut r.task).await,
        None => std::future::pending().await,
    }
}

/// Next event line; pending forever before negotiation.
async fn recv_event(
    rx: &mut Option<broadcast::Receiver<Arc<str>>>,
) -> Result<Arc<str>, broadcast::error::RecvError> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// One unit of client input.
#[derive(Debug)]
enum Input {
    /// A complete JSON value (not necessarily an object).
    Request(Value),
    /// Malformed JSON; the offending bytes were discarded up to the next newline.
    ParseError(String),
    /// An incomplete value grew beyond the limit.
    TooLarge,
}

/// Accumulates client bytes and splits them into JSON values.
struct InputBuffer {
    buf: Vec<u8>,
    /// Start of the unparsed bytes in `buf`.
    start: usize,
    /// After a parse error whose line did not end in the buffer: drop input up to the next
    /// newline.
    skip_line: bool,
    max: usize,
}

impl InputBuffer {
    fn new(max: usize) -> Self {
        InputBuffer {
            buf: Vec::new(),
            start: 0,
            skip_line: false,
            max,
        }
    }

    fn push(&mut self, mut data: &[u8]) {
        if self.skip_line {
            match data.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    data = &data[i + 1..];
                    self.skip_line = false;
                }
                None => return,
            }
        }
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    fn next(&mut self) -> Option<Input> {
        let pending = &self.buf[self.start..];
        let mut stream = serde_json::Deserializer::from_slice(pending).into_iter::<Value>();
        match stream.next() {
            None => {
                // Only whitespace left.
                self.buf.clear();
                self.start = 0;
                None
            }
            Some(Ok(v)) => {
                self.start += stream.byte_offset();
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                Some(Input::Request(v))
            }
            Some(Err(e)) if e.is_eof() => {
                if pending.len() > self.max {
                    self.buf.clear();
                    self.start = 0;
                    Some(Input::TooLarge)
                } else {
                    None
                }
            }
            Some(Err(e)) => {
                // Resynchronise at the end of the line holding the error.
                let at = error_offset(pending, e.line(), e.column());
                match pending[at..].iter().position(|&b| b == b'\n') {
                    Some(nl) => self.start += at + nl + 1,
                    None => {
                        self.buf.clear();
                        self.start = 0;
                        self.skip_line = true;
                    }
                }
                Some(Input::ParseError(format!("JSON parse error, {e}")))
            }
        }
    }
}

/// Byte offset of serde_json's (1-based line, byte column) error position, clamped to the
/// data. The column may point just past the offending byte, so step back one.
fn error_offset(data: &[u8], line: usize, column: usize) -> usize {
    let mut line_start = 0;
    let mut lines_left = line.saturating_sub(1);
    while lines_left > 0 {
        match data[line_start..].iter().position(|&b| b == b'\n') {
            Some(nl) => line_start += nl + 1,
            None => break,
        }
        lines_left -= 1;
    }
    (line_start + column.saturating_sub(1)).min(data.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Condvar, Mutex};
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

    #[test]
    fn input_buffer_resyncs_and_caps() {
        let mut b = InputBuffer::new(64);
        b.push(b"  {\"a\":\n  bad}\n{\"b\": 1}\n");
        assert!(matches!(b.next(), Some(Input::ParseError(_))));
        assert_eq!(b.next().unwrap_request(), json!({"b": 1}));
        assert!(b.next().is_none());

        b.push(b"{\"a\": 1");
        assert!(b.next().is_none());
        b.push(b"}   \n\n ");
        assert_eq!(b.next().unwrap_request(), json!({"a": 1}));
        assert!(b.next().is_none());
        assert!(b.buf.is_empty(), "whitespace is not kept");

        b.push(b"\"");
        b.push(&[b'x'; 100]);
        assert!(matches!(b.next(), Some(Input::TooLarge)));
        assert!(b.next().is_none());
    }

    trait UnwrapRequest {
        fn unwrap_request(self) -> Value;
    }

    impl UnwrapRequest for Option<Input> {
        fn unwrap_request(self) -> Value {
            match self {
                Some(Input::Request(v)) => v,
                other => panic!("expected a request, got {other:?}"),
            }
        }
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
        a.send(
            b"{\"execute\": \"fire-event\", \"arguments\": {\"name\": \"RESUME\"}, \"id\": 1}\n",
        )
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

    #[test]
    fn emit_without_listeners_and_error_classes() {
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
        let mut a = Map::new();
        a.insert("n".into(), json!(-1));
        a.insert("s".into(), json!("v"));
        assert_eq!(args::str(&a, "s").unwrap(), "v");
        assert_eq!(
            args::u64(&a, "n").unwrap_err().to_string(),
            "Invalid parameter type for 'n', expected: uint64"
        );
        assert_eq!(
            args::u64(&a, "m").unwrap_err().to_string(),
            "Parameter 'm' is missing"
        );
        assert_eq!(args::opt_str(&a, "m").unwrap(), None);
    }
}
