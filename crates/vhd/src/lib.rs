//! VHD (Virtual PC / Hyper-V 2008) image format: fixed, dynamic, differencing.
//!
//! Layout written by [`VhdFile::create`] for dynamic/differencing disks:
//! footer copy (0), dynamic header (512), parent locator data (differencing, with
//! slack so a later `set_parent` can write the new locator beside the old one),
//! BAT, then blocks (sector bitmap padded to 512 bytes + data), footer at the end.
//! New blocks are placed so their data starts on a 4 KiB boundary (the bitmap sits
//! in the sectors just before it): a page-sized guest request then touches one page
//! of the host's page cache, not two.
//!
//! Every open validates the layout (see `layout`): a writable open of a damaged
//! image is refused with [`DiskError::Damaged`]; a read-only open serves the sound
//! blocks and refuses reads of damaged ones with [`DiskError::DamagedBlock`];
//! [`VhdFile::open_for_repair`] opens a damaged image for `check --repair` and
//! `set-parent`.
#![forbid(unsafe_code)]

pub mod format;
mod layout;
pub mod structure_fuzz;

use format::*;
use fv_vdisk_core::{
    check_range, coalesce, AllocationStats, CheckReport, CreateSpec, DiskError, DiskFormat,
    DiskKind, Extent, ExtentState, Image, Layer, LayerIdentity, LayerInfo, ParentLocator,
    ParentSpec, Progress, Result,
};
use layout::{BlockFix, Damage};
use parking_lot::{RwLock, RwLockUpgradableReadGuard, RwLockWriteGuard};
use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::hash::{BuildHasherDefault, Hasher};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use uuid::Uuid;

const FMT: &str = "VHD";
const DEFAULT_BLOCK: u32 = 2 << 20;
const MIN_CREATE_BLOCK: u32 = 512 << 10;
/// Room reserved per parent locator at creation so `set_parent` can write the new
/// locator into free space before switching the header over to it.
const LOCATOR_SLOT: u64 = 8192;
/// Block data is placed on page boundaries (see the crate docs).
const PAGE: u64 = 4096;

/// Does this look like a VHD? `last_512` is the file's last 512 bytes (the footer),
/// `first_512` its first (the footer copy of dynamic disks).
pub fn probe(first_512: &[u8], last_512: &[u8]) -> bool {
    last_512.get(..8) == Some(&FOOTER_COOKIE[..]) || first_512.get(..8) == Some(&FOOTER_COOKIE[..])
}

/// Block indexes are small dense integers: a multiplicative hash is enough and far
/// cheaper than SipHash on the per-request path.
#[derive(Default, Clone, Copy)]
struct BlockHasher(u64);
impl Hasher for BlockHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}
type BlockMap<V> = HashMap<u32, V, BuildHasherDefault<BlockHasher>>;

/// One block's sector bitmap, loaded on first use.
struct Bitmap {
    bits: Vec<u8>,
    /// Every sector of the block is present: reads and rewrites skip the bits.
    full: bool,
}

impl Bitmap {
    fn new(bits: Vec<u8>, spb: u64) -> Self {
        let full = run_len(&bits, 0, spb, true) == spb;
        Bitmap { bits, full }
    }
}

/// Geometry of a dynamic disk: block size, padded bitmap length, sectors per block.
#[derive(Clone, Copy)]
struct Geo {
    bs: u64,
    bml: u64,
    spb: u64,
}

struct Meta {
    footer: Footer,
    header: Option<DynHeader>,
    geo: Option<Geo>,
    bat: Vec<u32>,
    bitmaps: BlockMap<Bitmap>,
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
    /// What layout validation found (empty on a sound image).
    damage: Damage,
}

