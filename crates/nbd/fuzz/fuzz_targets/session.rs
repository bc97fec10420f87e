//! Fuzz the NBD server's parsers: option haggling and the transmission-phase request
//! stream, fed as one client byte stream to `fv_nbd::fuzz_session` (the connection
//! code a socket thread runs) over a real raw image. Any input must end the session
//! with a reply or a disconnect, never a panic.
//!
//! Input byte 0 picks the shape: odd = a canned valid handshake (fixed newstyle,
//! structured replies, base:allocation, NBD_OPT_GO) followed by the rest as requests,
//! so the fuzzer reaches the transmission phase at once; even = the rest is the
//! whole client stream, handshake included.
#![no_main]

use fv_vdisk_core::{BlockDevice, Extent, Layer, RawLayer};
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};

const DISK: u64 = 1 << 20;

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
        "nbd-fuzz".into()
    }
}

/// One device for the whole run (creating a file per input would dominate); on tmpfs
/// where there is one, so FLUSH costs no disk sync.
fn device() -> Arc<dyn BlockDevice> {
    static DEV: OnceLock<(tempfile::TempDir, Arc<dyn BlockDevice>)> = OnceLock::new();
    DEV.get_or_init(|| {
        let dir = tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .expect("temp dir for the fuzz image");
        let layer = RawLayer::create(&dir.path().join("disk.img"), DISK).expect("raw image");
        (dir, Arc::new(RawDevice(layer)))
    })
    .1
    .clone()
}

fn option(out: &mut Vec<u8>, opt: u32, data: &[u8]) {
    out.extend_from_slice(&0x4948_4156_454F_5054u64.to_be_bytes()); // IHAVEOPT
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn handshake() -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&3u32.to_be_bytes()); // fixed newstyle, no zeroes
    option(&mut s, 8, &[]); // NBD_OPT_STRUCTURED_REPLY
    let mut meta = Vec::new();
    meta.extend_from_slice(&0u32.to_be_bytes()); // export name ""
    meta.extend_from_slice(&1u32.to_be_bytes()); // one query
    meta.extend_from_slice(&15u32.to_be_bytes());
    meta.extend_from_slice(b"base:allocation");
    option(&mut s, 10, &meta); // NBD_OPT_SET_META_CONTEXT
    let mut go = Vec::new();
    go.extend_from_slice(&0u32.to_be_bytes()); // export name ""
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&3u16.to_be_bytes()); // NBD_INFO_BLOCK_SIZE
    option(&mut s, 7, &go); // NBD_OPT_GO
    s
}

fuzz_target!(|data: &[u8]| {
    let Some((&shape, rest)) = data.split_first() else {
        return;
    };
    let input = if shape & 1 == 1 {
        let mut s = handshake();
        s.extend_from_slice(rest);
        s
    } else {
        rest.to_vec()
    };
    fv_nbd::fuzz_session(device(), &input, &mut std::io::sink());
});
