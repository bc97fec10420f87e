//! Disk operations as library functions (the CLI and the daemon call these).

use crate::{
    detect_format, open_layer, open_layer_unlocked, parent_candidates, resolve_parent, verify_link,
    LayerFile, OpenOptions, MAX_CHAIN_DEPTH,
};
use fv_vdisk_core::{
    AllocationStats, CheckReport, CreateSpec, DiskError, DiskFormat, DiskKind, ExtentState,
    ImageLock, LayerIdentity, LockMode, ParentLocator, ParentSpec, PathPolicy, Progress, RawLayer,
    Result,
};
use serde::Serialize;
use std::path::{Component, Path, PathBuf};
use uuid::Uuid;

pub use crate::convert::{convert, convert_with};

const COPY_CHUNK: usize = 1 << 20;

/// Read-only opens for operations: a dirty VHDX log is replayed in memory only
/// (the file is not written), so inspect/convert work on a crashed image.
pub(crate) fn ro() -> OpenOptions {
    OpenOptions {
        read_only: true,
        replay_log: true,
        ..Default::default()
    }
}

fn rw() -> OpenOptions {
    OpenOptions::default()
}

pub(crate) fn dir_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `to` relative to directory `from` (both absolute, canonical).
pub fn relative_path(from: &Path, to: &Path) -> PathBuf {
    let f: Vec<Component> = from.components().collect();
    let t: Vec<Component> = to.components().collect();
    let common = f.iter().zip(t.iter()).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..f.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c.as_os_str());
    }
    out
}

/// What a child at `child` records about `parent` (opened from `parent_path`).
pub fn parent_spec(child: &Path, parent_path: &Path, parent: &LayerFile) -> Result<ParentSpec> {
    let pc = parent_path
        .canonicalize()
        .map_err(|e| DiskError::io("resolve", parent_path, e))?;
    let cd = dir_of(child);
    let cdc = cd
        .canonicalize()
        .map_err(|e| DiskError::io("resolve", &cd, e))?;
    let rel = relative_path(&cdc, &pc);
    let to_str = |p: &Path| {
        p.to_str().map(str::to_string).ok_or_else(|| {
            DiskError::InvalidArgument(format!("{} is not valid UTF-8", p.display()))
        })
    };
    let info = parent.layer().info();
    Ok(ParentSpec {
        identity: parent.current_identity(),
        virtual_size: parent.size(),
        relative_path: to_str(&rel)?,
        absolute_path: to_str(&pc)?,
        parent_disk_id: info.disk_id,
    })
}

/// Create a new image. Differencing disks are made with [`create_differencing`].
pub fn create(path: &Path, format: DiskFormat, spec: &CreateSpec) -> Result<()> {
    match format {
        DiskFormat::Raw => {
            if spec.kind == DiskKind::Differencing {
                return Err(DiskError::InvalidArgument(
                    "raw images cannot be differencing".into(),
                ));
            }
            RawLayer::create(path, spec.virtual_size).map(drop)
        }
        DiskFormat::Vhd => fv_vhd::VhdFile::create(path, spec).map(drop),
        DiskFormat::Vhdx => fv_vhdx::VhdxFile::create(path, spec).map(drop),
    }
}

/// Create a differencing disk on `parent` (same format as the parent), recording
/// both the relative and the absolute path of the parent.
pub fn create_differencing(child: &Path, parent_path: &Path, block_size: u32) -> Result<()> {
    create_differencing_with(
        child,
        parent_path,
        block_size,
        &PathPolicy::image_dir_only(),
    )
}

