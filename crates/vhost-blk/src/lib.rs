//! vhost-user-blk backend serving any [`BlockDevice`] to QEMU over a Unix socket.
//!
//! The vhost-user protocol, guest memory mapping and virtqueue handling come from the
//! rust-vmm crates (`vhost-user-backend`, `vhost`, `virtio-queue`, `vm-memory`); this
//! crate adds the virtio-blk device model: feature set, config space and request
//! execution against a [`BlockDevice`].
//!
//! ```no_run
//! # use std::sync::Arc;
//! # fn demo(dev: Arc<dyn fv_vdisk_core::BlockDevice>) -> Result<(), fv_vhost_blk::VhostBlkError> {
//! use fv_vhost_blk::{BlkBackendConfig, BlkServer};
//! let server = BlkServer::new(dev, BlkBackendConfig::new("/run/fv/disk0.sock"))?;
//! loop {
//!     server.serve()?; // returns when QEMU disconnects; serve again for a restarted QEMU
//! #   break;
//! }
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod backend;
mod request;

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fv_vdisk_core::BlockDevice;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use backend::BlkBackend;
use request::{DeviceCtx, ID_BYTES};

/// Largest queue size of a split virtqueue.
const MAX_QUEUE_SIZE: u16 = 32768;
/// Queue-to-thread masks are 64 bits wide.
const MAX_QUEUES: u16 = 64;

/// How one device is served.
#[derive(Debug, Clone)]
pub struct BlkBackendConfig {
    /// The Unix socket to listen on (QEMU connects to it as the vhost-user frontend).
    /// An existing file at this path is replaced; the socket is removed when serving ends.
    pub socket_path: PathBuf,
    /// Number of virtqueues (each gets its own worker thread). Default 1.
    pub num_queues: u16,
    /// Maximum virtqueue size, a power of two. Default 256.
    pub queue_size: u16,
    /// Serial number returned by GET_ID (truncated to 20 bytes). Empty: the device id.
    pub serial: String,
    /// `true`: offer VIRTIO_BLK_F_FLUSH and make data durable only on FLUSH requests
    /// (a volatile write cache, like Hyper-V's default). `false`: write-through, every
    /// write is flushed before it completes.
    pub writeback: bool,
}

impl BlkBackendConfig {
    pub fn new(socket_path: impl Into<PathBuf>) -> Self {
        BlkBackendConfig {
            socket_path: socket_path.into(),
            num_queues: 1,
            queue_size: 256,
            serial: String::new(),
            writeback: true,
        }
    }
}

/// Errors of the server itself (request errors go to the guest as virtio status).
#[derive(Debug, thiserror::Error)]
pub enum VhostBlkError {
    #[error("invalid vhost-user-blk configuration: {0}")]
    InvalidConfig(String),
    #[error("vhost-user socket {path}: {reason}")]
    Socket { path: PathBuf, reason: String },
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Counters of served requests, updated atomically by the queue threads.
#[derive(Debug, Default)]
pub struct BlkStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub write_zeroes: AtomicU64,
    /// Requests completed with a status other than OK (or dropped as unanswerable).
    pub errors: AtomicU64,
}

/// A plain copy of [`BlkStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlkStatsSnapshot {
    pub reads: u64,
    pub writes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub flushes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    pub errors: u64,
}

impl BlkStats {
    pub fn snapshot(&self) -> BlkStatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BlkStatsSnapshot {
            reads: l(&self.reads),
            writes: l(&self.writes),
            bytes_read: l(&self.bytes_read),
            bytes_written: l(&self.bytes_written),
            flushes: l(&self.flushes),
            discards: l(&self.discards),
            write_zeroes: l(&self.write_zeroes),
            errors: l(&self.errors),
        }
    }
}

/// Told about every byte range a guest request may have changed (writes, write-zeroes,
/// discards), before the change is made. Used for changed-block tracking.
pub trait WriteObserver: Send + Sync {
    fn written(&self, offset: u64, len: u64);
}

/// Stops a [`BlkServer`] from another thread.
#[derive(Clone)]
pub struct StopHandle {
    inner: Arc<StopState>,
}

