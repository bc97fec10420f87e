//! Open any image, resolve differencing chains, and the disk operations (convert,
//! compact, resize, merge, set-parent, check). Knows nothing about VMs.
#![forbid(unsafe_code)]

pub mod convert;
pub mod ops;

pub use fv_vdisk_core::*;

use std::cell::RefCell;
use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// Longest chain we follow; deeper chains are refused as corrupt (Hyper-V's practical
/// limit is far lower).
pub const MAX_CHAIN_DEPTH: usize = 128;

/// How to open a disk.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    pub read_only: bool,
    /// VHDX: replay a dirty log even when opening read-only.
    pub replay_log: bool,
    /// Where parents may live.
    pub policy: PathPolicy,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            read_only: false,
            replay_log: false,
            policy: PathPolicy::image_dir_only(),
        }
    }
}

/// One opened image file of any format.
pub enum LayerFile {
    Raw(RawLayer),
    Vhd(fv_vhd::VhdFile),
    Vhdx(fv_vhdx::VhdxFile),
}

impl LayerFile {
    pub fn layer(&self) -> &dyn Layer {
        match self {
            LayerFile::Raw(l) => l,
            LayerFile::Vhd(l) => l,
            LayerFile::Vhdx(l) => l,
        }
    }

    /// Format-specific operations (raw files have none).
    pub fn image(&self) -> Option<&dyn Image> {
        match self {
            LayerFile::Raw(_) => None,
            LayerFile::Vhd(l) => Some(l),
            LayerFile::Vhdx(l) => Some(l),
        }
    }

    /// The identity a child made now would record (follows this handle's writes).
    pub fn current_identity(&self) -> LayerIdentity {
        match self {
            LayerFile::Raw(_) => LayerIdentity::None,
            LayerFile::Vhd(v) => v.identity(),
            LayerFile::Vhdx(v) => LayerIdentity::Vhdx {
                data_write_guid: v.data_write_guid(),
            },
        }
    }

    /// Current virtual size (follows a resize on this handle).
    pub fn size(&self) -> u64 {
        match self {
            LayerFile::Raw(l) => l.info().virtual_size,
            LayerFile::Vhd(v) => v.size(),
            LayerFile::Vhdx(v) => v.info().virtual_size,
        }
    }
}

