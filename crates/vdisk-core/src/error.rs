use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, DiskError>;

/// Every way a disk operation can fail. Variants name the file and the field so the
/// CLI can print one clear line.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid {format} image: {reason}")]
    Corrupt {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },
    #[error("{path}: unrecognised image format")]
    UnknownFormat { path: PathBuf },
    #[error("{path}: unsupported: {what}")]
    Unsupported { path: PathBuf, what: String },
    #[error("range {offset}+{len} is outside the disk ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("offset {offset} or length {len} is not a multiple of the {sector}-byte sector")]
    Unaligned { offset: u64, len: u64, sector: u32 },
    #[error("{path}: opened read-only")]
    ReadOnly { path: PathBuf },
    #[error("{path}: the log is dirty and needs replay: run `fv vhd check --repair` (or open the image writable)")]
    DirtyLog { path: PathBuf },
    /// Structural damage found at open (e.g. a BAT entry pointing into the headers):
    /// a writable open is refused so guest writes cannot destroy the metadata.
    #[error("{path}: damaged {format} image, refusing a writable open: {damage}; {remedy}")]
    Damaged {
        path: PathBuf,
        format: &'static str,
        damage: String,
        remedy: String,
    },
    /// A read of a block whose allocation entry is damaged (read-only opens serve the
    /// sound blocks and refuse these).
    #[error("{path}: guest offset {offset} lies in damaged block {block}: {reason}; run `fv vhd check --repair`")]
    DamagedBlock {
        path: PathBuf,
        offset: u64,
        block: u64,
        reason: String,
    },
    #[error("broken chain: {child} -> {parent}: {reason}")]
    BrokenChain {
        child: PathBuf,
        parent: String,
        reason: String,
    },
    #[error("cyclic chain: {path} appears twice")]
    CyclicChain { path: PathBuf },
    #[error("{child}: parent {parent} is outside the allowed directories")]
    ParentNotAllowed { child: PathBuf, parent: PathBuf },
    #[error("{child}: parent not found (tried {tried})")]
    ParentNotFound { child: PathBuf, tried: String },
    #[error("not enough free space on {path}: need {needed} bytes, {available} available")]
    NoSpace {
        path: PathBuf,
        needed: u64,
        available: u64,
    },
    #[error("{path}: {reason}")]
    Refused { path: PathBuf, reason: String },
    /// Another open (ours or QEMU's) holds the image's lock bytes in a way that
    /// excludes this open.
    #[error("{path}: in use by {holder}; cannot open it {wanted}")]
    Locked {
        path: PathBuf,
        /// The holders, as one phrase ("pid 42 (qemu-nbd) holding it read-write").
        holder: String,
        holders: Vec<crate::LockHolder>,
        /// "read-write" or "read-only".
        wanted: &'static str,
    },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("cancelled")]
    Cancelled,
}

impl DiskError {
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DiskError::Io {
            op,
            path: path.into(),
            source,
        }
    }
    pub fn corrupt(
        path: impl Into<PathBuf>,
        format: &'static str,
        reason: impl Into<String>,
    ) -> Self {
        DiskError::Corrupt {
            path: path.into(),
            format,
            reason: reason.into(),
        }
    }
}
