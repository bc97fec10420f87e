//! Structure-aware mutation of valid VHDX images: one field changed, chosen with the
//! layout in mind (BAT entries into every region, overlapping regions, oversized log
//! descriptors, wrapped sequence numbers, bad parent linkage), and the invariants
//! every outcome must satisfy. Shared by `tests/structure_fuzz.rs` (seeded, on stable)
//! and the `structure` cargo-fuzz target (fuzz/fuzz_targets/structure.rs).
#![allow(dead_code)]

use fv_vdisk_core::{DiskError, Image, Layer};
use fv_vhdx::format::*;
use fv_vhdx::{OpenOptions, VhdxFile};
use std::path::Path;

/// The layout of a valid image, read with the crate's own parsers (the source images
/// are sound, so nothing here needs to be defensive beyond returning `None`).
#[derive(Debug, Clone)]
pub struct Layout {
    pub hdr: Header,
    pub hdr_slot: usize,
    pub regions: Vec<RegionEntry>,
    pub bat_offset: u64,
    pub bat_length: u64,
    pub meta_offset: u64,
    pub meta_length: u64,
    pub meta: Vec<MetaEntry>,
    pub block_size: u64,
    pub lss: u64,
    pub virtual_size: u64,
    pub has_parent: bool,
    pub chunk_ratio: u64,
}

impl Layout {
    pub fn parse(img: &[u8]) -> Option<Layout> {
        let mut best: Option<(Header, usize)> = None;
        for (i, off) in HEADER_OFFSETS.iter().enumerate() {
            let h = Header::parse(img.get(*off as usize..*off as usize + HEADER_SIZE)?);
            if let Some(h) = h {
                if best.as_ref().is_none_or(|(b, _)| h.sequence > b.sequence) {
                    best = Some((h, i));
                }
            }
        }
        let (hdr, hdr_slot) = best?;
        let rt = REGION_OFFSETS[0] as usize;
        let regions = parse_region_table(img.get(rt..rt + REGION_TABLE_SIZE)?).ok()?;
        let bat = regions.iter().find(|r| r.guid == BAT_GUID)?;
        let md = regions.iter().find(|r| r.guid == METADATA_GUID)?;
        let mo = md.file_offset as usize;
        let meta = parse_metadata_table(img.get(mo..mo + METADATA_TABLE_SIZE)?).ok()?;
        let item = |id: &uuid::Uuid| -> Option<&[u8]> {
            let e = meta.iter().find(|e| e.item_id == *id)?;
            let s = mo + e.offset as usize;
            img.get(s..s + e.length as usize)
        };
        let fp = item(&FILE_PARAMETERS)?;
        let block_size = u32_at(fp, 0) as u64;
        let has_parent = u32_at(fp, 4) & 2 != 0;
        let virtual_size = u64_at(item(&VIRTUAL_DISK_SIZE)?, 0);
        let lss = u32_at(item(&LOGICAL_SECTOR_SIZE)?, 0) as u64;
        Some(Layout {
            hdr,
            hdr_slot,
            bat_offset: bat.file_offset,
            bat_length: bat.length as u64,
            meta_offset: md.file_offset,
            meta_length: md.length as u64,
            regions,
            meta,
            block_size,
            lss,
            virtual_size,
            has_parent,
            chunk_ratio: ((1u64 << 23) * lss) / block_size,
        })
    }

    pub fn data_blocks(&self) -> u64 {
        self.virtual_size.div_ceil(self.block_size)
    }
    pub fn bat_index(&self, blk: u64) -> u64 {
        blk + blk / self.chunk_ratio
    }
    pub fn sb_index(&self, chunk: u64) -> u64 {
        chunk * (self.chunk_ratio + 1) + self.chunk_ratio
    }
    pub fn entry_pos(&self, idx: u64) -> usize {
        (self.bat_offset + idx * 8) as usize
    }
    pub fn entry(&self, img: &[u8], idx: u64) -> u64 {
        u64_at(img, self.entry_pos(idx))
    }
    /// (block, entry) of every payload block whose data is in the file.
    pub fn allocated(&self, img: &[u8]) -> Vec<(u64, u64)> {
        (0..self.data_blocks())
            .map(|b| (b, self.entry(img, self.bat_index(b))))
            .filter(|(_, e)| {
                matches!(
                    bat_state(*e),
                    PAYLOAD_FULLY_PRESENT | PAYLOAD_PARTIALLY_PRESENT
                )
            })
            .collect()
    }
}