/// Work out an image's format from its contents (and, for raw, its extension).
pub fn detect_format(path: &Path) -> Result<DiskFormat> {
    let mut f = File::open(path).map_err(|e| DiskError::io("open", path, e))?;
    let len = f
        .metadata()
        .map_err(|e| DiskError::io("stat", path, e))?
        .len();
    let mut first = [0u8; 512];
    let n = read_up_to(&mut f, &mut first).map_err(|e| DiskError::io("read", path, e))?;
    if fv_vhdx::probe(&first[..n]) {
        return Ok(DiskFormat::Vhdx);
    }
    let mut last = [0u8; 512];
    if len >= 512 {
        f.read_exact_at(&mut last, len - 512)
            .map_err(|e| DiskError::io("read", path, e))?;
    }
    if len >= 512 && fv_vhd::probe(&first[..n], &last) {
        return Ok(DiskFormat::Vhd);
    }
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
    {
        Some(e) if e == "img" || e == "raw" => Ok(DiskFormat::Raw),
        _ => Err(DiskError::UnknownFormat {
            path: path.to_path_buf(),
        }),
    }
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// One image file opened by [`open_layer`], holding its image lock (QEMU's lock
/// bytes: shared for a read-only open, exclusive for a writable one) for as long
/// as it lives. Derefs to the [`LayerFile`].
pub struct LockedLayer {
    file: LayerFile,
    lock: Option<ImageLock>,
}

impl LockedLayer {
    /// Split into the file and its lock (`None` when the caller already held one).
    pub fn into_parts(self) -> (LayerFile, Option<ImageLock>) {
        (self.file, self.lock)
    }
}

impl std::ops::Deref for LockedLayer {
    type Target = LayerFile;
    fn deref(&self) -> &LayerFile {
        &self.file
    }
}

/// The lock an open with `opts` takes.
pub fn lock_mode(opts: &OpenOptions) -> LockMode {
    if opts.read_only {
        LockMode::Shared
    } else {
        LockMode::Exclusive
    }
}

/// Open one image file (no parent resolution), after taking its image lock, so a
/// writable open never touches (e.g. replays the log of) a file another process
/// uses. A refusal is [`DiskError::Locked`], naming the holder.
pub fn open_layer(
    path: &Path,
    format: Option<DiskFormat>,
    opts: &OpenOptions,
) -> Result<LockedLayer> {
    let lock = ImageLock::acquire(path, lock_mode(opts))?;
    let file = open_layer_unlocked(path, format, opts)?;
    Ok(LockedLayer {
        file,
        lock: Some(lock),
    })
}

/// Open one image file writable for `check --repair` and `set-parent`, after
/// taking its exclusive lock: damage found at open does not refuse the open, but
/// the format refuses guest writes until the damage is repaired.
pub fn open_layer_for_repair(path: &Path) -> Result<LockedLayer> {
    let lock = ImageLock::acquire(path, LockMode::Exclusive)?;
    let file = match detect_format(path)? {
        DiskFormat::Raw => LayerFile::Raw(RawLayer::open(path, false)?),
        DiskFormat::Vhd => LayerFile::Vhd(fv_vhd::VhdFile::open_for_repair(path)?),
        DiskFormat::Vhdx => LayerFile::Vhdx(fv_vhdx::VhdxFile::open_for_repair(path)?),
    };
    Ok(LockedLayer {
        file,
        lock: Some(lock),
    })
}

/// Open one image file without taking its lock: for callers that already hold
/// one on it (a lock held elsewhere in this process would refuse our own open),
/// and for read-only peeks at metadata (parent locators) that serve no data.
pub(crate) fn open_layer_unlocked(
    path: &Path,
    format: Option<DiskFormat>,
    opts: &OpenOptions,
) -> Result<LayerFile> {
    let format = match format {
        Some(f) => f,
        None => detect_format(path)?,
    };
    match format {
        DiskFormat::Raw => Ok(LayerFile::Raw(RawLayer::open(path, opts.read_only)?)),
        DiskFormat::Vhd => Ok(LayerFile::Vhd(fv_vhd::VhdFile::open(path, opts.read_only)?)),
        DiskFormat::Vhdx => Ok(LayerFile::Vhdx(fv_vhdx::VhdxFile::open(
            path,
            &fv_vhdx::OpenOptions {
                read_only: opts.read_only,
                replay_log: opts.replay_log,
            },
        )?)),
    }
}

/// Where a locator's candidate paths point, in the order to try them.
pub fn parent_candidates(child: &Path, loc: &ParentLocator) -> Vec<PathBuf> {
    let dir = child.parent().unwrap_or(Path::new("."));
    let mut v = Vec::new();
    if let Some(r) = &loc.relative_path {
        v.push(dir.join(normalise_locator_path(r)));
    }
    if let Some(a) = &loc.absolute_path {
        let p = normalise_locator_path(a);
        if p.is_absolute() {
            v.push(p);
        } else if let Some(name) = p.file_name() {
            // A Windows path ("C:/dir/base.vhd"): only its file name means anything here.
            v.push(dir.join(name));
        }
    }
    if v.is_empty() {
        if let Some(n) = &loc.parent_name {
            if let Some(name) = normalise_locator_path(n).file_name() {
                v.push(dir.join(name));
            }
        }
    }
    v
}

/// Resolve a child's parent: the first existing candidate inside the policy.
pub fn resolve_parent(
    child: &Path,
    loc: &ParentLocator,
    policy: &PathPolicy,
    top_dir: &Path,
) -> Result<PathBuf> {
    let cands = parent_candidates(child, loc);
    let mut refused = None;
    for c in &cands {
        let Ok(canon) = c.canonicalize() else {
            continue;
        };
        if !canon.is_file() {
            continue;
        }
        if policy.permits(&canon, top_dir) {
            return Ok(canon);
        }
        refused.get_or_insert(canon);
    }
    if let Some(p) = refused {
        return Err(DiskError::ParentNotAllowed {
            child: child.to_path_buf(),
            parent: p,
        });
    }
    Err(DiskError::ParentNotFound {
        child: child.to_path_buf(),
        tried: if cands.is_empty() {
            "no parent locator".into()
        } else {
            cands
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        },
    })
}

/// Does `parent` satisfy what `child` recorded about it? Err(reason) if not.
pub fn verify_link(child: &LayerFile, parent: &LayerFile) -> std::result::Result<(), String> {
    let ci = child.layer().info();
    let pi = parent.layer().info();
    if ci.format != pi.format {
        return Err(format!(
            "a {:?} child cannot have a {:?} parent (mixed formats)",
            ci.format, pi.format
        ));
    }
    let expected = child
        .layer()
        .parent_locator()
        .and_then(|l| l.expected.clone());
    match expected {
        // A differencing child that records nothing (VHDX parent_linkage missing
        // or malformed) cannot prove any parent is its own: never "verified".
        None | Some(LayerIdentity::None) => {
            return Err(
                "the child records no parent identity (parent_linkage missing or malformed)".into(),
            )
        }
        Some(exp) if exp != pi.identity => {
            return Err(format!(
            "parent identity {:?} does not match the recorded {:?} (parent modified or replaced)",
            pi.identity, exp
        ))
        }
        Some(_) => {}
    }
    if pi.virtual_size != ci.virtual_size {
        return Err(format!(
            "parent is {} bytes, child {} bytes",
            pi.virtual_size, ci.virtual_size
        ));
    }
    Ok(())
}

/// A disk: a top image and its verified ancestors, top first.
pub struct Disk {
    layers: Vec<LayerFile>,
    /// The image locks of the layers (exclusive on a writable top, shared on the
    /// rest), released when the disk is dropped.
    _locks: Vec<ImageLock>,
    paths: Vec<PathBuf>,
    size: u64,
    read_only: bool,
    /// Serialises read-modify-write of partial sectors.
    rmw: parking_lot::Mutex<()>,
    /// Which ancestor serves each unit of the disk (see [`OwnerMap`]).
    owners: OwnerMap,
}

/// Owner cache for the layers below the top. Ancestors are opened read-only and
/// nothing changes them while the chain is open (their handles never re-read their
/// metadata either), so "which ancestor holds unit N" is computed once per unit and
/// a read that falls through the top goes straight to the first layer with data
/// there instead of asking every empty layer in between (a depth-32 chain otherwise costs 31 metadata
/// lookups per read). Only the top layer is writable, and it is always consulted
/// first, so its writes and discards need no invalidation here.
struct OwnerMap {
    /// log2 of the unit size: the smallest block size among the ancestors, so a
    /// unit is normally wholly inside one block of every ancestor.
    shift: u32,
    /// Lazily filled pages of [`OWNERS_PER_PAGE`] entries: 0 = not computed yet,
    /// otherwise the level of the first ancestor holding anything in the unit
    /// (== number of layers when none does: zeros); [`OWNER_WALK`] = unknown
    /// (walk from the first ancestor).
    pages: Vec<OnceLock<Box<[AtomicU8]>>>,
}

const OWNERS_PER_PAGE: u64 = 4096;
const OWNER_UNKNOWN: u8 = 0;
const OWNER_WALK: u8 = u8::MAX;
// Levels are stored in a u8 next to the two markers above.
const _: () = assert!(MAX_CHAIN_DEPTH < OWNER_WALK as usize);

impl OwnerMap {
    fn new(layers: &[LayerFile], size: u64) -> OwnerMap {
        if layers.len() < 2 {
            return OwnerMap {
                shift: 0,
                pages: Vec::new(),
            };
        }
        let unit = layers[1..]
            .iter()
            .map(|l| u64::from(l.layer().info().block_size))
            .filter(|b| *b > 0)
            .min()
            .unwrap_or(2 << 20)
            .clamp(64 << 10, 256 << 20);
        // Round down to a power of two (block sizes are, but be safe on odd files).
        let shift = 63 - unit.leading_zeros();
        let units = size.div_ceil(1 << shift);
        let pages = (0..units.div_ceil(OWNERS_PER_PAGE))
            .map(|_| OnceLock::new())
            .collect();
        OwnerMap { shift, pages }
    }

    fn slot(&self, unit: u64) -> Option<&AtomicU8> {
        let page = self.pages.get((unit / OWNERS_PER_PAGE) as usize)?;
        let page = page.get_or_init(|| {
            (0..OWNERS_PER_PAGE)
                .map(|_| AtomicU8::new(OWNER_UNKNOWN))
                .collect()
        });
        page.get((unit % OWNERS_PER_PAGE) as usize)
    }
}

/// Open a disk image and its differencing chain.
pub fn open(path: &Path, opts: &OpenOptions) -> Result<Disk> {
    open_format(path, None, opts)
}

/// As [`open`], with the top image's format given explicitly (e.g. raw without a
/// .img/.raw extension).
pub fn open_format(path: &Path, format: Option<DiskFormat>, opts: &OpenOptions) -> Result<Disk> {
    let top_dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let (top, top_lock) = open_layer(path, format, opts)?.into_parts();
    let mut locks: Vec<ImageLock> = top_lock.into_iter().collect();
    let mut seen = HashSet::new();
    let canon = path
        .canonicalize()
        .map_err(|e| DiskError::io("resolve", path, e))?;
    seen.insert(canon);
    let mut layers = vec![top];
    let mut paths = vec![path.to_path_buf()];
    let parent_opts = OpenOptions {
        read_only: true,
        ..opts.clone()
    };
    while let Some(loc) = layers
        .last()
        .and_then(|l| l.layer().parent_locator())
        .cloned()
    {
        let child_path = paths.last().cloned().unwrap_or_default();
        if layers.len() >= MAX_CHAIN_DEPTH {
            return Err(DiskError::Refused {
                path: path.to_path_buf(),
                reason: format!("differencing chain deeper than {MAX_CHAIN_DEPTH}"),
            });
        }
        let ppath = resolve_parent(&child_path, &loc, &opts.policy, &top_dir)?;
        if !seen.insert(ppath.clone()) {
            return Err(DiskError::CyclicChain { path: ppath });
        }
        let (parent, parent_lock) = open_layer(&ppath, None, &parent_opts)?.into_parts();
        locks.extend(parent_lock);
        let child = layers.last().ok_or(DiskError::Cancelled)?;
        verify_link(child, &parent).map_err(|reason| DiskError::BrokenChain {
            child: child_path.clone(),
            parent: ppath.display().to_string(),
            reason,
        })?;
        layers.push(parent);
        paths.push(ppath);
    }
    let size = layers[0].layer().info().virtual_size;
    let owners = OwnerMap::new(&layers, size);
    Ok(Disk {
        layers,
        _locks: locks,
        paths,
        size,
        read_only: opts.read_only,
        rmw: parking_lot::Mutex::new(()),
        owners,
    })
}

thread_local! {
    /// Absent-range vectors reused across reads so deep chains do not allocate per layer.
    static ABSENT_POOL: RefCell<Vec<Vec<Range<u64>>>> = const { RefCell::new(Vec::new()) };
}

fn take_vec() -> Vec<Range<u64>> {
    ABSENT_POOL
        .with(|p| p.borrow_mut().pop())
        .unwrap_or_default()
}

fn give_vec(mut v: Vec<Range<u64>>) {
    v.clear();
    ABSENT_POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < MAX_CHAIN_DEPTH {
            p.push(v)
        }
    });
}

