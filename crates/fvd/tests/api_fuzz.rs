//! API fuzzing against a real fvd (workers are /bin/false: starts fail at once, no
//! guest runs): for a bounded time (FV_FUZZ_SECS, default 60), random and mutated
//! requests over every route of the OpenAPI document the running fvd serves, with
//! bodies derived from its schemas plus hostile strings and numbers, as root and
//! with tokens. Asserts: no 5xx other than 507, fvd still answers and never
//! panicked, and the registry is consistent afterwards (every listed VM's config
//! file parses and matches, the database holds as many VMs as are listed, and a
//! restarted fvd lists the same VMs). Prints the request count and the statuses.
//!
//! Safety: fvd runs as root here, so every path the fuzzer sends (VM folders, disk,
//! DVD, kernel paths, host folders) lies inside the test's own sandbox folder, and
//! generic strings carry no '/' that could reach outside it.
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// xorshift64*: small, seedable, reproducible (the seed is printed).
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

struct Srv {
    state: tempfile::TempDir,
    run: tempfile::TempDir,
    child: Option<Child>,
    sock: PathBuf,
    /// The state dir is a tmpfs (fvd syncs its database on every change; on a
    /// tmpfs that costs nothing, so more requests fit in the time).
    tmpfs: bool,
}

impl Srv {
    fn start() -> Srv {
        let state = tempfile::Builder::new()
            .prefix("fvd-fz")
            .tempdir_in("/tmp")
            .unwrap();
        let run = tempfile::Builder::new()
            .prefix("fvfz")
            .tempdir_in("/tmp")
            .unwrap();
        let sock = run.path().join("fvd.sock");
        let tmpfs = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1g,mode=0755", "tmpfs"])
            .arg(state.path())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|st| st.success());
        println!(
            "api fuzz: state dir {} ({})",
            state.path().display(),
            if tmpfs {
                "tmpfs"
            } else {
                "not a tmpfs: mount failed"
            }
        );
        let mut s = Srv {
            state,
            run,
            child: None,
            sock,
            tmpfs,
        };
        s.spawn();
        s
    }

    fn log_path(&self) -> PathBuf {
        self.run.path().join("fvd.stderr")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_fvd"))
            .arg("--state-dir")
            .arg(self.state.path())
            .arg("--runtime-dir")
            .arg(self.run.path())
            .env("FV_WORKER_BIN", "/bin/false")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn fvd");
        self.child = Some(child);
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            // Any answer will do: root may have been made a non-administrator.
            if let Ok(r) = send(&self.sock, &Req::get("/host"), Duration::from_secs(5)) {
                if r.0 != 0 {
                    return;
                }
            }
            assert!(self.alive(), "fvd exited: {}", self.log());
            assert!(Instant::now() < end, "fvd did not answer: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Srv {
    fn drop(&mut self) {
        self.kill9();
        if self.tmpfs {
            let _ = Command::new("umount").arg(self.state.path()).status();
        }
    }
}

#[derive(Clone, Debug)]
struct Req {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Option<Vec<u8>>,
    stream: bool,
}

impl Req {
    fn get(path: &str) -> Req {
        Req {
            method: "GET".into(),
            path: path.into(),
            headers: vec![],
            body: None,
            stream: false,
        }
    }
    fn json(method: &str, path: &str, v: &Value) -> Req {
        Req {
            method: method.into(),
            path: path.into(),
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: Some(v.to_string().into_bytes()),
            stream: false,
        }
    }
    fn with_token(mut self, t: &str) -> Req {
        self.headers
            .push(("Authorization".into(), format!("Bearer {t}")));
        self
    }
}

/// One request on a fresh connection: (status, body as JSON or Null). The body is
/// written by a second thread while the answer is read, so an early answer (fvd
/// refuses before reading a large body, then closes) is still seen.
fn send(sock: &Path, r: &Req, timeout: Duration) -> std::io::Result<(u16, Value)> {
    let s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut head = format!(
        "{} {} HTTP/1.1\r\nHost: fvd\r\nConnection: close\r\n",
        r.method, r.path
    );
    for (k, v) in &r.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = &r.body {
        head.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    head.push_str("\r\n");
    let mut w = s.try_clone()?;
    let body = r.body.clone();
    let writer = std::thread::spawn(move || {
        // Errors here (fvd closed early) show in what is read, if anywhere.
        let _ = w.write_all(head.as_bytes());
        if let Some(b) = body {
            let _ = w.write_all(&b);
        }
    });
    let out = read_answer(s, r.stream);
    let _ = writer.join();
    out
}

fn read_answer(s: UnixStream, stream: bool) -> std::io::Result<(u16, Value)> {
    let mut rd = BufReader::new(s);
    let mut line = String::new();
    rd.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut chunked = false;
    let mut sse = false;
    loop {
        line.clear();
        if rd.read_line(&mut line)? == 0 {
            break;
        }
        let l = line.trim_end().to_ascii_lowercase();
        if l.is_empty() {
            break;
        }
        chunked |= l.starts_with("transfer-encoding:") && l.contains("chunked");
        sse |= l.starts_with("content-type:") && l.contains("text/event-stream");
    }
    if sse || stream || status == 101 {
        let _ = rd.get_ref().shutdown(std::net::Shutdown::Both);
        return Ok((status, Value::Null));
    }
    let mut raw = Vec::new();
    // The status line and headers are in: a reset while reading the rest of a long
    // answer (fvd closed after refusing an unread body) is not a lost answer.
    if let Err(e) = rd.read_to_end(&mut raw) {
        if e.kind() != std::io::ErrorKind::ConnectionReset {
            return Err(e);
        }
    }
    let body = if chunked { dechunk(&raw) } else { raw };
    Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
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

fn pct(s: &str) -> String {
    let mut o = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

/// What the fuzzer has seen exist (ids to aim at besides hostile ones).
#[derive(Default)]
struct Known {
    vms: Vec<String>,
    names: Vec<String>,
    jobs: Vec<String>,
    all_vms: Vec<String>,
}

struct Gen<'a> {
    rng: Rng,
    doc: &'a Value,
    sandbox: PathBuf,
    known: Arc<Mutex<Known>>,
}

const HOSTILE: &[&str] = &[
    "",
    " ",
    "\u{0}",
    "a\u{0}b",
    "line\nFORGED 2026 INFO fvd: fake",
    "tab\tand\rcr",
    "\u{1b}[31mred\u{1b}[0m",
    "\u{202e}rtl",
    "名前",
    "😀",
    "%00",
    "%2e%2e",
    "..",
    ".",
    "{{}}",
    "null",
    "true",
    "-1",
    "1e309",
    "' OR 1=1 --",
    "\"quoted\"",
    "\\",
    "a/b",
    "*",
];

impl Gen<'_> {
    fn hostile_string(&mut self) -> String {
        match self.rng.below(10) {
            0 => "x".repeat(self.rng.below(200_000) + 1),
            1 => "é".repeat(self.rng.below(70_000) + 1),
            2 => {
                // Random code points, controls included (no surrogates: JSON strings
                // carry Unicode scalar values).
                (0..self.rng.below(40))
                    .filter_map(|_| char::from_u32((self.rng.next() % 0x11_0000) as u32))
                    .filter(|c| *c != '/')
                    .collect()
            }
            _ => self.rng.pick(HOSTILE).to_string(),
        }
    }

    fn name(&mut self) -> String {
        if self.rng.chance(70) {
            format!("vm-{}", self.rng.below(50))
        } else {
            self.hostile_string()
        }
    }

    /// Only inside the sandbox: absolute under it, or relative without "..".
    fn path(&mut self) -> String {
        let sb = self.sandbox.display().to_string();
        match self.rng.below(8) {
            0 => format!("{sb}/disk.vhdx"),
            1 => format!("{sb}/iso/media.iso"),
            2 => format!("{sb}/{}", pct(&self.hostile_string()).replace('%', "_")),
            3 => format!("{sb}/d{}/x/../y", self.rng.below(5)),
            4 => format!("{sb}/with\u{0}nul"),
            5 => format!("{sb}/{}", "p".repeat(self.rng.below(5000) + 1)),
            6 => format!("rel-{}.vhdx", self.rng.below(3)),
            _ => format!("{sb}/vms/{}", self.rng.below(4)),
        }
    }

    fn number(&mut self, schema: &Value) -> Value {
        let boundary: &[Value] = &[
            json!(0),
            json!(1),
            json!(2),
            json!(33),
            json!(64),
            json!(256),
            json!(-1),
            json!(4096),
            json!(65_535),
            json!(65_536),
            json!(1u64 << 31),
            json!(1u64 << 32),
            json!((1u64 << 53) + 1),
            json!(i64::MAX),
            json!(u64::MAX),
            json!(i64::MIN),
            json!(0.5),
            json!(1e308),
            json!(-1e308),
        ];
        if self.rng.chance(40) {
            let lo = schema.get("minimum").and_then(Value::as_i64).unwrap_or(0);
            let hi = schema
                .get("maximum")
                .and_then(Value::as_i64)
                .unwrap_or(lo + 200);
            let span = (hi - lo).max(0) as u64 + 1;
            return json!(lo + (self.rng.next() % span) as i64);
        }
        self.rng.pick(boundary).clone()
    }

    fn schema(&self, s: &Value) -> Value {
        if let Some(r) = s.get("$ref").and_then(Value::as_str) {
            let name = r.rsplit('/').next().unwrap_or_default();
            return self.doc["components"]["schemas"][name].clone();
        }
        s.clone()
    }

    fn value(&mut self, s: &Value, field: &str, depth: usize) -> Value {
        if depth > 6 {
            return Value::Null;
        }
        let s = self.schema(s);
        for k in ["allOf", "oneOf", "anyOf"] {
            if let Some(v) = s.get(k).and_then(Value::as_array) {
                if !v.is_empty() {
                    let pick = v[self.rng.below(v.len())].clone();
                    return self.value(&pick, field, depth + 1);
                }
            }
        }
        if s.get("nullable") == Some(&json!(true)) && self.rng.chance(15) {
            return Value::Null;
        }
        if let Some(e) = s.get("enum").and_then(Value::as_array) {
            if !e.is_empty() && self.rng.chance(85) {
                return e[self.rng.below(e.len())].clone();
            }
            return json!(self.hostile_string());
        }
        let pathish = ["path", "dir", "folder", "kernel", "initrd", "floppy"]
            .iter()
            .any(|p| field.contains(p));
        match s.get("type").and_then(Value::as_str) {
            Some("object") => {
                let mut o = Map::new();
                let required: Vec<String> = s
                    .get("required")
                    .and_then(Value::as_array)
                    .map(|r| {
                        r.iter()
                            .filter_map(|x| x.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                if let Some(props) = s.get("properties").and_then(Value::as_object) {
                    for (k, ps) in props {
                        let want = if required.contains(k) { 95 } else { 45 };
                        if self.rng.chance(want) {
                            let v = self.value(ps, k, depth + 1);
                            o.insert(k.clone(), v);
                        }
                    }
                }
                Value::Object(o)
            }
            Some("array") => {
                let items = s.get("items").cloned().unwrap_or(json!({}));
                let n = self.rng.below(4);
                Value::Array(
                    (0..n)
                        .map(|_| self.value(&items, field, depth + 1))
                        .collect(),
                )
            }
            Some("string") if pathish => json!(self.path()),
            Some("string") => {
                if s.get("format").and_then(Value::as_str) == Some("uuid") {
                    return json!(self.vm_key(true));
                }
                if field == "name" || field.ends_with("name") {
                    return json!(self.name());
                }
                if field.contains("mac") {
                    let macs = ["00:15:5d:00:00:01", "01:00:00:00:00:01", "zz", ""];
                    if self.rng.chance(60) {
                        return json!(self.rng.pick(&macs));
                    }
                }
                if self.rng.chance(50) {
                    json!(format!("s{}", self.rng.below(100)))
                } else {
                    json!(self.hostile_string())
                }
            }
            Some("integer") | Some("number") => {
                if field == "memory_mib" && self.rng.chance(50) {
                    return json!(*self.rng.pick(&[64u64, 128, 33, 31, 1 << 40]));
                }
                self.number(&s)
            }
            Some("boolean") => json!(self.rng.chance(50)),
            _ => self.scalar(),
        }
    }

    fn scalar(&mut self) -> Value {
        match self.rng.below(6) {
            0 => Value::Null,
            1 => json!(self.rng.chance(50)),
            2 => self.number(&json!({})),
            3 => json!([]),
            4 => json!({}),
            _ => json!(self.hostile_string()),
        }
    }

    /// A random leaf or member changed: wrong type, null, unknown field, deep nesting.
    fn mutate(&mut self, v: &mut Value) {
        match self.rng.below(6) {
            0 => {
                if let Some(o) = v.as_object_mut() {
                    o.insert(
                        self.rng
                            .pick(&["memroy_mib", "colour", "cuont", "", "id"])
                            .to_string(),
                        json!(1),
                    );
                }
            }
            1 | 2 => {
                // Replace a random member at a random depth (found by reading,
                // then changed through its JSON pointer).
                let mut ptr = String::new();
                let mut cur: &Value = v;
                for _ in 0..self.rng.below(4) {
                    let step = match cur {
                        Value::Object(o) if !o.is_empty() => {
                            let k = o.keys().nth(self.rng.below(o.len())).cloned();
                            k.map(|k| (k.replace('~', "~0").replace('/', "~1"), k))
                                .and_then(|(esc, k)| o.get(&k).map(|n| (esc, n)))
                        }
                        Value::Array(a) if !a.is_empty() => {
                            let i = self.rng.below(a.len());
                            a.get(i).map(|n| (i.to_string(), n))
                        }
                        _ => None,
                    };
                    match step {
                        Some((seg, n)) => {
                            ptr.push('/');
                            ptr.push_str(&seg);
                            cur = n;
                        }
                        None => break,
                    }
                }
                let new = self.scalar();
                if let Some(slot) = v.pointer_mut(&ptr) {
                    *slot = new;
                }
            }
            3 => {
                let mut deep = json!(1);
                for _ in 0..self.rng.below(300) {
                    deep = json!({"cpu": deep});
                }
                if let Some(o) = v.as_object_mut() {
                    o.insert("cpu".into(), deep);
                }
            }
            4 => *v = self.scalar(),
            _ => {
                if let Some(o) = v.as_object_mut() {
                    o.insert("name".into(), json!(self.hostile_string()));
                }
            }
        }
    }

    fn vm_key(&mut self, id_only: bool) -> String {
        let k = self.known.lock().unwrap();
        match self.rng.below(10) {
            0..=4 if !k.vms.is_empty() => k.vms[self.rng.below(k.vms.len())].clone(),
            5 | 6 if !id_only && !k.names.is_empty() => {
                k.names[self.rng.below(k.names.len())].clone()
            }
            7 => "00000000-0000-4000-8000-000000000000".into(),
            _ => {
                drop(k);
                self.hostile_string()
            }
        }
    }

    fn param(&mut self, name: &str) -> String {
        let v = match name {
            "id" => self.vm_key(false),
            "job" => {
                let k = self.known.lock().unwrap();
                if !k.jobs.is_empty() && self.rng.chance(70) {
                    k.jobs[self.rng.below(k.jobs.len())].clone()
                } else {
                    drop(k);
                    self.hostile_string()
                }
            }
            "disk" | "nic" => self
                .rng
                .pick(&[
                    "0",
                    "1",
                    "-1",
                    "99999999999999999999999",
                    "Network Adapter 1",
                    "",
                ])
                .to_string(),
            "role" => self
                .rng
                .pick(&[
                    "Administrator",
                    "Monitor",
                    "VM Operator",
                    "Fuzz",
                    "No%20Such",
                ])
                .to_string(),
            "scope" => self.rng.pick(&["default", "A", "*", "zz"]).to_string(),
            _ => self.hostile_string(),
        };
        let v = if v.is_empty() { "x".to_string() } else { v };
        pct(&v)
    }

    fn query(&mut self, params: &[Value]) -> String {
        let mut q = Vec::new();
        for p in params.iter().filter(|p| p["in"] == "query") {
            if !self.rng.chance(50) {
                continue;
            }
            let name = p["name"].as_str().unwrap_or_default().to_string();
            let v = match p["schema"]["type"].as_str() {
                Some("integer") | Some("number") => match self.number(&p["schema"]) {
                    Value::Number(n) => n.to_string(),
                    other => other.to_string(),
                },
                Some("boolean") => self.rng.pick(&["true", "false", "maybe", "1"]).to_string(),
                _ if name == "dest" => "/tmp/x".into(),
                _ if name == "since" && p["schema"]["format"] == "date-time" => self
                    .rng
                    .pick(&["2026-01-01T00:00:00Z", "yesterday", "9999-99-99", ""])
                    .to_string(),
                _ if name == "vm" => self.vm_key(false),
                _ => self.hostile_string(),
            };
            q.push(format!("{name}={}", pct(&v)));
        }
        if self.rng.chance(10) {
            q.push(format!("{}={}", pct(&self.hostile_string()), pct("%%")));
        }
        if q.is_empty() {
            String::new()
        } else {
            format!("?{}", q.join("&"))
        }
    }

    fn request(&mut self, routes: &[(String, String, Value)], tokens: &[String]) -> Req {
        // Deletions are picked less often, so there is something left to work on.
        let (path, method, op) = loop {
            let r = routes[self.rng.below(routes.len())].clone();
            if r.1 != "delete" || self.rng.chance(30) {
                break r;
            }
        };
        let params = op["parameters"].as_array().cloned().unwrap_or_default();
        let mut p = String::new();
        for seg in path.split('/').filter(|s| !s.is_empty()) {
            p.push('/');
            match seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(name) => p.push_str(&self.param(name)),
                None => p.push_str(seg),
            }
        }
        p.push_str(&self.query(&params));
        let mut r = Req {
            method: method.to_uppercase(),
            path: p,
            headers: vec![],
            body: None,
            stream: op["operationId"] == "event.stream",
        };
        let rb = &op["requestBody"]["content"];
        if let Some(s) = rb.get("application/json").map(|c| &c["schema"]) {
            r.headers
                .push(("Content-Type".into(), "application/json".into()));
            let mut v = self.value(s, "", 0);
            if self.rng.chance(40) {
                self.mutate(&mut v);
            }
            let mut bytes = v.to_string().into_bytes();
            match self.rng.below(20) {
                0 => bytes.truncate(self.rng.below(bytes.len() + 1)),
                1 => bytes = vec![0xff, 0xfe, b'{', 0x80],
                2 => bytes.clear(),
                3 if self.rng.chance(10) => bytes = vec![b' '; 3 << 20],
                _ => {}
            }
            r.body = Some(bytes);
        } else if rb.get("application/octet-stream").is_some() {
            r.headers
                .push(("Content-Type".into(), "application/octet-stream".into()));
            let n = self.rng.below(64 * 1024);
            r.body = Some((0..n).map(|_| self.rng.next() as u8).collect());
        } else if self.rng.chance(10) {
            r.body = Some(self.hostile_string().into_bytes());
        }
        if op["operationId"]
            .as_str()
            .is_some_and(|o| o.starts_with("vm.console"))
            && self.rng.chance(70)
        {
            r.headers.push(("Connection".into(), "Upgrade".into()));
            r.headers.push(("Upgrade".into(), "fv-console".into()));
            r.stream = true;
        }
        match self.rng.below(20) {
            0 | 1 => r.headers.push((
                "Authorization".into(),
                format!("Bearer {}", self.rng.pick(tokens)),
            )),
            2 => r.headers.push((
                "Authorization".into(),
                format!("Bearer {}", self.hostile_string().replace(['\r', '\n'], "")),
            )),
            _ => {}
        }
        r
    }
}

fn learn(known: &Mutex<Known>, v: &Value) {
    let mut k = known.lock().unwrap();
    let mut visit = |x: &Value| {
        if let (Some(id), Some(_)) = (x["id"].as_str(), x.get("config")) {
            if !k.vms.iter().any(|v| v == id) {
                k.vms.push(id.to_string());
                k.all_vms.push(id.to_string());
            }
            if let Some(n) = x["name"].as_str() {
                if n.len() < 200 && !k.names.iter().any(|v| v == n) {
                    k.names.push(n.to_string());
                }
            }
        }
        if let (Some(id), Some(_)) = (x["id"].as_str(), x.get("operation")) {
            if x.get("percent_complete").is_some() && !k.jobs.iter().any(|v| v == id) {
                k.jobs.push(id.to_string());
            }
        }
    };
    match v {
        Value::Array(a) => a.iter().for_each(&mut visit),
        other => visit(other),
    }
    let n = k.vms.len();
    if n > 64 {
        k.vms.drain(..n - 64);
    }
    let n = k.jobs.len();
    if n > 64 {
        k.jobs.drain(..n - 64);
    }
}

#[test]
fn random_and_mutated_requests_over_the_whole_api() {
    let secs: u64 = std::env::var("FV_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let seed: u64 = std::env::var("FV_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
                | 1
        });
    println!("api fuzz: seed {seed} (FV_FUZZ_SEED), {secs} s (FV_FUZZ_SECS)");
    let mut f = Srv::start();
    let sandbox = f.state.path().join("sandbox");
    std::fs::create_dir_all(sandbox.join("iso")).unwrap();
    std::fs::write(sandbox.join("iso/media.iso"), vec![0u8; 4096]).unwrap();
    let to = Duration::from_secs(60);
    let ok = |r: &Req| {
        let (s, v) = send(&f.sock, r, to).unwrap();
        assert!(
            (200..300).contains(&s),
            "{} {} -> {s} {v}",
            r.method,
            r.path
        );
        v
    };
    // Host folders inside the sandbox (fvd runs as root: nothing may land elsewhere).
    let sb = sandbox.display().to_string();
    ok(&Req::json(
        "PATCH",
        "/host",
        &json!({"vm_folder": format!("{sb}/vms"), "disk_folder": format!("{sb}/disks"), "media_folders": [format!("{sb}/iso")]}),
    ));
    // An administrator token for the checks afterwards (its id is never fuzzed).
    let admin = ok(&Req::json(
        "POST",
        "/auth/tokens",
        &json!({"name": "fuzz-admin"}),
    ));
    let admin_id = admin["id"].as_str().unwrap().to_string();
    let admin_tok = admin["token"].as_str().unwrap().to_string();
    ok(&Req::json(
        "POST",
        "/auth/assignments",
        &json!({"principal": format!("token:{admin_id}"), "role": "Administrator", "scope": "*"}),
    ));
    ok(&Req::json("POST", "/auth/scopes", &json!({"name": "A"})));
    let mon = ok(&Req::json(
        "POST",
        "/auth/tokens",
        &json!({"name": "fuzz-mon"}),
    ));
    ok(&Req::json(
        "POST",
        "/auth/assignments",
        &json!({"principal": format!("token:{}", mon["id"].as_str().unwrap()), "role": "VM Operator", "scope": "A"}),
    ));
    let tokens = vec![
        mon["token"].as_str().unwrap().to_string(),
        "garbage".to_string(),
        format!("{}.00", mon["id"].as_str().unwrap()),
    ];
    let known = Arc::new(Mutex::new(Known::default()));
    for i in 0..4 {
        let v = ok(&Req::json(
            "POST",
            "/vms",
            &json!({"name": format!("seed-{i}"), "memory_mib": 64, "generation": if i % 2 == 0 {"1"} else {"2"},
                    "dvd_drives": [{"slot": {"controller": "scsi", "controller_number": 0, "location": 1}, "path": null}]}),
        ));
        learn(&known, &v);
    }
    let doc = ok(&Req::get("/openapi.json"));
    // Every route except the one that stops fvd (it is covered by the authz test).
    let mut routes: Vec<(String, String, Value)> = Vec::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            if op["operationId"] != "host.shutdown" {
                routes.push((path.clone(), method.clone(), op.clone()));
            }
        }
    }
    assert!(routes.len() > 40, "{} routes", routes.len());
    let count = Arc::new(AtomicU64::new(0));
    let statuses = Arc::new(Mutex::new(BTreeMap::<u16, u64>::new()));
    let per_op = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let end = Instant::now() + Duration::from_secs(secs);
    let threads: Vec<_> = (0..2)
        .map(|t| {
            let (sock, doc, sandbox, known) =
                (f.sock.clone(), doc.clone(), sandbox.clone(), known.clone());
            let (routes, tokens, admin_tok) = (routes.clone(), tokens.clone(), admin_tok.clone());
            let (count, statuses, per_op, failures) = (
                count.clone(),
                statuses.clone(),
                per_op.clone(),
                failures.clone(),
            );
            std::thread::spawn(move || {
                let mut g = Gen {
                    rng: Rng(seed ^ (t as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
                    doc: &doc,
                    sandbox,
                    known: known.clone(),
                };
                let mut i = 0u64;
                while Instant::now() < end && failures.lock().unwrap().len() < 5 {
                    i += 1;
                    if i.is_multiple_of(100) {
                        // Keep a few VMs around (valid ones, made as the fuzzer's admin).
                        let n = send(
                            &sock,
                            &Req::get("/vms").with_token(&admin_tok),
                            Duration::from_secs(60),
                        )
                        .ok()
                        .and_then(|(_, v)| v.as_array().map(|a| a.len()))
                        .unwrap_or(0);
                        for j in n..3 {
                            let b = json!({"name": format!("keep-{t}-{i}-{j}"), "memory_mib": 64});
                            if let Ok((201, v)) = send(
                                &sock,
                                &Req::json("POST", "/vms", &b).with_token(&admin_tok),
                                Duration::from_secs(60),
                            ) {
                                learn(&known, &v);
                            }
                        }
                    }
                    let r = g.request(&routes, &tokens);
                    let op = routes
                        .iter()
                        .find(|(p, m, _)| {
                            m.eq_ignore_ascii_case(&r.method)
                                && p.split('/').count()
                                    == r.path.split('?').next().unwrap_or("").split('/').count()
                                && p.split('/')
                                    .zip(r.path.split('?').next().unwrap_or("").split('/'))
                                    .all(|(a, b)| a.starts_with('{') || a == b)
                        })
                        .map(|(_, _, o)| o["operationId"].as_str().unwrap_or("?").to_string())
                        .unwrap_or_else(|| "?".into());
                    let res = send(&sock, &r, Duration::from_secs(60));
                    if op == "auth.settings.set" {
                        // Root stays Administrator, or most of what follows is 403.
                        let fix =
                            Req::json("PATCH", "/auth/settings", &json!({"root_is_admin": true}))
                                .with_token(&admin_tok);
                        let _ = send(&sock, &fix, Duration::from_secs(60));
                    }
                    count.fetch_add(1, Ordering::Relaxed);
                    *per_op.lock().unwrap().entry(op.clone()).or_default() += 1;
                    let body: String = r
                        .body
                        .as_ref()
                        .map(|b| String::from_utf8_lossy(&b[..b.len().min(300)]).into_owned())
                        .unwrap_or_default();
                    match res {
                        Ok((s, v)) => {
                            *statuses.lock().unwrap().entry(s).or_default() += 1;
                            if s == 0 || ((500..600).contains(&s) && s != 507) {
                                failures.lock().unwrap().push(format!(
                                    "{op}: {} {} body {body:?} -> {s} {v}",
                                    r.method,
                                    &r.path[..r.path.len().min(300)]
                                ));
                            }
                            if (200..300).contains(&s) {
                                learn(&known, &v);
                            }
                            if s == 204 && op == "vm.delete" {
                                let key = r.path.split(['/', '?']).nth(2).unwrap_or_default();
                                known.lock().unwrap().vms.retain(|v| v != key);
                            }
                        }
                        Err(e) => failures.lock().unwrap().push(format!(
                            "{op}: {} {} body {body:?}: no answer: {e}",
                            r.method,
                            &r.path[..r.path.len().min(300)]
                        )),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let n = count.load(Ordering::Relaxed);
    println!(
        "api fuzz: {n} requests in {secs} s over {} routes",
        routes.len()
    );
    println!("api fuzz: statuses {:?}", statuses.lock().unwrap());
    println!("api fuzz: per operation {:?}", per_op.lock().unwrap());
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "server errors:\n{}\n{}",
        failures.join("\n"),
        f.log()
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Every operation was exercised.
    let seen = per_op.lock().unwrap().clone();
    for (_, _, op) in &routes {
        let name = op["operationId"].as_str().unwrap();
        assert!(seen.contains_key(name), "{name} was never fuzzed");
    }
    // fvd still answers, never panicked.
    assert!(f.alive(), "fvd died: {}", f.log());
    let log = f.log();
    assert!(!log.contains("panicked"), "fvd panicked: {log}");
    // The registry is consistent: configs parse and match, the database agrees.
    let list = |f: &Srv| -> Vec<Value> {
        let (s, v) = send(&f.sock, &Req::get("/vms").with_token(&admin_tok), to).unwrap();
        assert_eq!(s, 200, "{v}");
        v.as_array().unwrap().clone()
    };
    let vms = list(&f);
    for v in &vms {
        let p = v["config_path"].as_str().unwrap();
        let c: fv_model::VmConfig = serde_json::from_str(
            &std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{p}: {e}")),
        )
        .unwrap_or_else(|e| panic!("{p} does not parse: {e}"));
        assert_eq!(c.id.to_string(), v["id"].as_str().unwrap());
        assert_eq!(c.name, v["name"].as_str().unwrap());
        assert_eq!(serde_json::to_value(&c).unwrap(), v["config"], "{p}");
    }
    let db = rusqlite::Connection::open_with_flags(
        f.state.path().join("fvd.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let rows: i64 = db
        .query_row("SELECT COUNT(*) FROM vms", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows as usize, vms.len(), "database rows vs listed VMs");
    drop(db);
    let mut ids: Vec<String> = vms
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    f.kill9();
    f.spawn();
    let mut again: Vec<String> = list(&f)
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect();
    again.sort();
    assert_eq!(ids, again, "a restarted fvd lists other VMs");
    println!("api fuzz: {} VMs consistent after {n} requests", vms.len());
    // Cgroups of VMs the fuzzer started (their starts failed; fvd may have made them).
    f.kill9();
    let cg = fvd::host::Cgroups::detect();
    for id in &known.lock().unwrap().all_vms {
        cg.remove(id);
    }
}