pub fn set_entry(img: &mut [u8], l: &Layout, idx: u64, e: u64) {
    put(img, l.entry_pos(idx), &e.to_le_bytes());
}

/// Write a header with a higher sequence number into the other slot (so it wins).
pub fn write_header(img: &mut [u8], l: &Layout, h: &Header) {
    let mut h = h.clone();
    h.sequence = l.hdr.sequence.wrapping_add(1).max(h.sequence);
    let slot = 1 - l.hdr_slot;
    let off = HEADER_OFFSETS[slot] as usize;
    put(img, off, &h.to_bytes());
}

/// Both region table copies replaced by `regions`.
pub fn write_regions(img: &mut [u8], regions: &[RegionEntry]) {
    let t = region_table_bytes(regions);
    for off in REGION_OFFSETS {
        put(img, off as usize, &t);
    }
}

/// One log descriptor to craft.
#[derive(Debug, Clone)]
pub enum Desc {
    Data { offset: u64, page: Vec<u8> },
    Zero { offset: u64, length: u64 },
}

/// A log entry with arbitrary descriptors (data and zero), sealed with its CRC.
pub fn log_entry(seq: u64, guid: &uuid::Uuid, flushed: u64, last: u64, descs: &[Desc]) -> Vec<u8> {
    let data: Vec<(u64, &[u8])> = descs
        .iter()
        .filter_map(|d| match d {
            Desc::Data { offset, page } => Some((*offset, page.as_slice())),
            Desc::Zero { .. } => None,
        })
        .collect();
    // build_log_entry lays out data descriptors first; zero descriptors follow and
    // take no data sector.
    let zeros: Vec<(u64, u64)> = descs
        .iter()
        .filter_map(|d| match d {
            Desc::Zero { offset, length } => Some((*offset, *length)),
            Desc::Data { .. } => None,
        })
        .collect();
    let n = data.len() + zeros.len();
    let ds = descriptor_sectors(n);
    let mut b = build_log_entry(seq, 0, guid, flushed, last, &data);
    // Re-layout when the zero descriptors need more descriptor sectors.
    let have = descriptor_sectors(data.len());
    if ds > have {
        let mut nb = vec![0u8; (ds + data.len()) * LOG_SECTOR];
        nb[..have * LOG_SECTOR].copy_from_slice(&b[..have * LOG_SECTOR]);
        nb[ds * LOG_SECTOR..].copy_from_slice(&b[have * LOG_SECTOR..]);
        b = nb;
    }
    let total = b.len() as u32;
    put(&mut b, 8, &total.to_le_bytes());
    put(&mut b, 24, &(n as u32).to_le_bytes());
    for (i, (off, len)) in zeros.iter().enumerate() {
        let d = 64 + 32 * (data.len() + i);
        put(&mut b, d, b"zero");
        put(&mut b, d + 4, &[0; 4]);
        put(&mut b, d + 8, &len.to_le_bytes());
        put(&mut b, d + 16, &off.to_le_bytes());
        put(&mut b, d + 24, &seq.to_le_bytes());
    }
    put(&mut b, 4, &[0; 4]);
    let c = crc_with_hole(&b, 4);
    put(&mut b, 4, &c.to_le_bytes());
    b
}

/// Put `entries` into the log (back to back from its start) and point the current
/// header at a fresh LogGuid, as a writer that stopped before applying them would.
pub fn dirty_log(img: &mut [u8], l: &Layout, entries: &[(u64, Vec<Desc>)]) {
    let guid = uuid::Uuid::from_u128(0x5eed_0000_0000_0000_0000_0000_0000_0001);
    let mut pos = l.hdr.log_offset as usize;
    let flen = img.len() as u64;
    for (seq, descs) in entries {
        let e = log_entry(*seq, &guid, flen, flen, descs);
        if pos + e.len() > l.hdr.log_offset as usize + l.hdr.log_length as usize {
            break;
        }
        put(img, pos, &e);
        pos += e.len();
    }
    let mut h = l.hdr.clone();
    h.log_guid = guid;
    write_header(img, l, &h);
}

