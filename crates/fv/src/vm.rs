//! `fv vm|job|host …`: talk to fvd over its Unix socket.
#[path = "vm_console.rs"]
mod vm_console;
#[path = "vm_copy.rs"]
mod vm_copy;

use crate::client::{enc, socket_path, Client, HttpResponse};
use crate::output::{check, emit, Usage};
use crate::OutputFormat;
use anyhow::{anyhow, Context, Result};
use clap::{Args, Subcommand};
use fv_model::api::{EventView, HostView, JobState, JobView, VmView};
use fv_model::{HardDrive, NetworkAdapter};
use serde_json::{json, Value};
use std::path::PathBuf;

#[derive(Args, Clone)]
pub struct Conn {
    /// fvd's API socket (env FV_SOCKET; default /run/ferrovisor/fvd.sock).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum ServiceCmd {
    /// Virtual machines.
    Vm {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: VmCmd,
    },
    /// Jobs (long operations).
    Job {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: JobCmd,
    },
    /// The host: facts, settings, events, shutdown.
    Host {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: HostCmd,
    },
}

#[derive(Args, Clone, Default)]
pub struct HwArgs {
    /// Virtual processors.
    #[arg(long)]
    cpus: Option<u32>,
    /// Memory in MiB.
    #[arg(long)]
    memory: Option<u64>,
    /// CPU reserve, percent of a logical processor per vCPU (0-100).
    #[arg(long)]
    reserve: Option<u32>,
    /// CPU limit, percent of a logical processor per vCPU (0-100).
    #[arg(long)]
    limit: Option<u32>,
    /// Relative CPU weight (1-10000).
    #[arg(long)]
    weight: Option<u32>,
    #[arg(long)]
    notes: Option<String>,
    /// Automatic start action: nothing, start_if_running, always_start.
    #[arg(long)]
    start_action: Option<String>,
    /// Automatic start delay in seconds.
    #[arg(long)]
    start_delay: Option<u32>,
    /// Automatic stop action: save, turn_off, shut_down.
    #[arg(long)]
    stop_action: Option<String>,
    /// Direct kernel boot: kernel image.
    #[arg(long)]
    kernel: Option<PathBuf>,
    #[arg(long)]
    initrd: Option<PathBuf>,
    #[arg(long)]
    cmdline: Option<String>,
    /// Offer an integration service: heartbeat, shutdown, time_sync,
    /// key_value_exchange, backup, guest_services (repeatable; allowed while running).
    #[arg(long = "enable-integration", value_name = "SERVICE")]
    enable_integration: Vec<String>,
    /// Withdraw an integration service (repeatable; allowed while running).
    #[arg(long = "disable-integration", value_name = "SERVICE")]
    disable_integration: Vec<String>,
    /// Any other config field: KEY=JSON (e.g. --set 'com_ports=[true,true]').
    #[arg(long = "set", value_name = "KEY=JSON")]
    set: Vec<String>,
}

