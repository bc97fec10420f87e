//! `fv vhd mount`: serve a disk over NBD in the foreground.
use super::{disk_err, ChainArgs};
use crate::output::{line, Refused, Usage};
use crate::OutputFormat;
use anyhow::anyhow;
use clap::Args;
use fv_nbd::{ExportOptions, ListenAddr, NbdError, Server};
use fv_vdisk::{BlockDevice, OpenOptions};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Args)]
pub struct MountArgs {
    path: PathBuf,
    /// Export read-only (the image is opened read-only).
    #[arg(long)]
    read_only: bool,
    /// Unix socket path, or HOST:PORT for TCP.
    #[arg(long, value_name = "SOCKET|HOST:PORT")]
    nbd: String,
    #[command(flatten)]
    chain: ChainArgs,
}

fn nbd_err(e: NbdError) -> anyhow::Error {
    match e {
        NbdError::AddressInUse { .. } => anyhow!(Refused(e.to_string())),
        NbdError::InvalidName(_) => anyhow!(Usage(e.to_string())),
        _ => anyhow!(e.to_string()),
    }
}

pub fn run(a: MountArgs, out: OutputFormat) -> anyhow::Result<()> {
    let opts = OpenOptions {
        read_only: a.read_only,
        replay_log: false,
        policy: a.chain.policy(),
    };
    let disk = fv_vdisk::open(&a.path, &opts).map_err(disk_err)?;
    let size = disk.size();
    let name = a
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let export = ExportOptions {
        name,
        description: a.path.display().to_string(),
        read_only: a.read_only,
        ..Default::default()
    };
    let server =
        Server::bind(&ListenAddr::parse(&a.nbd), Arc::new(disk), export).map_err(nbd_err)?;
    let handle = server.shutdown_handle();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .map_err(|e| anyhow!("cannot install signal handlers: {e}"))?;
    let sig_handle = signals.handle();
    let waiter = std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            handle.shutdown();
        }
    });

    let uri = server.uri().to_string();
    match out {
        OutputFormat::Json => line(
            &serde_json::json!({ "uri": uri, "path": a.path, "read_only": a.read_only, "size": size })
                .to_string(),
        ),
        OutputFormat::Table => line(&format!(
            "serving {} ({}, {}) at {uri}\npress Ctrl-C to stop",
            a.path.display(),
            fv_vdisk::format_size(size),
            if a.read_only {
                "read-only"
            } else {
                "read-write"
            }
        )),
    }

    let res = server.serve();
    sig_handle.close();
    let _ = waiter.join();
    // serve() waited for every connection and flushed the disk; it is closed when
    // the last reference (held by the server) was dropped.
    let summary = res.map_err(nbd_err)?;
    match out {
        OutputFormat::Json => line(
            &serde_json::json!({ "stopped": true, "connections": summary.connections }).to_string(),
        ),
        OutputFormat::Table => line(&format!(
            "stopped after {} connection(s); disk flushed and closed",
            summary.connections
        )),
    }
    Ok(())
}
