//! blkbench: a load generator for any vhost-user-blk socket (colo-blk, qemu-storage-daemon, ...).
//!
//! It connects with libblkio's pure-Rust `blkio` crate (driver `virtio-blk-vhost-user`), keeps a
//! fixed number of requests in flight per queue for a fixed time and reports IOPS, MiB/s and
//! completion latency percentiles. See docs/performance.md.
//!
//! ```text
//! cargo bench --bench blkbench -- --socket /tmp/vhost.sock [--workload NAME[,NAME...]]...
//!     [--seconds 5] [--warmup 1] [--queues 1] [--working-set 1G] [--json] [--label TEXT]
//!     [--bytes 1G]
//! ```
//!
//! `--bytes` runs each workload for an amount of data instead of a time (no warm-up): every
//! queue submits its share of the requests, and the rates are over the time that took.
//!
//! Without `--workload` every workload of [`WORKLOADS`] runs in order. The queue depth of a
//! workload is per queue: with `--queues N` there are N threads, one per virtqueue, each keeping
//! QD requests in flight. Human-readable lines go to stdout; with `--json` stdout carries one JSON
//! object per workload instead and the human-readable lines go to stderr.
//!
//! Exit status: 0 on success, 1 on an I/O or connection error, 2 on a usage error.

use std::mem::MaybeUninit;
use std::process::ExitCode;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};

/// What a workload does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
}

/// How a workload picks offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pattern {
    /// Uniformly random, block-size aligned, over the working set.
    Random,
    /// Ascending, wrapping at the end of the queue's stripe of the working set.
    Sequential,
}

#[derive(Debug, Clone, Copy)]
struct Workload {
    name: &'static str,
    op: Op,
    pattern: Pattern,
    block_size: usize,
    queue_depth: usize,
}

/// The default list, run in this order (reads of a region follow the writes that filled it).
const WORKLOADS: &[Workload] = &[
    Workload {
        name: "randread-4k-qd1",
        op: Op::Read,
        pattern: Pattern::Random,
        block_size: 4096,
        queue_depth: 1,
    },
    Workload {
        name: "randread-4k-qd32",
        op: Op::Read,
        pattern: Pattern::Random,
        block_size: 4096,
        queue_depth: 32,
    },
    Workload {
        name: "randwrite-4k-qd1",
        op: Op::Write,
        pattern: Pattern::Random,
        block_size: 4096,
        queue_depth: 1,
    },
    Workload {
        name: "randwrite-4k-qd32",
        op: Op::Write,
        pattern: Pattern::Random,
        block_size: 4096,
        queue_depth: 32,
    },
    Workload {
        name: "seqwrite-1m-qd8",
        op: Op::Write,
        pattern: Pattern::Sequential,
        block_size: 1 << 20,
        queue_depth: 8,
    },
    Workload {
        name: "seqread-1m-qd8",
        op: Op::Read,
        pattern: Pattern::Sequential,
        block_size: 1 << 20,
        queue_depth: 8,
    },
];

/// How long one `do_io` may wait for a completion before the run is declared hung.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

const USAGE: &str = "\
usage: blkbench --socket PATH [options]
  --socket PATH        vhost-user-blk unix socket (required)
  --workload NAME      workload to run; repeatable or comma-separated (default: all, in order)
  --seconds S          measured time per workload (default 5)
  --warmup S           unmeasured time before each measurement (default 1)
  --queues N           virtqueues, one thread each; QD is per queue (default 1)
  --working-set SIZE   bytes at the start of the device to use, e.g. 1G (default: whole device)
  --json               print JSON lines on stdout (human-readable lines go to stderr)
  --label TEXT         copied into the JSON output (e.g. the backend's name)
  --bytes SIZE         transfer SIZE bytes per workload (e.g. 1G) instead of a fixed time;
                       no warm-up, --seconds and --warmup are ignored
  --list               list the workloads and exit";

#[derive(Debug)]
struct Opts {
    socket: String,
    workloads: Vec<Workload>,
    seconds: f64,
    warmup: f64,
    queues: usize,
    working_set: Option<u64>,
    json: bool,
    label: Option<String>,
    /// `--bytes`: a fixed amount of data per workload instead of a fixed time.
    bytes: Option<u64>,
}

enum Parse {
    Run(Opts),
    Exit(ExitCode),
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        Some('T') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("'{s}' is not a size (examples: 1048576, 512M, 1G)"))
}

