//! Format-specific operations: reparent, resize, compact, check, allocation. Every
//! metadata change goes through the log (`VhdxFile::commit`).

use crate::format::*;
use crate::{State, VhdxFile};
use fv_vdisk_core::{
    AllocationStats, CheckReport, DiskError, ExtentState, Image, Layer, ParentSpec, Progress,
    Result,
};

fn round_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

impl VhdxFile {
    /// Pages of `region` (file offset, current bytes) that differ in `new`.
    fn changed_pages(&self, base: u64, old: &[u8], new: &[u8]) -> Vec<(u64, Vec<u8>)> {
        old.chunks(4096)
            .zip(new.chunks(4096))
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, (_, b))| (base + i as u64 * 4096, b.to_vec()))
            .collect()
    }

    /// The 4 KiB page holding metadata item `id`, patched with `value` at its start.
    fn patch_item(&self, st: &State, id: &uuid::Uuid, value: &[u8]) -> Result<(u64, Vec<u8>)> {
        let e = st
            .meta_entries
            .iter()
            .find(|e| e.item_id == *id)
            .ok_or_else(|| self.io.corrupt(format!("metadata item {id} missing")))?;
        let abs = st.meta_offset + e.offset as u64;
        let page = abs / 4096 * 4096;
        if abs + value.len() as u64 > page + 4096 {
            return Err(DiskError::Unsupported {
                path: self.io.path.clone(),
                what: "metadata item straddles a page".into(),
            });
        }
        let mut b = vec![0u8; 4096];
        self.io.read(page, &mut b)?;
        put(&mut b, (abs - page) as usize, value);
        Ok((page, b))
    }

    /// Intervals of the file in use: (start, end, what).
    fn used_ranges(&self, st: &State) -> Vec<(u64, u64, String)> {
        let mut v = vec![
            (0, MIB, "header area".to_string()),
            (
                st.log_offset,
                st.log_offset.saturating_add(st.log_length),
                "log".into(),
            ),
            (
                st.meta_offset,
                st.meta_offset + st.meta_length,
                "metadata region".into(),
            ),
            (
                st.bat_offset,
                st.bat_offset + st.bat_length,
                "BAT region".into(),
            ),
        ];
        let g = &st.geo;
        for blk in 0..g.data_blocks() {
            let e = st.block_entry(blk);
            let s = bat_state(e);
            if s == PAYLOAD_FULLY_PRESENT || s == PAYLOAD_PARTIALLY_PRESENT {
                v.push((
                    entry_offset(e),
                    entry_offset(e).saturating_add(g.block_size),
                    format!("block {blk}"),
                ));
            }
        }
        if g.has_parent {
            for c in 0..g.data_blocks().div_ceil(g.chunk_ratio) {
                let e = st.entry(g.sb_index(c));
                if bat_state(e) == SB_PRESENT {
                    v.push((
                        entry_offset(e),
                        entry_offset(e).saturating_add(MIB),
                        format!("sector bitmap {c}"),
                    ));
                }
            }
        }
        v.sort();
        v
    }

    fn read_is_zero(&self, off: u64, len: u64) -> Result<bool> {
        let mut buf = vec![0u8; len.min(4 * MIB) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            let mut absent = Vec::new();
            self.read_layer(off + done, &mut buf[..n], &mut absent)?;
            for r in absent {
                let s = (r.start - off - done) as usize;
                let e = (r.end - off - done) as usize;
                buf[s..e].fill(0);
            }
            if buf[..n].iter().any(|b| *b != 0) {
                return Ok(false);
            }
            done += n as u64;
        }
        Ok(true)
    }
}

