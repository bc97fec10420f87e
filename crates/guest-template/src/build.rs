//! Assembles the guest from extracted packages: initramfs, kernel, data disk and
//! the BIOS-bootable disk. Everything is done on plain files (no mounts, no root).
use crate::apt::{self, PackageSet};
use crate::cpio::CpioWriter;
use crate::{elf, guest_files as gf, io_err, run, TemplateError};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

pub const BIOS_DISK: &str = "bios-disk.img";
pub const KERNEL: &str = "vmlinuz";
pub const INITRD: &str = "initrd.gz";
pub const DATA_DISK: &str = "data-disk.img";

const MIB: u64 = 1024 * 1024;
const SECTOR: u64 = 512;
/// BIOS disk layout: 1 MiB gap, 48 MiB FAT16 boot partition, ext4 data in the rest.
const DISK_SIZE: u64 = 128 * MIB;
const P1_START: u64 = MIB;
const P1_SIZE: u64 = 48 * MIB;
const P2_START: u64 = P1_START + P1_SIZE;
const P2_SIZE: u64 = DISK_SIZE - P2_START;
/// Size of the separate data disk for direct boot.
const DATA_DISK_SIZE: u64 = 64 * MIB;
pub const DATA_LABEL: &str = "fvdata";

/// Kernel arguments shared by both variants. `quiet` matters most under TCG:
/// every console byte is an emulated UART write.
/// `edd=off` skips BIOS disk probing in the real-mode setup; `mitigations=off`
/// drops page-table isolation, whose CR3 switches flush TCG's soft TLB.
/// `cryptomgr.notests` skips the boot-time crypto self-tests; the blacklisted
/// initcalls are a KDF self-test and kprobe-event setup (~0.5 s under TCG).
pub const BASE_CMDLINE: &str = "rdinit=/init quiet loglevel=3 edd=off tsc=reliable no_timer_check \
     mitigations=off cryptomgr.notests initcall_blacklist=crypto_kdf108_init,init_kprobe_trace";

pub fn direct_cmdline() -> String {
    format!("console=ttyS0 {BASE_CMDLINE}")
}

/// Modules the guest cannot work without (unless built into the kernel).
const REQUIRED_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "ext4",
];

/// Loaded when the flavour ships them (the cloud kernel has no e1000/ahci).
/// Missing hardware makes an insmod fail harmlessly in the guest.
const OPTIONAL_MODULES: &[&str] = &[
    "virtio_scsi",
    "virtio_rng",
    "virtio_balloon",
    "e1000",
    "e1000e",
    "ata_piix",
    "ahci",
    "sd_mod",
    "sr_mod",
    "isofs",
    "crc32c_generic",
    "crc32c_intel",
    "button",
    "evdev",
    "hv_vmbus",
    "hv_storvsc",
    "hv_netvsc",
    "hv_utils",
];

/// Busybox applets not linked into the guest: PID 1 is our script, and
/// /sbin/shutdown is ours (busybox has none; explicit to be safe).
const SKIP_APPLETS: &[&str] = &["init", "linuxrc", "shutdown"];

/// Everything besides package versions that shapes the output; hashed into the cache key.
pub fn recipe_fingerprint() -> String {
    let mut s = String::new();
    for part in [
        gf::INIT,
        gf::FV_HALT,
        gf::SHUTDOWN,
        gf::ACPI_POWER,
        gf::UDHCPC_SCRIPT,
        gf::PROFILE,
        gf::HELLO,
        gf::OS_RELEASE,
        BASE_CMDLINE,
        &syslinux_cfg(),
        &REQUIRED_MODULES.join(","),
        &OPTIONAL_MODULES.join(","),
        &format!("{DISK_SIZE}/{P1_SIZE}/{DATA_DISK_SIZE}"),
    ] {
        s.push_str(part);
        s.push('\0');
    }
    s
}

pub struct Built {
    pub kernel_version: String,
    pub modules: Vec<String>,
    pub libs: Vec<String>,
}

fn norm_mod(name: &str) -> String {
    name.replace('-', "_")
}

