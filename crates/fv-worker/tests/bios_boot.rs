//! A gen1 guest booting through SeaBIOS from its own disk: the template's BIOS disk
//! as VHDX on IDE 0:0 (emulated `ide-hd` on the worker's NBD export) under TCG.
//! Proves the boot path that vhost-user-blk cannot serve under TCG, that the agent
//! answers, that guest writes and flushes reach our engine, and that TurnOff leaves
//! a clean image.

mod common;
use common::*;
use fv_model::VmState;
use serde_json::json;
use std::process::Command;
use std::time::Duration;

#[test]
fn gen1_boots_bios_disk_from_ide() {
    let vm = gen1_bios_vm("bios-ide");
    assert!(vm.config.direct_boot.is_none());
    let mut w = vm.start(None);
    let mut c = w.connect();
    c.ok(json!({"op": "subscribe"}));
    let mut console = Console::connect(&vm.sock("com1.sock"));
    if c.status()["state"] != "Running" {
        c.wait_state(VmState::Running, Duration::from_secs(120));
    }
    let st = c.status();
    assert_eq!(st["state"], "Running", "{}", vm.log_tail());
    w.qemu_pid = st["qemu_pid"].as_i64().unwrap() as i32;
    let cmdline = std::fs::read_to_string(format!("/proc/{}/cmdline", w.qemu_pid))
        .unwrap()
        .replace('\0', " ");
    assert!(
        cmdline.contains("ide-hd,id=hd0,drive=disk0,bus=ide.0,unit=0"),
        "{cmdline}"
    );
    assert!(cmdline.contains("driver=nbd"), "{cmdline}");
    assert!(!cmdline.contains("-kernel"), "{cmdline}");

    console.wait_for(fv_guest_template::READY_MARKER, BOOT_TIMEOUT);
    let ping = c.call(json!({"op": "guest_ping"}), Duration::from_secs(60));
    assert!(ping.is_ok(), "{ping:?}\n{}", vm.log_tail());

    // The guest runs from the IDE disk and writes to it; sync makes it flush.
    let before = c.ok(json!({"op": "stats"}))["disks"][0].clone();
    let out = console.run(
        "w",
        "echo via-ide > /data/fv-bios-test && sync && cat /data/fv-bios-test",
        Duration::from_secs(120),
    );
    assert_eq!(out.trim(), "via-ide");
    let after = c.ok(json!({"op": "stats"}))["disks"][0].clone();
    println!("disk stats after boot {before}, after write+sync {after}");
    assert!(before["reads"].as_u64().unwrap() > 0, "{before}");
    assert!(
        after["writes"].as_u64().unwrap() > before["writes"].as_u64().unwrap(),
        "{after}"
    );
    assert!(
        after["flushes"].as_u64().unwrap() > before["flushes"].as_u64().unwrap(),
        "guest sync did not reach the engine as a flush: {after}"
    );
    assert_eq!(after["errors"], 0, "{after}");

    c.ok(json!({"op": "turn_off"}));
    c.wait_state(VmState::Off, Duration::from_secs(60));
    assert!(
        w.wait_exit(Duration::from_secs(60)),
        "worker did not exit after turn off"
    );
    assert!(!vm.sock("disk-0.nbd.sock").exists());

    let disk = vm.vm_dir.path().join("boot.vhdx");
    let q = Command::new("qemu-img")
        .args(["check", "-f", "vhdx"])
        .arg(&disk)
        .output()
        .expect("qemu-img (qemu-utils) must be installed");
    assert!(
        q.status.success(),
        "qemu-img check: {}{}",
        String::from_utf8_lossy(&q.stdout),
        String::from_utf8_lossy(&q.stderr)
    );
    let rep = fv_vdisk::ops::check(&disk, false).unwrap();
    assert!(rep.is_clean(), "{rep:?}");
    assert!(rep.warnings.is_empty(), "{rep:?}");
}
