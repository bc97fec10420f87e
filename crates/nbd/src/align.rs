//! Byte-granular I/O on a sector-granular device. We advertise the logical sector
//! as the minimum block size, but clients that never asked for block sizes may still
//! send unaligned requests; those are served by read-modify-write here.
use fv_vdisk_core::{BlockDevice, Result};
use parking_lot::Mutex;

/// Zero buffer size for NO_HOLE zeroing and RMW.
const ZERO_CHUNK: u64 = 1 << 20;

pub(crate) fn sector_of(dev: &dyn BlockDevice) -> u64 {
    let s = dev.logical_sector_size() as u64;
    if s.is_power_of_two() && s <= 65536 {
        s
    } else {
        512
    }
}

fn down(x: u64, s: u64) -> u64 {
    x & !(s - 1)
}

fn up(x: u64, s: u64) -> u64 {
    x.div_ceil(s) * s
}

/// Read `buf` at any offset (range already checked against the size).
pub(crate) fn read(dev: &dyn BlockDevice, offset: u64, buf: &mut [u8]) -> Result<()> {
    let s = sector_of(dev);
    let len = buf.len() as u64;
    if offset.is_multiple_of(s) && len.is_multiple_of(s) {
        return dev.read_at(offset, buf);
    }
    let start = down(offset, s);
    let end = up(offset + len, s).min(dev.size().max(offset + len));
    let mut tmp = vec![0u8; (end - start) as usize];
    dev.read_at(start, &mut tmp)?;
    let skip = (offset - start) as usize;
    buf.copy_from_slice(&tmp[skip..skip + buf.len()]);
    Ok(())
}

/// Apply `f` to the partial sector around `offset` (RMW under `lock`).
fn patch_sector(
    dev: &dyn BlockDevice,
    lock: &Mutex<()>,
    sector_start: u64,
    s: u64,
    f: impl FnOnce(&mut [u8]),
) -> Result<()> {
    let end = (sector_start + s).min(dev.size());
    let mut tmp = vec![0u8; (end - sector_start) as usize];
    let _g = lock.lock();
    dev.read_at(sector_start, &mut tmp)?;
    f(&mut tmp);
    dev.write_at(sector_start, &tmp)
}

/// Split `[offset, offset+len)` into an unaligned head, an aligned middle and an
/// unaligned tail: (head, middle, tail) as (start, len) pairs, empty ones omitted.
type Piece = Option<(u64, u64)>;
fn split(offset: u64, len: u64, s: u64) -> (Piece, Piece, Piece) {
    let end = offset + len;
    let a = up(offset, s).min(end);
    let b = down(end, s).max(a);
    let head = (a > offset).then_some((offset, a - offset));
    let mid = (b > a).then_some((a, b - a));
    let tail = (end > b).then_some((b, end - b));
    (head, mid, tail)
}

pub(crate) fn write(
    dev: &dyn BlockDevice,
    lock: &Mutex<()>,
    offset: u64,
    data: &[u8],
) -> Result<()> {
    let s = sector_of(dev);
    let len = data.len() as u64;
    if offset.is_multiple_of(s) && len.is_multiple_of(s) {
        return dev.write_at(offset, data);
    }
    let (head, mid, tail) = split(offset, len, s);
    let slice = |o: u64, l: u64| &data[(o - offset) as usize..(o - offset + l) as usize];
    for (o, l) in [head, tail].into_iter().flatten() {
        let sec = down(o, s);
        let src = slice(o, l);
        patch_sector(dev, lock, sec, s, |b| {
            let at = (o - sec) as usize;
            b[at..at + src.len()].copy_from_slice(src);
        })?;
    }
    if let Some((o, l)) = mid {
        dev.write_at(o, slice(o, l))?;
    }
    Ok(())
}

/// Make the range read as zeros; `no_hole` forces allocation (zeros are written).
pub(crate) fn zero(
    dev: &dyn BlockDevice,
    lock: &Mutex<()>,
    offset: u64,
    len: u64,
    no_hole: bool,
) -> Result<()> {
    let s = sector_of(dev);
    let (head, mid, tail) = split(offset, len, s);
    for (o, l) in [head, tail].into_iter().flatten() {
        let sec = down(o, s);
        patch_sector(dev, lock, sec, s, |b| {
            let at = (o - sec) as usize;
            b[at..at + l as usize].fill(0);
        })?;
    }
    if let Some((o, l)) = mid {
        if no_hole {
            let zeros = vec![0u8; l.min(ZERO_CHUNK) as usize];
            let mut done = 0;
            while done < l {
                let n = (l - done).min(ZERO_CHUNK);
                dev.write_at(o + done, &zeros[..n as usize])?;
                done += n;
            }
        } else {
            dev.write_zeroes(o, l)?;
        }
    }
    Ok(())
}

/// Trim is advisory: only whole sectors are discarded.
pub(crate) fn discard(dev: &dyn BlockDevice, offset: u64, len: u64) -> Result<()> {
    let s = sector_of(dev);
    if let (_, Some((o, l)), _) = split(offset, len, s) {
        dev.discard(o, l)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::split;
    #[test]
    fn split_pieces() {
        assert_eq!(split(0, 1024, 512), (None, Some((0, 1024)), None));
        assert_eq!(
            split(100, 1000, 512),
            (Some((100, 412)), Some((512, 512)), Some((1024, 76)))
        );
        assert_eq!(split(100, 10, 512), (Some((100, 10)), None, None));
        assert_eq!(split(512, 10, 512), (None, None, Some((512, 10))));
    }
}
