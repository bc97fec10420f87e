//! The disk operations against real peers (qemu-img) and independent references.
mod common;
use common::*;
use fv_vdisk::ops;
use fv_vdisk::{BlockDevice, CreateSpec, DiskError, DiskFormat, DiskKind};
use rand::SeedableRng;
use std::path::Path;

fn spec(size: u64, kind: DiskKind) -> CreateSpec {
    CreateSpec {
        virtual_size: size,
        kind,
        block_size: 0,
        logical_sector_size: 512,
        physical_sector_size: 512,
        parent: None,
    }
}

fn no_progress() -> impl FnMut(u64, u64) -> bool {
    |_, _| true
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn convert_round_trip_raw_vhdx_vhd_raw_and_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = 40u64 << 20;
    let raw = d.join("src.img");
    let mut reference = vec![0u8; size as usize];
    {
        ops::create(&raw, DiskFormat::Raw, &spec(size, DiskKind::Fixed)).unwrap();
        let disk = fv_vdisk::open(&raw, &rw()).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        scribble(&mut rng, &disk, &mut reference, 25, 512);
    }
    let src_before = std::fs::read(&raw).unwrap();
    let vhdx = d.join("a.vhdx");
    let vhd = d.join("b.vhd");
    let back = d.join("c.raw");
    ops::convert(
        &raw,
        &vhdx,
        DiskFormat::Vhdx,
        DiskKind::Dynamic,
        &mut no_progress(),
    )
    .unwrap();
    ops::convert(
        &vhdx,
        &vhd,
        DiskFormat::Vhd,
        DiskKind::Dynamic,
        &mut no_progress(),
    )
    .unwrap();
    ops::convert(
        &vhd,
        &back,
        DiskFormat::Raw,
        DiskKind::Fixed,
        &mut no_progress(),
    )
    .unwrap();
    assert_eq!(std::fs::read(&back).unwrap(), reference);
    assert_eq!(std::fs::read(&raw).unwrap(), src_before, "source untouched");
    assert!(!d.join("b.vhd.partial").exists());
    // Real peers agree.
    run(
        "qemu-img",
        &["compare", "-f", "vhdx", "-F", "raw", s(&vhdx), s(&raw)],
    );
    run(
        "qemu-img",
        &["compare", "-f", "vpc", "-F", "raw", s(&vhd), s(&raw)],
    );
    run("qemu-img", &["check", "-f", "vhdx", s(&vhdx)]);
    // Dynamic targets store only data: much smaller than the virtual size... unless the data is dense.
    let fixed = d.join("f.vhd");
    ops::convert(
        &vhd,
        &fixed,
        DiskFormat::Vhd,
        DiskKind::Fixed,
        &mut no_progress(),
    )
    .unwrap();
    run(
        "qemu-img",
        &["compare", "-f", "vpc", "-F", "raw", s(&fixed), s(&raw)],
    );
    assert_eq!(std::fs::metadata(&fixed).unwrap().len(), size + 512);
    // Existing destinations are refused.
    assert!(matches!(
        ops::convert(
            &raw,
            &vhd,
            DiskFormat::Vhd,
            DiskKind::Dynamic,
            &mut no_progress()
        ),
        Err(DiskError::Refused { .. })
    ));
    // qcow2 source (made by qemu-img from the raw reference).
    let q = d.join("q.qcow2");
    run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&q)],
    );
    let fromq = d.join("fromq.vhdx");
    ops::convert(
        &q,
        &fromq,
        DiskFormat::Vhdx,
        DiskKind::Dynamic,
        &mut no_progress(),
    )
    .unwrap();
    run(
        "qemu-img",
        &["compare", "-f", "vhdx", "-F", "raw", s(&fromq), s(&raw)],
    );
    // No temporary left behind.
    let leftovers: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("qcow2-src"))
        .collect();
    assert!(leftovers.is_empty());
    // Cancelling leaves no output.
    let cancelled = d.join("x.vhd");
    assert!(matches!(
        ops::convert(
            &raw,
            &cancelled,
            DiskFormat::Vhd,
            DiskKind::Dynamic,
            &mut |_, _| false
        ),
        Err(DiskError::Cancelled)
    ));
    assert!(!cancelled.exists() && !d.join("x.vhd.partial").exists());
}

