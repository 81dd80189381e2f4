//! Arbitrary bytes as the primary's side of a replication session → `Secondary::serve` over
//! an in-memory duplex stream, with a 1 MiB base disk (a RAM disk that panics on any access
//! beyond its end) under 4 KiB-cluster layers on tmpfs.
//!
//! The first input byte picks the mode: 0 the rest is the whole stream; 1 a valid HELLO, then
//! the rest as raw bytes; 2 a valid HELLO, then checksum-correct frames built from the rest
//! (mostly in sequence and mostly inside the disk), so the applier really runs.
//!
//! The target decodes the stream itself and models the secondary: the HELLO must be accepted,
//! then stream frames are applied in order until the first bad frame, sequence gap, unexpected
//! frame, ERROR or out-of-range change. The applier stops when the session ends, so of what
//! it received it applies a prefix (what it acknowledges is within that prefix). Invariants:
//! no panic, no access beyond the disk; `applied_seq` is within the model's frames and the
//! base disk equals the model after exactly that many frames (so every byte outside the
//! ranges of applied WRITE/WRITE_ZEROES/DISCARD frames is unchanged); the secondary answers a
//! WELCOME first (and only for an accepted HELLO), ACKs in increasing order up to
//! `applied_seq`, and an ERROR only for a refused HELLO or the out-of-range change right after
//! the applied ones; after failover the base disk equals the model as of the last applied
//! CHECKPOINT (the hidden layer restored exactly what the stream overwrote since).

#![no_main]

mod common;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use colo_blk::qmp::EventSender;
use colo_blk::replication::layers::LayeredDisk;
use colo_blk::replication::metadata::{Generations, ZERO_GENERATION};
use colo_blk::replication::protocol::{Frame, Hello, VERSION};
use colo_blk::replication::secondary::{Secondary, SecondaryOptions};
use colo_blk::storage::{BlockDevice, Change};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DISK: u64 = 1 << 20;
const CLUSTER: u64 = 4096;
const BLOCK: u32 = 512;

fn layer_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = PathBuf::from("/dev/shm");
        let root = if shm.is_dir() {
            shm
        } else {
            std::env::temp_dir()
        };
        root.join(format!("colo-blk-fuzz-{}", std::process::id()))
    })
}

fn hello() -> Frame {
    Frame::Hello(Hello {
        version: VERSION,
        disk_size: DISK,
        block_size: BLOCK,
        epoch: 0,
        sync: false,
        dirty_log: false,
        takes_durable: true,
        // A primary on a disk colo-blk created: the fresh secondary takes its stream.
        gens: Generations {
            disk_id: 1,
            current: 2,
            bitmap: ZERO_GENERATION,
            ..Generations::default()
        },
    })
}

#[derive(Arbitrary, Debug)]
enum Off {
    /// Cluster index (mod the disk) plus a small offset.
    Cluster(u8, u16),
    /// Bytes before the end of the disk.
    BeforeEnd(u16),
    Any(u64),
}

