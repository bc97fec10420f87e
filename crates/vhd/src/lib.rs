//! VHD (Virtual PC / Hyper-V 2008) image format: fixed, dynamic, differencing.
//!
//! Layout written by [`VhdFile::create`] for dynamic/differencing disks:
//! footer copy (0), dynamic header (512), parent locator data (differencing, with
//! slack so a later `set_parent` can write the new locator beside the old one),
//! BAT, then blocks (sector bitmap padded to 512 bytes + data), footer at the end.
#![forbid(unsafe_code)]

pub mod format;

use format::*;
use fv_vdisk_core::{
    check_range, coalesce, AllocationStats, CheckReport, CreateSpec, DiskError, DiskFormat,
    DiskKind, Extent, ExtentState, Image, Layer, LayerIdentity, LayerInfo, ParentLocator,
    ParentSpec, Progress, Result,
};
use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use uuid::Uuid;

const FMT: &str = "VHD";
const DEFAULT_BLOCK: u32 = 2 << 20;
const MIN_CREATE_BLOCK: u32 = 512 << 10;
/// Room reserved per parent locator at creation so `set_parent` can write the new
/// locator into free space before switching the header over to it.
const LOCATOR_SLOT: u64 = 8192;

/// Does this look like a VHD? `last_512` is the file's last 512 bytes (the footer),
/// `first_512` its first (the footer copy of dynamic disks).
pub fn probe(first_512: &[u8], last_512: &[u8]) -> bool {
    last_512.get(..8) == Some(&FOOTER_COOKIE[..]) || first_512.get(..8) == Some(&FOOTER_COOKIE[..])
}

struct Meta {
    footer: Footer,
    header: Option<DynHeader>,
    bat: Vec<u32>,
    /// Sector bitmaps of allocated blocks, loaded on first use. `Arc` so readers can
    /// scan a bitmap without holding the lock while a writer updates a copy.
    bitmaps: HashMap<u32, Arc<Vec<u8>>>,
    dirty_bitmaps: BTreeSet<u32>,
    /// BAT sectors (128 entries each) changed since the last flush.
    dirty_bat: BTreeSet<u32>,
    /// Offset of the footer at the end = where the next block is appended.
    end: u64,
    size: u64,
    /// Footer timestamp already bumped in this session.
    stamped: bool,
    /// The end footer was unreadable and the copy at offset 0 was used.
    footer_missing: bool,
}

/// One VHD file.
pub struct VhdFile {
    path: PathBuf,
    file: File,
    read_only: bool,
    info: LayerInfo,
    locator: Option<ParentLocator>,
    /// Locator entries that could not be read (reported by `check`).
    locator_problems: Vec<String>,
    meta: Mutex<Meta>,
    /// Serialises writers (the contract allows one writer with many readers).
    wlock: Mutex<()>,
}

fn bit(bm: &[u8], i: u64) -> bool {
    let byte = (i / 8) as usize;
    bm.get(byte).is_some_and(|b| b & (0x80 >> (i % 8)) != 0)
}

fn set_bits(bm: &mut [u8], start: u64, n: u64, v: bool) {
    for i in start..start + n {
        if let Some(b) = bm.get_mut((i / 8) as usize) {
            let m = 0x80u8 >> (i % 8);
            if v {
                *b |= m
            } else {
                *b &= !m
            }
        }
    }
}

/// Number of consecutive sectors from `start` (at most `max`) whose bit equals `v`.
fn run_len(bm: &[u8], start: u64, max: u64, v: bool) -> u64 {
    let full = if v { 0xFF } else { 0x00 };
    let mut n = 0;
    while n < max {
        let i = start + n;
        if i.is_multiple_of(8) && max - n >= 8 && bm.get((i / 8) as usize) == Some(&full) {
            n += 8;
            continue;
        }
        if bit(bm, i) != v {
            break;
        }
        n += 1;
    }
    n
}

fn push_range(v: &mut Vec<Range<u64>>, r: Range<u64>) {
    if let Some(last) = v.last_mut() {
        if last.end == r.start {
            last.end = r.end;
            return;
        }
    }
    v.push(r);
}

fn round512(n: u64) -> u64 {
    n.div_ceil(SECTOR) * SECTOR
}

/// Windows form of a relative path: ".\dir\file".
fn windows_relative(rel: &str) -> String {
    let r = rel.replace('/', "\\");
    if r.starts_with(".\\") || r.starts_with("..\\") {
        r
    } else {
        format!(".\\{r}")
    }
}

/// Host form of a stored relative path: '/' separators, no leading "./".
fn host_relative(stored: &str) -> String {
    let s = stored.replace('\\', "/");
    let mut t = s.as_str();
    while let Some(r) = t.strip_prefix("./") {
        t = r;
    }
    t.to_string()
}

impl VhdFile {
    fn corrupt(&self, reason: impl Into<String>) -> DiskError {
        DiskError::corrupt(&self.path, FMT, reason)
    }

    fn pread(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.file
            .read_exact_at(buf, off)
            .map_err(|e| DiskError::io("read", &self.path, e))
    }

    fn pwrite(&self, buf: &[u8], off: u64) -> Result<()> {
        self.file
            .write_all_at(buf, off)
            .map_err(|e| DiskError::io("write", &self.path, e))
    }