#[test]
fn convert_checks_free_space() {
    // A tmpfs too small for a fixed 64 MiB target.
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    run("mount", &["-t", "tmpfs", "-o", "size=8m", "tmpfs", s(&mnt)]);
    struct Umount(std::path::PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _g = Umount(mnt.clone());
    let src = dir.path().join("s.vhd");
    ops::create(&src, DiskFormat::Vhd, &spec(64 << 20, DiskKind::Dynamic)).unwrap();
    let r = ops::convert(
        &src,
        &mnt.join("d.vhd"),
        DiskFormat::Vhd,
        DiskKind::Fixed,
        &mut no_progress(),
    );
    assert!(matches!(r, Err(DiskError::NoSpace { .. })), "{:?}", r.err());
    assert!(std::fs::read_dir(&mnt).unwrap().next().is_none());
}

#[test]
fn compact_shrinks_zeroed_blocks() {
    let dir = tempfile::tempdir().unwrap();
    for fmt in [DiskFormat::Vhd, DiskFormat::Vhdx] {
        let p = dir.path().join(format!("c.{fmt:?}"));
        ops::create(&p, fmt, &spec(64 << 20, DiskKind::Dynamic)).unwrap();
        let mut reference = vec![0u8; 64 << 20];
        {
            let d = fv_vdisk::open_format(&p, Some(fmt), &rw()).unwrap();
            let mut rng = rand::rngs::StdRng::seed_from_u64(3);
            scribble(&mut rng, &d, &mut reference, 40, 4096);
            // Zero most of the disk with real zero writes (not discards).
            let z = vec![0u8; 1 << 20];
            for mb in 8..64u64 {
                d.write_at(mb << 20, &z).unwrap();
            }
            reference[8 << 20..].fill(0);
            d.flush().unwrap();
        }
        let before = std::fs::metadata(&p).unwrap().len();
        let shrunk = ops::compact(&p, &mut no_progress()).unwrap();
        let after = std::fs::metadata(&p).unwrap().len();
        assert!(after < before && shrunk > 0, "{fmt:?}: {before} -> {after}");
        let d = fv_vdisk::open_format(&p, Some(fmt), &ro()).unwrap();
        assert_eq!(read_all(&d), reference, "{fmt:?}");
        assert!(ops::check(&p, false).unwrap().is_clean());
        println!("compact {fmt:?}: {before} -> {after} bytes");
    }
}

#[test]
fn resize_rules() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = d.join("r.vhd");
    ops::create(&p, DiskFormat::Vhd, &spec(16 << 20, DiskKind::Dynamic)).unwrap();
    fv_vdisk::open(&p, &rw())
        .unwrap()
        .write_at(10 << 20, &[7u8; 4096])
        .unwrap();
    ops::resize(&p, 64 << 20).unwrap();
    assert!(
        matches!(ops::resize(&p, 8 << 20), Err(DiskError::Refused { .. })),
        "shrink over data"
    );
    ops::resize(&p, 12 << 20).unwrap();
    let info = run("qemu-img", &["info", "--output=json", "-f", "vpc", s(&p)]);
    assert!(
        info.contains(&format!("\"virtual-size\": {}", 12u64 << 20)),
        "{info}"
    );
    // Fixed VHD grows too.
    let f = d.join("f.vhd");
    ops::create(&f, DiskFormat::Vhd, &spec(4 << 20, DiskKind::Fixed)).unwrap();
    fv_vdisk::open(&f, &rw())
        .unwrap()
        .write_at(0, &[1u8; 512])
        .unwrap();
    ops::resize(&f, 8 << 20).unwrap();
    let dev = fv_vdisk::open(&f, &ro()).unwrap();
    assert_eq!(dev.size(), 8 << 20);
    let mut b = vec![0u8; 8 << 20];
    dev.read_at(0, &mut b).unwrap();
    assert!(b[..512].iter().all(|&x| x == 1) && b[512..].iter().all(|&x| x == 0));
    drop(dev);
    // A disk with children cannot be resized; neither can a differencing disk.
    let c = d.join("child.vhd");
    ops::create_differencing(&c, &p, 0).unwrap();
    assert!(matches!(
        ops::resize(&p, 32 << 20),
        Err(DiskError::Refused { .. })
    ));
    assert!(matches!(
        ops::resize(&c, 32 << 20),
        Err(DiskError::Refused { .. })
    ));
    assert_eq!(ops::find_children(d, &p).unwrap(), vec![c.clone()]);
}