impl Disk {
    /// The layers, top first.
    pub fn layers(&self) -> &[LayerFile] {
        &self.layers
    }

    /// Paths of the layers, top first (parents canonical).
    pub fn layer_paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Format operations on the top image (e.g. `set_parent` while it is open).
    pub fn top_image(&self) -> Option<&dyn Image> {
        self.layers.first().and_then(|l| l.image())
    }

    /// Read through the chain starting at `level`. Below the top, ranges go
    /// straight to the ancestor that owns them (see [`OwnerMap`]).
    fn read_from(&self, level: usize, offset: u64, buf: &mut [u8]) -> Result<()> {
        let Some(layer) = self.layers.get(level) else {
            buf.fill(0);
            return Ok(());
        };
        let mut absent = take_vec();
        let r = layer.layer().read_layer(offset, buf, &mut absent);
        let r = r.and_then(|_| {
            for a in &absent {
                let s = (a.start.saturating_sub(offset)) as usize;
                let e = ((a.end.saturating_sub(offset)) as usize).min(buf.len());
                if s >= e {
                    continue;
                }
                let (start, part) = (offset + s as u64, &mut buf[s..e]);
                if level == 0 {
                    self.read_lower(start, part)?;
                } else {
                    self.read_from(level + 1, start, part)?;
                }
            }
            Ok(())
        });
        give_vec(absent);
        r
    }

