//! The structure-aware fuzz generator (`fv_vhd::structure_fuzz`, also the `structure`
//! fuzz target) over a few thousand seeded mutants of valid images made by qemu-img
//! and by our own create. Deterministic: the same mutants every run.
use fv_vdisk_core::{CreateSpec, DiskKind, Layer, ParentSpec};
use fv_vhd::structure_fuzz::{judge, mutate, Outcome, Seeded};
use fv_vhd::VhdFile;
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} is required for this test and could not run: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn spec(size: u64, kind: DiskKind) -> CreateSpec {
    CreateSpec {
        virtual_size: size,
        kind,
        block_size: 512 << 10,
        logical_sector_size: 512,
        physical_sector_size: 512,
        parent: None,
    }
}

/// tmpfs when there is one: thousands of small fsyncs.
fn scratch() -> tempfile::TempDir {
    if Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm").unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

fn seeds(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let base = dir.join("base.vhd");
    let b = VhdFile::create(&base, &spec(2 << 20, DiskKind::Dynamic)).unwrap();
    b.write(0, &vec![3u8; 8192]).unwrap();
    b.write((2 << 20) - 4096, &vec![4u8; 4096]).unwrap();
    let id = b.identity();
    drop(b);
    let child = dir.join("child.vhd");
    let mut s = spec(2 << 20, DiskKind::Differencing);
    s.parent = Some(ParentSpec {
        identity: id,
        virtual_size: 2 << 20,
        relative_path: "base.vhd".into(),
        absolute_path: base.to_str().unwrap().into(),
        parent_disk_id: None,
    });
    let c = VhdFile::create(&child, &s).unwrap();
    c.write(1 << 20, &vec![5u8; 4096]).unwrap();
    drop(c);
    let fixed = dir.join("fixed.vhd");
    drop(VhdFile::create(&fixed, &spec(64 << 10, DiskKind::Fixed)).unwrap());
    // qemu's own layout (2 MiB blocks, BAT right after the header).
    let q = dir.join("qemu.vhd");
    let qs = q.to_str().unwrap();
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vpc",
            "-o",
            "subformat=dynamic",
            qs,
            "4M",
        ],
    );
    run("qemu-io", &["-f", "vpc", "-c", "write -P 0x6b 0 64k", qs]);
    run("qemu-io", &["-f", "vpc", "-c", "write -P 0x6c 3M 4k", qs]);
    [
        ("ours-dynamic", base),
        ("ours-differencing", child),
        ("ours-fixed", fixed),
        ("qemu-dynamic", q),
    ]
    .into_iter()
    .map(|(n, p)| (n.to_string(), std::fs::read(p).unwrap()))
    .collect()
}

#[test]
fn seeded_structure_mutants_meet_the_verdict() {
    let dir = scratch();
    let seeds = seeds(dir.path());
    let target = dir.path().join("mutant.vhd");
    let mut rng = Seeded(0x005e_ed0f_5eed);
    let mut counts: HashMap<Outcome, usize> = HashMap::new();
    let n = 3000;
    for i in 0..n {
        let (name, seed) = &seeds[i % seeds.len()];
        let (img, what) = mutate(seed, &mut rng);
        std::fs::write(&target, &img).unwrap();
        match judge(&target, &format!("mutant {i} of {name}: {what}")) {
            Ok(o) => *counts.entry(o).or_default() += 1,
            Err(broken) => panic!("{broken}"),
        }
    }
    println!("{n} structure mutants: {counts:?}");
    for o in [
        Outcome::Refused,
        Outcome::Sound,
        Outcome::DamagedRefused,
        Outcome::Repaired,
    ] {
        assert!(
            counts.get(&o).copied().unwrap_or(0) >= 20,
            "too few mutants ended {o:?} to exercise that path: {counts:?}"
        );
    }
}
