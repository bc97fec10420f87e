//! The serial console through fvd's API (HTTP upgrade): typing and watching
//! (`vm.console.input`), watching only (`vm.console.output`), refusals, and the
//! `fv vm console` client, against a real guest.

mod common;
use common::*;
use serde_json::json;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn console_through_the_api() {
    let f = Fvd::start();
    let (body, _) = guest_vm_body("con", f.state.path());
    let v = f.new_vm(body);
    let id = v["id"].as_str().unwrap().to_string();

    // Off: refused with the state.
    let (status, body) = Console::via_api(&f.sock, &id, true).err().unwrap();
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("Off"), "{body}");

    f.action_ok(&id, "start", None);
    f.wait_vm(&id, BOOT_TIMEOUT, |v| v["guest_ready"] == true);

    // Not an upgrade: a plain request is told what to send.
    let (s, e) = f.req("POST", &format!("/vms/{id}/console"), None);
    assert_eq!(s, 400, "{e}");
    assert!(e["message"].as_str().unwrap().contains("Upgrade"), "{e}");

    // Watch only: what is typed there never reaches the guest.
    {
        let mut ro = Console::via_api(&f.sock, &id, false).unwrap();
        ro.send(b"touch /tmp/typed-while-watching\n");
        std::thread::sleep(Duration::from_secs(2));
    }
    // Give fvd a moment to drop its side, so COM1 (one client at a time) is free.
    std::thread::sleep(Duration::from_millis(500));
    let mut rw = Console::via_api(&f.sock, &id, true).unwrap();
    assert_eq!(
        rw.run("a", "echo alive", Duration::from_secs(60)).trim(),
        "alive"
    );
    let ls = rw.run(
        "b",
        "ls /tmp/typed-while-watching 2>&1",
        Duration::from_secs(60),
    );
    assert!(ls.contains("No such file"), "{ls}");
    drop(rw);
    std::thread::sleep(Duration::from_millis(500));

    // The CLI: stdin is typed into the guest, the guest's answer comes back.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "(sleep 1; printf 'echo cli-$((6*7))\\n'; sleep 3) | {} vm console {id}",
            fv_bin().display()
        ))
        .env("FV_SOCKET", &f.sock)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("cli-42"), "stdout: {stdout}");

    f.action_ok(&id, "stop", Some(json!({"mode": "turn_off"})));
}