#[derive(Subcommand)]
pub enum VmCmd {
    /// Create a VM.
    New {
        name: String,
        /// Generation 1 (BIOS, IDE) or 2 (UEFI, SCSI).
        #[arg(long, default_value = "2")]
        generation: String,
        /// Hard disk images to attach (in order).
        #[arg(long = "disk")]
        disks: Vec<PathBuf>,
        /// ISO for a DVD drive.
        #[arg(long)]
        dvd: Option<PathBuf>,
        /// Add a network adapter: none, user or switch:NAME (repeatable).
        #[arg(long = "nic")]
        nics: Vec<String>,
        /// Folder for the VM (default: the host's VM folder).
        #[arg(long)]
        path: Option<PathBuf>,
        /// Authorization scope to create the VM in (default: the default scope).
        #[arg(long)]
        scope: Option<String>,
        #[command(flatten)]
        hw: Box<HwArgs>,
    },
    /// List VMs.
    List,
    /// Show one VM.
    Show {
        vm: String,
    },
    /// Change settings (hardware changes need the VM Off).
    Set {
        vm: String,
        #[command(flatten)]
        hw: Box<HwArgs>,
    },
    /// Start (or restore from saved state).
    Start {
        vm: String,
        #[command(flatten)]
        w: WaitArgs,
    },
    /// Shut down the guest; --turn-off pulls the plug; --save saves state.
    Stop {
        vm: String,
        #[arg(long, conflicts_with = "save")]
        turn_off: bool,
        #[arg(long)]
        save: bool,
        /// Turn off if the guest does not shut down in time.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        w: WaitArgs,
    },
    Pause {
        vm: String,
        #[command(flatten)]
        w: WaitArgs,
    },
    Resume {
        vm: String,
        #[command(flatten)]
        w: WaitArgs,
    },
    Reset {
        vm: String,
        #[command(flatten)]
        w: WaitArgs,
    },
    Save {
        vm: String,
        #[command(flatten)]
        w: WaitArgs,
    },
    /// Discard saved state (next start is a cold boot).
    DiscardSavedState {
        vm: String,
    },
    /// Remove (unregister) a VM that is Off or Saved.
    Remove {
        vm: String,
        /// Also delete the files fvd made for it: its config, its saved state and its
        /// folder if fvd created it and it is then empty (disks are kept, as Hyper-V does).
        #[arg(long)]
        delete_files: bool,
    },
    Rename {
        vm: String,
        new_name: String,
    },
    /// Interactive serial console (COM1 by default); Ctrl-] exits.
    Console {
        vm: String,
        #[arg(long, default_value_t = 1)]
        port: usize,
        /// Watch only (needs vm.console.output; typing needs vm.console.input).
        #[arg(long)]
        read_only: bool,
    },
    /// Freeze the guest's filesystems (backup integration service); they are
    /// thawed at the latest after --timeout seconds.
    Freeze {
        vm: String,
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Thaw the guest's filesystems.
    Thaw {
        vm: String,
    },
    /// Copy a local file into the guest (needs the guest_services integration service).
    CopyFile {
        vm: String,
        /// Local file (read by fv with your permissions and sent to fvd).
        src: PathBuf,
        /// Absolute destination path in the guest.
        dest: String,
        /// Create missing folders of DEST.
        #[arg(long)]
        create_full_path: bool,
        /// Replace DEST if it exists.
        #[arg(long)]
        overwrite: bool,
        #[command(flatten)]
        w: WaitArgs,
    },
    /// Hard drives.
    Disk {
        #[command(subcommand)]
        cmd: DiskCmd,
    },
    /// DVD media.
    Dvd {
        #[command(subcommand)]
        cmd: DvdCmd,
    },
    /// Network adapters.
    Nic {
        #[command(subcommand)]
        cmd: NicCmd,
    },
}

#[derive(Args, Clone)]
pub struct WaitArgs {
    /// Return the job at once instead of waiting for it.
    #[arg(long)]
    no_wait: bool,
}

#[derive(Subcommand)]
pub enum DiskCmd {
    Add {
        vm: String,
        path: PathBuf,
        /// ide or scsi (default: IDE on generation 1, SCSI on 2).
        #[arg(long)]
        controller: Option<String>,
        #[arg(long, default_value_t = 0)]
        controller_number: u32,
        #[arg(long)]
        location: Option<u32>,
        #[arg(long)]
        read_only: bool,
    },
    /// Detach by index (see `disk list`).
    Remove {
        vm: String,
        index: usize,
    },
    List {
        vm: String,
    },
}

#[derive(Subcommand)]
pub enum DvdCmd {
    /// Insert an ISO (or eject, with no ISO).
    Set {
        vm: String,
        iso: Option<PathBuf>,
        #[arg(long, default_value_t = 0)]
        index: usize,
    },
}

#[derive(Subcommand)]
pub enum NicCmd {
    Add {
        vm: String,
        #[arg(long)]
        name: Option<String>,
        /// Legacy (e1000) instead of synthetic (virtio).
        #[arg(long)]
        legacy: bool,
        /// Static MAC (default: dynamic from the host pool).
        #[arg(long)]
        mac: Option<String>,
        /// none, user or switch:NAME.
        #[arg(long, default_value = "none")]
        connect: String,
    },
    /// Remove by index, name, id or MAC.
    Remove {
        vm: String,
        nic: String,
    },
    /// Change MAC (`dynamic` for a pool MAC) or connection.
    Set {
        vm: String,
        nic: String,
        #[arg(long)]
        mac: Option<String>,
        #[arg(long)]
        connect: Option<String>,
        #[arg(long)]
        name: Option<String>,
    },
    List {
        vm: String,
    },
}

#[derive(Subcommand)]
pub enum JobCmd {
    /// The newest jobs first.
    List {
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Only jobs created after this RFC 3339 time (e.g. 2026-12-01T20:00:00Z).
        #[arg(long)]
        since: Option<String>,
    },
    Show {
        id: String,
    },
    /// Wait for a job to end (progress bar on a terminal).
    Wait {
        id: String,
    },
    Cancel {
        id: String,
    },
}

#[derive(Subcommand)]
pub enum HostCmd {
    Show,
    Set {
        #[arg(long)]
        vm_folder: Option<PathBuf>,
        #[arg(long)]
        disk_folder: Option<PathBuf>,
        #[arg(long)]
        mac_pool_start: Option<String>,
        #[arg(long)]
        mac_pool_size: Option<u32>,
        #[arg(long)]
        allow_memory_overcommit: Option<bool>,
        /// Percent of the host's CPU capacity VMs may reserve.
        #[arg(long)]
        cpu_reserve_pool: Option<u32>,
        /// auto, kvm or tcg.
        #[arg(long)]
        accel: Option<String>,
        /// none or restart_once.
        #[arg(long)]
        recovery: Option<String>,
        #[arg(long)]
        shutdown_timeout: Option<u64>,
    },
    /// Events, newest first (those after --since SEQ; the newest --limit).
    Events {
        #[arg(long, default_value_t = 0)]
        since: i64,
        #[arg(long)]
        vm: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Apply every running VM's automatic stop action, then stop fvd (host shutdown).
    Shutdown,
}

struct Api {
    c: Client,
}

impl Api {
    fn new(conn: &Conn) -> Api {
        Api {
            c: Client::new(&socket_path(conn.socket.clone())),
        }
    }

