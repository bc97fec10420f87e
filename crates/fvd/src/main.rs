//! `fvd`: the Ferrovisor host service.
use clap::Parser;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "fvd",
    version,
    about = "Ferrovisor host service (VM registry, workers, API)"
)]
struct Args {
    /// State directory (database, default VM folder). Env: FV_STATE_DIR.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Runtime directory (API socket, per-VM sockets). Env: FV_RUNTIME_DIR.
    #[arg(long)]
    runtime_dir: Option<PathBuf>,
    /// Also serve the API over TLS on this address (e.g. 0.0.0.0:8443); callers need an
    /// API token. The self-signed certificate is made on first start in <state>/tls.
    #[arg(long)]
    listen_tcp: Option<String>,
    /// Ask the running fvd to apply every VM's automatic stop action and exit (host shutdown).
    #[arg(long)]
    shutdown_host: bool,
    /// Print the OpenAPI document and exit.
    #[arg(long)]
    print_openapi: bool,
}

/// The directory from the flag, else the environment, else the default; made
/// absolute (QEMU and the workers run elsewhere: a relative socket path would not
/// resolve for them).
fn dir(arg: Option<PathBuf>, env: &str, default: &str) -> anyhow::Result<PathBuf> {
    let d = arg
        .or_else(|| std::env::var_os(env).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(default));
    std::path::absolute(&d)
        .map_err(|e| anyhow::anyhow!("cannot make {} absolute: {e}", d.display()))
}

fn main() -> anyhow::Result<()> {
    // The access-check child (see fvd::access): before anything else, no logging.
    if std::env::args_os().nth(1).as_deref() == Some(std::ffi::OsStr::new(fvd::access::PROBE_ARG)) {
        std::process::exit(fvd::access::probe_child_main());
    }
    let a = Args::parse();
    if a.print_openapi {
        println!(
            "{}",
            serde_json::to_string_pretty(&fvd::api::openapi_document())?
        );
        return Ok(());
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FVD_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(fvd::util::log_stderr)
        .init();
    let cfg = fvd::server::Config {
        state_dir: dir(a.state_dir, "FV_STATE_DIR", "/var/lib/ferrovisor")?,
        runtime_dir: dir(a.runtime_dir, "FV_RUNTIME_DIR", "/run/ferrovisor")?,
        listen_tcp: a.listen_tcp,
    };
    if a.shutdown_host {
        let c = fvd::client::Client::new(&cfg.runtime_dir.join(fvd::server::SOCKET_NAME));
        let r = c.request("POST", "/host/actions/shutdown", None)?;
        if r.status != 202 {
            anyhow::bail!(
                "host shutdown refused: {}",
                String::from_utf8_lossy(&r.body)
            );
        }
        let id = r.json()["id"].as_str().unwrap_or_default().to_string();
        loop {
            let j = c
                .request("GET", &format!("/jobs/{id}?wait=60"), None)?
                .json();
            match j["state"].as_str() {
                Some("completed") => break,
                Some("failed") => anyhow::bail!("host shutdown: {}", j["error_description"]),
                _ => {}
            }
        }
        eprintln!("fvd: host shutdown complete");
        return Ok(());
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(fvd::server::run(cfg))
}
