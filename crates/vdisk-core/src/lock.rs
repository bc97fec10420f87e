//! Image file locks that QEMU understands.
//!
//! QEMU (block/file-posix.c) expresses who may do what with an image file as
//! open-file-description (OFD) read locks on single bytes: byte `100 + p` means
//! "I use permission p", byte `200 + p` means "I do not let anyone else use
//! permission p". Before using p it checks that nobody locks `200 + p`, and before
//! refusing to share p it checks that nobody locks `100 + p`. Taking the same bytes
//! the same way makes us and qemu-img / qemu-nbd / qemu-system exclude each other
//! exactly as two QEMUs do: one writer, or any number of readers, never both.
//!
//! Locks belong to the open file description, so they go away when the
//! [`ImageLock`] is dropped or the process dies (no stale lock files).

use crate::{DiskError, Result};
use nix::fcntl::{fcntl, FcntlArg};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// QEMU's lock byte bases (block/file-posix.c RAW_LOCK_PERM_BASE / _SHARED_BASE).
const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

// QEMU's permission bits as bit numbers (include/block/block-common.h).
const CONSISTENT_READ: i64 = 0;
const WRITE: i64 = 1;
// Bit 2, WRITE_UNCHANGED, is shared by both our modes, so never locked.
const RESIZE: i64 = 3;
/// QEMU <= 6.1 also locked GRAPH_MOD (bit 4); we look at its bytes when naming
/// holders, never take them.
const LAST_KNOWN_BIT: i64 = 4;

/// How an image is being opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Read-only: many readers together, no writer beside them (QEMU's read-only
    /// open without `-U`/force-share).
    Shared,
    /// Read-write: one writer, nobody else (QEMU's writable open).
    Exclusive,
}

impl LockMode {
    /// (permissions used, permissions not shared), as QEMU's block layer asks for
    /// them: a writer uses read, write and resize (file growth); both modes share
    /// only consistent read and unchanged writes.
    fn perms(self) -> (&'static [i64], &'static [i64]) {
        match self {
            LockMode::Shared => (&[CONSISTENT_READ], &[WRITE, RESIZE]),
            LockMode::Exclusive => (&[CONSISTENT_READ, WRITE, RESIZE], &[WRITE, RESIZE]),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            LockMode::Shared => "read-only",
            LockMode::Exclusive => "read-write",
        }
    }
}

/// A held image lock; released on drop.
#[derive(Debug)]
pub struct ImageLock {
    // Its own open file description: the layer's descriptors may be reopened or
    // closed independently, and the lock must live exactly as long as this value.
    _file: File,
    path: PathBuf,
    mode: LockMode,
}

/// A process found holding lock bytes on an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockHolder {
    pub pid: u32,
    /// `/proc/PID/comm`, if readable.
    pub command: Option<String>,
    /// It uses the write permission (byte 101): it has the image open read-write.
    pub writes: bool,
}

impl std::fmt::Display for LockHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {}", self.pid)?;
        if let Some(c) = &self.command {
            write!(f, " ({c})")?;
        }
        f.write_str(if self.writes {
            " holding it read-write"
        } else {
            " holding it read-only"
        })
    }
}

