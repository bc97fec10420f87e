//! Host paths follow the caller (crates/fvd/src/access.rs), against a real fvd (no
//! QEMU: workers are /bin/false, so a start that passes the checks makes a job that
//! fails at once, and one refused by them answers 403): a non-root user holding each
//! role that can name paths, and a token, try to attach a root-only file, another
//! scope's VM disk, a differencing chain whose parent they cannot read, files
//! outside the storage roots and VM folders in /etc or a root-only folder. Each is
//! refused naming the path and the missing right and leaves nothing behind; the
//! same as root succeeds. The start-time re-check and `--delete-files` are here too.
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A local user that exists on the test hosts (uid 1000).
const USER: u32 = 1000;

struct Srv {
    state: tempfile::TempDir,
    _run: tempfile::TempDir,
    /// The storage roots live here: disks/, vms/, media/ (all 0755, root's).
    roots: tempfile::TempDir,
    child: Option<Child>,
    sock: PathBuf,
}

impl Drop for Srv {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn mode(p: &Path, m: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
}

fn chown(p: &Path, uid: u32) {
    std::os::unix::fs::chown(p, Some(uid), Some(uid)).unwrap();
}

fn write_file(p: &Path, len: usize, m: u32, uid: u32) {
    std::fs::write(p, vec![0x5a; len]).unwrap();
    mode(p, m);
    chown(p, uid);
}

impl Srv {
    fn start() -> Srv {
        let tmp = |p: &str| {
            tempfile::Builder::new()
                .prefix(p)
                .tempdir_in("/tmp")
                .unwrap()
        };
        let state = tmp("fvd-fa");
        let run = tmp("fvfa");
        let roots = tmp("fv-roots");
        // Other users must reach the socket and the roots (as under /run, /srv).
        mode(run.path(), 0o755);
        mode(roots.path(), 0o755);
        for d in ["disks", "vms", "media"] {
            std::fs::create_dir(roots.path().join(d)).unwrap();
            mode(&roots.path().join(d), 0o755);
        }
        let sock = run.path().join("fvd.sock");
        let log = std::fs::File::create(state.path().join("fvd.stderr")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_fvd"))
            .arg("--state-dir")
            .arg(state.path())
            .arg("--runtime-dir")
            .arg(run.path())
            .env("FV_WORKER_BIN", "/bin/false")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn fvd");
        let s = Srv {
            state,
            _run: run,
            roots,
            child: Some(child),
            sock,
        };
        let end = Instant::now() + Duration::from_secs(60);
        while !matches!(s.try_req(None, "GET", "/host", None), Ok((200, _))) {
            assert!(Instant::now() < end, "fvd did not answer: {}", s.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        let r = s.root(
            "PATCH",
            "/host",
            Some(json!({
                "vm_folder": s.root_dir("vms"),
                "disk_folder": s.root_dir("disks"),
                "media_folders": [s.root_dir("media")],
            })),
        );
        assert_eq!(r.0, 200, "{}", r.1);
        for sc in ["A", "B"] {
            assert_eq!(
                s.root("POST", "/auth/scopes", Some(json!({ "name": sc })))
                    .0,
                201
            );
        }
        let ops = [
            "vm.create",
            "vm.reconfigure",
            "vm.disk.add",
            "vm.dvd.set",
            "vm.view",
            "vm.list",
            "vm.start",
        ];
        let r = s.root(
            "POST",
            "/auth/roles",
            Some(json!({"name": "Path Editor", "operations": ops})),
        );
        assert_eq!(r.0, 201, "{}", r.1);
        s
    }

    fn root_dir(&self, d: &str) -> PathBuf {
        self.roots.path().join(d)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.state.path().join("fvd.stderr")).unwrap_or_default()
    }

    fn try_req(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> std::io::Result<(u16, Value)> {
        let mut s = UnixStream::connect(&self.sock)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let b = body.map(|b| b.to_string()).unwrap_or_default();
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: fvd\r\nConnection: close\r\n");
        if let Some(t) = token {
            req.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        ));
        s.write_all(req.as_bytes())?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        let text = String::from_utf8_lossy(&out);
        let status: u16 = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
        Ok((status, serde_json::from_str(body).unwrap_or(Value::Null)))
    }

    fn root(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.try_req(None, method, path, body.as_ref()).unwrap()
    }

    fn token(&self, t: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.try_req(Some(t), method, path, body.as_ref()).unwrap()
    }

    /// A request as another uid: curl under setpriv, as in tests/authz.rs.
    fn user(&self, uid: u32, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut args = vec![
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            "--clear-groups".into(),
            "curl".into(),
            "-s".into(),
            "-o".into(),
            "-".into(),
            "-w".into(),
            "\n%{http_code}".into(),
            "-X".into(),
            method.into(),
            "--unix-socket".into(),
            self.sock.display().to_string(),
        ];
        if let Some(b) = body {
            args.extend([
                "-H".into(),
                "Content-Type: application/json".into(),
                "--data-binary".into(),
                b.to_string(),
            ]);
        }
        args.push(format!("http://fvd{path}"));
        let o = Command::new("setpriv")
            .args(&args)
            .output()
            .expect("setpriv + curl");
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        let (body, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
        (
            code.trim().parse().unwrap_or(0),
            serde_json::from_str(body).unwrap_or(Value::Null),
        )
    }

    fn assign(&self, who: &str, role: &str, scope: &str) {
        let r = self.root(
            "POST",
            "/auth/assignments",
            Some(json!({"principal": who, "role": role, "scope": scope})),
        );
        assert_eq!(r.0, 201, "{}", r.1);
    }

    fn unassign(&self, who: &str, role: &str, scope: &str) {
        let q = format!(
            "/auth/assignments?principal={who}&role={}&scope={scope}",
            role.replace(' ', "%20")
        );
        assert_eq!(self.root("DELETE", &q, None).0, 204);
    }

    /// A VM made by root in `scope`; its id.
    fn vm_in(&self, name: &str, scope: &str) -> String {
        let r = self.root(
            "POST",
            &format!("/vms?scope={scope}"),
            Some(json!({"name": name})),
        );
        assert_eq!(r.0, 201, "{}", r.1);
        r.1["id"].as_str().unwrap().to_string()
    }

    fn config(&self, id: &str) -> Value {
        let r = self.root("GET", &format!("/vms/{id}"), None);
        assert_eq!(r.0, 200, "{}", r.1);
        r.1["config"].clone()
    }

    fn vm_count(&self) -> usize {
        self.root("GET", "/vms", None).1.as_array().unwrap().len()
    }

    /// Wait until a VM's state is `want` (a failed start goes back to Off).
    fn wait_state(&self, id: &str, want: &str) {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let r = self.root("GET", &format!("/vms/{id}"), None);
            if r.1["state"] == want {
                return;
            }
            assert!(Instant::now() < end, "VM {id} never {want}: {}", r.1);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A refusal: 403 whose message names the path and says what is missing.
fn refused(r: &(u16, Value), path: &Path, words: &[&str]) {
    let msg = r.1["message"].as_str().unwrap_or_default();
    println!("refused: {msg}");
    assert_eq!(r.0, 403, "expected 403 for {}: {}", path.display(), r.1);
    assert!(
        msg.contains(&path.display().to_string()),
        "the refusal must name {}: {msg}",
        path.display()
    );
    for w in words {
        assert!(msg.contains(w), "the refusal must say {w:?}: {msg}");
    }
}

fn user_name() -> String {
    Command::new("id")
        .args(["-nu", &USER.to_string()])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Base image with qemu-img (the real peer), differencing child with our engine.
fn chain(dir: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("base.vhdx");
    let child = dir.join("child.vhdx");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "vhdx"])
        .arg(&base)
        .arg("16M")
        .status()
        .expect("qemu-img");
    assert!(st.success());
    fv_vdisk::ops::create_differencing(&child, &base, 2 << 20).expect("differencing child");
    mode(&base, 0o600);
    chown(&child, USER);
    mode(&child, 0o644);
    (base, child)
}

#[test]
fn non_root_user_is_refused_what_they_cannot_open_root_is_not() {
    let s = Srv::start();
    let name = user_name();
    let disks = s.root_dir("disks");
    // A root-only file in a root-only folder inside the roots.
    let private = disks.join("private");
    std::fs::create_dir(&private).unwrap();
    mode(&private, 0o700);
    let secret = private.join("secret.img");
    write_file(&secret, 1 << 20, 0o600, 0);
    // Another scope's VM disk, in that VM's folder.
    let b = s.vm_in("other", "B");
    let b_dir = s.root_dir("vms").join(&b);
    let b_disk = b_dir.join("b.img");
    write_file(&b_disk, 1 << 20, 0o600, 0);
    let r = s.root(
        "POST",
        &format!("/vms/{b}/disks"),
        Some(json!({"path": b_disk})),
    );
    assert_eq!(r.0, 200, "{}", r.1);
    // A chain whose parent the user cannot read.
    let (base, child) = chain(&disks);
    // The user's own files: inside the roots (allowed) and outside (refused).
    let mine = disks.join("mine.img");
    write_file(&mine, 1 << 20, 0o600, USER);
    let out = tempfile::Builder::new()
        .prefix("fv-out")
        .tempdir_in("/tmp")
        .unwrap();
    mode(out.path(), 0o755);
    let free = out.path().join("free.img");
    write_file(&free, 1 << 20, 0o666, USER);
    let rootonly = s.root_dir("vms").join("rootonly");
    std::fs::create_dir(&rootonly).unwrap();
    mode(&rootonly, 0o700);
    let etc_dir = PathBuf::from(format!("/etc/fvtest-{}", std::process::id()));

    let me = format!("uid:{USER}");
    for role in ["Administrator", "Path Editor"] {
        s.assign(&me, role, "A");
        let a = s.vm_in(&format!("a-{}", role.len()), "A");
        let before = s.config(&a);
        let count = s.vm_count();
        let disk = |p: &Path, ro: bool| {
            s.user(
                USER,
                "POST",
                &format!("/vms/{a}/disks"),
                Some(json!({"path": p, "read_only": ro})),
            )
        };
        let who = format!("user {name} cannot");
        refused(
            &disk(&secret, false),
            &secret,
            &[&who, "write", "permission denied"],
        );
        refused(
            &disk(&secret, true),
            &secret,
            &[&who, "read", "permission denied"],
        );
        refused(&disk(&b_disk, true), &b_disk, &[&who, "permission denied"]);
        refused(
            &disk(&child, true),
            &base,
            &[&who, "read", "permission denied"],
        );
        refused(
            &disk(&free, false),
            &free,
            &["outside the host's storage roots"],
        );
        // DVD, kernel/initrd, and a whole new configuration.
        let r = s.user(
            USER,
            "PUT",
            &format!("/vms/{a}/dvd"),
            Some(json!({"path": secret})),
        );
        refused(&r, &secret, &[&who, "read"]);
        let r = s.user(
            USER,
            "PATCH",
            &format!("/vms/{a}"),
            Some(json!({"direct_boot": {"kernel": mine, "initrd": secret, "cmdline": ""}})),
        );
        refused(&r, &secret, &[&who, "read"]);
        let r = s.user(
            USER,
            "POST",
            "/vms?scope=A",
            Some(json!({"name": "new", "hard_drives": [{
                "slot": {"controller": "scsi", "controller_number": 0, "location": 0},
                "path": secret}]})),
        );
        refused(&r, &secret, &[&who, "write"]);
        // VM folders: in /etc, in a root-only folder.
        let r = s.user(
            USER,
            "POST",
            "/vms?scope=A",
            Some(json!({"name": "etc", "vm_dir": etc_dir})),
        );
        assert_eq!(r.0, 403, "{}", r.1);
        assert!(r.1["message"].as_str().unwrap().contains("/etc"), "{}", r.1);
        assert!(
            !etc_dir.exists(),
            "a refused create made {}",
            etc_dir.display()
        );
        let sub = rootonly.join("x");
        let r = s.user(
            USER,
            "POST",
            "/vms?scope=A",
            Some(json!({"name": "ro", "vm_dir": sub})),
        );
        refused(&r, &rootonly, &[&who, "permission denied"]);
        assert!(!sub.exists());
        // Nothing was left behind by any refusal.
        assert_eq!(s.vm_count(), count);
        assert_eq!(s.config(&a), before);
        assert_eq!(std::fs::read_dir(&rootonly).unwrap().count(), 0);
        // The user's own file inside the roots is fine.
        let r = disk(&mine, false);
        assert_eq!(r.0, 200, "{}", r.1);
        s.unassign(&me, role, "A");
    }

    // Root (Administrator) keeps its freedom.
    let a = s.vm_in("root-a", "A");
    for p in [&secret, &b_disk, &child, &free] {
        let r = s.root(
            "POST",
            &format!("/vms/{a}/disks"),
            Some(json!({"path": p, "read_only": true})),
        );
        assert_eq!(r.0, 200, "root attaching {}: {}", p.display(), r.1);
    }
    let r = s.root(
        "POST",
        "/vms",
        Some(json!({"name": "etc", "vm_dir": etc_dir})),
    );
    assert_eq!(r.0, 201, "{}", r.1);
    let id = r.1["id"].as_str().unwrap().to_string();
    assert_eq!(
        s.root("DELETE", &format!("/vms/{id}?delete_files=true"), None)
            .0,
        204
    );
    assert!(
        !etc_dir.exists(),
        "the folder fvd made for root is deleted with --delete-files"
    );
}

#[test]
fn token_is_held_to_the_storage_roots() {
    let s = Srv::start();
    let r = s.root("POST", "/auth/tokens", Some(json!({"name": "ci"})));
    assert_eq!(r.0, 201, "{}", r.1);
    let (tid, tok) = (
        r.1["id"].as_str().unwrap().to_string(),
        r.1["token"].as_str().unwrap().to_string(),
    );
    s.assign(&format!("token:{tid}"), "Path Editor", "A");
    let a = s.vm_in("t", "A");
    let out = tempfile::Builder::new()
        .prefix("fv-out")
        .tempdir_in("/tmp")
        .unwrap();
    let free = out.path().join("free.img");
    write_file(&free, 1 << 20, 0o644, 0);
    // A symlink inside the roots to a file outside them is outside.
    let link = s.root_dir("disks").join("link.img");
    std::os::unix::fs::symlink(&free, &link).unwrap();
    let inside = s.root_dir("disks").join("tok.img");
    write_file(&inside, 1 << 20, 0o600, 0);
    let disk = |p: &Path| {
        s.token(
            &tok,
            "POST",
            &format!("/vms/{a}/disks"),
            Some(json!({ "path": p })),
        )
    };
    refused(
        &disk(&free),
        &free,
        &["token ci", "outside the host's storage roots"],
    );
    refused(&disk(&link), &link, &["outside the host's storage roots"]);
    let r = s.token(
        &tok,
        "POST",
        "/vms?scope=A",
        Some(json!({"name": "x", "vm_dir": "/etc/fvtest-token"})),
    );
    assert_eq!(r.0, 403, "{}", r.1);
    assert!(!Path::new("/etc/fvtest-token").exists());
    let r = disk(&inside);
    assert_eq!(r.0, 200, "{}", r.1);
}

#[test]
fn start_checks_again_with_the_rights_of_whoever_attached() {
    let s = Srv::start();
    let me = format!("uid:{USER}");
    s.assign(&me, "Path Editor", "A");
    let a = s.vm_in("re", "A");
    let mine = s.root_dir("disks").join("mine.img");
    write_file(&mine, 1 << 20, 0o600, USER);
    let r = s.user(
        USER,
        "POST",
        &format!("/vms/{a}/disks"),
        Some(json!({ "path": mine })),
    );
    assert_eq!(r.0, 200, "{}", r.1);
    // Passes the check: the (fake) worker then fails and the VM is Off again.
    let r = s.root("POST", &format!("/vms/{a}/actions/start"), None);
    assert_eq!(r.0, 202, "{}", r.1);
    s.wait_state(&a, "Off");
    // The file changes hands after the attach: root starting the VM does not lend
    // the user root's rights.
    chown(&mine, 0);
    let r = s.root("POST", &format!("/vms/{a}/actions/start"), None);
    refused(
        &r,
        &mine,
        &[
            "cannot write",
            "permission denied",
            "checked again at start",
        ],
    );
    // Swapped for a symlink to a root-only file: the same.
    chown(&mine, USER);
    let secret = s.root_dir("disks").join("secret.img");
    write_file(&secret, 1 << 20, 0o600, 0);
    std::fs::remove_file(&mine).unwrap();
    std::os::unix::fs::symlink(&secret, &mine).unwrap();
    let r = s.root("POST", &format!("/vms/{a}/actions/start"), None);
    refused(&r, &mine, &["permission denied", "checked again at start"]);
    // The user themselves starting it: the same answer.
    let r = s.user(USER, "POST", &format!("/vms/{a}/actions/start"), None);
    refused(&r, &mine, &["permission denied"]);
    assert_eq!(s.root("GET", &format!("/vms/{a}"), None).1["state"], "Off");
}

#[test]
fn delete_files_deletes_only_what_fvd_made() {
    let s = Srv::start();
    // A folder that existed before, with a file fvd did not make and a disk.
    let pre = s.root_dir("vms").join("pre");
    std::fs::create_dir(&pre).unwrap();
    let keep = pre.join("keep.txt");
    std::fs::write(&keep, "not fvd's").unwrap();
    let disk = pre.join("disk.img");
    write_file(&disk, 1 << 20, 0o600, 0);
    let r = s.root(
        "POST",
        "/vms",
        Some(json!({"name": "pre", "vm_dir": pre, "hard_drives": [{
            "slot": {"controller": "scsi", "controller_number": 0, "location": 0},
            "path": "disk.img"}]})),
    );
    assert_eq!(r.0, 201, "{}", r.1);
    let id = r.1["id"].as_str().unwrap().to_string();
    let cfg = pre.join(format!("{id}.json"));
    assert!(cfg.is_file());
    assert_eq!(
        s.root("DELETE", &format!("/vms/{id}?delete_files=true"), None)
            .0,
        204
    );
    assert!(!cfg.exists(), "fvd's own config is deleted");
    assert!(keep.is_file(), "a file fvd did not make is kept");
    assert!(disk.is_file(), "disks are kept (as Hyper-V's Remove-VM)");
    assert!(pre.is_dir(), "a folder fvd did not make is kept");
    // A VM in the folder fvd makes: the folder goes with it.
    let id = s.vm_in("plain", "default");
    let dir = s.root_dir("vms").join(&id);
    assert!(dir.is_dir());
    assert_eq!(
        s.root("DELETE", &format!("/vms/{id}?delete_files=true"), None)
            .0,
        204
    );
    assert!(!dir.exists(), "{} is left", dir.display());
    // The record of who attached what goes with the VM.
    let rec = s.state.path().join("access").join(format!("{id}.json"));
    assert!(!rec.exists());
}
