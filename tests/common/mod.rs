//! Test support: start the real `colo-blk` binary and drive it with a real vhost-user-blk
//! client (libblkio's pure-Rust `blkio` crate).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use blkio::{Blkio, Blkioq, MemoryRegion, ReqFlags};

/// How long to wait for a child process to announce something before the test fails.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `colo-blk` process. Killed on drop.
pub struct Backend {
    pub child: Child,
    pub socket: PathBuf,
    lines: mpsc::Receiver<String>,
}

impl Backend {
    /// Starts `colo-blk` with `args` and waits until its log says `ready_marker`.
    pub fn start_with(args: &[&str], socket: &Path, ready_marker: &str) -> Backend {
        let mut child = Command::new(env!("CARGO_BIN_EXE_colo-blk"))
            .args(args)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn colo-blk");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[colo-blk] {line}");
                let _ = tx.send(line);
            }
        });
        let mut b = Backend {
            child,
            socket: socket.to_path_buf(),
            lines: rx,
        };
        b.wait_for_log(ready_marker);
        b
    }

    /// Starts a standalone backend serving `image` on `socket`.
    pub fn start(socket: &Path, image: &Path, extra: &[&str]) -> Backend {
        let mut args = vec![
            "--socket".to_string(),
            socket.display().to_string(),
            "--image".to_string(),
            image.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        Backend::start_with(&refs, socket, "listening on")
    }

    /// Blocks until a log line contains `marker`; panics after [`STARTUP_TIMEOUT`].
    pub fn wait_for_log(&mut self, marker: &str) -> String {
        loop {
            match self.lines.recv_timeout(STARTUP_TIMEOUT) {
                Ok(line) if line.contains(marker) => return line,
                Ok(_) => {}
                Err(e) => panic!("colo-blk never logged {marker:?}: {e}"),
            }
        }
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) with a pid we own; no memory involved.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let st = self.child.wait().expect("wait");
        std::mem::forget(self);
        st
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A connected vhost-user-blk client with one shared I/O buffer.
pub struct Client {
    pub blkio: Blkio,
    pub queues: Vec<Blkioq>,
    pub buf: MemoryRegion,
}

/// Size of the client's I/O buffer.
pub const CLIENT_BUF: usize = 8 << 20;

impl Client {
    pub fn connect(socket: &Path, num_queues: usize) -> Result<Client, blkio::Error> {
        Client::connect_with(socket, num_queues, false)
    }

    /// Connects; a read-only device accepts only read-only clients.
    pub fn connect_with(
        socket: &Path,
        num_queues: usize,
        read_only: bool,
    ) -> Result<Client, blkio::Error> {
        let mut b = Blkio::new("virtio-blk-vhost-user")?;
        b.set_str("path", &socket.display().to_string())?;
        if read_only {
            b.set_bool("read-only", true)?;
        }
        b.connect()?;
        b.set_i32("num-queues", num_queues as i32)?;
        let out = b.start()?;
        let buf = b.alloc_mem_region(CLIENT_BUF)?;
        b.map_mem_region(&buf)?;
        Ok(Client {
            blkio: b,
            queues: out.queues,
            buf,
        })
    }

    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").expect("capacity")
    }

    fn buf_ptr(&self, off: usize) -> *mut u8 {
        assert!(off < CLIENT_BUF);
        (self.buf.addr + off) as *mut u8
    }

    fn wait_one(&mut self, q: usize) -> i32 {
        let mut c = [MaybeUninit::<blkio::Completion>::uninit()];
        let n = self.queues[q].do_io(&mut c, 1, None, None).expect("do_io");
        assert_eq!(n, 1);
        // SAFETY: do_io initialised the first n completions.
        unsafe { c[0].assume_init_ref() }.ret
    }

    /// Writes `data` at `offset` through queue `q`; returns blkio's result (0 or -errno).
    pub fn write(&mut self, q: usize, offset: u64, data: &[u8]) -> i32 {
        assert!(data.len() <= CLIENT_BUF);
        // SAFETY: the region is CLIENT_BUF bytes of memory we own and nothing else uses now.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.buf_ptr(0), data.len()) };
        let p = self.buf_ptr(0);
        self.queues[q].write(offset, p, data.len(), 0, ReqFlags::empty());
        self.wait_one(q)
    }

    /// Reads `len` bytes at `offset` through queue `q`.
    pub fn read(&mut self, q: usize, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
        assert!(len <= CLIENT_BUF);
        let p = self.buf_ptr(0);
        self.queues[q].read(offset, p, len, 0, ReqFlags::empty());
        let r = self.wait_one(q);
        if r != 0 {
            return Err(r);
        }
        let mut out = vec![0u8; len];
        // SAFETY: as in write(); the device filled len bytes.
        unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), len) };
        Ok(out)
    }

    pub fn flush(&mut self, q: usize) -> i32 {
        self.queues[q].flush(0, ReqFlags::empty());
        self.wait_one(q)
    }

    pub fn discard(&mut self, q: usize, offset: u64, len: u64) -> i32 {
        self.queues[q].discard(offset, len, 0, ReqFlags::empty());
        self.wait_one(q)
    }

    pub fn write_zeroes(&mut self, q: usize, offset: u64, len: u64, unmap: bool) -> i32 {
        let flags = if unmap {
            ReqFlags::empty()
        } else {
            ReqFlags::NO_UNMAP
        };
        self.queues[q].write_zeroes(offset, len, 0, flags);
        self.wait_one(q)
    }
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A fresh temporary directory for one test.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}
