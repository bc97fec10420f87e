//! `fv vm|job|host …` (owned by the host-service work).
use crate::OutputFormat;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum ServiceCmd {
    /// Show the host.
    Host,
}

pub fn run(_c: ServiceCmd, _out: OutputFormat) -> anyhow::Result<()> {
    anyhow::bail!("fv host: not built yet")
}