impl Image for VhdxFile {
    fn set_parent(&self, parent: &ParentSpec) -> Result<()> {
        // A damaged parent link is what set-parent repairs; any other damage refuses.
        if self.damage_kind() != 1 {
            self.writable()?;
        } else if self.read_only() {
            return Err(DiskError::ReadOnly {
                path: self.io.path.clone(),
            });
        }
        let mut st = self.state.write();
        if !st.geo.has_parent {
            return Err(DiskError::Refused {
                path: self.io.path.clone(),
                reason: "not a differencing disk".into(),
            });
        }
        if parent.virtual_size != st.geo.virtual_size {
            return Err(DiskError::InvalidArgument(format!(
                "parent size {} differs from the child size {}",
                parent.virtual_size, st.geo.virtual_size
            )));
        }
        let kv = crate::create::locator_kv(parent)?;
        let item = parent_locator_bytes(&kv);
        // Lay out the new locator within the metadata region and log the changed pages.
        let region_len = st.meta_length.min(16 * MIB) as usize;
        let mut old = vec![0u8; region_len];
        self.io.read(st.meta_offset, &mut old)?;
        let mut new = old.clone();
        let mut entries = st.meta_entries.clone();
        let idx = entries
            .iter()
            .position(|e| e.item_id == PARENT_LOCATOR)
            .ok_or_else(|| {
                self.io
                    .corrupt("differencing disk without a parent locator item")
            })?;
        let cur = &entries[idx];
        let offset = if item.len() <= cur.length as usize {
            cur.offset as u64
        } else {
            let end = entries
                .iter()
                .map(|e| e.offset as u64 + e.length as u64)
                .max()
                .unwrap_or(0);
            round_up(end, 8)
        };
        if offset as usize + item.len() > region_len {
            return Err(DiskError::Unsupported {
                path: self.io.path.clone(),
                what: "parent locator does not fit in the metadata region".into(),
            });
        }
        new[offset as usize..offset as usize + item.len()].copy_from_slice(&item);
        entries[idx].offset = offset as u32;
        entries[idx].length = item.len() as u32;
        let table = metadata_table_bytes(&entries);
        new[..table.len()].copy_from_slice(&table);
        let pages = self.changed_pages(st.meta_offset, &old, &new);
        self.before_modify(&mut st, false)?;
        self.commit(&mut st, pages)?;
        st.meta_entries = entries;
        st.locator_kv = kv;
        let d = crate::layout::validate(&st, self.io.len()?.max(st.file_len));
        self.set_damage(&mut st, d);
        self.publish(&st);
        Ok(())
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        self.writable()?;
        let old_size = self.state.read().geo.virtual_size;
        let lss = self.state.read().geo.lss;
        if new_size == 0 || !new_size.is_multiple_of(lss) || new_size > MAX_VIRTUAL_SIZE {
            return Err(DiskError::InvalidArgument(format!(
                "size {new_size} must be a non-zero multiple of {lss} up to 64 TiB"
            )));
        }
        if new_size == old_size {
            return Ok(());
        }
        if new_size < old_size {
            for e in self.extents(new_size, old_size - new_size)? {
                if e.state == ExtentState::Data && !self.read_is_zero(e.offset, e.length)? {
                    return Err(DiskError::Refused {
                        path: self.io.path.clone(),
                        reason: format!("shrinking would cut off data at {}", e.offset),
                    });
                }
            }
        }
        let mut st = self.state.write();
        self.before_modify(&mut st, true)?;
        self.commit(&mut st, Vec::new())?;
        let mut g = st.geo.clone();
        let bs = g.block_size;
        let old_blocks = g.data_blocks();
        // Bytes past the old end inside its last block become visible: zero them.
        if new_size > old_size && !old_size.is_multiple_of(bs) {
            let e = st.block_entry(old_size / bs);
            if bat_state(e) == PAYLOAD_FULLY_PRESENT || bat_state(e) == PAYLOAD_PARTIALLY_PRESENT {
                let from = old_size % bs;
                let zero = vec![0u8; (bs - from).min(4 * MIB) as usize];
                let mut o = from;
                while o < bs {
                    let n = (bs - o).min(zero.len() as u64);
                    self.io.write(entry_offset(e) + o, &zero[..n as usize])?;
                    o += n;
                }
            }
        }
        g.virtual_size = new_size;
        let required = g.required_entries();
        let mut extra = Vec::new();
        if required * 8 > st.bat_length {
            // Move the BAT to a larger region at the end of the file.
            let new_len = round_up(required * 8, MIB);
            let new_off = self.allocate(&mut st, new_len)?;
            let mut bytes = vec![0u8; new_len as usize];
            for (i, e) in st.bat.iter().enumerate() {
                put(&mut bytes, i * 8, &e.to_le_bytes());
            }
            self.io.write(new_off, &bytes)?;
            self.io.sync()?;
            let mut regions = st.regions.clone();
            for r in regions.iter_mut().filter(|r| r.guid == BAT_GUID) {
                r.file_offset = new_off;
                r.length = new_len as u32;
            }
            let table = region_table_bytes(&regions);
            for off in REGION_OFFSETS {
                for (i, c) in table.chunks(4096).enumerate() {
                    extra.push((off + i as u64 * 4096, c.to_vec()));
                }
            }
            st.regions = regions;
            st.bat_offset = new_off;
            st.bat_length = new_len;
        }
        let want = round_up(required, 512).min(st.bat_length / 8) as usize;
        if st.bat.len() < want {
            st.bat.resize(want, 0);
        }
        let new_blocks = g.data_blocks();
        st.geo = g.clone();
        if new_blocks < old_blocks {
            for blk in new_blocks..old_blocks {
                st.set_block(blk, bat_entry(PAYLOAD_NOT_PRESENT, 0));
                st.bitmaps.remove(&blk);
                st.dirty_bitmaps.remove(&blk);
            }
        } else if g.leave_allocated && !g.has_parent {
            for blk in old_blocks..new_blocks {
                let off = self.allocate(&mut st, bs)?;
                st.set_block(blk, bat_entry(PAYLOAD_FULLY_PRESENT, off));
            }
        }
        extra.push(self.patch_item(&st, &VIRTUAL_DISK_SIZE, &new_size.to_le_bytes())?);
        self.commit(&mut st, extra)?;
        self.publish(&st);
        Ok(())
    }

