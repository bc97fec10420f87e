//! Opening 2000 randomly mutated valid images (headers, region table, metadata, BAT,
//! log) must never panic or allocate hugely: every failure is a typed error.

mod common;
use common::*;
use fv_vdisk_core::{CreateSpec, DiskKind, Layer, ParentSpec};
use fv_vhdx::{OpenOptions, VhdxFile};

#[test]
fn mutated_images_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let base_p = dir.path().join("base.vhdx");
    let child_p = dir.path().join("child.vhdx");
    let base = VhdxFile::create(&base_p, &spec(DiskKind::Dynamic, 8 * MIB, 1 << 20, 512)).unwrap();
    base.write(0, &[1u8; 8192]).unwrap();
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
    child.write(4096, &[2u8; 1024]).unwrap();
    // Leave a dirty log in the child so replay parsing is exercised too.
    child.debug_crash_after_log_write();
    let _ = child.flush();
    drop(child);
    drop(base);
    let images = [
        std::fs::read(&base_p).unwrap(),
        std::fs::read(&child_p).unwrap(),
    ];
    // Interesting areas: file id, headers, region tables, log, metadata, BAT.
    let hot: [(usize, usize); 6] = [
        (0, 64),
        (64 << 10, 128),
        (128 << 10, 128),
        (192 << 10, 96),
        (1 << 20, 8192),
        (2 << 20, 70000),
    ];
    let mut rng = Rng(2024);
    // One file per source image, patched in place and restored after each try.
    let targets = [dir.path().join("m0.vhdx"), dir.path().join("m1.vhdx")];
    for (t, img) in targets.iter().zip(images.iter()) {
        std::fs::write(t, img).unwrap();
    }
    let mut outcomes = [0usize; 2];
    for i in 0..2000 {
        let orig = &images[i % 2];
        let target = &targets[i % 2];
        let mut img = orig.clone();
        let mut touched = Vec::new();
        for _ in 0..1 + rng.below(8) {
            let (start, len) = if rng.below(4) == 0 {
                (3 << 20, img.len() - (3 << 20))
            } else {
                hot[rng.below(hot.len() as u64) as usize]
            };
            let pos = start + rng.below(len as u64) as usize;
            if pos + 8 > img.len() {
                continue;
            }
            match rng.below(3) {
                0 => img[pos] ^= 1 << rng.below(8),
                1 => img[pos] = rng.next() as u8,
                _ => {
                    let v = [0u8, 0xff, 0x7f, 0x80][rng.below(4) as usize];
                    img[pos..pos + 8].fill(v);
                }
            }
            touched.push(pos);
        }
        let truncated = rng.below(50) == 0;
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(target)
                .unwrap();
            for &pos in &touched {
                f.write_all_at(&img[pos..pos + 8], pos as u64).unwrap();
            }
            if truncated {
                f.set_len(rng.below(img.len() as u64)).unwrap();
            }
        }
        for replay in [false, true] {
            match VhdxFile::open(
                target,
                &OpenOptions {
                    read_only: true,
                    replay_log: replay,
                },
            ) {
                Ok(v) => {
                    outcomes[0] += 1;
                    let size = v.info().virtual_size.min(8 * MIB);
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut off = 0;
                    while off + 65536 <= size {
                        let _ = v.read_layer(off, &mut buf, &mut Vec::new());
                        off += 1 << 20;
                    }
                    let _ = v.extents(0, size);
                }
                Err(_) => outcomes[1] += 1,
            }
        }
        if truncated {
            std::fs::write(target, orig).unwrap();
        } else {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(target)
                .unwrap();
            for &pos in &touched {
                f.write_all_at(&orig[pos..pos + 8], pos as u64).unwrap();
            }
        }
    }
    println!("opened {} / refused {}", outcomes[0], outcomes[1]);
    assert!(outcomes[0] > 0 && outcomes[1] > 0);
}
