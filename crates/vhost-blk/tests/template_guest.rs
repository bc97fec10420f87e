//! Real guests (the project's Debian guest template under TCG) using disks served by
//! our vhost-user-blk backend:
//! - the template's BIOS disk boots FROM the vhost-user-blk device via SeaBIOS,
//!   through syslinux, the kernel and /data mount, to the ready marker (reads);
//! - a direct-boot guest with its /data fs on our backend writes a pattern with dd
//!   (conv=fsync) to a second served disk it finds by virtio serial (GET_ID), then
//!   discards part of it; the host file holds exactly that afterwards (writes, FLUSH,
//!   DISCARD).

mod common;

use common::*;
use fv_guest_template::Template;
use fv_vhost_blk::BlkBackendConfig;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

fn template() -> Template {
    let dir = std::env::var_os("FV_TEMPLATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/templates"));
    fv_guest_template::ensure(&dir).unwrap_or_else(|e| panic!("guest template: {e}"))
}

fn copy_to(dir: &Path, src: &Path, name: &str) -> PathBuf {
    let dst = dir.join(name);
    std::fs::copy(src, &dst).unwrap_or_else(|e| panic!("copy {}: {e}", src.display()));
    dst
}

// Under TCG, QEMU does not re-translate guest code that a vhost-user backend overwrites
// (it never sees the backend's writes), and BIOS chain loading puts the partition boot
// record at 0x7c00 where the MBR already ran. The test therefore starts QEMU paused and
// makes it drop its translation at 0x7c00 when the boot record gets there (see
// common::GdbStub); every byte still comes from our backend. KVM needs no such step.
#[test]
fn template_boots_from_vhost_user_blk_via_seabios() {
    let t = template();
    let dir = tempfile::tempdir().unwrap();
    let disk = copy_to(dir.path(), &t.bios_disk, "bios.raw");
    let dev = RawDevice::open(&disk, false);
    let mut cfg = BlkBackendConfig::new(socket_in(dir.path(), "boot"));
    cfg.serial = "FV-BIOS-BOOT".into();
    let served = Served::start(dev, cfg);
    let stats = served.stats.clone();

    let gdb_sock = dir.path().join("gdb.sock");
    let mut args = vec![
        "-S".to_string(),
        "-gdb".into(),
        format!("unix:{},server=on,wait=off", gdb_sock.display()),
    ];
    args.extend(vhost_blk_args("vblk0", &served.socket, 1, Some(1)));
    let mut qemu = Qemu::start(512, &args);
    // Hit 1: SeaBIOS jumps to the MBR; hit 2: the MBR jumps to the boot record it loaded
    // over itself. Removing the breakpoint then invalidates the stale translation.
    let seen = GdbStub::connect(&gdb_sock, BOOT_TIMEOUT).break_at(0x7c00, 2, 16);
    let image = std::fs::read(&disk).unwrap();
    let part1 = u32::from_le_bytes(image[0x1c6..0x1ca].try_into().unwrap()) as usize * 512;
    assert_eq!(seen[0], image[..16], "hit 1 at 0x7c00 is not the MBR");
    assert_eq!(
        seen[1],
        image[part1..part1 + 16],
        "hit 2 at 0x7c00 is not partition 1's boot record"
    );
    qemu.wait_for(&t.ready_marker, BOOT_TIMEOUT);
    let console = qemu.serial();
    qemu.kill();
    served
        .join(Duration::from_secs(30))
        .expect("serve() result");

    let s = stats.snapshot();
    eprintln!("boot stats: {s:?}");
    // Kernel + initrd alone are megabytes: the boot must have read them through us.
    assert!(
        s.bytes_read > 4 << 20,
        "too little read through the backend: {s:?}"
    );
    assert!(
        !console.contains("cannot mount") && !console.contains("no filesystem labelled"),
        "/data (partition 2 of the served disk) did not mount:\n{console}"
    );
}

/// Bytes the guest script writes: "FERROVISOR-VHOST-BLK\n" repeated, cut to 1 MiB.
fn pattern() -> Vec<u8> {
    b"FERROVISOR-VHOST-BLK\n"
        .iter()
        .copied()
        .cycle()
        .take(1 << 20)
        .collect()
}

const PATTERN_AT: usize = 1 << 20; // dd bs=64k seek=16
const DISCARD_AT: usize = PATTERN_AT + (256 << 10);
const DISCARD_LEN: usize = 64 << 10;

