//! Boots the real template under QEMU (TCG) and talks to the real qemu-ga in it.
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const READY_TIMEOUT: Duration = Duration::from_secs(120);

fn template() -> fv_guest_template::Template {
    let dir = fv_guest_template::default_cache_dir();
    fv_guest_template::ensure(&dir)
        .unwrap_or_else(|e| panic!("template build in {} failed: {e}", dir.display()))
}

/// Kills QEMU on every path, including panics.
struct Qemu {
    child: Child,
    serial_out: Arc<Mutex<Vec<u8>>>,
    serial_in: UnixStream,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Qemu {
    fn spawn(dir: &Path, boot_args: &[String]) -> Qemu {
        Self::spawn_with(dir, &["-nic", "user,model=virtio-net-pci"], boot_args)
    }

    fn spawn_with(dir: &Path, extra: &[&str], boot_args: &[String]) -> Qemu {
        let serial = dir.join("serial.sock");
        let qga = dir.join("qga.sock");
        let qmp = dir.join("qmp.sock");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-accel",
            "tcg",
            "-m",
            "512",
            "-nographic",
            "-no-reboot",
            "-monitor",
            "none",
        ])
        // wait=on: QEMU starts the guest only once we are connected, so no
        // console output is lost.
        .arg("-chardev")
        .arg(format!(
            "socket,id=ser0,path={},server=on,wait=on",
            serial.display()
        ))
        .args(["-serial", "chardev:ser0"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .args(["-device", "virtio-serial"])
        .arg("-chardev")
        .arg(format!(
            "socket,path={},server=on,wait=off,id=qga",
            qga.display()
        ))
        .args([
            "-device",
            "virtserialport,chardev=qga,name=org.qemu.guest_agent.0",
        ])
        .args(extra)
        .args(boot_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start qemu-system-x86_64 (run scripts/install-deps): {e}")
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match UnixStream::connect(&serial) {
                Ok(s) => break s,
                Err(e) => {
                    if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
                        let _ = child.kill();
                        let _ = child.wait();
                        let mut err = String::new();
                        if let Some(mut se) = child.stderr.take() {
                            let _ = se.read_to_string(&mut err);
                        }
                        panic!("cannot connect to QEMU's serial socket: {e}; qemu stderr: {err}");
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        let serial_out = Arc::new(Mutex::new(Vec::new()));
        let (mut r, buf) = (stream.try_clone().unwrap(), serial_out.clone());
        // Ends when QEMU closes the socket (it exits or is killed by Drop).
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = r.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                buf.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        Qemu {
            child,
            serial_out,
            serial_in: stream,
        }
    }

    fn serial_text(&self) -> String {
        String::from_utf8_lossy(&self.serial_out.lock().unwrap()).into_owned()
    }

    /// Types a line on the serial console and waits for `expect` in the output after it.
    fn console(&mut self, line: &str, expect: &str) {
        let from = self.serial_out.lock().unwrap().len();
        self.serial_in
            .write_all(format!("{line}\n").as_bytes())
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.serial_out.lock().unwrap()[from..].to_vec();
            if String::from_utf8_lossy(&out).contains(expect) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "console: no {expect:?} after {line:?}; got {:?}",
                String::from_utf8_lossy(&out)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the ready marker; returns the time since `started`.
    fn wait_ready(&mut self, started: Instant) -> Duration {
        let deadline = started + READY_TIMEOUT;
        loop {
            if self.serial_text().contains(fv_guest_template::READY_MARKER) {
                return started.elapsed();
            }
            if let Some(st) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!(
                    "qemu exited ({st}) before the ready marker\nstderr: {err}\nserial:\n{}",
                    self.serial_text()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "no ready marker within {READY_TIMEOUT:?}; serial:\n{}",
                    self.serial_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_exit(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }
}

/// A line-oriented QGA/QMP client: one JSON object per line each way.
struct JsonLines {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl JsonLines {
    fn connect(path: &Path) -> JsonLines {
        let s =
            UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        JsonLines {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
        }
    }
    fn send(&mut self, v: &Value) {
        let mut line = serde_json::to_vec(v).unwrap();
        line.push(b'\n');
        self.w.write_all(&line).unwrap();
    }
    fn recv(&mut self) -> Value {
        let mut line = String::new();
        let n = self
            .r
            .read_line(&mut line)
            .expect("no answer from the socket within 30 s");
        assert!(n > 0, "socket closed");
        serde_json::from_str(line.trim_start_matches('\u{ff}').trim())
            .unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}"))
    }
    /// guest-sync until the agent echoes our id (earlier answers are stale).
    fn sync(&mut self, id: u64) {
        self.send(&json!({"execute": "guest-sync", "arguments": {"id": id}}));
        loop {
            let v = self.recv();
            if v["return"] == json!(id) {
                return;
            }
        }
    }
    fn call(&mut self, cmd: &str, args: Value) -> Value {
        let msg = if args.is_null() {
            json!({"execute": cmd})
        } else {
            json!({"execute": cmd, "arguments": args})
        };
        self.send(&msg);
        let v = self.recv();
        assert!(v.get("error").is_none(), "{cmd} failed: {v}");
        v["return"].clone()
    }
}

fn b64decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a') as u32 + 26,
            b'0'..=b'9' => (c - b'0') as u32 + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("bad base64 {c}"),
        }
    };
    let mut out = Vec::new();
    for chunk in s.trim_end_matches('=').as_bytes().chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c) << (18 - 6 * i);
        }
        let bytes = [(acc >> 16) as u8, (acc >> 8) as u8, acc as u8];
        out.extend_from_slice(&bytes[..chunk.len() - 1]);
    }
    out
}

/// Runs a program in the guest through guest-exec and returns its stdout.
fn guest_exec(qga: &mut JsonLines, path: &str, args: &[&str]) -> String {
    let pid = qga.call(
        "guest-exec",
        json!({"path": path, "arg": args, "capture-output": true}),
    )["pid"]
        .clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = qga.call("guest-exec-status", json!({"pid": pid}));
        if st["exited"] == json!(true) {
            assert_eq!(st["exitcode"], json!(0), "{path} {args:?}: {st}");
            return String::from_utf8(b64decode(st["out-data"].as_str().unwrap_or(""))).unwrap();
        }
        assert!(Instant::now() < deadline, "{path} did not finish: {st}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn has_addr(ifaces: &Value, ip: &str) -> bool {
    ifaces
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|i| i["ip-addresses"].as_array().cloned().unwrap_or_default())
        .any(|a| a["ip-address"] == json!(ip))
}

fn check_data_fs(qga: &mut JsonLines) {
    let hello = guest_exec(qga, "/bin/cat", &["/data/hello.txt"]);
    assert_eq!(hello, fv_guest_template::SEED_CONTENT);
    let mounts = guest_exec(qga, "/bin/cat", &["/proc/self/mounts"]);
    assert!(
        mounts.lines().any(|l| l.contains(" /data ext4 ")),
        "{mounts}"
    );
}

#[test]
fn bios_disk_boots_and_agent_works() {
    let t = template();
    let tmp = tempfile::tempdir().unwrap();
    let started = Instant::now();
    // snapshot=on: the guest's writes never reach the cached template.
    let mut q = Qemu::spawn(
        tmp.path(),
        &[
            "-drive".into(),
            format!(
                "file={},format=raw,if=virtio,snapshot=on",
                t.bios_disk.display()
            ),
        ],
    );
    let took = q.wait_ready(started);
    eprintln!(
        "BIOS disk: ready marker after {:.2} s (TCG)",
        took.as_secs_f64()
    );

    let mut qga = JsonLines::connect(&tmp.path().join("qga.sock"));
    qga.sync(0x5eed_0001);
    assert_eq!(qga.call("guest-ping", Value::Null), json!({}));
    qga.sync(0x5eed_0002);

    let ifaces = qga.call("guest-network-get-interfaces", Value::Null);
    assert!(
        has_addr(&ifaces, "10.0.2.15"),
        "no slirp DHCP address: {ifaces}"
    );

    check_data_fs(&mut qga);
    let os = qga.call("guest-get-osinfo", Value::Null);
    assert_eq!(os["id"], json!("ferrovisor-template"), "{os}");
    assert_eq!(
        qga.call("guest-get-host-name", Value::Null)["host-name"],
        json!("fvguest")
    );

    let frozen = qga.call("guest-fsfreeze-freeze", Value::Null);
    assert!(frozen.as_u64().unwrap() >= 1, "froze {frozen}");
    assert_eq!(
        qga.call("guest-fsfreeze-status", Value::Null),
        json!("frozen")
    );
    let thawed = qga.call("guest-fsfreeze-thaw", Value::Null);
    assert!(thawed.as_u64().unwrap() >= 1, "thawed {thawed}");
    assert_eq!(
        qga.call("guest-fsfreeze-status", Value::Null),
        json!("thawed")
    );

    // guest-shutdown has no success reply: the guest powers off and QEMU exits.
    qga.send(&json!({"execute": "guest-shutdown"}));
    assert!(
        q.wait_exit(Duration::from_secs(60)),
        "guest did not power off after guest-shutdown"
    );
}

#[test]
fn direct_boot_with_data_disk() {
    let t = template();
    assert!(t.cmdline.contains("console=ttyS0"), "{}", t.cmdline);
    let tmp = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut q = Qemu::spawn(
        tmp.path(),
        &[
            "-kernel".into(),
            t.kernel.display().to_string(),
            "-initrd".into(),
            t.initrd.display().to_string(),
            "-append".into(),
            t.cmdline.clone(),
            "-drive".into(),
            format!(
                "file={},format=raw,if=virtio,snapshot=on",
                t.data_disk.display()
            ),
        ],
    );
    let took = q.wait_ready(started);
    eprintln!(
        "direct boot: ready marker after {:.2} s (TCG)",
        took.as_secs_f64()
    );

    let mut qga = JsonLines::connect(&tmp.path().join("qga.sock"));
    qga.sync(0x5eed_0003);
    check_data_fs(&mut qga);

    // The serial console is an interactive shell.
    q.console("echo console-$((6 * 7))-ok", "console-42-ok");
    q.console(
        "cat /data/hello.txt",
        fv_guest_template::SEED_CONTENT.trim(),
    );

    // ACPI power button (QMP system_powerdown) -> busybox acpid -> poweroff.
    let mut qmp = JsonLines::connect(&tmp.path().join("qmp.sock"));
    let greeting = qmp.recv();
    assert!(greeting.get("QMP").is_some(), "{greeting}");
    qmp.send(&json!({"execute": "qmp_capabilities"}));
    assert_eq!(qmp.recv()["return"], json!({}));
    qmp.send(&json!({"execute": "system_powerdown"}));
    assert!(
        q.wait_exit(Duration::from_secs(60)),
        "guest ignored the ACPI power button"
    );
}

#[test]
fn concurrent_ensure_agrees() {
    let dir = fv_guest_template::default_cache_dir();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let dir = dir.clone();
            std::thread::spawn(move || fv_guest_template::ensure(&dir).unwrap())
        })
        .collect();
    let all: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for t in &all {
        assert_eq!(t, &all[0]);
        for p in [&t.bios_disk, &t.kernel, &t.initrd, &t.data_disk] {
            assert!(p.is_file(), "{}", p.display());
        }
    }
    let m = fv_guest_template::manifest(&all[0]).unwrap();
    assert_eq!(m.cache_key, all[0].cache_key);
    assert!(
        m.packages.contains_key("qemu-guest-agent"),
        "{:?}",
        m.packages
    );
    assert!(m.packages.contains_key(&m.kernel_package));
}

