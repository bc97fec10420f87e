//! Crafted damage, built by each test from valid images (qemu-img's and ours): BAT
//! entries into the headers, the log, the BAT, the metadata, beyond the file and
//! onto another block; hostile logs; exact check verdicts; bad parent linkage.

mod common;
mod structure_gen;
use common::MIB;
use common::*;
use fv_vdisk_core::{CreateSpec, DiskError, DiskKind, Image, Layer, ParentSpec};
use fv_vhdx::format::*;
use fv_vhdx::{OpenOptions, VhdxFile};
use std::path::{Path, PathBuf};
use structure_gen::*;

fn ro() -> OpenOptions {
    OpenOptions {
        read_only: true,
        replay_log: true,
    }
}

/// A qemu-img dynamic image (1 MiB blocks) with block 0 = 0x5a and block 4 = 0x6b
/// written by qemu-io.
fn qemu_image(dir: &Path) -> PathBuf {
    let q = dir.join("q.vhdx");
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
            "16M",
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
            "write -P 0x6b 4M 1M",
            p(&q),
        ],
        60,
    );
    q
}

/// The same content made by our own create.
fn our_image(dir: &Path) -> PathBuf {
    let o = dir.join("o.vhdx");
    let v = VhdxFile::create(&o, &spec(DiskKind::Dynamic, 16 * MIB, 1 << 20, 512)).unwrap();
    v.write(0, &vec![0x5a; MIB as usize]).unwrap();
    v.write(4 * MIB, &vec![0x6b; MIB as usize]).unwrap();
    drop(v);
    o
}

fn assert_damaged_refusal(r: Result<VhdxFile, DiskError>, what: &str) {
    match r {
        Err(e @ DiskError::Damaged { .. }) => {
            let m = e.to_string();
            assert!(m.contains("fv vhd check --repair"), "{what}: {m}");
        }
        Err(e) => panic!("{what}: expected a Damaged refusal, got {e}"),
        Ok(v) => panic!("{what}: writable open succeeded: {:?}", v.damage()),
    }
}

/// Block 0 readable with its pattern (qemu-io wrote it; the damaged entry is block 2).
fn assert_block0_served(v: &VhdxFile) {
    let mut b = vec![0u8; 65536];
    v.read_layer(0, &mut b, &mut Vec::new()).unwrap();
    assert!(b.iter().all(|x| *x == 0x5a));
    v.read_layer(4 * MIB, &mut b, &mut Vec::new()).unwrap();
    assert!(b.iter().all(|x| *x == 0x6b));
}

#[test]
fn bat_entries_into_every_region_refuse_writable_and_serve_sound_blocks() {
    let dir = tempfile::tempdir().unwrap();
    for src in [qemu_image(dir.path()), our_image(dir.path())] {
        let img = std::fs::read(&src).unwrap();
        let l = Layout::parse(&img).unwrap();
        let b0 = l.entry(&img, l.bat_index(0));
        let flen = img.len() as u64;
        let cases = [
            ("header area", 0u64),
            ("log", l.hdr.log_offset),
            ("BAT", l.bat_offset),
            ("metadata", l.meta_offset),
            ("beyond the file", flen.div_ceil(MIB) * MIB + 64 * MIB),
            ("top of u64", 0xFFFF_FFFF_FFF0_0000),
            ("block 0 (duplicate)", entry_offset(b0)),
        ];
        for (what, target) in cases {
            let what = format!("{}: block 2 -> {what}", src.display());
            let mut m = img.clone();
            set_entry(
                &mut m,
                &l,
                l.bat_index(2),
                bat_entry(PAYLOAD_FULLY_PRESENT, target),
            );
            let path = dir.path().join("m.vhdx");
            std::fs::write(&path, &m).unwrap();
            assert_damaged_refusal(VhdxFile::open(&path, &OpenOptions::default()), &what);
            assert!(
                std::fs::read(&path).unwrap() == m,
                "{what}: refused open wrote"
            );
            let v = VhdxFile::open(&path, &ro()).unwrap();
            assert!(!v.damage().is_empty(), "{what}");
            assert_block0_served(&v);
            let mut b = vec![0u8; 4096];
            match v.read_layer(2 * MIB, &mut b, &mut Vec::new()) {
                Err(DiskError::DamagedBlock { block: 2, .. }) => {}
                r => panic!("{what}: read of the damaged block gave {r:?}"),
            }
            assert!(v.extents(0, 16 * MIB).is_err(), "{what}: extents");
            let r = v.check(false).unwrap();
            assert!(!r.is_clean(), "{what}: {r:?}");
            assert!(r.repaired.is_empty() && !r.log_replayed, "{what}: {r:?}");
            println!("{what}: {}", r.errors[0]);
        }
    }
}

