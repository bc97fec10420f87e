//! Test harness: a real fvd process (and, through it, real fv-worker and QEMU
//! processes) on private state/runtime dirs. Everything is killed on drop.
#![allow(dead_code)]

use fvd::client::Client;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BOOT_TIMEOUT: Duration = Duration::from_secs(900);

pub fn worker_bin() -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_fvd")).with_file_name("fv-worker");
    assert!(
        p.is_file(),
        "{} is missing: build it first (cargo build --release -p fv-worker, or scripts/test)",
        p.display()
    );
    p
}

pub struct Fvd {
    pub state: tempfile::TempDir,
    pub run: tempfile::TempDir,
    child: Option<Child>,
    pub sock: PathBuf,
    /// Extra environment, kept for restarts.
    env: Vec<(String, String)>,
}

impl Fvd {
    pub fn start() -> Fvd {
        Fvd::start_env(&[])
    }

    /// Start fvd with extra environment for it and its workers (debug knobs); kept
    /// for restarts.
    pub fn start_env(env: &[(&str, &str)]) -> Fvd {
        // Unix socket paths are limited to 108 bytes: keep the runtime dir short.
        let state = tempfile::Builder::new()
            .prefix("fvd-st")
            .tempdir_in("/tmp")
            .unwrap();
        let run = tempfile::Builder::new()
            .prefix("fvr")
            .tempdir_in("/tmp")
            .unwrap();
        let sock = run.path().join("fvd.sock");
        let mut f = Fvd {
            state,
            run,
            child: None,
            sock,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        f.spawn();
        f
    }

    pub fn spawn(&mut self) {
        assert!(self.child.is_none());
        let extra = self.env.clone();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state.path().join("fvd.stderr"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_fvd"))
            .arg("--state-dir")
            .arg(self.state.path())
            .arg("--runtime-dir")
            .arg(self.run.path())
            .env("FV_WORKER_BIN", worker_bin())
            .envs(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn fvd");
        self.child = Some(child);
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = self.client().request("GET", "/host", None) {
                if r.status == 200 {
                    return;
                }
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("fvd exited ({st}): {}", self.log());
            }
            assert!(
                Instant::now() < end,
                "fvd did not answer within 60 s: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGKILL fvd (its workers live on).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Wait for fvd to exit by itself (host shutdown); true if it did.
    pub fn wait_exit(&mut self, within: Duration) -> bool {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    pub fn restart_after_kill9(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state.path().join("fvd.stderr")).unwrap_or_default()
    }

    pub fn client(&self) -> Client {
        let mut c = Client::new(&self.sock);
        c.timeout = Duration::from_secs(700);
        c
    }

    pub fn req(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let r = self
            .client()
            .request(method, path, body.as_ref())
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        (r.status, r.json())
    }

    pub fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (s, v) = self.req(method, path, body);
        assert!(
            (200..300).contains(&s),
            "{method} {path} -> {s} {v}\n{}",
            self.log()
        );
        v
    }

    pub fn new_vm(&self, body: Value) -> Value {
        let (s, v) = self.req("POST", "/vms", Some(body));
        assert_eq!(s, 201, "{v}");
        v
    }

    pub fn vm(&self, id: &str) -> Value {
        self.ok("GET", &format!("/vms/{id}"), None)
    }

    /// Post an action and wait for its job; returns the final job.
    pub fn action(&self, id: &str, action: &str, body: Option<Value>) -> Value {
        let (s, j) = self.req("POST", &format!("/vms/{id}/actions/{action}"), body);
        assert_eq!(s, 202, "{action}: {j}\n{}", self.log());
        self.wait_job(&j)
    }

    pub fn wait_job(&self, j: &Value) -> Value {
        let id = j["id"].as_str().unwrap();
        let end = Instant::now() + BOOT_TIMEOUT;
        loop {
            let v = self.ok("GET", &format!("/jobs/{id}?wait=30"), None);
            if matches!(
                v["state"].as_str(),
                Some("completed" | "failed" | "cancelled")
            ) {
                return v;
            }
            assert!(Instant::now() < end, "job {v} did not end");
        }
    }

    pub fn action_ok(&self, id: &str, action: &str, body: Option<Value>) -> Value {
        let j = self.action(id, action, body);
        assert_eq!(
            j["state"],
            "completed",
            "{action}: {j}\nVM: {}\n{}",
            self.vm(id),
            self.log()
        );
        j
    }

    pub fn wait_vm(&self, id: &str, within: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let end = Instant::now() + within;
        loop {
            let v = self.vm(id);
            if pred(&v) {
                return v;
            }
            assert!(Instant::now() < end, "VM never matched; last: {v}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Every process in the cgroups of VMs this fvd ever ran.
    fn vm_processes(&self) -> Vec<u32> {
        let cg = fvd::host::Cgroups::detect();
        let mut out = Vec::new();
        let ids: Vec<String> = std::fs::read_dir(self.run.path().join("vms"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let mut ids = ids;
        // Also VMs whose runtime dir is already gone but whose folder exists.
        if let Ok(d) = std::fs::read_dir(self.state.path().join("vms")) {
            ids.extend(
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned()),
            );
        }
        for id in &ids {
            out.extend(cg.procs(id));
            if let Ok(p) =
                std::fs::read_to_string(self.run.path().join("vms").join(id).join("worker.pid"))
            {
                if let Ok(p) = p.trim().parse() {
                    out.push(p);
                }
            }
        }
        out
    }
}

impl Drop for Fvd {
    fn drop(&mut self) {
        self.kill9();
        let cg = fvd::host::Cgroups::detect();
        for _ in 0..50 {
            let procs = self.vm_processes();
            if procs.is_empty() {
                break;
            }
            for p in procs {
                fvd::util::kill(p, nix::sys::signal::Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for d in std::fs::read_dir(self.state.path().join("vms"))
            .into_iter()
            .flatten()
            .flatten()
        {
            cg.remove(&d.file_name().to_string_lossy());
        }
    }
}

/// The `fv` binary built beside fvd.
pub fn fv_bin() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_fvd")).with_file_name("fv");
    assert!(
        bin.is_file(),
        "{} is missing: build it first (cargo build --release -p fv)",
        bin.display()
    );
    bin
}

/// Run `fv ARGS` against this fvd: (exit code, stdout, stderr).
pub fn fv(f: &Fvd, args: &[&str]) -> (i32, String, String) {
    let o = Command::new(fv_bin())
        .args(args)
        .env("FV_SOCKET", &f.sock)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

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

/// A gen1 VM that boots the template kernel directly, with the template's data disk
/// converted to VHDX (mounted by the guest at /data). Returns (body, disk path).
pub fn guest_vm_body(name: &str, dir: &Path) -> (Value, PathBuf) {
    let t = template();
    let disk = dir.join(format!("{name}-data.vhdx"));
    fv_vdisk::ops::convert(
        &t.data_disk,
        &disk,
        fv_vdisk::DiskFormat::Vhdx,
        fv_vdisk::DiskKind::Dynamic,
        &mut |_, _| true,
    )
    .expect("convert template data disk to VHDX");
    let body = json!({
        "name": name,
        "generation": "1",
        "memory_mib": 256,
        "direct_boot": {"kernel": t.kernel, "initrd": t.initrd, "cmdline": t.cmdline},
        "hard_drives": [{"slot": {"controller": "ide", "controller_number": 0, "location": 0}, "path": disk, "read_only": false}],
        "network_adapters": [{"connection": {"type": "user"}}],
    });
    (body, disk)
}

/// The guest's serial console (COM1 socket reported by fvd).
pub struct Console {
    w: UnixStream,
    buf: Arc<Mutex<Vec<u8>>>,
}

impl Drop for Console {
    // The reader thread holds a clone of the socket: shut it down so the other end
    // (QEMU's COM port, or fvd's console relay) sees the session end.
    fn drop(&mut self) {
        let _ = self.w.shutdown(std::net::Shutdown::Both);
    }
}

impl Console {
    pub fn connect(sock: &Path) -> Console {
        let s =
            UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
        Console::over(s)
    }

    /// COM1 through fvd's console API (HTTP upgrade on the API socket): POST to
    /// type and watch, GET to watch only. Err((status, body)) when fvd refuses.
    pub fn via_api(api_sock: &Path, vm: &str, input: bool) -> Result<Console, (u16, String)> {
        let mut s = UnixStream::connect(api_sock).unwrap();
        let method = if input { "POST" } else { "GET" };
        write!(
            s,
            "{method} /vms/{vm}/console?port=1 HTTP/1.1\r\nHost: fvd\r\nConnection: Upgrade\r\nUpgrade: fv-console\r\n\r\n"
        )
        .unwrap();
        // Byte by byte: console bytes may follow the head at once.
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(s.read(&mut b).unwrap(), 1, "fvd closed the console request");
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        if status != 101 {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut body = String::new();
            let _ = s.read_to_string(&mut body);
            return Err((status, format!("{head}{body}")));
        }
        Ok(Console::over(s))
    }

    fn over(s: UnixStream) -> Console {
        let mut r = s.try_clone().unwrap();
        let buf = Arc::new(Mutex::new(Vec::new()));
        let b = buf.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = r.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                b.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        Console { w: s, buf }
    }

    /// Type raw bytes.
    pub fn send(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).unwrap();
    }

    /// Run `cmd` in the guest shell; returns what it printed between unique markers.
    pub fn run(&mut self, tag: &str, cmd: &str, within: Duration) -> String {
        let start = self.buf.lock().unwrap().len();
        // The markers are split in the typed line so the echo of the line never matches.
        self.w
            .write_all(format!("echo \"<<{tag}\"'>>'\"$({cmd})\"'<<'\"end>>\"\n").as_bytes())
            .unwrap();
        let open = format!("<<{tag}>>");
        let end = Instant::now() + within;
        loop {
            let t = String::from_utf8_lossy(&self.buf.lock().unwrap()[start..]).into_owned();
            if let Some(i) = t.find(&open) {
                let rest = &t[i + open.len()..];
                if let Some(j) = rest.find("<<end>>") {
                    return rest[..j].to_string();
                }
            }
            assert!(
                Instant::now() < end,
                "no answer to {cmd:?} within {within:?}; console:\n{t}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
