//! Crafted damage, built by each test from a valid image (made by qemu-img or by our
//! own create): the writable open is refused naming the damage, the read-only open
//! serves only sound blocks, `check` reports exactly, and `check --repair` fixes what
//! it says it fixed. Contents are judged by qemu-img/qemu-io (real peers).
use fv_vdisk_core::{CreateSpec, DiskError, DiskKind, Image, Layer, LayerIdentity, ParentSpec};
use fv_vhd::format::{DynHeader, Footer, BAT_UNUSED};
use fv_vhd::structure_fuzz::fix_checksums;
use fv_vhd::VhdFile;
use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} is required for this test and could not run: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// qemu-img compare of a VHD against a raw file holding `expect`.
fn qemu_matches(vhd: &Path, expect: &[u8]) {
    let raw = vhd.with_extension("expect.raw");
    std::fs::write(&raw, expect).unwrap();
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "vpc",
            "-F",
            "raw",
            vhd.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
}

/// qemu-io's view of `len` bytes at `off` (through a raw dump of the whole disk).
fn qemu_reads(vhd: &Path) -> Vec<u8> {
    let raw = vhd.with_extension("dump.raw");
    let _ = std::fs::remove_file(&raw);
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "vpc",
            "-O",
            "raw",
            vhd.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    std::fs::read(&raw).unwrap()
}

/// Equal contents, reporting the first difference (not megabytes of bytes).
fn same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: got {:#04x}, want {:#04x}",
            got[i], want[i]
        );
    }
}

fn spec(size: u64, kind: DiskKind) -> CreateSpec {
    CreateSpec {
        virtual_size: size,
        kind,
        block_size: 0,
        logical_sector_size: 512,
        physical_sector_size: 512,
        parent: None,
    }
}

const MIB: usize = 1 << 20;

/// A qemu-made 8 MiB dynamic VHD (2 MiB blocks) with data in blocks 0, 2 and 3,
/// and the guest content qemu-io wrote.
fn qemu_image(dir: &Path, name: &str) -> (PathBuf, Vec<u8>) {
    let p = dir.join(name);
    let ps = p.to_str().unwrap();
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vpc",
            "-o",
            "subformat=dynamic,force_size=on",
            ps,
            "8M",
        ],
    );
    let mut expect = vec![0u8; 8 * MIB];
    for (pat, off, len) in [
        (0x11u8, 0usize, 65536usize),
        (0x22, 4 * MIB, 65536),
        (0x33, 6 * MIB + 4096, 8192),
    ] {
        run(
            "qemu-io",
            &[
                "-f",
                "vpc",
                "-c",
                &format!("write -P {pat} {off} {len}"),
                ps,
            ],
        );
        expect[off..off + len].fill(pat);
    }
    (p, expect)
}

struct Layout {
    hoff: u64,
    header: DynHeader,
    bat: Vec<u32>,
    len: u64,
}

fn layout(p: &Path) -> Layout {
    let img = std::fs::read(p).unwrap();
    let len = img.len();
    let f = Footer::parse(&img[len - 512..]).unwrap();
    let hoff = f.data_offset;
    let h = DynHeader::parse(&img[hoff as usize..hoff as usize + 1024]).unwrap();
    let t = h.table_offset as usize;
    let bat = (0..h.max_table_entries as usize)
        .map(|i| u32::from_be_bytes(img[t + 4 * i..t + 4 * i + 4].try_into().unwrap()))
        .collect();
    Layout {
        hoff,
        header: h,
        bat,
        len: len as u64,
    }
}

fn edit(p: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut img = std::fs::read(p).unwrap();
    f(&mut img);
    fix_checksums(&mut img);
    std::fs::write(p, img).unwrap();
}

fn set_bat(p: &Path, i: usize, v: u32) {
    let l = layout(p);
    edit(p, |img| {
        let o = l.header.table_offset as usize + 4 * i;
        img[o..o + 4].copy_from_slice(&v.to_be_bytes());
    });
}

fn read(v: &VhdFile, off: u64, len: usize) -> Result<Vec<u8>, DiskError> {
    let mut buf = vec![0u8; len];
    let mut absent = Vec::new();
    v.read_layer(off, &mut buf, &mut absent)?;
    for r in absent {
        buf[(r.start - off) as usize..(r.end - off) as usize].fill(0);
    }
    Ok(buf)
}