    fn sync(&self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|e| DiskError::io("fsync", &self.path, e))
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(DiskError::ReadOnly {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    fn aligned(offset: u64, len: u64) -> Result<()> {
        if !offset.is_multiple_of(SECTOR) || !len.is_multiple_of(SECTOR) {
            return Err(DiskError::Unaligned {
                offset,
                len,
                sector: 512,
            });
        }
        Ok(())
    }

    /// Open an existing VHD. Parents are not opened here (see `fv-vdisk`).
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
        let corrupt = |r: String| DiskError::corrupt(path, FMT, r);
        if len < SECTOR {
            return Err(corrupt(format!(
                "file is {len} bytes, shorter than a footer"
            )));
        }
        let rd = |buf: &mut [u8], off: u64| {
            file.read_exact_at(buf, off)
                .map_err(|e| DiskError::io("read", path, e))
        };
        let mut last = [0u8; 512];
        rd(&mut last, len - SECTOR)?;
        let (footer, footer_missing) = match Footer::parse(&last) {
            Ok(f) => (f, false),
            Err(end_err) => {
                let mut first = [0u8; 512];
                rd(&mut first, 0)?;
                match Footer::parse(&first) {
                    Ok(f) if f.disk_type != DISK_FIXED => (f, true),
                    _ => return Err(corrupt(end_err)),
                }
            }
        };
        let size = footer.current_size;
        let kind = match footer.disk_type {
            DISK_FIXED => DiskKind::Fixed,
            DISK_DYNAMIC => DiskKind::Dynamic,
            _ => DiskKind::Differencing,
        };
        let mut locator = None;
        let mut locator_problems = Vec::new();
        let mut header = None;
        let mut bat = Vec::new();
        let mut end = len - SECTOR;
        if kind == DiskKind::Fixed {
            if size > len - SECTOR {
                return Err(corrupt(format!(
                    "fixed disk of {size} bytes but the file holds only {} data bytes",
                    len - SECTOR
                )));
            }
        } else {
            let hoff = footer.data_offset;
            if hoff % SECTOR != 0 || hoff.checked_add(1024).is_none_or(|e| e > len) {
                return Err(corrupt(format!(
                    "dynamic header offset {hoff} is outside the file"
                )));
            }
            let mut hb = [0u8; 1024];
            rd(&mut hb, hoff)?;
            let h = DynHeader::parse(&hb).map_err(corrupt)?;
            let bs = u64::from(h.block_size);
            let needed = size.div_ceil(bs);
            if needed > u64::from(h.max_table_entries) {
                return Err(corrupt(format!(
                    "BAT has {} entries but {needed} are needed for {size} bytes",
                    h.max_table_entries
                )));
            }
            let bat_len = u64::from(h.max_table_entries) * 4;
            if h.table_offset.checked_add(bat_len).is_none_or(|e| e > len) {
                return Err(corrupt(format!(
                    "BAT at {} runs past the end of the file",
                    h.table_offset
                )));
            }
            let mut raw = vec![0u8; bat_len as usize];
            rd(&mut raw, h.table_offset)?;
            bat = raw
                .chunks_exact(4)
                .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let bitmap_len = round512(bs / SECTOR / 8);
            let block_total = bitmap_len + bs;
            let mut max_end = round512(len);
            for (i, &e) in bat.iter().enumerate().take(needed as usize) {
                if e == BAT_UNUSED {
                    continue;
                }
                let start = u64::from(e) * SECTOR;
                let bend = start + block_total;
                if start < hoff + 1024 && start + block_total > hoff {
                    return Err(corrupt(format!("block {i} overlaps the dynamic header")));
                }
                if !footer_missing && bend > len - SECTOR {
                    return Err(corrupt(format!(
                        "block {i} at {start} extends past the footer at {}",
                        len - SECTOR
                    )));
                }
                max_end = max_end.max(bend);
            }
            if footer_missing {
                end = max_end.max(round512(h.table_offset + bat_len));
            }
            if kind == DiskKind::Differencing {
                let mut loc = ParentLocator {
                    expected: Some(LayerIdentity::Vhd {
                        unique_id: h.parent_id,
                        timestamp: h.parent_timestamp,
                    }),
                    parent_name: Some(String::from_utf16_lossy(&h.parent_name)),
                    ..Default::default()
                };
                for (i, l) in h.locators.iter().enumerate() {
                    if l.code == 0 {
                        continue;
                    }
                    if l.data_len == 0 || l.data_len > MAX_LOCATOR_LEN {
                        locator_problems.push(format!("locator {i}: bad length {}", l.data_len));
                        continue;
                    }
                    if l.data_offset
                        .checked_add(u64::from(l.data_len))
                        .is_none_or(|e| e > len)
                    {
                        locator_problems.push(format!("locator {i}: data outside the file"));
                        continue;
                    }
                    let mut d = vec![0u8; l.data_len as usize];
                    rd(&mut d, l.data_offset)?;
                    let Some(s) = decode_locator(l.code, &d) else {
                        continue;
                    };
                    if s.is_empty() {
                        continue;
                    }
                    match l.code {
                        PLAT_W2RU | PLAT_WI2R => {
                            if loc.relative_path.is_none() {
                                loc.relative_path = Some(host_relative(&s))
                            }
                        }
                        _ => {
                            if loc.absolute_path.is_none() {
                                loc.absolute_path = Some(s)
                            }
                        }
                    }
                }
                locator = Some(loc);
            }
            header = Some(h);
        }
        let info = LayerInfo {
            format: DiskFormat::Vhd,
            kind,
            virtual_size: size,
            block_size: header.as_ref().map_or(0, |h| h.block_size),
            logical_sector_size: 512,
            physical_sector_size: 512,
            disk_id: Some(footer.unique_id),
            identity: LayerIdentity::Vhd {
                unique_id: footer.unique_id,
                timestamp: footer.timestamp,
            },
        };
        Ok(VhdFile {
            path: path.to_path_buf(),
            file,
            read_only,
            info,
            locator,
            locator_problems,
            meta: Mutex::new(Meta {
                footer,
                header,
                bat,
                bitmaps: HashMap::new(),
                dirty_bitmaps: BTreeSet::new(),
                dirty_bat: BTreeSet::new(),
                end,
                size,
                stamped: false,
                footer_missing,
            }),
            wlock: Mutex::new(()),
        })
    }

    /// Create a new VHD (fails if the file exists) and open it writable.
    pub fn create(path: &Path, spec: &CreateSpec) -> Result<Self> {
        let bad = |s: String| Err(DiskError::InvalidArgument(s));
        let mut size = spec.virtual_size;
        if let (DiskKind::Differencing, Some(p)) = (spec.kind, &spec.parent) {
            if size == 0 {
                size = p.virtual_size;
            }
            if size != p.virtual_size {
                return bad(format!(
                    "a differencing VHD must have its parent's size ({} bytes), not {size}",
                    p.virtual_size
                ));
            }
        }
        if size == 0 || !size.is_multiple_of(SECTOR) {
            return bad(format!(
                "VHD size {size} must be a non-zero multiple of 512"
            ));
        }
        if size > MAX_CREATE_SIZE {
            return bad(format!(
                "VHD size {size} exceeds the format's 2040 GiB limit"
            ));
        }
        if !matches!(spec.logical_sector_size, 0 | 512) {
            return Err(DiskError::Unsupported {
                path: path.to_path_buf(),
                what: format!(
                    "VHD sectors are 512 bytes, not {}",
                    spec.logical_sector_size
                ),
            });
        }
        let block = if spec.block_size == 0 {
            DEFAULT_BLOCK
        } else {
            spec.block_size
        };
        if !block.is_power_of_two() || !(MIN_CREATE_BLOCK..=MAX_BLOCK).contains(&block) {
            return bad(format!(
                "VHD block size {block} must be a power of two from 512 KiB to 256 MiB"
            ));
        }
        let disk_type = match spec.kind {
            DiskKind::Fixed => DISK_FIXED,
            DiskKind::Dynamic => DISK_DYNAMIC,
            DiskKind::Differencing => DISK_DIFFERENCING,
        };
        let parent = match (spec.kind, &spec.parent) {
            (DiskKind::Differencing, None) => {
                return bad("a differencing disk needs a parent".into())
            }
            (DiskKind::Differencing, Some(p)) => Some(p),
            _ => None,
        };
        let mut footer = Footer::new(size, disk_type);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| DiskError::io("create", path, e))?;
        let w = |buf: &[u8], off: u64| {
            file.write_all_at(buf, off)
                .map_err(|e| DiskError::io("write", path, e))
        };
        let result = (|| {
            if disk_type == DISK_FIXED {
                file.set_len(size)
                    .map_err(|e| DiskError::io("truncate", path, e))?;
                w(&footer.to_bytes(), size)?;
            } else {
                let entries = size.div_ceil(u64::from(block));
                let mut header = DynHeader {
                    data_offset: u64::MAX,
                    table_offset: 0,
                    version: 0x0001_0000,
                    max_table_entries: entries as u32,
                    block_size: block,
                    parent_id: Uuid::nil(),
                    parent_timestamp: 0,
                    parent_name: Vec::new(),
                    locators: Default::default(),
                };
                let mut next = 1536u64;
                if let Some(p) = parent {
                    let datas = apply_parent(&mut header, p)?;
                    for (i, d) in datas.iter().enumerate() {
                        let slot = (2 * round512(d.len() as u64)).max(LOCATOR_SLOT);
                        header.locators[i].data_offset = next;
                        w(d, next)?;
                        next += slot;
                    }
                }
                header.table_offset = next;
                let bat_len = round512(entries * 4);
                w(&vec![0xFFu8; bat_len as usize], next)?;
                let end = next + bat_len;
                footer.data_offset = 512;
                w(&footer.to_bytes(), 0)?;
                w(&header.to_bytes(), 512)?;
                w(&footer.to_bytes(), end)?;
            }
            file.sync_all().map_err(|e| DiskError::io("fsync", path, e))
        })();
        if let Err(e) = result {
            drop(file);
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        drop(file);
        Self::open(path, false)
    }

    fn geometry(m: &Meta) -> Option<(u64, u64)> {
        m.header.as_ref().map(|h| {
            let bs = u64::from(h.block_size);
            (bs, round512(bs / SECTOR / 8))
        })
    }

    fn load_bitmap(&self, m: &mut Meta, bi: u32) -> Result<Arc<Vec<u8>>> {
        if let Some(b) = m.bitmaps.get(&bi) {
            return Ok(b.clone());
        }
        let (_, bml) = Self::geometry(m).ok_or_else(|| self.corrupt("no dynamic header"))?;
        let e = *m
            .bat
            .get(bi as usize)
            .ok_or_else(|| self.corrupt("block index out of range"))?;
        let mut b = vec![0u8; bml as usize];
        self.pread(&mut b, u64::from(e) * SECTOR)?;
        let a = Arc::new(b);
        m.bitmaps.insert(bi, a.clone());
        Ok(a)
    }

    /// Bump the footer timestamp once per writable session, so children made from the
    /// old state no longer verify against this disk.
    fn stamp(&self, m: &mut Meta) -> Result<()> {
        if m.stamped {
            return Ok(());
        }
        m.footer.timestamp = now_vhd().max(m.footer.timestamp.saturating_add(1));
        self.write_footers(m)?;
        self.sync()?;
        m.stamped = true;
        Ok(())
    }

    fn write_footers(&self, m: &Meta) -> Result<()> {
        let b = m.footer.to_bytes();
        self.pwrite(&b, m.end)?;
        if m.header.is_some() {
            self.pwrite(&b, 0)?;
        }
        Ok(())
    }

    /// Append `len` bytes of space at the end: the footer is written after the new
    /// space first, then the old footer's sector is overwritten by `first` (the
    /// first bytes of the new space), so the file always ends with a footer.
    fn append(&self, m: &mut Meta, len: u64, first: &[u8]) -> Result<u64> {
        let at = m.end;
        let new_end = at + len;
        if new_end + SECTOR > MAX_SIZE + (1 << 30) || (at / SECTOR) > u64::from(u32::MAX - 1) {
            return Err(DiskError::Unsupported {
                path: self.path.clone(),
                what: "VHD file would exceed 2 TiB".into(),
            });
        }
        self.pwrite(&m.footer.to_bytes(), new_end)?;
        self.pwrite(first, at)?;
        m.end = new_end;
        Ok(at)
    }

    fn allocate(&self, m: &mut Meta, bi: u32) -> Result<u64> {
        let (bs, bml) = Self::geometry(m).ok_or_else(|| self.corrupt("no dynamic header"))?;
        if !m.end.is_multiple_of(SECTOR) {
            m.end = round512(m.end);
        }
        let zero = vec![0u8; bml as usize];
        let at = self.append(m, bml + bs, &zero)?;
        let e = (at / SECTOR) as u32;
        if let Some(slot) = m.bat.get_mut(bi as usize) {
            *slot = e;
        }
        m.dirty_bat.insert(bi / 128);
        m.bitmaps.insert(bi, Arc::new(zero));
        Ok(at)
    }

    fn read_dynamic(
        &self,
        offset: u64,
        buf: &mut [u8],
        absent: &mut Vec<Range<u64>>,
    ) -> Result<()> {
        let mut pos = 0u64;
        let total = buf.len() as u64;
        while pos < total {
            let abs = offset + pos;
            let (bs, bml, entry, bm) = {
                let mut m = self.meta.lock();
                let (bs, bml) =
                    Self::geometry(&m).ok_or_else(|| self.corrupt("no dynamic header"))?;
                let bi = (abs / bs) as u32;
                let e = m.bat.get(bi as usize).copied().unwrap_or(BAT_UNUSED);
                let bm = if e == BAT_UNUSED {
                    None
                } else {
                    Some(self.load_bitmap(&mut m, bi)?)
                };
                (bs, bml, e, bm)
            };
            let in_blk = abs % bs;
            let n = (bs - in_blk).min(total - pos);
            match bm {
                None => push_range(absent, abs..abs + n),
                Some(bm) => {
                    let data = u64::from(entry) * SECTOR + bml;
                    let s0 = in_blk / SECTOR;
                    let ns = n / SECTOR;
                    let mut i = 0;
                    while i < ns {
                        let set = bit(&bm, s0 + i);
                        let r = run_len(&bm, s0 + i, ns - i, set).max(1);
                        let a = abs + i * SECTOR;
                        let l = r * SECTOR;
                        if set {
                            let b0 = (pos + i * SECTOR) as usize;
                            self.pread(&mut buf[b0..b0 + l as usize], data + (s0 + i) * SECTOR)?;
                        } else {
                            push_range(absent, a..a + l);
                        }
                        i += r;
                    }
                }
            }
            pos += n;
        }
        Ok(())
    }

    fn write_dynamic(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let mut pos = 0u64;
        let total = buf.len() as u64;
        while pos < total {
            let abs = offset + pos;
            let (bs, bml, blk) = {
                let mut m = self.meta.lock();
                let (bs, bml) =
                    Self::geometry(&m).ok_or_else(|| self.corrupt("no dynamic header"))?;
                let bi = (abs / bs) as u32;
                let e = m.bat.get(bi as usize).copied().unwrap_or(BAT_UNUSED);
                let blk = if e == BAT_UNUSED {
                    self.allocate(&mut m, bi)?
                } else {
                    u64::from(e) * SECTOR
                };
                (bs, bml, blk)
            };
            let in_blk = abs % bs;
            let n = (bs - in_blk).min(total - pos);
            self.pwrite(&buf[pos as usize..(pos + n) as usize], blk + bml + in_blk)?;
            let mut m = self.meta.lock();
            let bi = (abs / bs) as u32;
            self.load_bitmap(&mut m, bi)?;
            if let Some(a) = m.bitmaps.get_mut(&bi) {
                set_bits(
                    Arc::make_mut(a).as_mut_slice(),
                    in_blk / SECTOR,
                    n / SECTOR,
                    true,
                );
            }
            m.dirty_bitmaps.insert(bi);
            pos += n;
        }
        Ok(())
    }

    /// Clear bitmap bits: the range becomes absent (zero in a base, transparent in a child).
    fn unmap(&self, offset: u64, len: u64) -> Result<()> {
        let mut m = self.meta.lock();
        let (bs, _) = Self::geometry(&m).ok_or_else(|| self.corrupt("no dynamic header"))?;
        let mut pos = offset;
        while pos < offset + len {
            let bi = (pos / bs) as u32;
            let in_blk = pos % bs;
            let n = (bs - in_blk).min(offset + len - pos);
            if m.bat.get(bi as usize).is_some_and(|&e| e != BAT_UNUSED) {
                self.load_bitmap(&mut m, bi)?;
                if let Some(a) = m.bitmaps.get_mut(&bi) {
                    set_bits(
                        Arc::make_mut(a).as_mut_slice(),
                        in_blk / SECTOR,
                        n / SECTOR,
                        false,
                    );
                }
                m.dirty_bitmaps.insert(bi);
            }
            pos += n;
        }
        Ok(())
    }

    /// Write dirty bitmaps and BAT sectors (after the data they describe is durable).
    fn flush_meta(&self, m: &mut Meta) -> Result<()> {
        if m.dirty_bitmaps.is_empty() && m.dirty_bat.is_empty() {
            return self
                .file
                .sync_data()
                .map_err(|e| DiskError::io("fsync", &self.path, e));
        }
        self.sync()?;
        let dirty: Vec<u32> = std::mem::take(&mut m.dirty_bitmaps).into_iter().collect();
        for bi in dirty {
            let e = m.bat.get(bi as usize).copied().unwrap_or(BAT_UNUSED);
            if e == BAT_UNUSED {
                continue;
            }
            if let Some(bm) = m.bitmaps.get(&bi) {
                self.pwrite(bm, u64::from(e) * SECTOR)?;
            }
        }
        let table = m.header.as_ref().map_or(0, |h| h.table_offset);
        let sectors: Vec<u32> = std::mem::take(&mut m.dirty_bat).into_iter().collect();
        for s in sectors {
            let lo = s as usize * 128;
            let hi = (lo + 128).min(m.bat.len());
            if lo >= hi {
                continue;
            }
            let bytes: Vec<u8> = m.bat[lo..hi].iter().flat_map(|e| e.to_be_bytes()).collect();
            self.pwrite(&bytes, table + lo as u64 * 4)?;
        }
        self.sync()
    }

    /// Used file intervals other than blocks: footer copy, header, locators, BAT.
    fn meta_ranges(m: &Meta) -> Vec<Range<u64>> {
        let mut v: Vec<Range<u64>> = Vec::with_capacity(12);
        v.push(0..SECTOR);
        if let Some(h) = &m.header {
            v.push(m.footer.data_offset..m.footer.data_offset + 1024);
            v.push(h.table_offset..round512(h.table_offset + u64::from(h.max_table_entries) * 4));
            for l in h.locators.iter().filter(|l| l.code != 0 && l.data_len > 0) {
                v.push(l.data_offset..round512(l.data_offset + u64::from(l.data_len)));
            }
        }
        v
    }

    fn block_ranges(m: &Meta) -> Vec<(u64, u32)> {
        let mut v: Vec<(u64, u32)> = m
            .bat
            .iter()
            .enumerate()
            .filter(|(_, &e)| e != BAT_UNUSED)
            .map(|(i, &e)| (u64::from(e) * SECTOR, i as u32))
            .collect();
        v.sort_unstable();
        v
    }

    /// Place `len` bytes in unused space before the end footer, or append.
    fn place(&self, m: &mut Meta, data: &[u8], taken: &mut Vec<Range<u64>>) -> Result<u64> {
        let need = round512(data.len() as u64);
        let mut used = Self::meta_ranges(m);
        if let Some((bs, bml)) = Self::geometry(m) {
            used.extend(
                Self::block_ranges(m)
                    .into_iter()
                    .map(|(o, _)| o..o + bml + bs),
            );
        }
        used.extend(taken.iter().cloned());
        used.sort_by_key(|r| r.start);
        let mut cur = 0u64;
        for r in &used {
            if r.start >= cur + need && cur + need <= m.end {
                taken.push(cur..cur + need);
                self.pwrite(data, cur)?;
                return Ok(cur);
            }
            cur = cur.max(r.end);
        }
        if cur + need <= m.end {
            taken.push(cur..cur + need);
            self.pwrite(data, cur)?;
            return Ok(cur);
        }
        let mut padded = data.to_vec();
        padded.resize(need as usize, 0);
        let at = self.append(m, need, &padded)?;
        taken.push(at..at + need);
        Ok(at)
    }

    fn vhd_size(m: &Meta) -> u64 {
        m.size
    }
}

/// Fill the parent fields of a header from a ParentSpec; returns the locator data in
/// entry order (W2ku absolute, W2ru relative). Data offsets are left for the caller.
fn apply_parent(h: &mut DynHeader, p: &ParentSpec) -> Result<Vec<Vec<u8>>> {
    let (uid, ts) = match &p.identity {
        LayerIdentity::Vhd {
            unique_id,
            timestamp,
        } => (*unique_id, *timestamp),
        other => {
            return Err(DiskError::InvalidArgument(format!(
                "a VHD can only have a VHD parent (parent identity {other:?})"
            )))
        }
    };
    h.parent_id = p.parent_disk_id.unwrap_or(uid);
    h.parent_timestamp = ts;
    // Hyper-V finds parents through the locators; the name is informational. We
    // store the relative path: libvhdi (vhdimount) joins this name to the child's
    // directory, so a relative name resolves there as well.
    let rel16: Vec<u16> = p.relative_path.encode_utf16().collect();
    h.parent_name = if rel16.len() <= 256 {
        rel16
    } else {
        let name = Path::new(&p.absolute_path)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        name.encode_utf16().take(256).collect()
    };
    let abs = utf16le(&p.absolute_path);
    let rel = utf16le(&windows_relative(&p.relative_path));
    for d in [&abs, &rel] {
        if d.is_empty() || d.len() as u64 > u64::from(MAX_LOCATOR_LEN) {
            return Err(DiskError::InvalidArgument(
                "parent path is empty or too long".into(),
            ));
        }
    }
    h.locators = Default::default();
    h.locators[0] = LocatorEntry {
        code: PLAT_W2KU,
        data_space: round512(abs.len() as u64).div_ceil(SECTOR) as u32,
        data_len: abs.len() as u32,
        data_offset: 0,
    };
    h.locators[1] = LocatorEntry {
        code: PLAT_W2RU,
        data_space: round512(rel.len() as u64).div_ceil(SECTOR) as u32,
        data_len: rel.len() as u32,
        data_offset: 0,
    };
    Ok(vec![abs, rel])
}

impl Drop for VhdFile {
    fn drop(&mut self) {
        if !self.read_only {
            let _ = self.flush();
        }
    }
}

impl Layer for VhdFile {
    fn info(&self) -> &LayerInfo {
        &self.info
    }
    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }
    fn parent_locator(&self) -> Option<&ParentLocator> {
        self.locator.as_ref()
    }

