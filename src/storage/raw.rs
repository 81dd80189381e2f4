//! A raw image file (or block device) as a [`BlockDevice`].
//!
//! Guest buffers go straight to `preadv`/`pwritev` when they satisfy the alignment the file needs
//! (always, without O_DIRECT); otherwise the request bounces through an aligned host buffer.
//! Discard and write-zeroes use [`super::fallocate`] on files and fall back to writing zeros on
//! block devices and on file systems that cannot punch holes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;

use vm_memory::bitmap::Bitmap;

use super::fallocate::{is_unsupported, punch_hole, zero_range};
use super::{check_range, total_len, BlockDevice, GuestSlice};

/// Alignment used for O_DIRECT buffers, offsets and lengths. 4 KiB satisfies every logical block
/// size in use (512 B and 4 KiB).
const DIRECT_ALIGN: usize = 4096;
/// Most iovecs one `preadv`/`pwritev` call takes (Linux UIO_MAXIOV).
pub const MAX_IOV: usize = 1024;

/// How to open a raw image.
#[derive(Debug, Clone)]
pub struct RawImageOptions {
    pub path: PathBuf,
    pub read_only: bool,
    /// Open with O_DIRECT (bypass the host page cache).
    pub direct: bool,
    /// Create the image with this size (bytes) when it does not exist.
    pub create_size: Option<u64>,
}

/// A raw disk image.
#[derive(Debug)]
pub struct RawImage {
    file: File,
    capacity: u64,
    direct: bool,
    read_only: bool,
    is_block_device: bool,
}

