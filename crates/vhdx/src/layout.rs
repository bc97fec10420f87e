//! Validation of an image against its own layout: every BAT entry (payload and sector
//! bitmap), region, metadata item and log descriptor must stay inside the file and
//! out of the structures it does not own. Runs at open (and on repair), never per
//! read; all arithmetic on file values is checked.

use crate::format::*;
use crate::State;
use std::collections::{BTreeMap, HashMap};

/// Where a log descriptor may never write: the file identifier, both headers and the
/// reserved space after the region tables (region tables themselves may be updated
/// through the log; the result is validated before it reaches the file).
pub(crate) const LOG_FORBIDDEN: [(u64, u64, &str); 3] = [
    (0, 64 * KIB, "the file identifier"),
    (64 * KIB, 192 * KIB, "the headers"),
    (320 * KIB, MIB, "the reserved header area"),
];

/// What validation found.
#[derive(Debug, Default, Clone)]
pub(crate) struct Damage {
    /// One sentence per problem, naming the structure and why.
    pub list: Vec<String>,
    /// Payload blocks that must not be served, with the reason.
    pub blocks: HashMap<u64, String>,
    /// BAT entries repair replaces (index -> new entry), with what repair says it did.
    pub clear: BTreeMap<usize, (u64, String)>,
    /// Problems repair cannot fix by clearing BAT entries (parent linkage, metadata).
    pub unrepairable: usize,
}

impl Damage {
    pub(crate) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// 0: sound; 1: only the parent link (or metadata) is damaged, which BAT repair
    /// cannot fix; 2: BAT damage.
    pub(crate) fn kind(&self) -> u8 {
        if self.list.is_empty() {
            0
        } else if self.unrepairable == self.list.len() {
            1
        } else {
            2
        }
    }

    /// A short summary for an error message: the first problems and a count.
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
        if self.unrepairable == 0 {
            "run `fv vhd check --repair` (damaged blocks then read as zeros or from the parent)"
                .into()
        } else if self.unrepairable == self.list.len() {
            "the parent link cannot be verified: reconnect the parent with `fv vhd set-parent CHILD PARENT --force`, or recreate the disk".into()
        } else {
            "run `fv vhd check --repair` for the BAT; the parent link needs `fv vhd set-parent CHILD PARENT --force`".into()
        }
    }
}

/// Fixed structures of the file: (start, end, name).
pub(crate) fn fixed_ranges(st: &State) -> Vec<(u64, u64, String)> {
    let mut v = vec![
        (0, MIB, "the header area".to_string()),
        (
            st.log_offset,
            st.log_offset.saturating_add(st.log_length),
            "the log".into(),
        ),
    ];
    for r in &st.regions {
        let name = if r.guid == BAT_GUID {
            "the BAT".to_string()
        } else if r.guid == METADATA_GUID {
            "the metadata region".to_string()
        } else {
            format!("region {}", r.guid)
        };
        v.push((
            r.file_offset,
            r.file_offset.saturating_add(r.length as u64),
            name,
        ));
    }
    v.retain(|r| r.0 < r.1);
    v.sort();
    v
}

fn hits(fixed: &[(u64, u64, String)], s: u64, e: u64) -> Option<&(u64, u64, String)> {
    fixed.iter().find(|f| s < f.1 && f.0 < e)
}

#[derive(Clone, Copy)]
enum Item {
    Block(u64),
    Bitmap(u64),
}

fn item_name(i: Item) -> String {
    match i {
        Item::Block(b) => format!("block {b}"),
        Item::Bitmap(c) => format!("sector bitmap block {c}"),
    }
}