fn expect_damaged(p: &Path, needles: &[&str]) -> String {
    match VhdFile::open(p, false) {
        Err(e @ DiskError::Damaged { .. }) => {
            let msg = e.to_string();
            for n in needles {
                assert!(msg.contains(n), "{msg:?} does not name {n:?}");
            }
            msg
        }
        Err(e) => panic!("writable open failed, but not as Damaged: {e}"),
        Ok(_) => panic!("writable open of a damaged image succeeded"),
    }
}

#[test]
fn bat_entry_into_the_dynamic_header_is_never_written_through() {
    let dir = tempfile::tempdir().unwrap();
    let (p, expect) = qemu_image(dir.path(), "hdr.vhd");
    let l = layout(&p);
    set_bat(&p, 0, (l.hoff / 512) as u32);
    let img0 = std::fs::read(&p).unwrap();
    let header = |img: &[u8]| img[l.hoff as usize..l.hoff as usize + 1024].to_vec();
    expect_damaged(
        &p,
        &[
            "block 0",
            "the dynamic header",
            "run `fv vhd check --repair`",
        ],
    );
    // The repair handle refuses guest writes too.
    let fixer = VhdFile::open_for_repair(&p).unwrap();
    assert!(matches!(
        fixer.write(0, &vec![0xeeu8; 65536]),
        Err(DiskError::Damaged { .. })
    ));
    assert!(matches!(
        fixer.write_zeroes(0, 65536),
        Err(DiskError::Damaged { .. })
    ));
    assert!(matches!(
        fixer.discard(0, 65536),
        Err(DiskError::Damaged { .. })
    ));
    drop(fixer);
    let img1 = std::fs::read(&p).unwrap();
    assert_eq!(
        header(&img1),
        header(&img0),
        "the dynamic header was written"
    );
    assert_eq!(img1, img0, "refused writes changed the file");
    // qemu still recognises the image: nothing we did broke it.
    run("qemu-img", &["info", "-f", "vpc", p.to_str().unwrap()]);
    // Read-only: the damaged block is refused, the sound ones are served.
    let ro = VhdFile::open(&p, true).unwrap();
    match read(&ro, 4096, 4096) {
        Err(DiskError::DamagedBlock { block: 0, .. }) => {}
        other => panic!("read of the damaged block: {other:?}"),
    }
    same(
        &read(&ro, 2 * MIB as u64, 6 * MIB).unwrap(),
        &expect[2 * MIB..],
        "sound blocks",
    );
    let rep = ro.check(false).unwrap();
    assert!(
        rep.errors
            .iter()
            .any(|e| e.contains("block 0") && e.contains("the dynamic header")),
        "{rep:?}"
    );
    assert!(rep.repaired.is_empty());
    drop(ro);
    assert_eq!(std::fs::read(&p).unwrap(), img0, "check changed the file");
}

