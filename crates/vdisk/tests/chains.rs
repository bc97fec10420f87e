//! Differencing chains built by us, read by vhdimount (libvhdi) and by our engine,
//! against a reference computed independently (the same writes applied to a buffer).
mod common;
use common::*;
use fv_vdisk::ops;
use fv_vdisk::{BlockDevice, CreateSpec, DiskError, DiskFormat, DiskKind, PathPolicy};
use rand::SeedableRng;
use std::path::{Path, PathBuf};

const SIZE: u64 = 24 << 20;

fn dynamic(size: u64) -> CreateSpec {
    CreateSpec {
        virtual_size: size,
        kind: DiskKind::Dynamic,
        block_size: 0,
        logical_sector_size: 512,
        physical_sector_size: 512,
        parent: None,
    }
}

/// base + `depth` children, each written through the chain. Returns (paths, reference).
fn build_chain(dir: &Path, depth: usize, seed: u64) -> (Vec<PathBuf>, Vec<u8>) {
    build_chain_fmt(dir, depth, seed, 4096, DiskFormat::Vhd)
}

fn build_chain_unit(dir: &Path, depth: usize, seed: u64, unit: u64) -> (Vec<PathBuf>, Vec<u8>) {
    build_chain_fmt(dir, depth, seed, unit, DiskFormat::Vhd)
}

/// `unit` is the write granularity. vhdimount 20210425 (libvhdi) misreads a sector
/// bitmap byte whose set bits are followed by clear bits (it shifts without masking),
/// so chains compared against it are written in 4 KiB units (whole bitmap bytes);
/// 512-byte granularity is compared against the independent reference only.
fn build_chain_fmt(
    dir: &Path,
    depth: usize,
    seed: u64,
    unit: u64,
    fmt: DiskFormat,
) -> (Vec<PathBuf>, Vec<u8>) {
    let ext = if fmt == DiskFormat::Vhd {
        "vhd"
    } else {
        "vhdx"
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut reference = vec![0u8; SIZE as usize];
    let base = dir.join(format!("base.{ext}"));
    ops::create(&base, fmt, &dynamic(SIZE)).unwrap();
    {
        let d = fv_vdisk::open(&base, &rw()).unwrap();
        scribble(&mut rng, &d, &mut reference, 30, unit);
    }
    let mut paths = vec![base];
    for level in 1..=depth {
        let child = dir.join(format!("child{level}.{ext}"));
        ops::create_differencing(&child, paths.last().unwrap(), 0).unwrap();
        let d = fv_vdisk::open(&child, &rw()).unwrap();
        assert_eq!(d.layers().len(), level + 1);
        scribble(&mut rng, &d, &mut reference, 20, unit);
        // Discard in a child makes the parent's data visible again.
        d.discard(4 << 20, 1 << 20).unwrap();
        d.flush().unwrap();
        let mut below = vec![0u8; 1 << 20];
        {
            let p = fv_vdisk::open(paths.last().unwrap(), &ro()).unwrap();
            p.read_at(4 << 20, &mut below).unwrap();
        }
        reference[4 << 20..5 << 20].copy_from_slice(&below);
        drop(d);
        paths.push(child);
    }
    (paths, reference)
}

#[test]
fn chains_depth_1_to_4_match_vhdimount_and_reference() {
    check_chains(DiskFormat::Vhd);
}

#[test]
fn vhdx_chains_depth_1_to_4_match_vhdimount_and_reference() {
    check_chains(DiskFormat::Vhdx);
}

fn check_chains(fmt: DiskFormat) {
    for depth in 1..=4 {
        let dir = tempfile::tempdir().unwrap();
        let (paths, reference) = build_chain_fmt(dir.path(), depth, depth as u64, 4096, fmt);
        let top = paths.last().unwrap();
        let d = fv_vdisk::open(top, &ro()).unwrap();
        assert_eq!(read_all(&d), reference, "engine, depth {depth}");
        // block_status: Data where any layer holds data.
        let st = d.block_status(0, SIZE).unwrap();
        assert!(st.iter().any(|e| e.state == fv_vdisk::ExtentState::Data));
        drop(d);
        let mnt = VhdiMount::new(top, &dir.path().join("mnt"));
        assert_eq!(
            mnt.layers(),
            depth + 1,
            "vhdimount resolved the whole chain"
        );
        let via_fuse = std::fs::read(mnt.file()).unwrap();
        assert_eq!(
            via_fuse.len(),
            reference.len(),
            "vhdimount size, depth {depth}"
        );
        if via_fuse != reference {
            let diffs: Vec<usize> = (0..reference.len() / 512)
                .filter(|&s| via_fuse[s * 512..(s + 1) * 512] != reference[s * 512..(s + 1) * 512])
                .collect();
            let s0 = diffs[0] * 512;
            let kept = dir.keep();
            panic!(
                "vhdimount content differs at depth {depth}: {} sectors, first {:?}; ref {:?} fuse {:?} (kept {})",
                diffs.len(),
                &diffs[..diffs.len().min(8)],
                &reference[s0..s0 + 8],
                &via_fuse[s0..s0 + 8],
                kept.display()
            );
        }
    }
}

#[test]
fn sector_granular_chain_matches_reference() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, reference) = build_chain_unit(dir.path(), 3, 11, 512);
    let d = fv_vdisk::open(paths.last().unwrap(), &ro()).unwrap();
    assert_eq!(read_all(&d), reference);
    // Unaligned reads bounce through whole sectors.
    let mut b = vec![0u8; 1000];
    d.read_at(12345, &mut b).unwrap();
    assert_eq!(&b[..], &reference[12345..13345]);
}

