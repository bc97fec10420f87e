use crate::{
    check_range, DiskError, DiskFormat, DiskKind, Extent, ExtentState, Layer, LayerIdentity,
    LayerInfo, ParentLocator, Result,
};
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A raw image file: every byte is data. Used for conversion sources/targets and
/// for tests of consumers (NBD, vhost-user-blk) independent of the formats.
pub struct RawLayer {
    file: File,
    path: PathBuf,
    info: LayerInfo,
    read_only: bool,
}

impl RawLayer {
    pub fn open(path: &Path, read_only: bool) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| DiskError::io("open", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| DiskError::io("stat", path, e))?
            .len();
        Ok(RawLayer {
            file,
            path: path.to_path_buf(),
            info: LayerInfo {
                format: DiskFormat::Raw,
                kind: DiskKind::Fixed,
                virtual_size: len,
                block_size: 0,
                logical_sector_size: 512,
                physical_sector_size: 512,
                disk_id: None,
                identity: LayerIdentity::None,
            },
            read_only,
        })
    }

    pub fn create(path: &Path, size: u64) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| DiskError::io("create", path, e))?;
        file.set_len(size)
            .map_err(|e| DiskError::io("truncate", path, e))?;
        drop(file);
        Self::open(path, false)
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(DiskError::ReadOnly {
                path: self.path.clone(),
            });
        }
        Ok(())
    }
}

impl Layer for RawLayer {
    fn info(&self) -> &LayerInfo {
        &self.info
    }
    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }
    fn parent_locator(&self) -> Option<&ParentLocator> {
        None
    }
    fn read_layer(&self, offset: u64, buf: &mut [u8], _absent: &mut Vec<Range<u64>>) -> Result<()> {
        check_range(offset, buf.len() as u64, self.info.virtual_size)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| DiskError::io("read", &self.path, e))
    }
    fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.writable()?;
        check_range(offset, buf.len() as u64, self.info.virtual_size)?;
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| DiskError::io("write", &self.path, e))
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.writable()?;
        check_range(offset, len, self.info.virtual_size)?;
        let zero = vec![0u8; (len.min(1 << 20)) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zero.len() as u64) as usize;
            self.file
                .write_all_at(&zero[..n], offset + done)
                .map_err(|e| DiskError::io("write", &self.path, e))?;
            done += n as u64;
        }
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len)
    }
    fn flush(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| DiskError::io("fsync", &self.path, e))
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(offset, len, self.info.virtual_size)?;
        Ok(vec![Extent {
            offset,
            length: len,
            state: ExtentState::Data,
        }])
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
}
