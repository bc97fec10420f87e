//! Disk engine benchmark. Prints figures only; never asserts on time.
//!
//! Page-cache-friendly on purpose (files far smaller than RAM, no O_DIRECT, no
//! fsync in the timed loops): it measures the engine's own per-request cost, which
//! is what the ratio goals (dynamic VHDX >= 0.9x raw, depth 32 >= 0.9x depth 1)
//! are about.
//!
//! Every figure is the median of `--rounds` runs, and the targets (or chain depths)
//! being compared take turns inside each round, so a burst of load from other
//! processes cannot land on one side of a ratio only. By default time is the
//! benchmark thread's own CPU time (user + kernel, so every syscall's cost counts),
//! not wall time: on a shared machine wall time also counts the time the thread
//! sat runnable while other processes had the CPUs. There is nothing to wait for
//! in the timed loops (page cache / tmpfs, no fsync), so CPU time is the request
//! cost. `--clock wall` gives wall-clock figures.
use anyhow::{anyhow, bail, Context, Result};
use fv_vdisk::{ops, BlockDevice, CreateSpec, DiskFormat, DiskKind, OpenOptions};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

struct Config {
    dir: PathBuf,
    size: u64,
    rand_ops: u64,
    chain_size: u64,
    depths: Vec<usize>,
    qemu: bool,
    only: Option<String>,
    rounds: usize,
    wall: bool,
}

fn parse_args() -> Result<Config> {
    let mut c = Config {
        // tmpfs when available: no writeback throttling, so the figures are the
        // engine's CPU cost rather than this machine's disk.
        dir: if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        },
        size: 1 << 30,
        rand_ops: 100_000,
        chain_size: 1 << 30,
        depths: vec![1, 8, 32],
        qemu: true,
        only: None,
        rounds: 5,
        wall: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or_else(|| anyhow!("{a} needs a value"));
        match a.as_str() {
            "--dir" => c.dir = PathBuf::from(val()?),
            "--size" => c.size = fv_vdisk::parse_size(&val()?)?,
            "--chain-size" => c.chain_size = fv_vdisk::parse_size(&val()?)?,
            "--rand-ops" => c.rand_ops = val()?.parse()?,
            "--depths" => {
                c.depths = val()?
                    .split(',')
                    .map(|d| d.parse())
                    .collect::<Result<_, _>>()?
            }
            "--no-qemu" => c.qemu = false,
            "--rounds" => c.rounds = val()?.parse::<usize>()?.max(1),
            "--clock" => {
                c.wall = match val()?.as_str() {
                    "wall" => true,
                    "cpu" => false,
                    v => bail!("--clock takes cpu or wall, not {v}"),
                }
            }
            // "io" or "chain": run one section (e.g. for profiling).
            "--only" => c.only = Some(val()?),
            "-h" | "--help" => {
                println!(
                    "fv-disk-bench [--dir DIR] [--size 1G] [--rand-ops 100000] [--chain-size 1G] \
                     [--depths 1,8,32] [--rounds 5] [--clock cpu|wall] [--no-qemu] [--only io|chain]"
                );
                std::process::exit(0);
            }
            _ => bail!("unknown argument {a}"),
        }
    }
    Ok(c)
}

/// Something to time I/O against.
enum Target {
    Raw(File),
    Engine(fv_vdisk::Disk),
}

impl Target {
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        match self {
            Target::Raw(f) => f.read_exact_at(buf, off).context("pread"),
            Target::Engine(d) => d.read_at(off, buf).map_err(|e| anyhow!("{e}")),
        }
    }
    fn write(&self, off: u64, buf: &[u8]) -> Result<()> {
        match self {
            Target::Raw(f) => f.write_all_at(buf, off).context("pwrite"),
            Target::Engine(d) => d.write_at(off, buf).map_err(|e| anyhow!("{e}")),
        }
    }
}

/// xorshift64*: deterministic offsets, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// This thread's CPU time (user + system) in seconds.
fn thread_cpu() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

static WALL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Starts a measurement on the configured clock.
struct Timer {
    wall: Instant,
    cpu: f64,
}

