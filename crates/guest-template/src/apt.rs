//! Package selection, version query and download through the host's apt.
use crate::{run, TemplateError};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Exact package set (name -> version) the template is built from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PackageSet {
    pub kernel_pkg: String,
    pub versions: BTreeMap<String, String>,
}

fn apt_depends(pkgs: &[String]) -> Result<BTreeMap<String, Vec<String>>, TemplateError> {
    let mut cmd = Command::new("apt-cache");
    cmd.args([
        "depends",
        "--no-recommends",
        "--no-suggests",
        "--no-conflicts",
        "--no-breaks",
        "--no-replaces",
        "--no-enhances",
    ]);
    cmd.args(pkgs);
    let out = run(&mut cmd)?;
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut cur: Option<String> = None;
    let mut in_alt = false;
    for line in out.lines() {
        if !line.starts_with(' ') {
            cur = Some(line.trim().to_string());
            map.entry(line.trim().to_string()).or_default();
            in_alt = false;
            continue;
        }
        let t = line.trim();
        // "|Depends: a" starts an alternative group; only its first member is taken.
        let alt_start = t.starts_with('|');
        let t = t.trim_start_matches('|');
        let dep = t
            .strip_prefix("Depends:")
            .or_else(|| t.strip_prefix("PreDepends:"));
        let Some(dep) = dep else { continue };
        let dep = dep.trim();
        let take = !in_alt && !dep.starts_with('<');
        in_alt = alt_start;
        if take {
            if let Some(c) = &cur {
                map.entry(c.clone()).or_default().push(dep.to_string());
            }
        }
    }
    Ok(map)
}

/// Chooses the packages: the kernel image, busybox-static, qemu-guest-agent and the
/// library packages it (transitively) depends on. Two apt-cache runs in all:
/// without a binary package cache (Debian container images) each one re-parses
/// every package list, which takes seconds.
pub fn resolve(kernel_meta: &str) -> Result<PackageSet, TemplateError> {
    let graph = apt_depends(&[
        "--recurse".to_string(),
        kernel_meta.to_string(),
        "qemu-guest-agent".to_string(),
    ])?;
    let kernel_pkg = graph
        .get(kernel_meta)
        .and_then(|d| d.iter().find(|p| p.starts_with("linux-image-")))
        .cloned()
        .ok_or_else(|| {
            TemplateError::Build(format!(
                "{kernel_meta} has no linux-image-* dependency (apt lists missing?)"
            ))
        })?;

    let mut all: BTreeSet<String> = BTreeSet::new();
    all.insert(kernel_pkg.clone());
    all.insert("busybox-static".into());
    // UEFI boot of the same disk: syslinux.efi and its ldlinux.e64.
    all.insert("syslinux-efi".into());
    all.insert("syslinux-common".into());
    let mut frontier = vec!["qemu-guest-agent".to_string()];
    // Walk only through library packages: that is where shared objects come from;
    // the ELF NEEDED walk at build time proves the set complete.
    while let Some(p) = frontier.pop() {
        if !all.insert(p.clone()) {
            continue;
        }
        for d in graph.get(&p).into_iter().flatten() {
            let d = d.split(':').next().unwrap_or(d).to_string();
            if (d.starts_with("lib") || d.starts_with("zlib")) && !all.contains(&d) {
                frontier.push(d);
            }
        }
    }
    let versions = candidates(&all)?;
    Ok(PackageSet {
        kernel_pkg,
        versions,
    })
}

fn candidates(pkgs: &BTreeSet<String>) -> Result<BTreeMap<String, String>, TemplateError> {
    let mut cmd = Command::new("apt-cache");
    cmd.arg("policy").args(pkgs);
    let out = run(&mut cmd)?;
    let mut map = BTreeMap::new();
    let mut cur: Option<String> = None;
    for line in out.lines() {
        if !line.starts_with(' ') && line.ends_with(':') {
            cur = Some(line.trim_end_matches(':').to_string());
        } else if let Some(v) = line.trim().strip_prefix("Candidate:") {
            let v = v.trim();
            if let Some(c) = cur.take() {
                if v != "(none)" {
                    map.insert(c, v.to_string());
                }
            }
        }
    }
    for p in pkgs {
        if !map.contains_key(p) {
            return Err(TemplateError::Build(format!(
                "apt has no candidate version for {p} (run apt-get update)"
            )));
        }
    }
    Ok(map)
}

/// Downloads the exact versions into `dir`; returns the .deb files.
pub fn download(set: &PackageSet, dir: &Path) -> Result<Vec<PathBuf>, TemplateError> {
    let mut cmd = Command::new("apt-get");
    cmd.current_dir(dir)
        .args(["-q", "-o", "APT::Sandbox::User=root", "download"]);
    for (p, v) in &set.versions {
        cmd.arg(format!("{p}={v}"));
    }
    run(&mut cmd)?;
    let mut debs = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| crate::io_err(dir, e))? {
        let p = e.map_err(|e| crate::io_err(dir, e))?.path();
        if p.extension().is_some_and(|x| x == "deb") {
            debs.push(p);
        }
    }
    debs.sort();
    if debs.len() != set.versions.len() {
        return Err(TemplateError::Build(format!(
            "expected {} .deb files, apt-get download produced {}",
            set.versions.len(),
            debs.len()
        )));
    }
    Ok(debs)
}

/// `dpkg-deb -x` (no maintainer scripts, no root needed).
pub fn extract(deb: &Path, into: &Path) -> Result<(), TemplateError> {
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(into)).map(|_| ())
}