    fn compact(&self, progress: Progress<'_>) -> Result<u64> {
        self.writable()?;
        let g = self.state.read().geo.clone();
        if g.leave_allocated && !g.has_parent {
            return Ok(0);
        }
        let before = self.io.len()?;
        // 1. Blocks holding only zeros need no storage (ZERO also hides a parent).
        let total = g.data_blocks();
        for blk in 0..total {
            if !progress(blk, total * 2) {
                return Err(DiskError::Cancelled);
            }
            let e = self.state.read().block_entry(blk);
            if bat_state(e) != PAYLOAD_FULLY_PRESENT {
                continue;
            }
            let len = g.block_size.min(g.virtual_size - blk * g.block_size);
            if self.read_is_zero(blk * g.block_size, len)? {
                let mut st = self.state.write();
                if st.block_entry(blk) == e {
                    self.before_modify(&mut st, false)?;
                    st.set_block(blk, bat_entry(PAYLOAD_ZERO, 0));
                    self.maybe_commit(&mut st)?;
                }
            }
        }
        let mut st = self.state.write();
        self.commit(&mut st, Vec::new())?;
        // 2. Move the last allocations into holes nearer the start.
        let mut moved = 0u64;
        loop {
            let used = self.used_ranges(&st);
            let Some((last_start, last_end, what)) = used.iter().max_by_key(|u| u.0).cloned()
            else {
                break;
            };
            if !(what.starts_with("block") || what.starts_with("sector bitmap")) {
                break;
            }
            let size = last_end - last_start;
            let mut hole = None;
            let mut cursor = 0;
            for (s, e, _) in &used {
                if *s >= last_start {
                    break;
                }
                let start = round_up(cursor, MIB);
                if *s >= start + size {
                    hole = Some(start);
                    break;
                }
                cursor = cursor.max(*e);
            }
            let Some(dst) = hole else { break };
            let mut buf = vec![0u8; size.min(4 * MIB) as usize];
            let mut o = 0;
            while o < size {
                let n = (size - o).min(buf.len() as u64) as usize;
                self.io.read(last_start + o, &mut buf[..n])?;
                self.io.write(dst + o, &buf[..n])?;
                o += n as u64;
            }
            // Repoint the one entry that referenced the moved range.
            let idx = st.bat.iter().position(|e| {
                let s = bat_state(*e);
                entry_offset(*e) == last_start
                    && (s == PAYLOAD_FULLY_PRESENT
                        || s == PAYLOAD_PARTIALLY_PRESENT
                        || s == SB_PRESENT)
            });
            if let Some(i) = idx {
                let e = st.entry(i);
                st.set_entry(i, bat_entry(bat_state(e), dst));
            }
            moved += 1;
            if !progress(total + moved.min(total), total * 2) {
                break;
            }
            // Each move is committed before its old space can be reused.
            self.commit(&mut st, Vec::new())?;
        }
        self.commit(&mut st, Vec::new())?;
        let end = round_up(
            self.used_ranges(&st)
                .iter()
                .map(|u| u.1)
                .max()
                .unwrap_or(MIB),
            MIB,
        );
        if end < before {
            self.io.set_len(end)?;
            self.io.sync()?;
        }
        st.file_len = self.io.len()?;
        st.file_end = round_up(st.file_len.max(end), MIB);
        Ok(before.saturating_sub(st.file_len))
    }