/// [`create_differencing`] with the directories the parent's own ancestors may be
/// in. Refused when the new chain would be deeper than [`MAX_CHAIN_DEPTH`] (it
/// would never open) or the parent's chain does not resolve.
pub fn create_differencing_with(
    child: &Path,
    parent_path: &Path,
    block_size: u32,
    policy: &PathPolicy,
) -> Result<()> {
    let parent = open_layer(parent_path, None, &ro())?;
    let info = parent.layer().info().clone();
    if info.format == DiskFormat::Raw {
        return Err(DiskError::InvalidArgument(
            "a raw image cannot be the parent of a differencing disk".into(),
        ));
    }
    let chain = chain_paths(parent_path, policy, &dir_of(child))?;
    if chain.len() >= MAX_CHAIN_DEPTH {
        return Err(DiskError::Refused {
            path: child.to_path_buf(),
            reason: format!(
                "{} already heads a chain of {} images; a child would make it deeper than the {MAX_CHAIN_DEPTH} an open accepts",
                parent_path.display(),
                chain.len()
            ),
        });
    }
    let ps = parent_spec(child, parent_path, &parent)?;
    let spec = CreateSpec {
        virtual_size: info.virtual_size,
        kind: DiskKind::Differencing,
        block_size,
        logical_sector_size: info.logical_sector_size,
        physical_sector_size: info.physical_sector_size,
        parent: Some(ps),
    };
    create(child, info.format, &spec)
}

/// Canonical paths of `path` and its ancestors, top first, found by following the
/// parent locators (metadata peeks: no locks, no data served). Structure only:
/// identities are not compared. Refuses a cycle, a chain deeper than
/// [`MAX_CHAIN_DEPTH`] and an ancestor that does not resolve under `policy`
/// (`top_dir` is the directory of the chain's top image).
pub fn chain_paths(path: &Path, policy: &PathPolicy, top_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut cur = path
        .canonicalize()
        .map_err(|e| DiskError::io("resolve", path, e))?;
    let mut out = vec![cur.clone()];
    loop {
        let l = open_layer_unlocked(&cur, None, &ro())?;
        let Some(loc) = l.layer().parent_locator().cloned() else {
            return Ok(out);
        };
        if out.len() >= MAX_CHAIN_DEPTH {
            return Err(DiskError::Refused {
                path: path.to_path_buf(),
                reason: format!("differencing chain deeper than {MAX_CHAIN_DEPTH}"),
            });
        }
        let p = resolve_parent(&cur, &loc, policy, top_dir)?;
        if out.contains(&p) {
            return Err(DiskError::CyclicChain { path: p });
        }
        out.push(p.clone());
        cur = p;
    }
}

/// How many generations of differencing children `path` has in its own
/// directory (0: none), up to `limit`; children elsewhere are not seen.
fn descendant_depth(path: &Path, limit: usize) -> Result<usize> {
    let mut level: Vec<PathBuf> = vec![path.to_path_buf()];
    let mut seen = std::collections::HashSet::new();
    let mut depth = 0;
    while depth < limit {
        let mut next = Vec::new();
        for p in &level {
            for c in find_children(&dir_of(p), p)? {
                if seen.insert(c.canonicalize().unwrap_or_else(|_| c.clone())) {
                    next.push(c);
                }
            }
        }
        if next.is_empty() {
            break;
        }
        depth += 1;
        level = next;
    }
    Ok(depth)
}

/// One layer as `inspect` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    pub path: PathBuf,
    pub format: DiskFormat,
    #[serde(rename = "type")]
    pub kind: DiskKind,
    pub virtual_size: u64,
    pub file_size: u64,
    pub block_size: u32,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    pub disk_id: Option<Uuid>,
    pub identity: LayerIdentity,
    pub allocation: Option<AllocationStats>,
    /// The link to this layer's parent, for differencing layers.
    pub parent: Option<LinkReport>,
}

