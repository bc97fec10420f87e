//! On-disk structures of the VHD format: footer, dynamic header, parent locators.
//! Everything is big-endian; checksums are the ones' complement of the byte sum with
//! the checksum field taken as zero.

use uuid::Uuid;

pub const SECTOR: u64 = 512;
pub const FOOTER_COOKIE: &[u8; 8] = b"conectix";
pub const HEADER_COOKIE: &[u8; 8] = b"cxsparse";
pub const DISK_FIXED: u32 = 2;
pub const DISK_DYNAMIC: u32 = 3;
pub const DISK_DIFFERENCING: u32 = 4;
pub const BAT_UNUSED: u32 = 0xFFFF_FFFF;
/// Largest disk we create or open: sector offsets in the BAT are 32-bit, so the file
/// cannot exceed 2 TiB anyway.
pub const MAX_SIZE: u64 = 2 << 40;
/// Hyper-V's limit for creating VHDs (2040 GiB).
pub const MAX_CREATE_SIZE: u64 = 2040 << 30;
/// Bound on the BAT we are willing to load (64 MiB of entries).
pub const MAX_TABLE_ENTRIES: u32 = 1 << 24;
pub const MIN_BLOCK: u32 = 4096;
pub const MAX_BLOCK: u32 = 256 << 20;
/// Bound on one parent locator's data (Windows paths are at most 32767 UTF-16 units).
pub const MAX_LOCATOR_LEN: u32 = 65536;

/// Creator application written by us: "win " is what Hyper-V writes; qemu and Hyper-V
/// then both take the disk size from `current_size` instead of the CHS geometry.
pub const CREATOR_APP: &[u8; 4] = b"win ";
pub const CREATOR_VERSION: u32 = 0x000a_0000;
pub const CREATOR_HOST_WINDOWS: u32 = 0x5769_326B; // "Wi2k"

pub const PLAT_W2RU: u32 = u32::from_be_bytes(*b"W2ru");
pub const PLAT_W2KU: u32 = u32::from_be_bytes(*b"W2ku");
pub const PLAT_WI2R: u32 = u32::from_be_bytes(*b"Wi2r");
pub const PLAT_WI2K: u32 = u32::from_be_bytes(*b"Wi2k");
pub const PLAT_MAC: u32 = u32::from_be_bytes(*b"Mac ");
pub const PLAT_MACX: u32 = u32::from_be_bytes(*b"MacX");

/// Seconds between the Unix epoch and 2000-01-01 00:00:00 UTC.
pub const VHD_EPOCH: u64 = 946_684_800;

pub fn now_vhd() -> u32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(VHD_EPOCH);
    u32::try_from(secs.saturating_sub(VHD_EPOCH)).unwrap_or(u32::MAX)
}

fn be32(b: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[o..o + 4]);
    u32::from_be_bytes(a)
}
fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}
fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_be_bytes());
}

/// Ones' complement of the byte sum, skipping the 4-byte checksum field at `skip`.
pub fn checksum(b: &[u8], skip: usize) -> u32 {
    let mut sum: u32 = 0;
    for (i, &x) in b.iter().enumerate() {
        if i >= skip && i < skip + 4 {
            continue;
        }
        sum = sum.wrapping_add(u32::from(x));
    }
    !sum
}