impl Timer {
    fn start() -> Timer {
        Timer {
            wall: Instant::now(),
            cpu: thread_cpu(),
        }
    }
    fn secs(&self) -> f64 {
        if WALL.load(std::sync::atomic::Ordering::Relaxed) {
            self.wall.elapsed().as_secs_f64()
        } else {
            thread_cpu() - self.cpu
        }
    }
}

/// One measurement: bytes moved and ops done in a time.
#[derive(Clone, Copy, Default)]
struct Fig {
    bytes: u64,
    ops: u64,
    secs: f64,
}

/// The measurement with the median rate (figures of one cell across rounds).
fn median(mut v: Vec<Fig>) -> Option<Fig> {
    v.sort_by(|a, b| a.mibs().total_cmp(&b.mibs()));
    v.get(v.len() / 2).copied()
}

impl Fig {
    fn mibs(&self) -> f64 {
        self.bytes as f64 / MIB as f64 / self.secs
    }
    fn iops(&self) -> f64 {
        self.ops as f64 / self.secs
    }
}

fn seq(t: &Target, size: u64, write: bool) -> Result<Fig> {
    let mut buf = vec![0x5au8; MIB as usize];
    let start = Timer::start();
    let mut off = 0;
    while off < size {
        if write {
            buf[0] = (off >> 20) as u8;
            t.write(off, &buf)?;
        } else {
            t.read(off, &mut buf)?;
        }
        off += MIB;
    }
    Ok(Fig {
        bytes: size,
        ops: size / MIB,
        secs: start.secs(),
    })
}

fn random(t: &Target, size: u64, ops: u64, write: bool, seed: u64) -> Result<Fig> {
    let mut buf = vec![0xa5u8; 4096];
    let mut rng = Rng(seed | 1);
    let blocks = size / 4096;
    let start = Timer::start();
    for _ in 0..ops {
        let off = (rng.next() % blocks) * 4096;
        if write {
            t.write(off, &buf)?;
        } else {
            t.read(off, &mut buf)?;
        }
    }
    Ok(Fig {
        bytes: ops * 4096,
        ops,
        secs: start.secs(),
    })
}

fn engine_create(path: &Path, format: DiskFormat, size: u64) -> Result<Target> {
    let spec = CreateSpec {
        virtual_size: size,
        kind: DiskKind::Dynamic,
        block_size: 0,
        logical_sector_size: 512,
        physical_sector_size: if format == DiskFormat::Vhdx {
            4096
        } else {
            512
        },
        parent: None,
    };
    ops::create(path, format, &spec).map_err(|e| anyhow!("create {}: {e}", path.display()))?;
    engine_open(path)
}

fn engine_open(path: &Path) -> Result<Target> {
    fv_vdisk::open(path, &OpenOptions::default())
        .map(Target::Engine)
        .map_err(|e| anyhow!("open {}: {e}", path.display()))
}

/// A row of the I/O table; None where a figure does not apply.
#[derive(Default)]
struct Row {
    name: String,
    cold_w: Option<Fig>,
    seq_w: Option<Fig>,
    seq_r: Option<Fig>,
    rnd_w: Option<Fig>,
    rnd_r: Option<Fig>,
    cold_rnd_w: Option<Fig>,
}

/// All figures of one round for one target. `make` creates a fresh target at the
/// path given (called twice: the cold random-write pass needs a fresh disk too).
fn full_row(
    make: &dyn Fn(&Path) -> Result<Target>,
    path: &Path,
    c: &Config,
    keep: bool,
) -> Result<[Fig; 6]> {
    // Order matters: the first sequential write pass is what allocates (cold);
    // everything after runs on the pre-allocated disk.
    let t = make(path)?;
    let cold_w = seq(&t, c.size, true)?;
    let seq_w = seq(&t, c.size, true)?;
    let seq_r = seq(&t, c.size, false)?;
    let rnd_w = random(&t, c.size, c.rand_ops, true, 7)?;
    let rnd_r = random(&t, c.size, c.rand_ops, false, 11)?;
    drop(t);
    let mut cold_path = path.as_os_str().to_owned();
    cold_path.push(".cold");
    let cold_path = PathBuf::from(cold_path);
    let t = make(&cold_path)?;
    let cold_rnd_w = random(&t, c.size, c.rand_ops, true, 13)?;
    drop(t);
    let _ = std::fs::remove_file(&cold_path);
    if !keep {
        let _ = std::fs::remove_file(path);
    }
    Ok([cold_w, seq_w, seq_r, rnd_w, rnd_r, cold_rnd_w])
}

