//! fv-worker: one process per running VM. Owns the VM's QEMU, disk back-ends and
//! state machine, and serves the worker protocol on `<runtime>/worker.sock`.
//!
//! Usage: `fv-worker --launch SPEC.json [--no-setsid]`

mod confine;
mod disks;
mod qemu_cmd;
mod vm;

use anyhow::{bail, Context, Result};
use fv_worker_proto::{
    encode, ErrorCode, EventMessage, LaunchSpec, Message, Op, Reply, Request, Response, PID_NAME,
    PROTOCOL_VERSION, SOCKET_NAME,
};
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use vm::{werr, Cancel, Vm};

/// Longest request line accepted.
const MAX_LINE: u64 = 1 << 20;

struct Args {
    launch: PathBuf,
    setsid: bool,
}

fn parse_args() -> Result<Args> {
    let mut launch = None;
    let mut setsid = true;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--launch" => launch = it.next().map(PathBuf::from),
            "--no-setsid" => setsid = false,
            "-h" | "--help" => {
                println!("usage: fv-worker --launch SPEC.json [--no-setsid]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other} (usage: fv-worker --launch SPEC.json)"),
        }
    }
    Ok(Args {
        launch: launch.context("--launch SPEC.json is required")?,
        setsid,
    })
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("fv-worker: {e:#}");
        tracing::error!("fatal: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let args = parse_args()?;
    let spec: LaunchSpec = serde_json::from_slice(
        &std::fs::read(&args.launch).with_context(|| format!("read {}", args.launch.display()))?,
    )
    .context("parse launch spec")?;
    if args.setsid {
        // Our own session: signals to fvd's process group or session (including
        // SIGKILL of the group and SIGHUP) must not take the VM down.
        // SAFETY: setsid(2) has no memory-safety preconditions.
        if unsafe { libc::setsid() } < 0 {
            let e = std::io::Error::last_os_error();
            // EPERM: we already lead a process group (spawned with process_group(0)),
            // which is equally detached from fvd's group.
            if e.raw_os_error() != Some(libc::EPERM) {
                bail!("setsid: {e}");
            }
        }
    }
    std::fs::create_dir_all(&spec.runtime_dir)
        .with_context(|| format!("create {}", spec.runtime_dir.display()))?;
    init_logging(&spec)?;
    tracing::info!(
        "fv-worker {} starting for VM {} ({})",
        env!("CARGO_PKG_VERSION"),
        spec.config.name,
        spec.config.id
    );
    std::fs::write(
        spec.runtime_dir.join(PID_NAME),
        format!("{}\n", std::process::id()),
    )?;

    // Before any thread exists (Landlock restricts the calling thread and what it
    // creates later) and before any disk is opened for writing.
    let confinement = if spec.confine {
        let grants = confine::grants(&spec);
        tracing::info!("confine: {grants:?}");
        let hidden = confine::hide_private_dirs(&spec, &grants)?;
        tracing::info!("confine: hid {hidden:?}");
        if is_root() {
            confine::drop_capabilities()?;
        }
        match confine::apply(&spec, &grants)? {
            confine::Enforcement::Full => None,
            e => Some(format!(
                "per-VM confinement only {e:?} (kernel lacks Landlock features): this VM's worker may open other VMs' files"
            )),
        }
    } else {
        Some("per-VM confinement is off for this VM (launch spec confine=false)".to_string())
    };
    if let Some(w) = &confinement {
        tracing::warn!("{w}");
    }

    // One thread for all control-plane work keeps the worker small; disk I/O runs
    // on the vhost-user threads.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(run(spec.clone(), confinement));
    let _ = std::fs::remove_file(spec.runtime_dir.join(SOCKET_NAME));
    let _ = std::fs::remove_file(spec.runtime_dir.join(PID_NAME));
    tracing::info!("fv-worker exiting");
    drop(rt);
    result
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn init_logging(spec: &LaunchSpec) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(spec.runtime_dir.join("worker.log"))
        .context("open worker.log")?;
    let level = match std::env::var("FV_WORKER_LOG").as_deref() {
        Ok("debug") => tracing::Level::DEBUG,
        Ok("trace") => tracing::Level::TRACE,
        _ => tracing::Level::INFO,
    };
    tracing_subscriber::fmt()
        .with_writer(std::sync::Mutex::new(file))
        .with_ansi(false)
        .with_max_level(level)
        .try_init()
        .map_err(|e| anyhow::anyhow!("logging: {e}"))?;
    Ok(())
}

