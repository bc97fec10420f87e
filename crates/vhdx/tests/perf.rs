//! Throughput figures, dynamic VHDX vs raw (printed, not asserted: timing is not a
//! test). Run with `cargo test -p fv-vhdx --release --test perf -- --nocapture`.

mod common;
use common::*;
use fv_vdisk_core::{DiskKind, Layer, RawLayer};
use fv_vhdx::VhdxFile;
use std::time::Instant;

fn run_pattern(l: &dyn Layer, size: u64, label: &str) -> [f64; 4] {
    let mib = MIB as usize;
    let buf = vec![0x5au8; mib];
    let t = Instant::now();
    for i in 0..size / MIB {
        l.write(i * MIB, &buf).unwrap();
    }
    l.flush().unwrap();
    let seq_w = size as f64 / MIB as f64 / t.elapsed().as_secs_f64();
    let mut rb = vec![0u8; mib];
    let t = Instant::now();
    for i in 0..size / MIB {
        l.read_layer(i * MIB, &mut rb, &mut Vec::new()).unwrap();
    }
    let seq_r = size as f64 / MIB as f64 / t.elapsed().as_secs_f64();
    let mut rng = Rng(1);
    let n = 20000;
    let small = vec![0xa5u8; 4096];
    let t = Instant::now();
    for _ in 0..n {
        l.write(rng.below(size / 4096) * 4096, &small).unwrap();
    }
    let rw = n as f64 / t.elapsed().as_secs_f64();
    let mut sb = vec![0u8; 4096];
    let t = Instant::now();
    for _ in 0..n {
        l.read_layer(rng.below(size / 4096) * 4096, &mut sb, &mut Vec::new())
            .unwrap();
    }
    let rr = n as f64 / t.elapsed().as_secs_f64();
    println!("{label}: seq write {seq_w:.0} MiB/s, seq read {seq_r:.0} MiB/s, rand 4k write {rw:.0} IOPS, rand 4k read {rr:.0} IOPS");
    [seq_w, seq_r, rw, rr]
}

#[test]
fn perf_figures_dynamic_vs_raw() {
    let dir = tempfile::tempdir().unwrap();
    let size = 256 * MIB;
    let raw = RawLayer::create(&dir.path().join("p.raw"), size).unwrap();
    let r = run_pattern(&raw, size, "raw");
    let v = VhdxFile::create(
        &dir.path().join("p.vhdx"),
        &spec(DiskKind::Dynamic, size, 0, 512),
    )
    .unwrap();
    let x = run_pattern(&v, size, "vhdx (allocating)");
    let y = run_pattern(&v, size, "vhdx (allocated)");
    let ratio: Vec<String> = y
        .iter()
        .zip(r.iter())
        .map(|(a, b)| format!("{:.2}", a / b))
        .collect();
    println!(
        "allocated vhdx / raw ratios (seq w, seq r, rand w, rand r): {ratio:?}; first pass {:?}",
        x.map(|v| v as u64)
    );
}
