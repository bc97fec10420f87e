//! Convert against qemu-img as the independent peer: content (`qemu-img compare`),
//! allocation (`qemu-img map`), block size (`qemu-img info`), for a source with
//! holes, allocated all-zero ranges and data, raw/VHDX/VHD sources.
mod common;
use common::*;
use fv_vdisk::convert::{convert_with_options, ConvertOptions};
use fv_vdisk::{ops, DiskError, DiskFormat, DiskKind};
use rand::{RngCore, SeedableRng};
use std::os::unix::fs::FileExt;
use std::path::Path;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 192 * MIB;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// 192 MiB raw file: random data in scattered pieces (some unaligned to 64 KiB,
/// one a single sector), one 40 MiB range of written zeros covering the whole
/// VHDX block at 32-64 MiB, and holes everywhere else (the VHDX block at
/// 128-160 MiB is all hole).
fn mixed_source(path: &Path) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(SIZE).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(16);
    let mut data = |off: u64, len: u64| {
        let mut b = vec![0u8; len as usize];
        rng.fill_bytes(&mut b);
        f.write_all_at(&b, off).unwrap();
    };
    data(0, 3 * MIB + 4096);
    data(5 * MIB + 512, 512);
    data(7 * MIB - 4096, 8192);
    // Written zeros: allocated in the file, all-zero content.
    f.write_all_at(&vec![0u8; (40 * MIB) as usize], 28 * MIB)
        .unwrap();
    data(70 * MIB, 9 * MIB);
    data(100 * MIB + 65536 * 3 + 512, 4096);
    data(SIZE - MIB, MIB);
    f.sync_all().unwrap();
}

/// `qemu-img map` of `image`: (start, length, data) entries.
fn qemu_map(image: &Path, fmt: &str) -> Vec<(u64, u64, bool)> {
    let out = run("qemu-img", &["map", "--output=json", "-f", fmt, s(image)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
            )
        })
        .collect()
}

fn data_in(map: &[(u64, u64, bool)], start: u64, end: u64) -> bool {
    map.iter().any(|&(s, l, d)| d && s < end && s + l > start)
}

/// Payload BAT entry states of a dynamic 512-byte-sector VHDX with 32 MiB blocks,
/// read by the VHDX spec (region table at 192 KiB, BAT region GUID
/// 2DC27766-F623-4200-9D64-115E9BFD4A08; one sector bitmap entry after every
/// chunk-ratio = 128 payload entries).
fn vhdx_block_states(image: &Path) -> Vec<u8> {
    let f = std::fs::File::open(image).unwrap();
    let mut rt = vec![0u8; 64 << 10];
    f.read_exact_at(&mut rt, 192 << 10).unwrap();
    assert_eq!(&rt[..4], b"regi");
    let count = u32::from_le_bytes(rt[8..12].try_into().unwrap()) as usize;
    let bat_guid: [u8; 16] = [
        0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a,
        0x08,
    ];
    let e = (0..count)
        .map(|i| &rt[16 + i * 32..48 + i * 32])
        .find(|e| e[..16] == bat_guid)
        .expect("BAT region");
    let bat_off = u64::from_le_bytes(e[16..24].try_into().unwrap());
    let blocks = (SIZE / (32 * MIB)) as usize;
    let mut bat = vec![0u8; 8 * (blocks + blocks / 128 + 1)];
    f.read_exact_at(&mut bat, bat_off).unwrap();
    (0..blocks).map(|b| bat[8 * (b + b / 128)] & 7).collect()
}

fn qemu_cluster_size(image: &Path, fmt: &str) -> u64 {
    let out = run("qemu-img", &["info", "--output=json", "-f", fmt, s(image)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["cluster-size"].as_u64().unwrap()
}

fn convert(src: &Path, dst: &Path, to: DiskFormat, kind: DiskKind, block_size: u32) {
    convert_with_options(
        src,
        dst,
        to,
        kind,
        &ro(),
        &ConvertOptions { block_size },
        &mut |_, _| true,
    )
    .unwrap_or_else(|e| panic!("convert {} -> {}: {e}", src.display(), dst.display()));
}

#[test]
fn every_direction_matches_the_source_and_skips_zero_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = d.join("src.raw");
    mixed_source(&raw);
    // Sources in the other formats made by the peer.
    let qx = d.join("src.vhdx");
    let qv = d.join("src.vhd");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "vhdx",
            "-o",
            "subformat=dynamic",
            s(&raw),
            s(&qx),
        ],
    );
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            "subformat=dynamic,force_size=on",
            s(&raw),
            s(&qv),
        ],
    );
    let cases = [
        (&raw, "raw-to.vhdx", DiskFormat::Vhdx, DiskKind::Dynamic),
        (&qx, "vhdx-to.vhdx", DiskFormat::Vhdx, DiskKind::Dynamic),
        (&qv, "vhd-to.vhdx", DiskFormat::Vhdx, DiskKind::Dynamic),
        (&raw, "raw-to-fixed.vhdx", DiskFormat::Vhdx, DiskKind::Fixed),
        (&qx, "vhdx-to.vhd", DiskFormat::Vhd, DiskKind::Dynamic),
        (&raw, "raw-to-fixed.vhd", DiskFormat::Vhd, DiskKind::Fixed),
        (&qv, "vhd-to.raw", DiskFormat::Raw, DiskKind::Fixed),
    ];
    for (src, name, to, kind) in cases {
        let out = d.join(name);
        convert(src, &out, to, kind, 0);
        let fmt = match to {
            DiskFormat::Vhdx => "vhdx",
            DiskFormat::Vhd => "vpc",
            DiskFormat::Raw => "raw",
        };
        let o = run(
            "qemu-img",
            &["compare", "-f", fmt, "-F", "raw", s(&out), s(&raw)],
        );
        assert!(o.contains("identical"), "{name}: {o}");
        if to == DiskFormat::Vhdx {
            run("qemu-img", &["check", "-f", "vhdx", s(&out)]);
        }
        // The written-zero block and the holes are not allocated; data is.
        if kind == DiskKind::Dynamic && to == DiskFormat::Vhd {
            let map = qemu_map(&out, fmt);
            assert!(!data_in(&map, 32 * MIB, 64 * MIB), "{name}: {map:?}");
            assert!(!data_in(&map, 128 * MIB, 160 * MIB), "{name}: {map:?}");
            assert!(!data_in(&map, 80 * MIB, 100 * MIB), "{name}: {map:?}");
            assert!(data_in(&map, 0, MIB) && data_in(&map, 70 * MIB, 71 * MIB));
        }
        if kind == DiskKind::Dynamic && to == DiskFormat::Vhdx {
            // qemu-img map reports a VHDX as all data, so read the BAT by the spec.
            let states = vhdx_block_states(&out);
            assert_eq!(states.len(), 6, "{name}: {states:?}");
            for (b, st) in states.iter().enumerate() {
                let present = *st == 6 || *st == 7;
                assert_eq!(present, b != 1 && b != 4, "{name}: block {b} state {st}");
            }
        }
        assert!(!d.join(format!("{name}.partial")).exists());
    }
    // Inside allocated blocks too, zeros are not written: the file stores about
    // the 14 MiB of data, not the 40 MiB of written zeros.
    use std::os::unix::fs::MetadataExt;
    let used = std::fs::metadata(d.join("raw-to.vhdx")).unwrap().blocks() * 512;
    assert!(used < 30 * MIB, "raw-to.vhdx uses {used} bytes");
}

