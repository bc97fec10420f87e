//! Structure-aware mutation of valid VHD images, and the verdict every mutant must
//! satisfy. Shared by the `structure` fuzz target (`fuzz/fuzz_targets/structure.rs`,
//! choices from libFuzzer's bytes) and `tests/structure_fuzz.rs` (a seeded, stable
//! run over a few thousand mutants), so CI exercises the generator without nightly.
//!
//! A mutant is a valid image with one field changed: a BAT entry pointed into every
//! region of the file (footer copy, dynamic header, BAT, parent locator data, the
//! footer, another block, past the end, a wrapped sector number), a bad block size or
//! table size, a header/BAT/locator offset moved or wrapped, a locator length out of
//! range, a missing parent id, a damaged footer, a truncated file. Checksums are
//! fixed up afterwards (except in the mutation that breaks one) so the deeper
//! fields are what gets tested.
//!
//! The verdict ([`judge`]): opening never panics and fails only with a typed error;
//! a read-only open and `check` never change the file; what opens read-only either
//! checks clean, or the writable open is refused; every read of an open image
//! either succeeds or fails with [`DiskError::DamagedBlock`] (only when check found
//! damage); guest writes into an image that checks clean keep it clean and read
//! back; `check --repair` reports a change exactly when it made one, and an image
//! it reports clean opens writable.

use crate::format::*;
use crate::VhdFile;
use fv_vdisk_core::{DiskError, Image, Layer};
use std::path::Path;

/// Where the generator's choices come from.
pub trait Choices {
    /// A number in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64;
}

/// Deterministic choices (xorshift64*) for the stable test.
pub struct Seeded(pub u64);
impl Choices for Seeded {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

/// Choices read from fuzzer input; zeros once it runs out.
pub struct FromBytes<'a>(pub &'a [u8]);
impl Choices for FromBytes<'_> {
    fn below(&mut self, n: u64) -> u64 {
        let mut v = 0u64;
        for _ in 0..4 {
            if let Some((&b, rest)) = self.0.split_first() {
                v = (v << 8) | u64::from(b);
                self.0 = rest;
            }
        }
        v % n.max(1)
    }
}

fn rd32(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(o..o + 4)?.try_into().ok()?))
}
fn rd64(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(o..o + 8)?.try_into().ok()?))
}
fn wr32(b: &mut [u8], o: usize, v: u32) -> bool {
    match b.get_mut(o..o + 4) {
        Some(s) => {
            s.copy_from_slice(&v.to_be_bytes());
            true
        }
        None => false,
    }
}
fn wr64(b: &mut [u8], o: usize, v: u64) -> bool {
    match b.get_mut(o..o + 8) {
        Some(s) => {
            s.copy_from_slice(&v.to_be_bytes());
            true
        }
        None => false,
    }
}

/// Recompute the checksums of both footers and the dynamic header.
pub fn fix_checksums(img: &mut [u8]) {
    let len = img.len();
    for off in [0, len.saturating_sub(512)] {
        if let Some(f) = img.get_mut(off..off + 512) {
            if &f[..8] == FOOTER_COOKIE {
                let c = checksum(f, 64);
                f[64..68].copy_from_slice(&c.to_be_bytes());
            }
        }
    }
    let hoff = rd64(img, len.saturating_sub(512) + 16)
        .or_else(|| rd64(img, 16))
        .and_then(|o| usize::try_from(o).ok());
    if let Some(h) = hoff.and_then(|o| img.get_mut(o..o.checked_add(1024)?)) {
        if &h[..8] == HEADER_COOKIE {
            let c = checksum(h, 36);
            h[36..40].copy_from_slice(&c.to_be_bytes());
        }
    }
}

/// Layout of a valid seed, for aiming mutations.
struct Seen {
    hoff: usize,
    toff: usize,
    entries: usize,
    /// Allocated BAT entries (sector numbers).
    used: Vec<u32>,
    locators: Vec<(usize, u64, u32)>,
    block_total: u64,
}

fn seen(img: &[u8]) -> Option<Seen> {
    let len = img.len();
    let foot = Footer::parse(img.get(len.checked_sub(512)?..)?).ok()?;
    if foot.disk_type == DISK_FIXED {
        return None;
    }
    let hoff = usize::try_from(foot.data_offset).ok()?;
    let h = DynHeader::parse(img.get(hoff..hoff.checked_add(1024)?)?).ok()?;
    let toff = usize::try_from(h.table_offset).ok()?;
    let entries = h.max_table_entries as usize;
    let used = (0..entries)
        .filter_map(|i| rd32(img, toff + 4 * i))
        .filter(|&e| e != BAT_UNUSED)
        .collect();
    let locators = h
        .locators
        .iter()
        .enumerate()
        .filter(|(_, l)| l.code != 0)
        .map(|(i, l)| (i, l.data_offset, l.data_len))
        .collect();
    Some(Seen {
        hoff,
        toff,
        entries,
        used,
        locators,
        block_total: crate::layout::bitmap_len(h.block_size) + u64::from(h.block_size),
    })
}