impl Off {
    fn get(&self) -> u64 {
        match self {
            Off::Cluster(c, o) => u64::from(*c) * CLUSTER + u64::from(*o),
            Off::BeforeEnd(b) => DISK.wrapping_sub(u64::from(*b)),
            Off::Any(a) => *a,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Len {
    Small(u16),
    Any(u64),
}

impl Len {
    fn get(&self) -> u64 {
        match self {
            Len::Small(l) => u64::from(*l) * 3,
            Len::Any(l) => *l,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Write {
        off: Off,
        len: u16,
        fill: u8,
    },
    Zeroes {
        off: Off,
        len: Len,
        unmap: bool,
    },
    Discard {
        off: Off,
        len: Len,
    },
    Flush,
    Checkpoint {
        epoch: u8,
    },
    Heartbeat,
    Ack,
    Error,
    Hello,
    /// Raw bytes on the stream.
    Garbage(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Step {
    op: Op,
    /// 0 = the next sequence number; anything else is added to it (a gap or a repeat).
    seq_skew: u8,
    /// Flip one bit of the encoded frame (at this byte, if below its length).
    corrupt: Option<u16>,
}

fn structured(u: &mut Unstructured<'_>, out: &mut Vec<u8>) {
    let mut seq = 1u64;
    // (arbitrary keeps producing values from an exhausted input: stop at its end.)
    for _ in 0..128 {
        if u.is_empty() {
            break;
        }
        let Ok(step) = Step::arbitrary(u) else { break };
        let s = if step.seq_skew < 200 {
            seq
        } else {
            seq.wrapping_add(u64::from(step.seq_skew)).wrapping_sub(220)
        };
        let change = |change: Change<Bytes>| Frame::Change { seq: s, change };
        let frame = match step.op {
            Op::Write { off, len, fill } => {
                let data: Vec<u8> = (0..(len % 10_000).max(1))
                    .map(|i| fill ^ (i >> 3) as u8)
                    .collect();
                Frame::write(s, off.get(), data)
            }
            Op::Zeroes { off, len, unmap } => change(Change::WriteZeroes {
                offset: off.get(),
                len: len.get(),
                unmap,
            }),
            Op::Discard { off, len } => change(Change::Discard {
                offset: off.get(),
                len: len.get(),
            }),
            Op::Flush => change(Change::Flush),
            Op::Checkpoint { epoch } => Frame::Checkpoint {
                seq: s,
                epoch: u64::from(epoch),
            },
            Op::Heartbeat => Frame::Heartbeat,
            Op::Ack => Frame::Ack { seq: s },
            Op::Error => Frame::Error {
                message: "primary gives up".into(),
            },
            Op::Hello => hello(),
            Op::Garbage(g) => {
                out.extend_from_slice(&g);
                continue;
            }
        };
        if frame.seq() != 0 && frame.seq() == seq {
            seq += 1;
        }
        let mut bytes = frame.encode();
        if let Some(at) = step.corrupt {
            if let Some(b) = bytes.get_mut(at as usize) {
                *b ^= 1 << (at % 8);
            }
        }
        out.extend_from_slice(&bytes);
    }
}

/// What the secondary may do with the stream, from the stream alone: the frames it must apply
/// in order (with `disk` holding the result of applying all of them).
struct Model {
    accepted: bool,
    /// The stream frames up to (excluding) the first one that ends the session.
    frames: Vec<Frame>,
    /// Sequence number of a change that is in range-error (the applier must refuse it).
    failing_seq: Option<u64>,
}

impl Model {
    /// The base disk once the frames up to `seq` are applied, and as of the last checkpoint
    /// among them.
    fn disk_at(&self, initial: &[u8], seq: u64) -> (Vec<u8>, Vec<u8>) {
        let mut disk = initial.to_vec();
        let mut checkpoint = disk.clone();
        for f in self.frames.iter().take_while(|f| f.seq() <= seq) {
            match f {
                Frame::Change { change, .. } => {
                    let (off, len) = change.range();
                    let r = off as usize..(off + len) as usize;
                    match change {
                        Change::Write { data, .. } => disk[r].copy_from_slice(data),
                        Change::WriteZeroes { .. } | Change::Discard { .. } => disk[r].fill(0),
                        Change::Flush => {}
                    }
                }
                Frame::Checkpoint { .. } => checkpoint = disk.clone(),
                _ => unreachable!(),
            }
        }
        (disk, checkpoint)
    }

    fn last_seq(&self) -> u64 {
        self.frames.last().map_or(0, Frame::seq)
    }
}

fn model(stream: &[u8]) -> Model {
    let mut m = Model {
        accepted: false,
        frames: Vec::new(),
        failing_seq: None,
    };
    let Ok((Frame::Hello(h), mut pos)) = Frame::decode(stream) else {
        return m;
    };
    if h.version != VERSION || h.disk_size != DISK || h.block_size != BLOCK {
        return m;
    }
    // The secondary's disk is fresh (in-memory metadata of a created disk): only a primary
    // whose dirty record covers everything since creation is taken (metadata::decide).
    let g = &h.gens;
    let covers = g.bitmap == ZERO_GENERATION || g.current == ZERO_GENERATION;
    if !covers || g.epoch != 0 {
        return m;
    }
    m.accepted = true;
    let mut expected = 1u64;
    let summary = std::env::var_os("COLO_FUZZ_SUMMARY").is_some();
    while let Ok((f, used)) = Frame::decode(&stream[pos..]) {
        pos += used;
        if summary {
            // For triage: the frames the model sees.
            eprintln!(
                "model: {} seq {} range {:?}",
                f.kind(),
                f.seq(),
                match &f {
                    Frame::Change { change, .. } => change.range(),
                    _ => (0, 0),
                }
            );
        }
        match &f {
            Frame::Heartbeat => continue,
            Frame::Change { seq, .. } | Frame::Checkpoint { seq, .. } if *seq != expected => break,
            Frame::Change { seq, change } => {
                let (off, len) = change.range();
                if !off.checked_add(len).is_some_and(|end| end <= DISK) {
                    m.failing_seq = Some(*seq);
                    break;
                }
            }
            Frame::Checkpoint { .. } => {}
            _ => break,
        }
        expected += 1;
        m.frames.push(f);
    }
    m
}

/// The kinds and sequence numbers of the whole frames in `bytes`, for failure messages.
fn kinds(mut bytes: &[u8]) -> Vec<String> {
    let mut v = Vec::new();
    while let Ok((f, used)) = Frame::decode(bytes) {
        bytes = &bytes[used..];
        v.push(format!("{} {}", f.kind(), f.seq()));
    }
    v
}

fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut stream = Vec::new();
    match mode % 3 {
        0 => stream.extend_from_slice(rest),
        1 => {
            stream = hello().encode();
            stream.extend_from_slice(rest);
        }
        _ => {
            stream = hello().encode();
            structured(&mut Unstructured::new(rest), &mut stream);
        }
    }

    let initial = common::pattern(DISK as usize);
    let want = model(&stream);
    let base = Arc::new(common::StrictDisk::new(initial.clone()));
    // The layers persist across processes: every input starts from an empty directory.
    let _ = std::fs::remove_dir_all(layer_dir());
    let layered = LayeredDisk::new(base.clone(), layer_dir(), CLUSTER).expect("layered disk");
    let opts = SecondaryOptions {
        listen: "fuzz".into(),
        serves_vm: false,
        security: colo_blk::replication::tls::LinkSecurity::Insecure,
        heartbeat_interval: Duration::from_secs(1),
        peer_timeout: Duration::from_secs(2),
        block_size: BLOCK,
        allow_full_sync: false,
    };
    let sec = Secondary::in_memory(Arc::new(layered), opts, EventSender::new());

    let answers = common::runtime().block_on(async {
        let (ours, theirs) = tokio::io::duplex(64 << 10);
        let (mut rd, mut wr) = tokio::io::split(ours);
        let send = async {
            // A write error means the secondary hung up first: fine.
            let _ = wr.write_all(&stream).await;
            let _ = wr.shutdown().await;
        };
        let mut answers = Vec::new();
        let ((), (), r) = tokio::join!(
            sec.clone().serve(theirs, "fuzz-primary".into()),
            send,
            rd.read_to_end(&mut answers)
        );
        r.expect("reading the secondary's answers");
        answers
    });

    assert_eq!(base.capacity(), DISK);
    // The applier stops when the session ends, so it may leave the tail of what it received
    // unapplied (and unacknowledged): it applied a prefix of the model's frames.
    let applied = sec.status().applied_seq;
    assert!(
        applied <= want.last_seq(),
        "applied {applied} of {}",
        want.last_seq()
    );
    let (disk, checkpoint) = want.disk_at(&initial, applied);
    let got = base.snapshot();
    if got != disk {
        let i = got.iter().zip(&disk).position(|(a, b)| a != b).unwrap_or(0);
        panic!(
            "base disk differs from the model after {applied} frames at byte {i}: {} != {}",
            got[i], disk[i]
        );
    }

    // The secondary's answers.
    let mut pos = 0;
    let mut first = true;
    let mut last_ack = 0;
    while let Ok((f, used)) = Frame::decode(&answers[pos..]) {
        pos += used;
        match f {
            Frame::Welcome(w) => {
                assert!(
                    first && want.accepted,
                    "unexpected WELCOME (accepted {}): the answers were {:?}",
                    want.accepted,
                    kinds(&answers)
                );
                assert_eq!(
                    (w.version, w.disk_size, w.block_size),
                    (VERSION, DISK, BLOCK)
                );
            }
            Frame::Ack { seq } => {
                assert!(want.accepted && !first, "ACK before WELCOME");
                assert!(seq > last_ack && seq <= applied, "ACK {seq} of {applied}");
                last_ack = seq;
            }
            Frame::Error { message } => {
                assert!(
                    !want.accepted || want.failing_seq == Some(applied + 1),
                    "ERROR without a failed change: {message}"
                );
            }
            Frame::Durable { seq, .. } => {
                assert!(seq <= last_ack, "DURABLE {seq} before its ACK ({last_ack})");
            }
            Frame::Heartbeat => {}
            f => panic!("the secondary sent {f:?}"),
        }
        first = false;
    }
    assert_eq!(pos, answers.len(), "the answers end in a partial frame");

    // Failover without SVM writes rolls back to the last checkpoint.
    sec.failover().expect("failover");
    let got = base.snapshot();
    if got != checkpoint {
        let first = got.iter().zip(&checkpoint).position(|(a, b)| a != b);
        panic!("after failover the base disk is not the last checkpoint (first at {first:?})");
    }
}

fuzz_target!(|data: &[u8]| run(data));
