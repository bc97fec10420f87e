//! Integration services through a real fvd (worker, QEMU TCG, the template's
//! qemu-guest-agent) and the real `fv` binary: key-value exchange in the VM view and
//! `fv vm show` (the guest's address on the VM's adapter), copy-file (refused while
//! guest services are off, enabled while running, a 3 MiB file arrives intact,
//! existing files need --overwrite), freeze/thaw, and a VM whose agent is gone:
//! heartbeat lost (an event, the VM keeps running) and application-consistent
//! operations unavailable.
mod common;
use common::*;
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};

fn sha256(path: &std::path::Path) -> String {
    let o = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn events(f: &Fvd, id: &str) -> Vec<Value> {
    f.ok("GET", &format!("/events?vm={id}"), None)
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn kvp_copy_file_freeze_and_lost_agent_through_fvd() {
    let t0 = Instant::now();
    let f = Fvd::start();
    let (body, _) = guest_vm_body("integ", f.state.path());
    let v = f.new_vm(body);
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(v["config"]["integration_services"]["guest_services"], false);
    assert_eq!(v["config"]["integration_services"]["heartbeat"], true);
    f.action_ok(&id, "start", None);

    // Key-value exchange: the guest's address on the VM's adapter (matched by MAC).
    let v = f.wait_vm(&id, BOOT_TIMEOUT, |v| {
        v["guest"]["adapters"].as_array().is_some_and(|a| {
            a.iter()
                .any(|x| x["ipv4"].as_array().is_some_and(|i| !i.is_empty()))
        })
    });
    let mac = v["config"]["network_adapters"][0]["dynamic_mac"]
        .as_str()
        .unwrap()
        .to_ascii_lowercase();
    let a = v["guest"]["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["mac"].as_str() == Some(mac.as_str()))
        .unwrap_or_else(|| panic!("no guest adapter with MAC {mac}: {}", v["guest"]));
    assert_eq!(a["ipv4"], json!(["10.0.2.15"]));
    assert!(v["guest"]["os_name"]
        .as_str()
        .unwrap()
        .contains("Ferrovisor"));
    assert!(!v["guest"]["kernel_release"].as_str().unwrap().is_empty());
    let (c, out, err) = fv(&f, &["vm", "show", "integ"]);
    assert_eq!(c, 0, "{err}");
    let ip_line = out
        .lines()
        .find(|l| l.starts_with("ip Network Adapter 1"))
        .unwrap_or_else(|| panic!("no address row in:\n{out}"));
    assert!(
        ip_line.contains("10.0.2.15") && ip_line.contains(&mac),
        "{ip_line}"
    );
    assert!(
        out.contains("guest os") && out.contains("Ferrovisor"),
        "{out}"
    );
    assert!(out.contains("heartbeat") && out.contains("ok"), "{out}");

    // Copy-file: refused while the guest services are off, with how to enable them.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("random.bin");
    let mut data = vec![0u8; 3 << 20];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut r| std::io::Read::read_exact(&mut r, &mut data))
        .unwrap();
    std::fs::write(&src, &data).unwrap();
    let src_s = src.to_str().unwrap();
    let dest = "/data/in/sub/random.bin";
    let (c, _, err) = fv(
        &f,
        &[
            "vm",
            "copy-file",
            "integ",
            src_s,
            dest,
            "--create-full-path",
        ],
    );
    assert_eq!(c, 3, "{err}");
    assert!(err.contains("--enable-integration guest_services"), "{err}");
    // Enabled while running (pushed to the worker).
    let (c, _, err) = fv(
        &f,
        &[
            "vm",
            "set",
            "integ",
            "--enable-integration",
            "guest_services",
        ],
    );
    assert_eq!(c, 0, "{err}");
    let t_copy = Instant::now();
    let (c, out, err) = fv(
        &f,
        &[
            "vm",
            "copy-file",
            "integ",
            src_s,
            dest,
            "--create-full-path",
            "-o",
            "json",
        ],
    );
    assert_eq!(c, 0, "{out}{err}\n{}", f.log());
    let job: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(job["operation"], "vm.copy_file");
    assert_eq!(job["state"], "completed");
    println!(
        "copy-file of 3 MiB: {:.1} s",
        t_copy.elapsed().as_secs_f64()
    );
    let v = f.vm(&id);
    let mut con = Console::connect(std::path::Path::new(v["com_sockets"][0].as_str().unwrap()));
    let guest_sum = con.run(
        "sum",
        &format!("sha256sum {dest} | cut -d' ' -f1"),
        Duration::from_secs(120),
    );
    assert_eq!(guest_sum.trim(), sha256(&src), "the copy differs");
    // An existing destination needs --overwrite.
    let (c, _, err) = fv(&f, &["vm", "copy-file", "integ", src_s, dest]);
    assert_eq!(c, 1, "{err}");
    assert!(err.contains("already exists"), "{err}");
    let (c, _, err) = fv(
        &f,
        &["vm", "copy-file", "integ", src_s, dest, "--overwrite"],
    );
    assert_eq!(c, 0, "{err}");
    // fvd's spool files are gone.
    let rt = f.run.path().join("vms").join(&id);
    let left: Vec<_> = std::fs::read_dir(&rt)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("copy-"))
        .collect();
    assert!(left.is_empty(), "spool files left: {left:?}");

    // Freeze and thaw through the CLI; recorded as events.
    let (c, out, err) = fv(
        &f,
        &["vm", "freeze", "integ", "--timeout", "60", "-o", "json"],
    );
    assert_eq!(c, 0, "{err}");
    let st: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["frozen"], true, "{st}");
    assert_eq!(f.vm(&id)["freeze"]["frozen"], true);
    let (c, out, err) = fv(&f, &["vm", "thaw", "integ", "-o", "json"]);
    assert_eq!(c, 0, "{err}");
    let st: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["frozen"], false, "{st}");
    // The first heartbeat answer may come up to one interval after guest-ready.
    f.wait_vm(&id, Duration::from_secs(30), |v| {
        v["heartbeat"]["status"] == "ok"
    });
    let kinds: Vec<String> = events(&f, &id)
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(kinds.iter().any(|k| k == "vm.frozen"), "{kinds:?}");
    assert!(kinds.iter().any(|k| k == "vm.thawed"), "{kinds:?}");
    assert!(kinds.iter().any(|k| k == "vm.heartbeat.ok"), "{kinds:?}");

    // Heartbeat withdrawn while running: health "disabled"; offered again: OK.
    let (c, _, err) = fv(
        &f,
        &["vm", "set", "integ", "--disable-integration", "heartbeat"],
    );
    assert_eq!(c, 0, "{err}");
    f.wait_vm(&id, Duration::from_secs(30), |v| {
        v["heartbeat"]["status"] == "disabled"
    });
    let (c, _, err) = fv(
        &f,
        &["vm", "set", "integ", "--enable-integration", "heartbeat"],
    );
    assert_eq!(c, 0, "{err}");
    f.wait_vm(&id, Duration::from_secs(30), |v| {
        v["heartbeat"]["status"] == "ok"
    });

    // The agent dies inside the guest: heartbeat lost (an event), VM still running,
    // application-consistent operations unavailable.
    let k = con.run(
        "k",
        "killall -9 qemu-ga; sleep 1; pidof qemu-ga || echo none",
        Duration::from_secs(60),
    );
    assert_eq!(k.trim(), "none");
    let v = f.wait_vm(&id, Duration::from_secs(90), |v| {
        v["heartbeat"]["status"] == "lost_communication"
    });
    assert_eq!(v["state"], "Running");
    assert!(v["heartbeat"]["last_answer"].as_u64().is_some());
    assert!(
        events(&f, &id)
            .iter()
            .any(|e| e["kind"] == "vm.heartbeat.lost"),
        "no vm.heartbeat.lost event"
    );
    let (s, e) = f.req(
        "POST",
        &format!("/vms/{id}/actions/freeze"),
        Some(json!({"timeout_s": 30})),
    );
    assert_eq!(s, 409, "{e}");
    assert_eq!(e["code"], "guest_agent_unavailable", "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("application-consistent operations are unavailable"),
        "{e}"
    );
    let (c, _, err) = fv(&f, &["vm", "freeze", "integ"]);
    assert_eq!(c, 3, "{err}");
    f.action_ok(&id, "stop", Some(json!({"mode": "turn_off"})));
    println!(
        "fvd integration services test: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
