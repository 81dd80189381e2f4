//! The vhost-user-blk device: one worker thread per virtqueue, each popping descriptor chains,
//! handing them to [`crate::virtio::request`] and completing them on the used ring.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use log::{debug, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::io_pool::{InFlight, IoPool};
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
    /// Requests popped but not completed, per queue.
    inflight: Vec<InFlight>,
}

/// The backend handed to `VhostUserDaemon`. Cheap to clone; one is built per connection.
#[derive(Clone)]
pub struct BlkBackend {
    shared: Arc<Shared>,
    pool: Option<Arc<IoPool>>,
}

impl BlkBackend {
    /// A device serving `disk`.
    /// A device serving `disk`; with a `pool`, several requests of one queue run at once.
    pub fn new(
        disk: Arc<dyn BlockDevice>,
        opts: &DeviceOptions,
        stats: Arc<Vec<QueueStats>>,
        pool: Option<Arc<IoPool>>,
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
                inflight: (0..opts.num_queues).map(|_| InFlight::default()).collect(),
            }),
            pool,
        }
    }

    /// Parses and executes one chain; returns what goes on the used ring.
    fn run_chain(
        shared: &Shared,
        mem: &GuestMem,
        head: u16,
        parsed: Parsed,
        stats: Option<&QueueStats>,
    ) -> request::Completion {
        match parsed {
            Parsed::Ok(req) => {
                let c = request::execute(mem, shared.disk.as_ref(), &shared.info, &req);
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
        }
    }

    /// Puts a completed chain on the used ring and notifies the driver when it wants it.
    fn complete(&self, queue: usize, vring: &Vring, head: u16, used_len: u32) {
        let mut state = vring.get_mut();
        if let Err(e) = state.add_used(head, used_len) {
            warn!("add_used({head}) failed: {e:?}");
        } else {
            let notify = if self.shared.event_idx.load(Ordering::Relaxed) {
                state.needs_notification().unwrap_or(true)
            } else {
                true
            };
            if notify {
                if let Err(e) = state.signal_used_queue() {
                    debug!("signalling the used queue failed: {e}");
                }
            }
        }
        drop(state);
        if let Some(f) = self.shared.inflight.get(queue) {
            f.done();
        }
    }

    /// Pops every available chain (re-checking after re-enabling notifications with
    /// EVENT_IDX) and parses them; the queue lock is held only for this.
    fn pop_all(
        &self,
        queue: usize,
        vring: &Vring,
        mem: &GuestMemoryLoadGuard<GuestMem>,
    ) -> io::Result<Vec<(u16, Parsed)>> {
        let event_idx = self.shared.event_idx.load(Ordering::Relaxed);
        let mut state = vring.get_mut();
        let mut batch = Vec::new();
        loop {
            if event_idx {
                state
                    .disable_notification()
                    .map_err(|e| io::Error::other(format!("{e:?}")))?;
            }
            while let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem.clone()) {
                let head = chain.head_index();
                batch.push((head, request::parse(mem, chain, self.shared.limits)));
            }
            if !event_idx
                || !state
                    .enable_notification()
                    .map_err(|e| io::Error::other(format!("{e:?}")))?
            {
                break;
            }
        }
        if let Some(f) = self.shared.inflight.get(queue) {
            f.add(batch.len());
        }
        Ok(batch)
    }

    /// Waits until every request popped so far is completed.
    pub fn wait_idle(&self) {
        for f in &self.shared.inflight {
            f.wait_idle();
        }
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

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: the front-end reads the ring's state next, so every request of this
        // queue still running on the I/O pool must be completed first.
        if let Some(f) = self.shared.inflight.get(queue_index as usize) {
            f.wait_idle();
        }
        Ok(())
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
        // One queue per worker thread: the thread index is the queue index.
        let mut batch = self.pop_all(thread_id, vring, &mem)?;
        // All but the last request go to the I/O pool; the last runs here.
        let last = batch.pop();
        if let Some(pool) = self.pool.as_ref() {
            for (head, parsed) in batch.drain(..) {
                let (me, vring, mem) = (self.clone(), vring.clone(), mem.clone());
                pool.spawn(move || {
                    let stats = me.shared.stats.get(thread_id);
                    let c = Self::run_chain(&me.shared, &mem, head, parsed, stats);
                    me.complete(thread_id, &vring, head, c.used_len);
                });
            }
        }
        for (head, parsed) in batch.into_iter().chain(last) {
            let stats = self.shared.stats.get(thread_id);
            let c = Self::run_chain(&self.shared, &mem, head, parsed, stats);
            self.complete(thread_id, vring, head, c.used_len);
        }
        Ok(())
    }
}
