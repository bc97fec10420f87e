//! Long operations in the worker: a save of a running 1 GiB guest completes and
//! restores; a long save does not hold up status or pause of the same VM or of
//! another VM; Turn Off of a Saving VM ends it at once (partial state discarded)
//! and leaves a VM that starts again; a cancelled save leaves the guest running;
//! a file descriptor passed with SCM_RIGHTS reaches the worker.
//!
//! "Long" saves are made long on purpose: the guest fills tmpfs with random data
//! (so the migration stream is big) and the debug knob
//! FV_WORKER_SAVE_MAX_BANDWIDTH slows the migration down. Every check waits on an
//! event or a reply, never on a sleep.

mod common;
use common::*;
use fv_model::VmState;
use fv_worker_proto::Event;
use serde_json::json;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

/// Boot `vm` (env knobs for its worker), wait for the guest, return the pieces.
fn boot(vm: &Vm, env: &[(&str, &str)]) -> (Worker, Client, Console) {
    let mut w = vm.start_env(None, env);
    let mut c = w.connect();
    c.ok(json!({"op": "subscribe"}));
    let console = Console::connect(&vm.sock("com1.sock"));
    if c.status()["state"] != "Running" {
        c.wait_state(VmState::Running, Duration::from_secs(300));
    }
    w.qemu_pid = c.status()["qemu_pid"].as_i64().unwrap() as i32;
    console.wait_for(fv_guest_template::READY_MARKER, BOOT_TIMEOUT);
    (w, c, console)
}

/// Fill `mib` MiB of the guest's RAM (tmpfs) with random data: a save must write it.
fn dirty_memory(console: &mut Console, mib: u32) {
    let out = console.run(
        "fill",
        &format!(
            "dd if=/dev/urandom of=/dev/shm/fill bs=1M count={mib} 2>/dev/null; du -m /dev/shm/fill | cut -f1"
        ),
        Duration::from_secs(600),
    );
    assert_eq!(out.trim(), mib.to_string(), "guest could not fill tmpfs");
}

#[test]
fn save_of_a_running_1gib_guest_completes_and_restores() {
    save_and_restore(1024, 300);
}

#[test]
fn save_of_a_running_256mib_guest_completes_and_restores() {
    // tmpfs takes at most half of the guest's memory.
    save_and_restore(256, 90);
}

/// Save a running guest of `memory_mib` with `dirty` MiB of random data in RAM,
/// restore it, check it continued; prints the save and restore times.
fn save_and_restore(memory_mib: u64, dirty: u32) {
    let mut vm = gen1_vm(&format!("save-{memory_mib}"));
    vm.config.memory_mib = memory_mib;
    let (mut w, mut c, mut console) = boot(&vm, &[]);
    console.run(
        "d",
        "echo written-before-save > /data/big-save; sync; cat /data/big-save",
        Duration::from_secs(120),
    );
    let token = format!("big{}", std::process::id());
    console.run(
        "w",
        &format!("echo {token} > /tmp/fv-token; cat /tmp/fv-token"),
        Duration::from_secs(120),
    );
    // Enough non-zero memory that QEMU's completion phase outruns the socket buffer
    // (the old worker hung here, at 89 %, waiting on QMP inside its read loop).
    dirty_memory(&mut console, dirty);
    let up1 = uptime(&mut console, "u1");

    let save_dir = vm.vm_dir.path().join("Saved");
    let t = Instant::now();
    let r = c.call(
        json!({"op": "save", "dir": save_dir}),
        Duration::from_secs(900),
    );
    let took = t.elapsed().as_secs_f64();
    let r = r.unwrap_or_else(|e| panic!("save failed: {e}\n{}", vm.log_tail()));
    assert_eq!(r["reply"], "saved");
    let bytes = r["bytes"].as_u64().unwrap();
    assert_eq!(
        std::fs::metadata(save_dir.join("vmstate.bin"))
            .unwrap()
            .len(),
        bytes
    );
    assert!(
        bytes > u64::from(dirty) << 20,
        "stream of {bytes} bytes lacks the dirtied RAM"
    );
    assert!(!save_dir.join("vmstate.bin.partial").exists());
    println!(
        "BENCH save {memory_mib} MiB guest ({dirty} MiB dirtied): {took:.2} s, {:.0} MiB stream",
        bytes as f64 / 1048576.0
    );
    c.wait_state(VmState::Saved, Duration::from_secs(60));
    assert!(w.wait_exit(Duration::from_secs(60)), "worker did not exit");
    let result: serde_json::Value =
        serde_json::from_slice(&std::fs::read(vm.sock("result.json")).unwrap()).unwrap();
    assert_eq!(result["state"], "Saved");
    assert_eq!(result["saved_dir"], json!(save_dir));
    drop((console, c));

    let t = Instant::now();
    let mut w2 = vm.start(Some(save_dir));
    let mut c = w2.connect();
    c.ok(json!({"op": "subscribe"}));
    let mut console = Console::connect(&vm.sock("com1.sock"));
    if c.status()["state"] != "Running" {
        c.wait_state(VmState::Running, Duration::from_secs(900));
    }
    println!(
        "BENCH restore {memory_mib} MiB guest: {:.2} s to Running",
        t.elapsed().as_secs_f64()
    );
    w2.qemu_pid = c.status()["qemu_pid"].as_i64().unwrap() as i32;
    let got = console.run("r", "cat /tmp/fv-token", Duration::from_secs(120));
    assert_eq!(got.trim(), token, "RAM state lost: cold boot");
    let up2 = uptime(&mut console, "u2");
    assert!(up2 >= up1, "uptime went backwards: {up1} -> {up2}");
    let d = console.run("d2", "cat /data/big-save", Duration::from_secs(120));
    assert_eq!(d.trim(), "written-before-save");
    let sum = console.run(
        "s",
        "du -m /dev/shm/fill | cut -f1",
        Duration::from_secs(120),
    );
    assert_eq!(sum.trim(), dirty.to_string());
    c.ok(json!({"op": "turn_off"}));
    c.wait_state(VmState::Off, Duration::from_secs(60));
    assert!(w2.wait_exit(Duration::from_secs(60)));
    let rep = fv_vdisk::ops::check(&vm.vm_dir.path().join("boot.vhdx"), false).unwrap();
    assert!(rep.is_clean(), "{rep:?}");
}