    fn read_layer(&self, offset: u64, buf: &mut [u8], absent: &mut Vec<Range<u64>>) -> Result<()> {
        let size = Self::vhd_size(&self.meta.lock());
        check_range(offset, buf.len() as u64, size)?;
        Self::aligned(offset, buf.len() as u64)?;
        if self.info.kind == DiskKind::Fixed {
            return self.pread(buf, offset);
        }
        self.read_dynamic(offset, buf, absent)
    }

    fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.writable()?;
        let _w = self.wlock.lock();
        {
            let mut m = self.meta.lock();
            check_range(offset, buf.len() as u64, m.size)?;
            Self::aligned(offset, buf.len() as u64)?;
            self.stamp(&mut m)?;
        }
        if self.info.kind == DiskKind::Fixed {
            return self.pwrite(buf, offset);
        }
        self.write_dynamic(offset, buf)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.writable()?;
        {
            let mut m = self.meta.lock();
            check_range(offset, len, m.size)?;
            Self::aligned(offset, len)?;
            self.stamp(&mut m)?;
        }
        match self.info.kind {
            // A base reads absent sectors as zero, so clearing bits is enough.
            DiskKind::Dynamic => {
                let _w = self.wlock.lock();
                self.unmap(offset, len)
            }
            // VHD has no zero state: hiding the parent needs real zeros.
            _ => {
                let zero = vec![0u8; len.min(1 << 20) as usize];
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(zero.len() as u64);
                    self.write(offset + done, &zero[..n as usize])?;
                    done += n;
                }
                Ok(())
            }
        }
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if self.info.kind == DiskKind::Fixed {
            return self.write_zeroes(offset, len);
        }
        self.writable()?;
        let _w = self.wlock.lock();
        let mut m = self.meta.lock();
        check_range(offset, len, m.size)?;
        Self::aligned(offset, len)?;
        self.stamp(&mut m)?;
        drop(m);
        self.unmap(offset, len)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let _w = self.wlock.lock();
        let mut m = self.meta.lock();
        self.flush_meta(&mut m)
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let mut m = self.meta.lock();
        check_range(offset, len, m.size)?;
        let Some((bs, _)) = Self::geometry(&m) else {
            return Ok(vec![Extent {
                offset,
                length: len,
                state: ExtentState::Data,
            }]);
        };
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < offset + len {
            let bi = (pos / bs) as u32;
            let in_blk = pos % bs;
            let n = (bs - in_blk).min(offset + len - pos);
            let e = m.bat.get(bi as usize).copied().unwrap_or(BAT_UNUSED);
            if e == BAT_UNUSED {
                out.push(Extent {
                    offset: pos,
                    length: n,
                    state: ExtentState::Absent,
                });
            } else {
                let bm = self.load_bitmap(&mut m, bi)?;
                // Extents may start mid-sector; round the scan to whole sectors.
                let s0 = in_blk / SECTOR;
                let s1 = (in_blk + n).div_ceil(SECTOR);
                let mut i = s0;
                while i < s1 {
                    let set = bit(&bm, i);
                    let r = run_len(&bm, i, s1 - i, set).max(1);
                    let a = (pos - in_blk + i * SECTOR).max(pos);
                    let b = (pos - in_blk + (i + r) * SECTOR).min(pos + n);
                    out.push(Extent {
                        offset: a,
                        length: b - a,
                        state: if set {
                            ExtentState::Data
                        } else {
                            ExtentState::Absent
                        },
                    });
                    i += r;
                }
            }
            pos += n;
        }
        coalesce(&mut out);
        Ok(out)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }
}

