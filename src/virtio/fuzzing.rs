//! Internals exposed for fuzz targets (fuzz/fuzz_targets/virtio_request.rs); not a stable API.
//!
//! The request parser and executor are crate-private; this module wraps them with the same
//! steps the vhost-user backend takes for one descriptor chain: [`parse`], then [`execute`]
//! for a well-formed request or [`complete_malformed`] for a malformed one (a chain without a
//! status byte is completed with length 0 and touches nothing).
//!
//! ```
//! use colo_blk::virtio::fuzzing::{parse, Device, FuzzParsed, GuestMemory};
//! use virtio_queue::desc::split::Descriptor;
//! use vm_memory::GuestAddress;
//!
//! let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_000)]).unwrap();
//! // A lone device-readable descriptor: no status byte.
//! let descs = vec![Descriptor::new(0x1000, 16, 0, 0)];
//! assert!(matches!(parse(&mem, descs.into_iter(), 8), FuzzParsed::NoStatus));
//! # let _ = Device::default();
//! ```

use virtio_queue::desc::split::Descriptor;
use vm_memory::GuestAddress;

use super::request::{self, Limits, Parsed, Request, RequestKind};
use crate::storage::BlockDevice;

/// Guest memory as the backend maps it (with the dirty-page log bitmap).
pub type GuestMemory = vm_memory::GuestMemoryMmap<vhost_user_backend::bitmap::BitmapMmapRegion>;

/// Device-wide parameters the executor needs (the backend's `DeviceInfo`).
#[derive(Debug, Clone)]
pub struct Device {
    pub read_only: bool,
    pub serial: Vec<u8>,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_dwz_segments: u32,
}

impl Default for Device {
    fn default() -> Self {
        Device {
            read_only: false,
            serial: b"fuzz-serial".to_vec(),
            max_discard_sectors: 1 << 20,
            max_write_zeroes_sectors: 1 << 20,
            max_dwz_segments: 4,
        }
    }
}

/// The request types, as the parser classifies them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Unsupported(u32),
}

/// A well-formed request (opaque; read it through the accessors).
#[derive(Debug)]
pub struct FuzzRequest(Request);

impl FuzzRequest {
    pub fn kind(&self) -> Kind {
        match self.0.kind {
            RequestKind::In => Kind::In,
            RequestKind::Out => Kind::Out,
            RequestKind::Flush => Kind::Flush,
            RequestKind::GetId => Kind::GetId,
            RequestKind::Discard => Kind::Discard,
            RequestKind::WriteZeroes => Kind::WriteZeroes,
            RequestKind::Unsupported(t) => Kind::Unsupported(t),
        }
    }

    /// The header's sector.
    pub fn sector(&self) -> u64 {
        self.0.sector
    }

    /// Device-readable data segments after the header, as `(address, length)`.
    pub fn out_segments(&self) -> Vec<(u64, u32)> {
        self.0.out.iter().map(|s| (s.addr.0, s.len)).collect()
    }

    /// Device-writable data segments before the status byte, as `(address, length)`.
    pub fn in_segments(&self) -> Vec<(u64, u32)> {
        self.0.inp.iter().map(|s| (s.addr.0, s.len)).collect()
    }

    /// Guest address of the status byte.
    pub fn status_addr(&self) -> u64 {
        self.0.status.0
    }
}

/// The outcome of parsing a chain.
#[derive(Debug)]
pub enum FuzzParsed {
    Request(FuzzRequest),
    /// Malformed, with a status byte at this address.
    Malformed(u64),
    /// No usable status byte.
    NoStatus,
}

/// Parses a chain with `seg_max` as the segment limit.
pub fn parse(
    mem: &GuestMemory,
    descs: impl Iterator<Item = Descriptor>,
    seg_max: u32,
) -> FuzzParsed {
    match request::parse(mem, descs, Limits { seg_max }) {
        Parsed::Ok(r) => FuzzParsed::Request(FuzzRequest(r)),
        Parsed::Malformed { status, .. } => FuzzParsed::Malformed(status.0),
        Parsed::NoStatus { .. } => FuzzParsed::NoStatus,
    }
}

/// Executes a request against `disk`; returns `(status, used_len)`.
pub fn execute(
    mem: &GuestMemory,
    disk: &dyn BlockDevice,
    device: &Device,
    req: &FuzzRequest,
) -> (u8, u32) {
    let info = request::DeviceInfo {
        read_only: device.read_only,
        serial: device.serial.clone(),
        max_discard_sectors: device.max_discard_sectors,
        max_write_zeroes_sectors: device.max_write_zeroes_sectors,
        max_dwz_segments: device.max_dwz_segments,
    };
    let c = request::execute(mem, disk, &info, &req.0);
    (c.status, c.used_len)
}

/// Completes a malformed chain as the backend does; returns `(status, used_len)`.
pub fn complete_malformed(mem: &GuestMemory, status_addr: u64) -> (u8, u32) {
    let c = request::complete(
        mem,
        GuestAddress(status_addr),
        Err(request::RequestError::Malformed(
            "malformed descriptor chain",
        )),
    );
    (c.status, c.used_len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemDisk;
    use virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use vm_memory::Bytes;

    #[test]
    fn a_write_through_the_wrappers() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_000)]).unwrap();
        mem.write_obj(VIRTIO_BLK_T_OUT, GuestAddress(0x1000))
            .unwrap();
        mem.write_obj(2u64, GuestAddress(0x1008)).unwrap();
        mem.write_slice(&[9u8; 512], GuestAddress(0x2000)).unwrap();
        let w = VRING_DESC_F_WRITE as u16;
        let descs = vec![
            Descriptor::new(0x1000, 16, 0, 0),
            Descriptor::new(0x2000, 512, 0, 0),
            Descriptor::new(0x3000, 1, w, 0),
        ];
        let FuzzParsed::Request(r) = parse(&mem, descs.into_iter(), 8) else {
            panic!("parse")
        };
        assert_eq!(
            (r.kind(), r.sector(), r.status_addr()),
            (Kind::Out, 2, 0x3000)
        );
        assert_eq!(r.out_segments(), vec![(0x2000, 512)]);
        let disk = MemDisk::new(8192);
        assert_eq!(execute(&mem, &disk, &Device::default(), &r), (0, 1));
        assert!(disk.snapshot()[1024..1536].iter().all(|&b| b == 9));
        assert_eq!(complete_malformed(&mem, 0x3000), (1, 1));
    }
}
