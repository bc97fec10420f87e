//! `fv`: the Ferrovisor CLI.
use clap::{Parser, Subcommand, ValueEnum};

mod output;
mod template;
mod vhd;
mod vm;

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Parser)]
#[command(
    name = "fv",
    version,
    about = "Ferrovisor: manage VMs, virtual disks and hosts"
)]
pub struct Cli {
    /// Output format.
    #[arg(
        short = 'o',
        long = "output",
        global = true,
        value_enum,
        default_value = "table"
    )]
    pub output: OutputFormat,
    #[command(subcommand)]
    cmd: Top,
}

#[derive(Subcommand)]
enum Top {
    /// Virtual hard disks (VHD/VHDX): work on files directly.
    Vhd(vhd::VhdArgs),
    /// Guest templates.
    Template(template::TemplateArgs),
    /// Virtual machines, jobs and the host (through fvd).
    #[command(flatten)]
    Service(vm::ServiceCmd),
}

fn main() {
    let cli = Cli::parse();
    let out = cli.output;
    let res = match cli.cmd {
        Top::Vhd(a) => vhd::run(a, out),
        Top::Template(a) => template::run(a, out),
        Top::Service(a) => vm::run(a, out),
    };
    if let Err(e) = res {
        let code = output::exit_code(&e);
        if out == OutputFormat::Json {
            println!("{}", serde_json::json!({ "error": format!("{e:#}") }));
        } else {
            eprintln!("fv: {e:#}");
        }
        std::process::exit(code);
    }
}
