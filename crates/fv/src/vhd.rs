//! `fv vhd …`: work on VHD/VHDX/raw image files directly (no daemon).
use crate::output::{emit, Refused, Usage};
use crate::OutputFormat;
use anyhow::anyhow;
use clap::{Args, Subcommand, ValueEnum};
use fv_vdisk::ops;
use fv_vdisk::{
    format_size, parse_size, CreateSpec, DiskError, DiskFormat, DiskKind, OpenOptions, PathPolicy,
};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

// Declared here (not in main.rs) so the disk CLI stays in files this work owns.
#[path = "vhd_mount.rs"]
mod vhd_mount;

/// Shown by `fv vhd --help`; `disk_err` and `run` implement it.
const EXIT_CODES: &str = "\
Exit codes:
  0  success (check: the image is sound, after what --repair changed)
  1  the image is damaged (check found errors; another command met a corrupt image or broken chain)
  2  usage error (bad arguments or flags)
  3  refused (the image is in use by another process, a chain rule, a directory outside --allow-dir, an existing destination)
  4  any other failure (I/O error, no space, cancelled)";

#[derive(Args)]
#[command(after_help = EXIT_CODES)]
pub struct VhdArgs {
    #[command(subcommand)]
    cmd: VhdCmd,
}

#[derive(Subcommand)]
enum VhdCmd {
    /// Create a fixed, dynamic or (with --parent) differencing disk.
    New(NewArgs),
    /// Show an image's type, sizes, allocation and parent chain.
    Inspect(InspectArgs),
    /// Verify an image's structure (exit 1 if errors are found); --repair fixes what is safe.
    Check(CheckArgs),
    /// Copy a disk (flattening its chain) into a new image.
    Convert(ConvertArgs),
    /// Drop unused and all-zero blocks and shorten the file.
    Compact(PathArg),
    /// Change the virtual size (refused on disks with children).
    Resize(ResizeArgs),
    /// Merge a differencing disk into its parent, or flatten it into a new disk.
    Merge(MergeArgs),
    /// Point a differencing disk at a moved or replaced parent.
    SetParent(SetParentArgs),
    /// Serve a disk over NBD until SIGINT/SIGTERM.
    Mount(vhd_mount::MountArgs),
}

/// Directories parents may be found in, beyond the image's own.
#[derive(Args, Clone, Default)]
pub struct ChainArgs {
    /// Also allow parents in DIR (repeatable).
    #[arg(long = "allow-dir", value_name = "DIR")]
    pub allow_dir: Vec<PathBuf>,
}

impl ChainArgs {
    pub fn policy(&self) -> PathPolicy {
        self.allow_dir
            .iter()
            .fold(PathPolicy::image_dir_only(), |p, d| p.allow(d))
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum FormatArg {
    Vhd,
    Vhdx,
    Raw,
}

impl From<FormatArg> for DiskFormat {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Vhd => DiskFormat::Vhd,
            FormatArg::Vhdx => DiskFormat::Vhdx,
            FormatArg::Raw => DiskFormat::Raw,
        }
    }
}

#[derive(Args)]
struct NewArgs {
    path: PathBuf,
    /// Virtual size, e.g. 10G (K/M/G/T suffixes).
    #[arg(long, conflicts_with = "parent")]
    size: Option<String>,
    /// Allocate the whole disk now.
    #[arg(long, conflicts_with_all = ["dynamic", "parent"])]
    fixed: bool,
    /// Grow on demand (the default).
    #[arg(long)]
    dynamic: bool,
    /// Allocation block size (default: the format's).
    #[arg(long)]
    block_size: Option<String>,
    /// Logical sector size: 512 or 4096 (VHDX only).
    #[arg(long, value_parser = ["512", "4096"])]
    logical_sector: Option<String>,
    /// Physical sector size: 512 or 4096.
    #[arg(long, value_parser = ["512", "4096"])]
    physical_sector: Option<String>,
    /// Make a differencing disk on PARENT (same format as the parent).
    #[arg(long, value_name = "PARENT")]
    parent: Option<PathBuf>,
    /// Image format (default: from the file extension).
    #[arg(long, value_enum)]
    format: Option<FormatArg>,
    /// Where PARENT's own ancestors may be found (with --parent).
    #[command(flatten)]
    chain: ChainArgs,
}

