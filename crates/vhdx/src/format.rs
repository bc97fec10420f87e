//! On-disk structures of [MS-VHDX]: parsing never panics and never trusts a length.

use uuid::Uuid;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
pub const LOG_SECTOR: usize = 4096;

pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
pub const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
pub const REGION_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
pub const HEADER_SIZE: usize = 4096;
pub const REGION_TABLE_SIZE: usize = 64 * 1024;
pub const METADATA_TABLE_SIZE: usize = 64 * 1024;
pub const MAX_TABLE_ENTRIES: usize = 2047;
/// [MS-VHDX] caps the virtual size at 64 TiB.
pub const MAX_VIRTUAL_SIZE: u64 = 64 * 1024 * 1024 * MIB;
/// Largest log we read into memory; Hyper-V and qemu use 1 MiB.
pub const MAX_LOG_LENGTH: u64 = 256 * MIB;

pub const BAT_GUID: Uuid = Uuid::from_u128(0x2DC27766_F623_4200_9D64_115E9BFD4A08);
pub const METADATA_GUID: Uuid = Uuid::from_u128(0x8B7CA206_4790_4B9A_B8FE_575F050F886E);

pub const FILE_PARAMETERS: Uuid = Uuid::from_u128(0xCAA16737_FA36_4D43_B3B6_33F0AA44E76B);
pub const VIRTUAL_DISK_SIZE: Uuid = Uuid::from_u128(0x2FA54224_CD1B_4876_B211_5DBED83BF4B8);
pub const PAGE83_DATA: Uuid = Uuid::from_u128(0xBECA12AB_B2E6_4523_93EF_C309E000C746);
pub const LOGICAL_SECTOR_SIZE: Uuid = Uuid::from_u128(0x8141BF1D_A96F_4709_BA47_F233A8FAAB5F);
pub const PHYSICAL_SECTOR_SIZE: Uuid = Uuid::from_u128(0xCDA348C7_445D_4471_9CC9_E9885251C556);
pub const PARENT_LOCATOR: Uuid = Uuid::from_u128(0xA8D35F2D_B30B_454D_ABF7_D3D84834AB0C);
pub const VHDX_LOCATOR_TYPE: Uuid = Uuid::from_u128(0xB04AEFB7_D19E_4A81_B789_25B8E9445913);

// Payload block states (2.5.1.1) and sector bitmap states (2.5.1.2).
pub const PAYLOAD_NOT_PRESENT: u64 = 0;
pub const PAYLOAD_UNDEFINED: u64 = 1;
pub const PAYLOAD_ZERO: u64 = 2;
pub const PAYLOAD_UNMAPPED: u64 = 3;
pub const PAYLOAD_FULLY_PRESENT: u64 = 6;
pub const PAYLOAD_PARTIALLY_PRESENT: u64 = 7;
pub const SB_NOT_PRESENT: u64 = 0;
pub const SB_PRESENT: u64 = 6;

pub fn bat_state(e: u64) -> u64 {
    e & 7
}
pub fn entry_offset(e: u64) -> u64 {
    (e >> 20) << 20
}
pub fn bat_entry(state: u64, offset: u64) -> u64 {
    (offset & !(MIB - 1)) | (state & 7)
}