struct StopState {
    stopped: AtomicBool,
    wake: EventFd,
    conn: Mutex<Option<ShutdownHandle>>,
}

impl StopHandle {
    /// Make the current (and every later) `serve()` return: stops waiting for a
    /// frontend, or drops the connected one.
    pub fn stop(&self) {
        self.inner.stopped.store(true, Ordering::SeqCst);
        let _ = self.inner.wake.write(1);
        if let Ok(conn) = self.inner.conn.lock() {
            if let Some(h) = conn.as_ref() {
                h.shutdown();
            }
        }
    }
}

/// One device served over one vhost-user socket.
pub struct BlkServer {
    dev: Arc<dyn BlockDevice>,
    cfg: BlkBackendConfig,
    stats: Arc<BlkStats>,
    observer: Option<Arc<dyn WriteObserver>>,
    stop: Arc<StopState>,
}

impl BlkServer {
    pub fn new(dev: Arc<dyn BlockDevice>, cfg: BlkBackendConfig) -> Result<Self, VhostBlkError> {
        if cfg.num_queues == 0 || cfg.num_queues > MAX_QUEUES {
            return Err(VhostBlkError::InvalidConfig(format!(
                "num_queues {} must be 1..={MAX_QUEUES}",
                cfg.num_queues
            )));
        }
        if cfg.queue_size < 2
            || cfg.queue_size > MAX_QUEUE_SIZE
            || !cfg.queue_size.is_power_of_two()
        {
            return Err(VhostBlkError::InvalidConfig(format!(
                "queue_size {} must be a power of two in 2..={MAX_QUEUE_SIZE}",
                cfg.queue_size
            )));
        }
        let logical = dev.logical_sector_size();
        let physical = dev.physical_sector_size();
        if logical < 512 || !logical.is_power_of_two() {
            return Err(VhostBlkError::InvalidConfig(format!(
                "logical sector size {logical} must be a power of two >= 512"
            )));
        }
        if physical < logical || !physical.is_power_of_two() {
            return Err(VhostBlkError::InvalidConfig(format!(
                "physical sector size {physical} must be a power of two >= the logical size"
            )));
        }
        let wake = EventFd::new(EFD_NONBLOCK).map_err(|source| VhostBlkError::Io {
            op: "eventfd",
            source,
        })?;
        Ok(BlkServer {
            dev,
            cfg,
            stats: Arc::new(BlkStats::default()),
            observer: None,
            stop: Arc::new(StopState {
                stopped: AtomicBool::new(false),
                wake,
                conn: Mutex::new(None),
            }),
        })
    }