    /// Send; non-2xx answers become errors with fvd's message and the exit-code class.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<HttpResponse> {
        let r = self
            .c
            .request(method, path, body.as_ref())
            .map_err(|e| anyhow!("{e}"))?;
        check(r)
    }
}

impl Api {
    fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        let r = self.call("GET", path, None)?;
        serde_json::from_slice(&r.body)
            .with_context(|| format!("decoding the answer to GET {path}"))
    }

    fn send<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<T> {
        let r = self.call(method, path, body)?;
        serde_json::from_slice(&r.body)
            .with_context(|| format!("decoding the answer to {method} {path}"))
    }

    fn vm(&self, key: &str) -> Result<VmView> {
        self.get(&format!("/vms/{}", enc(key)))
    }

    /// Wait for a job to end, with a progress bar on a terminal.
    fn wait_job(&self, mut j: JobView) -> Result<JobView> {
        let bar = indicatif::ProgressBar::new(100);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}%")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        let label = match &j.vm_name {
            Some(n) => format!("{} {n}", j.operation),
            None => j.operation.clone(),
        };
        bar.set_message(label);
        while !j.state.is_final() {
            bar.set_position(j.percent_complete as u64);
            j = self.get(&format!("/jobs/{}?wait=1", j.id))?;
        }
        bar.finish_and_clear();
        Ok(j)
    }

    /// Handle a 202 job answer: wait (unless told not to) and turn failure into an error.
    fn job(&self, r: HttpResponse, wait: bool, out: OutputFormat) -> Result<()> {
        let j: JobView = serde_json::from_slice(&r.body).context("decoding the job")?;
        let j = if wait { self.wait_job(j)? } else { j };
        match j.state {
            JobState::Failed | JobState::Cancelled => {
                let state = j
                    .vm_id
                    .and_then(|id| self.vm(&id.to_string()).ok())
                    .map(|v| format!("; VM {} is {}", v.name, v.state))
                    .unwrap_or_default();
                Err(anyhow!(
                    "{} {} (job {}): {}{state}",
                    j.operation,
                    j.state,
                    j.id,
                    j.error_description.clone().unwrap_or_default()
                ))
            }
            _ => {
                emit(out, &j, || job_rows(std::slice::from_ref(&j)));
                Ok(())
            }
        }
    }
}

fn freeze_rows(st: &Value) -> Vec<Vec<String>> {
    let frozen = st["frozen"].as_bool().unwrap_or(false);
    let mut line = if frozen {
        format!("frozen: {} filesystem(s)", st["filesystems"])
    } else {
        "thawed".to_string()
    };
    if let (true, Some(t)) = (frozen, st["thaw_deadline"].as_u64()) {
        line.push_str(&format!(", thawed at the latest at {t} (Unix time)"));
    }
    vec![vec![line]]
}

/// A name or message for a table cell: control characters escaped (a newline in an
/// old record must not break the table or fake a row) and very long text cut, with
/// its length said. `-o json` shows the value as it is.
fn shown(s: &str) -> String {
    fv_model::one_line(s, 120)
}

/// Newest first, as fvd lists them.
fn job_rows(js: &[JobView]) -> Vec<Vec<String>> {
    let mut rows = vec![vec![
        "ID".into(),
        "OPERATION".into(),
        "VM".into(),
        "STATE".into(),
        "%".into(),
        "ENDED".into(),
        "ERROR".into(),
    ]];
    for j in js {
        rows.push(vec![
            j.id.to_string(),
            j.operation.clone(),
            shown(j.vm_name.as_deref().unwrap_or_default()),
            j.state.to_string(),
            j.percent_complete.to_string(),
            j.ended.clone().unwrap_or_default(),
            shown(j.error_description.as_deref().unwrap_or_default()),
        ]);
    }
    rows
}

fn vm_rows(vs: &[VmView]) -> Vec<Vec<String>> {
    let mut rows = vec![vec![
        "NAME".into(),
        "STATE".into(),
        "CPUS".into(),
        "MEMORY".into(),
        "UPTIME".into(),
        "ID".into(),
    ]];
    for v in vs {
        rows.push(vec![
            shown(&v.name),
            match &v.state_reason {
                Some(r) if v.state == fv_model::VmState::Critical => format!("{} ({r})", v.state),
                _ => v.state.to_string(),
            },
            v.config.cpu.count.to_string(),
            format!("{} MiB", v.config.memory_mib),
            v.uptime_s
                .map(|u| format!("{}:{:02}:{:02}", u / 3600, u / 60 % 60, u % 60))
                .unwrap_or_default(),
            v.id.to_string(),
        ]);
    }
    rows
}

