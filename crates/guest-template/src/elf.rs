//! Minimal ELF64 little-endian reader: just enough to list a binary's DT_NEEDED
//! entries and PT_INTERP, and a kernel module's `.modinfo` strings. Written here
//! (rather than shelling out to readelf/modinfo) so the build needs neither
//! binutils nor kmod on the host.

/// What we need to know about one ELF file.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ElfInfo {
    pub needed: Vec<String>,
    pub interp: Option<String>,
    /// `key=value` strings from `.modinfo` (kernel modules only).
    pub modinfo: Vec<(String, String)>,
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    let s = b.get(off..off.checked_add(2)?)?;
    Some(u16::from_le_bytes(s.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes(s.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    let s = b.get(off..off.checked_add(8)?)?;
    Some(u64::from_le_bytes(s.try_into().ok()?))
}
fn cstr_at(b: &[u8], off: usize) -> Option<String> {
    let tail = b.get(off..)?;
    let end = tail.iter().position(|&c| c == 0)?;
    Some(String::from_utf8_lossy(tail.get(..end)?).into_owned())
}

struct Section {
    name_off: usize,
    kind: u32,
    offset: usize,
    size: usize,
    link: usize,
}

/// Returns `None` when the bytes are not a well-formed ELF64 LE file.
pub fn parse(b: &[u8]) -> Option<ElfInfo> {
    if b.get(0..4)? != b"\x7fELF" || *b.get(4)? != 2 || *b.get(5)? != 1 {
        return None;
    }
    let shoff = usize::try_from(u64_at(b, 0x28)?).ok()?;
    let shentsize = usize::from(u16_at(b, 0x3A)?);
    let shnum = usize::from(u16_at(b, 0x3C)?);
    let shstrndx = usize::from(u16_at(b, 0x3E)?);
    if shentsize < 64 {
        return None;
    }
    let mut secs = Vec::with_capacity(shnum);
    for i in 0..shnum {
        let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
        secs.push(Section {
            name_off: usize::try_from(u32_at(b, h)?).ok()?,
            kind: u32_at(b, h + 4)?,
            offset: usize::try_from(u64_at(b, h + 24)?).ok()?,
            size: usize::try_from(u64_at(b, h + 32)?).ok()?,
            link: usize::try_from(u32_at(b, h + 40)?).ok()?,
        });
    }
    let shstr = secs.get(shstrndx)?.offset;
    let data = |s: &Section| -> Option<&[u8]> {
        const SHT_NOBITS: u32 = 8;
        if s.kind == SHT_NOBITS {
            return Some(&[]);
        }
        b.get(s.offset..s.offset.checked_add(s.size)?)
    };
    let mut info = ElfInfo::default();
    for s in &secs {
        let name = cstr_at(b, shstr.checked_add(s.name_off)?).unwrap_or_default();
        const SHT_DYNAMIC: u32 = 6;
        if s.kind == SHT_DYNAMIC {
            let dynamic = data(s)?;
            let strtab = secs.get(s.link)?.offset;
            for e in dynamic.chunks_exact(16) {
                let tag = u64_at(e, 0)?;
                let val = usize::try_from(u64_at(e, 8)?).ok()?;
                const DT_NULL: u64 = 0;
                const DT_NEEDED: u64 = 1;
                if tag == DT_NULL {
                    break;
                }
                if tag == DT_NEEDED {
                    info.needed.push(cstr_at(b, strtab.checked_add(val)?)?);
                }
            }
        } else if name == ".interp" {
            info.interp = cstr_at(data(s)?, 0);
        } else if name == ".modinfo" {
            for kv in data(s)?.split(|&c| c == 0) {
                let kv = String::from_utf8_lossy(kv);
                if let Some((k, v)) = kv.split_once('=') {
                    info.modinfo.push((k.to_string(), v.to_string()));
                }
            }
        }
    }
    Some(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_garbage() {
        assert!(parse(b"not an elf").is_none());
        assert!(parse(b"\x7fELF\x02\x01").is_none());
    }

    #[test]
    fn reads_own_test_binary_needed() {
        // The running test binary is a dynamically linked ELF64 on Linux x86_64.
        let exe = std::env::current_exe().unwrap();
        let b = std::fs::read(exe).unwrap();
        let info = parse(&b).unwrap();
        assert!(
            info.needed.iter().any(|n| n.starts_with("libc.so")),
            "{info:?}"
        );
        assert!(info.interp.unwrap().contains("ld-linux"));
    }
}
