#![allow(dead_code)]
use fv_vdisk::{BlockDevice, OpenOptions};
use rand::Rng;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} is required for this test and could not run: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn rw() -> OpenOptions {
    OpenOptions::default()
}
pub fn ro() -> OpenOptions {
    OpenOptions {
        read_only: true,
        ..Default::default()
    }
}

pub fn read_all(d: &dyn BlockDevice) -> Vec<u8> {
    let mut v = vec![0u8; d.size() as usize];
    for (i, c) in v.chunks_mut(4 << 20).enumerate() {
        d.read_at(i as u64 * (4 << 20), c).unwrap();
    }
    v
}

/// Random writes in units of `unit` bytes applied to both the disk and the reference.
pub fn scribble(
    rng: &mut impl Rng,
    d: &dyn BlockDevice,
    reference: &mut [u8],
    n: usize,
    unit: u64,
) {
    let size = d.size();
    for _ in 0..n {
        let len = rng.gen_range(1..=(256 << 10) / unit) * unit;
        let off = rng.gen_range(0..=(size - len) / unit) * unit;
        let byte: u8 = rng.gen();
        let data: Vec<u8> = (0..len).map(|i| byte ^ (i as u8)).collect();
        d.write_at(off, &data).unwrap();
        reference[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
    d.flush().unwrap();
}

/// vhdimount (FUSE) on a temp mount point; unmounted and killed on drop.
pub struct VhdiMount {
    pub dir: PathBuf,
    child: Child,
}

impl VhdiMount {
    pub fn new(image: &Path, mnt: &Path) -> Self {
        std::fs::create_dir_all(mnt).unwrap();
        let log = mnt.with_extension("log");
        let child = Command::new("vhdimount")
            .arg("-v")
            .arg(image)
            .arg(mnt)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("vhdimount (libvhdi-utils) is required: {e}"));
        let m = VhdiMount {
            dir: mnt.to_path_buf(),
            child,
        };
        let start = Instant::now();
        while !m.dir.join("vhdi1").exists() {
            if start.elapsed() > Duration::from_secs(20) {
                panic!(
                    "vhdimount did not expose {}: {}",
                    m.dir.join("vhdi1").display(),
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        m
    }
    /// vhdimount exposes every layer of a chain as vhdi1 (base) .. vhdiN (top).
    pub fn file(&self) -> PathBuf {
        let mut n = 1;
        while self.dir.join(format!("vhdi{}", n + 1)).exists() {
            n += 1;
        }
        self.dir.join(format!("vhdi{n}"))
    }
    pub fn layers(&self) -> usize {
        let mut n = 0;
        while self.dir.join(format!("vhdi{}", n + 1)).exists() {
            n += 1;
        }
        n
    }
}

impl Drop for VhdiMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let start = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                _ if start.elapsed() > Duration::from_secs(5) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
                    break;
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}