impl RawImage {
    /// Opens (and when asked, creates) an image.
    pub fn open(opts: &RawImageOptions) -> io::Result<Self> {
        if let Some(size) = opts.create_size {
            if !opts.path.exists() {
                if opts.read_only {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "cannot create a read-only image",
                    ));
                }
                let created = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&opts.path)
                    .and_then(|f| f.set_len(size));
                match created {
                    Ok(()) => log::info!("created {} ({} bytes)", opts.path.display(), size),
                    // Someone else created it meanwhile: open theirs below.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => {
                        return Err(io::Error::new(
                            e.kind(),
                            format!("cannot create {}: {e}", opts.path.display()),
                        ))
                    }
                }
            }
        }
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        if opts.direct {
            oo.custom_flags(libc::O_DIRECT);
        }
        let file = oo.open(&opts.path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot open {}: {e}", opts.path.display()),
            )
        })?;
        let meta = file.metadata()?;
        let is_block_device = meta.file_type().is_block_device();
        let capacity = if is_block_device {
            block_device_size(&file)?
        } else {
            meta.len()
        };
        // --size creates a missing image; on an existing one it must agree, or the operator
        // serves a disk of another size than the one asked for without knowing it.
        if let Some(size) = opts.create_size.filter(|&s| s != capacity) {
            let what = if is_block_device {
                "block device"
            } else {
                "image"
            };
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "--size {} ({size} bytes) disagrees with the existing {what} {}, which is {} \
                     ({capacity} bytes): --size only creates a missing image; give its size or \
                     leave --size out (resize the {what} yourself to change it)",
                    crate::status::bytes(size),
                    opts.path.display(),
                    crate::status::bytes(capacity),
                ),
            ));
        }
        Ok(RawImage {
            file,
            capacity,
            direct: opts.direct,
            read_only: opts.read_only,
            is_block_device,
        })
    }

    /// A second, read-only descriptor of the same file for reads at scattered offsets of
    /// exactly the size needed (the secondary's copy-before-write of a cluster's original): the
    /// kernel is told not to read ahead on it (`POSIX_FADV_RANDOM`), which it otherwise does
    /// for every miss, zero-filling or reading pages nobody asked for. Readahead state is per
    /// open file, so the image's own descriptor keeps it for sequential guest reads. `None`
    /// with O_DIRECT (no readahead to avoid) or when the file cannot be reopened.
    pub(crate) fn random_reader(&self) -> Option<File> {
        if self.direct {
            return None;
        }
        let path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
        let file = File::open(path).ok()?;
        // SAFETY: posix_fadvise only reads its integer arguments; the descriptor is open.
        let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
        if r != 0 {
            log::debug!("posix_fadvise(RANDOM): {}", io::Error::from_raw_os_error(r));
        }
        Some(file)
    }

    /// Where data may begin in `file` at or after `pos`, at most `end`: `end` when all of
    /// `[pos, end)` is a hole (it reads back as zeros without anything being read). Asks the
    /// file system (`SEEK_DATA`); where it cannot tell (an error, a file system without hole
    /// tracking, which reports everything as data), the answer is `pos`, which only costs a read.
    pub(crate) fn data_from(file: &File, pos: u64, end: u64) -> u64 {
        match seek(file, pos, libc::SEEK_DATA) {
            Ok(d) => d.clamp(pos, end),
            // No data at or after `pos`.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
            Err(_) => pos,
        }
    }

    /// Where the data at `pos` ends (`SEEK_HOLE`), at most `end`; `end` where the file system
    /// cannot tell (so the caller reads all of it).
    pub(crate) fn hole_from(file: &File, pos: u64, end: u64) -> u64 {
        match seek(file, pos, libc::SEEK_HOLE) {
            Ok(h) => h.clamp(pos, end),
            Err(_) => end,
        }
    }

    /// Whether a transfer of `len` bytes at `offset` through buffers `addrs` (address, length)
    /// can go to the file as it is (always without O_DIRECT; with it, everything 4 KiB aligned).
    pub(crate) fn aligned(
        &self,
        offset: u64,
        len: usize,
        addrs: impl Iterator<Item = (usize, usize)>,
    ) -> bool {
        if !self.direct {
            return true;
        }
        let a = DIRECT_ALIGN;
        if offset % a as u64 != 0 || len % a != 0 {
            return false;
        }
        let mut ok = true;
        for (ptr, l) in addrs {
            ok &= ptr % a == 0 && l % a == 0;
        }
        ok
    }

    /// Runs `op` on an aligned bounce buffer covering `[offset, offset+len)` rounded out to the
    /// O_DIRECT alignment; used for unaligned requests on O_DIRECT images.
    fn bounce_read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let a = DIRECT_ALIGN as u64;
        let start = offset / a * a;
        let end = (offset + buf.len() as u64).div_ceil(a) * a;
        let mut tmp = AlignedBuf::new((end - start) as usize);
        pread_all(&self.file, tmp.as_mut_slice(), start)?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&tmp.as_slice()[skip..skip + buf.len()]);
        Ok(())
    }

    fn bounce_write(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let a = DIRECT_ALIGN as u64;
        let start = offset / a * a;
        let end = (offset + buf.len() as u64).div_ceil(a) * a;
        let mut tmp = AlignedBuf::new((end - start) as usize);
        let skip = (offset - start) as usize;
        if skip != 0 || buf.len() % DIRECT_ALIGN != 0 {
            // Read-modify-write of the partial blocks at the edges.
            let read_end = end.min(self.capacity.div_ceil(a) * a);
            let n = (read_end - start) as usize;
            pread_all(&self.file, &mut tmp.as_mut_slice()[..n], start)?;
        }
        tmp.as_mut_slice()[skip..skip + buf.len()].copy_from_slice(buf);
        pwrite_all(&self.file, tmp.as_slice(), start)
    }

    fn write_zero_buffers(&self, mut offset: u64, len: u64) -> io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = AlignedBuf::new(CHUNK as usize);
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(CHUNK) as usize;
            self.write_at(&zeros.as_slice()[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    /// Whether the image was opened with O_DIRECT.
    pub(crate) fn is_direct(&self) -> bool {
        self.direct
    }

    /// Whether the image was opened read-only.
    pub(crate) fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "image is read-only",
            ));
        }
        Ok(())
    }
}

impl AsRawFd for RawImage {
    fn as_raw_fd(&self) -> std::os::unix::io::RawFd {
        self.file.as_raw_fd()
    }
}

