//! COLO block replication: the primary's copy-and-forward, the secondary's disk buffer, and the
//! link between them.

pub mod dirty;
pub mod layers;
pub mod primary;
pub mod protocol;
pub mod secondary;
