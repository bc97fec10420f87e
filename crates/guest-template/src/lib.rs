//! Builds the tiny Debian guest template offline from Debian packages.
//!
//! The template is assembled from `apt-get download` + `dpkg-deb -x` into a
//! staging directory; no root mounts, loop devices or chroots are used.
#![forbid(unsafe_code)]

use serde::Serialize;
use std::path::{Path, PathBuf};

/// Printed on the guest's ttyS0 once it is ready (agent running, /data mounted).
pub const READY_MARKER: &str = "FERROVISOR-GUEST-READY";

/// A built guest template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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

/// Whether [`ensure_status`] built the template or found it cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheStatus {
    Built,
    Cached,
}

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

/// Builds the template under `cache_dir/<cache_key>` or reuses a complete one.
pub fn ensure(cache_dir: &Path) -> Result<Template, TemplateError> {
    ensure_status(cache_dir).map(|(t, _)| t)
}

/// Like [`ensure`], also telling whether it built or reused the template.
pub fn ensure_status(cache_dir: &Path) -> Result<(Template, CacheStatus), TemplateError> {
    let _ = cache_dir;
    Err(TemplateError::Build("not implemented yet".into()))
}
