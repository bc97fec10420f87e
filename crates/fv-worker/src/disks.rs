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
    //! Opening an image through the disk engine (VHD, VHDX, raw, differencing
    //! chains), with parents confined to the VM folder and the allowed directories.
    use super::*;

    pub fn open_image(
        path: &Path,
        read_only: bool,
        spec: &LaunchSpec,
    ) -> Result<Arc<dyn BlockDevice>> {
        let mut policy = fv_vdisk::PathPolicy::image_dir_only().allow(&spec.vm_dir);
        for d in &spec.allowed_disk_dirs {
            policy = policy.allow(d);
        }
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
        out.push(ServedDisk {
            path,
            socket,
            dev,
            stats,
            stop,
            stopping,
            thread: Some(thread),
        });
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
