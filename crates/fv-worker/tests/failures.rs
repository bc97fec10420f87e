//! Turn off, QEMU crash -> Critical, and a worker surviving the SIGKILL of the
//! process group that launched it (as when fvd is killed).

mod common;
use common::*;
use fv_model::VmState;
use fv_worker_proto::Event;
use serde_json::json;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn survives_launcher_kill_then_turn_off() {
    let vm = gen1_vm("turnoff");
    let spec = vm.write_spec(None);
    // Launch from a shell in its own process group, as fvd would; the shell prints
    // the worker's pid and then waits, like a long-lived fvd.
    let mut launcher = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} --launch {} & echo $!; wait",
            env!("CARGO_BIN_EXE_fv-worker"),
            spec.display()
        ))
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(launcher.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let mut w = Worker::from_pid(line.trim().parse().unwrap(), vm.run_dir.path());
    let pgid = launcher.id() as i32;
    let mut c = w.connect();
    c.ok(json!({"op": "subscribe"}));
    if c.status()["state"] != "Running" {
        c.wait_state(VmState::Running, Duration::from_secs(120));
    }
    w.qemu_pid = c.status()["qemu_pid"].as_i64().unwrap() as i32;

    // SAFETY: kill(2) of the launcher's process group (the shell), which we created.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
    let _ = launcher.wait();
    std::thread::sleep(Duration::from_secs(1));
    assert!(w.alive(), "worker died with its launcher's process group");
    let mut c2 = w.connect();
    assert_eq!(c2.status()["state"], "Running");

    let mut console = Console::connect(&vm.sock("com1.sock"));
    console.wait_for("FERROVISOR-GUEST-READY", BOOT_TIMEOUT);
    // Both connections work at once; events go to the subscriber only.
    assert!(c2
        .call(json!({"op": "guest_ping"}), Duration::from_secs(60))
        .is_ok());
    console.run("s", "sync; echo synced", Duration::from_secs(120));

    c2.ok(json!({"op": "turn_off"}));
    c.wait_event(Duration::from_secs(60), |e| {
        matches!(e, Event::QemuExited { clean: true, .. })
    });
    c.wait_state(VmState::Off, Duration::from_secs(60));
    assert!(
        w.wait_exit(Duration::from_secs(60)),
        "worker did not exit after turn off"
    );
    assert!(!vm.sock("worker.sock").exists());
    assert!(!vm.sock("worker.pid").exists());
    // SAFETY: signal 0 only checks existence.
    assert_ne!(
        unsafe { libc::kill(w.qemu_pid, 0) },
        0,
        "QEMU still running"
    );
}

#[test]
fn qemu_crash_is_critical() {
    let vm = gen1_vm("crash");
    let mut w = vm.start(None);
    let mut c = w.connect();
    c.ok(json!({"op": "subscribe"}));
    if c.status()["state"] != "Running" {
        c.wait_state(VmState::Running, Duration::from_secs(120));
    }
    let qemu = c.status()["qemu_pid"].as_i64().unwrap() as i32;
    w.qemu_pid = qemu;
    // SAFETY: kill(2) of the QEMU our worker started.
    unsafe {
        libc::kill(qemu, libc::SIGKILL);
    }
    c.wait_event(Duration::from_secs(60), |e| {
        matches!(e, Event::QemuExited { clean: false, .. })
    });
    let ev = c.wait_event(Duration::from_secs(60), |e| {
        matches!(
            e,
            Event::StateChanged {
                state: VmState::Critical,
                ..
            }
        )
    });
    let Event::StateChanged { reason, .. } = ev else {
        unreachable!()
    };
    assert!(reason.unwrap_or_default().contains("unexpectedly"));
    // The worker keeps answering so fvd can read why...
    let st = c.status();
    assert_eq!(st["state"], "Critical");
    assert!(st["qemu_pid"].is_null());
    let e = c
        .call(json!({"op": "resume"}), Duration::from_secs(30))
        .unwrap_err();
    assert_eq!(e["code"], "invalid_state");
    assert!(e["message"].as_str().unwrap().contains("Critical"), "{e}");
    // ...and exits soon after that status was read.
    assert!(w.wait_exit(Duration::from_secs(30)), "worker lingered");
}

/// `qemu_uid`/`qemu_gid`: QEMU drops to another user and still reaches every socket.
#[test]
fn qemu_runs_as_unprivileged_user() {
    let vm = gen1_vm("runas");
    let mut spec = vm.spec(None);
    spec.qemu_uid = Some(65534);
    spec.qemu_gid = Some(65534);
    let p = vm.vm_dir.path().join("launch.json");
    std::fs::write(&p, serde_json::to_vec(&spec).unwrap()).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_fv-worker"))
        .arg("--launch")
        .arg(&p)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let mut w = Worker::from_pid(pid, vm.run_dir.path());
    w.child = Some(child);
    let mut c = w.connect();
    c.ok(json!({"op": "subscribe"}));
    if c.status()["state"] != "Running" {
        c.wait_state(VmState::Running, Duration::from_secs(120));
    }
    w.qemu_pid = c.status()["qemu_pid"].as_i64().unwrap() as i32;
    let st = std::fs::read_to_string(format!("/proc/{}/status", w.qemu_pid)).unwrap();
    let uid_line = st.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line.split_whitespace().skip(1).all(|u| u == "65534"),
        "{uid_line}"
    );
    let console = Console::connect(&vm.sock("com1.sock"));
    console.wait_for("FERROVISOR-GUEST-READY", BOOT_TIMEOUT);
    assert!(c
        .call(json!({"op": "guest_ping"}), Duration::from_secs(60))
        .is_ok());
    c.ok(json!({"op": "turn_off"}));
    c.wait_state(VmState::Off, Duration::from_secs(60));
    assert!(w.wait_exit(Duration::from_secs(60)));
}