/// Follows symlinks inside `root` (absolute targets are re-rooted there).
fn resolve_in_root(root: &Path, rel: &Path) -> Option<PathBuf> {
    let mut p = root.join(rel.strip_prefix("/").unwrap_or(rel));
    for _ in 0..40 {
        let md = fs::symlink_metadata(&p).ok()?;
        if !md.file_type().is_symlink() {
            return Some(p);
        }
        let t = fs::read_link(&p).ok()?;
        p = if t.is_absolute() {
            root.join(t.strip_prefix("/").ok()?)
        } else {
            p.parent()?.join(t)
        };
    }
    None
}

fn read(p: &Path) -> Result<Vec<u8>, TemplateError> {
    fs::read(p).map_err(|e| io_err(p, e))
}

/// The initramfs tree, kept in memory and then serialised to cpio.
#[derive(Default)]
struct Tree {
    entries: BTreeMap<String, Node>,
}

enum Node {
    Dir,
    File(u32, Vec<u8>),
    Link(String),
    Char(u32, u32),
}

impl Tree {
    fn dir(&mut self, p: &str) {
        let mut acc = String::new();
        for part in p.split('/') {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(part);
            self.entries.entry(acc.clone()).or_insert(Node::Dir);
        }
    }
    fn parent(&mut self, p: &str) {
        if let Some((d, _)) = p.rsplit_once('/') {
            self.dir(d);
        }
    }
    fn file(&mut self, p: &str, perm: u32, data: Vec<u8>) {
        self.parent(p);
        self.entries.insert(p.to_string(), Node::File(perm, data));
    }
    fn link(&mut self, p: &str, target: &str) {
        self.parent(p);
        self.entries
            .insert(p.to_string(), Node::Link(target.to_string()));
    }
    fn write_cpio<W: Write>(&self, w: W) -> std::io::Result<W> {
        let mut c = CpioWriter::new(w);
        // BTreeMap order puts every parent before its children.
        for (name, node) in &self.entries {
            match node {
                Node::Dir => c.dir(name, if name == "tmp" { 0o1777 } else { 0o755 })?,
                Node::File(perm, data) => c.file(name, *perm, data)?,
                Node::Link(t) => c.symlink(name, t)?,
                Node::Char(ma, mi) => c.char_dev(name, 0o600, *ma, *mi)?,
            }
        }
        c.finish()
    }
}