pub fn u16_at(b: &[u8], o: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(o..o + 2) {
        a.copy_from_slice(s);
    }
    u16::from_le_bytes(a)
}
pub fn u32_at(b: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(o..o + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}
pub fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(o..o + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}
pub fn guid_at(b: &[u8], o: usize) -> Uuid {
    let mut a = [0u8; 16];
    if let Some(s) = b.get(o..o + 16) {
        a.copy_from_slice(s);
    }
    Uuid::from_bytes_le(a)
}
pub fn put(b: &mut [u8], o: usize, v: &[u8]) {
    if let Some(d) = b.get_mut(o..o + v.len()) {
        d.copy_from_slice(v);
    }
}
pub fn put_guid(b: &mut [u8], o: usize, g: &Uuid) {
    put(b, o, &g.to_bytes_le());
}

/// CRC-32C of `buf` with the 4-byte checksum field at `at` taken as zero.
pub fn crc_with_hole(buf: &[u8], at: usize) -> u32 {
    let (a, rest) = buf.split_at(at.min(buf.len()));
    let b = rest.get(4..).unwrap_or(&[]);
    let c = crc32c::crc32c(a);
    let c = crc32c::crc32c_append(c, &[0u8; 4]);
    crc32c::crc32c_append(c, b)
}

fn seal(buf: &mut [u8], at: usize) {
    let c = crc_with_hole(buf, at);
    put(buf, at, &c.to_le_bytes());
}

/// The 4 KiB VHDX header (2.2.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub sequence: u64,
    pub file_write_guid: Uuid,
    pub data_write_guid: Uuid,
    pub log_guid: Uuid,
    pub log_version: u16,
    pub version: u16,
    pub log_length: u32,
    pub log_offset: u64,
}

impl Header {
    /// `None` when the signature or checksum is wrong.
    pub fn parse(b: &[u8]) -> Option<Header> {
        if b.len() < HEADER_SIZE || &b[..4] != b"head" {
            return None;
        }
        let b = &b[..HEADER_SIZE];
        if crc_with_hole(b, 4) != u32_at(b, 4) {
            return None;
        }
        Some(Header {
            sequence: u64_at(b, 8),
            file_write_guid: guid_at(b, 16),
            data_write_guid: guid_at(b, 32),
            log_guid: guid_at(b, 48),
            log_version: u16_at(b, 64),
            version: u16_at(b, 66),
            log_length: u32_at(b, 68),
            log_offset: u64_at(b, 72),
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        put(&mut b, 0, b"head");
        put(&mut b, 8, &self.sequence.to_le_bytes());
        put_guid(&mut b, 16, &self.file_write_guid);
        put_guid(&mut b, 32, &self.data_write_guid);
        put_guid(&mut b, 48, &self.log_guid);
        put(&mut b, 64, &self.log_version.to_le_bytes());
        put(&mut b, 66, &self.version.to_le_bytes());
        put(&mut b, 68, &self.log_length.to_le_bytes());
        put(&mut b, 72, &self.log_offset.to_le_bytes());
        seal(&mut b, 4);
        b
    }
}

/// One region table entry (2.2.3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionEntry {
    pub guid: Uuid,
    pub file_offset: u64,
    pub length: u32,
    pub required: bool,
}

pub fn parse_region_table(b: &[u8]) -> Result<Vec<RegionEntry>, String> {
    if b.len() < REGION_TABLE_SIZE || &b[..4] != b"regi" {
        return Err("region table signature".into());
    }
    let b = &b[..REGION_TABLE_SIZE];
    if crc_with_hole(b, 4) != u32_at(b, 4) {
        return Err("region table checksum".into());
    }
    let count = u32_at(b, 8) as usize;
    if count > MAX_TABLE_ENTRIES {
        return Err(format!("region table EntryCount {count} exceeds 2047"));
    }
    Ok((0..count)
        .map(|i| {
            let o = 16 + 32 * i;
            RegionEntry {
                guid: guid_at(b, o),
                file_offset: u64_at(b, o + 16),
                length: u32_at(b, o + 24),
                required: u32_at(b, o + 28) & 1 != 0,
            }
        })
        .collect())
}

pub fn region_table_bytes(entries: &[RegionEntry]) -> Vec<u8> {
    let mut b = vec![0u8; REGION_TABLE_SIZE];
    put(&mut b, 0, b"regi");
    put(&mut b, 8, &(entries.len() as u32).to_le_bytes());
    for (i, e) in entries.iter().enumerate() {
        let o = 16 + 32 * i;
        put_guid(&mut b, o, &e.guid);
        put(&mut b, o + 16, &e.file_offset.to_le_bytes());
        put(&mut b, o + 24, &e.length.to_le_bytes());
        put(&mut b, o + 28, &(e.required as u32).to_le_bytes());
    }
    seal(&mut b, 4);
    b
}

/// One metadata table entry (2.6.1.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaEntry {
    pub item_id: Uuid,
    pub offset: u32,
    pub length: u32,
    pub is_user: bool,
    pub is_virtual_disk: bool,
    pub is_required: bool,
}

