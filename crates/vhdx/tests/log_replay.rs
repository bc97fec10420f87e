//! Dirty logs: ours (stopped between log write and apply) and qemu's (its BAT
//! update failed after its log entry was made durable), replayed by our engine.

mod common;
use common::*;
use fv_vdisk_core::{DiskError, DiskKind, Layer, RawLayer};
use fv_vhdx::format::{parse_region_table, Header, BAT_GUID, HEADER_OFFSETS, REGION_OFFSETS};
use fv_vhdx::{OpenOptions, VhdxFile};
use std::os::unix::fs::FileExt;
use std::path::Path;

fn current_header(path: &Path) -> Header {
    let f = std::fs::File::open(path).unwrap();
    let mut best: Option<Header> = None;
    for off in HEADER_OFFSETS {
        let mut b = vec![0u8; 4096];
        f.read_exact_at(&mut b, off).unwrap();
        if let Some(h) = Header::parse(&b) {
            if best.as_ref().is_none_or(|x| h.sequence > x.sequence) {
                best = Some(h);
            }
        }
    }
    best.expect("a valid header")
}

fn bat_offset(path: &Path) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; 64 * 1024];
    f.read_exact_at(&mut b, REGION_OFFSETS[0]).unwrap();
    parse_region_table(&b)
        .unwrap()
        .into_iter()
        .find(|r| r.guid == BAT_GUID)
        .unwrap()
        .file_offset
}

fn ro(replay: bool) -> OpenOptions {
    OpenOptions {
        read_only: true,
        replay_log: replay,
    }
}

fn assert_matches(img: &Path, reference: &Path, opts: &OpenOptions) {
    let v = VhdxFile::open(img, opts).unwrap();
    let got = read_all_base(&v);
    let r = RawLayer::open(reference, true).unwrap();
    let want = read_all_base(&r);
    assert_eq!(first_diff(&got, &want), None, "content after replay");
}

#[test]
fn our_dirty_log_is_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.vhdx");
    let rawp = dir.path().join("a.raw");
    let size = 64 * MIB;
    let raw = RawLayer::create(&rawp, size).unwrap();
    let v = VhdxFile::create(&img, &spec(DiskKind::Dynamic, size, 1 << 20, 512)).unwrap();
    let mut rng = Rng(99);
    let mut d = vec![0u8; 3 * MIB as usize];
    rng.fill(&mut d);
    v.write(0, &d).unwrap();
    raw.write(0, &d).unwrap();
    v.flush().unwrap();
    // New blocks whose BAT entries only reach the log.
    for off in [10 * MIB, 33 * MIB + 4096, 63 * MIB] {
        let mut d = vec![0u8; 64 * 1024];
        rng.fill(&mut d);
        v.write(off, &d).unwrap();
        raw.write(off, &d).unwrap();
    }
    v.debug_crash_after_log_write();
    assert!(v.flush().is_err());
    drop(v);
    assert!(
        !current_header(&img).log_guid.is_nil(),
        "the log is left dirty"
    );

    // qemu refuses the dirty image read-only, as the spec requires.
    let out = run(
        "qemu-img",
        &["compare", "-f", "vhdx", p(&img), "-F", "raw", p(&rawp)],
        120,
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("log"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Read-only without replay is refused; with replay it is done in memory only.
    assert!(matches!(
        VhdxFile::open(&img, &ro(false)),
        Err(DiskError::DirtyLog { .. })
    ));
    let before = std::fs::read(&img).unwrap();
    {
        let v = VhdxFile::open(&img, &ro(true)).unwrap();
        assert!(v.log_was_replayed());
    }
    assert_matches(&img, &rawp, &ro(true));
    assert!(
        std::fs::read(&img).unwrap() == before,
        "read-only replay must not write"
    );

    // A writable open replays into the file and empties the log.
    let v = VhdxFile::open(&img, &OpenOptions::default()).unwrap();
    assert!(v.log_was_replayed());
    drop(v);
    assert!(current_header(&img).log_guid.is_nil());
    let v = VhdxFile::open(&img, &ro(false)).unwrap();
    assert!(!v.log_was_replayed());
    drop(v);
    assert_matches(&img, &rawp, &ro(false));
    run_ok(
        "qemu-img",
        &["compare", "-f", "vhdx", p(&img), "-F", "raw", p(&rawp)],
        120,
    );
    run_ok("qemu-img", &["check", "-f", "vhdx", p(&img)], 120);
}

#[test]
fn qemu_replays_our_dirty_log() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("b.vhdx");
    let copy = dir.path().join("b-qemu.vhdx");
    let rawp = dir.path().join("b.raw");
    let size = 48 * MIB;
    let raw = RawLayer::create(&rawp, size).unwrap();
    let v = VhdxFile::create(&img, &spec(DiskKind::Dynamic, size, 2 << 20, 512)).unwrap();
    let mut rng = Rng(5);
    for i in 0..12u64 {
        let mut d = vec![0u8; 256 * 1024];
        rng.fill(&mut d);
        let off = i * 4 * MIB + rng.below(8) * 4096;
        v.write(off, &d).unwrap();
        raw.write(off, &d).unwrap();
    }
    v.write_zeroes(40 * MIB, 4 * MIB).unwrap();
    raw.write_zeroes(40 * MIB, 4 * MIB).unwrap();
    v.debug_crash_after_log_write();
    assert!(v.flush().is_err());
    drop(v);
    std::fs::copy(&img, &copy).unwrap();
    // qemu replays our log entry (its own replay code) ...
    run_ok(
        "qemu-img",
        &["check", "-r", "all", "-f", "vhdx", p(&copy)],
        120,
    );
    run_ok(
        "qemu-img",
        &["compare", "-f", "vhdx", p(&copy), "-F", "raw", p(&rawp)],
        120,
    );
    // ... and so do we, with the same result.
    drop(VhdxFile::open(&img, &OpenOptions::default()).unwrap());
    run_ok(
        "qemu-img",
        &["compare", "-f", "vhdx", p(&img), "-F", "raw", p(&rawp)],
        120,
    );
}