#[derive(Args)]
struct InspectArgs {
    path: PathBuf,
    #[command(flatten)]
    chain: ChainArgs,
}

#[derive(Args)]
struct CheckArgs {
    path: PathBuf,
    /// Fix what can be fixed safely.
    #[arg(long)]
    repair: bool,
    #[command(flatten)]
    chain: ChainArgs,
}

#[derive(Args)]
struct ConvertArgs {
    src: PathBuf,
    dst: PathBuf,
    /// Output format (default: from DST's extension).
    #[arg(long, value_enum)]
    to: Option<FormatArg>,
    #[arg(long, conflicts_with = "dynamic")]
    fixed: bool,
    #[arg(long)]
    dynamic: bool,
    /// Allocation block size of the new image, e.g. 1M (as qemu-img's `-o
    /// block_size`): VHDX 1M-256M, dynamic VHD 512K-256M, powers of two
    /// (default: the format's, VHDX 32M, VHD 2M).
    #[arg(long, value_name = "SIZE")]
    block_size: Option<String>,
    #[command(flatten)]
    chain: ChainArgs,
}

#[derive(Args)]
struct PathArg {
    path: PathBuf,
}

#[derive(Args)]
struct ResizeArgs {
    path: PathBuf,
    /// New virtual size, e.g. 20G.
    #[arg(long)]
    size: String,
}

#[derive(Args)]
struct MergeArgs {
    child: PathBuf,
    /// Write the child's data into its parent and delete the child.
    #[arg(long, conflicts_with = "to", required_unless_present = "to")]
    into_parent: bool,
    /// Merge even though the parent has other children (they become invalid).
    #[arg(long, requires = "into_parent")]
    force: bool,
    /// Flatten the chain into a new disk NEW, keeping the originals.
    #[arg(long, value_name = "NEW")]
    to: Option<PathBuf>,
    #[arg(long, requires = "to", conflicts_with = "dynamic")]
    fixed: bool,
    #[arg(long, requires = "to")]
    dynamic: bool,
    #[command(flatten)]
    chain: ChainArgs,
}

#[derive(Args)]
struct SetParentArgs {
    child: PathBuf,
    new_parent: PathBuf,
    /// Accept a parent whose identity differs (same format and size still required).
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    chain: ChainArgs,
}

pub fn run(a: VhdArgs, out: OutputFormat) -> anyhow::Result<()> {
    let r = match a.cmd {
        VhdCmd::New(a) => new(a, out),
        VhdCmd::Inspect(a) => inspect(a, out),
        VhdCmd::Check(a) => check(a, out),
        VhdCmd::Convert(a) => convert(a, out),
        VhdCmd::Compact(a) => compact(a, out),
        VhdCmd::Resize(a) => resize(a, out),
        VhdCmd::Merge(a) => merge(a, out),
        VhdCmd::SetParent(a) => set_parent(a, out),
        VhdCmd::Mount(a) => vhd_mount::run(a, out),
    };
    // main.rs gives usage errors 2, refusals 3 and everything else 1; here 1 means
    // "damaged" (see EXIT_CODES), so other failures are reported here with 4.
    match r {
        Err(e)
            if e.downcast_ref::<Usage>().is_none()
                && e.downcast_ref::<Refused>().is_none()
                && e.downcast_ref::<Damaged>().is_none() =>
        {
            if out == OutputFormat::Json {
                crate::output::line(&serde_json::json!({ "error": format!("{e:#}") }).to_string());
            } else {
                eprintln!("fv: {e:#}");
            }
            std::process::exit(4);
        }
        r => r,
    }
}

/// Marks an error as "the image is damaged" (exit code 1).
#[derive(Debug)]
pub struct Damaged(pub String);
impl std::fmt::Display for Damaged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Damaged {}

