//! Connection limits against a real fvd: an unprivileged uid opens 20 000 idle
//! connections to the API socket (two python children under setpriv). fvd keeps at most its per-uid limit of them, refuses the rest at
//! once with a 503, root's `fv vm list` still answers while the flood holds its
//! share, and the connections fvd kept are closed by the header timeout.
mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const FLOOD: usize = 20_000;
const USER: u32 = 1000;
const PROCS: usize = 2;

/// Connects N sockets without sending a byte, then watches them: a socket that
/// reads "HTTP/1.1 503" was refused, one that reads EOF with nothing was closed by
/// fvd (timed out). Reports "connected N failed F secs S", then "refused R closed C open O"
/// whenever the counts change, and exits when nothing is open.
const FLOOD_PY: &str = r#"
import os, resource, select, socket, sys, time
path, n = sys.argv[1], int(sys.argv[2])
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
t0 = time.monotonic()
socks, failed = {}, 0
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        socks[s.fileno()] = s
    except OSError as e:
        failed += 1
        s.close()
print("connected %d failed %d secs %.1f" % (len(socks), failed, time.monotonic() - t0), flush=True)
p = select.poll()
for fd in socks:
    p.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
refused = closed = 0
while socks:
    for fd, _ in p.poll(60000):
        s = socks.pop(fd, None)
        if s is None:
            continue
        try:
            data = s.recv(64)
        except OSError:
            data = b""
        if data.startswith(b"HTTP/1.1 503"):
            refused += 1
        else:
            closed += 1
        p.unregister(fd)
        s.close()
    print("refused %d closed %d open %d" % (refused, closed, len(socks)), flush=True)
"#;

fn counts(line: &str) -> (usize, usize, usize) {
    let v: Vec<usize> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (v[0], v[1], v[2])
}

#[test]
fn idle_flood_from_one_uid_leaves_root_answering() {
    let f = Fvd::start();
    // Other users must reach the socket (as under /run).
    std::fs::set_permissions(f.run.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // The fd limit here may be 20 000 with no way above it: two processes of the
    // same uid share the flood (the per-uid limit counts them together).
    let mut children = Vec::new();
    for _ in 0..PROCS {
        let mut c = Command::new("setpriv")
            .args([
                &format!("--reuid={USER}"),
                &format!("--regid={USER}"),
                "--clear-groups",
                "/usr/bin/python3",
                "-c",
                FLOOD_PY,
            ])
            .arg(&f.sock)
            .arg((FLOOD / PROCS).to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("setpriv + python3");
        let lines = BufReader::new(c.stdout.take().unwrap()).lines();
        children.push((c, lines));
    }
    let mut connect_secs = 0f64;
    for (_, lines) in children.iter_mut() {
        let first = lines.next().expect("flood output").unwrap();
        println!("flood: {first}");
        assert!(
            first.starts_with(&format!("connected {} failed 0 ", FLOOD / PROCS)),
            "{first}"
        );
        let secs: f64 = first
            .rsplit(' ')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap();
        connect_secs = connect_secs.max(secs);
    }

    // Every connection is made; those fvd kept are still open (the header timeout
    // has not passed for the latest). Root must get through now.
    let t = Instant::now();
    let (code, out, err) = fv(&f, &["vm", "list"]);
    let latency = t.elapsed();
    println!(
        "root `fv vm list` during the flood: {:.1} ms",
        latency.as_secs_f64() * 1000.0
    );
    assert_eq!(code, 0, "fv vm list failed during the flood: {out}{err}");

    // Follow the flood to its end: refused at once, or closed by the timeout.
    let end = Instant::now() + Duration::from_secs(180);
    let (mut refused, mut closed, mut open) = (0, 0, 0);
    for (c, lines) in children.iter_mut() {
        let mut last = (0, 0, FLOOD);
        for line in lines.by_ref() {
            last = counts(&line.unwrap());
            if last.2 == 0 || Instant::now() > end {
                break;
            }
        }
        refused += last.0;
        closed += last.1;
        open += last.2;
        assert!(c.wait().unwrap().success());
    }
    println!("flood end: refused {refused}, closed by fvd's timeout {closed}, open {open}");
    assert_eq!(open, 0, "fvd never closed the idle connections it kept");
    assert_eq!(refused + closed, FLOOD);
    // fvd kept at most its per-uid limit at a time; a kept place frees only when
    // the header timeout closes it, so over the time the flood took to connect no
    // more than limit x (timeout periods + 1) were ever kept, the rest refused.
    let periods =
        (connect_secs / fvd::server::HEADER_READ_TIMEOUT.as_secs_f64()).ceil() as usize + 1;
    let most = fvd::server::PER_PEER_CONNECTIONS * periods;
    assert!(
        closed >= 1 && closed <= most,
        "fvd kept {closed} connections of one uid (at most {most} expected)"
    );
    // And fvd is fine afterwards.
    let (code, out, err) = fv(&f, &["vm", "list"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        f.log()
            .contains("refused API connection: uid 1000 already holds"),
        "the refusal is logged: {}",
        f.log()
    );
}
