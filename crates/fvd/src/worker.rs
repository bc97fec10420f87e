//! fvd's side of the worker protocol: one connection per worker, requests matched to
//! responses by id, pushed events forwarded to the manager.
use fv_worker_proto::{encode, Event, Message, Op, Request, Response, WorkerError, WorkerStatus};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("worker: {0}")]
    Worker(#[from] WorkerError),
    #[error("worker connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("worker connection closed")]
    Closed,
    #[error("worker did not answer {0} within {1:?}")]
    Timeout(&'static str, Duration),
    #[error("worker sent an unexpected answer: {0}")]
    Protocol(String),
}

/// What the manager hears from a worker connection.
#[derive(Debug)]
pub enum WorkerMsg {
    Event(Event),
    /// The connection ended (worker exited or crashed).
    Gone,
}

pub struct WorkerConn {
    /// Distinguishes this connection from earlier ones to the same VM.
    pub serial: u64,
    writer: tokio::sync::Mutex<tokio::net::unix::OwnedWriteHalf>,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Response>>>>,
    next_id: AtomicU64,
}

static SERIAL: AtomicU64 = AtomicU64::new(1);

fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Hello { .. } => "hello",
        Op::Status => "status",
        Op::Subscribe => "subscribe",
        Op::Pause => "pause",
        Op::Resume => "resume",
        Op::Reset => "reset",
        Op::TurnOff => "turn_off",
        Op::ShutDown { .. } => "shut_down",
        Op::Save { .. } => "save",
        Op::ChangeMedia { .. } => "change_media",
        Op::GuestPing => "guest_ping",
        Op::Stats => "stats",
        Op::SetIntegration { .. } => "set_integration",
        Op::Freeze { .. } => "freeze",
        Op::Thaw => "thaw",
        Op::FreezeStatus => "freeze_status",
        Op::SyncTime => "sync_time",
        Op::CopyFile { .. } => "copy_file",
    }
}

impl WorkerConn {
    /// Connect, say hello, subscribe and fetch the status. Events and the end of the
    /// connection go to `events` tagged with the VM id and this connection's serial.
    pub async fn connect(
        sock: &Path,
        vm: Uuid,
        events: mpsc::UnboundedSender<(Uuid, u64, WorkerMsg)>,
    ) -> Result<(Arc<WorkerConn>, WorkerStatus), CallError> {
        let stream = UnixStream::connect(sock).await?;
        let (r, w) = stream.into_split();
        let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(WorkerConn {
            serial,
            writer: tokio::sync::Mutex::new(w),
            pending: Arc::new(Mutex::new(HashMap::new())),
            next_id: AtomicU64::new(1),
        });
        let pending = conn.pending.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Message>(&line) {
                    Ok(Message::Response(resp)) => {
                        if let Some(tx) = pending.lock().remove(&resp.id) {
                            let _ = tx.send(resp);
                        }
                    }
                    Ok(Message::Event(e)) => {
                        let _ = events.send((vm, serial, WorkerMsg::Event(e.event)));
                    }
                    Ok(Message::Request(_)) => {}
                    Err(e) => tracing::warn!(%vm, "worker sent an unreadable line: {e}: {line}"),
                }
            }
            // Dropping the senders fails every outstanding request with Closed.
            pending.lock().clear();
            let _ = events.send((vm, serial, WorkerMsg::Gone));
        });
        let t = Duration::from_secs(10);
        conn.call(
            Op::Hello {
                version: fv_worker_proto::PROTOCOL_VERSION,
            },
            t,
        )
        .await?;
        conn.call(Op::Subscribe, t).await?;
        let status = conn.status().await?;
        Ok((conn, status))
    }

    pub async fn status(&self) -> Result<WorkerStatus, CallError> {
        let v = self.call(Op::Status, Duration::from_secs(10)).await?;
        serde_json::from_value(v).map_err(|e| CallError::Protocol(e.to_string()))
    }

    pub async fn call(&self, op: Op, timeout: Duration) -> Result<serde_json::Value, CallError> {
        let name = op_name(&op);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().insert(id, tx);
        let line = encode(&Request { id, op }).map_err(|e| CallError::Protocol(e.to_string()))?;
        {
            let mut w = self.writer.lock().await;
            if let Err(e) = w.write_all(line.as_bytes()).await {
                self.pending.lock().remove(&id);
                return Err(e.into());
            }
        }
        let resp = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => return Err(CallError::Closed),
            Err(_) => {
                self.pending.lock().remove(&id);
                return Err(CallError::Timeout(name, timeout));
            }
        };
        if let Some(e) = resp.error {
            return Err(e.into());
        }
        Ok(resp.ok.unwrap_or(serde_json::Value::Null))
    }
}