    /// Read a range the top layer does not hold: split it into owner-cache units
    /// and read each run of units with the same owner from that owner directly.
    fn read_lower(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let shift = self.owners.shift;
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let owner = self.owner(pos >> shift)?;
            let mut run_end = ((pos >> shift) + 1) << shift;
            while run_end < end && self.owner(run_end >> shift)? == owner {
                run_end += 1 << shift;
            }
            let run_end = run_end.min(end);
            let part = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
            let level = if owner == OWNER_WALK {
                1
            } else {
                usize::from(owner)
            };
            self.read_from(level, pos, part)?;
            pos = run_end;
        }
        Ok(())
    }

    /// The level of the first ancestor holding data in `unit`, computed on first use.
    fn owner(&self, unit: u64) -> Result<u8> {
        let Some(slot) = self.owners.slot(unit) else {
            return Ok(OWNER_WALK);
        };
        let cached = slot.load(Ordering::Relaxed);
        if cached != OWNER_UNKNOWN {
            return Ok(cached);
        }
        let start = unit << self.owners.shift;
        let len = (1u64 << self.owners.shift).min(self.size.saturating_sub(start));
        // The first ancestor holding anything in the unit. Reading from it is exact:
        // everything above it is absent here, and whatever it lacks falls through
        // to the layers below it as usual.
        let mut owner = self.layers.len();
        for (level, l) in self.layers.iter().enumerate().skip(1) {
            let ext = l.layer().extents(start, len)?;
            if ext.iter().any(|e| e.state != ExtentState::Absent) {
                owner = level;
                break;
            }
        }
        let owner = u8::try_from(owner).unwrap_or(OWNER_WALK);
        // Racing threads compute the same answer; either store is fine.
        slot.store(owner, Ordering::Relaxed);
        Ok(owner)
    }

    fn status_from(
        &self,
        level: usize,
        offset: u64,
        len: u64,
        out: &mut Vec<Extent>,
    ) -> Result<()> {
        let Some(layer) = self.layers.get(level) else {
            out.push(Extent {
                offset,
                length: len,
                state: ExtentState::Absent,
            });
            return Ok(());
        };
        for e in layer.layer().extents(offset, len)? {
            if e.state == ExtentState::Absent {
                self.status_from(level + 1, e.offset, e.length, out)?;
            } else {
                out.push(e);
            }
        }
        Ok(())
    }

    fn top(&self) -> &dyn Layer {
        self.layers[0].layer()
    }
}

