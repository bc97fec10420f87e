//! VHD files checked against qemu-img / qemu-io (real peers), plus hostile-input mutation.
use fv_vdisk_core::{CreateSpec, DiskKind, Image, Layer, LayerIdentity, ParentSpec};
use fv_vhd::VhdFile;
use rand::{Rng, SeedableRng};
use std::path::Path;
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

fn read_all(l: &dyn Layer, size: u64) -> Vec<u8> {
    let mut buf = vec![0u8; size as usize];
    let mut absent = Vec::new();
    l.read_layer(0, &mut buf, &mut absent).unwrap();
    for r in absent {
        buf[r.start as usize..r.end as usize].fill(0);
    }
    buf
}

/// Writes at a mix of offsets/lengths (block-crossing), applied to both images.
fn scribble(rng: &mut impl Rng, size: u64, v: &VhdFile, reference: &mut [u8]) {
    for _ in 0..40 {
        let len = rng.gen_range(1..=256u64) * 512;
        let off = rng.gen_range(0..(size - len) / 512) * 512;
        let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        v.write(off, &data).unwrap();
        reference[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
}

#[test]
fn our_fixed_and_dynamic_match_qemu() {
    let dir = tempfile::tempdir().unwrap();
    // Not a CHS-representable size, to prove qemu uses current_size for our creator app.
    let size = 67_109_376u64; // 64 MiB + 1 KiB
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for kind in [DiskKind::Fixed, DiskKind::Dynamic] {
        let p = dir.path().join(format!("{kind:?}.vhd"));
        let raw = dir.path().join(format!("{kind:?}.raw"));
        let mut reference = vec![0u8; size as usize];
        {
            let v = VhdFile::create(&p, &spec(size, kind)).unwrap();
            scribble(&mut rng, size, &v, &mut reference);
            v.flush().unwrap();
            assert!(v.check(false).unwrap().is_clean());
        }
        std::fs::write(&raw, &reference).unwrap();
        let info = run(
            "qemu-img",
            &["info", "--output=json", "-f", "vpc", p.to_str().unwrap()],
        );
        assert!(
            info.contains(&format!("\"virtual-size\": {size}")),
            "qemu sees another size: {info}"
        );
        run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "vpc",
                "-F",
                "raw",
                p.to_str().unwrap(),
                raw.to_str().unwrap(),
            ],
        );
        // And back through us after reopening.
        let v = VhdFile::open(&p, true).unwrap();
        assert_eq!(read_all(&v, size), reference);
    }
}

#[test]
fn qemu_created_images_read_identically() {
    let dir = tempfile::tempdir().unwrap();
    for sub in ["dynamic", "fixed"] {
        let p = dir.path().join(format!("q-{sub}.vhd"));
        let raw = dir.path().join(format!("q-{sub}.raw"));
        let ps = p.to_str().unwrap();
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "vpc",
                "-o",
                &format!("subformat={sub},force_size=on"),
                ps,
                "48M",
            ],
        );
        run(
            "qemu-img",
            &["create", "-q", "-f", "raw", raw.to_str().unwrap(), "48M"],
        );
        for (pat, off, len) in [
            (0xa5u8, 0u64, 4096u64),
            (0x3c, 3 << 20, 1 << 20),
            (0x77, (2 << 20) - 512, 1024),
            (0x11, 47 << 20, 1 << 20),
        ] {
            let cmd = format!("write -P {pat} {off} {len}");
            run("qemu-io", &["-f", "vpc", "-c", &cmd, ps]);
            run("qemu-io", &["-f", "raw", "-c", &cmd, raw.to_str().unwrap()]);
        }
        let v = VhdFile::open(&p, true).unwrap();
        assert_eq!(v.info().virtual_size, 48 << 20);
        let expect = std::fs::read(&raw).unwrap();
        assert_eq!(read_all(&v, 48 << 20), expect, "{sub}");
        assert!(
            v.check(false).unwrap().is_clean(),
            "{sub}: {:?}",
            v.check(false).unwrap()
        );
        drop(v);
        // Our writes into a qemu image are readable by qemu.
        let v = VhdFile::open(&p, false).unwrap();
        let data = vec![0x5au8; 3 << 20];
        v.write(10 << 20, &data).unwrap();
        v.flush().unwrap();
        drop(v);
        let mut expect = expect;
        expect[10 << 20..13 << 20].copy_from_slice(&data);
        std::fs::write(&raw, &expect).unwrap();
        run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "vpc",
                "-F",
                "raw",
                ps,
                raw.to_str().unwrap(),
            ],
        );
    }
}

