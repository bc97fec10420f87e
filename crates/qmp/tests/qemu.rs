//! Against a real QEMU (TCG). Every QEMU is killed by a Drop guard.

use fv_qmp::{Qmp, QmpError};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::io::AsyncReadExt;

struct Qemu {
    child: Child,
    _dir: tempfile::TempDir,
    qmp: PathBuf,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qemu(extra: &[&str]) -> Qemu {
    let dir = tempfile::Builder::new().prefix("fvqmp").tempdir().unwrap();
    let qmp = dir.path().join("qmp.sock");
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-accel",
            "tcg",
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .args(extra)
        .stdin(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 must be installed (scripts/install-deps)");
    Qemu {
        child,
        _dir: dir,
        qmp,
    }
}

async fn connect(q: &Qemu) -> Qmp {
    Qmp::connect_retry(&q.qmp, Duration::from_secs(60))
        .await
        .unwrap()
}

async fn next_event(rx: &mut tokio::sync::broadcast::Receiver<fv_qmp::QmpEvent>, name: &str) {
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let e = rx.recv().await.unwrap();
            if e.name == name {
                return e;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {name} event"));
}

#[tokio::test(flavor = "current_thread")]
async fn greeting_status_events_errors_quit() {
    let mut q = qemu(&["-M", "none"]);
    let c = connect(&q).await;
    assert!(c.greeting()["QMP"]["version"]["qemu"]["major"]
        .as_u64()
        .is_some());
    let mut ev = c.events();

    let s = c.query_status().await.unwrap();
    assert!(s.running, "{s:?}");
    c.stop().await.unwrap();
    next_event(&mut ev, "STOP").await;
    let s = c.query_status().await.unwrap();
    assert!(!s.running);
    assert_eq!(s.status, "paused");
    c.cont().await.unwrap();
    next_event(&mut ev, "RESUME").await;

    let e = c.execute("no-such-command", None).await.unwrap_err();
    assert_eq!(e.class(), Some("CommandNotFound"), "{e}");
    let e = c
        .execute("query-status", Some(json!({"bogus": 1})))
        .await
        .unwrap_err();
    assert!(matches!(e, QmpError::Command { .. }), "{e}");

    let out = c.human_monitor_command("info version").await.unwrap();
    let major = c.greeting()["QMP"]["version"]["qemu"]["major"]
        .as_u64()
        .unwrap();
    assert!(out.starts_with(&format!("{major}.")), "{out}");

    c.quit().await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), c.closed())
        .await
        .unwrap();
    assert!(c.is_closed());
    assert!(matches!(
        c.query_status().await,
        Err(QmpError::Disconnected)
    ));
    let st = q.child.wait().unwrap();
    assert!(st.success());
}

#[tokio::test(flavor = "current_thread")]
async fn concurrent_commands_get_their_own_replies() {
    let q = qemu(&["-M", "none", "-name", "concurrency-vm"]);
    let c = connect(&q).await;
    let mut futs = Vec::new();
    for i in 0..60 {
        let c = &c;
        futs.push(async move {
            match i % 3 {
                0 => {
                    let v = c.execute("query-name", None).await.unwrap();
                    assert_eq!(v["name"], "concurrency-vm");
                }
                1 => {
                    let v = c.execute("query-version", None).await.unwrap();
                    assert!(v["qemu"]["major"].is_u64());
                }
                _ => {
                    let s = c.query_status().await.unwrap();
                    assert!(s.running);
                }
            }
        });
    }
    futures_join_all(futs).await;
}

async fn futures_join_all<F: std::future::Future<Output = ()>>(futs: Vec<F>) {
    let mut set = Vec::new();
    for f in futs {
        set.push(Box::pin(f));
    }
    // Poll all concurrently on one task.
    std::future::poll_fn(|cx| {
        set.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if set.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await
}

/// Save the state of a small paused PC into a unix socket we drain to a file,
/// then load it into a second QEMU started with `-incoming defer`.
#[tokio::test(flavor = "current_thread")]
async fn migrate_out_and_in_over_unix_socket() {
    let args = ["-M", "pc", "-m", "64", "-S"];
    let src = qemu(&args);
    let c = connect(&src).await;
    let mut ev = c.events();
    c.migrate_set_capabilities(&[("events", true)])
        .await
        .unwrap();
    let msock = src._dir.path().join("mig.sock");
    let listener = tokio::net::UnixListener::bind(&msock).unwrap();
    c.migrate(&format!("unix:{}", msock.display()))
        .await
        .unwrap();
    let (mut s, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept())
        .await
        .unwrap()
        .unwrap();
    let mut data = Vec::new();
    tokio::time::timeout(Duration::from_secs(120), s.read_to_end(&mut data))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&data[..4], b"QEVM", "migration stream magic");
    // MIGRATION events come with the status; wait for completed.
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let e = ev.recv().await.unwrap();
            if e.name == "MIGRATION" && e.data["status"] == "completed" {
                break;
            }
        }
    })
    .await
    .unwrap();
    let info = c.query_migrate().await.unwrap();
    assert_eq!(info.status.as_deref(), Some("completed"));
    assert_eq!(info.percent(), 100);
    let state = src._dir.path().join("state.bin");
    std::fs::write(&state, &data).unwrap();

    let dst = qemu(&["-M", "pc", "-m", "64", "-incoming", "defer"]);
    let d = connect(&dst).await;
    assert_eq!(d.query_status().await.unwrap().status, "inmigrate");
    let mut dev = d.events();
    d.migrate_set_capabilities(&[("events", true)])
        .await
        .unwrap();
    let isock = dst._dir.path().join("in.sock");
    d.migrate_incoming(&format!("unix:{}", isock.display()))
        .await
        .unwrap();
    feed(&isock, &state).await;
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let e = dev.recv().await.unwrap();
            if e.name == "MIGRATION" && e.data["status"] == "completed" {
                break;
            }
        }
    })
    .await
    .unwrap();
    // The source was paused (-S), so the destination stays paused until cont.
    let s = d.query_status().await.unwrap();
    assert!(!s.running, "{s:?}");
    d.cont().await.unwrap();
    assert!(d.query_status().await.unwrap().running);
}

async fn feed(sock: &Path, file: &Path) {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::UnixStream::connect(sock).await.unwrap();
    let data = std::fs::read(file).unwrap();
    s.write_all(&data).await.unwrap();
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn cd_media_change_and_eject() {
    let q = qemu(&[
        "-M",
        "pc",
        "-m",
        "32",
        "-S",
        "-device",
        "ide-cd,id=cd0,bus=ide.1",
    ]);
    let c = connect(&q).await;
    let iso = q._dir.path().join("media.iso");
    std::fs::write(&iso, vec![0u8; 2048 * 16]).unwrap();
    c.blockdev_change_medium("cd0", iso.to_str().unwrap(), "raw", true)
        .await
        .unwrap();
    let blk = c.query_block().await.unwrap();
    let cd = blk
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["qdev"] == "cd0")
        .unwrap()
        .clone();
    assert_eq!(cd["inserted"]["file"], iso.to_str().unwrap(), "{cd}");
    assert_eq!(cd["inserted"]["ro"], true);
    c.eject("cd0").await.unwrap();
    let blk = c.query_block().await.unwrap();
    let cd = blk
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["qdev"] == "cd0")
        .unwrap()
        .clone();
    assert!(cd.get("inserted").is_none(), "{cd}");
    let e = c
        .blockdev_change_medium("cd0", "/nonexistent/x.iso", "raw", true)
        .await
        .unwrap_err();
    assert!(matches!(e, QmpError::Command { .. }), "{e}");
}