impl BlockDevice for Disk {
    fn size(&self) -> u64 {
        self.size
    }
    fn logical_sector_size(&self) -> u32 {
        self.top().info().logical_sector_size
    }
    fn physical_sector_size(&self) -> u32 {
        self.top().info().physical_sector_size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        let sec = u64::from(self.logical_sector_size().max(512));
        if offset.is_multiple_of(sec) && (buf.len() as u64).is_multiple_of(sec) {
            return self.read_from(0, offset, buf);
        }
        // Unaligned: read the covering sectors into a bounce buffer.
        let start = offset / sec * sec;
        let end = (offset + buf.len() as u64).div_ceil(sec) * sec;
        let mut tmp = vec![0u8; (end - start) as usize];
        self.read_from(0, start, &mut tmp)?;
        let s = (offset - start) as usize;
        buf.copy_from_slice(&tmp[s..s + buf.len()]);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        let sec = u64::from(self.logical_sector_size().max(512));
        if offset.is_multiple_of(sec) && (buf.len() as u64).is_multiple_of(sec) {
            return self.top().write(offset, buf);
        }
        let _g = self.rmw.lock();
        let start = offset / sec * sec;
        let end = (offset + buf.len() as u64).div_ceil(sec) * sec;
        let mut tmp = vec![0u8; (end - start) as usize];
        self.read_from(0, start, &mut tmp)?;
        let s = (offset - start) as usize;
        tmp[s..s + buf.len()].copy_from_slice(buf);
        self.top().write(start, &tmp)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.top().write_zeroes(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.top().discard(offset, len)
    }
    fn flush(&self) -> Result<()> {
        self.top().flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(offset, len, self.size)?;
        let mut out = Vec::new();
        self.status_from(0, offset, len, &mut out)?;
        coalesce(&mut out);
        Ok(out)
    }
    fn id(&self) -> String {
        match self.top().info().disk_id {
            Some(id) => id.simple().to_string(),
            None => self.paths[0].display().to_string(),
        }
    }
}
