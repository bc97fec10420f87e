//! Images written by our engine are read identically by qemu, and images written by
//! qemu are read identically by our engine.

mod common;
use common::*;
use fv_vdisk_core::{DiskKind, Layer, RawLayer};
use fv_vhdx::{OpenOptions, VhdxFile};
use std::path::Path;

/// Apply the same mixed workload to the image and a raw reference.
fn workload(img: &VhdxFile, reference: &RawLayer, seed: u64) {
    let info = img.info().clone();
    let size = info.virtual_size;
    let lss = info.logical_sector_size as u64;
    let bs = info.block_size as u64;
    let mut rng = Rng(seed);
    let both_write = |off: u64, data: &[u8]| {
        img.write(off, data).unwrap();
        reference.write(off, data).unwrap();
    };
    // Random small writes.
    for _ in 0..40 {
        let len = (1 + rng.below(32)) * lss;
        let off = rng.below((size - len) / lss) * lss;
        let mut d = vec![0u8; len as usize];
        rng.fill(&mut d);
        both_write(off, &d);
    }
    // Large writes across block boundaries.
    for b in 1..3u64 {
        let off = (b * bs).saturating_sub(MIB / 2).min(size - 2 * MIB);
        let mut d = vec![0u8; (MIB + MIB / 2) as usize];
        rng.fill(&mut d);
        both_write(off, &d);
    }
    img.flush().unwrap();
    // Zeroes: one whole block and a partial range.
    img.write_zeroes(bs, bs).unwrap();
    reference.write_zeroes(bs, bs).unwrap();
    img.write_zeroes(3 * lss, 5 * lss).unwrap();
    reference.write_zeroes(3 * lss, 5 * lss).unwrap();
    // Discard a partial range of written data.
    let off = (bs * 2).min(size - MIB) - 8 * lss;
    img.discard(off, 16 * lss).unwrap();
    reference.write_zeroes(off, 16 * lss).unwrap();
    // A write after zeroing re-allocates.
    let mut d = vec![0u8; 4096];
    rng.fill(&mut d);
    both_write(bs + 4096, &d);
    // A 1 MiB write of the last MiB.
    let mut d = vec![0u8; MIB as usize];
    rng.fill(&mut d);
    both_write(size - MIB, &d);
    img.flush().unwrap();
}

fn compare_with_engine(img: &Path, reference: &Path) {
    let v = VhdxFile::open(
        img,
        &OpenOptions {
            read_only: true,
            replay_log: false,
        },
    )
    .unwrap();
    let r = RawLayer::open(reference, true).unwrap();
    let size = v.info().virtual_size;
    let chunk = 8 * MIB;
    let mut off = 0;
    while off < size {
        let n = chunk.min(size - off) as usize;
        let mut a = vec![0u8; n];
        let mut absent = Vec::new();
        v.read_layer(off, &mut a, &mut absent).unwrap();
        for q in absent {
            a[(q.start - off) as usize..(q.end - off) as usize].fill(0);
        }
        let mut b = vec![0u8; n];
        r.read_layer(off, &mut b, &mut Vec::new()).unwrap();
        if let Some(i) = first_diff(&a, &b) {
            panic!("engine read differs from reference at {}", off + i as u64);
        }
        off += n as u64;
    }
}