/// One clear line per error, classed for the exit code (see EXIT_CODES).
pub fn disk_err(e: DiskError) -> anyhow::Error {
    match e {
        DiskError::Refused { .. }
        | DiskError::ParentNotAllowed { .. }
        | DiskError::Locked { .. } => anyhow!(Refused(e.to_string())),
        DiskError::InvalidArgument(_) => anyhow!(Usage(e.to_string())),
        DiskError::Corrupt { .. }
        | DiskError::Damaged { .. }
        | DiskError::DamagedBlock { .. }
        | DiskError::DirtyLog { .. }
        | DiskError::UnknownFormat { .. }
        | DiskError::BrokenChain { .. }
        | DiskError::CyclicChain { .. }
        | DiskError::ParentNotFound { .. } => anyhow!(Damaged(e.to_string())),
        _ => anyhow!(e.to_string()),
    }
}

fn size_arg(s: &str) -> anyhow::Result<u64> {
    parse_size(s).map_err(|e| anyhow!(Usage(e.to_string())))
}

fn format_from_path(p: &Path) -> Option<DiskFormat> {
    let ext = p.extension()?.to_str()?.to_ascii_lowercase();
    match ext.as_str() {
        "vhd" | "avhd" => Some(DiskFormat::Vhd),
        "vhdx" | "avhdx" => Some(DiskFormat::Vhdx),
        "raw" | "img" | "bin" => Some(DiskFormat::Raw),
        _ => None,
    }
}

fn pick_format(explicit: Option<FormatArg>, p: &Path) -> anyhow::Result<DiskFormat> {
    explicit.map(DiskFormat::from).or_else(|| format_from_path(p)).ok_or_else(|| {
        anyhow!(Usage(format!(
            "{}: cannot tell the format from the extension; use .vhd, .vhdx or .raw (or --format/--to)",
            p.display()
        )))
    })
}

/// Ctrl-C during a long operation cancels it cleanly (the engine stops at a
/// consistent point) instead of killing the process mid-write.
fn cancel_flag() -> Arc<AtomicBool> {
    let f = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register(sig, f.clone());
    }
    f
}

