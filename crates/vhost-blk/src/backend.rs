//! The `VhostUserBackend` implementation: features, config space and the queue loop.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_GEOMETRY,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::request::{DeviceCtx, Scratch, MAX_DWZ_SECTORS, MAX_DWZ_SEGS, SECTOR};

/// Guest memory with a dirty-page bitmap that QEMU can attach (SET_LOG_BASE) while it
/// migrates; until then marking is a no-op.
pub(crate) type Mem = GuestMemoryAtomic<GuestMemoryMmap<BitmapMmapRegion>>;
type VringRwLock = vhost_user_backend::VringRwLock<Mem>;

/// Length of `struct virtio_blk_config` up to and including `write_zeroes_may_unmap`
/// and its padding (the fields the features we offer make meaningful).
pub(crate) const CONFIG_LEN: usize = 60;

pub(crate) struct BlkBackend {
    ctx: Arc<DeviceCtx>,
    num_queues: usize,
    queue_size: usize,
    features: u64,
    config: [u8; CONFIG_LEN],
    event_idx: AtomicBool,
    mem: Mem,
    /// One scratch area per queue; each queue has its own worker thread.
    scratch: Vec<Mutex<Scratch>>,
    /// Exit notifiers of the worker threads, so serve() can stop them on disconnect.
    exits: Mutex<Vec<EventNotifier>>,
}

fn bit(b: u32) -> u64 {
    1u64 << b
}

/// The virtio feature bits offered for a device with these properties.
pub(crate) fn offered_features(read_only: bool, writeback: bool, num_queues: u16) -> u64 {
    let mut f = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        | bit(VIRTIO_BLK_F_SEG_MAX)
        | bit(VIRTIO_BLK_F_GEOMETRY)
        | bit(VIRTIO_BLK_F_BLK_SIZE)
        | bit(VIRTIO_BLK_F_TOPOLOGY);
    if writeback {
        f |= bit(VIRTIO_BLK_F_FLUSH);
    }
    if read_only {
        f |= bit(VIRTIO_BLK_F_RO);
    } else {
        f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
    }
    if num_queues > 1 {
        f |= bit(VIRTIO_BLK_F_MQ);
    }
    // QEMU refuses to migrate (our save) a vhost-user device without dirty logging.
    // The worker's save is non-live (the VM is paused before `migrate`), so little or
    // nothing is ever logged, but the log is kept correctly anyway: guest-memory
    // writes go through `BitmapMmapRegion`, which marks pages once QEMU sets a log.
    f |= bit(VHOST_F_LOG_ALL);
    f
}

/// `VHOST_F_LOG_ALL` (vhost feature bit 26): the back-end can log its writes to guest
/// memory in the shared dirty bitmap (with `VHOST_USER_PROTOCOL_F_LOG_SHMFD`).
pub(crate) const VHOST_F_LOG_ALL: u32 = 26;

