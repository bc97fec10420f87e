//! Integration services against a real guest (template kernel, TCG) and its real
//! qemu-guest-agent: heartbeat (lost when the agent is killed inside the guest, back
//! when it restarts), key-value exchange both ways, freeze/thaw (a writer blocks
//! until thaw; the deadline thaws by itself; withdrawn backup is refused), graceful
//! shutdown through the agent, and time synchronisation after restore and after a
//! long pause (with a control run where the withdrawn service leaves the clock off).

mod common;
use common::*;
use fv_model::api::HeartbeatStatus;
use fv_model::VmState;
use fv_worker_proto::{Event, IntegrationTuning};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const MAC: &str = "00:15:5d:12:34:56";

fn tuning() -> IntegrationTuning {
    IntegrationTuning {
        heartbeat_interval_ms: 1000,
        heartbeat_timeout_ms: 1000,
        heartbeat_misses: 2,
        kvp_interval_ms: 2000,
        time_sync_after_pause_ms: 2000,
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Start a worker with shortened integration timings and a known host name.
fn start(vm: &Vm, restore_from: Option<PathBuf>) -> Worker {
    let mut spec = vm.spec(restore_from);
    spec.integration_tuning = tuning();
    spec.host_name = "fv-test-host".into();
    let p = vm.vm_dir.path().join("launch.json");
    std::fs::write(&p, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_fv-worker"))
        .arg("--launch")
        .arg(&p)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    Worker {
        pid: child.id() as i32,
        child: Some(child),
        qemu_pid: 0,
        run_dir: vm.run_dir.path().to_path_buf(),
    }
}

fn boot(vm: &Vm, restore_from: Option<PathBuf>) -> (Worker, Client, Console) {
    let restoring = restore_from.is_some();
    let mut w = start(vm, restore_from);
    let mut c = w.connect();
    c.ok(json!({"op": "subscribe"}));
    let console = Console::connect(&vm.sock("com1.sock"));
    if c.status()["state"] != "Running" {
        c.wait_state(VmState::Running, Duration::from_secs(600));
    }
    w.qemu_pid = c.status()["qemu_pid"].as_i64().unwrap() as i32;
    if !restoring {
        console.wait_for(fv_guest_template::READY_MARKER, BOOT_TIMEOUT);
    }
    (w, c, console)
}

/// Poll the worker's status until `f` holds.
fn wait_status(c: &mut Client, within: Duration, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let end = Instant::now() + within;
    loop {
        let st = c.status();
        if f(&st) {
            return st;
        }
        assert!(Instant::now() < end, "{what}: never seen; last status {st}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn guest_clock(console: &mut Console, tag: &str) -> i64 {
    let out = console.run(tag, "date +%s", Duration::from_secs(120));
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("bad guest date {out:?}"))
}

/// Set the guest clock `back_s` seconds behind the host, from the console (as if the
/// saved state had been made that long ago).
fn set_guest_clock_back(console: &mut Console, tag: &str, back_s: u64) {
    let t = now_s() - back_s;
    let fmt = Command::new("date")
        .args(["-u", "-d", &format!("@{t}"), "+%Y-%m-%d %H:%M:%S"])
        .output()
        .unwrap();
    let when = String::from_utf8(fmt.stdout).unwrap();
    console.run(
        tag,
        &format!("date -u -s '{}' >/dev/null; date +%s", when.trim()),
        Duration::from_secs(120),
    );
    let off = guest_clock(console, &format!("{tag}c")) - now_s() as i64;
    assert!(
        (off + back_s as i64).abs() < 30,
        "guest clock not set back: offset {off}"
    );
}

#[test]
fn heartbeat_kvp_freeze_and_agent_shutdown() {
    let t0 = Instant::now();
    let vm = gen1_vm("integ-hb");
    let (mut w, mut c, mut console) = boot(&vm, None);

    // Heartbeat: OK with a recent answer.
    let st = wait_status(&mut c, Duration::from_secs(60), "heartbeat ok", |s| {
        s["heartbeat"]["status"] == "ok"
    });
    let last = st["heartbeat"]["last_answer"].as_u64().unwrap();
    assert!(now_s().abs_diff(last) < 10, "stale last_answer {last}");
    assert_eq!(st["integration_services"]["guest_services"], false);

    // Key-value exchange, guest to host: OS, kernel, hostname, the adapter's address.
    let st = wait_status(&mut c, Duration::from_secs(60), "guest KVP", |s| {
        s["guest"]["adapters"].as_array().is_some_and(|a| {
            a.iter()
                .any(|x| x["mac"] == MAC && x["ipv4"].as_array().is_some_and(|v| !v.is_empty()))
        })
    });
    let g = &st["guest"];
    let nic = g["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["mac"] == MAC)
        .unwrap();
    assert_eq!(nic["ipv4"], json!(["10.0.2.15"]), "{g}");
    assert!(g["os_name"].as_str().unwrap().contains("Ferrovisor"), "{g}");
    assert!(!g["kernel_release"].as_str().unwrap().is_empty(), "{g}");
    assert_eq!(g["hostname"], "fvguest", "{g}");

    // Host to guest: Hyper-V's pool file with host name, VM name and VM id.
    let id = vm.config.id.to_string().to_uppercase();
    let end = Instant::now() + Duration::from_secs(60);
    let pool = loop {
        let p = console.run(
            "kvp",
            "tr '\\0' '\\n' < /var/lib/hyperv/.kvp_pool_3 2>/dev/null | grep -v '^$' | tr '\\n' ' '",
            Duration::from_secs(60),
        );
        if p.contains(&id) || Instant::now() > end {
            break p;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(pool.contains("VirtualMachineName integ-hb"), "{pool}");
    assert!(pool.contains(&format!("VirtualMachineId {id}")), "{pool}");
    assert!(pool.contains("HostName fv-test-host"), "{pool}");

    // Freeze blocks a writer in the guest until thaw.
    let r = c.ok(json!({"op": "freeze", "timeout_s": 120}));
    assert!(r["filesystems"].as_u64().unwrap() >= 1, "{r}");
    assert_eq!(c.ok(json!({"op": "freeze_status"}))["frozen"], true);
    let e = c
        .call(
            json!({"op": "freeze", "timeout_s": 10}),
            Duration::from_secs(30),
        )
        .unwrap_err();
    assert_eq!(e["code"], "invalid_state", "{e}");
    let mark = console.text().len();
    // The typed line spells the marker with quotes, so only the output matches.
    console.run_nowait("(echo x > /data/frozen-write; sync; echo WRITE-\"DONE\") &");
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        !console.text()[mark..].contains("WRITE-DONE"),
        "the write completed while frozen"
    );
    let r = c.ok(json!({"op": "thaw"}));
    assert!(r["filesystems"].as_u64().unwrap() >= 1, "{r}");
    console.wait_for("WRITE-DONE", Duration::from_secs(60));
    c.wait_event(
        Duration::from_secs(10),
        |e| matches!(e, Event::Thawed { reason, .. } if reason == "requested"),
    );

    // A freeze nobody thaws ends at its deadline.
    let t_freeze = Instant::now();
    c.ok(json!({"op": "freeze", "timeout_s": 3}));
    c.wait_event(
        Duration::from_secs(30),
        |e| matches!(e, Event::Thawed { reason, .. } if reason == "timeout"),
    );
    assert!(t_freeze.elapsed() >= Duration::from_secs(3));
    assert_eq!(c.ok(json!({"op": "freeze_status"}))["frozen"], false);
    let d = console.run(
        "w2",
        "echo y > /data/after-deadline; sync; cat /data/after-deadline",
        Duration::from_secs(60),
    );
    assert_eq!(d.trim(), "y");

    // Backup withdrawn: application-consistent operations are unavailable.
    let mut services = vm.config.integration_services;
    services.backup = false;
    c.ok(json!({"op": "set_integration", "services": services}));
    let e = c
        .call(
            json!({"op": "freeze", "timeout_s": 10}),
            Duration::from_secs(30),
        )
        .unwrap_err();
    assert_eq!(e["code"], "guest_agent_unavailable", "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("application-consistent operations are unavailable"),
        "{e}"
    );
    services.backup = true;
    c.ok(json!({"op": "set_integration", "services": services}));

    // Heartbeat loss: kill the agent inside the guest. Reported, VM untouched.
    let k = console.run(
        "k",
        "killall -9 qemu-ga; sleep 1; pidof qemu-ga || echo none",
        Duration::from_secs(60),
    );
    assert_eq!(k.trim(), "none");
    let ev = c.wait_event(Duration::from_secs(60), |e| {
        matches!(
            e,
            Event::HeartbeatChanged {
                status: HeartbeatStatus::LostCommunication,
                ..
            }
        )
    });
    println!("heartbeat event: {ev:?}");
    let st = c.status();
    assert_eq!(st["heartbeat"]["status"], "lost_communication");
    assert_eq!(st["state"], "Running");
    // No agent: freeze is refused as unavailable.
    let e = c
        .call(
            json!({"op": "freeze", "timeout_s": 10}),
            Duration::from_secs(60),
        )
        .unwrap_err();
    assert_eq!(e["code"], "guest_agent_unavailable", "{e}");

    // The agent comes back: heartbeat OK again.
    console.run_nowait(
        "/usr/sbin/qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 -t /run -l /run/qemu-ga2.log -f /run/qemu-ga2.pid &",
    );
    c.wait_event(Duration::from_secs(60), |e| {
        matches!(
            e,
            Event::HeartbeatChanged {
                status: HeartbeatStatus::Ok,
                ..
            }
        )
    });

    // Graceful shutdown through the agent.
    let r = c.ok(json!({"op": "shut_down", "timeout_s": 120}));
    assert_eq!(r["method"], "agent", "{r}");
    c.wait_event(Duration::from_secs(120), |e| {
        matches!(e, Event::StateChanged { state: VmState::Stopping, reason: Some(r) } if r.contains("agent"))
    });
    c.wait_state(VmState::Off, Duration::from_secs(120));
    assert!(w.wait_exit(Duration::from_secs(60)));
    println!(
        "heartbeat/kvp/freeze/shutdown test: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn time_sync_after_restore_and_long_pause() {
    let t0 = Instant::now();
    let mut vm = gen1_vm("integ-time");
    let (w, mut c, mut console) = boot(&vm, None);
    wait_status(&mut c, Duration::from_secs(60), "heartbeat ok", |s| {
        s["heartbeat"]["status"] == "ok"
    });

    // Resume after a pause longer than the threshold sets the clock.
    set_guest_clock_back(&mut console, "p", 600);
    c.ok(json!({"op": "pause"}));
    std::thread::sleep(Duration::from_secs(3));
    c.ok(json!({"op": "resume"}));
    let ev = c.wait_event(Duration::from_secs(60), |e| {
        matches!(e, Event::TimeSynced { .. })
    });
    if let Event::TimeSynced { correction_ms, .. } = &ev {
        assert!(*correction_ms > 500_000, "{ev:?}");
    }
    let off = guest_clock(&mut console, "p2") - now_s() as i64;
    assert!(off.abs() < 5, "guest clock off by {off} s after resume");

    // Control: with time synchronisation withdrawn, a restore leaves the clock off.
    set_guest_clock_back(&mut console, "b", 600);
    let mut services = vm.config.integration_services;
    services.time_sync = false;
    c.ok(json!({"op": "set_integration", "services": services}));
    let save_dir = vm.vm_dir.path().join("Saved");
    let r = c.call(
        json!({"op": "save", "dir": save_dir}),
        Duration::from_secs(600),
    );
    assert!(r.is_ok(), "{r:?}\n{}", vm.log_tail());
    c.wait_state(VmState::Saved, Duration::from_secs(60));
    let mut w = w;
    assert!(w.wait_exit(Duration::from_secs(60)));
    drop((w, c, console));

    vm.config.integration_services.time_sync = false;
    let (w, mut c, mut console) = boot(&vm, Some(save_dir.clone()));
    wait_status(&mut c, Duration::from_secs(60), "heartbeat ok", |s| {
        s["heartbeat"]["status"] == "ok"
    });
    // Give a (wrongly) offered time sync the chance to happen.
    std::thread::sleep(Duration::from_secs(3));
    let off = guest_clock(&mut console, "c1") - now_s() as i64;
    assert!(
        off < -300,
        "clock corrected although time sync is withdrawn ({off} s)"
    );
    assert!(!c
        .events
        .iter()
        .any(|e| matches!(e, Event::TimeSynced { .. })));
    let r = c.call(
        json!({"op": "save", "dir": save_dir}),
        Duration::from_secs(600),
    );
    assert!(r.is_ok(), "{r:?}\n{}", vm.log_tail());
    c.wait_state(VmState::Saved, Duration::from_secs(60));
    let mut w = w;
    assert!(w.wait_exit(Duration::from_secs(60)));
    drop((w, c, console));

    // Restore with time synchronisation offered: the worker sets the clock.
    vm.config.integration_services.time_sync = true;
    let (mut w, mut c, mut console) = boot(&vm, Some(save_dir));
    let ev = c.wait_event(Duration::from_secs(120), |e| {
        matches!(e, Event::TimeSynced { .. })
    });
    println!("restore: {ev:?}");
    let off = guest_clock(&mut console, "r1") - now_s() as i64;
    assert!(off.abs() < 5, "guest clock off by {off} s after restore");

    // Shutdown withdrawn: the ACPI power button only.
    let mut services = vm.config.integration_services;
    services.shutdown = false;
    c.ok(json!({"op": "set_integration", "services": services}));
    let r = c.ok(json!({"op": "shut_down", "timeout_s": 120}));
    assert_eq!(r["method"], "acpi", "{r}");
    c.wait_state(VmState::Off, Duration::from_secs(120));
    assert!(w.wait_exit(Duration::from_secs(60)));
    println!("time sync test: {:.1} s", t0.elapsed().as_secs_f64());
}
