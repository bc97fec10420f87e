//! Image locks under real VMs: a VHDX a running VM writes is nobody else's.
mod common;
use common::*;
use serde_json::{json, Value};
use std::time::Duration;

fn id_of(v: &Value) -> String {
    v["id"].as_str().unwrap().to_string()
}

fn worker_pid(f: &Fvd, id: &str) -> u32 {
    let p = f.run.path().join("vms").join(id).join("worker.pid");
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .parse()
        .unwrap()
}

/// VM A runs on a differencing VHDX (its parent the template's data disk). VM B,
/// given the same writable disk, fails to start with the holder named, and A keeps
/// running; `fv vhd merge|compact|set-parent` on A's disk are refused naming A's
/// worker.
#[test]
fn second_vm_on_a_running_vms_vhdx_and_merge_of_its_disk_are_refused() {
    let f = Fvd::start();
    let (mut body, base) = guest_vm_body("locka", f.state.path());
    let child = f.state.path().join("locka-child.vhdx");
    fv_vdisk::ops::create_differencing(&child, &base, 0).unwrap();
    body["hard_drives"][0]["path"] = json!(child);
    let a = id_of(&f.new_vm(body.clone()));
    f.action_ok(&a, "start", None);
    let v = f.wait_vm(&a, BOOT_TIMEOUT, |v| v["guest_ready"] == true);
    let holder = worker_pid(&f, &a);

    body["name"] = json!("lockb");
    let b = id_of(&f.new_vm(body));
    let j = f.action(&b, "start", None);
    let all = format!("{j} {}", f.vm(&b));
    assert_eq!(j["state"], "failed", "second start on a held disk: {all}");
    // B's worker is sandboxed (no access to other processes' /proc/PID/fd), so it
    // can say the disk is in use but not always by whom; when it names a pid, it
    // is A's worker.
    assert!(
        all.contains("in use by") && all.contains("locka-child.vhdx"),
        "the refusal does not say the disk is in use: {all}\n{}",
        f.log()
    );
    assert!(
        !all.contains("in use by pid") || all.contains(&format!("in use by pid {holder}")),
        "{all}"
    );
    assert_ne!(f.vm(&b)["state"], "Running");

    // A is untouched: still running, its guest answers.
    assert_eq!(f.vm(&a)["state"], "Running");
    let mut con = Console::connect(std::path::Path::new(v["com_sockets"][0].as_str().unwrap()));
    let out = con.run(
        "l",
        "echo still-here > /data/lock-proof; sync; cat /data/lock-proof",
        Duration::from_secs(120),
    );
    assert_eq!(out.trim(), "still-here");
    drop(con);

    let before = std::fs::metadata(&child).unwrap().len();
    let c = child.to_str().unwrap();
    let pb = base.to_str().unwrap();
    for args in [
        &["vhd", "merge", c, "--into-parent"][..],
        &["vhd", "compact", c][..],
        &["vhd", "set-parent", c, pb][..],
    ] {
        let (code, out, err) = fv(&f, args);
        assert_eq!(code, 3, "{args:?} on a running VM's disk: {out}{err}");
        assert!(
            err.contains("in use by") && err.contains(&format!("pid {holder}")),
            "{args:?}: holder not named: {err}"
        );
    }
    assert!(child.exists(), "merge removed the running VM's disk");
    assert!(std::fs::metadata(&child).unwrap().len() >= before);
    assert_eq!(f.vm(&a)["state"], "Running");

    // Once A is off, its disk is free again: merge works.
    f.action_ok(&a, "stop", Some(json!({"mode": "turn_off"})));
    let (code, out, err) = fv(&f, &["vhd", "merge", c, "--into-parent"]);
    assert_eq!(code, 0, "merge after the VM stopped: {out}{err}");
    assert!(!child.exists());
}
