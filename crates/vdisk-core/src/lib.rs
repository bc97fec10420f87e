//! The contract shared by every virtual-disk format and consumer.
//!
//! A disk as a guest sees it is a [`BlockDevice`]. Image files are [`Layer`]s; a
//! differencing chain stacks layers, and a read falls through a layer wherever that
//! layer does not hold the data ("absent" ranges), down to the base, below which
//! everything reads as zero. Formats therefore never open their parents themselves:
//! the chain (crate `fv-vdisk`) resolves and verifies parents under a [`PathPolicy`].
#![forbid(unsafe_code)]

mod error;
mod image;
mod lock;
mod policy;
mod raw;
mod size;

pub use error::{DiskError, Result};
pub use image::{AllocationStats, CheckReport, CreateSpec, Image, ParentSpec, Progress};
pub use lock::{find_holders, ImageLock, LockHolder, LockMode};
pub use policy::PathPolicy;
pub use raw::RawLayer;
pub use size::{format_size, parse_size};

use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::path::PathBuf;
use uuid::Uuid;

/// On-disk format of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Vhd,
    Vhdx,
}

/// Hyper-V's disk types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskKind {
    Fixed,
    Dynamic,
    Differencing,
}

/// Static facts about one layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerInfo {
    pub format: DiskFormat,
    pub kind: DiskKind,
    pub virtual_size: u64,
    /// Allocation unit: VHD/VHDX block size; raw reports 0.
    pub block_size: u32,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    /// VHD: footer unique id. VHDX: virtual disk id (page 83 id).
    pub disk_id: Option<Uuid>,
    /// What a child records to prove it was made from this exact parent state.
    pub identity: LayerIdentity,
}

/// The identity a child stores for its parent, checked when a chain is opened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LayerIdentity {
    /// Raw files carry no identity.
    None,
    /// VHD: the parent's footer unique id and modification timestamp
    /// (seconds since 2000-01-01 UTC).
    Vhd { unique_id: Uuid, timestamp: u32 },
    /// VHDX: the parent's DataWriteGuid (parent_linkage).
    Vhdx { data_write_guid: Uuid },
}

/// Where a differencing layer says its parent is, as recorded in the image.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ParentLocator {
    /// Relative path as stored (Windows separators are normalised to '/').
    pub relative_path: Option<String>,
    /// Absolute path as stored (Windows or POSIX form).
    pub absolute_path: Option<String>,
    /// VHDX volume_path, kept for round-tripping.
    pub volume_path: Option<String>,
    /// The identity the parent must have.
    pub expected: Option<LayerIdentity>,
    /// VHD: parent unicode name (informational).
    pub parent_name: Option<String>,
}

/// Allocation state of a byte range in a layer or device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExtentState {
    /// Data stored in this layer.
    Data,
    /// Explicitly zero in this layer (hides any parent data); no storage used.
    Zero,
    /// Not held by this layer: a chain falls through to the parent, a base reads zero.
    Absent,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub state: ExtentState,
}

/// One image file. Implementations must be safe for concurrent readers alongside a
/// single writer (`&self` everywhere; interior locking).
pub trait Layer: Send + Sync {
    fn info(&self) -> &LayerInfo;

    /// The file this layer lives in, if any.
    fn path(&self) -> Option<&std::path::Path>;

    /// Parent locator of a differencing layer; `None` for base layers.
    fn parent_locator(&self) -> Option<&ParentLocator>;

    /// Read `buf.len()` bytes at `offset` from this layer only. Every byte range this
    /// layer does not hold is appended to `absent` (absolute byte offsets, in
    /// ascending order, sector aligned); the bytes of `buf` in those ranges are
    /// unspecified. Zero-state ranges are filled with zeros and are NOT absent.
    fn read_layer(&self, offset: u64, buf: &mut [u8], absent: &mut Vec<Range<u64>>) -> Result<()>;

    /// Write `buf` at `offset` into this layer, allocating as needed. After this
    /// returns, reads of the range come from this layer.
    fn write(&self, offset: u64, buf: &[u8]) -> Result<()>;

    /// Make the range read as zeros without allocating data where the format allows.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;

    /// Unmap the range: base layers make it read as zero, differencing layers make it
    /// transparent (absent) again. Partial blocks may be left allocated (the range
    /// must still read as it did for a base, i.e. zero).
    fn discard(&self, offset: u64, len: u64) -> Result<()>;

    /// Make every completed write durable (data and metadata), surviving power loss.
    fn flush(&self) -> Result<()>;

    /// Allocation map of the range in this layer, merged into maximal extents.
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>>;

    fn read_only(&self) -> bool;
}

/// A whole disk as a guest or an exporter sees it.
pub trait BlockDevice: Send + Sync {
    fn size(&self) -> u64;
    fn logical_sector_size(&self) -> u32;
    fn physical_sector_size(&self) -> u32;
    fn read_only(&self) -> bool;
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()>;
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    fn flush(&self) -> Result<()>;
    /// Allocation map as seen through the whole chain: `Data` where any layer holds
    /// data, `Zero` where the topmost holder says zero, `Absent` where no layer holds
    /// anything (reads zero).
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>>;
    /// A stable identifier (used as virtio-blk serial / NBD description).
    fn id(&self) -> String;
}

/// Check that `[offset, offset+len)` lies inside a device of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DiskError::OutOfRange { offset, len, size }),
    }
}

/// Merge adjacent extents of equal state.
pub fn coalesce(extents: &mut Vec<Extent>) {
    let mut out: Vec<Extent> = Vec::with_capacity(extents.len());
    for e in extents.drain(..) {
        if e.length == 0 {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.state == e.state && last.offset + last.length == e.offset => {
                last.length += e.length
            }
            _ => out.push(e),
        }
    }
    *extents = out;
}

/// Turn an absolute parent path from an image into a host path (accepts Windows
/// `C:\dir\file` forms by keeping only their file name part, which the caller joins).
pub fn normalise_locator_path(p: &str) -> PathBuf {
    PathBuf::from(p.replace('\\', "/"))
}