fn ours_then_qemu(block_mib: u32) {
    let dir = tempfile::tempdir().unwrap();
    for kind in [DiskKind::Dynamic, DiskKind::Fixed] {
        for lss in [512u32, 4096] {
            let bs = block_mib as u64 * MIB;
            let size = (2 * bs + 3 * MIB).max(40 * MIB);
            let img = dir.path().join(format!("{kind:?}-{lss}.vhdx"));
            let rawp = dir.path().join(format!("{kind:?}-{lss}.raw"));
            let v = VhdxFile::create(&img, &spec(kind, size, block_mib << 20, lss)).unwrap();
            let r = RawLayer::create(&rawp, size).unwrap();
            workload(&v, &r, block_mib as u64 * 1000 + lss as u64);
            drop(v);
            if lss == 4096 {
                // qemu only handles 512-byte logical sectors: libvhdi is the peer here.
                let info = run_ok("vhdiinfo", &[p(&img)], 60);
                assert!(info.contains("Bytes per sector\t: 4096"), "{info}");
                let m = Mount::new(&img, &dir.path().join(format!("mnt-{kind:?}")));
                files_equal(&m.file(), &rawp).unwrap_or_else(|e| {
                    panic!("{kind:?} bs={block_mib} lss=4096 via vhdimount: {e}")
                });
                drop(m);
                compare_with_engine(&img, &rawp);
                continue;
            }
            let out = run(
                "qemu-img",
                &["compare", "-f", "vhdx", p(&img), "-F", "raw", p(&rawp)],
                120,
            );
            assert!(
                out.status.success(),
                "{kind:?} bs={block_mib}MiB lss={lss}: qemu-img compare: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let chk = run("qemu-img", &["check", "-f", "vhdx", p(&img)], 120);
            assert!(
                chk.status.success(),
                "qemu-img check: {}",
                String::from_utf8_lossy(&chk.stdout)
            );
            // qemu reports the virtual size and sector size we wrote.
            let info = run_ok("qemu-img", &["info", "--output=json", p(&img)], 60);
            assert!(
                info.contains(&format!("\"virtual-size\": {size}")),
                "{info}"
            );
            compare_with_engine(&img, &rawp);
            std::fs::remove_file(&img).unwrap();
            std::fs::remove_file(&rawp).unwrap();
        }
    }
}

#[test]
fn ours_block_1m() {
    ours_then_qemu(1);
}
#[test]
fn ours_block_2m() {
    ours_then_qemu(2);
}
#[test]
fn ours_block_32m() {
    ours_then_qemu(32);
}
#[test]
fn ours_block_256m() {
    ours_then_qemu(256);
}

/// qemu creates and writes; we read the same bytes that qemu converts to raw.
#[test]
fn qemu_written_images_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str)] = &[
        ("dyn-default", "subformat=dynamic"),
        ("dyn-1m", "subformat=dynamic,block_size=1M,log_size=1M"),
        (
            "dyn-8m-log4m",
            "subformat=dynamic,block_size=8M,log_size=4M",
        ),
        ("dyn-256m", "subformat=dynamic,block_size=256M"),
        ("fixed-2m", "subformat=fixed,block_size=2M"),
    ];
    for (name, opts) in cases {
        let img = dir.path().join(format!("{name}.vhdx"));
        let raw = dir.path().join(format!("{name}.raw"));
        run_ok(
            "qemu-img",
            &["create", "-q", "-f", "vhdx", "-o", opts, p(&img), "600M"],
            120,
        );
        for cmd in [
            "write -P 0x5a 0 64k",
            "write -P 0xa5 1M 3M",
            "write -P 0x11 300M 512",
            "write -P 0x22 599M 1M",
            "write -z 1M 1M",
        ] {
            run_ok("qemu-io", &["-f", "vhdx", "-c", cmd, p(&img)], 120);
        }
        run_ok(
            "qemu-img",
            &["convert", "-f", "vhdx", "-O", "raw", p(&img), p(&raw)],
            300,
        );
        compare_with_engine(&img, &raw);

        // Now we write into qemu's image; qemu must still agree with the reference.
        {
            let v = VhdxFile::open(&img, &OpenOptions::default()).unwrap();
            let r = RawLayer::open(&raw, false).unwrap();
            let mut rng = Rng(7);
            for _ in 0..20 {
                let off = rng.below(600 * 2048 - 64) * 512;
                let mut d = vec![0u8; 512 * (1 + rng.below(64)) as usize];
                rng.fill(&mut d);
                v.write(off, &d).unwrap();
                r.write(off, &d).unwrap();
            }
            v.flush().unwrap();
        }
        let out = run(
            "qemu-img",
            &["compare", "-f", "vhdx", p(&img), "-F", "raw", p(&raw)],
            300,
        );
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let chk = run("qemu-img", &["check", "-f", "vhdx", p(&img)], 120);
        assert!(
            chk.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&chk.stdout)
        );
    }
}