fn vm_detail(v: &VmView) -> Vec<Vec<String>> {
    let c = &v.config;
    let mut rows = vec![
        vec!["FIELD".into(), "VALUE".into()],
        vec!["name".into(), shown(&v.name)],
        vec!["id".into(), v.id.to_string()],
        vec!["state".into(), v.state.to_string()],
    ];
    if let Some(r) = &v.state_reason {
        rows.push(vec!["reason".into(), r.clone()]);
    }
    let gen = match c.generation {
        fv_model::Generation::Gen1 => "1",
        fv_model::Generation::Gen2 => "2",
    };
    rows.push(vec!["generation".into(), gen.into()]);
    rows.push(vec![
        "cpu".into(),
        format!(
            "{} vCPU, reserve {}%, limit {}%, weight {}",
            c.cpu.count, c.cpu.reserve_percent, c.cpu.limit_percent, c.cpu.weight
        ),
    ]);
    rows.push(vec!["memory".into(), format!("{} MiB", c.memory_mib)]);
    for (i, d) in c.hard_drives.iter().enumerate() {
        rows.push(vec![
            format!("disk {i}"),
            format!(
                "{:?} {}:{} {}",
                d.slot.controller,
                d.slot.controller_number,
                d.slot.location,
                d.path.display()
            ),
        ]);
    }
    for (i, d) in c.dvd_drives.iter().enumerate() {
        rows.push(vec![
            format!("dvd {i}"),
            d.path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "(empty)".into()),
        ]);
    }
    for (i, n) in c.network_adapters.iter().enumerate() {
        rows.push(vec![
            format!("nic {i}"),
            format!(
                "{} {:?} mac {} {:?}",
                n.name,
                n.kind,
                n.mac().unwrap_or("(dynamic, at first start)"),
                n.connection
            ),
        ]);
    }
    rows.push(vec!["folder".into(), v.vm_dir.display().to_string()]);
    rows.push(vec![
        "saved state".into(),
        if v.has_saved_state { "yes" } else { "no" }.into(),
    ]);
    if let Some(u) = v.uptime_s {
        rows.push(vec!["uptime".into(), format!("{u} s")]);
    }
    if let Some(p) = v.qemu_pid {
        rows.push(vec!["qemu pid".into(), p.to_string()]);
    }
    if let Some(a) = &v.accel {
        rows.push(vec!["accelerator".into(), a.clone()]);
    }
    for (i, s) in v.com_sockets.iter().enumerate() {
        if let Some(s) = s {
            rows.push(vec![format!("COM{}", i + 1), s.display().to_string()]);
        }
    }
    rows.push(vec!["guest ready".into(), v.guest_ready.to_string()]);
    integration_rows(v, &mut rows);
    if !c.notes.is_empty() {
        rows.push(vec!["notes".into(), c.notes.clone()]);
    }
    rows
}

fn unix_time(t: u64) -> String {
    let ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs().saturating_sub(t))
        .unwrap_or(0);
    format!("{ago} s ago")
}

/// Integration services: what is offered, heartbeat, freeze, and what the guest
/// reports (OS, hostname, addresses per adapter matched by MAC).
fn integration_rows(v: &VmView, rows: &mut Vec<Vec<String>>) {
    let on: Vec<&str> = v
        .config
        .integration_services
        .list()
        .iter()
        .filter(|(_, on)| *on)
        .map(|(n, _)| *n)
        .collect();
    rows.push(vec![
        "integration".into(),
        if on.is_empty() {
            "(none)".into()
        } else {
            on.join(", ")
        },
    ]);
    if let Some(h) = &v.heartbeat {
        let last = h
            .last_answer
            .map(|t| format!(" (last answer {})", unix_time(t)))
            .unwrap_or_default();
        rows.push(vec!["heartbeat".into(), format!("{}{last}", h.status)]);
    }
    if let Some(f) = &v.freeze {
        if f.frozen {
            let until = f
                .thaw_deadline
                .map(|t| format!(", thawed by {t} at the latest"))
                .unwrap_or_default();
            rows.push(vec![
                "filesystems".into(),
                format!("frozen ({}{until})", f.filesystems),
            ]);
        }
    }
    let Some(g) = &v.guest else { return };
    let os = [g.os_name.as_deref(), g.os_version.as_deref()]
        .iter()
        .flatten()
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    if !os.is_empty() {
        rows.push(vec!["guest os".into(), os]);
    }
    if let Some(k) = &g.kernel_release {
        rows.push(vec!["guest kernel".into(), k.clone()]);
    }
    if let Some(h) = &g.hostname {
        rows.push(vec!["guest hostname".into(), h.clone()]);
    }
    for a in &g.adapters {
        let nic = v.config.network_adapters.iter().find(|n| {
            n.mac()
                .zip(a.mac.as_deref())
                .is_some_and(|(x, y)| x.eq_ignore_ascii_case(y))
        });
        let label = match nic {
            Some(n) => format!("ip {}", n.name),
            None => format!("ip {} (guest)", a.name),
        };
        let ips: Vec<String> = a.ipv4.iter().chain(a.ipv6.iter()).cloned().collect();
        rows.push(vec![
            label,
            format!(
                "{} [{} {}]",
                if ips.is_empty() {
                    "-".into()
                } else {
                    ips.join(", ")
                },
                a.name,
                a.mac.as_deref().unwrap_or("?")
            ),
        ]);
    }
}

