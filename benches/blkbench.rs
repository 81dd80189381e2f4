//! Load generator for any vhost-user-blk socket (placeholder; see docs/performance.md).
fn main() {}