#[test]
fn every_region_a_bat_entry_can_point_into_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // Differencing disk of ours, for the locator data region.
    let base = dir.path().join("base.vhd");
    let b = VhdFile::create(&base, &spec(8 << 20, DiskKind::Dynamic)).unwrap();
    let id = b.identity();
    drop(b);
    let LayerIdentity::Vhd { unique_id, .. } = id else {
        panic!("not a VHD identity")
    };
    let mut s = spec(8 << 20, DiskKind::Differencing);
    s.parent = Some(ParentSpec {
        identity: id,
        virtual_size: 8 << 20,
        relative_path: "base.vhd".into(),
        absolute_path: base.to_str().unwrap().into(),
        parent_disk_id: Some(unique_id),
    });
    let child_seed = dir.path().join("child-seed.vhd");
    let c = VhdFile::create(&child_seed, &s).unwrap();
    c.write(0, &vec![7u8; 65536]).unwrap();
    c.write(4 << 20, &vec![8u8; 65536]).unwrap();
    drop(c);
    let (qseed, expect) = qemu_image(dir.path(), "q-seed.vhd");
    let ql = layout(&qseed);
    let cl = layout(&child_seed);
    let other = ql.bat[2];
    let blocks = (512 + (2 << 20)) / 512u32;
    let cases: Vec<(&Path, u32, &str)> = vec![
        (&qseed, 0, "the footer copy"),
        (&qseed, (ql.header.table_offset / 512) as u32, "the BAT"),
        (&qseed, (ql.len / 512 - 1) as u32, "the footer"),
        (
            &qseed,
            (ql.len / 512) as u32 + 100,
            "beyond the end of the file",
        ),
        (&qseed, BAT_UNUSED - 1, "beyond the end of the file"),
        (&qseed, other, "overlaps block"),
        (&qseed, other + 7, "overlaps block"),
        (&qseed, (ql.len / 512) as u32 - blocks, "runs past"),
        (
            &child_seed,
            (cl.header.locators[0].data_offset / 512) as u32,
            "parent locator 0 data",
        ),
    ];
    for (k, (seed, v, needle)) in cases.into_iter().enumerate() {
        let p = dir.path().join(format!("case{k}.vhd"));
        std::fs::copy(seed, &p).unwrap();
        set_bat(&p, 0, v);
        let before = std::fs::read(&p).unwrap();
        expect_damaged(&p, &[needle, "fv vhd check --repair"]);
        let ro = VhdFile::open(&p, true).unwrap();
        assert!(
            matches!(read(&ro, 0, 4096), Err(DiskError::DamagedBlock { .. })),
            "case {k} ({needle}): the damaged block was served"
        );
        let rep = ro.check(false).unwrap();
        assert!(
            rep.errors.iter().any(|e| e.contains(needle)),
            "case {k}: {rep:?}"
        );
        if seed == qseed.as_path() && !needle.starts_with("overlaps block") {
            // Blocks no damaged entry touches are served as qemu wrote them.
            same(
                &read(&ro, 6 * MIB as u64, 2 * MIB).unwrap(),
                &expect[6 * MIB..],
                &format!("case {k}"),
            );
        }
        drop(ro);
        assert_eq!(std::fs::read(&p).unwrap(), before, "case {k}: file changed");
    }
}

#[test]
fn repair_clears_a_bat_entry_into_metadata_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let (p, mut expect) = qemu_image(dir.path(), "r.vhd");
    let l = layout(&p);
    set_bat(&p, 0, (l.header.table_offset / 512) as u32);
    // Without --repair: reported, nothing changed, nothing claimed.
    let before = std::fs::read(&p).unwrap();
    let rep = VhdFile::open(&p, true).unwrap().check(false).unwrap();
    assert!(!rep.is_clean() && rep.repaired.is_empty(), "{rep:?}");
    assert!(
        rep.errors
            .iter()
            .any(|e| e.contains("to fix: run `fv vhd check --repair`")),
        "{rep:?}"
    );
    assert_eq!(std::fs::read(&p).unwrap(), before);
    // A read-only handle cannot repair.
    assert!(matches!(
        VhdFile::open(&p, true).unwrap().check(true),
        Err(DiskError::ReadOnly { .. })
    ));
    let fixer = VhdFile::open_for_repair(&p).unwrap();
    let rep = fixer.check(true).unwrap();
    drop(fixer);
    assert!(rep.is_clean(), "{rep:?}");
    assert!(
        rep.repaired
            .iter()
            .any(|r| r.contains("the BAT") && r.contains("marked block 0 unallocated")),
        "{rep:?}"
    );
    // Block 0 pointed into the BAT: what it read was not guest data; it now reads
    // zeros. Everything else is as qemu wrote it, and the BAT itself is intact.
    expect[..2 * MIB].fill(0);
    qemu_matches(&p, &expect);
    // Writable again; a guest write to block 0 allocates a new block at the end.
    let v = VhdFile::open(&p, false).unwrap();
    v.write(0, &vec![0x44u8; 65536]).unwrap();
    v.flush().unwrap();
    drop(v);
    expect[..65536].fill(0x44);
    qemu_matches(&p, &expect);
    let l2 = layout(&p);
    assert!(u64::from(l2.bat[0]) * 512 >= l.len - 512, "{:?}", l2.bat);
    assert!(VhdFile::open(&p, true)
        .unwrap()
        .check(false)
        .unwrap()
        .is_clean());
}

