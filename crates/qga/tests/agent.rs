//! Against the real qemu-guest-agent binary listening on a Unix socket on the host
//! (dangerous RPCs blocked), and a real QEMU whose agent port has no agent behind it.

use fv_qga::{Qga, QgaError};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

/// Commands that would affect the host running the tests.
const BLOCKED: &str = "guest-shutdown,guest-set-time,guest-fsfreeze-freeze,guest-fsfreeze-freeze-list,\
guest-fsfreeze-thaw,guest-suspend-disk,guest-suspend-ram,guest-suspend-hybrid,guest-set-user-password,\
guest-set-vcpus,guest-set-memory-blocks,guest-fstrim";

struct Proc {
    child: Child,
    dir: tempfile::TempDir,
    sock: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for_socket(p: &std::path::Path) {
    let end = std::time::Instant::now() + Duration::from_secs(30);
    while !p.exists() {
        assert!(
            std::time::Instant::now() < end,
            "{} never appeared",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn agent() -> Proc {
    let dir = tempfile::Builder::new().prefix("fvqga").tempdir().unwrap();
    let sock = dir.path().join("qga.sock");
    let child = Command::new("qemu-ga")
        .args(["-m", "unix-listen", "-p"])
        .arg(&sock)
        .arg("-f")
        .arg(dir.path().join("qga.pid"))
        .arg("-t")
        .arg(dir.path())
        .args(["-b", BLOCKED])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-ga must be installed (package qemu-guest-agent, scripts/install-deps)");
    wait_for_socket(&sock);
    Proc { child, dir, sock }
}

#[tokio::test(flavor = "current_thread")]
async fn basic_commands() {
    let a = agent();
    let q = Qga::new(&a.sock);
    q.ping(T).await.unwrap();
    let info = q.info(T).await.unwrap();
    assert!(info.version.starts_with("7."), "{}", info.version);
    assert!(info
        .supported_commands
        .iter()
        .any(|c| c.name == "guest-ping" && c.enabled));
    assert!(info
        .supported_commands
        .iter()
        .any(|c| c.name == "guest-shutdown" && !c.enabled));

    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(q.host_name(T).await.unwrap(), host.trim());

    let os = q.osinfo(T).await.unwrap();
    let rel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(os.kernel_release.as_deref(), Some(rel.trim()));

    let ifs = q.network_interfaces(T).await.unwrap();
    let lo = ifs.iter().find(|i| i.name == "lo").expect("lo");
    assert!(
        lo.ip_addresses
            .iter()
            .any(|a| a.ip_address == "127.0.0.1" && a.prefix == 8),
        "{lo:?}"
    );

    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let t = q.get_time(T).await.unwrap();
    let after = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    assert!(
        t as u128 >= before.as_nanos() - 1_000_000_000
            && t as u128 <= after.as_nanos() + 1_000_000_000
    );

    assert_eq!(q.fsfreeze_status(T).await.unwrap(), "thawed");

    // Blocked on this agent: the refusal must come back as a typed command error.
    let e = q.set_time(Some(t), T).await.unwrap_err();
    assert!(matches!(e, QgaError::Command { .. }), "{e}");
    let e = q.shutdown("powerdown", T).await.unwrap_err();
    assert!(matches!(e, QgaError::Command { .. }), "{e}");
    let e = q.fsfreeze_freeze(T).await.unwrap_err();
    assert!(matches!(e, QgaError::Command { .. }), "{e}");
    let e = q.call("guest-no-such-thing", None, T).await.unwrap_err();
    assert_eq!(e.class(), Some("CommandNotFound"), "{e}");
    // And the channel still works after errors.
    q.ping(T).await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn files_and_exec() {
    let a = agent();
    let q = Qga::new(&a.sock);
    let f = a.dir.path().join("written.txt");
    let h = q.file_open(f.to_str().unwrap(), "w", T).await.unwrap();
    let payload: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
    assert_eq!(
        q.file_write(h, &payload, T).await.unwrap(),
        payload.len() as u64
    );
    q.file_close(h, T).await.unwrap();
    assert_eq!(std::fs::read(&f).unwrap(), payload);

    let h = q.file_open(f.to_str().unwrap(), "r", T).await.unwrap();
    let mut got = Vec::new();
    loop {
        let (d, eof) = q.file_read(h, 4096, T).await.unwrap();
        got.extend_from_slice(&d);
        if eof || d.is_empty() {
            break;
        }
    }
    q.file_close(h, T).await.unwrap();
    assert_eq!(got, payload);

    let st = q
        .exec_wait("/bin/sh", &["-c", "printf out; printf err >&2; exit 3"], T)
        .await
        .unwrap();
    assert!(st.exited);
    assert_eq!(st.exit_code, Some(3));
    assert_eq!(st.stdout, b"out");
    assert_eq!(st.stderr, b"err");
    let e = q
        .exec("/nonexistent/binary", &[], true, T)
        .await
        .unwrap_err();
    assert!(matches!(e, QgaError::Command { .. }), "{e}");
}

/// Replies that arrive after their caller gave up must not be taken as the answer
/// to a later command: a sync answered late (agent stopped with SIGSTOP), and a
/// command whose reply we stopped waiting for at once.
#[tokio::test(flavor = "current_thread")]
async fn stale_replies_are_discarded() {
    let a = agent();
    let mut q = Qga::new(&a.sock);
    q.set_sync_timeout(Duration::from_millis(300));
    q.ping(T).await.unwrap();
    let pid = a.child.id() as i32;
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let e = q.host_name(T).await.unwrap_err();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    assert!(matches!(e, QgaError::Unavailable(_)), "{e}");
    // The agent now answers the old sync (and runs nothing else we sent).
    q.set_sync_timeout(T);
    // An 8 MiB read takes the agent far longer than 1 ms to answer (~11 MB of base64).
    let h = q.file_open("/dev/zero", "r", T).await.unwrap();
    let e = q
        .file_read(h, 8 << 20, Duration::from_millis(1))
        .await
        .unwrap_err();
    assert!(matches!(e, QgaError::Timeout { .. }), "{e}");
    // The late read reply is in flight or buffered; the next answers must be right.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(q.host_name(T).await.unwrap(), host.trim());
    let now = q.get_time(T).await.unwrap();
    assert!(now > 1_600_000_000_000_000_000, "{now}");
    q.ping(T).await.unwrap();
}

/// QEMU's agent socket with no agent in the guest (the guest never runs: -S).
#[tokio::test(flavor = "current_thread")]
async fn unavailable_without_agent() {
    let q = Qga::new("/nonexistent/dir/qga.sock");
    assert!(matches!(q.ping(T).await, Err(QgaError::Unavailable(_))));

    let dir = tempfile::Builder::new().prefix("fvqga").tempdir().unwrap();
    let sock = dir.path().join("qga.sock");
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-accel",
            "tcg",
        ])
        .args(["-M", "pc", "-m", "32", "-S", "-device", "virtio-serial"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=qga0,path={},server=on,wait=off",
            sock.display()
        ))
        .args([
            "-device",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ])
        .stdin(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 must be installed");
    let _g = Proc {
        child,
        dir,
        sock: sock.clone(),
    };
    wait_for_socket(&sock);
    let mut q = Qga::new(&sock);
    q.set_sync_timeout(Duration::from_millis(300));
    let e = q.ping(T).await.unwrap_err();
    assert!(matches!(e, QgaError::Unavailable(_)), "{e}");
}