#[test]
fn differencing_reads_fall_through_and_locators_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let size = 8u64 << 20;
    let base = dir.path().join("base.vhd");
    let b = VhdFile::create(&base, &spec(size, DiskKind::Dynamic)).unwrap();
    b.write(0, &vec![1u8; 1 << 20]).unwrap();
    b.flush().unwrap();
    let id = b.identity();
    drop(b);
    let LayerIdentity::Vhd { unique_id, .. } = id else {
        panic!()
    };
    let child = dir.path().join("child.vhd");
    let mut s = spec(size, DiskKind::Differencing);
    s.parent = Some(ParentSpec {
        identity: id.clone(),
        virtual_size: size,
        relative_path: "base.vhd".into(),
        absolute_path: base.to_str().unwrap().into(),
        parent_disk_id: Some(unique_id),
    });
    let c = VhdFile::create(&child, &s).unwrap();
    c.write(512, &[2u8; 1024]).unwrap();
    let mut buf = vec![0u8; 4096];
    let mut absent = Vec::new();
    c.read_layer(0, &mut buf, &mut absent).unwrap();
    assert_eq!(absent, vec![0..512, 1536..4096]);
    assert_eq!(&buf[512..1536], &[2u8; 1024][..]);
    let loc = c.parent_locator().unwrap().clone();
    assert_eq!(loc.relative_path.as_deref(), Some("base.vhd"));
    assert_eq!(loc.absolute_path.as_deref(), base.to_str());
    assert_eq!(loc.expected, Some(id.clone()));
    // set_parent with a new path, several times (slots alternate; file must not grow much).
    let len0 = std::fs::metadata(&child).unwrap().len();
    for i in 0..10 {
        let mut p = s.parent.clone().unwrap();
        p.relative_path = format!("../moved{i}/base.vhd");
        p.absolute_path = format!("/somewhere/moved{i}/base.vhd");
        c.set_parent(&p).unwrap();
    }
    c.flush().unwrap();
    drop(c);
    assert_eq!(
        std::fs::metadata(&child).unwrap().len(),
        len0,
        "set_parent reuses free locator space"
    );
    let c = VhdFile::open(&child, true).unwrap();
    let loc = c.parent_locator().unwrap();
    assert_eq!(loc.relative_path.as_deref(), Some("../moved9/base.vhd"));
    assert_eq!(
        loc.absolute_path.as_deref(),
        Some("/somewhere/moved9/base.vhd")
    );
    assert!(c.check(false).unwrap().is_clean());
}

#[test]
fn resize_and_compact() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.vhd");
    let v = VhdFile::create(&p, &spec(4 << 20, DiskKind::Dynamic)).unwrap();
    v.write(0, &vec![9u8; 4096]).unwrap();
    v.write(3 << 20, &vec![8u8; 4096]).unwrap();
    // Shrinking past data is refused; growing far beyond the BAT's padding moves the BAT.
    assert!(matches!(
        v.resize(2 << 20),
        Err(fv_vdisk_core::DiskError::Refused { .. })
    ));
    v.resize(512 << 20).unwrap();
    v.write((512 << 20) - 4096, &vec![7u8; 4096]).unwrap();
    v.flush().unwrap();
    drop(v);
    let raw = dir.path().join("r.raw");
    let mut reference = vec![0u8; 512 << 20];
    reference[..4096].fill(9);
    reference[3 << 20..(3 << 20) + 4096].fill(8);
    reference[(512 << 20) - 4096..].fill(7);
    std::fs::write(&raw, &reference).unwrap();
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "vpc",
            "-F",
            "raw",
            p.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    // Zero the middle block's data, compact: the file shrinks, contents stay.
    let v = VhdFile::open(&p, false).unwrap();
    v.write(3 << 20, &vec![0u8; 4096]).unwrap();
    let before = std::fs::metadata(&p).unwrap().len();
    let shrunk = v.compact(&mut |_, _| true).unwrap();
    assert!(shrunk > 0);
    drop(v);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), before - shrunk);
    reference[3 << 20..(3 << 20) + 4096].fill(0);
    std::fs::write(&raw, &reference).unwrap();
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "vpc",
            "-F",
            "raw",
            p.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    let v = VhdFile::open(&p, true).unwrap();
    assert!(v.check(false).unwrap().is_clean());
    assert_eq!(v.allocation().unwrap().allocated_blocks, 2);
}

