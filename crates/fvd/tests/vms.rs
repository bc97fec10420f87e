//! VMs under real fv-worker + QEMU (TCG) processes driven through fvd's API.
mod common;
use common::*;
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;

fn id_of(v: &Value) -> String {
    v["id"].as_str().unwrap().to_string()
}

fn qemu_pid(f: &Fvd, id: &str) -> u32 {
    let v = f.vm(id);
    v["qemu_pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no qemu pid: {v}")) as u32
}

/// A diskless VM: SeaBIOS finds nothing to boot, which is all these tests need.
fn bare_vm(f: &Fvd, name: &str, extra: Value) -> String {
    let mut body = json!({"name": name, "generation": "1", "memory_mib": 64});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    id_of(&f.new_vm(body))
}

fn console(v: &Value) -> Console {
    Console::connect(std::path::Path::new(v["com_sockets"][0].as_str().unwrap()))
}

/// Start, pause/resume, save, SIGKILL fvd, restart it: still Saved; start restores
/// (RAM contents and the guest clock continue). The guest has no disk here: QEMU
/// cannot migrate (save) a VM whose disks are vhost-user back-ends without
/// VHOST_USER_PROTOCOL_F_LOG_SHMFD, which the worker's disk server lacks so far.
#[test]
fn guest_lifecycle_save_survives_fvd_kill_and_restore_continues() {
    let mut f = Fvd::start();
    let (mut body, _) = guest_vm_body("life", f.state.path());
    body["hard_drives"] = json!([]);
    let id = id_of(&f.new_vm(body));
    f.action_ok(&id, "start", None);
    assert_eq!(f.vm(&id)["state"], "Running");
    let v = f.wait_vm(&id, BOOT_TIMEOUT, |v| v["guest_ready"] == true);
    // The accelerator the host detection chose (KVM where it works, TCG here).
    let host = f.ok("GET", "/host", None);
    assert_eq!(v["accel"], host["accel"], "{host}");
    let mut con = console(&v);
    assert_eq!(
        con.run("a", "echo alive", Duration::from_secs(120)).trim(),
        "alive"
    );

    f.action_ok(&id, "pause", None);
    assert_eq!(f.vm(&id)["state"], "Paused");
    let (s, e) = f.req("POST", &format!("/vms/{id}/actions/pause"), None);
    assert_eq!((s, e["state"].as_str()), (409, Some("Paused")), "{e}");
    f.action_ok(&id, "resume", None);
    assert_eq!(f.vm(&id)["state"], "Running");
    // Hardware changes while running are refused with the state.
    let (s, e) = f.req(
        "PATCH",
        &format!("/vms/{id}"),
        Some(json!({"memory_mib": 512})),
    );
    assert_eq!((s, e["state"].as_str()), (409, Some("Running")), "{e}");

    // RAM-only guest state and the guest clock.
    let token = format!("tok{}", std::process::id());
    con.run(
        "w",
        &format!("echo {token} > /tmp/fvd-token; cat /tmp/fvd-token"),
        Duration::from_secs(120),
    );
    let up1: f64 = con
        .run("u1", "cut -d' ' -f1 /proc/uptime", Duration::from_secs(120))
        .trim()
        .parse()
        .unwrap();
    drop(con);

    f.action_ok(&id, "save", None);
    let v = f.vm(&id);
    assert_eq!(v["state"], "Saved");
    assert_eq!(v["has_saved_state"], true);

    // fvd dies hard; the registry and the saved state do not.
    f.restart_after_kill9();
    let v = f.vm(&id);
    assert_eq!(v["state"], "Saved", "{v}");
    assert_eq!(v["has_saved_state"], true);

    f.action_ok(&id, "start", None);
    let v = f.vm(&id);
    assert_eq!(v["state"], "Running");
    assert_eq!(v["has_saved_state"], false, "restored state is consumed");
    let mut con = console(&v);
    let got = con.run("r", "cat /tmp/fvd-token", Duration::from_secs(300));
    assert_eq!(
        got.trim(),
        token,
        "RAM state must come back from the saved state"
    );
    let up2: f64 = con
        .run("u2", "cut -d' ' -f1 /proc/uptime", Duration::from_secs(120))
        .trim()
        .parse()
        .unwrap();
    assert!(
        up2 >= up1,
        "guest uptime went back: {up1} -> {up2} (cold boot instead of restore?)"
    );
    println!("guest uptime before save {up1:.1} s, after restore {up2:.1} s");
    drop(con);
    f.action_ok(&id, "stop", Some(json!({"mode": "turn_off"})));
    assert_eq!(f.vm(&id)["state"], "Off");
}

