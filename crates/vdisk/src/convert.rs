//! Convert any image into a new fixed or dynamic image (`ops::convert` and
//! `ops::convert_with` re-export the entry points).
//!
//! The copy is a pipeline: the source's data map comes from SEEK_DATA/SEEK_HOLE
//! (raw files) or the images' allocation extents, a reader thread reads the data in
//! [`CHUNK`]-sized pieces and finds the all-zero [`ZERO_GRANULE`]s, and this thread
//! writes the rest in large sequential writes while the next pieces are read (a
//! bounded pool of buffers). Nothing is made durable until one flush at the end,
//! as `qemu-img convert` does with its default cache mode; meanwhile the kernel is
//! asked to start writing back what was written ([`WRITEBACK_EVERY`]) so that the
//! final flush does not wait for the whole image to reach the disk.

use crate::ops::{dir_of, free_space, ro, sync_dir};
use crate::{open_format, Disk, LayerFile, OpenOptions};
use fv_vdisk_core::{
    BlockDevice, CreateSpec, DiskError, DiskFormat, DiskKind, ExtentState, Progress, RawLayer,
    Result,
};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;

/// Bytes read per piece (a multiple of every zero granule and sector size).
const CHUNK: u64 = 4 << 20;
/// Buffers in flight between the reader and the writer.
const POOL: usize = 6;
/// Unit of zero detection: an all-zero granule is not written (the new image reads
/// zeros there already), so all-zero blocks are never allocated.
const ZERO_GRANULE: u64 = 64 << 10;
/// Ask for writeback of the output after this many bytes written.
const WRITEBACK_EVERY: u64 = 64 << 20;
/// Window of one allocation query on an image source.
const STATUS_WINDOW: u64 = 1 << 30;
const MIB: u32 = 1 << 20;
const VHDX_DEFAULT_BLOCK: u32 = 32 * MIB;
const VHD_DEFAULT_BLOCK: u32 = 2 * MIB;

/// What a conversion may choose about its output beyond format and type.
#[derive(Debug, Clone, Default)]
pub struct ConvertOptions {
    /// Allocation block size of the new image in bytes; 0 = the format's default
    /// (VHDX 32 MiB, VHD 2 MiB), as `qemu-img convert -o block_size=`.
    pub block_size: u32,
}

/// Check a requested output block size against what the target format allows:
/// VHDX 1 MiB to 256 MiB, VHD 512 KiB to 256 MiB, both powers of two; only
/// dynamic VHDs, and VHDX of either type, have blocks (0 = the default, always valid).
pub fn check_block_size(to: DiskFormat, kind: DiskKind, block_size: u32) -> Result<()> {
    if block_size == 0 {
        return Ok(());
    }
    let (name, min) = match (to, kind) {
        (DiskFormat::Vhdx, _) => ("VHDX", MIB),
        (DiskFormat::Vhd, DiskKind::Dynamic) => ("dynamic VHD", 512 << 10),
        (DiskFormat::Vhd, _) => {
            return Err(DiskError::InvalidArgument(
                "a fixed VHD has no allocation blocks, so it takes no block size".into(),
            ))
        }
        (DiskFormat::Raw, _) => {
            return Err(DiskError::InvalidArgument(
                "a raw image has no allocation blocks, so it takes no block size".into(),
            ))
        }
    };
    let max = 256 * MIB;
    if !block_size.is_power_of_two() || !(min..=max).contains(&block_size) {
        let min = if min >= MIB {
            format!("{} MiB", min >> 20)
        } else {
            format!("{} KiB", min >> 10)
        };
        return Err(DiskError::InvalidArgument(format!(
            "block size {block_size} bytes is not valid for a {name}: it must be a power of two from {min} to {} MiB",
            max >> 20
        )));
    }
    Ok(())
}

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
    let f = File::open(path).map_err(|e| DiskError::io("open", path, e))?;
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

/// [`convert`] with the source's open options (parent policy, log replay).
pub fn convert_with(
    src: &Path,
    dst: &Path,
    to: DiskFormat,
    kind: DiskKind,
    opts: &OpenOptions,
    progress: Progress<'_>,
) -> Result<()> {
    convert_with_options(
        src,
        dst,
        to,
        kind,
        opts,
        &ConvertOptions::default(),
        progress,
    )
}

