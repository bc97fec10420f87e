//! Validation of a dynamic or differencing VHD against its own layout: every BAT
//! entry must point at a block that lies inside the file, before the footer, and
//! clear of the footer copy, the dynamic header, the BAT, the parent locator data
//! and every other block; every parent locator must lie inside the file and clear of
//! the fixed structures. Runs at open and in `check`, never per request. All
//! arithmetic on values read from the file is checked.

use crate::format::*;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

/// What `check --repair` does about one damaged BAT entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlockFix {
    /// The entry points into metadata or outside the file: what it reads is not guest
    /// data, so the entry is marked unallocated.
    Clear,
    /// The block shares file space with another block: it gets a copy of the bytes it
    /// reads today in a block of its own, so neither changes what it reads.
    Relocate,
    /// The footer is missing and the block runs past the end of the file (a cut-off
    /// copy): the file is extended so its tail reads as zeros.
    Extend,
}

/// Everything validation found. Empty on a sound image.
#[derive(Debug, Default, Clone)]
pub(crate) struct Damage {
    /// One sentence per problem, naming the structure and why.
    pub list: Vec<String>,
    /// Blocks that must not be served (BAT index -> why).
    pub blocks: HashMap<u32, String>,
    /// What repair does to each damaged BAT entry it can fix.
    pub fix: BTreeMap<u32, BlockFix>,
    /// Parent locator entries repair clears (their data is unusable).
    pub locators: Vec<usize>,
    /// Problems only `set-parent --force` can fix (parent unique id, no usable locator).
    pub linkage: usize,
}

impl Damage {
    pub(crate) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The first problems and a count, for an error message.
    pub(crate) fn summary(&self) -> String {
        let mut s = self
            .list
            .iter()
            .take(3)
            .cloned()
            .collect::<Vec<_>>()
            .join("; ");
        if self.list.len() > 3 {
            s.push_str(&format!(" (and {} more)", self.list.len() - 3));
        }
        s
    }

    /// What the user should run.
    pub(crate) fn remedy(&self) -> String {
        if self.linkage == 0 {
            "run `fv vhd check --repair` (damaged blocks then read as absent: zeros, or the parent's data)".into()
        } else if self.linkage == self.list.len() {
            "reconnect the parent with `fv vhd set-parent CHILD PARENT --force`".into()
        } else {
            "run `fv vhd check --repair`, then reconnect the parent with `fv vhd set-parent CHILD PARENT --force`".into()
        }
    }
}

/// What the layout check needs to know about the file.
pub(crate) struct Input<'a> {
    pub file_len: u64,
    pub footer_missing: bool,
    pub differencing: bool,
    /// Offset of the dynamic header (the footer's data offset).
    pub header_offset: u64,
    pub header: &'a DynHeader,
    pub bat: &'a [u32],
}

/// A parent locator whose data is sound and decodes to a path.
#[derive(Debug, Clone)]
pub(crate) struct LocatorPath {
    pub code: u32,
    pub path: String,
}

/// Everything in the file that is not a block: (range, name).
struct Regions {
    pub list: Vec<(Range<u64>, String)>,
}

impl Regions {
    /// Every region `r` overlaps, in file order, e.g. "parent locator 0 data and the BAT".
    fn hit(&self, r: &Range<u64>) -> Option<String> {
        let mut hits: Vec<&(Range<u64>, String)> = self
            .list
            .iter()
            .filter(|(x, _)| x.start < r.end && r.start < x.end)
            .collect();
        hits.sort_by_key(|(x, _)| x.start);
        let names: Vec<&str> = hits.iter().map(|(_, n)| n.as_str()).collect();
        (!names.is_empty()).then(|| names.join(" and "))
    }
}

/// Bytes of the sector bitmap in front of each block (padded to a sector).
pub(crate) fn bitmap_len(block_size: u32) -> u64 {
    (u64::from(block_size) / SECTOR / 8).div_ceil(SECTOR) * SECTOR
}

