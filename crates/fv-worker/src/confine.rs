//! Per-VM confinement: before the worker opens anything or starts a thread, it
//! restricts itself with Landlock to the files of its own VM. QEMU is our child
//! and inherits the restriction, so neither can open another VM's disks, saved
//! state or sockets, whatever a compromised guest or a wrong path makes them try.
//!
//! Why Landlock rather than file ownership: VM folders, shared differencing
//! parents and media are ordinary admin-owned files; chowning them per VM (as
//! libvirt's DAC driver does) breaks shared parents and surprises admins. Landlock
//! needs no ownership changes, applies to root too, and also stops ptrace of and
//! signals to processes outside the domain (ABI 6 scopes).
//!
//! Granted:
//! - everything beneath the VM folder and the VM's runtime dir;
//! - read+write on each writable hard drive's top image file, read on its
//!   differencing parents (resolved now, through the same path policy the disk
//!   engine uses; nothing else in the parents' folders);
//! - read on the media folders, the DVD media present at start, the
//!   direct-boot kernel/initrd and the floppy image;
//! - read+execute on the system (/usr, /lib*, /bin, /sbin), read on /proc, /sys and
//!   the few /etc files the loader and QEMU read, the QEMU binary, and the device
//!   nodes QEMU uses.
//!
//! The worker also gives up the capabilities it never needs (raw I/O, admin, module
//! loading, ptrace, ...), so root inside the sandbox cannot read kernel memory
//! through /proc/kcore or undo the confinement.
use anyhow::{Context, Result};
use fv_worker_proto::LaunchSpec;
use landlock::{
    path_beneath_rules, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
    Scope, ABI,
};
use std::path::{Path, PathBuf};

/// What the worker was allowed, for the log and for tests.
#[derive(Debug, Default)]
pub struct Grants {
    pub read_write_dirs: Vec<PathBuf>,
    pub read_write_files: Vec<PathBuf>,
    pub read_only: Vec<PathBuf>,
}

/// How far the kernel enforced the ruleset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforcement {
    Full,
    Partial,
    None,
}

const SYSTEM_READ_EXEC: &[&str] = &["/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin"];
/// Not all of /etc: the worker is root, and /etc holds secrets (shadow, keys).
const SYSTEM_READ: &[&str] = &[
    "/proc",
    "/sys",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/nsswitch.conf",
    "/etc/passwd",
    "/etc/group",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/resolv.conf",
    "/etc/gai.conf",
    "/etc/qemu",
];
const DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
    "/dev/kvm",
    "/dev/net/tun",
    "/dev/vhost-net",
    "/dev/ptmx",
    "/dev/pts",
];

/// Work out what this VM needs. Disk chains are resolved read-only here; the real
/// (writable) open happens later, under the restriction.
pub fn grants(spec: &LaunchSpec) -> Grants {
    let mut g = Grants {
        read_write_dirs: vec![spec.vm_dir.clone(), spec.runtime_dir.clone()],
        ..Grants::default()
    };
    for hd in &spec.config.hard_drives {
        let path = crate::qemu_cmd::resolve(&spec.vm_dir, &hd.path);
        // Read-only, no log replay: this open must not change the image.
        let opts = fv_vdisk::OpenOptions {
            read_only: true,
            replay_log: false,
            policy: crate::disks::open::policy(spec),
        };
        match fv_vdisk::open(&path, &opts) {
            Ok(disk) => {
                for (i, p) in disk.layer_paths().iter().enumerate() {
                    push(&mut g, p, hd.read_only || i > 0);
                }
            }
            // The real open reports the error with its context; grant only the
            // file itself so that report is about the image, not about us.
            Err(e) => {
                tracing::warn!("confine: cannot resolve {}: {e}", path.display());
                push(&mut g, &path, hd.read_only);
            }
        }
    }
    let mut media: Vec<PathBuf> = spec.media_dirs.clone();
    // The media files themselves, not their folders: an ISO in / or a home
    // directory must not open everything beside it.
    for d in &spec.config.dvd_drives {
        if let Some(p) = &d.path {
            media.push(crate::qemu_cmd::resolve(&spec.vm_dir, p));
        }
    }
    if let Some(f) = &spec.config.floppy {
        media.push(crate::qemu_cmd::resolve(&spec.vm_dir, f));
    }
    if let Some(b) = &spec.config.direct_boot {
        media.push(crate::qemu_cmd::resolve(&spec.vm_dir, &b.kernel));
        if let Some(i) = &b.initrd {
            media.push(crate::qemu_cmd::resolve(&spec.vm_dir, i));
        }
    }
    g.read_only.extend(media);
    g
}

fn push(g: &mut Grants, p: &Path, read_only: bool) {
    if read_only {
        g.read_only.push(p.to_path_buf());
    } else {
        g.read_write_files.push(p.to_path_buf());
    }
}

