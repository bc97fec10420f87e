//! Is an API caller one of our own VM processes? A worker runs as uid 0 (it needs
//! setuid for QEMU and chown for its sockets) and would otherwise be Administrator
//! on fvd's socket; a compromised worker or QEMU must not get that. Landlock does
//! not mediate connecting to a pathname Unix socket, so fvd checks the peer itself.
use std::path::Path;

/// True when `pid` (from SO_PEERCRED) is a VM's worker, or a child of one (its
/// QEMU), or `uid` lies in the per-VM uid range.
pub fn is_vm_process(
    runtime_dir: &Path,
    pid: Option<i32>,
    uid: u32,
    uid_range: (u32, u32),
) -> bool {
    if uid >= uid_range.0 && uid < uid_range.1 {
        return true;
    }
    // Workers run as root and their QEMUs in the range above: any other uid is
    // neither, and skipping the pid-file scan keeps ordinary callers cheap.
    if uid != 0 {
        return false;
    }
    let Some(pid) = pid.filter(|p| *p > 0) else {
        return false;
    };
    let workers = worker_pids(runtime_dir);
    if workers.is_empty() {
        return false;
    }
    workers.contains(&pid) || parent_of(pid).is_some_and(|pp| workers.contains(&pp))
}

fn worker_pids(runtime_dir: &Path) -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir(runtime_dir.join("vms")) else {
        return vec![];
    };
    rd.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join(fv_worker_proto::PID_NAME)).ok())
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

fn parent_of(pid: i32) -> Option<i32> {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    st.lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_and_their_children_are_vm_processes() {
        let rt = tempfile::tempdir().unwrap();
        let me = std::process::id() as i32;
        let vm = rt.path().join("vms").join("x");
        std::fs::create_dir_all(&vm).unwrap();
        assert!(!is_vm_process(rt.path(), Some(me), 0, (10, 20)));
        // Pretend we are a worker: then we and our children are VM processes.
        std::fs::write(vm.join(fv_worker_proto::PID_NAME), format!("{me}\n")).unwrap();
        assert!(is_vm_process(rt.path(), Some(me), 0, (10, 20)));
        // Workers are root: a non-root caller outside the range is neither.
        assert!(!is_vm_process(rt.path(), Some(me), 1000, (10, 20)));
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert!(is_vm_process(
            rt.path(),
            Some(child.id() as i32),
            0,
            (10, 20)
        ));
        let _ = child.kill();
        let _ = child.wait();
        // The per-VM uid range alone suffices.
        assert!(is_vm_process(Path::new("/nonexistent"), None, 15, (10, 20)));
        assert!(!is_vm_process(
            Path::new("/nonexistent"),
            None,
            20,
            (10, 20)
        ));
    }
}
