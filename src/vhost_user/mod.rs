//! The vhost-user glue: a thin [`VhostUserBackend`](vhost_user_backend::VhostUserBackend)
//! implementation and the accept/reconnect loop around it.

pub mod backend;
pub mod io_pool;
pub mod server;

pub use backend::{BlkBackend, DeviceOptions, QueueStats};
pub use server::{Server, ServerControl};