/// Builds all artefacts into `out` (which exists and is empty).
pub fn build(set: &PackageSet, work: &Path, out: &Path) -> Result<Built, TemplateError> {
    let debs_dir = work.join("debs");
    let kroot = work.join("kernel");
    let proot = work.join("pkgroot");
    for d in [&debs_dir, &kroot, &proot] {
        fs::create_dir_all(d).map_err(|e| io_err(d, e))?;
    }
    let debs = apt::download(set, &debs_dir)?;
    for deb in &debs {
        let is_kernel = deb
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&format!("{}_", set.kernel_pkg)));
        apt::extract(deb, if is_kernel { &kroot } else { &proot })?;
    }

    let mut tree = Tree::default();
    for d in [
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "data",
        "root",
        "var",
        "etc/acpi/PWRF",
    ] {
        tree.dir(d);
    }
    tree.dir("usr/bin");
    tree.dir("usr/sbin");
    tree.dir("usr/lib/x86_64-linux-gnu");
    tree.dir("usr/lib64");
    // Merged /usr layout: the dynamic loader's default paths all land in usr/lib.
    tree.link("bin", "usr/bin");
    tree.link("sbin", "usr/sbin");
    tree.link("lib", "usr/lib");
    tree.link("lib64", "usr/lib64");
    tree.link("var/run", "../run");
    tree.entries.insert("dev/console".into(), Node::Char(5, 1));
    tree.entries.insert("dev/null".into(), Node::Char(1, 3));

    // busybox-static: the binary plus one symlink per applet.
    let bb = resolve_in_root(&proot, Path::new("bin/busybox"))
        .ok_or_else(|| TemplateError::Build("busybox-static did not provide bin/busybox".into()))?;
    // --list-full gives each applet's conventional directory (sbin/hwclock, ...):
    // qemu-ga runs some helpers by absolute path.
    let list = run(Command::new(&bb).arg("--list-full"))?;
    tree.file("usr/bin/busybox", 0o755, read(&bb)?);
    let mut applets = BTreeSet::new();
    for full in list.lines().map(str::trim).filter(|a| !a.is_empty()) {
        let (dir, applet) = full.rsplit_once('/').unwrap_or(("bin", full));
        if SKIP_APPLETS.contains(&applet) || applet == "busybox" || applet.is_empty() {
            continue;
        }
        let (path, target) = match dir.trim_start_matches("usr/") {
            "bin" => (format!("usr/bin/{applet}"), "busybox"),
            "sbin" => (format!("usr/sbin/{applet}"), "../bin/busybox"),
            _ => continue,
        };
        tree.link(&path, target);
        applets.insert(applet.to_string());
    }
    for a in [
        "acpid", "mdev", "ip", "ifconfig", "route", "udhcpc", "insmod", "modprobe", "poweroff",
        "reboot", "halt",
    ] {
        if applets.contains(a) {
            continue;
        }
        return Err(TemplateError::Build(format!(
            "busybox-static lacks the `{a}` applet"
        )));
    }

    // qemu-ga and every shared object it needs (transitively), plus the loader.
    let qga = resolve_in_root(&proot, Path::new("usr/sbin/qemu-ga")).ok_or_else(|| {
        TemplateError::Build("qemu-guest-agent did not provide usr/sbin/qemu-ga".into())
    })?;
    let qga_bytes = read(&qga)?;
    let qga_elf = elf::parse(&qga_bytes)
        .ok_or_else(|| TemplateError::Build("qemu-ga is not ELF64".into()))?;
    let interp = qga_elf
        .interp
        .clone()
        .ok_or_else(|| TemplateError::Build("qemu-ga has no PT_INTERP".into()))?;
    tree.file("usr/sbin/qemu-ga", 0o755, qga_bytes);
    let ld = resolve_in_root(&proot, Path::new(&interp)).ok_or_else(|| {
        TemplateError::Build(format!(
            "dynamic loader {interp} not found in the extracted packages"
        ))
    })?;
    let ld_name = Path::new(&interp)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("ld-linux-x86-64.so.2")
        .to_string();
    tree.file(&format!("usr/lib64/{ld_name}"), 0o755, read(&ld)?);
    tree.link(
        &format!("usr/lib/x86_64-linux-gnu/{ld_name}"),
        &format!("../../lib64/{ld_name}"),
    );
    let lib_dirs = [
        "lib/x86_64-linux-gnu",
        "usr/lib/x86_64-linux-gnu",
        "lib64",
        "usr/lib64",
        "lib",
        "usr/lib",
    ];
    let mut queue: Vec<String> = qga_elf.needed;
    let mut libs: BTreeSet<String> = BTreeSet::new();
    while let Some(soname) = queue.pop() {
        if soname == ld_name || !libs.insert(soname.clone()) {
            continue;
        }
        let found = lib_dirs
            .iter()
            .find_map(|d| resolve_in_root(&proot, &Path::new(d).join(&soname)));
        let path = found.ok_or_else(|| {
            TemplateError::Build(format!(
                "shared library {soname} (needed by qemu-ga) not in the downloaded packages"
            ))
        })?;
        let bytes = read(&path)?;
        let info = elf::parse(&bytes)
            .ok_or_else(|| TemplateError::Build(format!("{soname} is not ELF64")))?;
        queue.extend(info.needed);
        tree.file(&format!("usr/lib/x86_64-linux-gnu/{soname}"), 0o755, bytes);
    }

    // Kernel and modules.
    let moddir_parent = kroot.join("lib/modules");
    let kernel_version = fs::read_dir(&moddir_parent)
        .map_err(|e| io_err(&moddir_parent, e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .next()
        .ok_or_else(|| {
            TemplateError::Build("kernel package has no lib/modules/<version>".into())
        })?;
    let vmlinuz = kroot.join(format!("boot/vmlinuz-{kernel_version}"));
    fs::copy(&vmlinuz, out.join(KERNEL)).map_err(|e| io_err(&vmlinuz, e))?;
    let moddir = moddir_parent.join(&kernel_version);
    let builtin: BTreeSet<String> = fs::read_to_string(moddir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .map(|b| norm_mod(b.trim_end_matches(".ko")))
        .collect();
    let mut index: BTreeMap<String, PathBuf> = BTreeMap::new();
    index_modules(&moddir.join("kernel"), &mut index)?;
    let mut order: Vec<String> = Vec::new();
    let mut state: BTreeMap<String, bool> = BTreeMap::new();
    // Hyper-V modules go last, so the guest can skip them (and whatever only
    // they pulled in) as one group.
    let is_hv = |m: &str| m.starts_with("hv_");
    let wanted: Vec<&str> = REQUIRED_MODULES
        .iter()
        .chain(OPTIONAL_MODULES.iter().filter(|m| !is_hv(m)))
        .chain(OPTIONAL_MODULES.iter().filter(|m| is_hv(m)))
        .copied()
        .collect();
    let mut first_hv: Option<usize> = None;
    for m in wanted {
        if is_hv(m) && first_hv.is_none() {
            first_hv = Some(order.len());
        }
        let m = norm_mod(m);
        if builtin.contains(&m) {
            continue;
        }
        if !index.contains_key(&m) {
            if REQUIRED_MODULES.contains(&m.as_str()) {
                return Err(TemplateError::Build(format!(
                    "kernel {kernel_version} has no module {m}"
                )));
            }
            continue;
        }
        visit_module(&m, &index, &builtin, &mut state, &mut order)?;
    }
    let mut list = String::new();
    for (i, m) in order.iter().enumerate() {
        let p = index
            .get(m)
            .ok_or_else(|| TemplateError::Build(format!("module {m} vanished")))?;
        let file = p
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        tree.file(&format!("usr/lib/modules/{file}"), 0o644, read(p)?);
        let group = if first_hv.is_some_and(|f| i >= f) {
            "hv"
        } else {
            "all"
        };
        list.push_str(&format!("{group} {file}\n"));
    }
    tree.file("etc/fv-modules", 0o644, list.into_bytes());

    // Scripts and config.
    tree.file("init", 0o755, gf::INIT.into());
    tree.file("usr/sbin/fv-halt", 0o755, gf::FV_HALT.into());
    tree.file("usr/sbin/shutdown", 0o755, gf::SHUTDOWN.into());
    tree.file("etc/acpi/PWRF/00000080", 0o755, gf::ACPI_POWER.into());
    tree.file("etc/udhcpc.script", 0o755, gf::UDHCPC_SCRIPT.into());
    tree.file("etc/profile", 0o644, gf::PROFILE.into());
    tree.file("etc/passwd", 0o644, gf::PASSWD.into());
    tree.file("etc/group", 0o644, gf::GROUP.into());
    tree.file("etc/hosts", 0o644, gf::HOSTS.into());
    tree.file("etc/os-release", 0o644, gf::OS_RELEASE.into());
    tree.file("etc/resolv.conf", 0o644, Vec::new());

    let initrd = out.join(INITRD);
    let f = fs::File::create(&initrd).map_err(|e| io_err(&initrd, e))?;
    let gz = flate2::write::GzEncoder::new(std::io::BufWriter::new(f), flate2::Compression::new(6));
    let gz = tree.write_cpio(gz).map_err(|e| io_err(&initrd, e))?;
    let mut bw = gz.finish().map_err(|e| io_err(&initrd, e))?;
    bw.flush().map_err(|e| io_err(&initrd, e))?;

    // Data filesystem content.
    let seed = work.join("data-seed");
    fs::create_dir_all(&seed).map_err(|e| io_err(&seed, e))?;
    fs::write(seed.join("hello.txt"), gf::HELLO).map_err(|e| io_err(&seed, e))?;
    make_ext4(&seed, &out.join(DATA_DISK), DATA_DISK_SIZE)?;

    make_bios_disk(work, out, &seed, &proot)?;

    Ok(Built {
        kernel_version,
        modules: order,
        libs: libs.into_iter().collect(),
    })
}

fn index_modules(dir: &Path, index: &mut BTreeMap<String, PathBuf>) -> Result<(), TemplateError> {
    for e in fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let e = e.map_err(|e| io_err(dir, e))?;
        let p = e.path();
        let ft = e.file_type().map_err(|e| io_err(&p, e))?;
        if ft.is_dir() {
            index_modules(&p, index)?;
        } else if let Some(n) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".ko"))
        {
            index.insert(norm_mod(n), p.clone());
        }
    }
    Ok(())
}

