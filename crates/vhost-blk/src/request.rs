//! Parsing and execution of one virtio-blk request from a descriptor chain.
//!
//! Everything here treats guest memory as hostile: descriptor addresses and lengths
//! are checked against the guest memory map before use, request ranges are checked
//! against the device, and the request framing is not trusted (the header, data and
//! status may be split across descriptors in any way, as the virtio spec allows).

use std::ops::Deref;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use fv_vdisk_core::BlockDevice;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use crate::{BlkStats, WriteObserver};

/// virtio-blk always counts sectors in 512-byte units, whatever the block size.
pub(crate) const SECTOR: u64 = 512;
/// Size of `struct virtio_blk_outhdr` (type, ioprio, sector).
const HEADER_LEN: u64 = 16;
/// Size of one `struct virtio_blk_discard_write_zeroes` segment.
const DWZ_SEG_LEN: u64 = 16;
/// Largest bounce-buffer chunk; big requests are processed in pieces of this size so
/// a guest cannot make us allocate unbounded memory.
pub(crate) const MAX_CHUNK: usize = 1 << 20;
/// Most discard / write-zeroes segments accepted in one request (advertised).
pub(crate) const MAX_DWZ_SEGS: u32 = 8;
/// Most sectors in one discard / write-zeroes segment (advertised): 1 GiB.
pub(crate) const MAX_DWZ_SECTORS: u32 = 1 << 21;
/// Serial number length of GET_ID.
pub(crate) const ID_BYTES: usize = 20;

/// Per-device facts shared by every queue.
pub(crate) struct DeviceCtx {
    pub dev: Arc<dyn BlockDevice>,
    pub stats: Arc<BlkStats>,
    pub observer: Option<Arc<dyn WriteObserver>>,
    pub serial: [u8; ID_BYTES],
    /// No FLUSH feature offered: the guest assumes completed writes are durable.
    pub write_through: bool,
    pub size: u64,
    pub logical: u64,
    pub read_only: bool,
    /// Most descriptors accepted in one chain (seg_max + header + status).
    pub max_descs: usize,
}

/// One guest buffer.
#[derive(Clone, Copy, Debug)]
struct Seg {
    addr: GuestAddress,
    len: u32,
}

/// Per-queue scratch space, reused across requests so the hot path does not allocate.
pub(crate) struct Scratch {
    readable: Vec<Seg>,
    writable: Vec<Seg>,
    buf: Vec<u8>,
}

impl Scratch {
    pub(crate) fn new(max_descs: usize) -> Self {
        Scratch {
            readable: Vec::with_capacity(max_descs),
            writable: Vec::with_capacity(max_descs),
            buf: Vec::new(),
        }
    }

}

/// Why a request could not be carried out; maps to a virtio status.
#[derive(Debug)]
enum Fail {
    /// Bad request from the guest or a device error: VIRTIO_BLK_S_IOERR.
    IoErr,
    /// Request type or flags we do not implement: VIRTIO_BLK_S_UNSUPP.
    Unsupp,
}