/// End of the space structures may use: the footer position, or the file's end
/// when the footer is missing (it is rewritten after everything else on repair).
pub(crate) fn limit(file_len: u64, footer_missing: bool) -> u64 {
    if footer_missing {
        file_len
    } else {
        file_len.saturating_sub(SECTOR)
    }
}

/// Range of the BAT in the file (padded to a sector), `None` on overflow.
pub(crate) fn bat_range(h: &DynHeader) -> Option<Range<u64>> {
    let end = h
        .table_offset
        .checked_add(u64::from(h.max_table_entries) * 4)?
        .checked_next_multiple_of(SECTOR)?;
    Some(h.table_offset..end)
}

/// Checks on the fixed structures, made before the BAT is loaded: a failure here
/// means the image cannot be read at all.
pub(crate) fn check_header(
    file_len: u64,
    footer_missing: bool,
    header_offset: u64,
    h: &DynHeader,
    virtual_size: u64,
) -> Result<(), String> {
    let limit = limit(file_len, footer_missing);
    let bs = u64::from(h.block_size);
    let needed = virtual_size.div_ceil(bs);
    if needed > u64::from(h.max_table_entries) {
        return Err(format!(
            "the BAT has {} entries but {needed} are needed for {virtual_size} bytes",
            h.max_table_entries
        ));
    }
    let Some(bat) = bat_range(h) else {
        return Err(format!("BAT offset {} overflows", h.table_offset));
    };
    if bat.end > limit {
        return Err(format!(
            "the BAT at {}..{} runs past {} (the {})",
            bat.start,
            bat.end,
            limit,
            if footer_missing {
                "end of the file"
            } else {
                "footer"
            }
        ));
    }
    if bat.start < SECTOR {
        return Err(format!(
            "the BAT at {} overlaps the footer copy at 0..512",
            bat.start
        ));
    }
    let hdr = header_offset..header_offset + 1024;
    if bat.start < hdr.end && hdr.start < bat.end {
        return Err(format!(
            "the BAT at {}..{} overlaps the dynamic header at {}..{}",
            bat.start, bat.end, hdr.start, hdr.end
        ));
    }
    Ok(())
}

