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
use colo_blk::replication::metadata::DiskRole;
use colo_blk::replication::metadata::{self, ImageStamp, MetaStore, Outside};
use colo_blk::replication::primary::{Primary, PrimaryDevice, PrimaryOptions, ReplicatedDisk};
use colo_blk::replication::secondary::{
    FailoverLogSpec, Promotion, Secondary, SecondaryOptions, SvmDevice,
};
use colo_blk::replication::tls::LinkSecurity;
use colo_blk::replication::DirtyLog;
use colo_blk::storage::{BlockDevice, RawImage, RawImageOptions};
use colo_blk::vhost_user::{DeviceOptions, Server};

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

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    // An image colo-blk creates now is all zeros: its metadata says so (see metadata.rs).
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
    // The persistent dirty log's path (primary; secondary: its failover's, and its own record
    // as a failback target).
    let dirty_log_path = (!cli.no_dirty_log && cli.role != RoleArg::Standalone).then(|| {
        cli.dirty_log
            .clone()
            .unwrap_or_else(|| metadata::default_path(cli.image(), ".colo-dirty"))
    });
    // Held until the process ends: no second process reads or writes any of these files.
    let _locks = take_ownership(&cli, &meta_path, dirty_log_path.as_deref())?;
    if cli.role == RoleArg::Standalone {
        standalone_metadata(&cli, &meta_path, image.capacity())?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("colo-io")
        .enable_all()
        .build()?;
    let events = EventSender::new();
    let heartbeat = Duration::from_millis(cli.heartbeat_ms);
    let security = match cli.role {
        RoleArg::Standalone => LinkSecurity::Insecure,
        _ => {
            let opts = cli.link_security()?;
            let s = LinkSecurity::new(&opts, cli.peer.as_deref())?;
            match &s {
                LinkSecurity::Insecure => warn!(
                    "replication link: plain TCP (--insecure-link): no authentication, no \
                     encryption"
                ),
                other => info!("replication link: {other:?}"),
            }
            s
        }
    };
    let peer_timeout = Duration::from_millis(cli.peer_timeout_ms);

    // The replication metadata beside the image (both COLO roles).
    let meta = match cli.role {
        RoleArg::Standalone => None,
        _ => {
            let m = MetaStore::open(&meta_path, image.capacity(), created)?;
            info!("replication metadata {}", meta_path.display());
            report_outside_changes(cli.image(), m.start_run(ImageStamp::of(cli.image())?)?);
            Some(Arc::new(m))
        }
    };

    // The primary's options for a given peer (a primary, or a secondary promoted in place).
    let link_opts = match cli.role {
        RoleArg::Standalone => None,
        _ => Some(cli.link_security()?),
    };
    let primary_options = {
        let (window, sync, granularity, block_size) = (
            cli.window,
            cli.sync,
            cli.dirty_granularity,
            cli.logical_block_size,
        );
        move |peer: &str| -> std::io::Result<PrimaryOptions> {
            let security = match &link_opts {
                Some(o) => LinkSecurity::new(o, Some(peer))?,
                None => LinkSecurity::Insecure,
            };
            Ok(PrimaryOptions {
                peer: peer.to_string(),
                window_bytes: window,
                sync,
                heartbeat_interval: heartbeat,
                peer_timeout,
                reconnect_interval: Duration::from_secs(1),
                dirty_granularity: granularity,
                block_size,
                security,
            })
        }
    };
    // The secondary's bound replication address (for the ready line).
    let mut listen = None;
    // The disk the guest (or the Secondary VM) sees, and the role object behind it.
    let (disk, role): (Arc<dyn BlockDevice>, Role) = match cli.role {
        RoleArg::Standalone => (image.clone(), Role::Standalone),
        RoleArg::Primary => {
            let meta = meta.clone().ok_or("no metadata")?;
            let log = if let Some(path) = dirty_log_path.clone() {
                // A disk with a history but no log: everything counts as dirty.
                let history = !created && meta.gens().current != 0;
                let opened =
                    DirtyLog::open(&path, image.capacity(), cli.dirty_log_extent, history)?;
                info!(
                    "dirty log {} ({} extents recorded dirty)",
                    path.display(),
                    opened.1.len()
                );
                Some(opened)
            } else {
                None
            };
            let mut opts = primary_options(cli.peer.as_deref().unwrap_or_default())?;
            opts.security = security.clone();
            let primary = Primary::open(image.clone(), opts, events.clone(), meta, log)?;
            runtime.spawn(primary.clone().run_link());
            (
                Arc::new(ReplicatedDisk::new(primary.clone())),
                Role::Primary(primary),
            )
        }
        RoleArg::Secondary => {
            let dir = cli.layer_dir.clone().unwrap_or_default();
            let meta = meta.clone().ok_or("no metadata")?;
            let layered = Arc::new(LayeredDisk::new_owned(
                image.clone(),
                &dir,
                cli.cluster_size,
                meta.gens().disk_id,
            )?);
            // A primary's disk that wrote beyond its peer's generation diverges first.
            let started = meta.secondary_start()?;
            // A failback target's own record: the dirty log of its life as a primary (or as a
            // failed-over disk), if it is a valid log of this disk.
            let own_dirty = match (&dirty_log_path, started.role) {
                (Some(path), DiskRole::Primary | DiskRole::FailedOver)
                    if started.gens.bitmap != 0 =>
                {
                    let x = DirtyLog::peek(path, image.capacity())?;
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
            let secondary = Secondary::new_durable(
                layered.clone(),
                Some(image.clone()),
                meta,
                SecondaryOptions {
                    listen: cli.listen.clone().unwrap_or_default(),
                    serves_vm: cli.socket.is_some(),
                    heartbeat_interval: heartbeat,
                    peer_timeout,
                    block_size: cli.logical_block_size,
                    allow_full_sync: cli.allow_full_sync,
                    security: security.clone(),
                },
                events.clone(),
            );
            secondary.set_failback(cli.discard_my_data, own_dirty);
            secondary.set_failover_log(dirty_log_path.clone().map(|path| FailoverLogSpec {
                path,
                extent: cli.dirty_log_extent,
            }));
            secondary.set_promotion(Promotion {
                options: Box::new(primary_options),
                runtime: runtime.handle().clone(),
            });
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
            let listener = runtime.block_on(secondary.bind())?;
            listen = Some(listener.local_addr()?.to_string());
            runtime.spawn(secondary.clone().run(listener));
            (layered, Role::Secondary(secondary))
        }
    };

    // vhost-user server (for the secondary: only when a Secondary VM attaches).
    let mut server = match cli.socket.as_ref() {
        Some(socket) => Some(
            Server::new(
                socket,
                cli.socket_access()?,
                disk.clone(),
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

    // One shutdown path for SIGTERM, SIGINT and QMP `quit`.
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let stop: Arc<dyn Fn() + Send + Sync> = {
        let stop_tx = std::sync::Mutex::new(stop_tx);
        Arc::new(move || {
            if let Ok(tx) = stop_tx.lock() {
                let _ = tx.send(());
            }
        })
    };
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    info!("signal {sig}: shutting down");
                    stop();
                }
            })?;
    }

    let metrics = match cli.metrics.as_deref() {
        Some(addr) => Some(start_metrics(
            &runtime,
            addr,
            colo_blk::metrics::MetricsSource {
                role: role.clone(),
                stats: server.as_ref().map(Server::stats_handle),
            },
        )?),
        None => None,
    };

    if let Some(qmp_path) = cli.qmp.clone() {
        start_qmp(
            &runtime,
            qmp_path,
            cli.qmp_mode,
            cli.qmp_group_id()?,
            Controller::new(role.clone(), server.as_ref().map(Server::stats_handle)),
            events.clone(),
            stop.clone(),
        )?;
    }

    // The device tells replication about QEMU's stop/start cycle (COLO checkpoints).
    if let Some(server) = server.as_mut() {
        match &role {
            Role::Primary(p) => server.set_observer(Arc::new(PrimaryDevice(p.clone()))),
            Role::Secondary(s) => server.set_observer(Arc::new(SvmDevice(s.clone()))),
            Role::Standalone => {}
        }
    }
    print_ready(&cli, listen, metrics);
    // systemd (Type=notify): the sockets are up. The vhost-user socket was bound by
    // Server::new, so a front-end may connect from now on.
    colo_blk::notify::notify_logged("READY=1\nSTATUS=serving");

    let server_thread = match server {
        Some(server) => {
            let control = server.control();
            let stop = stop.clone();
            let handle = std::thread::Builder::new()
                .name("vhost-user".into())
                .spawn(move || {
                    let r = server.run();
                    // However the server ends, the process ends with it.
                    stop();
                    r
                })?;
            Some((handle, control))
        }
        None => None,
    };

    // Wait for a stop request (or the server failing on its own).
    let _ = stop_rx.recv();
    colo_blk::notify::notify_logged("STOPPING=1");
    if let Some((handle, control)) = server_thread {
        // In-flight requests complete, then `Server::run` returns (socket path or not).
        control.stop();
        match handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!("vhost-user server: {e}"),
            Err(_) => error!("vhost-user server thread panicked"),
        }
    }
    disk.flush()?;
    // Nothing writes the image any more: its stamp lets the next start see other programs'
    // changes (a secondary first stops taking the stream).
    let quiet = match &role {
        Role::Secondary(s) => {
            let quiet = s.quiesce(Duration::from_secs(10));
            if quiet {
                s.close_layers()?;
            }
            quiet
        }
        _ => true,
    };
    if let (Some(meta), true) = (&meta, quiet) {
        image.flush()?;
        meta.clean_stop(ImageStamp::of(cli.image())?)?;
    }
    if let Some(q) = cli.qmp.as_ref() {
        let _ = std::fs::remove_file(q);
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    info!("stopped");
    Ok(())
}

/// Locks every file this process owns (src/ownership.rs) before any of them is read or
/// written: the image (shared with `--read-only` or `--share-rw`), the replication metadata and the dirty log (the
/// COLO roles), the layer directory (secondary), the vhost-user and QMP sockets.
fn take_ownership(
    cli: &Cli,
    meta_path: &std::path::Path,
    dirty_log: Option<&std::path::Path>,
) -> Result<Vec<FileLock>, Box<dyn std::error::Error>> {
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
fn standalone_metadata(
    cli: &Cli,
    meta_path: &std::path::Path,
    capacity: u64,
) -> Result<(), Box<dyn std::error::Error>> {
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
) -> Result<String, Box<dyn std::error::Error>> {
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
) -> Result<(), Box<dyn std::error::Error>> {
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
