//! Test harness: real fv-worker processes running real QEMU (TCG) with the guest
//! template. Every worker (and its QEMU) is killed on drop.
#![allow(dead_code)]

use fv_model::*;
use fv_worker_proto::{Event, LaunchSpec};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BOOT_TIMEOUT: Duration = Duration::from_secs(900);

pub fn template() -> fv_guest_template::Template {
    let dir = std::env::var_os("FV_TEMPLATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/templates"));
    std::fs::create_dir_all(&dir).unwrap();
    fv_guest_template::ensure(&dir).unwrap_or_else(|e| {
        panic!(
            "guest template could not be built in {}: {e}",
            dir.display()
        )
    })
}

pub struct Vm {
    pub vm_dir: tempfile::TempDir,
    pub run_dir: tempfile::TempDir,
    pub config: VmConfig,
}

/// A gen1 VM booting the template kernel directly, with the template's data disk
/// converted to VHDX on IDE 0:0 (an emulated IDE disk on the worker's NBD export;
/// the guest mounts it at /data before it reports ready). Direct boot keeps these
/// tests fast; `gen1_bios_vm` covers booting from the disk itself.
pub fn gen1_vm(name: &str) -> Vm {
    let t = template();
    gen1_vm_with(name, &t.data_disk, Some(&t))
}

/// A gen1 VM that boots through SeaBIOS from the template's BIOS disk, converted
/// to VHDX on IDE 0:0.
pub fn gen1_bios_vm(name: &str) -> Vm {
    let t = template();
    gen1_vm_with(name, &t.bios_disk, None)
}

fn gen1_vm_with(name: &str, image: &Path, direct: Option<&fv_guest_template::Template>) -> Vm {
    let vm_dir = tempfile::Builder::new().prefix("fvw-vm").tempdir().unwrap();
    // Unix socket paths are limited to 108 bytes: keep the runtime dir short.
    let run_dir = tempfile::Builder::new()
        .prefix("fvw")
        .tempdir_in("/tmp")
        .unwrap();
    let disk = vm_dir.path().join("boot.vhdx");
    fv_vdisk::ops::convert(
        image,
        &disk,
        fv_vdisk::DiskFormat::Vhdx,
        fv_vdisk::DiskKind::Dynamic,
        &mut |_, _| true,
    )
    .expect("convert template disk to VHDX");
    let mut c = VmConfig::new(name, Generation::Gen1);
    c.memory_mib = 256;
    c.direct_boot = direct.map(|t| DirectBoot {
        kernel: t.kernel.clone(),
        initrd: Some(t.initrd.clone()),
        cmdline: t.cmdline.clone(),
    });
    c.hard_drives.push(HardDrive {
        slot: Slot {
            controller: ControllerKind::Ide,
            controller_number: 0,
            location: 0,
        },
        path: "boot.vhdx".into(),
        read_only: false,
    });
    c.network_adapters.push(NetworkAdapter {
        id: uuid::Uuid::new_v4(),
        name: "nic0".into(),
        kind: NicKind::Synthetic,
        static_mac: Some("00:15:5d:12:34:56".into()),
        dynamic_mac: None,
        connection: NicConnection::User,
    });
    Vm {
        vm_dir,
        run_dir,
        config: c,
    }
}

impl Vm {
    pub fn spec(&self, restore_from: Option<PathBuf>) -> LaunchSpec {
        LaunchSpec {
            config: self.config.clone(),
            vm_dir: self.vm_dir.path().to_path_buf(),
            runtime_dir: self.run_dir.path().to_path_buf(),
            restore_from,
            accel: "tcg".into(),
            qemu_binary: "qemu-system-x86_64".into(),
            qemu_uid: None,
            qemu_gid: None,
            allowed_disk_dirs: vec![],
            confine: true,
            media_dirs: vec![],
            private_dirs: vec![],
            host_name: String::new(),
            integration_tuning: Default::default(),
        }
    }

    pub fn write_spec(&self, restore_from: Option<PathBuf>) -> PathBuf {
        let p = self.vm_dir.path().join("launch.json");
        std::fs::write(
            &p,
            serde_json::to_vec_pretty(&self.spec(restore_from)).unwrap(),
        )
        .unwrap();
        p
    }

    pub fn sock(&self, name: &str) -> PathBuf {
        self.run_dir.path().join(name)
    }

    pub fn start(&self, restore_from: Option<PathBuf>) -> Worker {
        self.start_env(restore_from, &[])
    }

