//! Per-VM isolation: each VM's worker confines itself (and so its QEMU) to that
//! VM's files, and each QEMU runs under a uid of its own. One VM cannot open
//! another VM's disk even when file permissions alone would let it.

mod common;
use common::*;
use fv_model::{ControllerKind, VmState};
use serde_json::json;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

fn with_dvd(name: &str) -> Vm {
    let mut vm = gen1_vm(name);
    vm.config.dvd_drives.push(fv_model::DvdDrive {
        slot: fv_model::Slot {
            controller: ControllerKind::Ide,
            controller_number: 1,
            location: 0,
        },
        path: None,
    });
    // QEMU runs as another uid and must traverse the VM folder for its media.
    chmod(vm.vm_dir.path(), 0o755);
    vm
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Start a worker whose QEMU runs as `uid`, confined or not, with its runtime dir
/// `runtime` inside the shared runtime root `root` (as fvd lays them out); returns
/// once QEMU runs (media changes need QEMU, not a booted guest).
fn start(
    vm: &Vm,
    uid: u32,
    confine: bool,
    media_dir: &Path,
    root: &Path,
    runtime: &Path,
) -> (Worker, Client) {
    let mut spec = vm.spec(None);
    spec.qemu_uid = Some(uid);
    spec.qemu_gid = Some(uid);
    spec.confine = confine;
    spec.media_dirs = vec![media_dir.to_path_buf()];
    spec.runtime_dir = runtime.to_path_buf();
    spec.private_dirs = vec![root.to_path_buf(), "/run".into()];
    let p = vm.vm_dir.path().join("launch.json");
    std::fs::write(&p, serde_json::to_vec(&spec).unwrap()).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_fv-worker"))
        .arg("--launch")
        .arg(&p)
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut w = Worker::from_pid(child.id() as i32, runtime);
    w.child = Some(child);
    let mut c = w.connect();
    c.ok(json!({"op": "subscribe"}));
    if c.status()["state"] != "Running" {
        c.wait_state(VmState::Running, Duration::from_secs(120));
    }
    w.qemu_pid = c.status()["qemu_pid"].as_i64().unwrap() as i32;
    (w, c)
}

fn uid_of(pid: i32) -> String {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    st.lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string()
}

/// A field of /proc/PID/status, e.g. `Seccomp:`.
fn status_field(pid: i32, field: &str) -> String {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    st.lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// A capability set of /proc/PID/status (hex) as a bit mask.
fn cap_field(pid: i32, field: &str) -> u64 {
    let v = status_field(pid, field);
    u64::from_str_radix(&v, 16).unwrap_or_else(|e| panic!("{field} {v:?}: {e}"))
}

fn insert(c: &mut Client, path: &Path) -> Result<serde_json::Value, serde_json::Value> {
    c.call(
        json!({"op": "change_media", "dvd_index": 0, "path": path}),
        Duration::from_secs(30),
    )
}

#[test]
fn a_vm_cannot_open_another_vms_disk() {
    let media = tempfile::Builder::new()
        .prefix("fvw-media")
        .tempdir()
        .unwrap();
    chmod(media.path(), 0o755);
    let iso = media.path().join("shared.iso");
    std::fs::write(&iso, vec![0u8; 1 << 20]).unwrap();
    chmod(&iso, 0o644);

    let a = with_dvd("iso-a");
    let b = with_dvd("iso-b");
    // B's disk is world-readable and its folder traversable: plain permissions
    // would let A's QEMU (another uid) read it, so a refusal is the confinement's.
    let b_disk = b.vm_dir.path().join("boot.vhdx");
    chmod(&b_disk, 0o644);
    // A file of B's that B's worker does not hold open (its disk is image-locked
    // while B runs, so only this one can show that plain permissions allow it).
    let b_file = b.vm_dir.path().join("b-media.iso");
    std::fs::write(&b_file, vec![0u8; 1 << 20]).unwrap();
    chmod(&b_file, 0o644);
    let a_own = a.vm_dir.path().join("own.iso");
    std::fs::write(&a_own, vec![0u8; 1 << 20]).unwrap();
    chmod(&a_own, 0o644);

    // One runtime root for both, like fvd's <runtime>/vms/<id>, with a stand-in
    // for fvd's API socket beside them.
    let root = tempfile::Builder::new()
        .prefix("fvr")
        .tempdir_in("/tmp")
        .unwrap();
    let (ra, rb) = (root.path().join("a"), root.path().join("b"));
    std::os::unix::net::UnixListener::bind(root.path().join("fvd.sock")).unwrap();
    let (_wa, mut ca) = start(&a, 1_500_000_101, true, media.path(), root.path(), &ra);
    let (_wb, _cb) = start(&b, 1_500_000_102, true, media.path(), root.path(), &rb);
    // Distinct unprivileged uids per VM.
    let (ua, ub) = (uid_of(_wa.qemu_pid), uid_of(_wb.qemu_pid));
    assert_eq!(ua, "1500000101");
    assert_eq!(ub, "1500000102");
    // QEMU runs under its seccomp filter (mode 2) with no capabilities; the worker
    // keeps exactly the capabilities docs/architecture.md lists: chown (0),
    // dac_override (1), dac_read_search (2), fowner (3), kill (5), setgid (6),
    // setuid (7), net_admin (12), also in its bounding set.
    const WORKER_CAPS: u64 = 0b1_0000_1110_1111;
    for w in [&_wa, &_wb] {
        assert_eq!(
            status_field(w.qemu_pid, "Seccomp:"),
            "2",
            "QEMU without seccomp"
        );
        assert_eq!(
            cap_field(w.qemu_pid, "CapEff:"),
            0,
            "QEMU holds capabilities"
        );
        assert_eq!(cap_field(w.pid, "CapEff:"), WORKER_CAPS, "worker CapEff");
        assert_eq!(cap_field(w.pid, "CapBnd:"), WORKER_CAPS, "worker CapBnd");
    }

    // B's runtime dir (its QMP, agent, console and disk sockets) is closed to
    // everyone but B's QEMU uid (and root).
    let meta = std::fs::metadata(&rb).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(meta.uid(), 1_500_000_102);
    assert_eq!(meta.mode() & 0o777, 0o700);
    // And A (uid 0, so permissions would not stop it) does not even see them, nor
    // the API socket: in its mount namespace the runtime root holds only its own
    // dir. Seen through /proc/<pid>/root, i.e. A's own view of the file system.
    let view =
        |p: &Path| Path::new(&format!("/proc/{}/root", _wa.pid)).join(p.strip_prefix("/").unwrap());
    assert!(
        view(&ra.join("worker.sock")).exists(),
        "A lost its own sockets"
    );
    assert!(
        view(&ra.join("qmp.sock")).exists(),
        "A's QEMU lost its QMP socket"
    );
    assert!(!view(&rb).exists(), "A can see B's runtime dir");
    assert!(
        !view(&root.path().join("fvd.sock")).exists(),
        "A can see the API socket"
    );
    assert!(rb.join("worker.sock").exists() && root.path().join("fvd.sock").exists());

    // What A may use: media in its own folder and in the host's media folders.
    insert(&mut ca, &a_own).expect("own folder media");
    insert(&mut ca, &iso).expect("media folder");
    // What it may not: B's disk (and any other host file outside its grants).
    for p in [&b_disk, &b_file] {
        let e = insert(&mut ca, p).expect_err("A opened B's file");
        let msg = e["message"].as_str().unwrap_or_default();
        assert!(msg.contains("Permission denied"), "{}: {e}", p.display());
        assert!(msg.contains("media folders"), "{}: {e}", p.display());
    }
    ca.ok(json!({"op": "turn_off"}));
    ca.wait_state(VmState::Off, Duration::from_secs(60));
    let mut wa = _wa;
    assert!(wa.wait_exit(Duration::from_secs(60)), "worker A lingered");

    // Control: the same VM unconfined (same uid, same permissions) can open B's
    // file, so the refusal above came from the confinement, not from DAC.
    let (_wc, mut cc) = start(&a, 1_500_000_101, false, media.path(), root.path(), &ra);
    insert(&mut cc, &b_file).expect("unconfined worker should reach B's world-readable file");
    cc.ok(json!({"op": "turn_off"}));
    cc.wait_state(VmState::Off, Duration::from_secs(60));
}
