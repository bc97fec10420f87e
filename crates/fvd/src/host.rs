//! Host facts fvd decides with: accelerator, cgroups, MAC pool arithmetic.
use fv_model::api::AccelSetting;
use std::path::{Path, PathBuf};

/// Resolve the accelerator: "kvm" only when /dev/kvm opens read-write AND it is a real
/// hardware-virtualization KVM (kvm_intel/kvm_amd loaded) AND not PVM (kvm_pvm), whose
/// /dev/kvm accepts ordinary guests and then hangs them. Returns (accel, reason).
pub fn resolve_accel(setting: AccelSetting) -> (String, String) {
    resolve_accel_at(setting, Path::new("/dev/kvm"), Path::new("/sys/module"))
}

pub fn resolve_accel_at(setting: AccelSetting, dev: &Path, modules: &Path) -> (String, String) {
    match setting {
        AccelSetting::Kvm => return ("kvm".into(), "host setting accel=kvm".into()),
        AccelSetting::Tcg => return ("tcg".into(), "host setting accel=tcg".into()),
        AccelSetting::Auto => {}
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        return (
            "tcg".into(),
            format!("auto: {} cannot be opened ({e})", dev.display()),
        );
    }
    if modules.join("kvm_pvm").exists() {
        return (
            "tcg".into(),
            "auto: /dev/kvm is PVM (kvm_pvm loaded), which cannot run ordinary guests".into(),
        );
    }
    if !modules.join("kvm_intel").exists() && !modules.join("kvm_amd").exists() {
        return (
            "tcg".into(),
            "auto: neither kvm_intel nor kvm_amd is loaded; /dev/kvm is not hardware KVM".into(),
        );
    }
    (
        "kvm".into(),
        "auto: /dev/kvm opens and is hardware KVM".into(),
    )
}

/// Which cgroup hierarchy the host uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cgroups {
    /// Unified hierarchy mounted at this path.
    V2(PathBuf),
    /// Legacy: the cpu and memory controller mount points.
    V1 {
        cpu: Option<PathBuf>,
        memory: Option<PathBuf>,
    },
    None,
}

