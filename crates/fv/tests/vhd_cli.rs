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

/// `fv` pid of a running mount.
fn mount_pid(g: &MountGuard) -> u32 {
    g.0.as_ref().unwrap().id()
}

/// Assert `o` is a refusal (exit 3) naming the holder `pid` and its command.
fn refused_naming(o: &Output, pid: u32, command: &str) {
    assert_eq!(o.status.code(), Some(3), "{}", text(o));
    let t = text(o);
    assert!(
        t.contains(&format!("pid {pid} ({command})")) && t.contains("in use"),
        "holder pid {pid} ({command}) not named: {t}"
    );
}

/// `qemu-nbd` serving `img` read-write on `sock`; killed on drop.
struct QemuNbd(u32);
impl QemuNbd {
    /// With --fork the first process exits once the image is open (and locked)
    /// and the export is up; the socket alone appears before the image is opened.
    fn start(img: &Path, fmt: &str, sock: &Path) -> QemuNbd {
        let pidfile = sock.with_extension("pid");
        ok(
            "qemu-nbd",
            &[
                "-f",
                fmt,
                "--persistent",
                "--fork",
                "--pid-file",
                s(&pidfile),
                "--socket",
                s(sock),
                s(img),
            ],
        );
        QemuNbd(
            std::fs::read_to_string(&pidfile)
                .unwrap()
                .trim()
                .parse()
                .unwrap(),
        )
    }
    fn id(&self) -> u32 {
        self.0
    }
}
impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = run("kill", &[&self.0.to_string()]);
        // Not our child: wait until it is gone, so its lock is released.
        let start = Instant::now();
        while Path::new(&format!("/proc/{}", self.0)).exists()
            && start.elapsed() < Duration::from_secs(30)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[test]
