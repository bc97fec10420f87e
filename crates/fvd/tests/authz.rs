//! Authorization against a real fvd (no QEMU: workers are /bin/false, so starts make
//! jobs that fail at once): the role x operation matrix over the whole API table,
//! scopes, token revocation and expiry, a non-root Unix user, the audit log,
//! persistence across a restart, and the TLS listener with a pinned certificate.
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Srv {
    state: tempfile::TempDir,
    run: tempfile::TempDir,
    child: Option<Child>,
    tls: bool,
    sock: PathBuf,
    /// TLS port and certificate fingerprint (when `tls`).
    port: u16,
    fp: String,
}

impl Srv {
    fn start(tls: bool) -> Srv {
        // Short paths: Unix socket paths are limited to 108 bytes.
        let state = tempfile::Builder::new()
            .prefix("fvd-az")
            .tempdir_in("/tmp")
            .unwrap();
        let run = tempfile::Builder::new()
            .prefix("fvaz")
            .tempdir_in("/tmp")
            .unwrap();
        // Other local users must be able to reach the socket (as under /run).
        std::fs::set_permissions(run.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let sock = run.path().join("fvd.sock");
        let mut s = Srv {
            state,
            run,
            child: None,
            tls,
            sock,
            port: 0,
            fp: String::new(),
        };
        s.spawn();
        s
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.state.path().join("fvd.stderr")).unwrap_or_default()
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state.path().join("fvd.stderr"))
            .unwrap();
        let before = self.log().len();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fvd"));
        cmd.arg("--state-dir")
            .arg(self.state.path())
            .arg("--runtime-dir")
            .arg(self.run.path())
            .env("FV_WORKER_BIN", "/bin/false")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if self.tls {
            cmd.arg("--listen-tcp").arg("127.0.0.1:0");
        }
        self.child = Some(cmd.spawn().expect("spawn fvd"));
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, _)) = self.try_req(None, "GET", "/host", None) {
                break;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("fvd exited ({st}): {}", self.log());
            }
            assert!(Instant::now() < end, "fvd did not answer: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.tls {
            // "fvd: TLS API on 127.0.0.1:PORT, certificate SHA-256 fingerprint FP"
            let log = self.log()[before..].to_string();
            let line = log
                .lines()
                .find(|l| l.starts_with("fvd: TLS API on "))
                .unwrap_or_else(|| panic!("no TLS line in {log}"));
            let rest = line.trim_start_matches("fvd: TLS API on ");
            let (addr, fp) = rest
                .split_once(", certificate SHA-256 fingerprint ")
                .unwrap();
            self.port = addr.rsplit(':').next().unwrap().parse().unwrap();
            self.fp = fp.trim().to_string();
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn wait_exit(&mut self, within: Duration) -> bool {
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

    /// One HTTP/1.1 request over the Unix socket, optionally with a bearer token.
    /// Server-sent event streams are cut after the headers.
    fn try_req(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> std::io::Result<(u16, Value)> {
        let mut s = UnixStream::connect(&self.sock)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: fvd\r\nConnection: close\r\n");
        if let Some(t) = token {
            req.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(body.unwrap_or(""));
        s.write_all(req.as_bytes())?;
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let mut chunked = false;
        let mut sse = false;
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let l = line.trim_end().to_ascii_lowercase();
            if l.is_empty() {
                break;
            }
            chunked |= l.starts_with("transfer-encoding:") && l.contains("chunked");
            sse |= l.starts_with("content-type:") && l.contains("text/event-stream");
        }
        if sse {
            return Ok((status, Value::Null));
        }
        let mut raw = Vec::new();
        r.read_to_end(&mut raw)?;
        let body = if chunked { dechunk(&raw) } else { raw };
        Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
    }

    fn req(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let b = body.map(|b| b.to_string());
        self.try_req(token, method, path, b.as_deref())
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// As root (Administrator unless configured otherwise); must succeed.
    fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (s, v) = self.req(None, method, path, body);
        assert!((200..300).contains(&s), "{method} {path} -> {s} {v}");
        v
    }

    /// A token holding `role` in `scope`.
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

    fn new_vm(&self, name: &str) -> String {
        let v = self.ok(
            "POST",
            "/vms",
            Some(json!({"name": name, "memory_mib": 64})),
        );
        v["id"].as_str().unwrap().to_string()
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

fn assert_forbidden(s: u16, v: &Value, op: &str, ctx: &str) {
    assert_eq!(s, 403, "{ctx}: expected 403 for {op}, got {s} {v}");
    assert_eq!(v["code"], "forbidden", "{ctx}: {v}");
    assert_eq!(v["operation"], op, "{ctx}: {v}");
    assert!(
        v["message"].as_str().unwrap_or("").contains(op),
        "{ctx}: the message must name {op}: {v}"
    );
}

/// What each built-in role must allow, written from the definitions (not from
/// fv-authz), over whatever the API table holds.
fn expected(role: &str, op: &fvd::api::Operation) -> bool {
    // Watching a console is Hyper-V's "allow output from VM", not a view right.
    let view = op.method == "get" && !["auth.token.list", "vm.console.output"].contains(&op.name);
    match role {
        "Administrator" => true,
        "Monitor" => view,
        "Network Manager" => view || op.name.starts_with("switch."),
        "VM Operator" => {
            (view
                && ["vm.", "job.", "event.", "api."]
                    .iter()
                    .any(|p| op.name.starts_with(p)))
                || [
                    "vm.start",
                    "vm.stop",
                    "vm.save",
                    "vm.pause",
                    "vm.resume",
                    "vm.reset",
                    "vm.discard_saved_state",
                    "vm.console.input",
                    "vm.console.output",
                    "job.cancel",
                ]
                .contains(&op.name)
        }
        "Starter" => ["vm.view", "vm.start", "vm.list"].contains(&op.name),
        other => panic!("no expectation for {other}"),
    }
}

/// A request for `op` that, once authorized, fails (400/404/409) without changing
/// anything: reads target a real VM, writes a VM that does not exist, bodies are
/// malformed, named objects do not exist.
fn request_for(op: &fvd::api::Operation, vm: &str) -> (String, String, Option<String>) {
    let missing = "00000000-0000-4000-8000-000000000000";
    let id = if op.method == "get" { vm } else { missing };
    let path = op
        .path
        .replace("{id}", id)
        .replace("{job}", missing)
        .replace("{disk}", "0")
        .replace("{nic}", "0")
        .replace("{role}", "NoSuchRole")
        .replace("{scope}", "no-such-scope")
        .replace("{token}", "0000000000000000");
    let body = op.request.map(|_| "{not json".to_string());
    (op.method.to_uppercase(), path, body)
}

#[test]
fn matrix_every_operation_for_every_builtin_role() {
    let mut f = Srv::start(false);
    let vm = f.new_vm("matrix");
    f.ok(
        "POST",
        "/auth/roles",
        Some(json!({"name": "Starter", "operations": ["vm.view", "vm.start", "vm.list"]})),
    );
    let roles = [
        "Administrator",
        "Monitor",
        "Network Manager",
        "VM Operator",
        "Starter",
    ];
    let tokens: Vec<(String, String)> = roles
        .iter()
        .map(|r| (r.to_string(), f.token(&format!("t-{r}"), r, "*")))
        .collect();
    // The server's role definitions agree with the issue's.
    for r in &roles {
        let v = f.ok(
            "GET",
            &format!("/auth/roles/{}", r.replace(' ', "%20")),
            None,
        );
        let got: BTreeSet<String> = v["operations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_str().unwrap().to_string())
            .collect();
        let want: BTreeSet<String> = fvd::api::OPERATIONS
            .iter()
            .filter(|o| expected(r, o))
            .map(|o| o.name.to_string())
            .collect();
        assert_eq!(got, want, "role {r}");
    }
    let mut tried = 0;
    for (role, tok) in &tokens {
        for op in fvd::api::OPERATIONS {
            if op.name == "host.shutdown" && role == "Administrator" {
                continue; // last: it stops fvd
            }
            let (m, path, body) = request_for(op, &vm);
            let (s, v) = f
                .try_req(Some(tok), &m, &path, body.as_deref())
                .unwrap_or_else(|e| panic!("{role} {m} {path}: {e}"));
            let ctx = format!("{role}: {m} {path}");
            if expected(role, op) {
                assert!(
                    s != 403 && s != 401,
                    "{ctx}: {} must be allowed, got {s} {v}",
                    op.name
                );
                assert_ne!(v["operation"], "api.route", "{ctx}: not routed: {v}");
            } else {
                assert_forbidden(s, &v, op.name, &ctx);
            }
            tried += 1;
        }
    }
    assert!(tried >= roles.len() * (fvd::api::OPERATIONS.len() - 1));
    // Nothing was changed by the allowed calls.
    let vms = f.ok("GET", "/vms", None);
    assert_eq!(vms.as_array().unwrap().len(), 1, "{vms}");
    assert_eq!(
        f.ok("GET", "/auth/scopes", None).as_array().unwrap().len(),
        1
    );
    assert_eq!(
        f.ok("GET", "/auth/roles", None).as_array().unwrap().len(),
        5
    );
    // The last operation: an Administrator token may shut the host down.
    let admin = &tokens[0].1;
    let (s, v) = f.req(Some(admin), "POST", "/host/actions/shutdown", None);
    assert_eq!(s, 202, "{v}");
    assert!(f.wait_exit(Duration::from_secs(60)), "fvd did not stop");
}

#[test]
fn scopes_separate_what_a_token_sees_and_touches() {
    let f = Srv::start(false);
    let a = f.new_vm("vm-a");
    let b = f.new_vm("vm-b");
    f.ok("POST", "/auth/scopes", Some(json!({"name": "A"})));
    f.ok("POST", "/auth/scopes", Some(json!({"name": "B"})));
    f.ok(
        "PUT",
        &format!("/vms/{a}/scope"),
        Some(json!({"scope": "A"})),
    );
    f.ok(
        "PUT",
        &format!("/vms/{b}/scope"),
        Some(json!({"scope": "B"})),
    );
    // A job on each VM (the worker is /bin/false: the start fails quickly).
    for id in [&a, &b] {
        let (s, j) = f.req(None, "POST", &format!("/vms/{id}/actions/start"), None);
        assert_eq!(s, 202, "{j}");
    }
    let t = f.token("op-a", "VM Operator", "A");
    // Lists show only scope A.
    let (s, vms) = f.req(Some(&t), "GET", "/vms", None);
    assert_eq!(s, 200, "{vms}");
    let ids: Vec<&str> = vms
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![a.as_str()]);
    let (s, jobs) = f.req(Some(&t), "GET", "/jobs", None);
    assert_eq!(s, 200);
    let jobs = jobs.as_array().unwrap().clone();
    assert!(!jobs.is_empty());
    assert!(jobs.iter().all(|j| j["vm_id"] == a.as_str()), "{jobs:?}");
    let (s, ev) = f.req(Some(&t), "GET", "/events?since=0", None);
    assert_eq!(s, 200);
    let ev = ev.as_array().unwrap().clone();
    assert!(!ev.is_empty());
    assert!(ev.iter().all(|e| e["vm_id"] == a.as_str()), "{ev:?}");
    let (s, ev) = f.req(Some(&t), "GET", &format!("/events?since=0&vm={b}"), None);
    assert_eq!((s, ev), (200, json!([])));
    // A's VM: viewable; operations are authorized and then fail for other reasons.
    assert_eq!(f.req(Some(&t), "GET", &format!("/vms/{a}"), None).0, 200);
    let (s, v) = f.req(Some(&t), "POST", &format!("/vms/{a}/actions/pause"), None);
    assert_eq!(s, 409, "{v}");
    // A VM Operator may not reconfigure, even in its scope.
    let (s, v) = f.req(
        Some(&t),
        "PATCH",
        &format!("/vms/{a}"),
        Some(json!({"notes": "x"})),
    );
    assert_forbidden(s, &v, "vm.reconfigure", "A reconfigure");
    // B's VM, by name or id: answered exactly as a VM that does not exist (issue 9:
    // a refusal must not tell that it exists, nor its scope).
    let missing = "00000000-0000-4000-8000-000000000000";
    for (m, p, fake, op) in [
        (
            "GET",
            format!("/vms/{b}"),
            format!("/vms/{missing}"),
            "vm.view",
        ),
        (
            "GET",
            "/vms/vm-b".to_string(),
            "/vms/no-vm".to_string(),
            "vm.view",
        ),
        (
            "POST",
            format!("/vms/{b}/actions/start"),
            format!("/vms/{missing}/actions/start"),
            "vm.start",
        ),
        (
            "POST",
            format!("/vms/{b}/actions/stop"),
            format!("/vms/{missing}/actions/stop"),
            "vm.stop",
        ),
    ] {
        let (s, v) = f.req(Some(&t), m, &p, Some(json!({})));
        let (s2, v2) = f.req(Some(&t), m, &fake, Some(json!({})));
        assert_eq!((s, s2), (404, 404), "B {m} {p}: {v} / {v2}");
        assert_eq!(
            (&v["code"], &v["operation"]),
            (&v2["code"], &v2["operation"])
        );
        assert_eq!(v["operation"], op, "{v}");
        assert!(!v.to_string().contains("scope"), "{v}");
    }
    // An operation the token holds nowhere is a 403 that names no scope: the same
    // for B's VM and for one that does not exist.
    let (s, v) = f.req(Some(&t), "PATCH", &format!("/vms/{b}"), Some(json!({})));
    assert_forbidden(s, &v, "vm.reconfigure", "B reconfigure");
    let (_, v2) = f.req(
        Some(&t),
        "PATCH",
        &format!("/vms/{missing}"),
        Some(json!({})),
    );
    assert_eq!(v, v2);
    let bjob = f
        .ok("GET", "/jobs", None)
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["vm_id"] == b.as_str())
        .map(|j| j["id"].as_str().unwrap().to_string())
        .unwrap();
    let (s, v) = f.req(Some(&t), "GET", &format!("/jobs/{bjob}"), None);
    assert_eq!(
        (s, v["code"].as_str()),
        (404, Some("not_found")),
        "B's job: {v}"
    );
    // Host-level operations need the global scope.
    let (s, v) = f.req(Some(&t), "GET", "/host", None);
    assert_forbidden(s, &v, "host.view", "host");
    // Moving a VM needs auth.scope.set in both scopes: an Administrator of A only
    // cannot pull B's VM in, nor push A's VM out to B.
    let adm_a = f.token("adm-a", "Administrator", "A");
    let (s, v) = f.req(
        Some(&adm_a),
        "PUT",
        &format!("/vms/{b}/scope"),
        Some(json!({"scope": "A"})),
    );
    // B's VM is invisible to A's administrator: not found, like a missing one.
    assert_eq!(
        (s, v["code"].as_str()),
        (404, Some("not_found")),
        "pull B's VM: {v}"
    );
    let (s, v) = f.req(
        Some(&adm_a),
        "PUT",
        &format!("/vms/{a}/scope"),
        Some(json!({"scope": "B"})),
    );
    assert_forbidden(s, &v, "auth.scope.set", "push to B");
    // A scope's administrator creates VMs in that scope, not elsewhere.
    let (s, v) = f.req(
        Some(&adm_a),
        "POST",
        "/vms?scope=A",
        Some(json!({"name": "new-a", "memory_mib": 64})),
    );
    assert_eq!(s, 201, "{v}");
    let new_a = v["id"].as_str().unwrap().to_string();
    let (s, v) = f.req(Some(&t), "GET", &format!("/vms/{new_a}"), None);
    assert_eq!(s, 200, "the operator of A sees the new VM: {v}");
    for q in ["", "?scope=B"] {
        let (s, v) = f.req(
            Some(&adm_a),
            "POST",
            &format!("/vms{q}"),
            Some(json!({"name": "x", "memory_mib": 64})),
        );
        assert_forbidden(s, &v, "vm.create", &format!("create{q}"));
    }
    let (s, v) = f.req(
        None,
        "POST",
        "/vms?scope=nope",
        Some(json!({"name": "x", "memory_mib": 64})),
    );
    assert_eq!(s, 404, "{v}");
    // Moving b into A (as root) shows it to the operator at once.
    f.ok(
        "PUT",
        &format!("/vms/{b}/scope"),
        Some(json!({"scope": "A"})),
    );
    assert_eq!(f.req(Some(&t), "GET", &format!("/vms/{b}"), None).0, 200);
    // A scope with VMs cannot be removed; an empty one can.
    assert_eq!(f.req(None, "DELETE", "/auth/scopes/A", None).0, 409);
    f.ok("DELETE", "/auth/scopes/B", None);
}

#[test]
fn revoked_and_expired_tokens_fail_at_once() {
    let f = Srv::start(false);
    let t = f.token("rev", "Monitor", "*");
    assert_eq!(f.req(Some(&t), "GET", "/host", None).0, 200);
    let id = t.split('.').next().unwrap();
    f.ok("POST", &format!("/auth/tokens/{id}/revoke"), None);
    let (s, v) = f.req(Some(&t), "GET", "/host", None);
    assert_eq!(s, 401, "{v}");
    assert_eq!(v["code"], "unauthenticated");
    assert!(v["message"].as_str().unwrap().contains("revoked"), "{v}");
    // A wrong secret for a valid id, and garbage, are 401 too.
    let (s, _) = f.req(Some(&format!("{id}.00")), "GET", "/host", None);
    assert_eq!(s, 401);
    assert_eq!(f.req(Some("garbage"), "GET", "/host", None).0, 401);
    // Expiry.
    let e = f.ok(
        "POST",
        "/auth/tokens",
        Some(json!({"name": "short", "expires_in_s": 2})),
    );
    let eid = e["id"].as_str().unwrap();
    f.ok(
        "POST",
        "/auth/assignments",
        Some(json!({"principal": format!("token:{eid}"), "role": "Monitor", "scope": "*"})),
    );
    let et = e["token"].as_str().unwrap();
    assert_eq!(f.req(Some(et), "GET", "/host", None).0, 200);
    std::thread::sleep(Duration::from_millis(3100));
    let (s, v) = f.req(Some(et), "GET", "/host", None);
    assert_eq!(s, 401, "{v}");
    assert!(v["message"].as_str().unwrap().contains("expired"), "{v}");
    let list = f.ok("GET", "/auth/tokens", None);
    let st: Vec<(bool, bool)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["revoked"].as_bool().unwrap(),
                t["expired"].as_bool().unwrap(),
            )
        })
        .collect();
    assert!(
        st.contains(&(true, false)) && st.contains(&(false, true)),
        "{list}"
    );
    // Monitor may not list tokens (administrators only).
    let m = f.token("mon", "Monitor", "*");
    let (s, v) = f.req(Some(&m), "GET", "/auth/tokens", None);
    assert_forbidden(s, &v, "auth.token.list", "monitor tokens");
}