/// Depth-first: dependencies (and soft pre-dependencies) before the module.
fn visit_module(
    m: &str,
    index: &BTreeMap<String, PathBuf>,
    builtin: &BTreeSet<String>,
    state: &mut BTreeMap<String, bool>,
    order: &mut Vec<String>,
) -> Result<(), TemplateError> {
    match state.get(m) {
        Some(true) => return Ok(()),
        Some(false) => {
            return Err(TemplateError::Build(format!(
                "module dependency cycle at {m}"
            )))
        }
        None => {}
    }
    let Some(path) = index.get(m) else {
        return Ok(());
    };
    state.insert(m.to_string(), false);
    let info = elf::parse(&read(path)?)
        .ok_or_else(|| TemplateError::Build(format!("module {m} is not ELF64")))?;
    let mut deps: Vec<String> = Vec::new();
    for (k, v) in &info.modinfo {
        if k == "depends" {
            deps.extend(v.split(',').filter(|d| !d.is_empty()).map(norm_mod));
        } else if k == "softdep" {
            // "pre: a b post: c": only "pre" ones must come first; unknown names
            // (crypto aliases such as "crc32c") are skipped.
            let mut pre = false;
            for t in v.split_whitespace() {
                match t {
                    "pre:" => pre = true,
                    "post:" => pre = false,
                    _ if pre && index.contains_key(&norm_mod(t)) => deps.push(norm_mod(t)),
                    _ => {}
                }
            }
        }
    }
    for d in deps {
        if builtin.contains(&d) {
            continue;
        }
        if !index.contains_key(&d) {
            return Err(TemplateError::Build(format!(
                "module {m} depends on missing {d}"
            )));
        }
        visit_module(&d, index, builtin, state, order)?;
    }
    state.insert(m.to_string(), true);
    order.push(m.to_string());
    Ok(())
}

