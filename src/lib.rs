//! colo-blk: a vhost-user-blk backend with COLO block replication.
//!
//! Module map:
//! - [`storage`]: the [`storage::BlockDevice`] trait and the raw image behind it.
//! - [`virtio`]: virtio-blk config space, request parsing and execution.
//! - [`vhost_user`]: the thin vhost-user glue and the reconnecting accept loop.

pub mod cli;
pub mod qmp;
pub mod storage;
pub mod vhost_user;
pub mod virtio;
