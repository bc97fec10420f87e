//! A real gen1 guest (template kernel, its data disk as VHDX on IDE 0:0 over NBD,
//! TCG) driven through fv-worker: boot, ping, pause/resume, save, restore (guest
//! state and uptime continue), shutdown via the agent. A second test saves and
//! restores a guest whose disk is on vhost-user-blk (the KVM path for SCSI slots).

mod common;
use common::*;
use fv_model::VmState;
use fv_worker_proto::Event;
use serde_json::json;
use std::time::{Duration, Instant};

fn rss_kib(v: &serde_json::Value) -> u64 {
    v["rss_kib"].as_u64().unwrap()
}

#[test]
fn boot_pause_save_restore_shutdown() {
    let vm = gen1_vm("lifecycle");
    let mut w = vm.start(None);
    let mut c = w.connect();
    let hello = c.ok(json!({"op": "hello", "version": 1}));
    assert_eq!(hello["vm_id"], vm.config.id.to_string());
    let e = c
        .call(
            json!({"op": "hello", "version": 99}),
            Duration::from_secs(30),
        )
        .unwrap_err();
    assert_eq!(e["code"], "bad_request");
    c.ok(json!({"op": "subscribe"}));
    let mut console = Console::connect(&vm.sock("com1.sock"));

    let st = c.status();
    if st["state"] != "Running" {
        c.wait_state(VmState::Running, Duration::from_secs(120));
    }
    let st = c.status();
    assert_eq!(st["state"], "Running", "{}", vm.log_tail());
    assert_eq!(st["macs"], json!(["00:15:5d:12:34:56"]));
    assert_eq!(st["worker_pid"].as_i64().unwrap() as i32, w.pid);
    w.qemu_pid = st["qemu_pid"].as_i64().unwrap() as i32;
    assert!(st["com_sockets"][0]
        .as_str()
        .unwrap()
        .ends_with("com1.sock"));

    console.wait_for("FERROVISOR-GUEST-READY", BOOT_TIMEOUT);
    // The agent is up once the marker is printed.
    let ping = c.call(json!({"op": "guest_ping"}), Duration::from_secs(60));
    assert!(ping.is_ok(), "{ping:?}\n{}", vm.log_tail());
    assert_eq!(c.status()["guest_agent_connected"], true);

    // Pause / resume and refused transitions.
    c.ok(json!({"op": "pause"}));
    assert_eq!(c.status()["state"], "Paused");
    let e = c
        .call(json!({"op": "pause"}), Duration::from_secs(30))
        .unwrap_err();
    assert_eq!(e["code"], "invalid_state");
    assert!(e["message"].as_str().unwrap().contains("Paused"), "{e}");
    let e = c
        .call(
            json!({"op": "shut_down", "timeout_s": 5}),
            Duration::from_secs(30),
        )
        .unwrap_err();
    assert_eq!(e["code"], "invalid_state");
    // While paused the guest cannot print: the console stays silent.
    let before = console.text().len();
    std::thread::sleep(Duration::from_secs(1));
    console.run_nowait("echo paused-check");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !console.text()[before..].contains("paused-check\r\n"),
        "guest ran while paused"
    );
    c.ok(json!({"op": "resume"}));
    assert_eq!(c.status()["state"], "Running");
    let e = c
        .call(json!({"op": "resume"}), Duration::from_secs(30))
        .unwrap_err();
    assert_eq!(e["code"], "invalid_state");

    // The data disk (VHDX through vhost-user-blk) is mounted and readable...
    let hello = console.run(
        "h",
        &format!("cat /data/{}", fv_guest_template::SEED_FILE),
        Duration::from_secs(120),
    );
    assert_eq!(hello.trim(), fv_guest_template::SEED_CONTENT.trim());
    // ...and writable.
    console.run(
        "d",
        "echo persisted > /data/fv-worker-test; sync; cat /data/fv-worker-test",
        Duration::from_secs(120),
    );

    // Guest state that only survives in RAM, and its uptime.
    let token = format!("tok{}", std::process::id());
    console.run(
        "w",
        &format!("echo {token} > /tmp/fv-token; cat /tmp/fv-token"),
        Duration::from_secs(120),
    );
    let up1 = uptime(&mut console, "u1");
    let t_saved = Instant::now();

    let stats = c.ok(json!({"op": "stats"}));
    println!(
        "worker RSS {} KiB (anon {} KiB, shmem {} KiB), qemu RSS {} KiB",
        rss_kib(&stats["worker"]),
        stats["worker"]["rss_anon_kib"],
        stats["worker"]["rss_shmem_kib"],
        rss_kib(&stats["qemu"])
    );
    assert!(stats["disks"][0]["reads"].as_u64().unwrap() > 0, "{stats}");

    // Save.
    let save_dir = vm.vm_dir.path().join("Saved");
    let r = c.call(
        json!({"op": "save", "dir": save_dir}),
        Duration::from_secs(600),
    );
    assert!(r.is_ok(), "{r:?}\n{}", vm.log_tail());
    assert!(save_dir.join("vmstate.bin").metadata().unwrap().len() > 1 << 20);
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(save_dir.join("vmstate.json")).unwrap()).unwrap();
    assert_eq!(meta["vm_id"], vm.config.id.to_string());
    c.wait_state(VmState::Saved, Duration::from_secs(60));
    // Save progress was reported, never went backwards, and ended at 100 % (sent
    // only once the state file is complete and synced).
    let progress: Vec<u8> = c
        .events
        .iter()
        .filter_map(|e| match e {
            Event::SaveProgress { percent } => Some(*percent),
            _ => None,
        })
        .collect();
    assert_eq!(progress.last(), Some(&100), "save progress: {progress:?}");
    assert!(
        progress.windows(2).all(|w| w[0] <= w[1]),
        "save progress went backwards: {progress:?}"
    );
    assert!(
        w.wait_exit(Duration::from_secs(60)),
        "worker did not exit after save"
    );
    assert!(!vm.sock("worker.sock").exists());
    drop(console);
    drop(c);

    // Restore with a new worker.
    let mut w2 = vm.start(Some(save_dir.clone()));
    let mut c = w2.connect();
    c.ok(json!({"op": "subscribe"}));
    let mut console = Console::connect(&vm.sock("com1.sock"));
    if c.status()["state"] != "Running" {
        c.wait_state(VmState::Running, Duration::from_secs(600));
    }
    w2.qemu_pid = c.status()["qemu_pid"].as_i64().unwrap() as i32;
    let got = console.run("r", "cat /tmp/fv-token", Duration::from_secs(120));
    assert_eq!(
        got.trim(),
        token,
        "RAM state lost: the guest was cold-booted"
    );
    let up2 = uptime(&mut console, "u2");
    let d = console.run("d2", "cat /data/fv-worker-test", Duration::from_secs(120));
    assert_eq!(d.trim(), "persisted");
    let wall = t_saved.elapsed().as_secs_f64();
    println!("uptime before save {up1:.2}s, after restore {up2:.2}s, wall time between {wall:.1}s");
    assert!(up2 >= up1, "uptime went backwards: {up1} -> {up2}");
    assert!(c
        .call(json!({"op": "guest_ping"}), Duration::from_secs(60))
        .is_ok());

    // Graceful shutdown through the guest agent: QEMU exits, VM Off, worker exits.
    let r = c.ok(json!({"op": "shut_down", "timeout_s": 300}));
    assert_eq!(r["method"], "agent");
    c.wait_event(Duration::from_secs(300), |e| {
        matches!(e, Event::QemuExited { clean: true, .. })
    });
    c.wait_state(VmState::Off, Duration::from_secs(60));
    assert!(
        w2.wait_exit(Duration::from_secs(60)),
        "worker did not exit after shutdown"
    );
    // The disk was flushed and closed: it opens cleanly again.
    fv_vdisk::open(
        &vm.vm_dir.path().join("boot.vhdx"),
        &fv_vdisk::OpenOptions::default(),
    )
    .unwrap();
}