/// Apply the restriction to the calling thread and every thread and process it
/// creates from now on. Must run before any other thread exists (Landlock
/// restricts only the calling thread and its future children).
pub fn apply(spec: &LaunchSpec, g: &Grants) -> Result<Enforcement> {
    // V5 adds IOCTL_DEV (QEMU's ioctls on /dev/kvm and /dev/net/tun need the grant
    // below); best-effort compatibility degrades to what the kernel offers.
    let abi = ABI::V5;
    let all = AccessFs::from_all(abi);
    let read = AccessFs::from_read(abi);
    let read_no_exec = read & !AccessFs::Execute;
    let file_rw = AccessFs::from_file(abi);
    let mut exec_paths: Vec<PathBuf> = SYSTEM_READ_EXEC.iter().map(PathBuf::from).collect();
    exec_paths.push(spec.qemu_binary.clone());
    let status = Ruleset::default()
        .handle_access(all)
        .context("landlock: handle_access")?
        .scope(Scope::AbstractUnixSocket | Scope::Signal)
        .context("landlock: scope")?
        .create()
        .context("landlock: create ruleset")?
        .add_rules(path_beneath_rules(&g.read_write_dirs, all))
        .context("landlock: VM folders")?
        .add_rules(path_beneath_rules(
            &g.read_write_files,
            file_rw & !AccessFs::Execute,
        ))
        .context("landlock: disk images")?
        .add_rules(path_beneath_rules(&g.read_only, read_no_exec))
        .context("landlock: read-only paths")?
        .add_rules(path_beneath_rules(&exec_paths, read))
        .context("landlock: system")?
        .add_rules(path_beneath_rules(SYSTEM_READ, read_no_exec))
        .context("landlock: system config")?
        .add_rules(path_beneath_rules(DEVICES, all))
        .context("landlock: devices")?
        .restrict_self()
        .context("landlock: restrict_self")?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Enforcement::Full,
        RulesetStatus::PartiallyEnforced => Enforcement::Partial,
        RulesetStatus::NotEnforced => Enforcement::None,
    })
}

/// Capabilities a worker keeps: chown of its sockets and the VARS file for QEMU's
/// uid, DAC override for admin-owned VM folders, setuid/setgid to start QEMU as the
/// VM's uid, kill for that QEMU, and net admin for tap devices (virtual switches).
const KEEP: &[caps::Capability] = &[
    caps::Capability::CAP_CHOWN,
    caps::Capability::CAP_DAC_OVERRIDE,
    caps::Capability::CAP_DAC_READ_SEARCH,
    caps::Capability::CAP_FOWNER,
    caps::Capability::CAP_SETUID,
    caps::Capability::CAP_SETGID,
    caps::Capability::CAP_KILL,
    caps::Capability::CAP_NET_ADMIN,
];

/// Drop every other capability from the bounding, inheritable, effective and
/// permitted sets (so QEMU, exec'd later, cannot regain them either).
pub fn drop_capabilities() -> Result<()> {
    use caps::CapSet;
    let keep: caps::CapsHashSet = KEEP.iter().copied().collect();
    for c in caps::all() {
        if keep.contains(&c) {
            continue;
        }
        // The bounding set needs CAP_SETPCAP, which we still hold at this point.
        caps::drop(None, CapSet::Bounding, c).context("drop bounding capability")?;
    }
    for set in [CapSet::Inheritable, CapSet::Effective, CapSet::Permitted] {
        let have = caps::read(None, set).context("read capabilities")?;
        let want: caps::CapsHashSet = have.intersection(&keep).copied().collect();
        caps::set(None, set, &want).context("set capabilities")?;
    }
    Ok(())
}

/// Hide `spec.private_dirs` (fvd's runtime root with its API socket and every VM's
/// sockets, `/run`) behind empty tmpfs mounts in a mount namespace of our own, with
/// only this VM's runtime dir bound back in place. Landlock does not mediate
/// connecting to a pathname Unix socket, and the worker runs as uid 0, so without
/// this it could reach other VMs' QMP/agent/disk sockets. QEMU, our child, shares
/// the namespace. Landlock then forbids any further mount change, so it cannot be
/// undone. A dir that holds something this VM needs (its folder, disks, media) is
/// left visible, with a warning.
pub fn hide_private_dirs(spec: &LaunchSpec, g: &Grants) -> Result<Vec<PathBuf>> {
    use nix::mount::{mount, MsFlags};
    if spec.private_dirs.is_empty() {
        return Ok(vec![]);
    }
    let mut dirs: Vec<PathBuf> = spec
        .private_dirs
        .iter()
        .filter_map(|d| std::fs::canonicalize(d).ok())
        .collect();
    dirs.sort_by_key(|d| d.components().count());
    let runtime = std::fs::canonicalize(&spec.runtime_dir).context("runtime dir")?;
    let needed: Vec<PathBuf> = g
        .read_write_dirs
        .iter()
        .chain(&g.read_write_files)
        .chain(&g.read_only)
        .filter_map(|p| std::fs::canonicalize(p).ok())
        .filter(|p| !p.starts_with(&runtime))
        .collect();
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).context("unshare mount namespace")?;
    // Our mounts must not propagate back to the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("make / private")?;
    // Keep a handle on our runtime dir to bind it back once its parents are covered.
    let own = std::fs::File::open(&runtime).context("open runtime dir")?;
    let own_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&own));
    let mut covered: Vec<PathBuf> = Vec::new();
    for d in dirs {
        if covered.iter().any(|c| d.starts_with(c)) {
            continue;
        }
        if let Some(n) = needed.iter().find(|n| n.starts_with(&d)) {
            tracing::warn!(
                "confine: not hiding {} (this VM needs {} there)",
                d.display(),
                n.display()
            );
            continue;
        }
        mount(
            Some("fv-private"),
            &d,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("mode=0755,size=64k"),
        )
        .with_context(|| format!("hide {}", d.display()))?;
        covered.push(d);
    }
    if covered.iter().any(|c| runtime.starts_with(c)) {
        std::fs::create_dir_all(&runtime).context("recreate runtime dir")?;
        mount(
            Some(own_path.as_str()),
            &runtime,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .context("bind runtime dir back")?;
    }
    Ok(covered)
}
