use crate::{Layer, LayerIdentity, ParentLocator, Result};
use serde::{Deserialize, Serialize};

/// How to create a new image file.
#[derive(Debug, Clone)]
pub struct CreateSpec {
    pub virtual_size: u64,
    pub kind: crate::DiskKind,
    /// 0 = the format's default (VHD 2 MiB, VHDX 32 MiB dynamic / 2 MiB differencing).
    pub block_size: u32,
    /// 512 or 4096 (VHDX only; VHD is always 512).
    pub logical_sector_size: u32,
    /// 512 or 4096.
    pub physical_sector_size: u32,
    /// Required for differencing disks.
    pub parent: Option<ParentSpec>,
}

/// Everything a child records about its parent at creation or reconnection.
#[derive(Debug, Clone)]
pub struct ParentSpec {
    pub identity: LayerIdentity,
    pub virtual_size: u64,
    /// Path relative to the child's directory (e.g. "base.vhdx" or "../base.vhdx").
    pub relative_path: String,
    /// Absolute host path of the parent.
    pub absolute_path: String,
    /// VHD: the parent's disk id (footer unique id); VHDX: parent's virtual disk id.
    pub parent_disk_id: Option<uuid::Uuid>,
}

/// Result of a structural check.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CheckReport {
    /// Problems that make the image unsafe to use.
    pub errors: Vec<String>,
    /// Problems that do not lose data (e.g. leaked space, stale second header).
    pub warnings: Vec<String>,
    /// What `--repair` fixed.
    pub repaired: Vec<String>,
    /// VHDX: the log held entries that needed replay when opened.
    pub log_replayed: bool,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Allocation figures for `inspect`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AllocationStats {
    pub file_size: u64,
    pub total_blocks: u64,
    /// Blocks holding data (fully or partially present).
    pub allocated_blocks: u64,
    /// Blocks in an explicit zero state (VHDX).
    pub zero_blocks: u64,
    /// Percent of allocated blocks not stored in virtual order (0 = contiguous).
    pub fragmentation_percent: f64,
}

/// Progress callback: (done, total) in bytes or blocks; returning false cancels.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64) -> bool;

/// Format-specific operations on one image file, beyond reading and writing.
pub trait Image: Layer {
    /// Point a differencing image at a (moved or replaced) parent. Durable when it
    /// returns; crash-safe (VHDX through the log, VHD by ordered writes).
    fn set_parent(&self, parent: &ParentSpec) -> Result<()>;
    /// Change the virtual size. Shrinking is refused unless the cut-off range holds
    /// no data.
    fn resize(&self, new_size: u64) -> Result<()>;
    /// Reclaim space: drop blocks that are all zero (base) or unused, and shorten the
    /// file. Returns the bytes the file shrank by.
    fn compact(&self, progress: Progress<'_>) -> Result<u64>;
    /// Verify structure (checksums, overlaps, ranges, log state); repair what is safe.
    fn check(&self, repair: bool) -> Result<CheckReport>;
    fn allocation(&self) -> Result<AllocationStats>;
    /// The locator as stored, for `inspect`.
    fn locator(&self) -> Option<ParentLocator> {
        self.parent_locator().cloned()
    }
}
