//! VHDX image format ([MS-VHDX]) with its metadata log.
//!
//! Layout knowledge lives in [`format`]; this module holds the open file: headers,
//! region table, metadata, the BAT (kept in memory), sector bitmaps of partially
//! present blocks, and the log through which every metadata change is made.
//!
//! Durability model: payload writes go straight to their blocks; BAT and sector
//! bitmap changes are kept in memory (so reads see them at once) and committed
//! through the log on `flush()` (or when too many pages are dirty), after an fsync
//! of the payload. A crash before `flush()` can lose unflushed writes but never
//! exposes stale data: new blocks are always appended past the end of the file.
#![forbid(unsafe_code)]

mod create;
pub mod format;
mod image;
mod layout;

use format::*;
use fv_vdisk_core::{
    check_range, coalesce, DiskError, DiskFormat, DiskKind, Extent, ExtentState, Layer,
    LayerIdentity, LayerInfo, ParentLocator, Result,
};
use parking_lot::RwLock;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::OnceLock;
use uuid::Uuid;

const FMT: &str = "VHDX";

/// `true` when `header` (the first bytes of a file) starts with the VHDX file signature.
pub fn probe(header: &[u8]) -> bool {
    header.starts_with(FILE_SIGNATURE)
}

/// How to open an image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    pub read_only: bool,
    /// Replay a dirty log. Writable opens always replay; read-only opens replay into
    /// memory only (the file is never written) when this is set, and otherwise fail
    /// with [`DiskError::DirtyLog`].
    pub replay_log: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            read_only: false,
            replay_log: true,
        }
    }
}

/// Positional file access; in a read-only replay, the log's changes are laid over
/// what is read.
pub(crate) struct Io {
    pub(crate) file: File,
    pub(crate) path: PathBuf,
    overlay: Vec<LogOp>,
}

impl Io {
    fn corrupt(&self, reason: impl Into<String>) -> DiskError {
        DiskError::corrupt(&self.path, FMT, reason)
    }

    pub(crate) fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        if self.overlay.is_empty() {
            return self.file.read_exact_at(buf, off).map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    self.corrupt(format!(
                        "read of {} bytes at {off} is beyond the end of the file",
                        buf.len()
                    ))
                } else {
                    DiskError::io("read", &self.path, e)
                }
            });
        }
        // Replayed in memory: the log may have extended the file.
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], off + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(DiskError::io("read", &self.path, e)),
            }
        }
        buf[done..].fill(0);
        let end = off + buf.len() as u64;
        for op in &self.overlay {
            let (o, data): (u64, Option<&[u8]>) = match op {
                LogOp::Data { offset, data } => (*offset, Some(data)),
                LogOp::Zero { offset, .. } => (*offset, None),
            };
            let len = match op {
                LogOp::Data { data, .. } => data.len() as u64,
                LogOp::Zero { length, .. } => *length,
            };
            let (s, e) = (o.max(off), (o.saturating_add(len)).min(end));
            if s >= e {
                continue;
            }
            let dst = &mut buf[(s - off) as usize..(e - off) as usize];
            match data {
                Some(d) => dst.copy_from_slice(&d[(s - o) as usize..(e - o) as usize]),
                None => dst.fill(0),
            }
        }
        if done < buf.len() && end > self.virtual_len()? {
            return Err(self.corrupt(format!("read at {off} is beyond the end of the file")));
        }
        Ok(())
    }

    fn virtual_len(&self) -> Result<u64> {
        let mut l = self.len()?;
        for op in &self.overlay {
            let e = match op {
                LogOp::Data { offset, data } => offset + data.len() as u64,
                LogOp::Zero { offset, length } => offset.saturating_add(*length),
            };
            l = l.max(e);
        }
        Ok(l)
    }

    pub(crate) fn write(&self, off: u64, buf: &[u8]) -> Result<()> {
        self.file
            .write_all_at(buf, off)
            .map_err(|e| DiskError::io("write", &self.path, e))
    }

    pub(crate) fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| DiskError::io("fsync", &self.path, e))
    }

    pub(crate) fn len(&self) -> Result<u64> {
        Ok(self
            .file
            .metadata()
            .map_err(|e| DiskError::io("stat", &self.path, e))?
            .len())
    }

    pub(crate) fn set_len(&self, len: u64) -> Result<()> {
        self.file
            .set_len(len)
            .map_err(|e| DiskError::io("truncate", &self.path, e))
    }
}

/// Disk geometry from the metadata region.
#[derive(Debug, Clone)]
pub(crate) struct Geo {
    pub block_size: u64,
    pub lss: u64,
    pub pss: u32,
    pub virtual_size: u64,
    pub chunk_ratio: u64,
    pub has_parent: bool,
    pub leave_allocated: bool,
}

impl Geo {
    pub(crate) fn new(
        block_size: u64,
        lss: u64,
        pss: u32,
        virtual_size: u64,
        has_parent: bool,
        leave_allocated: bool,
    ) -> Geo {
        Geo {
            block_size,
            lss,
            pss,
            virtual_size,
            chunk_ratio: ((1u64 << 23) * lss) / block_size,
            has_parent,
            leave_allocated,
        }
    }
    pub(crate) fn data_blocks(&self) -> u64 {
        self.virtual_size.div_ceil(self.block_size)
    }
    /// BAT entries the disk needs (2.5).
    pub(crate) fn required_entries(&self) -> u64 {
        let d = self.data_blocks();
        if self.has_parent {
            d.div_ceil(self.chunk_ratio) * (self.chunk_ratio + 1)
        } else if d == 0 {
            0
        } else {
            d + (d - 1) / self.chunk_ratio
        }
    }
    pub(crate) fn bat_index(&self, blk: u64) -> usize {
        (blk + blk / self.chunk_ratio) as usize
    }
    pub(crate) fn sb_index(&self, chunk: u64) -> usize {
        (chunk * (self.chunk_ratio + 1) + self.chunk_ratio) as usize
    }
    pub(crate) fn bitmap_bytes(&self) -> usize {
        (self.block_size / self.lss / 8) as usize
    }
    pub(crate) fn sectors_per_block(&self) -> u64 {
        self.block_size / self.lss
    }
    pub(crate) fn kind(&self) -> DiskKind {
        if self.has_parent {
            DiskKind::Differencing
        } else if self.leave_allocated {
            DiskKind::Fixed
        } else {
            DiskKind::Dynamic
        }
    }
}

