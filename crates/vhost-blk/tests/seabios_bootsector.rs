//! SeaBIOS boots a tiny boot sector FROM the vhost-user-blk device (proves the
//! vhost-user handshake, config space and reads) and that boot sector copies LBA 1 to
//! LBA 5 through BIOS int 13h (proves writes reach the host file). No kernel needed.

mod common;

use common::*;
use fv_vhost_blk::BlkBackendConfig;
use std::time::Duration;

/// Machine code of the boot sector (GNU as, `.code16`, linked at 0x7c00):
/// save DL; print "FVBOOT-READ-OK" on COM1; int 13h AH=42h read LBA 1 -> 0x8000;
/// int 13h AH=43h write 0x8000 -> LBA 5; print "FVBOOT-WRITE-OK" (or "FVBOOT-FAIL"
/// if either call sets CF); halt. Followed by 0x55AA at offset 510.
const BOOT_CODE: [u8; 152] = [
    0xfa, 0x31, 0xc0, 0x8e, 0xd8, 0x8e, 0xc0, 0x8e, 0xd0, 0xbc, 0x00, 0x7c, 0x88, 0x16, 0x57, 0x7c,
    0xfb, 0xbe, 0x68, 0x7c, 0xe8, 0x34, 0x00, 0xb4, 0x42, 0xbe, 0x58, 0x7c, 0x8a, 0x16, 0x57, 0x7c,
    0xcd, 0x13, 0x72, 0x1d, 0xc7, 0x06, 0x60, 0x7c, 0x05, 0x00, 0xb4, 0x43, 0xb0, 0x00, 0xbe, 0x58,
    0x7c, 0x8a, 0x16, 0x57, 0x7c, 0xcd, 0x13, 0x72, 0x08, 0xbe, 0x79, 0x7c, 0xe8, 0x0c, 0x00, 0xeb,
    0x06, 0xbe, 0x8b, 0x7c, 0xe8, 0x04, 0x00, 0xfa, 0xf4, 0xeb, 0xfc, 0xba, 0xf8, 0x03, 0xac, 0x84,
    0xc0, 0x74, 0x03, 0xee, 0xeb, 0xf8, 0xc3, 0x00, 0x10, 0x00, 0x01, 0x00, 0x00, 0x80, 0x00, 0x00,
    0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x46, 0x56, 0x42, 0x4f, 0x4f, 0x54, 0x2d, 0x52,
    0x45, 0x41, 0x44, 0x2d, 0x4f, 0x4b, 0x0d, 0x0a, 0x00, 0x46, 0x56, 0x42, 0x4f, 0x4f, 0x54, 0x2d,
    0x57, 0x52, 0x49, 0x54, 0x45, 0x2d, 0x4f, 0x4b, 0x0d, 0x0a, 0x00, 0x46, 0x56, 0x42, 0x4f, 0x4f,
    0x54, 0x2d, 0x46, 0x41, 0x49, 0x4c, 0x0d, 0x0a,
];

#[test]
fn seabios_boots_and_writes_through_vhost_user_blk() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("boot.raw");
    let mut disk = vec![0u8; 4 << 20];
    disk[..BOOT_CODE.len()].copy_from_slice(&BOOT_CODE);
    disk[510] = 0x55;
    disk[511] = 0xaa;
    // LBA 1 holds a pattern found nowhere else on the disk.
    let pattern: Vec<u8> = (0..512u32).map(|i| (i * 13 + 7) as u8 ^ 0xA5).collect();
    disk[512..1024].copy_from_slice(&pattern);
    std::fs::write(&img, &disk).unwrap();

    let dev = RawDevice::open(&img, false);
    let mut cfg = BlkBackendConfig::new(socket_in(dir.path(), "boot"));
    cfg.serial = "FV-BOOTSECTOR".into();
    let served = Served::start(dev.clone(), cfg);
    let stats = served.stats.clone();

    let mut qemu = Qemu::start(128, &vhost_blk_args("vblk0", &served.socket, 1, Some(1)));
    qemu.wait_for("FVBOOT-READ-OK", Duration::from_secs(120));
    qemu.wait_for("FVBOOT-", Duration::from_secs(120));
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !qemu.serial().contains("FVBOOT-WRITE-OK") && !qemu.serial().contains("FVBOOT-FAIL") {
        assert!(
            std::time::Instant::now() < deadline,
            "no write result: {}",
            qemu.serial()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let console = qemu.serial();
    qemu.kill();
    assert!(console.contains("FVBOOT-WRITE-OK"), "console: {console}");

    // serve() returns once QEMU is gone.
    served
        .join(Duration::from_secs(30))
        .expect("serve() result");

    let s = stats.snapshot();
    eprintln!("backend stats: {s:?}");
    assert!(
        s.reads >= 2 && s.writes >= 1,
        "requests must have gone through us: {s:?}"
    );
    let after = std::fs::read(&img).unwrap();
    assert_eq!(
        &after[5 * 512..6 * 512],
        &pattern[..],
        "LBA 5 must now hold LBA 1"
    );
    assert!(
        after[2 * 512..5 * 512].iter().all(|&b| b == 0),
        "LBAs 2-4 untouched"
    );
    assert_eq!(&after[..512], &disk[..512], "boot sector untouched");
}