pub fn parse_metadata_table(b: &[u8]) -> Result<Vec<MetaEntry>, String> {
    if b.len() < METADATA_TABLE_SIZE || &b[..8] != b"metadata" {
        return Err("metadata table signature".into());
    }
    let count = u16_at(b, 10) as usize;
    if count > MAX_TABLE_ENTRIES {
        return Err(format!("metadata table EntryCount {count} exceeds 2047"));
    }
    Ok((0..count)
        .map(|i| {
            let o = 32 + 32 * i;
            let flags = u32_at(b, o + 24);
            MetaEntry {
                item_id: guid_at(b, o),
                offset: u32_at(b, o + 16),
                length: u32_at(b, o + 20),
                is_user: flags & 1 != 0,
                is_virtual_disk: flags & 2 != 0,
                is_required: flags & 4 != 0,
            }
        })
        .collect())
}

pub fn metadata_table_bytes(entries: &[MetaEntry]) -> Vec<u8> {
    let mut b = vec![0u8; METADATA_TABLE_SIZE];
    put(&mut b, 0, b"metadata");
    put(&mut b, 10, &(entries.len() as u16).to_le_bytes());
    for (i, e) in entries.iter().enumerate() {
        let o = 32 + 32 * i;
        put_guid(&mut b, o, &e.item_id);
        put(&mut b, o + 16, &e.offset.to_le_bytes());
        put(&mut b, o + 20, &e.length.to_le_bytes());
        let flags =
            (e.is_user as u32) | ((e.is_virtual_disk as u32) << 1) | ((e.is_required as u32) << 2);
        put(&mut b, o + 24, &flags.to_le_bytes());
    }
    b
}

fn utf16(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

/// Parent locator key/value pairs (2.6.2.6) of the VHDX locator type.
pub fn parse_parent_locator(b: &[u8]) -> Result<(Uuid, Vec<(String, String)>), String> {
    if b.len() < 20 {
        return Err("parent locator shorter than its header".into());
    }
    let ty = guid_at(b, 0);
    let count = u16_at(b, 18) as usize;
    if 20 + count * 12 > b.len() {
        return Err(format!(
            "parent locator KeyValueCount {count} overflows the item"
        ));
    }
    let text = |off: u32, len: u16| -> Result<String, String> {
        let (off, len) = (off as usize, len as usize);
        let s = b
            .get(off..off + len)
            .filter(|_| len % 2 == 0)
            .ok_or_else(|| format!("parent locator string at {off}+{len} out of bounds"))?;
        let units: Vec<u16> = s
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        String::from_utf16(&units).map_err(|_| "parent locator string is not UTF-16".to_string())
    };
    let mut kv = Vec::with_capacity(count.min(256));
    for i in 0..count {
        let o = 20 + 12 * i;
        let key = text(u32_at(b, o), u16_at(b, o + 8))?;
        let value = text(u32_at(b, o + 4), u16_at(b, o + 10))?;
        kv.push((key, value));
    }
    Ok((ty, kv))
}

pub fn parent_locator_bytes(kv: &[(String, String)]) -> Vec<u8> {
    let mut b = vec![0u8; 20 + 12 * kv.len()];
    put_guid(&mut b, 0, &VHDX_LOCATOR_TYPE);
    put(&mut b, 18, &(kv.len() as u16).to_le_bytes());
    for (i, (k, v)) in kv.iter().enumerate() {
        let (k, v) = (utf16(k), utf16(v));
        let ko = b.len() as u32;
        b.extend_from_slice(&k);
        let vo = b.len() as u32;
        b.extend_from_slice(&v);
        let o = 20 + 12 * i;
        put(&mut b, o, &ko.to_le_bytes());
        put(&mut b, o + 4, &vo.to_le_bytes());
        put(&mut b, o + 8, &(k.len() as u16).to_le_bytes());
        put(&mut b, o + 10, &(v.len() as u16).to_le_bytes());
    }
    b
}

/// Parse "{GUID}" as written in parent_linkage.
pub fn parse_guid_text(s: &str) -> Option<Uuid> {
    Uuid::parse_str(s.trim().trim_start_matches('{').trim_end_matches('}')).ok()
}
pub fn guid_text(g: &Uuid) -> String {
    format!("{{{}}}", g.hyphenated())
}

/// One change recorded in a log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogOp {
    /// 4 KiB of data for `offset`.
    Data {
        offset: u64,
        data: Vec<u8>,
    },
    Zero {
        offset: u64,
        length: u64,
    },
}