/// Flip bytes/fields of valid images: open, read, extents, check must never panic.
#[test]
fn mutated_images_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("seed-base.vhd");
    let small = |kind| CreateSpec {
        block_size: 512 << 10,
        ..spec(2 << 20, kind)
    };
    let b = VhdFile::create(&base, &small(DiskKind::Dynamic)).unwrap();
    b.write(0, &vec![3u8; 8192]).unwrap();
    b.write((2 << 20) - 8192, &vec![4u8; 8192]).unwrap();
    let id = b.identity();
    drop(b);
    let child = dir.path().join("seed-child.vhd");
    let mut s = small(DiskKind::Differencing);
    s.parent = Some(ParentSpec {
        identity: id,
        virtual_size: 2 << 20,
        relative_path: "seed-base.vhd".into(),
        absolute_path: base.to_str().unwrap().into(),
        parent_disk_id: None,
    });
    let c = VhdFile::create(&child, &s).unwrap();
    c.write(1 << 20, &vec![5u8; 4096]).unwrap();
    drop(c);
    let fixed = dir.path().join("seed-fixed.vhd");
    drop(VhdFile::create(&fixed, &spec(64 << 10, DiskKind::Fixed)).unwrap());
    let seeds: Vec<Vec<u8>> = [&base, &child, &fixed]
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(2024);
    let target = dir.path().join("m.vhd");
    let mut opened = 0;
    for i in 0..2000 {
        let mut img = seeds[i % seeds.len()].clone();
        let len = img.len();
        // Mutate mostly in metadata areas (first 16 KiB, last 512 bytes).
        for _ in 0..rng.gen_range(1..6) {
            let pos = match rng.gen_range(0..3) {
                0 => rng.gen_range(0..len.min(16384)),
                1 => len - 1 - rng.gen_range(0..512),
                _ => rng.gen_range(0..len),
            };
            img[pos] = rng.gen();
        }
        // Fix checksums sometimes so deeper fields get exercised.
        if rng.gen_bool(0.7) {
            for off in [0usize, len - 512] {
                if &img[off..off + 8] == b"conectix" {
                    let c = fv_vhd::format::checksum(&img[off..off + 512], 64);
                    img[off + 64..off + 68].copy_from_slice(&c.to_be_bytes());
                }
            }
            if &img[512..520] == b"cxsparse" {
                let c = fv_vhd::format::checksum(&img[512..1536], 36);
                img[548..552].copy_from_slice(&c.to_be_bytes());
            }
        }
        if rng.gen_bool(0.1) {
            img.truncate(rng.gen_range(0..len));
        }
        std::fs::write(&target, &img).unwrap();
        if let Ok(v) = VhdFile::open(&target, !rng.gen_bool(0.05)) {
            opened += 1;
            let size = v.info().virtual_size;
            let mut buf = vec![0u8; 65536];
            let mut absent = Vec::new();
            for off in [0u64, size / 2, size.saturating_sub(65536)] {
                let off = off.min(size.saturating_sub(65536));
                let _ = v.read_layer(off / 512 * 512, &mut buf, &mut absent);
            }
            let _ = v.extents(0, size);
            let _ = v.check(false);
            let _ = v.allocation();
            if !v.read_only() {
                let _ = v.write(0, &[1u8; 512]);
                let _ = v.flush();
            }
        }
    }
    assert!(
        opened > 100,
        "too few mutants opened ({opened}) to exercise the readers"
    );
    let _ = Path::new("");
}