fn connection(s: &str) -> Result<Value> {
    Ok(match s {
        "none" | "not_connected" => json!({"type": "not_connected"}),
        "user" => json!({"type": "user"}),
        _ => match s.strip_prefix("switch:") {
            Some(n) if !n.is_empty() => json!({"type": "switch", "name": n}),
            _ => {
                return Err(Usage(format!(
                    "--connect/--nic {s:?}: use none, user or switch:NAME"
                ))
                .into())
            }
        },
    })
}

fn abs(p: &std::path::Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The config patch described by the hardware flags (merged onto `cur` for nested fields).
fn hw_patch(
    hw: &HwArgs,
    cur: Option<&fv_model::VmConfig>,
) -> Result<serde_json::Map<String, Value>> {
    let mut p = serde_json::Map::new();
    if hw.cpus.is_some() || hw.reserve.is_some() || hw.limit.is_some() || hw.weight.is_some() {
        let base = cur.map(|c| c.cpu.clone()).unwrap_or(fv_model::CpuConfig {
            count: 1,
            reserve_percent: 0,
            limit_percent: 100,
            weight: 100,
        });
        p.insert(
            "cpu".into(),
            json!({
                "count": hw.cpus.unwrap_or(base.count),
                "reserve_percent": hw.reserve.unwrap_or(base.reserve_percent),
                "limit_percent": hw.limit.unwrap_or(base.limit_percent),
                "weight": hw.weight.unwrap_or(base.weight),
            }),
        );
    }
    if let Some(m) = hw.memory {
        p.insert("memory_mib".into(), json!(m));
    }
    if let Some(n) = &hw.notes {
        p.insert("notes".into(), json!(n));
    }
    if let Some(a) = &hw.start_action {
        p.insert("automatic_start_action".into(), json!(a));
    }
    if let Some(d) = hw.start_delay {
        p.insert("automatic_start_delay_s".into(), json!(d));
    }
    if let Some(a) = &hw.stop_action {
        p.insert("automatic_stop_action".into(), json!(a));
    }
    if let Some(k) = &hw.kernel {
        p.insert("direct_boot".into(), json!({"kernel": abs(k), "initrd": hw.initrd.as_deref().map(abs), "cmdline": hw.cmdline.clone().unwrap_or_default()}));
    } else if hw.initrd.is_some() || hw.cmdline.is_some() {
        return Err(Usage("--initrd/--cmdline need --kernel".into()).into());
    }
    if !hw.enable_integration.is_empty() || !hw.disable_integration.is_empty() {
        let mut is = cur.map(|c| c.integration_services).unwrap_or_default();
        for (names, on) in [
            (&hw.enable_integration, true),
            (&hw.disable_integration, false),
        ] {
            for n in names {
                if !is.set(n, on) {
                    return Err(Usage(format!(
                        "unknown integration service {n:?}: use {}",
                        fv_model::IntegrationServices::NAMES.join(", ")
                    ))
                    .into());
                }
            }
        }
        p.insert("integration_services".into(), json!(is));
    }
    for s in &hw.set {
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| Usage(format!("--set {s:?}: expected KEY=JSON")))?;
        let v: Value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
        p.insert(k.to_string(), v);
    }
    Ok(p)
}

pub fn run(c: ServiceCmd, out: OutputFormat) -> Result<()> {
    match c {
        ServiceCmd::Vm { conn, cmd } => run_vm(&Api::new(&conn), cmd, out),
        ServiceCmd::Job { conn, cmd } => run_job(&Api::new(&conn), cmd, out),
        ServiceCmd::Host { conn, cmd } => run_host(&Api::new(&conn), cmd, out),
    }
}

