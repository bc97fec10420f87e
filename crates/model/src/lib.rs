//! VM configuration, states and API types shared by fvd, fv-worker and fv.
//!
//! The config ([`VmConfig`]) is what lives in the VM's folder as `<id>.json`; it is
//! portable (paths inside the VM folder are stored relative to it).
#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use uuid::Uuid;

pub const CONFIG_VERSION: u32 = 1;

/// Hyper-V's VM states (plus Critical for failures, with a cause alongside).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "PascalCase")]
pub enum VmState {
    Off,
    Starting,
    Running,
    Paused,
    Saving,
    Saved,
    Stopping,
    Resetting,
    Critical,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum Generation {
    #[serde(rename = "1")]
    Gen1,
    #[serde(rename = "2")]
    Gen2,
}

// By hand so a wrong value says what is expected ("the string \"1\" or \"2\"")
// instead of serde's "expected variant identifier".
impl<'de> Deserialize<'de> for Generation {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Generation;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("the string \"1\" or \"2\"")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Generation, E> {
                match s {
                    "1" => Ok(Generation::Gen1),
                    "2" => Ok(Generation::Gen2),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(s), &self)),
                }
            }
        }
        d.deserialize_str(V)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum AutomaticStartAction {
    Nothing,
    #[default]
    StartIfRunning,
    AlwaysStart,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum AutomaticStopAction {
    #[default]
    Save,
    TurnOff,
    ShutDown,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CpuConfig {
    pub count: u32,
    /// Percent of one logical processor per vCPU reserved (0-100).
    #[serde(default)]
    pub reserve_percent: u32,
    /// Percent of one logical processor per vCPU the VM may use (0-100; 100 = no cap).
    #[serde(default = "default_100")]
    pub limit_percent: u32,
    /// Relative weight 1-10000.
    #[serde(default = "default_100")]
    pub weight: u32,
}

fn default_100() -> u32 {
    100
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum ControllerKind {
    Ide,
    Scsi,
}

/// Where a drive sits: IDE 0-1 / location 0-1, SCSI 0-3 / location 0-63.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Slot {
    pub controller: ControllerKind,
    pub controller_number: u32,
    pub location: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct HardDrive {
    pub slot: Slot,
    /// Image path (VHD/VHDX/raw); relative paths are relative to the VM folder.
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DvdDrive {
    pub slot: Slot,
    /// ISO image or none (empty drive).
    pub path: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum NicKind {
    /// virtio-net
    Synthetic,
    /// e1000, bootable by PXE on generation 1
    Legacy,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum NicConnection {
    NotConnected,
    /// QEMU user networking (slirp), for tests until switches land.
    User,
    /// A virtual switch by name (switch issue).
    Switch {
        name: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct NetworkAdapter {
    pub id: Uuid,
    pub name: String,
    pub kind: NicKind,
    /// Static MAC, or None for dynamic (assigned from the host pool at first start).
    pub static_mac: Option<String>,
    /// The dynamic MAC once assigned; kept across starts, released on delete.
    pub dynamic_mac: Option<String>,
    pub connection: NicConnection,
}

impl NetworkAdapter {
    pub fn mac(&self) -> Option<&str> {
        self.static_mac.as_deref().or(self.dynamic_mac.as_deref())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum BootDevice {
    Ide,
    Scsi,
    Cd,
    Network,
    Floppy,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct VmConfig {
    pub version: u32,
    pub id: Uuid,
    pub name: String,
    #[serde(default)]
    pub notes: String,
    pub generation: Generation,
    pub cpu: CpuConfig,
    pub memory_mib: u64,
    #[serde(default)]
    pub secure_boot: bool,
    #[serde(default)]
    pub boot_order: Vec<BootDevice>,
    #[serde(default)]
    pub hard_drives: Vec<HardDrive>,
    #[serde(default)]
    pub dvd_drives: Vec<DvdDrive>,
    #[serde(default)]
    pub floppy: Option<PathBuf>,
    #[serde(default)]
    pub network_adapters: Vec<NetworkAdapter>,
    /// COM1/COM2 enabled; each is a Unix socket in the runtime dir.
    #[serde(default = "default_com")]
    pub com_ports: [bool; 2],
    /// SCSI controllers use virtio-scsi (true) or virtio-blk (false) as the synthetic path.
    #[serde(default)]
    pub scsi_as_virtio_scsi: bool,
    #[serde(default)]
    pub automatic_start_action: AutomaticStartAction,
    #[serde(default)]
    pub automatic_start_delay_s: u32,
    #[serde(default)]
    pub automatic_stop_action: AutomaticStopAction,
    /// Direct kernel boot (tests and appliance images): kernel, initrd, command line.
    #[serde(default)]
    pub direct_boot: Option<DirectBoot>,
    /// Which integration services are offered to the guest (through qemu-guest-agent).
    #[serde(default)]
    pub integration_services: IntegrationServices,
}

/// Hyper-V's integration services, each offered (true) or withdrawn (false). All run
/// through qemu-guest-agent on a virtio-serial channel; a withdrawn service is simply
/// not used by the worker. Missing fields take Hyper-V's defaults, so older configs load.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct IntegrationServices {
    /// Periodic guest-ping; VM health shows ok / no contact / lost communication.
    #[serde(default = "yes")]
    pub heartbeat: bool,
    /// Graceful shut down through the agent (withdrawn: ACPI power button only).
    #[serde(default = "yes")]
    pub shutdown: bool,
    /// Set the guest clock from the host after restore and after long pauses.
    #[serde(default = "yes")]
    pub time_sync: bool,
    /// Guest OS/hostname/IP addresses to the host; host and VM names to the guest.
    #[serde(default = "yes")]
    pub key_value_exchange: bool,
    /// Filesystem freeze/thaw for application-consistent checkpoints and backups.
    #[serde(default = "yes")]
    pub backup: bool,
    /// Hyper-V's "Guest Service Interface": copying files into the guest. Off by default.
    #[serde(default)]
    pub guest_services: bool,
}

fn yes() -> bool {
    true
}

impl Default for IntegrationServices {
    fn default() -> Self {
        IntegrationServices {
            heartbeat: true,
            shutdown: true,
            time_sync: true,
            key_value_exchange: true,
            backup: true,
            guest_services: false,
        }
    }
}

impl IntegrationServices {
    /// Service names as used in the config and on the command line.
    pub const NAMES: [&'static str; 6] = [
        "heartbeat",
        "shutdown",
        "time_sync",
        "key_value_exchange",
        "backup",
        "guest_services",
    ];

    /// Offer (`on`) or withdraw one service by name; false for an unknown name.
    pub fn set(&mut self, name: &str, on: bool) -> bool {
        let f = match name {
            "heartbeat" => &mut self.heartbeat,
            "shutdown" => &mut self.shutdown,
            "time_sync" => &mut self.time_sync,
            "key_value_exchange" | "kvp" => &mut self.key_value_exchange,
            "backup" => &mut self.backup,
            "guest_services" => &mut self.guest_services,
            _ => return false,
        };
        *f = on;
        true
    }

    /// (name, offered) in a stable order.
    pub fn list(&self) -> [(&'static str, bool); 6] {
        [
            ("heartbeat", self.heartbeat),
            ("shutdown", self.shutdown),
            ("time_sync", self.time_sync),
            ("key_value_exchange", self.key_value_exchange),
            ("backup", self.backup),
            ("guest_services", self.guest_services),
        ]
    }
}

fn default_com() -> [bool; 2] {
    [true, false]
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DirectBoot {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Limits of what a caller may put into a configuration, checked at the API edge
/// ([`VmConfig::validate_input`]); host-dependent ones (logical CPUs, host memory)
/// are checked by fvd on top.
pub mod limits {
    /// Hyper-V's limit for a VM name; also used for adapter and switch names.
    pub const NAME_MAX_CHARS: usize = 100;
    /// Notes are free text (newlines and tabs allowed).
    pub const NOTES_MAX_BYTES: usize = 16 * 1024;
    /// PATH_MAX including the terminating NUL.
    pub const PATH_MAX_BYTES: usize = 4095;
    /// The x86 kernel's COMMAND_LINE_SIZE (2048, with the NUL).
    pub const CMDLINE_MAX_BYTES: usize = 2047;
    /// Hyper-V's minimum memory of a VM.
    pub const MEMORY_MIN_MIB: u64 = 32;
    /// Memory is given in whole 2 MiB (large page) units, as in Hyper-V.
    pub const MEMORY_ALIGN_MIB: u64 = 2;
    /// QEMU's `cpu-max` of the machine types we run: `pc` (i440fx, generation 1)
    /// and `q35` (generation 2), from QMP query-machines.
    pub const QEMU_MAX_VCPUS_PC: u32 = 255;
    pub const QEMU_MAX_VCPUS_Q35: u32 = 288;
    /// Hyper-V's limits: 8 synthetic and 4 legacy network adapters.
    pub const MAX_SYNTHETIC_NICS: usize = 8;
    pub const MAX_LEGACY_NICS: usize = 4;
    /// A boot order names each device kind at most once.
    pub const MAX_BOOT_ENTRIES: usize = 5;
    /// One day, as the upper bound of the automatic start delay.
    pub const MAX_START_DELAY_S: u32 = 86_400;
}

/// A name (VM, network adapter, switch): 1-100 characters, no control characters
/// (so no NUL, newline or tab), no `/`, not only white space.
/// `s` on one line for people: control characters (newline, tab, NUL, escape
/// sequences) escaped, so stored input cannot forge or split log lines or table
/// rows; text beyond `max` characters cut, with its length said.
pub fn one_line(s: &str, max: usize) -> String {
    let mut out = String::new();
    for (n, c) in s.chars().enumerate() {
        if n == max {
            out.push_str(&format!("...({} characters)", s.chars().count()));
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

pub fn check_name(field: &str, n: &str) -> Result<(), ConfigError> {
    let count = n.chars().count();
    if n.trim().is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if count > limits::NAME_MAX_CHARS {
        return Err(invalid(
            field,
            format!(
                "is {count} characters long; at most {} are allowed",
                limits::NAME_MAX_CHARS
            ),
        ));
    }
    if let Some(c) = n.chars().find(|c| c.is_control()) {
        return Err(invalid(
            field,
            format!("must not contain control characters (found {c:?})"),
        ));
    }
    if n.contains('/') {
        return Err(invalid(field, "must not contain '/'"));
    }
    Ok(())
}

/// A host path: not empty, at most PATH_MAX bytes, no NUL.
pub fn check_path(field: &str, p: &std::path::Path) -> Result<(), ConfigError> {
    use std::os::unix::ffi::OsStrExt;
    let b = p.as_os_str().as_bytes();
    if b.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if b.len() > limits::PATH_MAX_BYTES {
        return Err(invalid(
            field,
            format!(
                "is {} bytes long; paths are at most {} bytes",
                b.len(),
                limits::PATH_MAX_BYTES
            ),
        ));
    }
    if b.contains(&0) {
        return Err(invalid(field, "must not contain NUL"));
    }
    Ok(())
}

/// Validation of what a caller gave, beyond [`VmConfig::validate`]. A value equal to
/// the one in `old` (the configuration being changed) is not checked again, so a VM
/// registered before these limits existed can still be renamed or edited.
pub fn validate_input(c: &VmConfig, old: Option<&VmConfig>) -> Result<(), ConfigError> {
    let same = |f: &dyn Fn(&VmConfig) -> bool| old.is_some_and(f);
    if !same(&|o| o.name == c.name) {
        check_name("name", &c.name)?;
    }
    if !same(&|o| o.notes == c.notes) {
        if c.notes.len() > limits::NOTES_MAX_BYTES {
            return Err(invalid(
                "notes",
                format!(
                    "is {} bytes long; at most {} are allowed",
                    c.notes.len(),
                    limits::NOTES_MAX_BYTES
                ),
            ));
        }
        if let Some(ch) = c
            .notes
            .chars()
            .find(|ch| ch.is_control() && !matches!(ch, '\n' | '\r' | '\t'))
        {
            return Err(invalid(
                "notes",
                format!(
                    "must not contain control characters other than newline and tab (found {ch:?})"
                ),
            ));
        }
    }
    if !same(&|o| o.memory_mib == c.memory_mib) {
        if c.memory_mib < limits::MEMORY_MIN_MIB {
            return Err(invalid(
                "memory_mib",
                format!(
                    "{} MiB is below the minimum of {} MiB",
                    c.memory_mib,
                    limits::MEMORY_MIN_MIB
                ),
            ));
        }
        if !c.memory_mib.is_multiple_of(limits::MEMORY_ALIGN_MIB) {
            return Err(invalid(
                "memory_mib",
                format!(
                    "{} MiB is not a multiple of {} MiB",
                    c.memory_mib,
                    limits::MEMORY_ALIGN_MIB
                ),
            ));
        }
    }
    let qemu_max = match c.generation {
        Generation::Gen1 => limits::QEMU_MAX_VCPUS_PC,
        Generation::Gen2 => limits::QEMU_MAX_VCPUS_Q35,
    };
    if c.cpu.count > qemu_max && !same(&|o| o.cpu.count == c.cpu.count) {
        return Err(invalid(
            "cpu.count",
            format!(
                "{} virtual processors requested; a generation {} VM has at most {qemu_max}",
                c.cpu.count,
                match c.generation {
                    Generation::Gen1 => 1,
                    Generation::Gen2 => 2,
                }
            ),
        ));
    }
    if c.automatic_start_delay_s > limits::MAX_START_DELAY_S {
        return Err(invalid(
            "automatic_start_delay_s",
            format!("must be at most {} seconds", limits::MAX_START_DELAY_S),
        ));
    }
    if c.boot_order.len() > limits::MAX_BOOT_ENTRIES {
        return Err(invalid(
            "boot_order",
            format!("at most {} entries", limits::MAX_BOOT_ENTRIES),
        ));
    }
    for (i, d) in c.hard_drives.iter().enumerate() {
        check_path(&format!("hard_drives[{i}].path"), &d.path)?;
    }
    for (i, d) in c.dvd_drives.iter().enumerate() {
        if let Some(p) = &d.path {
            check_path(&format!("dvd_drives[{i}].path"), p)?;
        }
    }
    if let Some(p) = &c.floppy {
        check_path("floppy", p)?;
    }
    if let Some(b) = &c.direct_boot {
        check_path("direct_boot.kernel", &b.kernel)?;
        if let Some(i) = &b.initrd {
            check_path("direct_boot.initrd", i)?;
        }
        if b.cmdline.len() > limits::CMDLINE_MAX_BYTES {
            return Err(invalid(
                "direct_boot.cmdline",
                format!(
                    "is {} bytes long; the kernel takes at most {}",
                    b.cmdline.len(),
                    limits::CMDLINE_MAX_BYTES
                ),
            ));
        }
        if b.cmdline.chars().any(|ch| ch.is_control()) {
            return Err(invalid(
                "direct_boot.cmdline",
                "must not contain control characters",
            ));
        }
    }
    let (mut synthetic, mut legacy) = (0, 0);
    for (i, n) in c.network_adapters.iter().enumerate() {
        let was = old.and_then(|o| o.network_adapters.iter().find(|x| x.id == n.id));
        if was.is_none_or(|w| w.name != n.name) {
            check_name(&format!("network_adapters[{i}].name"), &n.name)?;
        }
        if let NicConnection::Switch { name } = &n.connection {
            if was.is_none_or(|w| w.connection != n.connection) {
                check_name(&format!("network_adapters[{i}].connection.name"), name)?;
            }
        }
        if let Some(m) = &n.static_mac {
            if m.len() > 32 || m.chars().any(|ch| ch.is_control()) {
                return Err(invalid(
                    format!("network_adapters[{i}].static_mac"),
                    "is not a MAC address",
                ));
            }
        }
        match n.kind {
            NicKind::Synthetic => synthetic += 1,
            NicKind::Legacy => legacy += 1,
        }
    }
    if synthetic > limits::MAX_SYNTHETIC_NICS || legacy > limits::MAX_LEGACY_NICS {
        return Err(invalid(
            "network_adapters",
            format!(
                "{synthetic} synthetic and {legacy} legacy adapters; at most {} and {} are allowed",
                limits::MAX_SYNTHETIC_NICS,
                limits::MAX_LEGACY_NICS
            ),
        ));
    }
    Ok(())
}

impl VmConfig {
    pub fn new(name: &str, generation: Generation) -> Self {
        VmConfig {
            version: CONFIG_VERSION,
            id: Uuid::new_v4(),
            name: name.to_string(),
            notes: String::new(),
            generation,
            cpu: CpuConfig {
                count: 1,
                reserve_percent: 0,
                limit_percent: 100,
                weight: 100,
            },
            memory_mib: 512,
            secure_boot: false,
            boot_order: match generation {
                Generation::Gen1 => vec![
                    BootDevice::Cd,
                    BootDevice::Ide,
                    BootDevice::Network,
                    BootDevice::Floppy,
                ],
                Generation::Gen2 => vec![BootDevice::Scsi, BootDevice::Network, BootDevice::Cd],
            },
            hard_drives: Vec::new(),
            dvd_drives: Vec::new(),
            floppy: None,
            network_adapters: Vec::new(),
            com_ports: default_com(),
            scsi_as_virtio_scsi: false,
            automatic_start_action: AutomaticStartAction::default(),
            automatic_start_delay_s: 0,
            automatic_stop_action: AutomaticStopAction::default(),
            direct_boot: None,
            integration_services: IntegrationServices::default(),
        }
    }

    /// Structural validation (host limits such as CPU count are checked by fvd).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.name.trim().is_empty() {
            return Err(invalid("name", "must not be empty"));
        }
        if self.cpu.count == 0 {
            return Err(invalid("cpu.count", "must be at least 1"));
        }
        if self.cpu.reserve_percent > 100 || self.cpu.limit_percent > 100 {
            return Err(invalid("cpu", "reserve and limit are percentages 0-100"));
        }
        if self.cpu.reserve_percent > self.cpu.limit_percent {
            return Err(invalid("cpu.reserve_percent", "must not exceed the limit"));
        }
        if !(1..=10000).contains(&self.cpu.weight) {
            return Err(invalid("cpu.weight", "must be 1-10000"));
        }
        if self.memory_mib < 32 {
            return Err(invalid("memory_mib", "must be at least 32"));
        }
        let mut slots = Vec::new();
        for s in self
            .hard_drives
            .iter()
            .map(|d| d.slot)
            .chain(self.dvd_drives.iter().map(|d| d.slot))
        {
            let (ctrls, locs) = match s.controller {
                ControllerKind::Ide => (2, 2),
                ControllerKind::Scsi => (4, 64),
            };
            if s.controller_number >= ctrls || s.location >= locs {
                return Err(invalid(
                    "slot",
                    format!(
                        "{:?} {}:{} does not exist",
                        s.controller, s.controller_number, s.location
                    ),
                ));
            }
            if self.generation == Generation::Gen2 && s.controller == ControllerKind::Ide {
                return Err(invalid("slot", "generation 2 VMs have no IDE controller"));
            }
            if slots.contains(&s) {
                return Err(invalid(
                    "slot",
                    format!(
                        "{:?} {}:{} is used twice",
                        s.controller, s.controller_number, s.location
                    ),
                ));
            }
            slots.push(s);
        }
        if self.generation == Generation::Gen2 && self.floppy.is_some() {
            return Err(invalid("floppy", "generation 2 VMs have no floppy drive"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn roundtrip_and_validate() {
        let mut c = VmConfig::new("a", Generation::Gen1);
        c.validate().unwrap();
        let s = serde_json::to_string(&c).unwrap();
        let d: VmConfig = serde_json::from_str(&s).unwrap();
        assert_eq!(c, d);
        c.cpu.weight = 0;
        assert!(c.validate().is_err());
        let mut g2 = VmConfig::new("b", Generation::Gen2);
        g2.dvd_drives.push(DvdDrive {
            slot: Slot {
                controller: ControllerKind::Ide,
                controller_number: 0,
                location: 0,
            },
            path: None,
        });
        assert!(g2.validate().is_err());
    }

    #[test]
    fn integration_services_default_for_old_configs() {
        let c = VmConfig::new("a", Generation::Gen1);
        let mut v = serde_json::to_value(&c).unwrap();
        v.as_object_mut().unwrap().remove("integration_services");
        let d: VmConfig = serde_json::from_value(v).unwrap();
        assert_eq!(d.integration_services, IntegrationServices::default());
        assert!(!d.integration_services.guest_services);
        let p: IntegrationServices = serde_json::from_str(r#"{"heartbeat": false}"#).unwrap();
        assert!(!p.heartbeat && p.backup && !p.guest_services);
    }
}

/// Types of the fvd REST API (shared by fvd and the `fv` CLI).
pub mod api;
pub mod state;
