//! Host paths a caller names (hard drives and their differencing parents, DVD,
//! floppy, kernel, initrd, VM folders) are checked against the caller's own rights
//! before fvd or a worker opens them on the caller's behalf.
//!
//! The rule (README, "Security"):
//! - Root holding Administrator (`root_is_admin`) is unrestricted, as before.
//! - Everyone else may name only paths inside the host's storage roots: the host
//!   settings `vm_folder`, `disk_folder` and `media_folders` (changed only by
//!   `host.reconfigure`, i.e. an Administrator in scope `*`).
//! - A local Unix user must also be able to open each file themselves: a short-lived
//!   child (`fvd --access-probe`, a fresh single-threaded process, so no fork in a
//!   threaded fvd) drops to the user's uid, gid and supplementary groups and opens
//!   every file (read-write for a writable hard drive, read-only for its parents and
//!   media), following differencing chains as the worker will. The location check
//!   uses the path of the descriptor the user really opened (`/proc/self/fd`), so a
//!   symlink swapped in between cannot point the check at one file and the open at
//!   another.
//! - A token is checked by fvd itself: storage roots only.
//!
//! The check runs when a path is attached, and again at every start with the
//! principal that attached it (recorded in `<state>/access/<vm-id>.json`, which
//! only root can write): permissions changed, or a file swapped, after the attach
//! are caught at the next start. The window left is the moment between that start
//! check and the worker's own open.
use crate::util;
use fv_authz::Principal;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};

/// The hidden first argument that makes `fvd` run the probe child.
pub const PROBE_ARG: &str = "--access-probe";

/// Longest differencing chain the probe follows (as the disk engine).
const MAX_CHAIN: usize = fv_vdisk::MAX_CHAIN_DEPTH;

#[derive(Debug, Clone, thiserror::Error)]
pub enum AccessError {
    /// The caller lacks a right on a path: 403.
    #[error("{who} cannot {verb} {path}: {reason}")]
    Denied {
        who: String,
        verb: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// The path does not exist (or is not the kind of object asked for): 400.
    #[error("{path} {what}")]
    Missing { path: PathBuf, what: String },
    /// The check itself could not run: 500.
    #[error("cannot check access to host paths: {0}")]
    Internal(String),
}

/// Who names a path, as the access checks see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requester {
    /// Root as Administrator, or fvd acting on its own (auto-start, recovery).
    Unrestricted,
    /// A local user: storage roots and their own rights.
    User { uid: u32 },
    /// An API token: storage roots only.
    Token { id: String, name: Option<String> },
    /// fvd starting a VM itself (auto-start, recovery) with a path no principal is
    /// recorded for: the host-wide rule, storage roots only.
    Host,
}

/// Who attached a path, as recorded (the serialisable form of [`Requester`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Owner {
    Unrestricted,
    Unix { uid: u32 },
    Token { id: String },
}

impl Requester {
    pub fn from_principal(p: &Principal, root_is_admin: bool, name: Option<String>) -> Requester {
        match p {
            Principal::Unix { uid: 0 } if root_is_admin => Requester::Unrestricted,
            Principal::Unix { uid } => Requester::User { uid: *uid },
            Principal::Token { id } => Requester::Token {
                id: id.clone(),
                name,
            },
        }
    }

    pub fn owner(&self) -> Owner {
        match self {
            Requester::Unrestricted => Owner::Unrestricted,
            Requester::User { uid } => Owner::Unix { uid: *uid },
            Requester::Token { id, .. } => Owner::Token { id: id.clone() },
            // Never recorded as an owner: the strictest of the recorded kinds.
            Requester::Host => Owner::Token { id: String::new() },
        }
    }

    pub fn from_owner(o: &Owner) -> Requester {
        match o {
            Owner::Unrestricted => Requester::Unrestricted,
            Owner::Unix { uid } => Requester::User { uid: *uid },
            Owner::Token { id } => Requester::Token {
                id: id.clone(),
                name: None,
            },
        }
    }

