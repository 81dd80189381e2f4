use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use log::{error, info, warn};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use colo_blk::cli::{Cli, Command, RoleArg};
use colo_blk::control::{Controller, Role};
use colo_blk::ownership::{self, FileLock, LockMode};
use colo_blk::qmp::{EventSender, QmpServer, QmpVersion};
use colo_blk::replication::layers::LayeredDisk;
use colo_blk::replication::metadata::{self, DiskRole, ImageStamp, MetaStore, Outside};
use colo_blk::replication::primary::{Primary, PrimaryDevice, PrimaryOptions, ReplicatedDisk};

use colo_blk::replication::secondary::{
    FailbackOptions, FailoverLogSpec, Promotion, Secondary, SecondaryOptions, SvmDevice,
};
use colo_blk::replication::tls::LinkSecurity;
use colo_blk::replication::{DirtyExtents, DirtyLog};
use colo_blk::storage::{BlockDevice, RawImage, RawImageOptions};
use colo_blk::vhost_user::{DeviceOptions, Server, ServerControl};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Status(args)) = &cli.command {
        env_logger::Builder::new()
            .filter_level(log::LevelFilter::Warn)
            .parse_default_env()
            .init();
        return ExitCode::from(colo_blk::status::run(args));
    }
    if let Some(Command::Reprotect(args)) = &cli.command {
        env_logger::Builder::new()
            .filter_level(log::LevelFilter::Warn)
            .parse_default_env()
            .init();
        return ExitCode::from(colo_blk::reprotect::run(args));
    }
    if let Some(Command::Supervise(args)) = &cli.command {
        env_logger::Builder::new()
            .filter_level(log::LevelFilter::Warn)
            .parse_default_env()
            .init();
        return ExitCode::from(colo_blk::supervise::run(args));
    }
    env_logger::Builder::new()
        .filter_level(cli.log_level.filter())
        .parse_default_env()
        .format_timestamp_micros()
        .init();
    if let Err(e) = cli.validate() {
        eprintln!("colo-blk: {e}");
        return ExitCode::from(2);
    }
    if !colo_blk::heap::keep_freed_buffers() {
        warn!("could not tune the allocator: freed I/O buffers go back to the kernel");
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("colo-blk: {e}");
            ExitCode::FAILURE
        }
    }
}

type Error = Box<dyn std::error::Error>;

/// A serving process, start to end (docs/architecture.md, "Start-up and shutdown").
fn run(cli: Cli) -> Result<(), Error> {
    let common = Common::open(&cli)?;
    let built = match cli.role {
        RoleArg::Standalone => build_standalone(&common),
        RoleArg::Primary => build_primary(&cli, &common)?,
        RoleArg::Secondary => build_secondary(&cli, &common)?,
    };
    let serving = serve(&cli, &common, &built)?;
    serving.shutdown.wait();
    serving.stop(&cli, common, built)
}

/// What every role starts from: the image (locked, with the files beside it), the runtime of
/// the QMP server and the link tasks, and the event channel.
struct Common {
    image: Arc<dyn BlockDevice>,
    /// This process created the image: it is all zeros (its metadata says so, see
    /// metadata.rs).
    created: bool,
    meta_path: PathBuf,
    /// The persistent dirty log's path (primary; secondary: its failover's, and its own
    /// record as a failback target). `None`: standalone, or `--no-dirty-log`.
    dirty_log_path: Option<PathBuf>,
    /// Held until the process ends: no second process reads or writes any of these files.
    _locks: Vec<FileLock>,
    runtime: tokio::runtime::Runtime,
    events: EventSender,
}