/// The guest writes to its VHDX data disk; after a graceful shut down through the
/// guest the file holds the data (read back with qemu-img + debugfs).
#[test]
fn guest_writes_land_in_the_vhdx() {
    let f = Fvd::start();
    let (body, disk) = guest_vm_body("disk", f.state.path());
    let id = id_of(&f.new_vm(body));
    f.action_ok(&id, "start", None);
    let v = f.wait_vm(&id, BOOT_TIMEOUT, |v| v["guest_ready"] == true);
    let mut con = console(&v);
    let seed = con.run(
        "h",
        &format!("cat /data/{}", fv_guest_template::SEED_FILE),
        Duration::from_secs(120),
    );
    assert_eq!(seed.trim(), fv_guest_template::SEED_CONTENT.trim());
    con.run(
        "d",
        "echo written-by-guest > /data/fvd-proof; sync; cat /data/fvd-proof",
        Duration::from_secs(120),
    );
    drop(con);

    let j = f.action(
        &id,
        "stop",
        Some(json!({"mode": "shut_down", "force": true})),
    );
    assert_eq!(j["state"], "completed", "{j}\n{}", f.log());
    assert_eq!(f.vm(&id)["state"], "Off");

    let out = Command::new("qemu-img")
        .args(["check", "-f", "vhdx"])
        .arg(&disk)
        .output()
        .expect("qemu-img is required");
    assert!(
        out.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let raw = f.state.path().join("check.raw");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "vhdx", "-O", "raw"])
        .arg(&disk)
        .arg(&raw)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img convert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("debugfs")
        .arg("-R")
        .arg("cat /fvd-proof")
        .arg(&raw)
        .output()
        .expect("debugfs (e2fsprogs) is required");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "written-by-guest",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn running_vm_survives_fvd_kill_and_is_reattached() {
    let mut f = Fvd::start();
    let id = bare_vm(&f, "keep", json!({}));
    f.action_ok(&id, "start", None);
    let q1 = qemu_pid(&f, &id);
    f.restart_after_kill9();
    let v = f.vm(&id);
    assert_eq!(v["state"], "Running", "{v}");
    assert_eq!(qemu_pid(&f, &id), q1, "same QEMU after fvd restart");
    let ev = f.ok("GET", &format!("/events?vm={id}"), None);
    assert!(
        ev.as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "vm.reattached"),
        "{ev}"
    );
    // The new fvd controls it.
    f.action_ok(&id, "pause", None);
    f.action_ok(&id, "stop", Some(json!({"mode": "turn_off"})));
    assert_eq!(f.vm(&id)["state"], "Off");
    f.wait_vm(&id, Duration::from_secs(30), |_| {
        !std::path::Path::new(&format!("/proc/{q1}")).exists()
    });
}

#[test]
fn cpu_reserve_admission_counts_running_vms() {
    let f = Fvd::start();
    let cpus = f.ok("GET", "/host", None)["logical_cpus"].as_u64().unwrap();
    // Capacity of exactly one logical processor, whatever the host.
    let pool = 100 / cpus;
    f.ok(
        "PATCH",
        "/host",
        Some(json!({"cpu_reserve_pool_percent": pool})),
    );
    let cap = pool * cpus;
    let cpu = |r: u64| json!({"cpu": {"count": 1, "reserve_percent": r, "limit_percent": 100, "weight": 100}});
    let a = bare_vm(&f, "a", cpu(60));
    let b = bare_vm(&f, "b", cpu(cap - 60 + 10));
    f.action_ok(&a, "start", None);
    let (s, e) = f.req("POST", &format!("/vms/{b}/actions/start"), None);
    assert_eq!(s, 409, "{e}");
    assert_eq!(e["code"], "admission_refused");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains(&format!("only {}% is left", cap - 60)),
        "{e}"
    );
    assert_eq!(f.ok("GET", "/host", None)["cpu_reserved_percent"], 60);
    f.action_ok(&a, "stop", Some(json!({"mode": "turn_off"})));
    f.action_ok(&b, "start", None);
    // cgroup v1/v2 limits were applied to the worker's cgroup.
    let cg = fvd::host::Cgroups::detect();
    assert!(
        cg.procs(&b).contains(&qemu_pid(&f, &b)),
        "QEMU runs in the VM's cgroup"
    );
    f.action_ok(&b, "stop", Some(json!({"mode": "turn_off"})));
}

