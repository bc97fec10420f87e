//! The server against real NBD clients: qemu-io, qemu-img map/compare/info.
mod common;

use common::{ok, qemu_io, run, TrackedRaw};
use fv_nbd::{ExportOptions, ListenAddr, Server};
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn serve_unix(
    dir: &std::path::Path,
    dev: TrackedRaw,
    opts: ExportOptions,
) -> fv_nbd::RunningServer {
    let sock = dir.join("nbd.sock");
    Server::bind(&ListenAddr::Unix(sock), Arc::new(dev), opts)
        .unwrap()
        .spawn()
}

fn pattern_at(path: &std::path::Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, offset).unwrap();
    b
}

#[test]
fn qemu_io_writes_land_in_the_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let srv = serve_unix(
        dir.path(),
        TrackedRaw::create(&img, 8 * MIB),
        ExportOptions::default(),
    );
    let uri = srv.uri().to_string();
    assert!(uri.starts_with("nbd+unix:///?socket="), "{uri}");

    qemu_io(
        &uri,
        &[
            "write -P 0x33 0 1M",
            "read -P 0x33 0 1M",
            // FUA write, and an unaligned write qemu must split using our block sizes.
            "write -f -P 0x44 2M 64k",
            "write -P 0x55 3000 5000",
            "read -P 0x55 3000 5000",
            "read -P 0x33 0 3000",
            "read -P 0x33 8000 1040576",
            "flush",
        ],
    );
    srv.stop().unwrap();
    assert!(pattern_at(&img, 0, 3000).iter().all(|&b| b == 0x33));
    assert!(pattern_at(&img, 3000, 5000).iter().all(|&b| b == 0x55));
    assert!(pattern_at(&img, 8000, (MIB - 8000) as usize)
        .iter()
        .all(|&b| b == 0x33));
    assert!(pattern_at(&img, 2 * MIB, 65536).iter().all(|&b| b == 0x44));
    assert!(pattern_at(&img, 2 * MIB + 65536, 4096)
        .iter()
        .all(|&b| b == 0));
}

#[test]
fn qemu_img_info_and_compare_see_the_export() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let srv = serve_unix(
        dir.path(),
        TrackedRaw::create(&img, 16 * MIB),
        ExportOptions::default(),
    );
    let uri = srv.uri().to_string();
    qemu_io(&uri, &["write -P 0xa5 1M 3M", "write -P 0x5a 10M 512"]);

    let info: serde_json::Value =
        serde_json::from_str(&ok("qemu-img", &["info", "--output=json", &uri])).unwrap();
    assert_eq!(info["virtual-size"], 16 * MIB);

    // Same bytes through NBD as in the file...
    ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            img.to_str().unwrap(),
            &uri,
        ],
    );
    // ...and a different file is reported different (exit 1), so compare really looks.
    let other = dir.path().join("other.raw");
    std::fs::write(&other, vec![0u8; 16 * MIB as usize]).unwrap();
    let out = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            other.to_str().unwrap(),
            &uri,
        ],
        Duration::from_secs(60),
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    drop(srv);
}

#[test]
fn qemu_img_map_reports_block_status() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let srv = serve_unix(
        dir.path(),
        TrackedRaw::create(&img, 8 * MIB),
        ExportOptions::default(),
    );
    let uri = srv.uri().to_string();
    qemu_io(
        &uri,
        &[
            "write -P 0x11 0 1M",
            // -z -u: WRITE_ZEROES that may punch holes -> the device's Zero state.
            "write -z -u 2M 1M",
            // -z alone sends NO_HOLE: zeros must be written as data.
            "write -P 0x33 6M 1M",
            "write -z 6M 1M",
            "write -P 0x22 4M 1M",
            "discard 4M 512k",
        ],
    );
    let map: serde_json::Value = serde_json::from_str(&ok(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &uri],
    ))
    .unwrap();
    let got: Vec<(u64, u64, bool, bool)> = map
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
                e["zero"].as_bool().unwrap(),
            )
        })
        .collect();
    // Data -> data; Absent (HOLE|ZERO) -> hole reading zero; Zero (ZERO) -> data+zero.
    assert_eq!(
        got,
        vec![
            (0, MIB, true, false),
            (MIB, MIB, false, true),
            (2 * MIB, MIB, true, true),
            (3 * MIB, MIB + MIB / 2, false, true),
            (4 * MIB + MIB / 2, MIB / 2, true, false),
            (5 * MIB, MIB, false, true),
            (6 * MIB, MIB, true, false),
            (7 * MIB, MIB, false, true),
        ],
        "{map}"
    );
    drop(srv);
}

#[test]
fn read_only_export_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    std::fs::write(&img, vec![0x77u8; 2 * MIB as usize]).unwrap();
    let opts = ExportOptions {
        read_only: true,
        ..Default::default()
    };
    let srv = serve_unix(dir.path(), TrackedRaw::open(&img, true), opts);
    let uri = srv.uri().to_string();
    let out = ok(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x77 0 2M", &uri],
    );
    assert!(!out.contains("fail"), "{out}");
    // qemu sees NBD_FLAG_READ_ONLY and refuses a read-write open.
    let out = run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 0 4k", &uri],
        Duration::from_secs(60),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success() && text.contains("Permission denied"),
        "read-write open of a read-only export was not refused: {text}"
    );
    srv.stop().unwrap();
    assert!(pattern_at(&img, 0, 4096).iter().all(|&b| b == 0x77));
}

#[test]
fn concurrent_clients_over_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let opts = ExportOptions {
        name: "disk0".into(),
        ..Default::default()
    };
    let srv = Server::bind(
        &ListenAddr::Tcp("127.0.0.1:0".into()),
        Arc::new(TrackedRaw::create(&img, 32 * MIB)),
        opts,
    )
    .unwrap()
    .spawn();
    let uri = srv.uri().to_string();
    assert!(
        uri.starts_with("nbd://127.0.0.1:") && uri.ends_with("/disk0"),
        "{uri}"
    );
    let workers: Vec<_> = (0..4u64)
        .map(|i| {
            let uri = uri.clone();
            std::thread::spawn(move || {
                let w = format!("write -P {} {}M 8M", 0x10 + i, i * 8);
                let r = format!("read -P {} {}M 8M", 0x10 + i, i * 8);
                qemu_io(&uri, &[w.as_str(), r.as_str()]);
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    for i in 0..4u64 {
        let cmd = format!("read -P {} {}M 8M", 0x10 + i, i * 8);
        qemu_io(&uri, &[cmd.as_str()]);
    }
    let summary = srv.stop().unwrap();
    assert_eq!(summary.connections, 8);
}