impl ImageLock {
    /// Lock `path` for `mode`, or fail with [`DiskError::Locked`] naming the holder.
    pub fn acquire(path: &Path, mode: LockMode) -> Result<ImageLock> {
        let file = File::open(path).map_err(|e| DiskError::io("open", path, e))?;
        let (used, unshared) = mode.perms();
        // As QEMU does: take our bytes first, then look for conflicting ones; a
        // racing peer doing the same sees ours, so at least one of the two fails.
        for &p in used {
            take(&file, path, PERM_BASE + p)?;
        }
        for &p in unshared {
            take(&file, path, SHARED_BASE + p)?;
        }
        let mut conflict = false;
        for b in used
            .iter()
            .map(|p| SHARED_BASE + p)
            .chain(unshared.iter().map(|p| PERM_BASE + p))
        {
            conflict |=
                held_by_other(&file, b).map_err(|e| DiskError::io("test lock on", path, e))?;
        }
        if conflict {
            let holders = find_holders(path, &file);
            return Err(DiskError::Locked {
                path: path.to_path_buf(),
                holder: describe_holders(&holders),
                holders,
                wanted: mode.describe(),
            });
        }
        Ok(ImageLock {
            _file: file,
            path: path.to_path_buf(),
            mode,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn mode(&self) -> LockMode {
        self.mode
    }
}

fn flock(l_type: libc::c_short, start: i64) -> libc::flock {
    libc::flock {
        l_type,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start,
        l_len: 1,
        l_pid: 0,
    }
}

/// Take a shared (read) lock on one byte, as QEMU's qemu_lock_fd(.., exclusive=false).
fn take(file: &File, path: &Path, byte: i64) -> Result<()> {
    let fl = flock(libc::F_RDLCK as libc::c_short, byte);
    match fcntl(file.as_raw_fd(), FcntlArg::F_OFD_SETLK(&fl)) {
        Ok(_) => Ok(()),
        // Only an exclusive lock on the byte blocks a read lock; QEMU takes none, so
        // this is some other tool; still a conflict to report, with its holder.
        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES) => {
            let holders = find_holders(path, file);
            Err(DiskError::Locked {
                path: path.to_path_buf(),
                holder: describe_holders(&holders),
                holders,
                wanted: "at all",
            })
        }
        Err(e) => Err(DiskError::io(
            "lock",
            path,
            std::io::Error::from_raw_os_error(e as i32),
        )),
    }
}

/// Would an exclusive lock on `byte` conflict with another description's lock?
/// (QEMU's qemu_lock_fd_test(.., exclusive=true): any lock there is a conflict.)
fn held_by_other(file: &File, byte: i64) -> std::io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK as libc::c_short, byte);
    fcntl(file.as_raw_fd(), FcntlArg::F_OFD_GETLK(&mut fl))
        .map_err(|e| std::io::Error::from_raw_os_error(e as i32))?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

fn describe_holders(h: &[LockHolder]) -> String {
    if h.is_empty() {
        // /proc/PID/fd of other users is not readable without privilege.
        return "another process (not visible to this user)".into();
    }
    h.iter()
        .map(|h| h.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Processes holding QEMU lock bytes on the file at `path`: every descriptor in
/// /proc/*/fd on the same inode whose /proc/PID/fdinfo lists a lock in the lock
/// byte range (OFD locks show pid -1 in /proc/locks, so that file cannot name
/// them). Our own lock descriptor is skipped. Best effort: unreadable processes
/// are left out.
pub fn find_holders(path: &Path, own: &File) -> Vec<LockHolder> {
    let Ok(meta) = own.metadata().or_else(|_| std::fs::metadata(path)) else {
        return Vec::new();
    };
    let (dev, ino) = (meta.dev(), meta.ino());
    let me = std::process::id();
    let own_fd = own.as_raw_fd();
    let mut out: Vec<LockHolder> = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let mut found: Option<bool> = None;
        for fd in fds.flatten() {
            let Some(n) = fd.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if pid == me && n == own_fd {
                continue;
            }
            match std::fs::metadata(fd.path()) {
                Ok(m) if m.dev() == dev && m.ino() == ino => {}
                _ => continue,
            }
            let Ok(info) = std::fs::read_to_string(p.path().join("fdinfo").join(n.to_string()))
            else {
                continue;
            };
            if let Some(writes) = lock_bytes_in_fdinfo(&info) {
                found = Some(found.unwrap_or(false) || writes);
            }
        }
        if let Some(writes) = found {
            let command = std::fs::read_to_string(p.path().join("comm"))
                .ok()
                .map(|s| s.trim().to_string());
            out.push(LockHolder {
                pid,
                command,
                writes,
            });
        }
    }
    out
}

/// Parse fdinfo "lock:" lines ("lock:\t1: OFDLCK ADVISORY READ -1 08:02:131 100 100").
/// None if no lock touches the QEMU byte range; Some(writes) if one does, `writes`
/// telling whether the write-permission byte is among them.
fn lock_bytes_in_fdinfo(info: &str) -> Option<bool> {
    let mut any = None;
    for l in info.lines().filter(|l| l.starts_with("lock:")) {
        let mut it = l.split_whitespace().rev();
        let (Some(end), Some(start)) = (it.next(), it.next()) else {
            continue;
        };
        let Ok(start) = start.parse::<i64>() else {
            continue;
        };
        let end = if end == "EOF" {
            i64::MAX
        } else {
            match end.parse::<i64>() {
                Ok(e) => e,
                Err(_) => continue,
            }
        };
        let lo = PERM_BASE;
        let hi = SHARED_BASE + LAST_KNOWN_BIT;
        if end < lo || start > hi {
            continue;
        }
        let w = PERM_BASE + WRITE;
        any = Some(any.unwrap_or(false) || (start <= w && w <= end));
    }
    any
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_parsing() {
        let info = "pos:\t0\nflags:\t02100000\nmnt_id:\t30\nino:\t5\n\
            lock:\t1: OFDLCK  ADVISORY  READ  -1 00:2d:5 100 100\n\
            lock:\t2: OFDLCK  ADVISORY  READ  -1 00:2d:5 201 201\n";
        assert_eq!(lock_bytes_in_fdinfo(info), Some(false));
        let w = "lock:\t1: OFDLCK  ADVISORY  READ  -1 00:2d:5 101 101\n";
        assert_eq!(lock_bytes_in_fdinfo(w), Some(true));
        let whole = "lock:\t1: POSIX  ADVISORY  WRITE  77 00:2d:5 0 EOF\n";
        assert_eq!(lock_bytes_in_fdinfo(whole), Some(true));
        assert_eq!(
            lock_bytes_in_fdinfo("lock:\t1: OFDLCK ADVISORY READ -1 0:1:2 0 99\n"),
            None
        );
        assert_eq!(lock_bytes_in_fdinfo("pos:\t0\n"), None);
    }

    #[test]
    fn writers_and_readers_exclude_each_other() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.img");
        std::fs::write(&p, [0u8; 512]).unwrap();
        let r1 = ImageLock::acquire(&p, LockMode::Shared).unwrap();
        let r2 = ImageLock::acquire(&p, LockMode::Shared).unwrap();
        let e = ImageLock::acquire(&p, LockMode::Exclusive).unwrap_err();
        match &e {
            DiskError::Locked { holders, .. } => {
                assert!(holders
                    .iter()
                    .any(|h| h.pid == std::process::id() && !h.writes));
            }
            other => panic!("expected Locked, got {other}"),
        }
        drop((r1, r2));
        let w = ImageLock::acquire(&p, LockMode::Exclusive).unwrap();
        let e = ImageLock::acquire(&p, LockMode::Shared).unwrap_err();
        assert!(e.to_string().contains("read-write"), "{e}");
        assert!(ImageLock::acquire(&p, LockMode::Exclusive).is_err());
        drop(w);
        // Released on drop: a reader gets in again.
        ImageLock::acquire(&p, LockMode::Shared).unwrap();
    }
}