#[test]
fn mac_pool_exhaustion_and_reuse_after_delete() {
    let f = Fvd::start();
    let start = format!("00:15:5D:F0:{:02X}:00", std::process::id() % 256);
    f.ok(
        "PATCH",
        "/host",
        Some(json!({"mac_pool_size": 1, "mac_pool_start": start})),
    );
    let nic = json!({"network_adapters": [{"connection": {"type": "not_connected"}}]});
    let a = bare_vm(&f, "a", nic.clone());
    let b = bare_vm(&f, "b", nic);
    assert_eq!(
        f.vm(&a)["config"]["network_adapters"][0]["dynamic_mac"],
        Value::Null,
        "assigned at first start"
    );
    f.action_ok(&a, "start", None);
    assert_eq!(
        f.vm(&a)["config"]["network_adapters"][0]["dynamic_mac"],
        start.as_str()
    );
    let (s, e) = f.req("POST", &format!("/vms/{b}/actions/start"), None);
    assert_eq!(
        (s, e["code"].as_str()),
        (409, Some("mac_pool_exhausted")),
        "{e}"
    );
    // Turning off keeps the MAC; the pool stays exhausted.
    f.action_ok(&a, "stop", Some(json!({"mode": "turn_off"})));
    assert_eq!(
        f.vm(&a)["config"]["network_adapters"][0]["dynamic_mac"],
        start.as_str()
    );
    assert_eq!(
        f.req("POST", &format!("/vms/{b}/actions/start"), None).0,
        409
    );
    // Removing a running VM is refused; removing an Off one frees its MAC.
    assert_eq!(
        f.req("DELETE", &format!("/vms/{a}?delete_files=true"), None)
            .0,
        204
    );
    f.action_ok(&b, "start", None);
    assert_eq!(
        f.vm(&b)["config"]["network_adapters"][0]["dynamic_mac"],
        start.as_str()
    );
    let (s, e) = f.req("DELETE", &format!("/vms/{b}"), None);
    assert_eq!((s, e["state"].as_str()), (409, Some("Running")), "{e}");
    f.action_ok(&b, "stop", Some(json!({"mode": "turn_off"})));
}

