//! The virtio-blk configuration space and feature bits.

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// `VHOST_F_LOG_ALL`: the device logs its guest memory writes (needed for migration and COLO).
pub const VHOST_F_LOG_ALL: u32 = 26;
/// `VHOST_USER_F_PROTOCOL_FEATURES`.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;

/// Size of the config space we expose (up to and including the write-zeroes fields).
pub const CONFIG_SPACE_LEN: usize = 60;

/// The device parameters that go into the config space.
#[derive(Debug, Clone)]
pub struct BlkConfig {
    pub capacity_bytes: u64,
    pub logical_block_size: u32,
    pub physical_block_size: u32,
    pub num_queues: u16,
    pub seg_max: u32,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub read_only: bool,
}

impl BlkConfig {
    /// The config space as the driver reads it (little endian, virtio 1.x layout).
    pub fn to_bytes(&self) -> [u8; CONFIG_SPACE_LEN] {
        let mut b = [0u8; CONFIG_SPACE_LEN];
        let put32 = |b: &mut [u8; CONFIG_SPACE_LEN], off: usize, v: u32| {
            b[off..off + 4].copy_from_slice(&v.to_le_bytes())
        };
        b[0..8].copy_from_slice(&(self.capacity_bytes / 512).to_le_bytes()); // capacity
        put32(&mut b, 8, 0); // size_max (feature not offered)
        put32(&mut b, 12, self.seg_max);
        // geometry (16..20) unused: feature not offered.
        put32(&mut b, 20, self.logical_block_size);
        let exp = (self.physical_block_size / self.logical_block_size.max(1)).trailing_zeros();
        b[24] = exp as u8; // physical_block_exp
        b[25] = 0; // alignment_offset
        let min_io = (self.physical_block_size / self.logical_block_size.max(1)) as u16;
        b[26..28].copy_from_slice(&min_io.to_le_bytes()); // min_io_size (in logical blocks)
        put32(&mut b, 28, 0); // opt_io_size
        b[32] = 1; // writeback: we have a volatile cache, FLUSH makes it durable
        b[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        put32(&mut b, 36, self.max_discard_sectors);
        put32(&mut b, 40, self.max_discard_seg);
        put32(&mut b, 44, self.logical_block_size / 512); // discard_sector_alignment
        put32(&mut b, 48, self.max_write_zeroes_sectors);
        put32(&mut b, 52, self.max_write_zeroes_seg);
        b[56] = 1; // write_zeroes_may_unmap
        b
    }

    /// The virtio feature bits the device offers.
    pub fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_TOPOLOGY)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_MQ)
            | (1 << VHOST_F_LOG_ALL)
            | (1 << VHOST_USER_F_PROTOCOL_FEATURES);
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BlkConfig {
        BlkConfig {
            capacity_bytes: 1 << 30,
            logical_block_size: 512,
            physical_block_size: 4096,
            num_queues: 4,
            seg_max: 126,
            max_discard_sectors: 1 << 20,
            max_discard_seg: 32,
            max_write_zeroes_sectors: 1 << 20,
            max_write_zeroes_seg: 32,
            read_only: false,
        }
    }

    #[test]
    fn layout_matches_the_virtio_spec() {
        let b = cfg().to_bytes();
        assert_eq!(
            u64::from_le_bytes(b[0..8].try_into().unwrap()),
            (1 << 30) / 512
        );
        assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 126);
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 512);
        assert_eq!(b[24], 3, "4096/512 = 2^3");
        assert_eq!(u16::from_le_bytes(b[34..36].try_into().unwrap()), 4);
        assert_eq!(u32::from_le_bytes(b[40..44].try_into().unwrap()), 32);
        assert_eq!(b[56], 1);
        // Offsets agree with the kernel header's struct.
        assert_eq!(std::mem::offset_of!(virtio_blk_config, num_queues), 34);
        assert_eq!(std::mem::offset_of!(virtio_blk_config, max_discard_seg), 40);
        assert_eq!(
            std::mem::offset_of!(virtio_blk_config, write_zeroes_may_unmap),
            56
        );
    }

    #[test]
    fn read_only_drops_write_features() {
        let mut c = cfg();
        c.read_only = true;
        let f = c.features();
        assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    }
}
