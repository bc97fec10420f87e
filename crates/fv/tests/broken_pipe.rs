//! `fv … | head`: a reader that closes the pipe early must end fv quietly (exit 0,
//! nothing on stderr), not with a panic and a backtrace. Both output paths are
//! covered: JSON (`-o json`) and tables.
use std::io::Read;
use std::process::{Command, Stdio};

/// Runs fv with its stdout a pipe whose read end is closed after one byte.
fn run_closed_early(args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fv"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fv");
    let mut out = child.stdout.take().expect("stdout");
    let mut one = [0u8; 1];
    out.read_exact(&mut one).expect("fv printed nothing");
    drop(out);
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("read stderr");
    (child.wait().expect("wait fv"), err)
}

#[test]
fn closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A chain deep enough that inspect prints far more than a pipe buffer (64 KiB),
    // so fv is still writing when the reader goes away.
    let base = dir.path().join("base.vhdx");
    let st = Command::new(env!("CARGO_BIN_EXE_fv"))
        .args(["vhd", "new"])
        .arg(&base)
        .args(["--size", "64M"])
        .status()
        .expect("fv vhd new");
    assert!(st.success());
    let mut top = base.clone();
    for i in 0..100 {
        let child = dir.path().join(format!("d{i}.avhdx"));
        let st = Command::new(env!("CARGO_BIN_EXE_fv"))
            .args(["vhd", "new"])
            .arg(&child)
            .arg("--parent")
            .arg(&top)
            .stdout(Stdio::null())
            .status()
            .expect("fv vhd new --parent");
        assert!(st.success());
        top = child;
    }
    let top = top.to_string_lossy().into_owned();
    for args in [
        vec!["-o", "json", "vhd", "inspect", top.as_str()],
        vec!["vhd", "inspect", top.as_str()],
    ] {
        let (status, err) = run_closed_early(&args);
        assert!(status.success(), "{args:?}: exit {status:?}, stderr: {err}");
        assert!(
            !err.contains("panicked") && err.trim().is_empty(),
            "{args:?}: stderr: {err}"
        );
    }
}
