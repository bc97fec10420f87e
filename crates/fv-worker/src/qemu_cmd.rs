//! Turns a VmConfig into a QEMU command line (pure: no I/O, unit-tested).

use fv_model::{
    BootDevice, ControllerKind, Generation, HardDrive, NicConnection, NicKind, VmConfig,
};
use fv_worker_proto::LaunchSpec;
use std::path::{Path, PathBuf};

/// Where the worker put things QEMU must connect to.
pub struct Paths {
    pub runtime: PathBuf,
    /// One socket per hard drive (vhost-user or NBD, see [`disk_transport`]), in
    /// config order.
    pub disk_sockets: Vec<PathBuf>,
    /// Gen2: firmware code (read-only) and this VM's variable store.
    pub ovmf: Option<(PathBuf, PathBuf)>,
    /// Debug/test knob: SCSI-slot drives use vhost-user even under TCG.
    pub force_vhost_user: bool,
}

pub struct QemuCommand {
    pub args: Vec<String>,
    /// MAC per adapter (config order).
    pub macs: Vec<String>,
    /// qdev id per DVD drive (config order) and the medium to insert at start.
    pub cds: Vec<(String, Option<PathBuf>)>,
    /// qdev ids of NICs whose link must be set down (not connected).
    pub links_down: Vec<String>,
    pub warnings: Vec<String>,
}

pub const QMP_SOCK: &str = "qmp.sock";
pub const QGA_SOCK: &str = "qga.sock";

pub fn com_socket(runtime: &Path, index: usize) -> PathBuf {
    runtime.join(format!("com{}.sock", index + 1))
}

/// How one hard drive reaches the guest. Our disk engine serves every transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskTransport {
    /// `vhost-user-blk-pci`: the guest's virtio ring is served by our back-end
    /// directly from guest memory (fastest; QEMU is not on the data path).
    VhostUser,
    /// An emulated `ide-hd` on an NBD block node served by fv-nbd.
    NbdIde,
    /// QEMU's own `virtio-blk-pci` on an NBD block node served by fv-nbd.
    NbdVirtio,
}

/// Decide the transport of one hard drive.
///
/// - Gen1 IDE slots get an emulated `ide-hd`: Hyper-V Gen1 boots from IDE, and
///   legacy BIOSes and guests without virtio drivers expect a real IDE disk there.
/// - SCSI slots (Hyper-V's synthetic storage) are virtio-blk: `vhost-user-blk-pci`
///   under KVM, but under TCG QEMU's own `virtio-blk-pci` on NBD. TCG does not
///   invalidate translated code when a vhost-user back-end writes guest memory (see
///   `vhost_section()` in QEMU's hw/virtio/vhost.c), so code loaded by vhost-user DMA
///   (a boot record loaded over the MBR at 0x7c00, later kernel modules, ...) can
///   run stale. With NBD, QEMU's block layer does the DMA and TCG stays coherent.
///
/// The NBD transports keep our engine on the data path (fv-nbd serves the same
/// `BlockDevice`); only the device emulation moves into QEMU.
///
/// `force_vhost_user` (env `FV_WORKER_FORCE_VHOST_USER`, debugging and tests only)
/// keeps SCSI-slot drives on vhost-user under TCG; fine for data disks of a guest
/// booted directly, which is how the vhost-user save path is tested without KVM.
pub fn disk_transport(
    cfg: &VmConfig,
    hd: &HardDrive,
    accel: &str,
    force_vhost_user: bool,
) -> DiskTransport {
    let kvm = accel.split(':').next() == Some("kvm") || force_vhost_user;
    if cfg.generation == Generation::Gen1 && hd.slot.controller == ControllerKind::Ide {
        DiskTransport::NbdIde
    } else if kvm {
        DiskTransport::VhostUser
    } else {
        DiskTransport::NbdVirtio
    }
}

/// The socket of hard drive `index` for its transport.
pub fn disk_socket(runtime: &Path, index: usize, t: DiskTransport) -> PathBuf {
    match t {
        DiskTransport::VhostUser => runtime.join(format!("disk-{index}.sock")),
        DiskTransport::NbdIde | DiskTransport::NbdVirtio => {
            runtime.join(format!("disk-{index}.nbd.sock"))
        }
    }
}

/// The NBD export name of hard drive `index`.
pub fn nbd_export(index: usize) -> String {
    format!("disk{index}")
}

/// Escape a value for QEMU's `key=value,...` option syntax.
fn esc(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// Resolve a config path against the VM folder.
pub fn resolve(vm_dir: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        vm_dir.join(p)
    }
}