fn progress_bar(out: OutputFormat, what: &str) -> ProgressBar {
    if out == OutputFormat::Json {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(0);
    if let Ok(style) =
        ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({eta})")
    {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(what.to_string());
    pb
}

/// Run `f` with a progress callback drawing `pb` and honouring Ctrl-C.
fn with_progress<T>(
    out: OutputFormat,
    what: &str,
    f: impl FnOnce(fv_vdisk::Progress<'_>) -> Result<T, DiskError>,
) -> anyhow::Result<T> {
    let pb = progress_bar(out, what);
    let cancel = cancel_flag();
    let mut cb = |done: u64, total: u64| {
        pb.set_length(total);
        pb.set_position(done);
        !cancel.load(Ordering::SeqCst)
    };
    let r = f(&mut cb);
    pb.finish_and_clear();
    r.map_err(disk_err)
}

fn kind_str(k: DiskKind) -> &'static str {
    match k {
        DiskKind::Fixed => "fixed",
        DiskKind::Dynamic => "dynamic",
        DiskKind::Differencing => "differencing",
    }
}

fn format_str(f: DiskFormat) -> &'static str {
    match f {
        DiskFormat::Raw => "raw",
        DiskFormat::Vhd => "vhd",
        DiskFormat::Vhdx => "vhdx",
    }
}

fn layer_rows(r: &ops::LayerReport, rows: &mut Vec<Vec<String>>, prefix: &str) {
    let mut kv = |k: &str, v: String| rows.push(vec![format!("{prefix}{k}"), v]);
    kv("path", r.path.display().to_string());
    kv("format", format_str(r.format).into());
    kv("type", kind_str(r.kind).into());
    kv(
        "virtual size",
        format!("{} ({} bytes)", format_size(r.virtual_size), r.virtual_size),
    );
    kv(
        "file size",
        format!("{} ({} bytes)", format_size(r.file_size), r.file_size),
    );
    if r.block_size != 0 {
        kv("block size", format_size(r.block_size.into()));
    }
    kv("logical sector", r.logical_sector_size.to_string());
    kv("physical sector", r.physical_sector_size.to_string());
    if let Some(id) = r.disk_id {
        kv("disk id", id.to_string());
    }
    if let Some(a) = &r.allocation {
        if a.total_blocks > 0 {
            kv(
                "allocated blocks",
                format!("{} of {}", a.allocated_blocks, a.total_blocks),
            );
            if a.zero_blocks > 0 {
                kv("zero blocks", a.zero_blocks.to_string());
            }
            kv("fragmentation", format!("{:.1}%", a.fragmentation_percent));
        }
    }
    if let Some(p) = &r.parent {
        let loc = &p.locator;
        if let Some(rel) = &loc.relative_path {
            kv("parent (relative)", rel.clone());
        }
        if let Some(abs) = &loc.absolute_path {
            kv("parent (absolute)", abs.clone());
        }
        kv(
            "parent resolved",
            p.resolved
                .as_ref()
                .map(|x| x.display().to_string())
                .unwrap_or_else(|| "-".into()),
        );
        kv(
            "parent link",
            if p.verified {
                "verified".to_string()
            } else {
                format!("BROKEN: {}", p.problem.clone().unwrap_or_default())
            },
        );
    }
}

fn print_inspect(out: OutputFormat, rep: &ops::InspectReport) {
    emit(out, rep, || {
        let mut rows = vec![vec!["PROPERTY".to_string(), "VALUE".to_string()]];
        layer_rows(&rep.top, &mut rows, "");
        for (i, l) in rep.chain.iter().enumerate() {
            layer_rows(l, &mut rows, &format!("ancestor {}: ", i + 1));
        }
        rows
    });
}

fn new(a: NewArgs, out: OutputFormat) -> anyhow::Result<()> {
    let block_size = match &a.block_size {
        Some(s) => u32::try_from(size_arg(s)?)
            .map_err(|_| anyhow!(Usage("block size too large".into())))?,
        None => 0,
    };
    if let Some(parent) = &a.parent {
        if a.logical_sector.is_some() || a.physical_sector.is_some() {
            return Err(anyhow!(Usage(
                "a differencing disk takes its parent's sector sizes".into()
            )));
        }
        ops::create_differencing_with(&a.path, parent, block_size, &a.chain.policy())
            .map_err(disk_err)?;
    } else {
        let Some(size) = &a.size else {
            return Err(anyhow!(Usage("--size (or --parent) is required".into())));
        };
        let format = pick_format(a.format, &a.path)?;
        let logical: u32 = a.logical_sector.as_deref().unwrap_or("512").parse()?;
        let physical: u32 = match &a.physical_sector {
            Some(p) => p.parse()?,
            None if format == DiskFormat::Vhdx => 4096,
            None => 512,
        };
        let spec = CreateSpec {
            virtual_size: size_arg(size)?,
            kind: if a.fixed {
                DiskKind::Fixed
            } else {
                DiskKind::Dynamic
            },
            block_size,
            logical_sector_size: logical,
            physical_sector_size: physical,
            parent: None,
        };
        ops::create(&a.path, format, &spec).map_err(disk_err)?;
    }
    let rep = ops::inspect_with(&a.path, &a.chain.policy()).map_err(disk_err)?;
    print_inspect(out, &rep);
    Ok(())
}

fn inspect(a: InspectArgs, out: OutputFormat) -> anyhow::Result<()> {
    let rep = ops::inspect_with(&a.path, &a.chain.policy()).map_err(disk_err)?;
    print_inspect(out, &rep);
    Ok(())
}

#[derive(Serialize)]
struct CheckOut<'a> {
    path: &'a Path,
    clean: bool,
    /// With --repair: the errors found before repairing (`errors` is the verdict after).
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    found: &'a [String],
    #[serde(flatten)]
    report: &'a fv_vdisk::CheckReport,
}