/// qemu 7.2 interrupted between its log write and the BAT update (blkdebug fails the
/// BAT write) leaves an entry whose LogGuid differs from the header's; by [MS-VHDX]
/// that entry is not part of the log. qemu ignores it, and so must we.
#[test]
fn qemu_interrupted_log_is_judged_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("q.vhdx");
    let rawp = dir.path().join("q.raw");
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vhdx",
            "-o",
            "block_size=1M",
            p(&img),
            "64M",
        ],
        60,
    );
    run_ok(
        "qemu-io",
        &["-f", "vhdx", "-c", "write -P 0x5a 0 1M", p(&img)],
        60,
    );
    let sector = bat_offset(&img) / 512;
    let conf = dir.path().join("blkdebug.conf");
    std::fs::write(
        &conf,
        format!("[inject-error]\nevent = \"flush_to_os\"\nerrno = \"5\"\nsector = \"{sector}\"\n"),
    )
    .unwrap();
    let target = format!("blkdebug:{}:{}", p(&conf), p(&img));
    let out = run(
        "qemu-io",
        &["-f", "vhdx", "-c", "write -P 0xa5 8M 1M", &target],
        60,
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("Input/output error"),
        "the injected error fired: {text}"
    );
    assert!(
        !current_header(&img).log_guid.is_nil(),
        "qemu left LogGuid set: {text}"
    );
    // Read-only opens succeed for both of us: there is no valid log sequence.
    run_ok(
        "qemu-img",
        &["convert", "-f", "vhdx", "-O", "raw", p(&img), p(&rawp)],
        120,
    );
    let v = VhdxFile::open(&img, &ro(false)).unwrap();
    assert!(!v.log_was_replayed());
    drop(v);
    assert_matches(&img, &rawp, &ro(false));
    // A writable open clears the stale LogGuid; qemu agrees with the result.
    drop(VhdxFile::open(&img, &OpenOptions::default()).unwrap());
    assert!(current_header(&img).log_guid.is_nil());
    run_ok(
        "qemu-img",
        &["compare", "-f", "vhdx", p(&img), "-F", "raw", p(&rawp)],
        120,
    );
    run_ok("qemu-img", &["check", "-f", "vhdx", p(&img)], 120);
}