/// The case: a BAT entry into the headers and one 64 KiB guest write. Before,
/// the write landed on the headers ("unrecognised image format"); now no handle that
/// could write is handed out until `check --repair` has cleared the entry.
#[test]
fn a_guest_write_cannot_destroy_the_headers() {
    let dir = tempfile::tempdir().unwrap();
    let src = qemu_image(dir.path());
    let mut img = std::fs::read(&src).unwrap();
    let l = Layout::parse(&img).unwrap();
    set_entry(
        &mut img,
        &l,
        l.bat_index(2),
        bat_entry(PAYLOAD_FULLY_PRESENT, 0),
    );
    let path = dir.path().join("h.vhdx");
    std::fs::write(&path, &img).unwrap();
    assert_damaged_refusal(VhdxFile::open(&path, &OpenOptions::default()), "headers");
    // The repair handle refuses guest writes too.
    let v = VhdxFile::open_for_repair(&path).unwrap();
    assert!(matches!(
        v.write(2 * MIB, &[0xee; 65536]),
        Err(DiskError::Damaged { .. })
    ));
    assert!(matches!(
        v.write_zeroes(2 * MIB, 65536),
        Err(DiskError::Damaged { .. })
    ));
    assert!(matches!(v.resize(32 * MIB), Err(DiskError::Damaged { .. })));
    assert!(std::fs::read(&path).unwrap() == img, "nothing was written");
    // Repair clears the entry and says so; the report is then clean.
    let r = v.check(true).unwrap();
    assert!(r.is_clean(), "{r:?}");
    assert!(r.repaired.iter().any(|s| s.contains("block 2")), "{r:?}");
    // Now the write goes to a new block; the file identifier and region tables stay.
    v.write(2 * MIB, &[0xee; 65536]).unwrap();
    v.flush().unwrap();
    drop(v);
    let after = std::fs::read(&path).unwrap();
    assert!(after[..64 * 1024] == img[..64 * 1024], "file identifier");
    assert!(
        after[192 * 1024..320 * 1024] == img[192 * 1024..320 * 1024],
        "region tables"
    );
    run_ok("qemu-img", &["check", "-f", "vhdx", p(&path)], 60);
    let raw = dir.path().join("h.raw");
    run_ok(
        "qemu-img",
        &["convert", "-f", "vhdx", "-O", "raw", p(&path), p(&raw)],
        60,
    );
    let data = std::fs::read(&raw).unwrap();
    assert!(data[..MIB as usize].iter().all(|b| *b == 0x5a));
    assert!(data[2 * MIB as usize..2 * MIB as usize + 65536]
        .iter()
        .all(|b| *b == 0xee));
    assert!(data[2 * MIB as usize + 65536..3 * MIB as usize]
        .iter()
        .all(|b| *b == 0));
    assert!(data[4 * MIB as usize..5 * MIB as usize]
        .iter()
        .all(|b| *b == 0x6b));
}

/// check's BAT bound was `offset + block_size > file_len`, which wraps for
/// 0xFFFFFFFFFFF00000 and reported the image clean.
#[test]
fn check_is_exact_about_an_overflowing_bat_offset_and_what_repair_did() {
    let dir = tempfile::tempdir().unwrap();
    let src = our_image(dir.path());
    let mut img = std::fs::read(&src).unwrap();
    let l = Layout::parse(&img).unwrap();
    set_entry(
        &mut img,
        &l,
        l.bat_index(3),
        bat_entry(PAYLOAD_FULLY_PRESENT, 0xFFFF_FFFF_FFF0_0000),
    );
    let path = dir.path().join("c.vhdx");
    std::fs::write(&path, &img).unwrap();
    let v = VhdxFile::open(&path, &ro()).unwrap();
    let r = v.check(false).unwrap();
    assert!(!r.is_clean(), "{r:?}");
    assert!(r.errors[0].contains("beyond the end of the file"), "{r:?}");
    assert!(r.repaired.is_empty(), "{r:?}");
    // Asking a read-only handle to repair changes nothing and says nothing changed.
    let r = v.check(true).unwrap();
    assert!(!r.is_clean() && r.repaired.is_empty(), "{r:?}");
    drop(v);
    assert!(std::fs::read(&path).unwrap() == img);
    // qemu-img agrees the image is damaged.
    assert!(!run("qemu-img", &["check", "-f", "vhdx", p(&path)], 60)
        .status
        .success());
    let v = VhdxFile::open_for_repair(&path).unwrap();
    let r = v.check(true).unwrap();
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(r.repaired.len(), 1, "{r:?}");
    assert!(r.repaired[0].starts_with("block 3:"), "{r:?}");
    let r = v.check(false).unwrap();
    assert!(r.is_clean() && r.repaired.is_empty(), "{r:?}");
    drop(v);
    drop(VhdxFile::open(&path, &OpenOptions::default()).unwrap());
    run_ok("qemu-img", &["check", "-f", "vhdx", p(&path)], 60);
}

