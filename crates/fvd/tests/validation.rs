//! Validation at the API edge against a real fvd (workers are /bin/false: no guest
//! boots, starts make jobs that fail at once): names and sizes, unknown fields and
//! type errors, JSON merge patch at every depth, log lines that input cannot forge,
//! a full state file system (507, nothing left behind), newest-first jobs and
//! events, and objects in invisible scopes answered like nonexistent ones.
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Srv {
    state: PathBuf,
    _state_tmp: Option<tempfile::TempDir>,
    _run: tempfile::TempDir,
    child: Option<Child>,
    sock: PathBuf,
    log: PathBuf,
}

impl Srv {
    fn start() -> Srv {
        let st = tempfile::Builder::new()
            .prefix("fvd-va")
            .tempdir_in("/tmp")
            .unwrap();
        let state = st.path().to_path_buf();
        Srv::start_in(state, Some(st))
    }

    /// fvd on `state` (which the caller keeps alive when `keep` is None).
    fn start_in(state: PathBuf, keep: Option<tempfile::TempDir>) -> Srv {
        // Short: Unix socket paths are limited to 108 bytes.
        let run = tempfile::Builder::new()
            .prefix("fvva")
            .tempdir_in("/tmp")
            .unwrap();
        let log = run.path().join("fvd.stderr");
        let sock = run.path().join("fvd.sock");
        let mut s = Srv {
            state,
            _state_tmp: keep,
            _run: run,
            child: None,
            sock,
            log,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_fvd"))
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--runtime-dir")
            .arg(self._run.path())
            .env("FV_WORKER_BIN", "/bin/false")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn fvd");
        self.child = Some(child);
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, _)) = self.raw("GET", "/host", None) {
                return;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("fvd exited ({st}): {}", self.log());
            }
            assert!(Instant::now() < end, "fvd did not answer: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One request with a raw body (which need not be JSON).
    fn raw(&self, method: &str, path: &str, body: Option<&[u8]>) -> std::io::Result<(u16, Value)> {
        self.raw_as(None, method, path, body)
    }

    fn raw_as(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> std::io::Result<(u16, Value)> {
        let mut s = UnixStream::connect(&self.sock)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: fvd\r\nConnection: close\r\n");
        if let Some(t) = token {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        if let Some(b) = body {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes())?;
        if let Some(b) = body {
            // fvd may answer (a refusal) and close before reading a body: the
            // answer is still there to read.
            let _ = s.write_all(b);
        }
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let mut chunked = false;
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let l = line.trim_end().to_ascii_lowercase();
            if l.is_empty() {
                break;
            }
            chunked |= l.starts_with("transfer-encoding:") && l.contains("chunked");
        }
        let mut raw = Vec::new();
        r.read_to_end(&mut raw)?;
        let body = if chunked { dechunk(&raw) } else { raw };
        Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
    }

    fn req(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.req_as(None, method, path, body)
    }

    fn req_as(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let b = body.map(|b| b.to_string().into_bytes());
        self.raw_as(token, method, path, b.as_deref())
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (s, v) = self.req(method, path, body);
        assert!((200..300).contains(&s), "{method} {path} -> {s} {v}");
        v
    }

    fn new_vm(&self, body: Value) -> String {
        let v = self.ok("POST", "/vms", Some(body));
        v["id"].as_str().unwrap().to_string()
    }

    fn token(&self, name: &str, role: &str, scope: &str) -> String {
        let t = self.ok("POST", "/auth/tokens", Some(json!({"name": name})));
        let id = t["id"].as_str().unwrap();
        self.ok(
            "POST",
            "/auth/assignments",
            Some(json!({"principal": format!("token:{id}"), "role": role, "scope": scope})),
        );
        t["token"].as_str().unwrap().to_string()
    }

    fn vm_count(&self) -> usize {
        self.ok("GET", "/vms", None).as_array().unwrap().len()
    }
}

impl Drop for Srv {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn dechunk(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = raw;
    while let Some(i) = rest.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(std::str::from_utf8(&rest[..i]).unwrap_or("0").trim(), 16)
            .unwrap_or(0);
        if n == 0 || rest.len() < i + 2 + n {
            break;
        }
        out.extend_from_slice(&rest[i + 2..i + 2 + n]);
        rest = &rest[(i + 4 + n).min(rest.len())..];
    }
    out
}

/// A 400 whose message names `field` and says `why` (a fragment), in the API's error
/// shape, and never only a parser position.
fn assert_bad(s: u16, v: &Value, field: &str, why: &str, ctx: &str) {
    assert_eq!(s, 400, "{ctx}: expected 400, got {s} {v}");
    assert_eq!(v["code"], "bad_request", "{ctx}: {v}");
    let m = v["message"].as_str().unwrap_or_default();
    assert!(
        m.contains(field),
        "{ctx}: the message must name {field}: {m}"
    );
    assert!(m.contains(why), "{ctx}: the message must say {why:?}: {m}");
    assert!(!m.contains(" at line "), "{ctx}: parser position: {m}");
}

fn fv(f: &Srv, args: &[&str]) -> (i32, String, String) {
    let bin = Path::new(env!("CARGO_BIN_EXE_fvd")).with_file_name("fv");
    assert!(
        bin.is_file(),
        "{} is missing: build fv first",
        bin.display()
    );
    let o = Command::new(bin)
        .args(args)
        .env("FV_SOCKET", &f.sock)
        .env_remove("FV_URL")
        .env_remove("FV_TOKEN")
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn vm_folders(f: &Srv) -> Vec<String> {
    let host = f.ok("GET", "/host", None);
    let dir = PathBuf::from(host["settings"]["vm_folder"].as_str().unwrap());
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn names_are_limited_like_hyper_v_and_never_stored_when_bad() {
    let f = Srv::start();
    let ok = "n".repeat(100);
    f.new_vm(json!({"name": ok, "memory_mib": 64}));
    let before = vm_folders(&f);
    for (name, why) in [
        ("n".repeat(101), "at most 100"),
        ("n".repeat(65_536), "at most 100"),
        ("n".repeat(1_000_000), "at most 100"),
        ("a\0b".to_string(), "control characters"),
        ("a\nb".to_string(), "control characters"),
        ("a\tb".to_string(), "control characters"),
        ("a\u{1b}[31mb".to_string(), "control characters"),
        ("a/b".to_string(), "'/'"),
        ("   ".to_string(), "empty"),
    ] {
        let (s, v) = f.req(
            "POST",
            "/vms",
            Some(json!({"name": name, "memory_mib": 64})),
        );
        let short: String = name.chars().take(20).collect();
        assert_bad(s, &v, "name", why, &format!("create {short:?}"));
    }
    // Nothing reached storage: same folders, one VM.
    assert_eq!(vm_folders(&f), before);
    assert_eq!(f.vm_count(), 1);
    // Renames follow the same rule; adapter and switch names too.
    let id = f.new_vm(json!({"name": "good", "memory_mib": 64}));
    let (s, v) = f.req(
        "PATCH",
        &format!("/vms/{id}"),
        Some(json!({"name": "x\ny"})),
    );
    assert_bad(s, &v, "name", "control characters", "rename");
    let (s, v) = f.req(
        "POST",
        &format!("/vms/{id}/nics"),
        Some(json!({"name": "n".repeat(101)})),
    );
    assert_bad(s, &v, "network_adapters[0].name", "at most 100", "nic name");
    let (s, v) = f.req(
        "POST",
        &format!("/vms/{id}/nics"),
        Some(json!({"connection": {"type": "switch", "name": "a/b"}})),
    );
    assert_bad(
        s,
        &v,
        "network_adapters[0].connection.name",
        "'/'",
        "switch name",
    );
    let (s, v) = f.req(
        "PATCH",
        &format!("/vms/{id}"),
        Some(json!({"notes": "x\u{0}y"})),
    );
    assert_bad(s, &v, "notes", "control characters", "notes");
    // Notes may hold lines.
    f.ok(
        "PATCH",
        &format!("/vms/{id}"),
        Some(json!({"notes": "line 1\nline 2\ttab"})),
    );
    let (s, v) = f.req(
        "POST",
        "/vms",
        Some(json!({"name": "p", "vm_dir": "/tmp/a\u{0}b"})),
    );
    assert_bad(s, &v, "vm_dir", "NUL", "vm_dir");
    // Folders that cannot be folders are the caller's error (400), not fvd's.
    let file = f.state.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let (s, v) = f.req("POST", "/vms", Some(json!({"name": "p", "vm_dir": file})));
    assert_bad(s, &v, "a-file", "cannot", "vm_dir is a file");
    for (k, bad) in [
        ("vm_folder", json!("relative/vms")),
        ("disk_folder", json!("/a\u{0}b")),
        ("media_folders", json!(["rel"])),
    ] {
        let (s, v) = f.req("PATCH", "/host", Some(json!({ k: bad })));
        assert_bad(s, &v, k, "", &format!("host {k}"));
    }
    let (c, out, err) = fv(&f, &["vm", "list"]);
    assert_eq!(c, 0, "fv vm list: {out}{err}");
}

#[test]
fn memory_and_processors_stay_within_host_and_qemu_limits() {
    let f = Srv::start();
    let host = f.ok("GET", "/host", None);
    let total = host["memory_total_mib"].as_u64().unwrap();
    let cpus = host["logical_cpus"].as_u64().unwrap();
    let cases: Vec<(Value, &str, &str)> = vec![
        (json!(u64::MAX), "memory_mib", "more than this host"),
        (json!(10u64 << 20), "memory_mib", "more than this host"),
        (
            json!(total + 2 + total % 2),
            "memory_mib",
            "more than this host",
        ),
        (json!(33), "memory_mib", "multiple of 2 MiB"),
        (json!(16), "memory_mib", "at least 32"),
        (json!(-1), "memory_mib", "expected u64"),
        (json!(1.5), "memory_mib", "expected u64"),
        (json!("lots"), "memory_mib", "expected u64"),
    ];
    for (mem, field, why) in cases {
        let (s, v) = f.req(
            "POST",
            "/vms",
            Some(json!({"name": "m", "memory_mib": mem})),
        );
        assert_bad(s, &v, field, why, &format!("memory {mem}"));
    }
    for (count, why) in [
        (json!(0), "at least 1"),
        (json!(cpus + 1), "logical processors"),
        (json!(u32::MAX as u64 + 1), "expected u32"),
    ] {
        let (s, v) = f.req(
            "POST",
            "/vms",
            Some(json!({"name": "c", "cpu": {"count": count}})),
        );
        assert_bad(s, &v, "cpu", why, &format!("cpu {count}"));
    }
    assert_eq!(f.vm_count(), 0);
    // The largest the host allows, in whole 2 MiB, is accepted.
    let id =
        f.new_vm(json!({"name": "max", "memory_mib": total - total % 2, "cpu": {"count": cpus}}));
    // And a change is checked like a creation.
    let (s, v) = f.req(
        "PATCH",
        &format!("/vms/{id}"),
        Some(json!({"memory_mib": 35})),
    );
    assert_bad(s, &v, "memory_mib", "multiple of 2 MiB", "patch memory");
}

#[test]
fn unknown_fields_are_refused_by_name_and_type_errors_name_the_field() {
    let f = Srv::start();
    let id = f.new_vm(json!({"name": "u", "memory_mib": 64}));
    let before = f.ok("GET", &format!("/vms/{id}"), None)["config"].clone();
    let vm = format!("/vms/{id}");
    for (m, p, b, field, why) in [
        (
            "PATCH",
            vm.as_str(),
            json!({"memroy_mib": 1024}),
            "memroy_mib",
            "unknown field",
        ),
        (
            "PATCH",
            vm.as_str(),
            json!({"cpu": {"cuont": 2}}),
            "cpu.cuont",
            "unknown field",
        ),
        (
            "PATCH",
            vm.as_str(),
            json!({"network_adapters": [{"colour": "red"}]}),
            "network_adapters[0].colour",
            "unknown field",
        ),
        (
            "POST",
            "/vms",
            json!({"name": "x", "colour": 1}),
            "colour",
            "unknown field",
        ),
        (
            "POST",
            "/vms",
            json!({"name": "x", "generation": 2}),
            "generation",
            "expected the string \"1\" or \"2\"",
        ),
        (
            "POST",
            "/vms",
            json!({"name": "x", "generation": "3"}),
            "generation",
            "expected the string \"1\" or \"2\"",
        ),
        (
            "POST",
            "/vms",
            json!({"name": 5}),
            "name",
            "expected a string",
        ),
        (
            "PATCH",
            vm.as_str(),
            json!({"cpu": {"count": "two"}}),
            "cpu.count",
            "expected u32",
        ),
        (
            "PATCH",
            vm.as_str(),
            json!({"secure_boot": "yes"}),
            "secure_boot",
            "expected a boolean",
        ),
        (
            "PATCH",
            "/host",
            json!({"mac_pool_sise": 3}),
            "mac_pool_sise",
            "unknown field",
        ),
        (
            "PATCH",
            "/host",
            json!({"mac_pool_size": "3"}),
            "mac_pool_size",
            "expected u32",
        ),
    ] {
        let (s, v) = f.req(m, p, Some(b.clone()));
        assert_bad(s, &v, field, why, &format!("{m} {p} {b}"));
    }
    // Other bodies: stop, disks, DVD, adapters, tokens; and query strings.
    for (m, p, b, field) in [
        (
            "POST",
            format!("{vm}/actions/stop"),
            json!({"mode": "off"}),
            "mode",
        ),
        (
            "POST",
            format!("{vm}/actions/stop"),
            json!({"forse": true}),
            "forse",
        ),
        (
            "POST",
            format!("{vm}/disks"),
            json!({"path": "/x", "readonly": true}),
            "readonly",
        ),
        ("PUT", format!("{vm}/dvd"), json!({"index": -1}), "index"),
        (
            "POST",
            format!("{vm}/nics"),
            json!({"knd": "legacy"}),
            "knd",
        ),
        ("PATCH", format!("{vm}/nics/0"), json!({"mac": "x"}), "mac"),
        (
            "POST",
            "/auth/tokens".to_string(),
            json!({"name": "t", "expires": 5}),
            "expires",
        ),
        (
            "POST",
            format!("{vm}/actions/freeze"),
            json!({"timeout": 5}),
            "timeout",
        ),
    ] {
        let (s, v) = f.req(m, &p, Some(b.clone()));
        assert_eq!(s, 400, "{m} {p} {b}: {v}");
        let msg = v["message"].as_str().unwrap_or_default();
        assert!(msg.contains(field), "{m} {p}: {msg}");
    }
    for q in [
        "/jobs?limit=abc",
        "/events?since=x",
        "/jobs?since=yesterday",
    ] {
        let (s, v) = f.req("GET", q, None);
        assert_eq!(
            (s, v["code"].as_str()),
            (400, Some("bad_request")),
            "{q}: {v}"
        );
        let field = q.split(['?', '=']).nth(1).unwrap();
        assert!(v["message"].as_str().unwrap().contains(field), "{q}: {v}");
    }
    // Not JSON at all: says so (the position may follow, never alone).
    let (s, v) = f.raw("PATCH", &vm, Some(b"{not json")).unwrap();
    assert_eq!(s, 400, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("not valid JSON"),
        "{v}"
    );
    // Nothing was changed by any of it.
    assert_eq!(f.ok("GET", &vm, None)["config"], before);
}

#[test]
fn patch_is_a_json_merge_patch_at_every_depth() {
    let f = Srv::start();
    // Creation merges onto the defaults at every depth too.
    let id = f.new_vm(json!({"name": "mp", "memory_mib": 64, "cpu": {"weight": 300}}));
    let vm = format!("/vms/{id}");
    let c = f.ok("GET", &vm, None)["config"].clone();
    assert_eq!(
        c["cpu"],
        json!({"count": 1, "reserve_percent": 0, "limit_percent": 100, "weight": 300})
    );
    f.ok(
        "PATCH",
        &vm,
        Some(json!({"cpu": {"reserve_percent": 10, "limit_percent": 50}})),
    );
    let c = f.ok("PATCH", &vm, Some(json!({"cpu": {"count": 1}})))["config"].clone();
    assert_eq!(
        c["cpu"],
        json!({"count": 1, "reserve_percent": 10, "limit_percent": 50, "weight": 300}),
        "{{\"cpu\":{{\"count\":1}}}} must keep reserve, limit and weight"
    );
    let c = f.ok(
        "PATCH",
        &vm,
        Some(json!({"integration_services": {"guest_services": true}})),
    )["config"]
        .clone();
    assert_eq!(c["integration_services"]["guest_services"], true);
    assert_eq!(c["integration_services"]["heartbeat"], true);
    // null removes a member: it takes its default; a required one cannot go.
    f.ok("PATCH", &vm, Some(json!({"notes": "n"})));
    let c = f.ok("PATCH", &vm, Some(json!({"notes": null})))["config"].clone();
    assert_eq!(c["notes"], "");
    let (s, v) = f.req("PATCH", &vm, Some(json!({"name": null})));
    assert_bad(s, &v, "name", "missing field", "remove name");
    // An adapter's connection merges too: a new switch name keeps the switch type.
    f.ok(
        "POST",
        &format!("{vm}/nics"),
        Some(json!({"connection": {"type": "switch", "name": "sw-a"}})),
    );
    let c = f.ok(
        "PATCH",
        &format!("{vm}/nics/0"),
        Some(json!({"connection": {"name": "sw-b"}})),
    )["config"]
        .clone();
    assert_eq!(
        c["network_adapters"][0]["connection"],
        json!({"type": "switch", "name": "sw-b"})
    );
    // Host settings: a merge patch as well; an unchanged value is no change.
    let h = f.ok("PATCH", "/host", Some(json!({"mac_pool_size": 16})));
    assert_eq!(h["mac_pool_size"], 16);
    let (s, v) = f.req("PATCH", "/host", Some(json!({"vm_folder": null})));
    assert_bad(s, &v, "vm_folder", "missing field", "remove vm_folder");
}

#[test]
fn input_cannot_forge_log_lines() {
    let mut f = Srv::start();
    let id = f.new_vm(json!({"name": "plain", "memory_mib": 64}));
    // A record from before the name rules: a newline and a fake log line in the name.
    let cfg = f.ok("GET", &format!("/vms/{id}"), None)["config_path"]
        .as_str()
        .unwrap()
        .to_string();
    f.kill9();
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    let forged = "2026-01-01T00:00:00.000000Z  INFO fvd: FORGED root logged in";
    c["name"] = json!(format!("x\n{forged}\r\n{}", "y".repeat(70_000)));
    std::fs::write(&cfg, serde_json::to_vec(&c).unwrap()).unwrap();
    f.spawn();
    // Log something about it: a start (the worker is /bin/false) changes its state.
    let (s, j) = f.req("POST", &format!("/vms/{id}/actions/start"), None);
    assert_eq!(s, 202, "{j}");
    let job = j["id"].as_str().unwrap();
    let j = f.ok("GET", &format!("/jobs/{job}?wait=60"), None);
    assert_eq!(j["state"], "failed", "{j}");
    let log = f.log();
    assert!(log.contains("FORGED"), "the name was logged: {log}");
    for l in log.lines() {
        assert!(
            !l.starts_with("2026-01-01") && !l.starts_with("FORGED") && !l.starts_with('y'),
            "a log line was forged: {l:.200}"
        );
    }
    // Shown safely too: fv lists it (the table does not break or panic).
    let (code, out, err) = fv(&f, &["vm", "list"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 2, "one header and one row: {out:.500}");
    // And it can be renamed to a valid name while other fields keep their values.
    f.ok(
        "PATCH",
        &format!("/vms/{id}"),
        Some(json!({"name": "fixed"})),
    );
}

/// A tmpfs of `size` mounted on a fresh folder, unmounted on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let d = tempfile::Builder::new()
            .prefix("fvd-full")
            .tempdir_in("/tmp")
            .unwrap();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(d.path())
            .status()
            .ok()?;
        st.success().then_some(Tmpfs(d))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

/// Fill the file system under `dir` until writes fail with ENOSPC.
fn fill(dir: &Path) -> PathBuf {
    let p = dir.join("filler");
    let mut f = std::fs::File::create(&p).unwrap();
    let chunk = vec![0xa5u8; 64 * 1024];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filling {}: {e}", p.display()),
        }
    }
    // Smaller pieces until not even one byte fits.
    while f.write(&[0u8; 512]).is_ok_and(|n| n > 0) {}
    while f.write(&[0u8]).is_ok_and(|n| n > 0) {}
    p
}

fn tmp_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().contains(".tmp") {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn full_state_file_system_is_507_and_leaves_nothing_behind() {
    let Some(fs) = Tmpfs::mount("8m") else {
        assert!(
            !nix::unistd::geteuid().is_root(),
            "root could not mount a tmpfs"
        );
        eprintln!("SKIPPED: mounting a tmpfs needs root");
        return;
    };
    let state = fs.0.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let f = Srv::start_in(state.clone(), None);
    let id = f.new_vm(json!({"name": "before", "memory_mib": 64, "notes": "kept"}));
    let vm = format!("/vms/{id}");
    let cfg = PathBuf::from(f.ok("GET", &vm, None)["config_path"].as_str().unwrap());
    let cfg_bytes = std::fs::read(&cfg).unwrap();
    let folders = vm_folders(&f);
    let filler = fill(fs.0.path());
    // Create: 507 naming the path, no folder, no temp file, registry unchanged.
    let (s, v) = f.req(
        "POST",
        "/vms",
        Some(json!({"name": "after", "memory_mib": 64})),
    );
    assert_eq!(s, 507, "{v}");
    assert_eq!(v["code"], "insufficient_storage", "{v}");
    let msg = v["message"].as_str().unwrap();
    assert!(msg.contains(&*state.to_string_lossy()), "the path: {msg}");
    assert_eq!(vm_folders(&f), folders, "an orphan VM folder was left");
    assert_eq!(tmp_files(&state), Vec::<PathBuf>::new());
    assert_eq!(f.vm_count(), 1);
    // Set: 507, config file and fvd's view unchanged, no temp file.
    let (s, v) = f.req("PATCH", &vm, Some(json!({"notes": "x".repeat(10_000)})));
    assert_eq!(s, 507, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains(&*cfg.to_string_lossy()),
        "{v}"
    );
    assert_eq!(std::fs::read(&cfg).unwrap(), cfg_bytes);
    assert_eq!(f.ok("GET", &vm, None)["config"]["notes"], "kept");
    assert_eq!(tmp_files(&state), Vec::<PathBuf>::new());
    // Room again: both work.
    std::fs::remove_file(filler).unwrap();
    f.ok("PATCH", &vm, Some(json!({"notes": "changed"})));
    f.new_vm(json!({"name": "after", "memory_mib": 64}));
    assert_eq!(f.vm_count(), 2);
    drop(f);
}

#[test]
fn jobs_and_events_are_newest_first() {
    let f = Srv::start();
    let ids: Vec<String> = (0..3)
        .map(|i| f.new_vm(json!({"name": format!("j{i}"), "memory_mib": 64})))
        .collect();
    let mut jobs = Vec::new();
    for id in &ids {
        let (s, j) = f.req("POST", &format!("/vms/{id}/actions/start"), None);
        assert_eq!(s, 202, "{j}");
        let jid = j["id"].as_str().unwrap().to_string();
        f.ok("GET", &format!("/jobs/{jid}?wait=60"), None);
        jobs.push(jid);
    }
    let got: Vec<String> = f
        .ok("GET", "/jobs?limit=2", None)
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        got,
        vec![jobs[2].clone(), jobs[1].clone()],
        "the newest two"
    );
    // since: only jobs created after a time.
    let first = f.ok("GET", &format!("/jobs/{}", jobs[0]), None);
    let t = first["created"].as_str().unwrap();
    let after: Vec<String> = f
        .ok("GET", &format!("/jobs?since={t}"), None)
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(after, vec![jobs[2].clone(), jobs[1].clone()]);
    // fv job list shows the newest.
    let (c, out, err) = fv(&f, &["job", "list", "--limit", "1"]);
    assert_eq!(c, 0, "{err}");
    assert!(out.contains(&jobs[2]), "{out}");
    // Events: newest first, limit after ordering, since and before page.
    let ev = f.ok("GET", "/events", None);
    let seqs: Vec<i64> = ev
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    assert!(
        seqs.len() > 3 && seqs.windows(2).all(|w| w[0] > w[1]),
        "{seqs:?}"
    );
    let top2 = f.ok("GET", "/events?limit=2", None);
    let top2: Vec<i64> = top2
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(top2, seqs[..2]);
    // (Events may still arrive meanwhile: only what must hold whatever arrives.)
    let seq_of = |v: Value| -> Vec<i64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| e["seq"].as_i64().unwrap())
            .collect()
    };
    let since = seq_of(f.ok("GET", &format!("/events?since={}", seqs[2]), None));
    assert!(since.iter().all(|s| *s > seqs[2]), "{since:?}");
    assert!(since.ends_with(&seqs[..2]), "{since:?} {seqs:?}");
    let before = f.ok("GET", &format!("/events?before={}&limit=1", seqs[0]), None);
    assert_eq!(before[0]["seq"], seqs[1]);
    let newer = seq_of(f.ok("GET", &format!("/events?since={}", seqs[0]), None));
    assert!(newer.iter().all(|s| *s > seqs[0]), "{newer:?}");
}

#[test]
fn objects_in_invisible_scopes_answer_like_nonexistent_ones() {
    let f = Srv::start();
    let a = f.new_vm(json!({"name": "dup", "memory_mib": 64}));
    let b = f.new_vm(json!({"name": "dup", "memory_mib": 64}));
    let b2 = f.new_vm(json!({"name": "only-b", "memory_mib": 64}));
    for s in ["A", "B"] {
        f.ok("POST", "/auth/scopes", Some(json!({"name": s})));
    }
    f.ok(
        "PUT",
        &format!("/vms/{a}/scope"),
        Some(json!({"scope": "A"})),
    );
    for id in [&b, &b2] {
        f.ok(
            "PUT",
            &format!("/vms/{id}/scope"),
            Some(json!({"scope": "B"})),
        );
    }
    let (s, j) = f.req("POST", &format!("/vms/{b}/actions/start"), None);
    assert_eq!(s, 202, "{j}");
    let bjob = j["id"].as_str().unwrap().to_string();
    let t = f.token("op-a", "VM Operator", "A");
    let missing = "00000000-0000-4000-8000-000000000000";
    // The same status and body as for an id / name that does not exist.
    let same = |path_of: &dyn Fn(&str) -> String, m: &str, real: &str, fake: &str| {
        let body = (m != "GET").then(|| json!({}));
        let (s1, v1) = f.req_as(Some(&t), m, &path_of(real), body.clone());
        let (s2, v2) = f.req_as(Some(&t), m, &path_of(fake), body);
        assert_eq!(s1, 404, "{m} {}: {v1}", path_of(real));
        assert_eq!(s1, s2);
        let m1 = v1["message"].as_str().unwrap().replace(real, "KEY");
        let m2 = v2["message"].as_str().unwrap().replace(fake, "KEY");
        assert_eq!(
            (m1, &v1["code"], &v1["operation"]),
            (m2, &v2["code"], &v2["operation"])
        );
        assert!(!v1.to_string().contains("scope"), "{v1}");
    };
    for (m, suffix) in [
        ("GET", ""),
        ("POST", "/actions/start"),
        ("POST", "/actions/stop"),
        ("GET", "/disks"),
    ] {
        same(&|k| format!("/vms/{k}{suffix}"), m, &b, missing);
        same(
            &|k| format!("/vms/{k}{suffix}"),
            m,
            "only-b",
            "no-such-name",
        );
    }
    same(&|k| format!("/jobs/{k}"), "GET", &bjob, missing);
    // A name shared with an invisible VM resolves to the visible one.
    let v = f.req_as(Some(&t), "GET", "/vms/dup", None);
    assert_eq!(
        (v.0, v.1["id"].as_str()),
        (200, Some(a.as_str())),
        "{}",
        v.1
    );
    assert_eq!(f.req("GET", "/vms/dup", None).0, 409, "root sees both");
    // Events of an invisible VM by name: as for a name that does not exist.
    let (s1, v1) = f.req_as(Some(&t), "GET", "/events?vm=only-b", None);
    let (s2, _) = f.req_as(Some(&t), "GET", "/events?vm=no-such-name", None);
    assert_eq!((s1, s2), (404, 404), "{v1}");
    // An operation held nowhere stays 403, for existing and missing objects alike.
    let (s1, v1) = f.req_as(Some(&t), "DELETE", &format!("/vms/{b}"), None);
    let (s2, v2) = f.req_as(Some(&t), "DELETE", &format!("/vms/{missing}"), None);
    assert_eq!((s1, s2), (403, 403));
    assert_eq!(v1, v2);
}
