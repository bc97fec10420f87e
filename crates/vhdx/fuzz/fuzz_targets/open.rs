//! Fuzz the open/parse path: any input written to a file and opened read-only (with
//! in-memory log replay) must yield an image or a typed error, never a panic.
#![no_main]

use fv_vdisk_core::Layer;
use fv_vhdx::{OpenOptions, VhdxFile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else { return };
    let path = dir.path().join("f.vhdx");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    for replay in [false, true] {
        if let Ok(v) = VhdxFile::open(
            &path,
            &OpenOptions {
                read_only: true,
                replay_log: replay,
            },
        ) {
            let size = v.info().virtual_size.min(1 << 20);
            let mut buf = vec![0u8; size as usize];
            let _ = v.read_layer(0, &mut buf, &mut Vec::new());
            let _ = v.extents(0, size);
        }
    }
});
