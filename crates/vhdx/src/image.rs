//! Format-specific operations: reparent, resize, compact, check, allocation.

use crate::VhdxFile;
use fv_vdisk_core::{AllocationStats, CheckReport, DiskError, Image, ParentSpec, Progress, Result};

impl Image for VhdxFile {
    fn set_parent(&self, _parent: &ParentSpec) -> Result<()> {
        Err(DiskError::Unsupported { path: self.io.path.clone(), what: "set_parent".into() })
    }
    fn resize(&self, _new_size: u64) -> Result<()> {
        Err(DiskError::Unsupported { path: self.io.path.clone(), what: "resize".into() })
    }
    fn compact(&self, _progress: Progress<'_>) -> Result<u64> {
        Ok(0)
    }
    fn check(&self, _repair: bool) -> Result<CheckReport> {
        Ok(CheckReport::default())
    }
    fn allocation(&self) -> Result<AllocationStats> {
        Ok(AllocationStats::default())
    }
}