fn dirty(dir: &Path, name: &str, descs: Vec<Desc>) -> (PathBuf, Vec<u8>) {
    dirty_with(dir, name, |_, _| descs)
}

/// Our image with a dirty log of one entry holding `descs(layout, image)`.
fn dirty_with(
    dir: &Path,
    name: &str,
    descs: impl FnOnce(&Layout, &[u8]) -> Vec<Desc>,
) -> (PathBuf, Vec<u8>) {
    let src = our_image(dir);
    let mut img = std::fs::read(&src).unwrap();
    std::fs::remove_file(&src).unwrap();
    let l = Layout::parse(&img).unwrap();
    let d = descs(&l, &img);
    dirty_log(&mut img, &l, &[(1, d)]);
    let path = dir.join(name);
    std::fs::write(&path, &img).unwrap();
    (path, img)
}

fn assert_log_refused(path: &Path, img: &[u8], what: &str) {
    for (mode, r) in [
        ("writable", VhdxFile::open(path, &OpenOptions::default())),
        ("repair", VhdxFile::open_for_repair(path)),
        ("read-only replay", VhdxFile::open(path, &ro())),
    ] {
        match r {
            Err(DiskError::Corrupt { reason, .. }) => {
                assert!(reason.contains("damaged log"), "{what} {mode}: {reason}")
            }
            Err(e) => panic!("{what} {mode}: unexpected {e}"),
            Ok(_) => panic!("{what} {mode}: opened"),
        }
        let now = std::fs::read(path).unwrap();
        assert_eq!(now.len(), img.len(), "{what} {mode}: the file grew");
        assert!(now == img, "{what} {mode}: the file changed");
    }
}

/// A 1 TiB zero descriptor in a 7 MiB image made `check --repair` and `mount` write
/// zeros until the disk was full.
#[test]
fn an_oversized_zero_descriptor_is_a_damaged_log_and_the_file_does_not_grow() {
    let dir = tempfile::tempdir().unwrap();
    let (path, img) = dirty(
        dir.path(),
        "z.vhdx",
        vec![Desc::Zero {
            offset: 5 * MIB,
            length: 1 << 40,
        }],
    );
    assert!(img.len() as u64 <= 8 * MIB, "a small image: {}", img.len());
    assert_log_refused(&path, &img, "1 TiB zero descriptor");
}

#[test]
fn log_entries_over_the_file_identifier_headers_or_log_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (i, off) in [0u64, 64 * 1024, 128 * 1024, 320 * 1024, MIB]
        .into_iter()
        .enumerate()
    {
        let (path, img) = dirty(
            dir.path(),
            &format!("f{i}.vhdx"),
            vec![Desc::Data {
                offset: off,
                page: vec![0xcc; 4096],
            }],
        );
        assert_log_refused(&path, &img, &format!("data descriptor at {off}"));
    }
}

/// A replay whose result would not open (here: garbage over the metadata table) is
/// refused before anything reaches the file, also by repair.
#[test]
fn a_replay_that_would_not_open_leaves_the_file_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let (path, img) = dirty_with(dir.path(), "r.vhdx", |l, _| {
        vec![Desc::Data {
            offset: l.meta_offset,
            page: vec![0xcc; 4096],
        }]
    });
    for r in [
        VhdxFile::open(&path, &OpenOptions::default()),
        VhdxFile::open_for_repair(&path),
    ] {
        assert!(matches!(r, Err(DiskError::Corrupt { .. })));
        assert!(std::fs::read(&path).unwrap() == img, "the file changed");
    }
}

