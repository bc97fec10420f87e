//! Shared test helpers: a raw-file BlockDevice, a QEMU process guard and a served device.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fv_vdisk_core::{BlockDevice, Extent, Layer, RawLayer};
use fv_vhost_blk::{BlkBackendConfig, BlkServer, BlkStats, StopHandle, VhostBlkError};

/// A raw image file as a BlockDevice (thin adapter over the contract's RawLayer).
pub struct RawDevice {
    layer: RawLayer,
    name: String,
    pub flushes: AtomicU64,
}

impl RawDevice {
    pub fn open(path: &Path, read_only: bool) -> Arc<Self> {
        Arc::new(RawDevice {
            layer: RawLayer::open(path, read_only).expect("open raw image"),
            name: path.file_name().unwrap().to_string_lossy().into_owned(),
            flushes: AtomicU64::new(0),
        })
    }
}

impl BlockDevice for RawDevice {
    fn size(&self) -> u64 {
        self.layer.info().virtual_size
    }
    fn logical_sector_size(&self) -> u32 {
        self.layer.info().logical_sector_size
    }
    fn physical_sector_size(&self) -> u32 {
        self.layer.info().physical_sector_size
    }
    fn read_only(&self) -> bool {
        self.layer.read_only()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> fv_vdisk_core::Result<()> {
        self.layer.read_layer(offset, buf, &mut Vec::new())
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> fv_vdisk_core::Result<()> {
        self.layer.write(offset, buf)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> fv_vdisk_core::Result<()> {
        self.layer.write_zeroes(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> fv_vdisk_core::Result<()> {
        self.layer.discard(offset, len)
    }
    fn flush(&self) -> fv_vdisk_core::Result<()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.layer.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> fv_vdisk_core::Result<Vec<Extent>> {
        self.layer.extents(offset, len)
    }
    fn id(&self) -> String {
        self.name.clone()
    }
}

/// A served device on its own thread; stopped and joined on drop.
pub struct Served {
    pub socket: PathBuf,
    pub stats: Arc<BlkStats>,
    stop: StopHandle,
    thread: Option<JoinHandle<Result<(), VhostBlkError>>>,
}

impl Served {
    pub fn start(dev: Arc<dyn BlockDevice>, cfg: BlkBackendConfig) -> Served {
        let socket = cfg.socket_path.clone();
        let server = BlkServer::new(dev, cfg).expect("BlkServer::new");
        let stats = server.stats();
        let stop = server.stop_handle();
        let thread = std::thread::spawn(move || server.serve());
        // The listener is up once the socket file exists.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "vhost-user socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Served {
            socket,
            stats,
            stop,
            thread: Some(thread),
        }
    }

    /// Wait for serve() to return (the frontend disconnected).
    pub fn join(mut self, timeout: Duration) -> Result<(), VhostBlkError> {
        let t = self.thread.take().unwrap();
        let deadline = Instant::now() + timeout;
        while !t.is_finished() {
            if Instant::now() > deadline {
                self.stop.stop();
                let _ = t.join();
                panic!("serve() did not return after the frontend went away");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        t.join().expect("serve thread panicked")
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.stop();
            let _ = t.join();
        }
    }
}

/// A QEMU process killed on drop, with its serial console captured.
pub struct Qemu {
    child: Child,
    serial: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
}

pub fn qemu_bin() -> &'static str {
    let bin = "qemu-system-x86_64";
    let ok = Command::new(bin)
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "{bin} not found: run scripts/install-deps");
    bin
}

impl Qemu {
    /// Start QEMU (TCG) with shared memfd RAM (required by vhost-user) and `extra` args.
    pub fn start(mem_mb: u32, extra: &[String]) -> Qemu {
        let mut cmd = Command::new(qemu_bin());
        cmd.args([
            "-accel",
            "tcg",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args(["-m", &format!("{mem_mb}M")])
        .args([
            "-object",
            &format!("memory-backend-memfd,id=mem,size={mem_mb}M,share=on"),
            "-machine",
            "pc,memory-backend=mem",
        ])
        .args(["-serial", "stdio"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn qemu");
        let serial = Arc::new(Mutex::new(String::new()));
        let mut out = child.stdout.take().unwrap();
        let sink = serial.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Qemu {
            child,
            serial,
            reader: Some(reader),
        }
    }

    pub fn serial(&self) -> String {
        self.serial.lock().unwrap().clone()
    }

    /// Wait until the serial console shows `marker`; panics (QEMU killed by Drop) on timeout
    /// or if QEMU exits first.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.serial().contains(marker) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the reader drain what is left before reporting.
                if let Some(r) = self.reader.take() {
                    let _ = r.join();
                }
                if self.serial().contains(marker) {
                    return;
                }
                panic!(
                    "QEMU exited ({status}) before printing {marker:?}; console:\n{}",
                    self.serial()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {marker:?}; console:\n{}",
                    self.serial()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait for QEMU to exit by itself (e.g. guest poweroff); kill it on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                if let Some(r) = self.reader.take() {
                    let _ = r.join();
                }
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.kill();
        false
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `-chardev`/`-device` arguments attaching a vhost-user-blk device.
pub fn vhost_blk_args(id: &str, socket: &Path, queues: u16, bootindex: Option<u32>) -> Vec<String> {
    let mut dev = format!("vhost-user-blk-pci,chardev={id},num-queues={queues}");
    if let Some(b) = bootindex {
        dev.push_str(&format!(",bootindex={b}"));
    }
    vec![
        "-chardev".into(),
        format!("socket,id={id},path={}", socket.display()),
        "-device".into(),
        dev,
    ]
}

/// Short unique socket path (sun_path is limited to 108 bytes).
pub fn socket_in(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.sock"))
}

/// Minimal client of QEMU's gdbstub (GDB remote serial protocol over a Unix socket).
///
/// Why a test needs it: under TCG, QEMU keeps translated guest code until a write it
/// sees (a CPU store or QEMU's own DMA) invalidates it. A vhost-user backend writes guest
/// RAM directly, so code it loads over code that already ran is not re-translated
/// (QEMU's hw/virtio/vhost.c says so in vhost_section()). BIOS chain loading hits exactly
/// that: the MBR runs at 0x7c00, then loads the partition boot record to 0x7c00 through
/// the backend, and TCG would re-run the stale MBR translation. Inserting and removing a
/// breakpoint makes QEMU drop the translation at that address. KVM needs none of this.
pub struct GdbStub {
    sock: std::os::unix::net::UnixStream,
}

impl GdbStub {
    pub fn connect(path: &Path, timeout: Duration) -> GdbStub {
        let deadline = Instant::now() + Duration::from_secs(30);
        let sock = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "gdbstub connect: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        sock.set_read_timeout(Some(timeout)).unwrap();
        GdbStub { sock }
    }

    /// Send one packet and return the reply packet's payload (for `c`: the stop reply).
    pub fn cmd(&mut self, payload: &str) -> String {
        use std::io::Write;
        let sum = payload.bytes().fold(0u8, |a, b| a.wrapping_add(b));
        write!(self.sock, "${payload}#{sum:02x}").expect("gdbstub write");
        let reply = self.read_packet();
        self.sock.write_all(b"+").expect("gdbstub ack");
        reply
    }

    fn byte(&mut self) -> u8 {
        let mut b = [0u8; 1];
        self.sock
            .read_exact(&mut b)
            .expect("gdbstub read (QEMU gone or timed out)");
        b[0]
    }

    fn read_packet(&mut self) -> String {
        // Skip acks ('+') up to the start of the reply.
        while self.byte() != b'$' {}
        let mut payload = Vec::new();
        loop {
            match self.byte() {
                b'#' => break,
                b => payload.push(b),
            }
        }
        self.byte();
        self.byte(); // checksum (the transport is reliable)
        String::from_utf8_lossy(&payload).into_owned()
    }

    /// Run the guest until it has executed `addr` (a linear address) `hits` times,
    /// making QEMU flush its translated code each time it gets there (removing a
    /// breakpoint flushes it), then detach; the guest keeps running. Returns the
    /// `peek` bytes at `addr` seen at each stop.
    pub fn break_at(&mut self, addr: u64, hits: usize, peek: usize) -> Vec<Vec<u8>> {
        let bp = format!("{addr:x},1");
        let mut seen = Vec::new();
        for hit in 1..=hits {
            assert_eq!(self.cmd(&format!("Z0,{bp}")), "OK", "insert breakpoint");
            self.expect_stop("c", hit, addr);
            seen.push(self.read_mem(addr, peek));
            assert_eq!(self.cmd(&format!("z0,{bp}")), "OK", "remove breakpoint");
            if hit < hits {
                // Step off the address, or `c` would stop there again at once.
                self.expect_stop("s", hit, addr);
            }
        }
        assert_eq!(self.cmd("D"), "OK", "detach");
        seen
    }

    /// Read guest memory (hex reply decoded).
    pub fn read_mem(&mut self, addr: u64, len: usize) -> Vec<u8> {
        let hex = self.cmd(&format!("m{addr:x},{len:x}"));
        (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex memory reply"))
            .collect()
    }

    fn expect_stop(&mut self, cmd: &str, hit: usize, addr: u64) {
        let stop = self.cmd(cmd);
        assert!(
            stop.starts_with('T') || stop.starts_with('S'),
            "unexpected gdbstub reply {stop:?} to {cmd:?} (hit {hit} of {addr:#x})"
        );
    }
}