    /// How refusals name the caller: "user alice", "uid 1234", "token ci (ab12)".
    pub fn describe(&self) -> String {
        match self {
            Requester::Unrestricted => "root".into(),
            Requester::User { uid } => match nix::unistd::User::from_uid((*uid).into()) {
                Ok(Some(u)) => format!("user {}", u.name),
                _ => format!("uid {uid}"),
            },
            Requester::Token { id, name: Some(n) } => format!("token {n} ({id})"),
            Requester::Token { id, name: None } => format!("token {id}"),
            Requester::Host => {
                "fvd, starting the VM itself for a path attached outside the API,".into()
            }
        }
    }
}

tokio::task_local! {
    /// The requester of the API call being served (set by the authorization layer
    /// around every routed request).
    static CURRENT: Requester;
}

/// Run `f` (a request's handler) with `r` as the current requester.
pub async fn with_requester<F: std::future::Future>(r: Requester, f: F) -> F::Output {
    CURRENT.scope(r, f).await
}

/// Is an API call being served (as opposed to fvd's own work)?
pub fn in_request() -> bool {
    CURRENT.try_with(|_| ()).is_ok()
}

/// The requester of the current API call. Outside a request (fvd's own work:
/// auto-start, recovery, reconcile) fvd acts for itself: unrestricted.
pub fn current() -> Requester {
    CURRENT
        .try_with(Clone::clone)
        .unwrap_or(Requester::Unrestricted)
}

/// What a configured path is for (decides the right asked for and the wording).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Use {
    HardDrive,
    Dvd,
    Floppy,
    Kernel,
    Initrd,
}

/// One path to check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Want {
    /// Absolute (relative paths are resolved against the VM folder first).
    pub path: PathBuf,
    pub write: bool,
    /// Follow differencing parents (hard drives).
    pub chain: bool,
}

/// The probe's answer for one opened file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Opened {
    named: PathBuf,
    /// The file really opened (`/proc/self/fd/N`).
    real: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
enum ProbeFail {
    /// Opening failed with an errno.
    Denied {
        path: PathBuf,
        write: bool,
        reason: String,
    },
    Missing {
        path: PathBuf,
        what: String,
    },
    /// The file (as resolved, symlinks followed) is outside the storage roots.
    Outside {
        path: PathBuf,
        write: bool,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ProbeRequest {
    uid: u32,
    gid: u32,
    user: Option<String>,
    files: Vec<Want>,
    /// Folders the VM will live in (must be, or be creatable, writable by the user).
    dirs: Vec<PathBuf>,
    /// The storage roots, canonical: nothing outside them is opened.
    roots: Vec<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ProbeAnswer {
    opened: Vec<Opened>,
    /// For each requested folder: the real path of its nearest existing ancestor,
    /// and the components below it still to create.
    dirs: Vec<(PathBuf, Vec<String>)>,
    fail: Option<ProbeFail>,
}

fn reason_of(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => nix::errno::Errno::from_raw(n).desc().to_lowercase(),
        None => e.to_string(),
    }
}

fn real_path_of(f: &std::fs::File, named: &Path) -> PathBuf {
    std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))
        .unwrap_or_else(|_| named.to_path_buf())
}

fn missing_or_denied(path: &Path, write: bool, e: &std::io::Error) -> ProbeFail {
    if e.kind() == std::io::ErrorKind::NotFound {
        ProbeFail::Missing {
            path: path.to_path_buf(),
            what: "does not exist or is not a file".into(),
        }
    } else {
        ProbeFail::Denied {
            path: path.to_path_buf(),
            write,
            reason: reason_of(e),
        }
    }
}