#[test]
fn merge_into_parent_and_sibling_refusal_and_merge_to_new() {
    for fmt in [DiskFormat::Vhd, DiskFormat::Vhdx] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ext = if fmt == DiskFormat::Vhd {
            "vhd"
        } else {
            "vhdx"
        };
        let base = d.join(format!("base.{ext}"));
        ops::create(&base, fmt, &spec(16 << 20, DiskKind::Dynamic)).unwrap();
        let mut reference = vec![0u8; 16 << 20];
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        scribble(
            &mut rng,
            &fv_vdisk::open(&base, &rw()).unwrap(),
            &mut reference,
            10,
            4096,
        );
        let a = d.join(format!("a.{ext}"));
        let b = d.join(format!("b.{ext}"));
        ops::create_differencing(&a, &base, 0).unwrap();
        ops::create_differencing(&b, &base, 0).unwrap();
        scribble(
            &mut rng,
            &fv_vdisk::open(&a, &rw()).unwrap(),
            &mut reference,
            10,
            4096,
        );
        // Flatten into a new disk first (originals kept).
        let flat = d.join(format!("flat.{ext}"));
        ops::merge_to_new(&a, &flat, fmt, DiskKind::Dynamic, &mut no_progress()).unwrap();
        assert_eq!(read_all(&fv_vdisk::open(&flat, &ro()).unwrap()), reference);
        assert!(a.exists() && base.exists());
        // b is a sibling: merging a into base would break it.
        match ops::merge_into_parent(&a, false, &mut no_progress()) {
            Err(DiskError::Refused { reason, .. }) => assert!(reason.contains("b."), "{reason}"),
            other => panic!("expected Refused, got {other:?}"),
        }
        ops::merge_into_parent(&a, true, &mut no_progress()).unwrap();
        assert!(!a.exists());
        assert_eq!(
            read_all(&fv_vdisk::open(&base, &ro()).unwrap()),
            reference,
            "{fmt:?}"
        );
        // The sibling is now broken, with a clear error.
        assert!(matches!(
            fv_vdisk::open(&b, &ro()),
            Err(DiskError::BrokenChain { .. })
        ));
        if fmt == DiskFormat::Vhdx {
            run("qemu-img", &["check", "-f", "vhdx", s(&base)]);
        }
    }
}

/// The `_with` variants honour an extra allowed directory (the CLI's --allow-dir):
/// a parent outside the child's directory is refused by default and used when its
/// directory is allowed.
#[test]
fn check_set_parent_and_merge_into_parent_with_allowed_dirs() {
    for fmt in [DiskFormat::Vhd, DiskFormat::Vhdx] {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("c"),
        );
        for d in [&a, &b, &c] {
            std::fs::create_dir(d).unwrap();
        }
        let ext = if fmt == DiskFormat::Vhd {
            "vhd"
        } else {
            "vhdx"
        };
        let base = a.join(format!("base.{ext}"));
        ops::create(&base, fmt, &spec(8 << 20, DiskKind::Dynamic)).unwrap();
        let mut reference = vec![0u8; 8 << 20];
        let mut rng = rand::rngs::StdRng::seed_from_u64(31);
        scribble(
            &mut rng,
            &fv_vdisk::open(&base, &rw()).unwrap(),
            &mut reference,
            8,
            4096,
        );
        let child = b.join(format!("child.{ext}"));
        ops::create_differencing(&child, &base, 0).unwrap();
        let allow = |d: &Path| fv_vdisk::OpenOptions {
            read_only: true,
            replay_log: true,
            policy: fv_vdisk::PathPolicy::image_dir_only().allow(d),
        };
        {
            let mut o = allow(&a);
            o.read_only = false;
            scribble(
                &mut rng,
                &fv_vdisk::open(&child, &o).unwrap(),
                &mut reference,
                8,
                4096,
            );
        }
        // check: the chain only opens with a's directory allowed.
        assert!(!ops::check(&child, false).unwrap().is_clean());
        assert!(ops::check_with(&child, false, &allow(&a))
            .unwrap()
            .is_clean());
        // set_parent after moving the base to c; check finds it only with c allowed.
        let moved = c.join(format!("base.{ext}"));
        std::fs::rename(&base, &moved).unwrap();
        ops::set_parent_with(&child, &moved, false, &allow(&c)).unwrap();
        assert!(!ops::check_with(&child, false, &allow(&a))
            .unwrap()
            .is_clean());
        assert!(ops::check_with(&child, false, &allow(&c))
            .unwrap()
            .is_clean());
        // merge into the parent: refused without the directory, done with it.
        assert!(matches!(
            ops::merge_into_parent(&child, false, &mut no_progress()),
            Err(DiskError::ParentNotAllowed { .. })
        ));
        assert!(child.exists());
        let parent =
            ops::merge_into_parent_with(&child, false, &allow(&c), &mut no_progress()).unwrap();
        assert_eq!(parent, moved.canonicalize().unwrap());
        assert!(!child.exists());
        assert_eq!(
            read_all(&fv_vdisk::open(&moved, &ro()).unwrap()),
            reference,
            "{fmt:?}"
        );
        if fmt == DiskFormat::Vhdx {
            run("qemu-img", &["check", "-f", "vhdx", s(&moved)]);
        }
    }
}

