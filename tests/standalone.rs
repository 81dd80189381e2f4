//! The standalone backend driven through a real vhost-user-blk client.

mod common;

use common::{pattern, Backend, Client};

#[test]
fn smoke_write_read() {
    let dir = common::tempdir();
    let sock = dir.path().join("vhost.sock");
    let img = dir.path().join("disk.img");
    let _b = Backend::start(&sock, &img, &["--size", "64M", "--num-queues", "2"]);
    let mut c = Client::connect(&sock, 2).expect("connect");
    assert_eq!(c.capacity(), 64 << 20);
    let data = pattern(1, 65536);
    assert_eq!(c.write(1, 4096, &data), 0);
    assert_eq!(c.read(0, 4096, 65536).unwrap(), data);
}