fn parse_seconds(flag: &str, s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("{flag}: '{s}' is not a number of seconds")),
    }
}

fn find_workload(name: &str) -> Result<Workload, String> {
    WORKLOADS
        .iter()
        .find(|w| w.name == name)
        .copied()
        .ok_or_else(|| {
            let names: Vec<&str> = WORKLOADS.iter().map(|w| w.name).collect();
            format!("unknown workload '{name}' (known: {})", names.join(", "))
        })
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Parse, String> {
    let mut socket = None;
    let mut workloads = Vec::new();
    let mut seconds = 5.0;
    let mut warmup = 1.0;
    let mut queues = 1usize;
    let mut working_set = None;
    let mut json = false;
    let mut label = None;
    let mut bytes = None;
    let mut args = args;
    while let Some(arg) = args.next() {
        // Accept both `--flag value` and `--flag=value`.
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let value = |args: &mut dyn Iterator<Item = String>| -> Result<String, String> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => args.next().ok_or_else(|| format!("{flag} needs a value")),
            }
        };
        match flag.as_str() {
            // Passed by `cargo bench` to every bench target.
            "--bench" => {}
            "--socket" => socket = Some(value(&mut args)?),
            "--workload" => {
                for name in value(&mut args)?.split(',').filter(|n| !n.is_empty()) {
                    workloads.push(find_workload(name)?);
                }
            }
            "--seconds" => seconds = parse_seconds("--seconds", &value(&mut args)?)?,
            "--warmup" => warmup = parse_seconds("--warmup", &value(&mut args)?)?,
            "--queues" => {
                let v = value(&mut args)?;
                queues = match v.parse::<usize>() {
                    Ok(n) if (1..=64).contains(&n) => n,
                    _ => return Err(format!("--queues: '{v}' is not a number in 1..=64")),
                };
            }
            "--working-set" => working_set = Some(parse_size(&value(&mut args)?)?),
            "--json" => json = true,
            "--label" => label = Some(value(&mut args)?),
            "--bytes" => match parse_size(&value(&mut args)?)? {
                0 => return Err("--bytes must be greater than 0".into()),
                n => bytes = Some(n),
            },
            "--list" => {
                for w in WORKLOADS {
                    println!("{}", w.name);
                }
                return Ok(Parse::Exit(ExitCode::SUCCESS));
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(Parse::Exit(ExitCode::SUCCESS));
            }
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    let socket = socket.ok_or("--socket is required")?;
    if seconds <= 0.0 {
        return Err("--seconds must be greater than 0".into());
    }
    if workloads.is_empty() {
        workloads = WORKLOADS.to_vec();
    }
    Ok(Parse::Run(Opts {
        socket,
        workloads,
        seconds,
        warmup,
        queues,
        working_set,
        json,
        label,
        bytes,
    }))
}

/// xorshift64*: fast, deterministic, good enough to spread offsets.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Produces the offsets one queue submits.
struct Offsets {
    pattern: Pattern,
    block_size: u64,
    /// The queue's range, in bytes: [start, end). Block-size aligned.
    start: u64,
    end: u64,
    next_seq: u64,
    rng: Rng,
}

impl Offsets {
    fn next(&mut self) -> u64 {
        match self.pattern {
            Pattern::Random => {
                let blocks = (self.end - self.start) / self.block_size;
                self.start + self.rng.next() % blocks * self.block_size
            }
            Pattern::Sequential => {
                if self.next_seq + self.block_size > self.end {
                    self.next_seq = self.start;
                }
                let off = self.next_seq;
                self.next_seq += self.block_size;
                off
            }
        }
    }
}

/// What one queue measured.
struct QueueResult {
    ios: u64,
    bytes: u64,
    /// Completion latencies (ns) of the requests that completed inside the measured window.
    latencies_ns: Vec<u64>,
}

struct Phases {
    measure_start: Instant,
    measure_end: Instant,
    /// `--bytes`: how many requests this queue submits (then the run ends, whatever the time).
    quota: Option<u64>,
}

/// Keeps `w.queue_depth` requests in flight on `q` until the measurement window ends.
///
/// `buf` is this queue's part of the mapped memory region: queue_depth * block_size bytes.
fn run_queue(
    q: &mut Blkioq,
    qid: usize,
    w: &Workload,
    buf: usize,
    mut offsets: Offsets,
    phases: &Phases,
) -> Result<QueueResult, String> {
    let qd = w.queue_depth;
    let bs = w.block_size;
    let mut submitted_at = vec![phases.measure_start; qd];
    let mut slot_offset = vec![0u64; qd];
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..qd).map(|_| MaybeUninit::uninit()).collect();
    let expected = match phases.quota {
        Some(n) => n as usize,
        None => {
            (w.queue_depth as f64
                * (phases.measure_end - phases.measure_start).as_secs_f64()
                * 200_000.0) as usize
        }
    };
    let mut result = QueueResult {
        ios: 0,
        bytes: 0,
        latencies_ns: Vec::with_capacity(expected.min(16 << 20)),
    };

    let submit = |q: &mut Blkioq, slot: usize, off: u64| {
        let ptr = (buf + slot * bs) as *mut u8;
        match w.op {
            Op::Read => q.read(off, ptr, bs, slot, ReqFlags::empty()),
            Op::Write => q.write(off, ptr as *const u8, bs, slot, ReqFlags::empty()),
        }
    };

    let quota = phases.quota.unwrap_or(u64::MAX);
    let mut submitted = 0u64;
    for slot in 0..qd {
        if submitted == quota {
            break;
        }
        submitted += 1;
        slot_offset[slot] = offsets.next();
        submitted_at[slot] = Instant::now();
        submit(q, slot, slot_offset[slot]);
    }
    let mut in_flight = submitted;
    while in_flight > 0 {
        let mut timeout = IO_TIMEOUT;
        let n = q
            .do_io(&mut completions, 1, Some(&mut timeout), None)
            .map_err(|e| format!("queue {qid}: do_io failed: {e} (errno {:?})", e.errno()))?;
        let now = Instant::now();
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first n completions.
            let c = unsafe { c.assume_init_ref() };
            let slot = c.user_data;
            if slot >= qd {
                return Err(format!(
                    "queue {qid}: completion with unknown user_data {slot}"
                ));
            }
            if c.ret != 0 {
                return Err(format!(
                    "queue {qid}: {} of {bs} bytes at offset {} failed: {}",
                    if w.op == Op::Read { "read" } else { "write" },
                    slot_offset[slot],
                    std::io::Error::from_raw_os_error(-c.ret)
                ));
            }
            if now >= phases.measure_start && now <= phases.measure_end {
                result.ios += 1;
                result.bytes += bs as u64;
                result
                    .latencies_ns
                    .push((now - submitted_at[slot]).as_nanos() as u64);
            }
            if now < phases.measure_end && submitted < quota {
                submitted += 1;
                slot_offset[slot] = offsets.next();
                submitted_at[slot] = Instant::now();
                submit(q, slot, slot_offset[slot]);
            } else {
                in_flight -= 1;
            }
        }
    }
    Ok(result)
}