/// [`convert_with`] with output choices (block size).
pub fn convert_with_options(
    src: &Path,
    dst: &Path,
    to: DiskFormat,
    kind: DiskKind,
    opts: &OpenOptions,
    out_opts: &ConvertOptions,
    progress: Progress<'_>,
) -> Result<()> {
    if kind == DiskKind::Differencing {
        return Err(DiskError::InvalidArgument(
            "convert produces fixed or dynamic disks".into(),
        ));
    }
    check_block_size(to, kind, out_opts.block_size)?;
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
    copy_disk(&disk, dst, to, kind, out_opts.block_size, progress)
}

/// The block size the output will have (for the space estimate).
fn effective_block(to: DiskFormat, block_size: u32) -> u64 {
    match (to, block_size) {
        (_, b) if b != 0 => u64::from(b),
        (DiskFormat::Vhdx, _) => u64::from(VHDX_DEFAULT_BLOCK),
        _ => u64::from(VHD_DEFAULT_BLOCK),
    }
}

/// Bytes the copy will store: fixed = the whole size; otherwise the blocks the
/// data map touches (all-zero data may make the result smaller).
fn estimate(pieces: &[Piece], size: u64, to: DiskFormat, kind: DiskKind, block: u64) -> u64 {
    if kind == DiskKind::Fixed && to != DiskFormat::Raw {
        return size.saturating_add(1 << 20);
    }
    let mut blocks = 0u64;
    let mut last: Option<u64> = None;
    for p in pieces {
        let (first, end) = (p.offset / block, p.end().div_ceil(block));
        let first = match last {
            Some(l) if l >= first => l + 1,
            _ => first,
        };
        if first < end {
            blocks += end - first;
            last = Some(end - 1);
        }
    }
    blocks
        .saturating_mul(block + 512)
        .saturating_add((size / block).saturating_mul(4))
        .saturating_add(1 << 20)
}

/// One range of the source to copy (inside one [`CHUNK`]-aligned window).
#[derive(Debug, Clone, Copy)]
struct Piece {
    offset: u64,
    len: u64,
}

impl Piece {
    fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Data ranges `[start, end)` of the source, ascending, merged.
fn data_extents(disk: &Disk) -> Result<Vec<(u64, u64)>> {
    let size = disk.size();
    if let [LayerFile::Raw(raw)] = disk.layers() {
        if let Some(path) = fv_vdisk_core::Layer::path(raw) {
            return raw_data_extents(path, size);
        }
    }
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut w = 0;
    while w < size {
        let wl = STATUS_WINDOW.min(size - w);
        for e in disk.block_status(w, wl)? {
            if e.state != ExtentState::Data || e.length == 0 {
                continue;
            }
            let end = e.offset.saturating_add(e.length).min(size);
            match out.last_mut() {
                Some(l) if l.1 >= e.offset => l.1 = l.1.max(end),
                _ => out.push((e.offset, end)),
            }
        }
        w += wl;
    }
    Ok(out)
}

/// Data ranges of a raw file from SEEK_DATA/SEEK_HOLE (holes read zero and are
/// skipped). A filesystem without them reports the whole file as data.
fn raw_data_extents(path: &Path, size: u64) -> Result<Vec<(u64, u64)>> {
    use rustix::fs::{seek, SeekFrom};
    use rustix::io::Errno;
    let f = File::open(path).map_err(|e| DiskError::io("open", path, e))?;
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let start = match seek(&f, SeekFrom::Data(pos)) {
            Ok(s) => s,
            // No data after `pos`.
            Err(Errno::NXIO) => break,
            Err(Errno::INVAL | Errno::OPNOTSUPP) => {
                out.push((pos, size));
                break;
            }
            Err(e) => return Err(DiskError::io("seek to data in", path, e.into())),
        };
        if start >= size {
            break;
        }
        let end = match seek(&f, SeekFrom::Hole(start)) {
            Ok(e) => e.min(size),
            Err(Errno::NXIO) => size,
            Err(e) => return Err(DiskError::io("seek to a hole in", path, e.into())),
        };
        if end <= start {
            // A file changing under us; copy the rest rather than loop.
            out.push((start, size));
            break;
        }
        out.push((start, end));
        pos = end;
    }
    Ok(out)
}

/// Cut the data map into pieces, one per [`CHUNK`]-aligned window that holds data,
/// each spanning the window's first to last data byte (the gaps read as zeros and
/// are dropped by zero detection, and one read beats many small ones).
fn pieces(extents: &[(u64, u64)]) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::new();
    for &(s, e) in extents {
        let mut pos = s;
        while pos < e {
            let window_end = (pos / CHUNK + 1) * CHUNK;
            let end = e.min(window_end);
            match out.last_mut() {
                Some(p) if p.offset / CHUNK == pos / CHUNK => p.len = end - p.offset,
                _ => out.push(Piece {
                    offset: pos,
                    len: end - pos,
                }),
            }
            pos = end;
        }
    }
    out
}