impl Cgroups {
    pub fn detect() -> Cgroups {
        let root = Path::new("/sys/fs/cgroup");
        if root.join("cgroup.controllers").exists() {
            return Cgroups::V2(root.to_path_buf());
        }
        let mut cpu = None;
        let mut memory = None;
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        for l in mounts.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 4 || f[2] != "cgroup" {
                continue;
            }
            let opts: Vec<&str> = f[3].split(',').collect();
            if opts.contains(&"cpu") && cpu.is_none() {
                cpu = Some(PathBuf::from(f[1]));
            }
            if opts.contains(&"memory") && memory.is_none() {
                memory = Some(PathBuf::from(f[1]));
            }
        }
        if cpu.is_none() && memory.is_none() {
            Cgroups::None
        } else {
            Cgroups::V1 { cpu, memory }
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Cgroups::V2(_) => "v2",
            Cgroups::V1 { .. } => "v1",
            Cgroups::None => "none",
        }
    }

    fn dirs(&self, vm: &str) -> Vec<PathBuf> {
        let rel = format!("ferrovisor/vm-{vm}");
        match self {
            Cgroups::V2(root) => vec![root.join(rel)],
            Cgroups::V1 { cpu, memory } => cpu
                .iter()
                .chain(memory.iter())
                .map(|p| p.join(&rel))
                .collect(),
            Cgroups::None => vec![],
        }
    }

    /// Create the VM's cgroup and set its CPU weight/limit and memory limit.
    /// `limit_percent` is per vCPU; 100 means uncapped.
    pub fn setup(
        &self,
        vm: &str,
        vcpus: u32,
        weight: u32,
        limit_percent: u32,
        mem_bytes: u64,
    ) -> std::io::Result<()> {
        const PERIOD: u64 = 100_000;
        let quota = if limit_percent >= 100 {
            None
        } else {
            Some((limit_percent as u64 * vcpus as u64 * PERIOD / 100).max(1000))
        };
        match self {
            Cgroups::V2(root) => {
                // Controllers must be enabled in every ancestor's subtree_control.
                let parent = root.join("ferrovisor");
                std::fs::create_dir_all(&parent)?;
                let _ = std::fs::write(root.join("cgroup.subtree_control"), "+cpu +memory");
                let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+cpu +memory");
                let d = parent.join(format!("vm-{vm}"));
                std::fs::create_dir_all(&d)?;
                std::fs::write(d.join("cpu.weight"), weight.clamp(1, 10000).to_string())?;
                let max = match quota {
                    Some(q) => format!("{q} {PERIOD}"),
                    None => format!("max {PERIOD}"),
                };
                std::fs::write(d.join("cpu.max"), max)?;
                std::fs::write(d.join("memory.max"), mem_bytes.to_string())?;
            }
            Cgroups::V1 { cpu, memory } => {
                if let Some(c) = cpu {
                    let d = c.join(format!("ferrovisor/vm-{vm}"));
                    std::fs::create_dir_all(&d)?;
                    // Hyper-V weight 100 = the default share 1024.
                    let shares = (weight as u64 * 1024 / 100).max(2);
                    std::fs::write(d.join("cpu.shares"), shares.to_string())?;
                    std::fs::write(d.join("cpu.cfs_period_us"), PERIOD.to_string())?;
                    let q = quota.map(|q| q as i64).unwrap_or(-1);
                    std::fs::write(d.join("cpu.cfs_quota_us"), q.to_string())?;
                }
                if let Some(m) = memory {
                    let d = m.join(format!("ferrovisor/vm-{vm}"));
                    std::fs::create_dir_all(&d)?;
                    std::fs::write(d.join("memory.limit_in_bytes"), mem_bytes.to_string())?;
                }
            }
            Cgroups::None => {}
        }
        Ok(())
    }

    /// Move a process into the VM's cgroup(s).
    pub fn add(&self, vm: &str, pid: u32) -> std::io::Result<()> {
        for d in self.dirs(vm) {
            std::fs::write(d.join("cgroup.procs"), pid.to_string())?;
        }
        Ok(())
    }

    /// Processes still in the VM's cgroup.
    pub fn procs(&self, vm: &str) -> Vec<u32> {
        let mut out = Vec::new();
        for d in self.dirs(vm) {
            let s = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
            for p in s.lines().filter_map(|l| l.trim().parse().ok()) {
                if !out.contains(&p) {
                    out.push(p);
                }
            }
        }
        out
    }

    /// Remove the VM's cgroup (only possible once it is empty).
    pub fn remove(&self, vm: &str) {
        for d in self.dirs(vm) {
            let _ = std::fs::remove_dir(d);
        }
    }

    /// Path of the cgroup in the first hierarchy (for display and tests).
    pub fn path(&self, vm: &str) -> Option<PathBuf> {
        self.dirs(vm).into_iter().next()
    }
}

/// Parse "00:15:5d:01:02:03" (or with '-') into 48 bits.
pub fn parse_mac(s: &str) -> Option<u64> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return None;
    }
    let mut v = 0u64;
    for p in parts {
        if p.len() != 2 {
            return None;
        }
        v = (v << 8) | u64::from_str_radix(p, 16).ok()?;
    }
    Some(v)
}

pub fn format_mac(v: u64) -> String {
    let b = v.to_be_bytes();
    format!(
        "{:02X}:{:02X}:{:02X}:{:02X}:{:02X}:{:02X}",
        b[2], b[3], b[4], b[5], b[6], b[7]
    )
}

/// A usable unicast MAC (not multicast, not all zero), normalized.
pub fn normalize_static_mac(s: &str) -> Option<String> {
    let v = parse_mac(s)?;
    if v == 0 || (v >> 40) & 1 == 1 {
        return None;
    }
    Some(format_mac(v))
}

