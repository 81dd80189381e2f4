//! colo-blk: a vhost-user-blk backend with COLO block replication.
//!
//! Module map:
//! - [`storage`]: the [`storage::BlockDevice`] trait and the raw image behind it.
//! - [`virtio`]: virtio-blk config space, request parsing and execution.
//! - [`vhost_user`]: the thin vhost-user glue and the reconnecting accept loop.
//! - [`replication`]: COLO block replication: wire protocol, primary, secondary, disk buffer.
//! - [`qmp`]: the QMP-compatible control server; [`control`]: the commands each role answers.
//! - [`cli`]: command-line options; [`faults`]: fault injection for crash tests; [`heap`]:
//!   the allocator tuning for the data path's large buffers.
//! - Operating: [`status`] (`colo-blk status`), [`reprotect`] (`colo-blk reprotect`, the
//!   failback driver), [`supervise`] (`colo-blk supervise`, failover with fencing under
//!   x-colo), [`metrics`] (Prometheus `--metrics`),
//!   [`notify`] (systemd readiness), [`histogram`] (latency buckets); [`ownership`]: the
//!   locks that keep two processes off one disk.

pub mod cli;
pub mod control;
pub mod faults;
pub mod heap;
pub mod histogram;
pub mod metrics;
pub mod notify;
pub mod ownership;
pub mod qmp;
pub mod replication;
pub mod reprotect;
pub mod status;
pub mod storage;
pub mod supervise;
pub mod unix_socket;
pub mod vhost_user;
pub mod virtio;
