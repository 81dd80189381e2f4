//! COLO block replication.
//!
//! - [`layers`]: the secondary's disk buffer ([`layers::LayeredDisk`]): the hidden and active
//!   layers over the secondary disk, checkpoint and failover.

pub mod layers;
