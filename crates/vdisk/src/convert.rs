//! Convert any image into a new fixed or dynamic image (moved out of ops.rs;
//! `ops::convert`/`ops::convert_with` re-export these).

use crate::ops::{dir_of, free_space, ro, sync_dir};
use crate::{open_format, LayerFile, OpenOptions};
use fv_vdisk_core::{
    BlockDevice, CreateSpec, DiskError, DiskFormat, DiskKind, ExtentState, Layer, Progress,
    RawLayer, Result,
};
use std::path::{Path, PathBuf};
use std::process::Command;

const COPY_CHUNK: usize = 1 << 20;

fn ensure_space(dir: &Path, needed: u64) -> Result<()> {
    let available = free_space(dir)?;
    if available < needed {
        return Err(DiskError::NoSpace {
            path: dir.to_path_buf(),
            needed,
            available,
        });
    }
    Ok(())
}

/// Removes a file on drop unless disarmed (partial outputs, temporary files).
struct RemoveOnDrop(Option<PathBuf>);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn is_qcow2(path: &Path) -> Result<Option<u64>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).map_err(|e| DiskError::io("open", path, e))?;
    let mut h = [0u8; 32];
    if f.read_exact_at(&mut h, 0).is_err() || &h[..4] != b"QFI\xfb" {
        return Ok(None);
    }
    let mut s = [0u8; 8];
    s.copy_from_slice(&h[24..32]);
    Ok(Some(u64::from_be_bytes(s)))
}

fn partial_path(dst: &Path) -> PathBuf {
    let mut s = dst.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

/// Convert any image (a whole chain is flattened; qcow2 goes through `qemu-img
/// convert -O raw` into a temporary file beside the destination) into a new
/// fixed or dynamic image. The source is opened read-only; the output is written
/// to `<dst>.partial` and renamed into place when complete.
pub fn convert(
    src: &Path,
    dst: &Path,
    to: DiskFormat,
    kind: DiskKind,
    progress: Progress<'_>,
) -> Result<()> {
    convert_with(src, dst, to, kind, &ro(), progress)
}

pub fn convert_with(
    src: &Path,
    dst: &Path,
    to: DiskFormat,
    kind: DiskKind,
    opts: &OpenOptions,
    progress: Progress<'_>,
) -> Result<()> {
    if kind == DiskKind::Differencing {
        return Err(DiskError::InvalidArgument(
            "convert produces fixed or dynamic disks".into(),
        ));
    }
    if dst.exists() {
        return Err(DiskError::Refused {
            path: dst.to_path_buf(),
            reason: "destination exists".into(),
        });
    }
    let dst_dir = dir_of(dst);
    let opts = OpenOptions {
        read_only: true,
        ..opts.clone()
    };
    let mut _tmp = RemoveOnDrop(None);
    let disk = if let Some(vsize) = is_qcow2(src)? {
        let qsize = std::fs::metadata(src)
            .map_err(|e| DiskError::io("stat", src, e))?
            .len();
        ensure_space(&dst_dir, qsize.min(vsize))?;
        let name = dst
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dst_dir.join(format!(".{name}.{}.qcow2-src.raw", std::process::id()));
        _tmp = RemoveOnDrop(Some(tmp.clone()));
        let out = Command::new("qemu-img")
            .arg("convert")
            .args(["-f", "qcow2", "-O", "raw"])
            .arg(src)
            .arg(&tmp)
            .output()
            .map_err(|e| DiskError::io("run qemu-img", src, e))?;
        if !out.status.success() {
            return Err(DiskError::Unsupported {
                path: src.to_path_buf(),
                what: format!(
                    "qemu-img convert failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        open_format(&tmp, Some(DiskFormat::Raw), &opts)?
    } else {
        crate::open(src, &opts)?
    };
    copy_disk(&disk, dst, to, kind, progress)
}

/// Bytes the copy will store: fixed = the whole size; dynamic = touched blocks.
fn estimate(disk: &dyn BlockDevice, to: DiskFormat, kind: DiskKind, block: u64) -> Result<u64> {
    let size = disk.size();
    if kind == DiskKind::Fixed && to != DiskFormat::Raw {
        return Ok(size + (1 << 20));
    }
    let mut blocks = std::collections::BTreeSet::new();
    for e in disk.block_status(0, size)? {
        if e.state == ExtentState::Data {
            for b in e.offset / block..(e.offset + e.length).div_ceil(block) {
                blocks.insert(b);
            }
        }
    }
    Ok(blocks.len() as u64 * (block + 512) + size / block * 4 + (1 << 20))
}

fn copy_disk(
    disk: &dyn BlockDevice,
    dst: &Path,
    to: DiskFormat,
    kind: DiskKind,
    progress: Progress<'_>,
) -> Result<()> {
    let size = disk.size();
    ensure_space(&dir_of(dst), estimate(disk, to, kind, 2 << 20)?)?;
    let partial = partial_path(dst);
    let _ = std::fs::remove_file(&partial);
    let guard = RemoveOnDrop(Some(partial.clone()));
    let out: LayerFile = match to {
        DiskFormat::Raw => LayerFile::Raw(RawLayer::create(&partial, size)?),
        DiskFormat::Vhd => LayerFile::Vhd(fv_vhd::VhdFile::create(
            &partial,
            &CreateSpec {
                virtual_size: size,
                kind,
                block_size: 0,
                logical_sector_size: 512,
                physical_sector_size: 512,
                parent: None,
            },
        )?),
        DiskFormat::Vhdx => LayerFile::Vhdx(fv_vhdx::VhdxFile::create(
            &partial,
            &CreateSpec {
                virtual_size: size,
                kind,
                block_size: 0,
                logical_sector_size: disk.logical_sector_size(),
                physical_sector_size: disk.physical_sector_size().max(512),
                parent: None,
            },
        )?),
    };
    copy_extents(disk, out.layer(), size, progress)?;
    out.layer().flush()?;
    drop(out);
    std::fs::rename(&partial, dst).map_err(|e| DiskError::io("rename", dst, e))?;
    std::mem::forget(guard);
    sync_dir(&dir_of(dst));
    Ok(())
}

/// Copy every data extent of `disk` that is not all zeros into a fresh `out`.
fn copy_extents(
    disk: &dyn BlockDevice,
    out: &dyn Layer,
    size: u64,
    progress: Progress<'_>,
) -> Result<()> {
    let mut buf = vec![0u8; COPY_CHUNK];
    let window = 1u64 << 30;
    let mut w = 0;
    while w < size {
        let wl = window.min(size - w);
        for e in disk.block_status(w, wl)? {
            if e.state != ExtentState::Data {
                continue;
            }
            let mut pos = e.offset;
            while pos < e.offset + e.length {
                let n = (e.offset + e.length - pos).min(COPY_CHUNK as u64) as usize;
                disk.read_at(pos, &mut buf[..n])?;
                if buf[..n].iter().any(|&b| b != 0) {
                    out.write(pos, &buf[..n])?;
                }
                pos += n as u64;
                if !progress(pos, size) {
                    return Err(DiskError::Cancelled);
                }
            }
        }
        w += wl;
    }
    progress(size, size);
    Ok(())
}