fn all_zero(b: &[u8]) -> bool {
    // OR-folding fixed-size pieces vectorises; an early exit per piece keeps data
    // fast to reject.
    b.chunks(4096)
        .all(|c| c.iter().fold(0u8, |acc, &x| acc | x) == 0)
}

/// The ranges of `buf` (read at `offset`) that are not all zeros, in units of
/// [`ZERO_GRANULE`]s aligned to the disk, as `(start, end)` within `buf`.
fn nonzero_runs(offset: u64, buf: &[u8], runs: &mut Vec<(usize, usize)>) {
    runs.clear();
    let len = buf.len();
    let mut pos = 0usize;
    while pos < len {
        let abs = offset + pos as u64;
        let next = ((abs / ZERO_GRANULE + 1) * ZERO_GRANULE - offset) as usize;
        let end = next.min(len);
        if !all_zero(&buf[pos..end]) {
            match runs.last_mut() {
                Some(r) if r.1 == pos => r.1 = end,
                _ => runs.push((pos, end)),
            }
        }
        pos = end;
    }
}

/// A piece read by the reader thread, with its non-zero runs.
struct Filled {
    piece: Piece,
    buf: Vec<u8>,
    runs: Vec<(usize, usize)>,
}

fn create_output(
    disk: &dyn BlockDevice,
    partial: &Path,
    to: DiskFormat,
    kind: DiskKind,
    block_size: u32,
) -> Result<LayerFile> {
    let size = disk.size();
    Ok(match to {
        DiskFormat::Raw => LayerFile::Raw(RawLayer::create(partial, size)?),
        DiskFormat::Vhd => LayerFile::Vhd(fv_vhd::VhdFile::create(
            partial,
            &CreateSpec {
                virtual_size: size,
                kind,
                block_size,
                logical_sector_size: 512,
                physical_sector_size: 512,
                parent: None,
            },
        )?),
        DiskFormat::Vhdx => LayerFile::Vhdx(fv_vhdx::VhdxFile::create(
            partial,
            &CreateSpec {
                virtual_size: size,
                kind,
                block_size,
                logical_sector_size: disk.logical_sector_size(),
                physical_sector_size: disk.physical_sector_size().max(512),
                parent: None,
            },
        )?),
    })
}

fn copy_disk(
    disk: &Disk,
    dst: &Path,
    to: DiskFormat,
    kind: DiskKind,
    block_size: u32,
    progress: Progress<'_>,
) -> Result<()> {
    let size = disk.size();
    let work = pieces(&data_extents(disk)?);
    let block = effective_block(to, block_size);
    ensure_space(&dir_of(dst), estimate(&work, size, to, kind, block))?;
    let partial = partial_path(dst);
    let _ = std::fs::remove_file(&partial);
    let guard = RemoveOnDrop(Some(partial.clone()));
    let out = create_output(disk, &partial, to, kind, block_size)?;
    copy_pieces(disk, &out, &partial, &work, progress)?;
    out.layer().flush()?;
    drop(out);
    std::fs::rename(&partial, dst).map_err(|e| DiskError::io("rename", dst, e))?;
    std::mem::forget(guard);
    sync_dir(&dir_of(dst));
    Ok(())
}