pub(crate) struct State {
    pub hdr: Header,
    pub hdr_slot: usize,
    pub regions: Vec<RegionEntry>,
    pub log_offset: u64,
    pub log_length: u64,
    pub bat_offset: u64,
    pub bat_length: u64,
    pub meta_offset: u64,
    pub meta_length: u64,
    pub meta_entries: Vec<MetaEntry>,
    pub locator_kv: Vec<(String, String)>,
    pub disk_id: Uuid,
    pub geo: Geo,
    pub bat: Vec<u64>,
    /// Sector bitmaps of blocks that have (or had) partial presence, by block number.
    pub bitmaps: HashMap<u64, Vec<u8>>,
    /// Dirty 4 KiB pages of the BAT region (page numbers).
    pub dirty_bat: BTreeSet<usize>,
    /// Blocks whose in-memory bitmap differs from the file.
    pub dirty_bitmaps: BTreeSet<u64>,
    /// Where the next block is allocated (1 MiB aligned, never inside the file).
    pub file_end: u64,
    pub file_len: u64,
    pub file_guid_done: bool,
    pub log_seq: u64,
    /// Structural damage found by validation (empty on a sound image).
    pub damage: layout::Damage,
}

impl State {
    pub(crate) fn entry(&self, idx: usize) -> u64 {
        self.bat.get(idx).copied().unwrap_or(0)
    }
    pub(crate) fn block_entry(&self, blk: u64) -> u64 {
        self.entry(self.geo.bat_index(blk))
    }
    pub(crate) fn set_entry(&mut self, idx: usize, v: u64) {
        if let Some(e) = self.bat.get_mut(idx) {
            if *e != v {
                *e = v;
                self.dirty_bat.insert(idx / 512);
            }
        }
    }
    pub(crate) fn set_block(&mut self, blk: u64, v: u64) {
        let idx = self.geo.bat_index(blk);
        self.set_entry(idx, v);
    }
    fn bit(&self, blk: u64, sector: u64) -> bool {
        self.bitmaps
            .get(&blk)
            .and_then(|b| b.get((sector / 8) as usize))
            .map(|byte| byte & (1 << (sector % 8)) != 0)
            .unwrap_or(false)
    }
    pub(crate) fn dirty_pages_estimate(&self) -> usize {
        self.dirty_bat.len() + self.dirty_bitmaps.len() * (self.geo.bitmap_bytes() / 4096 + 1)
    }
}

/// The published facts of the image; a new one is appended whenever they change
/// (first data write, resize, reparent) so `info()` can hand out plain references.
struct Snap {
    info: LayerInfo,
    locator: Option<ParentLocator>,
    next: OnceLock<Box<Snap>>,
}

impl Snap {
    fn current(&self) -> &Snap {
        let mut s = self;
        while let Some(n) = s.next.get() {
            s = n;
        }
        s
    }
}

/// An open VHDX file: a [`Layer`] and an [`fv_vdisk_core::Image`].
pub struct VhdxFile {
    pub(crate) io: Io,
    read_only: bool,
    snaps: Snap,
    pub(crate) state: RwLock<State>,
    log_replayed: bool,
    /// The open wrote a replayed log into the file (not just into memory).
    log_in_file: bool,
    /// [`layout::Damage::kind`] of the current damage: writes are refused unless 0.
    damaged: AtomicU8,
    data_guid_done: AtomicBool,
    crash_after_log_write: AtomicBool,
    poisoned: AtomicBool,
}

fn locator_from_kv(kv: &[(String, String)]) -> ParentLocator {
    let get = |k: &str| kv.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    ParentLocator {
        relative_path: get("relative_path").map(|p| p.replace('\\', "/")),
        // "\\dir\\file" is how we store a POSIX path; "C:\\..." stays as stored.
        absolute_path: get("absolute_win32_path").map(|p| {
            if p.starts_with('\\') {
                p.replace('\\', "/")
            } else {
                p
            }
        }),
        volume_path: get("volume_path"),
        expected: get("parent_linkage")
            .and_then(|g| parse_guid_text(&g))
            .map(|g| LayerIdentity::Vhdx { data_write_guid: g }),
        parent_name: None,
    }
}

pub(crate) fn info_from_state(st: &State) -> LayerInfo {
    LayerInfo {
        format: DiskFormat::Vhdx,
        kind: st.geo.kind(),
        virtual_size: st.geo.virtual_size,
        block_size: st.geo.block_size as u32,
        logical_sector_size: st.geo.lss as u32,
        physical_sector_size: st.geo.pss,
        disk_id: Some(st.disk_id),
        identity: LayerIdentity::Vhdx {
            data_write_guid: st.hdr.data_write_guid,
        },
    }
}

fn round_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

