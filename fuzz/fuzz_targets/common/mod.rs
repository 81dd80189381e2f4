//! What the targets share: an in-memory disk that refuses (by panicking) any access beyond its
//! end, since every caller in colo-blk checks ranges before it reaches a device, and a
//! current-thread tokio runtime built once per process.

#![allow(dead_code)]

use std::io;
use std::sync::{Mutex, MutexGuard, OnceLock};

use colo_blk::storage::BlockDevice;

/// A RAM disk whose every access must lie inside it.
#[derive(Debug)]
pub struct StrictDisk {
    data: Mutex<Vec<u8>>,
}

impl StrictDisk {
    pub fn new(content: Vec<u8>) -> Self {
        StrictDisk {
            data: Mutex::new(content),
        }
    }

    pub fn snapshot(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn range(&self, len: usize, offset: u64, n: u64) -> std::ops::Range<usize> {
        match offset.checked_add(n) {
            Some(end) if end <= len as u64 => offset as usize..end as usize,
            _ => panic!("device access {offset}+{n} beyond the end ({len} bytes)"),
        }
    }
}

impl BlockDevice for StrictDisk {
    fn capacity(&self) -> u64 {
        self.lock().len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.lock();
        let r = self.range(d.len(), offset, buf.len() as u64);
        buf.copy_from_slice(&d[r]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut d = self.lock();
        let r = self.range(d.len(), offset, buf.len() as u64);
        d[r].copy_from_slice(buf);
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
        let r = self.range(d.len(), offset, len);
        d[r].fill(0);
        Ok(())
    }
}

/// A disk-sized pattern in which every 512-byte sector differs and no byte is zero.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (((i >> 9) as u32).wrapping_mul(31) as u8 ^ i as u8) | 1)
        .collect()
}

/// The process's runtime (current-thread, timers enabled), built on first use.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}
