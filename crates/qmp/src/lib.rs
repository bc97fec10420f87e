//! QEMU Machine Protocol (QMP) client over a Unix stream socket.
//!
//! One reader task owns the read half: it routes replies to the waiting caller by
//! `id` and fans asynchronous events out on a broadcast channel, so many commands may
//! be in flight at once and events never get mixed up with replies.
#![forbid(unsafe_code)]

use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot, watch};
use tokio::task::JoinHandle;

/// Longest line accepted from QEMU (a reply to `query-*` on a big VM stays far below).
const MAX_LINE: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("qmp i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("qmp protocol: {0}")]
    Protocol(String),
    /// QEMU answered the command with an error.
    #[error("qmp command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    /// The connection closed (QEMU exited or closed the monitor).
    #[error("qmp connection closed")]
    Disconnected,
    #[error("qmp command {command} timed out after {after:?}")]
    Timeout { command: String, after: Duration },
    #[error("qmp: unexpected reply to {command}: {detail}")]
    BadReply { command: String, detail: String },
}

impl QmpError {
    /// The QMP error class (e.g. `CommandNotFound`, `GenericError`) if QEMU refused.
    pub fn class(&self) -> Option<&str> {
        match self {
            QmpError::Command { class, .. } => Some(class),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, QmpError>;

/// An asynchronous QMP event (`STOP`, `RESUME`, `SHUTDOWN`, `RESET`, `POWERDOWN`,
/// `MIGRATION`, `JOB_STATUS_CHANGE`, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    pub name: String,
    pub data: Value,
    /// Host time of the event in microseconds since the epoch, as QEMU stamped it.
    pub timestamp_us: u64,
}

/// `query-status` result.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StatusInfo {
    pub running: bool,
    /// QEMU run state (`running`, `paused`, `inmigrate`, `postmigrate`, `shutdown`, ...).
    pub status: String,
}

/// RAM part of `query-migrate`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct MigrationRam {
    #[serde(default)]
    pub transferred: u64,
    #[serde(default)]
    pub remaining: u64,
    #[serde(default)]
    pub total: u64,
}

/// `query-migrate` result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct MigrationInfo {
    /// `none`, `setup`, `active`, `completed`, `failed`, `cancelled`, ... (absent = none).
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub ram: Option<MigrationRam>,
    #[serde(rename = "error-desc", default)]
    pub error_desc: Option<String>,
}

impl MigrationInfo {
    /// Progress 0-100 from the RAM counters (the bulk of a save).
    pub fn percent(&self) -> u8 {
        match (self.status.as_deref(), &self.ram) {
            (Some("completed"), _) => 100,
            (_, Some(r)) if r.total > 0 => {
                let done = r.total.saturating_sub(r.remaining);
                (done.saturating_mul(100) / r.total).min(99) as u8
            }
            _ => 0,
        }
    }
}

type Pending = HashMap<u64, (String, oneshot::Sender<Result<Value>>)>;

struct Shared {
    /// `None` once the connection is gone, so late callers fail fast.
    pending: Mutex<Option<Pending>>,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Sender<bool>,
}

/// A negotiated QMP session.
pub struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    reader: JoinHandle<()>,
    greeting: Value,
    timeout: Duration,
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

async fn read_json_line(r: &mut BufReader<OwnedReadHalf>, buf: &mut Vec<u8>) -> Result<Value> {
    loop {
        buf.clear();
        let n = (&mut *r)
            .take(MAX_LINE as u64)
            .read_until(b'\n', buf)
            .await?;
        if n == 0 {
            return Err(QmpError::Disconnected);
        }
        if buf.last() != Some(&b'\n') && n >= MAX_LINE {
            return Err(QmpError::Protocol("line too long".into()));
        }
        let line = buf.trim_ascii();
        if line.is_empty() {
            continue;
        }
        return serde_json::from_slice(line)
            .map_err(|e| QmpError::Protocol(format!("bad json from qemu: {e}")));
    }
}

fn command_error(command: &str, err: &Value) -> QmpError {
    QmpError::Command {
        command: command.to_string(),
        class: err
            .get("class")
            .and_then(Value::as_str)
            .unwrap_or("Unknown")
            .to_string(),
        desc: err
            .get("desc")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
    }
}

impl Qmp {
    /// Connect, read the greeting and leave capabilities-negotiation mode.
    pub async fn connect(path: &Path) -> Result<Qmp> {
        let stream = UnixStream::connect(path).await?;
        Self::handshake(stream, Duration::from_secs(10)).await
    }