fn make_ext4(seed: &Path, img: &Path, size: u64) -> Result<(), TemplateError> {
    // Eager inode-table/journal init: no lazy-init writes from the guest later.
    run(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-L", DATA_LABEL, "-m", "0"])
        .args([
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
        ])
        .arg("-d")
        .arg(seed)
        .arg(img)
        .arg(format!("{}k", size / 1024)))
    .map(|_| ())
}

fn syslinux_cfg() -> String {
    format!(
        "SERIAL 0 115200\nPROMPT 0\nTIMEOUT 1\nDEFAULT fv\nLABEL fv\n  KERNEL /{KERNEL}\n  INITRD /{INITRD}\n  APPEND console=ttyS0,115200 {BASE_CMDLINE}\n"
    )
}

fn mtools(tool: &str, fat: &Path, args: &[&std::ffi::OsStr]) -> Result<(), TemplateError> {
    run(Command::new(tool)
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(fat)
        .args(args))
    .map(|_| ())
}

fn make_bios_disk(work: &Path, out: &Path, seed: &Path, proot: &Path) -> Result<(), TemplateError> {
    let fat = work.join("boot-fat.img");
    let cfg = work.join("syslinux.cfg");
    fs::write(&cfg, syslinux_cfg()).map_err(|e| io_err(&cfg, e))?;
    // Hidden sectors = partition offset, so the boot sector knows where it lives.
    run(Command::new("mkfs.vfat")
        .args(["-F", "16", "-n", "FVBOOT", "-h"])
        .arg((P1_START / SECTOR).to_string())
        .arg("-C")
        .arg(&fat)
        .arg((P1_SIZE / 1024).to_string()))?;
    for f in [out.join(KERNEL), out.join(INITRD), cfg] {
        run(Command::new("mcopy")
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(&fat)
            .arg(&f)
            .arg("::"))?;
    }
    run(Command::new("syslinux")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("--install")
        .arg(&fat))?;
    // The same partition is the UEFI removable-media boot path: OVMF (and
    // Hyper-V-like generation 2 firmware) starts \EFI\BOOT\BOOTX64.EFI, which is
    // syslinux.efi reading the syslinux.cfg next to it.
    let efi = resolve_in_root(proot, Path::new("usr/lib/SYSLINUX.EFI/efi64/syslinux.efi"))
        .ok_or_else(|| {
            TemplateError::Build("syslinux-efi did not provide efi64/syslinux.efi".into())
        })?;
    let ldl = resolve_in_root(
        proot,
        Path::new("usr/lib/syslinux/modules/efi64/ldlinux.e64"),
    )
    .ok_or_else(|| {
        TemplateError::Build("syslinux-common did not provide efi64/ldlinux.e64".into())
    })?;
    mtools("mmd", &fat, &["::EFI".as_ref(), "::EFI/BOOT".as_ref()])?;
    mtools(
        "mcopy",
        &fat,
        &[efi.as_os_str(), "::EFI/BOOT/BOOTX64.EFI".as_ref()],
    )?;
    mtools(
        "mcopy",
        &fat,
        &[ldl.as_os_str(), "::EFI/BOOT/ldlinux.e64".as_ref()],
    )?;
    mtools(
        "mcopy",
        &fat,
        &[
            work.join("syslinux.cfg").as_os_str(),
            "::EFI/BOOT/syslinux.cfg".as_ref(),
        ],
    )?;
    let ext = work.join("data-part.img");
    make_ext4(seed, &ext, P2_SIZE)?;

    let disk_path = out.join(BIOS_DISK);
    let disk = fs::File::create(&disk_path).map_err(|e| io_err(&disk_path, e))?;
    disk.set_len(DISK_SIZE).map_err(|e| io_err(&disk_path, e))?;
    drop(disk);
    let script = format!(
        "label: dos\nunit: sectors\nstart={}, size={}, type=e, bootable\nstart={}, size={}, type=83\n",
        P1_START / SECTOR,
        P1_SIZE / SECTOR,
        P2_START / SECTOR,
        P2_SIZE / SECTOR
    );
    run_with_stdin(
        Command::new("sfdisk")
            .args([
                "--quiet",
                "--no-reread",
                "--no-tell-kernel",
                "--wipe",
                "never",
            ])
            .arg(&disk_path),
        script.as_bytes(),
    )?;
    let mbr_path = Path::new("/usr/lib/syslinux/mbr/mbr.bin");
    let mbr = read(mbr_path)?;
    if mbr.len() > 440 {
        return Err(TemplateError::Build(format!(
            "{} is larger than 440 bytes",
            mbr_path.display()
        )));
    }
    let mut disk = fs::OpenOptions::new()
        .write(true)
        .open(&disk_path)
        .map_err(|e| io_err(&disk_path, e))?;
    disk.write_all(&mbr).map_err(|e| io_err(&disk_path, e))?;
    copy_sparse(&fat, &mut disk, P1_START, &disk_path)?;
    copy_sparse(&ext, &mut disk, P2_START, &disk_path)?;
    disk.sync_all().map_err(|e| io_err(&disk_path, e))?;
    Ok(())
}