/// Total bytes in `segs`.
fn total(segs: &[Seg]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Copy `out.len()` bytes starting `skip` bytes into the stream formed by `segs`.
fn copy_from<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Seg],
    mut skip: u64,
    out: &mut [u8],
) -> Result<(), Fail> {
    let mut done = 0usize;
    for s in segs {
        if done == out.len() {
            break;
        }
        let len = u64::from(s.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = ((len - skip) as usize).min(out.len() - done);
        let addr = s.addr.0.checked_add(skip).ok_or(Fail::IoErr)?;
        let dst = out.get_mut(done..done + n).ok_or(Fail::IoErr)?;
        mem.read_slice(dst, GuestAddress(addr)).map_err(|e| {
            tracing::warn!("vhost-blk: guest memory read at {addr:#x} failed: {e}");
            Fail::IoErr
        })?;
        done += n;
        skip = 0;
    }
    if done == out.len() {
        Ok(())
    } else {
        Err(Fail::IoErr)
    }
}

/// Copy `data` into the stream formed by `segs`, starting `skip` bytes in.
fn copy_to<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Seg],
    mut skip: u64,
    data: &[u8],
) -> Result<(), Fail> {
    let mut done = 0usize;
    for s in segs {
        if done == data.len() {
            break;
        }
        let len = u64::from(s.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = ((len - skip) as usize).min(data.len() - done);
        let addr = s.addr.0.checked_add(skip).ok_or(Fail::IoErr)?;
        let src = data.get(done..done + n).ok_or(Fail::IoErr)?;
        mem.write_slice(src, GuestAddress(addr)).map_err(|e| {
            tracing::warn!("vhost-blk: guest memory write at {addr:#x} failed: {e}");
            Fail::IoErr
        })?;
        done += n;
        skip = 0;
    }
    if done == data.len() {
        Ok(())
    } else {
        Err(Fail::IoErr)
    }
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

impl DeviceCtx {
    /// Byte range of a sector-addressed request, checked against the device.
    fn range(&self, sector: u64, len: u64) -> Result<u64, Fail> {
        let offset = sector.checked_mul(SECTOR).ok_or(Fail::IoErr)?;
        let end = offset.checked_add(len).ok_or(Fail::IoErr)?;
        if end > self.size {
            tracing::warn!(
                "vhost-blk: request {offset}+{len} beyond the device end ({})",
                self.size
            );
            return Err(Fail::IoErr);
        }
        if offset % self.logical != 0 || len % self.logical != 0 {
            tracing::warn!(
                "vhost-blk: request {offset}+{len} not aligned to the {}-byte block",
                self.logical
            );
            return Err(Fail::IoErr);
        }
        Ok(offset)
    }

    fn io_err(&self, what: &str, offset: u64, len: u64, e: fv_vdisk_core::DiskError) -> Fail {
        tracing::error!("vhost-blk: {what} {offset}+{len} failed: {e}");
        Fail::IoErr
    }

    fn observe(&self, offset: u64, len: u64) {
        if let Some(o) = &self.observer {
            if len > 0 {
                o.written(offset, len);
            }
        }
    }

    /// Process one descriptor chain and return the number of bytes written into
    /// guest buffers (the used length).
    pub(crate) fn process_chain<T, M>(
        &self,
        chain: DescriptorChain<T>,
        mem: &M,
        scratch: &mut Scratch,
    ) -> u32
    where
        T: Deref,
        T::Target: GuestMemory,
        M: GuestMemory + ?Sized,
    {
        scratch.readable.clear();
        scratch.writable.clear();
        let mut count = 0usize;
        let mut malformed = false;
        for desc in chain {
            count += 1;
            if count > self.max_descs {
                tracing::warn!(
                    "vhost-blk: descriptor chain longer than {} entries",
                    self.max_descs
                );
                malformed = true;
                break;
            }
            if desc.len() == 0 {
                continue;
            }
            let seg = Seg {
                addr: desc.addr(),
                len: desc.len(),
            };
            let perm = if desc.is_write_only() {
                Permissions::Write
            } else {
                Permissions::Read
            };
            if !GuestMemory::check_range(mem, seg.addr, seg.len as usize, perm) {
                tracing::warn!(
                    "vhost-blk: descriptor {:#x}+{} outside guest memory",
                    seg.addr.0,
                    seg.len
                );
                malformed = true;
                // Keep collecting so the status byte can still be found if it is valid.
                continue;
            }
            if desc.is_write_only() {
                scratch.writable.push(seg);
            } else if scratch.writable.is_empty() {
                scratch.readable.push(seg);
            } else {
                // The spec puts every device-readable buffer before the writable ones.
                tracing::warn!("vhost-blk: readable descriptor after a writable one");
                malformed = true;
            }
        }

        let wlen = total(&scratch.writable);
        if wlen == 0 {
            // Nowhere to put a status: the request cannot be answered properly.
            tracing::warn!("vhost-blk: request without a writable status byte; dropped");
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            return 0;
        }
        let status_at = wlen - 1;

        let (status, written) = if malformed {
            (Err(Fail::IoErr), 0)
        } else {
            self.execute(mem, scratch, status_at)
        };
        let code = match status {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(Fail::IoErr) => VIRTIO_BLK_S_IOERR,
            Err(Fail::Unsupp) => VIRTIO_BLK_S_UNSUPP,
        };
        if code != VIRTIO_BLK_S_OK {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        if copy_to(mem, &scratch.writable, status_at, &[code as u8]).is_err() {
            return 0;
        }
        // `written` never exceeds `status_at`, which came from a sum of u32 lengths
        // bounded by the chain (the chain iterator caps the total at u32::MAX).
        u32::try_from(written.saturating_add(1)).unwrap_or(u32::MAX)
    }

    /// Run the request; returns the status and the data bytes written to the guest.
    fn execute<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        scratch: &mut Scratch,
        data_in_len: u64,
    ) -> (Result<(), Fail>, u64) {
        let rlen = total(&scratch.readable);
        if rlen < HEADER_LEN {
            tracing::warn!("vhost-blk: request header too short ({rlen} bytes)");
            return (Err(Fail::IoErr), 0);
        }
        let mut hdr = [0u8; HEADER_LEN as usize];
        if let Err(e) = copy_from(mem, &scratch.readable, 0, &mut hdr) {
            return (Err(e), 0);
        }
        let req_type = le_u32(&hdr, 0);
        let sector = le_u64(&hdr, 8);
        let data_out_len = rlen - HEADER_LEN;

        match req_type {
            VIRTIO_BLK_T_IN => self.read(mem, scratch, sector, data_in_len),
            VIRTIO_BLK_T_OUT => (self.write(mem, scratch, sector, data_out_len), 0),
            VIRTIO_BLK_T_FLUSH => {
                self.stats.flushes.fetch_add(1, Ordering::Relaxed);
                let r = self
                    .dev
                    .flush()
                    .map_err(|e| self.io_err("flush", 0, 0, e));
                (r, 0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = (data_in_len as usize).min(ID_BYTES);
                let id = self.serial.get(..n).unwrap_or_default();
                match copy_to(mem, &scratch.writable, 0, id) {
                    Ok(()) => (Ok(()), n as u64),
                    Err(e) => (Err(e), 0),
                }
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => (
                self.discard_or_zero(mem, scratch, req_type, data_out_len),
                0,
            ),
            other => {
                tracing::debug!("vhost-blk: unsupported request type {other}");
                (Err(Fail::Unsupp), 0)
            }
        }
    }

    fn read<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        scratch: &mut Scratch,
        sector: u64,
        len: u64,
    ) -> (Result<(), Fail>, u64) {
        let offset = match self.range(sector, len) {
            Ok(o) => o,
            Err(e) => return (Err(e), 0),
        };
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(MAX_CHUNK as u64) as usize;
            // Split borrows: the buffer and the segment list live in the same scratch.
            let Scratch { writable, buf, .. } = scratch;
            if buf.len() < n {
                buf.resize(n, 0);
            }
            let Some(chunk) = buf.get_mut(..n) else {
                return (Err(Fail::IoErr), done);
            };
            if let Err(e) = self.dev.read_at(offset + done, chunk) {
                return (Err(self.io_err("read", offset + done, n as u64, e)), done);
            }
            if let Err(e) = copy_to(mem, writable, done, chunk) {
                return (Err(e), done);
            }
            done += n as u64;
            self.stats.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
        }
        (Ok(()), done)
    }

    fn write<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        scratch: &mut Scratch,
        sector: u64,
        len: u64,
    ) -> Result<(), Fail> {
        if self.read_only {
            tracing::warn!("vhost-blk: write to a read-only device refused");
            return Err(Fail::IoErr);
        }
        let offset = self.range(sector, len)?;
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        // Report the range even if the write fails part way: the device content may
        // have changed, and changed-block tracking must never miss a change.
        self.observe(offset, len);
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(MAX_CHUNK as u64) as usize;
            let Scratch { readable, buf, .. } = scratch;
            if buf.len() < n {
                buf.resize(n, 0);
            }
            let chunk = buf.get_mut(..n).ok_or(Fail::IoErr)?;
            copy_from(mem, readable, HEADER_LEN + done, chunk)?;
            self.dev
                .write_at(offset + done, chunk)
                .map_err(|e| self.io_err("write", offset + done, n as u64, e))?;
            done += n as u64;
            self.stats
                .bytes_written
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        if self.write_through {
            self.dev
                .flush()
                .map_err(|e| self.io_err("flush after write", offset, len, e))?;
        }
        Ok(())
    }

    fn discard_or_zero<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        scratch: &mut Scratch,
        req_type: u32,
        payload: u64,
    ) -> Result<(), Fail> {
        let zero = req_type == VIRTIO_BLK_T_WRITE_ZEROES;
        let what = if zero { "write-zeroes" } else { "discard" };
        if self.read_only {
            tracing::warn!("vhost-blk: {what} on a read-only device refused");
            return Err(Fail::IoErr);
        }
        if payload == 0 || payload % DWZ_SEG_LEN != 0 {
            tracing::warn!("vhost-blk: {what} payload of {payload} bytes is malformed");
            return Err(Fail::IoErr);
        }
        let nsegs = payload / DWZ_SEG_LEN;
        if nsegs > u64::from(MAX_DWZ_SEGS) {
            tracing::warn!("vhost-blk: {what} with {nsegs} segments (max {MAX_DWZ_SEGS})");
            return Err(Fail::Unsupp);
        }
        // Validate every segment before touching the device so a bad request changes nothing.
        let mut segs = [(0u64, 0u64); MAX_DWZ_SEGS as usize];
        for (i, slot) in segs.iter_mut().take(nsegs as usize).enumerate() {
            let mut raw = [0u8; DWZ_SEG_LEN as usize];
            copy_from(
                mem,
                &scratch.readable,
                HEADER_LEN + i as u64 * DWZ_SEG_LEN,
                &mut raw,
            )?;
            let sector = le_u64(&raw, 0);
            let num = le_u32(&raw, 8);
            let flags = le_u32(&raw, 12);
            let allowed = if zero {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            } else {
                0
            };
            if flags & !allowed != 0 {
                tracing::debug!("vhost-blk: {what} flags {flags:#x} unsupported");
                return Err(Fail::Unsupp);
            }
            if num > MAX_DWZ_SECTORS {
                tracing::warn!("vhost-blk: {what} of {num} sectors (max {MAX_DWZ_SECTORS})");
                return Err(Fail::IoErr);
            }
            let len = u64::from(num) * SECTOR;
            let offset = self.range(sector, len)?;
            *slot = (offset, len);
        }
        for &(offset, len) in segs.iter().take(nsegs as usize) {
            if len == 0 {
                continue;
            }
            self.observe(offset, len);
            let r = if zero {
                self.stats.write_zeroes.fetch_add(1, Ordering::Relaxed);
                self.dev.write_zeroes(offset, len)
            } else {
                self.stats.discards.fetch_add(1, Ordering::Relaxed);
                self.dev.discard(offset, len)
            };
            r.map_err(|e| self.io_err(what, offset, len, e))?;
        }
        if self.write_through {
            self.dev
                .flush()
                .map_err(|e| self.io_err("flush after write", 0, 0, e))?;
        }
        Ok(())
    }
}

