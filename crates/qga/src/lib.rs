//! qemu-guest-agent client over the Unix socket QEMU exposes for the agent's
//! virtio-serial port.
//!
//! The agent channel has no request ids, and a reply to a command we gave up on may
//! arrive long after. So every call first resynchronises with `guest-sync-delimited`:
//! we send a 0xFF byte (which resets the agent's JSON parser), then a sync with a
//! fresh id; the agent answers with 0xFF followed by that id, and everything before
//! the marker or with another id is stale and discarded. Calls are serialised: the
//! channel carries one conversation at a time.
#![forbid(unsafe_code)]

use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::Instant;

/// The agent's reset byte (sent by both sides around `guest-sync-delimited`).
const DELIMITER: u8 = 0xFF;
/// Largest reply we buffer (guest-file-read returns base64 of at most what we ask).
const MAX_BUFFER: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QgaError {
    /// No agent answered (socket missing, nobody listening, or the sync got no reply).
    #[error("guest agent unavailable: {0}")]
    Unavailable(String),
    /// The agent synced but did not answer this command in time.
    #[error("guest agent command {command} timed out after {after:?}")]
    Timeout { command: String, after: Duration },
    /// The agent refused the command.
    #[error("guest agent command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("guest agent i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("guest agent protocol: {0}")]
    Protocol(String),
    #[error("guest agent: unexpected reply to {command}: {detail}")]
    BadReply { command: String, detail: String },
}