impl Common {
    fn open(cli: &Cli) -> Result<Self, Error> {
        let created = cli.size.is_some() && !cli.image().exists();
        let image = RawImage::open(&RawImageOptions {
            path: cli.image().to_path_buf(),
            read_only: cli.read_only,
            direct: cli.direct,
            create_size: cli.size,
        })?;
        info!(
            "{:?} role: {} ({} bytes{}{})",
            cli.role,
            cli.image().display(),
            image.capacity(),
            if cli.read_only { ", read-only" } else { "" },
            if cli.direct { ", O_DIRECT" } else { "" }
        );
        let image: Arc<dyn BlockDevice> = Arc::new(image);
        let meta_path = cli
            .meta
            .clone()
            .unwrap_or_else(|| metadata::default_path(cli.image(), ".colo-meta"));
        let dirty_log_path = (!cli.no_dirty_log && cli.role != RoleArg::Standalone).then(|| {
            cli.dirty_log
                .clone()
                .unwrap_or_else(|| metadata::default_path(cli.image(), ".colo-dirty"))
        });
        let locks = take_ownership(cli, &meta_path, dirty_log_path.as_deref())?;
        if cli.role == RoleArg::Standalone {
            standalone_metadata(cli, &meta_path, image.capacity())?;
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("colo-io")
            .enable_all()
            .build()?;
        Ok(Common {
            image,
            created,
            meta_path,
            dirty_log_path,
            _locks: locks,
            runtime,
            events: EventSender::new(),
        })
    }

    /// The replication link's protection (`--peer`'s, logged) and the metadata beside the
    /// image, the first things both COLO roles need.
    fn colo(&self, cli: &Cli) -> Result<(LinkSecurity, Arc<MetaStore>), Error> {
        let security = LinkSecurity::new(&cli.link_security()?, cli.peer.as_deref())?;
        match &security {
            LinkSecurity::Insecure => warn!(
                "replication link: plain TCP (--insecure-link): no authentication, no \
                 encryption"
            ),
            other => info!("replication link: {other:?}"),
        }
        let meta = MetaStore::open(&self.meta_path, self.image.capacity(), self.created)?;
        info!("replication metadata {}", self.meta_path.display());
        report_outside_changes(cli.image(), meta.start_run(ImageStamp::of(cli.image())?)?);
        Ok((security, Arc::new(meta)))
    }
}

/// A role, built: the disk the guest (or the Secondary VM) sees and the role object behind it.
struct Built {
    disk: Arc<dyn BlockDevice>,
    role: Role,
    /// The replication metadata (the COLO roles).
    meta: Option<Arc<MetaStore>>,
    /// The secondary's bound replication address (for the ready line).
    listen: Option<String>,
}

/// Standalone: the image itself, no replication.
fn build_standalone(common: &Common) -> Built {
    Built {
        disk: common.image.clone(),
        role: Role::Standalone,
        meta: None,
        listen: None,
    }
}

/// The primary: its dirty log, the [`Primary`] over the image, its link task.
fn build_primary(cli: &Cli, common: &Common) -> Result<Built, Error> {
    let (security, meta) = common.colo(cli)?;
    let capacity = common.image.capacity();
    let log = if let Some(path) = &common.dirty_log_path {
        // A disk with a history but no log: everything counts as dirty.
        let history = !common.created && meta.gens().current != 0;
        let opened = DirtyLog::open(path, capacity, cli.dirty_log_extent, history)?;
        info!(
            "dirty log {} ({} extents recorded dirty)",
            path.display(),
            opened.1.len()
        );
        Some(opened)
    } else {
        None
    };
    let mut opts = primary_options(cli)?(cli.peer.as_deref().unwrap_or_default())?;
    opts.security = security;
    let primary = Primary::open(
        common.image.clone(),
        opts,
        common.events.clone(),
        meta.clone(),
        log,
    )?;
    common.runtime.spawn(primary.clone().run_link());
    Ok(Built {
        disk: Arc::new(ReplicatedDisk::new(primary.clone())),
        role: Role::Primary(primary),
        meta: Some(meta),
        listen: None,
    })
}

/// The secondary: the disk buffer over the image, the [`Secondary`] with its failback
/// settings, a failover to resume, the listener and its task.
fn build_secondary(cli: &Cli, common: &Common) -> Result<Built, Error> {
    let (security, meta) = common.colo(cli)?;
    let image = &common.image;
    let layered = Arc::new(LayeredDisk::new_owned(
        image.clone(),
        cli.layer_dir.clone().unwrap_or_default(),
        cli.cluster_size,
        meta.gens().disk_id,
    )?);
    let failback = FailbackOptions {
        discard_my_data: cli.discard_my_data,
        own_dirty: own_dirty_record(common, &meta)?,
        failover_log: common.dirty_log_path.clone().map(|path| FailoverLogSpec {
            path,
            extent: cli.dirty_log_extent,
        }),
        promotion: Some(Promotion {
            options: Box::new(primary_options(cli)?),
            runtime: common.runtime.handle().clone(),
        }),
    };
    let secondary = Secondary::new(
        layered.clone(),
        Some(image.clone()),
        meta.clone(),
        SecondaryOptions {
            listen: cli.listen.clone().unwrap_or_default(),
            serves_vm: cli.socket.is_some(),
            heartbeat_interval: Duration::from_millis(cli.heartbeat_ms),
            peer_timeout: Duration::from_millis(cli.peer_timeout_ms),
            block_size: cli.logical_block_size,
            allow_full_sync: cli.allow_full_sync,
            security,
        },
        failback,
        common.events.clone(),
    );
    // Before the Secondary VM can write: a failed-over disk's writes are recorded.
    secondary.reopen_failover_log()?;
    if layered.failover_pending() {
        let s = secondary.clone();
        std::thread::Builder::new()
            .name("colo-failover".into())
            .spawn(move || {
                if let Err(e) = s.resume_failover() {
                    error!("resuming the failover: {e}");
                }
            })?;
    }
    let listener = common.runtime.block_on(secondary.bind())?;
    let listen = Some(listener.local_addr()?.to_string());
    common.runtime.spawn(secondary.clone().run(listener));
    Ok(Built {
        disk: layered,
        role: Role::Secondary(secondary),
        meta: Some(meta),
        listen,
    })
}

/// A failback target's own record: the dirty log of its life as a primary (or as a
/// failed-over disk), if it is a valid log of this disk. (A primary's disk that wrote beyond
/// its peer's generation diverges first: `secondary_start`.)
fn own_dirty_record(common: &Common, meta: &MetaStore) -> Result<Option<DirtyExtents>, Error> {
    let started = meta.secondary_start()?;
    let own_dirty = match (&common.dirty_log_path, started.role) {
        (Some(path), DiskRole::Primary | DiskRole::FailedOver) if started.gens.bitmap != 0 => {
            let x = DirtyLog::peek(path, common.image.capacity())?;
            match &x {
                Some(x) => info!(
                    "own dirty record {} ({} bytes) for a failback",
                    path.display(),
                    x.dirty_bytes()
                ),
                None => info!("no usable own dirty record at {}", path.display()),
            }
            x
        }
        _ => None,
    };
    Ok(own_dirty)
}

/// The primary's options for a given peer (a primary, or a secondary promoted in place).
fn primary_options(
    cli: &Cli,
) -> Result<impl Fn(&str) -> std::io::Result<PrimaryOptions> + Send + Sync + 'static, Error> {
    let link_opts = cli.link_security()?;
    let (window, sync, granularity, block_size) = (
        cli.window,
        cli.sync,
        cli.dirty_granularity,
        cli.logical_block_size,
    );
    let heartbeat = Duration::from_millis(cli.heartbeat_ms);
    let peer_timeout = Duration::from_millis(cli.peer_timeout_ms);
    Ok(move |peer: &str| -> std::io::Result<PrimaryOptions> {
        Ok(PrimaryOptions {
            peer: peer.to_string(),
            window_bytes: window,
            sync,
            heartbeat_interval: heartbeat,
            peer_timeout,
            reconnect_interval: Duration::from_secs(1),
            dirty_granularity: granularity,
            block_size,
            security: LinkSecurity::new(&link_opts, Some(peer))?,
        })
    })
}