#[test]
fn broken_wrong_cyclic_and_disallowed_chains_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, _) = build_chain(dir.path(), 1, 99);
    let (base, child) = (&paths[0], &paths[1]);
    // Parent modified after the child was made.
    {
        let b = fv_vdisk::open(base, &rw()).unwrap();
        b.write_at(0, &[1u8; 512]).unwrap();
    }
    match fv_vdisk::open(child, &ro()) {
        Err(DiskError::BrokenChain { reason, .. }) => {
            assert!(reason.contains("identity"), "{reason}")
        }
        other => panic!("expected BrokenChain, got {:?}", other.err()),
    }
    let rep = ops::inspect(child).unwrap();
    let link = rep.top.parent.as_ref().unwrap();
    assert!(!link.verified && link.resolved.is_some());
    assert!(!ops::check(child, false).unwrap().is_clean());

    // Wrong parent: replace base with another disk of the same size.
    let d2 = tempfile::tempdir().unwrap();
    let (p2, _) = build_chain(d2.path(), 1, 5);
    std::fs::rename(&p2[0], base).unwrap();
    assert!(matches!(
        fv_vdisk::open(child, &ro()),
        Err(DiskError::BrokenChain { .. })
    ));

    // Mixed formats: a VHD child whose parent file is now a VHDX of the same size.
    let d3 = tempfile::tempdir().unwrap();
    let (px, _) = build_chain_fmt(d3.path(), 0, 5, 4096, DiskFormat::Vhdx);
    std::fs::copy(&px[0], base).unwrap();
    match fv_vdisk::open(child, &ro()) {
        Err(DiskError::BrokenChain { reason, .. }) => assert!(reason.contains("mixed"), "{reason}"),
        other => panic!("expected BrokenChain, got {:?}", other.err()),
    }

    // Parent missing.
    std::fs::remove_file(base).unwrap();
    assert!(matches!(
        fv_vdisk::open(child, &ro()),
        Err(DiskError::ParentNotFound { .. })
    ));

    // Parent outside the allowed directories (also through a symlink).
    let outside = tempfile::tempdir().unwrap();
    let inside = tempfile::tempdir().unwrap();
    let (p3, _) = build_chain(outside.path(), 1, 6);
    let moved = inside.path().join("child1.vhd");
    std::fs::copy(&p3[1], &moved).unwrap();
    std::os::unix::fs::symlink(&p3[0], inside.path().join("base.vhd")).unwrap();
    match fv_vdisk::open(&moved, &ro()) {
        Err(DiskError::ParentNotAllowed { parent, .. }) => {
            assert!(parent.starts_with(outside.path().canonicalize().unwrap()))
        }
        other => panic!("expected ParentNotAllowed, got {:?}", other.err()),
    }
    // Allowed once the policy names that directory.
    let opts = fv_vdisk::OpenOptions {
        read_only: true,
        replay_log: false,
        policy: PathPolicy::image_dir_only().allow(outside.path()),
    };
    assert_eq!(fv_vdisk::open(&moved, &opts).unwrap().layers().len(), 2);

    // Cycle: child1 pointed at child2 (its own child). set-parent refuses it, even
    // forced; written behind its back (the format call), open refuses the chain.
    let cyc = tempfile::tempdir().unwrap();
    let (p4, _) = build_chain(cyc.path(), 2, 7);
    for force in [false, true] {
        match ops::set_parent(&p4[1], &p4[2], force) {
            Err(DiskError::Refused { reason, .. }) => assert!(reason.contains("cycle"), "{reason}"),
            other => panic!("expected a refused cycle (force {force}), got {other:?}"),
        }
    }
    {
        let l = fv_vdisk::open_layer(&p4[1], None, &rw()).unwrap();
        let p = fv_vdisk::open_layer(&p4[2], None, &ro()).unwrap();
        let spec = ops::parent_spec(&p4[1], &p4[2], &p).unwrap();
        l.image().unwrap().set_parent(&spec).unwrap();
    }
    // child2 -> child1 -> child2: refuse with CyclicChain (identity of child1 changed
    // only in its header, so the link child2 -> child1 may also be reported broken).
    match fv_vdisk::open(&p4[2], &ro()) {
        Err(DiskError::CyclicChain { .. }) | Err(DiskError::BrokenChain { .. }) => {}
        other => panic!("expected CyclicChain, got {:?}", other.err()),
    }
    match fv_vdisk::open(&p4[1], &ro()) {
        Err(DiskError::CyclicChain { .. }) | Err(DiskError::BrokenChain { .. }) => {}
        other => panic!("expected CyclicChain, got {:?}", other.err()),
    }
    // Merging on the broken chain is refused.
    assert!(ops::merge_into_parent(&p4[2], true, &mut |_, _| true).is_err());
    assert!(p4[2].exists());
}

