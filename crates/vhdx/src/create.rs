//! Creating new images. The file is built under a temporary name with the headers
//! written last, made durable, then linked to the final name (which must not exist),
//! so a crash never leaves a half-made image under the requested name.

use crate::format::*;
use crate::Geo;
use fv_vdisk_core::{CreateSpec, DiskError, DiskKind, LayerIdentity, ParentSpec, Result};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use uuid::Uuid;

pub(crate) const LOG_OFFSET: u64 = MIB;
pub(crate) const LOG_LENGTH: u64 = MIB;
pub(crate) const META_OFFSET: u64 = 2 * MIB;
pub(crate) const META_LENGTH: u64 = MIB;
pub(crate) const BAT_OFFSET: u64 = 3 * MIB;

/// Removes the temporary file unless disarmed.
struct TempGuard(Option<PathBuf>);
impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Parent locator key/values for `parent`.
pub(crate) fn locator_kv(parent: &ParentSpec) -> Result<Vec<(String, String)>> {
    let LayerIdentity::Vhdx { data_write_guid } = &parent.identity else {
        return Err(DiskError::InvalidArgument(
            "a VHDX differencing disk needs a VHDX parent (its DataWriteGuid)".into(),
        ));
    };
    let mut kv = vec![("parent_linkage".to_string(), guid_text(data_write_guid))];
    if !parent.relative_path.is_empty() {
        kv.push((
            "relative_path".to_string(),
            parent.relative_path.replace('/', "\\"),
        ));
    }
    if !parent.absolute_path.is_empty() {
        // A POSIX path is stored with '\\' separators: readers of this key (libvhdi,
        // Windows tools) split on '\\'; we turn it back into the POSIX path on read.
        let p = if parent.absolute_path.starts_with('/') {
            parent.absolute_path.replace('/', "\\")
        } else {
            parent.absolute_path.clone()
        };
        kv.push(("absolute_win32_path".to_string(), p));
    }
    Ok(kv)
}

/// Metadata table + items for a new image.
pub(crate) fn metadata_region(
    geo: &Geo,
    disk_id: &Uuid,
    locator: Option<&[u8]>,
) -> (Vec<MetaEntry>, Vec<(u64, Vec<u8>)>) {
    let flags = ((geo.leave_allocated as u32) & 1) | ((geo.has_parent as u32) << 1);
    let mut fp = (geo.block_size as u32).to_le_bytes().to_vec();
    fp.extend_from_slice(&flags.to_le_bytes());
    let mut items: Vec<(Uuid, bool, Vec<u8>)> = vec![
        (FILE_PARAMETERS, false, fp),
        (
            VIRTUAL_DISK_SIZE,
            true,
            geo.virtual_size.to_le_bytes().to_vec(),
        ),
        (PAGE83_DATA, true, disk_id.to_bytes_le().to_vec()),
        (
            LOGICAL_SECTOR_SIZE,
            true,
            (geo.lss as u32).to_le_bytes().to_vec(),
        ),
        (PHYSICAL_SECTOR_SIZE, true, geo.pss.to_le_bytes().to_vec()),
    ];
    if let Some(l) = locator {
        items.push((PARENT_LOCATOR, false, l.to_vec()));
    }
    let mut entries = Vec::new();
    let mut out = Vec::new();
    let mut off = METADATA_TABLE_SIZE as u64;
    for (id, vd, data) in items {
        entries.push(MetaEntry {
            item_id: id,
            offset: off as u32,
            length: data.len() as u32,
            is_user: false,
            is_virtual_disk: vd,
            is_required: true,
        });
        let len = data.len() as u64;
        out.push((off, data));
        off += len.div_ceil(8) * 8;
    }
    (entries, out)
}

fn creator_bytes() -> Vec<u8> {
    let mut b = vec![0u8; 64 * 1024];
    b[..8].copy_from_slice(FILE_SIGNATURE);
    let name: Vec<u8> = "Ferrovisor fv-vhdx"
        .encode_utf16()
        .flat_map(|u| u.to_le_bytes())
        .collect();
    b[8..8 + name.len()].copy_from_slice(&name);
    b
}

