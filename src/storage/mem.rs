//! An in-memory [`BlockDevice`] for unit tests: the reference the data plane and the
//! replication code are checked against.

use std::io;
use std::sync::Mutex;

use super::{check_range, BlockDevice};

/// A RAM disk.
#[derive(Debug)]
pub(crate) struct MemDisk {
    data: Mutex<Vec<u8>>,
}

impl MemDisk {
    pub(crate) fn new(size: usize) -> Self {
        MemDisk {
            data: Mutex::new(vec![0; size]),
        }
    }

    /// A copy of the whole content.
    pub(crate) fn snapshot(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl BlockDevice for MemDisk {
    fn capacity(&self) -> u64 {
        self.lock().len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.lock();
        check_range(d.len() as u64, offset, buf.len() as u64)?;
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut d = self.lock();
        check_range(d.len() as u64, offset, buf.len() as u64)?;
        d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        let mut d = self.lock();
        check_range(d.len() as u64, offset, len)?;
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}