/// The generic kernel flavour drives the emulated ("legacy") hardware: an AHCI
/// disk on q35 and an e1000 NIC.
#[test]
fn generic_kernel_boots_from_ahci_with_e1000() {
    let dir = fv_guest_template::default_cache_dir();
    let opts = fv_guest_template::Options {
        kernel: fv_guest_template::KernelFlavour::Generic,
    };
    let t = fv_guest_template::ensure_with(&dir, &opts)
        .unwrap_or_else(|e| panic!("generic template build failed: {e}"));
    let tmp = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut q = Qemu::spawn_with(
        tmp.path(),
        &["-machine", "q35", "-nic", "user,model=e1000"],
        // On q35, if=ide is the ICH9 AHCI controller.
        &[
            "-drive".into(),
            format!(
                "file={},format=raw,if=ide,snapshot=on",
                t.bios_disk.display()
            ),
        ],
    );
    let took = q.wait_ready(started);
    eprintln!(
        "generic kernel, AHCI + e1000: ready marker after {:.2} s (TCG)",
        took.as_secs_f64()
    );
    let mut qga = JsonLines::connect(&tmp.path().join("qga.sock"));
    qga.sync(0x5eed_0004);
    let ifaces = qga.call("guest-network-get-interfaces", Value::Null);
    assert!(
        has_addr(&ifaces, "10.0.2.15"),
        "no DHCP address over e1000: {ifaces}"
    );
    check_data_fs(&mut qga);
    let mounts = guest_exec(&mut qga, "/bin/cat", &["/proc/self/mounts"]);
    assert!(
        mounts.lines().any(|l| l.starts_with("/dev/sda2 /data ")),
        "{mounts}"
    );
    // Plain `poweroff` on the console signals PID 1, which powers off.
    q.console("echo bye-$((40 + 2))", "bye-42");
    q.serial_in.write_all(b"poweroff\n").unwrap();
    assert!(
        q.wait_exit(Duration::from_secs(60)),
        "guest ignored `poweroff`"
    );
}