impl Image for VhdFile {
    fn set_parent(&self, p: &ParentSpec) -> Result<()> {
        self.writable()?;
        if self.info.kind != DiskKind::Differencing {
            return Err(DiskError::Unsupported {
                path: self.path.clone(),
                what: "set-parent on a disk that is not differencing".into(),
            });
        }
        let _w = self.wlock.lock();
        let mut m = self.meta.lock();
        if p.virtual_size != m.size {
            return Err(DiskError::InvalidArgument(format!(
                "new parent is {} bytes, this disk is {}",
                p.virtual_size, m.size
            )));
        }
        self.flush_meta(&mut m)?;
        let mut h = m
            .header
            .clone()
            .ok_or_else(|| self.corrupt("no dynamic header"))?;
        let datas = apply_parent(&mut h, p)?;
        // New locator data goes into space no current structure uses, so a crash
        // before the header write leaves the old locators intact.
        let mut taken = Vec::new();
        for (i, d) in datas.iter().enumerate() {
            let at = self.place(&mut m, d, &mut taken)?;
            h.locators[i].data_offset = at;
        }
        self.sync()?;
        // One 1024-byte write inside the first 4 KiB page switches everything over.
        self.pwrite(&h.to_bytes(), m.footer.data_offset)?;
        self.sync()?;
        m.header = Some(h);
        Ok(())
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        self.writable()?;
        if new_size == 0 || !new_size.is_multiple_of(SECTOR) || new_size > MAX_CREATE_SIZE {
            return Err(DiskError::InvalidArgument(format!(
                "VHD size {new_size} must be a non-zero multiple of 512 up to 2040 GiB"
            )));
        }
        let _w = self.wlock.lock();
        let mut m = self.meta.lock();
        self.flush_meta(&mut m)?;
        let old = m.size;
        if new_size == old {
            return Ok(());
        }
        let refuse = |why: String| DiskError::Refused {
            path: self.path.clone(),
            reason: why,
        };
        match Self::geometry(&m) {
            None => {
                if new_size < old {
                    let mut buf = vec![0u8; 1 << 20];
                    let mut pos = new_size;
                    while pos < old {
                        let n = (old - pos).min(buf.len() as u64) as usize;
                        self.pread(&mut buf[..n], pos)?;
                        if buf[..n].iter().any(|&b| b != 0) {
                            return Err(refuse(format!(
                                "cannot shrink: data at or after offset {pos}"
                            )));
                        }
                        pos += n as u64;
                    }
                }
                m.footer.current_size = new_size;
                m.footer.geometry = chs(new_size);
                let old_end = m.end;
                m.end = new_size;
                self.pwrite(&m.footer.to_bytes(), new_size)?;
                self.sync()?;
                if new_size > old {
                    self.pwrite(&[0u8; 512], old_end)?;
                } else {
                    self.file
                        .set_len(new_size + SECTOR)
                        .map_err(|e| DiskError::io("truncate", &self.path, e))?;
                }
                self.sync()?;
            }
            Some((bs, bml)) => {
                if new_size < old {
                    let first = new_size / bs;
                    for bi in first..old.div_ceil(bs) {
                        let bi = bi as u32;
                        if m.bat.get(bi as usize).is_none_or(|&e| e == BAT_UNUSED) {
                            continue;
                        }
                        let bm = self.load_bitmap(&mut m, bi)?;
                        let blk_start = u64::from(bi) * bs;
                        let from = new_size.max(blk_start);
                        let s0 = (from - blk_start) / SECTOR;
                        let ns = bs / SECTOR - s0;
                        if run_len(&bm, s0, ns, false) < ns {
                            return Err(refuse(format!(
                                "cannot shrink to {new_size}: block {bi} holds data past the new end"
                            )));
                        }
                    }
                } else {
                    let needed = new_size.div_ceil(bs);
                    let h = m
                        .header
                        .clone()
                        .ok_or_else(|| self.corrupt("no dynamic header"))?;
                    if needed > u64::from(h.max_table_entries) {
                        if needed > u64::from(MAX_TABLE_ENTRIES) {
                            return Err(DiskError::InvalidArgument(
                                "size needs too many blocks".into(),
                            ));
                        }
                        let old_len = u64::from(h.max_table_entries) * 4;
                        let new_len = needed * 4;
                        // Room after the current BAT up to the next structure?
                        let mut used = Self::meta_ranges(&m);
                        used.extend(
                            Self::block_ranges(&m)
                                .into_iter()
                                .map(|(o, _)| o..o + bml + bs),
                        );
                        let limit = used
                            .iter()
                            .map(|r| r.start)
                            .filter(|&s| {
                                s >= h.table_offset + old_len.max(1) && s != h.table_offset
                            })
                            .min()
                            .unwrap_or(m.end)
                            .min(m.end);
                        let mut nh = h.clone();
                        if h.table_offset + new_len <= limit {
                            let fill = vec![0xFFu8; (new_len - old_len) as usize];
                            self.pwrite(&fill, h.table_offset + old_len)?;
                        } else {
                            // Move the BAT to the end of the file.
                            let mut bytes: Vec<u8> =
                                m.bat.iter().flat_map(|e| e.to_be_bytes()).collect();
                            bytes.resize(round512(new_len) as usize, 0xFF);
                            let at = self.append(&mut m, bytes.len() as u64, &bytes)?;
                            nh.table_offset = at;
                        }
                        nh.max_table_entries = needed as u32;
                        self.sync()?;
                        self.pwrite(&nh.to_bytes(), m.footer.data_offset)?;
                        self.sync()?;
                        m.bat.resize(needed as usize, BAT_UNUSED);
                        m.header = Some(nh);
                    }
                }
                m.footer.current_size = new_size;
                m.footer.geometry = chs(new_size);
                self.write_footers(&m)?;
                self.sync()?;
            }
        }
        m.size = new_size;
        Ok(())
    }