/// A child's link to its parent.
#[derive(Debug, Clone, Serialize)]
pub struct LinkReport {
    pub locator: ParentLocator,
    /// Paths tried, in order.
    pub candidates: Vec<PathBuf>,
    /// The file the link resolved to (within the policy), if any.
    pub resolved: Option<PathBuf>,
    /// The parent exists, is allowed, and matches the recorded identity and size.
    pub verified: bool,
    pub problem: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct InspectReport {
    #[serde(flatten)]
    pub top: LayerReport,
    /// Ancestors, nearest first (as far as they resolve).
    pub chain: Vec<LayerReport>,
}

fn layer_report(path: &Path, l: &LayerFile) -> Result<LayerReport> {
    let info = l.layer().info();
    let file_size = std::fs::metadata(path)
        .map_err(|e| DiskError::io("stat", path, e))?
        .len();
    let allocation = match l.image() {
        Some(i) => Some(i.allocation()?),
        None => Some(AllocationStats {
            file_size,
            ..Default::default()
        }),
    };
    Ok(LayerReport {
        path: path.to_path_buf(),
        format: info.format,
        kind: info.kind,
        virtual_size: info.virtual_size,
        file_size,
        block_size: info.block_size,
        logical_sector_size: info.logical_sector_size,
        physical_sector_size: info.physical_sector_size,
        disk_id: info.disk_id,
        identity: info.identity.clone(),
        allocation,
        parent: None,
    })
}

/// Describe an image and its chain; broken links are reported, not errors.
pub fn inspect(path: &Path) -> Result<InspectReport> {
    inspect_with(path, &PathPolicy::image_dir_only())
}

pub fn inspect_with(path: &Path, policy: &PathPolicy) -> Result<InspectReport> {
    let top_dir = dir_of(path);
    let mut cur_path = path.to_path_buf();
    let mut cur = open_layer(path, None, &ro())?;
    let mut reports = Vec::new();
    let mut seen = std::collections::HashSet::new();
    if let Ok(c) = path.canonicalize() {
        seen.insert(c);
    }
    loop {
        let mut rep = layer_report(&cur_path, &cur)?;
        let Some(loc) = cur.layer().parent_locator().cloned() else {
            reports.push(rep);
            break;
        };
        let mut link = LinkReport {
            candidates: parent_candidates(&cur_path, &loc),
            locator: loc.clone(),
            resolved: None,
            verified: false,
            problem: None,
        };
        let mut next = None;
        match resolve_parent(&cur_path, &loc, policy, &top_dir) {
            // As open: the layer at index MAX_CHAIN_DEPTH - 1 may not have a parent.
            _ if reports.len() + 1 >= crate::MAX_CHAIN_DEPTH => {
                link.problem = Some(format!(
                    "differencing chain deeper than {}",
                    crate::MAX_CHAIN_DEPTH
                ))
            }
            Err(e) => link.problem = Some(e.to_string()),
            Ok(p) if !seen.insert(p.clone()) => {
                link.resolved = Some(p.clone());
                link.problem = Some(DiskError::CyclicChain { path: p }.to_string());
            }
            Ok(p) => {
                link.resolved = Some(p.clone());
                match open_layer(&p, None, &ro()) {
                    Err(e) => link.problem = Some(e.to_string()),
                    Ok(parent) => {
                        match verify_link(&cur, &parent) {
                            Ok(()) => {
                                link.verified = true;
                                next = Some((p, parent));
                            }
                            // An ancestor behind an unverified link is not listed:
                            // it is not part of this disk.
                            Err(r) => link.problem = Some(r),
                        }
                    }
                }
            }
        }
        rep.parent = Some(link);
        reports.push(rep);
        match next {
            Some((p, l)) => {
                cur_path = p;
                cur = l;
            }
            None => break,
        }
    }
    let mut it = reports.into_iter();
    let top = it.next().ok_or(DiskError::Cancelled)?;
    Ok(InspectReport {
        top,
        chain: it.collect(),
    })
}

/// Structural check of one image, plus whether its chain opens.
pub fn check(path: &Path, repair: bool) -> Result<CheckReport> {
    check_with(path, repair, &ro())
}

/// [`check`] with the caller's options: `opts.policy` says where the chain's parents
/// may be found and `opts.replay_log` whether a dirty log is replayed (in memory)
/// for the read-only opens. `repair` alone decides whether the image is opened
/// writable.
pub fn check_with(path: &Path, repair: bool, opts: &OpenOptions) -> Result<CheckReport> {
    let ro = OpenOptions {
        read_only: true,
        ..opts.clone()
    };
    let mut chain_problem = None;
    if let Ok(l) = open_layer(path, None, &ro) {
        if l.layer().parent_locator().is_some() {
            drop(l);
            if let Err(e) = crate::open(path, &ro) {
                chain_problem = Some(e.to_string());
            }
        }
    }
    let l = if repair {
        crate::open_layer_for_repair(path)?
    } else {
        open_layer(path, None, &ro)?
    };
    let mut r = match l.image() {
        Some(i) => i.check(repair)?,
        None => CheckReport::default(),
    };
    if let Some(p) = chain_problem {
        r.errors.push(p);
    }
    Ok(r)
}

/// Free bytes available to us on the filesystem holding `dir`.
pub fn free_space(dir: &Path) -> Result<u64> {
    let s = rustix::fs::statvfs(dir).map_err(|e| DiskError::io("statvfs", dir, e.into()))?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

pub(crate) fn sync_dir(d: &Path) {
    if let Ok(f) = std::fs::File::open(d) {
        let _ = f.sync_all();
    }
}

/// Flatten `child`'s chain into a new disk; the originals are kept.
pub fn merge_to_new(
    child: &Path,
    dst: &Path,
    format: DiskFormat,
    kind: DiskKind,
    progress: Progress<'_>,
) -> Result<()> {
    convert(child, dst, format, kind, progress)
}

/// Reclaim space in one image; returns the bytes the file shrank by.
pub fn compact(path: &Path, progress: Progress<'_>) -> Result<u64> {
    let l = open_layer(path, None, &rw())?;
    match l.image() {
        Some(i) => i.compact(progress),
        None => Ok(0),
    }
}

/// Images in `dir` whose parent locator points at `parent`.
pub fn find_children(dir: &Path, parent: &Path) -> Result<Vec<PathBuf>> {
    let target = parent
        .canonicalize()
        .map_err(|e| DiskError::io("resolve", parent, e))?;
    let mut out = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(|e| DiskError::io("read dir", dir, e))?;
    for ent in rd.flatten() {
        let p = ent.path();
        if !ent.file_type().map(|t| t.is_file()).unwrap_or(false)
            || p.canonicalize().ok().as_ref() == Some(&target)
        {
            continue;
        }
        let Ok(fmt) = detect_format(&p) else { continue };
        if fmt == DiskFormat::Raw {
            continue;
        }
        // A peek at the locator: no lock, so a child a running VM has open is
        // still found (and protected) rather than skipped.
        let Ok(l) = open_layer_unlocked(&p, Some(fmt), &ro()) else {
            continue;
        };
        let Some(loc) = l.layer().parent_locator() else {
            continue;
        };
        if parent_candidates(&p, loc)
            .iter()
            .any(|c| c.canonicalize().ok().as_ref() == Some(&target))
        {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// Change the virtual size. Refused for differencing disks and for disks with
/// children in their directory (growing a parent would break them).
pub fn resize(path: &Path, new_size: u64) -> Result<()> {
    let kids = find_children(&dir_of(path), path)?;
    if !kids.is_empty() {
        return Err(DiskError::Refused {
            path: path.to_path_buf(),
            reason: format!(
                "the disk has differencing children: {}",
                kids.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    }
    // Held across the raw path too, which reopens the file itself.
    let _lock = ImageLock::acquire(path, LockMode::Exclusive)?;
    let l = open_layer_unlocked(path, None, &rw())?;
    if l.layer().info().kind == DiskKind::Differencing {
        return Err(DiskError::Refused {
            path: path.to_path_buf(),
            reason: "a differencing disk has its parent's size; resize the merged disk instead"
                .into(),
        });
    }
    match l.image() {
        Some(i) => i.resize(new_size),
        None => {
            drop(l);
            resize_raw(path, new_size)
        }
    }
}

fn resize_raw(path: &Path, new_size: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| DiskError::io("open", path, e))?;
    let old = f
        .metadata()
        .map_err(|e| DiskError::io("stat", path, e))?
        .len();
    let mut pos = new_size;
    let mut buf = vec![0u8; COPY_CHUNK];
    while pos < old {
        let n = (old - pos).min(COPY_CHUNK as u64) as usize;
        f.read_exact_at(&mut buf[..n], pos)
            .map_err(|e| DiskError::io("read", path, e))?;
        if buf[..n].iter().any(|&b| b != 0) {
            return Err(DiskError::Refused {
                path: path.to_path_buf(),
                reason: format!("cannot shrink: data at or after offset {pos}"),
            });
        }
        pos += n as u64;
    }
    f.set_len(new_size)
        .map_err(|e| DiskError::io("truncate", path, e))?;
    f.sync_all().map_err(|e| DiskError::io("fsync", path, e))
}

/// Write a differencing disk's data into its parent, then delete the child (as
/// Hyper-V does). Other children of the parent become invalid (the parent's identity
/// changes), so this is refused when siblings exist unless `force`.
pub fn merge_into_parent(child: &Path, force: bool, progress: Progress<'_>) -> Result<PathBuf> {
    merge_into_parent_with(child, force, &ro(), progress)
}

/// [`merge_into_parent`] with the caller's options: the parent is looked for under
/// `opts.policy` (e.g. extra allowed directories), and `opts.replay_log` applies to
/// the read-only opens of the child and the parent check.
pub fn merge_into_parent_with(
    child: &Path,
    force: bool,
    opts: &OpenOptions,
    progress: Progress<'_>,
) -> Result<PathBuf> {
    let ro = OpenOptions {
        read_only: true,
        ..opts.clone()
    };
    // The whole chain must open (no cycle, no broken or unverified link, not too
    // deep): writing a child into a parent it does not come from destroys data.
    drop(crate::open(child, &ro)?);
    // Exclusive on the child: it is deleted at the end, so nobody may be using it.
    let _child_lock = ImageLock::acquire(child, LockMode::Exclusive)?;
    let c = open_layer_unlocked(child, None, &ro)?;
    let Some(loc) = c.layer().parent_locator().cloned() else {
        return Err(DiskError::Refused {
            path: child.to_path_buf(),
            reason: "not a differencing disk".into(),
        });
    };
    let cdir = dir_of(child);
    let ppath = resolve_parent(child, &loc, &opts.policy, &cdir)?;
    {
        let p = open_layer(&ppath, None, &ro)?;
        verify_link(&c, &p).map_err(|reason| DiskError::BrokenChain {
            child: child.to_path_buf(),
            parent: ppath.display().to_string(),
            reason,
        })?;
    }
    let me = child
        .canonicalize()
        .map_err(|e| DiskError::io("resolve", child, e))?;
    let siblings: Vec<PathBuf> = find_children(&dir_of(&ppath), &ppath)?
        .into_iter()
        .filter(|s| s.canonicalize().ok().as_ref() != Some(&me))
        .collect();
    if !siblings.is_empty() && !force {
        return Err(DiskError::Refused {
            path: ppath.clone(),
            reason: format!(
                "merging changes the parent and would invalidate its other children: {}",
                siblings
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    }
    let parent = open_layer(
        &ppath,
        None,
        &OpenOptions {
            read_only: false,
            ..opts.clone()
        },
    )?;
    let size = c.layer().info().virtual_size;
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut absent = Vec::new();
    for e in c.layer().extents(0, size)? {
        match e.state {
            ExtentState::Absent => {}
            ExtentState::Zero => parent.layer().write_zeroes(e.offset, e.length)?,
            ExtentState::Data => {
                let mut pos = e.offset;
                while pos < e.offset + e.length {
                    let n = (e.offset + e.length - pos).min(COPY_CHUNK as u64) as usize;
                    absent.clear();
                    c.layer().read_layer(pos, &mut buf[..n], &mut absent)?;
                    parent.layer().write(pos, &buf[..n])?;
                    pos += n as u64;
                    if !progress(pos, size) {
                        parent.layer().flush()?;
                        return Err(DiskError::Cancelled);
                    }
                }
            }
        }
    }
    parent.layer().flush()?;
    drop(parent);
    drop(c);
    std::fs::remove_file(child).map_err(|e| DiskError::io("remove", child, e))?;
    sync_dir(&cdir);
    Ok(ppath)
}

/// Point a differencing disk at a (moved) parent, rewriting both the relative and the
/// absolute locator. The new parent must be the one the child was made from (same
/// identity and size) unless `force`, which also records the new parent's identity.
pub fn set_parent(child: &Path, new_parent: &Path, force: bool) -> Result<()> {
    set_parent_with(child, new_parent, force, &ro())
}

/// [`set_parent`] with the caller's options (`opts.replay_log` for the read-only
/// open of the new parent). The policy is not consulted for `new_parent`: the
/// caller names it, it is not read from an image file.
pub fn set_parent_with(
    child: &Path,
    new_parent: &Path,
    force: bool,
    opts: &OpenOptions,
) -> Result<()> {
    // Structure first, before anything is opened writable; `force` never skips it.
    let me = child
        .canonicalize()
        .map_err(|e| DiskError::io("resolve", child, e))?;
    let np = new_parent
        .canonicalize()
        .map_err(|e| DiskError::io("resolve", new_parent, e))?;
    if me == np {
        return Err(DiskError::Refused {
            path: child.to_path_buf(),
            reason: "a disk cannot be its own parent".into(),
        });
    }
    // The new parent's ancestors as they resolve from the child's directory.
    let above = chain_paths(&np, &opts.policy, &dir_of(child))?;
    if above.contains(&me) {
        return Err(DiskError::Refused {
            path: child.to_path_buf(),
            reason: format!(
                "{} descends from {}: the chain would be a cycle",
                new_parent.display(),
                child.display()
            ),
        });
    }
    let below = descendant_depth(child, MAX_CHAIN_DEPTH)?;
    let depth = below + 1 + above.len();
    if depth > MAX_CHAIN_DEPTH {
        return Err(DiskError::Refused {
            path: child.to_path_buf(),
            reason: format!(
                "the chain would be {depth} images deep ({below} descendant(s), the disk, {} in the new parent's chain); an open accepts at most {MAX_CHAIN_DEPTH}",
                above.len()
            ),
        });
    }
    // For repair: a damaged parent link is what set-parent is there to fix.
    let c = crate::open_layer_for_repair(child)?;
    if c.layer().parent_locator().is_none() {
        return Err(DiskError::Refused {
            path: child.to_path_buf(),
            reason: "not a differencing disk".into(),
        });
    }
    let p = open_layer(
        new_parent,
        None,
        &OpenOptions {
            read_only: true,
            ..opts.clone()
        },
    )?;
    if let Err(reason) = verify_link(&c, &p) {
        // Identity may be overridden; format and size are structure.
        let fatal = c.layer().info().format != p.layer().info().format
            || c.layer().info().virtual_size != p.layer().info().virtual_size;
        if fatal || !force {
            return Err(DiskError::BrokenChain {
                child: child.to_path_buf(),
                parent: new_parent.display().to_string(),
                reason: if fatal {
                    format!("{reason} (--force cannot override this)")
                } else {
                    format!("{reason} (--force records the new parent's identity)")
                },
            });
        }
    }
    let spec = parent_spec(child, new_parent, &p)?;
    match c.image() {
        Some(i) => i.set_parent(&spec),
        None => Err(DiskError::Refused {
            path: child.to_path_buf(),
            reason: "not a differencing disk".into(),
        }),
    }
}
