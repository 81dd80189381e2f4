//! STUB (replaced by the real disk buffer on merge).
use std::io;
use std::sync::Arc;

use crate::storage::BlockDevice;

pub struct LayerStats {
    pub hidden_bytes: u64,
    pub active_bytes: u64,
    pub cluster_size: u64,
}

pub struct LayeredDisk {
    base: Arc<dyn BlockDevice>,
}

impl LayeredDisk {
    pub fn new(
        base: Arc<dyn BlockDevice>,
        _dir: &std::path::Path,
        _cluster: u64,
    ) -> io::Result<Self> {
        Ok(LayeredDisk { base })
    }
    pub fn primary_write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.base.write_at(data, offset)
    }
    pub fn primary_write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.base.write_zeroes(offset, len, unmap)
    }
    pub fn primary_discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.base.write_zeroes(offset, len, false)
    }
    pub fn checkpoint(&self) -> io::Result<()> {
        Ok(())
    }
    pub fn failover(&self) -> io::Result<()> {
        Ok(())
    }
    pub fn stats(&self) -> LayerStats {
        LayerStats {
            hidden_bytes: 0,
            active_bytes: 0,
            cluster_size: 0,
        }
    }
}

impl BlockDevice for LayeredDisk {
    fn capacity(&self) -> u64 {
        self.base.capacity()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.base.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.base.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.base.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.base.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.base.write_zeroes(offset, len, unmap)
    }
}
