//! Small helpers: atomic file writes, time, host facts.
use std::io::Write;
use std::path::Path;
use std::time::SystemTime;

/// Write `data` so that readers see either the old or the new file, also after a crash:
/// temp file in the same directory, fsync, rename, fsync the directory. A failure
/// (a full disk) leaves the old file as it was and no temp file behind.
pub fn atomic_write(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let written = (|| {
        // Never through a name someone else placed (a symlink in a folder a caller
        // can write would make root write wherever it points): remove it, create anew.
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()
    })()
    .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // The new file is in place and visible; only its durability across a crash is
    // uncertain if the directory cannot be synced, which is no reason to report
    // the write as failed (the caller would keep a state that no longer matches).
    if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(dir = ?dir, "cannot sync directory after writing: {e}");
    }
    Ok(())
}

/// True for "the device is full" (ENOSPC) and "quota exceeded" (EDQUOT).
pub fn is_no_space(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_enospc::ENOSPC | libc_enospc::EDQUOT)
    )
}

/// An error that comes from the path itself, not from the host: a component is not
/// a folder, a file is where a folder should go (or the reverse), the name is too
/// long or loops, it holds a NUL, or the file system is read-only.
pub fn is_callers_path_error(e: &std::io::Error) -> bool {
    use nix::errno::Errno;
    e.kind() == std::io::ErrorKind::InvalidInput
        || matches!(
            e.raw_os_error().map(Errno::from_raw),
            Some(
                Errno::ENOTDIR
                    | Errno::EEXIST
                    | Errno::EISDIR
                    | Errno::ENAMETOOLONG
                    | Errno::ELOOP
                    | Errno::EROFS
            )
        )
}

mod libc_enospc {
    pub const ENOSPC: i32 = nix::errno::Errno::ENOSPC as i32;
    pub const EDQUOT: i32 = nix::errno::Errno::EDQUOT as i32;
}

/// `create_dir_all` that returns the folders it created (outermost first), so a
/// failed operation can remove exactly those and nothing that was there before.
pub fn create_dir_all_new(dir: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur {
        if d.as_os_str().is_empty() || d.exists() {
            break;
        }
        missing.push(d.to_path_buf());
        cur = d.parent();
    }
    missing.reverse();
    let mut made = Vec::new();
    for d in missing {
        match std::fs::create_dir(&d) {
            Ok(()) => made.push(d),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                remove_dirs(&made);
                return Err(e);
            }
        }
    }
    Ok(made)
}

/// Remove folders made by [`create_dir_all_new`], innermost first, each only if empty.
pub fn remove_dirs(made: &[std::path::PathBuf]) {
    for d in made.iter().rev() {
        let _ = std::fs::remove_dir(d);
    }
}

/// RFC 7396 JSON merge patch: objects merge member by member at every depth, `null`
/// removes a member, anything else (arrays included) replaces the target.
pub fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    use serde_json::Value;
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// Members of `given` that did not survive a round trip through the typed value
/// (`back`): fields the type does not have, as paths (`cpu.cuont`,
/// `network_adapters[0].colour`).
pub fn unknown_fields(given: &serde_json::Value, back: &serde_json::Value) -> Vec<String> {
    fn walk(g: &serde_json::Value, b: &serde_json::Value, path: &str, out: &mut Vec<String>) {
        use serde_json::Value;
        match (g, b) {
            (Value::Object(g), Value::Object(b)) => {
                for (k, v) in g {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    match b.get(k) {
                        Some(bv) => walk(v, bv, &p, out),
                        None => out.push(p),
                    }
                }
            }
            (Value::Array(g), Value::Array(b)) => {
                for (i, (gv, bv)) in g.iter().zip(b).enumerate() {
                    walk(gv, bv, &format!("{path}[{i}]"), out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(given, back, "", &mut out);
    out
}

/// Deserialize a request value strictly: a type error names the field and what was
/// expected (never a parser position alone), and members the type does not know
/// are refused by name instead of being ignored.
pub fn from_value_strict<T>(v: serde_json::Value) -> Result<T, String>
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    let t: T = serde_path_to_error::deserialize(v.clone()).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            inner.to_string()
        } else {
            format!("{path}: {inner}")
        }
    })?;
    let back = serde_json::to_value(&t).map_err(|e| format!("cannot encode: {e}"))?;
    let unknown = unknown_fields(&v, &back);
    if !unknown.is_empty() {
        return Err(format!(
            "unknown field{} {}",
            if unknown.len() == 1 { "" } else { "s" },
            unknown
                .iter()
                .map(|u| format!("`{}`", log_safe(u)))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(t)
}

/// Text for a log line or a one-line message: control characters (newline, tab,
/// NUL, escape sequences) are escaped, so input cannot forge or split log lines;
/// very long input is cut (with its length said).
pub fn log_safe(s: &str) -> String {
    fv_model::one_line(s, 256)
}

/// A `tracing_subscriber` writer that escapes control characters inside each
/// formatted log record, keeping only its final newline: a message or field that
/// carries a newline or carriage return (a VM name, a path) cannot start a forged
/// line in fvd's log.
/// The fmt layer writes each record with one `write_all`, which arrives here whole.
pub struct LogWriter<W: std::io::Write>(pub W);

impl<W: std::io::Write> std::io::Write for LogWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let (body, nl) = match buf.strip_suffix(b"\n") {
            Some(b) => (b, true),
            None => (buf, false),
        };
        let mut out = Vec::with_capacity(buf.len() + 16);
        for &b in body {
            match b {
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                // Tabs split nothing; ESC starts the subscriber's own colours
                // (tracing-subscriber already escapes ESC inside fields and messages).
                b'\t' | 0x1b => out.push(b),
                0x00..=0x1f | 0x7f => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
                _ => out.push(b),
            }
        }
        if nl {
            out.push(b'\n');
        }
        self.0.write_all(&out)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// fvd's log on stderr through [`LogWriter`] (`.with_writer(util::log_stderr)`).
pub fn log_stderr() -> LogWriter<std::io::Stderr> {
    LogWriter(std::io::stderr())
}

pub fn now() -> String {
    rfc3339(SystemTime::now())
}

pub fn rfc3339(t: SystemTime) -> String {
    // humantime's Display fails (and to_string panics) outside years 1970-9999.
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) if d.as_secs() < 253_402_300_800 => humantime::format_rfc3339_millis(t).to_string(),
        Ok(d) => format!("@{}", d.as_secs()),
        Err(_) => "1970-01-01T00:00:00.000Z".into(),
    }
}

pub fn logical_cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

/// (MemTotal, MemAvailable) in MiB.
pub fn meminfo_mib() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |k: &str| -> u64 {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            / 1024
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// Resident memory of a process in MiB (0 when it is gone).
pub fn rss_mib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        / 1024
}

pub fn pid_alive(pid: u32) -> bool {
    // A zombie still has /proc/<pid>; it is dead for our purposes.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

pub fn kill(pid: u32, sig: nix::sys::signal::Signal) {
    // pid > 1 so this never becomes a broadcast or hits init.
    if pid > 1 {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
    }
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}
