//! `fv`: the Ferrovisor CLI.
use clap::{Parser, Subcommand, ValueEnum};

mod auth;
mod client;
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
    /// A remote fvd: https://HOST:PORT (env FV_URL); default: the local socket.
    #[arg(long, global = true)]
    pub url: Option<String>,
    /// API token `<id>.<secret>` (env FV_TOKEN); needed remotely.
    #[arg(long, global = true)]
    pub token: Option<String>,
    /// Pin the remote fvd's certificate by its SHA-256 fingerprint (env FV_CERT_FINGERPRINT).
    #[arg(long, global = true)]
    pub cert_fingerprint: Option<String>,
    /// Or trust the remote fvd's certificate through this PEM file (env FV_CACERT).
    #[arg(long, global = true)]
    pub cacert: Option<std::path::PathBuf>,
    #[command(subcommand)]
    cmd: Top,
}

#[derive(Subcommand)]
enum Top {
    /// Virtual hard disks (VHD/VHDX): work on files directly.
    Vhd(vhd::VhdArgs),
    /// Guest templates.
    Template(template::TemplateArgs),
    /// Authorization: roles, scopes, assignments, API tokens, audit log (through fvd).
    Auth(auth::AuthArgs),
    /// Virtual machines, jobs and the host (through fvd).
    #[command(flatten)]
    Service(vm::ServiceCmd),
}

fn main() {
    let cli = Cli::parse();
    let out = cli.output;
    // The connection options reach every client (vm.rs and auth.rs) through the
    // environment they already read; set before any thread starts.
    for (k, v) in [
        ("FV_URL", cli.url.clone()),
        ("FV_TOKEN", cli.token.clone()),
        ("FV_CERT_FINGERPRINT", cli.cert_fingerprint.clone()),
        (
            "FV_CACERT",
            cli.cacert.as_ref().map(|p| p.display().to_string()),
        ),
    ] {
        if let Some(v) = v {
            std::env::set_var(k, v);
        }
    }
    let res = match cli.cmd {
        Top::Vhd(a) => vhd::run(a, out),
        Top::Template(a) => template::run(a, out),
        Top::Auth(a) => auth::run(a, out),
        Top::Service(a) => vm::run(a, out),
    };
    if let Err(e) = res {
        let code = output::exit_code(&e);
        if out == OutputFormat::Json {
            output::line(&serde_json::json!({ "error": format!("{e:#}") }).to_string());
        } else {
            eprintln!("fv: {e:#}");
        }
        std::process::exit(code);
    }
}
