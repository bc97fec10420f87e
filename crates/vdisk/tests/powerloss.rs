//! Power-loss safety: the engine writes through a small FUSE filesystem (in this
//! test) that behaves like a disk with a volatile write cache. Each file's writes
//! and size changes are held in memory until fsync/fdatasync makes them durable in
//! the backing directory. At a random FUSE operation the power fails: of the
//! writes not yet fsynced, all are dropped, or a random prefix, or a random subset
//! (a cache that reached the platter in any order) reaches the backing file, and
//! every later operation fails with EIO. VHDX must survive this by ordering alone:
//! log entries flushed before the BAT and metadata they describe are updated in
//! place, and VHD by writing data before the BAT entry that points to it.
//!
//! After each trial the surviving backing file is opened directly, writable (a VHDX
//! log is replayed), `check()` (what `fv vhd check` runs) must be clean,
//! `qemu-img check` must pass where qemu can check the format (dynamic VHDX), and
//! every write acknowledged by a successful flush must read back. Covers dynamic
//! and differencing VHD and VHDX.
//!
//! VHD trials use the in-order loss modes only (drop-all, prefix): the VHD engine
//! appends a block by writing the new end footer and then the block over the old
//! footer with no flush between, so a cache that reorders the two can leave a file
//! without a valid end footer (a read-only open still works from the copy at
//! offset 0; a writable one asks for `fv vhd check --repair`).
//! `vhd_power_loss_reordered_writes` (ignored) reproduces it.
mod common;
mod trials;
use common::*;
use fuser::{
    FileAttr, FileType, Filesystem, KernelConfig, MountOption, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, TimeOrNow,
};
use fv_vdisk::ops;
use fv_vdisk::{BlockDevice, CreateSpec, DiskFormat, DiskKind};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use trials::{Plan, SIZE};

const ROOT: u64 = 1;
/// Attributes are never cached by the kernel: sizes change under it at power loss.
const TTL: Duration = Duration::ZERO;
/// FOPEN_DIRECT_IO: every read and write reaches this filesystem, none is served
/// from or absorbed by the kernel's page cache.
const DIRECT_IO: u32 = 1;

#[derive(Clone, Debug)]
enum Op {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

/// One file as the running system sees it: `current` (what reads return) is the
/// backing file plus `pending`, the operations since its last fsync.
struct Cached {
    current: Vec<u8>,
    pending: Vec<Op>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LossMode {
    DropAll,
    Prefix,
    Subset,
}

#[derive(Default)]
struct LossStats {
    unflushed_dropped: u64,
    unflushed_kept: u64,
    /// The failing operation was an fsync (power lost in the middle of a flush).
    during_fsync: u64,
}

struct State {
    backing: PathBuf,
    names: HashMap<String, u64>,
    inodes: HashMap<u64, String>,
    next_ino: u64,
    cache: HashMap<u64, Cached>,
    /// Mutating operations (write, truncate, fsync) left before the power fails.
    countdown: Option<u64>,
    mode: LossMode,
    rng: StdRng,
    dead: bool,
    stats: LossStats,
}

impl State {
    fn path(&self, ino: u64) -> Option<PathBuf> {
        self.inodes.get(&ino).map(|n| self.backing.join(n))
    }

    fn ino_of(&mut self, name: &str) -> u64 {
        if let Some(&i) = self.names.get(name) {
            return i;
        }
        let i = self.next_ino;
        self.next_ino += 1;
        self.names.insert(name.to_string(), i);
        self.inodes.insert(i, name.to_string());
        i
    }

    fn cached(&mut self, ino: u64) -> Result<&mut Cached, i32> {
        if !self.cache.contains_key(&ino) {
            let path = self.path(ino).ok_or(libc::ENOENT)?;
            let current = std::fs::read(&path).map_err(|_| libc::ENOENT)?;
            self.cache.insert(
                ino,
                Cached {
                    current,
                    pending: Vec::new(),
                },
            );
        }
        self.cache.get_mut(&ino).ok_or(libc::EIO)
    }

    /// Count one mutating operation; the power fails before the one that reaches zero.
    fn tick(&mut self, is_fsync: bool) -> Result<(), i32> {
        if self.dead {
            return Err(libc::EIO);
        }
        if let Some(c) = self.countdown.as_mut() {
            if *c == 0 {
                self.stats.during_fsync += is_fsync as u64;
                self.power_loss();
                return Err(libc::EIO);
            }
            *c -= 1;
        }
        Ok(())
    }

