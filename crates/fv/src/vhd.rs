//! `fv vhd …` (owned by the disk-engine work).
use crate::OutputFormat;
use clap::Args;

#[derive(Args)]
pub struct VhdArgs {}

pub fn run(_a: VhdArgs, _out: OutputFormat) -> anyhow::Result<()> {
    anyhow::bail!("fv vhd: not built yet")
}