/// Stops the process, once: SIGTERM, SIGINT, QMP `quit` and the vhost-user server ending
/// (however it ends) all request it; `run` waits for the first request.
struct Shutdown {
    request: Stop,
    requested: mpsc::Receiver<()>,
}

/// Requests the shutdown.
type Stop = Arc<dyn Fn() + Send + Sync>;

impl Shutdown {
    /// The shutdown, requested by SIGTERM and SIGINT from now on.
    fn on_signals() -> Result<Self, Error> {
        let (tx, requested) = mpsc::channel::<()>();
        let request: Stop = {
            let tx = std::sync::Mutex::new(tx);
            Arc::new(move || {
                if let Ok(tx) = tx.lock() {
                    let _ = tx.send(());
                }
            })
        };
        let mut signals = Signals::new([SIGTERM, SIGINT])?;
        let stop = request.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    info!("signal {sig}: shutting down");
                    stop();
                }
            })?;
        Ok(Shutdown { request, requested })
    }

    fn requester(&self) -> Stop {
        self.request.clone()
    }

    /// Waits for the first request.
    fn wait(&self) {
        let _ = self.requested.recv();
    }
}

/// The process serving: the shutdown it waits for and the vhost-user server's thread.
struct Serving {
    shutdown: Shutdown,
    /// The server's thread (its error as text) and its stop switch.
    server: Option<(std::thread::JoinHandle<Result<(), String>>, ServerControl)>,
}