#[test]
fn qemu_crash_is_critical_then_recovered_once() {
    let f = Fvd::start();
    let id = bare_vm(&f, "crashy", json!({}));
    f.action_ok(&id, "start", None);
    let q1 = qemu_pid(&f, &id);
    fvd::util::kill(q1, nix::sys::signal::Signal::SIGKILL);
    // Recovery policy restart_once: Critical, then started again by fvd.
    let v = f.wait_vm(&id, Duration::from_secs(120), |v| {
        v["state"] == "Running" && v["qemu_pid"].as_u64().is_some_and(|p| p as u32 != q1)
    });
    let ev = f.ok("GET", &format!("/events?vm={id}"), None);
    assert!(
        ev.as_array()
            .unwrap()
            .iter()
            .any(|e| e["state"] == "Critical"),
        "the crash must be reported as Critical: {ev}"
    );
    let jobs = f.ok("GET", "/jobs", None);
    assert!(
        jobs.as_array()
            .unwrap()
            .iter()
            .any(|j| j["detail"] == "automatic recovery after a crash"),
        "{jobs}"
    );
    // A second crash soon after stays Critical with the cause.
    let q2 = v["qemu_pid"].as_u64().unwrap() as u32;
    fvd::util::kill(q2, nix::sys::signal::Signal::SIGKILL);
    let v = f.wait_vm(&id, Duration::from_secs(120), |v| {
        v["state"] == "Critical" && v["worker_pid"].is_null()
    });
    assert!(!v["state_reason"].as_str().unwrap_or("").is_empty(), "{v}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(f.vm(&id)["state"], "Critical", "restarted only once");
    // Critical VMs can be started again by hand.
    f.action_ok(&id, "start", None);
    f.action_ok(&id, "stop", Some(json!({"mode": "turn_off"})));
}

#[test]
fn host_shutdown_applies_stop_actions_and_start_actions_bring_vms_back() {
    let mut f = Fvd::start();
    let a = bare_vm(&f, "a", json!({}));
    let b = bare_vm(
        &f,
        "b",
        json!({"automatic_stop_action": "turn_off", "automatic_start_action": "nothing"}),
    );
    f.action_ok(&a, "start", None);
    f.action_ok(&b, "start", None);
    let (s, j) = f.req("POST", "/host/actions/shutdown", None);
    assert_eq!(s, 202, "{j}");
    assert!(
        f.wait_exit(Duration::from_secs(300)),
        "fvd did not exit after the host shutdown"
    );
    f.spawn();
    let j = f.ok("GET", &format!("/jobs/{}", j["id"].as_str().unwrap()), None);
    assert_eq!(j["state"], "completed", "{j}");
    assert_eq!(
        f.vm(&b)["state"],
        "Off",
        "turn_off stop action, start action nothing"
    );
    // a: saved by its stop action, then started again (restored) by "start if it was running".
    let v = f.wait_vm(&a, Duration::from_secs(300), |v| v["state"] == "Running");
    assert_eq!(v["has_saved_state"], false);
    let jobs = f.ok("GET", "/jobs", None);
    let detail: Vec<&str> = jobs
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|j| j["detail"].as_str())
        .collect();
    assert!(
        detail.contains(&"automatic stop action") && detail.contains(&"automatic start"),
        "{detail:?}"
    );
    f.action_ok(&a, "stop", Some(json!({"mode": "turn_off"})));
}

#[test]
fn shut_down_times_out_or_is_cancelled_and_the_vm_keeps_running() {
    // SeaBIOS with nothing to boot ignores ACPI power button presses.
    let f = Fvd::start();
    let id = bare_vm(&f, "stubborn", json!({}));
    f.action_ok(&id, "start", None);
    f.ok("PATCH", "/host", Some(json!({"shutdown_timeout_s": 2})));
    let j = f.action(&id, "stop", None);
    assert_eq!(
        (j["state"].as_str(), j["error_code"].as_str()),
        (Some("failed"), Some("shutdown_timed_out")),
        "{j}"
    );
    assert_eq!(f.vm(&id)["state"], "Running");
    f.ok("PATCH", "/host", Some(json!({"shutdown_timeout_s": 600})));
    let (s, j) = f.req(
        "POST",
        &format!("/vms/{id}/actions/stop"),
        Some(json!({"mode": "shut_down"})),
    );
    assert_eq!(s, 202);
    assert_eq!(j["cancellable"], true);
    let c = f.ok(
        "POST",
        &format!("/jobs/{}/cancel", j["id"].as_str().unwrap()),
        None,
    );
    assert_eq!(c["state"], "cancelled", "{c}");
    // The worker may still wait for the guest (Stopping) until its own timeout.
    let st = f.vm(&id)["state"].as_str().unwrap().to_string();
    assert!(st == "Running" || st == "Stopping", "{st}");
    // A finished job cannot be cancelled.
    let (s, e) = f.req(
        "POST",
        &format!("/jobs/{}/cancel", j["id"].as_str().unwrap()),
        None,
    );
    assert_eq!(
        (s, e["operation"].as_str()),
        (409, Some("job.cancel")),
        "{e}"
    );
    // --force turns off after the timeout.
    f.ok("PATCH", "/host", Some(json!({"shutdown_timeout_s": 2})));
    f.action_ok(
        &id,
        "stop",
        Some(json!({"mode": "shut_down", "force": true})),
    );
    assert_eq!(f.vm(&id)["state"], "Off");
}

