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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum Generation {
    #[serde(rename = "1")]
    Gen1,
    #[serde(rename = "2")]
    Gen2,
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
    Invalid { field: &'static str, reason: String },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
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