/// One VHD file.
pub struct VhdFile {
    path: PathBuf,
    file: File,
    read_only: bool,
    info: LayerInfo,
    locator: Option<ParentLocator>,
    /// One lock, taken once per request: reads share it, a write holds the
    /// upgradable side (writers are serialised, readers go on) and upgrades only to
    /// allocate a block, load a bitmap or set bits that were clear.
    meta: RwLock<Meta>,
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

/// Where a block appended at `end` starts so that its data is page-aligned.
fn aligned_block_start(end: u64, bml: u64) -> u64 {
    (round512(end) + bml).next_multiple_of(PAGE) - bml
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

/// Locator as the chain opener wants it, from the sound decoded locators.
fn parent_locator_of(h: &DynHeader, paths: &[layout::LocatorPath]) -> ParentLocator {
    let mut loc = ParentLocator {
        expected: Some(LayerIdentity::Vhd {
            unique_id: h.parent_id,
            timestamp: h.parent_timestamp,
        }),
        parent_name: Some(String::from_utf16_lossy(&h.parent_name)),
        ..Default::default()
    };
    for p in paths {
        match p.code {
            PLAT_W2RU | PLAT_WI2R => {
                if loc.relative_path.is_none() {
                    loc.relative_path = Some(host_relative(&p.path))
                }
            }
            _ => {
                if loc.absolute_path.is_none() {
                    loc.absolute_path = Some(p.path.clone())
                }
            }
        }
    }
    loc
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

    fn file_len(&self) -> Result<u64> {
        Ok(self
            .file
            .metadata()
            .map_err(|e| DiskError::io("stat", &self.path, e))?
            .len())
    }

    fn set_len(&self, len: u64) -> Result<()> {
        self.file
            .set_len(len)
            .map_err(|e| DiskError::io("truncate", &self.path, e))
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(DiskError::ReadOnly {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    fn damaged_error(&self, d: &Damage) -> DiskError {
        DiskError::Damaged {
            path: self.path.clone(),
            format: FMT,
            damage: d.summary(),
            remedy: d.remedy(),
        }
    }

    /// Writes are refused while damage is known (only a repair handle gets here).
    fn sound(&self, m: &Meta) -> Result<()> {
        if m.damage.is_empty() {
            Ok(())
        } else {
            Err(self.damaged_error(&m.damage))
        }
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

    /// Open an existing VHD. Parents are not opened here (see `fv-vdisk`). A writable
    /// open of an image whose layout is damaged is refused with
    /// [`DiskError::Damaged`]; a read-only one serves the sound blocks.
    pub fn open(path: &Path, read_only: bool) -> Result<Self> {
        Self::open_with(path, read_only, false)
    }

    /// Open writable for `check --repair` and `set-parent`: damage found at open does
    /// not refuse the open, but writes of guest data stay refused until it is gone.
    pub fn open_for_repair(path: &Path) -> Result<Self> {
        Self::open_with(path, false, true)
    }

    fn open_with(path: &Path, read_only: bool, repair: bool) -> Result<Self> {
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
        let mut header = None;
        let mut bat = Vec::new();
        let mut damage = Damage::default();
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
            let lim = layout::limit(len, footer_missing);
            if !hoff.is_multiple_of(SECTOR)
                || hoff < SECTOR
                || hoff.checked_add(1024).is_none_or(|e| e > lim)
            {
                return Err(corrupt(format!(
                    "dynamic header offset {hoff} is not a sector offset between the footer copy and the footer"
                )));
            }
            let mut hb = [0u8; 1024];
            rd(&mut hb, hoff)?;
            let h = DynHeader::parse(&hb).map_err(corrupt)?;
            layout::check_header(len, footer_missing, hoff, &h, size).map_err(corrupt)?;
            let bat_len = u64::from(h.max_table_entries) * 4;
            let mut raw = vec![0u8; bat_len as usize];
            rd(&mut raw, h.table_offset)?;
            bat = raw
                .chunks_exact(4)
                .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let (d, paths) = {
                let inp = layout::Input {
                    file_len: len,
                    footer_missing,
                    differencing: kind == DiskKind::Differencing,
                    header_offset: hoff,
                    header: &h,
                    bat: &bat,
                };
                layout::validate(&inp, &mut |off, n| {
                    let mut b = vec![0u8; n];
                    file.read_exact_at(&mut b, off).ok().map(|_| b)
                })
            };
            damage = d;
            if footer_missing {
                end = Self::structures_end(&h, hoff, &bat, &damage, kind == DiskKind::Differencing);
            }
            if kind == DiskKind::Differencing {
                locator = Some(parent_locator_of(&h, &paths));
            }
            header = Some(h);
        }
        if !read_only && !repair && !damage.is_empty() {
            return Err(DiskError::Damaged {
                path: path.to_path_buf(),
                format: FMT,
                damage: damage.summary(),
                remedy: damage.remedy(),
            });
        }
        let geo = header.as_ref().map(|h| Geo {
            bs: u64::from(h.block_size),
            bml: layout::bitmap_len(h.block_size),
            spb: u64::from(h.block_size) / SECTOR,
        });
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
            meta: RwLock::new(Meta {
                footer,
                header,
                geo,
                bat,
                bitmaps: BlockMap::default(),
                dirty_bitmaps: BTreeSet::new(),
                dirty_bat: BTreeSet::new(),
                end,
                size,
                stamped: false,
                footer_missing,
                damage,
            }),
        })
    }

    /// End of everything a repair keeps (metadata, sound blocks and blocks cut
    /// short by the end of the file): where the footer goes when it is missing.
    fn structures_end(
        h: &DynHeader,
        hoff: u64,
        bat: &[u32],
        d: &Damage,
        differencing: bool,
    ) -> u64 {
        let total = layout::bitmap_len(h.block_size) + u64::from(h.block_size);
        let mut end = layout::bat_range(h).map_or(0, |r| r.end).max(hoff + 1024);
        // Locators validation passed (only a differencing disk's are validated).
        for l in h.locators.iter().enumerate().filter(|(i, l)| {
            differencing && l.code != 0 && !d.locators.contains(i) && l.data_len > 0
        }) {
            end = end.max(l.1.data_offset.saturating_add(u64::from(l.1.data_len)));
        }
        for (i, &e) in bat.iter().enumerate() {
            if e == BAT_UNUSED {
                continue;
            }
            // Shared blocks count too: their copy is made after the footer is back,
            // from bytes the footer must not cut off.
            if d.fix.get(&(i as u32)) != Some(&BlockFix::Clear) {
                end = end.max(u64::from(e) * SECTOR + total);
            }
        }
        round512(end)
    }

    /// Validate the current in-memory layout against the file as it is now.
    fn revalidate(&self, m: &Meta) -> Result<(Damage, Vec<layout::LocatorPath>)> {
        let (Some(h), false) = (&m.header, self.info.kind == DiskKind::Fixed) else {
            return Ok((Damage::default(), Vec::new()));
        };
        let len = self.file_len()?;
        let inp = layout::Input {
            file_len: len,
            footer_missing: m.footer_missing,
            differencing: self.info.kind == DiskKind::Differencing,
            header_offset: m.footer.data_offset,
            header: h,
            bat: &m.bat,
        };
        let (d, paths) = layout::validate(&inp, &mut |off, n| {
            let mut b = vec![0u8; n];
            self.file.read_exact_at(&mut b, off).ok().map(|_| b)
        });
        Ok((d, paths))
    }

    /// Structural damage found at open (or left after a repair), one sentence per
    /// problem; empty on a sound image.
    pub fn damage(&self) -> Vec<String> {
        self.meta.read().damage.list.clone()
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

    fn geo(&self, m: &Meta) -> Result<Geo> {
        m.geo.ok_or_else(|| self.corrupt("no dynamic header"))
    }

    /// Read `buf.len()` bytes at `off`; bytes past the end of the file read as zero.
    fn read_padded(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let len = self.file_len()?;
        buf.fill(0);
        let have = len.saturating_sub(off).min(buf.len() as u64) as usize;
        if have > 0 {
            self.pread(&mut buf[..have], off)?;
        }
        Ok(())
    }

    fn load_bitmap(&self, m: &mut Meta, bi: u32) -> Result<()> {
        if m.bitmaps.contains_key(&bi) {
            return Ok(());
        }
        let g = self.geo(m)?;
        let e = *m
            .bat
            .get(bi as usize)
            .ok_or_else(|| self.corrupt("block index out of range"))?;
        let mut b = vec![0u8; g.bml as usize];
        self.pread(&mut b, u64::from(e) * SECTOR)?;
        m.bitmaps.insert(bi, Bitmap::new(b, g.spb));
        Ok(())
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
    /// first bytes of the new space, at least one sector), so the file always ends
    /// with a footer.
    fn append(&self, m: &mut Meta, len: u64, first: &[u8]) -> Result<u64> {
        let at = m.end;
        let new_end = at
            .checked_add(len)
            .filter(|e| e + SECTOR <= MAX_SIZE + (1 << 30))
            .ok_or_else(|| DiskError::Unsupported {
                path: self.path.clone(),
                what: "VHD file would exceed 2 TiB".into(),
            })?;
        self.pwrite(&m.footer.to_bytes(), new_end)?;
        self.pwrite(first, at)?;
        m.end = new_end;
        Ok(at)
    }

    /// Append a block whose data starts on a page boundary; `content` (bitmap and
    /// data, or just a zero bitmap) is written at its start. Returns the block's
    /// offset.
    fn append_block(&self, m: &mut Meta, content: &[u8]) -> Result<u64> {
        let g = self.geo(m)?;
        m.end = round512(m.end);
        let start = aligned_block_start(m.end, g.bml);
        if start / SECTOR >= u64::from(BAT_UNUSED) {
            return Err(DiskError::Unsupported {
                path: self.path.clone(),
                what: "VHD file would exceed 2 TiB (BAT entries are 32-bit sector numbers)".into(),
            });
        }
        let gap = (start - m.end) as usize;
        let mut first = vec![0u8; gap + content.len()];
        first[gap..].copy_from_slice(content);
        self.append(m, gap as u64 + g.bml + g.bs, &first)?;
        Ok(start)
    }

    fn allocate(&self, m: &mut Meta, bi: u32) -> Result<u64> {
        let g = self.geo(m)?;
        let zero = vec![0u8; g.bml as usize];
        let at = self.append_block(m, &zero)?;
        if let Some(slot) = m.bat.get_mut(bi as usize) {
            *slot = (at / SECTOR) as u32;
        }
        m.dirty_bat.insert(bi / 128);
        m.bitmaps.insert(bi, Bitmap::new(zero, g.spb));
        Ok(at)
    }

    /// Serve `buf[*pos..]` from `m`. Returns the block whose bitmap must be loaded
    /// first (with `*pos` at its start), or `None` when done.
    fn read_with(
        &self,
        m: &Meta,
        offset: u64,
        buf: &mut [u8],
        pos: &mut u64,
        absent: &mut Vec<Range<u64>>,
    ) -> Result<Option<u32>> {
        let g = self.geo(m)?;
        let total = buf.len() as u64;
        while *pos < total {
            let abs = offset + *pos;
            let bi = (abs / g.bs) as u32;
            let in_blk = abs % g.bs;
            let n = (g.bs - in_blk).min(total - *pos);
            let e = m.bat.get(bi as usize).copied().unwrap_or(BAT_UNUSED);
            let b0 = *pos as usize;
            if e == BAT_UNUSED {
                push_range(absent, abs..abs + n);
            } else {
                if !m.damage.blocks.is_empty() {
                    if let Some(why) = m.damage.blocks.get(&bi) {
                        return Err(DiskError::DamagedBlock {
                            path: self.path.clone(),
                            offset: abs,
                            block: u64::from(bi),
                            reason: why.clone(),
                        });
                    }
                }
                let Some(bm) = m.bitmaps.get(&bi) else {
                    return Ok(Some(bi));
                };
                let data = u64::from(e) * SECTOR + g.bml;
                if bm.full {
                    self.pread(&mut buf[b0..b0 + n as usize], data + in_blk)?;
                } else {
                    let s0 = in_blk / SECTOR;
                    let ns = n / SECTOR;
                    let mut i = 0;
                    while i < ns {
                        let set = bit(&bm.bits, s0 + i);
                        let r = run_len(&bm.bits, s0 + i, ns - i, set).max(1);
                        let a = abs + i * SECTOR;
                        let l = r * SECTOR;
                        if set {
                            let o = b0 + (i * SECTOR) as usize;
                            self.pread(&mut buf[o..o + l as usize], data + (s0 + i) * SECTOR)?;
                        } else {
                            push_range(absent, a..a + l);
                        }
                        i += r;
                    }
                }
            }
            *pos += n;
        }
        Ok(None)
    }

    /// One request, one lock: the upgradable guard is held throughout and upgraded
    /// only for allocation, bitmap loads and bits that change.
    fn write_dynamic(
        &self,
        mut m: RwLockUpgradableReadGuard<'_, Meta>,
        offset: u64,
        buf: &[u8],
    ) -> Result<()> {
        let g = self.geo(&m)?;
        let mut pos = 0u64;
        let total = buf.len() as u64;
        while pos < total {
            let abs = offset + pos;
            let bi = (abs / g.bs) as u32;
            let in_blk = abs % g.bs;
            let n = (g.bs - in_blk).min(total - pos);
            let e = m.bat.get(bi as usize).copied().unwrap_or(BAT_UNUSED);
            let blk = if e == BAT_UNUSED {
                let mut w = RwLockUpgradableReadGuard::upgrade(m);
                let at = self.allocate(&mut w, bi);
                m = RwLockWriteGuard::downgrade_to_upgradable(w);
                at?
            } else {
                if !m.bitmaps.contains_key(&bi) {
                    let mut w = RwLockUpgradableReadGuard::upgrade(m);
                    let r = self.load_bitmap(&mut w, bi);
                    m = RwLockWriteGuard::downgrade_to_upgradable(w);
                    r?;
                }
                u64::from(e) * SECTOR
            };
            self.pwrite(&buf[pos as usize..(pos + n) as usize], blk + g.bml + in_blk)?;
            let (s0, ns) = (in_blk / SECTOR, n / SECTOR);
            let unchanged = m
                .bitmaps
                .get(&bi)
                .is_some_and(|b| b.full || run_len(&b.bits, s0, ns, true) == ns);
            if !unchanged {
                let mut w = RwLockUpgradableReadGuard::upgrade(m);
                if let Some(b) = w.bitmaps.get_mut(&bi) {
                    set_bits(&mut b.bits, s0, ns, true);
                    b.full = run_len(&b.bits, 0, g.spb, true) == g.spb;
                }
                w.dirty_bitmaps.insert(bi);
                m = RwLockWriteGuard::downgrade_to_upgradable(w);
            }
            pos += n;
        }
        Ok(())
    }

    /// Clear bitmap bits: the range becomes absent (zero in a base, transparent in a child).
    fn unmap(&self, m: &mut Meta, offset: u64, len: u64) -> Result<()> {
        let g = self.geo(m)?;
        let mut pos = offset;
        while pos < offset + len {
            let bi = (pos / g.bs) as u32;
            let in_blk = pos % g.bs;
            let n = (g.bs - in_blk).min(offset + len - pos);
            if m.bat.get(bi as usize).is_some_and(|&e| e != BAT_UNUSED) {
                self.load_bitmap(m, bi)?;
                let (s0, ns) = (in_blk / SECTOR, n / SECTOR);
                let mut changed = false;
                if let Some(b) = m.bitmaps.get_mut(&bi) {
                    if run_len(&b.bits, s0, ns, false) < ns {
                        set_bits(&mut b.bits, s0, ns, false);
                        b.full = false;
                        changed = true;
                    }
                }
                if changed {
                    m.dirty_bitmaps.insert(bi);
                }
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
                self.pwrite(&bm.bits, u64::from(e) * SECTOR)?;
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
            let hoff = m.footer.data_offset;
            v.push(hoff..hoff.saturating_add(1024));
            if let Some(r) = layout::bat_range(h) {
                v.push(r);
            }
            // Only a differencing disk's locators mean anything (as in validation).
            let differencing = m.footer.disk_type == DISK_DIFFERENCING;
            for (i, l) in h.locators.iter().enumerate() {
                if differencing && l.code != 0 && l.data_len > 0 && !m.damage.locators.contains(&i)
                {
                    let e = l.data_offset.saturating_add(u64::from(l.data_len));
                    v.push(l.data_offset..round512(e));
                }
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
        if let Some(g) = m.geo {
            used.extend(
                Self::block_ranges(m)
                    .into_iter()
                    .map(|(o, _)| o..o + g.bml + g.bs),
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

    /// `check --repair` on a damaged image, in crash-safe order: the footer first
    /// (so appends land after everything kept), then copies of shared blocks (made
    /// durable before the BAT points at them), then the BAT, then the header.
    /// Each change is reported only once it has been written.
    fn repair(&self, m: &mut Meta, r: &mut CheckReport) -> Result<()> {
        let d = m.damage.clone();
        let Some(h) = m.header.clone() else {
            return Ok(());
        };
        let g = self.geo(m)?;
        if m.footer_missing {
            let end = Self::structures_end(
                &h,
                m.footer.data_offset,
                &m.bat,
                &d,
                self.info.kind == DiskKind::Differencing,
            );
            let len = self.file_len()?;
            // Only a block cut short by the end of the file may extend it, by at
            // most one block.
            if end > len.saturating_add(g.bml + g.bs) {
                return Err(self.corrupt(format!(
                    "repair would put the footer at {end}, past the {len}-byte file by more than a block"
                )));
            }
            m.end = end;
            self.pwrite(&m.footer.to_bytes(), end)?;
            if end + SECTOR < len {
                self.set_len(end + SECTOR)?;
            }
            self.sync()?;
            m.footer_missing = false;
            r.repaired.push(format!(
                "rewrote the footer at the end of the file (offset {end}) from the copy at offset 0"
            ));
            for (bi, f) in &d.fix {
                if *f == BlockFix::Extend {
                    r.repaired.push(format!(
                        "block {bi} was cut short by the end of the file: the file now covers it (its missing tail reads as zeros)"
                    ));
                }
            }
        }
        let mut buf = vec![0u8; (g.bml + g.bs) as usize];
        for (&bi, f) in &d.fix {
            if *f != BlockFix::Relocate {
                continue;
            }
            let Some(&e) = m.bat.get(bi as usize) else {
                continue;
            };
            let old = u64::from(e) * SECTOR;
            self.read_padded(&mut buf, old)?;
            let at = self.append_block(m, &buf)?;
            self.sync()?;
            if let Some(slot) = m.bat.get_mut(bi as usize) {
                *slot = (at / SECTOR) as u32;
            }
            m.dirty_bat.insert(bi / 128);
            m.bitmaps.remove(&bi);
            m.dirty_bitmaps.remove(&bi);
            r.repaired.push(format!(
                "block {bi} shared file space at {old} with another block: copied to offset {at}, so both read what they read before"
            ));
        }
        let mut cleared = Vec::new();
        for (&bi, f) in &d.fix {
            if *f != BlockFix::Clear {
                continue;
            }
            if let Some(slot) = m.bat.get_mut(bi as usize) {
                *slot = BAT_UNUSED;
                m.dirty_bat.insert(bi / 128);
                m.bitmaps.remove(&bi);
                m.dirty_bitmaps.remove(&bi);
                cleared.push(bi);
            }
        }
        self.flush_meta(m)?;
        for bi in cleared {
            let why = d.blocks.get(&bi).cloned().unwrap_or_default();
            r.repaired.push(format!(
                "{why}: marked block {bi} unallocated (it now reads as absent: zeros, or the parent's data)"
            ));
        }
        if !d.locators.is_empty() {
            let mut nh = h.clone();
            for &i in &d.locators {
                if let Some(l) = nh.locators.get_mut(i) {
                    *l = LocatorEntry::default();
                }
            }
            self.pwrite(&nh.to_bytes(), m.footer.data_offset)?;
            self.sync()?;
            m.header = Some(nh);
            for i in &d.locators {
                r.repaired.push(format!(
                    "cleared parent locator {i} (its data could not be used)"
                ));
            }
        }
        Ok(())
    }

    /// Unreferenced bytes before the footer, not counting the padding that puts a
    /// block's data on a page boundary.
    fn leaked(m: &Meta, g: Geo) -> u64 {
        let mut used: Vec<(u64, u64, bool)> = Self::meta_ranges(m)
            .into_iter()
            .map(|r| (r.start, r.end, false))
            .collect();
        for (o, bi) in Self::block_ranges(m) {
            if !m.damage.blocks.contains_key(&bi) {
                used.push((o, o + g.bml + g.bs, true));
            }
        }
        used.sort_unstable();
        let mut cur = 0u64;
        let mut leaked = 0u64;
        for (s, e, is_block) in used {
            if s > cur {
                let gap = s - cur;
                let padding = is_block && gap < PAGE && aligned_block_start(cur, g.bml) == s;
                if !padding {
                    leaked += gap;
                }
            }
            cur = cur.max(e);
        }
        leaked + m.end.saturating_sub(cur)
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
        Self::aligned(offset, buf.len() as u64)?;
        let mut pos = 0u64;
        let mut first = true;
        // One shared lock per request; a bitmap not yet loaded costs one more round.
        loop {
            let missing = {
                let m = self.meta.read();
                if first {
                    check_range(offset, buf.len() as u64, m.size)?;
                    first = false;
                }
                if self.info.kind == DiskKind::Fixed {
                    return self.pread(buf, offset);
                }
                self.read_with(&m, offset, buf, &mut pos, absent)?
            };
            match missing {
                None => return Ok(()),
                Some(bi) => self.load_bitmap(&mut self.meta.write(), bi)?,
            }
        }
    }

    fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.writable()?;
        let mut m = self.meta.upgradable_read();
        self.sound(&m)?;
        check_range(offset, buf.len() as u64, m.size)?;
        Self::aligned(offset, buf.len() as u64)?;
        if !m.stamped {
            let mut w = RwLockUpgradableReadGuard::upgrade(m);
            let r = self.stamp(&mut w);
            m = RwLockWriteGuard::downgrade_to_upgradable(w);
            r?;
        }
        if self.info.kind == DiskKind::Fixed {
            return self.pwrite(buf, offset);
        }
        self.write_dynamic(m, offset, buf)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.writable()?;
        {
            let mut m = self.meta.write();
            self.sound(&m)?;
            check_range(offset, len, m.size)?;
            Self::aligned(offset, len)?;
            self.stamp(&mut m)?;
            // A base reads absent sectors as zero, so clearing bits is enough.
            if self.info.kind == DiskKind::Dynamic {
                return self.unmap(&mut m, offset, len);
            }
        }
        // VHD has no zero state: hiding the parent (or zeroing a fixed disk) needs
        // real zeros.
        let zero = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zero.len() as u64);
            self.write(offset + done, &zero[..n as usize])?;
            done += n;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if self.info.kind == DiskKind::Fixed {
            return self.write_zeroes(offset, len);
        }
        self.writable()?;
        let mut m = self.meta.write();
        self.sound(&m)?;
        check_range(offset, len, m.size)?;
        Self::aligned(offset, len)?;
        self.stamp(&mut m)?;
        self.unmap(&mut m, offset, len)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut m = self.meta.write();
        self.flush_meta(&mut m)
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let mut m = self.meta.write();
        check_range(offset, len, m.size)?;
        let Some(g) = m.geo else {
            return Ok(vec![Extent {
                offset,
                length: len,
                state: ExtentState::Data,
            }]);
        };
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < offset + len {
            let bi = (pos / g.bs) as u32;
            let in_blk = pos % g.bs;
            let n = (g.bs - in_blk).min(offset + len - pos);
            let e = m.bat.get(bi as usize).copied().unwrap_or(BAT_UNUSED);
            if e == BAT_UNUSED {
                out.push(Extent {
                    offset: pos,
                    length: n,
                    state: ExtentState::Absent,
                });
            } else if m.damage.blocks.contains_key(&bi) {
                // Reported as data so that readers reach it and get the typed error.
                out.push(Extent {
                    offset: pos,
                    length: n,
                    state: ExtentState::Data,
                });
            } else {
                self.load_bitmap(&mut m, bi)?;
                let Some(bm) = m.bitmaps.get(&bi) else {
                    return Err(self.corrupt(format!("bitmap of block {bi} not loaded")));
                };
                // Extents may start mid-sector; round the scan to whole sectors.
                let s0 = in_blk / SECTOR;
                let s1 = (in_blk + n).div_ceil(SECTOR);
                let mut i = s0;
                while i < s1 {
                    let set = bit(&bm.bits, i);
                    let r = run_len(&bm.bits, i, s1 - i, set).max(1);
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
        let mut m = self.meta.write();
        // Damage to the parent link is what set-parent repairs; anything else has to
        // be repaired first (placing the new locator needs a sound layout).
        if m.footer_missing || !m.damage.blocks.is_empty() {
            let mut d = m.damage.clone();
            d.linkage = 0;
            return Err(self.damaged_error(&d));
        }
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
        // The old locators' damage (if any) is gone with them.
        m.damage = self.revalidate(&m)?.0;
        Ok(())
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        self.writable()?;
        if new_size == 0 || !new_size.is_multiple_of(SECTOR) || new_size > MAX_CREATE_SIZE {
            return Err(DiskError::InvalidArgument(format!(
                "VHD size {new_size} must be a non-zero multiple of 512 up to 2040 GiB"
            )));
        }
        let mut m = self.meta.write();
        self.sound(&m)?;
        self.flush_meta(&mut m)?;
        let old = m.size;
        if new_size == old {
            return Ok(());
        }
        let refuse = |why: String| DiskError::Refused {
            path: self.path.clone(),
            reason: why,
        };
        match m.geo.map(|g| (g.bs, g.bml)) {
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
                        self.load_bitmap(&mut m, bi)?;
                        let blk_start = u64::from(bi) * bs;
                        let from = new_size.max(blk_start);
                        let s0 = (from - blk_start) / SECTOR;
                        let ns = bs / SECTOR - s0;
                        if m.bitmaps
                            .get(&bi)
                            .is_none_or(|b| run_len(&b.bits, s0, ns, false) < ns)
                        {
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
        let mut m = self.meta.write();
        self.sound(&m)?;
        let Some(g) = m.geo else {
            return Ok(0);
        };
        let (bs, bml) = (g.bs, g.bml);
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
            self.load_bitmap(&mut m, bi)?;
            let mut bm = m.bitmaps.remove(&bi).map(|b| b.bits).unwrap_or_default();
            let mut changed = false;
            if base {
                self.pread(&mut buf, off)?;
                for s in 0..g.spb {
                    let d = &buf[(bml + s * SECTOR) as usize..(bml + (s + 1) * SECTOR) as usize];
                    if bit(&bm, s) && d.iter().all(|&b| b == 0) {
                        set_bits(&mut bm, s, 1, false);
                        changed = true;
                    }
                }
            }
            let empty = bm.iter().all(|&b| b == 0);
            if empty {
                if let Some(e) = m.bat.get_mut(bi as usize) {
                    *e = BAT_UNUSED;
                }
                m.dirty_bitmaps.remove(&bi);
                m.dirty_bat.insert(bi / 128);
            } else {
                m.bitmaps.insert(bi, Bitmap::new(bm, g.spb));
                if changed {
                    m.dirty_bitmaps.insert(bi);
                }
            }
        }
        self.flush_meta(&mut m)?;
        // Pass 2: slide live blocks down into the freed space, one durable step each,
        // keeping their data on page boundaries.
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
        let bt = bml + bs;
        for (k, &(off, bi)) in live.iter().enumerate() {
            if !progress(n + k as u64, n * 2) {
                return Err(DiskError::Cancelled);
            }
            let mut t = aligned_block_start(target, bml);
            // Step over metadata in the way (locators placed by set_parent).
            while let Some(r) = Self::meta_ranges(&m)
                .into_iter()
                .find(|r| r.start < t + bt && r.end > t)
            {
                t = aligned_block_start(r.end, bml);
            }
            if t + bt <= off {
                self.pread(&mut buf, off)?;
                self.pwrite(&buf, t)?;
                self.sync()?;
                if let Some(e) = m.bat.get_mut(bi as usize) {
                    *e = (t / SECTOR) as u32;
                }
                m.dirty_bat.insert(bi / 128);
                self.flush_meta(&mut m)?;
                target = t + bt;
            } else {
                target = target.max(off + bt);
            }
        }
        let new_end = round512(target.max(meta_end));
        if new_end < m.end {
            m.end = new_end;
            self.pwrite(&m.footer.to_bytes(), new_end)?;
            self.sync()?;
            self.set_len(new_end + SECTOR)?;
            self.sync()?;
        }
        Ok(old_len.saturating_sub(m.end + SECTOR))
    }

    fn check(&self, repair: bool) -> Result<CheckReport> {
        if repair {
            self.writable()?;
        }
        let mut m = self.meta.write();
        if !self.read_only && m.damage.is_empty() {
            self.flush_meta(&mut m)?;
        }
        let mut r = CheckReport::default();
        let Some(g) = m.geo else {
            let len = self.file_len()?;
            if len - SECTOR > m.size {
                r.warnings.push(format!(
                    "{} bytes between the data and the footer",
                    len - SECTOR - m.size
                ));
            }
            return Ok(r);
        };
        if repair && !m.damage.is_empty() {
            // What open found is re-derived from the file as it is now, so a repair
            // never acts on a stale list.
            m.damage = self.revalidate(&m)?.0;
            self.repair(&mut m, &mut r)?;
        }
        let (d, _) = self.revalidate(&m)?;
        m.damage = d;
        r.errors.extend(m.damage.list.iter().cloned());
        if !m.damage.is_empty() {
            r.errors.push(format!("to fix: {}", m.damage.remedy()));
        }
        let mut first = [0u8; 512];
        self.pread(&mut first, 0)?;
        if Footer::parse(&first).ok().as_ref() != Some(&m.footer) {
            r.warnings
                .push("footer copy at offset 0 differs from the footer at the end".into());
            if repair && !m.footer_missing {
                self.pwrite(&m.footer.to_bytes(), 0)?;
                self.sync()?;
                r.repaired
                    .push("rewrote the footer copy at offset 0 from the footer at the end".into());
            }
        }
        let needed = m.size.div_ceil(g.bs);
        for (i, &e) in m.bat.iter().enumerate().skip(needed as usize) {
            if e != BAT_UNUSED {
                r.warnings
                    .push(format!("BAT entry {i} beyond the disk size is allocated"));
            }
        }
        let leaked = Self::leaked(&m, g);
        if leaked > 0 && m.damage.is_empty() {
            r.warnings.push(format!(
                "{leaked} bytes of the file are not referenced (leaked; `fv vhd compact` reclaims them)"
            ));
        }
        // Unreferenced space after the last structure can go at once.
        let tail_start = Self::block_ranges(&m)
            .last()
            .map_or(0, |b| b.0 + g.bml + g.bs)
            .max(
                Self::meta_ranges(&m)
                    .iter()
                    .map(|x| x.end)
                    .max()
                    .unwrap_or(0),
            );
        if repair && m.damage.is_empty() && round512(tail_start) < m.end {
            let freed = m.end - round512(tail_start);
            m.end = round512(tail_start);
            self.pwrite(&m.footer.to_bytes(), m.end)?;
            self.sync()?;
            self.set_len(m.end + SECTOR)?;
            self.sync()?;
            r.repaired
                .push(format!("truncated {freed} unreferenced bytes at the end"));
        }
        Ok(r)
    }

    fn allocation(&self) -> Result<AllocationStats> {
        let m = self.meta.read();
        let file_size = self.file_len()?;
        let Some(g) = m.geo else {
            return Ok(AllocationStats {
                file_size,
                ..Default::default()
            });
        };
        let needed = m.size.div_ceil(g.bs) as usize;
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
        self.meta.read().size
    }

    /// The footer's current identity (follows timestamp bumps on this handle).
    pub fn identity(&self) -> LayerIdentity {
        let m = self.meta.read();
        LayerIdentity::Vhd {
            unique_id: m.footer.unique_id,
            timestamp: m.footer.timestamp,
        }
    }
}