/// Fill `mib` MiB of guest RAM (tmpfs) with random data so a save has work to do.
fn dirty_guest_memory(con: &mut Console, mib: u32) {
    let out = con.run(
        "fill",
        &format!(
            "dd if=/dev/urandom of=/dev/shm/fill bs=1M count={mib} 2>/dev/null; du -m /dev/shm/fill | cut -f1"
        ),
        Duration::from_secs(600),
    );
    assert_eq!(out.trim(), mib.to_string());
}

/// fvd is SIGKILLed while a (deliberately slow) save runs; the worker finishes the
/// save while fvd is down and leaves its result. The restarted fvd reports the VM
/// Saved and the job completed, and the next start restores that saved state.
#[test]
fn fvd_killed_during_save_takes_the_workers_real_outcome() {
    let mut f = Fvd::start_env(&[("FV_WORKER_SAVE_MAX_BANDWIDTH", "4000000")]);
    let (mut body, _) = guest_vm_body("killsave", f.state.path());
    body["hard_drives"] = json!([]);
    let id = id_of(&f.new_vm(body));
    f.action_ok(&id, "start", None);
    let v = f.wait_vm(&id, BOOT_TIMEOUT, |v| v["guest_ready"] == true);
    let mut con = console(&v);
    let token = format!("ks{}", std::process::id());
    con.run(
        "w",
        &format!("echo {token} > /tmp/fvd-token; cat /tmp/fvd-token"),
        Duration::from_secs(120),
    );
    dirty_guest_memory(&mut con, 60);
    drop(con);

    let (s, job) = f.req("POST", &format!("/vms/{id}/actions/save"), None);
    assert_eq!(s, 202, "{job}");
    assert_eq!(job["cancellable"], true);
    let jid = job["id"].as_str().unwrap().to_string();
    // Kill fvd once the migration is under way.
    let end = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        let j = f.ok("GET", &format!("/jobs/{jid}"), None);
        if j["percent_complete"].as_u64().unwrap_or(0) >= 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "save made no progress: {j}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(f.vm(&id)["state"], "Saving");
    f.kill9();
    // The worker carries on alone and leaves its outcome in its runtime dir.
    let result = f.run.path().join("vms").join(&id).join("result.json");
    let end = std::time::Instant::now() + Duration::from_secs(600);
    while !result.exists() {
        assert!(std::time::Instant::now() < end, "worker never finished");
        std::thread::sleep(Duration::from_millis(200));
    }
    let r: Value = serde_json::from_slice(&std::fs::read(&result).unwrap()).unwrap();
    assert_eq!(r["state"], "Saved", "{r}");

    f.spawn();
    let v = f.vm(&id);
    assert_eq!(v["state"], "Saved", "{v}\n{}", f.log());
    assert_eq!(v["has_saved_state"], true);
    let j = f.wait_job(&json!({"id": jid}));
    assert_eq!(j["state"], "completed", "{j}");

    f.action_ok(&id, "start", None);
    let v = f.vm(&id);
    let mut con = console(&v);
    let got = con.run("r", "cat /tmp/fvd-token", Duration::from_secs(300));
    assert_eq!(got.trim(), token, "the saved state was not used");
    drop(con);
    f.action_ok(&id, "stop", Some(json!({"mode": "turn_off"})));
}

/// Turn Off of a Saving VM through the API: the save job ends cancelled, the VM is
/// Off with no saved state and starts again.
#[test]
fn turn_off_of_a_saving_vm_leaves_a_startable_vm() {
    let f = Fvd::start_env(&[("FV_WORKER_SAVE_MAX_BANDWIDTH", "4000000")]);
    let (mut body, _) = guest_vm_body("offsave", f.state.path());
    body["hard_drives"] = json!([]);
    let id = id_of(&f.new_vm(body));
    f.action_ok(&id, "start", None);
    let v = f.wait_vm(&id, BOOT_TIMEOUT, |v| v["guest_ready"] == true);
    let mut con = console(&v);
    dirty_guest_memory(&mut con, 60);
    drop(con);
    let (s, job) = f.req("POST", &format!("/vms/{id}/actions/save"), None);
    assert_eq!(s, 202, "{job}");
    let jid = job["id"].as_str().unwrap().to_string();
    let end = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        let j = f.ok("GET", &format!("/jobs/{jid}"), None);
        if j["percent_complete"].as_u64().unwrap_or(0) >= 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "save made no progress: {j}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    f.action_ok(&id, "stop", Some(json!({"mode": "turn_off"})));
    let v = f.vm(&id);
    assert_eq!(v["state"], "Off", "{v}");
    assert_eq!(v["has_saved_state"], false);
    let j = f.wait_job(&json!({"id": jid}));
    assert_eq!(j["state"], "cancelled", "{j}");
    f.action_ok(&id, "start", None);
    assert_eq!(f.vm(&id)["state"], "Running");
    f.action_ok(&id, "stop", Some(json!({"mode": "turn_off"})));
}