    fn compact(&self, progress: Progress<'_>) -> Result<u64> {
        self.writable()?;
        let _w = self.wlock.lock();
        let mut m = self.meta.lock();
        let Some((bs, bml)) = Self::geometry(&m) else {
            return Ok(0);
        };
        self.flush_meta(&mut m)?;
        let old_len = m.end + SECTOR;
        let base = self.info.kind == DiskKind::Dynamic;
        let blocks = Self::block_ranges(&m);
        let total = blocks.len() as u64 * 2;
        let mut buf = vec![0u8; (bml + bs) as usize];
        // Pass 1: drop blocks holding nothing (and, in a base, sectors of zeros).
        for (k, &(off, bi)) in blocks.iter().enumerate() {
            if !progress(k as u64, total) {
                self.flush_meta(&mut m)?;
                return Err(DiskError::Cancelled);
            }
            let mut bm = (*self.load_bitmap(&mut m, bi)?).clone();
            if base {
                self.pread(&mut buf, off)?;
                let spb = bs / SECTOR;
                for s in 0..spb {
                    let d = &buf[(bml + s * SECTOR) as usize..(bml + (s + 1) * SECTOR) as usize];
                    if bit(&bm, s) && d.iter().all(|&b| b == 0) {
                        set_bits(&mut bm, s, 1, false);
                    }
                }
            }
            let empty = bm.iter().all(|&b| b == 0);
            m.bitmaps.insert(bi, Arc::new(bm));
            m.dirty_bitmaps.insert(bi);
            if empty {
                if let Some(e) = m.bat.get_mut(bi as usize) {
                    *e = BAT_UNUSED;
                }
                m.bitmaps.remove(&bi);
                m.dirty_bat.insert(bi / 128);
            }
        }
        self.flush_meta(&mut m)?;
        // Pass 2: slide live blocks down into the freed space, one durable step each.
        let live = Self::block_ranges(&m);
        let meta_end = Self::meta_ranges(&m)
            .iter()
            .map(|r| r.end)
            .max()
            .unwrap_or(SECTOR);
        let first_block = live.first().map_or(u64::MAX, |b| b.0);
        let mut target = Self::meta_ranges(&m)
            .iter()
            .filter(|r| r.start < first_block)
            .map(|r| r.end)
            .max()
            .unwrap_or(SECTOR);
        let n = live.len() as u64;
        for (k, &(off, bi)) in live.iter().enumerate() {
            if !progress(n + k as u64, n * 2) {
                return Err(DiskError::Cancelled);
            }
            let bt = bml + bs;
            let collides = Self::meta_ranges(&m)
                .iter()
                .any(|r| r.start < target + bt && r.end > target);
            if off > target && target + bt <= off && !collides {
                self.pread(&mut buf, off)?;
                self.pwrite(&buf, target)?;
                self.sync()?;
                if let Some(e) = m.bat.get_mut(bi as usize) {
                    *e = (target / SECTOR) as u32;
                }
                m.dirty_bat.insert(bi / 128);
                self.flush_meta(&mut m)?;
                target += bt;
            } else {
                target = target.max(off + bt);
            }
        }
        let new_end = round512(target.max(meta_end));
        if new_end < m.end {
            m.end = new_end;
            self.pwrite(&m.footer.to_bytes(), new_end)?;
            self.sync()?;
            self.file
                .set_len(new_end + SECTOR)
                .map_err(|e| DiskError::io("truncate", &self.path, e))?;
            self.sync()?;
        }
        Ok(old_len.saturating_sub(m.end + SECTOR))
    }

