//! The `fv vm|job|host` verbs against a real fvd: output and exit codes
//! (2 usage, 3 refused, 1 failure).
mod common;
use common::*;
use std::process::Command;

#[test]
fn vm_verbs_tables_json_and_exit_codes() {
    let f = Fvd::start();
    let (c, out, err) = fv(
        &f,
        &[
            "vm",
            "new",
            "cli1",
            "--generation",
            "1",
            "--memory",
            "64",
            "--cpus",
            "1",
            "--nic",
            "none",
            "--notes",
            "hello",
        ],
    );
    assert_eq!(c, 0, "{out}{err}");
    assert!(out.contains("cli1") && out.contains("Off"), "{out}");
    let (c, out, _) = fv(&f, &["-o", "json", "vm", "list"]);
    assert_eq!(c, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["name"], "cli1");
    assert_eq!(v[0]["config"]["notes"], "hello");
    // Refusals exit 3 with one clear line naming the state.
    let (c, _, err) = fv(&f, &["vm", "pause", "cli1"]);
    assert_eq!(c, 3, "{err}");
    assert!(err.contains("vm.pause") && err.contains("Off"), "{err}");
    assert_eq!(fv(&f, &["vm", "show", "nope"]).0, 3);
    // Usage errors exit 2 (ours and fvd's 400s).
    assert_eq!(fv(&f, &["vm", "new", "x", "--generation", "3"]).0, 2);
    assert_eq!(fv(&f, &["vm", "set", "cli1", "--cpus", "0"]).0, 2);
    // Rename and settings.
    assert_eq!(fv(&f, &["vm", "rename", "cli1", "cli2"]).0, 0);
    let (c, out, _) = fv(
        &f,
        &["vm", "set", "cli2", "--memory", "96", "--weight", "300"],
    );
    assert_eq!(c, 0, "{out}");
    assert!(
        out.contains("96 MiB") && out.contains("weight 300"),
        "{out}"
    );
    let (c, out, _) = fv(&f, &["vm", "nic", "list", "cli2"]);
    assert_eq!(c, 0);
    assert!(out.contains("dynamic, at first start"), "{out}");
    let (c, out, _) = fv(&f, &["host", "show"]);
    assert_eq!(c, 0);
    assert!(out.contains("accelerator"), "{out}");
    assert_eq!(fv(&f, &["host", "set", "--mac-pool-size", "16"]).0, 0);
    let (c, out, _) = fv(&f, &["-o", "json", "host", "events"]);
    assert_eq!(c, 0);
    assert!(out.contains("vm.renamed"), "{out}");
    assert_eq!(fv(&f, &["vm", "remove", "cli2"]).0, 0);
    let (c, out, _) = fv(&f, &["-o", "json", "vm", "list"]);
    assert_eq!((c, out.trim()), (0, "[]"));
    // No fvd: a failure (1) that says where it looked.
    let dead = Fvd::start();
    let sock = dead.sock.clone();
    drop(dead);
    let o = Command::new(fv_bin())
        .args(["vm", "list"])
        .env("FV_SOCKET", &sock)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains(&sock.display().to_string()));
}