#[test]
fn repair_gives_blocks_sharing_space_their_own_copy() {
    let dir = tempfile::tempdir().unwrap();
    let (p, mut expect) = qemu_image(dir.path(), "s.vhd");
    let l = layout(&p);
    // Block 1 (unallocated) points at block 2's data: both read block 2's bytes.
    set_bat(&p, 1, l.bat[2]);
    let shared = expect[4 * MIB..6 * MIB].to_vec();
    expect[2 * MIB..4 * MIB].copy_from_slice(&shared);
    expect_damaged(&p, &["overlaps block"]);
    let fixer = VhdFile::open_for_repair(&p).unwrap();
    let rep = fixer.check(true).unwrap();
    drop(fixer);
    assert!(rep.is_clean(), "{rep:?}");
    assert!(
        rep.repaired
            .iter()
            .any(|r| r.contains("block 2") && r.contains("copied to offset")),
        "{rep:?}"
    );
    // Both read what they read before; now they are independent.
    same(&qemu_reads(&p), &expect, "after the copy");
    let v = VhdFile::open(&p, false).unwrap();
    v.write(4 * MIB as u64, &vec![0x55u8; 4096]).unwrap();
    v.flush().unwrap();
    drop(v);
    expect[4 * MIB..4 * MIB + 4096].fill(0x55);
    qemu_matches(&p, &expect);
}

#[test]
fn footer_copy_and_end_footer_repairs() {
    let dir = tempfile::tempdir().unwrap();
    // (a) The copy at offset 0 damaged: a warning, repaired from the end footer.
    let (p, expect) = qemu_image(dir.path(), "copy.vhd");
    edit(&p, |img| img[..512].fill(0));
    let rep = VhdFile::open(&p, true).unwrap().check(false).unwrap();
    assert!(rep.is_clean(), "{rep:?}");
    assert!(
        rep.warnings
            .iter()
            .any(|w| w.contains("footer copy at offset 0")),
        "{rep:?}"
    );
    let v = VhdFile::open(&p, false).unwrap();
    let rep = v.check(true).unwrap();
    drop(v);
    assert!(
        rep.repaired
            .iter()
            .any(|r| r.contains("rewrote the footer copy at offset 0")),
        "{rep:?}"
    );
    let img = std::fs::read(&p).unwrap();
    assert_eq!(img[..512], img[img.len() - 512..]);
    qemu_matches(&p, &expect);

    // (b) The end footer damaged: an error; writable open refused; repaired from the copy.
    let (p, expect) = qemu_image(dir.path(), "end.vhd");
    let len0 = std::fs::metadata(&p).unwrap().len();
    edit(&p, |img| {
        let n = img.len();
        img[n - 512..].fill(0);
    });
    expect_damaged(&p, &["footer at the end", "fv vhd check --repair"]);
    let fixer = VhdFile::open_for_repair(&p).unwrap();
    let rep = fixer.check(true).unwrap();
    drop(fixer);
    assert!(rep.is_clean(), "{rep:?}");
    assert!(
        rep.repaired
            .iter()
            .any(|r| r.contains("rewrote the footer at the end")),
        "{rep:?}"
    );
    assert_eq!(std::fs::metadata(&p).unwrap().len(), len0);
    qemu_matches(&p, &expect);

    // (c) Cut off inside the last block (an interrupted copy): the block keeps what
    // survived, its lost tail reads as zeros, and the footer is back.
    let (p, mut expect) = qemu_image(dir.path(), "cut.vhd");
    let l = layout(&p);
    let last = *l.bat.iter().filter(|&&e| e != BAT_UNUSED).max().unwrap();
    let last_idx = l.bat.iter().position(|&e| e == last).unwrap();
    // Keep the bitmap and the first 16 KiB of data.
    let cut = u64::from(last) * 512 + 512 + 16384;
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(cut).unwrap();
    drop(f);
    let from = last_idx * 2 * MIB + 16384;
    expect[from..(last_idx + 1) * 2 * MIB].fill(0);
    expect_damaged(&p, &["cut short", "fv vhd check --repair"]);
    let fixer = VhdFile::open_for_repair(&p).unwrap();
    let rep = fixer.check(true).unwrap();
    drop(fixer);
    assert!(rep.is_clean(), "{rep:?}");
    assert!(
        rep.repaired.iter().any(|r| r.contains("cut short")),
        "{rep:?}"
    );
    qemu_matches(&p, &expect);
}