#[test]
fn block_size_is_what_qemu_img_reports() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = d.join("src.raw");
    mixed_source(&raw);
    for (bs, kind) in [
        (MIB, DiskKind::Dynamic),
        (8 * MIB, DiskKind::Dynamic),
        (256 * MIB, DiskKind::Dynamic),
        (64 * MIB, DiskKind::Fixed),
    ] {
        let out = d.join(format!("b{bs}-{kind:?}.vhdx"));
        convert(&raw, &out, DiskFormat::Vhdx, kind, bs as u32);
        assert_eq!(qemu_cluster_size(&out, "vhdx"), bs, "{}", out.display());
        let o = run(
            "qemu-img",
            &["compare", "-f", "vhdx", "-F", "raw", s(&out), s(&raw)],
        );
        assert!(o.contains("identical"), "{o}");
    }
    for bs in [512 << 10, 4 * MIB] {
        let out = d.join(format!("b{bs}.vhd"));
        convert(&raw, &out, DiskFormat::Vhd, DiskKind::Dynamic, bs as u32);
        assert_eq!(qemu_cluster_size(&out, "vpc"), bs, "{}", out.display());
        let o = run(
            "qemu-img",
            &["compare", "-f", "vpc", "-F", "raw", s(&out), s(&raw)],
        );
        assert!(o.contains("identical"), "{o}");
    }
    // Sizes the formats do not allow are refused before anything is written.
    for (to, kind, bs) in [
        (DiskFormat::Vhdx, DiskKind::Dynamic, 3 * MIB),
        (DiskFormat::Vhdx, DiskKind::Dynamic, 512 << 10),
        (DiskFormat::Vhdx, DiskKind::Dynamic, 512 * MIB),
        (DiskFormat::Vhd, DiskKind::Dynamic, 256 << 10),
        (DiskFormat::Vhd, DiskKind::Dynamic, 512 * MIB),
        (DiskFormat::Vhd, DiskKind::Fixed, 2 * MIB),
        (DiskFormat::Raw, DiskKind::Fixed, 2 * MIB),
    ] {
        let out = d.join("refused.img");
        let r = convert_with_options(
            &raw,
            &out,
            to,
            kind,
            &ro(),
            &ConvertOptions {
                block_size: bs as u32,
            },
            &mut |_, _| true,
        );
        assert!(
            matches!(r, Err(DiskError::InvalidArgument(_))),
            "{to:?} {kind:?} {bs}: {r:?}"
        );
        assert!(!out.exists() && !d.join("refused.img.partial").exists());
    }
}

#[test]
fn progress_reaches_the_end_and_cancel_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = d.join("src.raw");
    mixed_source(&raw);
    let size = SIZE;
    let mut seen = Vec::new();
    ops::convert(
        &raw,
        &d.join("p.vhdx"),
        DiskFormat::Vhdx,
        DiskKind::Dynamic,
        &mut |done, total| {
            seen.push((done, total));
            true
        },
    )
    .unwrap();
    assert!(seen.len() > 2, "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "{seen:?}");
    assert!(seen.iter().all(|&(d, t)| t == size && d <= t));
    assert_eq!(seen.last(), Some(&(size, size)));
    // Cancelled part-way (after the reader has queued pieces ahead).
    for stop_after in [0usize, 2] {
        let out = d.join(format!("c{stop_after}.vhdx"));
        let mut calls = 0usize;
        let r = ops::convert(
            &raw,
            &out,
            DiskFormat::Vhdx,
            DiskKind::Dynamic,
            &mut |_, _| {
                calls += 1;
                calls <= stop_after
            },
        );
        assert!(matches!(r, Err(DiskError::Cancelled)), "{r:?}");
        assert_eq!(calls, stop_after + 1);
        assert!(!out.exists());
        assert!(!d.join(format!("c{stop_after}.vhdx.partial")).exists());
    }
}