/// Check every BAT entry, the metadata items and the parent locator against the
/// layout of a file of `file_len` bytes.
pub(crate) fn validate(st: &State, file_len: u64) -> Damage {
    let mut d = Damage::default();
    let g = &st.geo;
    let fixed = fixed_ranges(st);
    let base_clear = if g.has_parent {
        PAYLOAD_NOT_PRESENT
    } else {
        PAYLOAD_ZERO
    };
    let cleared = if g.has_parent {
        "it now reads from the parent"
    } else {
        "it now reads as zeros"
    };
    // (start, end, bat index, item) of every allocation that passed the bounds checks.
    let mut used: Vec<(u64, u64, usize, Item)> = Vec::new();
    let bad_block = |d: &mut Damage, blk: u64, idx: usize, why: String| {
        d.list.push(format!("block {blk}: {why}"));
        d.blocks.insert(blk, why);
        d.clear.insert(
            idx,
            (
                bat_entry(base_clear, 0),
                format!("block {blk}: cleared its damaged BAT entry ({cleared})"),
            ),
        );
    };
    let bounds = |s: u64, len: u64| -> std::result::Result<u64, String> {
        let e = match s.checked_add(len) {
            Some(e) if e <= file_len => e,
            _ => {
                return Err(format!(
                    "BAT entry points at file offset {s}, beyond the end of the file ({file_len} bytes)"
                ))
            }
        };
        if let Some(f) = hits(&fixed, s, e) {
            return Err(format!(
                "BAT entry points at file offset {s}, into {} ({}..{})",
                f.2, f.0, f.1
            ));
        }
        Ok(e)
    };
    for blk in 0..g.data_blocks() {
        let idx = g.bat_index(blk);
        let e = st.entry(idx);
        let s = bat_state(e);
        let valid = matches!(
            s,
            PAYLOAD_NOT_PRESENT
                | PAYLOAD_UNDEFINED
                | PAYLOAD_ZERO
                | PAYLOAD_UNMAPPED
                | PAYLOAD_FULLY_PRESENT
        ) || (s == PAYLOAD_PARTIALLY_PRESENT && g.has_parent);
        if !valid {
            bad_block(
                &mut d,
                blk,
                idx,
                format!("state {s} is invalid for a {:?} disk", g.kind()),
            );
            continue;
        }
        if s != PAYLOAD_FULLY_PRESENT && s != PAYLOAD_PARTIALLY_PRESENT {
            continue;
        }
        let off = entry_offset(e);
        match bounds(off, g.block_size) {
            Ok(end) => used.push((off, end, idx, Item::Block(blk))),
            Err(why) => bad_block(&mut d, blk, idx, why),
        }
    }
    let chunks = g.data_blocks().div_ceil(g.chunk_ratio);
    let mut bad_chunks: Vec<(u64, String)> = Vec::new();
    for c in 0..chunks {
        let idx = g.sb_index(c);
        if idx >= st.bat.len() && !g.has_parent {
            // A base disk's BAT may end before its last (unused) bitmap entry.
            continue;
        }
        let e = st.entry(idx);
        let why = match bat_state(e) {
            SB_NOT_PRESENT => continue,
            SB_PRESENT if g.has_parent => match bounds(entry_offset(e), MIB) {
                Ok(end) => {
                    used.push((entry_offset(e), end, idx, Item::Bitmap(c)));
                    continue;
                }
                Err(why) => why,
            },
            s => format!("state {s} is invalid for a {:?} disk", g.kind()),
        };
        d.list.push(format!("sector bitmap block {c}: {why}"));
        d.clear.insert(
            idx,
            (
                bat_entry(SB_NOT_PRESENT, 0),
                format!("sector bitmap block {c}: cleared its damaged BAT entry"),
            ),
        );
        bad_chunks.push((c, why));
    }
    // Two allocations sharing file space: the later one in the file is damaged (its
    // bytes are also someone else's).
    used.sort_by_key(|u| (u.0, u.2));
    let mut last: Option<(u64, Item)> = None;
    for &(s, e, idx, item) in &used {
        match last {
            Some((end, owner)) if s < end => {
                let why = format!("shares file space {s}..{e} with {}", item_name(owner));
                match item {
                    Item::Block(b) => bad_block(&mut d, b, idx, why),
                    Item::Bitmap(c) => {
                        d.list.push(format!("sector bitmap block {c}: {why}"));
                        d.clear.insert(
                            idx,
                            (
                                bat_entry(SB_NOT_PRESENT, 0),
                                format!("sector bitmap block {c}: cleared its damaged BAT entry"),
                            ),
                        );
                        bad_chunks.push((c, why));
                    }
                }
            }
            _ => last = Some((e, item)),
        }
    }
    // Partially present blocks need a sound sector bitmap block.
    if g.has_parent {
        for blk in 0..g.data_blocks() {
            let idx = g.bat_index(blk);
            if bat_state(st.entry(idx)) != PAYLOAD_PARTIALLY_PRESENT || d.blocks.contains_key(&blk)
            {
                continue;
            }
            let c = blk / g.chunk_ratio;
            let why = if let Some((_, w)) = bad_chunks.iter().find(|b| b.0 == c) {
                format!("partially present, but its sector bitmap block is damaged ({w})")
            } else if bat_state(st.entry(g.sb_index(c))) != SB_PRESENT {
                "partially present, but its sector bitmap block is not".to_string()
            } else {
                continue;
            };
            bad_block(&mut d, blk, idx, why);
        }
    }
    // Metadata items must not share bytes.
    let mut items: Vec<(u64, u64, uuid::Uuid)> = st
        .meta_entries
        .iter()
        .filter(|e| e.length > 0)
        .map(|e| {
            (
                e.offset as u64,
                e.offset as u64 + e.length as u64,
                e.item_id,
            )
        })
        .collect();
    items.sort();
    for w in items.windows(2) {
        if let [a, b] = w {
            if b.0 < a.1 {
                d.list.push(format!(
                    "metadata item {} overlaps metadata item {}",
                    b.2, a.2
                ));
                d.unrepairable += 1;
            }
        }
    }
    if g.has_parent {
        for why in linkage_problems(&st.locator_kv) {
            d.list.push(why);
            d.unrepairable += 1;
        }
    }
    d
}

