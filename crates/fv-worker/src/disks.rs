//! Opens the VM's hard drives and serves each over vhost-user-blk on its own thread.

use anyhow::{anyhow, Context, Result};
use fv_vdisk_core::BlockDevice;
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
    pub stats: Arc<BlkStats>,
    stop: StopHandle,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

pub mod open {
    //! Opening an image. Until the chain/format engine (`fv-vdisk`) is wired in,
    //! raw images are served through vdisk-core's RawLayer.
    use super::*;
    use fv_vdisk_core::{Extent, Layer, RawLayer};

    struct RawDevice {
        layer: RawLayer,
        id: String,
    }

    impl BlockDevice for RawDevice {
        fn size(&self) -> u64 {
            self.layer.info().virtual_size
        }
        fn logical_sector_size(&self) -> u32 {
            self.layer.info().logical_sector_size
        }
        fn physical_sector_size(&self) -> u32 {
            self.layer.info().physical_sector_size
        }
        fn read_only(&self) -> bool {
            self.layer.read_only()
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> fv_vdisk_core::Result<()> {
            let mut absent = Vec::new();
            self.layer.read_layer(offset, buf, &mut absent)
        }
        fn write_at(&self, offset: u64, buf: &[u8]) -> fv_vdisk_core::Result<()> {
            self.layer.write(offset, buf)
        }
        fn write_zeroes(&self, offset: u64, len: u64) -> fv_vdisk_core::Result<()> {
            self.layer.write_zeroes(offset, len)
        }
        fn discard(&self, offset: u64, len: u64) -> fv_vdisk_core::Result<()> {
            self.layer.discard(offset, len)
        }
        fn flush(&self) -> fv_vdisk_core::Result<()> {
            self.layer.flush()
        }
        fn block_status(&self, offset: u64, len: u64) -> fv_vdisk_core::Result<Vec<Extent>> {
            self.layer.extents(offset, len)
        }
        fn id(&self) -> String {
            self.id.clone()
        }
    }

    pub fn open_image(path: &Path, read_only: bool, _spec: &LaunchSpec) -> Result<Arc<dyn BlockDevice>> {
        let layer = RawLayer::open(path, read_only).with_context(|| format!("open {}", path.display()))?;
        let id = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(Arc::new(RawDevice { layer, id }))
    }
}

/// Open every hard drive and start serving it; waits until each socket exists so
/// QEMU can connect right away.
pub fn start(spec: &LaunchSpec) -> Result<Vec<ServedDisk>> {
    let mut out: Vec<ServedDisk> = Vec::new();
    for (i, hd) in spec.config.hard_drives.iter().enumerate() {
        let path = crate::qemu_cmd::resolve(&spec.vm_dir, &hd.path);
        let dev = match open::open_image(&path, hd.read_only, spec) {
            Ok(d) => d,
            Err(e) => {
                stop_all(&mut out);
                return Err(e);
            }
        };
        let socket = spec.runtime_dir.join(format!("disk-{i}.sock"));
        let mut cfg = BlkBackendConfig::new(&socket);
        cfg.serial = format!("fv-hd{i}");
        let server = match BlkServer::new(dev.clone(), cfg) {
            Ok(s) => s,
            Err(e) => {
                stop_all(&mut out);
                return Err(anyhow!("disk {}: {e}", path.display()));
            }
        };
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
        out.push(ServedDisk { path, socket, dev, stats, stop, stopping, thread: Some(thread) });
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for d in &out {
        while !d.socket.exists() {
            if Instant::now() > deadline {
                let p = d.socket.clone();
                stop_all(&mut out);
                return Err(anyhow!("vhost-user socket {} did not appear", p.display()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(out)
}

/// Stop serving, join the threads and flush every disk. Returns flush errors.
pub fn stop_all(disks: &mut [ServedDisk]) -> Vec<String> {
    let mut errs = Vec::new();
    for d in disks.iter() {
        d.stopping.store(true, Ordering::SeqCst);
        d.stop.stop();
    }
    for d in disks.iter_mut() {
        if let Some(t) = d.thread.take() {
            let _ = t.join();
        }
        if let Err(e) = d.dev.flush() {
            errs.push(format!("flush {}: {e}", d.path.display()));
        }
        let _ = std::fs::remove_file(&d.socket);
    }
    errs
}