/// Save/restore with the disk on vhost-user-blk: QEMU only migrates when the back-end
/// offers dirty logging (VHOST_F_LOG_ALL + LOG_SHMFD). Under TCG the worker would use
/// NBD for a SCSI slot, so the debug knob forces vhost-user (safe here: the guest is
/// booted directly, no code is loaded from the disk).
#[test]
fn vhost_user_disk_save_restore() {
    const FORCE: [(&str, &str); 1] = [("FV_WORKER_FORCE_VHOST_USER", "1")];
    let mut vm = gen1_vm("vhost-save");
    vm.config.hard_drives[0].slot = fv_model::Slot {
        controller: fv_model::ControllerKind::Scsi,
        controller_number: 0,
        location: 0,
    };
    let mut w = vm.start_env(None, &FORCE);
    let mut c = w.connect();
    c.ok(json!({"op": "subscribe"}));
    let mut console = Console::connect(&vm.sock("com1.sock"));
    if c.status()["state"] != "Running" {
        c.wait_state(VmState::Running, Duration::from_secs(120));
    }
    w.qemu_pid = c.status()["qemu_pid"].as_i64().unwrap() as i32;
    let cmdline = std::fs::read_to_string(format!("/proc/{}/cmdline", w.qemu_pid))
        .unwrap()
        .replace('\0', " ");
    assert!(cmdline.contains("vhost-user-blk-pci,id=hd0"), "{cmdline}");
    assert!(!cmdline.contains("driver=nbd"), "{cmdline}");
    console.wait_for(fv_guest_template::READY_MARKER, BOOT_TIMEOUT);
    console.run(
        "d",
        "echo over-vhost > /data/fv-vhost-test; sync; cat /data/fv-vhost-test",
        Duration::from_secs(120),
    );
    let token = format!("vtok{}", std::process::id());
    console.run(
        "w",
        &format!("echo {token} > /tmp/fv-token; cat /tmp/fv-token"),
        Duration::from_secs(120),
    );
    let up1 = uptime(&mut console, "u1");
    let stats = c.ok(json!({"op": "stats"}));
    assert!(
        stats["disks"][0]["flushes"].as_u64().unwrap() > 0,
        "{stats}"
    );

    let save_dir = vm.vm_dir.path().join("Saved");
    let r = c.call(
        json!({"op": "save", "dir": save_dir}),
        Duration::from_secs(600),
    );
    assert!(r.is_ok(), "{r:?}\n{}", vm.log_tail());
    c.wait_state(VmState::Saved, Duration::from_secs(60));
    assert!(
        w.wait_exit(Duration::from_secs(60)),
        "worker did not exit after save"
    );
    drop(console);
    drop(c);

    let mut w2 = vm.start_env(Some(save_dir), &FORCE);
    let mut c = w2.connect();
    c.ok(json!({"op": "subscribe"}));
    let mut console = Console::connect(&vm.sock("com1.sock"));
    if c.status()["state"] != "Running" {
        c.wait_state(VmState::Running, Duration::from_secs(600));
    }
    w2.qemu_pid = c.status()["qemu_pid"].as_i64().unwrap() as i32;
    let got = console.run("r", "cat /tmp/fv-token", Duration::from_secs(120));
    assert_eq!(
        got.trim(),
        token,
        "RAM state lost: the guest was cold-booted"
    );
    let up2 = uptime(&mut console, "u2");
    assert!(up2 >= up1, "uptime went backwards: {up1} -> {up2}");
    // The restored guest keeps using the disk through the new worker's back-end.
    let d = console.run(
        "d2",
        "echo again >> /data/fv-vhost-test; sync; cat /data/fv-vhost-test",
        Duration::from_secs(120),
    );
    assert_eq!(
        d.trim().lines().collect::<Vec<_>>(),
        ["over-vhost", "again"]
    );
    c.ok(json!({"op": "turn_off"}));
    c.wait_state(VmState::Off, Duration::from_secs(60));
    assert!(w2.wait_exit(Duration::from_secs(60)));
    let rep = fv_vdisk::ops::check(&vm.vm_dir.path().join("boot.vhdx"), false).unwrap();
    assert!(rep.is_clean(), "{rep:?}");
}