    /// The unflushed operations that survive, by the trial's mode, reach the backing
    /// files; everything else is gone.
    fn power_loss(&mut self) {
        self.dead = true;
        let mut files: Vec<(u64, Vec<Op>)> = self
            .cache
            .iter_mut()
            .map(|(&i, c)| (i, std::mem::take(&mut c.pending)))
            .collect();
        files.sort_by_key(|f| f.0);
        for (ino, pending) in files {
            let keep: Vec<bool> = match self.mode {
                LossMode::DropAll => vec![false; pending.len()],
                LossMode::Prefix => {
                    let n = self.rng.gen_range(0..=pending.len());
                    (0..pending.len()).map(|k| k < n).collect()
                }
                LossMode::Subset => (0..pending.len()).map(|_| self.rng.gen_bool(0.5)).collect(),
            };
            let path = self.path(ino).expect("cached file has a name");
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .expect("backing file opens");
            for (op, kept) in pending.iter().zip(keep) {
                if !kept {
                    self.stats.unflushed_dropped += 1;
                    continue;
                }
                self.stats.unflushed_kept += 1;
                apply(&f, op);
            }
            f.sync_all().expect("backing fsync");
        }
        self.cache.clear();
    }

    fn attr(&mut self, ino: u64) -> Result<FileAttr, i32> {
        let (kind, perm, size) = if ino == ROOT {
            (FileType::Directory, 0o755, 0)
        } else {
            (
                FileType::RegularFile,
                0o644,
                self.cached(ino)?.current.len() as u64,
            )
        };
        let now = SystemTime::now();
        Ok(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind,
            perm,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }
}

fn apply(f: &std::fs::File, op: &Op) {
    match op {
        Op::Write(off, data) => f.write_all_at(data, *off).expect("backing write"),
        Op::SetLen(len) => f.set_len(*len).expect("backing truncate"),
    }
}

/// The filesystem; `State` is shared with the test, which arms and reads it.
struct PowerFs(Arc<Mutex<State>>);

impl Filesystem for PowerFs {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), i32> {
        // 128 KiB requests: every engine write of a trial slot is one request.
        let _ = config.set_max_write(128 << 10);
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let mut st = self.0.lock().unwrap();
        let Some(name) = name.to_str() else {
            return reply.error(libc::ENOENT);
        };
        if parent != ROOT || !st.backing.join(name).is_file() {
            return reply.error(libc::ENOENT);
        }
        let ino = st.ino_of(name);
        match st.attr(ino) {
            Ok(a) => reply.entry(&TTL, &a, 0),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.0.lock().unwrap().attr(ino) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let mut st = self.0.lock().unwrap();
        if let Some(len) = size {
            if let Err(e) = st.tick(false) {
                return reply.error(e);
            }
            match st.cached(ino) {
                Ok(c) => {
                    c.current.resize(len as usize, 0);
                    c.pending.push(Op::SetLen(len));
                }
                Err(e) => return reply.error(e),
            }
        }
        match st.attr(ino) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        let mut st = self.0.lock().unwrap();
        if st.dead {
            return reply.error(libc::EIO);
        }
        match st.cached(ino) {
            Ok(_) => reply.opened(0, DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut st = self.0.lock().unwrap();
        let Some(name) = name.to_str().filter(|_| parent == ROOT && !st.dead) else {
            return reply.error(libc::EIO);
        };
        // The directory entry is durable at once; only file contents are cached.
        if std::fs::write(st.backing.join(name), b"").is_err() {
            return reply.error(libc::EIO);
        }
        let ino = st.ino_of(name);
        st.cache.remove(&ino);
        match st.attr(ino) {
            Ok(a) => reply.created(&TTL, &a, 0, 0, DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let mut st = self.0.lock().unwrap();
        if st.dead {
            return reply.error(libc::EIO);
        }
        match st.cached(ino) {
            Ok(c) => {
                let start = (offset.max(0) as usize).min(c.current.len());
                let end = (start + size as usize).min(c.current.len());
                reply.data(&c.current[start..end])
            }
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let mut st = self.0.lock().unwrap();
        if let Err(e) = st.tick(false) {
            return reply.error(e);
        }
        match st.cached(ino) {
            Ok(c) => {
                let off = offset.max(0) as usize;
                if c.current.len() < off + data.len() {
                    c.current.resize(off + data.len(), 0);
                }
                c.current[off..off + data.len()].copy_from_slice(data);
                c.pending.push(Op::Write(off as u64, data.to_vec()));
                reply.written(data.len() as u32)
            }
            Err(e) => reply.error(e),
        }
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lo: u64, reply: ReplyEmpty) {
        // close() is not a durability point.
        reply.ok()
    }

    fn fsync(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut st = self.0.lock().unwrap();
        if let Err(e) = st.tick(true) {
            return reply.error(e);
        }
        let Some(path) = st.path(ino) else {
            return reply.error(libc::ENOENT);
        };
        let pending = match st.cached(ino) {
            Ok(c) => std::mem::take(&mut c.pending),
            Err(e) => return reply.error(e),
        };
        let Ok(f) = std::fs::OpenOptions::new().write(true).open(&path) else {
            return reply.error(libc::EIO);
        };
        for op in &pending {
            apply(&f, op);
        }
        match f.sync_data() {
            Ok(()) => reply.ok(),
            Err(_) => reply.error(libc::EIO),
        }
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT {
            return reply.error(libc::ENOTDIR);
        }
        let mut st = self.0.lock().unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&st.backing)
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        for (k, name) in names.iter().enumerate().skip(offset.max(0) as usize) {
            let ino = st.ino_of(name);
            if reply.add(ino, (k + 1) as i64, FileType::RegularFile, name) {
                break;
            }
        }
        reply.ok()
    }
}

#[derive(Default)]
struct Tally {
    trials: usize,
    cut_during_open: usize,
    cut_mid_write: usize,
    flushed: u64,
    verified: u64,
    qemu_checked: usize,
    modes: [usize; 3],
}

fn dynamic_spec() -> CreateSpec {
    CreateSpec {
        virtual_size: SIZE,
        kind: DiskKind::Dynamic,
        block_size: 0,
        logical_sector_size: 512,
        physical_sector_size: 512,
        parent: None,
    }
}

/// Writes by the plan until the power fails; returns (flushed, issued, opened).
fn writer(path: &Path, plan: &Plan) -> (u64, u64, bool) {
    let Ok(disk) = fv_vdisk::open(path, &rw()) else {
        return (0, 0, false);
    };
    let parent_path = disk.layer_paths().get(1).cloned();
    let mut flushed = 0;
    // Bounded: the power fails within a few hundred filesystem operations.
    for i in 0..1_000_000u64 {
        if disk.write_at(plan.offset(i), &plan.data(i)).is_err() {
            return (flushed, i + 1, true);
        }
        if plan.flush_after(i) {
            if disk.flush().is_err() {
                return (flushed, i + 1, true);
            }
            flushed = i + 1;
        }
        if let (true, Some(pp)) = (plan.set_parent_after(i), &parent_path) {
            let res = ops::parent_spec(path, pp, &disk.layers()[1])
                .and_then(|spec| disk.top_image().unwrap().set_parent(&spec));
            if res.is_err() {
                return (flushed, i + 1, true);
            }
        }
    }
    panic!("the power never failed in 1000000 writes");
}

#[allow(clippy::too_many_arguments)]
fn trial(
    fs: &Arc<Mutex<State>>,
    backing: &Path,
    mnt: &Path,
    fmt: DiskFormat,
    differencing: bool,
    n: usize,
    modes: &[LossMode],
    rng: &mut StdRng,
    tally: &mut Tally,
) {
    let ext = if fmt == DiskFormat::Vhd {
        "vhd"
    } else {
        "vhdx"
    };
    let kind = if differencing { "diff" } else { "dyn" };
    let name = format!("t{n}-{kind}.{ext}");
    let image = backing.join(&name);
    // Created durable (straight into the backing directory), then used via FUSE.
    if differencing {
        ops::create_differencing(&image, &backing.join(format!("base.{ext}")), 0).unwrap();
    } else {
        ops::create(&image, fmt, &dynamic_spec()).unwrap();
    }
    let seed: u64 = rng.gen();
    let plan = Plan::new(seed);
    let mode = modes[rng.gen_range(0..modes.len())];
    let countdown = rng.gen_range(0..400);
    {
        let mut st = fs.lock().unwrap();
        st.dead = false;
        st.cache.clear();
        st.mode = mode;
        st.rng = StdRng::seed_from_u64(seed ^ 0x9e37);
        st.countdown = Some(countdown);
    }
    let (flushed, issued, opened) = writer(&mnt.join(&name), &plan);
    {
        let mut st = fs.lock().unwrap();
        assert!(
            st.dead,
            "trial {n}: the writer stopped but the power did not fail"
        );
        st.countdown = None;
    }
    tally.trials += 1;
    if opened {
        tally.cut_mid_write += 1;
    } else {
        tally.cut_during_open += 1;
    }
    tally.modes[mode as usize] += 1;
    let label = format!("trial {n} ({fmt:?} {kind}, seed {seed}, {mode:?} after {countdown} ops)");

    // The surviving file, straight from the backing store.
    drop(
        fv_vdisk::open(&image, &rw())
            .unwrap_or_else(|e| panic!("{label}: writable reopen failed: {e}")),
    );
    let disk =
        fv_vdisk::open(&image, &ro()).unwrap_or_else(|e| panic!("{label}: reopen failed: {e}"));
    let rep = ops::check(&image, false).unwrap();
    assert!(rep.is_clean(), "{label}: check errors {:?}", rep.errors);
    if fmt == DiskFormat::Vhdx && !differencing {
        run(
            "qemu-img",
            &["check", "-f", "vhdx", image.to_str().unwrap()],
        );
        tally.qemu_checked += 1;
    }
    let verified = trials::verify(&disk, &plan, differencing, flushed, issued)
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    tally.flushed += flushed;
    tally.verified += verified;
    drop(disk);
    std::fs::remove_file(&image).unwrap();
}

type Config = (DiskFormat, bool, &'static [LossMode]);

const IN_ORDER: &[LossMode] = &[LossMode::DropAll, LossMode::Prefix];
const ANY_ORDER: &[LossMode] = &[LossMode::DropAll, LossMode::Prefix, LossMode::Subset];
/// Dynamic and differencing VHD and VHDX; see the module comment for VHD's modes.
const ALL: &[Config] = &[
    (DiskFormat::Vhd, false, IN_ORDER),
    (DiskFormat::Vhd, true, IN_ORDER),
    (DiskFormat::Vhdx, false, ANY_ORDER),
    (DiskFormat::Vhdx, true, ANY_ORDER),
];

fn run_trials(count: usize, seed: u64, configs: &[Config]) {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&backing).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    for ext in ["vhd", "vhdx"] {
        let fmt = if ext == "vhd" {
            DiskFormat::Vhd
        } else {
            DiskFormat::Vhdx
        };
        let base = backing.join(format!("base.{ext}"));
        ops::create(&base, fmt, &dynamic_spec()).unwrap();
        let d = fv_vdisk::open(&base, &rw()).unwrap();
        d.write_at(0, &vec![0xeeu8; trials::BASE_FILL as usize])
            .unwrap();
        d.flush().unwrap();
    }
    let state = Arc::new(Mutex::new(State {
        backing: backing.clone(),
        names: HashMap::new(),
        inodes: HashMap::new(),
        next_ino: ROOT + 1,
        cache: HashMap::new(),
        countdown: None,
        mode: LossMode::DropAll,
        rng: StdRng::seed_from_u64(0),
        dead: false,
        stats: LossStats::default(),
    }));
    let session = fuser::spawn_mount2(
        PowerFs(state.clone()),
        &mnt,
        &[MountOption::FSName("fv-powerloss".into())],
    )
    .unwrap_or_else(|e| {
        panic!("mounting the power-loss FUSE filesystem needs /dev/fuse and root: {e}")
    });
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tally = Tally::default();
    for n in 0..count {
        let (fmt, differencing, modes) = configs[n % configs.len()];
        trial(
            &state,
            &backing,
            &mnt,
            fmt,
            differencing,
            n,
            modes,
            &mut rng,
            &mut tally,
        );
    }
    drop(session);
    let st = state.lock().unwrap();
    println!(
        "power-loss trials: {} ({configs:?}), power cut during writing in \
         every one: {} mid-write/flush ({} inside an fsync), {} while opening; unflushed \
         writes: {} dropped, {} reached the disk (modes drop-all {}, prefix {}, subset {}); \
         {} flushed writes, {} slots verified at their last flushed version or newer; \
         qemu-img check on {} dynamic VHDX trials",
        tally.trials,
        tally.cut_mid_write,
        st.stats.during_fsync,
        tally.cut_during_open,
        st.stats.unflushed_dropped,
        st.stats.unflushed_kept,
        tally.modes[0],
        tally.modes[1],
        tally.modes[2],
        tally.flushed,
        tally.verified,
        tally.qemu_checked
    );
    assert_eq!(tally.trials, count);
    // Most cuts must land after the open, among the plan's writes and flushes.
    assert!(
        tally.cut_mid_write * 10 >= count * 9,
        "only {} of {count} power cuts landed among the writes",
        tally.cut_mid_write
    );
}

#[test]
fn power_loss_trials_200() {
    run_trials(200, 7, ALL);
}

#[test]
#[ignore = "soak: long-running"]
fn power_loss_trials_soak() {
    run_trials(2000, std::process::id() as u64, ALL);
}

/// Known defect (see the module comment): reordered loss on VHD, where a block
/// append's two writes are not ordered by a flush.
#[test]
#[ignore = "known VHD defect: block append is not ordered against a reordering write cache"]
fn vhd_power_loss_reordered_writes() {
    const SUBSET: &[LossMode] = &[LossMode::Subset];
    run_trials(
        200,
        7,
        &[
            (DiskFormat::Vhd, false, SUBSET),
            (DiskFormat::Vhd, true, SUBSET),
        ],
    );
}
