//! Arbitrary bytes → the QMP server (`qmp::fuzzing::session`) with the standalone
//! `Controller` as the command handler, and → `InputBuffer` directly, pushed in chunks.
//! Invariants: no panic; every line the server writes is CRLF-terminated valid JSON, an
//! object with exactly one of "QMP" (the first line only), "return", "error" or "event";
//! `InputBuffer` yields at most one unit per byte pushed (it always makes progress).

#![no_main]

mod common;

use std::sync::Arc;

use colo_blk::control::{Controller, Role};
use colo_blk::qmp::fuzzing::{session, Input, InputBuffer};
use colo_blk::qmp::{EventSender, QmpServer, QmpVersion};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn input_buffer(data: &[u8]) {
    // The first byte picks the size limit and the chunk size: small limits reach TooLarge.
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let max = 16usize << (sel & 7);
    let chunk = 1 + (sel >> 3) as usize * 7;
    let mut buf = InputBuffer::new(max);
    let mut units = 0usize;
    for piece in rest.chunks(chunk) {
        buf.push(piece);
        for unit in buf.by_ref() {
            units += 1;
            assert!(units <= rest.len(), "more units than bytes");
            if let Input::Request(v) = unit {
                serde_json::to_string(&v).expect("a parsed value serialises");
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    input_buffer(data);

    let server = Arc::new(QmpServer::new(
        Arc::new(Controller::new(Role::Standalone, None)),
        EventSender::new(),
        QmpVersion::default(),
    ));
    let out = common::runtime()
        .block_on(session(server, data))
        .expect("an in-memory session has no I/O error");
    let text = std::str::from_utf8(&out).expect("the output is UTF-8");
    assert!(
        text.is_empty() || text.ends_with("\r\n"),
        "unterminated line"
    );
    for (i, line) in text.split_terminator("\r\n").enumerate() {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("line {i} is not JSON ({e}): {line:?}"));
        let obj = v
            .as_object()
            .unwrap_or_else(|| panic!("not an object: {line}"));
        let keys: Vec<&str> = ["QMP", "return", "error", "event"]
            .into_iter()
            .filter(|k| obj.contains_key(*k))
            .collect();
        assert_eq!(keys.len(), 1, "line {i}: {line}");
        assert_eq!(keys[0] == "QMP", i == 0, "greeting only first: {line}");
    }
});