/// The summary of one workload over all queues.
struct Summary {
    /// The measured time: `--seconds`, or with `--bytes` how long the data took.
    seconds: f64,
    iops: f64,
    mib_s: f64,
    mean_us: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
    ios: u64,
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)] as f64 / 1000.0
}

fn summarise(results: Vec<QueueResult>, seconds: f64) -> Summary {
    let ios: u64 = results.iter().map(|r| r.ios).sum();
    let bytes: u64 = results.iter().map(|r| r.bytes).sum();
    let mut lat: Vec<u64> = Vec::with_capacity(results.iter().map(|r| r.latencies_ns.len()).sum());
    for r in results {
        lat.extend_from_slice(&r.latencies_ns);
    }
    lat.sort_unstable();
    let mean_us = if lat.is_empty() {
        f64::NAN
    } else {
        lat.iter().map(|&l| l as f64).sum::<f64>() / lat.len() as f64 / 1000.0
    };
    Summary {
        seconds,
        iops: ios as f64 / seconds,
        mib_s: bytes as f64 / seconds / (1024.0 * 1024.0),
        mean_us,
        p50_us: percentile(&lat, 50.0),
        p99_us: percentile(&lat, 99.0),
        p999_us: percentile(&lat, 99.9),
        max_us: lat.last().map_or(f64::NAN, |&l| l as f64 / 1000.0),
        ios,
    }
}