/// Build `struct virtio_blk_config` (little-endian, virtio 1.x layout).
pub(crate) fn build_config(
    size: u64,
    logical: u32,
    physical: u32,
    seg_max: u32,
    num_queues: u16,
    writeback: bool,
) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let mut put = |at: usize, bytes: &[u8]| {
        if let Some(dst) = c.get_mut(at..at + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    };
    put(0, &(size / SECTOR).to_le_bytes()); // capacity
    put(8, &0u32.to_le_bytes()); // size_max (feature not offered)
    put(12, &seg_max.to_le_bytes());
    // Legacy BIOS code (SeaBIOS, boot loaders using CHS) divides by the geometry, so a
    // zero geometry hangs boot loaders: offer the usual 16 heads x 63 sectors.
    let cylinders = (size / SECTOR / (16 * 63)).clamp(1, u64::from(u16::MAX)) as u16;
    put(16, &cylinders.to_le_bytes());
    put(18, &[16]); // heads
    put(19, &[63]); // sectors
    put(20, &logical.to_le_bytes()); // blk_size
    let ratio = (physical / logical.max(1)).max(1);
    put(24, &[ratio.trailing_zeros() as u8]); // physical_block_exp
    put(25, &[0]); // alignment_offset
    put(26, &(ratio.min(u32::from(u16::MAX)) as u16).to_le_bytes()); // min_io_size (blocks)
    put(28, &0u32.to_le_bytes()); // opt_io_size
    put(32, &[u8::from(writeback)]); // writeback (only read with CONFIG_WCE)
    put(34, &num_queues.to_le_bytes());
    put(36, &MAX_DWZ_SECTORS.to_le_bytes()); // max_discard_sectors
    put(40, &MAX_DWZ_SEGS.to_le_bytes()); // max_discard_seg
    let align = (physical.max(logical) as u64 / SECTOR).max(1) as u32;
    put(44, &align.to_le_bytes()); // discard_sector_alignment
    put(48, &MAX_DWZ_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
    put(52, &MAX_DWZ_SEGS.to_le_bytes()); // max_write_zeroes_seg
    put(56, &[1]); // write_zeroes_may_unmap
    c
}

impl BlkBackend {
    pub(crate) fn new(
        ctx: Arc<DeviceCtx>,
        num_queues: u16,
        queue_size: u16,
        writeback: bool,
        physical: u32,
        mem: Mem,
    ) -> Self {
        let seg_max = u32::from(queue_size).saturating_sub(2).max(1);
        let features = offered_features(ctx.read_only, writeback, num_queues);
        let config = build_config(
            ctx.size,
            ctx.logical as u32,
            physical,
            seg_max,
            num_queues,
            writeback,
        );
        let scratch = (0..num_queues)
            .map(|_| Mutex::new(Scratch::new(ctx.max_descs)))
            .collect();
        BlkBackend {
            ctx,
            num_queues: usize::from(num_queues),
            queue_size: usize::from(queue_size),
            features,
            config,
            event_idx: AtomicBool::new(false),
            mem,
            scratch,
            exits: Mutex::new(Vec::new()),
        }
    }

    /// Ask every worker thread to exit.
    pub(crate) fn stop_workers(&self) {
        if let Ok(exits) = self.exits.lock() {
            for e in exits.iter() {
                let _ = e.notify();
            }
        }
    }

    /// Pop and serve every available chain of one queue; returns whether any was used.
    fn drain(&self, vring: &VringRwLock, scratch: &mut Scratch) -> io::Result<bool> {
        let mem = self.mem.memory();
        let mut used = false;
        loop {
            // Hold the vring lock only to pop; the I/O runs without it.
            let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(&*mem);
            let Some(chain) = chain else {
                if tracing::enabled!(tracing::Level::TRACE) {
                    let st = vring.get_ref();
                    let q = st.get_queue();
                    tracing::trace!(
                        "vhost-blk: queue drained: next_avail {} avail_idx {:?} size {} ready {} avail@{:#x} used@{:#x}",
                        q.next_avail(),
                        q.avail_idx(&*mem, Ordering::Acquire),
                        q.size(),
                        q.ready(),
                        q.avail_ring(),
                        q.used_ring()
                    );
                }
                break;
            };
            let head = chain.head_index();
            let len = self.ctx.process_chain(chain, &*mem, scratch);
            vring
                .add_used(head, len)
                .map_err(|e| io::Error::other(format!("add_used: {e}")))?;
            used = true;
        }
        Ok(used)
    }

    fn process_queue(&self, vring: &VringRwLock, scratch: &mut Scratch) -> io::Result<()> {
        let mut any = false;
        if self.event_idx.load(Ordering::Acquire) {
            // Standard EVENT_IDX loop: re-check after re-enabling notifications so a
            // request added in between is not left waiting for a kick that never comes.
            loop {
                vring
                    .disable_notification()
                    .map_err(|e| io::Error::other(format!("disable_notification: {e}")))?;
                any |= self.drain(vring, scratch)?;
                let more = vring
                    .enable_notification()
                    .map_err(|e| io::Error::other(format!("enable_notification: {e}")))?;
                if !more {
                    break;
                }
            }
        } else {
            any = self.drain(vring, scratch)?;
        }
        if any
            && vring
                .needs_notification()
                .map_err(|e| io::Error::other(format!("needs_notification: {e}")))?
        {
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = BitmapMmapRegion;
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> usize {
        self.queue_size
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn acked_features(&self, features: u64) {
        tracing::debug!("vhost-blk: frontend acked features {features:#x}");
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // LOG_SHMFD: see VHOST_F_LOG_ALL in offered_features (needed for save).
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // Out-of-range bytes read as zero rather than failing: newer frontends may ask
        // for a longer struct than the fields we fill in.
        (0..size as usize)
            .map(|i| {
                self.config
                    .get((offset as usize).saturating_add(i))
                    .copied()
                    .unwrap_or(0)
            })
            .collect()
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // Only the writeback byte is writable, and only with CONFIG_WCE (not offered).
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "virtio-blk config is read-only",
        ))
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        if tracing::enabled!(tracing::Level::DEBUG) {
            use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
            for r in mem.memory().iter() {
                tracing::debug!(
                    "vhost-blk: guest memory {:#x}+{:#x}",
                    r.start_addr().0,
                    r.len()
                );
            }
        }
        // The handler updates the shared GuestMemoryAtomic we already hold.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker thread per queue (num_queues <= 64 is checked at construction).
        (0..self.num_queues).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()?;
        let keep = notifier.try_clone().ok()?;
        self.exits.lock().ok()?.push(keep);
        Some((consumer, notifier))
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            tracing::warn!("vhost-blk: unexpected event set {evset:?}");
            return Ok(());
        }
        // With one queue per thread the thread-local index is always 0.
        let vring = vrings.get(usize::from(device_event)).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("event for unknown queue {device_event}"),
            )
        })?;
        let slot = self
            .scratch
            .get(thread_id)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "unknown worker thread"))?;
        let mut scratch = slot
            .lock()
            .map_err(|_| io::Error::other("scratch lock poisoned"))?;
        let r = self.process_queue(vring, &mut scratch);
        if let Err(e) = &r {
            // The library ends this queue's worker thread on error; say why.
            tracing::error!("vhost-blk: queue {thread_id} stopped: {e}");
        }
        r
    }
}