/// Open `path` (read-only, or read-write) and return its real path. Only regular
/// files inside the roots are opened (no device node's open side effects).
fn open_one(
    path: &Path,
    write: bool,
    roots: &[PathBuf],
) -> Result<(std::fs::File, PathBuf), ProbeFail> {
    use std::os::unix::fs::OpenOptionsExt;
    let canon = std::fs::canonicalize(path).map_err(|e| missing_or_denied(path, write, &e))?;
    if !inside(&canon, roots) {
        return Err(ProbeFail::Outside {
            path: path.to_path_buf(),
            write,
        });
    }
    let is_file = std::fs::metadata(&canon)
        .map_err(|e| missing_or_denied(path, write, &e))?
        .is_file();
    if !is_file {
        return Err(ProbeFail::Missing {
            path: path.to_path_buf(),
            what: "does not exist or is not a file".into(),
        });
    }
    let flags = nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_NOCTTY;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(flags.bits())
        .open(&canon)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                ProbeFail::Missing {
                    path: path.to_path_buf(),
                    what: "does not exist or is not a file".into(),
                }
            } else {
                ProbeFail::Denied {
                    path: path.to_path_buf(),
                    write,
                    reason: reason_of(&e),
                }
            }
        })?;
    let is_file = f.metadata().map(|m| m.is_file()).unwrap_or(false);
    if !is_file {
        return Err(ProbeFail::Missing {
            path: path.to_path_buf(),
            what: "does not exist or is not a file".into(),
        });
    }
    let real = real_path_of(&f, path);
    // Swapped between the look and the open: judge what was really opened.
    if !inside(&real, roots) {
        return Err(ProbeFail::Outside {
            path: path.to_path_buf(),
            write,
        });
    }
    Ok((f, real))
}

