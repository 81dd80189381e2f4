//! `fallocate(2)` on image and layer files: punching holes and zeroing ranges, through rustix.
//!
//! [`RawImage`](super::RawImage) uses these for discard and write-zeroes; they are the one place
//! the crate calls `fallocate`, so that other file-backed layers can share them. Both keep the
//! file size (`FALLOC_FL_KEEP_SIZE`) and treat an empty range as a no-op (the kernel would
//! refuse it with `EINVAL`). A file system that cannot do the operation fails with an error for
//! which [`is_unsupported`] is true; callers then write zeros themselves.

use std::fs::File;
use std::io;

use rustix::fs::{fallocate, FallocateFlags};
use rustix::io::Errno;

/// Deallocates `[offset, offset + len)` of `file`: the range reads back as zeros and its blocks
/// are freed (`FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`).
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    run(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    )
}

/// Makes `[offset, offset + len)` of `file` read back as zeros, keeping it allocated
/// (`FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE`).
pub fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    run(
        file,
        FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    )
}

/// Whether `e` says the file (system) does not support the `fallocate` mode asked for.
pub fn is_unsupported(e: &io::Error) -> bool {
    e.raw_os_error() == Some(Errno::OPNOTSUPP.raw_os_error())
}

fn run(file: &File, mode: FallocateFlags, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    fallocate(file, mode, offset, len).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn holes_and_zeroed_ranges_read_back_as_zero_and_keep_the_size() {
        let file = tempfile::tempfile().unwrap();
        file.write_all_at(&[0xaa; 65536], 0).unwrap();
        let ok = |r: io::Result<()>| match r {
            Err(e) if is_unsupported(&e) => false,
            r => {
                r.unwrap();
                true
            }
        };
        let punched = ok(punch_hole(&file, 4096, 8192));
        let zeroed = ok(zero_range(&file, 32768, 4096));
        punch_hole(&file, 0, 0).unwrap();
        zero_range(&file, 0, 0).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 65536);
        let mut back = vec![0u8; 65536];
        file.read_exact_at(&mut back, 0).unwrap();
        for (i, &b) in back.iter().enumerate() {
            let zero =
                (punched && (4096..12288).contains(&i)) || (zeroed && (32768..36864).contains(&i));
            assert_eq!(b, if zero { 0 } else { 0xaa }, "byte {i}");
        }
    }
}
