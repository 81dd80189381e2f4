//! The vhost-user glue: a thin [`VhostUserBackend`](vhost_user_backend::VhostUserBackend)
//! implementation ([`backend`]), the I/O thread pool behind it (`io_pool`) and the
//! accept/reconnect loop around it ([`server`]), and what it tells replication about QEMU's
//! stop/start cycle ([`lifecycle`]).

pub mod backend;
mod inflight;
pub(crate) mod io_pool;
pub mod lifecycle;
mod poll;
pub mod server;
mod shared_mem;
mod uring_queue;

pub use backend::{DeviceOptions, QueueStatsSnapshot, StatsHandle};
pub use lifecycle::DeviceObserver;
pub use server::{Server, ServerControl};
