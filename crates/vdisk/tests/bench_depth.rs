//! Read throughput through a depth-32 chain vs depth 1 (prints figures; no timed
//! assertion). Data sits in the base (every layer is consulted) or in the top.
mod common;
use common::*;
use fv_vdisk::ops;
use fv_vdisk::{BlockDevice, CreateSpec, DiskFormat, DiskKind};
use std::time::Instant;

const SIZE: u64 = 64 << 20;

fn throughput(d: &dyn BlockDevice, rounds: usize) -> f64 {
    let mut buf = vec![0u8; 1 << 20];
    let start = Instant::now();
    for _ in 0..rounds {
        for off in (0..SIZE).step_by(1 << 20) {
            d.read_at(off, &mut buf).unwrap();
        }
    }
    (SIZE as f64 * rounds as f64) / start.elapsed().as_secs_f64() / (1 << 20) as f64
}

#[test]
fn depth_32_chain_read_throughput() {
    for fmt in [DiskFormat::Vhd, DiskFormat::Vhdx] {
        let dir = tempfile::tempdir().unwrap();
        let ext = if fmt == DiskFormat::Vhd {
            "vhd"
        } else {
            "vhdx"
        };
        let base = dir.path().join(format!("l0.{ext}"));
        ops::create(
            &base,
            fmt,
            &CreateSpec {
                virtual_size: SIZE,
                kind: DiskKind::Dynamic,
                block_size: 0,
                logical_sector_size: 512,
                physical_sector_size: 512,
                parent: None,
            },
        )
        .unwrap();
        {
            let d = fv_vdisk::open(&base, &rw()).unwrap();
            let data: Vec<u8> = (0..SIZE).map(|i| (i / 4096) as u8).collect();
            d.write_at(0, &data).unwrap();
            d.flush().unwrap();
        }
        let mut prev = base.clone();
        for i in 1..32 {
            let c = dir.path().join(format!("l{i}.{ext}"));
            ops::create_differencing(&c, &prev, 0).unwrap();
            prev = c;
        }
        let deep = fv_vdisk::open(&prev, &ro()).unwrap();
        assert_eq!(deep.layers().len(), 32);
        let shallow = fv_vdisk::open(&base, &ro()).unwrap();
        assert_eq!(read_all(&deep), read_all(&shallow));
        let _ = throughput(&shallow, 1); // warm the page cache
        let d1 = throughput(&shallow, 5);
        let d32 = throughput(&deep, 5);
        println!(
            "{fmt:?} data in base: depth 1 {d1:.0} MiB/s, depth 32 {d32:.0} MiB/s, ratio {:.2}",
            d32 / d1
        );
        drop(deep);
        // Data in the top layer: a copy of the base's data written into the top.
        {
            let top = fv_vdisk::open(&prev, &rw()).unwrap();
            let mut buf = vec![0u8; 1 << 20];
            for off in (0..SIZE).step_by(1 << 20) {
                shallow.read_at(off, &mut buf).unwrap();
                top.write_at(off, &buf).unwrap();
            }
            top.flush().unwrap();
        }
        let deep = fv_vdisk::open(&prev, &ro()).unwrap();
        let _ = throughput(&deep, 1);
        let t32 = throughput(&deep, 5);
        println!(
            "{fmt:?} data in top: depth 32 {t32:.0} MiB/s, ratio to depth 1 {:.2}",
            t32 / d1
        );
    }
}
