//! virtio-blk: the device configuration space ([`config`]), request parsing and request
//! execution ([`request`]). Everything here is used by the vhost-user backend only.

pub mod config;
#[doc(hidden)]
pub mod fuzzing;
pub mod request;
