//! The write plan shared by the crash (SIGKILL) and power-loss trials, and the
//! check that every flushed write survived.
//!
//! Write `i` of a plan covers one whole slot with content unique to `(seed, i)`.
//! Slots repeat (later writes overwrite earlier ones), so after an interruption a
//! slot must hold either its last flushed version, or one written after that flush
//! (unflushed writes may or may not have landed, but never half of one: each write
//! is a single pwrite, smaller than a FUSE request). A slot never flushed may also
//! still hold what was there before the trial.
#![allow(dead_code)]
use fv_vdisk::BlockDevice;

/// Virtual size of every trial disk.
pub const SIZE: u64 = 32 << 20;
/// The base of differencing trials holds 0xee in its first MiB, zeroes beyond.
pub const BASE_FILL: u64 = 1 << 20;

/// splitmix64: a cheap, well-mixed hash, so the child and the parent derive the same
/// plan from the seed alone.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub seed: u64,
    /// Bytes per write; also the alignment of every write.
    pub slot: u64,
    /// Percentage of writes followed by a flush: rare flushes leave many writes
    /// unflushed when the trial is cut, frequent ones cut more flushes midway.
    pub flush_pct: u64,
}

impl Plan {
    /// Slot sizes vary by seed: 4 KiB writes land inside blocks (sector bitmaps of
    /// differencing disks), 64 KiB ones cover more of a block per write.
    pub fn new(seed: u64) -> Plan {
        let slot = [4096, 16384, 65536][(mix(seed) % 3) as usize];
        let flush_pct = [30, 10, 3][(mix(seed ^ 0xf7) % 3) as usize];
        Plan {
            seed,
            slot,
            flush_pct,
        }
    }

    pub fn slots(&self) -> u64 {
        SIZE / self.slot
    }

    pub fn offset(&self, i: u64) -> u64 {
        (mix(self.seed ^ mix(i)) % self.slots()) * self.slot
    }

    pub fn data(&self, i: u64) -> Vec<u8> {
        let tag = mix(self.seed.wrapping_add(i).wrapping_mul(3)).to_le_bytes();
        (0..self.slot)
            .map(|j| tag[(j % 8) as usize] ^ (j / 512) as u8)
            .collect()
    }

    /// Whether a flush follows write `i`.
    pub fn flush_after(&self, i: u64) -> bool {
        mix(self.seed ^ mix(i ^ 0xf1)) % 100 < self.flush_pct
    }

    /// Whether the parent locator is rewritten after write `i` (differencing only).
    pub fn set_parent_after(&self, i: u64) -> bool {
        mix(self.seed ^ mix(i ^ 0x5e)).is_multiple_of(10)
    }

    /// The index of the `n`-th flush point at or after write `i` (n >= 1).
    pub fn nth_flush_from(&self, mut i: u64, n: u32) -> u64 {
        let mut seen = 0;
        loop {
            if self.flush_after(i) {
                seen += 1;
                if seen == n {
                    return i;
                }
            }
            i += 1;
        }
    }
}

/// What the trial disk held before the trial at `off` (for differencing disks, the
/// base's content shows through).
pub fn initial(differencing: bool, off: u64, buf: &mut [u8]) {
    for (k, b) in buf.iter_mut().enumerate() {
        *b = if differencing && off + (k as u64) < BASE_FILL {
            0xee
        } else {
            0
        };
    }
}

/// Check every slot touched by writes `0..issued`, of which `0..flushed` were made
/// durable by a successful flush. Returns the number of flushed writes verified
/// (slots whose surviving content is their last flushed version or newer).
pub fn verify(
    disk: &dyn BlockDevice,
    plan: &Plan,
    differencing: bool,
    flushed: u64,
    issued: u64,
) -> Result<u64, String> {
    use std::collections::BTreeMap;
    // slot offset -> write indices into it, in order.
    let mut by_slot: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for i in 0..issued {
        by_slot.entry(plan.offset(i)).or_default().push(i);
    }
    let mut got = vec![0u8; plan.slot as usize];
    let mut verified = 0;
    for (off, writes) in by_slot {
        disk.read_at(off, &mut got)
            .map_err(|e| format!("read of slot at {off} failed: {e}"))?;
        let last_flushed = writes.iter().copied().filter(|&i| i < flushed).max();
        let mut allowed: Vec<Vec<u8>> = Vec::new();
        match last_flushed {
            Some(i) => allowed.push(plan.data(i)),
            None => {
                let mut v = vec![0u8; plan.slot as usize];
                initial(differencing, off, &mut v);
                allowed.push(v);
            }
        }
        for &i in writes.iter().filter(|&&i| i >= flushed) {
            allowed.push(plan.data(i));
        }
        if !allowed.contains(&got) {
            let which = match last_flushed {
                Some(i) => format!("flushed write {i}"),
                None => "pre-trial content".into(),
            };
            return Err(format!(
                "slot at {off} ({} bytes, seed {}) holds neither {which} nor any later write \
                 (writes into it: {writes:?}; {flushed} of {issued} writes flushed; first bytes {:02x?})",
                plan.slot,
                plan.seed,
                &got[..16]
            ));
        }
        verified += last_flushed.is_some() as u64;
    }
    Ok(verified)
}
