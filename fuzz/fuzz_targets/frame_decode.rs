//! Arbitrary bytes → `Frame::decode`, repeatedly over the buffer (after a failure, from the
//! next "COLO" magic). Invariants: no panic; a decoded frame used at least a header and at most
//! the rest of the buffer; it re-encodes to bytes that decode to an equal frame, using all of
//! them, and whose encoding is a fixed point; the async reader (`read_frame`) agrees with
//! `decode` on every position.

#![no_main]

mod common;

use colo_blk::replication::protocol::{read_frame, Frame, HEADER_LEN, MAGIC};
use libfuzzer_sys::fuzz_target;

fn next_magic(buf: &[u8], from: usize) -> Option<usize> {
    let magic = MAGIC.to_le_bytes();
    buf.get(from..)?
        .windows(4)
        .position(|w| w == magic)
        .map(|p| from + p)
}

fuzz_target!(|data: &[u8]| {
    let mut pos = 0;
    while pos < data.len() {
        let rest = &data[pos..];
        let decoded = Frame::decode(rest);
        // The streaming reader sees the same bytes the same way.
        let mut reader = rest;
        let streamed = common::runtime().block_on(read_frame(&mut reader));
        match (&decoded, &streamed) {
            (Ok((f, used)), Ok(g)) => {
                assert_eq!(f, g, "decode and read_frame disagree");
                assert_eq!(
                    rest.len() - reader.len(),
                    *used,
                    "read_frame used other bytes"
                );
            }
            (Err(_), Err(_)) => {}
            _ => panic!("decode {decoded:?} but read_frame {streamed:?}"),
        }
        match decoded {
            Ok((frame, used)) => {
                assert!((HEADER_LEN..=rest.len()).contains(&used), "used {used}");
                let bytes = frame.encode();
                let (again, n) = Frame::decode(&bytes).expect("a re-encoded frame decodes");
                assert_eq!(n, bytes.len());
                assert_eq!(again, frame, "round trip changed the frame");
                assert_eq!(again.encode(), bytes, "encoding is not canonical");
                pos += used;
            }
            Err(_) => match next_magic(data, pos + 1) {
                Some(p) => pos = p,
                None => break,
            },
        }
    }
});