#[test]
fn long_save_leaves_status_and_pause_answered_and_turn_off_ends_it() {
    // 5 MB/s: the ~100 MB stream takes about 20 s.
    const SLOW: [(&str, &str); 1] = [("FV_WORKER_SAVE_MAX_BANDWIDTH", "5000000")];
    let a = gen1_vm("long-save-a");
    let mut b = gen1_vm("other-b");
    b.config.network_adapters[0].static_mac = Some("00:15:5d:12:34:57".into());
    let (mut wa, mut ca, mut console_a) = boot(&a, &SLOW);
    let (_wb, mut cb, mut console_b) = boot(&b, &[]);
    // tmpfs takes at most half of the 256 MiB guest.
    dirty_memory(&mut console_a, 90);

    // Save A on its own connection; the reply must not arrive before we are done.
    let mut saver = wa.connect();
    let save_dir = a.vm_dir.path().join("Saved");
    let save_id = saver.send(json!({"op": "save", "dir": save_dir}));
    ca.wait_event(
        Duration::from_secs(120),
        |e| matches!(e, Event::SaveProgress { percent } if *percent >= 1),
    );

    // Same VM: status answers (Saving, the save listed), pause is refused at once.
    let st = ca.status();
    assert_eq!(st["state"], "Saving", "{st}");
    assert_eq!(st["operations"], json!(["save"]));
    let e = ca
        .call(json!({"op": "pause"}), Duration::from_secs(30))
        .unwrap_err();
    assert_eq!(e["code"], "invalid_state");
    assert!(e["message"].as_str().unwrap().contains("Saving"), "{e}");
    // Another VM: pause and resume as usual.
    cb.ok(json!({"op": "pause"}));
    assert_eq!(cb.status()["state"], "Paused");
    cb.ok(json!({"op": "resume"}));
    assert_eq!(cb.status()["state"], "Running");
    // The save is still running: all of the above happened during it.
    assert_eq!(ca.status()["state"], "Saving");
    assert!(save_dir.join("vmstate.bin.partial").exists());

    // Turn Off of the Saving VM: at once, the partial state is discarded.
    let t = Instant::now();
    ca.ok(json!({"op": "turn_off"}));
    println!(
        "turn off of a Saving VM took {:.2} s",
        t.elapsed().as_secs_f64()
    );
    ca.wait_state(VmState::Off, Duration::from_secs(60));
    let e = saver.reply(save_id, Duration::from_secs(60)).unwrap_err();
    assert_eq!(e["code"], "cancelled", "{e}");
    assert!(wa.wait_exit(Duration::from_secs(60)), "worker lingered");
    assert!(!save_dir.join("vmstate.bin.partial").exists());
    assert!(!save_dir.join("vmstate.bin").exists());
    let result: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.sock("result.json")).unwrap()).unwrap();
    assert_eq!(result["state"], "Off");
    drop((saver, ca, console_a));

    // B ran on through it all.
    console_b.run("b", "echo b-alive", Duration::from_secs(120));

    // A starts again (cold: there is no saved state) and its disk is sound.
    let rep = fv_vdisk::ops::check(&a.vm_dir.path().join("boot.vhdx"), false).unwrap();
    assert!(rep.is_clean(), "{rep:?}");
    let (mut wa2, mut ca2, mut console_a2) = boot(&a, &[]);
    console_a2.run("a2", "echo a-again", Duration::from_secs(120));
    ca2.ok(json!({"op": "turn_off"}));
    ca2.wait_state(VmState::Off, Duration::from_secs(60));
    assert!(wa2.wait_exit(Duration::from_secs(60)));
}