fn check(a: CheckArgs, out: OutputFormat) -> anyhow::Result<()> {
    let opts = OpenOptions {
        read_only: true,
        replay_log: true,
        policy: a.chain.policy(),
    };
    // An image too damaged to open is a check result, not a tool failure.
    let as_report = |e: DiskError| match e {
        e @ (DiskError::Corrupt { .. }
        | DiskError::Damaged { .. }
        | DiskError::BrokenChain { .. }
        | DiskError::CyclicChain { .. }
        | DiskError::DirtyLog { .. }) => Ok(fv_vdisk::CheckReport {
            errors: vec![e.to_string()],
            ..Default::default()
        }),
        e => Err(disk_err(e)),
    };
    let first = ops::check_with(&a.path, a.repair, &opts).or_else(as_report)?;
    // After a repair the verdict is that of a fresh read-only check of the result:
    // what was found before the repair is not what the image is now.
    let (rep, found_before) = if a.repair {
        let after = ops::check_with(&a.path, false, &opts).or_else(as_report)?;
        let mut r = after;
        r.repaired = first.repaired.clone();
        if first.log_replayed {
            r.repaired
                .push("replayed the VHDX log into the file".to_string());
        }
        (r, Some(first))
    } else {
        (first, None)
    };
    let clean = rep.is_clean();
    emit(
        out,
        &CheckOut {
            path: &a.path,
            clean,
            found: found_before
                .as_ref()
                .map(|f| f.errors.as_slice())
                .unwrap_or(&[]),
            report: &rep,
        },
        || {
            let mut rows = vec![vec!["RESULT".to_string(), "DETAIL".to_string()]];
            if let Some(before) = &found_before {
                for e in &before.errors {
                    rows.push(vec!["found".into(), e.clone()]);
                }
            }
            for r in &rep.repaired {
                rows.push(vec!["repaired".into(), r.clone()]);
            }
            for e in &rep.errors {
                rows.push(vec!["error".into(), e.clone()]);
            }
            for w in &rep.warnings {
                rows.push(vec!["warning".into(), w.clone()]);
            }
            let changed = if !a.repair {
                "; nothing was changed"
            } else if rep.repaired.is_empty() {
                "; nothing needed repair"
            } else {
                ""
            };
            rows.push(vec![
                if clean { "clean" } else { "NOT CLEAN" }.into(),
                format!(
                    "{} ({} errors, {} warnings{changed})",
                    a.path.display(),
                    rep.errors.len(),
                    rep.warnings.len()
                ),
            ]);
            if !clean && !a.repair {
                rows.push(vec![
                    "hint".into(),
                    "`fv vhd check --repair` fixes what can be fixed safely".into(),
                ]);
            }
            rows
        },
    );
    if !clean {
        // The report above is the error message; exit 1 (damaged) without a second one.
        std::process::exit(1);
    }
    Ok(())
}

#[derive(Serialize)]
struct Done {
    operation: &'static str,
    path: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes: Option<u64>,
    message: String,
}

fn done(out: OutputFormat, d: Done) {
    emit(out, &d, || {
        vec![vec!["RESULT".into()], vec![d.message.clone()]]
    });
}

