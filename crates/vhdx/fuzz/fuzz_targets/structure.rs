//! Structure-aware fuzzing: the input picks a valid source image (ours: dynamic,
//! fixed, differencing) and seeds the one-field mutation of tests/structure_gen; the
//! outcome must satisfy `structure_gen::judge` (a typed error or a sound read-only
//! open, no writable open of anything check calls damaged, refused opens leave the
//! file byte-identical). `tests/structure_fuzz.rs` runs the same generator on stable.
#![no_main]

#[path = "../../tests/structure_gen/mod.rs"]
mod structure_gen;

use fv_vdisk_core::{CreateSpec, DiskKind, Layer, ParentSpec};
use fv_vhdx::VhdxFile;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

const MIB: u64 = 1 << 20;

struct Sources {
    _dir: tempfile::TempDir,
    images: Vec<Vec<u8>>,
}

fn spec(kind: DiskKind, size: u64, lss: u32) -> CreateSpec {
    CreateSpec {
        virtual_size: size,
        kind,
        block_size: 1 << 20,
        logical_sector_size: lss,
        physical_sector_size: 4096,
        parent: None,
    }
}

fn sources() -> &'static Sources {
    static S: OnceLock<Sources> = OnceLock::new();
    S.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let base_p = dir.path().join("base.vhdx");
        let base = VhdxFile::create(&base_p, &spec(DiskKind::Dynamic, 6 * MIB, 512)).expect("base");
        base.write(0, &[1u8; 8192]).expect("write");
        base.write(3 * MIB, &[3u8; 1 << 20]).expect("write");
        base.flush().expect("flush");
        let child_p = dir.path().join("child.vhdx");
        let child = VhdxFile::create(
            &child_p,
            &CreateSpec {
                virtual_size: 0,
                kind: DiskKind::Differencing,
                block_size: 1 << 20,
                logical_sector_size: 512,
                physical_sector_size: 512,
                parent: Some(ParentSpec {
                    identity: base.info().identity.clone(),
                    virtual_size: 6 * MIB,
                    relative_path: "base.vhdx".into(),
                    absolute_path: base_p.to_string_lossy().into_owned(),
                    parent_disk_id: None,
                }),
            },
        )
        .expect("child");
        child.write(4096, &[2u8; 4096]).expect("write");
        child.flush().expect("flush");
        drop(child);
        drop(base);
        let fixed_p = dir.path().join("fixed.vhdx");
        drop(VhdxFile::create(&fixed_p, &spec(DiskKind::Fixed, 4 * MIB, 4096)).expect("fixed"));
        let images = [base_p, child_p, fixed_p]
            .iter()
            .map(|p| std::fs::read(p).expect("read source"))
            .collect();
        Sources { _dir: dir, images }
    })
}

fuzz_target!(|data: &[u8]| {
    let s = sources();
    let mut seed = [0u8; 8];
    for (i, b) in data.iter().enumerate() {
        seed[i % 8] ^= b.rotate_left((i / 8) as u32);
    }
    let seed = u64::from_le_bytes(seed);
    let Some(src) = s.images.get((seed % s.images.len() as u64) as usize) else {
        return;
    };
    let mut img = src.clone();
    let mut pick = structure_gen::Pick(seed);
    let what = structure_gen::mutate(&mut img, &mut pick);
    let Ok(dir) = tempfile::tempdir() else { return };
    let path = dir.path().join("m.vhdx");
    if std::fs::write(&path, &img).is_err() {
        return;
    }
    if let Err(e) = structure_gen::judge(&path, &what) {
        panic!("{e}");
    }
});
