//! Shared output helpers: tables, JSON, exit codes.
use crate::OutputFormat;
use serde::Serialize;

/// Marks an error as a refusal (exit code 3) rather than a failure (1).
#[derive(Debug)]
pub struct Refused(pub String);
impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Refused {}

/// Marks a usage error (exit code 2).
#[derive(Debug)]
pub struct Usage(pub String);
impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Usage {}

/// Non-2xx answers become errors with fvd's message and the exit-code class.
pub fn check(r: crate::client::HttpResponse) -> anyhow::Result<crate::client::HttpResponse> {
    if (200..300).contains(&r.status) {
        return Ok(r);
    }
    let v = r.json();
    let msg = v["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| String::from_utf8_lossy(&r.body).into_owned());
    let op = v["operation"].as_str().unwrap_or("?");
    let line = format!("{op}: {msg}");
    Err(match r.status {
        400 | 413 | 422 => Usage(line).into(),
        401 | 403 | 404 | 409 => Refused(line).into(),
        _ => anyhow::anyhow!(line),
    })
}

pub fn exit_code(e: &anyhow::Error) -> i32 {
    if e.downcast_ref::<Usage>().is_some() {
        2
    } else if e.downcast_ref::<Refused>().is_some() {
        3
    } else {
        1
    }
}

/// Print `value` as JSON, or as the given table rows.
pub fn emit<T: Serialize>(out: OutputFormat, value: &T, table: impl FnOnce() -> Vec<Vec<String>>) {
    match out {
        OutputFormat::Json => match serde_json::to_string_pretty(value) {
            Ok(s) => line(&s),
            Err(e) => eprintln!("fv: cannot encode output: {e}"),
        },
        OutputFormat::Table => print_table(&table()),
    }
}

/// Left-aligned columns; the first row is the header.
pub fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut w = vec![0usize; cols];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    for r in rows {
        // Padded by hand: format!'s width is limited to u16, and a cell may be longer.
        let mut l = String::new();
        for (i, c) in r.iter().enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            l.push_str(c);
            if i + 1 < r.len() {
                let pad = w[i].saturating_sub(c.chars().count());
                l.extend(std::iter::repeat_n(' ', pad));
            }
        }
        line(l.trim_end());
    }
}

/// One line on stdout. A closed pipe (`fv … | head`) ends the program quietly, as
/// a program under the default SIGPIPE would (Rust ignores SIGPIPE, so `println!`
/// would panic instead).
pub fn line(s: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{s}").and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("fv: cannot write to standard output: {e}");
        std::process::exit(1);
    }
}