/// The same disk boots under UEFI (OVMF on q35, like a generation 2 VM):
/// \EFI\BOOT\BOOTX64.EFI on partition 1 is syslinux.efi.
#[test]
fn bios_disk_also_boots_with_uefi() {
    let code = Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd");
    let vars_template = Path::new("/usr/share/OVMF/OVMF_VARS_4M.fd");
    assert!(
        code.is_file() && vars_template.is_file(),
        "OVMF firmware missing (install the ovmf package: scripts/install-deps)"
    );
    let t = template();
    let tmp = tempfile::tempdir().unwrap();
    let vars = tmp.path().join("vars.fd");
    std::fs::copy(vars_template, &vars).unwrap();
    let started = Instant::now();
    let mut q = Qemu::spawn(
        tmp.path(),
        &[
            "-machine".into(),
            "q35".into(),
            "-drive".into(),
            format!("if=pflash,format=raw,readonly=on,file={}", code.display()),
            "-drive".into(),
            format!("if=pflash,format=raw,file={}", vars.display()),
            "-drive".into(),
            format!(
                "file={},format=raw,if=virtio,snapshot=on",
                t.bios_disk.display()
            ),
        ],
    );
    let took = q.wait_ready(started);
    eprintln!(
        "UEFI (OVMF): ready marker after {:.2} s (TCG)",
        took.as_secs_f64()
    );
    let mut qga = JsonLines::connect(&tmp.path().join("qga.sock"));
    qga.sync(0x5eed_0005);
    check_data_fs(&mut qga);
    let ifaces = qga.call("guest-network-get-interfaces", Value::Null);
    assert!(
        has_addr(&ifaces, "10.0.2.15"),
        "no slirp DHCP address: {ifaces}"
    );
}