async fn run(spec: LaunchSpec, confinement_warning: Option<String>) -> Result<()> {
    let sock = spec.runtime_dir.join(SOCKET_NAME);
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).with_context(|| format!("bind {}", sock.display()))?;
    let vm = Vm::new(spec);
    if let Some(message) = confinement_warning {
        vm.emit(fv_worker_proto::Event::Warning { message });
    }
    let mut exit_rx = vm.exit.subscribe();

    let acceptor = {
        let vm = vm.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((s, _)) => {
                        tokio::spawn(serve_conn(vm.clone(), s));
                    }
                    Err(e) => {
                        tracing::error!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        })
    };
    {
        let vm = vm.clone();
        tokio::spawn(async move {
            let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            if term.recv().await.is_some() {
                tracing::info!("SIGTERM: turning the VM off");
                if vm.turn_off().await.is_err() {
                    vm.request_exit(Duration::ZERO);
                }
            }
        });
    }

    let starter = vm.clone();
    tokio::spawn(async move { starter.start().await });

    // Wait for a final state, then linger as asked so clients can read it.
    let linger = loop {
        if let Some(d) = *exit_rx.borrow_and_update() {
            break d;
        }
        if exit_rx.changed().await.is_err() {
            break Duration::ZERO;
        }
    };
    let deadline = tokio::time::Instant::now() + linger;
    loop {
        let cur = exit_rx.borrow_and_update().unwrap_or(linger);
        let until = deadline.min(tokio::time::Instant::now() + cur);
        tokio::select! {
            _ = tokio::time::sleep_until(until) => break,
            r = exit_rx.changed() => if r.is_err() { break },
        }
    }
    acceptor.abort();
    Ok(())
}

/// Reads request lines from a connection with recvmsg, so that descriptors passed
/// as SCM_RIGHTS arrive alongside (in order: the line that carries them takes them).
struct ConnReader {
    rd: tokio::net::unix::OwnedReadHalf,
    buf: Vec<u8>,
    fds: VecDeque<OwnedFd>,
    eof: bool,
}

/// Descriptors a connection may have waiting at once; more are closed.
const MAX_PENDING_FDS: usize = 16;