/// Rewrite the parent locator item in place with `kv` (it must not grow past the
/// metadata region; the table entry's length is updated).
pub fn set_locator(img: &mut [u8], l: &Layout, kv: &[(String, String)]) -> bool {
    let Some(i) = l.meta.iter().position(|e| e.item_id == PARENT_LOCATOR) else {
        return false;
    };
    let bytes = parent_locator_bytes(kv);
    let mut meta = l.meta.clone();
    let off = meta[i].offset as u64;
    if off + bytes.len() as u64 > l.meta_length {
        return false;
    }
    meta[i].length = bytes.len() as u32;
    put(img, (l.meta_offset + off) as usize, &bytes);
    put(img, l.meta_offset as usize, &metadata_table_bytes(&meta));
    true
}

pub fn locator_kv(img: &[u8], l: &Layout) -> Vec<(String, String)> {
    l.meta
        .iter()
        .find(|e| e.item_id == PARENT_LOCATOR)
        .and_then(|e| {
            let s = (l.meta_offset + e.offset as u64) as usize;
            parse_parent_locator(img.get(s..s + e.length as usize)?).ok()
        })
        .map(|(_, kv)| kv)
        .unwrap_or_default()
}

/// Deterministic choices (splitmix64), fed by a seed or by fuzzer bytes.
pub struct Pick(pub u64);
impl Pick {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    pub fn of<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len() as u64) as usize]
    }
}

/// Mutation classes (`mutate` picks one).
pub const CLASSES: [&str; 12] = [
    "bat-into-region",
    "bat-duplicate",
    "bat-invalid-state",
    "sector-bitmap-into-region",
    "regions-overlap",
    "metadata-items-overlap",
    "log-oversized-zero",
    "log-over-structures",
    "log-wrapped-sequence",
    "log-bat-into-region",
    "parent-linkage",
    "header-log-fields",
];