/// A stable locally administered MAC derived from the VM id and adapter index, used
/// only when fvd did not assign one.
fn fallback_mac(cfg: &VmConfig, index: usize) -> String {
    let b = cfg.id.as_bytes();
    let x = |i: usize| b.get(i).copied().unwrap_or(0);
    format!(
        "52:54:00:{:02x}:{:02x}:{:02x}",
        x(13),
        x(14),
        x(15).wrapping_add(index as u8)
    )
}

fn slot_key(s: &fv_model::Slot) -> (u32, u32) {
    (s.controller_number, s.location)
}

/// Boot indexes per device class, following the configured order. Returns
/// (hard drive index -> bootindex, dvd index -> bootindex, nic index -> bootindex, floppy).
struct BootPlan {
    hd: Vec<Option<u32>>,
    cd: Vec<Option<u32>>,
    nic: Vec<Option<u32>>,
    floppy: Option<u32>,
}

fn boot_plan(cfg: &VmConfig) -> BootPlan {
    let mut plan = BootPlan {
        hd: vec![None; cfg.hard_drives.len()],
        cd: vec![None; cfg.dvd_drives.len()],
        nic: vec![None; cfg.network_adapters.len()],
        floppy: None,
    };
    let mut next = 1u32;
    let mut take = || {
        let n = next;
        next += 1;
        n
    };
    for dev in &cfg.boot_order {
        match dev {
            BootDevice::Ide | BootDevice::Scsi => {
                let want = if *dev == BootDevice::Ide {
                    ControllerKind::Ide
                } else {
                    ControllerKind::Scsi
                };
                let mut idx: Vec<usize> = (0..cfg.hard_drives.len())
                    .filter(|&i| cfg.hard_drives.get(i).map(|d| d.slot.controller) == Some(want))
                    .collect();
                idx.sort_by_key(|&i| cfg.hard_drives.get(i).map(|d| slot_key(&d.slot)));
                for i in idx {
                    if let Some(s) = plan.hd.get_mut(i) {
                        s.get_or_insert_with(&mut take);
                    }
                }
            }
            BootDevice::Cd => {
                for s in plan.cd.iter_mut() {
                    s.get_or_insert_with(&mut take);
                }
            }
            BootDevice::Network => {
                for s in plan.nic.iter_mut() {
                    s.get_or_insert_with(&mut take);
                }
            }
            BootDevice::Floppy => {
                if cfg.floppy.is_some() {
                    plan.floppy.get_or_insert_with(&mut take);
                }
            }
        }
    }
    plan
}

fn bootindex(b: Option<u32>) -> String {
    b.map(|n| format!(",bootindex={n}")).unwrap_or_default()
}