fn run_workload(
    queues: &mut [Blkioq],
    region_addr: usize,
    per_queue_buf: usize,
    w: &Workload,
    working_set: u64,
    opts: &Opts,
) -> Result<Summary, String> {
    let nq = queues.len();
    let bs = w.block_size as u64;
    // Each queue gets its own stripe for sequential I/O; random I/O covers the whole set.
    let stripe = working_set / nq as u64 / bs * bs;
    if stripe < bs {
        return Err(format!(
            "{}: working set of {working_set} bytes is too small for {nq} queue(s) of {bs}-byte requests",
            w.name
        ));
    }
    let barrier = Barrier::new(nq);
    // --bytes: each queue submits its share of the requests (at least one); no time limit.
    let quota = opts
        .bytes
        .map(|b| b.div_ceil(bs).div_ceil(nq as u64).max(1));
    let (warmup, measure) = match quota {
        Some(_) => (Duration::ZERO, Duration::from_secs(1 << 30)),
        None => (
            Duration::from_secs_f64(opts.warmup),
            Duration::from_secs_f64(opts.seconds),
        ),
    };
    let started = Instant::now();
    let results: Vec<Result<QueueResult, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = queues
            .iter_mut()
            .enumerate()
            .map(|(qid, q)| {
                let barrier = &barrier;
                let buf = region_addr + qid * per_queue_buf;
                let offsets = Offsets {
                    pattern: w.pattern,
                    block_size: bs,
                    start: match w.pattern {
                        Pattern::Random => 0,
                        Pattern::Sequential => qid as u64 * stripe,
                    },
                    end: match w.pattern {
                        Pattern::Random => working_set / bs * bs,
                        Pattern::Sequential => (qid as u64 + 1) * stripe,
                    },
                    next_seq: qid as u64 * stripe,
                    rng: Rng::new(0x5EED + qid as u64 * 7919 + w.name.len() as u64),
                };
                std::thread::Builder::new()
                    .name(format!("blkbench-q{qid}"))
                    .spawn_scoped(s, move || {
                        barrier.wait();
                        let t0 = Instant::now();
                        let phases = Phases {
                            measure_start: t0 + warmup,
                            measure_end: t0 + warmup + measure,
                            quota,
                        };
                        run_queue(q, qid, w, buf, offsets, &phases)
                    })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h {
                Ok(h) => h
                    .join()
                    .unwrap_or_else(|_| Err("queue thread panicked".to_string())),
                Err(e) => Err(format!("cannot spawn a queue thread: {e}")),
            })
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let mut ok = Vec::with_capacity(nq);
    for r in results {
        ok.push(r?);
    }
    let seconds = if quota.is_some() {
        elapsed
    } else {
        opts.seconds
    };
    Ok(summarise(ok, seconds))
}

fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

fn json_num(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.3}")
    } else {
        "null".to_string()
    }
}

/// The first human-readable line: what runs, against what.
fn header(opts: &Opts, capacity: u64, working_set: u64) -> String {
    let label = opts.label.as_deref().unwrap_or("");
    let amount = match opts.bytes {
        Some(b) => format!("{} MiB per workload", b >> 20),
        None => format!(
            "{:.1}s warm-up + {:.1}s per workload",
            opts.warmup, opts.seconds
        ),
    };
    format!(
        "# {}{}: capacity {} MiB, working set {} MiB, {} queue(s), {amount}",
        opts.socket,
        if label.is_empty() {
            String::new()
        } else {
            format!(" ({label})")
        },
        capacity >> 20,
        working_set >> 20,
        opts.queues,
    )
}