/// Validate blocks and parent locators. Assumes [`check_header`] passed.
/// `read(offset, len)` reads locator data (already bounds-checked); an error there
/// counts as an unusable locator.
pub(crate) fn validate(
    inp: &Input<'_>,
    read: &mut dyn FnMut(u64, usize) -> Option<Vec<u8>>,
) -> (Damage, Vec<LocatorPath>) {
    let mut d = Damage::default();
    if inp.footer_missing {
        d.list.push(
            "the footer at the end of the file is missing or damaged (the copy at offset 0 is intact)"
                .into(),
        );
    }
    let h = inp.header;
    let limit = limit(inp.file_len, inp.footer_missing);
    let hoff = inp.header_offset;
    let mut regions = vec![
        (0..SECTOR, "the footer copy".to_string()),
        (hoff..hoff + 1024, "the dynamic header".to_string()),
    ];
    if let Some(b) = bat_range(h) {
        regions.push((b, "the BAT".into()));
    }
    if !inp.footer_missing {
        regions.push((limit..inp.file_len, "the footer".into()));
    }
    // Parent locators: only a differencing disk has any (others ignore the fields).
    let mut paths = Vec::new();
    if inp.differencing {
        let fixed = Regions {
            list: regions.clone(),
        };
        for (i, l) in h.locators.iter().enumerate() {
            if l.code == 0 {
                continue;
            }
            let problem = if l.data_len == 0 || l.data_len > MAX_LOCATOR_LEN {
                Some(format!(
                    "parent locator {i} has length {} (allowed 1..={MAX_LOCATOR_LEN})",
                    l.data_len
                ))
            } else {
                match l.data_offset.checked_add(u64::from(l.data_len)) {
                    None => Some(format!(
                        "parent locator {i} at offset {:#x} wraps around",
                        l.data_offset
                    )),
                    Some(end) if end > limit => Some(format!(
                        "parent locator {i} data at {}..{end} lies outside the file ({} bytes before the footer)",
                        l.data_offset, limit
                    )),
                    Some(end) => {
                        let r = l.data_offset..end;
                        fixed.hit(&r).map(|n| {
                            format!(
                                "parent locator {i} data at {}..{end} overlaps {n}",
                                l.data_offset
                            )
                        })
                    }
                }
            };
            match problem {
                Some(p) => {
                    d.list.push(p);
                    d.locators.push(i);
                }
                None => {
                    let end = l.data_offset + u64::from(l.data_len);
                    regions.push((
                        l.data_offset..end.next_multiple_of(SECTOR),
                        format!("parent locator {i} data"),
                    ));
                    let decoded = read(l.data_offset, l.data_len as usize)
                        .and_then(|data| decode_locator(l.code, &data));
                    if let Some(path) = decoded.filter(|p| !p.is_empty()) {
                        paths.push(LocatorPath { code: l.code, path });
                    }
                }
            }
        }
        if h.parent_id.is_nil() {
            d.list
                .push("differencing disk has no parent unique id (it is all zeros)".into());
            d.linkage += 1;
        }
        if paths.is_empty() {
            d.list.push(
                "differencing disk has no usable parent locator (none with a Windows or Mac OS X path and sound bounds)"
                    .into(),
            );
            d.linkage += 1;
        }
    }
    let regions = Regions { list: regions };
    let bml = bitmap_len(h.block_size);
    let total = bml + u64::from(h.block_size);
    // Blocks clear of the metadata, for the overlap sweep: (start, end, index).
    let mut placed: Vec<(u64, u64, u32)> = Vec::new();
    for (i, &e) in inp.bat.iter().enumerate() {
        if e == BAT_UNUSED {
            continue;
        }
        let i = i as u32;
        let start = u64::from(e) * SECTOR;
        let end = start + total;
        let r = start..end;
        if end > limit && inp.footer_missing && start < inp.file_len && regions.hit(&r).is_none() {
            let w = format!(
                "block {i} at {start}..{end} is cut short by the end of the file at {}",
                inp.file_len
            );
            d.list.push(w.clone());
            d.blocks.insert(i, w);
            d.fix.insert(i, BlockFix::Extend);
            placed.push((start, end, i));
            continue;
        }
        let why = if end > limit {
            Some(if start >= inp.file_len {
                format!(
                    "BAT entry {i} points at {start}, beyond the end of the file ({} bytes)",
                    inp.file_len
                )
            } else {
                format!(
                    "block {i} at {start}..{end} runs past {limit} (the {})",
                    if inp.footer_missing {
                        "end of the file"
                    } else {
                        "footer"
                    }
                )
            })
        } else {
            regions
                .hit(&r)
                .map(|n| format!("block {i} at {start}..{end} overlaps {n}"))
        };
        match why {
            Some(w) => {
                d.list.push(w.clone());
                d.blocks.insert(i, w);
                d.fix.insert(i, BlockFix::Clear);
            }
            None => placed.push((start, end, i)),
        }
    }
    placed.sort_unstable();
    // The block reaching furthest so far: a later block starting before its end
    // shares file space with it.
    let mut reach: Option<(u64, u64, u32)> = None;
    for &(s, e, i) in &placed {
        if let Some((os, oe, oi)) = reach {
            if s < oe {
                let w = format!("block {i} at {s}..{e} overlaps block {oi} at {os}..{oe}");
                d.list.push(w.clone());
                d.blocks.insert(i, w);
                d.fix.insert(i, BlockFix::Relocate);
                d.blocks.entry(oi).or_insert_with(|| {
                    format!("block {oi} at {os}..{oe} shares file space with block {i}")
                });
                if e > oe {
                    reach = Some((s, e, i));
                }
                continue;
            }
        }
        reach = Some((s, e, i));
    }
    (d, paths)
}
