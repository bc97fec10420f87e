//! `fv template …` (owned by the guest-template work).
use crate::output::emit;
use crate::OutputFormat;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct TemplateArgs {
    #[command(subcommand)]
    cmd: TemplateCmd,
}

#[derive(Subcommand)]
enum TemplateCmd {
    /// Build the tiny guest template from Debian packages (or reuse the cached one).
    Build {
        /// Cache directory (default: $FV_TEMPLATE_DIR, else <workspace>/target/templates).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Kernel flavour: cloud (fast boot) or generic (adds e1000/AHCI drivers).
        #[arg(long, value_enum, default_value = "cloud")]
        kernel: Kernel,
    },
    /// Remove cached templates other than the current ones (both kernel flavours).
    Prune {
        /// Cache directory (default: $FV_TEMPLATE_DIR, else <workspace>/target/templates).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Kernel {
    Cloud,
    Generic,
}

pub fn run(a: TemplateArgs, out: OutputFormat) -> anyhow::Result<()> {
    match a.cmd {
        TemplateCmd::Prune { out: dir } => {
            let dir = dir.unwrap_or_else(fv_guest_template::default_cache_dir);
            // "Current" = what ensure resolves now; building them first keeps
            // prune from leaving the cache empty.
            let mut keep = Vec::new();
            for kernel in [
                fv_guest_template::KernelFlavour::Cloud,
                fv_guest_template::KernelFlavour::Generic,
            ] {
                let opts = fv_guest_template::Options { kernel };
                keep.push(fv_guest_template::ensure_with(&dir, &opts)?.cache_key);
            }
            let keep_refs: Vec<&str> = keep.iter().map(String::as_str).collect();
            let removed = fv_guest_template::prune(&dir, &keep_refs)?;
            let value = serde_json::json!({ "kept": keep, "removed": removed });
            emit(out, &value, || {
                let mut rows = vec![vec!["ENTRY".into(), "ACTION".into()]];
                rows.extend(keep.iter().map(|k| vec![k.clone(), "kept".into()]));
                rows.extend(
                    removed
                        .iter()
                        .map(|p| vec![p.display().to_string(), "removed".into()]),
                );
                rows
            });
            Ok(())
        }
        TemplateCmd::Build { out: dir, kernel } => {
            let dir = dir.unwrap_or_else(fv_guest_template::default_cache_dir);
            let started = Instant::now();
            let opts = fv_guest_template::Options {
                kernel: match kernel {
                    Kernel::Cloud => fv_guest_template::KernelFlavour::Cloud,
                    Kernel::Generic => fv_guest_template::KernelFlavour::Generic,
                },
            };
            let (t, status) = fv_guest_template::ensure_with_status(&dir, &opts)?;
            let secs = started.elapsed().as_secs_f64();
            let value = serde_json::json!({
                "status": status,
                "kernel_flavour": opts.kernel,
                "seconds": secs,
                "cache_key": t.cache_key,
                "bios_disk": t.bios_disk,
                "kernel": t.kernel,
                "initrd": t.initrd,
                "data_disk": t.data_disk,
                "cmdline": t.cmdline,
                "ready_marker": t.ready_marker,
            });
            let status = match status {
                fv_guest_template::CacheStatus::Built => "built",
                fv_guest_template::CacheStatus::Cached => "cached",
            };
            emit(out, &value, || {
                vec![
                    vec!["FIELD".into(), "VALUE".into()],
                    vec!["status".into(), format!("{status} ({secs:.1} s)")],
                    vec!["cache_key".into(), t.cache_key.clone()],
                    vec!["bios_disk".into(), t.bios_disk.display().to_string()],
                    vec!["kernel".into(), t.kernel.display().to_string()],
                    vec!["initrd".into(), t.initrd.display().to_string()],
                    vec!["data_disk".into(), t.data_disk.display().to_string()],
                    vec!["cmdline".into(), t.cmdline.clone()],
                    vec!["ready_marker".into(), t.ready_marker.clone()],
                ]
            });
            Ok(())
        }
    }
}