/// One mutation of `seed`; returns the mutant and what was changed.
pub fn mutate(seed: &[u8], c: &mut dyn Choices) -> (Vec<u8>, String) {
    let mut img = seed.to_vec();
    let len = img.len();
    let foot = len.saturating_sub(512);
    let Some(s) = seen(seed) else {
        // Fixed disk: only the footer has fields.
        let what = match c.below(4) {
            0 => {
                let v = [0u64, 511, 1 << 41, u64::MAX][c.below(4) as usize];
                wr64(&mut img, foot + 48, v);
                format!("fixed: current size {v}")
            }
            1 => {
                let v = [DISK_DYNAMIC, DISK_DIFFERENCING, 7][c.below(3) as usize];
                wr32(&mut img, foot + 60, v);
                format!("fixed: disk type {v}")
            }
            2 => {
                let n = c.below(len as u64 + 1) as usize;
                img.truncate(n);
                format!("fixed: truncated to {n}")
            }
            _ => {
                wr32(&mut img, foot + 64, 0);
                return (img, "fixed: bad footer checksum".into());
            }
        };
        fix_checksums(&mut img);
        return (img, what);
    };
    let sect = |o: usize| (o / 512) as u32;
    let hoff = s.hoff;
    let what: String = match c.below(12) {
        // A BAT entry into a region.
        0..=3 => {
            let i = c.below(s.entries.max(1) as u64) as usize;
            let other = s
                .used
                .get(c.below(s.used.len().max(1) as u64) as usize)
                .copied();
            let (v, region): (u32, &str) = match c.below(13) {
                0 => (0, "the footer copy"),
                1 => (sect(hoff) + c.below(2) as u32, "the dynamic header"),
                2 => (
                    sect(s.toff) + c.below((s.entries as u64 * 4).div_ceil(512)) as u32,
                    "the BAT",
                ),
                3 => match s.locators.first() {
                    Some(&(_, o, _)) => ((o / 512) as u32, "parent locator data"),
                    None => (sect(hoff).saturating_sub(1), "just before the header"),
                },
                4 => (sect(foot), "the footer"),
                5 => (sect(foot) + 1 + c.below(1 << 20) as u32, "past the end"),
                6 => (
                    BAT_UNUSED - 1 - c.below(16) as u32,
                    "a wrapped sector number",
                ),
                7 => (other.unwrap_or(1), "another block's start"),
                8 => (
                    other.unwrap_or(1) + 1 + c.below(s.block_total / 512 - 1) as u32,
                    "the middle of another block",
                ),
                9 => (
                    (sect(foot) + 1).saturating_sub((s.block_total / 512) as u32),
                    "the last sectors before the footer",
                ),
                10 => (
                    sect(foot).saturating_sub((s.block_total / 512) as u32),
                    "space ending at the footer",
                ),
                11 => (c.below(u64::from(sect(foot)) + 8) as u32, "a random sector"),
                _ => (BAT_UNUSED, "unallocated"),
            };
            wr32(&mut img, s.toff + 4 * i, v);
            format!("BAT entry {i} = {v} ({region})")
        }
        4 => {
            let v = [
                0u32,
                512,
                3 << 20,
                1 << 31,
                u32::MAX,
                4096,
                1 << 28,
                1 << 29,
            ][c.below(8) as usize];
            wr32(&mut img, hoff + 32, v);
            format!("block size {v}")
        }
        5 => {
            let e = s.entries as u32;
            let v = [
                0,
                e.saturating_sub(1),
                e + 1,
                u32::MAX,
                1 << 24,
                (1 << 24) + 1,
            ][c.below(6) as usize];
            wr32(&mut img, hoff + 28, v);
            format!("max table entries {v}")
        }
        6 => {
            let v = [
                0u64,
                512,
                hoff as u64,
                u64::MAX - 511,
                u64::MAX,
                len as u64,
                s.toff as u64 + 1,
                foot as u64,
                (s.used.first().copied().unwrap_or(4) as u64) * 512,
            ][c.below(9) as usize];
            wr64(&mut img, hoff + 16, v);
            format!("BAT offset {v}")
        }
        7 => {
            let v = [
                0u64,
                1,
                u64::MAX - 1023,
                len as u64,
                foot as u64,
                513,
                s.toff as u64,
            ][c.below(7) as usize];
            wr64(&mut img, foot + 16, v);
            if c.below(2) == 0 {
                wr64(&mut img, 16, v);
            }
            format!("dynamic header offset {v}")
        }
        // Parent locators.
        8 => {
            let i = match s
                .locators
                .get(c.below(s.locators.len().max(1) as u64) as usize)
            {
                Some(&(i, _, _)) => i,
                None => c.below(8) as usize,
            };
            let o = hoff + 576 + 24 * i;
            match c.below(7) {
                0 => {
                    let v = [u64::MAX - 3, u64::MAX, len as u64, foot as u64 + 100]
                        [c.below(4) as usize];
                    wr64(&mut img, o + 16, v);
                    format!("locator {i} offset {v} (wrapped or outside)")
                }
                1 => {
                    let v = [0, hoff as u64, s.toff as u64, foot as u64][c.below(4) as usize];
                    wr64(&mut img, o + 16, v);
                    format!("locator {i} offset {v} (into metadata)")
                }
                2 => {
                    let v = [0u32, MAX_LOCATOR_LEN + 1, u32::MAX, len as u32][c.below(4) as usize];
                    wr32(&mut img, o + 8, v);
                    format!("locator {i} length {v}")
                }
                3 => {
                    wr32(&mut img, o, u32::from_be_bytes(*b"Zzzz"));
                    wr32(&mut img, o + 8, 40);
                    wr64(&mut img, o + 16, 1536);
                    format!("locator {i} unknown platform code")
                }
                4 => {
                    let v = (s.used.first().copied().unwrap_or(4) as u64) * 512 + 512;
                    wr64(&mut img, o + 16, v);
                    format!("locator {i} offset {v} (inside a block)")
                }
                5 => {
                    if let Some(b) = img.get_mut(hoff + 40..hoff + 56) {
                        b.fill(0);
                    }
                    "parent unique id all zeros".into()
                }
                _ => {
                    for k in 0..8 {
                        wr32(&mut img, hoff + 576 + 24 * k, 0);
                    }
                    "every locator entry cleared".into()
                }
            }
        }
        9 => {
            let v = match c.below(5) {
                0 => 511,
                1 => 1 << 42,
                2 => u64::MAX,
                3 => (s.entries as u64 + 1) * (s.block_total - 512),
                _ => 0,
            };
            wr64(&mut img, foot + 48, v);
            wr64(&mut img, 48, v);
            format!("current size {v}")
        }
        10 => match c.below(5) {
            0 => {
                if let Some(b) = img.get_mut(foot..) {
                    b.fill(0);
                }
                "end footer zeroed".into()
            }
            1 => {
                let n = foot - c.below(s.block_total.min(foot as u64)) as usize;
                img.truncate(n);
                format!("truncated to {n} (footer lost, a block cut short)")
            }
            2 => {
                if let Some(b) = img.get_mut(0..512) {
                    b.fill(0);
                }
                "footer copy zeroed".into()
            }
            3 => {
                let v = [DISK_FIXED, DISK_DYNAMIC, DISK_DIFFERENCING, 9][c.below(4) as usize];
                wr32(&mut img, foot + 60, v);
                format!("disk type {v}")
            }
            _ => {
                img.truncate(foot);
                "end footer cut off".into()
            }
        },
        _ => {
            let which = c.below(2);
            if which == 0 {
                wr32(&mut img, foot + 64, 0);
            } else {
                wr32(&mut img, hoff + 36, 0);
            }
            return (
                img,
                format!("bad {} checksum", ["footer", "header"][which as usize]),
            );
        }
    };
    fix_checksums(&mut img);
    (img, what)
}