#[test]
fn differencing_linkage_damage_is_reported_and_set_parent_fixes_it() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    let b = VhdFile::create(&base, &spec(8 << 20, DiskKind::Dynamic)).unwrap();
    b.write(0, &vec![1u8; 4096]).unwrap();
    b.flush().unwrap();
    let id = b.identity();
    drop(b);
    let mk = |name: &str| {
        let child = dir.path().join(name);
        let mut s = spec(8 << 20, DiskKind::Differencing);
        s.parent = Some(ParentSpec {
            identity: id.clone(),
            virtual_size: 8 << 20,
            relative_path: "base.vhd".into(),
            absolute_path: base.to_str().unwrap().into(),
            parent_disk_id: None,
        });
        let c = VhdFile::create(&child, &s).unwrap();
        c.write(1 << 20, &vec![2u8; 4096]).unwrap();
        drop(c);
        (child, s.parent.unwrap())
    };
    // Missing parent unique id.
    let (child, pspec) = mk("nil.vhd");
    let hoff = layout(&child).hoff as usize;
    edit(&child, |img| img[hoff + 40..hoff + 56].fill(0));
    let before = std::fs::read(&child).unwrap();
    let rep = VhdFile::open(&child, true).unwrap().check(false).unwrap();
    assert!(
        rep.errors.iter().any(|e| e.contains("no parent unique id")),
        "{rep:?}"
    );
    expect_damaged(
        &child,
        &[
            "no parent unique id",
            "fv vhd set-parent CHILD PARENT --force",
        ],
    );
    // check --repair cannot invent the id: it says so and changes nothing.
    let fixer = VhdFile::open_for_repair(&child).unwrap();
    let rep = fixer.check(true).unwrap();
    assert!(!rep.is_clean() && rep.repaired.is_empty(), "{rep:?}");
    assert_eq!(std::fs::read(&child).unwrap(), before);
    fixer.set_parent(&pspec).unwrap();
    drop(fixer);
    let v = VhdFile::open(&child, false).unwrap();
    assert!(v.check(false).unwrap().is_clean());
    assert_eq!(v.parent_locator().unwrap().expected, Some(id.clone()));
    drop(v);

    // A locator whose data offset wraps around: reported; repair clears that entry,
    // the other (relative) locator still finds the parent.
    let (child, _) = mk("wrap.vhd");
    let hoff = layout(&child).hoff as usize;
    edit(&child, |img| {
        let o = hoff + 576 + 16;
        img[o..o + 8].copy_from_slice(&(u64::MAX - 3).to_be_bytes());
    });
    let rep = VhdFile::open(&child, true).unwrap().check(false).unwrap();
    assert!(
        rep.errors
            .iter()
            .any(|e| e.contains("parent locator 0") && e.contains("wraps")),
        "{rep:?}"
    );
    expect_damaged(&child, &["parent locator 0", "fv vhd check --repair"]);
    let fixer = VhdFile::open_for_repair(&child).unwrap();
    let rep = fixer.check(true).unwrap();
    drop(fixer);
    assert!(rep.is_clean(), "{rep:?}");
    assert!(
        rep.repaired
            .iter()
            .any(|r| r.contains("cleared parent locator 0")),
        "{rep:?}"
    );
    let v = VhdFile::open(&child, false).unwrap();
    let loc = v.parent_locator().unwrap();
    assert_eq!(loc.relative_path.as_deref(), Some("base.vhd"));
    assert_eq!(loc.absolute_path, None);

    // Lengths out of bounds and data past the end are reported the same way.
    for (field, value, needle) in [
        (8usize, 0u64, "has length 0"),
        (8, u64::from(u32::MAX), "has length 4294967295"),
        (16, 1 << 40, "lies outside the file"),
        (16, 512, "overlaps the dynamic header"),
    ] {
        let (child, _) = mk("loc.vhd");
        let hoff = layout(&child).hoff as usize;
        edit(&child, |img| {
            let o = hoff + 576 + 24 + field;
            if field == 8 {
                img[o..o + 4].copy_from_slice(&(value as u32).to_be_bytes());
            } else {
                img[o..o + 8].copy_from_slice(&value.to_be_bytes());
            }
        });
        let rep = VhdFile::open(&child, true).unwrap().check(false).unwrap();
        assert!(
            rep.errors
                .iter()
                .any(|e| e.contains("parent locator 1") && e.contains(needle)),
            "{needle}: {rep:?}"
        );
        expect_damaged(&child, &["parent locator 1"]);
        std::fs::remove_file(&child).unwrap();
    }
}

