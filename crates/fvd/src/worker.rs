//! fvd's side of the worker protocol: one connection per worker, requests matched to
//! responses by id, pushed events forwarded to the manager.
use fv_worker_proto::{
    encode, Event, Message, Op, Reply, Request, Response, WorkerError, WorkerStatus,
};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, BorrowedFd};
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
        match self.call(Op::Status, Duration::from_secs(10)).await? {
            Reply::Status(s) => Ok(s),
            other => Err(CallError::Protocol(format!(
                "status answered with {other:?}"
            ))),
        }
    }

    /// The id the next request will carry (so a caller can Cancel it later).
    pub fn next_request_id(&self) -> u64 {
        self.next_id.load(Ordering::Relaxed)
    }

    pub async fn call(&self, op: Op, timeout: Duration) -> Result<Reply, CallError> {
        self.call_inner(op, None, timeout, None).await
    }

    /// Start a long operation; `started` learns its request id (for Cancel) as soon
    /// as the request is sent.
    pub async fn call_long(
        &self,
        op: Op,
        timeout: Duration,
        started: oneshot::Sender<u64>,
    ) -> Result<Reply, CallError> {
        self.call_inner(op, None, timeout, Some(started)).await
    }

    /// Send `op` with one descriptor attached as SCM_RIGHTS (AttachFd).
    pub async fn call_with_fd(
        &self,
        op: Op,
        fd: BorrowedFd<'_>,
        timeout: Duration,
    ) -> Result<Reply, CallError> {
        self.call_inner(op, Some(fd), timeout, None).await
    }

    async fn call_inner(
        &self,
        op: Op,
        fd: Option<BorrowedFd<'_>>,
        timeout: Duration,
        started: Option<oneshot::Sender<u64>>,
    ) -> Result<Reply, CallError> {
        let name = op.name();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().insert(id, tx);
        let line = encode(&Request { id, op }).map_err(|e| CallError::Protocol(e.to_string()))?;
        {
            let mut w = self.writer.lock().await;
            let sent = match fd {
                None => w.write_all(line.as_bytes()).await,
                Some(fd) => send_with_fd(&mut w, line.as_bytes(), fd).await,
            };
            if let Err(e) = sent {
                self.pending.lock().remove(&id);
                return Err(e.into());
            }
        }
        if let Some(s) = started {
            let _ = s.send(id);
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
        resp.ok.ok_or_else(|| {
            CallError::Protocol(format!("{name}: an answer with neither ok nor error"))
        })
    }
}

/// Write `line` with `fd` as SCM_RIGHTS on its first byte, the rest plainly.
async fn send_with_fd(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    line: &[u8],
    fd: BorrowedFd<'_>,
) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let stream: &UnixStream = w.as_ref();
    let raw = [fd.as_raw_fd()];
    let sent = loop {
        stream.writable().await?;
        let r = stream.try_io(tokio::io::Interest::WRITABLE, || {
            let iov = [std::io::IoSlice::new(line)];
            let cmsg = [ControlMessage::ScmRights(&raw)];
            sendmsg::<()>(
                stream.as_raw_fd(),
                &iov,
                &cmsg,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(std::io::Error::from)
        });
        match r {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    w.write_all(line.get(sent..).unwrap_or(&[])).await
}