/// Change one field of `img` (a valid image); returns what was done.
pub fn mutate(img: &mut [u8], p: &mut Pick) -> String {
    let Some(l) = Layout::parse(img) else {
        return "source does not parse".into();
    };
    let flen = img.len() as u64;
    let allocated = l.allocated(img);
    let targets = [
        (0u64, "header area"),
        (l.hdr.log_offset, "log"),
        (l.bat_offset, "BAT"),
        (l.meta_offset, "metadata"),
        (flen.div_ceil(MIB) * MIB + 64 * MIB, "beyond EOF"),
        (0xFFFF_FFFF_FFF0_0000, "top of u64"),
        (flen.saturating_sub(MIB) / MIB * MIB, "last MiB"),
    ];
    let class = p.below(CLASSES.len() as u64) as usize;
    let blk = p.below(l.data_blocks().max(1));
    match class {
        0 => {
            let (t, what) = p.of(&targets);
            let st = p.of(&[PAYLOAD_FULLY_PRESENT, PAYLOAD_PARTIALLY_PRESENT]);
            set_entry(img, &l, l.bat_index(blk), bat_entry(st, t));
            format!("block {blk} -> {what} ({t:#x}, state {st})")
        }
        1 => {
            let Some(&(other, e)) = allocated.get(p.below(allocated.len() as u64) as usize) else {
                return "no allocated block to duplicate".into();
            };
            let blk = if blk == other {
                (blk + 1) % l.data_blocks()
            } else {
                blk
            };
            set_entry(img, &l, l.bat_index(blk), e);
            format!("block {blk} duplicates block {other}")
        }
        2 => {
            let st = p.of(&[4u64, 5, 7]);
            let off = allocated
                .first()
                .map(|a| entry_offset(a.1))
                .unwrap_or(flen / MIB * MIB);
            set_entry(img, &l, l.bat_index(blk), bat_entry(st, off));
            format!("block {blk} state {st}")
        }
        3 => {
            let c = p.below(l.data_blocks().div_ceil(l.chunk_ratio).max(1));
            let (t, what) = p.of(&targets);
            let idx = l.sb_index(c);
            if (idx + 1) * 8 > l.bat_length {
                return "no sector bitmap entry".into();
            }
            set_entry(img, &l, idx, bat_entry(SB_PRESENT, t));
            format!("sector bitmap {c} -> {what}")
        }
        4 => {
            let mut r = l.regions.clone();
            let (a, b) = (
                p.below(r.len() as u64) as usize,
                p.below(r.len() as u64) as usize,
            );
            let shift = p.of(&[0u64, MIB, 0x8000_0000_0000_0000]);
            r[a].file_offset = r[b].file_offset.wrapping_add(shift);
            if p.below(2) == 0 {
                r[a].length = p.of(&[0u32, 1, !0xFFFFFu32, r[b].length]);
            }
            write_regions(img, &r);
            format!("region {a} moved onto region {b} (+{shift:#x})")
        }
        5 => {
            let mut m = l.meta.clone();
            if m.len() < 2 {
                return "too few metadata items".into();
            }
            let (a, b) = (
                p.below(m.len() as u64) as usize,
                p.below(m.len() as u64) as usize,
            );
            m[a].offset = m[b].offset.wrapping_add(p.of(&[0u32, 4, 0xFFFF_FFF0]));
            put(img, l.meta_offset as usize, &metadata_table_bytes(&m));
            format!("metadata item {a} onto item {b}")
        }
        6 => {
            let length = p.of(&[1u64 << 40, flen * 4096, !4095u64, 64 * MIB]);
            let offset = p.of(&[flen / 4096 * 4096, 2 * MIB, l.bat_offset, 1 << 44]);
            dirty_log(img, &l, &[(1, vec![Desc::Zero { offset, length }])]);
            format!("log zero descriptor {offset}+{length}")
        }
        7 => {
            let offset = p.of(&[
                0u64,
                64 * KIB,
                128 * KIB,
                192 * KIB,
                320 * KIB,
                l.hdr.log_offset,
            ]);
            let page = vec![p.next() as u8; 4096];
            let d = if p.below(2) == 0 {
                Desc::Data { offset, page }
            } else {
                Desc::Zero {
                    offset,
                    length: 4096 * (1 + p.below(16)),
                }
            };
            dirty_log(img, &l, &[(1, vec![d])]);
            format!("log descriptor at {offset}")
        }
        8 => {
            // Consecutive entries whose sequence numbers wrap past u64::MAX, with a
            // BAT page rewritten by each.
            let mut page = vec![0u8; 4096];
            if let Some(s) = img.get(l.bat_offset as usize..l.bat_offset as usize + 4096) {
                page.copy_from_slice(s);
            }
            let start = p.of(&[u64::MAX - 1, u64::MAX, 0, 1 << 63]);
            let entries: Vec<(u64, Vec<Desc>)> = (0..3)
                .map(|i| {
                    (
                        start.wrapping_add(i),
                        vec![Desc::Data {
                            offset: l.bat_offset,
                            page: page.clone(),
                        }],
                    )
                })
                .collect();
            dirty_log(img, &l, &entries);
            format!("log sequence from {start:#x} wrapping")
        }
        9 => {
            // A valid-looking log whose replay would point a block into a structure.
            let (t, what) = p.of(&targets);
            let idx = l.bat_index(blk);
            let page_off = l.bat_offset + idx * 8 / 4096 * 4096;
            let mut page = vec![0u8; 4096];
            if let Some(s) = img.get(page_off as usize..page_off as usize + 4096) {
                page.copy_from_slice(s);
            }
            put(
                &mut page,
                (idx * 8 % 4096) as usize,
                &bat_entry(PAYLOAD_FULLY_PRESENT, t).to_le_bytes(),
            );
            dirty_log(
                img,
                &l,
                &[(
                    7,
                    vec![Desc::Data {
                        offset: page_off,
                        page,
                    }],
                )],
            );
            format!("log sets block {blk} -> {what}")
        }
        10 => {
            if !l.has_parent {
                return "not differencing".into();
            }
            let mut kv = locator_kv(img, &l);
            match p.below(4) {
                0 => kv.retain(|(k, _)| k != "parent_linkage"),
                1 => {
                    for (k, v) in kv.iter_mut() {
                        if k == "parent_linkage" {
                            *v = "{not-a-guid}".into();
                        }
                    }
                }
                2 => kv.retain(|(k, _)| k == "parent_linkage"),
                _ => kv.clear(),
            }
            set_locator(img, &l, &kv);
            format!("parent locator now {kv:?}")
        }
        _ => {
            let mut h = l.hdr.clone();
            match p.below(4) {
                0 => h.log_offset = p.of(&[0u64, l.bat_offset, l.meta_offset, !0xFFFFFu64]),
                1 => h.log_length = p.of(&[0u32, !0xFFFFFu32, 4096]),
                2 => h.sequence = u64::MAX,
                _ => h.log_guid = uuid::Uuid::from_u128(p.next() as u128 | 1),
            }
            write_header(img, &l, &h);
            format!("header log fields {h:?}")
        }
    }
}