#[test]
fn cancelled_save_leaves_the_guest_running() {
    const SLOW: [(&str, &str); 1] = [("FV_WORKER_SAVE_MAX_BANDWIDTH", "5000000")];
    let vm = gen1_vm("cancel-save");
    let (mut w, mut c, mut console) = boot(&vm, &SLOW);
    dirty_memory(&mut console, 100);
    let mut saver = w.connect();
    let save_dir = vm.vm_dir.path().join("Saved");
    let id = saver.send(json!({"op": "save", "dir": save_dir}));
    c.wait_event(
        Duration::from_secs(120),
        |e| matches!(e, Event::SaveProgress { percent } if *percent >= 1),
    );
    // The worker acknowledges the cancel before the save ends (one writer per
    // connection, in order), so the two replies come in this order.
    let r = saver.send(json!({"op": "cancel", "request": id}));
    let ack = saver.reply(r, Duration::from_secs(60)).unwrap();
    assert_eq!(ack["reply"], "cancel_requested");
    let e = saver.reply(id, Duration::from_secs(120)).unwrap_err();
    assert_eq!(e["code"], "cancelled", "{e}");
    c.wait_state(VmState::Running, Duration::from_secs(60));
    assert!(!save_dir.join("vmstate.bin.partial").exists());
    let out = console.run("after", "echo still-running", Duration::from_secs(120));
    assert_eq!(out.trim(), "still-running");
    c.ok(json!({"op": "turn_off"}));
    c.wait_state(VmState::Off, Duration::from_secs(60));
    assert!(w.wait_exit(Duration::from_secs(60)));
}

#[test]
fn attach_fd_passes_a_real_descriptor() {
    use std::os::unix::fs::MetadataExt;
    let vm = gen1_vm("fdpass");
    let w = vm.start(None);
    let mut c = w.connect();
    let f = tempfile::tempfile().unwrap();
    let md = f.metadata().unwrap();
    let id = c.send_with_fd(json!({"op": "attach_fd", "name": "tap0"}), f.as_fd());
    let r = c.reply(id, Duration::from_secs(30)).unwrap();
    assert_eq!(r["reply"], "fd_attached");
    assert_eq!(r["name"], "tap0");
    assert_eq!(r["file_type"], "file");
    assert_eq!(r["dev"].as_u64().unwrap(), md.dev());
    assert_eq!(r["ino"].as_u64().unwrap(), md.ino());
    // Without a descriptor the op is refused, naming what is missing.
    let e = c
        .call(
            json!({"op": "attach_fd", "name": "tap1"}),
            Duration::from_secs(30),
        )
        .unwrap_err();
    assert_eq!(e["code"], "bad_request");
    assert!(e["message"].as_str().unwrap().contains("SCM_RIGHTS"), "{e}");
    // A socket descriptor is told apart from a file.
    let (s1, _s2) = std::os::unix::net::UnixStream::pair().unwrap();
    let id = c.send_with_fd(json!({"op": "attach_fd", "name": "sock"}), s1.as_fd());
    let r = c.reply(id, Duration::from_secs(30)).unwrap();
    assert_eq!(r["file_type"], "socket");
}

/// Hyper-V's Reset of a paused VM leaves it running; a shut down right after a
/// reset (the guest is still in its firmware and misses the ACPI press) is asked
/// again until the guest goes; Turn Off during a shut down works at once.
#[test]
fn reset_of_paused_runs_and_shutdown_after_reset_completes() {
    let vm = gen1_vm("reset");
    let (mut w, mut c, console) = boot(&vm, &[]);
    let marker = fv_guest_template::READY_MARKER;
    c.ok(json!({"op": "pause"}));
    c.ok(json!({"op": "reset"}));
    assert_eq!(c.status()["state"], "Running", "reset of a paused VM");
    // The guest really boots again.
    let end = Instant::now() + BOOT_TIMEOUT;
    while console.text().matches(marker).count() < 2 {
        assert!(Instant::now() < end, "no second boot after reset");
        std::thread::sleep(Duration::from_millis(200));
    }
    c.ok(json!({"op": "reset"}));
    let t = Instant::now();
    let r = c.ok(json!({"op": "shut_down", "timeout_s": 600}));
    assert_eq!(r["reply"], "shut_down");
    c.wait_event(Duration::from_secs(600), |e| {
        matches!(e, Event::QemuExited { clean: true, .. })
    });
    c.wait_state(VmState::Off, Duration::from_secs(60));
    let asked_again = c
        .events
        .iter()
        .filter(|e| matches!(e, Event::Warning { message } if message.contains("asked again")))
        .count();
    println!(
        "shut down right after reset: Off after {:.1} s, request repeated {asked_again} times",
        t.elapsed().as_secs_f64()
    );
    assert!(w.wait_exit(Duration::from_secs(60)));
    drop((c, console));

    // Turn Off while the guest is still on its way down.
    let (mut w, mut c, _console) = boot(&vm, &[]);
    c.ok(json!({"op": "reset"}));
    c.ok(json!({"op": "shut_down", "timeout_s": 600}));
    assert_eq!(c.status()["state"], "Stopping");
    c.ok(json!({"op": "turn_off"}));
    c.wait_state(VmState::Off, Duration::from_secs(60));
    assert!(w.wait_exit(Duration::from_secs(60)));
}