/// Copies `src` into `dst` at `offset`, leaving all-zero blocks as holes.
fn copy_sparse(
    src: &Path,
    dst: &mut fs::File,
    offset: u64,
    dst_path: &Path,
) -> Result<(), TemplateError> {
    let mut f = fs::File::open(src).map_err(|e| io_err(src, e))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut pos = offset;
    loop {
        let n = f.read(&mut buf).map_err(|e| io_err(src, e))?;
        if n == 0 {
            break;
        }
        let chunk = buf.get(..n).unwrap_or_default();
        if chunk.iter().any(|&b| b != 0) {
            dst.seek(SeekFrom::Start(pos))
                .map_err(|e| io_err(dst_path, e))?;
            dst.write_all(chunk).map_err(|e| io_err(dst_path, e))?;
        }
        pos += n as u64;
    }
    Ok(())
}

fn run_with_stdin(cmd: &mut Command, input: &[u8]) -> Result<(), TemplateError> {
    use std::process::Stdio;
    let name = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| crate::spawn_err(cmd, e))?;
    if let Some(mut si) = child.stdin.take() {
        si.write_all(input).map_err(|e| TemplateError::Command {
            cmd: name.clone(),
            detail: e.to_string(),
        })?;
    }
    let o = child
        .wait_with_output()
        .map_err(|e| TemplateError::Command {
            cmd: name.clone(),
            detail: e.to_string(),
        })?;
    if !o.status.success() {
        return Err(TemplateError::Command {
            cmd: name,
            detail: format!(
                "{}: {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
        });
    }
    Ok(())
}
