//! Image operations (resize, reparent, compact, check) verified by qemu and libvhdi.

mod common;
use common::*;
use fv_vdisk_core::{CreateSpec, DiskKind, Image, Layer, ParentSpec, RawLayer};
use fv_vhdx::{OpenOptions, VhdxFile};
use std::os::unix::fs::FileExt;

#[test]
fn resize_grow_moves_bat_and_shrink_refuses_data() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("r.vhdx");
    let v = VhdxFile::create(&img, &spec(DiskKind::Dynamic, 16 * MIB, 1 << 20, 512)).unwrap();
    v.write(MIB, &[0x77; 4096]).unwrap();
    // 1 MiB blocks: a 1 MiB BAT region holds 131072 entries; 200 GiB needs more.
    let big = 200 * 1024 * MIB;
    v.resize(big).unwrap();
    assert_eq!(v.info().virtual_size, big);
    v.write(big - 4096, &[0x88; 4096]).unwrap();
    assert!(v.resize(8 * MIB).is_err(), "shrinking over data is refused");
    drop(v);
    let info = run_ok("qemu-img", &["info", "--output=json", p(&img)], 60);
    assert!(info.contains(&format!("\"virtual-size\": {big}")), "{info}");
    run_ok("qemu-img", &["check", "-f", "vhdx", p(&img)], 120);
    run_ok(
        "qemu-io",
        &[
            "-f",
            "vhdx",
            "-r",
            "-c",
            "read -P 0x77 1M 4k",
            "-c",
            &format!("read -P 0x88 {} 4096", big - 4096),
            "-c",
            "read -P 0 2M 1M",
            p(&img),
        ],
        60,
    );
    // Shrink works once the cut range holds no data.
    let v = VhdxFile::open(&img, &OpenOptions::default()).unwrap();
    v.discard(big - MIB, MIB).unwrap();
    v.resize(32 * MIB).unwrap();
    drop(v);
    run_ok("qemu-img", &["check", "-f", "vhdx", p(&img)], 120);
    run_ok(
        "qemu-io",
        &[
            "-f",
            "vhdx",
            "-r",
            "-c",
            "read -P 0x77 1M 4k",
            "-c",
            "read -P 0 16M 16M",
            p(&img),
        ],
        60,
    );
}

#[test]
fn set_parent_rewrites_locator() {
    let dir = tempfile::tempdir().unwrap();
    let base_p = dir.path().join("base.vhdx");
    let moved_p = dir.path().join("moved.vhdx");
    let child_p = dir.path().join("child.vhdx");
    let base = VhdxFile::create(&base_p, &spec(DiskKind::Dynamic, 8 * MIB, 1 << 20, 512)).unwrap();
    let ps = |path: &std::path::Path, rel: &str| ParentSpec {
        identity: base.info().identity.clone(),
        virtual_size: 8 * MIB,
        relative_path: rel.into(),
        absolute_path: path.to_str().unwrap().into(),
        parent_disk_id: base.info().disk_id,
    };
    let child = VhdxFile::create(
        &child_p,
        &CreateSpec {
            virtual_size: 0,
            kind: DiskKind::Differencing,
            block_size: 0,
            logical_sector_size: 512,
            physical_sector_size: 512,
            parent: Some(ps(&base_p, "base.vhdx")),
        },
    )
    .unwrap();
    child.write(0, &[5u8; 4096]).unwrap();
    let long = format!("{}/{}", "sub".repeat(40), "moved.vhdx");
    child.set_parent(&ps(&moved_p, &long)).unwrap();
    assert_eq!(
        child.parent_locator().unwrap().relative_path.as_deref(),
        Some(long.as_str())
    );
    drop(child);
    let child = VhdxFile::open(
        &child_p,
        &OpenOptions {
            read_only: true,
            replay_log: false,
        },
    )
    .unwrap();
    let loc = child.parent_locator().unwrap();
    assert_eq!(loc.relative_path.as_deref(), Some(long.as_str()));
    assert_eq!(loc.absolute_path.as_deref(), moved_p.to_str());
    let mut b = vec![0u8; 4096];
    child.read_layer(0, &mut b, &mut Vec::new()).unwrap();
    assert_eq!(b, vec![5u8; 4096]);
    let info = run_ok("vhdiinfo", &[p(&child_p)], 60);
    assert!(info.contains("moved.vhdx"), "{info}");
    assert!(child.check(false).unwrap().is_clean());
}

#[test]
fn compact_shrinks_and_keeps_content() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("c.vhdx");
    let rawp = dir.path().join("c.raw");
    let size = 32 * MIB;
    let v = VhdxFile::create(&img, &spec(DiskKind::Dynamic, size, 1 << 20, 512)).unwrap();
    let raw = RawLayer::create(&rawp, size).unwrap();
    let mut rng = Rng(3);
    for blk in 0..32u64 {
        let mut d = vec![0u8; MIB as usize];
        if blk % 3 != 0 {
            rng.fill(&mut d);
        }
        v.write(blk * MIB, &d).unwrap();
        raw.write(blk * MIB, &d).unwrap();
    }
    for blk in [1u64, 2, 4, 5] {
        v.discard(blk * MIB, MIB).unwrap();
        raw.write_zeroes(blk * MIB, MIB).unwrap();
    }
    v.flush().unwrap();
    let before = std::fs::metadata(&img).unwrap().len();
    let mut calls = 0;
    let shrunk = v
        .compact(&mut |_, _| {
            calls += 1;
            true
        })
        .unwrap();
    let after = std::fs::metadata(&img).unwrap().len();
    println!("compact: {before} -> {after} bytes (reported {shrunk})");
    assert_eq!(before - after, shrunk);
    // 11 all-zero blocks and 4 discarded ones no longer take space.
    assert!(shrunk >= 15 * MIB, "shrunk by {shrunk}");
    assert!(calls > 0);
    let a = v.allocation().unwrap();
    assert_eq!(a.allocated_blocks, 32 - 11 - 4);
    assert!(v.check(false).unwrap().is_clean());
    drop(v);
    run_ok(
        "qemu-img",
        &["compare", "-f", "vhdx", p(&img), "-F", "raw", p(&rawp)],
        120,
    );
    run_ok("qemu-img", &["check", "-f", "vhdx", p(&img)], 120);
}

#[test]
fn check_reports_and_repairs_a_bad_header_and_region_table() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("k.vhdx");
    let v = VhdxFile::create(&img, &spec(DiskKind::Dynamic, 8 * MIB, 1 << 20, 512)).unwrap();
    assert!(v.check(false).unwrap().is_clean());
    assert!(v.check(false).unwrap().warnings.is_empty());
    drop(v);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&[0xff; 16], 64 * 1024 + 200).unwrap(); // header 1 (older, seq 1)
    f.write_all_at(&[0xff; 16], 256 * 1024 + 300).unwrap(); // region table copy 2
    drop(f);
    let v = VhdxFile::open(&img, &OpenOptions::default()).unwrap();
    let r = v.check(false).unwrap();
    assert_eq!(r.warnings.len(), 2, "{r:?}");
    let r = v.check(true).unwrap();
    assert_eq!(r.repaired.len(), 2, "{r:?}");
    let r = v.check(false).unwrap();
    assert!(r.warnings.is_empty() && r.errors.is_empty(), "{r:?}");
    drop(v);
    run_ok("qemu-img", &["check", "-f", "vhdx", p(&img)], 60);
}
