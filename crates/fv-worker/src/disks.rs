//! Opens the VM's hard drives and serves each to QEMU: over vhost-user-blk (one
//! thread each) or over NBD (fv-nbd), as `qemu_cmd::disk_transport` decides.

use crate::qemu_cmd::{self, DiskTransport};
use anyhow::{anyhow, Context, Result};
use fv_vdisk_core::{BlockDevice, Extent};
use fv_vhost_blk::{BlkBackendConfig, BlkServer, BlkStats, StopHandle};
use fv_worker_proto::LaunchSpec;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub struct ServedDisk {
    pub path: PathBuf,
    pub socket: PathBuf,
    pub dev: Arc<dyn BlockDevice>,
    /// Request counters; the same type for both transports.
    pub stats: Arc<BlkStats>,
    server: Server,
}

enum Server {
    Vhost {
        stop: StopHandle,
        stopping: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    },
    Nbd(Option<fv_nbd::RunningServer>),
}

/// Counts NBD-served requests into a [`BlkStats`], so `stats` looks the same for
/// every transport (the vhost-user back-end counts its own).
struct Counted {
    inner: Arc<dyn BlockDevice>,
    stats: Arc<BlkStats>,
}

impl Counted {
    fn count<T>(
        &self,
        r: fv_vdisk_core::Result<T>,
        ok: impl FnOnce(&BlkStats),
    ) -> fv_vdisk_core::Result<T> {
        match &r {
            Ok(_) => ok(&self.stats),
            Err(_) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }
}

impl BlockDevice for Counted {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn logical_sector_size(&self) -> u32 {
        self.inner.logical_sector_size()
    }
    fn physical_sector_size(&self) -> u32 {
        self.inner.physical_sector_size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> fv_vdisk_core::Result<()> {
        let n = buf.len() as u64;
        let r = self.inner.read_at(offset, buf);
        self.count(r, |s| {
            s.reads.fetch_add(1, Ordering::Relaxed);
            s.bytes_read.fetch_add(n, Ordering::Relaxed);
        })
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> fv_vdisk_core::Result<()> {
        let r = self.inner.write_at(offset, buf);
        self.count(r, |s| {
            s.writes.fetch_add(1, Ordering::Relaxed);
            s.bytes_written
                .fetch_add(buf.len() as u64, Ordering::Relaxed);
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> fv_vdisk_core::Result<()> {
        let r = self.inner.write_zeroes(offset, len);
        self.count(r, |s| {
            s.write_zeroes.fetch_add(1, Ordering::Relaxed);
        })
    }
    fn discard(&self, offset: u64, len: u64) -> fv_vdisk_core::Result<()> {
        let r = self.inner.discard(offset, len);
        self.count(r, |s| {
            s.discards.fetch_add(1, Ordering::Relaxed);
        })
    }
    fn flush(&self) -> fv_vdisk_core::Result<()> {
        let r = self.inner.flush();
        self.count(r, |s| {
            s.flushes.fetch_add(1, Ordering::Relaxed);
        })
    }
    fn block_status(&self, offset: u64, len: u64) -> fv_vdisk_core::Result<Vec<Extent>> {
        self.inner.block_status(offset, len)
    }
    fn id(&self) -> String {
        self.inner.id()
    }
}

pub mod open {
    //! Opening an image through the disk engine (VHD, VHDX, raw, differencing
    //! chains), with parents confined to the VM folder and the allowed directories.
    use super::*;

    /// Where differencing parents may be: the VM folder and the allowed folders.
    pub fn policy(spec: &LaunchSpec) -> fv_vdisk::PathPolicy {
        let mut policy = fv_vdisk::PathPolicy::image_dir_only().allow(&spec.vm_dir);
        for d in &spec.allowed_disk_dirs {
            policy = policy.allow(d);
        }
        policy
    }

    pub fn open_image(
        path: &Path,
        read_only: bool,
        spec: &LaunchSpec,
    ) -> Result<Arc<dyn BlockDevice>> {
        let policy = policy(spec);
        // A writable open replays a dirty VHDX log left by a crash; a read-only open
        // must not modify the file.
        let opts = fv_vdisk::OpenOptions {
            read_only,
            replay_log: !read_only,
            policy,
        };
        let disk =
            fv_vdisk::open(path, &opts).with_context(|| format!("open {}", path.display()))?;
        Ok(Arc::new(disk))
    }
}

/// Open every hard drive and start serving it; waits until each socket exists so
/// QEMU can connect right away.
pub fn start(spec: &LaunchSpec, force_vhost_user: bool) -> Result<Vec<ServedDisk>> {
    let mut out: Vec<ServedDisk> = Vec::new();
    for (i, hd) in spec.config.hard_drives.iter().enumerate() {
        match start_one(spec, i, hd, force_vhost_user) {
            Ok(d) => out.push(d),
            Err(e) => {
                stop_all(&mut out);
                return Err(e);
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for d in &out {
        while !d.socket.exists() {
            if Instant::now() > deadline {
                let p = d.socket.clone();
                stop_all(&mut out);
                return Err(anyhow!("disk socket {} did not appear", p.display()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(out)
}

fn start_one(
    spec: &LaunchSpec,
    i: usize,
    hd: &fv_model::HardDrive,
    force_vhost_user: bool,
) -> Result<ServedDisk> {
    let path = qemu_cmd::resolve(&spec.vm_dir, &hd.path);
    let dev = open::open_image(&path, hd.read_only, spec)?;
    let transport = qemu_cmd::disk_transport(&spec.config, hd, &spec.accel, force_vhost_user);
    let socket = qemu_cmd::disk_socket(&spec.runtime_dir, i, transport);
    if transport != DiskTransport::VhostUser {
        let stats = Arc::new(BlkStats::default());
        let counted: Arc<dyn BlockDevice> = Arc::new(Counted {
            inner: dev.clone(),
            stats: stats.clone(),
        });
        let opts = fv_nbd::ExportOptions {
            name: qemu_cmd::nbd_export(i),
            description: format!("fv-hd{i}"),
            read_only: hd.read_only,
            ..Default::default()
        };
        let server = fv_nbd::Server::bind(&fv_nbd::ListenAddr::Unix(socket.clone()), counted, opts)
            .map_err(|e| anyhow!("disk {}: {e}", path.display()))?;
        return Ok(ServedDisk {
            path,
            socket,
            dev,
            stats,
            server: Server::Nbd(Some(server.spawn())),
        });
    }
    let mut cfg = BlkBackendConfig::new(&socket);
    cfg.serial = format!("fv-hd{i}");
    let server =
        BlkServer::new(dev.clone(), cfg).map_err(|e| anyhow!("disk {}: {e}", path.display()))?;
    let stats = server.stats();
    let stop = server.stop_handle();
    let stopping = Arc::new(AtomicBool::new(false));
    let stop2 = stopping.clone();
    let label = path.display().to_string();
    let thread = std::thread::Builder::new()
        .name(format!("vhost-disk{i}"))
        .stack_size(256 << 10)
        .spawn(move || {
            // One frontend per worker; a disconnect outside of stop means QEMU
            // went away, and serving again lets a (future) reconnect succeed.
            let mut failures = 0;
            loop {
                match server.serve() {
                    Ok(()) => {}
                    Err(e) => {
                        tracing::error!("vhost-blk {label}: {e}");
                        failures += 1;
                        if failures > 3 {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
            }
        })
        .context("spawn vhost thread")?;
    Ok(ServedDisk {
        path,
        socket,
        dev,
        stats,
        server: Server::Vhost {
            stop,
            stopping,
            thread: Some(thread),
        },
    })
}

/// Stop serving, join the threads and flush every disk. Returns flush errors.
pub fn stop_all(disks: &mut [ServedDisk]) -> Vec<String> {
    let mut errs = Vec::new();
    for d in disks.iter() {
        if let Server::Vhost { stop, stopping, .. } = &d.server {
            stopping.store(true, Ordering::SeqCst);
            stop.stop();
        }
    }
    for d in disks.iter_mut() {
        match &mut d.server {
            Server::Vhost { thread, .. } => {
                if let Some(t) = thread.take() {
                    let _ = t.join();
                }
            }
            Server::Nbd(server) => {
                // Lets in-flight requests finish, then flushes the device.
                if let Some(s) = server.take() {
                    if let Err(e) = s.stop() {
                        errs.push(format!("NBD server for {}: {e}", d.path.display()));
                    }
                }
            }
        }
        if let Err(e) = d.dev.flush() {
            errs.push(format!("flush {}: {e}", d.path.display()));
        }
        let _ = std::fs::remove_file(&d.socket);
    }
    errs
}