fn run_vm(api: &Api, cmd: VmCmd, out: OutputFormat) -> Result<()> {
    let show = |v: &VmView| emit(out, v, || vm_detail(v));
    match cmd {
        VmCmd::New {
            name,
            generation,
            disks,
            dvd,
            nics,
            path,
            scope,
            hw,
        } => {
            let gen = match generation.as_str() {
                "1" | "2" => generation,
                g => return Err(Usage(format!("--generation {g}: use 1 or 2")).into()),
            };
            let mut p = hw_patch(&hw, None)?;
            p.insert("name".into(), json!(name));
            p.insert("generation".into(), json!(gen));
            if let Some(d) = path {
                p.insert("vm_dir".into(), json!(abs(&d)));
            }
            let (kind, locs) = if gen == "1" { ("ide", 2) } else { ("scsi", 64) };
            let mut slot = 0u32;
            let mut next = || {
                let s = json!({"controller": kind, "controller_number": slot / locs, "location": slot % locs});
                slot += 1;
                s
            };
            let drives: Vec<Value> = disks
                .iter()
                .map(|d| json!({"slot": next(), "path": abs(d), "read_only": false}))
                .collect();
            if !drives.is_empty() {
                p.insert("hard_drives".into(), Value::Array(drives));
            }
            if let Some(iso) = dvd {
                p.insert(
                    "dvd_drives".into(),
                    json!([{"slot": next(), "path": abs(&iso)}]),
                );
            }
            if !nics.is_empty() {
                let list: Result<Vec<Value>> = nics
                    .iter()
                    .map(|n| Ok(json!({"connection": connection(n)?})))
                    .collect();
                p.insert("network_adapters".into(), Value::Array(list?));
            }
            let at = match &scope {
                Some(sc) => format!("/vms?scope={}", enc(sc)),
                None => "/vms".to_string(),
            };
            let v: VmView = api.send("POST", &at, Some(Value::Object(p)))?;
            show(&v);
        }
        VmCmd::List => {
            let vs: Vec<VmView> = api.get("/vms")?;
            emit(out, &vs, || vm_rows(&vs));
        }
        VmCmd::Show { vm } => show(&api.vm(&vm)?),
        VmCmd::Set { vm, hw } => {
            let cur = api.vm(&vm)?;
            let p = hw_patch(&hw, Some(&cur.config))?;
            if p.is_empty() {
                return Err(Usage("nothing to change: give at least one setting".into()).into());
            }
            let v: VmView =
                api.send("PATCH", &format!("/vms/{}", cur.id), Some(Value::Object(p)))?;
            show(&v);
        }
        VmCmd::Start { vm, w } => {
            let r = api.call("POST", &format!("/vms/{}/actions/start", enc(&vm)), None)?;
            api.job(r, !w.no_wait, out)?;
        }
        VmCmd::Stop {
            vm,
            turn_off,
            save,
            force,
            w,
        } => {
            let mode = if turn_off {
                "turn_off"
            } else if save {
                "save"
            } else {
                "shut_down"
            };
            let r = api.call(
                "POST",
                &format!("/vms/{}/actions/stop", enc(&vm)),
                Some(json!({"mode": mode, "force": force})),
            )?;
            api.job(r, !w.no_wait, out)?;
        }
        VmCmd::Pause { vm, w } => api.job(
            api.call("POST", &format!("/vms/{}/actions/pause", enc(&vm)), None)?,
            !w.no_wait,
            out,
        )?,
        VmCmd::Resume { vm, w } => api.job(
            api.call("POST", &format!("/vms/{}/actions/resume", enc(&vm)), None)?,
            !w.no_wait,
            out,
        )?,
        VmCmd::Reset { vm, w } => api.job(
            api.call("POST", &format!("/vms/{}/actions/reset", enc(&vm)), None)?,
            !w.no_wait,
            out,
        )?,
        VmCmd::Save { vm, w } => api.job(
            api.call("POST", &format!("/vms/{}/actions/save", enc(&vm)), None)?,
            !w.no_wait,
            out,
        )?,
        VmCmd::DiscardSavedState { vm } => show(&api.send(
            "POST",
            &format!("/vms/{}/actions/discard-saved-state", enc(&vm)),
            None,
        )?),
        VmCmd::Remove { vm, delete_files } => {
            let v = api.vm(&vm)?;
            api.call(
                "DELETE",
                &format!("/vms/{}?delete_files={delete_files}", v.id),
                None,
            )?;
            emit(out, &json!({"removed": v.id, "name": v.name}), || {
                vec![vec![format!("removed VM {} ({})", v.name, v.id)]]
            });
        }
        VmCmd::Rename { vm, new_name } => {
            show(&api.send(
                "PATCH",
                &format!("/vms/{}", enc(&vm)),
                Some(json!({"name": new_name})),
            )?);
        }
        VmCmd::Console {
            vm,
            port,
            read_only,
        } => vm_console::run(&api.c, &api.vm(&vm)?, port, read_only)?,
        VmCmd::Freeze { vm, timeout } => {
            let st: Value = api.send(
                "POST",
                &format!("/vms/{}/actions/freeze", enc(&vm)),
                Some(json!({ "timeout_s": timeout })),
            )?;
            emit(out, &st, || freeze_rows(&st));
        }
        VmCmd::Thaw { vm } => {
            let st: Value = api.send("POST", &format!("/vms/{}/actions/thaw", enc(&vm)), None)?;
            emit(out, &st, || freeze_rows(&st));
        }
        VmCmd::CopyFile {
            vm,
            src,
            dest,
            create_full_path,
            overwrite,
            w,
        } => {
            let path = format!(
                "/vms/{}/actions/copy-file?dest={}&create_full_path={create_full_path}&overwrite={overwrite}",
                enc(&vm),
                enc(&dest)
            );
            let tty =
                out == OutputFormat::Table && std::io::IsTerminal::is_terminal(&std::io::stderr());
            let r = check(vm_copy::upload(&api.c, &path, &src, tty)?)?;
            api.job(r, !w.no_wait, out)?;
        }
        VmCmd::Disk { cmd } => match cmd {
            DiskCmd::Add {
                vm,
                path,
                controller,
                controller_number,
                location,
                read_only,
            } => {
                let mut body = json!({"path": abs(&path), "read_only": read_only});
                if let Some(c) = controller {
                    if c != "ide" && c != "scsi" {
                        return Err(Usage(format!("--controller {c}: use ide or scsi")).into());
                    }
                    let loc =
                        location.ok_or_else(|| Usage("--controller needs --location".into()))?;
                    body["slot"] = json!({"controller": c, "controller_number": controller_number, "location": loc});
                }
                show(&api.send("POST", &format!("/vms/{}/disks", enc(&vm)), Some(body))?);
            }
            DiskCmd::Remove { vm, index } => {
                show(&api.send("DELETE", &format!("/vms/{}/disks/{index}", enc(&vm)), None)?)
            }
            DiskCmd::List { vm } => {
                let ds: Vec<HardDrive> = api.get(&format!("/vms/{}/disks", enc(&vm)))?;
                emit(out, &ds, || {
                    let mut rows = vec![vec![
                        "INDEX".into(),
                        "SLOT".into(),
                        "PATH".into(),
                        "RO".into(),
                    ]];
                    for (i, d) in ds.iter().enumerate() {
                        rows.push(vec![
                            i.to_string(),
                            format!(
                                "{:?} {}:{}",
                                d.slot.controller, d.slot.controller_number, d.slot.location
                            ),
                            d.path.display().to_string(),
                            d.read_only.to_string(),
                        ]);
                    }
                    rows
                });
            }
        },
        VmCmd::Dvd {
            cmd: DvdCmd::Set { vm, iso, index },
        } => {
            show(&api.send(
                "PUT",
                &format!("/vms/{}/dvd", enc(&vm)),
                Some(json!({"index": index, "path": iso.as_deref().map(abs)})),
            )?);
        }
        VmCmd::Nic { cmd } => match cmd {
            NicCmd::Add {
                vm,
                name,
                legacy,
                mac,
                connect,
            } => {
                let body = json!({"name": name, "kind": if legacy { "legacy" } else { "synthetic" }, "static_mac": mac, "connection": connection(&connect)?});
                show(&api.send("POST", &format!("/vms/{}/nics", enc(&vm)), Some(body))?);
            }
            NicCmd::Remove { vm, nic } => show(&api.send(
                "DELETE",
                &format!("/vms/{}/nics/{}", enc(&vm), enc(&nic)),
                None,
            )?),
            NicCmd::Set {
                vm,
                nic,
                mac,
                connect,
                name,
            } => {
                let mut body = json!({});
                if let Some(m) = mac {
                    body["static_mac"] = json!(if m == "dynamic" { String::new() } else { m });
                }
                if let Some(c) = connect {
                    body["connection"] = connection(&c)?;
                }
                if let Some(n) = name {
                    body["name"] = json!(n);
                }
                show(&api.send(
                    "PATCH",
                    &format!("/vms/{}/nics/{}", enc(&vm), enc(&nic)),
                    Some(body),
                )?);
            }
            NicCmd::List { vm } => {
                let ns: Vec<NetworkAdapter> = api.get(&format!("/vms/{}/nics", enc(&vm)))?;
                emit(out, &ns, || {
                    let mut rows = vec![vec![
                        "INDEX".into(),
                        "NAME".into(),
                        "KIND".into(),
                        "MAC".into(),
                        "CONNECTION".into(),
                    ]];
                    for (i, n) in ns.iter().enumerate() {
                        let mac = match (&n.static_mac, &n.dynamic_mac) {
                            (Some(m), _) => format!("{m} (static)"),
                            (None, Some(m)) => format!("{m} (dynamic)"),
                            _ => "(dynamic, at first start)".into(),
                        };
                        rows.push(vec![
                            i.to_string(),
                            n.name.clone(),
                            format!("{:?}", n.kind),
                            mac,
                            format!("{:?}", n.connection),
                        ]);
                    }
                    rows
                });
            }
        },
    }
    Ok(())
}