#[test]
fn set_parent_after_moving_files_and_inspect() {
    for fmt in [DiskFormat::Vhd, DiskFormat::Vhdx] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ext = if fmt == DiskFormat::Vhd {
            "vhd"
        } else {
            "vhdx"
        };
        let base = d.join(format!("base.{ext}"));
        ops::create(&base, fmt, &spec(8 << 20, DiskKind::Dynamic)).unwrap();
        let mut reference = vec![0u8; 8 << 20];
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        scribble(
            &mut rng,
            &fv_vdisk::open(&base, &rw()).unwrap(),
            &mut reference,
            8,
            4096,
        );
        let child = d.join(format!("child.{ext}"));
        ops::create_differencing(&child, &base, 0).unwrap();
        scribble(
            &mut rng,
            &fv_vdisk::open(&child, &rw()).unwrap(),
            &mut reference,
            8,
            4096,
        );
        // Move the parent into a subdirectory: the chain no longer resolves.
        let sub = d.join("parents");
        std::fs::create_dir(&sub).unwrap();
        let moved = sub.join(format!("base.{ext}"));
        std::fs::rename(&base, &moved).unwrap();
        assert!(matches!(
            fv_vdisk::open(&child, &ro()),
            Err(DiskError::ParentNotFound { .. })
        ));
        let rep = ops::inspect(&child).unwrap();
        assert!(!rep.top.parent.as_ref().unwrap().verified);
        // Reconnect; both locators are rewritten; the chain verifies again.
        ops::set_parent(&child, &moved, false).unwrap();
        let dev = fv_vdisk::open(&child, &ro()).unwrap();
        assert_eq!(read_all(&dev), reference);
        drop(dev);
        let rep = ops::inspect(&child).unwrap();
        let link = rep.top.parent.as_ref().unwrap();
        assert!(link.verified, "{link:?}");
        assert_eq!(
            link.locator
                .relative_path
                .as_deref()
                .map(|p| p.trim_start_matches("./")),
            Some(format!("parents/base.{ext}").as_str())
        );
        assert_eq!(
            link.locator.absolute_path.as_deref(),
            Some(moved.canonicalize().unwrap().to_str().unwrap())
        );
        let json = serde_json::to_value(&rep).unwrap();
        assert_eq!(json["type"], "differencing");
        assert_eq!(json["format"], ext);
        assert_eq!(json["chain"][0]["type"], "dynamic");
        assert_eq!(json["virtual_size"], 8u64 << 20);
        // A different disk as the new parent is refused unless forced.
        let other = d.join(format!("other.{ext}"));
        ops::create(&other, fmt, &spec(8 << 20, DiskKind::Dynamic)).unwrap();
        assert!(matches!(
            ops::set_parent(&child, &other, false),
            Err(DiskError::BrokenChain { .. })
        ));
        assert!(ops::check(&child, false).unwrap().is_clean());
        // vhdimount agrees after the move. (For VHDX, libvhdi looks for the parent's base
        // name in the child's directory only, so it cannot follow a moved VHDX parent.)
        if fmt == DiskFormat::Vhdx {
            continue;
        }
        let mnt = VhdiMount::new(&child, &d.join("mnt"));
        assert_eq!(std::fs::read(mnt.file()).unwrap(), reference, "{fmt:?}");
    }
}