/// What is wrong with a differencing disk's parent locator (2.6.2.6.1).
pub(crate) fn linkage_problems(kv: &[(String, String)]) -> Vec<String> {
    let mut v = Vec::new();
    let get = |k: &str| {
        kv.iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(k))
            .map(|(_, v)| v)
    };
    match get("parent_linkage") {
        None => v.push("parent locator has no parent_linkage entry".to_string()),
        Some(s) if parse_guid_text(s).is_none() => {
            v.push(format!("parent locator parent_linkage {s:?} is not a GUID"))
        }
        Some(_) => {}
    }
    if ["relative_path", "volume_path", "absolute_win32_path"]
        .iter()
        .all(|k| get(k).is_none_or(|p| p.is_empty()))
    {
        v.push(
            "parent locator has no relative_path, volume_path or absolute_win32_path entry"
                .to_string(),
        );
    }
    v
}

/// Largest file a sound image with this geometry and these regions can need: its
/// fixed structures (or the current file, if longer) plus every payload block and
/// sector bitmap block allocated once more.
pub(crate) fn plausible_extent(st: &State, file_len: u64) -> u64 {
    let g = &st.geo;
    let fixed_end = fixed_ranges(st)
        .iter()
        .map(|f| f.1)
        .max()
        .unwrap_or(MIB)
        .max(file_len);
    let blocks = g.data_blocks().saturating_mul(g.block_size);
    let bitmaps = if g.has_parent {
        g.data_blocks().div_ceil(g.chunk_ratio).saturating_mul(MIB)
    } else {
        0
    };
    fixed_end
        .div_ceil(MIB)
        .saturating_mul(MIB)
        .saturating_add(blocks)
        .saturating_add(bitmaps)
}

/// Check one log change against the fixed limits (before the result is parsed).
pub(crate) fn check_log_target(
    offset: u64,
    len: u64,
    log: (u64, u64),
) -> std::result::Result<u64, String> {
    let end = offset
        .checked_add(len)
        .ok_or_else(|| format!("log descriptor {offset}+{len} overflows"))?;
    for (s, e, what) in LOG_FORBIDDEN {
        if offset < e && s < end {
            return Err(format!(
                "log descriptor {offset}+{len} would overwrite {what}"
            ));
        }
    }
    if offset < log.1 && log.0 < end {
        return Err(format!(
            "log descriptor {offset}+{len} would overwrite the log itself"
        ));
    }
    Ok(end)
}
