//! Accepts vhost-user connections one after another on a unix socket.
//!
//! A `VhostUserDaemon` cannot be reused after its front-end disconnects, so each connection gets
//! a fresh daemon and backend over the same [`BlockDevice`]. When the front-end goes away (QEMU
//! quits, or restarts with `reconnect=`), the device's workers finish the requests they hold,
//! the disk is flushed, and the next connection is served. The per-queue counters
//! ([`Server::stats_handle`]) belong to the server, not to a connection, so they survive
//! reconnects.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use log::{debug, error, info, warn};
use thiserror::Error;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap};

use super::backend::{BlkBackend, DeviceOptions, StatsHandle};
use super::io_pool::IoPool;
use super::lifecycle::DeviceObserver;
use super::shared_mem;
use crate::storage::uring::{self, IoEngine};
use crate::storage::BlockDevice;
use crate::unix_socket::Access;

/// Errors of the vhost-user server.
#[derive(Debug, Error)]
pub enum ServerError {
    #[error("cannot listen on --socket {path}: {source}")]
    Listen {
        path: PathBuf,
        source: vhost::vhost_user::Error,
    },
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
}

#[derive(Default)]
struct ControlState {
    stopping: bool,
    connection: Option<ShutdownHandle>,
    /// The connected front-end's device, quiesced before the connection is closed at a stop.
    backend: Option<BlkBackend>,
    /// A duplicate of the listening socket's descriptor. `shutdown(2)` on a listening socket
    /// wakes an `accept()` blocked on it and fails every later one (Linux: EINVAL), through
    /// any descriptor of the socket and whatever became of its path: a stop never depends on
    /// connecting to the path, which may have been removed or replaced.
    listener: Option<OwnedFd>,
}

/// A handle to stop the server from another thread (signal handler, control socket).
#[derive(Clone, Default)]
pub struct ServerControl {
    state: Arc<Mutex<ControlState>>,
}