    /// Report every guest-changed range to `observer` (changed-block tracking).
    pub fn with_observer(mut self, observer: Arc<dyn WriteObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    pub fn stats(&self) -> Arc<BlkStats> {
        self.stats.clone()
    }

    /// Fuzzing entry point, not API: serves every chain the guest made available on
    /// one split virtqueue of `size` entries laid out in `mem` (descriptor table,
    /// avail and used rings at the given guest addresses), as a worker thread's drain
    /// does, and returns each chain's used length. An invalid layout serves nothing.
    #[doc(hidden)]
    pub fn fuzz_split_queue(
        &self,
        mem: &GuestMemoryMmap,
        size: u16,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
    ) -> Vec<u32> {
        use virtio_queue::{Queue, QueueT};
        let ctx = self.device_ctx();
        let Ok(mut q) = Queue::new(size) else {
            return Vec::new();
        };
        let halves = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (lo, hi) = halves(desc_table);
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = halves(avail_ring);
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = halves(used_ring);
        q.set_used_ring_address(lo, hi);
        q.set_ready(true);
        if !q.is_valid(mem) {
            return Vec::new();
        }
        let mut scratch = request::Scratch::new(ctx.max_descs);
        let mut used = Vec::new();
        // One pass over the ring: a guest can make at most `size` chains available.
        for _ in 0..size {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let len = ctx.process_chain(chain, mem, &mut scratch);
            used.push(len);
            if q.add_used(mem, head, len).is_err() {
                break;
            }
        }
        used
    }

    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            inner: self.stop.clone(),
        }
    }

    fn device_ctx(&self) -> Arc<DeviceCtx> {
        let mut serial = [0u8; ID_BYTES];
        let text = if self.cfg.serial.is_empty() {
            self.dev.id()
        } else {
            self.cfg.serial.clone()
        };
        for (d, s) in serial.iter_mut().zip(text.bytes()) {
            *d = s;
        }
        let seg_max = usize::from(self.cfg.queue_size).saturating_sub(2).max(1);
        Arc::new(DeviceCtx {
            dev: self.dev.clone(),
            stats: self.stats.clone(),
            observer: self.observer.clone(),
            serial,
            write_through: !self.cfg.writeback,
            size: self.dev.size(),
            logical: u64::from(self.dev.logical_sector_size()),
            read_only: self.dev.read_only(),
            max_descs: seg_max + 2,
        })
    }

    fn socket_err(&self, reason: impl std::fmt::Display) -> VhostBlkError {
        VhostBlkError::Socket {
            path: self.cfg.socket_path.clone(),
            reason: reason.to_string(),
        }
    }

    /// Listen on the socket, accept one frontend and serve it until it disconnects
    /// (or [`StopHandle::stop`] is called). Call again to serve a reconnecting QEMU.
    pub fn serve(&self) -> Result<(), VhostBlkError> {
        if self.stop.stopped.load(Ordering::SeqCst) {
            return Ok(());
        }
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(BlkBackend::new(
            self.device_ctx(),
            self.cfg.num_queues,
            self.cfg.queue_size,
            self.cfg.writeback,
            self.dev.physical_sector_size(),
            mem.clone(),
        ));
        let result = self.serve_with(backend.clone(), mem);
        // Worker threads only exit on their exit event; never leave them behind.
        backend.stop_workers();
        result
    }

    fn serve_with(&self, backend: Arc<BlkBackend>, mem: backend::Mem) -> Result<(), VhostBlkError> {
        let mut daemon = VhostUserDaemon::new("fv-vhost-blk".to_string(), backend, mem)
            .map_err(|e| VhostBlkError::Daemon(e.to_string()))?;
        let mut listener =
            Listener::new(&self.cfg.socket_path, true).map_err(|e| self.socket_err(e))?;
        tracing::info!(
            "vhost-blk: serving {} on {}",
            self.dev.id(),
            self.cfg.socket_path.display()
        );
        if !self.wait_for_frontend(&listener)? {
            return Ok(());
        }
        daemon
            .start(&mut listener)
            .map_err(|e| VhostBlkError::Daemon(e.to_string()))?;
        if let Ok(mut conn) = self.stop.conn.lock() {
            *conn = daemon.shutdown_handle();
        }
        // A stop() between the check above and publishing the handle would be missed.
        if self.stop.stopped.load(Ordering::SeqCst) {
            daemon.request_shutdown();
        }
        let result = daemon.wait();
        if let Ok(mut conn) = self.stop.conn.lock() {
            *conn = None;
        }
        tracing::info!("vhost-blk: frontend of {} disconnected", self.dev.id());
        match result {
            Ok(()) => Ok(()),
            Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => Ok(()),
            Err(e) => Err(VhostBlkError::Daemon(e.to_string())),
        }
    }

    /// Block until a frontend connects (true) or stop() is called (false).
    fn wait_for_frontend(&self, listener: &Listener) -> Result<bool, VhostBlkError> {
        let io = |op| move |source| VhostBlkError::Io { op, source };
        let epoll = Epoll::new().map_err(io("epoll_create"))?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 0),
            )
            .map_err(io("epoll_ctl"))?;
        epoll
            .ctl(
                ControlOperation::Add,
                self.stop.wake.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 1),
            )
            .map_err(io("epoll_ctl"))?;
        let mut events = [EpollEvent::default(); 2];
        loop {
            if self.stop.stopped.load(Ordering::SeqCst) {
                return Ok(false);
            }
            match epoll.wait(-1, &mut events) {
                Ok(n) => {
                    if events.iter().take(n).any(|e| e.data() == 0) {
                        return Ok(true);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io("epoll_wait")(e)),
            }
        }
    }
}