    /// Start a worker with extra environment variables (debug knobs).
    pub fn start_env(&self, restore_from: Option<PathBuf>, env: &[(&str, &str)]) -> Worker {
        let spec = self.write_spec(restore_from);
        let child = Command::new(env!("CARGO_BIN_EXE_fv-worker"))
            .arg("--launch")
            .arg(&spec)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        Worker {
            child: Some(child),
            pid: 0,
            qemu_pid: 0,
            run_dir: self.run_dir.path().to_path_buf(),
        }
        .with_pid()
    }

    pub fn log_tail(&self) -> String {
        let mut s = String::new();
        for f in ["worker.log", "qemu.log"] {
            let t = std::fs::read_to_string(self.run_dir.path().join(f)).unwrap_or_default();
            let lines: Vec<&str> = t.lines().collect();
            let from = lines.len().saturating_sub(30);
            s.push_str(&format!("--- {f}\n{}\n", lines[from..].join("\n")));
        }
        s
    }
}

/// A worker process; killed (with its QEMU, via the parent-death signal) on drop.
pub struct Worker {
    pub child: Option<Child>,
    pub pid: i32,
    pub qemu_pid: i32,
    pub run_dir: PathBuf,
}

impl Worker {
    fn with_pid(mut self) -> Self {
        self.pid = self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0);
        self
    }

    pub fn from_pid(pid: i32, run_dir: &Path) -> Worker {
        Worker {
            child: None,
            pid,
            qemu_pid: 0,
            run_dir: run_dir.to_path_buf(),
        }
    }

    pub fn alive(&self) -> bool {
        // SAFETY: signal 0 only checks for existence.
        let exists = unsafe { libc::kill(self.pid, 0) == 0 };
        exists
            && !std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true)
    }

    /// Wait for the worker to exit by itself.
    pub fn wait_exit(&mut self, within: Duration) -> bool {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(_)) = c.try_wait() {
                    return true;
                }
            } else if !self.alive() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    pub fn connect(&self) -> Client {
        Client::connect(&self.run_dir.join("worker.sock"))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.pid > 0 {
            // SAFETY: kill(2) on the worker we started.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        // QEMU dies with its worker (parent-death signal); this covers the rest.
        if self.qemu_pid > 0 {
            // SAFETY: kill(2) on a QEMU a worker of ours started.
            unsafe {
                libc::kill(self.qemu_pid, libc::SIGKILL);
            }
        }
    }
}

/// Blocking worker-protocol client.
pub struct Client {
    r: BufReader<UnixStream>,
    w: UnixStream,
    next: u64,
    pub events: VecDeque<Event>,
}