#[test]
fn header_fields_out_of_bounds_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (seed, _) = qemu_image(dir.path(), "seed.vhd");
    let l = layout(&seed);
    let h = l.hoff as usize;
    let n = l.len as usize;
    type Edit = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(move |img| img[h + 32..h + 36].copy_from_slice(&(3u32 << 20).to_be_bytes())),
            "unsupported block size",
        ),
        (
            Box::new(move |img| img[h + 32..h + 36].copy_from_slice(&(1u32 << 31).to_be_bytes())),
            "unsupported block size",
        ),
        (
            Box::new(move |img| img[h + 28..h + 32].copy_from_slice(&1u32.to_be_bytes())),
            "are needed",
        ),
        (
            Box::new(move |img| img[h + 28..h + 32].copy_from_slice(&u32::MAX.to_be_bytes())),
            "max table entries",
        ),
        (
            Box::new(move |img| {
                img[h + 16..h + 24].copy_from_slice(&(u64::MAX - 511).to_be_bytes())
            }),
            "BAT",
        ),
        (
            Box::new(move |img| img[h + 16..h + 24].copy_from_slice(&(h as u64).to_be_bytes())),
            "overlaps the dynamic header",
        ),
        (
            Box::new(move |img| {
                for o in [16, n - 512 + 16] {
                    img[o..o + 8].copy_from_slice(&(u64::MAX - 1023).to_be_bytes());
                }
            }),
            "dynamic header offset",
        ),
        (
            Box::new(move |img| {
                let o = n - 512 + 48;
                img[o..o + 8].copy_from_slice(&(64u64 << 20).to_be_bytes());
            }),
            "are needed",
        ),
    ];
    for (k, (f, needle)) in cases.into_iter().enumerate() {
        let p = dir.path().join(format!("h{k}.vhd"));
        std::fs::copy(&seed, &p).unwrap();
        edit(&p, |img| f(img));
        for ro in [true, false] {
            match VhdFile::open(&p, ro) {
                Err(e @ DiskError::Corrupt { .. }) => {
                    assert!(e.to_string().contains(needle), "case {k}: {e}")
                }
                Err(e) => panic!("case {k}: not Corrupt: {e}"),
                Ok(_) => panic!("case {k} ({needle}) opened"),
            }
        }
    }
}

#[test]
fn new_blocks_have_page_aligned_data_and_peers_read_them() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.vhd");
    let size = 16u64 << 20;
    let v = VhdFile::create(&p, &spec(size, DiskKind::Dynamic)).unwrap();
    let mut expect = vec![0u8; size as usize];
    for (k, off) in [0u64, 5 << 20, 9 << 20, (16 << 20) - 8192]
        .iter()
        .enumerate()
    {
        let data = vec![k as u8 + 1; 8192];
        v.write(*off, &data).unwrap();
        expect[*off as usize..*off as usize + 8192].copy_from_slice(&data);
    }
    v.flush().unwrap();
    let rep = v.check(false).unwrap();
    assert!(rep.is_clean() && rep.warnings.is_empty(), "{rep:?}");
    drop(v);
    let l = layout(&p);
    let used: Vec<u32> = l.bat.iter().copied().filter(|&e| e != BAT_UNUSED).collect();
    assert_eq!(used.len(), 4);
    for e in &used {
        assert_eq!(
            (u64::from(*e) * 512 + 512) % 4096,
            0,
            "block data at {e} not aligned"
        );
    }
    qemu_matches(&p, &expect);
    run("vhdiinfo", &[p.to_str().unwrap()]);
    // Compact keeps the data aligned and the contents.
    let v = VhdFile::open(&p, false).unwrap();
    v.write(5 << 20, &vec![0u8; 8192]).unwrap();
    expect[5 << 20..(5 << 20) + 8192].fill(0);
    assert!(v.compact(&mut |_, _| true).unwrap() > 0);
    drop(v);
    let l = layout(&p);
    for e in l.bat.iter().filter(|&&e| e != BAT_UNUSED) {
        assert_eq!(
            (u64::from(*e) * 512 + 512) % 4096,
            0,
            "compacted block at {e}"
        );
    }
    qemu_matches(&p, &expect);
    let rep = VhdFile::open(&p, true).unwrap().check(false).unwrap();
    assert!(rep.is_clean() && rep.warnings.is_empty(), "{rep:?}");
}