/// What happened to one mutant (for counting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Refused at open with a typed error.
    Refused,
    /// Opened read-only and checked clean; guest writes kept it clean.
    Sound,
    /// Opened read-only with damage reported; the writable open was refused.
    DamagedRefused,
    /// Damaged, and `check --repair` made it sound.
    Repaired,
}

fn err(what: &str, m: String) -> String {
    format!("{what}: {m}")
}

/// Apply the verdict to the mutant at `path` (`what` names the mutation for
/// messages). `Err` describes a broken rule.
pub fn judge(path: &Path, what: &str) -> Result<Outcome, String> {
    let bytes = || std::fs::read(path).map_err(|e| err(what, format!("read back: {e}")));
    let before = bytes()?;
    let ro = match VhdFile::open(path, true) {
        Ok(v) => v,
        Err(e) => {
            if bytes()? != before {
                return Err(err(what, "a failed read-only open changed the file".into()));
            }
            return match VhdFile::open(path, false) {
                Ok(_) => Err(err(
                    what,
                    format!("read-only open failed ({e}) but a writable open succeeded"),
                )),
                Err(_) => Ok(Outcome::Refused),
            };
        }
    };
    let report = ro
        .check(false)
        .map_err(|e| err(what, format!("check failed: {e}")))?;
    if report.is_clean() != ro.damage().is_empty() {
        return Err(err(
            what,
            format!(
                "check errors {:?} disagree with the damage found at open {:?}",
                report.errors,
                ro.damage()
            ),
        ));
    }
    // Every block is either served or refused as damaged, never anything else.
    let size = ro.info().virtual_size;
    let step = u64::from(ro.info().block_size.max(512));
    let mut buf = vec![0u8; 4096];
    let mut absent = Vec::new();
    let mut off = 0u64;
    let mut reads = 0;
    while off < size && reads < 64 {
        let n = (size - off).min(4096) as usize;
        match ro.read_layer(off, &mut buf[..n], &mut absent) {
            Ok(()) => {}
            Err(DiskError::DamagedBlock { .. }) if !report.is_clean() => {}
            Err(e) => return Err(err(what, format!("read at {off}: {e}"))),
        }
        off = off.saturating_add(step);
        reads += 1;
    }
    if let Err(e) = ro.extents(0, size) {
        return Err(err(what, format!("extents: {e}")));
    }
    drop(ro);
    if bytes()? != before {
        return Err(err(what, "read-only open/check changed the file".into()));
    }
    if report.is_clean() {
        let rw = VhdFile::open(path, false)
            .map_err(|e| err(what, format!("clean image refused writable: {e}")))?;
        let pat: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8 ^ 0x5a).collect();
        let offs: Vec<u64> = [0, size / 2, size.saturating_sub(65536)]
            .iter()
            .map(|o| o / 512 * 512)
            .filter(|o| o + 65536 <= size)
            .collect();
        for &o in &offs {
            rw.write(o, &pat)
                .map_err(|e| err(what, format!("write at {o} on a clean image: {e}")))?;
        }
        rw.flush()
            .map_err(|e| err(what, format!("flush on a clean image: {e}")))?;
        drop(rw);
        let again = VhdFile::open(path, true)
            .map_err(|e| err(what, format!("reopen after guest writes: {e}")))?;
        let rep = again
            .check(false)
            .map_err(|e| err(what, format!("check after writes: {e}")))?;
        if !rep.is_clean() {
            return Err(err(
                what,
                format!("guest writes damaged a clean image: {:?}", rep.errors),
            ));
        }
        let mut got = vec![0u8; 65536];
        for &o in &offs {
            let mut absent = Vec::new();
            again
                .read_layer(o, &mut got, &mut absent)
                .map_err(|e| err(what, format!("read back at {o}: {e}")))?;
            if !absent.is_empty() || got != pat {
                return Err(err(what, format!("write at {o} did not read back")));
            }
        }
        return Ok(Outcome::Sound);
    }
    match VhdFile::open(path, false) {
        Ok(_) => {
            return Err(err(
                what,
                format!(
                    "check reports {:?} but a writable open succeeded",
                    report.errors
                ),
            ))
        }
        Err(DiskError::Damaged { .. }) => {}
        Err(e) => return Err(err(what, format!("writable open refused untyped-ly: {e}"))),
    }
    if bytes()? != before {
        return Err(err(what, "a refused writable open changed the file".into()));
    }
    // Repair: reports a change exactly when it made one.
    let fixer =
        VhdFile::open_for_repair(path).map_err(|e| err(what, format!("open for repair: {e}")))?;
    let rep = fixer
        .check(true)
        .map_err(|e| err(what, format!("check --repair: {e}")))?;
    let clean = rep.is_clean();
    drop(fixer);
    let after = bytes()?;
    if rep.repaired.is_empty() != (after == before) {
        return Err(err(
            what,
            format!(
                "repair reported {:?} but the file {}",
                rep.repaired,
                if after == before {
                    "is unchanged"
                } else {
                    "changed"
                }
            ),
        ));
    }
    if !clean {
        return Ok(Outcome::DamagedRefused);
    }
    let rw = VhdFile::open(path, false).map_err(|e| {
        err(
            what,
            format!("repair reported clean but the writable open fails: {e}"),
        )
    })?;
    let r2 = rw
        .check(false)
        .map_err(|e| err(what, format!("check after repair: {e}")))?;
    if !r2.is_clean() {
        return Err(err(
            what,
            format!("repair reported clean, check then says {:?}", r2.errors),
        ));
    }
    Ok(Outcome::Repaired)
}