fn run(opts: &Opts) -> Result<(), String> {
    let err = |what: &str| {
        let what = what.to_string();
        move |e: blkio::Error| format!("{what}: {e}")
    };
    let mut b = Blkio::new("virtio-blk-vhost-user").map_err(err("blkio"))?;
    b.set_str("path", &opts.socket).map_err(err("path"))?;
    b.connect()
        .map_err(err(&format!("cannot connect to {}", opts.socket)))?;
    b.set_i32("num-queues", opts.queues as i32)
        .map_err(err("num-queues"))?;
    let max_qd = opts
        .workloads
        .iter()
        .map(|w| w.queue_depth)
        .max()
        .unwrap_or(1);
    let queue_size = (max_qd * 2).next_power_of_two().max(256) as i32;
    b.set_i32("queue-size", queue_size)
        .map_err(err("queue-size"))?;
    let out = b.start().map_err(err("start"))?;
    let mut queues = out.queues;
    if queues.len() != opts.queues {
        return Err(format!(
            "asked for {} queues, got {}",
            opts.queues,
            queues.len()
        ));
    }
    let capacity = b.get_u64("capacity").map_err(err("capacity"))?;
    let working_set = opts.working_set.unwrap_or(capacity).min(capacity);

    let per_queue_buf = opts
        .workloads
        .iter()
        .map(|w| w.queue_depth * w.block_size)
        .max()
        .unwrap_or(4096);
    let region = b
        .alloc_mem_region(per_queue_buf * opts.queues)
        .map_err(err("alloc_mem_region"))?;
    b.map_mem_region(&region).map_err(err("map_mem_region"))?;
    // Written data: a non-zero pattern, so nothing can shortcut all-zero blocks.
    {
        let mut x = 0x1234_5678_9abc_def1u64;
        // SAFETY: the region is region.len bytes of memory we own; no request is in flight.
        let bytes = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, region.len) };
        for chunk in bytes.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = x.to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    let label = opts.label.as_deref().unwrap_or("");
    let human = |line: String| {
        if opts.json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    };
    human(header(opts, capacity, working_set));
    human(format!(
        "{:<18} {:>3} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "workload", "q", "IOPS", "MiB/s", "mean_us", "p50_us", "p99_us", "p99.9_us"
    ));
    for w in &opts.workloads {
        let s = run_workload(
            &mut queues,
            region.addr,
            per_queue_buf,
            w,
            working_set,
            opts,
        )
        .map_err(|e| format!("{}: {e}", w.name))?;
        human(format!(
            "{:<18} {:>3} {:>10.0} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
            w.name, opts.queues, s.iops, s.mib_s, s.mean_us, s.p50_us, s.p99_us, s.p999_us
        ));
        if opts.json {
            println!(
                "{{\"label\":{},\"workload\":{},\"op\":\"{}\",\"pattern\":\"{}\",\"block_size\":{},\
                 \"queue_depth\":{},\"queues\":{},\"seconds\":{},\"ios\":{},\"iops\":{},\
                 \"mib_s\":{},\"lat_mean_us\":{},\"lat_p50_us\":{},\"lat_p99_us\":{},\
                 \"lat_p999_us\":{},\"lat_max_us\":{}}}",
                json_str(label),
                json_str(w.name),
                if w.op == Op::Read { "read" } else { "write" },
                if w.pattern == Pattern::Random { "random" } else { "sequential" },
                w.block_size,
                w.queue_depth,
                opts.queues,
                json_num(s.seconds),
                s.ios,
                json_num(s.iops),
                json_num(s.mib_s),
                json_num(s.mean_us),
                json_num(s.p50_us),
                json_num(s.p99_us),
                json_num(s.p999_us),
                json_num(s.max_us),
            );
        }
    }
    // Dropping the queues before the Blkio instance disconnects cleanly.
    drop(queues);
    Ok(())
}

fn main() -> ExitCode {
    let opts = match parse_args(std::env::args().skip(1)) {
        Ok(Parse::Run(o)) => o,
        Ok(Parse::Exit(code)) => return code,
        Err(e) => {
            eprintln!("blkbench: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blkbench: error: {e}");
            ExitCode::FAILURE
        }
    }
}
