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
            tracing::trace!(
                "vhost-blk: desc {:#x}+{} write={}",
                desc.addr().0,
                desc.len(),
                desc.is_write_only()
            );
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
        tracing::trace!(
            "vhost-blk: request type {req_type} sector {sector} out {data_out_len} in {data_in_len}"
        );

        match req_type {
            VIRTIO_BLK_T_IN => self.read(mem, scratch, sector, data_in_len),
            VIRTIO_BLK_T_OUT => (self.write(mem, scratch, sector, data_out_len), 0),
            VIRTIO_BLK_T_FLUSH => {
                self.stats.flushes.fetch_add(1, Ordering::Relaxed);
                let r = self.dev.flush().map_err(|e| self.io_err("flush", 0, 0, e));
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

#[cfg(test)]
mod tests {
    //! Hostile-descriptor-chain tests of the request parser, driven through
    //! virtio-queue's mock split queue over a real raw file.
    use super::*;
    use fv_vdisk_core::{Layer, RawLayer};
    use std::sync::Mutex;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    const DISK: u64 = 1 << 20;
    const W: u16 = VRING_DESC_F_WRITE as u16;

    struct RawDevice(RawLayer);
    impl BlockDevice for RawDevice {
        fn size(&self) -> u64 {
            self.0.info().virtual_size
        }
        fn logical_sector_size(&self) -> u32 {
            512
        }
        fn physical_sector_size(&self) -> u32 {
            4096
        }
        fn read_only(&self) -> bool {
            self.0.read_only()
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> fv_vdisk_core::Result<()> {
            self.0.read_layer(offset, buf, &mut Vec::new())
        }
        fn write_at(&self, offset: u64, buf: &[u8]) -> fv_vdisk_core::Result<()> {
            self.0.write(offset, buf)
        }
        fn write_zeroes(&self, offset: u64, len: u64) -> fv_vdisk_core::Result<()> {
            self.0.write_zeroes(offset, len)
        }
        fn discard(&self, offset: u64, len: u64) -> fv_vdisk_core::Result<()> {
            self.0.discard(offset, len)
        }
        fn flush(&self) -> fv_vdisk_core::Result<()> {
            self.0.flush()
        }
        fn block_status(
            &self,
            offset: u64,
            len: u64,
        ) -> fv_vdisk_core::Result<Vec<fv_vdisk_core::Extent>> {
            self.0.extents(offset, len)
        }
        fn id(&self) -> String {
            "unit-test-disk".into()
        }
    }

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, u64)>>);
    impl WriteObserver for Recorder {
        fn written(&self, offset: u64, len: u64) {
            self.0.lock().unwrap().push((offset, len));
        }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
        ctx: DeviceCtx,
        rec: Arc<Recorder>,
        mem: GuestMemoryMmap,
    }

    fn fixture(read_only: bool) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        // Recognisable content so an unwanted write is detected.
        let content: Vec<u8> = (0..DISK).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        let dev = Arc::new(RawDevice(RawLayer::open(&path, read_only).unwrap()));
        let rec = Arc::new(Recorder::default());
        let mut serial = [0u8; ID_BYTES];
        serial[..6].copy_from_slice(b"SER-01");
        let ctx = DeviceCtx {
            dev,
            stats: Arc::new(BlkStats::default()),
            observer: Some(rec.clone()),
            serial,
            write_through: false,
            size: DISK,
            logical: 512,
            read_only,
            max_descs: 16,
        };
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        Fixture {
            _dir: dir,
            path,
            ctx,
            rec,
            mem,
        }
    }

    fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    fn header(t: u32, sector: u64) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&t.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        h
    }

    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;

    impl Fixture {
        /// Run one chain (direct descriptors) and return (used len, status byte).
        fn run(&self, descs: &[RawDescriptor]) -> (u32, u8) {
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let q = MockSplitQueue::new(&self.mem, 16);
            let chain = q.build_desc_chain(descs).unwrap();
            let mut scratch = Scratch::new(self.ctx.max_descs);
            let used = self.ctx.process_chain(chain, &self.mem, &mut scratch);
            (used, self.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap())
        }
        fn file(&self) -> Vec<u8> {
            std::fs::read(&self.path).unwrap()
        }
        fn original(&self, off: u64, len: usize) -> Vec<u8> {
            (off..off + len as u64).map(|i| (i % 251) as u8).collect()
        }
    }

    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    #[test]
    fn write_then_read_with_odd_framing() {
        let f = fixture(false);
        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
        // Header split over two descriptors, data split unevenly, header tail and data head
        // sharing nothing: the parser must not rely on descriptor boundaries.
        let h = header(VIRTIO_BLK_T_OUT, 8);
        f.mem.write_slice(&h[..5], GuestAddress(HDR)).unwrap();
        f.mem
            .write_slice(&h[5..], GuestAddress(HDR + 0x100))
            .unwrap();
        f.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
        let (used, status) = f.run(&[
            d(HDR, 5, 0),
            d(HDR + 0x100, 11, 0),
            d(DATA, 100, 0),
            d(DATA + 100, 924, 0),
            d(STATUS, 1, W),
        ]);
        assert_eq!((used, status), (1, OK));
        assert_eq!(&f.file()[4096..4096 + 1024], &pattern[..]);
        assert_eq!(f.rec.0.lock().unwrap().as_slice(), &[(4096, 1024)]);

        // Read it back; status shares the last data descriptor.
        f.mem
            .write_slice(&header(VIRTIO_BLK_T_IN, 8), GuestAddress(HDR))
            .unwrap();
        f.mem.write_slice(&[0u8; 2048], GuestAddress(DATA)).unwrap();
        f.mem.write_obj(0xffu8, GuestAddress(DATA + 1024)).unwrap();
        let q = MockSplitQueue::new(&f.mem, 16);
        let chain = q
            .build_desc_chain(&[d(HDR, 16, 0), d(DATA, 700, W), d(DATA + 700, 325, W)])
            .unwrap();
        let mut scratch = Scratch::new(16);
        let used = f.ctx.process_chain(chain, &f.mem, &mut scratch);
        assert_eq!(used, 1025);
        let mut back = vec![0u8; 1025];
        f.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(&back[..1024], &pattern[..]);
        assert_eq!(back[1024], OK);
        let s = f.ctx.stats.snapshot();
        assert_eq!(
            (s.reads, s.writes, s.bytes_read, s.bytes_written),
            (1, 1, 1024, 1024)
        );
    }

    #[test]
    fn short_header_is_ioerr() {
        let f = fixture(false);
        let (used, status) = f.run(&[d(HDR, 8, 0), d(STATUS, 1, W)]);
        assert_eq!((used, status), (1, IOERR));
    }

    #[test]
    fn out_of_range_sectors_are_refused() {
        let f = fixture(false);
        f.mem.write_slice(&[0xAA; 512], GuestAddress(DATA)).unwrap();
        for sector in [DISK / 512, DISK / 512 - 1 + 1, u64::MAX / 256, u64::MAX] {
            f.mem
                .write_slice(&header(VIRTIO_BLK_T_OUT, sector), GuestAddress(HDR))
                .unwrap();
            let (used, status) = f.run(&[d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 1, W)]);
            assert_eq!((used, status), (1, IOERR), "sector {sector}");
        }
        // Straddling the end: last sector plus one more.
        f.mem
            .write_slice(&header(VIRTIO_BLK_T_IN, DISK / 512 - 1), GuestAddress(HDR))
            .unwrap();
        let (used, status) = f.run(&[d(HDR, 16, 0), d(DATA, 1024, W), d(STATUS, 1, W)]);
        assert_eq!((used, status), (1, IOERR));
        assert_eq!(f.file(), f.original(0, DISK as usize));
        assert!(f.rec.0.lock().unwrap().is_empty());
    }

    #[test]
    fn unaligned_length_is_ioerr() {
        let f = fixture(false);
        f.mem
            .write_slice(&header(VIRTIO_BLK_T_OUT, 0), GuestAddress(HDR))
            .unwrap();
        let (used, status) = f.run(&[d(HDR, 16, 0), d(DATA, 100, 0), d(STATUS, 1, W)]);
        assert_eq!((used, status), (1, IOERR));
        assert_eq!(f.file(), f.original(0, DISK as usize));
    }

    #[test]
    fn descriptor_outside_guest_memory_is_ioerr() {
        let f = fixture(false);
        f.mem
            .write_slice(&header(VIRTIO_BLK_T_OUT, 0), GuestAddress(HDR))
            .unwrap();
        // Data descriptor beyond the 16 MiB of guest RAM, and one wrapping the address space.
        for addr in [0x4000_0000u64, u64::MAX - 100] {
            let (used, status) = f.run(&[d(HDR, 16, 0), d(addr, 512, 0), d(STATUS, 1, W)]);
            assert_eq!((used, status), (1, IOERR), "addr {addr:#x}");
        }
        // Straddling the end of RAM.
        let (used, status) = f.run(&[d(HDR, 16, 0), d((16 << 20) - 256, 512, 0), d(STATUS, 1, W)]);
        assert_eq!((used, status), (1, IOERR));
        assert_eq!(f.file(), f.original(0, DISK as usize));
    }

    #[test]
    fn no_writable_status_is_dropped_without_io() {
        let f = fixture(false);
        f.mem
            .write_slice(&header(VIRTIO_BLK_T_OUT, 0), GuestAddress(HDR))
            .unwrap();
        let (used, status) = f.run(&[d(HDR, 16, 0), d(DATA, 512, 0)]);
        assert_eq!((used, status), (0, 0xff));
        // Status outside guest memory: nothing can be answered either.
        let (used, _) = f.run(&[d(HDR, 16, 0), d(DATA, 512, 0), d(0x4000_0000, 1, W)]);
        assert_eq!(used, 0);
        assert_eq!(f.file(), f.original(0, DISK as usize));
        assert_eq!(f.ctx.stats.snapshot().writes, 0);
    }

    #[test]
    fn readable_after_writable_is_ioerr() {
        let f = fixture(false);
        f.mem
            .write_slice(&header(VIRTIO_BLK_T_OUT, 0), GuestAddress(HDR))
            .unwrap();
        let (used, status) = f.run(&[
            d(HDR, 16, 0),
            d(DATA + 4096, 16, W),
            d(DATA, 512, 0),
            d(STATUS, 1, W),
        ]);
        assert_eq!((used, status), (1, IOERR));
        assert_eq!(f.file(), f.original(0, DISK as usize));
    }

    #[test]
    fn unknown_type_is_unsupp_and_get_id_returns_serial() {
        let f = fixture(false);
        f.mem
            .write_slice(&header(0x7777, 0), GuestAddress(HDR))
            .unwrap();
        let (used, status) = f.run(&[d(HDR, 16, 0), d(STATUS, 1, W)]);
        assert_eq!((used, status), (1, UNSUPP));

        f.mem
            .write_slice(&header(VIRTIO_BLK_T_GET_ID, 0), GuestAddress(HDR))
            .unwrap();
        f.mem.write_slice(&[0xEE; 20], GuestAddress(DATA)).unwrap();
        let (used, status) = f.run(&[d(HDR, 16, 0), d(DATA, 20, W), d(STATUS, 1, W)]);
        assert_eq!((used, status), (21, OK));
        let mut id = [0u8; 20];
        f.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..7], b"SER-01\0");
    }

    #[test]
    fn read_only_device_refuses_writes() {
        let f = fixture(true);
        for t in [
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_WRITE_ZEROES,
            VIRTIO_BLK_T_DISCARD,
        ] {
            f.mem.write_slice(&header(t, 0), GuestAddress(HDR)).unwrap();
            let mut seg = [0u8; 16];
            seg[8..12].copy_from_slice(&1u32.to_le_bytes());
            f.mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
            let len = if t == VIRTIO_BLK_T_OUT { 512 } else { 16 };
            let (used, status) = f.run(&[d(HDR, 16, 0), d(DATA, len, 0), d(STATUS, 1, W)]);
            assert_eq!((used, status), (1, IOERR), "type {t}");
        }
        assert_eq!(f.file(), f.original(0, DISK as usize));
    }

    fn dwz(sector: u64, num: u32, flags: u32) -> [u8; 16] {
        let mut s = [0u8; 16];
        s[..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&num.to_le_bytes());
        s[12..].copy_from_slice(&flags.to_le_bytes());
        s
    }

    #[test]
    fn discard_and_write_zeroes_validation() {
        let f = fixture(false);
        let run_dwz = |t: u32, segs: &[[u8; 16]]| {
            f.mem.write_slice(&header(t, 0), GuestAddress(HDR)).unwrap();
            let flat: Vec<u8> = segs.iter().flatten().copied().collect();
            f.mem.write_slice(&flat, GuestAddress(DATA)).unwrap();
            f.run(&[
                d(HDR, 16, 0),
                d(DATA, flat.len() as u32, 0),
                d(STATUS, 1, W),
            ])
        };
        // Discard with the unmap flag (not allowed for discard) -> UNSUPP, nothing done.
        assert_eq!(run_dwz(VIRTIO_BLK_T_DISCARD, &[dwz(0, 8, 1)]), (1, UNSUPP));
        // Unknown write-zeroes flag -> UNSUPP.
        assert_eq!(
            run_dwz(VIRTIO_BLK_T_WRITE_ZEROES, &[dwz(0, 8, 2)]),
            (1, UNSUPP)
        );
        // Too many segments -> UNSUPP.
        let many = vec![dwz(0, 1, 0); MAX_DWZ_SEGS as usize + 1];
        assert_eq!(run_dwz(VIRTIO_BLK_T_WRITE_ZEROES, &many), (1, UNSUPP));
        // A valid first segment followed by an out-of-range one: nothing may change.
        assert_eq!(
            run_dwz(
                VIRTIO_BLK_T_WRITE_ZEROES,
                &[dwz(0, 8, 0), dwz(DISK / 512, 8, 0)]
            ),
            (1, IOERR)
        );
        // Payload not a multiple of the segment size.
        f.mem
            .write_slice(&header(VIRTIO_BLK_T_WRITE_ZEROES, 0), GuestAddress(HDR))
            .unwrap();
        assert_eq!(
            f.run(&[d(HDR, 16, 0), d(DATA, 20, 0), d(STATUS, 1, W)]),
            (1, IOERR)
        );
        assert_eq!(f.file(), f.original(0, DISK as usize));
        assert!(f.rec.0.lock().unwrap().is_empty());

        // Valid: zero sectors 2..4 (with unmap) and discard sector 10.
        assert_eq!(run_dwz(VIRTIO_BLK_T_WRITE_ZEROES, &[dwz(2, 2, 1)]), (1, OK));
        assert_eq!(run_dwz(VIRTIO_BLK_T_DISCARD, &[dwz(10, 1, 0)]), (1, OK));
        let file = f.file();
        assert!(file[1024..2048].iter().all(|&b| b == 0));
        assert!(file[5120..5632].iter().all(|&b| b == 0));
        assert_eq!(&file[..1024], &f.original(0, 1024)[..]);
        assert_eq!(&file[2048..5120], &f.original(2048, 3072)[..]);
        assert_eq!(
            f.rec.0.lock().unwrap().as_slice(),
            &[(1024, 1024), (5120, 512)]
        );
    }

    #[test]
    fn overlong_and_cyclic_chains_terminate() {
        let f = fixture(false);
        f.mem
            .write_slice(&header(VIRTIO_BLK_T_OUT, 0), GuestAddress(HDR))
            .unwrap();
        // An indirect table with 1000 readable 512-byte entries (more than max_descs)
        // followed by a status byte.
        let table = 0x80_0000u64;
        let n: u16 = 1000;
        for i in 0..n {
            let (addr, len, flags) = if i == 0 {
                (HDR, 16, 0)
            } else if i == n - 1 {
                (STATUS, 1, W)
            } else {
                (DATA, 512, 0)
            };
            let next_flag = if i == n - 1 { 0 } else { 1 };
            let desc = SplitDescriptor::new(addr, len, flags | next_flag, i + 1);
            f.mem
                .write_obj(
                    RawDescriptor::from(desc),
                    GuestAddress(table + u64::from(i) * 16),
                )
                .unwrap();
        }
        let (used, _) = f.run(&[d(table, u32::from(n) * 16, VRING_DESC_F_INDIRECT as u16)]);
        // The status byte is past the limit, so the request is dropped unanswered.
        assert_eq!(used, 0);

        // A direct chain whose last descriptor points back at the first: the chain
        // iterator's TTL must end it.
        let q = MockSplitQueue::new(&f.mem, 4);
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(HDR, 16, 1, 1)),
            RawDescriptor::from(SplitDescriptor::new(DATA, 512, 1, 2)),
            RawDescriptor::from(SplitDescriptor::new(STATUS, 1, W | 1, 0)),
        ];
        f.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let chain = q.build_multiple_desc_chains(&descs).unwrap();
        let mut scratch = Scratch::new(16);
        let used = f.ctx.process_chain(chain, &f.mem, &mut scratch);
        // The cycle re-enters readable descriptors after the writable one: refused.
        assert_eq!(used, 1);
        assert_eq!(f.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), IOERR);
        assert_eq!(f.file(), f.original(0, DISK as usize));
    }

    #[test]
    fn flush_counts() {
        let f = fixture(false);
        f.mem
            .write_slice(&header(VIRTIO_BLK_T_FLUSH, 0), GuestAddress(HDR))
            .unwrap();
        assert_eq!(f.run(&[d(HDR, 16, 0), d(STATUS, 1, W)]), (1, OK));
        assert_eq!(f.ctx.stats.snapshot().flushes, 1);
    }
}