pub(crate) fn create(path: &Path, spec: &CreateSpec) -> Result<()> {
    let bad = |m: String| DiskError::InvalidArgument(m);
    let lss: u64 = match spec.logical_sector_size {
        0 | 512 => 512,
        4096 => 4096,
        x => return Err(bad(format!("logical sector size {x} (512 or 4096)"))),
    };
    let pss: u32 = match spec.physical_sector_size {
        0 | 512 => 512,
        4096 => 4096,
        x => return Err(bad(format!("physical sector size {x} (512 or 4096)"))),
    };
    let diff = spec.kind == DiskKind::Differencing;
    let parent = match (&spec.parent, diff) {
        (Some(p), true) => Some(p),
        (None, true) => return Err(bad("a differencing disk needs a parent".into())),
        (Some(_), false) => return Err(bad("only differencing disks have a parent".into())),
        (None, false) => None,
    };
    let virtual_size = match parent {
        Some(p) if spec.virtual_size == 0 => p.virtual_size,
        Some(p) if spec.virtual_size != p.virtual_size => {
            return Err(bad(format!(
                "child size {} differs from the parent size {}",
                spec.virtual_size, p.virtual_size
            )))
        }
        _ => spec.virtual_size,
    };
    if virtual_size == 0 || virtual_size % lss != 0 || virtual_size > MAX_VIRTUAL_SIZE {
        return Err(bad(format!(
            "virtual size {virtual_size} must be a non-zero multiple of {lss} up to 64 TiB"
        )));
    }
    let block_size = match spec.block_size {
        0 if diff => 2 * MIB,
        0 => 32 * MIB,
        b => b as u64,
    };
    if !(MIB..=256 * MIB).contains(&block_size) || !block_size.is_power_of_two() {
        return Err(bad(format!(
            "block size {block_size} must be a power of two from 1 MiB to 256 MiB"
        )));
    }
    let fixed = spec.kind == DiskKind::Fixed;
    let geo = Geo::new(block_size, lss, pss, virtual_size, diff, fixed);
    let locator = parent
        .map(locator_kv)
        .transpose()?
        .map(|kv| parent_locator_bytes(&kv));

    let entries = geo.required_entries();
    let bat_length = (entries * 8).div_ceil(MIB).max(1) * MIB;
    let data_start = BAT_OFFSET + bat_length;

    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| bad(format!("{} has no file name", path.display())))?
        .to_string_lossy()
        .into_owned();
    if path.exists() {
        return Err(DiskError::io(
            "create",
            path,
            std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        ));
    }
    let tmp = dir.join(format!(".{name}.{}.tmp", Uuid::new_v4().simple()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| DiskError::io("create", &tmp, e))?;
    let mut guard = TempGuard(Some(tmp.clone()));
    let w = |f: &File, off: u64, b: &[u8]| {
        f.write_all_at(b, off)
            .map_err(|e| DiskError::io("write", &tmp, e))
    };

    w(&file, 0, &creator_bytes())?;
    let regions = vec![
        RegionEntry {
            guid: BAT_GUID,
            file_offset: BAT_OFFSET,
            length: bat_length as u32,
            required: true,
        },
        RegionEntry {
            guid: METADATA_GUID,
            file_offset: META_OFFSET,
            length: META_LENGTH as u32,
            required: true,
        },
    ];
    let rt = region_table_bytes(&regions);
    for off in REGION_OFFSETS {
        w(&file, off, &rt)?;
    }
    let disk_id = Uuid::new_v4();
    let (mentries, items) = metadata_region(&geo, &disk_id, locator.as_deref());
    w(&file, META_OFFSET, &metadata_table_bytes(&mentries))?;
    for (off, data) in items {
        w(&file, META_OFFSET + off, &data)?;
    }
    let mut end = data_start;
    if fixed {
        // Every block present, in virtual order (LeaveBlockAllocated).
        let mut bat = vec![0u8; (entries * 8) as usize];
        for blk in 0..geo.data_blocks() {
            let e = bat_entry(PAYLOAD_FULLY_PRESENT, data_start + blk * block_size);
            put(&mut bat, geo.bat_index(blk) * 8, &e.to_le_bytes());
        }
        w(&file, BAT_OFFSET, &bat)?;
        end = data_start + geo.data_blocks() * block_size;
    }
    file.set_len(end)
        .map_err(|e| DiskError::io("truncate", &tmp, e))?;
    file.sync_all()
        .map_err(|e| DiskError::io("fsync", &tmp, e))?;
    // Headers last: until they are written the file is not a valid image.
    let (fw, dw) = (Uuid::new_v4(), Uuid::new_v4());
    for (i, off) in HEADER_OFFSETS.iter().enumerate() {
        let h = Header {
            sequence: i as u64 + 1,
            file_write_guid: fw,
            data_write_guid: dw,
            log_guid: Uuid::nil(),
            log_version: 0,
            version: 1,
            log_length: LOG_LENGTH as u32,
            log_offset: LOG_OFFSET,
        };
        w(&file, *off, &h.to_bytes())?;
    }
    file.sync_all()
        .map_err(|e| DiskError::io("fsync", &tmp, e))?;
    drop(file);
    // Link fails if the name appeared meanwhile: never clobber an existing file.
    std::fs::hard_link(&tmp, path).map_err(|e| DiskError::io("create", path, e))?;
    drop(guard.0.take());
    let _ = std::fs::remove_file(&tmp);
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
