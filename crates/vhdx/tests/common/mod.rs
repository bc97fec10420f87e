//! Shared helpers for the VHDX tests: real peers (qemu-img, qemu-io, vhdimount) run
//! as child processes, always bounded in time.
#![allow(dead_code)]

use fv_vdisk_core::{CreateSpec, DiskKind, Layer};
use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const MIB: u64 = 1 << 20;

/// Run a tool to completion within `secs`, killing it otherwise. Fails loudly when
/// the tool is missing.
pub fn run(cmd: &str, args: &[&str], secs: u64) -> Output {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd} is required for this test (install it): {e}"));
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stdout = Vec::new();
            let mut stderr = Vec::new();
            child
                .stdout
                .take()
                .unwrap()
                .read_to_end(&mut stdout)
                .unwrap();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_end(&mut stderr)
                .unwrap();
            return Output {
                status,
                stdout,
                stderr,
            };
        }
        if start.elapsed() > Duration::from_secs(secs) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd} {args:?} did not finish within {secs}s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn run_ok(cmd: &str, args: &[&str], secs: u64) -> String {
    let o = run(cmd, args, secs);
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Deterministic pseudo-random bytes (splitmix64).
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

pub fn spec(kind: DiskKind, size: u64, block: u32, lss: u32) -> CreateSpec {
    CreateSpec {
        virtual_size: size,
        kind,
        block_size: block,
        logical_sector_size: lss,
        physical_sector_size: 4096,
        parent: None,
    }
}

/// Read the whole layer as a base disk would be seen (absent = zero).
pub fn read_all_base(l: &dyn Layer) -> Vec<u8> {
    let size = l.info().virtual_size;
    let mut out = vec![0u8; size as usize];
    let chunk = 4 * MIB as usize;
    for (i, c) in out.chunks_mut(chunk).enumerate() {
        let mut absent = Vec::new();
        let off = (i * chunk) as u64;
        l.read_layer(off, c, &mut absent).unwrap();
        for r in absent {
            c[(r.start - off) as usize..(r.end - off) as usize].fill(0);
        }
    }
    out
}

/// Read a child over its parent (absent ranges of the child come from the parent).
pub fn read_chain(child: &dyn Layer, parent: &dyn Layer, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let mut absent = Vec::new();
    child.read_layer(off, &mut buf, &mut absent).unwrap();
    let mut last = off;
    for r in &absent {
        assert!(
            r.start >= last && r.start < r.end,
            "absent ranges must ascend: {absent:?}"
        );
        last = r.end;
        let mut pabs = Vec::new();
        let s = (r.start - off) as usize;
        let e = (r.end - off) as usize;
        parent
            .read_layer(r.start, &mut buf[s..e], &mut pabs)
            .unwrap();
        for q in pabs {
            buf[(q.start - off) as usize..(q.end - off) as usize].fill(0);
        }
    }
    buf
}

pub fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b.iter())
        .position(|(x, y)| x != y)
        .or(if a.len() != b.len() {
            Some(a.len().min(b.len()))
        } else {
            None
        })
}

/// A vhdimount FUSE mount, unmounted on drop (also on panic).
pub struct Mount {
    pub dir: std::path::PathBuf,
}

impl Mount {
    pub fn new(image: &Path, dir: &Path) -> Mount {
        std::fs::create_dir_all(dir).unwrap();
        let m = Mount {
            dir: dir.to_path_buf(),
        };
        run_ok("vhdimount", &["-X", "allow_other", p(image), p(dir)], 60);
        let start = Instant::now();
        while !m.file().exists() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "vhdimount exposed no vhdi1"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        m
    }
    pub fn file(&self) -> std::path::PathBuf {
        self.dir.join("vhdi1")
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let o = run("umount", &[p(&self.dir)], 30);
        if !o.status.success() {
            let _ = Command::new("fusermount")
                .args(["-u", p(&self.dir)])
                .status();
        }
    }
}

/// Compare two files (or a file and a prefix-sized reference) chunk by chunk.
pub fn files_equal(a: &Path, b: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let fa = std::fs::File::open(a).unwrap();
    let fb = std::fs::File::open(b).unwrap();
    let (la, lb) = (fa.metadata().unwrap().len(), fb.metadata().unwrap().len());
    if la != lb {
        return Err(format!("sizes differ: {la} vs {lb}"));
    }
    let mut off = 0;
    let mut x = vec![0u8; 4 << 20];
    let mut y = vec![0u8; 4 << 20];
    while off < la {
        let n = (la - off).min(x.len() as u64) as usize;
        fa.read_exact_at(&mut x[..n], off).unwrap();
        fb.read_exact_at(&mut y[..n], off).unwrap();
        if let Some(i) = first_diff(&x[..n], &y[..n]) {
            return Err(format!("first difference at byte {}", off + i as u64));
        }
        off += n as u64;
    }
    Ok(())
}
