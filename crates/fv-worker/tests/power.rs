//! Reset, ACPI shutdown fallback, shutdown timeout, and a generation 2 (q35 + OVMF) boot.

mod common;
use common::*;
use fv_model::{ControllerKind, Generation, VmState};
use fv_worker_proto::Event;
use serde_json::json;
use std::time::Duration;

fn boot(vm: &Vm) -> (Worker, Client, Console) {
    let mut w = vm.start(None);
    let mut c = w.connect();
    c.ok(json!({"op": "subscribe"}));
    let console = Console::connect(&vm.sock("com1.sock"));
    if c.status()["state"] != "Running" {
        c.wait_state(VmState::Running, Duration::from_secs(120));
    }
    w.qemu_pid = c.status()["qemu_pid"].as_i64().unwrap() as i32;
    console.wait_for("FERROVISOR-GUEST-READY", BOOT_TIMEOUT);
    (w, c, console)
}

#[test]
fn reset_then_acpi_shutdown_without_agent() {
    let vm = gen1_vm("reset");
    let (mut w, mut c, mut console) = boot(&vm);
    console.run(
        "m",
        "echo before-reset > /tmp/fv-reset",
        Duration::from_secs(120),
    );

    c.ok(json!({"op": "reset"}));
    c.wait_state(VmState::Resetting, Duration::from_secs(10));
    c.wait_state(VmState::Running, Duration::from_secs(10));
    // The guest boots again: a second ready marker, and RAM-only state is gone.
    let deadline = std::time::Instant::now() + BOOT_TIMEOUT;
    while console.text().matches("FERROVISOR-GUEST-READY").count() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "guest did not boot again after reset"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let t = console.run(
        "m2",
        "cat /tmp/fv-reset 2>/dev/null || echo gone",
        Duration::from_secs(120),
    );
    assert_eq!(t.trim(), "gone");

    // Without the agent, ShutDown falls back to the ACPI power button.
    let k = console.run(
        "k",
        "killall -9 qemu-ga; sleep 1; pidof qemu-ga || echo none",
        Duration::from_secs(120),
    );
    assert_eq!(k.trim(), "none", "qemu-ga still running");
    let r = c.ok(json!({"op": "shut_down", "timeout_s": 300}));
    assert_eq!(r["method"], "acpi", "{r}");
    assert_eq!(c.status()["state"], "Stopping");
    c.wait_event(Duration::from_secs(300), |e| {
        matches!(e, Event::QemuExited { clean: true, .. })
    });
    c.wait_state(VmState::Off, Duration::from_secs(60));
    assert!(w.wait_exit(Duration::from_secs(60)));
}

#[test]
fn shutdown_timeout_is_reported_and_turn_off_still_works() {
    let vm = gen1_vm("shuttimeout");
    let (mut w, mut c, mut console) = boot(&vm);
    // A guest that ignores every shutdown request.
    let k = console.run(
        "k",
        "killall -9 qemu-ga acpid; sleep 1; pidof qemu-ga acpid || echo none",
        Duration::from_secs(120),
    );
    assert_eq!(k.trim(), "none", "qemu-ga or acpid still running");
    let r = c.ok(json!({"op": "shut_down", "timeout_s": 5}));
    assert_eq!(r["method"], "acpi");
    c.wait_event(Duration::from_secs(120), |e| {
        matches!(e, Event::ShutdownTimedOut)
    });
    c.wait_state(VmState::Running, Duration::from_secs(10));
    let e = c
        .call(json!({"op": "guest_ping"}), Duration::from_secs(60))
        .unwrap_err();
    assert_eq!(e["code"], "guest_agent_unavailable");
    c.ok(json!({"op": "turn_off"}));
    c.wait_state(VmState::Off, Duration::from_secs(60));
    assert!(w.wait_exit(Duration::from_secs(60)));
}

#[test]
fn gen2_boots_with_ovmf() {
    let mut vm = gen1_vm("gen2");
    vm.config.generation = Generation::Gen2;
    vm.config.boot_order = vec![fv_model::BootDevice::Scsi];
    vm.config.hard_drives[0].slot.controller = ControllerKind::Scsi;
    vm.config.validate().unwrap();
    let (mut w, mut c, mut console) = boot(&vm);
    let vars = vm.vm_dir.path().join(format!("{}.VARS.fd", vm.config.id));
    assert!(vars.is_file(), "per-VM UEFI variable store missing");
    let fw = console.run(
        "e",
        "ls /sys/firmware/efi >/dev/null 2>&1 && echo uefi || echo bios",
        Duration::from_secs(120),
    );
    assert_eq!(fw.trim(), "uefi");
    assert!(c
        .call(json!({"op": "guest_ping"}), Duration::from_secs(60))
        .is_ok());
    c.ok(json!({"op": "turn_off"}));
    c.wait_state(VmState::Off, Duration::from_secs(60));
    assert!(w.wait_exit(Duration::from_secs(60)));
}

#[test]
fn dvd_media_change() {
    let mut vm = gen1_vm("dvd");
    vm.config.dvd_drives.push(fv_model::DvdDrive {
        slot: fv_model::Slot {
            controller: ControllerKind::Ide,
            controller_number: 1,
            location: 0,
        },
        path: None,
    });
    let iso = vm.vm_dir.path().join("media.iso");
    let mut data = vec![0u8; 1 << 20];
    data[..12].copy_from_slice(b"FV-MEDIA-OK\n");
    std::fs::write(&iso, &data).unwrap();
    let (mut w, mut c, mut console) = boot(&vm);
    let e = c
        .call(
            json!({"op": "change_media", "dvd_index": 3, "path": iso}),
            Duration::from_secs(30),
        )
        .unwrap_err();
    assert_eq!(e["code"], "bad_request");
    let e = c
        .call(
            json!({"op": "change_media", "dvd_index": 0, "path": "/nonexistent.iso"}),
            Duration::from_secs(30),
        )
        .unwrap_err();
    assert_eq!(e["code"], "bad_request");
    c.ok(json!({"op": "change_media", "dvd_index": 0, "path": "media.iso"}));
    // The first read after a medium change reports the change (unit attention, EIO),
    // as a real drive does; read again.
    let read = "rm -f /tmp/s; dd if=/dev/sr0 of=/tmp/s bs=2048 count=1 2>/dev/null || \
                dd if=/dev/sr0 of=/tmp/s bs=2048 count=1 2>/dev/null; head -c 11 /tmp/s || echo no-medium";
    let got = console.run("r", read, Duration::from_secs(120));
    assert_eq!(got, "FV-MEDIA-OK", "console:\n{}", console.text());
    c.ok(json!({"op": "change_media", "dvd_index": 0, "path": null}));
    let got = console.run("r2", read, Duration::from_secs(120));
    assert!(got.contains("no-medium"), "{got}");
    c.ok(json!({"op": "turn_off"}));
    c.wait_state(VmState::Off, Duration::from_secs(60));
    assert!(w.wait_exit(Duration::from_secs(60)));
}