    fn check(&self, repair: bool) -> Result<CheckReport> {
        let mut r = CheckReport {
            // Only what reached the file: an in-memory replay changed nothing.
            log_replayed: self.log_written_to_file(),
            ..Default::default()
        };
        if self.log_was_replayed() && !self.log_written_to_file() {
            r.warnings.push(
                "the log holds changes not yet written into the file (read here from memory); `fv vhd check --repair` replays them"
                    .into(),
            );
        }
        let can_repair = repair && !self.read_only();
        let mut st = self.state.write();
        // Headers.
        for (i, off) in HEADER_OFFSETS.iter().enumerate() {
            let mut b = vec![0u8; HEADER_SIZE];
            self.io.read(*off, &mut b)?;
            if Header::parse(&b).is_none() {
                r.warnings
                    .push(format!("header {} has a bad signature or checksum", i + 1));
                if can_repair && i != st.hdr_slot {
                    self.write_header(&mut st)?;
                    self.io.sync()?;
                    r.repaired.push(format!("rewrote header {}", i + 1));
                }
            }
        }
        // Region tables.
        let mut good: Option<Vec<u8>> = None;
        let mut bad = Vec::new();
        for (i, off) in REGION_OFFSETS.iter().enumerate() {
            let mut b = vec![0u8; REGION_TABLE_SIZE];
            self.io.read(*off, &mut b)?;
            match parse_region_table(&b) {
                Ok(_) => good = good.or(Some(b)),
                Err(e) => {
                    r.warnings
                        .push(format!("region table {} invalid: {e}", i + 1));
                    bad.push(*off);
                }
            }
        }
        // BAT entries, sector bitmaps, metadata items and the parent link, against
        // the layout (the same validation as at open, on the current state).
        let file_len = self.io.len()?.max(st.file_len);
        let damage = crate::layout::validate(&st, file_len);
        if can_repair && (!damage.clear.is_empty() || (good.is_some() && !bad.is_empty())) {
            let mut extra = Vec::new();
            let mut done = Vec::new();
            if let Some(t) = &good {
                for off in &bad {
                    for (i, c) in t.chunks(4096).enumerate() {
                        extra.push((off + i as u64 * 4096, c.to_vec()));
                    }
                    done.push(format!("rewrote the region table copy at {off}"));
                }
            }
            let g = st.geo.clone();
            for (idx, (v, what)) in &damage.clear {
                st.set_entry(*idx, *v);
                done.push(what.clone());
            }
            for blk in damage.blocks.keys() {
                st.bitmaps.remove(blk);
                st.dirty_bitmaps.remove(blk);
            }
            // A cleared sector bitmap block no longer backs any block's bitmap.
            st.dirty_bitmaps
                .retain(|blk| !damage.clear.contains_key(&g.sb_index(blk / g.chunk_ratio)));
            self.before_modify(&mut st, !damage.clear.is_empty())?;
            self.commit(&mut st, extra)?;
            r.repaired.extend(done);
            let after = crate::layout::validate(&st, self.io.len()?.max(st.file_len));
            r.errors.extend(after.list.iter().cloned());
            self.set_damage(&mut st, after);
            crate::VhdxFile::load_bitmaps(&self.io, &mut st)?;
        } else {
            r.errors.extend(damage.list.iter().cloned());
        }
        if !damage.is_empty() && !can_repair {
            r.warnings
                .push(format!("to fix the errors: {}", damage.remedy()));
        }
        let used = self.used_ranges(&st);
        let used_end = used
            .iter()
            .map(|u| u.1)
            .filter(|e| *e <= file_len)
            .max()
            .unwrap_or(0);
        let used_end = used_end.div_ceil(MIB).saturating_mul(MIB);
        if file_len > used_end {
            r.warnings.push(format!(
                "{} bytes past the last block are unused",
                file_len - used_end
            ));
        }
        Ok(r)
    }

    fn allocation(&self) -> Result<AllocationStats> {
        let st = self.state.read();
        let g = &st.geo;
        let mut a = AllocationStats {
            file_size: self.io.len()?,
            total_blocks: g.data_blocks(),
            ..Default::default()
        };
        let mut prev: Option<u64> = None;
        let mut out_of_order = 0u64;
        for blk in 0..g.data_blocks() {
            let e = st.block_entry(blk);
            match bat_state(e) {
                PAYLOAD_FULLY_PRESENT | PAYLOAD_PARTIALLY_PRESENT => {
                    a.allocated_blocks += 1;
                    if let Some(p) = prev {
                        if entry_offset(e) != p + g.block_size {
                            out_of_order += 1;
                        }
                    }
                    prev = Some(entry_offset(e));
                }
                PAYLOAD_ZERO => a.zero_blocks += 1,
                _ => {}
            }
        }
        if a.allocated_blocks > 1 {
            a.fragmentation_percent = out_of_order as f64 * 100.0 / (a.allocated_blocks - 1) as f64;
        }
        Ok(a)
    }
}
