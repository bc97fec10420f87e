//! Fuzz virtio-blk request parsing from guest descriptor chains: the input lays out a
//! split virtqueue in guest memory (descriptor table, avail ring, buffers), and
//! `BlkServer::fuzz_split_queue` pops and serves every chain the way a worker thread
//! does, over a real raw image. Hostile chains (loops, indirect tables, buffers
//! outside memory, header/data/status split anyhow) must end with a status or a
//! dropped chain, never a panic, and never a used length beyond guest memory.
//!
//! Byte 0: bits 0-2 pick the queue size (2 << n); bit 3 set = "structured": the
//! target writes one well-linked chain itself (descriptor flags and lengths, header
//! type and sector from the input), so the fuzzer reaches request execution at once;
//! clear = raw: the bytes are the descriptor table, then the avail ring, then the
//! buffer area, exactly as a guest would write them.
#![no_main]

use fv_vdisk_core::{BlockDevice, Extent, Layer, RawLayer};
use fv_vhost_blk::{BlkBackendConfig, BlkServer};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const DISK: u64 = 1 << 20;
const MEM: usize = 256 << 10;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const BUFS: u64 = 0x4000;
/// Stride between the structured chain's buffers.
const STRIDE: u64 = 0x2000;

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
    fn block_status(&self, offset: u64, len: u64) -> fv_vdisk_core::Result<Vec<Extent>> {
        self.0.extents(offset, len)
    }
    fn id(&self) -> String {
        "vhost-blk-fuzz".into()
    }
}

/// One server and image for the whole run; on tmpfs where there is one.
fn server() -> &'static BlkServer {
    static SERVER: OnceLock<(tempfile::TempDir, BlkServer)> = OnceLock::new();
    &SERVER
        .get_or_init(|| {
            let dir = tempfile::tempdir_in("/dev/shm")
                .or_else(|_| tempfile::tempdir())
                .expect("temp dir for the fuzz image");
            let layer = RawLayer::create(&dir.path().join("disk.img"), DISK).expect("raw image");
            let mut cfg = BlkBackendConfig::new(dir.path().join("unused.sock"));
            cfg.writeback = true;
            let server = BlkServer::new(std::sync::Arc::new(RawDevice(layer)), cfg)
                .expect("vhost-blk server config");
            (dir, server)
        })
        .1
}

fn put(mem: &GuestMemoryMmap, at: u64, bytes: &[u8]) {
    let room = (MEM as u64).saturating_sub(at) as usize;
    let n = bytes.len().min(room);
    mem.write_slice(&bytes[..n], GuestAddress(at))
        .expect("write inside guest memory");
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..].copy_from_slice(&next.to_le_bytes());
    d
}

/// Structured shape: [n][per descriptor: flags, len_lo, len_hi][type u32][sector u64]
/// then buffer bytes placed after the header.
fn structured(mem: &GuestMemoryMmap, size: u16, input: &[u8]) {
    let mut it = input.iter().copied();
    let n = usize::from(it.next().unwrap_or(3) % 8 + 1).min(usize::from(size));
    let mut table = Vec::new();
    let mut buffers = Vec::new();
    for k in 0..n {
        let flags = it.next().unwrap_or(0);
        let len = u16::from_le_bytes([it.next().unwrap_or(0), it.next().unwrap_or(0)]);
        let len = u32::from(len) % (STRIDE as u32 + 1);
        // NEXT on all but the last; WRITE and INDIRECT bits from the input.
        let mut f = u16::from(flags) & (2 | 4);
        if k + 1 < n {
            f |= 1;
        }
        let addr = BUFS + k as u64 * STRIDE;
        table.extend_from_slice(&desc(addr, len, f, (k + 1) as u16));
        buffers.push(addr);
    }
    put(mem, DESC, &table);
    let mut header = [0u8; 16];
    for b in header.iter_mut().take(4) {
        *b = it.next().unwrap_or(0) % 16; // request types are small numbers
    }
    for b in header.iter_mut().skip(8) {
        *b = it.next().unwrap_or(0);
    }
    put(mem, buffers[0], &header);
    let rest: Vec<u8> = it.collect();
    put(mem, buffers[0] + 16, &rest);
    // avail: flags 0, idx 1, ring[0] = head 0.
    put(mem, AVAIL, &[0, 0, 1, 0, 0, 0]);
}

fuzz_target!(|data: &[u8]| {
    let Some((&shape, rest)) = data.split_first() else {
        return;
    };
    let size: u16 = 2 << (shape & 7);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).expect("guest memory");
    if shape & 8 != 0 {
        structured(&mem, size, rest);
    } else {
        let table = usize::from(size) * 16;
        let avail = 4 + 2 * usize::from(size);
        let (t, r) = rest.split_at(rest.len().min(table));
        let (a, b) = r.split_at(r.len().min(avail));
        put(&mem, DESC, t);
        put(&mem, AVAIL, a);
        put(&mem, BUFS, b);
    }
    let used = server().fuzz_split_queue(&mem, size, DESC, AVAIL, USED);
    assert!(used.len() <= usize::from(size));
    for len in used {
        // Nothing can be written beyond the guest memory we handed out.
        assert!(len as usize <= MEM, "used length {len} beyond guest memory");
    }
});
