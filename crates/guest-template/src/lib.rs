//! Builds the tiny Debian guest template offline from Debian packages.
//!
//! The template is assembled from `apt-get download` + `dpkg-deb -x` into a
//! staging directory; no root mounts, loop devices or chroots are used. See
//! README.md for the guest's behaviour.
#![forbid(unsafe_code)]

mod apt;
mod build;
mod cpio;
mod elf;
mod guest_files;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Printed on the guest's ttyS0 once it is ready (agent running, /data mounted).
pub const READY_MARKER: &str = "FERROVISOR-GUEST-READY";

/// Bump whenever the build recipe (scripts, layout, module list...) changes:
/// it is part of the cache key.
pub const RECIPE_VERSION: &str = "fv-guest-template/2";

/// Label of the ext4 data filesystem (partition 2 of the BIOS disk, and the data disk).
pub const DATA_LABEL: &str = build::DATA_LABEL;

/// Name of the file inside the data filesystem seeded at build time.
pub const SEED_FILE: &str = "hello.txt";
/// Content of [`SEED_FILE`].
pub const SEED_CONTENT: &str = guest_files::HELLO;

/// A built guest template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Template {
    /// Raw MBR disk, BIOS-bootable (syslinux); partition 2 is the ext4 data fs.
    pub bios_disk: PathBuf,
    /// Kernel for direct boot (`-kernel`).
    pub kernel: PathBuf,
    /// Initramfs for direct boot (`-initrd`); it is the whole root filesystem.
    pub initrd: PathBuf,
    /// Raw ext4 image (label `fvdata`) for the direct-boot variant.
    pub data_disk: PathBuf,
    /// Kernel command line for direct boot (`-append`).
    pub cmdline: String,
    /// Equal to [`READY_MARKER`].
    pub ready_marker: String,
    /// Hash of the package versions used plus the recipe version.
    pub cache_key: String,
}

/// Which Debian kernel the guest boots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelFlavour {
    /// `linux-image-cloud-amd64`: LZ4-compressed, so it decompresses in about a
    /// second under TCG (the generic XZ kernel takes 5-15 s); virtio, ata_piix,
    /// NVMe and Hyper-V drivers, but no e1000 and no AHCI.
    #[default]
    Cloud,
    /// `linux-image-amd64`: also has e1000/e1000e and AHCI; boots slower.
    Generic,
}

impl KernelFlavour {
    fn meta_package(self) -> &'static str {
        match self {
            KernelFlavour::Cloud => "linux-image-cloud-amd64",
            KernelFlavour::Generic => "linux-image-amd64",
        }
    }
}

/// Build options for [`ensure_with`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    pub kernel: KernelFlavour,
}

/// Whether [`ensure_status`] built the template or found it cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheStatus {
    Built,
    Cached,
}

/// Written last into a cache entry: its presence marks the entry complete.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub recipe: String,
    pub cache_key: String,
    pub flavour: KernelFlavour,
    pub kernel_package: String,
    pub kernel_version: String,
    pub packages: BTreeMap<String, String>,
    pub modules: Vec<String>,
    pub libraries: Vec<String>,
    pub cmdline: String,
    pub build_seconds: f64,
}

pub const MANIFEST: &str = "template.json";

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("required tool `{0}` not found (run scripts/install-deps)")]
    MissingTool(String),
    #[error("`{cmd}` failed: {detail}")]
    Command { cmd: String, detail: String },
    #[error("template build failed: {0}")]
    Build(String),
}

pub(crate) fn io_err(p: &Path, source: std::io::Error) -> TemplateError {
    TemplateError::Io {
        path: p.to_path_buf(),
        source,
    }
}

pub(crate) fn spawn_err(cmd: &Command, e: std::io::Error) -> TemplateError {
    let prog = cmd.get_program().to_string_lossy().into_owned();
    if e.kind() == std::io::ErrorKind::NotFound {
        TemplateError::MissingTool(prog)
    } else {
        TemplateError::Command {
            cmd: prog,
            detail: e.to_string(),
        }
    }
}

