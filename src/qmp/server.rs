//! The server: listeners, connections, request dispatch, the built-in commands and `quit`.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{broadcast, watch};
use tokio::task::{JoinHandle, JoinSet};

use super::input::{Input, InputBuffer};
use super::{args, to_line, CommandHandler, EventSender, QmpError};

/// Largest incomplete request the server buffers; a client exceeding it gets an error and is
/// disconnected.
pub(crate) const MAX_REQUEST_BYTES: usize = 1 << 20;

/// How long a connection closed for an oversized request keeps discarding input.
const LINGER: Duration = Duration::from_secs(2);

/// Commands the server implements itself, in the order `query-commands` lists them.
pub const BUILTIN_COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-commands",
    "query-version",
    "query-status",
    "quit",
];

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
        Self::bind_unix_mode(path, 0o600)
    }

    /// [`bind_unix`](Self::bind_unix) with the socket's permission bits `mode`. The socket is
    /// bound under a temporary name, given its mode, then renamed into place, so it is never
    /// reachable with wider permissions.
    pub fn bind_unix_mode(path: &Path, mode: u32) -> io::Result<UnixListener> {
        Self::bind_unix_access(path, mode, None)
    }

    /// [`bind_unix_mode`](Self::bind_unix_mode), and the socket's group `group` (a gid; `None`:
    /// the process's), see [`crate::unix_socket`].
    pub fn bind_unix_access(
        path: &Path,
        mode: u32,
        group: Option<u32>,
    ) -> io::Result<UnixListener> {
        let access = crate::unix_socket::Access {
            mode: Some(mode),
            group,
        };
        let listener = crate::unix_socket::bind(path, access)?;
        listener.set_nonblocking(true)?;
        UnixListener::from_std(listener)
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

#[cfg(test)]
mod tests;
