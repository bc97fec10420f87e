//! `fv vhd convert --block-size` end to end: the built binary, checked with
//! qemu-img (block size, content) and vhdiinfo (the image opens, its type).
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

const MIB: u64 = 1 << 20;

/// A unique scratch directory, removed on drop (tests run in parallel).
struct Scratch(PathBuf);
impl Scratch {
    fn new(tag: &str) -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "fv-vhd-convert-cli-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd} is required for this test (scripts/install-deps): {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(cmd: &str, args: &[&str]) -> String {
    let o = run(cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}\n{}",
        o.status,
        text(&o)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn fv(args: &[&str]) -> Output {
    run(env!("CARGO_BIN_EXE_fv"), args)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn cluster_size(p: &Path, fmt: &str) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&ok("qemu-img", &["info", "--output=json", "-f", fmt, s(p)])).unwrap();
    v["cluster-size"].as_u64().unwrap()
}

#[test]
fn convert_block_size_is_what_qemu_img_and_vhdiinfo_see() {
    let d = Scratch::new("bs");
    let raw = d.path("src.raw");
    // 64 MiB with data at both ends, made by qemu-io.
    ok("qemu-img", &["create", "-q", "-f", "raw", s(&raw), "64M"]);
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 3M",
            "-c",
            "write -P 0xa5 60M 4M",
            s(&raw),
        ],
    );
    for (bs, bytes) in [("1M", MIB), ("8M", 8 * MIB), ("256M", 256 * MIB)] {
        let out = d.path(&format!("b{bs}.vhdx"));
        ok(
            env!("CARGO_BIN_EXE_fv"),
            &["vhd", "convert", s(&raw), s(&out), "--block-size", bs],
        );
        assert_eq!(cluster_size(&out, "vhdx"), bytes, "{bs}");
        ok(
            "qemu-img",
            &["compare", "-f", "vhdx", "-F", "raw", s(&out), s(&raw)],
        );
        let vi = ok("vhdiinfo", &[s(&out)]);
        assert!(vi.contains("VHDX") && vi.contains("Dynamic"), "{vi}");
    }
    let out = d.path("b64.fixed.vhdx");
    ok(
        env!("CARGO_BIN_EXE_fv"),
        &[
            "vhd",
            "convert",
            s(&raw),
            s(&out),
            "--fixed",
            "--block-size",
            "64M",
        ],
    );
    assert_eq!(cluster_size(&out, "vhdx"), 64 * MIB);
    for (bs, bytes) in [("512K", 512 << 10), ("4M", 4 * MIB)] {
        let out = d.path(&format!("b{bs}.vhd"));
        ok(
            env!("CARGO_BIN_EXE_fv"),
            &["vhd", "convert", s(&raw), s(&out), "--block-size", bs],
        );
        assert_eq!(cluster_size(&out, "vpc"), bytes, "{bs}");
        ok(
            "qemu-img",
            &["compare", "-f", "vpc", "-F", "raw", s(&out), s(&raw)],
        );
        let vi = ok("vhdiinfo", &[s(&out)]);
        assert!(vi.contains("VHD") && vi.contains("Dynamic"), "{vi}");
    }
}

#[test]
fn convert_refuses_block_sizes_the_format_does_not_allow() {
    let d = Scratch::new("bad");
    let raw = d.path("src.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", s(&raw), "16M"]);
    for (dst, extra, why) in [
        (
            "a.vhdx",
            vec!["--block-size", "3M"],
            "power of two from 1 MiB",
        ),
        (
            "b.vhdx",
            vec!["--block-size", "512K"],
            "power of two from 1 MiB",
        ),
        ("c.vhdx", vec!["--block-size", "512M"], "to 256 MiB"),
        ("d.vhd", vec!["--block-size", "256K"], "from 512 KiB"),
        ("e.vhd", vec!["--block-size", "2M", "--fixed"], "fixed VHD"),
        ("f.raw", vec!["--block-size", "2M"], "raw image"),
        ("g.vhdx", vec!["--block-size", "8G"], "256 MiB"),
        ("h.vhdx", vec!["--block-size", "lots"], ""),
    ] {
        let out = d.path(dst);
        let mut args = vec!["vhd", "convert", s(&raw), s(&out)];
        args.extend(extra.iter().copied());
        let o = fv(&args);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {t}");
        assert!(t.contains(why), "{args:?}: {t}");
        if extra[1] != "lots" {
            assert!(t.contains("--block-size"), "{args:?}: {t}");
        }
        assert!(!out.exists(), "{args:?}");
    }
}
