//! The vhost-user-blk device: one worker thread per virtqueue, each popping descriptor chains,
//! handing them to [`crate::virtio::request`] and completing them on the used ring.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use log::{debug, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringState, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::storage::{BlockDevice, GuestMem};
use crate::virtio::config::BlkConfig;
use crate::virtio::request::{self, DeviceInfo, Limits, Parsed};

type Mem = GuestMemoryAtomic<GuestMem>;
type Vring = VringRwLock<Mem>;

/// Parameters of the emulated device.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    pub num_queues: u16,
    pub queue_size: u16,
    pub serial: String,
    pub read_only: bool,
    pub logical_block_size: u32,
}

/// Per-queue counters, readable while the device runs.
#[derive(Debug, Default)]
pub struct QueueStats {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub malformed: AtomicU64,
}

struct Shared {
    disk: Arc<dyn BlockDevice>,
    config: BlkConfig,
    info: DeviceInfo,
    limits: Limits,
    queue_size: u16,
    event_idx: AtomicBool,
    mem: RwLock<Option<Mem>>,
    stats: Arc<Vec<QueueStats>>,
}

/// The backend handed to `VhostUserDaemon`. Cheap to clone; one is built per connection.
#[derive(Clone)]
pub struct BlkBackend {
    shared: Arc<Shared>,
}

impl BlkBackend {
    /// A device serving `disk`.
    pub fn new(
        disk: Arc<dyn BlockDevice>,
        opts: &DeviceOptions,
        stats: Arc<Vec<QueueStats>>,
    ) -> Self {
        // Two descriptors are taken by the header and the status byte.
        let seg_max = u32::from(opts.queue_size).saturating_sub(2).max(1);
        let max_dwz_sectors = (u32::MAX / 512) & !7;
        let max_dwz_seg = 32;
        let config = BlkConfig {
            capacity_bytes: disk.capacity(),
            logical_block_size: opts.logical_block_size,
            physical_block_size: opts.logical_block_size.max(4096),
            num_queues: opts.num_queues,
            seg_max,
            max_discard_sectors: max_dwz_sectors,
            max_discard_seg: max_dwz_seg,
            max_write_zeroes_sectors: max_dwz_sectors,
            max_write_zeroes_seg: max_dwz_seg,
            read_only: opts.read_only,
        };
        let info = DeviceInfo {
            read_only: opts.read_only,
            serial: opts.serial.as_bytes().to_vec(),
            max_discard_sectors: max_dwz_sectors,
            max_write_zeroes_sectors: max_dwz_sectors,
            max_dwz_segments: max_dwz_seg,
        };
        BlkBackend {
            shared: Arc::new(Shared {
                disk,
                config,
                info,
                limits: Limits { seg_max },
                queue_size: opts.queue_size,
                event_idx: AtomicBool::new(false),
                mem: RwLock::new(None),
                stats,
            }),
        }
    }

    /// Pops and completes every available chain of one queue.
    fn process_queue(
        &self,
        state: &mut VringState<Mem>,
        mem: &GuestMemoryLoadGuard<GuestMem>,
        stats: Option<&QueueStats>,
    ) -> io::Result<bool> {
        let s = &self.shared;
        let mut used_any = false;
        while let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem.clone()) {
            let head = chain.head_index();
            let completion = match request::parse(mem, chain, s.limits) {
                Parsed::Ok(req) => {
                    let c = request::execute(mem, s.disk.as_ref(), &s.info, &req);
                    if let Some(st) = stats {
                        st.requests.fetch_add(1, Ordering::Relaxed);
                        if c.status != 0 {
                            st.errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    c
                }
                Parsed::Malformed { status, why } => {
                    warn!("malformed request (head {head}): {why}");
                    if let Some(st) = stats {
                        st.malformed.fetch_add(1, Ordering::Relaxed);
                    }
                    request::fail(mem, status)
                }
                Parsed::NoStatus { why } => {
                    warn!("malformed request (head {head}) completed without status: {why}");
                    if let Some(st) = stats {
                        st.malformed.fetch_add(1, Ordering::Relaxed);
                    }
                    request::Completion {
                        status: 0,
                        used_len: 0,
                    }
                }
            };
            state
                .add_used(head, completion.used_len)
                .map_err(|e| io::Error::other(format!("add_used: {e:?}")))?;
            used_any = true;
        }
        Ok(used_any)
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.shared.config.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.shared.queue_size)
    }

    fn features(&self) -> u64 {
        self.shared.config.features()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.shared.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.shared.config.to_bytes();
        let start = (offset as usize).min(bytes.len());
        let end = start.saturating_add(size as usize).min(bytes.len());
        let mut out = bytes[start..end].to_vec();
        // Reads past our config space see zeros rather than an error.
        out.resize(size as usize, 0);
        out
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        *self
            .shared
            .mem
            .write()
            .map_err(|_| io::Error::other("poisoned"))? = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker thread per queue.
        (0..self.num_queues()).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!(
                "unexpected epoll event {evset:?}"
            )));
        }
        // `device_event` indexes this worker's vrings, not the device's queues.
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Err(io::Error::other(format!(
                "event {device_event} has no vring"
            )));
        };
        let mem = match self
            .shared
            .mem
            .read()
            .map_err(|_| io::Error::other("poisoned"))?
            .as_ref()
        {
            Some(m) => m.memory(),
            None => {
                debug!("queue event before the memory table; ignored");
                return Ok(());
            }
        };
        let stats = self.shared.stats.get(thread_id);
        let mut state = vring.get_mut();
        if self.shared.event_idx.load(Ordering::Relaxed) {
            loop {
                state
                    .disable_notification()
                    .map_err(|e| io::Error::other(format!("{e:?}")))?;
                self.process_queue(&mut state, &mem, stats)?;
                if !state
                    .enable_notification()
                    .map_err(|e| io::Error::other(format!("{e:?}")))?
                {
                    break;
                }
            }
            if state
                .needs_notification()
                .map_err(|e| io::Error::other(format!("{e:?}")))?
            {
                state.signal_used_queue()?;
            }
        } else if self.process_queue(&mut state, &mem, stats)? {
            state.signal_used_queue()?;
        }
        Ok(())
    }
}