#[test]
fn self_cycle_is_cyclic_chain() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, _) = build_chain(dir.path(), 1, 3);
    // Point the child at itself (forced: identities differ).
    let c = &paths[1];
    let l = fv_vdisk::open_layer(c, None, &rw()).unwrap();
    let spec = ops::parent_spec(c, c, &l).unwrap();
    l.image().unwrap().set_parent(&spec).unwrap();
    drop(l);
    assert!(matches!(
        fv_vdisk::open(c, &ro()),
        Err(DiskError::CyclicChain { .. })
    ));
}

/// Reads through deep chains take a per-unit shortcut to the ancestor that owns the
/// data; with sector-granular layers (units split between layers), random ranges,
/// and top-layer writes and discards after the shortcut was taken, every read must
/// still match the reference.
#[test]
fn owner_shortcut_random_reads_match_reference_across_top_changes() {
    for fmt in [DiskFormat::Vhd, DiskFormat::Vhdx] {
        let dir = tempfile::tempdir().unwrap();
        let (paths, mut reference) = build_chain_fmt(dir.path(), 6, 23, 512, fmt);
        let top = fv_vdisk::open(paths.last().unwrap(), &rw()).unwrap();
        assert_eq!(top.layers().len(), 7);
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let check = |d: &dyn BlockDevice, reference: &[u8], rng: &mut rand::rngs::StdRng| {
            use rand::Rng;
            for _ in 0..300 {
                let len = rng.gen_range(1..=(3 << 20));
                let off = rng.gen_range(0..=SIZE - len);
                let mut b = vec![0u8; len as usize];
                d.read_at(off, &mut b).unwrap();
                assert!(
                    b == reference[off as usize..(off + len) as usize],
                    "{fmt:?}: read {off}+{len} differs from the reference"
                );
            }
        };
        check(&top, &reference, &mut rng);
        // Change the top after the shortcuts were taken: writes hide ancestors,
        // discards make them visible again.
        scribble(&mut rng, &top, &mut reference, 20, 512);
        top.discard(0, 8 << 20).unwrap();
        {
            let below = fv_vdisk::open(&paths[paths.len() - 2], &ro()).unwrap();
            let mut b = vec![0u8; 8 << 20];
            below.read_at(0, &mut b).unwrap();
            reference[..8 << 20].copy_from_slice(&b);
        }
        check(&top, &reference, &mut rng);
        assert_eq!(read_all(&top), reference, "{fmt:?}");
        drop(top);
        let again = fv_vdisk::open(paths.last().unwrap(), &ro()).unwrap();
        assert_eq!(read_all(&again), reference, "{fmt:?} after reopen");
    }
}

