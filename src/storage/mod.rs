//! Storage behind the virtio-blk device: one small trait, [`BlockDevice`], and its
//! implementations.
//!
//! The data plane hands the storage *guest* buffers ([`GuestSlice`]) so that a raw image can
//! `preadv`/`pwritev` straight to and from guest RAM. Devices that need to observe or copy the
//! data (the replication primary, the secondary's layered disk) work on host buffers and get the
//! guest-buffer methods for free through the default bounce implementations.
//!
//! - [`change`]: [`Change`], the one type of a disk modification along the whole data path;
//! - [`raw`]: [`RawImage`], a file or block device (optionally O_DIRECT);
//! - [`uring`]: an io_uring bound to a raw image, for the vhost-user `uring` I/O engine;
//! - [`fallocate`]: hole punching and range zeroing for any file-backed layer;
//! - `mem`: `MemDisk`, a RAM disk for unit tests (test builds only);
//! - [`durable`]: [`durable::Media`], the seam every piece of power-loss-critical state goes
//!   through, and its production implementation over `std::fs`;
//! - [`sim`]: [`sim::SimMedia`], a simulated disk that loses unsynced writes on a power cut.

pub mod change;
pub mod durable;
pub mod fallocate;
#[cfg(test)]
pub(crate) mod mem;
pub mod raw;
pub mod sim;
pub mod uring;

use std::io;

use vhost_user_backend::bitmap::BitmapMmapRegion;
use vm_memory::VolatileSlice;

pub use change::{Change, ChangeData};
#[cfg(test)]
pub(crate) use mem::MemDisk;
pub use raw::{RawImage, RawImageOptions};

/// A piece of guest memory, as the data plane sees it. Writes through it are logged in the
/// dirty-page bitmap QEMU uses for migration and COLO checkpoints.
pub type GuestSlice<'a> = VolatileSlice<'a, BitmapMmapRegion>;

/// Guest memory as the vhost-user backend maps it, with the dirty-page log bitmap.
pub(crate) type GuestMem = vm_memory::GuestMemoryMmap<BitmapMmapRegion>;

/// Sector size of the virtio-blk protocol (offsets in requests are in these units).
pub(crate) const SECTOR_SIZE: u64 = 512;

/// A byte-addressed block device.
///
/// All offsets and lengths are in bytes. Implementations are shared between the queue worker
/// threads and must be internally synchronised.
pub trait BlockDevice: Send + Sync {
    /// Size of the device in bytes.
    fn capacity(&self) -> u64;

    /// Reads exactly `buf.len()` bytes at `offset` into a host buffer.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;

    /// Tells the device the range is no longer needed. Its content afterwards is unspecified
    /// but stable (this implementation reads zeros back on a raw image).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Makes the range read back as zeros. With `unmap` the device may deallocate it.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;

    /// Reads into guest memory. The default bounces through a host buffer.
    fn read_to_guest(&self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        let mut tmp = vec![0u8; total_len(bufs)];
        self.read_at(&mut tmp, offset)?;
        let mut pos = 0;
        for b in bufs {
            b.copy_from(&tmp[pos..pos + b.len()]);
            pos += b.len();
        }
        Ok(())
    }

    /// Writes from guest memory. The default bounces through a host buffer.
    fn write_from_guest(&self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        let tmp = gather(bufs);
        self.write_at(&tmp, offset)
    }

    /// The plain raw image this device is, if it is one: the data plane then may run its reads,
    /// writes and flushes on the image's descriptor itself (io_uring) instead of calling the
    /// methods above. Devices that observe or transform I/O (replication, layers) return `None`.
    fn as_raw_image(&self) -> Option<&RawImage> {
        None
    }
}

/// Total length of a list of guest buffers.
pub(crate) fn total_len(bufs: &[GuestSlice<'_>]) -> usize {
    bufs.iter().map(|b| b.len()).sum()
}

/// Copies a list of guest buffers into one host buffer.
pub(crate) fn gather(bufs: &[GuestSlice<'_>]) -> Vec<u8> {
    let len = total_len(bufs);
    // Copied straight into the new buffer's capacity: zero-filling it first would cost as
    // much as the copy (a 1 MiB write is one memset of 1 MiB more).
    let mut out = Vec::<u8>::with_capacity(len);
    // SAFETY: `out` owns `len` bytes of allocated, unaliased capacity at this address, which
    // outlives `dst` (dropped at the end of this block, before `out` is touched again).
    let dst = unsafe { vm_memory::VolatileSlice::new(out.as_mut_ptr(), len) };
    let mut written = 0;
    for b in bufs {
        // `total_len` summed these lengths, so every subslice is in range.
        let Ok(d) = dst.subslice(written, b.len()) else {
            break;
        };
        b.copy_to_volatile_slice(d);
        written += b.len();
    }
    // SAFETY: the loop wrote bytes 0..written (its subslices are consecutive).
    unsafe { out.set_len(written) };
    // Only if a length did not add up (it does): never hand out uninitialised bytes.
    out.resize(len, 0);
    out
}

/// Checks that `[offset, offset + len)` lies inside a device of `capacity` bytes.
pub(crate) fn check_range(capacity: u64, offset: u64, len: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range {offset}+{len} is beyond the end of the device ({capacity} bytes)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    #[test]
    fn gather_concatenates_the_guest_buffers_in_order() {
        // Two regions, so one buffer is cut in two slices at the boundary.
        let mem: GuestMem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x2000),
            (GuestAddress(0x2000), 0x2000),
        ])
        .unwrap();
        let data: Vec<u8> = (0..0x4000u32).map(|i| (i * 31 + 7) as u8).collect();
        mem.write_slice(&data, GuestAddress(0)).unwrap();
        let bufs: Vec<GuestSlice<'_>> = [(0x3000u64, 0x800usize), (0x100, 0x1f80), (0x40, 1)]
            .iter()
            .flat_map(|&(a, l)| mem.get_slices(GuestAddress(a), l))
            .map(|s| s.unwrap())
            .collect();
        assert_eq!(bufs.len(), 4, "the middle buffer spans both regions");
        let mut want = data[0x3000..0x3800].to_vec();
        want.extend_from_slice(&data[0x100..0x2080]);
        want.push(data[0x40]);
        assert_eq!(gather(&bufs), want);
        assert!(gather(&[]).is_empty());
    }
}
