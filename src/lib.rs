//! colo-blk: a vhost-user-blk backend with COLO block replication.
//!
//! Module map:
//! - [`storage`]: the [`storage::BlockDevice`] trait and the raw image behind it.
//! - [`virtio`]: virtio-blk config space, request parsing and execution.
//! - [`vhost_user`]: the thin vhost-user glue and the reconnecting accept loop.
//! - [`replication`]: COLO block replication (the secondary's layered disk).

pub mod cli;
pub mod replication;
pub mod storage;
pub mod vhost_user;
pub mod virtio;