#[test]
fn vm_processes_are_refused_even_as_root() {
    let f = Srv::start(false);
    let t = f.token("w", "Monitor", "*");
    // Pose as a VM's worker: our pid in a worker.pid under the runtime dir.
    let vm = f.run.path().join("vms").join("fake-vm");
    std::fs::create_dir_all(&vm).unwrap();
    let pidfile = vm.join("worker.pid");
    std::fs::write(&pidfile, format!("{}\n", std::process::id())).unwrap();
    let (s, v) = f.req(None, "GET", "/host", None);
    assert_forbidden(s, &v, "host.view", "worker as root");
    assert!(
        v["message"].as_str().unwrap().contains("VM processes"),
        "{v}"
    );
    assert_eq!(f.req(Some(&t), "GET", "/host", None).0, 403);
    std::fs::remove_file(&pidfile).unwrap();
    assert_eq!(f.req(Some(&t), "GET", "/host", None).0, 200);
}

fn curl_as(uid: u32, sock: &Path, method: &str, path: &str) -> (u16, String) {
    let o = Command::new("setpriv")
        .args([
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
            sock.display().to_string(),
            format!("http://fvd{path}"),
        ])
        .output()
        .expect("setpriv + curl");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
fn unix_user_is_refused_until_assigned_then_allowed_at_once() {
    let f = Srv::start(false);
    let mode = std::fs::metadata(&f.sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o666, "the socket must be connectable by local users");
    f.new_vm("u1");
    let (s, body) = curl_as(1000, &f.sock, "GET", "/vms");
    assert_eq!(s, 403, "{body}");
    assert!(
        body.contains("uid:1000") && body.contains("vm.list"),
        "{body}"
    );
    assert_eq!(curl_as(1000, &f.sock, "GET", "/host").0, 403);
    f.ok(
        "POST",
        "/auth/assignments",
        Some(json!({"principal": "uid:1000", "role": "Monitor", "scope": "*"})),
    );
    let (s, body) = curl_as(1000, &f.sock, "GET", "/vms");
    assert_eq!(s, 200, "{body}");
    assert!(body.contains("u1"), "{body}");
    // Viewing only: a write is still refused.
    let (s, body) = curl_as(1000, &f.sock, "DELETE", "/vms/u1");
    assert_eq!(s, 403, "{body}");
    // Removing the assignment applies at once too.
    f.ok(
        "DELETE",
        "/auth/assignments?principal=uid:1000&role=Monitor&scope=*",
        None,
    );
    assert_eq!(curl_as(1000, &f.sock, "GET", "/vms").0, 403);
    // root stays Administrator; turning that off needs another global Administrator.
    let (s, v) = f.req(
        None,
        "PATCH",
        "/auth/settings",
        Some(json!({"root_is_admin": false})),
    );
    assert_eq!(s, 409, "{v}");
}

#[test]
fn audit_records_mutations_and_refusals() {
    let f = Srv::start(false);
    let id = f.new_vm("aud");
    let t = f.token("aud-mon", "Monitor", "*");
    let tid = t.split('.').next().unwrap().to_string();
    let (s, _) = f.req(Some(&t), "DELETE", &format!("/vms/{id}"), None);
    assert_eq!(s, 403);
    let (s, _) = f.req(Some("bad.token"), "GET", "/host", None);
    assert_eq!(s, 401);
    // A method/path pair that is not in the table is refused, even for root.
    let (s, v) = f.req(None, "PUT", "/host", Some(json!({})));
    assert_eq!((s, v["code"].as_str()), (403, Some("forbidden")), "{v}");
    assert_eq!(v["operation"], "api.route");
    // Plain reads are not audited.
    f.req(Some(&t), "GET", "/vms", None);
    let rows = f.ok("GET", "/audit?limit=100", None);
    let rows = rows.as_array().unwrap();
    let created = rows
        .iter()
        .find(|r| r["operation"] == "vm.create")
        .expect("vm.create audited");
    assert_eq!(created["principal"], "uid:0");
    assert_eq!(created["principal_name"], "root");
    assert_eq!(created["status"], 201);
    assert_eq!(created["result"], "ok");
    assert_eq!(created["target"], format!("/vms/{id}"));
    let refused = rows
        .iter()
        .find(|r| r["operation"] == "vm.delete")
        .expect("refusal audited");
    assert_eq!(refused["principal"], format!("token:{tid}"));
    assert_eq!(refused["principal_name"], "aud-mon");
    assert_eq!(refused["status"], 403);
    assert_eq!(refused["result"], "forbidden");
    assert_eq!(refused["target"], format!("vm:{id} (aud)"));
    assert!(refused["message"].as_str().unwrap().contains("vm.delete"));
    let unauth = rows
        .iter()
        .find(|r| r["status"] == 401)
        .expect("401 audited");
    assert_eq!(unauth["principal"], "anonymous");
    assert_eq!(unauth["result"], "unauthenticated");
    assert!(
        !rows.iter().any(|r| r["operation"] == "vm.list"),
        "{rows:?}"
    );
    // since= pages forward.
    let last = rows.last().unwrap()["seq"].as_i64().unwrap();
    assert_eq!(
        f.ok("GET", &format!("/audit?since={last}"), None),
        json!([])
    );
}

#[test]
fn policy_persists_across_restart() {
    let mut f = Srv::start(false);
    let a = f.new_vm("p1");
    f.ok("POST", "/auth/scopes", Some(json!({"name": "A"})));
    f.ok(
        "PUT",
        &format!("/vms/{a}/scope"),
        Some(json!({"scope": "A"})),
    );
    f.ok(
        "POST",
        "/auth/roles",
        Some(json!({"name": "Viewer", "operations": ["vm.view", "vm.list"]})),
    );
    let t = f.token("keep", "Viewer", "A");
    let gone = f.token("gone", "Monitor", "*");
    f.ok(
        "POST",
        &format!("/auth/tokens/{}/revoke", gone.split('.').next().unwrap()),
        None,
    );
    f.kill9();
    f.spawn();
    assert_eq!(f.req(Some(&t), "GET", &format!("/vms/{a}"), None).0, 200);
    let (s, v) = f.req(Some(&t), "GET", "/vms", None);
    assert_eq!((s, v.as_array().map(|a| a.len())), (200, Some(1)));
    assert_eq!(f.req(Some(&gone), "GET", "/host", None).0, 401);
    let scopes = f.ok("GET", "/auth/scopes", None);
    assert!(scopes.to_string().contains(&a), "{scopes}");
    let roles = f.ok("GET", "/auth/roles", None);
    assert!(roles.to_string().contains("Viewer"));
    let audit = f.ok("GET", "/audit", None);
    assert!(audit.to_string().contains("auth.token.revoke"));
}

fn fv(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let bin = Path::new(env!("CARGO_BIN_EXE_fvd")).with_file_name("fv");
    assert!(
        bin.is_file(),
        "{} is missing: build fv first",
        bin.display()
    );
    let mut c = Command::new(bin);
    c.args(args)
        .env_remove("FV_URL")
        .env_remove("FV_TOKEN")
        .env_remove("FV_CERT_FINGERPRINT");
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn tls_listener_with_pinned_certificate_and_cli_verbs() {
    let mut f = Srv::start(true);
    assert!(f.port > 0 && f.fp.len() == 95, "{} {}", f.port, f.fp);
    let key = f.state.path().join("tls/key.pem");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let host = f.ok("GET", "/host", None);
    assert_eq!(host["tls_fingerprint"], f.fp.as_str());
    let sock = f.sock.display().to_string();
    let local = [("FV_SOCKET", sock.as_str())];
    // The verbs on the socket, as root.
    let (c, out, err) = fv(&["auth", "scope", "add", "web"], &local);
    assert_eq!(c, 0, "{out}{err}");
    let (c, out, _) = fv(&["vm", "new", "tls1", "--memory", "64"], &local);
    assert_eq!(c, 0, "{out}");
    let (c, _, err) = fv(&["auth", "scope", "set", "tls1", "web"], &local);
    assert_eq!(c, 0, "{err}");
    let (c, out, err) = fv(
        &[
            "-o",
            "json",
            "auth",
            "token",
            "create",
            "remote",
            "--expires",
            "1d",
        ],
        &local,
    );
    assert_eq!(c, 0, "{err}");
    let tok: Value = serde_json::from_str(&out).unwrap();
    let token = tok["token"].as_str().unwrap().to_string();
    let tid = tok["id"].as_str().unwrap().to_string();
    let p = format!("token:{tid}");
    let (c, _, err) = fv(
        &[
            "auth",
            "assign",
            "add",
            "--principal",
            &p,
            "--role",
            "VM Operator",
            "--scope",
            "web",
        ],
        &local,
    );
    assert_eq!(c, 0, "{err}");
    let (c, out, _) = fv(&["auth", "assign", "list"], &local);
    assert_eq!(c, 0);
    assert!(
        out.contains(&p) && out.contains("VM Operator") && out.contains("web"),
        "{out}"
    );
    let (c, out, _) = fv(&["auth", "role", "list"], &local);
    assert!(c == 0 && out.contains("Network Manager"), "{out}");
    let (c, _, err) = fv(
        &["auth", "role", "add", "Bad", "--operation", "vm.fly"],
        &local,
    );
    assert_eq!(c, 2, "{err}");
    // Remote, pinned: the token sees only its scope's VM.
    let url = format!("https://127.0.0.1:{}", f.port);
    let remote = [
        ("FV_URL", url.as_str()),
        ("FV_TOKEN", token.as_str()),
        ("FV_CERT_FINGERPRINT", f.fp.as_str()),
    ];
    let (c, out, err) = fv(&["-o", "json", "vm", "list"], &remote);
    assert_eq!(c, 0, "{err}");
    let vms: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(vms.as_array().unwrap().len(), 1);
    assert_eq!(vms[0]["name"], "tls1");
    // Refusals exit 3, naming the operation.
    let (c, _, err) = fv(&["host", "show"], &remote);
    assert_eq!(c, 3, "{err}");
    assert!(err.contains("host.view"), "{err}");
    // The flags work like the environment.
    let (c, _, err) = fv(
        &[
            "--url",
            &url,
            "--token",
            &token,
            "--cert-fingerprint",
            &f.fp,
            "vm",
            "show",
            "tls1",
        ],
        &[],
    );
    assert_eq!(c, 0, "{err}");
    // A wrong pin is refused before any request is sent.
    let wrong = format!("00{}", &f.fp[2..]);
    let (c, _, err) = fv(
        &["vm", "list"],
        &[
            ("FV_URL", &url),
            ("FV_TOKEN", &token),
            ("FV_CERT_FINGERPRINT", &wrong),
        ],
    );
    assert_eq!(c, 1);
    assert!(err.contains("fingerprint"), "{err}");
    // No token over TLS: 401.
    let (c, _, err) = fv(
        &["vm", "list"],
        &[("FV_URL", &url), ("FV_CERT_FINGERPRINT", &f.fp)],
    );
    assert_eq!(c, 3);
    assert!(err.contains("token"), "{err}");
    // Revocation over TLS is effective on the next request.
    let (c, _, err) = fv(&["auth", "token", "revoke", &tid], &local);
    assert_eq!(c, 0, "{err}");
    let (c, _, err) = fv(&["vm", "list"], &remote);
    assert_eq!(c, 3);
    assert!(err.contains("revoked"), "{err}");
    let (c, out, _) = fv(&["auth", "audit", "--limit", "20"], &local);
    assert!(c == 0 && out.contains("auth.token.revoke"), "{out}");
    // The certificate is kept across restarts (the pin stays valid).
    let fp = f.fp.clone();
    f.kill9();
    f.spawn();
    assert_eq!(f.fp, fp);
}