impl QgaError {
    pub fn class(&self) -> Option<&str> {
        match self {
            QgaError::Command { class, .. } => Some(class),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, QgaError>;

/// `guest-info`.
#[derive(Debug, Clone, Deserialize)]
pub struct AgentInfo {
    pub version: String,
    #[serde(rename = "supported_commands", default)]
    pub supported_commands: Vec<AgentCommand>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AgentCommand {
    pub name: String,
    pub enabled: bool,
}

/// `guest-get-osinfo` (all members optional in the schema).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct OsInfo {
    pub kernel_release: Option<String>,
    pub kernel_version: Option<String>,
    pub machine: Option<String>,
    pub id: Option<String>,
    pub name: Option<String>,
    pub pretty_name: Option<String>,
    pub version: Option<String>,
    pub version_id: Option<String>,
}

/// One entry of `guest-network-get-interfaces`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Interface {
    pub name: String,
    pub hardware_address: Option<String>,
    #[serde(default)]
    pub ip_addresses: Vec<IpAddress>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct IpAddress {
    pub ip_address_type: String,
    pub ip_address: String,
    pub prefix: u32,
}

/// `guest-exec-status`, with output already decoded from base64.
#[derive(Debug, Clone, Default)]
pub struct ExecStatus {
    pub exited: bool,
    pub exit_code: Option<i64>,
    pub signal: Option<i64>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
}

struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
}

/// A guest agent endpoint; connects lazily and reconnects after errors.
pub struct Qga {
    path: PathBuf,
    conn: tokio::sync::Mutex<Option<Conn>>,
    next_sync: AtomicU64,
    sync_timeout: Duration,
}

impl Qga {
    pub fn new(path: impl Into<PathBuf>) -> Qga {
        // Sync ids differ per client instance so a stale sync reply from an earlier
        // client cannot be mistaken for ours.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            & 0x0000_7fff_ffff_0000;
        Qga {
            path: path.into(),
            conn: tokio::sync::Mutex::new(None),
            next_sync: AtomicU64::new(seed | 1),
            sync_timeout: Duration::from_secs(2),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How long the resync before each call may take (default 2 s).
    pub fn set_sync_timeout(&mut self, t: Duration) {
        self.sync_timeout = t;
    }

    /// Drop the connection (e.g. after the guest rebooted).
    pub async fn disconnect(&self) {
        *self.conn.lock().await = None;
    }

    /// Run `command` and return its `return` member. The resync is bounded by the
    /// sync timeout (→ `Unavailable`), the reply by `timeout` (→ `Timeout`).
    pub async fn call(
        &self,
        command: &str,
        args: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        let mut guard = self.conn.lock().await;
        let conn = self.ensure_conn(&mut guard).await?;
        let r = self.call_on(conn, command, args, timeout).await;
        if matches!(r, Err(QgaError::Io(_)) | Err(QgaError::Protocol(_))) {
            *guard = None;
        }
        r
    }

    async fn ensure_conn<'a>(&self, guard: &'a mut Option<Conn>) -> Result<&'a mut Conn> {
        if guard.is_none() {
            let stream = tokio::time::timeout(self.sync_timeout, UnixStream::connect(&self.path))
                .await
                .map_err(|_| QgaError::Unavailable("connect timed out".into()))?
                .map_err(|e| QgaError::Unavailable(format!("{}: {e}", self.path.display())))?;
            *guard = Some(Conn {
                stream,
                buf: Vec::new(),
            });
        }
        guard
            .as_mut()
            .ok_or_else(|| QgaError::Unavailable("no connection".into()))
    }

    async fn call_on(
        &self,
        conn: &mut Conn,
        command: &str,
        args: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        self.sync(conn).await?;
        write_command(conn, command, args).await?;
        let deadline = Instant::now() + timeout;
        match read_reply(conn, deadline).await {
            Ok(Some(v)) => interpret(command, v),
            Ok(None) => Err(QgaError::Timeout {
                command: command.into(),
                after: timeout,
            }),
            Err(e) => Err(e),
        }
    }

    async fn sync(&self, conn: &mut Conn) -> Result<()> {
        let id = self.next_sync.fetch_add(1, Ordering::Relaxed);
        let deadline = Instant::now() + self.sync_timeout;
        conn.stream.write_all(&[DELIMITER]).await?;
        write_command(conn, "guest-sync-delimited", Some(json!({ "id": id }))).await?;
        loop {
            // Skip everything up to and including the agent's delimiter.
            loop {
                if let Some(pos) = conn.buf.iter().position(|&b| b == DELIMITER) {
                    conn.buf.drain(..=pos);
                    break;
                }
                conn.buf.clear();
                // Don't keep a big stale reply's allocation around.
                conn.buf.shrink_to(64 << 10);
                if !fill(conn, deadline).await? {
                    return Err(QgaError::Unavailable(
                        "no answer to guest-sync-delimited".into(),
                    ));
                }
            }
            match read_reply(conn, deadline).await? {
                None => {
                    return Err(QgaError::Unavailable(
                        "no answer to guest-sync-delimited".into(),
                    ))
                }
                Some(v) if v.get("return").and_then(Value::as_u64) == Some(id) => return Ok(()),
                // An older sync's answer or a stale reply: keep looking.
                Some(_) => continue,
            }
        }
    }

    fn parse<T: serde::de::DeserializeOwned>(command: &str, v: Value) -> Result<T> {
        serde_json::from_value(v).map_err(|e| QgaError::BadReply {
            command: command.into(),
            detail: e.to_string(),
        })
    }

    pub async fn ping(&self, timeout: Duration) -> Result<()> {
        self.call("guest-ping", None, timeout).await.map(|_| ())
    }

    pub async fn info(&self, timeout: Duration) -> Result<AgentInfo> {
        let v = self.call("guest-info", None, timeout).await?;
        Self::parse("guest-info", v)
    }

    /// Ask the guest to shut down (`powerdown`, `halt` or `reboot`). On success the
    /// agent sends no reply, so "no error within `timeout`" counts as accepted.
    pub async fn shutdown(&self, mode: &str, timeout: Duration) -> Result<()> {
        match self
            .call("guest-shutdown", Some(json!({ "mode": mode })), timeout)
            .await
        {
            Ok(_) | Err(QgaError::Timeout { .. }) => Ok(()),
            // The agent (or the whole guest) went away while shutting down.
            Err(QgaError::Io(_)) | Err(QgaError::Protocol(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn osinfo(&self, timeout: Duration) -> Result<OsInfo> {
        let v = self.call("guest-get-osinfo", None, timeout).await?;
        Self::parse("guest-get-osinfo", v)
    }

    pub async fn host_name(&self, timeout: Duration) -> Result<String> {
        let v = self.call("guest-get-host-name", None, timeout).await?;
        v.get("host-name")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| QgaError::BadReply {
                command: "guest-get-host-name".into(),
                detail: v.to_string(),
            })
    }

    pub async fn network_interfaces(&self, timeout: Duration) -> Result<Vec<Interface>> {
        let v = self
            .call("guest-network-get-interfaces", None, timeout)
            .await?;
        Self::parse("guest-network-get-interfaces", v)
    }

    /// Guest wall clock in nanoseconds since the epoch.
    pub async fn get_time(&self, timeout: Duration) -> Result<i64> {
        let v = self.call("guest-get-time", None, timeout).await?;
        v.as_i64().ok_or_else(|| QgaError::BadReply {
            command: "guest-get-time".into(),
            detail: v.to_string(),
        })
    }

    /// Set the guest clock to `ns` since the epoch, or (None) from its RTC.
    pub async fn set_time(&self, ns: Option<i64>, timeout: Duration) -> Result<()> {
        let args = ns.map(|t| json!({ "time": t }));
        self.call("guest-set-time", args, timeout).await.map(|_| ())
    }

    /// Freeze guest filesystems; returns how many were frozen.
    pub async fn fsfreeze_freeze(&self, timeout: Duration) -> Result<u64> {
        let v = self.call("guest-fsfreeze-freeze", None, timeout).await?;
        as_count("guest-fsfreeze-freeze", v)
    }

    pub async fn fsfreeze_thaw(&self, timeout: Duration) -> Result<u64> {
        let v = self.call("guest-fsfreeze-thaw", None, timeout).await?;
        as_count("guest-fsfreeze-thaw", v)
    }

    /// `thawed` or `frozen`.
    pub async fn fsfreeze_status(&self, timeout: Duration) -> Result<String> {
        let v = self.call("guest-fsfreeze-status", None, timeout).await?;
        v.as_str()
            .map(str::to_string)
            .ok_or_else(|| QgaError::BadReply {
                command: "guest-fsfreeze-status".into(),
                detail: v.to_string(),
            })
    }

    /// Open a guest file (`mode` as for fopen); returns the agent's handle.
    pub async fn file_open(&self, path: &str, mode: &str, timeout: Duration) -> Result<i64> {
        let v = self
            .call(
                "guest-file-open",
                Some(json!({"path": path, "mode": mode})),
                timeout,
            )
            .await?;
        v.as_i64().ok_or_else(|| QgaError::BadReply {
            command: "guest-file-open".into(),
            detail: v.to_string(),
        })
    }

    /// Write `data`; returns the byte count the agent wrote.
    pub async fn file_write(&self, handle: i64, data: &[u8], timeout: Duration) -> Result<u64> {
        let b64 = base64::engine::general_purpose::STANDARD.encode(data);
        let v = self
            .call(
                "guest-file-write",
                Some(json!({"handle": handle, "buf-b64": b64})),
                timeout,
            )
            .await?;
        v.get("count")
            .and_then(Value::as_u64)
            .ok_or_else(|| QgaError::BadReply {
                command: "guest-file-write".into(),
                detail: v.to_string(),
            })
    }

    /// Read up to `count` bytes; returns the data and whether EOF was reached.
    pub async fn file_read(
        &self,
        handle: i64,
        count: u64,
        timeout: Duration,
    ) -> Result<(Vec<u8>, bool)> {
        let v = self
            .call(
                "guest-file-read",
                Some(json!({"handle": handle, "count": count})),
                timeout,
            )
            .await?;
        let data = decode_b64("guest-file-read", v.get("buf-b64"))?;
        Ok((data, v.get("eof").and_then(Value::as_bool).unwrap_or(false)))
    }

    /// Move the file position (`whence`: "set", "cur" or "end"); returns the new position.
    pub async fn file_seek(
        &self,
        handle: i64,
        offset: i64,
        whence: &str,
        timeout: Duration,
    ) -> Result<u64> {
        let v = self
            .call(
                "guest-file-seek",
                Some(json!({"handle": handle, "offset": offset, "whence": whence})),
                timeout,
            )
            .await?;
        v.get("position")
            .and_then(Value::as_u64)
            .ok_or_else(|| QgaError::BadReply {
                command: "guest-file-seek".into(),
                detail: v.to_string(),
            })
    }

    pub async fn file_close(&self, handle: i64, timeout: Duration) -> Result<()> {
        self.call(
            "guest-file-close",
            Some(json!({ "handle": handle })),
            timeout,
        )
        .await
        .map(|_| ())
    }

    /// Start a program in the guest; returns its pid for [`Qga::exec_status`].
    pub async fn exec(
        &self,
        path: &str,
        args: &[&str],
        capture_output: bool,
        timeout: Duration,
    ) -> Result<i64> {
        let v = self
            .call(
                "guest-exec",
                Some(json!({"path": path, "arg": args, "capture-output": capture_output})),
                timeout,
            )
            .await?;
        v.get("pid")
            .and_then(Value::as_i64)
            .ok_or_else(|| QgaError::BadReply {
                command: "guest-exec".into(),
                detail: v.to_string(),
            })
    }

    pub async fn exec_status(&self, pid: i64, timeout: Duration) -> Result<ExecStatus> {
        let v = self
            .call("guest-exec-status", Some(json!({ "pid": pid })), timeout)
            .await?;
        let opt = |k: &str| v.get(k).filter(|x| !x.is_null());
        Ok(ExecStatus {
            exited: v.get("exited").and_then(Value::as_bool).unwrap_or(false),
            exit_code: v.get("exitcode").and_then(Value::as_i64),
            signal: v.get("signal").and_then(Value::as_i64),
            stdout: match opt("out-data") {
                Some(d) => decode_b64("guest-exec-status", Some(d))?,
                None => Vec::new(),
            },
            stderr: match opt("err-data") {
                Some(d) => decode_b64("guest-exec-status", Some(d))?,
                None => Vec::new(),
            },
            stdout_truncated: v
                .get("out-truncated")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        })
    }

    /// Run a program and wait (polling) until it exits, at most `timeout` overall.
    pub async fn exec_wait(
        &self,
        path: &str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<ExecStatus> {
        let deadline = Instant::now() + timeout;
        let pid = self.exec(path, args, true, timeout).await?;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QgaError::Timeout {
                    command: format!("guest-exec {path}"),
                    after: timeout,
                });
            }
            let st = self.exec_status(pid, left).await?;
            if st.exited {
                return Ok(st);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn as_count(command: &str, v: Value) -> Result<u64> {
    v.as_u64().ok_or_else(|| QgaError::BadReply {
        command: command.into(),
        detail: v.to_string(),
    })
}

fn decode_b64(command: &str, v: Option<&Value>) -> Result<Vec<u8>> {
    let s = v.and_then(Value::as_str).unwrap_or("");
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| QgaError::BadReply {
            command: command.into(),
            detail: e.to_string(),
        })
}

fn interpret(command: &str, v: Value) -> Result<Value> {
    if let Some(e) = v.get("error") {
        return Err(QgaError::Command {
            command: command.into(),
            class: e
                .get("class")
                .and_then(Value::as_str)
                .unwrap_or("Unknown")
                .into(),
            desc: e.get("desc").and_then(Value::as_str).unwrap_or("").into(),
        });
    }
    Ok(v.get("return").cloned().unwrap_or(Value::Null))
}

async fn write_command(conn: &mut Conn, command: &str, args: Option<Value>) -> Result<()> {
    let mut m = Map::new();
    m.insert("execute".into(), Value::String(command.into()));
    if let Some(a) = args {
        m.insert("arguments".into(), a);
    }
    let mut line =
        serde_json::to_vec(&Value::Object(m)).map_err(|e| QgaError::Protocol(e.to_string()))?;
    line.push(b'\n');
    conn.stream.write_all(&line).await?;
    Ok(())
}

/// Read more bytes into the buffer; false when the deadline passed first.
async fn fill(conn: &mut Conn, deadline: Instant) -> Result<bool> {
    if conn.buf.len() > MAX_BUFFER {
        return Err(QgaError::Protocol("reply too large".into()));
    }
    let mut chunk = [0u8; 4096];
    match tokio::time::timeout_at(deadline, conn.stream.read(&mut chunk)).await {
        Err(_) => Ok(false),
        Ok(Ok(0)) => Err(QgaError::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "guest agent socket closed",
        ))),
        Ok(Ok(n)) => {
            conn.buf.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
            Ok(true)
        }
        Ok(Err(e)) => Err(e.into()),
    }
}

/// Next complete JSON object line (reply or error), or None at the deadline.
async fn read_reply(conn: &mut Conn, deadline: Instant) -> Result<Option<Value>> {
    loop {
        while let Some(pos) = conn.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = conn.buf.drain(..=pos).collect();
            let text: Vec<u8> = line.into_iter().filter(|&b| b != DELIMITER).collect();
            let text = text.trim_ascii();
            if text.is_empty() {
                continue;
            }
            match serde_json::from_slice::<Value>(text) {
                Ok(v) if v.get("return").is_some() || v.get("error").is_some() => {
                    return Ok(Some(v))
                }
                Ok(v) => tracing::debug!("qga: ignoring {v}"),
                Err(e) => tracing::debug!("qga: ignoring unparsable line: {e}"),
            }
        }
        if !fill(conn, deadline).await? {
            return Ok(None);
        }
    }
}
