//! The io_uring engine against the thread engine: the same random mix of reads, writes, flushes,
//! discards and write-zeroes, at queue depths 1 to 64 on three queues, gives the same results
//! (statuses, bytes read, final image) on both, and both match a model of the disk. With and
//! without O_DIRECT (512-byte aligned requests then also take the bounce path).
//!
//! Skips loudly when io_uring is unavailable (the backend then logs that it uses threads),
//! except in CI, where that is a failure.

mod common;

use blkio::ReqFlags;
use common::needs::Needs;
use common::{pattern, Backend, Client, CLIENT_BUF};

const DISK: u64 = 64 << 20;
/// Each request of a batch stays inside its own cell, so the batch's outcome does not depend
/// on the order the requests run in.
const CELL: u64 = 256 << 10;
const QUEUES: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes { unmap: bool },
}

#[derive(Debug, Clone, Copy)]
struct Req {
    q: usize,
    op: Op,
    offset: u64,
    len: usize,
    seed: u64,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 17
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A batch of `qd` requests per queue in distinct cells.
fn batch(rng: &mut Rng, qd: usize, serial: &mut u64) -> Vec<Req> {
    let cells = DISK / CELL;
    let mut used = std::collections::HashSet::new();
    let mut out = Vec::new();
    for q in 0..QUEUES {
        for _ in 0..qd {
            let cell = loop {
                let c = rng.below(cells);
                if used.insert(c) {
                    break c;
                }
            };
            // Half 4 KiB aligned (the io_uring fast path even with O_DIRECT), half 512 B.
            let unit = if rng.below(2) == 0 { 4096 } else { 512 };
            let units = CELL / unit;
            let op = match rng.below(20) {
                0..=7 => Op::Write,
                8..=15 => Op::Read,
                16 => Op::Flush,
                17 => Op::Discard,
                18 => Op::WriteZeroes { unmap: false },
                _ => Op::WriteZeroes { unmap: true },
            };
            // Up to 32 KiB; one write in 16 is a whole 256 KiB cell (the size from which the
            // io_uring engine hands buffered writes to the I/O pool).
            let n = if op == Op::Write && rng.below(16) == 0 {
                units
            } else {
                1 + rng.below(units.min(8 * 4096 / unit))
            };
            let start = rng.below(units - n + 1);
            *serial += 1;
            out.push(Req {
                q,
                op,
                offset: cell * CELL + start * unit,
                len: (n * unit) as usize,
                seed: *serial,
            });
        }
    }
    out
}

/// Submits every request of the batch at once and waits for all; returns per request its result
/// and, for reads, the bytes read.
fn run_batch(c: &mut Client, reqs: &[Req]) -> Vec<(i32, Vec<u8>)> {
    let mut pos = 0usize;
    let mut bufs = Vec::new();
    let mut per_queue = vec![0usize; QUEUES];
    for (i, r) in reqs.iter().enumerate() {
        assert!(pos + r.len <= CLIENT_BUF);
        let p = (c.buf.addr + pos) as *mut u8;
        bufs.push(p);
        let q = &mut c.queues[r.q];
        match r.op {
            Op::Read => {
                // SAFETY: [pos, pos+len) is inside the client's region and only this request's.
                unsafe { std::ptr::write_bytes(p, 0xee, r.len) };
                q.read(r.offset, p, r.len, i, ReqFlags::empty());
            }
            Op::Write => {
                let data = pattern(r.seed, r.len);
                // SAFETY: as above.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, r.len) };
                q.write(r.offset, p, r.len, i, ReqFlags::empty());
            }
            Op::Flush => q.flush(i, ReqFlags::empty()),
            Op::Discard => q.discard(r.offset, r.len as u64, i, ReqFlags::empty()),
            Op::WriteZeroes { unmap } => {
                let f = if unmap {
                    ReqFlags::empty()
                } else {
                    ReqFlags::NO_UNMAP
                };
                q.write_zeroes(r.offset, r.len as u64, i, f)
            }
        }
        per_queue[r.q] += 1;
        pos += r.len.next_multiple_of(4096);
    }
    let rets = c.complete(&per_queue, reqs.len());
    let read = |i: usize, r: &Req| {
        let mut v = vec![0u8; r.len];
        // SAFETY: the read completed; its buffer is [bufs[i], bufs[i] + len).
        unsafe { std::ptr::copy_nonoverlapping(bufs[i], v.as_mut_ptr(), r.len) };
        v
    };
    reqs.iter()
        .enumerate()
        .map(|(i, r)| match r.op {
            Op::Read => (rets[i], read(i, r)),
            _ => (rets[i], Vec::new()),
        })
        .collect()
}

/// Every request's result and bytes read, and the final image.
type Outcome = (Vec<(i32, Vec<u8>)>, Vec<u8>);

/// Runs the whole sequence against a backend started with `engine`; checks it against the model
/// as it goes; returns every result and the final image.
fn run_engine(engine: &str, direct: bool) -> Option<Outcome> {
    let dir = common::tempdir();
    let sock = dir.path().join("vhost.sock");
    let img = dir.path().join("disk.img");
    // A non-trivial starting image, the same for both engines.
    std::fs::write(&img, pattern(0xd15c, DISK as usize)).unwrap();
    let qmp = dir.path().join("qmp.sock");
    let qmp = qmp.to_str().unwrap();
    let mut args = vec!["--num-queues", "3", "--io-engine", engine, "--qmp", qmp];
    if direct {
        args.push("--direct");
    }
    let b = Backend::start(&sock, &img, &args);
    let chosen = b.io_engine();
    if !Needs::of(&format!("io_engines with --io-engine {engine}"))
        .that(
            engine != "auto" || chosen == "io_uring",
            format!("io_uring (the backend chose {chosen})"),
        )
        .met()
    {
        return None;
    }
    let mut c = Client::connect(&sock, QUEUES).expect("connect");
    let mut model = pattern(0xd15c, DISK as usize);
    let mut rng = Rng(0x5eed_0001);
    let mut serial = 0;
    let mut all = Vec::new();
    for qd in [1usize, 2, 4, 8, 16, 32, 64] {
        for round in 0..6 {
            let reqs = batch(&mut rng, qd, &mut serial);
            let res = run_batch(&mut c, &reqs);
            for (r, (ret, data)) in reqs.iter().zip(&res) {
                assert_eq!(*ret, 0, "{engine}: QD{qd} round {round}: {r:?} failed");
                let range = r.offset as usize..r.offset as usize + r.len;
                match r.op {
                    Op::Read => assert!(
                        data[..] == model[range],
                        "{engine}: QD{qd} round {round}: {r:?} read other bytes than the model"
                    ),
                    Op::Write => model[range].copy_from_slice(&pattern(r.seed, r.len)),
                    Op::Discard | Op::WriteZeroes { .. } => model[range].fill(0),
                    Op::Flush => {}
                }
            }
            all.extend(res);
        }
    }
    for q in 0..QUEUES {
        assert_eq!(c.flush(q), 0);
    }
    drop(c);
    b.terminate();
    let image = std::fs::read(&img).unwrap();
    assert!(image == model, "{engine}: image differs from the model");
    Some((all, image))
}

fn same_results(direct: bool) {
    let Some((uring, uring_img)) = run_engine("auto", direct) else {
        return;
    };
    let (threads, threads_img) = run_engine("threads", direct).expect("threads engine");
    assert_eq!(uring.len(), threads.len());
    for (i, (a, b)) in uring.iter().zip(&threads).enumerate() {
        assert!(a == b, "request {i}: io_uring and threads differ");
    }
    assert!(uring_img == threads_img, "final images differ");
}

#[test]
fn uring_and_threads_give_the_same_bytes() {
    same_results(false);
}

#[test]
fn uring_and_threads_give_the_same_bytes_with_o_direct() {
    same_results(true);
}