/// Starts what serves the role: the vhost-user server (for the secondary: only when a
/// Secondary VM attaches), the metrics endpoint and the QMP socket; prints the ready line.
fn serve(cli: &Cli, common: &Common, built: &Built) -> Result<Serving, Error> {
    let mut server = match cli.socket.as_ref() {
        Some(socket) => Some(
            Server::new(
                socket,
                cli.socket_access()?,
                built.disk.clone(),
                DeviceOptions {
                    num_queues: cli.num_queues,
                    queue_size: cli.queue_size,
                    serial: cli.serial.clone(),
                    read_only: cli.read_only,
                    logical_block_size: cli.logical_block_size,
                    poll_max: Duration::from_nanos(cli.poll_max_ns),
                },
                cli.io_threads,
            )?
            .with_io_engine(cli.io_engine.into())?,
        ),
        None => None,
    };
    let shutdown = Shutdown::on_signals()?;
    let stats = server.as_ref().map(Server::stats_handle);
    let metrics = match cli.metrics.as_deref() {
        Some(addr) => Some(start_metrics(
            &common.runtime,
            addr,
            colo_blk::metrics::MetricsSource {
                role: built.role.clone(),
                stats: stats.clone(),
            },
        )?),
        None => None,
    };
    if let Some(qmp_path) = cli.qmp.clone() {
        start_qmp(
            &common.runtime,
            qmp_path,
            cli.qmp_mode,
            cli.qmp_group_id()?,
            Controller::new(built.role.clone(), stats),
            common.events.clone(),
            shutdown.requester(),
        )?;
    }
    // The device tells replication about QEMU's stop/start cycle (COLO checkpoints).
    if let Some(server) = server.as_mut() {
        match &built.role {
            Role::Primary(p) => server.set_observer(Arc::new(PrimaryDevice(p.clone()))),
            Role::Secondary(s) => server.set_observer(Arc::new(SvmDevice(s.clone()))),
            Role::Standalone => {}
        }
    }
    print_ready(cli, built.listen.clone(), metrics);
    // systemd (Type=notify): the sockets are up. The vhost-user socket was bound by
    // Server::new, so a front-end may connect from now on.
    colo_blk::notify::notify_logged("READY=1\nSTATUS=serving");
    let server = match server {
        Some(server) => {
            let control = server.control();
            let stop = shutdown.requester();
            let handle = std::thread::Builder::new()
                .name("vhost-user".into())
                .spawn(move || {
                    let r = server.run().map_err(|e| e.to_string());
                    // However the server ends, the process ends with it.
                    stop();
                    r
                })?;
            Some((handle, control))
        }
        None => None,
    };
    Ok(Serving { shutdown, server })
}