    fn check(&self, repair: bool) -> Result<CheckReport> {
        if repair {
            self.writable()?;
        }
        let _w = self.wlock.lock();
        let mut m = self.meta.lock();
        if !self.read_only {
            self.flush_meta(&mut m)?;
        }
        let mut r = CheckReport::default();
        let len = self
            .file
            .metadata()
            .map_err(|e| DiskError::io("stat", &self.path, e))?
            .len();
        if m.footer_missing {
            r.errors.push(
                "footer at the end of the file is missing or damaged (copy at offset 0 is intact)"
                    .into(),
            );
            if repair {
                self.pwrite(&m.footer.to_bytes(), m.end)?;
                self.file
                    .set_len(m.end + SECTOR)
                    .map_err(|e| DiskError::io("truncate", &self.path, e))?;
                self.sync()?;
                m.footer_missing = false;
                r.repaired
                    .push("rewrote the footer at the end of the file".into());
            }
        }
        let Some((bs, bml)) = Self::geometry(&m) else {
            if len - SECTOR > m.size {
                r.warnings.push(format!(
                    "{} bytes between the data and the footer",
                    len - SECTOR - m.size
                ));
            }
            return Ok(r);
        };
        let mut first = [0u8; 512];
        self.pread(&mut first, 0)?;
        if Footer::parse(&first).ok().as_ref() != Some(&m.footer) {
            r.warnings
                .push("footer copy at offset 0 differs from the footer at the end".into());
            if repair {
                self.pwrite(&m.footer.to_bytes(), 0)?;
                self.sync()?;
                r.repaired
                    .push("rewrote the footer copy at offset 0".into());
            }
        }
        for p in &self.locator_problems {
            r.errors.push(p.clone());
        }
        if self.info.kind == DiskKind::Differencing
            && self
                .locator
                .as_ref()
                .is_some_and(|l| l.relative_path.is_none() && l.absolute_path.is_none())
        {
            r.errors
                .push("differencing disk has no usable parent locator".into());
        }
        let needed = m.size.div_ceil(bs) as usize;
        let meta = Self::meta_ranges(&m);
        for mr in &meta {
            if mr.end > m.end + SECTOR {
                r.errors.push(format!(
                    "metadata {}..{} lies past the end footer",
                    mr.start, mr.end
                ));
            }
        }
        let blocks = Self::block_ranges(&m);
        let bt = bml + bs;
        let mut prev_end = 0u64;
        let mut used: u64 = meta.iter().map(|x| x.end - x.start).sum();
        for &(off, bi) in &blocks {
            if bi as usize >= needed {
                r.warnings
                    .push(format!("BAT entry {bi} beyond the disk size is allocated"));
            }
            if off < prev_end {
                r.errors
                    .push(format!("block {bi} at {off} overlaps the previous block"));
            }
            if off + bt > m.end {
                r.errors
                    .push(format!("block {bi} at {off} extends past the footer"));
            }
            if meta.iter().any(|x| x.start < off + bt && x.end > off) {
                r.errors
                    .push(format!("block {bi} at {off} overlaps metadata"));
            }
            prev_end = off + bt;
            used += bt;
        }
        let span = m.end;
        if span > used + SECTOR {
            r.warnings.push(format!(
                "about {} bytes of the file are not referenced (leaked)",
                span - used
            ));
        }
        let tail_start = blocks
            .last()
            .map_or(0, |b| b.0 + bt)
            .max(meta.iter().map(|x| x.end).max().unwrap_or(0));
        if repair && r.errors.is_empty() && tail_start < m.end {
            let freed = m.end - round512(tail_start);
            m.end = round512(tail_start);
            self.pwrite(&m.footer.to_bytes(), m.end)?;
            self.sync()?;
            self.file
                .set_len(m.end + SECTOR)
                .map_err(|e| DiskError::io("truncate", &self.path, e))?;
            self.sync()?;
            r.repaired
                .push(format!("truncated {freed} unreferenced bytes at the end"));
        }
        Ok(r)
    }