/// A replay that would point a block into the headers: a normal writable open is
/// refused untouched; repair replays it (the result opens) and clears the entry.
#[test]
fn a_replay_that_damages_the_bat_is_refused_writable_and_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let (path, img) = dirty_with(dir.path(), "b.vhdx", |l, img0| {
        let mut page = img0[l.bat_offset as usize..l.bat_offset as usize + 4096].to_vec();
        let idx = l.bat_index(2) as usize;
        page[idx * 8..idx * 8 + 8]
            .copy_from_slice(&bat_entry(PAYLOAD_FULLY_PRESENT, 0).to_le_bytes());
        vec![Desc::Data {
            offset: l.bat_offset,
            page,
        }]
    });
    assert_damaged_refusal(VhdxFile::open(&path, &OpenOptions::default()), "log BAT");
    assert!(std::fs::read(&path).unwrap() == img);
    let v = VhdxFile::open(&path, &ro()).unwrap();
    assert!(v.log_was_replayed() && !v.log_written_to_file());
    let r = v.check(false).unwrap();
    assert!(
        !r.is_clean() && !r.log_replayed && r.repaired.is_empty(),
        "{r:?}"
    );
    drop(v);
    let v = VhdxFile::open_for_repair(&path).unwrap();
    let r = v.check(true).unwrap();
    assert!(r.is_clean() && r.log_replayed, "{r:?}");
    assert!(
        r.repaired.iter().any(|s| s.starts_with("block 2:")),
        "{r:?}"
    );
    drop(v);
    run_ok("qemu-img", &["check", "-f", "vhdx", p(&path)], 60);
}

fn child_of(dir: &Path) -> (PathBuf, Vec<u8>) {
    let base_p = dir.join("base.vhdx");
    let base = VhdxFile::create(&base_p, &spec(DiskKind::Dynamic, 8 * MIB, 1 << 20, 512)).unwrap();
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
                virtual_size: 8 * MIB,
                relative_path: "base.vhdx".into(),
                absolute_path: base_p.to_str().unwrap().into(),
                parent_disk_id: None,
            }),
        },
    )
    .unwrap();
    child.write(4096, &[7u8; 4096]).unwrap();
    drop(child);
    let img = std::fs::read(&child_p).unwrap();
    (child_p, img)
}

#[test]
fn a_missing_or_malformed_parent_linkage_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (child_p, img) = child_of(dir.path());
    let l = Layout::parse(&img).unwrap();
    let kv = locator_kv(&img, &l);
    assert!(kv.iter().any(|(k, _)| k == "parent_linkage"));
    let cases: Vec<(&str, Vec<(String, String)>)> = vec![
        (
            "missing",
            kv.iter()
                .filter(|(k, _)| k != "parent_linkage")
                .cloned()
                .collect(),
        ),
        (
            "malformed",
            kv.iter()
                .map(|(k, v)| {
                    if k == "parent_linkage" {
                        (k.clone(), "{00000000-zzzz}".to_string())
                    } else {
                        (k.clone(), v.clone())
                    }
                })
                .collect(),
        ),
        (
            "no paths",
            kv.iter()
                .filter(|(k, _)| k == "parent_linkage")
                .cloned()
                .collect(),
        ),
    ];
    for (what, kv) in cases {
        let mut m = img.clone();
        assert!(set_locator(&mut m, &l, &kv));
        std::fs::write(&child_p, &m).unwrap();
        let v = VhdxFile::open(&child_p, &ro()).unwrap();
        let r = v.check(false).unwrap();
        assert!(!r.is_clean(), "{what}: {r:?}");
        assert!(
            r.errors.iter().any(|e| e.contains("parent locator")),
            "{what}: {r:?}"
        );
        drop(v);
        match VhdxFile::open(&child_p, &OpenOptions::default()) {
            Err(DiskError::Damaged { remedy, .. }) => {
                assert!(remedy.contains("fv vhd set-parent"), "{what}: {remedy}")
            }
            r => panic!("{what}: {:?}", r.map(|_| ())),
        }
        assert!(std::fs::read(&child_p).unwrap() == m);
        // The remedy works: set_parent on the repair handle records the link again.
        let base_p = dir.path().join("base.vhdx");
        let base = VhdxFile::open(&base_p, &ro()).unwrap();
        let v = VhdxFile::open_for_repair(&child_p).unwrap();
        assert!(matches!(
            v.write(0, &[1u8; 512]),
            Err(DiskError::Damaged { .. })
        ));
        v.set_parent(&ParentSpec {
            identity: base.info().identity.clone(),
            virtual_size: 8 * MIB,
            relative_path: "base.vhdx".into(),
            absolute_path: base_p.to_str().unwrap().into(),
            parent_disk_id: None,
        })
        .unwrap();
        assert!(v.damage().is_empty(), "{what}: {:?}", v.damage());
        drop(v);
        let v = VhdxFile::open(&child_p, &OpenOptions::default()).unwrap();
        assert!(v.check(false).unwrap().is_clean(), "{what}");
    }
}