impl BlockDevice for RawImage {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn as_raw_image(&self) -> Option<&RawImage> {
        Some(self)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.capacity, offset, buf.len() as u64)?;
        let addr = buf.as_ptr() as usize;
        if self.aligned(offset, buf.len(), std::iter::once((addr, buf.len()))) {
            pread_all(&self.file, buf, offset)
        } else {
            self.bounce_read(buf, offset)
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_writable()?;
        check_range(self.capacity, offset, buf.len() as u64)?;
        let addr = buf.as_ptr() as usize;
        if self.aligned(offset, buf.len(), std::iter::once((addr, buf.len()))) {
            pwrite_all(&self.file, buf, offset)
        } else {
            self.bounce_write(buf, offset)
        }
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        check_range(self.capacity, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if self.is_block_device {
            return self.write_zero_buffers(offset, len);
        }
        match punch_hole(&self.file, offset, len) {
            Err(e) if is_unsupported(&e) => self.write_zero_buffers(offset, len),
            r => r,
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.check_writable()?;
        check_range(self.capacity, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if self.is_block_device {
            return self.write_zero_buffers(offset, len);
        }
        let r = if unmap {
            punch_hole(&self.file, offset, len)
        } else {
            zero_range(&self.file, offset, len)
        };
        match r {
            Err(e) if is_unsupported(&e) => self.write_zero_buffers(offset, len),
            r => r,
        }
    }

    fn read_to_guest(&self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        let len = total_len(bufs);
        check_range(self.capacity, offset, len as u64)?;
        if !self.aligned(
            offset,
            len,
            bufs.iter()
                .map(|b| (b.ptr_guard().as_ptr() as usize, b.len())),
        ) {
            let mut tmp = vec![0u8; len];
            self.read_at(&mut tmp, offset)?;
            let mut pos = 0;
            for b in bufs {
                b.copy_from(&tmp[pos..pos + b.len()]);
                pos += b.len();
            }
            return Ok(());
        }
        let guards: Vec<_> = bufs.iter().map(|b| b.ptr_guard_mut()).collect();
        let mut iov: Vec<libc::iovec> = guards
            .iter()
            .zip(bufs)
            .map(|(g, b)| libc::iovec {
                iov_base: g.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        let r = rw_vectored_all(&self.file, Dir::Read, &mut iov, offset);
        drop(guards);
        // The kernel wrote guest memory behind vm-memory's back: log it for migration/COLO.
        for b in bufs {
            b.bitmap().mark_dirty(0, b.len());
        }
        let done = r?;
        if done < len {
            // End of a file that shrank under us: the rest reads as zeros.
            zero_guest_tail(bufs, done)?;
        }
        Ok(())
    }

    fn write_from_guest(&self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        self.check_writable()?;
        let len = total_len(bufs);
        check_range(self.capacity, offset, len as u64)?;
        if !self.aligned(
            offset,
            len,
            bufs.iter()
                .map(|b| (b.ptr_guard().as_ptr() as usize, b.len())),
        ) {
            return self.write_at(&super::gather(bufs), offset);
        }
        let guards: Vec<_> = bufs.iter().map(|b| b.ptr_guard()).collect();
        let mut iov: Vec<libc::iovec> = guards
            .iter()
            .zip(bufs)
            .map(|(g, b)| libc::iovec {
                iov_base: g.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        rw_vectored_all(&self.file, Dir::Write, &mut iov, offset).map(drop)
    }
}

/// Zeros `bufs` from byte `from` (counted over the whole list) to the end.
fn zero_guest_tail(bufs: &[GuestSlice<'_>], mut from: usize) -> io::Result<()> {
    let zeros = vec![0u8; total_len(bufs).saturating_sub(from)];
    for b in bufs {
        if from >= b.len() {
            from -= b.len();
            continue;
        }
        let tail = b
            .subslice(from, b.len() - from)
            .map_err(|e| io::Error::other(e.to_string()))?;
        tail.copy_from(&zeros[..tail.len()]);
        from = 0;
    }
    Ok(())
}

/// Size in bytes of a block device.
fn block_device_size(file: &File) -> io::Result<u64> {
    // <linux/fs.h>: #define BLKGETSIZE64 _IOR(0x12, 114, size_t)
    vmm_sys_util::ioctl_ior_nr!(BLKGETSIZE64, 0x12, 114, libc::size_t);
    let mut size: u64 = 0;
    // SAFETY: `file` is an open descriptor, and BLKGETSIZE64 writes one u64 (whatever size_t in
    // its number says) through the pointer, which points to a live, exclusively borrowed u64.
    let r = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(file, BLKGETSIZE64(), &mut size) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

fn pread_all(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    while !buf.is_empty() {
        match file.read_at(buf, offset) {
            Ok(0) => {
                // Past the end of a file that shrank under us: reads as zeros.
                buf.fill(0);
                return Ok(());
            }
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn pwrite_all(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(buf, offset)
}

/// Drops the first `n` bytes from an iovec list after a short transfer.
fn advance_iov(iov: &mut Vec<libc::iovec>, mut n: usize) {
    let mut drop = 0;
    for v in iov.iter_mut() {
        if n >= v.iov_len {
            n -= v.iov_len;
            drop += 1;
        } else {
            // n < iov_len, so the new base stays inside the same buffer.
            v.iov_base = (v.iov_base as *mut u8).wrapping_add(n) as *mut libc::c_void;
            v.iov_len -= n;
            break;
        }
    }
    iov.drain(..drop);
}

/// Direction of a vectored transfer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Read,
    Write,
}

/// `preadv`/`pwritev` until every iovec is done, resuming after short transfers. Returns the
/// bytes transferred: all of them, except for a read that reaches the end of the file.
fn rw_vectored_all(
    file: &File,
    dir: Dir,
    iov: &mut Vec<libc::iovec>,
    mut offset: u64,
) -> io::Result<usize> {
    let mut done = 0;
    while !iov.is_empty() {
        let cnt = iov.len().min(MAX_IOV) as libc::c_int;
        // SAFETY: every iovec points to memory that stays mapped for the duration of the call
        // (the caller holds the guest memory guards) and is at least iov_len bytes long.
        let r = unsafe {
            match dir {
                Dir::Read => {
                    libc::preadv(file.as_raw_fd(), iov.as_ptr(), cnt, offset as libc::off_t)
                }
                Dir::Write => {
                    libc::pwritev(file.as_raw_fd(), iov.as_ptr(), cnt, offset as libc::off_t)
                }
            }
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            if dir == Dir::Write {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "pwritev wrote nothing",
                ));
            }
            // End of file.
            return Ok(done);
        }
        offset += r as u64;
        done += r as usize;
        advance_iov(iov, r as usize);
    }
    Ok(done)
}

/// A zeroed heap buffer aligned for O_DIRECT: an over-allocated `Vec` and the aligned window
/// inside it (at least [`DIRECT_ALIGN`] bytes).
struct AlignedBuf {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let len = len.max(DIRECT_ALIGN);
        let buf = vec![0u8; len + DIRECT_ALIGN];
        let misalign = buf.as_ptr() as usize % DIRECT_ALIGN;
        let start = (DIRECT_ALIGN - misalign) % DIRECT_ALIGN;
        AlignedBuf { buf, start, len }
    }
    fn as_slice(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

/// `lseek(2)` of `file` to `pos` with `whence`. Only used on descriptors that are read with
/// `pread` (the copy-before-write reader), so moving their file position does not matter.
fn seek(file: &File, pos: u64, whence: libc::c_int) -> io::Result<u64> {
    let pos = libc::off_t::try_from(pos).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek only takes integers; the descriptor is open for the borrow of `file`.
    let r = unsafe { libc::lseek(file.as_raw_fd(), pos, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(direct: bool, size: u64) -> (tempfile::TempDir, RawImage) {
        let dir = tempfile::tempdir().unwrap();
        let img = RawImage::open(&RawImageOptions {
            path: dir.path().join("disk.img"),
            read_only: false,
            direct,
            create_size: Some(size),
        })
        .unwrap();
        (dir, img)
    }

    #[test]
    fn a_size_that_disagrees_with_an_existing_image_is_an_error_naming_both() {
        let (dir, img) = image(false, 1 << 20);
        drop(img);
        let open = |size| {
            RawImage::open(&RawImageOptions {
                path: dir.path().join("disk.img"),
                read_only: false,
                direct: false,
                create_size: size,
            })
        };
        let e = open(Some(2 << 20)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let msg = e.to_string();
        assert!(msg.contains("--size 2.0 MiB (2097152 bytes)"), "{msg}");
        assert!(msg.contains("which is 1.0 MiB (1048576 bytes)"), "{msg}");
        // The same size, or none, opens it as it is.
        assert_eq!(open(Some(1 << 20)).unwrap().capacity(), 1 << 20);
        assert_eq!(open(None).unwrap().capacity(), 1 << 20);
    }

    #[test]
    fn random_reader_sees_what_the_image_wrote_and_none_with_o_direct() {
        use std::os::unix::fs::FileExt;
        let (_d, img) = image(false, 1 << 20);
        let r = img.random_reader().expect("a page-cache image has one");
        let data: Vec<u8> = (0..65_536u32).map(|i| (i * 13 + 1) as u8).collect();
        img.write_at(&data, 128 << 10).unwrap();
        let mut back = vec![0u8; data.len()];
        r.read_exact_at(&mut back, 128 << 10).unwrap();
        assert_eq!(back, data);
        assert!(r.write_at(b"x", 0).is_err(), "the reader is read-only");
        let (_d2, direct) = image(true, 1 << 20);
        assert!(direct.random_reader().is_none());
    }

    #[test]
    fn unaligned_writes_round_trip_with_and_without_o_direct() {
        for direct in [false, true] {
            let (_d, img) = image(direct, 1 << 20);
            let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + 3) as u8).collect();
            img.write_at(&data, 1234).unwrap();
            let mut back = vec![0u8; data.len()];
            img.read_at(&mut back, 1234).unwrap();
            assert_eq!(back, data, "direct={direct}");
            let mut around = vec![0xffu8; 1234];
            img.read_at(&mut around, 0).unwrap();
            assert!(around.iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn aligned_buffers_are_aligned_zeroed_and_at_least_one_block() {
        for len in [0, 1, 4095, 4096, 4097, 1 << 20] {
            let mut b = AlignedBuf::new(len);
            assert_eq!(b.as_slice().as_ptr() as usize % DIRECT_ALIGN, 0);
            assert_eq!(b.as_slice().len(), len.max(DIRECT_ALIGN));
            assert!(b.as_slice().iter().all(|&x| x == 0));
            b.as_mut_slice()[0] = 1;
            assert_eq!(b.as_slice()[0], 1);
        }
    }

    #[test]
    fn guest_reads_past_the_end_of_a_shrunk_file_see_zeros() {
        use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
        let (dir, img) = image(false, 1 << 20);
        img.write_at(&[0x11; 8192], 0).unwrap();
        // Someone else truncates the file: the image still believes it is 1 MiB.
        OpenOptions::new()
            .write(true)
            .open(dir.path().join("disk.img"))
            .unwrap()
            .set_len(4096 + 512)
            .unwrap();
        let mem: crate::storage::GuestMem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_000)]).unwrap();
        mem.write_slice(&[0xff; 8192], GuestAddress(0)).unwrap();
        let bufs: Vec<GuestSlice<'_>> = [(0u64, 4000usize), (4000, 4192)]
            .iter()
            .flat_map(|&(a, l)| mem.get_slices(GuestAddress(a), l))
            .map(|s| s.unwrap())
            .collect();
        img.read_to_guest(0, &bufs).unwrap();
        let mut back = vec![0u8; 8192];
        mem.read_slice(&mut back, GuestAddress(0)).unwrap();
        assert!(back[..4608].iter().all(|&b| b == 0x11));
        assert!(back[4608..].iter().all(|&b| b == 0));
    }

    #[test]
    fn out_of_range_is_an_error() {
        let (_d, img) = image(false, 4096);
        let mut buf = [0u8; 512];
        assert!(img.read_at(&mut buf, 4096 - 511).is_err());
        assert!(img.write_at(&buf, u64::MAX - 10).is_err());
        assert!(img.write_zeroes(4096, 1, false).is_err());
    }

    #[test]
    fn zeroes_and_discard_read_back_as_zero() {
        let (_d, img) = image(false, 1 << 20);
        img.write_at(&[0xaa; 65536], 0).unwrap();
        img.write_zeroes(4096, 8192, false).unwrap();
        img.discard(32768, 4096).unwrap();
        img.discard(0, 0).unwrap();
        img.write_zeroes(4096, 0, true).unwrap();
        let mut back = vec![0u8; 65536];
        img.read_at(&mut back, 0).unwrap();
        for (i, &b) in back.iter().enumerate() {
            let zero = (4096..12288).contains(&i) || (32768..36864).contains(&i);
            assert_eq!(b, if zero { 0 } else { 0xaa }, "byte {i}");
        }
    }

    #[test]
    fn read_only_refuses_writes() {
        let (dir, img) = image(false, 4096);
        drop(img);
        let ro = RawImage::open(&RawImageOptions {
            path: dir.path().join("disk.img"),
            read_only: true,
            direct: false,
            create_size: None,
        })
        .unwrap();
        assert_eq!(
            ro.write_at(&[1], 0).unwrap_err().kind(),
            io::ErrorKind::PermissionDenied
        );
    }
}