fn qemu_bench(
    file: &Path,
    count: u64,
    bs: &str,
    step: Option<u64>,
    write: bool,
    bytes_per_op: u64,
) -> Result<Fig> {
    let mut cmd = Command::new("qemu-img");
    cmd.args([
        "bench",
        "-f",
        "vhdx",
        "-t",
        "writeback",
        "-d",
        "1",
        "-c",
        &count.to_string(),
        "-s",
        bs,
    ]);
    if let Some(s) = step {
        cmd.args(["-S", &s.to_string()]);
    }
    if write {
        cmd.arg("-w");
    }
    cmd.arg(file);
    let out = cmd
        .output()
        .context("run qemu-img bench (install qemu-utils)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "qemu-img bench failed: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // "Run completed in 1.234 seconds."
    let secs: f64 = text
        .split("Run completed in ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("unexpected qemu-img bench output: {text}"))?;
    Ok(Fig {
        bytes: count * bytes_per_op,
        ops: count,
        secs,
    })
}

fn fmt_mibs(f: Option<Fig>) -> String {
    f.map(|f| format!("{:.0}", f.mibs()))
        .unwrap_or_else(|| "-".into())
}
fn fmt_iops(f: Option<Fig>) -> String {
    f.map(|f| format!("{:.0}", f.iops()))
        .unwrap_or_else(|| "-".into())
}
fn ratio(a: Option<Fig>, b: Option<Fig>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => format!("{:.2}", a.mibs() / b.mibs()),
        _ => "-".into(),
    }
}

fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut w = vec![0; cols];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    for (n, r) in rows.iter().enumerate() {
        let cells: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == 0 {
                    format!("{c:<0$}", w[i])
                } else {
                    format!("{c:>0$}", w[i])
                }
            })
            .collect();
        println!("| {} |", cells.join(" | "));
        if n == 0 {
            let seps: Vec<String> = w
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    if i == 0 {
                        "-".repeat(*n)
                    } else {
                        format!("{}:", "-".repeat(n - 1))
                    }
                })
                .collect();
            println!("| {} |", seps.join(" | "));
        }
    }
}