/// Open a file, and for hard drives every parent of its differencing chain, with
/// the credentials of this process.
fn probe_file(w: &Want, roots: &[PathBuf], out: &mut Vec<Opened>) -> Result<(), ProbeFail> {
    let (_f, real) = open_one(&w.path, w.write, roots)?;
    out.push(Opened {
        named: w.path.clone(),
        real: real.clone(),
    });
    if !w.chain {
        return Ok(());
    }
    let ro = fv_vdisk::OpenOptions {
        read_only: true,
        replay_log: false,
        policy: fv_vdisk::PathPolicy::image_dir_only(),
    };
    let mut child = real;
    for _ in 0..MAX_CHAIN {
        // A file the engine cannot parse has no parents to follow; the worker
        // reports what is wrong with it.
        let Ok(layer) = fv_vdisk::open_layer(&child, None, &ro) else {
            return Ok(());
        };
        let Some(loc) = layer.layer().parent_locator().cloned() else {
            return Ok(());
        };
        let cands = fv_vdisk::parent_candidates(&child, &loc);
        let mut next = None;
        for c in &cands {
            match open_one(c, false, roots) {
                Ok((_pf, preal)) => {
                    out.push(Opened {
                        named: c.clone(),
                        real: preal.clone(),
                    });
                    next = Some(preal);
                    break;
                }
                Err(ProbeFail::Missing { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        match next {
            Some(p) => child = p,
            None => {
                return Err(ProbeFail::Missing {
                    path: child.clone(),
                    what: format!(
                        "is a differencing disk whose parent is missing (tried {})",
                        cands
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                })
            }
        }
    }
    Ok(())
}

/// The nearest existing ancestor of `dir` (real path) and what is left to create;
/// the ancestor (or `dir` itself) must be a folder this process may write into.
fn probe_dir(
    dir: &Path,
    check_write: bool,
    roots: &[PathBuf],
) -> Result<(PathBuf, Vec<String>), ProbeFail> {
    let mut rest: Vec<String> = Vec::new();
    let mut cur = dir.to_path_buf();
    loop {
        match std::fs::metadata(&cur) {
            Ok(m) => {
                if !m.is_dir() {
                    return Err(ProbeFail::Missing {
                        path: cur,
                        what: "is not a folder".into(),
                    });
                }
                if check_write {
                    if let Err(e) = nix::unistd::access(
                        &cur,
                        nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
                    ) {
                        return Err(ProbeFail::Denied {
                            path: cur,
                            write: true,
                            reason: e.desc().to_lowercase(),
                        });
                    }
                }
                let real = std::fs::canonicalize(&cur).map_err(|e| ProbeFail::Denied {
                    path: cur.clone(),
                    write: false,
                    reason: reason_of(&e),
                })?;
                if !inside(&real, roots) {
                    return Err(ProbeFail::Outside {
                        path: dir.to_path_buf(),
                        write: true,
                    });
                }
                rest.reverse();
                return Ok((real, rest));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let name = match cur.file_name() {
                    Some(n) => n.to_string_lossy().into_owned(),
                    None => {
                        return Err(ProbeFail::Missing {
                            path: dir.to_path_buf(),
                            what: "has no existing parent folder".into(),
                        })
                    }
                };
                rest.push(name);
                if !cur.pop() {
                    return Err(ProbeFail::Missing {
                        path: dir.to_path_buf(),
                        what: "has no existing parent folder".into(),
                    });
                }
            }
            Err(e) => {
                return Err(ProbeFail::Denied {
                    path: cur,
                    write: false,
                    reason: reason_of(&e),
                })
            }
        }
    }
}

fn probe(req: &ProbeRequest, check_dir_write: bool) -> ProbeAnswer {
    let mut a = ProbeAnswer {
        opened: Vec::new(),
        dirs: Vec::new(),
        fail: None,
    };
    for w in &req.files {
        if let Err(e) = probe_file(w, &req.roots, &mut a.opened) {
            a.fail = Some(e);
            return a;
        }
    }
    for d in &req.dirs {
        match probe_dir(d, check_dir_write, &req.roots) {
            Ok(x) => a.dirs.push(x),
            Err(e) => {
                a.fail = Some(e);
                return a;
            }
        }
    }
    a
}

/// `fvd --access-probe`: read a [`ProbeRequest`] on stdin, become the user, probe,
/// write the [`ProbeAnswer`] on stdout. Exit status 0 when an answer was written.
pub fn probe_child_main() -> i32 {
    let mut input = Vec::new();
    if std::io::stdin().read_to_end(&mut input).is_err() {
        return 2;
    }
    let Ok(req) = serde_json::from_slice::<ProbeRequest>(&input) else {
        return 2;
    };
    if let Err(e) = become_user(&req) {
        eprintln!("fvd access probe: cannot take uid {}: {e}", req.uid);
        return 3;
    }
    let a = probe(&req, true);
    match serde_json::to_vec(&a) {
        Ok(b) => {
            let mut out = std::io::stdout();
            if out.write_all(&b).and_then(|_| out.flush()).is_err() {
                return 4;
            }
            0
        }
        Err(_) => 4,
    }
}

/// Take the user's groups, gid and uid for good (real, effective and saved), so
/// nothing the probe opens is opened with root's rights.
fn become_user(req: &ProbeRequest) -> nix::Result<()> {
    use nix::unistd::{Gid, Uid};
    let gid = Gid::from_raw(req.gid);
    match &req.user {
        Some(name) => {
            let c = std::ffi::CString::new(name.as_bytes()).map_err(|_| nix::Error::EINVAL)?;
            nix::unistd::initgroups(&c, gid)?;
        }
        None => nix::unistd::setgroups(&[])?,
    }
    nix::unistd::setresgid(gid, gid, gid)?;
    let uid = Uid::from_raw(req.uid);
    nix::unistd::setresuid(uid, uid, uid)?;
    // Refuse to go on if root could be regained.
    if req.uid != 0
        && nix::unistd::setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0)).is_ok()
    {
        return Err(nix::Error::EPERM);
    }
    Ok(())
}

/// Run the probe as `uid` in a child `fvd --access-probe`.
fn probe_as(
    uid: u32,
    files: &[Want],
    dirs: &[PathBuf],
    roots: &[PathBuf],
) -> Result<ProbeAnswer, AccessError> {
    let (user, gid) = match nix::unistd::User::from_uid(uid.into()) {
        Ok(Some(u)) => (Some(u.name), u.gid.as_raw()),
        // A uid without a passwd entry gets no groups and the "nogroup" gid.
        _ => (None, 65534),
    };
    let req = ProbeRequest {
        uid,
        gid,
        user,
        files: files.to_vec(),
        dirs: dirs.to_vec(),
        roots: roots.to_vec(),
    };
    // Our own binary, even if it was replaced on disk since fvd started.
    let exe = PathBuf::from("/proc/self/exe");
    let mut child = Command::new(&exe)
        .arg(PROBE_ARG)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_clear()
        .spawn()
        .map_err(|e| AccessError::Internal(format!("cannot run {}: {e}", exe.display())))?;
    let body = serde_json::to_vec(&req).map_err(|e| AccessError::Internal(e.to_string()))?;
    if let Some(mut si) = child.stdin.take() {
        si.write_all(&body)
            .map_err(|e| AccessError::Internal(format!("access probe stdin: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| AccessError::Internal(format!("access probe: {e}")))?;
    if !out.status.success() {
        return Err(AccessError::Internal(format!(
            "access probe for uid {uid} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| AccessError::Internal(format!("access probe answer: {e}")))
}

/// The storage roots, canonicalised (roots that do not exist yet are kept as given).
pub fn canonical_roots(roots: &[PathBuf]) -> Vec<PathBuf> {
    roots
        .iter()
        .map(|r| std::fs::canonicalize(r).unwrap_or_else(|_| util_lexical(r)))
        .collect()
}

/// A path with `.` removed and `..` applied lexically (for roots that do not exist).
fn util_lexical(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

fn inside(p: &Path, roots: &[PathBuf]) -> bool {
    roots.iter().any(|r| p.starts_with(r))
}

fn roots_list(roots: &[PathBuf]) -> String {
    if roots.is_empty() {
        return "none configured".into();
    }
    roots
        .iter()
        .map(|r| r.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn outside(who: &Requester, verb: &'static str, path: &Path, roots: &[PathBuf]) -> AccessError {
    AccessError::Denied {
        who: who.describe(),
        verb,
        path: path.to_path_buf(),
        reason: format!(
            "outside the host's storage roots ({}; an Administrator adds roots with the host settings vm_folder, disk_folder, media_folders)",
            roots_list(roots)
        ),
    }
}

fn from_fail(who: &Requester, f: ProbeFail, roots: &[PathBuf]) -> AccessError {
    match f {
        ProbeFail::Outside { path, write } => {
            outside(who, if write { "write" } else { "read" }, &path, roots)
        }
        ProbeFail::Denied {
            path,
            write,
            reason,
        } => AccessError::Denied {
            who: who.describe(),
            verb: if write { "write" } else { "read" },
            path,
            reason,
        },
        ProbeFail::Missing { path, what } => AccessError::Missing { path, what },
    }
}

/// Check files (with their chains) and VM folders for `who`. `roots` are the
/// storage roots as configured.
pub fn check(
    who: &Requester,
    files: &[Want],
    dirs: &[PathBuf],
    roots: &[PathBuf],
) -> Result<(), AccessError> {
    if *who == Requester::Unrestricted || (files.is_empty() && dirs.is_empty()) {
        return Ok(());
    }
    for d in dirs {
        if d.components().any(|c| c == Component::ParentDir) || !d.is_absolute() {
            return Err(AccessError::Missing {
                path: d.clone(),
                what: "must be an absolute path without \"..\"".into(),
            });
        }
    }
    let roots = canonical_roots(roots);
    let answer = match who {
        Requester::User { uid } => probe_as(*uid, files, dirs, &roots)?,
        // A token has no host identity: fvd looks, storage roots decide.
        _ => probe(
            &ProbeRequest {
                uid: 0,
                gid: 0,
                user: None,
                files: files.to_vec(),
                dirs: dirs.to_vec(),
                roots: roots.clone(),
            },
            false,
        ),
    };
    match answer.fail {
        Some(f) => Err(from_fail(who, f, &roots)),
        None => Ok(()),
    }
}

// ---------- what was attached by whom, what fvd created ----------

/// One configured path and who attached it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attached {
    /// As configured (may be relative to the VM folder).
    pub path: PathBuf,
    #[serde(rename = "use")]
    pub usage: Use,
    pub write: bool,
    pub owner: Owner,
}

/// `<state>/access/<vm-id>.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Record {
    pub attached: Vec<Attached>,
    /// Files and folders fvd created for this VM (absolute). `--delete-files`
    /// deletes these and nothing else.
    pub created: Vec<PathBuf>,
}

fn record_path(state_dir: &Path, id: uuid::Uuid) -> PathBuf {
    state_dir.join("access").join(format!("{id}.json"))
}

impl Record {
    /// The record of a VM (empty when none was written: a VM configured before
    /// fvd recorded owners).
    pub fn load(state_dir: &Path, id: uuid::Uuid) -> Record {
        std::fs::read(record_path(state_dir, id))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn save(&self, state_dir: &Path, id: uuid::Uuid) -> std::io::Result<()> {
        let dir = state_dir.join("access");
        std::fs::create_dir_all(&dir)?;
        let b = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        util::atomic_write(&record_path(state_dir, id), &b)
    }

    pub fn remove(state_dir: &Path, id: uuid::Uuid) {
        let _ = std::fs::remove_file(record_path(state_dir, id));
    }

    /// Who attached `path` for `usage` with (at least) `write`; None if unrecorded.
    pub fn owner_of(&self, path: &Path, usage: Use, write: bool) -> Option<&Owner> {
        self.attached
            .iter()
            .find(|a| a.path == path && a.usage == usage && (a.write || !write))
            .map(|a| &a.owner)
    }
}

/// The paths a VM configuration names, with what they are for and the right they need.
pub fn named_paths(c: &fv_model::VmConfig) -> Vec<(PathBuf, Use, bool)> {
    let mut v: Vec<(PathBuf, Use, bool)> = c
        .hard_drives
        .iter()
        .map(|d| (d.path.clone(), Use::HardDrive, !d.read_only))
        .collect();
    v.extend(
        c.dvd_drives
            .iter()
            .filter_map(|d| d.path.clone())
            .map(|p| (p, Use::Dvd, false)),
    );
    if let Some(f) = &c.floppy {
        v.push((f.clone(), Use::Floppy, false));
    }
    if let Some(b) = &c.direct_boot {
        v.push((b.kernel.clone(), Use::Kernel, false));
        if let Some(i) = &b.initrd {
            v.push((i.clone(), Use::Initrd, false));
        }
    }
    v
}

/// The [`Want`] for a configured path (`dir` = the VM folder).
pub fn want(dir: &Path, path: &Path, usage: Use, write: bool) -> Want {
    Want {
        path: if path.is_absolute() {
            path.to_path_buf()
        } else {
            dir.join(path)
        },
        write,
        chain: usage == Use::HardDrive,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexical_roots() {
        assert_eq!(
            util_lexical(Path::new("/var/lib/../lib/./fv")),
            PathBuf::from("/var/lib/fv")
        );
        assert!(inside(
            Path::new("/srv/fv/a.vhdx"),
            &[PathBuf::from("/srv/fv")]
        ));
        assert!(!inside(
            Path::new("/srv/fvx/a.vhdx"),
            &[PathBuf::from("/srv/fv")]
        ));
    }

    #[test]
    fn record_owner_needs_write_when_asked() {
        let r = Record {
            attached: vec![Attached {
                path: "a.vhdx".into(),
                usage: Use::HardDrive,
                write: false,
                owner: Owner::Unix { uid: 5 },
            }],
            created: vec![],
        };
        assert!(r
            .owner_of(Path::new("a.vhdx"), Use::HardDrive, false)
            .is_some());
        assert!(r
            .owner_of(Path::new("a.vhdx"), Use::HardDrive, true)
            .is_none());
    }
}
