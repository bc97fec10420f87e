//! `fv template …` (owned by the guest-template work).
use crate::OutputFormat;
use clap::Args;

#[derive(Args)]
pub struct TemplateArgs {}

pub fn run(_a: TemplateArgs, _out: OutputFormat) -> anyhow::Result<()> {
    anyhow::bail!("fv template: not built yet")
}