impl ServerControl {
    /// Asks the server to stop after the current connection's in-flight requests complete:
    /// [`Server::run`] returns soon after, with or without a front-end connected.
    pub fn stop(&self) {
        let backend = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.stopping = true;
            st.backend.take()
        };
        // Requests in flight complete while the front-end is still connected (see
        // `BlkBackend::quiesce`), so that it does not rewind a ring this process still moves.
        if let Some(b) = backend {
            b.quiesce();
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = st.connection.take() {
            h.shutdown();
        }
        // No new connection: wakes the accept loop, if it waits, and keeps it from waiting.
        if let Some(fd) = &st.listener {
            // SAFETY: shutdown(2) on a descriptor this state owns; no memory involved.
            if unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) } != 0 {
                warn!(
                    "waking the vhost-user accept loop: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }

    fn stopping(&self) -> bool {
        self.state.lock().map(|s| s.stopping).unwrap_or(true)
    }
}

/// The accept loop.
pub struct Server {
    /// Bound in [`Server::new`], so a bad path fails at start and clients can connect as soon
    /// as the process says it is ready.
    listener: Mutex<Listener>,
    disk: Arc<dyn BlockDevice>,
    opts: DeviceOptions,
    pool: Option<Arc<IoPool>>,
    control: ServerControl,
    stats: StatsHandle,
    engine: IoEngine,
    observer: Option<Arc<dyn DeviceObserver>>,
    /// The socket file to remove when the server is dropped, when the listener does not.
    unlink: Option<PathBuf>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(path) = &self.unlink {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Server {
    /// A server for `disk`, listening on `socket` with `access` (`--socket-mode`,
    /// `--socket-group`). With `io_threads > 0`, a pool of that many threads lets each queue
    /// keep several requests in flight.
    pub fn new(
        socket: &Path,
        access: Access,
        disk: Arc<dyn BlockDevice>,
        opts: DeviceOptions,
        io_threads: usize,
    ) -> Result<Self, ServerError> {
        let listen_error = |source| ServerError::Listen {
            path: socket.to_path_buf(),
            source,
        };
        let (listener, unlink) = if access == Access::default() {
            // The listener removes its socket file when it is dropped.
            (Listener::new(socket, true).map_err(listen_error)?, None)
        } else {
            let l = crate::unix_socket::bind(socket, access)
                .map_err(|e| listen_error(vhost::vhost_user::Error::SocketError(e)))?;
            (Listener::from(l), Some(socket.to_path_buf()))
        };
        info!("vhost-user socket listening on {}", socket.display());
        // SAFETY: the descriptor is the listener's, open for as long as `listener` lives,
        // which outlives this borrow (it is only duplicated).
        let dup = unsafe { BorrowedFd::borrow_raw(listener.as_raw_fd()) }
            .try_clone_to_owned()
            .map_err(|e| ServerError::Daemon(format!("duplicating the listener: {e}")))?;
        let control = ServerControl::default();
        control
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .listener = Some(dup);
        let stats = StatsHandle::new(opts.num_queues);
        stats.set_io_engine(IoEngine::Threads);
        let pool = if io_threads > 0 {
            Some(IoPool::new(io_threads).map_err(|e| ServerError::Daemon(e.to_string()))?)
        } else {
            None
        };
        Ok(Server {
            listener: Mutex::new(listener),
            disk,
            opts,
            pool,
            control,
            stats,
            engine: IoEngine::Threads,
            observer: None,
            unlink,
        })
    }

    /// Chooses the I/O engine (`--io-engine`) and logs the choice. `Auto` takes io_uring when the
    /// kernel allows it and the device is a plain raw image, the thread pool otherwise; `Uring`
    /// fails when the kernel refuses io_uring. Devices that are not raw images (the replication
    /// roles) always keep the thread pool.
    pub fn with_io_engine(mut self, engine: IoEngine) -> Result<Self, ServerError> {
        let raw = self.disk.as_raw_image().is_some();
        self.engine = match engine {
            IoEngine::Threads => {
                info!("I/O engine: threads (--io-engine threads)");
                IoEngine::Threads
            }
            IoEngine::Auto | IoEngine::Uring if !raw => {
                info!("I/O engine: threads (the device is not a plain raw image)");
                IoEngine::Threads
            }
            IoEngine::Auto => match uring::probe() {
                Ok(()) => {
                    info!("I/O engine: io_uring (one ring per queue)");
                    IoEngine::Uring
                }
                Err(e) => {
                    info!("I/O engine: threads (io_uring unavailable: {e})");
                    IoEngine::Threads
                }
            },
            IoEngine::Uring => {
                uring::probe().map_err(|e| {
                    ServerError::Daemon(format!("--io-engine uring: io_uring unavailable: {e}"))
                })?;
                info!("I/O engine: io_uring (one ring per queue)");
                IoEngine::Uring
            }
        };
        self.stats.set_io_engine(self.engine);
        Ok(self)
    }

    /// The handle that stops this server.
    pub fn control(&self) -> ServerControl {
        self.control.clone()
    }

    /// The per-queue request counters, valid for the server's whole life (across front-end
    /// reconnects).
    pub fn stats_handle(&self) -> StatsHandle {
        self.stats.clone()
    }

    /// Tells `observer` about QEMU's stop/start cycle of every connection's device.
    pub fn set_observer(&mut self, observer: Arc<dyn DeviceObserver>) {
        self.observer = Some(observer);
    }

    /// A fresh backend for the next connection, over the server's disk, pool and counters.
    fn backend(&self) -> BlkBackend {
        let backend = BlkBackend::new(
            self.disk.clone(),
            &self.opts,
            self.stats.clone(),
            self.pool.clone(),
            self.engine,
        );
        if let Some(o) = &self.observer {
            backend.set_observer(o.clone());
        }
        backend
    }

    /// Serves connections until [`ServerControl::stop`] is called.
    pub fn run(&self) -> Result<(), ServerError> {
        let mut listener = self.listener.lock().unwrap_or_else(|e| e.into_inner());
        while !self.control.stopping() {
            let backend = self.backend();
            let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
            let mut daemon =
                VhostUserDaemon::new("colo-blk".to_string(), backend.clone(), mem.clone())
                    .map_err(|e| ServerError::Daemon(e.to_string()))?;
            if backend.uses_uring() {
                backend
                    .register_uring_listeners(&daemon.get_epoll_handlers())
                    .map_err(|e| ServerError::Daemon(format!("io_uring eventfd: {e}")))?;
            }
            debug!("waiting for a front-end");
            if let Err(e) = daemon.start(&mut listener) {
                // After a stop, accept() fails by design (see `ControlState::listener`).
                if !self.control.stopping() {
                    warn!("accepting a vhost-user connection failed: {e}");
                }
                continue;
            }
            {
                let mut st = self.control.state.lock().unwrap_or_else(|e| e.into_inner());
                if st.stopping {
                    // The connection that woke us up to stop (or a late front-end): close it.
                    daemon.request_shutdown();
                    let _ = daemon.wait();
                    break;
                }
                st.connection = daemon.shutdown_handle();
                st.backend = Some(backend.clone());
            }
            info!("front-end connected");
            match daemon.wait() {
                Ok(())
                | Err(vhost_user_backend::Error::HandleRequest(
                    vhost::vhost_user::Error::Disconnected
                    | vhost::vhost_user::Error::PartialMessage,
                )) => info!("front-end disconnected"),
                // QEMU leaves guest RAM without a file descriptor out of the memory table;
                // with none at all, vhost-user-backend refuses the rings ("invalid
                // parameters"): say what the operator has to change (see `shared_mem`).
                Err(e) if mem.memory().num_regions() == 0 => {
                    let why = format!("{}: {}", shared_mem::NO_MEMORY, shared_mem::HOW_TO_SHARE);
                    // Reported before it is logged: whoever saw the log finds it in QMP.
                    self.stats.set_front_end_error(Some(why.clone()));
                    error!("front-end connection ended ({e}): {why}");
                }
                Err(e) => warn!("front-end connection ended: {e}"),
            }
            {
                let mut st = self.control.state.lock().unwrap_or_else(|e| e.into_inner());
                st.connection = None;
                st.backend = None;
            }
            // Dropping the daemon stops and joins the queue workers; then every request they
            // handed to the I/O pool or left on their io_uring is waited for.
            drop(daemon);
            backend.wait_idle();
            if let Err(e) = self.disk.flush() {
                warn!("flush after disconnect failed: {e}");
            }
            self.stats.count_front_end_disconnect();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemDisk;

    #[test]
    fn every_connection_counts_into_the_servers_stats_handle() {
        let dir = tempfile::tempdir().unwrap();
        let opts = DeviceOptions {
            num_queues: 3,
            queue_size: 16,
            serial: String::new(),
            read_only: false,
            logical_block_size: 512,
            poll_max: std::time::Duration::ZERO,
        };
        let server = Server::new(
            &dir.path().join("vhost.sock"),
            Access::default(),
            Arc::new(MemDisk::new(4096)),
            opts,
            0,
        )
        .unwrap();
        let handle = server.stats_handle();
        assert_eq!(handle.queues().len(), 3);
        for _connection in 0..2 {
            assert!(server.backend().stats().same_as(&handle));
        }
    }

    /// `query-stats` names the engine the server chose and counts a front-end's connection
    /// once the server is done with it and waits for the next one.
    #[test]
    fn the_stats_name_the_engine_and_count_finished_connections() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("vhost.sock");
        let opts = DeviceOptions {
            num_queues: 1,
            queue_size: 16,
            serial: String::new(),
            read_only: false,
            logical_block_size: 512,
            poll_max: std::time::Duration::ZERO,
        };
        let disk = Arc::new(MemDisk::new(4096));
        let server = Server::new(&socket, Access::default(), disk, opts, 0).unwrap();
        let handle = server.stats_handle();
        assert_eq!(handle.io_engine(), Some("threads"));
        // A MemDisk is no raw image: even `auto` keeps the thread pool.
        let server = server.with_io_engine(IoEngine::Auto).unwrap();
        assert_eq!(handle.io_engine(), Some("threads"));
        assert_eq!(handle.front_end_disconnects(), 0);
        let control = server.control();
        std::thread::scope(|s| {
            let run = s.spawn(|| server.run());
            // A front-end that connects and leaves at once, twice.
            for n in 1..=2 {
                drop(std::os::unix::net::UnixStream::connect(&socket).unwrap());
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
                while handle.front_end_disconnects() < n {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "disconnect {n} not counted"
                    );
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            control.stop();
            run.join().unwrap().unwrap();
        });
        assert_eq!(handle.front_end_disconnects(), 2);
    }
}
