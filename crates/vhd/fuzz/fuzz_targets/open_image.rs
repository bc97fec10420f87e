//! Fuzz VHD parsing: any byte string written as a file must open or fail with a
//! typed error, and reads/extents/check on whatever opens must not panic.
#![no_main]
use fv_vdisk_core::{Image, Layer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f.vhd");
    std::fs::write(&p, data).unwrap();
    if let Ok(v) = fv_vhd::VhdFile::open(&p, true) {
        let size = v.info().virtual_size;
        let mut buf = vec![0u8; 4096];
        let mut absent = Vec::new();
        let _ = v.read_layer(0, &mut buf, &mut absent);
        let _ = v.read_layer(size.saturating_sub(4096) / 512 * 512, &mut buf, &mut absent);
        let _ = v.extents(0, size.min(1 << 30));
        let _ = v.check(false);
        let _ = v.allocation();
    }
});
