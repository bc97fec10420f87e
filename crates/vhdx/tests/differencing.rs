//! Differencing disks: our layer reads and absent ranges, and libvhdi (vhdimount)
//! reading the child over its parent as one disk.

mod common;
use common::*;
use fv_vdisk_core::{CreateSpec, DiskKind, Image, Layer, LayerIdentity, ParentSpec, RawLayer};
use fv_vhdx::{OpenOptions, VhdxFile};

fn child_spec(base: &VhdxFile, base_path: &std::path::Path, lss: u32) -> CreateSpec {
    CreateSpec {
        virtual_size: 0,
        kind: DiskKind::Differencing,
        block_size: 0,
        logical_sector_size: lss,
        physical_sector_size: 4096,
        parent: Some(ParentSpec {
            identity: base.info().identity.clone(),
            virtual_size: base.info().virtual_size,
            relative_path: "base.vhdx".into(),
            absolute_path: base_path.to_str().unwrap().into(),
            parent_disk_id: base.info().disk_id,
        }),
    }
}

fn differencing(lss: u32) {
    let dir = tempfile::tempdir().unwrap();
    let base_p = dir.path().join("base.vhdx");
    let child_p = dir.path().join("child.vhdx");
    let flat_p = dir.path().join("flat.raw");
    let size = 40 * MIB;
    let l = lss as u64;
    let mut rng = Rng(lss as u64);

    let base = VhdxFile::create(&base_p, &spec(DiskKind::Dynamic, size, 1 << 20, lss)).unwrap();
    let flat = RawLayer::create(&flat_p, size).unwrap();
    // Base content: mostly filled, so that fall-through is visible.
    for i in 0..(size / MIB) {
        if i % 5 == 3 {
            continue;
        }
        let mut d = vec![0u8; MIB as usize];
        rng.fill(&mut d);
        base.write(i * MIB, &d).unwrap();
        flat.write(i * MIB, &d).unwrap();
    }
    base.flush().unwrap();
    let base_guid = base.data_write_guid();
    let child = VhdxFile::create(&child_p, &child_spec(&base, &base_p, lss)).unwrap();
    assert_eq!(child.info().kind, DiskKind::Differencing);
    assert_eq!(
        child.info().block_size,
        2 << 20,
        "differencing default block size"
    );
    let loc = child.parent_locator().unwrap();
    assert_eq!(loc.relative_path.as_deref(), Some("base.vhdx"));
    assert_eq!(loc.absolute_path.as_deref(), base_p.to_str());
    assert_eq!(
        loc.expected,
        Some(LayerIdentity::Vhdx {
            data_write_guid: base_guid
        })
    );

    // Which sectors the child holds (written or zeroed), mirrored in `held`.
    let sectors = (size / l) as usize;
    let mut held = vec![false; sectors];
    let bs = child.info().block_size as u64;
    let write = |off: u64, d: &[u8], held: &mut Vec<bool>| {
        child.write(off, d).unwrap();
        flat.write(off, d).unwrap();
        for s in off / l..(off + d.len() as u64) / l {
            held[s as usize] = true;
        }
    };
    for _ in 0..60 {
        let n = (1 + rng.below(16)) * l;
        let off = rng.below((size - n) / l) * l;
        let mut d = vec![0u8; n as usize];
        rng.fill(&mut d);
        write(off, &d, &mut held);
    }
    // A whole block, and a write spanning two blocks.
    let mut d = vec![0u8; bs as usize];
    rng.fill(&mut d);
    write(4 * bs, &d, &mut held);
    let mut d = vec![0u8; (bs / 2 + 3 * l) as usize];
    rng.fill(&mut d);
    write(6 * bs - bs / 4, &d, &mut held);
    child.flush().unwrap();
    // Zeroes hide the parent: whole block and partial.
    child.write_zeroes(8 * bs, bs).unwrap();
    flat.write_zeroes(8 * bs, bs).unwrap();
    child.write_zeroes(10 * bs + 4 * l, 9 * l).unwrap();
    flat.write_zeroes(10 * bs + 4 * l, 9 * l).unwrap();
    for s in (8 * bs) / l..(9 * bs) / l {
        held[s as usize] = true;
    }
    for s in (10 * bs + 4 * l) / l..(10 * bs + 13 * l) / l {
        held[s as usize] = true;
    }
    // Discard makes the child transparent again (whole block and partial).
    child.discard(4 * bs, bs).unwrap();
    child.discard(6 * bs - bs / 4, 2 * l).unwrap();
    let restore = |off: u64, len: u64, held: &mut Vec<bool>| {
        let mut b = vec![0u8; len as usize];
        base.read_layer(off, &mut b, &mut Vec::new()).unwrap();
        flat.write(off, &b).unwrap();
        for s in off / l..(off + len) / l {
            held[s as usize] = false;
        }
    };
    restore(4 * bs, bs, &mut held);
    restore(6 * bs - bs / 4, 2 * l, &mut held);
    child.flush().unwrap();
    drop(child);

    // Reopen read-only and verify reads, absent ranges and extents.
    let child = VhdxFile::open(
        &child_p,
        &OpenOptions {
            read_only: true,
            replay_log: false,
        },
    )
    .unwrap();
    let base = VhdxFile::open(
        &base_p,
        &OpenOptions {
            read_only: true,
            replay_log: false,
        },
    )
    .unwrap();
    let mut expect = vec![0u8; size as usize];
    flat.read_layer(0, &mut expect, &mut Vec::new()).unwrap();
    let got = read_chain(&child, &base, 0, size as usize);
    assert_eq!(first_diff(&got, &expect), None, "chain read differs");
    // Unaligned-to-block windows too.
    for _ in 0..50 {
        let len = (1 + rng.below(300)) * l;
        let off = rng.below((size - len) / l) * l;
        let got = read_chain(&child, &base, off, len as usize);
        assert_eq!(
            first_diff(&got, &expect[off as usize..(off + len) as usize]),
            None
        );
    }
    let mut absent = Vec::new();
    let mut buf = vec![0u8; size as usize];
    child.read_layer(0, &mut buf, &mut absent).unwrap();
    let mut expect_absent: Vec<std::ops::Range<u64>> = Vec::new();
    for (s, h) in held.iter().enumerate() {
        if !h {
            let (a, b) = (s as u64 * l, (s as u64 + 1) * l);
            match expect_absent.last_mut() {
                Some(r) if r.end == a => r.end = b,
                _ => expect_absent.push(a..b),
            }
        }
    }
    assert_eq!(absent, expect_absent, "absent ranges");
    let ext = child.extents(0, size).unwrap();
    let absent_ext: Vec<_> = ext
        .iter()
        .filter(|e| e.state == fv_vdisk_core::ExtentState::Absent)
        .map(|e| e.offset..e.offset + e.length)
        .collect();
    assert_eq!(absent_ext, expect_absent, "extents agree with reads");

    // libvhdi reads the child over the parent as one disk.
    let info = run_ok("vhdiinfo", &[p(&child_p)], 60);
    assert!(info.contains("Differential"), "{info}");
    assert!(
        info.contains(&format!("Parent identifier\t: {base_guid}")),
        "{info}"
    );
    assert!(
        info.contains(&format!(
            "Parent filename\t\t: {}",
            base_p.display().to_string().replace('/', "\\")
        )),
        "{info}"
    );
    // vhdimount resolves the parent through our locator and opens the chain.
    // libvhdi 20210425 (Debian bookworm) returns the parent's data for every block of
    // a VHDX child, even FULLY_PRESENT blocks with all bitmap bits set (newer libvhdi
    // reads them), so its bytes are not compared here; our own chain read above is.
    let m = Mount::new(&child_p, &dir.path().join("mnt"));
    assert_eq!(std::fs::metadata(m.file()).unwrap().len(), size);
    drop(m);

    // Writing the parent changes its DataWriteGuid, which invalidates the child.
    drop(base);
    let base = VhdxFile::open(&base_p, &OpenOptions::default()).unwrap();
    assert_eq!(
        base.data_write_guid(),
        base_guid,
        "opening writable alone changes nothing"
    );
    base.write(0, &[1u8; 4096]).unwrap();
    assert_ne!(base.data_write_guid(), base_guid);
    assert_eq!(
        base.info().identity,
        LayerIdentity::Vhdx {
            data_write_guid: base.data_write_guid()
        }
    );
    assert_ne!(
        Some(base.info().identity.clone()),
        child.parent_locator().unwrap().expected
    );
    let _ = base.allocation();
}

#[test]
fn differencing_512() {
    differencing(512);
}

#[test]
fn differencing_4096() {
    differencing(4096);
}