#[test]
fn set_parent_refuses_self_parent_even_forced() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, _) = build_chain(dir.path(), 1, 11);
    for force in [false, true] {
        assert!(
            matches!(
                ops::set_parent(&paths[1], &paths[1], force),
                Err(DiskError::Refused { .. })
            ),
            "self-parent accepted (force {force})"
        );
    }
    // Still the original, working chain.
    assert_eq!(fv_vdisk::open(&paths[1], &ro()).unwrap().layers().len(), 2);
}

/// A chain exactly as deep as open accepts; then `new --parent`, set-parent
/// (forced too) and inspect at the limit.
#[test]
fn depth_limit_is_enforced_by_new_set_parent_and_inspect() {
    let max = fv_vdisk::MAX_CHAIN_DEPTH;
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    ops::create(&base, DiskFormat::Vhd, &dynamic(SIZE)).unwrap();
    let mut top = base.clone();
    for i in 1..max {
        let c = dir.path().join(format!("c{i:03}.vhd"));
        ops::create_differencing(&c, &top, 0).unwrap();
        top = c;
    }
    assert_eq!(fv_vdisk::open(&top, &ro()).unwrap().layers().len(), max);
    // One more would never open: refused.
    let deeper = dir.path().join("deeper.vhd");
    match ops::create_differencing(&deeper, &top, 0) {
        Err(DiskError::Refused { reason, .. }) => assert!(reason.contains("deeper"), "{reason}"),
        other => panic!("expected Refused, got {other:?}"),
    }
    assert!(!deeper.exists());
    // A separate differencing disk re-pointed at the head: refused, forced too.
    let other = tempfile::tempdir().unwrap();
    let (p, _) = build_chain(other.path(), 1, 12);
    let lone = dir.path().join("lone.vhd");
    std::fs::rename(&p[1], &lone).unwrap();
    std::fs::rename(&p[0], dir.path().join("lone-base.vhd")).unwrap();
    for force in [false, true] {
        match ops::set_parent(&lone, &top, force) {
            Err(DiskError::Refused { reason, .. }) => {
                assert!(reason.contains("deep"), "{reason}")
            }
            other => panic!("expected Refused (force {force}), got {other:?}"),
        }
    }
    // Written behind the engine's back, the 129-deep chain: open refuses it and
    // inspect does not call the last link verified.
    {
        let l = fv_vdisk::open_layer(&lone, None, &rw()).unwrap();
        let t = fv_vdisk::open_layer(&top, None, &ro()).unwrap();
        let spec = ops::parent_spec(&lone, &top, &t).unwrap();
        l.image().unwrap().set_parent(&spec).unwrap();
    }
    assert!(matches!(
        fv_vdisk::open(&lone, &ro()),
        Err(DiskError::Refused { .. })
    ));
    let rep = ops::inspect(&lone).unwrap();
    assert_eq!(rep.chain.len(), max - 1, "ancestors listed");
    let last = rep.chain.last().unwrap().parent.as_ref().unwrap();
    assert!(!last.verified, "the link beyond the limit is not verified");
    assert!(last.problem.as_deref().unwrap_or("").contains("deeper"));
    assert!(rep
        .chain
        .iter()
        .take(max - 2)
        .all(|l| l.parent.as_ref().is_some_and(|p| p.verified)));
}

/// inspect stops at a link it could not verify: what lies behind it is not part
/// of this disk.
#[test]
fn inspect_lists_no_ancestor_behind_an_unverified_link() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, _) = build_chain(dir.path(), 2, 13);
    // Break child1 -> base (base written after child1 was made).
    {
        let b = fv_vdisk::open(&paths[0], &rw()).unwrap();
        b.write_at(0, &[7u8; 512]).unwrap();
    }
    // child2 -> child1 still verifies; child1 -> base does not.
    let rep = ops::inspect(&paths[2]).unwrap();
    assert!(rep.top.parent.as_ref().unwrap().verified);
    assert_eq!(
        rep.chain.len(),
        1,
        "base is not listed behind the broken link"
    );
    let l = rep.chain[0].parent.as_ref().unwrap();
    assert!(!l.verified && l.problem.is_some());
    // And merging child2 into child1 is refused: the chain is broken below.
    match ops::merge_into_parent(&paths[2], false, &mut |_, _| true) {
        Err(DiskError::BrokenChain { .. }) => {}
        other => panic!("expected BrokenChain, got {other:?}"),
    }
    assert!(paths[2].exists());
}