#[derive(Debug, Clone)]
pub struct LogEntry {
    /// Byte offset of the entry inside the log.
    pub position: u64,
    pub length: u64,
    pub sequence: u64,
    pub tail: u64,
    pub flushed_file_offset: u64,
    pub last_file_offset: u64,
    pub ops: Vec<LogOp>,
}

/// Sectors holding the entry header and `n` descriptors.
pub fn descriptor_sectors(n: usize) -> usize {
    (n + 2).div_ceil(128)
}

/// Build one log entry (2.3.1) for 4 KiB-aligned page writes.
pub fn build_log_entry(
    sequence: u64,
    tail: u32,
    log_guid: &Uuid,
    flushed: u64,
    last: u64,
    pages: &[(u64, &[u8])],
) -> Vec<u8> {
    let ds = descriptor_sectors(pages.len());
    let total = (ds + pages.len()) * LOG_SECTOR;
    let mut b = vec![0u8; total];
    put(&mut b, 0, b"loge");
    put(&mut b, 8, &(total as u32).to_le_bytes());
    put(&mut b, 12, &tail.to_le_bytes());
    put(&mut b, 16, &sequence.to_le_bytes());
    put(&mut b, 24, &(pages.len() as u32).to_le_bytes());
    put_guid(&mut b, 32, log_guid);
    put(&mut b, 48, &flushed.to_le_bytes());
    put(&mut b, 56, &last.to_le_bytes());
    for (i, (off, page)) in pages.iter().enumerate() {
        let d = 64 + 32 * i;
        put(&mut b, d, b"desc");
        put(&mut b, d + 4, page.get(4092..4096).unwrap_or(&[0; 4]));
        put(&mut b, d + 8, page.get(0..8).unwrap_or(&[0; 8]));
        put(&mut b, d + 16, &off.to_le_bytes());
        put(&mut b, d + 24, &sequence.to_le_bytes());
        let s = (ds + i) * LOG_SECTOR;
        put(&mut b, s, b"data");
        put(&mut b, s + 4, &((sequence >> 32) as u32).to_le_bytes());
        put(&mut b, s + 8, page.get(8..4092).unwrap_or(&[]));
        put(&mut b, s + 4092, &(sequence as u32).to_le_bytes());
    }
    seal(&mut b, 4);
    b
}