/// Outcome counters of [`judge`].
#[derive(Debug, Default, Clone, Copy)]
pub struct Outcome {
    pub refused_ro: usize,
    pub damaged_ro_ok: usize,
    pub sound: usize,
}

/// The invariants, for the image file at `path`:
/// - a read-only open yields an image or a typed error, never a panic;
/// - what opens read-only serves each block or refuses it with a typed error;
/// - when read-only open fails or `check` reports errors, a writable open is
///   refused and leaves the file byte-identical;
/// - a writable open that succeeds leaves an image that still opens and checks clean.
pub fn judge(path: &Path, what: &str) -> Result<Outcome, String> {
    let before = std::fs::read(path).map_err(|e| e.to_string())?;
    let ro = OpenOptions {
        read_only: true,
        replay_log: true,
    };
    let mut out = Outcome::default();
    let damaged = match VhdxFile::open(path, &ro) {
        Err(_) => {
            out.refused_ro = 1;
            true
        }
        Ok(v) => {
            let size = v.info().virtual_size;
            let bs = v.info().block_size as u64;
            let mut buf = vec![0u8; 4096];
            let mut off = 0;
            let mut read_errors = 0;
            while off < size && off < 256 * MIB {
                let n = (size - off).min(buf.len() as u64) as usize;
                match v.read_layer(off, &mut buf[..n], &mut Vec::new()) {
                    Ok(()) => {}
                    Err(DiskError::DamagedBlock { .. }) | Err(DiskError::Corrupt { .. }) => {
                        read_errors += 1
                    }
                    Err(e) => return Err(format!("{what}: read at {off}: unexpected {e}")),
                }
                off += bs;
            }
            let r = v
                .check(false)
                .map_err(|e| format!("{what}: check failed: {e}"))?;
            if !r.repaired.is_empty() || r.log_replayed {
                return Err(format!("{what}: a read-only check claims changes: {r:?}"));
            }
            if read_errors > 0 && r.errors.is_empty() {
                return Err(format!(
                    "{what}: {read_errors} blocks refused but check is clean"
                ));
            }
            if !v.damage().is_empty() && r.errors.is_empty() {
                return Err(format!(
                    "{what}: open found damage {:?} that check does not report",
                    v.damage()
                ));
            }
            if r.errors.is_empty() {
                out.sound = 1;
            } else {
                out.damaged_ro_ok = 1;
            }
            !r.errors.is_empty()
        }
    };
    let now = std::fs::read(path).map_err(|e| e.to_string())?;
    if now != before {
        return Err(format!("{what}: a read-only open changed the file"));
    }
    match VhdxFile::open(path, &OpenOptions::default()) {
        Ok(v) if damaged => {
            return Err(format!(
                "{what}: writable open of a damaged image succeeded: {:?}",
                v.damage()
            ));
        }
        Ok(v) => {
            // A sound image stays sound through a write.
            let size = v.info().virtual_size;
            let lss = v.info().logical_sector_size as u64;
            let off = (size / 2) / lss * lss;
            let n = (64 * KIB).min(size - off) / lss * lss;
            if n > 0 {
                v.write(off, &vec![0xA5; n as usize])
                    .map_err(|e| format!("{what}: write to a sound image failed: {e}"))?;
                v.flush()
                    .map_err(|e| format!("{what}: flush failed: {e}"))?;
            }
            drop(v);
            let v = VhdxFile::open(path, &ro)
                .map_err(|e| format!("{what}: after a write the image does not open: {e}"))?;
            let r = v.check(false).map_err(|e| e.to_string())?;
            if !r.errors.is_empty() {
                return Err(format!(
                    "{what}: after a write check reports {:?}",
                    r.errors
                ));
            }
        }
        Err(_) => {
            let now = std::fs::read(path).map_err(|e| e.to_string())?;
            if now != before {
                return Err(format!("{what}: a refused writable open changed the file"));
            }
        }
    }
    Ok(out)
}
