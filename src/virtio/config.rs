//! The virtio-blk configuration space and feature bits.
//!
//! `BlkConfig` holds the device parameters; `BlkConfig::config_space` lays them out as the
//! kernel's `struct virtio_blk_config` (virtio-bindings), which the driver reads through
//! `ConfigSpace`'s bytes. Only the first `CONFIG_SPACE_LEN` bytes (up to and including the
//! write-zeroes fields) are offered; the fields after them stay zero.

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::ByteValued;

/// Size of the config space we expose (up to and including the write-zeroes fields).
pub(crate) const CONFIG_SPACE_LEN: usize =
    std::mem::offset_of!(virtio_blk_config, max_secure_erase_sectors);

/// `struct virtio_blk_config` as vm-memory sees it (little endian, virtio 1.x layout).
#[repr(transparent)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ConfigSpace(pub virtio_blk_config);

// SAFETY: `virtio_blk_config` is a `repr(C, packed)` struct of integers and byte arrays: it has
// no padding and every byte pattern is a valid value.
unsafe impl ByteValued for ConfigSpace {}

/// The device parameters that go into the config space.
#[derive(Debug, Clone)]
pub(crate) struct BlkConfig {
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
    /// The config space as the kernel's struct, fields in little endian.
    pub(crate) fn config_space(&self) -> ConfigSpace {
        let blocks_per_physical = self.physical_block_size / self.logical_block_size.max(1);
        ConfigSpace(virtio_blk_config {
            capacity: (self.capacity_bytes / 512).to_le(),
            // size_max and geometry stay 0: those features are not offered.
            seg_max: self.seg_max.to_le(),
            blk_size: self.logical_block_size.to_le(),
            physical_block_exp: blocks_per_physical.trailing_zeros() as u8,
            alignment_offset: 0,
            // In logical blocks.
            min_io_size: (blocks_per_physical as u16).to_le(),
            opt_io_size: 0,
            // Writeback: we have a volatile cache, FLUSH makes it durable.
            wce: 1,
            num_queues: self.num_queues.to_le(),
            max_discard_sectors: self.max_discard_sectors.to_le(),
            max_discard_seg: self.max_discard_seg.to_le(),
            discard_sector_alignment: (self.logical_block_size / 512).to_le(),
            max_write_zeroes_sectors: self.max_write_zeroes_sectors.to_le(),
            max_write_zeroes_seg: self.max_write_zeroes_seg.to_le(),
            write_zeroes_may_unmap: 1,
            ..Default::default()
        })
    }

    /// The config space as the driver reads it: the first [`CONFIG_SPACE_LEN`] bytes of
    /// [`config_space`](Self::config_space).
    pub(crate) fn to_bytes(&self) -> [u8; CONFIG_SPACE_LEN] {
        let mut b = [0u8; CONFIG_SPACE_LEN];
        b.copy_from_slice(&self.config_space().as_slice()[..CONFIG_SPACE_LEN]);
        b
    }

    /// The virtio-blk feature bits the device offers (the vhost-user transport adds its own).
    pub(crate) fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_TOPOLOGY)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_MQ);
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

    /// The config space byte for byte, as the hand-written encoder before the struct wrote it.
    #[test]
    fn bytes_equal_the_hand_written_layout() {
        for c in [
            cfg(),
            BlkConfig {
                logical_block_size: 4096,
                physical_block_size: 4096,
                read_only: true,
                ..cfg()
            },
        ] {
            let mut b = [0u8; 60];
            let put32 = |b: &mut [u8; 60], off: usize, v: u32| {
                b[off..off + 4].copy_from_slice(&v.to_le_bytes())
            };
            b[0..8].copy_from_slice(&(c.capacity_bytes / 512).to_le_bytes());
            put32(&mut b, 12, c.seg_max);
            put32(&mut b, 20, c.logical_block_size);
            let ratio = c.physical_block_size / c.logical_block_size;
            b[24] = ratio.trailing_zeros() as u8;
            b[26..28].copy_from_slice(&(ratio as u16).to_le_bytes());
            b[32] = 1;
            b[34..36].copy_from_slice(&c.num_queues.to_le_bytes());
            put32(&mut b, 36, c.max_discard_sectors);
            put32(&mut b, 40, c.max_discard_seg);
            put32(&mut b, 44, c.logical_block_size / 512);
            put32(&mut b, 48, c.max_write_zeroes_sectors);
            put32(&mut b, 52, c.max_write_zeroes_seg);
            b[56] = 1;
            assert_eq!(c.to_bytes(), b);
            // Nothing is set after the offered part.
            let full = c.config_space();
            assert!(full.as_slice()[CONFIG_SPACE_LEN..].iter().all(|&x| x == 0));
        }
        assert_eq!(CONFIG_SPACE_LEN, 60);
        assert_eq!(std::mem::size_of::<ConfigSpace>(), 96);
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