    /// Like [`Qmp::connect`], retrying while the socket does not exist or refuses
    /// (QEMU creates it a moment after it starts).
    pub async fn connect_retry(path: &Path, within: Duration) -> Result<Qmp> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match UnixStream::connect(path).await {
                Ok(s) => return Self::handshake(s, within).await,
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e.into()),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    async fn handshake(stream: UnixStream, within: Duration) -> Result<Qmp> {
        let (rd, mut wr) = stream.into_split();
        let mut rd = BufReader::new(rd);
        let mut buf = Vec::new();
        let hs = async {
            let greeting = read_json_line(&mut rd, &mut buf).await?;
            if greeting.get("QMP").is_none() {
                return Err(QmpError::Protocol(format!("no QMP greeting: {greeting}")));
            }
            wr.write_all(b"{\"execute\":\"qmp_capabilities\",\"id\":0}\n")
                .await?;
            loop {
                let v = read_json_line(&mut rd, &mut buf).await?;
                if let Some(e) = v.get("error") {
                    return Err(command_error("qmp_capabilities", e));
                }
                if v.get("return").is_some() {
                    return Ok(greeting);
                }
            }
        };
        let greeting =
            tokio::time::timeout(within, hs)
                .await
                .map_err(|_| QmpError::Timeout {
                    command: "qmp_capabilities".into(),
                    after: within,
                })??;
        let (events, _) = broadcast::channel(256);
        let (closed, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            pending: Mutex::new(Some(HashMap::new())),
            events,
            closed,
        });
        let reader = tokio::spawn(reader_loop(rd, shared.clone()));
        Ok(Qmp {
            writer: tokio::sync::Mutex::new(wr),
            shared,
            next_id: AtomicU64::new(1),
            reader,
            greeting,
            timeout: Duration::from_secs(30),
        })
    }

    /// Default per-command timeout (30 s unless changed).
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    /// The `{"QMP": {...}}` greeting (QEMU version, capabilities).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Events from now on. Slow receivers lose the oldest events (`Lagged`).
    pub fn events(&self) -> broadcast::Receiver<QmpEvent> {
        self.shared.events.subscribe()
    }

    pub fn is_closed(&self) -> bool {
        *self.shared.closed.borrow()
    }

    /// Resolves once the monitor connection has closed (normally: QEMU exited).
    pub async fn closed(&self) {
        let mut rx = self.shared.closed.subscribe();
        // An error means the sender is gone, which also means closed.
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Run a command with the default timeout; returns the `return` member.
    pub async fn execute(&self, command: &str, args: Option<Value>) -> Result<Value> {
        self.execute_timeout(command, args, self.timeout).await
    }

    pub async fn execute_timeout(
        &self,
        command: &str,
        args: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.shared.pending.lock().map_err(|_| poisoned())?;
            match p.as_mut() {
                Some(map) => map.insert(id, (command.to_string(), tx)),
                None => return Err(QmpError::Disconnected),
            };
        }
        let mut msg = Map::new();
        msg.insert("execute".into(), Value::String(command.into()));
        if let Some(a) = args {
            msg.insert("arguments".into(), a);
        }
        msg.insert("id".into(), Value::from(id));
        let mut line = serde_json::to_vec(&Value::Object(msg))
            .map_err(|e| QmpError::Protocol(e.to_string()))?;
        line.push(b'\n');
        let sent = async {
            let mut w = self.writer.lock().await;
            w.write_all(&line).await
        };
        let res = tokio::time::timeout(timeout, async {
            if let Err(e) = sent.await {
                return Err(QmpError::Io(e));
            }
            rx.await.unwrap_or(Err(QmpError::Disconnected))
        })
        .await;
        match res {
            Ok(r) => {
                if r.is_err() {
                    self.forget(id);
                }
                r
            }
            Err(_) => {
                self.forget(id);
                Err(QmpError::Timeout {
                    command: command.to_string(),
                    after: timeout,
                })
            }
        }
    }

    fn forget(&self, id: u64) {
        if let Ok(mut p) = self.shared.pending.lock() {
            if let Some(m) = p.as_mut() {
                m.remove(&id);
            }
        }
    }

    async fn unit(&self, command: &str, args: Option<Value>) -> Result<()> {
        self.execute(command, args).await.map(|_| ())
    }

    fn parse<T: serde::de::DeserializeOwned>(command: &str, v: Value) -> Result<T> {
        serde_json::from_value(v).map_err(|e| QmpError::BadReply {
            command: command.to_string(),
            detail: e.to_string(),
        })
    }

    pub async fn query_status(&self) -> Result<StatusInfo> {
        let v = self.execute("query-status", None).await?;
        Self::parse("query-status", v)
    }

    /// Pause the vCPUs.
    pub async fn stop(&self) -> Result<()> {
        self.unit("stop", None).await
    }

    /// Resume the vCPUs.
    pub async fn cont(&self) -> Result<()> {
        self.unit("cont", None).await
    }

    pub async fn system_reset(&self) -> Result<()> {
        self.unit("system_reset", None).await
    }

    /// ACPI power button.
    pub async fn system_powerdown(&self) -> Result<()> {
        self.unit("system_powerdown", None).await
    }

    /// Ask QEMU to exit. QEMU may close the socket before or after replying, so a
    /// disconnect counts as success.
    pub async fn quit(&self) -> Result<()> {
        match self.execute("quit", None).await {
            Ok(_) | Err(QmpError::Disconnected) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn migrate_set_capabilities(&self, caps: &[(&str, bool)]) -> Result<()> {
        let list: Vec<Value> = caps
            .iter()
            .map(|(n, s)| json!({"capability": n, "state": s}))
            .collect();
        self.unit(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": list })),
        )
        .await
    }

    /// Start an outgoing migration (`unix:/path`, `exec:...`, `fd:name`, `tcp:...`).
    /// Returns when it has started; poll [`Qmp::query_migrate`] or watch `MIGRATION`.
    pub async fn migrate(&self, uri: &str) -> Result<()> {
        self.unit("migrate", Some(json!({ "uri": uri }))).await
    }

    /// Start listening for an incoming migration (QEMU started with `-incoming defer`).
    pub async fn migrate_incoming(&self, uri: &str) -> Result<()> {
        self.unit("migrate-incoming", Some(json!({ "uri": uri })))
            .await
    }

    pub async fn migrate_cancel(&self) -> Result<()> {
        self.unit("migrate_cancel", None).await
    }

    pub async fn query_migrate(&self) -> Result<MigrationInfo> {
        let v = self.execute("query-migrate", None).await?;
        Self::parse("query-migrate", v)
    }

    /// Insert a medium into a removable drive identified by its qdev `id`.
    pub async fn blockdev_change_medium(
        &self,
        id: &str,
        filename: &str,
        format: &str,
        read_only: bool,
    ) -> Result<()> {
        let mode = if read_only { "read-only" } else { "retain" };
        self.unit(
            "blockdev-change-medium",
            Some(json!({"id": id, "filename": filename, "format": format, "read-only-mode": mode})),
        )
        .await
    }

    /// Eject the medium of a removable drive (forced: the guest cannot veto it).
    pub async fn eject(&self, id: &str) -> Result<()> {
        self.unit("eject", Some(json!({"id": id, "force": true})))
            .await
    }

    /// `query-block` as raw JSON (an array of block backends).
    pub async fn query_block(&self) -> Result<Value> {
        self.execute("query-block", None).await
    }

    /// Run an HMP command line and return its text output.
    pub async fn human_monitor_command(&self, command_line: &str) -> Result<String> {
        let v = self
            .execute(
                "human-monitor-command",
                Some(json!({ "command-line": command_line })),
            )
            .await?;
        v.as_str()
            .map(str::to_string)
            .ok_or_else(|| QmpError::BadReply {
                command: "human-monitor-command".into(),
                detail: format!("not a string: {v}"),
            })
    }
}

fn poisoned() -> QmpError {
    QmpError::Protocol("internal lock poisoned".into())
}

async fn reader_loop(mut rd: BufReader<OwnedReadHalf>, shared: Arc<Shared>) {
    let mut buf = Vec::new();
    loop {
        let v = match read_json_line(&mut rd, &mut buf).await {
            Ok(v) => v,
            Err(QmpError::Protocol(e)) => {
                tracing::warn!("qmp: ignoring bad line: {e}");
                continue;
            }
            Err(_) => break,
        };
        if let Some(name) = v.get("event").and_then(Value::as_str) {
            let ts = v.get("timestamp");
            let secs = ts
                .and_then(|t| t.get("seconds"))
                .and_then(Value::as_u64)
                .unwrap_or(0);
            let us = ts
                .and_then(|t| t.get("microseconds"))
                .and_then(Value::as_u64)
                .unwrap_or(0);
            let ev = QmpEvent {
                name: name.to_string(),
                data: v.get("data").cloned().unwrap_or(Value::Null),
                timestamp_us: secs.saturating_mul(1_000_000).saturating_add(us),
            };
            // No receivers is fine: nobody is interested right now.
            let _ = shared.events.send(ev);
            continue;
        }
        let Some(id) = v.get("id").and_then(Value::as_u64) else {
            tracing::warn!("qmp: reply without our id: {v}");
            continue;
        };
        let waiter = match shared.pending.lock() {
            Ok(mut p) => p.as_mut().and_then(|m| m.remove(&id)),
            Err(_) => None,
        };
        let Some((command, tx)) = waiter else {
            // The caller timed out and went away.
            continue;
        };
        let r = if let Some(e) = v.get("error") {
            Err(command_error(&command, e))
        } else {
            Ok(v.get("return").cloned().unwrap_or(Value::Null))
        };
        let _ = tx.send(r);
    }
    if let Ok(mut p) = shared.pending.lock() {
        if let Some(map) = p.take() {
            for (_, (_, tx)) in map {
                let _ = tx.send(Err(QmpError::Disconnected));
            }
        }
    }
    shared.closed.send_replace(true);
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn migration_percent() {
        let mut m = MigrationInfo {
            status: Some("active".into()),
            ram: Some(MigrationRam {
                transferred: 0,
                remaining: 25,
                total: 100,
            }),
            error_desc: None,
        };
        assert_eq!(m.percent(), 75);
        m.ram = Some(MigrationRam {
            transferred: 0,
            remaining: 0,
            total: 100,
        });
        assert_eq!(m.percent(), 99);
        m.status = Some("completed".into());
        assert_eq!(m.percent(), 100);
        let p: MigrationInfo = serde_json::from_str("{}").unwrap();
        assert_eq!(p.percent(), 0);
    }
}