/// Validate the entry starting at `pos` in the circular `log`.
pub fn parse_log_entry(log: &[u8], pos: u64, log_guid: &Uuid) -> Option<LogEntry> {
    let len = log.len() as u64;
    if len == 0 || !pos.is_multiple_of(LOG_SECTOR as u64) || pos >= len {
        return None;
    }
    let p = pos as usize;
    let head = log.get(p..p + 64)?;
    if &head[..4] != b"loge" || guid_at(head, 32) != *log_guid {
        return None;
    }
    let entry_len = u32_at(head, 8) as u64;
    let sequence = u64_at(head, 16);
    let count = u32_at(head, 24) as usize;
    if entry_len == 0
        || !entry_len.is_multiple_of(LOG_SECTOR as u64)
        || entry_len > len
        || sequence == 0
    {
        return None;
    }
    let ds = descriptor_sectors(count);
    if (ds as u64) * LOG_SECTOR as u64 > entry_len {
        return None;
    }
    // Copy the (possibly wrapping) entry out of the ring.
    let mut e = Vec::with_capacity(entry_len as usize);
    let first = (len - pos).min(entry_len) as usize;
    e.extend_from_slice(log.get(p..p + first)?);
    e.extend_from_slice(log.get(..entry_len as usize - first)?);
    if crc_with_hole(&e, 4) != u32_at(&e, 4) {
        return None;
    }
    // `count` is bounded by the entry length checked above; cap the reservation anyway.
    let mut ops = Vec::with_capacity(count.min(4096));
    let mut data_idx = ds;
    for i in 0..count {
        let d = 64 + 32 * i;
        let sig = e.get(d..d + 4)?;
        let file_offset = u64_at(&e, d + 16);
        if u64_at(&e, d + 24) != sequence || !file_offset.is_multiple_of(LOG_SECTOR as u64) {
            return None;
        }
        if sig == b"zero" {
            let length = u64_at(&e, d + 8);
            if !length.is_multiple_of(LOG_SECTOR as u64) {
                return None;
            }
            ops.push(LogOp::Zero {
                offset: file_offset,
                length,
            });
        } else if sig == b"desc" {
            let s = data_idx * LOG_SECTOR;
            let sector = e.get(s..s + LOG_SECTOR)?;
            let seq = ((u32_at(sector, 4) as u64) << 32) | u32_at(sector, 4092) as u64;
            if &sector[..4] != b"data" || seq != sequence {
                return None;
            }
            let mut data = Vec::with_capacity(LOG_SECTOR);
            data.extend_from_slice(e.get(d + 8..d + 16)?);
            data.extend_from_slice(&sector[8..4092]);
            data.extend_from_slice(e.get(d + 4..d + 8)?);
            ops.push(LogOp::Data {
                offset: file_offset,
                data,
            });
            data_idx += 1;
        } else {
            return None;
        }
    }
    if (data_idx * LOG_SECTOR) as u64 > entry_len {
        return None;
    }
    Some(LogEntry {
        position: pos,
        length: entry_len,
        sequence,
        tail: u32_at(head, 12) as u64,
        flushed_file_offset: u64_at(head, 48),
        last_file_offset: u64_at(head, 56),
        ops,
    })
}

/// Find the active sequence (2.3.3): the run of consecutive valid entries ending at
/// the entry with the highest sequence number, starting at that head's tail when
/// the tail lies inside the run (qemu's tails can point elsewhere; then the whole
/// run is replayed, as qemu itself does).
pub fn find_active_sequence(log: &[u8], log_guid: &Uuid) -> Vec<LogEntry> {
    find_active_sequence_bounded(log, log_guid).unwrap_or_default()
}

/// Bytes of candidate entries [`find_active_sequence_bounded`] checksums before it
/// calls the log damaged: every sector may start an entry as long as the whole log,
/// so an unbounded scan of a hostile log costs (log length)^2 / 4 KiB.
pub fn log_scan_budget(len: u64) -> u64 {
    len.saturating_mul(8).max(64 * MIB)
}