pub fn build(spec: &LaunchSpec, paths: &Paths) -> QemuCommand {
    let cfg = &spec.config;
    let rt = &paths.runtime;
    let mut a: Vec<String> = Vec::new();
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
    let mut warnings = Vec::new();
    let gen2 = cfg.generation == Generation::Gen2;
    let machine = if gen2 { "q35" } else { "pc" };
    let mut mopts = format!("{machine},accel={},memory-backend=mem", spec.accel);
    if gen2 && cfg.secure_boot {
        // OVMF's secure-boot build keeps its variables behind SMM.
        mopts.push_str(",smm=on");
    }
    push(&[
        "-name",
        &format!("guest={},debug-threads=on", cfg.name.replace(',', ",,")),
    ]);
    push(&["-uuid", &cfg.id.to_string()]);
    push(&["-machine", &mopts]);
    push(&["-smp", &cfg.cpu.count.max(1).to_string()]);
    push(&["-m", &format!("{}M", cfg.memory_mib)]);
    // vhost-user back-ends map guest RAM, so it must be shareable memory.
    push(&[
        "-object",
        &format!(
            "memory-backend-memfd,id=mem,size={}M,share=on",
            cfg.memory_mib
        ),
    ]);
    push(&["-nodefaults", "-no-user-config", "-display", "none", "-S"]);
    push(&[
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    ]);
    push(&["-msg", "timestamp=on", "-rtc", "base=utc"]);
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", esc(&rt.join(QMP_SOCK))),
    ]);

    if let Some((code, vars)) = &paths.ovmf {
        push(&[
            "-drive",
            &format!("if=pflash,format=raw,unit=0,readonly=on,file={}", esc(code)),
        ]);
        push(&[
            "-drive",
            &format!("if=pflash,format=raw,unit=1,file={}", esc(vars)),
        ]);
        if cfg.secure_boot {
            push(&["-global", "driver=cfi.pflash01,property=secure,value=on"]);
        }
    }

    let plan = boot_plan(cfg);
    for (i, hd) in cfg.hard_drives.iter().enumerate() {
        let Some(sock) = paths.disk_sockets.get(i) else {
            continue;
        };
        let bi = bootindex(plan.hd.get(i).copied().flatten());
        let t = disk_transport(cfg, hd, &spec.accel, paths.force_vhost_user);
        if t == DiskTransport::VhostUser {
            push(&["-chardev", &format!("socket,id=disk{i},path={}", esc(sock))]);
            push(&[
                "-device",
                &format!("vhost-user-blk-pci,id=hd{i},chardev=disk{i},num-queues=1{bi}"),
            ]);
            continue;
        }
        // A writeback device (like Hyper-V's default): data is durable once the guest
        // flushes; QEMU sends that as NBD FLUSH and fv-nbd calls BlockDevice::flush.
        // cache.no-flush=off makes sure QEMU never drops a flush.
        let ro = if hd.read_only { ",read-only=on" } else { "" };
        push(&[
            "-blockdev",
            &format!(
                "driver=nbd,server.type=unix,server.path={},export={},node-name=disk{i},cache.direct=off,cache.no-flush=off{ro}",
                esc(sock),
                nbd_export(i)
            ),
        ]);
        let dev = if t == DiskTransport::NbdIde {
            format!(
                "ide-hd,id=hd{i},drive=disk{i},bus=ide.{},unit={},serial=fv-hd{i},write-cache=on{bi}",
                hd.slot.controller_number, hd.slot.location
            )
        } else {
            format!("virtio-blk-pci,id=hd{i},drive=disk{i},serial=fv-hd{i},write-cache=on{bi}")
        };
        push(&["-device", &dev]);
    }
    if gen2
        && cfg
            .hard_drives
            .iter()
            .any(|d| d.slot.controller == ControllerKind::Scsi)
        && cfg.scsi_as_virtio_scsi
    {
        warnings.push(
            "scsi_as_virtio_scsi: SCSI-slot hard drives are served as virtio-blk only".into(),
        );
    }

    let mut cds = Vec::new();
    let scsi_needed = gen2 && !cfg.dvd_drives.is_empty();
    if scsi_needed {
        push(&["-device", "virtio-scsi-pci,id=scsi0"]);
    }
    for (i, dvd) in cfg.dvd_drives.iter().enumerate() {
        let id = format!("cd{i}");
        let bi = bootindex(plan.cd.get(i).copied().flatten());
        let dev = if gen2 {
            format!(
                "scsi-cd,id={id},bus=scsi0.0,channel=0,scsi-id={},lun=0{bi}",
                dvd.slot.location
            )
        } else {
            format!(
                "ide-cd,id={id},bus=ide.{},unit={}{bi}",
                dvd.slot.controller_number, dvd.slot.location
            )
        };
        push(&["-device", &dev]);
        cds.push((id, dvd.path.as_ref().map(|p| resolve(&spec.vm_dir, p))));
    }

    if let Some(f) = &cfg.floppy {
        if gen2 {
            warnings.push("generation 2 VMs have no floppy drive".into());
        } else {
            let f = resolve(&spec.vm_dir, f);
            push(&[
                "-blockdev",
                &format!("driver=file,node-name=fd0f,filename={}", esc(&f)),
            ]);
            push(&[
                "-device",
                &format!("floppy,drive=fd0f,unit=0{}", bootindex(plan.floppy)),
            ]);
        }
    }

    let mut macs = Vec::new();
    let mut links_down = Vec::new();
    for (i, nic) in cfg.network_adapters.iter().enumerate() {
        let mac = nic.mac().map(str::to_string).unwrap_or_else(|| {
            warnings.push(format!(
                "adapter {}: no MAC assigned, using a derived one",
                nic.name
            ));
            fallback_mac(cfg, i)
        });
        let model = match nic.kind {
            NicKind::Synthetic => "virtio-net-pci",
            NicKind::Legacy => "e1000",
        };
        match &nic.connection {
            NicConnection::User => {
                push(&["-netdev", &format!("user,id=net{i}")]);
            }
            other => {
                if let NicConnection::Switch { name } = other {
                    warnings.push(format!(
                        "adapter {}: virtual switch {name} is not wired by the worker yet; not connected",
                        nic.name
                    ));
                }
                // A hub port on a hub of its own: frames go nowhere. The link is also
                // set down at start so the guest sees an unplugged cable.
                push(&["-netdev", &format!("hubport,id=net{i},hubid={}", 1000 + i)]);
                links_down.push(format!("nic{i}"));
            }
        }
        push(&[
            "-device",
            &format!(
                "{model},id=nic{i},netdev=net{i},mac={mac}{}",
                bootindex(plan.nic.get(i).copied().flatten())
            ),
        ]);
        macs.push(mac);
    }

    for (i, on) in cfg.com_ports.iter().enumerate() {
        if *on {
            push(&[
                "-chardev",
                &format!(
                    "socket,id=com{i},path={},server=on,wait=off",
                    esc(&com_socket(rt, i))
                ),
            ]);
            push(&["-device", &format!("isa-serial,chardev=com{i},index={i}")]);
        }
    }

    push(&["-device", "virtio-serial-pci,id=vser0"]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=qga0,path={},server=on,wait=off",
            esc(&rt.join(QGA_SOCK))
        ),
    ]);
    push(&[
        "-device",
        "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
    ]);

    if let Some(db) = &cfg.direct_boot {
        push(&[
            "-kernel",
            &resolve(&spec.vm_dir, &db.kernel).display().to_string(),
        ]);
        if let Some(i) = &db.initrd {
            push(&["-initrd", &resolve(&spec.vm_dir, i).display().to_string()]);
        }
        push(&["-append", &db.cmdline]);
    }
    if spec.restore_from.is_some() {
        push(&["-incoming", "defer"]);
    }
    QemuCommand {
        args: a,
        macs,
        cds,
        links_down,
        warnings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fv_model::*;

    fn spec(cfg: VmConfig) -> LaunchSpec {
        LaunchSpec {
            config: cfg,
            vm_dir: "/vms/a".into(),
            runtime_dir: "/run/fv/a".into(),
            restore_from: None,
            accel: "tcg".into(),
            qemu_binary: "qemu-system-x86_64".into(),
            qemu_uid: None,
            qemu_gid: None,
            allowed_disk_dirs: vec![],
            confine: false,
            media_dirs: vec![],
            private_dirs: vec![],
            host_name: String::new(),
            integration_tuning: Default::default(),
        }
    }

    fn slot(c: ControllerKind, n: u32, l: u32) -> Slot {
        Slot {
            controller: c,
            controller_number: n,
            location: l,
        }
    }

    #[test]
    fn gen1_layout_and_boot_order() {
        let mut c = VmConfig::new("vm,1", Generation::Gen1);
        c.hard_drives.push(HardDrive {
            slot: slot(ControllerKind::Ide, 0, 1),
            path: "b.vhdx".into(),
            read_only: false,
        });
        c.hard_drives.push(HardDrive {
            slot: slot(ControllerKind::Ide, 0, 0),
            path: "a.vhdx".into(),
            read_only: false,
        });
        c.dvd_drives.push(DvdDrive {
            slot: slot(ControllerKind::Ide, 1, 0),
            path: Some("x.iso".into()),
        });
        c.network_adapters.push(NetworkAdapter {
            id: uuid::Uuid::nil(),
            name: "n".into(),
            kind: NicKind::Legacy,
            static_mac: Some("00:15:5d:00:00:01".into()),
            dynamic_mac: None,
            connection: NicConnection::NotConnected,
        });
        let s = spec(c);
        let p = Paths {
            runtime: "/run/fv/a".into(),
            disk_sockets: vec![
                "/run/fv/a/disk-0.nbd.sock".into(),
                "/run/fv/a/disk-1.nbd.sock".into(),
            ],
            ovmf: None,
            force_vhost_user: false,
        };
        let q = build(&s, &p);
        let line = q.args.join(" ");
        assert!(
            line.contains("-machine pc,accel=tcg,memory-backend=mem"),
            "{line}"
        );
        assert!(line.contains("guest=vm,,1"));
        // Default gen1 order: CD, IDE (by slot), network.
        assert!(
            line.contains("ide-cd,id=cd0,bus=ide.1,unit=0,bootindex=1"),
            "{line}"
        );
        // IDE-slot drives are emulated IDE disks on our NBD exports.
        assert!(
            line.contains("-blockdev driver=nbd,server.type=unix,server.path=/run/fv/a/disk-0.nbd.sock,export=disk0,node-name=disk0,cache.direct=off,cache.no-flush=off "),
            "{line}"
        );
        assert!(
            line.contains("ide-hd,id=hd1,drive=disk1,bus=ide.0,unit=0,serial=fv-hd1,write-cache=on,bootindex=2"),
            "{line}"
        );
        assert!(
            line.contains("ide-hd,id=hd0,drive=disk0,bus=ide.0,unit=1,serial=fv-hd0,write-cache=on,bootindex=3"),
            "{line}"
        );
        assert!(!line.contains("vhost-user-blk"), "{line}");
        assert!(
            line.contains("e1000,id=nic0,netdev=net0,mac=00:15:5d:00:00:01,bootindex=4"),
            "{line}"
        );
        assert_eq!(q.links_down, vec!["nic0".to_string()]);
        assert_eq!(
            q.cds,
            vec![("cd0".to_string(), Some(PathBuf::from("/vms/a/x.iso")))]
        );
        assert!(line.contains("isa-serial,chardev=com0,index=0"));
        assert!(line.contains("socket,id=com0,path=/run/fv/a/com1.sock,server=on,wait=off"));
        assert!(!line.contains("com2.sock"));
        assert!(!line.contains("-incoming"));
        assert!(!line.contains("pflash"));
    }

    #[test]
    fn gen2_ovmf_scsi_cd_restore() {
        let mut c = VmConfig::new("g2", Generation::Gen2);
        c.secure_boot = true;
        c.dvd_drives.push(DvdDrive {
            slot: slot(ControllerKind::Scsi, 0, 2),
            path: None,
        });
        let mut s = spec(c);
        s.restore_from = Some("/vms/a/saved".into());
        let p = Paths {
            runtime: "/r".into(),
            disk_sockets: vec![],
            ovmf: Some((
                "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd".into(),
                "/vms/a/vars.fd".into(),
            )),
            force_vhost_user: false,
        };
        let line = build(&s, &p).args.join(" ");
        assert!(
            line.contains("-machine q35,accel=tcg,memory-backend=mem,smm=on"),
            "{line}"
        );
        assert!(line.contains(
            "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"
        ));
        assert!(line.contains("if=pflash,format=raw,unit=1,file=/vms/a/vars.fd"));
        assert!(
            line.contains("scsi-cd,id=cd0,bus=scsi0.0,channel=0,scsi-id=2,lun=0"),
            "{line}"
        );
        assert!(line.ends_with("-incoming defer"));
    }

    #[test]
    fn scsi_disks_use_vhost_user_only_under_kvm() {
        let mut c = VmConfig::new("s", Generation::Gen2);
        c.hard_drives.push(HardDrive {
            slot: slot(ControllerKind::Scsi, 0, 0),
            path: "a.vhdx".into(),
            read_only: true,
        });
        let hd = c.hard_drives[0].clone();
        assert_eq!(
            disk_transport(&c, &hd, "kvm", false),
            DiskTransport::VhostUser
        );
        assert_eq!(
            disk_transport(&c, &hd, "tcg", false),
            DiskTransport::NbdVirtio
        );
        let mut g1 = VmConfig::new("i", Generation::Gen1);
        let ide = HardDrive {
            slot: slot(ControllerKind::Ide, 1, 0),
            ..hd.clone()
        };
        g1.hard_drives.push(ide.clone());
        assert_eq!(
            disk_transport(&g1, &ide, "kvm", false),
            DiskTransport::NbdIde
        );

        let mut s = spec(c);
        let p = |sock: &str| Paths {
            runtime: "/r".into(),
            disk_sockets: vec![sock.into()],
            ovmf: None,
            force_vhost_user: false,
        };
        let line = build(&s, &p("/r/disk-0.nbd.sock")).args.join(" ");
        assert!(
            line.contains("node-name=disk0,cache.direct=off,cache.no-flush=off,read-only=on"),
            "{line}"
        );
        assert!(
            line.contains(
                "virtio-blk-pci,id=hd0,drive=disk0,serial=fv-hd0,write-cache=on,bootindex=1"
            ),
            "{line}"
        );
        s.accel = "kvm".into();
        let line = build(&s, &p("/r/disk-0.sock")).args.join(" ");
        assert!(
            line.contains("-chardev socket,id=disk0,path=/r/disk-0.sock"),
            "{line}"
        );
        assert!(
            line.contains("vhost-user-blk-pci,id=hd0,chardev=disk0,num-queues=1,bootindex=1"),
            "{line}"
        );
        assert!(!line.contains("driver=nbd"), "{line}");
        s.accel = "tcg".into();
        assert_eq!(
            disk_transport(&s.config, &hd, "tcg", true),
            DiskTransport::VhostUser
        );
        assert_eq!(
            disk_transport(&g1, &ide, "tcg", true),
            DiskTransport::NbdIde
        );
    }
}