fn io_section(c: &Config, dir: &Path) -> Result<()> {
    let mib = c.size / MIB;
    println!(
        "\n## Sequential 1 MiB and random 4 KiB I/O on a {} MiB disk ({} random ops, queue depth 1, page cache, median of {} rounds, {} time)\n",
        mib,
        c.rand_ops,
        c.rounds,
        if c.wall { "wall-clock" } else { "thread CPU" }
    );

    let make_raw = |p: &Path| -> Result<Target> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(p)?;
        f.set_len(c.size)?;
        Ok(Target::Raw(f))
    };
    let make_vhdx = |p: &Path| engine_create(p, DiskFormat::Vhdx, c.size);
    let make_vhd = |p: &Path| engine_create(p, DiskFormat::Vhd, c.size);
    type Make<'a> = &'a dyn Fn(&Path) -> Result<Target>;
    let targets: [(&str, &str, Make); 3] = [
        (
            "raw file (pread/pwrite; cold = fresh sparse file)",
            "raw.img",
            &make_raw,
        ),
        ("ours: dynamic VHDX", "prealloc.vhdx", &make_vhdx),
        ("ours: dynamic VHD", "prealloc.vhd", &make_vhd),
    ];
    // figs[target][column] = one Fig per round.
    let mut figs: Vec<Vec<Vec<Fig>>> = vec![vec![Vec::new(); 6]; targets.len()];
    for round in 0..c.rounds {
        // Take turns: each round starts with a different target.
        for k in 0..targets.len() {
            let i = (round + k) % targets.len();
            let (_, file, make) = targets[i];
            let path = dir.join(file);
            // The last VHDX is kept for the QEMU rows.
            let keep = round + 1 == c.rounds && file == "prealloc.vhdx";
            let row = full_row(make, &path, c, keep)?;
            for (col, f) in row.into_iter().enumerate() {
                figs[i][col].push(f);
            }
        }
    }
    let rows: Vec<Row> = targets
        .iter()
        .zip(figs)
        .map(|((name, _, _), cols)| {
            let mut m = cols.into_iter().map(median);
            let mut next = || m.next().flatten();
            Row {
                name: name.to_string(),
                cold_w: next(),
                seq_w: next(),
                seq_r: next(),
                rnd_w: next(),
                rnd_r: next(),
                cold_rnd_w: next(),
            }
        })
        .collect();
    let vhdx_path = dir.join("prealloc.vhdx");

    let mut qemu_rows = Vec::new();
    if c.qemu {
        // Same pre-allocated file, QEMU's vhdx driver. qemu-img bench has no random
        // mode: "random" 4 KiB uses a large stride (-S) instead, so treat its 4 KiB
        // figures as per-request cost, not as a like-for-like random pattern. Its
        // own timer is wall-clock (one run each).
        let stride = 4096 * 7919;
        let n = c.size / MIB;
        let p = &vhdx_path;
        qemu_rows.push(Row {
            name: "qemu-img bench -f vhdx -t writeback -d 1 (same file; wall clock, 1 run)".into(),
            seq_w: Some(qemu_bench(p, n, "1M", None, true, MIB)?),
            seq_r: Some(qemu_bench(p, n, "1M", None, false, MIB)?),
            rnd_w: Some(qemu_bench(p, c.rand_ops, "4k", Some(stride), true, 4096)?),
            rnd_r: Some(qemu_bench(p, c.rand_ops, "4k", Some(stride), false, 4096)?),
            ..Default::default()
        });
    }

    let mut table = vec![vec![
        "target".to_string(),
        "cold seq W MiB/s".into(),
        "seq write MiB/s".into(),
        "seq read MiB/s".into(),
        "rand write 4K IOPS".into(),
        "rand read 4K IOPS".into(),
        "cold rand W 4K IOPS".into(),
        "cold W vs raw".into(),
        "seq W vs raw".into(),
        "seq R vs raw".into(),
        "rand W vs raw".into(),
        "rand R vs raw".into(),
        "cold rand W vs raw".into(),
    ]];
    let raw = &rows[0];
    let mut push = |r: &Row, comparable: bool| {
        let ratio = |a, b| if comparable { ratio(a, b) } else { "-".into() };
        table.push(vec![
            r.name.clone(),
            fmt_mibs(r.cold_w),
            fmt_mibs(r.seq_w),
            fmt_mibs(r.seq_r),
            fmt_iops(r.rnd_w),
            fmt_iops(r.rnd_r),
            fmt_iops(r.cold_rnd_w),
            ratio(r.cold_w, raw.cold_w),
            ratio(r.seq_w, raw.seq_w),
            ratio(r.seq_r, raw.seq_r),
            ratio(r.rnd_w, raw.rnd_w),
            ratio(r.rnd_r, raw.rnd_r),
            ratio(r.cold_rnd_w, raw.cold_rnd_w),
        ])
    };
    for r in &rows {
        push(r, true);
    }
    // QEMU's figures are wall-clock: comparable with ours only under --clock wall.
    for r in &qemu_rows {
        push(r, c.wall);
    }
    print_table(&table);
    let _ = std::fs::remove_file(&vhdx_path);
    Ok(())
}