fn run_job(api: &Api, cmd: JobCmd, out: OutputFormat) -> Result<()> {
    match cmd {
        JobCmd::List { limit, since } => {
            let q = match since {
                Some(t) => format!("/jobs?limit={limit}&since={}", enc(&t)),
                None => format!("/jobs?limit={limit}"),
            };
            let js: Vec<JobView> = api.get(&q)?;
            emit(out, &js, || job_rows(&js));
        }
        JobCmd::Show { id } => {
            let j: JobView = api.get(&format!("/jobs/{}", enc(&id)))?;
            emit(out, &j, || job_rows(std::slice::from_ref(&j)));
        }
        JobCmd::Wait { id } => {
            let r = api.call("GET", &format!("/jobs/{}", enc(&id)), None)?;
            api.job(r, true, out)?;
        }
        JobCmd::Cancel { id } => {
            let j: JobView = api.send("POST", &format!("/jobs/{}/cancel", enc(&id)), None)?;
            emit(out, &j, || job_rows(std::slice::from_ref(&j)));
        }
    }
    Ok(())
}

fn run_host(api: &Api, cmd: HostCmd, out: OutputFormat) -> Result<()> {
    match cmd {
        HostCmd::Show => {
            let h: HostView = api.get("/host")?;
            emit(out, &h, || {
                let s = &h.settings;
                vec![
                    vec!["FIELD".into(), "VALUE".into()],
                    vec!["hostname".into(), h.hostname.clone()],
                    vec!["logical cpus".into(), h.logical_cpus.to_string()],
                    vec![
                        "memory".into(),
                        format!(
                            "{} MiB total, {} MiB available, {} MiB assigned to running VMs",
                            h.memory_total_mib, h.memory_available_mib, h.memory_assigned_mib
                        ),
                    ],
                    vec![
                        "cpu reserve".into(),
                        format!(
                            "{}% of {}% reserved",
                            h.cpu_reserved_percent, h.cpu_reserve_capacity_percent
                        ),
                    ],
                    vec![
                        "accelerator".into(),
                        format!("{} ({})", h.accel, h.accel_reason),
                    ],
                    vec!["cgroups".into(), h.cgroup.clone()],
                    vec![
                        "tls fingerprint".into(),
                        h.tls_fingerprint
                            .clone()
                            .unwrap_or_else(|| "- (no TLS listener)".into()),
                    ],
                    vec![
                        "vms".into(),
                        format!("{} ({} running)", h.vms, h.vms_running),
                    ],
                    vec![
                        "mac pool".into(),
                        format!(
                            "{} + {} addresses, {} used",
                            s.mac_pool_start, s.mac_pool_size, h.mac_pool_used
                        ),
                    ],
                    vec!["vm folder".into(), s.vm_folder.display().to_string()],
                    vec!["disk folder".into(), s.disk_folder.display().to_string()],
                    vec![
                        "memory overcommit".into(),
                        s.allow_memory_overcommit.to_string(),
                    ],
                    vec!["recovery".into(), format!("{:?}", s.recovery_action)],
                    vec![
                        "shutdown timeout".into(),
                        format!("{} s", s.shutdown_timeout_s),
                    ],
                ]
            });
        }
        HostCmd::Set {
            vm_folder,
            disk_folder,
            mac_pool_start,
            mac_pool_size,
            allow_memory_overcommit,
            cpu_reserve_pool,
            accel,
            recovery,
            shutdown_timeout,
        } => {
            let mut p = serde_json::Map::new();
            let mut put = |k: &str, v: Option<Value>| {
                if let Some(v) = v {
                    p.insert(k.into(), v);
                }
            };
            put("vm_folder", vm_folder.map(|d| json!(abs(&d))));
            put("disk_folder", disk_folder.map(|d| json!(abs(&d))));
            put("mac_pool_start", mac_pool_start.map(|v| json!(v)));
            put("mac_pool_size", mac_pool_size.map(|v| json!(v)));
            put(
                "allow_memory_overcommit",
                allow_memory_overcommit.map(|v| json!(v)),
            );
            put(
                "cpu_reserve_pool_percent",
                cpu_reserve_pool.map(|v| json!(v)),
            );
            put("accel", accel.map(|v| json!(v)));
            put("recovery_action", recovery.map(|v| json!(v)));
            put("shutdown_timeout_s", shutdown_timeout.map(|v| json!(v)));
            if p.is_empty() {
                return Err(Usage("nothing to change: give at least one setting".into()).into());
            }
            let s: Value = api.send("PATCH", "/host", Some(Value::Object(p)))?;
            emit(out, &s, || vec![vec!["host settings updated".into()]]);
        }
        HostCmd::Events { since, vm, limit } => {
            let q = match vm {
                Some(v) => format!("/events?since={since}&limit={limit}&vm={}", enc(&v)),
                None => format!("/events?since={since}&limit={limit}"),
            };
            let es: Vec<EventView> = api.get(&q)?;
            emit(out, &es, || {
                let mut rows = vec![vec![
                    "SEQ".into(),
                    "TIME".into(),
                    "KIND".into(),
                    "MESSAGE".into(),
                ]];
                for e in &es {
                    rows.push(vec![
                        e.seq.to_string(),
                        e.time.clone(),
                        e.kind.clone(),
                        shown(&e.message),
                    ]);
                }
                rows
            });
        }
        HostCmd::Shutdown => {
            let r = api.call("POST", "/host/actions/shutdown", None)?;
            api.job(r, true, out)?;
        }
    }
    Ok(())
}