/// Two BAT entries naming one block: the later one in the file is damaged, the first
/// still serves its data (made by qemu-io), and repair clears only the duplicate.
#[test]
fn a_duplicate_bat_entry_is_damage_and_repair_keeps_the_original() {
    let dir = tempfile::tempdir().unwrap();
    let src = qemu_image(dir.path());
    let mut img = std::fs::read(&src).unwrap();
    let l = Layout::parse(&img).unwrap();
    let b0 = l.entry(&img, l.bat_index(0));
    set_entry(&mut img, &l, l.bat_index(9), b0);
    let path = dir.path().join("d.vhdx");
    std::fs::write(&path, &img).unwrap();
    assert_damaged_refusal(VhdxFile::open(&path, &OpenOptions::default()), "duplicate");
    let v = VhdxFile::open_for_repair(&path).unwrap();
    let r = v.check(true).unwrap();
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(r.repaired.len(), 1, "{r:?}");
    assert!(r.repaired[0].starts_with("block 9:"), "{r:?}");
    assert_block0_served(&v);
    drop(v);
    run_ok("qemu-img", &["check", "-f", "vhdx", p(&path)], 60);
}

/// Every sector of the log a valid-looking entry header claiming the whole log: a
/// scan would checksum (log length)^2 / 4 KiB bytes. It is a damaged log instead.
#[test]
fn a_log_of_overlapping_entry_headers_is_refused_without_scanning_it_all() {
    let dir = tempfile::tempdir().unwrap();
    let (path, mut img) = dirty(dir.path(), "s.vhdx", vec![]);
    let l = Layout::parse(&img).unwrap();
    let guid = l.hdr.log_guid;
    assert!(!guid.is_nil());
    let (lo, ll) = (l.hdr.log_offset as usize, l.hdr.log_length as usize);
    for s in (lo..lo + ll).step_by(4096) {
        put(&mut img, s, b"loge");
        put(&mut img, s + 8, &(ll as u32).to_le_bytes());
        put(&mut img, s + 16, &1u64.to_le_bytes());
        put_guid(&mut img, s + 32, &guid);
    }
    std::fs::write(&path, &img).unwrap();
    assert_log_refused(&path, &img, "overlapping entry headers");
}

/// A differencing disk whose sector bitmap entry points into the headers: its
/// partially present block is refused, its fully present block served; repair makes
/// the partial block transparent again (it then reads from the parent).
#[test]
fn a_damaged_sector_bitmap_entry_refuses_only_its_partial_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let (child_p, _) = child_of(dir.path());
    {
        let v = VhdxFile::open(&child_p, &OpenOptions::default()).unwrap();
        v.write(2 * MIB, &vec![9u8; MIB as usize]).unwrap();
    }
    let mut img = std::fs::read(&child_p).unwrap();
    let l = Layout::parse(&img).unwrap();
    assert_eq!(
        bat_state(l.entry(&img, l.bat_index(0))),
        PAYLOAD_PARTIALLY_PRESENT
    );
    assert_eq!(bat_state(l.entry(&img, l.sb_index(0))), SB_PRESENT);
    set_entry(&mut img, &l, l.sb_index(0), bat_entry(SB_PRESENT, 0));
    std::fs::write(&child_p, &img).unwrap();
    assert_damaged_refusal(VhdxFile::open(&child_p, &OpenOptions::default()), "bitmap");
    let v = VhdxFile::open(&child_p, &ro()).unwrap();
    let mut b = vec![0u8; 4096];
    assert!(matches!(
        v.read_layer(4096, &mut b, &mut Vec::new()),
        Err(DiskError::DamagedBlock { block: 0, .. })
    ));
    let mut absent = Vec::new();
    v.read_layer(2 * MIB, &mut b, &mut absent).unwrap();
    assert!(absent.is_empty() && b.iter().all(|x| *x == 9));
    drop(v);
    let v = VhdxFile::open_for_repair(&child_p).unwrap();
    let r = v.check(true).unwrap();
    assert!(r.is_clean(), "{r:?}");
    assert!(
        r.repaired
            .iter()
            .any(|s| s.starts_with("sector bitmap block 0:"))
            && r.repaired.iter().any(|s| s.starts_with("block 0:")),
        "{r:?}"
    );
    let mut absent = Vec::new();
    v.read_layer(4096, &mut b, &mut absent).unwrap();
    assert_eq!(
        absent,
        vec![4096..8192],
        "block 0 reads from the parent again"
    );
    drop(v);
    let v = VhdxFile::open(&child_p, &OpenOptions::default()).unwrap();
    assert!(v.check(false).unwrap().is_clean());
}