impl Serving {
    /// After the shutdown request: the vhost-user server stops (in-flight requests complete),
    /// the disk is flushed and, when nothing writes the image any more, its stamp recorded.
    fn stop(self, cli: &Cli, common: Common, built: Built) -> Result<(), Error> {
        colo_blk::notify::notify_logged("STOPPING=1");
        if let Some((handle, control)) = self.server {
            // In-flight requests complete, then `Server::run` returns (socket path or not).
            control.stop();
            match handle.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => error!("vhost-user server: {e}"),
                Err(_) => error!("vhost-user server thread panicked"),
            }
        }
        built.disk.flush()?;
        // Nothing writes the image any more: its stamp lets the next start see other
        // programs' changes (a secondary first stops taking the stream).
        let quiet = match &built.role {
            Role::Secondary(s) => {
                let quiet = s.quiesce(Duration::from_secs(10));
                if quiet {
                    s.close_layers()?;
                }
                quiet
            }
            _ => true,
        };
        if let (Some(meta), true) = (&built.meta, quiet) {
            common.image.flush()?;
            meta.clean_stop(ImageStamp::of(cli.image())?)?;
        }
        if let Some(q) = cli.qmp.as_ref() {
            let _ = std::fs::remove_file(q);
        }
        common.runtime.shutdown_timeout(Duration::from_secs(1));
        info!("stopped");
        Ok(())
    }
}

/// Locks every file this process owns (src/ownership.rs) before any of them is read or
/// written: the image (shared with `--read-only` or `--share-rw`), the replication metadata and the dirty log (the
/// COLO roles), the layer directory (secondary), the vhost-user and QMP sockets.
fn take_ownership(
    cli: &Cli,
    meta_path: &std::path::Path,
    dirty_log: Option<&std::path::Path>,
) -> Result<Vec<FileLock>, Error> {
    let mode = if cli.read_only || cli.share_rw {
        LockMode::Shared
    } else {
        LockMode::Exclusive
    };
    let mut locks = vec![ownership::lock_file(cli.image(), "image", mode)?];
    if cli.role != RoleArg::Standalone {
        locks.push(ownership::lock_or_create(
            meta_path,
            "replication metadata",
        )?);
    } else if !cli.read_only && meta_path.exists() {
        locks.push(ownership::lock_file(
            meta_path,
            "replication metadata",
            LockMode::Exclusive,
        )?);
    }
    if let Some(path) = dirty_log {
        locks.push(ownership::lock_or_create(path, "dirty log")?);
    }
    if let (RoleArg::Secondary, Some(dir)) = (cli.role, cli.layer_dir.as_deref()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create --layer-dir {}: {e}", dir.display()))?;
        locks.push(ownership::lock_dir(dir, "layer directory")?);
    }
    for (path, what) in [(&cli.socket, "vhost-user socket"), (&cli.qmp, "QMP socket")] {
        if let Some(path) = path {
            locks.push(ownership::lock_socket(path, what)?);
        }
    }
    Ok(locks)
}

/// A standalone process on a COLO pair's disk (its image has replication metadata): refused,
/// unless `--detach-replication` records first that the image changes outside the pair, so
/// that the pair never counts it as in sync again without a resync. Read-only exports write
/// nothing and need no flag.
fn standalone_metadata(cli: &Cli, meta_path: &std::path::Path, capacity: u64) -> Result<(), Error> {
    let has_meta = std::fs::metadata(meta_path).is_ok_and(|m| m.len() > 0);
    if cli.read_only || !has_meta {
        return Ok(());
    }
    let meta = MetaStore::open(meta_path, capacity, false)?;
    let m = meta.get();
    if !cli.detach_replication {
        return Err(format!(
            "{} is a COLO pair's disk (replication metadata {}: {:?}, checkpoint {}); writing \
             it standalone would leave the pair out of sync without a record of it. Start it \
             with its --role, or pass --detach-replication to record that it changes outside \
             the pair (its peer then needs a full resync), or --read-only",
            cli.image().display(),
            meta_path.display(),
            m.role,
            m.gens.epoch
        )
        .into());
    }
    meta.detach()?;
    warn!(
        "--detach-replication: {} recorded as changed outside the pair ({}): its peer needs a \
         full resync before the pair is in sync again",
        cli.image().display(),
        meta_path.display()
    );
    Ok(())
}

