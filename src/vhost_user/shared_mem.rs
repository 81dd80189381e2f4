//! Whether the front-end really shares its guest RAM with the backend.
//!
//! vhost-user serves the virtqueues straight from guest memory, so QEMU must keep its guest RAM
//! in a file it maps *shared* (`-object memory-backend-memfd,share=on`). Two mistakes fail
//! silently or obscurely, as seen with QEMU 7.2:
//!
//! - RAM without a file (plain `-m`, no memory backend): QEMU leaves every region without an fd
//!   out of the memory table, so the backend receives no memory at all; vhost-user-backend then
//!   refuses SET_VRING_ADDR ("invalid parameters"), the connection ends, QEMU logs `Failed to set
//!   msg fds` and, with a reconnecting chardev, starts over forever. [`Server`](super::Server)
//!   recognises it when a connection fails with no memory mapped ([`NO_MEMORY`]).
//! - A memfd with `share=off`: QEMU still sends the memfd, but maps it privately (copy on
//!   write), so nothing the guest writes reaches the file the backend maps. The rings read as
//!   zeros: the guest's first request is never seen and the guest hangs, with nothing in any
//!   log. [`ring_is_blank`] recognises it at a connection's first kick: a driver writes at least
//!   one descriptor (a request header has an address and a length) and publishes it in the
//!   avail ring before it kicks, so a kicked ring whose descriptor table is all zeros and whose
//!   avail index is 0 can only be one whose writes went elsewhere. (Which pages of the file
//!   exist cannot tell: a write to a private mapping of a memfd first allocates the file's
//!   page, zero-filled, then copies it.)

use vm_memory::{Bytes, GuestAddress};

use crate::storage::GuestMem;

/// How to run QEMU so that its guest RAM is shared (part of every message about it).
pub(crate) const HOW_TO_SHARE: &str = "give QEMU shared guest RAM: -object \
     memory-backend-memfd,id=mem,size=RAM,share=on -machine memory-backend=mem (libvirt: \
     <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>)";

/// The message of a connection that failed without any guest memory mapped.
pub(crate) const NO_MEMORY: &str = "the front-end shared no guest memory (its RAM has no \
     file descriptor, e.g. QEMU without memory-backend-memfd,share=on)";

/// The message of a front-end whose writes to guest RAM never reach the shared file.
pub(crate) const PRIVATE_MEMORY: &str = "the front-end's guest RAM is not shared with \
     colo-blk (QEMU maps it privately, e.g. memory-backend-memfd with share=off): the guest's \
     requests are invisible to the backend and its I/O hangs";

/// Whether a kicked split ring shows nothing the driver wrote: an avail index of 0 and a
/// descriptor table of zeros (see the module comment). `false` when it cannot be read.
pub(crate) fn ring_is_blank(mem: &GuestMem, desc_table: u64, avail_ring: u64, size: u16) -> bool {
    let Ok(idx) = mem.read_obj::<u16>(GuestAddress(avail_ring + 2)) else {
        return false;
    };
    let mut table = vec![0u8; usize::from(size) * 16];
    idx == 0
        && mem.read_slice(&mut table, GuestAddress(desc_table)).is_ok()
        && table.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_is_blank_until_a_descriptor_or_the_avail_index_is_written() {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
        let (desc, avail) = (0x1000, 0x2000);
        assert!(ring_is_blank(&mem, desc, avail, 16));
        mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
        assert!(!ring_is_blank(&mem, desc, avail, 16));
        mem.write_obj(0u16, GuestAddress(avail + 2)).unwrap();
        // The last descriptor's length.
        mem.write_obj(16u32, GuestAddress(desc + 15 * 16 + 8))
            .unwrap();
        assert!(!ring_is_blank(&mem, desc, avail, 16));
        // Outside guest memory: not judged.
        assert!(!ring_is_blank(&mem, 1 << 20, avail, 16));
    }
}