    fn allocation(&self) -> Result<AllocationStats> {
        let m = self.meta.lock();
        let file_size = self
            .file
            .metadata()
            .map_err(|e| DiskError::io("stat", &self.path, e))?
            .len();
        let Some((bs, _)) = Self::geometry(&m) else {
            return Ok(AllocationStats {
                file_size,
                ..Default::default()
            });
        };
        let needed = m.size.div_ceil(bs) as usize;
        let mut allocated = 0u64;
        let mut out_of_order = 0u64;
        let mut prev: Option<u32> = None;
        for &e in m.bat.iter().take(needed) {
            if e == BAT_UNUSED {
                continue;
            }
            allocated += 1;
            if prev.is_some_and(|p| e < p) {
                out_of_order += 1;
            }
            prev = Some(e);
        }
        Ok(AllocationStats {
            file_size,
            total_blocks: needed as u64,
            allocated_blocks: allocated,
            zero_blocks: 0,
            fragmentation_percent: if allocated == 0 {
                0.0
            } else {
                out_of_order as f64 * 100.0 / allocated as f64
            },
        })
    }

    fn locator(&self) -> Option<ParentLocator> {
        // Re-read after a set_parent on this handle would need a reopen; report what we hold.
        self.parent_locator().cloned()
    }
}

impl VhdFile {
    /// Current virtual size (follows `resize` on this handle, unlike `info()`).
    pub fn size(&self) -> u64 {
        self.meta.lock().size
    }

    /// The footer's current identity (follows timestamp bumps on this handle).
    pub fn identity(&self) -> LayerIdentity {
        let m = self.meta.lock();
        LayerIdentity::Vhd {
            unique_id: m.footer.unique_id,
            timestamp: m.footer.timestamp,
        }
    }
}