#[test]
fn guest_writes_flushes_and_discards_through_vhost_user_blk() {
    let t = template();
    let dir = tempfile::tempdir().unwrap();

    // /data of the guest lives on our backend too (real ext4 traffic with flushes).
    let data = copy_to(dir.path(), &t.data_disk, "data.raw");
    let data_dev = RawDevice::open(&data, false);
    let mut data_cfg = BlkBackendConfig::new(socket_in(dir.path(), "data"));
    data_cfg.serial = "FV-DATA".into();
    let data_served = Served::start(data_dev, data_cfg);

    let target = dir.path().join("target.raw");
    std::fs::File::create(&target)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let target_dev = RawDevice::open(&target, false);
    let mut cfg = BlkBackendConfig::new(socket_in(dir.path(), "target"));
    cfg.serial = "FV-WRITE-TEST".into();
    cfg.num_queues = 2;
    let served = Served::start(target_dev.clone(), cfg);
    let stats = served.stats.clone();

    let qga_sock = dir.path().join("qga.sock");
    let mut args: Vec<String> = vec![
        "-kernel".into(),
        t.kernel.display().to_string(),
        "-initrd".into(),
        t.initrd.display().to_string(),
        "-append".into(),
        t.cmdline.clone(),
        "-smp".into(),
        "2".into(),
        "-chardev".into(),
        format!(
            "socket,id=qga0,path={},server=on,wait=off",
            qga_sock.display()
        ),
        "-device".into(),
        "virtio-serial-pci".into(),
        "-device".into(),
        "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0".into(),
    ];
    args.extend(vhost_blk_args("vdata", &data_served.socket, 1, None));
    args.extend(vhost_blk_args("vtarget", &served.socket, 2, None));
    let mut qemu = Qemu::start(512, &args);
    qemu.wait_for(&t.ready_marker, BOOT_TIMEOUT);

    // The guest finds the target disk by its virtio serial (GET_ID), writes the pattern
    // with an fsync (FLUSH), then discards 64 KiB in the middle of it.
    let script = format!(
        "set -e; dev=; for d in /sys/block/vd*; do \
           if [ \"$(cat $d/serial)\" = FV-WRITE-TEST ]; then dev=/dev/${{d##*/}}; fi; done; \
         [ -n \"$dev\" ] || {{ echo no disk with serial FV-WRITE-TEST; exit 3; }}; \
         yes FERROVISOR-VHOST-BLK | head -c {len} > /tmp/p; \
         dd if=/tmp/p of=$dev bs=65536 seek={seek} conv=fsync 2>&1; \
         blkdiscard -o {doff} -l {dlen} $dev; \
         echo wrote $dev",
        len = 1 << 20,
        seek = PATTERN_AT / 65536,
        doff = DISCARD_AT,
        dlen = DISCARD_LEN,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let st = rt.block_on(async {
        let qga = fv_qga::Qga::new(&qga_sock);
        qga.ping(Duration::from_secs(60)).await.expect("qga ping");
        qga.exec_wait("/bin/sh", &["-c", &script], Duration::from_secs(300))
            .await
            .expect("guest-exec")
    });
    let out =
        String::from_utf8_lossy(&st.stdout).into_owned() + &String::from_utf8_lossy(&st.stderr);
    assert_eq!(
        st.exit_code,
        Some(0),
        "guest script failed: {out}\nconsole:\n{}",
        qemu.serial()
    );
    eprintln!("guest: {out}");

    // dd's fsync completed, so the FLUSH reached the device before QEMU goes away.
    let flushed = target_dev.flushes.load(Ordering::Relaxed);
    qemu.kill();
    served
        .join(Duration::from_secs(30))
        .expect("serve() result");
    data_served
        .join(Duration::from_secs(30))
        .expect("data serve() result");

    let s = stats.snapshot();
    eprintln!("target stats: {s:?}");
    assert!(flushed >= 1, "no FLUSH reached the device");
    assert!(s.flushes >= 1 && s.discards >= 1, "{s:?}");
    assert!(s.bytes_written >= 1 << 20, "{s:?}");

    let file = std::fs::read(&target).unwrap();
    let mut expected = vec![0u8; 8 << 20];
    expected[PATTERN_AT..PATTERN_AT + (1 << 20)].copy_from_slice(&pattern());
    expected[DISCARD_AT..DISCARD_AT + DISCARD_LEN].fill(0);
    assert!(file.len() == expected.len(), "size changed");
    if file != expected {
        let first = file
            .iter()
            .zip(&expected)
            .position(|(a, b)| a != b)
            .unwrap();
        panic!("host file differs from the expected content first at byte {first}");
    }
}