/// [`find_active_sequence`], or `Err` when the log's candidate entries would cost
/// more than [`log_scan_budget`] to checksum (no real writer produces that).
pub fn find_active_sequence_bounded(log: &[u8], log_guid: &Uuid) -> Result<Vec<LogEntry>, String> {
    let len = log.len() as u64;
    let sectors = len / LOG_SECTOR as u64;
    let mut by_pos = std::collections::HashMap::new();
    let mut budget = log_scan_budget(len);
    for s in 0..sectors {
        let pos = s * LOG_SECTOR as u64;
        let p = pos as usize;
        let Some(head) = log.get(p..p + 64) else {
            continue;
        };
        if &head[..4] != b"loge" || guid_at(head, 32) != *log_guid {
            continue;
        }
        let cost = (u32_at(head, 8) as u64).min(len);
        budget = budget.checked_sub(cost).ok_or_else(|| {
            format!(
                "the log's entry headers claim more than {} bytes to checksum",
                log_scan_budget(len)
            )
        })?;
        if let Some(e) = parse_log_entry(log, pos, log_guid) {
            by_pos.insert(e.position, e);
        }
    }
    let Some(head_pos) = by_pos
        .values()
        .max_by_key(|e| e.sequence)
        .map(|e| e.position)
    else {
        return Ok(Vec::new());
    };
    // Walk backwards through predecessors (entry ending where the next begins,
    // sequence one lower).
    let mut ends: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
    for e in by_pos.values() {
        ends.insert((e.position + e.length) % len, e.position);
    }
    let mut chain = vec![head_pos];
    let mut total = by_pos.get(&head_pos).map(|e| e.length).unwrap_or(0);
    let tail = by_pos.get(&head_pos).map(|e| e.tail).unwrap_or(0);
    while let Some(cur) = chain.last().and_then(|p| by_pos.get(p)) {
        if cur.position == tail {
            break;
        }
        let Some(prev) = ends.get(&cur.position).and_then(|p| by_pos.get(p)) else {
            break;
        };
        if prev.sequence.checked_add(1) != Some(cur.sequence) || total + prev.length > len {
            break;
        }
        total += prev.length;
        chain.push(prev.position);
    }
    chain.reverse();
    Ok(chain
        .into_iter()
        .filter_map(|p| by_pos.remove(&p))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip() {
        let h = Header {
            sequence: 7,
            file_write_guid: Uuid::new_v4(),
            data_write_guid: Uuid::new_v4(),
            log_guid: Uuid::nil(),
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: MIB,
        };
        let b = h.to_bytes();
        assert_eq!(Header::parse(&b), Some(h));
        let mut bad = b.clone();
        bad[100] ^= 1;
        assert_eq!(Header::parse(&bad), None);
    }

    #[test]
    fn log_entry_roundtrip_and_wrap() {
        let guid = Uuid::new_v4();
        let page: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let e = build_log_entry(5, 0, &guid, 1 << 30, 1 << 30, &[(3 * MIB, &page)]);
        assert_eq!(e.len(), 2 * LOG_SECTOR);
        // Place it so that it wraps around the end of a 4-sector log.
        let mut log = vec![0u8; 4 * LOG_SECTOR];
        log[3 * LOG_SECTOR..].copy_from_slice(&e[..LOG_SECTOR]);
        log[..LOG_SECTOR].copy_from_slice(&e[LOG_SECTOR..]);
        let p = parse_log_entry(&log, 3 * LOG_SECTOR as u64, &guid).unwrap();
        assert_eq!(p.sequence, 5);
        assert_eq!(
            p.ops,
            vec![LogOp::Data {
                offset: 3 * MIB,
                data: page.clone()
            }]
        );
        let seq = find_active_sequence(&log, &guid);
        assert_eq!(seq.len(), 1);
        assert!(find_active_sequence(&log, &Uuid::new_v4()).is_empty());
    }

    #[test]
    fn locator_roundtrip() {
        let kv = vec![
            ("parent_linkage".to_string(), guid_text(&Uuid::new_v4())),
            ("relative_path".to_string(), "base.vhdx".to_string()),
        ];
        let b = parent_locator_bytes(&kv);
        let (ty, back) = parse_parent_locator(&b).unwrap();
        assert_eq!(ty, VHDX_LOCATOR_TYPE);
        assert_eq!(back, kv);
    }
}
