//! Build a small VHD chain (base + N children) for manual inspection:
//! `cargo run --example mkchain -- DIR N`.
use fv_vdisk::{ops, BlockDevice, CreateSpec, DiskFormat, DiskKind, OpenOptions};
fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(a.get(1).map(String::as_str).unwrap_or("."));
    let n: usize = a.get(2).map(|s| s.parse()).transpose()?.unwrap_or(1);
    let base = dir.join("base.vhd");
    let spec = CreateSpec {
        virtual_size: 8 << 20,
        kind: DiskKind::Dynamic,
        block_size: 0,
        logical_sector_size: 512,
        physical_sector_size: 512,
        parent: None,
    };
    ops::create(&base, DiskFormat::Vhd, &spec)?;
    fv_vdisk::open(&base, &OpenOptions::default())?.write_at(0, &[1u8; 4096])?;
    let mut prev = base;
    for i in 1..=n {
        let c = dir.join(format!("child{i}.vhd"));
        ops::create_differencing(&c, &prev, 0)?;
        fv_vdisk::open(&c, &OpenOptions::default())?
            .write_at(4096 * i as u64, &[i as u8 + 1; 4096])?;
        prev = c;
    }
    Ok(())
}