fn convert(a: ConvertArgs, out: OutputFormat) -> anyhow::Result<()> {
    let to = pick_format(a.to, &a.dst)?;
    let kind = if a.fixed {
        DiskKind::Fixed
    } else {
        DiskKind::Dynamic
    };
    let block_size = match &a.block_size {
        Some(s) => {
            let b = u32::try_from(size_arg(s)?).map_err(|_| {
                anyhow!(Usage(format!(
                    "--block-size {s}: larger than the 256 MiB any format allows"
                )))
            })?;
            fv_vdisk::convert::check_block_size(to, kind, b).map_err(|e| match e {
                DiskError::InvalidArgument(m) => anyhow!(Usage(format!("--block-size {s}: {m}"))),
                e => disk_err(e),
            })?;
            b
        }
        None => 0,
    };
    let opts = OpenOptions {
        read_only: true,
        replay_log: false,
        policy: a.chain.policy(),
    };
    let conv = fv_vdisk::convert::ConvertOptions { block_size };
    with_progress(out, "converting", |p| {
        fv_vdisk::convert::convert_with_options(&a.src, &a.dst, to, kind, &opts, &conv, p)
    })?;
    let msg = format!(
        "converted {} -> {} ({} {})",
        a.src.display(),
        a.dst.display(),
        kind_str(kind),
        format_str(to)
    );
    done(
        out,
        Done {
            operation: "convert",
            path: a.dst,
            source: Some(a.src),
            bytes: None,
            message: msg,
        },
    );
    Ok(())
}

fn compact(a: PathArg, out: OutputFormat) -> anyhow::Result<()> {
    let saved = with_progress(out, "compacting", |p| ops::compact(&a.path, p))?;
    let msg = format!("{}: reclaimed {}", a.path.display(), format_size(saved));
    done(
        out,
        Done {
            operation: "compact",
            path: a.path,
            source: None,
            bytes: Some(saved),
            message: msg,
        },
    );
    Ok(())
}

fn resize(a: ResizeArgs, out: OutputFormat) -> anyhow::Result<()> {
    let size = size_arg(&a.size)?;
    ops::resize(&a.path, size).map_err(disk_err)?;
    let msg = format!(
        "{}: virtual size is now {}",
        a.path.display(),
        format_size(size)
    );
    done(
        out,
        Done {
            operation: "resize",
            path: a.path,
            source: None,
            bytes: Some(size),
            message: msg,
        },
    );
    Ok(())
}

fn merge(a: MergeArgs, out: OutputFormat) -> anyhow::Result<()> {
    if let Some(dst) = a.to {
        let to = pick_format(None, &dst)?;
        let kind = if a.fixed {
            DiskKind::Fixed
        } else {
            DiskKind::Dynamic
        };
        let opts = OpenOptions {
            read_only: true,
            replay_log: false,
            policy: a.chain.policy(),
        };
        // Flattening into a new disk is a convert of the whole chain.
        with_progress(out, "merging", |p| {
            ops::convert_with(&a.child, &dst, to, kind, &opts, p)
        })?;
        let msg = format!(
            "merged the chain of {} into {}",
            a.child.display(),
            dst.display()
        );
        done(
            out,
            Done {
                operation: "merge",
                path: dst,
                source: Some(a.child),
                bytes: None,
                message: msg,
            },
        );
    } else {
        let opts = OpenOptions {
            read_only: true,
            replay_log: true,
            policy: a.chain.policy(),
        };
        let parent = with_progress(out, "merging", |p| {
            ops::merge_into_parent_with(&a.child, a.force, &opts, p)
        })?;
        let msg = format!(
            "merged {} into {} (child removed)",
            a.child.display(),
            parent.display()
        );
        done(
            out,
            Done {
                operation: "merge",
                path: parent,
                source: Some(a.child),
                bytes: None,
                message: msg,
            },
        );
    }
    Ok(())
}

fn set_parent(a: SetParentArgs, out: OutputFormat) -> anyhow::Result<()> {
    let opts = OpenOptions {
        read_only: true,
        replay_log: true,
        policy: a.chain.policy(),
    };
    ops::set_parent_with(&a.child, &a.new_parent, a.force, &opts).map_err(|e| match e {
        // The named parent is not acceptable: a refusal, not damage of an image.
        DiskError::BrokenChain { .. } => anyhow!(Refused(e.to_string())),
        e => disk_err(e),
    })?;
    let msg = format!(
        "{} now points at {}",
        a.child.display(),
        a.new_parent.display()
    );
    done(
        out,
        Done {
            operation: "set-parent",
            path: a.child,
            source: Some(a.new_parent),
            bytes: None,
            message: msg,
        },
    );
    Ok(())
}
