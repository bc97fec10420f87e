//! `fv vhd …` end to end: the built binary against qemu-img, qemu-io and vhdiinfo.
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// A unique scratch directory, removed on drop (tests run in parallel).
struct Scratch(PathBuf);
impl Scratch {
    fn new(tag: &str) -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "fv-vhd-cli-{tag}-{}-{}",
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

fn wait_output(mut child: Child, what: &str, timeout: Duration) -> Output {
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{what} timed out; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run(cmd: &str, args: &[&str]) -> Output {
    let child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd} is required for this test (scripts/install-deps): {e}"));
    wait_output(child, &format!("{cmd} {args:?}"), Duration::from_secs(180))
}

fn fv(args: &[&str]) -> Output {
    run(env!("CARGO_BIN_EXE_fv"), args)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Run `fv … -o json`, expect success, parse stdout.
fn fv_json(args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    let o = fv(&a);
    assert!(
        o.status.success(),
        "fv {args:?}: {}\n{}",
        o.status,
        text(&o)
    );
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("fv {args:?}: bad JSON ({e}): {}", text(&o)))
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

fn qemu_info(p: &Path, fmt: &str) -> serde_json::Value {
    serde_json::from_str(&ok(
        "qemu-img",
        &["info", "-f", fmt, "--output=json", p.to_str().unwrap()],
    ))
    .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn new_dynamic_vhdx_is_what_qemu_and_libvhdi_see() {
    let d = Scratch::new("newx");
    let p = d.path("d.vhdx");
    let rep = fv_json(&["vhd", "new", s(&p), "--size", "64M"]);
    assert_eq!(rep["format"], "vhdx");
    assert_eq!(rep["type"], "dynamic");
    assert_eq!(rep["virtual_size"], 64 * MIB);
    let q = qemu_info(&p, "vhdx");
    assert_eq!(q["format"], "vhdx");
    assert_eq!(q["virtual-size"], 64 * MIB);
    ok("qemu-img", &["check", "-f", "vhdx", s(&p)]);
    // Human output names the properties.
    let o = fv(&["vhd", "inspect", s(&p)]);
    assert!(o.status.success());
    let t = text(&o);
    assert!(
        t.contains("virtual size") && t.contains("64 MiB") && t.contains("dynamic"),
        "{t}"
    );

    // 4 KiB logical sectors (QEMU 7.2's vhdx driver only opens 512-byte ones).
    let p4 = d.path("d4k.vhdx");
    let rep = fv_json(&[
        "vhd",
        "new",
        s(&p4),
        "--size",
        "1G",
        "--logical-sector",
        "4096",
        "--fixed",
    ]);
    assert_eq!(rep["logical_sector_size"], 4096);
    assert_eq!(rep["type"], "fixed");
    let vi = ok("vhdiinfo", &[s(&p4)]);
    assert!(
        vi.contains("VHDX")
            && vi.contains("Fixed")
            && vi.contains("4096 bytes")
            && vi.contains("1073741824 bytes"),
        "{vi}"
    );
}

#[test]
fn new_fixed_and_dynamic_vhd_match_qemu_and_libvhdi() {
    let d = Scratch::new("newv");
    let fixed = d.path("f.vhd");
    let rep = fv_json(&["vhd", "new", s(&fixed), "--size", "16M", "--fixed"]);
    assert_eq!(rep["type"], "fixed");
    assert_eq!(qemu_info(&fixed, "vpc")["virtual-size"], 16 * MIB);
    let vi = ok("vhdiinfo", &[s(&fixed)]);
    assert!(vi.contains("Fixed") && vi.contains("16 MiB"), "{vi}");

    let dynamic = d.path("d.vhd");
    fv_json(&[
        "vhd",
        "new",
        s(&dynamic),
        "--size",
        "1G",
        "--dynamic",
        "--block-size",
        "512K",
    ]);
    let vi = ok("vhdiinfo", &[s(&dynamic)]);
    assert!(vi.contains("Dynamic"), "{vi}");
    let q = qemu_info(&dynamic, "vpc");
    assert_eq!(q["format"], "vpc");
    assert!(q["virtual-size"].as_u64().unwrap() >= 1 << 30);
    let rep = fv_json(&["vhd", "inspect", s(&dynamic)]);
    assert_eq!(rep["block_size"], 512 << 10);

    // Bad arguments are usage errors (exit 2), one line.
    let o = fv(&["vhd", "new", s(&d.path("x.qcow2")), "--size", "1M"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let o = fv(&["vhd", "new", s(&d.path("y.vhd")), "--size", "lots"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stderr).trim().lines().count(), 1);
}

/// QEMU reads neither differencing VHD nor differencing VHDX, so chains are written
/// and read through `fv vhd mount` (NBD) with qemu-io, and flattened results are
/// checked with qemu directly.
#[test]
fn differencing_chain_merge_and_convert() {
    let d = Scratch::new("chain");
    let base = d.path("base.vhd");
    let child = d.path("child.vhd");
    let sib = d.path("sibling.vhd");
    fv_json(&["vhd", "new", s(&base), "--size", "32M"]);
    ok(
        "qemu-io",
        &["-f", "vpc", "-c", "write -P 0x11 0 8M", s(&base)],
    );
    let rep = fv_json(&["vhd", "new", s(&child), "--parent", s(&base)]);
    assert_eq!(rep["type"], "differencing");
    assert_eq!(rep["parent"]["verified"], true);
    let vi = ok("vhdiinfo", &[s(&child)]);
    assert!(
        vi.contains("Differential") || vi.contains("Differencing"),
        "{vi}"
    );
    assert!(
        vi.contains("base.vhd"),
        "libvhdi sees the parent name: {vi}"
    );

    // Write into the child through our NBD export; read the chain back the same way.
    let (g, uri, _o) = mount(&child, &d.path("c.sock"), &[]);
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x22 4M 2M",
            "-c",
            "read -P 0x11 0 4M",
            &uri,
        ],
    );
    assert!(sigterm_and_wait(g).success());
    fv_json(&["vhd", "new", s(&sib), "--parent", s(&base)]);

    // Flatten into a new raw disk; the bytes are base + child.
    let flat = d.path("flat.raw");
    fv_json(&["vhd", "merge", s(&child), "--to", s(&flat)]);
    let o = ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x11 0 4M",
            "-c",
            "read -P 0x22 4M 2M",
            "-c",
            "read -P 0x11 6M 2M",
            "-c",
            "read -P 0 8M 24M",
            s(&flat),
        ],
    );
    assert!(!o.contains("fail"), "{o}");

    // Convert the chain to a dynamic VHD as well.
    let conv = d.path("conv.vhd");
    fv_json(&["vhd", "convert", s(&child), s(&conv)]);
    ok(
        "qemu-img",
        &["compare", "-f", "vpc", "-F", "raw", s(&conv), s(&flat)],
    );

    // Resizing a parent with children, merging with a sibling: refused (exit 3).
    let o = fv(&["vhd", "resize", s(&base), "--size", "64M"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let o = fv(&["vhd", "merge", s(&child), "--into-parent"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("sibling.vhd"),
        "{}",
        text(&o)
    );
    // Neither --into-parent nor --to: usage error.
    assert_eq!(fv(&["vhd", "merge", s(&child)]).status.code(), Some(2));

    std::fs::remove_file(&sib).unwrap();
    let rep = fv_json(&["vhd", "merge", s(&child), "--into-parent"]);
    assert_eq!(rep["operation"], "merge");
    assert!(!child.exists(), "child removed after merge");
    ok(
        "qemu-img",
        &["compare", "-f", "vpc", "-F", "raw", s(&base), s(&flat)],
    );

    // Now childless: resize works and qemu sees the new size.
    fv_json(&["vhd", "resize", s(&base), "--size", "64M"]);
    assert!(qemu_info(&base, "vpc")["virtual-size"].as_u64().unwrap() >= 64 * MIB);
}

#[test]
fn set_parent_after_move_and_allow_dir() {
    let d = Scratch::new("setp");
    std::fs::create_dir_all(d.path("a")).unwrap();
    std::fs::create_dir_all(d.path("b")).unwrap();
    std::fs::create_dir_all(d.path("c")).unwrap();
    let base = d.path("a/base.vhd");
    let child = d.path("c/child.vhd");
    fv_json(&["vhd", "new", s(&base), "--size", "16M"]);
    ok(
        "qemu-io",
        &["-f", "vpc", "-c", "write -P 0x5a 0 1M", s(&base)],
    );
    fv_json(&["vhd", "new", s(&child), "--parent", s(&base)]);
    // The parent lives outside the child's directory: it takes --allow-dir.
    let rep = fv_json(&["vhd", "inspect", s(&child)]);
    assert_eq!(rep["parent"]["verified"], false);
    let rep = fv_json(&["vhd", "inspect", s(&child), "--allow-dir", s(&d.path("a"))]);
    assert_eq!(rep["parent"]["verified"], true, "{rep}");

    let moved = d.path("b/base.vhd");
    std::fs::rename(&base, &moved).unwrap();
    let rep = fv_json(&["vhd", "inspect", s(&child), "--allow-dir", s(&d.path("a"))]);
    assert_eq!(rep["parent"]["verified"], false);
    fv_json(&["vhd", "set-parent", s(&child), s(&moved)]);
    let rep = fv_json(&["vhd", "inspect", s(&child), "--allow-dir", s(&d.path("b"))]);
    assert_eq!(rep["parent"]["verified"], true, "{rep}");
    let (g, uri, _o) = mount(
        &child,
        &d.path("sp.sock"),
        &["--read-only", "--allow-dir", s(&d.path("b"))],
    );
    ok(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x5a 0 1M", &uri],
    );
    assert!(sigterm_and_wait(g).success());

    // A different disk of the same size is not accepted as the parent without --force.
    let other = d.path("b/other.vhd");
    fv_json(&["vhd", "new", s(&other), "--size", "16M"]);
    let o = fv(&["vhd", "set-parent", s(&child), s(&other)]);
    assert!(!o.status.success(), "{}", text(&o));
}

#[test]
fn check_reports_damage_and_exits_1() {
    use std::os::unix::fs::FileExt;
    let d = Scratch::new("check");
    let p = d.path("d.vhd");
    fv_json(&["vhd", "new", s(&p), "--size", "16M"]);
    ok("qemu-io", &["-f", "vpc", "-c", "write -P 1 0 1M", s(&p)]);
    let rep = fv_json(&["vhd", "check", s(&p)]);
    assert_eq!(rep["clean"], true);
    // Point the first BAT entry far past the end of the file.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    let mut hdr = [0u8; 1024];
    f.read_exact_at(&mut hdr, 512).unwrap();
    let bat = u64::from_be_bytes(hdr[16..24].try_into().unwrap());
    f.write_all_at(&0x00ff_0000u32.to_be_bytes(), bat).unwrap();
    drop(f);
    let o = fv(&["vhd", "check", s(&p)]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("error"), "{}", text(&o));
}

/// Kills `fv vhd mount` if a test fails before it exits.
struct MountGuard(Option<Child>);
impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn mount(
    image: &Path,
    sock: &Path,
    extra: &[&str],
) -> (MountGuard, String, BufReader<std::process::ChildStdout>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fv"))
        .args(["vhd", "mount", s(image), "--nbd", s(sock), "-o", "json"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let guard = MountGuard(Some(child));
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("mount said {line:?}: {e}"));
    (guard, v["uri"].as_str().unwrap().to_string(), out)
}

fn sigterm_and_wait(mut g: MountGuard) -> std::process::ExitStatus {
    let mut c = g.0.take().unwrap();
    ok("kill", &["-TERM", &c.id().to_string()]);
    let start = Instant::now();
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            return st;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = c.kill();
            let _ = c.wait();
            panic!("fv vhd mount did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn mount_serves_nbd_and_writes_land_in_the_vhdx() {
    let d = Scratch::new("mount");
    let img = d.path("d.vhdx");
    let sock = d.path("nbd.sock");
    let reference = d.path("ref.raw");
    // 32 MiB VHDX blocks: 256 MiB leaves unallocated blocks to report as holes.
    fv_json(&["vhd", "new", s(&img), "--size", "256M"]);
    let (g, uri, _out) = mount(&img, &sock, &[]);
    assert!(
        uri.starts_with("nbd+unix://") && uri.contains(s(&sock)),
        "{uri}"
    );
    let writes = [
        "write -P 0x33 0 1M",
        "write -P 0x44 40M 3M",
        "write -z -u 40M 64k",
    ];
    let mut args = vec!["-f", "raw"];
    for w in &writes {
        args.extend(["-c", w]);
    }
    args.push(&uri);
    let o = ok("qemu-io", &args);
    assert!(!o.contains("failed"), "{o}");
    // Block status of the export: the written ranges are data, the rest a hole.
    let map: serde_json::Value = serde_json::from_str(&ok(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &uri],
    ))
    .unwrap();
    let first = &map[0];
    assert_eq!(
        (first["start"].as_u64(), first["data"].as_bool()),
        (Some(0), Some(true)),
        "{map}"
    );
    assert!(
        map.as_array()
            .unwrap()
            .iter()
            .any(|e| e["data"] == false && e["zero"] == true),
        "unwritten space is reported as a hole: {map}"
    );
    let st = sigterm_and_wait(g);
    assert!(st.success(), "mount exit status {st}");
    assert!(!sock.exists(), "socket removed on shutdown");

    // The same writes on a raw file give the same disk content.
    std::fs::write(&reference, vec![0u8; 256 * MIB as usize]).unwrap();
    let mut args = vec!["-f", "raw"];
    for w in &writes {
        args.extend(["-c", w]);
    }
    args.push(s(&reference));
    ok("qemu-io", &args);
    ok(
        "qemu-img",
        &["compare", "-f", "vhdx", "-F", "raw", s(&img), s(&reference)],
    );
    ok("qemu-img", &["check", "-f", "vhdx", s(&img)]);
}

#[test]
fn read_only_mount_refuses_writes_and_leaves_the_file_alone() {
    let d = Scratch::new("mountro");
    let img = d.path("d.vhd");
    let sock = d.path("ro.sock");
    fv_json(&["vhd", "new", s(&img), "--size", "8M"]);
    ok(
        "qemu-io",
        &["-f", "vpc", "-c", "write -P 0x61 0 1M", s(&img)],
    );
    let before = std::fs::read(&img).unwrap();
    let (g, uri, _out) = mount(&img, &sock, &["--read-only"]);
    ok(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x61 0 1M", &uri],
    );
    let o = run("qemu-io", &["-f", "raw", "-c", "write -P 1 0 4k", &uri]);
    assert!(
        !o.status.success() || text(&o).contains("failed"),
        "{}",
        text(&o)
    );
    assert!(sigterm_and_wait(g).success());
    assert_eq!(std::fs::read(&img).unwrap(), before);

    // A second mount on a socket that is in use is refused (exit 3).
    let (g, _uri, _out) = mount(&img, &sock, &["--read-only"]);
    let o = fv(&["vhd", "mount", s(&img), "--read-only", "--nbd", s(&sock)]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(sigterm_and_wait(g).success());
}
