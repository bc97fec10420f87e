//! Structure-aware mutations (tests/structure_gen) over valid images made by qemu-img
//! and by our own create: a few thousand deterministic seeds, each image with one
//! field changed, judged by the invariants of `structure_gen::judge` (a typed error
//! or a sound read-only open; no writable open of anything check calls damaged).
//! The `structure` cargo-fuzz target runs the same generator unbounded.

mod common;
mod structure_gen;
use common::*;
use fv_vdisk_core::{CreateSpec, DiskKind, Layer, ParentSpec};
use fv_vhdx::VhdxFile;
use structure_gen::*;

/// Valid source images: ours (dynamic, fixed, differencing with partial blocks) and
/// qemu-img's (dynamic, written by qemu-io).
fn sources(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let base_p = dir.join("base.vhdx");
    let base = VhdxFile::create(&base_p, &spec(DiskKind::Dynamic, 6 * MIB, 1 << 20, 512)).unwrap();
    base.write(0, &[1u8; 8192]).unwrap();
    base.write(3 * MIB, &[3u8; 1 << 20]).unwrap();
    base.flush().unwrap();
    let child_p = dir.join("child.vhdx");
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
                absolute_path: base_p.to_str().unwrap().into(),
                parent_disk_id: None,
            }),
        },
    )
    .unwrap();
    child.write(4096, &[2u8; 4096]).unwrap();
    child.write(2 * MIB, &[4u8; 1 << 20]).unwrap();
    child.flush().unwrap();
    drop(child);
    drop(base);
    let fixed_p = dir.join("fixed.vhdx");
    drop(VhdxFile::create(&fixed_p, &spec(DiskKind::Fixed, 4 * MIB, 1 << 20, 4096)).unwrap());
    let q = dir.join("qemu.vhdx");
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vhdx",
            "-o",
            "block_size=1M",
            p(&q),
            "6M",
        ],
        60,
    );
    run_ok(
        "qemu-io",
        &[
            "-f",
            "vhdx",
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "write -P 0x6b 4M 64k",
            p(&q),
        ],
        60,
    );
    [
        ("ours-dynamic", base_p),
        ("ours-differencing", child_p),
        ("ours-fixed", fixed_p),
        ("qemu-dynamic", q),
    ]
    .into_iter()
    .map(|(n, p)| (n.to_string(), std::fs::read(p).unwrap()))
    .collect()
}

#[test]
fn structure_mutations_are_refused_or_served_soundly() {
    // tmpfs when there is one: thousands of image rewrites and fsyncs.
    let dir = match std::path::Path::new("/dev/shm") {
        shm if shm.is_dir() => tempfile::tempdir_in(shm).unwrap(),
        _ => tempfile::tempdir().unwrap(),
    };
    let srcs = sources(dir.path());
    let n: u64 = std::env::var("FV_STRUCTURE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2400);
    let target = dir.path().join("m.vhdx");
    let mut total = Outcome::default();
    let mut per_class = [0usize; CLASSES.len()];
    let mut failures = Vec::new();
    for seed in 0..n {
        let (name, src) = &srcs[(seed % srcs.len() as u64) as usize];
        let mut img = src.clone();
        let mut pick = Pick(seed.wrapping_mul(0x2545F4914F6CDD1D) ^ 0x1234);
        let what = format!("seed {seed} on {name}: {}", mutate(&mut img, &mut pick));
        // Which class ran: re-derive it the way mutate does.
        let mut again = Pick(seed.wrapping_mul(0x2545F4914F6CDD1D) ^ 0x1234);
        per_class[again.below(CLASSES.len() as u64) as usize] += 1;
        std::fs::write(&target, &img).unwrap();
        match judge(&target, &what) {
            Ok(o) => {
                total.refused_ro += o.refused_ro;
                total.damaged_ro_ok += o.damaged_ro_ok;
                total.sound += o.sound;
            }
            Err(e) => failures.push(e),
        }
    }
    println!(
        "structure fuzz: {n} mutations: {} refused read-only, {} opened read-only with damage reported, {} sound",
        total.refused_ro, total.damaged_ro_ok, total.sound
    );
    for (c, k) in CLASSES.iter().zip(per_class) {
        println!("  {c}: {k}");
    }
    assert!(
        failures.is_empty(),
        "{} failures, first: {:#?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(total.refused_ro > 0 && total.damaged_ro_ok > 0 && total.sound > 0);
}