/// Runs a command to completion; stdout on success, stderr in the error.
pub(crate) fn run(cmd: &mut Command) -> Result<String, TemplateError> {
    let o = cmd.output().map_err(|e| spawn_err(cmd, e))?;
    if !o.status.success() {
        let err = String::from_utf8_lossy(&o.stderr);
        let tail: String = err
            .lines()
            .rev()
            .take(15)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        return Err(TemplateError::Command {
            cmd: format!("{cmd:?}"),
            detail: format!("{}: {tail}", o.status),
        });
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// The cache directory tests should use: `$FV_TEMPLATE_DIR`, else
/// `<workspace>/target/templates`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FV_TEMPLATE_DIR") {
        return PathBuf::from(d);
    }
    // crates/guest-template -> workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/templates")
}

fn host_pkg_version(pkg: &str) -> String {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", pkg])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|| "unknown".into())
}

/// sha256 over the recipe version and guest scripts/layout, every
/// package=version used, and the host
/// syslinux (its boot code is written into the disk); first 16 hex digits.
fn cache_key(pkgs: &BTreeMap<String, String>) -> String {
    let mut h = Sha256::new();
    h.update(format!("recipe={RECIPE_VERSION}\n"));
    h.update(build::recipe_fingerprint());
    for (p, v) in pkgs {
        h.update(format!("{p}={v}\n"));
    }
    h.update(format!(
        "host:syslinux-common={}\n",
        host_pkg_version("syslinux-common")
    ));
    let d = h.finalize();
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn template_in(dir: &Path, key: &str) -> Template {
    Template {
        bios_disk: dir.join(build::BIOS_DISK),
        kernel: dir.join(build::KERNEL),
        initrd: dir.join(build::INITRD),
        data_disk: dir.join(build::DATA_DISK),
        cmdline: build::direct_cmdline(),
        ready_marker: READY_MARKER.to_string(),
        cache_key: key.to_string(),
    }
}

/// A complete cache entry: manifest readable, recipe current, all files present.
fn load_complete(dir: &Path, flavour: KernelFlavour) -> Option<(Template, Manifest)> {
    let m: Manifest = serde_json::from_slice(&fs::read(dir.join(MANIFEST)).ok()?).ok()?;
    if m.recipe != RECIPE_VERSION || m.flavour != flavour {
        return None;
    }
    let t = template_in(dir, &m.cache_key);
    [&t.bios_disk, &t.kernel, &t.initrd, &t.data_disk]
        .iter()
        .all(|p| p.is_file())
        .then_some((t, m))
}

/// Newest complete entry of the current recipe (used when apt cannot answer).
fn latest_complete(cache_dir: &Path, flavour: KernelFlavour) -> Option<Template> {
    let mut best: Option<(std::time::SystemTime, Template)> = None;
    for e in fs::read_dir(cache_dir).ok()?.flatten() {
        let p = e.path();
        if p.file_name()
            .and_then(|n| n.to_str())
            .is_none_or(|n| n.starts_with('.'))
        {
            continue;
        }
        if let Some((t, _)) = load_complete(&p, flavour) {
            let mt = fs::metadata(p.join(MANIFEST))
                .and_then(|m| m.modified())
                .ok()?;
            if best.as_ref().is_none_or(|(b, _)| mt > *b) {
                best = Some((mt, t));
            }
        }
    }
    best.map(|(_, t)| t)
}

/// Fingerprint of apt's view of the archive: package lists and apt config.
/// When unchanged, the previous resolution (names and versions) still holds.
fn apt_fingerprint() -> Option<String> {
    let mut h = Sha256::new();
    let mut names = Vec::new();
    for d in [
        "/var/lib/apt/lists",
        "/etc/apt/sources.list.d",
        "/etc/apt/preferences.d",
        "/etc/apt/apt.conf.d",
    ] {
        for e in fs::read_dir(d).into_iter().flatten().flatten() {
            names.push(e.path());
        }
    }
    names.push(PathBuf::from("/etc/apt/sources.list"));
    names.sort();
    let mut lists = 0;
    for p in names {
        let Ok(md) = fs::metadata(&p) else { continue };
        if p.starts_with("/var/lib/apt/lists") && md.is_file() {
            lists += 1;
        }
        let mt = md
            .modified()
            .ok()?
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?;
        h.update(format!(
            "{}|{}|{}.{}\n",
            p.display(),
            md.len(),
            mt.as_secs(),
            mt.subsec_nanos()
        ));
    }
    if lists == 0 {
        return None;
    }
    Some(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[derive(Serialize, Deserialize)]
struct Resolution {
    fingerprint: String,
    recipe: String,
    set: apt::PackageSet,
}

/// apt resolution, memoised in `cache_dir/.resolved-<flavour>.json` against
/// [`apt_fingerprint`] (apt-cache costs seconds per run here).
fn resolve_cached(
    cache_dir: &Path,
    flavour: KernelFlavour,
) -> Result<apt::PackageSet, TemplateError> {
    let memo = cache_dir.join(format!(".resolved-{}.json", flavour.meta_package()));
    let fp = apt_fingerprint();
    if let Some(fp) = &fp {
        if let Some(r) = fs::read(&memo)
            .ok()
            .and_then(|b| serde_json::from_slice::<Resolution>(&b).ok())
        {
            if &r.fingerprint == fp && r.recipe == RECIPE_VERSION {
                return Ok(r.set);
            }
        }
    }
    let set = apt::resolve(flavour.meta_package())?;
    if let Some(fingerprint) = fp {
        let r = Resolution {
            fingerprint,
            recipe: RECIPE_VERSION.to_string(),
            set: set.clone(),
        };
        if let Ok(b) = serde_json::to_vec_pretty(&r) {
            let tmp = memo.with_extension(format!("tmp{}", std::process::id()));
            if fs::write(&tmp, b).is_ok() {
                let _ = fs::rename(&tmp, &memo);
            }
        }
    }
    Ok(set)
}

/// Builds the template (default options) under `cache_dir/<cache_key>` or
/// reuses a complete one.
pub fn ensure(cache_dir: &Path) -> Result<Template, TemplateError> {
    ensure_status(cache_dir).map(|(t, _)| t)
}

/// [`ensure`] with non-default options (e.g. the generic kernel for e1000/AHCI).
pub fn ensure_with(cache_dir: &Path, opts: &Options) -> Result<Template, TemplateError> {
    ensure_with_status(cache_dir, opts).map(|(t, _)| t)
}

/// Like [`ensure`], also telling whether it built or reused the template.
///
/// Safe to call from several processes at once: an exclusive `flock` on
/// `cache_dir/.lock` serialises them, and an entry is built in a temporary
/// directory and renamed into place only when complete.
pub fn ensure_status(cache_dir: &Path) -> Result<(Template, CacheStatus), TemplateError> {
    ensure_with_status(cache_dir, &Options::default())
}

/// [`ensure_with`] plus whether it built or reused the template.
pub fn ensure_with_status(
    cache_dir: &Path,
    opts: &Options,
) -> Result<(Template, CacheStatus), TemplateError> {
    let flavour = opts.kernel;
    fs::create_dir_all(cache_dir).map_err(|e| io_err(cache_dir, e))?;
    let cache_dir = fs::canonicalize(cache_dir).map_err(|e| io_err(cache_dir, e))?;
    let lock_path = cache_dir.join(".lock");
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| io_err(&lock_path, e))?;
    lock.lock().map_err(|e| io_err(&lock_path, e))?;

    let set = match resolve_cached(&cache_dir, flavour) {
        Ok(s) => s,
        Err(e) => {
            // Offline and apt lists gone: a previously built template still serves.
            return match latest_complete(&cache_dir, flavour) {
                Some(t) => Ok((t, CacheStatus::Cached)),
                None => Err(e),
            };
        }
    };
    let key = cache_key(&set.versions);
    let dest = cache_dir.join(&key);
    if let Some((t, _)) = load_complete(&dest, flavour) {
        return Ok((t, CacheStatus::Cached));
    }

    // We hold the lock, so any build directory left over is a dead builder's.
    for e in fs::read_dir(&cache_dir)
        .map_err(|e| io_err(&cache_dir, e))?
        .flatten()
    {
        if e.file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(".build-"))
        {
            let _ = fs::remove_dir_all(e.path());
        }
    }
    let started = Instant::now();
    let tmp = cache_dir.join(format!(".build-{key}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let out = tmp.join("out");
    let work = tmp.join("work");
    fs::create_dir_all(&out).map_err(|e| io_err(&out, e))?;
    fs::create_dir_all(&work).map_err(|e| io_err(&work, e))?;
    let result = (|| {
        let built = build::build(&set, &work, &out)?;
        let manifest = Manifest {
            recipe: RECIPE_VERSION.to_string(),
            cache_key: key.clone(),
            flavour,
            kernel_package: set.kernel_pkg.clone(),
            kernel_version: built.kernel_version,
            packages: set.versions.clone(),
            modules: built.modules,
            libraries: built.libs,
            cmdline: build::direct_cmdline(),
            build_seconds: started.elapsed().as_secs_f64(),
        };
        let mj = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| TemplateError::Build(e.to_string()))?;
        let mp = out.join(MANIFEST);
        fs::write(&mp, mj).map_err(|e| io_err(&mp, e))?;
        if dest.exists() {
            // An incomplete leftover (e.g. a crash in an older version).
            fs::remove_dir_all(&dest).map_err(|e| io_err(&dest, e))?;
        }
        fs::rename(&out, &dest).map_err(|e| io_err(&dest, e))
    })();
    let _ = fs::remove_dir_all(&tmp);
    result?;
    let (t, _) = load_complete(&dest, flavour)
        .ok_or_else(|| TemplateError::Build("built entry is incomplete".into()))?;
    Ok((t, CacheStatus::Built))
}

/// Reads the manifest of a template returned by [`ensure`].
pub fn manifest(t: &Template) -> Result<Manifest, TemplateError> {
    let dir = t.bios_disk.parent().unwrap_or(Path::new("."));
    let p = dir.join(MANIFEST);
    let b = fs::read(&p).map_err(|e| io_err(&p, e))?;
    serde_json::from_slice(&b).map_err(|e| TemplateError::Build(format!("{}: {e}", p.display())))
}

/// Removes cache entries other than `keep` (keys of templates still wanted,
/// e.g. from [`ensure`]) along with leftover build directories. Returns the
/// removed directories. Entries are only ever superseded when package versions
/// or the recipe change, so this is an explicit maintenance step, never
/// automatic: a running test may still hold an older entry's paths.
pub fn prune(cache_dir: &Path, keep: &[&str]) -> Result<Vec<PathBuf>, TemplateError> {
    let lock_path = cache_dir.join(".lock");
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| io_err(&lock_path, e))?;
    lock.lock().map_err(|e| io_err(&lock_path, e))?;
    let mut removed = Vec::new();
    for e in fs::read_dir(cache_dir)
        .map_err(|e| io_err(cache_dir, e))?
        .flatten()
    {
        let p = e.path();
        let Some(name) = p.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
            continue;
        };
        let stale_build = name.starts_with(".build-");
        let old_entry = !name.starts_with('.') && p.is_dir() && !keep.contains(&name.as_str());
        if stale_build || old_entry {
            fs::remove_dir_all(&p).map_err(|e| io_err(&p, e))?;
            removed.push(p);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_keeps_named_entries_and_drops_the_rest() {
        let d = tempfile::tempdir().unwrap();
        for n in ["keepme", "old1", ".build-x-1", ".resolved-a.json"] {
            if n.ends_with(".json") {
                fs::write(d.path().join(n), b"{}").unwrap();
            } else {
                fs::create_dir(d.path().join(n)).unwrap();
            }
        }
        let removed = prune(d.path(), &["keepme"]).unwrap();
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(d.path().join("keepme").is_dir());
        assert!(!d.path().join("old1").exists());
        assert!(!d.path().join(".build-x-1").exists());
        assert!(d.path().join(".resolved-a.json").exists());
    }

    #[test]
    fn cache_key_depends_on_versions() {
        let mut a = BTreeMap::new();
        a.insert("busybox-static".to_string(), "1".to_string());
        let k1 = cache_key(&a);
        assert_eq!(k1.len(), 16);
        assert_eq!(k1, cache_key(&a));
        a.insert("busybox-static".to_string(), "2".to_string());
        assert_ne!(k1, cache_key(&a));
    }
}