impl ConnReader {
    /// The next line (without its newline), or None at end of stream.
    async fn next_line(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let rest = self.buf.split_off(pos.saturating_add(1));
                let mut line = std::mem::replace(&mut self.buf, rest);
                line.pop();
                return Ok(Some(line));
            }
            if self.buf.len() as u64 > MAX_LINE {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("request line longer than {MAX_LINE} bytes"),
                ));
            }
            if self.eof {
                return Ok(None);
            }
            let stream: &UnixStream = self.rd.as_ref();
            stream.readable().await?;
            let mut chunk = [0u8; 16 << 10];
            let got = stream.try_io(tokio::io::Interest::READABLE, || {
                recv_with_fds(stream.as_raw_fd(), &mut chunk)
            });
            match got {
                Ok((0, _)) => self.eof = true,
                Ok((n, fds)) => {
                    self.buf.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
                    for fd in fds {
                        if self.fds.len() < MAX_PENDING_FDS {
                            self.fds.push_back(fd);
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// One recvmsg: bytes into `buf`, SCM_RIGHTS descriptors (close-on-exec) returned.
fn recv_with_fds(fd: RawFd, buf: &mut [u8]) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([RawFd; 8]);
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(std::io::Error::from)?;
    let mut fds = Vec::new();
    // A truncated control message (more descriptors than room) is an error from
    // cmsgs(); the kernel closed the ones that did not fit.
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(v) = c {
                for raw in v {
                    // SAFETY: the kernel just installed `raw` in our descriptor table
                    // for us (SCM_RIGHTS); nothing else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
        }
    }
    Ok((msg.bytes, fds))
}

async fn serve_conn(vm: Arc<Vm>, stream: UnixStream) {
    let (rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<String>(64);
    let writer = tokio::spawn(async move {
        while let Some(line) = rx.recv().await {
            if wr.write_all(line.as_bytes()).await.is_err() {
                break;
            }
        }
    });
    let mut rd = ConnReader {
        rd,
        buf: Vec::new(),
        fds: VecDeque::new(),
        eof: false,
    };
    // Long operations of this connection by request id, for Cancel.
    let cancels: Arc<std::sync::Mutex<HashMap<u64, Cancel>>> = Arc::default();
    let mut forwarder: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        let buf = match rd.next_line().await {
            Ok(Some(l)) => l,
            Ok(None) | Err(_) => break,
        };
        let line = buf.trim_ascii();
        if line.is_empty() {
            continue;
        }
        let req: Request = match serde_json::from_slice::<Message>(line) {
            Ok(Message::Request(r)) => r,
            Ok(_) => continue,
            Err(e) => {
                let id = serde_json::from_slice::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v.get("id")?.as_u64())
                    .unwrap_or(0);
                let resp = Response {
                    id,
                    ok: None,
                    error: Some(werr(ErrorCode::BadRequest, e.to_string())),
                };
                if let Ok(s) = encode(&resp) {
                    let _ = tx.send(s).await;
                }
                continue;
            }
        };
        let immediate = match &req.op {
            Op::Subscribe => {
                if forwarder.is_none() {
                    let mut events = vm.events.subscribe();
                    let tx2 = tx.clone();
                    forwarder = Some(tokio::spawn(async move {
                        loop {
                            let ev = match events.recv().await {
                                Ok(e) => e,
                                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                                    fv_worker_proto::Event::Warning {
                                        message: format!("{n} events were dropped"),
                                    }
                                }
                                Err(_) => return,
                            };
                            let Ok(s) = encode(&EventMessage { event: ev }) else {
                                continue;
                            };
                            if tx2.send(s).await.is_err() {
                                return;
                            }
                        }
                    }));
                }
                Some(Ok(Reply::Done))
            }
            Op::AttachFd { name } => Some(match rd.fds.pop_front() {
                Some(fd) => vm.attach_fd(name.clone(), fd),
                None => Err(werr(
                    ErrorCode::BadRequest,
                    "attach_fd: no file descriptor arrived with the request (send it as SCM_RIGHTS with the line)",
                )),
            }),
            Op::Cancel { request } => {
                let c = cancels
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(request)
                    .cloned();
                Some(match c {
                    Some(c) => {
                        c.cancel();
                        Ok(Reply::CancelRequested { request: *request })
                    }
                    None => Err(werr(
                        ErrorCode::BadRequest,
                        format!("no long operation with request id {request} runs on this connection"),
                    )),
                })
            }
            _ => None,
        };
        if let Some(r) = immediate {
            let resp = response(req.id, r);
            if let Ok(s) = encode(&resp) {
                let _ = tx.send(s).await;
            }
            continue;
        }
        let vm = vm.clone();
        let tx = tx.clone();
        let cancel = Cancel::default();
        let long = matches!(req.op, Op::Save { .. });
        if long {
            cancels
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(req.id, cancel.clone());
        }
        let cancels = cancels.clone();
        // Every request runs on its own task: a long one never delays the others.
        tokio::spawn(async move {
            let id = req.id;
            let r = handle(&vm, req.op, cancel, id).await;
            if long {
                cancels
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
            }
            if let Ok(s) = encode(&response(id, r)) {
                let _ = tx.send(s).await;
            }
        });
    }
    if let Some(f) = forwarder {
        f.abort();
    }
    drop(tx);
    let _ = writer.await;
}

fn response(id: u64, r: Result<Reply, fv_worker_proto::WorkerError>) -> Response {
    match r {
        Ok(v) => Response {
            id,
            ok: Some(v),
            error: None,
        },
        Err(e) => Response {
            id,
            ok: None,
            error: Some(e),
        },
    }
}

async fn handle(
    vm: &Arc<Vm>,
    op: Op,
    cancel: Cancel,
    request: u64,
) -> Result<Reply, fv_worker_proto::WorkerError> {
    match op {
        Op::Hello { version } => {
            if version != PROTOCOL_VERSION {
                return Err(werr(
                    ErrorCode::BadRequest,
                    format!("protocol version {version} not supported (worker speaks {PROTOCOL_VERSION})"),
                ));
            }
            Ok(Reply::Hello {
                version: PROTOCOL_VERSION,
                vm_id: vm.spec.config.id.to_string(),
                worker_pid: std::process::id(),
            })
        }
        Op::Status => {
            let s = vm.status();
            vm.critical_acknowledged();
            Ok(Reply::Status(s))
        }
        // Answered by serve_conn itself.
        Op::Subscribe | Op::Cancel { .. } | Op::AttachFd { .. } => Err(werr(
            ErrorCode::Internal,
            "connection-level op reached the dispatcher",
        )),
        Op::Pause => vm.pause().await,
        Op::Resume => vm.resume().await,
        Op::Reset => vm.reset().await,
        Op::TurnOff => vm.turn_off().await,
        Op::ShutDown { timeout_s } => vm.shut_down(timeout_s).await,
        Op::Save { dir } => vm.save(&dir, cancel, request).await,
        Op::ChangeMedia { dvd_index, path } => vm.change_media(dvd_index, path.as_deref()).await,
        Op::GuestPing => vm.guest_ping().await,
        Op::Stats => Ok(Reply::Stats(vm.stats())),
        Op::SetIntegration { services, vm_name } => vm.set_integration(services, vm_name).await,
        Op::Freeze { timeout_s } => vm.freeze(timeout_s).await,
        Op::Thaw => vm.thaw().await,
        Op::FreezeStatus => vm.freeze_status().await,
        Op::SyncTime => vm.sync_time("requested").await,
        Op::CopyFile {
            src,
            dest,
            create_full_path,
            overwrite,
            token,
        } => {
            vm.copy_file(&src, &dest, create_full_path, overwrite, &token)
                .await
        }
    }
}
