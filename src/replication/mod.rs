//! COLO block replication: the primary's copy-and-forward, the secondary's disk buffer, and the
//! link between them.
//!
//! - [`protocol`]: the frames on the wire; [`link`]: the session parts both ends share.
//! - [`primary`]: the engine that forwards every [`crate::storage::Change`]; `ordering`:
//!   how overlapping changes keep their order without a global lock; `dirty`: what changed
//!   since the last checkpoint.
//! - [`secondary`]: the endpoint applying the stream; [`layers`]: its hidden and active layers.
//! - [`events`]: the QMP events and status answers both roles produce; [`metrics`]: the
//!   counters and timestamps behind their operator fields.

pub(crate) mod dirty;
pub mod events;
pub mod layers;
pub mod link;
pub mod metadata;
pub mod metrics;
pub(crate) mod ordering;
#[cfg(test)]
mod power_loss;
pub mod primary;
pub mod protocol;
pub mod secondary;
pub mod tls;

pub use dirty::{DirtyExtents, DirtyLog, ExtentsError, LogGuard, LoggedDisk};