/// Build a chain of `depth` layers (base + depth-1 differencing children) over
/// `size` bytes. `spread`: layer i holds the 2 MiB stripes with index % depth == i;
/// otherwise all data sits in the base.
fn build_chain(dir: &Path, depth: usize, size: u64, spread: bool) -> Result<PathBuf> {
    let stripe = 2 * MIB;
    let base = dir.join("l0.vhdx");
    let mut paths = vec![base.clone()];
    let t = engine_create(&base, DiskFormat::Vhdx, size)?;
    let mut buf = vec![0x3cu8; stripe as usize];
    let write_layer = |t: &Target, i: usize, buf: &mut [u8]| -> Result<()> {
        let mut s = 0u64;
        while s * stripe < size {
            if !spread || s % depth as u64 == i as u64 {
                buf[0] = s as u8;
                t.write(s * stripe, buf)?;
            }
            s += 1;
        }
        Ok(())
    };
    if spread {
        write_layer(&t, 0, &mut buf)?;
    } else {
        write_layer(&t, usize::MAX, &mut buf)?;
    }
    drop(t);
    for i in 1..depth {
        let p = dir.join(format!("l{i}.vhdx"));
        ops::create_differencing(&p, paths.last().unwrap_or(&base), 0)
            .map_err(|e| anyhow!("create {}: {e}", p.display()))?;
        if spread {
            let t = engine_open(&p)?;
            write_layer(&t, i, &mut buf)?;
        }
        paths.push(p);
    }
    Ok(paths.last().cloned().unwrap_or(base))
}

fn chain_section(c: &Config, dir: &Path) -> Result<()> {
    println!(
        "\n## Read throughput through differencing VHDX chains ({} MiB disk, 2 MiB child blocks, {} random ops, median of {} rounds, {} time)\n",
        c.chain_size / MIB,
        c.rand_ops,
        c.rounds,
        if c.wall { "wall-clock" } else { "thread CPU" }
    );
    let mut table = vec![vec![
        "data layout".to_string(),
        "depth".into(),
        "seq read MiB/s".into(),
        "rand read 4K IOPS".into(),
        "seq vs depth 1".into(),
        "rand vs depth 1".into(),
    ]];
    for spread in [true, false] {
        // Build every depth first, then let the depths take turns in each round.
        let mut chains = Vec::new();
        for &depth in &c.depths {
            let sub = dir.join(format!("chain-{depth}-{spread}"));
            std::fs::create_dir_all(&sub)?;
            let top = build_chain(&sub, depth, c.chain_size, spread)?;
            chains.push((depth, sub, engine_open(&top)?));
        }
        let mut figs: Vec<(Vec<Fig>, Vec<Fig>)> = vec![(Vec::new(), Vec::new()); chains.len()];
        for round in 0..c.rounds {
            for k in 0..chains.len() {
                let i = (round + k) % chains.len();
                let t = &chains[i].2;
                figs[i].0.push(seq(t, c.chain_size, false)?);
                figs[i]
                    .1
                    .push(random(t, c.chain_size, c.rand_ops, false, 17)?);
            }
        }
        let mut first: Option<(Fig, Fig)> = None;
        for ((depth, sub, t), (s, r)) in chains.into_iter().zip(figs) {
            drop(t);
            std::fs::remove_dir_all(&sub)?;
            let (Some(s), Some(r)) = (median(s), median(r)) else {
                continue;
            };
            let (s1, r1) = *first.get_or_insert((s, r));
            table.push(vec![
                if spread {
                    "spread over all layers"
                } else {
                    "all data in the base"
                }
                .into(),
                depth.to_string(),
                format!("{:.0}", s.mibs()),
                format!("{:.0}", r.iops()),
                format!("{:.2}", s.mibs() / s1.mibs()),
                format!("{:.2}", r.iops() / r1.iops()),
            ]);
        }
    }
    print_table(&table);
    Ok(())
}

fn main() -> Result<()> {
    let c = parse_args()?;
    WALL.store(c.wall, std::sync::atomic::Ordering::Relaxed);
    let dir = c.dir.join(format!("fv-disk-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    println!("# fv-disk-bench");
    println!(
        "command: {}",
        std::env::args().collect::<Vec<_>>().join(" ")
    );
    println!("scratch: {}", dir.display());
    if c.only.as_deref() != Some("chain") {
        io_section(&c, &dir)?;
    }
    if c.only.as_deref() != Some("io") {
        chain_section(&c, &dir)?;
    }
    Ok(())
}
