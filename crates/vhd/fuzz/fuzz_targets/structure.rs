//! Structure-aware fuzzing: libFuzzer's bytes choose one field of a valid image to
//! change (see `fv_vhd::structure_fuzz`); every mutant must meet the verdict in
//! `structure_fuzz::judge` (typed errors only, no writable open of anything check
//! calls damaged, guest writes never damage a sound image, repair reports exactly
//! what it changed).
#![no_main]
use fv_vdisk_core::{CreateSpec, DiskKind, Layer, ParentSpec};
use fv_vhd::structure_fuzz::{judge, mutate, FromBytes};
use fv_vhd::VhdFile;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn spec(kind: DiskKind) -> CreateSpec {
    CreateSpec {
        virtual_size: 2 << 20,
        kind,
        block_size: 512 << 10,
        logical_sector_size: 512,
        physical_sector_size: 512,
        parent: None,
    }
}

/// Valid seed images made once by our own create: dynamic, differencing, fixed.
fn seeds() -> &'static Vec<Vec<u8>> {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.vhd");
        let b = VhdFile::create(&base, &spec(DiskKind::Dynamic)).unwrap();
        b.write(0, &vec![3u8; 8192]).unwrap();
        b.write(1 << 20, &vec![4u8; 4096]).unwrap();
        let id = b.identity();
        drop(b);
        let child = dir.path().join("child.vhd");
        let mut s = spec(DiskKind::Differencing);
        s.parent = Some(ParentSpec {
            identity: id,
            virtual_size: 2 << 20,
            relative_path: "base.vhd".into(),
            absolute_path: base.to_str().unwrap().into(),
            parent_disk_id: None,
        });
        let c = VhdFile::create(&child, &s).unwrap();
        c.write(512 << 10, &vec![5u8; 4096]).unwrap();
        drop(c);
        let fixed = dir.path().join("fixed.vhd");
        drop(
            VhdFile::create(
                &fixed,
                &CreateSpec {
                    virtual_size: 64 << 10,
                    ..spec(DiskKind::Fixed)
                },
            )
            .unwrap(),
        );
        [base, child, fixed]
            .iter()
            .map(|p| std::fs::read(p).unwrap())
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let seeds = seeds();
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let seed = &seeds[pick as usize % seeds.len()];
    let (img, what) = mutate(seed, &mut FromBytes(rest));
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.vhd");
    std::fs::write(&p, &img).unwrap();
    if let Err(broken) = judge(&p, &what) {
        panic!("{broken}");
    }
});