/// fvd started with relative --state-dir/--runtime-dir makes them absolute: a VM
/// starts (QEMU gets absolute socket paths).
#[test]
fn relative_dirs_are_made_absolute() {
    let base = tempfile::Builder::new()
        .prefix("fvrel")
        .tempdir_in("/tmp")
        .unwrap();
    let log = std::fs::File::create(base.path().join("fvd.stderr")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fvd"))
        .args(["--state-dir", "st", "--runtime-dir", "rn"])
        .current_dir(base.path())
        .env("FV_WORKER_BIN", worker_bin())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let sock = base.path().join("rn/fvd.sock");
    let mut c = fvd::client::Client::new(&sock);
    c.timeout = Duration::from_secs(300);
    let end = std::time::Instant::now() + Duration::from_secs(60);
    while c.request("GET", "/host", None).ok().map(|r| r.status) != Some(200) {
        assert!(std::time::Instant::now() < end, "fvd did not answer");
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = c
        .request(
            "POST",
            "/vms",
            Some(&json!({"name": "rel", "generation": "1", "memory_mib": 64})),
        )
        .unwrap();
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["id"].as_str().unwrap().to_string();
    let run_job = |c: &fvd::client::Client, path: &str, body: Option<Value>| -> Value {
        let r = c.request("POST", path, body.as_ref()).unwrap();
        assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
        let jid = r.json()["id"].as_str().unwrap().to_string();
        loop {
            let j = c
                .request("GET", &format!("/jobs/{jid}?wait=30"), None)
                .unwrap()
                .json();
            if matches!(j["state"].as_str(), Some("completed" | "failed")) {
                return j;
            }
        }
    };
    let j = run_job(&c, &format!("/vms/{id}/actions/start"), None);
    let launch: Value = serde_json::from_slice(
        &std::fs::read(base.path().join(format!("rn/vms/{id}/launch.json"))).unwrap_or_default(),
    )
    .unwrap_or(Value::Null);
    let off = run_job(
        &c,
        &format!("/vms/{id}/actions/stop"),
        Some(json!({"mode": "turn_off"})),
    );
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(j["state"], "completed", "{j}");
    assert_eq!(off["state"], "completed", "{off}");
    let rt = launch["runtime_dir"].as_str().unwrap_or_default();
    assert!(
        rt.starts_with('/') && rt.ends_with(&format!("rn/vms/{id}")),
        "{launch}"
    );
}

/// A start that fails in QEMU says why (QEMU's own words) and keeps the logs.
#[test]
fn failed_start_quotes_qemu_and_keeps_the_logs() {
    let f = Fvd::start_env(&[("FV_WORKER_QEMU_EXTRA", "-fv-no-such-option")]);
    let id = bare_vm(&f, "badstart", json!({}));
    let j = f.action(&id, "start", None);
    assert_eq!(j["state"], "failed", "{j}");
    let msg = j["error_description"].as_str().unwrap_or_default();
    assert!(msg.contains("-fv-no-such-option"), "{msg}");
    assert!(!msg.contains("while starting: ("), "{msg}");
    let kept = f.state.path().join("vms").join(&id).join("last-failure");
    assert!(msg.contains(&kept.display().to_string()), "{msg}");
    let qlog = std::fs::read_to_string(kept.join("qemu.log")).unwrap();
    assert!(qlog.contains("-fv-no-such-option"), "{qlog}");
    assert!(kept.join("worker.log").exists());
    assert_eq!(f.vm(&id)["state"], "Off");
}