/// Hyper-V derives each host's dynamic MAC range (00:15:5D:XX:YY:00-FF) from the
/// host's IP address so that hosts on one network do not collide. We derive XX:YY
/// from what identifies this host: machine-id alone is not enough, because hosts
/// cloned from one image share it, so the firmware's product UUID, the hostname
/// and the permanent addresses of physical NICs go into the hash as well. Computed
/// once, at fvd's first start (the settings are then persisted).
pub fn default_mac_pool_start() -> String {
    let h = host_fingerprint();
    mac_pool_start_of(&h)
}

fn mac_pool_start_of(h: &[u8; 32]) -> String {
    format!("00:15:5D:{:02X}:{:02X}:00", h[0], h[1])
}

/// This host's identifying facts (each missing fact simply omitted).
fn host_facts() -> Vec<(&'static str, String)> {
    let mut facts = Vec::new();
    for (label, path) in [
        ("machine-id", "/etc/machine-id"),
        ("product_uuid", "/sys/class/dmi/id/product_uuid"),
        ("hostname", "/proc/sys/kernel/hostname"),
    ] {
        if let Ok(v) = std::fs::read_to_string(path) {
            facts.push((label, v.trim().to_string()));
        }
    }
    // Physical NICs only (they have a `device` link); sorted for a stable order.
    let mut nics: Vec<String> = std::fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("device").exists())
        .filter_map(|e| std::fs::read_to_string(e.path().join("address")).ok())
        .map(|a| a.trim().to_string())
        .collect();
    nics.sort();
    facts.extend(nics.into_iter().map(|a| ("nic", a)));
    facts
}

pub fn host_fingerprint() -> [u8; 32] {
    fingerprint_of(&host_facts())
}

fn fingerprint_of(facts: &[(&str, String)]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut d = Sha256::new();
    for (label, v) in facts {
        d.update(label.as_bytes());
        d.update([0]);
        d.update(v.as_bytes());
        d.update([0]);
    }
    d.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_pool_differs_between_clones() {
        // Two hosts cloned from one image share machine-id and hostname; the
        // firmware UUID still separates their pools.
        let a = [
            ("machine-id", "3d1219c7c4c5404aaa1f6d2a48adfda4".to_string()),
            (
                "product_uuid",
                "42b2d727-18df-40ef-bc65-f58ad60b01c4".to_string(),
            ),
        ];
        let mut b = a.clone();
        b[1].1 = "9f0c1e2d-0000-4000-8000-000000000001".to_string();
        let (pa, pb) = (
            mac_pool_start_of(&fingerprint_of(&a)),
            mac_pool_start_of(&fingerprint_of(&b)),
        );
        assert_ne!(pa, pb);
        for p in [&pa, &pb] {
            assert!(p.starts_with("00:15:5D:") && p.ends_with(":00"), "{p}");
            assert!(parse_mac(p).is_some(), "{p}");
        }
        // Stable: the same facts give the same pool.
        assert_eq!(pa, mac_pool_start_of(&fingerprint_of(&a)));
    }

    #[test]
    fn mac_roundtrip() {
        let v = parse_mac("00:15:5d:0a:0b:ff").unwrap();
        assert_eq!(format_mac(v), "00:15:5D:0A:0B:FF");
        assert_eq!(format_mac(v + 1), "00:15:5D:0A:0C:00");
        assert!(
            normalize_static_mac("01:00:00:00:00:01").is_none(),
            "multicast"
        );
        assert!(normalize_static_mac("00:15:5d:0a:0b").is_none());
    }

    #[test]
    fn this_host_resolves_to_tcg() {
        // This machine's /dev/kvm is PVM; auto must not pick it.
        let (a, why) = resolve_accel(AccelSetting::Auto);
        if Path::new("/sys/module/kvm_pvm").exists() {
            assert_eq!(a, "tcg", "{why}");
        }
        assert_eq!(resolve_accel(AccelSetting::Tcg).0, "tcg");
    }
}