/// Run a QEMU tool; (success, stderr).
fn qemu(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} is required for this test: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Image locks against QEMU's own, both ways: our writable open keeps qemu-io
/// (read-write) and qemu-img info (read-only) out, our read-only open keeps
/// writers out but lets qemu-img info in, and a file qemu-nbd serves read-write
/// is refused to us with qemu-nbd named. Closing releases.
#[test]
fn image_locks_exclude_qemu_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("l.vhdx");
    ops::create(&img, DiskFormat::Vhdx, &spec(64 << 20, DiskKind::Dynamic)).unwrap();
    let p = s(&img);
    let write = ["-f", "vhdx", "-c", "write -P 0x5a 0 64k", p];
    {
        let _w = fv_vdisk::open(&img, &rw()).unwrap();
        let (ok, err) = qemu("qemu-io", &write);
        assert!(!ok && err.contains("Failed to get"), "qemu-io wrote: {err}");
        let (ok, err) = qemu("qemu-img", &["info", "-f", "vhdx", p]);
        assert!(!ok && err.contains("lock"), "qemu-img info opened: {err}");
        // A second writable open of ours is refused too, naming this process.
        match fv_vdisk::open(&img, &rw()) {
            Err(DiskError::Locked { holders, .. }) => {
                assert!(holders
                    .iter()
                    .any(|h| h.pid == std::process::id() && h.writes))
            }
            other => panic!("expected Locked, got {:?}", other.err()),
        }
    }
    {
        let _r1 = fv_vdisk::open(&img, &ro()).unwrap();
        let _r2 = fv_vdisk::open(&img, &ro()).unwrap();
        let (ok, err) = qemu("qemu-img", &["info", "-f", "vhdx", p]);
        assert!(ok, "read-only opens must coexist: {err}");
        let (ok, err) = qemu("qemu-io", &write);
        assert!(!ok && err.contains("Failed to get"), "qemu-io wrote: {err}");
    }
    // Released: qemu-io writes now.
    let (ok, err) = qemu("qemu-io", &write);
    assert!(ok, "{err}");

    // qemu-nbd serving the file read-write. With --fork its first process exits
    // once the image is open and the export is up (the socket alone exists sooner).
    let sock = dir.path().join("nbd.sock");
    let pidfile = dir.path().join("nbd.pid");
    let (ok, err) = qemu(
        "qemu-nbd",
        &[
            "-f",
            "vhdx",
            "--persistent",
            "--fork",
            "--pid-file",
            s(&pidfile),
            "--socket",
            s(&sock),
            p,
        ],
    );
    assert!(ok, "qemu-nbd: {err}");
    let nbd_pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    for opts in [rw(), ro()] {
        match fv_vdisk::open(&img, &opts) {
            Err(e @ DiskError::Locked { .. }) => {
                let DiskError::Locked { holders, .. } = &e else {
                    unreachable!()
                };
                assert!(
                    holders.iter().any(|h| h.pid == nbd_pid
                        && h.writes
                        && h.command.as_deref() == Some("qemu-nbd")),
                    "holder not named: {e}"
                );
                let msg = e.to_string();
                assert!(
                    msg.contains(&format!("pid {nbd_pid}")) && msg.contains("qemu-nbd"),
                    "{msg}"
                );
            }
            other => panic!(
                "expected Locked while qemu-nbd serves, got {:?}",
                other.err()
            ),
        }
    }
    qemu("kill", &[&nbd_pid.to_string()]);
    // Its death releases the lock: wait for it to be gone (it is not our child).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while Path::new(&format!("/proc/{nbd_pid}")).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "qemu-nbd did not exit"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    drop(fv_vdisk::open(&img, &rw()).unwrap());
}