impl Client {
    pub fn connect(sock: &Path) -> Client {
        let end = Instant::now() + Duration::from_secs(60);
        let s = loop {
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                Err(e) if Instant::now() > end => panic!("connect {}: {e}", sock.display()),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        Client {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
            next: 1,
            events: VecDeque::new(),
        }
    }

    fn read_msg(&mut self, until: Instant) -> Option<Value> {
        let mut line = String::new();
        loop {
            match self.r.read_line(&mut line) {
                Ok(0) => panic!("worker closed the connection"),
                Ok(_) if line.ends_with('\n') => {
                    return Some(serde_json::from_str(line.trim()).unwrap())
                }
                Ok(_) => {}
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    if Instant::now() > until {
                        return None;
                    }
                }
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// Send an op; returns Ok(result) or Err(error object).
    pub fn call(&mut self, op: Value, within: Duration) -> Result<Value, Value> {
        let id = self.next;
        self.next += 1;
        let mut line = serde_json::to_string(&json!({"id": id, "op": op})).unwrap();
        line.push('\n');
        self.w.write_all(line.as_bytes()).unwrap();
        let until = Instant::now() + within;
        loop {
            let Some(v) = self.read_msg(until) else {
                panic!("no reply to {op} within {within:?}")
            };
            if let Some(ev) = v.get("event") {
                self.events
                    .push_back(serde_json::from_value(ev.clone()).unwrap());
                continue;
            }
            if v["id"].as_u64() == Some(id) {
                if let Some(e) = v.get("error") {
                    return Err(e.clone());
                }
                return Ok(v.get("ok").cloned().unwrap_or(Value::Null));
            }
        }
    }

    /// Send an op without waiting; returns its request id (see `reply`).
    pub fn send(&mut self, op: Value) -> u64 {
        let id = self.next;
        self.next += 1;
        let mut line = serde_json::to_string(&json!({"id": id, "op": op})).unwrap();
        line.push('\n');
        self.w.write_all(line.as_bytes()).unwrap();
        id
    }

    /// Send an op with one file descriptor attached (SCM_RIGHTS).
    pub fn send_with_fd(&mut self, op: Value, fd: std::os::fd::BorrowedFd<'_>) -> u64 {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        use std::os::fd::AsRawFd;
        let id = self.next;
        self.next += 1;
        let mut line = serde_json::to_string(&json!({"id": id, "op": op})).unwrap();
        line.push('\n');
        let raw = [fd.as_raw_fd()];
        let iov = [std::io::IoSlice::new(line.as_bytes())];
        let n = sendmsg::<()>(
            self.w.as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        self.w.write_all(&line.as_bytes()[n..]).unwrap();
        id
    }

    /// Wait for the reply to request `id` (events seen meanwhile are kept).
    pub fn reply(&mut self, id: u64, within: Duration) -> Result<Value, Value> {
        let until = Instant::now() + within;
        loop {
            let Some(v) = self.read_msg(until) else {
                panic!("no reply to request {id} within {within:?}")
            };
            if let Some(ev) = v.get("event") {
                self.events
                    .push_back(serde_json::from_value(ev.clone()).unwrap());
                continue;
            }
            if v["id"].as_u64() == Some(id) {
                if let Some(e) = v.get("error") {
                    return Err(e.clone());
                }
                return Ok(v.get("ok").cloned().unwrap_or(Value::Null));
            }
        }
    }

    pub fn ok(&mut self, op: Value) -> Value {
        self.call(op.clone(), Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("{op} failed: {e}"))
    }

    pub fn status(&mut self) -> Value {
        self.ok(json!({"op": "status"}))
    }

    /// Wait for an event matching `f` (looking at already received ones first).
    pub fn wait_event(&mut self, within: Duration, mut f: impl FnMut(&Event) -> bool) -> Event {
        if let Some(pos) = self.events.iter().position(&mut f) {
            let e = self.events.remove(pos).unwrap();
            self.events.drain(..pos);
            return e;
        }
        let until = Instant::now() + within;
        loop {
            let Some(v) = self.read_msg(until) else {
                panic!("event not seen within {within:?}; got {:?}", self.events)
            };
            if let Some(ev) = v.get("event") {
                let ev: Event = serde_json::from_value(ev.clone()).unwrap();
                if f(&ev) {
                    return ev;
                }
                self.events.push_back(ev);
            }
        }
    }

    pub fn wait_state(&mut self, state: VmState, within: Duration) {
        self.wait_event(
            within,
            |e| matches!(e, Event::StateChanged { state: s, .. } if *s == state),
        );
    }
}

/// The guest's serial console (COM1) with everything read so far.
pub struct Console {
    w: UnixStream,
    buf: Arc<Mutex<Vec<u8>>>,
    _t: std::thread::JoinHandle<()>,
}

impl Console {
    pub fn connect(sock: &Path) -> Console {
        let end = Instant::now() + Duration::from_secs(60);
        let s = loop {
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                Err(e) if Instant::now() > end => panic!("connect {}: {e}", sock.display()),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let mut r = s.try_clone().unwrap();
        let buf = Arc::new(Mutex::new(Vec::new()));
        let b2 = buf.clone();
        let t = std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = r.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                b2.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        Console { w: s, buf, _t: t }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap()).into_owned()
    }

    pub fn wait_for(&self, needle: &str, within: Duration) {
        let end = Instant::now() + within;
        while !self.text().contains(needle) {
            if Instant::now() > end {
                let t = self.text();
                let tail: String = t
                    .chars()
                    .rev()
                    .take(3000)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                panic!("{needle:?} not seen on the console within {within:?}; tail:\n{tail}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Type a line without waiting for anything.
    pub fn run_nowait(&mut self, line: &str) {
        self.w.write_all(format!("{line}\n").as_bytes()).unwrap();
    }

    /// Run a shell command on the console and return the text between the markers
    /// `@@<tag>@@` ... `@@end@@` it prints.
    pub fn run(&mut self, tag: &str, cmd: &str, within: Duration) -> String {
        let start = self.buf.lock().unwrap().len();
        let line = format!("echo @@{tag}@@\"$({cmd})\"@@end@@\n");
        self.w.write_all(line.as_bytes()).unwrap();
        let open = format!("@@{tag}@@");
        let end = Instant::now() + within;
        loop {
            let t = String::from_utf8_lossy(&self.buf.lock().unwrap()[start..]).into_owned();
            // The echoed command line contains `@@tag@@"$(`; the output does not.
            for (i, _) in t.match_indices(&open) {
                let rest = &t[i + open.len()..];
                if rest.starts_with('"') {
                    continue;
                }
                if let Some(j) = rest.find("@@end@@") {
                    return rest[..j].to_string();
                }
            }
            assert!(Instant::now() < end, "no output for {cmd:?}; console:\n{t}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

pub fn uptime(console: &mut Console, tag: &str) -> f64 {
    let out = console.run(tag, "cat /proc/uptime", Duration::from_secs(120));
    out.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("bad uptime {out:?}"))
}
