//! Test devices and helpers shared by the NBD integration tests.
#![allow(dead_code)]

use fv_vdisk_core::{BlockDevice, Extent, ExtentState, Layer, RawLayer, Result};
use parking_lot::Mutex;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A raw file as a BlockDevice, remembering which 64 KiB granules were written,
/// zeroed or discarded, so block status has all three states to report. The data
/// itself lives in the real file (checked with qemu-img compare).
pub struct TrackedRaw {
    layer: RawLayer,
    map: Mutex<Vec<ExtentState>>,
}

pub const GRANULE: u64 = 64 << 10;

impl TrackedRaw {
    pub fn create(path: &Path, size: u64) -> Self {
        let layer = RawLayer::create(path, size).unwrap();
        let n = size.div_ceil(GRANULE) as usize;
        TrackedRaw {
            layer,
            map: Mutex::new(vec![ExtentState::Absent; n]),
        }
    }
    pub fn open(path: &Path, read_only: bool) -> Self {
        let layer = RawLayer::open(path, read_only).unwrap();
        let n = layer.info().virtual_size.div_ceil(GRANULE) as usize;
        TrackedRaw {
            layer,
            map: Mutex::new(vec![ExtentState::Data; n]),
        }
    }
    fn mark(&self, offset: u64, len: u64, st: ExtentState) {
        if len == 0 {
            return;
        }
        let mut m = self.map.lock();
        let first = (offset / GRANULE) as usize;
        let last = ((offset + len - 1) / GRANULE) as usize;
        for (i, slot) in m.iter_mut().enumerate().take(last + 1).skip(first) {
            let g_start = i as u64 * GRANULE;
            let whole = offset <= g_start && offset + len >= g_start + GRANULE;
            // A partial zero/discard leaves the granule's state as it was (data stays
            // data; zero or absent granules still read as zero).
            if st == ExtentState::Data || whole {
                *slot = st;
            }
        }
    }
}

impl BlockDevice for TrackedRaw {
    fn size(&self) -> u64 {
        self.layer.info().virtual_size
    }
    fn logical_sector_size(&self) -> u32 {
        512
    }
    fn physical_sector_size(&self) -> u32 {
        4096
    }
    fn read_only(&self) -> bool {
        self.layer.read_only()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut absent = Vec::new();
        self.layer.read_layer(offset, buf, &mut absent)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.layer.write(offset, buf)?;
        self.mark(offset, buf.len() as u64, ExtentState::Data);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.layer.write_zeroes(offset, len)?;
        self.mark(offset, len, ExtentState::Zero);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.layer.discard(offset, len)?;
        self.mark(offset, len, ExtentState::Absent);
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        self.layer.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        fv_vdisk_core::check_range(offset, len, self.size())?;
        let m = self.map.lock();
        let mut out = Vec::new();
        let end = offset + len;
        let mut cur = offset;
        while cur < end {
            let g = (cur / GRANULE) as usize;
            let g_end = ((g as u64 + 1) * GRANULE).min(end);
            out.push(Extent {
                offset: cur,
                length: g_end - cur,
                state: m[g],
            });
            cur = g_end;
        }
        fv_vdisk_core::coalesce(&mut out);
        Ok(out)
    }
    fn id(&self) -> String {
        "tracked-raw".into()
    }
}

/// Run a command with a deadline; kill it on timeout (and fail the test).
pub fn run(cmd: &str, args: &[&str], timeout: Duration) -> Output {
    let mut child = Command::new(cmd)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd} is required for this test (install qemu-utils): {e}"));
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{cmd} {args:?} timed out; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args, Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// qemu-io prints failures on stdout/stderr but may still exit 0; fail on them.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(uri);
    let out = run("qemu-io", &args, Duration::from_secs(120));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success()
            && !text.contains("fail")
            && !text.contains("error")
            && !text.contains("Pattern verification"),
        "qemu-io {cmds:?} on {uri}: {}\n{text}",
        out.status
    );
    text
}
