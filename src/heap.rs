//! How the process's allocator treats the large buffers of the data path.
//!
//! A replicated write lives in a heap buffer from the queue worker's gather until the link
//! writer has sent it and the secondary acknowledged it; on the secondary, a frame's payload
//! lives from the socket read until it is applied. These buffers are up to
//! [`MAX_PAYLOAD`](crate::replication::protocol::MAX_PAYLOAD) (4 MiB) each, and a window's
//! worth of them is in flight at once.
//!
//! glibc's malloc serves an allocation above its mmap threshold with a fresh `mmap` and gives
//! freed memory at the top of a heap back to the kernel once more than its trim threshold is
//! free. Both thresholds start low (128 KiB) and only grow to twice the largest buffer freed.
//! With many buffers in flight, every burst of frees returned memory to the kernel, and the
//! next buffers faulted zeroed pages in again: 8 % of the primary's and 13 % of the
//! secondary's CPU samples during 1 MiB sequential writes (`exc_page_fault`,
//! `clear_page_erms`, `unmap_page_range`; docs/performance.md).
//!
//! [`keep_freed_buffers`] raises both thresholds once, at start, so that freed buffers stay
//! in the process and are reused. The memory kept is bounded by the most the process ever had
//! allocated at once, which the replication window and the queues' depths bound.

/// glibc's largest mmap threshold on 64-bit hosts (`HEAP_MAX_SIZE / 2`): every data-path
/// buffer is below it.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;

/// Free memory at the top of a heap is given back to the kernel only beyond this.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 256 << 20;

/// Keeps freed data-path buffers in the process for reuse (see the module comment). Call it
/// once, before the threads that allocate buffers start. Returns false where the allocator
/// could not be tuned (not glibc, or glibc refused); the process works either way, only
/// slower.
pub fn keep_freed_buffers() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes two of glibc's malloc parameters; it takes no pointers
        // and is safe to call at any time.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// Page faults this thread has taken so far.
    fn minor_faults() -> i64 {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage writes one rusage into the pointer, which is valid for it.
        let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()) };
        assert_eq!(rc, 0);
        // SAFETY: getrusage succeeded, so it initialised the struct (zeroed before anyway).
        unsafe { usage.assume_init() }.ru_minflt
    }

    /// Allocates `n` buffers of 1 MiB, writes every page of each, frees them all.
    fn burst(n: usize) {
        let bufs: Vec<Vec<u8>> = (0..n)
            .map(|i| {
                let mut b = Vec::with_capacity(1 << 20);
                b.resize(1 << 20, i as u8);
                b
            })
            .collect();
        assert!(bufs.iter().enumerate().all(|(i, b)| b[4095] == i as u8));
    }

    #[test]
    fn freed_buffers_are_reused_without_faulting_pages_in_again() {
        assert!(keep_freed_buffers());
        // A window's worth of 1 MiB frames in flight, freed, then allocated again. Without
        // the tuning each burst after the first faults in 32 MiB (8192 pages) again.
        burst(32);
        let before = minor_faults();
        for _ in 0..4 {
            burst(32);
        }
        let faults = minor_faults() - before;
        assert!(faults < 1024, "{faults} page faults for reused buffers");
    }
}