impl VhdxFile {
    /// Open an existing image. A writable open of an image with structural damage
    /// (see [`VhdxFile::damage`]) is refused with [`DiskError::Damaged`]; a
    /// read-only open serves the sound blocks and refuses reads of damaged ones.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<VhdxFile> {
        Self::open_with(path, opts, false)
    }

    /// Open writable for `check --repair`: structural damage does not refuse the
    /// open, but the handle refuses every change except [`Image::check`] with
    /// repair (and `set_parent` when only the parent link is damaged) until the
    /// damage is gone. A dirty log is still replayed only when the replayed image
    /// opens; otherwise the file is left untouched.
    ///
    /// [`Image::check`]: fv_vdisk_core::Image::check
    pub fn open_for_repair(path: &Path) -> Result<VhdxFile> {
        Self::open_with(
            path,
            &OpenOptions {
                read_only: false,
                replay_log: true,
            },
            true,
        )
    }

    fn open_with(path: &Path, opts: &OpenOptions, repair: bool) -> Result<VhdxFile> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .open(path)
            .map_err(|e| DiskError::io("open", path, e))?;
        let mut io = Io {
            file,
            path: path.to_path_buf(),
            overlay: Vec::new(),
        };
        let corrupt = |r: String| DiskError::corrupt(path, FMT, r);
        let file_len = io.len()?;
        if file_len < MIB {
            let mut sig = [0u8; 8];
            let _ = io.file.read_at(&mut sig, 0);
            if !probe(&sig) {
                return Err(DiskError::UnknownFormat {
                    path: path.to_path_buf(),
                });
            }
            return Err(corrupt(format!(
                "file is {file_len} bytes, shorter than the 1 MiB header area"
            )));
        }
        let mut sig = [0u8; 8];
        io.read(0, &mut sig)?;
        if !probe(&sig) {
            return Err(DiskError::UnknownFormat {
                path: path.to_path_buf(),
            });
        }

        // Headers: the valid one with the higher sequence number wins.
        let mut hdrs = [None, None];
        for (i, off) in HEADER_OFFSETS.iter().enumerate() {
            let mut b = vec![0u8; HEADER_SIZE];
            io.read(*off, &mut b)?;
            hdrs[i] = Header::parse(&b);
        }
        let (hdr, hdr_slot) = match (&hdrs[0], &hdrs[1]) {
            (Some(a), Some(b)) if b.sequence > a.sequence => (b.clone(), 1),
            (Some(a), _) => (a.clone(), 0),
            (None, Some(b)) => (b.clone(), 1),
            (None, None) => {
                return Err(corrupt(
                    "neither header has a valid signature and checksum".into(),
                ))
            }
        };
        if hdr.version != 1 {
            return Err(DiskError::Unsupported {
                path: path.to_path_buf(),
                what: format!("header Version {}", hdr.version),
            });
        }
        if hdr.log_version != 0 {
            return Err(DiskError::Unsupported {
                path: path.to_path_buf(),
                what: format!("header LogVersion {}", hdr.log_version),
            });
        }
        let log_offset = hdr.log_offset;
        let log_length = hdr.log_length as u64;
        if log_offset < MIB
            || log_offset % MIB != 0
            || !log_length.is_multiple_of(MIB)
            || log_length > MAX_LOG_LENGTH
        {
            return Err(corrupt(format!(
                "header LogOffset {log_offset} / LogLength {log_length} invalid"
            )));
        }
        if log_offset.saturating_add(log_length) > file_len {
            return Err(corrupt(
                "header log region lies beyond the end of the file".into(),
            ));
        }

        // The log: what a replay would change, checked before anything is written.
        let mut pending: Option<(Vec<LogOp>, u64, usize)> = None;
        let mut log_seq = 1;
        if !hdr.log_guid.is_nil() && log_length > 0 {
            let mut log = vec![0u8; log_length as usize];
            io.read(log_offset, &mut log)?;
            let seq = find_active_sequence_bounded(&log, &hdr.log_guid)
                .map_err(|w| corrupt(format!("damaged log: {w}")))?;
            if let Some(head) = seq.last() {
                if head.flushed_file_offset > file_len {
                    return Err(corrupt(format!(
                        "log FlushedFileOffset {} is beyond the file size {file_len}: the file was truncated",
                        head.flushed_file_offset
                    )));
                }
                if opts.read_only && !opts.replay_log {
                    return Err(DiskError::DirtyLog {
                        path: path.to_path_buf(),
                    });
                }
                log_seq = head.sequence.wrapping_add(1).max(1);
                let last = head.last_file_offset;
                let entries = seq.len();
                let mut ops = Vec::new();
                for e in seq {
                    for op in e.ops {
                        let (o, l) = match &op {
                            LogOp::Data { offset, data } => (*offset, data.len() as u64),
                            LogOp::Zero { offset, length } => (*offset, *length),
                        };
                        layout::check_log_target(o, l, (log_offset, log_offset + log_length))
                            .map_err(|w| {
                                corrupt(format!("damaged log (entry {}): {w}", e.sequence))
                            })?;
                        ops.push(op);
                    }
                }
                if last > file_len {
                    // LastFileOffset: the file had grown to here.
                    ops.insert(
                        0,
                        LogOp::Zero {
                            offset: file_len,
                            length: last - file_len,
                        },
                    );
                }
                pending = Some((ops, last, entries));
            }
        }
        // Parse the image as the replay would leave it (in memory), so a replay that
        // would not open is refused before it reaches the file.
        if let Some((ops, _, _)) = &pending {
            io.overlay = ops.clone();
        }
        let layout_len = if io.overlay.is_empty() {
            file_len
        } else {
            io.virtual_len()?
        };
        let mut st = Self::load(
            &io,
            hdr.clone(),
            hdr_slot,
            layout_len,
            log_seq,
            log_offset,
            log_length,
        )?;
        if let Some((ops, last, _)) = &pending {
            let limit = layout::plausible_extent(&st, file_len);
            for op in ops {
                let (o, l) = match op {
                    LogOp::Data { offset, data } => (*offset, data.len() as u64),
                    LogOp::Zero { offset, length } => (*offset, *length),
                };
                let end = o.saturating_add(l);
                if end > limit {
                    return Err(corrupt(format!(
                        "damaged log: a descriptor writes {o}+{l}, beyond the {limit} bytes this image can plausibly need"
                    )));
                }
            }
            if *last > limit {
                return Err(corrupt(format!(
                    "damaged log: LastFileOffset {last} is beyond the {limit} bytes this image can plausibly need"
                )));
            }
        }
        let log_replayed = pending.is_some();
        let mut log_in_file = false;
        if !opts.read_only {
            if !st.damage.is_empty() && !repair {
                return Err(DiskError::Damaged {
                    path: path.to_path_buf(),
                    format: FMT,
                    damage: st.damage.summary(),
                    remedy: st.damage.remedy(),
                });
            }
            if let Some((ops, _, _)) = pending.take() {
                io.overlay.clear();
                Self::apply_replay(&io, &ops)?;
                log_in_file = true;
            }
            if !hdr.log_guid.is_nil() && log_length > 0 {
                // The log is empty (replayed or without a valid sequence): clear it.
                let mut h = hdr.clone();
                h.sequence = h.sequence.wrapping_add(1);
                h.log_guid = Uuid::nil();
                let slot = 1 - hdr_slot;
                io.write(HEADER_OFFSETS[slot], &h.to_bytes())?;
                io.sync()?;
                st = if log_in_file {
                    Self::load(&io, h, slot, io.len()?, log_seq, log_offset, log_length)?
                } else {
                    st.hdr = h;
                    st.hdr_slot = slot;
                    st
                };
            }
        }

        let info = info_from_state(&st);
        let locator = st.geo.has_parent.then(|| locator_from_kv(&st.locator_kv));
        let damaged = AtomicU8::new(st.damage.kind());
        Ok(VhdxFile {
            io,
            read_only: opts.read_only,
            snaps: Snap {
                info,
                locator,
                next: OnceLock::new(),
            },
            state: RwLock::new(st),
            log_replayed,
            log_in_file,
            damaged,
            data_guid_done: AtomicBool::new(false),
            crash_after_log_write: AtomicBool::new(false),
            poisoned: AtomicBool::new(false),
        })
    }

    /// Parse regions, metadata and the BAT of a file of `file_len` bytes (through
    /// the overlay of an in-memory replay, if any) and validate them.
    #[allow(clippy::too_many_arguments)]
    fn load(
        io: &Io,
        hdr: Header,
        hdr_slot: usize,
        file_len: u64,
        log_seq: u64,
        log_offset: u64,
        log_length: u64,
    ) -> Result<State> {
        let path = io.path.as_path();
        let corrupt = |r: String| DiskError::corrupt(path, FMT, r);
        // Region table: first valid copy.
        let mut regions = None;
        let mut region_err = String::new();
        for off in REGION_OFFSETS {
            let mut b = vec![0u8; REGION_TABLE_SIZE];
            io.read(off, &mut b)?;
            match parse_region_table(&b) {
                Ok(r) => {
                    regions = Some(r);
                    break;
                }
                Err(e) => region_err = e,
            }
        }
        let regions =
            regions.ok_or_else(|| corrupt(format!("no valid region table ({region_err})")))?;
        let mut bat_region = None;
        let mut meta_region = None;
        for r in &regions {
            let (o, l) = (r.file_offset, r.length as u64);
            if r.guid == BAT_GUID || r.guid == METADATA_GUID {
                if o < MIB
                    || o % MIB != 0
                    || l == 0
                    || l % MIB != 0
                    || o.saturating_add(l) > file_len
                {
                    return Err(corrupt(format!(
                        "region {} at {o}+{l} is invalid or beyond the end of the file",
                        r.guid
                    )));
                }
                let overlaps_log = o < log_offset + log_length && log_offset < o + l;
                if overlaps_log {
                    return Err(corrupt(format!("region {} overlaps the log", r.guid)));
                }
                if r.guid == BAT_GUID {
                    bat_region = Some((o, l));
                } else {
                    meta_region = Some((o, l));
                }
            } else if r.required {
                return Err(DiskError::Unsupported {
                    path: path.to_path_buf(),
                    what: format!("required region {}", r.guid),
                });
            }
        }
        let (bat_offset, bat_length) =
            bat_region.ok_or_else(|| corrupt("region table has no BAT region".into()))?;
        let (meta_offset, meta_length) =
            meta_region.ok_or_else(|| corrupt("region table has no metadata region".into()))?;
        if bat_offset < meta_offset + meta_length && meta_offset < bat_offset + bat_length {
            return Err(corrupt("BAT and metadata regions overlap".into()));
        }

        // Metadata.
        let mut table = vec![0u8; METADATA_TABLE_SIZE];
        io.read(meta_offset, &mut table)?;
        let meta_entries = parse_metadata_table(&table).map_err(corrupt)?;
        let mut items: HashMap<Uuid, Vec<u8>> = HashMap::new();
        for e in &meta_entries {
            let known = [
                FILE_PARAMETERS,
                VIRTUAL_DISK_SIZE,
                PAGE83_DATA,
                LOGICAL_SECTOR_SIZE,
                PHYSICAL_SECTOR_SIZE,
                PARENT_LOCATOR,
            ];
            if !known.contains(&e.item_id) {
                if e.is_required {
                    return Err(DiskError::Unsupported {
                        path: path.to_path_buf(),
                        what: format!("required metadata item {}", e.item_id),
                    });
                }
                continue;
            }
            let (o, l) = (e.offset as u64, e.length as u64);
            if l == 0 || o < METADATA_TABLE_SIZE as u64 || o + l > meta_length || l > MIB {
                return Err(corrupt(format!(
                    "metadata item {} at {o}+{l} is out of the metadata region",
                    e.item_id
                )));
            }
            let mut b = vec![0u8; l as usize];
            io.read(meta_offset + o, &mut b)?;
            items.insert(e.item_id, b);
        }
        let item = |id: &Uuid, name: &str, min: usize| -> Result<&Vec<u8>> {
            items
                .get(id)
                .filter(|b| b.len() >= min)
                .ok_or_else(|| corrupt(format!("metadata item {name} missing or too short")))
        };
        let fp = item(&FILE_PARAMETERS, "File Parameters", 8)?;
        let block_size = u32_at(fp, 0) as u64;
        let flags = u32_at(fp, 4);
        let leave_allocated = flags & 1 != 0;
        let has_parent = flags & 2 != 0;
        if !(MIB..=256 * MIB).contains(&block_size) || !block_size.is_power_of_two() {
            return Err(corrupt(format!(
                "File Parameters BlockSize {block_size} invalid"
            )));
        }
        let virtual_size = u64_at(item(&VIRTUAL_DISK_SIZE, "Virtual Disk Size", 8)?, 0);
        let lss = u32_at(item(&LOGICAL_SECTOR_SIZE, "Logical Sector Size", 4)?, 0) as u64;
        let pss = u32_at(item(&PHYSICAL_SECTOR_SIZE, "Physical Sector Size", 4)?, 0);
        let disk_id = guid_at(item(&PAGE83_DATA, "Page 83 Data", 16)?, 0);
        if lss != 512 && lss != 4096 {
            return Err(corrupt(format!("Logical Sector Size {lss} invalid")));
        }
        if pss != 512 && pss != 4096 {
            return Err(corrupt(format!("Physical Sector Size {pss} invalid")));
        }
        if virtual_size == 0 || !virtual_size.is_multiple_of(lss) || virtual_size > MAX_VIRTUAL_SIZE
        {
            return Err(corrupt(format!("Virtual Disk Size {virtual_size} invalid")));
        }
        let mut locator_kv = Vec::new();
        if has_parent {
            let b = item(&PARENT_LOCATOR, "Parent Locator", 20)?;
            let (ty, kv) = parse_parent_locator(b).map_err(corrupt)?;
            if ty != VHDX_LOCATOR_TYPE {
                return Err(DiskError::Unsupported {
                    path: path.to_path_buf(),
                    what: format!("parent locator type {ty}"),
                });
            }
            locator_kv = kv;
        }
        let geo = Geo::new(
            block_size,
            lss,
            pss,
            virtual_size,
            has_parent,
            leave_allocated,
        );

        // BAT: whole 4 KiB pages, as many as the disk needs.
        let required = geo.required_entries();
        if required * 8 > bat_length {
            return Err(corrupt(format!(
                "BAT region of {bat_length} bytes holds fewer than the {required} entries needed"
            )));
        }
        let n = round_up(required, 512).min(bat_length / 8);
        let mut raw = vec![0u8; (n * 8) as usize];
        io.read(bat_offset, &mut raw)?;
        let bat: Vec<u64> = raw.chunks_exact(8).map(|c| u64_at(c, 0)).collect();
        drop(raw);

        let mut st = State {
            hdr,
            hdr_slot,
            regions,
            log_offset,
            log_length,
            bat_offset,
            bat_length,
            meta_offset,
            meta_length,
            meta_entries,
            locator_kv,
            disk_id,
            geo,
            bat,
            bitmaps: HashMap::new(),
            dirty_bat: BTreeSet::new(),
            dirty_bitmaps: BTreeSet::new(),
            file_end: 0,
            file_len,
            file_guid_done: false,
            log_seq,
            damage: layout::Damage::default(),
        };
        st.damage = layout::validate(&st, file_len);
        Self::load_bitmaps(io, &mut st)?;
        Ok(st)
    }

    /// Load the sector bitmaps of sound partially present blocks and place the next
    /// allocation past every structure and sound block.
    pub(crate) fn load_bitmaps(io: &Io, st: &mut State) -> Result<()> {
        let g = st.geo.clone();
        let bb = g.bitmap_bytes();
        let mut end = st.file_len.max(
            layout::fixed_ranges(st)
                .iter()
                .map(|f| f.1)
                .max()
                .unwrap_or(MIB),
        );
        st.bitmaps.clear();
        for blk in 0..g.data_blocks() {
            if st.damage.blocks.contains_key(&blk) {
                continue;
            }
            let e = st.block_entry(blk);
            let s = bat_state(e);
            if s == PAYLOAD_FULLY_PRESENT || s == PAYLOAD_PARTIALLY_PRESENT {
                end = end.max(entry_offset(e).saturating_add(g.block_size));
            }
            if s == PAYLOAD_PARTIALLY_PRESENT && g.has_parent {
                // validate() made sure this sector bitmap block is present and sound.
                let sbe = st.entry(g.sb_index(blk / g.chunk_ratio));
                let off = entry_offset(sbe) + (blk % g.chunk_ratio) * bb as u64;
                let mut b = vec![0u8; bb];
                io.read(off, &mut b)?;
                st.bitmaps.insert(blk, b);
            }
        }
        if g.has_parent {
            for c in 0..g.data_blocks().div_ceil(g.chunk_ratio) {
                let idx = g.sb_index(c);
                let e = st.entry(idx);
                if bat_state(e) == SB_PRESENT && !st.damage.clear.contains_key(&idx) {
                    end = end.max(entry_offset(e).saturating_add(MIB));
                }
            }
        }
        st.file_end = end.div_ceil(MIB).saturating_mul(MIB);
        Ok(())
    }

    /// Write a validated replay into the file. Zero descriptors beyond the current end
    /// of the file are not written (new space reads as zeros): the cost is bounded by
    /// the file, not by what the log claims.
    fn apply_replay(io: &Io, ops: &[LogOp]) -> Result<()> {
        let mut cur = io.len()?;
        let mut want = cur;
        let z = vec![0u8; MIB as usize];
        for op in ops {
            match op {
                LogOp::Data { offset, data } => {
                    io.write(*offset, data)?;
                    cur = cur.max(offset.saturating_add(data.len() as u64));
                }
                LogOp::Zero { offset, length } => {
                    let end = offset.saturating_add(*length);
                    let mut o = *offset;
                    while o < end.min(cur) {
                        let n = (end.min(cur) - o).min(MIB);
                        io.write(o, &z[..n as usize])?;
                        o += n;
                    }
                    want = want.max(end);
                }
            }
        }
        if cur < want {
            io.set_len(want)?;
        }
        io.sync()
    }

    /// Create a new image (crash-safe: built under a temporary name, then linked in).
    pub fn create(path: &Path, spec: &fv_vdisk_core::CreateSpec) -> Result<VhdxFile> {
        create::create(path, spec)?;
        VhdxFile::open(path, &OpenOptions::default())
    }

    /// The current DataWriteGuid (changes before the first data change of a session).
    pub fn data_write_guid(&self) -> Uuid {
        self.state.read().hdr.data_write_guid
    }

    pub fn file_write_guid(&self) -> Uuid {
        self.state.read().hdr.file_write_guid
    }

    /// Whether opening found (and replayed) a non-empty log.
    pub fn log_was_replayed(&self) -> bool {
        self.log_replayed
    }

    /// Test hook: make the next log commit stop after the log entry is durable and
    /// before it is applied, as if the process were killed there. The handle is
    /// unusable afterwards.
    #[doc(hidden)]
    pub fn debug_crash_after_log_write(&self) {
        self.crash_after_log_write.store(true, Ordering::SeqCst);
    }

    fn corrupt(&self, reason: impl Into<String>) -> DiskError {
        self.io.corrupt(reason)
    }

    /// A damaged block is never served: its entry may point at someone else's bytes.
    fn refuse_damaged(&self, st: &State, blk: u64, offset: u64) -> Result<()> {
        match st.damage.blocks.get(&blk) {
            Some(why) => Err(DiskError::DamagedBlock {
                path: self.io.path.clone(),
                offset,
                block: blk,
                reason: why.clone(),
            }),
            None => Ok(()),
        }
    }

    pub(crate) fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(DiskError::ReadOnly {
                path: self.io.path.clone(),
            });
        }
        if self.poisoned.load(Ordering::SeqCst) {
            return Err(DiskError::Refused {
                path: self.io.path.clone(),
                reason: "handle stopped after a failed metadata commit".into(),
            });
        }
        if self.damaged.load(Ordering::SeqCst) != 0 {
            return Err(self.damaged_error());
        }
        Ok(())
    }

    pub(crate) fn damaged_error(&self) -> DiskError {
        let st = self.state.read();
        DiskError::Damaged {
            path: self.io.path.clone(),
            format: FMT,
            damage: st.damage.summary(),
            remedy: st.damage.remedy(),
        }
    }

    /// Structural damage found at open (or left after a repair): one sentence per
    /// problem. Empty for a sound image; a writable open is only possible then.
    pub fn damage(&self) -> Vec<String> {
        self.state.read().damage.list.clone()
    }

    /// Whether the open wrote a replayed log into the file (a read-only open
    /// replays into memory only; see [`VhdxFile::log_was_replayed`]).
    pub fn log_written_to_file(&self) -> bool {
        self.log_in_file
    }

    pub(crate) fn damage_kind(&self) -> u8 {
        self.damaged.load(Ordering::SeqCst)
    }

    pub(crate) fn set_damage(&self, st: &mut State, d: layout::Damage) {
        self.damaged.store(d.kind(), Ordering::SeqCst);
        st.damage = d;
    }

    pub(crate) fn publish(&self, st: &State) {
        let cur = self.snaps.current();
        let locator = st.geo.has_parent.then(|| locator_from_kv(&st.locator_kv));
        let _ = cur.next.set(Box::new(Snap {
            info: info_from_state(st),
            locator,
            next: OnceLock::new(),
        }));
    }

    /// Write the header into the older slot, making it current.
    pub(crate) fn write_header(&self, st: &mut State) -> Result<()> {
        let mut h = st.hdr.clone();
        h.sequence = h.sequence.wrapping_add(1);
        let slot = 1 - st.hdr_slot;
        self.io.write(HEADER_OFFSETS[slot], &h.to_bytes())?;
        st.hdr = h;
        st.hdr_slot = slot;
        Ok(())
    }

    /// New FileWriteGuid before the first change of the file, new DataWriteGuid before
    /// the first change of user-visible data (this is what invalidates children).
    pub(crate) fn before_modify(&self, st: &mut State, data: bool) -> Result<()> {
        let need_data = data && !self.data_guid_done.load(Ordering::SeqCst);
        if st.file_guid_done && !need_data {
            return Ok(());
        }
        st.hdr.file_write_guid = Uuid::new_v4();
        if need_data {
            st.hdr.data_write_guid = Uuid::new_v4();
        }
        st.hdr.log_guid = Uuid::nil();
        self.write_header(st)?;
        self.io.sync()?;
        st.file_guid_done = true;
        if need_data {
            self.data_guid_done.store(true, Ordering::SeqCst);
            self.publish(st);
        }
        Ok(())
    }

    /// Append `size` bytes of fresh (zero) space at the end of the file.
    pub(crate) fn allocate(&self, st: &mut State, size: u64) -> Result<u64> {
        let off = st.file_end;
        st.file_end += size;
        if st.file_len < st.file_end {
            self.io.set_len(st.file_end)?;
            st.file_len = st.file_end;
        }
        Ok(off)
    }

    fn ensure_sector_bitmap(&self, st: &mut State, blk: u64) -> Result<u64> {
        let idx = st.geo.sb_index(blk / st.geo.chunk_ratio);
        let e = st.entry(idx);
        if bat_state(e) == SB_PRESENT {
            return Ok(entry_offset(e));
        }
        let off = self.allocate(st, MIB)?;
        st.set_entry(idx, bat_entry(SB_PRESENT, off));
        Ok(off)
    }

    fn set_bits(st: &mut State, blk: u64, from: u64, to: u64, value: bool) {
        let bb = st.geo.bitmap_bytes();
        let bits = st.bitmaps.entry(blk).or_insert_with(|| vec![0u8; bb]);
        let mut s = from;
        while s < to {
            if s.is_multiple_of(8) && s + 8 <= to {
                if let Some(b) = bits.get_mut((s / 8) as usize) {
                    *b = if value { 0xff } else { 0 };
                }
                s += 8;
                continue;
            }
            if let Some(b) = bits.get_mut((s / 8) as usize) {
                if value {
                    *b |= 1 << (s % 8);
                } else {
                    *b &= !(1 << (s % 8));
                }
            }
            s += 1;
        }
        st.dirty_bitmaps.insert(blk);
    }

    fn all_bits(st: &State, blk: u64, value: bool) -> bool {
        let want = if value { 0xff } else { 0 };
        st.bitmaps
            .get(&blk)
            .is_some_and(|b| b.iter().all(|x| *x == want))
    }

    /// Whether `[off, off+len)` lies inside a structure metadata commits may change:
    /// a region table copy, the BAT, the metadata region or a present sector bitmap
    /// block (checked for every logged page, so no bug can aim the log elsewhere).
    fn metadata_target(st: &State, off: u64, len: u64) -> bool {
        let Some(end) = off.checked_add(len) else {
            return false;
        };
        let inside = |s: u64, l: u64| off >= s && s.checked_add(l).is_some_and(|e| end <= e);
        if REGION_OFFSETS
            .iter()
            .any(|r| inside(*r, REGION_TABLE_SIZE as u64))
            || inside(st.bat_offset, st.bat_length)
            || inside(st.meta_offset, st.meta_length)
        {
            return true;
        }
        if !st.geo.has_parent {
            return false;
        }
        let g = &st.geo;
        (0..g.data_blocks().div_ceil(g.chunk_ratio)).any(|c| {
            let e = st.entry(g.sb_index(c));
            bat_state(e) == SB_PRESENT && inside(entry_offset(e), MIB)
        })
    }

    /// Write inside one block under the write lock, allocating as needed.
    fn write_block(&self, st: &mut State, blk: u64, in_blk: u64, data: &[u8]) -> Result<()> {
        let g = st.geo.clone();
        let e = st.block_entry(blk);
        let state = bat_state(e);
        let len = data.len() as u64;
        let (s0, s1) = (in_blk / g.lss, (in_blk + len).div_ceil(g.lss));
        let whole = in_blk == 0 && len == g.block_size;
        match state {
            PAYLOAD_FULLY_PRESENT => self.io.write(entry_offset(e) + in_blk, data)?,
            PAYLOAD_PARTIALLY_PRESENT if g.has_parent => {
                self.io.write(entry_offset(e) + in_blk, data)?;
                Self::set_bits(st, blk, s0, s1, true);
                if Self::all_bits(st, blk, true) {
                    st.set_block(blk, bat_entry(PAYLOAD_FULLY_PRESENT, entry_offset(e)));
                }
            }
            PAYLOAD_NOT_PRESENT | PAYLOAD_UNDEFINED | PAYLOAD_ZERO | PAYLOAD_UNMAPPED => {
                let off = self.allocate(st, g.block_size)?;
                self.io.write(off + in_blk, data)?;
                let transparent =
                    g.has_parent && (state == PAYLOAD_NOT_PRESENT || state == PAYLOAD_UNMAPPED);
                if transparent && !whole {
                    self.ensure_sector_bitmap(st, blk)?;
                    Self::set_bits(st, blk, 0, g.sectors_per_block(), false);
                    Self::set_bits(st, blk, s0, s1, true);
                    st.set_block(blk, bat_entry(PAYLOAD_PARTIALLY_PRESENT, off));
                } else {
                    // A base block, or one hiding its parent: the unwritten rest is
                    // fresh zero space, so the whole block is present.
                    // Keep an existing sector bitmap truthful for other readers.
                    if g.has_parent
                        && bat_state(st.entry(g.sb_index(blk / g.chunk_ratio))) == SB_PRESENT
                    {
                        Self::set_bits(st, blk, 0, g.sectors_per_block(), true);
                    }
                    st.set_block(blk, bat_entry(PAYLOAD_FULLY_PRESENT, off));
                }
            }
            s => {
                return Err(self.corrupt(format!("BAT entry of block {blk} has invalid state {s}")))
            }
        }
        Ok(())
    }

    fn check_aligned(&self, offset: u64, len: u64, lss: u64) -> Result<()> {
        if !offset.is_multiple_of(lss) || !len.is_multiple_of(lss) {
            return Err(DiskError::Unaligned {
                offset,
                len,
                sector: lss as u32,
            });
        }
        Ok(())
    }

    /// Commit when the dirty set grows too large for one log entry.
    pub(crate) fn maybe_commit(&self, st: &mut State) -> Result<()> {
        if st.dirty_pages_estimate() * 2 >= self.max_pages_per_entry(st) {
            self.commit(st, Vec::new())?;
        }
        Ok(())
    }

    pub(crate) fn max_pages_per_entry(&self, st: &State) -> usize {
        let sectors = (st.log_length / LOG_SECTOR as u64) as usize;
        let mut n = sectors.saturating_sub(1);
        while n > 0 && descriptor_sectors(n) + n > sectors.saturating_sub(1) {
            n -= 1;
        }
        n
    }

    /// The dirty bitmap and BAT pages, bitmaps first so a BAT entry never points at
    /// a block whose bitmap is older than the entry.
    fn dirty_pages(&self, st: &State) -> Result<Vec<(u64, Vec<u8>)>> {
        let mut pages: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let bb = st.geo.bitmap_bytes() as u64;
        for &blk in &st.dirty_bitmaps {
            let sbe = st.entry(st.geo.sb_index(blk / st.geo.chunk_ratio));
            if bat_state(sbe) != SB_PRESENT {
                continue;
            }
            let Some(bits) = st.bitmaps.get(&blk) else {
                continue;
            };
            let start = entry_offset(sbe) + (blk % st.geo.chunk_ratio) * bb;
            let mut p = start / 4096 * 4096;
            while p < start + bb {
                if let std::collections::btree_map::Entry::Vacant(e) = pages.entry(p) {
                    let mut b = vec![0u8; 4096];
                    self.io.read(p, &mut b)?;
                    e.insert(b);
                }
                if let Some(page) = pages.get_mut(&p) {
                    let (s, e) = (start.max(p), (start + bb).min(p + 4096));
                    page[(s - p) as usize..(e - p) as usize]
                        .copy_from_slice(&bits[(s - start) as usize..(e - start) as usize]);
                }
                p += 4096;
            }
        }
        let mut out: Vec<(u64, Vec<u8>)> = pages.into_iter().collect();
        for &p in &st.dirty_bat {
            let mut b = vec![0u8; 4096];
            for (i, e) in st.bat.iter().skip(p * 512).take(512).enumerate() {
                put(&mut b, i * 8, &e.to_le_bytes());
            }
            out.push((st.bat_offset + p as u64 * 4096, b));
        }
        Ok(out)
    }

    /// Make pending metadata (and `extra` pages, in the same transaction where they
    /// fit) durable through the log.
    pub(crate) fn commit(&self, st: &mut State, extra: Vec<(u64, Vec<u8>)>) -> Result<()> {
        let mut pages = self.dirty_pages(st)?;
        pages.extend(extra);
        if pages.is_empty() {
            return Ok(());
        }
        self.before_modify(st, false)?;
        // Payload before the metadata that makes it reachable.
        self.io.sync()?;
        let cap = self.max_pages_per_entry(st).max(1);
        for group in pages.chunks(cap) {
            self.log_and_apply(st, group)?;
        }
        st.dirty_bat.clear();
        st.dirty_bitmaps.clear();
        // Only partially present blocks need their bitmap in memory.
        let g = st.geo.clone();
        let bat = &st.bat;
        st.bitmaps.retain(|blk, _| {
            bat_state(bat.get(g.bat_index(*blk)).copied().unwrap_or(0)) == PAYLOAD_PARTIALLY_PRESENT
        });
        Ok(())
    }

    /// One log transaction: header with a fresh LogGuid + entry, fsync; apply, fsync;
    /// header with an empty log, fsync.
    fn log_and_apply(&self, st: &mut State, group: &[(u64, Vec<u8>)]) -> Result<()> {
        for (off, data) in group {
            if !Self::metadata_target(st, *off, data.len() as u64) {
                self.poisoned.store(true, Ordering::SeqCst);
                return Err(self.corrupt(format!(
                    "refusing to log a metadata write of {} bytes at {off}: it lies outside the BAT, the metadata region, the region tables and the sector bitmap blocks",
                    data.len()
                )));
            }
        }
        let guid = Uuid::new_v4();
        st.hdr.log_guid = guid;
        self.write_header(st)?;
        let refs: Vec<(u64, &[u8])> = group.iter().map(|(o, d)| (*o, d.as_slice())).collect();
        let entry = build_log_entry(st.log_seq, 0, &guid, st.file_len, st.file_len, &refs);
        self.io.write(st.log_offset, &entry)?;
        self.io.sync()?;
        st.log_seq += 1;
        if self.crash_after_log_write.load(Ordering::SeqCst) {
            self.poisoned.store(true, Ordering::SeqCst);
            return Err(DiskError::Refused {
                path: self.io.path.clone(),
                reason: "simulated crash after the log write".into(),
            });
        }
        for (off, data) in group {
            self.io.write(*off, data)?;
        }
        self.io.sync()?;
        st.hdr.log_guid = Uuid::nil();
        self.write_header(st)?;
        self.io.sync()
    }

    fn do_write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let bs;
        {
            let st = self.state.read();
            bs = st.geo.block_size;
            if self.data_guid_done.load(Ordering::SeqCst) {
                // Fast path: every block already fully present.
                let mut all = true;
                let mut pos = 0u64;
                while pos < buf.len() as u64 {
                    let v = offset + pos;
                    let n = (bs - v % bs).min(buf.len() as u64 - pos);
                    if bat_state(st.block_entry(v / bs)) != PAYLOAD_FULLY_PRESENT
                        || (st.geo.has_parent && st.bitmaps.contains_key(&(v / bs)))
                    {
                        all = false;
                        break;
                    }
                    pos += n;
                }
                if all {
                    let mut pos = 0u64;
                    while pos < buf.len() as u64 {
                        let v = offset + pos;
                        let n = (bs - v % bs).min(buf.len() as u64 - pos);
                        let e = st.block_entry(v / bs);
                        self.io.write(
                            entry_offset(e) + v % bs,
                            &buf[pos as usize..(pos + n) as usize],
                        )?;
                        pos += n;
                    }
                    return Ok(());
                }
            }
        }
        let mut st = self.state.write();
        self.before_modify(&mut st, true)?;
        let mut pos = 0u64;
        while pos < buf.len() as u64 {
            let v = offset + pos;
            let n = (bs - v % bs).min(buf.len() as u64 - pos);
            self.write_block(
                &mut st,
                v / bs,
                v % bs,
                &buf[pos as usize..(pos + n) as usize],
            )?;
            pos += n;
        }
        self.maybe_commit(&mut st)
    }

    /// Zero or unmap `[offset, offset+len)`.
    fn zero_range(&self, offset: u64, len: u64, discard: bool) -> Result<()> {
        self.writable()?;
        let mut st = self.state.write();
        check_range(offset, len, st.geo.virtual_size)?;
        let g = st.geo.clone();
        if g.has_parent {
            self.check_aligned(offset, len, g.lss)?;
        }
        if len == 0 {
            return Ok(());
        }
        self.before_modify(&mut st, true)?;
        let bs = g.block_size;
        let zero = vec![0u8; bs.min(4 * MIB) as usize];
        let mut pos = 0u64;
        while pos < len {
            let v = offset + pos;
            let blk = v / bs;
            let in_blk = v % bs;
            let block_len = bs.min(g.virtual_size - blk * bs);
            let n = (bs - in_blk).min(len - pos);
            let e = st.block_entry(blk);
            let state = bat_state(e);
            let whole = in_blk == 0 && n >= block_len;
            if g.leave_allocated && !g.has_parent {
                // Fixed: keep every block allocated; write zeros.
                self.write_zero_bytes(&st, e, in_blk, n, &zero)?;
            } else if whole {
                let new_state = match (discard, g.has_parent) {
                    (false, _) => PAYLOAD_ZERO,
                    (true, false) => PAYLOAD_UNMAPPED,
                    (true, true) => PAYLOAD_NOT_PRESENT,
                };
                st.set_block(blk, bat_entry(new_state, 0));
                if st.bitmaps.remove(&blk).is_some() {
                    st.dirty_bitmaps.remove(&blk);
                }
            } else {
                let (s0, s1) = (in_blk / g.lss, (in_blk + n) / g.lss);
                match state {
                    PAYLOAD_FULLY_PRESENT if g.has_parent && discard => {
                        // Make the sectors transparent again.
                        self.ensure_sector_bitmap(&mut st, blk)?;
                        if !st.bitmaps.contains_key(&blk) {
                            Self::set_bits(&mut st, blk, 0, g.sectors_per_block(), true);
                        }
                        Self::set_bits(&mut st, blk, s0, s1, false);
                        st.set_block(blk, bat_entry(PAYLOAD_PARTIALLY_PRESENT, entry_offset(e)));
                    }
                    PAYLOAD_PARTIALLY_PRESENT if discard => {
                        Self::set_bits(&mut st, blk, s0, s1, false)
                    }
                    PAYLOAD_FULLY_PRESENT => self.write_zero_bytes(&st, e, in_blk, n, &zero)?,
                    PAYLOAD_PARTIALLY_PRESENT => {
                        self.write_zero_bytes(&st, e, in_blk, n, &zero)?;
                        Self::set_bits(&mut st, blk, s0, s1, true);
                        if Self::all_bits(&st, blk, true) {
                            st.set_block(blk, bat_entry(PAYLOAD_FULLY_PRESENT, entry_offset(e)));
                        }
                    }
                    PAYLOAD_NOT_PRESENT | PAYLOAD_UNMAPPED if g.has_parent && !discard => {
                        // Zeros must hide the parent: allocate (fresh space is zero).
                        let off = self.allocate(&mut st, bs)?;
                        self.ensure_sector_bitmap(&mut st, blk)?;
                        Self::set_bits(&mut st, blk, 0, g.sectors_per_block(), false);
                        Self::set_bits(&mut st, blk, s0, s1, true);
                        st.set_block(blk, bat_entry(PAYLOAD_PARTIALLY_PRESENT, off));
                    }
                    // Already reads as zero (base) or absent (discard in a child).
                    _ => {}
                }
            }
            pos += n;
        }
        self.maybe_commit(&mut st)
    }

    fn write_zero_bytes(&self, st: &State, e: u64, in_blk: u64, n: u64, zero: &[u8]) -> Result<()> {
        if bat_state(e) != PAYLOAD_FULLY_PRESENT && bat_state(e) != PAYLOAD_PARTIALLY_PRESENT {
            return Ok(());
        }
        let _ = st;
        let mut done = 0;
        while done < n {
            let k = (n - done).min(zero.len() as u64);
            self.io
                .write(entry_offset(e) + in_blk + done, &zero[..k as usize])?;
            done += k;
        }
        Ok(())
    }
}