fn two_writable_mounts_of_one_file_are_refused_read_only_ones_coexist() {
    let d = Scratch::new("lock2");
    let img = d.path("d.vhdx");
    fv_json(&["vhd", "new", s(&img), "--size", "64M"]);
    let (g, _uri, _o) = mount(&img, &d.path("a.sock"), &[]);
    let holder = mount_pid(&g);
    // A second writer, and a reader beside the writer: refused, the holder named.
    let o = fv(&["vhd", "mount", s(&img), "--nbd", s(&d.path("b.sock"))]);
    refused_naming(&o, holder, "fv");
    assert!(text(&o).contains("read-write"), "{}", text(&o));
    let o = fv(&[
        "vhd",
        "mount",
        s(&img),
        "--read-only",
        "--nbd",
        s(&d.path("b.sock")),
    ]);
    refused_naming(&o, holder, "fv");
    assert!(!d.path("b.sock").exists());
    assert!(sigterm_and_wait(g).success());

    // Readers together: two read-only mounts and qemu-img info; a writer (ours or
    // qemu-io) is refused while they run.
    let (g1, uri1, _o1) = mount(&img, &d.path("r1.sock"), &["--read-only"]);
    let (g2, uri2, _o2) = mount(&img, &d.path("r2.sock"), &["--read-only"]);
    ok("qemu-img", &["info", "-f", "vhdx", s(&img)]);
    ok("qemu-io", &["-r", "-f", "raw", "-c", "read 0 4k", &uri1]);
    ok("qemu-io", &["-r", "-f", "raw", "-c", "read 0 4k", &uri2]);
    let o = run("qemu-io", &["-f", "vhdx", "-c", "write 0 4k", s(&img)]);
    assert!(
        !o.status.success() && text(&o).contains("Failed to get \"write\" lock"),
        "{}",
        text(&o)
    );
    let o = fv(&["vhd", "mount", s(&img), "--nbd", s(&d.path("w.sock"))]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(sigterm_and_wait(g1).success());
    assert!(sigterm_and_wait(g2).success());
    // All released: qemu-io writes now.
    ok("qemu-io", &["-f", "vhdx", "-c", "write 0 4k", s(&img)]);
}

#[test]
fn qemu_nbd_and_our_mount_exclude_each_other() {
    let d = Scratch::new("lockq");
    let img = d.path("d.vhdx");
    fv_json(&["vhd", "new", s(&img), "--size", "64M"]);
    {
        let q = QemuNbd::start(&img, "vhdx", &d.path("q.sock"));
        let o = fv(&["vhd", "mount", s(&img), "--nbd", s(&d.path("f.sock"))]);
        refused_naming(&o, q.id(), "qemu-nbd");
        assert!(text(&o).contains("holding it read-write"), "{}", text(&o));
        // Read-only as well: qemu-nbd does not share writing with readers.
        let o = fv(&[
            "vhd",
            "mount",
            s(&img),
            "--read-only",
            "--nbd",
            s(&d.path("f.sock")),
        ]);
        refused_naming(&o, q.id(), "qemu-nbd");
        // As a second qemu-nbd would be.
        let o = run(
            "qemu-nbd",
            &["-f", "vhdx", "--socket", s(&d.path("q2.sock")), s(&img)],
        );
        assert!(
            !o.status.success() && text(&o).contains("lock"),
            "{}",
            text(&o)
        );
    }
    // Our writable mount keeps qemu-nbd, qemu-io and qemu-img out.
    let (g, _uri, _o) = mount(&img, &d.path("f.sock"), &[]);
    let o = run(
        "qemu-nbd",
        &["-f", "vhdx", "--socket", s(&d.path("q3.sock")), s(&img)],
    );
    assert!(
        !o.status.success() && text(&o).contains("Failed to get"),
        "qemu-nbd served a file we hold: {}",
        text(&o)
    );
    let o = run("qemu-io", &["-f", "vhdx", "-c", "write 0 4k", s(&img)]);
    assert!(
        !o.status.success() && text(&o).contains("Failed to get \"write\" lock"),
        "{}",
        text(&o)
    );
    let o = run("qemu-img", &["info", "-f", "vhdx", s(&img)]);
    assert!(
        !o.status.success() && text(&o).contains("lock"),
        "{}",
        text(&o)
    );
    assert!(sigterm_and_wait(g).success());
    // Released on exit: qemu-nbd can have it.
    drop(QemuNbd::start(&img, "vhdx", &d.path("q4.sock")));
}

#[test]
fn operations_on_an_image_in_use_are_refused_naming_the_holder() {
    let d = Scratch::new("lockops");
    let base = d.path("base.vhdx");
    let child = d.path("child.vhdx");
    let lone = d.path("lone.vhdx");
    fv_json(&["vhd", "new", s(&base), "--size", "64M"]);
    fv_json(&["vhd", "new", s(&child), "--parent", s(&base)]);
    fv_json(&["vhd", "new", s(&lone), "--size", "64M"]);
    let before = std::fs::read(&child).unwrap();

    // A writable mount of the child holds it (exclusive) and its parent (shared).
    let (g, _uri, _o) = mount(&child, &d.path("c.sock"), &[]);
    let holder = mount_pid(&g);
    let o = fv(&["vhd", "merge", s(&child), "--into-parent"]);
    refused_naming(&o, holder, "fv");
    assert!(child.exists(), "merge of a disk in use removed it");
    let o = fv(&["vhd", "set-parent", s(&child), s(&base)]);
    refused_naming(&o, holder, "fv");
    let o = fv(&["vhd", "compact", s(&child)]);
    refused_naming(&o, holder, "fv");
    // The parent is shared read-only: writing it (compact) is refused too.
    let o = fv(&["vhd", "compact", s(&base)]);
    refused_naming(&o, holder, "fv");
    assert!(sigterm_and_wait(g).success());
    assert_eq!(
        std::fs::read(&child).unwrap(),
        before,
        "refused ops changed the child"
    );

    // Held by qemu-nbd: resize and compact name it.
    let q = QemuNbd::start(&lone, "vhdx", &d.path("q.sock"));
    let o = fv(&["vhd", "resize", s(&lone), "--size", "128M"]);
    refused_naming(&o, q.id(), "qemu-nbd");
    let o = fv(&["vhd", "compact", s(&lone)]);
    refused_naming(&o, q.id(), "qemu-nbd");
    drop(q);
    fv_json(&["vhd", "resize", s(&lone), "--size", "128M"]);
    assert_eq!(qemu_info(&lone, "vhdx")["virtual-size"], 128 * MIB);
}

#[test]
fn set_parent_refuses_cycles_forced_too_and_new_parent_names_real_flags() {
    let d = Scratch::new("cycle");
    let base = d.path("base.vhd");
    let c1 = d.path("c1.vhd");
    let c2 = d.path("c2.vhd");
    fv_json(&["vhd", "new", s(&base), "--size", "16M"]);
    fv_json(&["vhd", "new", s(&c1), "--parent", s(&base)]);
    fv_json(&["vhd", "new", s(&c2), "--parent", s(&c1)]);
    for extra in [&[][..], &["--force"][..]] {
        let mut a = vec!["vhd", "set-parent", s(&c1), s(&c2)];
        a.extend(extra);
        let o = fv(&a);
        assert_eq!(o.status.code(), Some(3), "{}", text(&o));
        assert!(text(&o).contains("cycle"), "{}", text(&o));
        let mut a = vec!["vhd", "set-parent", s(&c1), s(&c1)];
        a.extend(extra);
        let o = fv(&a);
        assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    }
    // The chain is untouched and verified.
    let rep = fv_json(&["vhd", "inspect", s(&c2)]);
    assert_eq!(rep["chain"].as_array().unwrap().len(), 2, "{rep}");
    assert_eq!(rep["parent"]["verified"], true);
}

#[test]
fn check_without_repair_changes_nothing_repair_exits_0_and_damaged_convert_fails() {
    use std::os::unix::fs::FileExt;
    let d = Scratch::new("repair");
    let p = d.path("d.vhd");
    fv_json(&["vhd", "new", s(&p), "--size", "16M"]);
    ok("qemu-io", &["-f", "vpc", "-c", "write -P 1 0 4M", s(&p)]);
    // Block 1's BAT entry far past the end of the file.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    let mut hdr = [0u8; 1024];
    f.read_exact_at(&mut hdr, 512).unwrap();
    let bat = u64::from_be_bytes(hdr[16..24].try_into().unwrap());
    f.write_all_at(&0x00ff_0000u32.to_be_bytes(), bat + 4)
        .unwrap();
    drop(f);
    let damaged = std::fs::read(&p).unwrap();

    let o = fv(&["vhd", "check", s(&p)]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("nothing was changed") && t.contains("--repair"),
        "{t}"
    );
    assert!(!t.contains("repaired") && !t.contains("replayed"), "{t}");
    assert_eq!(
        std::fs::read(&p).unwrap(),
        damaged,
        "check without --repair wrote"
    );

    // Converting the damaged image fails (exit 1: damaged) and leaves no output.
    let out = d.path("out.vhdx");
    let o = fv(&["vhd", "convert", s(&p), s(&out)]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "convert of a damaged image: {}",
        text(&o)
    );
    assert!(!out.exists());

    let o = fv(&["vhd", "check", s(&p), "--repair"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("repaired") && t.contains("block 1"), "{t}");
    let v = fv_json(&["vhd", "check", s(&p), "--repair"]);
    assert_eq!(v["clean"], true, "{v}");
    assert!(
        v["repaired"].as_array().unwrap().is_empty(),
        "second repair changed: {v}"
    );
    // qemu-img has no VHD check: qemu reads it, block 0 intact, block 1 now
    // unallocated (zeros), as the repair said.
    ok("qemu-img", &["info", "-f", "vpc", s(&p)]);
    let o = ok(
        "qemu-io",
        &[
            "-r",
            "-f",
            "vpc",
            "-c",
            "read -P 1 0 2M",
            "-c",
            "read -P 0 2M 2M",
            s(&p),
        ],
    );
    assert!(!o.contains("mismatch") && !o.contains("fail"), "{o}");
}

#[test]
fn exit_codes_are_documented_and_a_closed_pipe_is_quiet() {
    let o = fv(&["vhd", "--help"]);
    let t = text(&o);
    for line in [
        "0  success",
        "1  the image is damaged",
        "2  usage",
        "3  refused",
        "4  any other",
    ] {
        assert!(t.contains(line), "--help lacks {line:?}: {t}");
    }
    // Exit 4: an I/O failure (a missing file), distinct from damage.
    let o = fv(&["vhd", "inspect", "/nonexistent/x.vhdx"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));

    // `fv -o json vhd inspect … | head`: stdout closed before fv writes.
    let d = Scratch::new("pipe");
    let p = d.path("d.vhdx");
    fv_json(&["vhd", "new", s(&p), "--size", "16M"]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_fv"))
        .args(["-o", "json", "vhd", "inspect", s(&p)])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = wait_output(child, "fv vhd inspect", Duration::from_secs(60));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(o.status.code(), Some(0), "{err}");
}
