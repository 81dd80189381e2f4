//! virtio-blk: the device configuration space, request parsing and request execution.

pub mod config;
pub mod request;

pub use config::BlkConfig;
pub use request::{execute, parse, Parsed, Request, RequestKind};