/// Copy the non-zero parts of `work` from `disk` into the fresh `out` (at `path`):
/// a reader thread fills buffers from a bounded pool while this thread writes.
fn copy_pieces(
    disk: &Disk,
    out: &LayerFile,
    path: &Path,
    work: &[Piece],
    progress: Progress<'_>,
) -> Result<()> {
    let size = disk.size();
    // A second handle only to ask for writeback; none is fatal.
    let wb = File::open(path).ok();
    let buf_len = work.iter().map(|p| p.len).max().unwrap_or(0) as usize;
    let (filled_tx, filled_rx) = mpsc::sync_channel::<Result<Filled>>(POOL);
    let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
    for _ in 0..POOL.min(work.len()) {
        let _ = free_tx.send(vec![0u8; buf_len]);
    }
    std::thread::scope(|s| {
        let reader = s.spawn(move || {
            for &piece in work {
                // The writer gone (error or cancel) ends the reader.
                let Ok(mut buf) = free_rx.recv() else {
                    return;
                };
                let n = piece.len as usize;
                let mut runs = Vec::new();
                let r = buf
                    .get_mut(..n)
                    .ok_or_else(|| DiskError::InvalidArgument("convert buffer too small".into()))
                    .and_then(|b| {
                        disk.read_at(piece.offset, b)?;
                        nonzero_runs(piece.offset, b, &mut runs);
                        Ok(())
                    });
                let failed = r.is_err();
                let msg = r.map(|()| Filled { piece, buf, runs });
                if filled_tx.send(msg).is_err() || failed {
                    return;
                }
            }
        });
        let r = write_pieces(
            out.layer(),
            wb.as_ref(),
            size,
            &filled_rx,
            &free_tx,
            progress,
        );
        // Unblock a reader waiting for a buffer or a queue slot before joining it.
        drop(filled_rx);
        drop(free_tx);
        let joined = reader.join();
        r?;
        joined.map_err(|_| DiskError::InvalidArgument("convert: the reader thread panicked".into()))
    })
}

fn write_pieces(
    out: &dyn fv_vdisk_core::Layer,
    wb: Option<&File>,
    size: u64,
    filled: &mpsc::Receiver<Result<Filled>>,
    free: &mpsc::Sender<Vec<u8>>,
    progress: Progress<'_>,
) -> Result<()> {
    let mut since_wb = 0u64;
    // Ends when the reader has sent every piece (or stopped after an error it sent).
    for msg in filled.iter() {
        let f = msg?;
        for &(a, b) in &f.runs {
            let data = f.buf.get(a..b).ok_or_else(|| {
                DiskError::InvalidArgument("convert: run outside its buffer".into())
            })?;
            out.write(f.piece.offset + a as u64, data)?;
            since_wb += data.len() as u64;
        }
        if since_wb >= WRITEBACK_EVERY {
            since_wb = 0;
            if let Some(w) = wb {
                // DONTNEED starts writeback of the dirty pages (and drops clean
                // ones); the flush at the end still decides durability.
                let _ = rustix::fs::fadvise(w, 0, None, rustix::fs::Advice::DontNeed);
            }
        }
        let _ = free.send(f.buf);
        if !progress(f.piece.end(), size) {
            return Err(DiskError::Cancelled);
        }
    }
    progress(size, size);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn raw_data_map_follows_the_holes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sparse.raw");
        let f = File::create(&p).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[1u8; 8192], 1 << 20).unwrap();
        f.write_all_at(&[2u8; 4096], 40 << 20).unwrap();
        f.sync_all().unwrap();
        let ext = raw_data_extents(&p, 64 << 20).unwrap();
        // Filesystems may round data up to their allocation unit, never down.
        assert_eq!(ext.len(), 2, "{ext:?}");
        assert!(
            ext[0].0 <= 1 << 20 && ext[0].1 >= (1 << 20) + 8192,
            "{ext:?}"
        );
        assert!(
            ext[1].0 <= 40 << 20 && ext[1].1 >= (40 << 20) + 4096,
            "{ext:?}"
        );
        assert!(ext[0].1 - ext[0].0 < 4 << 20 && ext[1].1 - ext[1].0 < 4 << 20);
    }

    #[test]
    fn pieces_stay_inside_one_chunk_window() {
        let p = pieces(&[
            (512, 4096),
            (8192, CHUNK + 100),
            (3 * CHUNK, 3 * CHUNK + 512),
        ]);
        let got: Vec<(u64, u64)> = p.iter().map(|p| (p.offset, p.end())).collect();
        assert_eq!(
            got,
            vec![
                (512, CHUNK),
                (CHUNK, CHUNK + 100),
                (3 * CHUNK, 3 * CHUNK + 512)
            ]
        );
    }

    #[test]
    fn zero_granules_are_skipped_on_disk_aligned_boundaries() {
        let g = ZERO_GRANULE as usize;
        // A buffer read at 512 bytes before a granule boundary.
        let mut b = vec![0u8; 512 + 3 * g];
        b[10] = 1; // the partial granule before the boundary
        b[512 + 2 * g + 7] = 1; // the third full granule
        let mut runs = Vec::new();
        nonzero_runs(ZERO_GRANULE * 5 - 512, &b, &mut runs);
        assert_eq!(runs, vec![(0, 512), (512 + 2 * g, 512 + 3 * g)]);
        nonzero_runs(0, &vec![0u8; 2 * g], &mut runs);
        assert!(runs.is_empty());
    }
}