fn push_absent(absent: &mut Vec<Range<u64>>, r: Range<u64>) {
    if let Some(last) = absent.last_mut() {
        if last.end == r.start {
            last.end = r.end;
            return;
        }
    }
    absent.push(r);
}

impl Layer for VhdxFile {
    fn info(&self) -> &LayerInfo {
        &self.snaps.current().info
    }

    fn path(&self) -> Option<&Path> {
        Some(&self.io.path)
    }

    fn parent_locator(&self) -> Option<&ParentLocator> {
        self.snaps.current().locator.as_ref()
    }

    fn read_layer(&self, offset: u64, buf: &mut [u8], absent: &mut Vec<Range<u64>>) -> Result<()> {
        let st = self.state.read();
        let g = &st.geo;
        check_range(offset, buf.len() as u64, g.virtual_size)?;
        let bs = g.block_size;
        let damaged = !st.damage.blocks.is_empty();
        let mut pos = 0usize;
        while pos < buf.len() {
            let v = offset + pos as u64;
            let blk = v / bs;
            let in_blk = v % bs;
            let n = ((bs - in_blk) as usize).min(buf.len() - pos);
            if damaged {
                self.refuse_damaged(&st, blk, v)?;
            }
            let e = st.block_entry(blk);
            let dst = &mut buf[pos..pos + n];
            match bat_state(e) {
                PAYLOAD_FULLY_PRESENT => self.io.read(entry_offset(e) + in_blk, dst)?,
                PAYLOAD_NOT_PRESENT => push_absent(absent, v..v + n as u64),
                PAYLOAD_ZERO | PAYLOAD_UNDEFINED => dst.fill(0),
                PAYLOAD_UNMAPPED if g.has_parent => push_absent(absent, v..v + n as u64),
                PAYLOAD_UNMAPPED => dst.fill(0),
                PAYLOAD_PARTIALLY_PRESENT if g.has_parent => {
                    // Runs of sectors with the same bitmap bit.
                    let mut p = in_blk;
                    let end = in_blk + n as u64;
                    while p < end {
                        let bit = st.bit(blk, p / g.lss);
                        let mut q = (p / g.lss + 1) * g.lss;
                        while q < end && st.bit(blk, q / g.lss) == bit {
                            q += g.lss;
                        }
                        let q = q.min(end);
                        let d = &mut dst[(p - in_blk) as usize..(q - in_blk) as usize];
                        if bit {
                            self.io.read(entry_offset(e) + p, d)?;
                        } else {
                            push_absent(absent, blk * bs + p..blk * bs + q);
                        }
                        p = q;
                    }
                }
                s => {
                    return Err(
                        self.corrupt(format!("BAT entry of block {blk} has invalid state {s}"))
                    )
                }
            }
            pos += n;
        }
        Ok(())
    }

    fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.writable()?;
        let (vs, lss, diff) = {
            let st = self.state.read();
            (st.geo.virtual_size, st.geo.lss, st.geo.has_parent)
        };
        check_range(offset, buf.len() as u64, vs)?;
        if diff {
            self.check_aligned(offset, buf.len() as u64, lss)?;
        }
        if buf.is_empty() {
            return Ok(());
        }
        self.do_write(offset, buf)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len, false)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len, true)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.writable()?;
        let mut st = self.state.write();
        if st.dirty_bat.is_empty() && st.dirty_bitmaps.is_empty() {
            return self.io.sync();
        }
        self.commit(&mut st, Vec::new())
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let st = self.state.read();
        let g = &st.geo;
        check_range(offset, len, g.virtual_size)?;
        let bs = g.block_size;
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < len {
            let v = offset + pos;
            let blk = v / bs;
            let in_blk = v % bs;
            let n = (bs - in_blk).min(len - pos);
            if !st.damage.blocks.is_empty() {
                self.refuse_damaged(&st, blk, v)?;
            }
            let e = st.block_entry(blk);
            let mut add = |o: u64, l: u64, state| {
                out.push(Extent {
                    offset: o,
                    length: l,
                    state,
                })
            };
            match bat_state(e) {
                PAYLOAD_FULLY_PRESENT => add(v, n, ExtentState::Data),
                PAYLOAD_NOT_PRESENT => add(v, n, ExtentState::Absent),
                PAYLOAD_UNMAPPED if g.has_parent => add(v, n, ExtentState::Absent),
                PAYLOAD_ZERO | PAYLOAD_UNDEFINED | PAYLOAD_UNMAPPED => add(v, n, ExtentState::Zero),
                PAYLOAD_PARTIALLY_PRESENT if g.has_parent => {
                    let mut p = in_blk;
                    while p < in_blk + n {
                        let bit = st.bit(blk, p / g.lss);
                        let q = ((p / g.lss + 1) * g.lss).min(in_blk + n);
                        add(
                            blk * bs + p,
                            q - p,
                            if bit {
                                ExtentState::Data
                            } else {
                                ExtentState::Absent
                            },
                        );
                        p = q;
                    }
                    coalesce(&mut out);
                }
                s => {
                    return Err(
                        self.corrupt(format!("BAT entry of block {blk} has invalid state {s}"))
                    )
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

impl Drop for VhdxFile {
    fn drop(&mut self) {
        if self.read_only || self.poisoned.load(Ordering::SeqCst) {
            return;
        }
        let mut st = self.state.write();
        if !st.dirty_bat.is_empty() || !st.dirty_bitmaps.is_empty() {
            let _ = self.commit(&mut st, Vec::new());
        }
    }
}
