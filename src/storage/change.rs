//! [`Change`]: one modification of a disk, the single type a guest write, write-zeroes, discard
//! or flush is carried in from the parsed virtio request, through the primary (which derives
//! both its local operation and the replication frame from it), over the wire, and into the
//! secondary's layers.
//!
//! The data of a write is generic: guest buffers where the request is parsed, [`Bytes`] on the
//! primary and in frames (one copy out of guest memory, shared by the local write and the
//! link, sliced without copying when a large write is split), and `&[u8]` where a layer applies
//! it.

use std::io;

use bytes::Bytes;

use super::{total_len, BlockDevice, GuestSlice};

/// Length in bytes of a write's data, whatever holds it.
pub trait ChangeData {
    /// Number of bytes.
    fn byte_len(&self) -> u64;
}

impl ChangeData for [u8] {
    fn byte_len(&self) -> u64 {
        self.len() as u64
    }
}

impl ChangeData for &[u8] {
    fn byte_len(&self) -> u64 {
        self.len() as u64
    }
}

impl ChangeData for Vec<u8> {
    fn byte_len(&self) -> u64 {
        self.len() as u64
    }
}

impl ChangeData for Bytes {
    fn byte_len(&self) -> u64 {
        self.len() as u64
    }
}

impl ChangeData for &[GuestSlice<'_>] {
    fn byte_len(&self) -> u64 {
        total_len(self) as u64
    }
}

/// One modification of a disk. Offsets and lengths are in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change<D> {
    /// `data` written at `offset`.
    Write { offset: u64, data: D },
    /// `[offset, offset + len)` reads back as zeros; with `unmap` it may be deallocated.
    WriteZeroes { offset: u64, len: u64, unmap: bool },
    /// `[offset, offset + len)` is no longer needed (a raw image reads zeros back).
    Discard { offset: u64, len: u64 },
    /// Every completed change is made durable.
    Flush,
}

impl<D: ChangeData> Change<D> {
    /// The byte range the change touches, as `(offset, len)`; `(0, 0)` for a flush.
    pub fn range(&self) -> (u64, u64) {
        match self {
            Change::Write { offset, data } => (*offset, data.byte_len()),
            Change::WriteZeroes { offset, len, .. } | Change::Discard { offset, len } => {
                (*offset, *len)
            }
            Change::Flush => (0, 0),
        }
    }

    /// Bytes of data the change carries (only a write carries any).
    pub fn data_len(&self) -> u64 {
        match self {
            Change::Write { data, .. } => data.byte_len(),
            _ => 0,
        }
    }
}

impl<D> Change<D> {
    /// The change's name, for messages (the names of the wire frames).
    pub fn kind(&self) -> &'static str {
        match self {
            Change::Write { .. } => "WRITE",
            Change::WriteZeroes { .. } => "WRITE_ZEROES",
            Change::Discard { .. } => "DISCARD",
            Change::Flush => "FLUSH",
        }
    }

    /// The same change with its data converted by `f` (the others carry no data).
    pub fn map_data<E>(self, f: impl FnOnce(D) -> E) -> Change<E> {
        match self {
            Change::Write { offset, data } => Change::Write {
                offset,
                data: f(data),
            },
            Change::WriteZeroes { offset, len, unmap } => {
                Change::WriteZeroes { offset, len, unmap }
            }
            Change::Discard { offset, len } => Change::Discard { offset, len },
            Change::Flush => Change::Flush,
        }
    }
}

impl<D: AsRef<[u8]>> Change<D> {
    /// The same change borrowing its data.
    pub fn as_slice(&self) -> Change<&[u8]> {
        match self {
            Change::Write { offset, data } => Change::Write {
                offset: *offset,
                data: data.as_ref(),
            },
            Change::WriteZeroes { offset, len, unmap } => Change::WriteZeroes {
                offset: *offset,
                len: *len,
                unmap: *unmap,
            },
            Change::Discard { offset, len } => Change::Discard {
                offset: *offset,
                len: *len,
            },
            Change::Flush => Change::Flush,
        }
    }

    /// Applies the change to `disk` through its [`BlockDevice`] methods.
    pub fn apply_to(&self, disk: &(impl BlockDevice + ?Sized)) -> io::Result<()> {
        match self {
            Change::Write { offset, data } => disk.write_at(data.as_ref(), *offset),
            Change::WriteZeroes { offset, len, unmap } => disk.write_zeroes(*offset, *len, *unmap),
            Change::Discard { offset, len } => disk.discard(*offset, *len),
            Change::Flush => disk.flush(),
        }
    }
}

impl Change<&[GuestSlice<'_>]> {
    /// Applies a change whose data is still in guest memory, without copying it where the disk
    /// can write from guest memory directly.
    pub fn apply_from_guest(&self, disk: &(impl BlockDevice + ?Sized)) -> io::Result<()> {
        match self {
            Change::Write { offset, data } => disk.write_from_guest(*offset, data),
            Change::WriteZeroes { offset, len, unmap } => disk.write_zeroes(*offset, *len, *unmap),
            Change::Discard { offset, len } => disk.discard(*offset, *len),
            Change::Flush => disk.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemDisk;

    #[test]
    fn range_kind_and_apply() {
        let disk = MemDisk::new(8192);
        let w = Change::Write {
            offset: 512,
            data: Bytes::from(vec![7u8; 1024]),
        };
        assert_eq!(w.range(), (512, 1024));
        assert_eq!(w.data_len(), 1024);
        assert_eq!(w.kind(), "WRITE");
        w.as_slice().apply_to(&disk).unwrap();
        let z: Change<&[u8]> = Change::WriteZeroes {
            offset: 1024,
            len: 256,
            unmap: true,
        };
        assert_eq!(z.range(), (1024, 256));
        assert_eq!(z.data_len(), 0);
        z.apply_to(&disk).unwrap();
        let mut buf = vec![0u8; 2048];
        disk.read_at(&mut buf, 0).unwrap();
        assert!(buf[..512].iter().all(|&b| b == 0));
        assert!(buf[512..1024].iter().all(|&b| b == 7));
        assert!(buf[1024..1280].iter().all(|&b| b == 0));
        assert!(buf[1280..1536].iter().all(|&b| b == 7));
        assert_eq!(Change::<Bytes>::Flush.range(), (0, 0));
        let d = Change::<Bytes>::Discard { offset: 3, len: 4 }.map_data(|b| b.len());
        assert_eq!(d, Change::Discard { offset: 3, len: 4 });
    }
}