/// CHS geometry per the VHD specification's algorithm.
pub fn chs(size: u64) -> (u16, u8, u8) {
    let mut total = size / SECTOR;
    let max = 65535u64 * 16 * 255;
    if total > max {
        total = max;
    }
    let (spt, heads, cth);
    if total >= 65535 * 16 * 63 {
        spt = 255u64;
        heads = 16u64;
        cth = total / spt;
    } else {
        let mut s = 17u64;
        let mut c = total / s;
        let mut h = c.div_ceil(1024);
        if h < 4 {
            h = 4;
        }
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    let cyl = (cth / heads).min(65535);
    (cyl as u16, heads as u8, spt as u8)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    pub features: u32,
    pub version: u32,
    pub data_offset: u64,
    pub timestamp: u32,
    pub creator_app: [u8; 4],
    pub creator_version: u32,
    pub creator_host: u32,
    pub original_size: u64,
    pub current_size: u64,
    pub geometry: (u16, u8, u8),
    pub disk_type: u32,
    pub unique_id: Uuid,
    pub saved_state: u8,
}

impl Footer {
    pub fn new(size: u64, disk_type: u32) -> Self {
        Footer {
            features: 2,
            version: 0x0001_0000,
            data_offset: if disk_type == DISK_FIXED {
                u64::MAX
            } else {
                512
            },
            timestamp: now_vhd(),
            creator_app: *CREATOR_APP,
            creator_version: CREATOR_VERSION,
            creator_host: CREATOR_HOST_WINDOWS,
            original_size: size,
            current_size: size,
            geometry: chs(size),
            disk_type,
            unique_id: Uuid::new_v4(),
            saved_state: 0,
        }
    }

    pub fn to_bytes(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..8].copy_from_slice(FOOTER_COOKIE);
        put32(&mut b, 8, self.features);
        put32(&mut b, 12, self.version);
        put64(&mut b, 16, self.data_offset);
        put32(&mut b, 24, self.timestamp);
        b[28..32].copy_from_slice(&self.creator_app);
        put32(&mut b, 32, self.creator_version);
        put32(&mut b, 36, self.creator_host);
        put64(&mut b, 40, self.original_size);
        put64(&mut b, 48, self.current_size);
        b[56..58].copy_from_slice(&self.geometry.0.to_be_bytes());
        b[58] = self.geometry.1;
        b[59] = self.geometry.2;
        put32(&mut b, 60, self.disk_type);
        b[68..84].copy_from_slice(self.unique_id.as_bytes());
        b[84] = self.saved_state;
        let c = checksum(&b, 64);
        put32(&mut b, 64, c);
        b
    }

    /// Parse and validate a footer; the error string says which field is wrong.
    pub fn parse(b: &[u8]) -> Result<Self, String> {
        if b.len() < 512 {
            return Err("footer shorter than 512 bytes".into());
        }
        let b = &b[..512];
        if &b[0..8] != FOOTER_COOKIE {
            return Err("footer cookie is not \"conectix\"".into());
        }
        let stored = be32(b, 64);
        let computed = checksum(b, 64);
        if stored != computed {
            return Err(format!(
                "footer checksum {stored:#010x} != computed {computed:#010x}"
            ));
        }
        let version = be32(b, 12);
        if version >> 16 != 1 {
            return Err(format!("unsupported footer version {version:#x}"));
        }
        let disk_type = be32(b, 60);
        if !matches!(disk_type, DISK_FIXED | DISK_DYNAMIC | DISK_DIFFERENCING) {
            return Err(format!("unsupported disk type {disk_type}"));
        }
        let current_size = be64(b, 48);
        if !current_size.is_multiple_of(SECTOR) {
            return Err(format!(
                "current size {current_size} is not a multiple of 512"
            ));
        }
        if current_size > MAX_SIZE {
            return Err(format!("current size {current_size} exceeds 2 TiB"));
        }
        let mut app = [0u8; 4];
        app.copy_from_slice(&b[28..32]);
        let mut id = [0u8; 16];
        id.copy_from_slice(&b[68..84]);
        Ok(Footer {
            features: be32(b, 8),
            version,
            data_offset: be64(b, 16),
            timestamp: be32(b, 24),
            creator_app: app,
            creator_version: be32(b, 32),
            creator_host: be32(b, 36),
            original_size: be64(b, 40),
            current_size,
            geometry: (u16::from_be_bytes([b[56], b[57]]), b[58], b[59]),
            disk_type,
            unique_id: Uuid::from_bytes(id),
            saved_state: b[84],
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocatorEntry {
    pub code: u32,
    /// Reserved space in 512-byte sectors (some writers store bytes; we only use it as a hint).
    pub data_space: u32,
    pub data_len: u32,
    pub data_offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynHeader {
    pub data_offset: u64,
    pub table_offset: u64,
    pub version: u32,
    pub max_table_entries: u32,
    pub block_size: u32,
    pub parent_id: Uuid,
    pub parent_timestamp: u32,
    /// Raw UTF-16 BE bytes of the parent unicode name (512 bytes).
    pub parent_name: Vec<u16>,
    pub locators: [LocatorEntry; 8],
}

impl DynHeader {
    pub fn to_bytes(&self) -> [u8; 1024] {
        let mut b = [0u8; 1024];
        b[0..8].copy_from_slice(HEADER_COOKIE);
        put64(&mut b, 8, self.data_offset);
        put64(&mut b, 16, self.table_offset);
        put32(&mut b, 24, self.version);
        put32(&mut b, 28, self.max_table_entries);
        put32(&mut b, 32, self.block_size);
        b[40..56].copy_from_slice(self.parent_id.as_bytes());
        put32(&mut b, 56, self.parent_timestamp);
        for (i, u) in self.parent_name.iter().take(256).enumerate() {
            b[64 + 2 * i..66 + 2 * i].copy_from_slice(&u.to_be_bytes());
        }
        for (i, l) in self.locators.iter().enumerate() {
            let o = 576 + 24 * i;
            put32(&mut b, o, l.code);
            put32(&mut b, o + 4, l.data_space);
            put32(&mut b, o + 8, l.data_len);
            put64(&mut b, o + 16, l.data_offset);
        }
        let c = checksum(&b, 36);
        put32(&mut b, 36, c);
        b
    }

    pub fn parse(b: &[u8]) -> Result<Self, String> {
        if b.len() < 1024 {
            return Err("dynamic header shorter than 1024 bytes".into());
        }
        let b = &b[..1024];
        if &b[0..8] != HEADER_COOKIE {
            return Err("dynamic header cookie is not \"cxsparse\"".into());
        }
        let stored = be32(b, 36);
        let computed = checksum(b, 36);
        if stored != computed {
            return Err(format!(
                "dynamic header checksum {stored:#010x} != computed {computed:#010x}"
            ));
        }
        let block_size = be32(b, 32);
        if !block_size.is_power_of_two() || !(MIN_BLOCK..=MAX_BLOCK).contains(&block_size) {
            return Err(format!("unsupported block size {block_size}"));
        }
        let max_table_entries = be32(b, 28);
        if max_table_entries > MAX_TABLE_ENTRIES {
            return Err(format!(
                "max table entries {max_table_entries} exceeds {MAX_TABLE_ENTRIES}"
            ));
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&b[40..56]);
        let mut name = Vec::new();
        for i in 0..256 {
            let u = u16::from_be_bytes([b[64 + 2 * i], b[65 + 2 * i]]);
            if u == 0 {
                break;
            }
            name.push(u);
        }
        let mut locators: [LocatorEntry; 8] = Default::default();
        for (i, l) in locators.iter_mut().enumerate() {
            let o = 576 + 24 * i;
            *l = LocatorEntry {
                code: be32(b, o),
                data_space: be32(b, o + 4),
                data_len: be32(b, o + 8),
                data_offset: be64(b, o + 16),
            };
        }
        Ok(DynHeader {
            data_offset: be64(b, 8),
            table_offset: be64(b, 16),
            version: be32(b, 24),
            max_table_entries,
            block_size,
            parent_id: Uuid::from_bytes(id),
            parent_timestamp: be32(b, 56),
            parent_name: name,
            locators,
        })
    }
}

pub fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

pub fn from_utf16le(b: &[u8]) -> String {
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

/// Decode a locator's data by platform code into a path string.
pub fn decode_locator(code: u32, data: &[u8]) -> Option<String> {
    match code {
        PLAT_W2RU | PLAT_W2KU => Some(from_utf16le(data)),
        PLAT_WI2R | PLAT_WI2K => {
            let end = data.iter().position(|&c| c == 0).unwrap_or(data.len());
            Some(String::from_utf8_lossy(&data[..end]).into_owned())
        }
        PLAT_MACX => {
            // A file URL in UTF-8, e.g. file://localhost/Users/x/base.vhd
            let end = data.iter().position(|&c| c == 0).unwrap_or(data.len());
            let s = String::from_utf8_lossy(&data[..end]).into_owned();
            let s = s
                .strip_prefix("file://")
                .map(|r| r.strip_prefix("localhost").unwrap_or(r).to_string());
            s.or_else(|| Some(String::from_utf8_lossy(&data[..end]).into_owned()))
        }
        // "Mac " holds a binary Mac OS alias record we cannot resolve on Linux.
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chs_matches_spec_examples() {
        // 127 GiB+ disks cap at 65535/16/255.
        assert_eq!(chs(2040 << 30), (65535, 16, 255));
        // Small disk: 17 sectors per track, at least 4 heads.
        let (c, h, s) = chs(10 << 20);
        assert_eq!((h, s), (4, 17));
        assert_eq!(c as u64, (10u64 << 20) / 512 / 17 / 4);
    }

    #[test]
    fn footer_round_trip() {
        let f = Footer::new(64 << 20, DISK_DYNAMIC);
        let b = f.to_bytes();
        assert_eq!(Footer::parse(&b).unwrap(), f);
        let mut bad = b;
        bad[100] ^= 1;
        assert!(Footer::parse(&bad).is_err());
    }
}