/// Says loudly when another program changed the image since the last clean stop (the metadata
/// has recorded it already, see `MetaStore::start_run`).
fn report_outside_changes(image: &std::path::Path, outside: Outside) {
    match outside {
        Outside::Changed { was, now } => warn!(
            "{} changed since colo-blk last stopped cleanly (size {} -> {}, mtime {} -> {}, \
             ctime {} -> {}, inode {} -> {}): another program wrote it, so it is recorded as \
             changed outside the pair and its peer needs a full resync",
            image.display(),
            was.size,
            now.size,
            was.mtime_ns,
            now.mtime_ns,
            was.ctime_ns,
            now.ctime_ns,
            was.inode,
            now.inode
        ),
        Outside::Unknown => info!(
            "the last process on {} did not stop cleanly: changes by other programs since \
             cannot be detected",
            image.display()
        ),
        Outside::Unchanged => {}
    }
}

/// Binds the Prometheus endpoint (`--metrics`) and serves it on the runtime; returns the bound
/// address.
fn start_metrics(
    runtime: &tokio::runtime::Runtime,
    addr: &str,
    source: colo_blk::metrics::MetricsSource,
) -> Result<String, Error> {
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(addr))
        .map_err(|e| format!("cannot listen on --metrics {addr}: {e}"))?;
    let bound = listener.local_addr()?.to_string();
    info!("metrics on http://{bound}/metrics");
    runtime.spawn(colo_blk::metrics::serve(listener, Arc::new(source)));
    Ok(bound)
}

/// Starts the QMP control socket; a client's `quit` stops the process like SIGTERM.
fn start_qmp(
    runtime: &tokio::runtime::Runtime,
    path: PathBuf,
    mode: u32,
    group: Option<u32>,
    controller: Controller,
    events: EventSender,
    stop: Arc<dyn Fn() + Send + Sync>,
) -> Result<(), Error> {
    let server = Arc::new(QmpServer::new(
        Arc::new(controller),
        events,
        QmpVersion::default(),
    ));
    let listener = {
        let _guard = runtime.enter();
        QmpServer::bind_unix_access(&path, mode, group)
            .map_err(|e| format!("cannot listen on --qmp {}: {e}", path.display()))?
    };
    info!("QMP listening on {}", path.display());
    let s = server.clone();
    runtime.spawn(async move {
        if let Err(e) = s.serve_unix_listener(listener).await {
            error!("QMP server: {e}");
        }
    });
    runtime.spawn(async move {
        server.quit_requested().await;
        info!("QMP quit: shutting down");
        stop();
    });
    Ok(())
}

/// The one line on stdout, printed once every socket is bound (vhost-user, QMP, replication
/// listener), so that scripts and tests wait for it instead of scraping the log:
/// `{"ready":{"role":"secondary","socket":"/run/s.sock","qmp":"/run/s.qmp","listen":"127.0.0.1:7790","metrics":null}}`
/// (absent members are `null`; `metrics` is the bound `--metrics` address).
fn print_ready(cli: &Cli, listen: Option<String>, metrics: Option<String>) {
    use std::io::Write;
    let role = match cli.role {
        RoleArg::Standalone => "standalone",
        RoleArg::Primary => "primary",
        RoleArg::Secondary => "secondary",
    };
    let line = serde_json::json!({"ready": {
        "role": role,
        "socket": cli.socket.as_ref().map(|p| p.display().to_string()),
        "qmp": cli.qmp.as_ref().map(|p| p.display().to_string()),
        "listen": listen,
        "metrics": metrics,
    }});
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
