//! An io_uring instance bound to one [`RawImage`]: the queue-side half of the `uring` I/O engine.
//!
//! One [`ImageRing`] per virtqueue. The queue's worker pushes vectored reads and writes (iovecs
//! pointing straight into guest memory, as
//! [`BlockDevice::read_to_guest`](super::BlockDevice::read_to_guest) uses them) and `fdatasync`s,
//! submits them with one `io_uring_enter` per batch and reaps completions by `user_data`. The
//! image's descriptor is a registered file when the kernel allows it (saves the per-request file
//! reference counting). An eventfd is registered with the ring so that the
//! worker's epoll loop wakes up for completions; it can be switched off while the worker is busy
//! anyway (`IORING_CQ_EVENTFD_DISABLED`), so completions that arrive inline with the submission
//! cost no wake-up.
//!
//! Discard and write-zeroes are not here: they keep the synchronous path
//! ([`super::fallocate`], with the zero-writing fallback for block devices and file systems
//! without hole punching), which io_uring's `IORING_OP_FALLOCATE` would only run on an io-wq
//! thread anyway.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};

use io_uring::{opcode, squeue, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use super::RawImage;

/// Most iovecs one vectored request takes (Linux UIO_MAXIOV).
pub use super::raw::MAX_IOV;

/// Which engine runs a queue's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoEngine {
    /// io_uring when the kernel allows it and the device is a plain raw image, else threads.
    Auto,
    /// io_uring (start fails when the kernel refuses it).
    Uring,
    /// The synchronous path plus the I/O thread pool.
    Threads,
}

/// Checks that this kernel (and its seccomp/sysctl policy) lets the process use io_uring with the
/// operations the engine needs.
pub fn probe() -> io::Result<()> {
    let ring = IoUring::new(2)?;
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for (code, name) in [
        (opcode::Readv::CODE, "READV"),
        (opcode::Writev::CODE, "WRITEV"),
        (opcode::Fsync::CODE, "FSYNC"),
    ] {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring has no {name}"),
            ));
        }
    }
    if !ring.params().is_feature_nodrop() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "io_uring lacks IORING_FEAT_NODROP (Linux < 5.5)",
        ));
    }
    Ok(())
}

/// The image's descriptor as the SQEs name it.
#[derive(Debug, Clone, Copy)]
enum Target {
    Fixed(types::Fixed),
    Fd(types::Fd),
}

/// One io_uring for one queue, bound to one image.
pub struct ImageRing {
    ring: IoUring,
    target: Target,
    eventfd: EventFd,
    /// Entries pushed but not yet submitted.
    queued: usize,
}

impl std::fmt::Debug for ImageRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageRing")
            .field("target", &self.target)
            .field("queued", &self.queued)
            .finish()
    }
}

impl ImageRing {
    /// A ring of `entries` submission entries (the completion ring is twice that; more
    /// completions than that are kept by the kernel, IORING_FEAT_NODROP) for `image`.
    pub fn new(image: &RawImage, entries: u32) -> io::Result<Self> {
        let mut ring = IoUring::new(entries.clamp(8, 4096).next_power_of_two())?;
        let fd = image.as_raw_fd();
        let target = match ring.submitter().register_files(&[fd]) {
            Ok(()) => Target::Fixed(types::Fixed(0)),
            Err(e) => {
                log::debug!(
                    "io_uring: cannot register the image's descriptor ({e}); using it plainly"
                );
                Target::Fd(types::Fd(fd))
            }
        };
        let eventfd = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        // Off until the worker goes back to its epoll loop with requests in flight.
        ring.completion().disable_eventfd();
        Ok(ImageRing {
            ring,
            target,
            eventfd,
            queued: 0,
        })
    }

    /// Whether the image's descriptor is a registered file.
    pub fn fixed_file(&self) -> bool {
        matches!(self.target, Target::Fixed(_))
    }

    /// The eventfd the kernel signals for completions (when enabled).
    pub fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// Clears the eventfd's counter.
    pub fn consume_eventfd(&self) {
        // EAGAIN: nothing to consume.
        let _ = self.eventfd.read();
    }

    /// Switches the completion eventfd on or off.
    pub fn set_eventfd(&mut self, on: bool) {
        let cq = self.ring.completion();
        if on {
            cq.enable_eventfd();
        } else {
            cq.disable_eventfd();
        }
    }

    fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the entry's buffers are valid until its completion (the callers' contract
            // on `push_readv`/`push_writev`); an fsync references no memory.
            let pushed = unsafe { self.ring.submission().push(&entry) }.is_ok();
            if pushed {
                self.queued += 1;
                return Ok(());
            }
            // Submission ring full: hand what is queued to the kernel and retry.
            self.submit(0)?;
        }
    }

    /// Queues a `preadv` of `iov_len` iovecs at `iov` into the file at `offset`.
    ///
    /// # Safety
    ///
    /// The iovec array and every buffer it points to must stay valid and unmoved until the
    /// completion carrying `user_data` has been reaped.
    ///
    /// With `punt`, the kernel runs the read on one of its io-wq threads right away
    /// (`IOSQE_ASYNC`) instead of first trying it inline in `io_uring_enter`: large page-cache
    /// reads are memory copies, and this spreads them over the CPUs instead of doing them all on
    /// the submitting thread.
    pub unsafe fn push_readv(
        &mut self,
        iov: *const libc::iovec,
        iov_len: u32,
        offset: u64,
        user_data: u64,
        punt: bool,
    ) -> io::Result<()> {
        let e = match self.target {
            Target::Fixed(f) => opcode::Readv::new(f, iov, iov_len).offset(offset).build(),
            Target::Fd(f) => opcode::Readv::new(f, iov, iov_len).offset(offset).build(),
        };
        let e = if punt {
            e.flags(squeue::Flags::ASYNC)
        } else {
            e
        };
        self.push(e.user_data(user_data))
    }

    /// Queues a `pwritev` of `iov_len` iovecs at `iov` to the file at `offset`.
    ///
    /// # Safety
    ///
    /// As for [`ImageRing::push_readv`].
    pub unsafe fn push_writev(
        &mut self,
        iov: *const libc::iovec,
        iov_len: u32,
        offset: u64,
        user_data: u64,
    ) -> io::Result<()> {
        let e = match self.target {
            Target::Fixed(f) => opcode::Writev::new(f, iov, iov_len).offset(offset).build(),
            Target::Fd(f) => opcode::Writev::new(f, iov, iov_len).offset(offset).build(),
        };
        self.push(e.user_data(user_data))
    }

    /// Queues an `fdatasync` of the file.
    pub fn push_fdatasync(&mut self, user_data: u64) -> io::Result<()> {
        let flags = types::FsyncFlags::DATASYNC;
        let e = match self.target {
            Target::Fixed(f) => opcode::Fsync::new(f).flags(flags).build(),
            Target::Fd(f) => opcode::Fsync::new(f).flags(flags).build(),
        };
        self.push(e.user_data(user_data))
    }

    /// Submits every queued entry (one `io_uring_enter`, none when nothing is queued and
    /// `wait` is 0) and waits for at least `wait` completions.
    pub fn submit(&mut self, wait: usize) -> io::Result<()> {
        if self.queued == 0 && wait == 0 {
            return Ok(());
        }
        loop {
            match self.ring.submitter().submit_and_wait(wait) {
                Ok(_) => {
                    self.queued = self.ring.submission().len();
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                // Completion ring (and the kernel's overflow list) full: the caller reaps.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    self.queued = self.ring.submission().len();
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Calls `f(user_data, result)` for every completion available now; returns how many.
    pub fn reap(&mut self, mut f: impl FnMut(u64, i32)) -> usize {
        let mut n = 0;
        let mut cq = self.ring.completion();
        loop {
            for cqe in &mut cq {
                f(cqe.user_data(), cqe.result());
                n += 1;
            }
            cq.sync();
            if cq.is_empty() {
                return n;
            }
        }
    }

    /// Whether completions are waiting to be reaped.
    pub fn has_completions(&mut self) -> bool {
        let mut cq = self.ring.completion();
        cq.sync();
        !cq.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{BlockDevice, RawImageOptions};

    fn image(dir: &tempfile::TempDir) -> RawImage {
        RawImage::open(&RawImageOptions {
            path: dir.path().join("disk.img"),
            read_only: false,
            direct: false,
            create_size: Some(1 << 20),
        })
        .unwrap()
    }

    #[test]
    fn vectored_read_write_and_fdatasync_through_the_ring() {
        if let Err(e) = probe() {
            eprintln!("SKIPPED: io_uring unavailable here: {e}");
            assert!(
                std::env::var_os("CI").is_none(),
                "io_uring must be available in CI"
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = image(&dir);
        let mut ring = ImageRing::new(&img, 8).unwrap();
        let a = vec![0x5au8; 4096];
        let b = vec![0xa5u8; 512];
        let iov = [
            libc::iovec {
                iov_base: a.as_ptr() as *mut libc::c_void,
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            },
        ];
        // SAFETY: `iov`, `a` and `b` outlive the completions reaped below.
        unsafe { ring.push_writev(iov.as_ptr(), 2, 8192, 7).unwrap() };
        ring.submit(1).unwrap();
        let mut got = Vec::new();
        ring.reap(|u, r| got.push((u, r)));
        assert_eq!(got, vec![(7, 4608)]);
        ring.push_fdatasync(8).unwrap();
        ring.submit(1).unwrap();
        got.clear();
        ring.reap(|u, r| got.push((u, r)));
        assert_eq!(got, vec![(8, 0)]);

        let mut back = vec![0u8; 4608];
        let riov = [libc::iovec {
            iov_base: back.as_mut_ptr() as *mut libc::c_void,
            iov_len: back.len(),
        }];
        // SAFETY: `riov` and `back` outlive the completion reaped below.
        unsafe { ring.push_readv(riov.as_ptr(), 1, 8192, 9, false).unwrap() };
        ring.submit(1).unwrap();
        got.clear();
        ring.reap(|u, r| got.push((u, r)));
        assert_eq!(got, vec![(9, 4608)]);
        assert!(back[..4096].iter().all(|&x| x == 0x5a));
        assert!(back[4096..].iter().all(|&x| x == 0xa5));
        let mut sync = vec![0u8; 4608];
        img.read_at(&mut sync, 8192).unwrap();
        assert_eq!(sync, back);
    }
}
