//! The per-vCPU dirty ring: KVM's entry layout, the producer (`push`), the kernel-side reset
//! walk, and the userspace harvester shared by every backend.
//!
//! Ordering, as in `virt/kvm/dirty_ring.c` with `KVM_CAP_DIRTY_LOG_RING_ACQ_REL`:
//! - producer: write `slot` and `offset`, then `flags = DIRTY` with Release;
//! - harvester: load `flags` with Acquire, read the payload, later store `RESET` with Release;
//! - reset: load `flags` with Acquire, store 0 with Release.

use crate::sync::{AtomicU32, AtomicU64, Ordering};

/// `KVM_DIRTY_GFN_F_DIRTY`.
pub const KVM_DIRTY_GFN_F_DIRTY: u32 = 1 << 0;
/// `KVM_DIRTY_GFN_F_RESET`.
pub const KVM_DIRTY_GFN_F_RESET: u32 = 1 << 1;
/// `KVM_DIRTY_GFN_F_MASK`.
pub const KVM_DIRTY_GFN_F_MASK: u32 = 0x3;
/// `KVM_DIRTY_RING_RSVD_ENTRIES` (without PML; our reference arch has none).
pub const KVM_DIRTY_RING_RSVD_ENTRIES: u32 = 64;
/// `KVM_DIRTY_RING_MAX_ENTRIES`.
pub const KVM_DIRTY_RING_MAX_ENTRIES: u32 = 65536;
/// Bytes of one entry.
pub const DIRTY_GFN_BYTES: u32 = 16;

/// `struct kvm_dirty_gfn`: 16 bytes, the kernel's layout. The fields are atomics because the
/// ring is shared memory between a producer (vCPU) and a consumer (userspace).
#[repr(C)]
#[derive(Debug, Default)]
pub struct DirtyGfn {
    /// `KVM_DIRTY_GFN_F_DIRTY` (published by the vCPU) / `KVM_DIRTY_GFN_F_RESET` (collected
    /// by userspace).
    pub flags: AtomicU32,
    /// `as_id << 16 | slot_id`.
    pub slot: AtomicU32,
    /// `gfn - base_gfn`.
    pub offset: AtomicU64,
}

#[cfg(not(loom))]
const _: () = assert!(std::mem::size_of::<DirtyGfn>() == 16);

/// Validate a ring size in bytes as `kvm_vm_ioctl_enable_dirty_log_ring` does (except the
/// set-once and no-vCPU rules, which belong to the VM).
pub fn check_ring_size(bytes: u64, page_size: u64, rsvd_entries: u32) -> Result<u32, crate::Error> {
    use crate::Error::*;
    if bytes == 0 || !bytes.is_power_of_two() {
        return Err(InvalidRingSize {
            bytes,
            why: "not a power of two",
        });
    }
    if bytes < rsvd_entries as u64 * DIRTY_GFN_BYTES as u64 || bytes < page_size {
        return Err(InvalidRingSize {
            bytes,
            why: "smaller than a page or than the reserved entries",
        });
    }
    if bytes > KVM_DIRTY_RING_MAX_ENTRIES as u64 * DIRTY_GFN_BYTES as u64 {
        return Err(RingTooBig { bytes });
    }
    Ok((bytes / DIRTY_GFN_BYTES as u64) as u32)
}

/// The kernel side of one vCPU's ring (`struct kvm_dirty_ring`).
#[derive(Debug)]
pub struct DirtyRing {
    entries: Box<[DirtyGfn]>,
    /// Written only by the owning vCPU (the single producer).
    dirty_index: AtomicU32,
    /// Written only by reset, under the slots lock.
    reset_index: AtomicU32,
    soft_limit: u32,
}

impl DirtyRing {
    /// A ring of `size` entries (a power of two, at least `rsvd`) with `rsvd` reserved entries.
    pub fn new(size: u32, rsvd: u32) -> Self {
        // A ring of exactly the reserved entries is legal and always soft-full, as in KVM.
        assert!(size.is_power_of_two() && size >= rsvd);
        DirtyRing {
            entries: (0..size).map(|_| DirtyGfn::default()).collect(),
            dirty_index: AtomicU32::new(0),
            reset_index: AtomicU32::new(0),
            soft_limit: size - rsvd,
        }
    }

    /// Number of entries.
    pub fn size(&self) -> u32 {
        self.entries.len() as u32
    }

    /// The entries, as userspace sees them through the mmap.
    pub fn entries(&self) -> &[DirtyGfn] {
        &self.entries
    }

    /// Entries pushed and not yet reset.
    pub fn used(&self) -> u32 {
        self.dirty_index
            .load(Ordering::Acquire)
            .wrapping_sub(self.reset_index.load(Ordering::Acquire))
    }

    /// `kvm_dirty_ring_soft_full`.
    pub fn soft_full(&self) -> bool {
        self.used() >= self.soft_limit
    }

    /// `kvm_dirty_ring_push`: only the owning vCPU calls this. Returns true when the ring is
    /// now soft-full, so the vCPU must exit with "ring full" before its next guest entry.
    /// Pushing to a hard-full ring is a bug in the caller (KVM warns); it is refused here.
    pub fn push(&self, slot: u32, offset: u64) -> Result<bool, RingHardFull> {
        if self.used() >= self.size() {
            return Err(RingHardFull);
        }
        let idx = self.dirty_index.load(Ordering::Relaxed);
        let e = &self.entries[(idx & (self.size() - 1)) as usize];
        e.slot.store(slot, Ordering::Relaxed);
        e.offset.store(offset, Ordering::Relaxed);
        e.flags.store(KVM_DIRTY_GFN_F_DIRTY, Ordering::Release);
        self.dirty_index
            .store(idx.wrapping_add(1), Ordering::Release);
        Ok(self.soft_full())
    }

    /// Does any not-yet-reset entry name this page? (For invariant checks in tests.)
    pub fn contains(&self, slot: u32, offset: u64) -> bool {
        let r = self.reset_index.load(Ordering::Acquire);
        let d = self.dirty_index.load(Ordering::Acquire);
        let mut i = r;
        while i != d {
            let e = &self.entries[(i & (self.size() - 1)) as usize];
            if e.flags.load(Ordering::Acquire) != 0
                && e.slot.load(Ordering::Relaxed) == slot
                && e.offset.load(Ordering::Relaxed) == offset
            {
                return true;
            }
            i = i.wrapping_add(1);
        }
        false
    }

    /// The kernel's reset walk (`kvm_dirty_ring_reset`): from `reset_index`, take every entry
    /// userspace marked RESET, in order, stopping at the first that is not; coalesce them into
    /// `(slot, offset, mask)` batches and hand each to `reset_gfn`. Returns the count reset.
    /// The caller holds the slots lock (the `_guard` proves it).
    pub fn reset(
        &self,
        _guard: &crate::guard::SlotsGuard<'_>,
        mut reset_gfn: impl FnMut(u32, u64, u64),
    ) -> u32 {
        let mut count = 0u32;
        let mut batch: Option<(u32, u64, u64)> = None;
        // Like the kernel, trust only the RESET flag (the producer may not have bumped
        // `dirty_index` yet for an entry userspace already saw), and bound the walk: at most
        // one ring's worth per call, where the kernel bounds it at INT_MAX.
        while count < self.size() {
            let idx = self.reset_index.load(Ordering::Relaxed);
            let e = &self.entries[(idx & (self.size() - 1)) as usize];
            if e.flags.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_RESET == 0 {
                break;
            }
            let slot = e.slot.load(Ordering::Relaxed);
            let offset = e.offset.load(Ordering::Relaxed);
            e.flags.store(0, Ordering::Release);
            self.reset_index
                .store(idx.wrapping_add(1), Ordering::Release);
            count += 1;
            batch = Some(match batch {
                Some((cs, co, mask)) if cs == slot => {
                    let delta = offset.wrapping_sub(co) as i64;
                    if (0..64).contains(&delta) {
                        (cs, co, mask | 1 << delta)
                    } else if delta > -64 && delta < 0 && (mask << -delta >> -delta) == mask {
                        (cs, offset, (mask << -delta) | 1)
                    } else {
                        reset_gfn(cs, co, mask);
                        (slot, offset, 1)
                    }
                }
                Some((cs, co, mask)) => {
                    reset_gfn(cs, co, mask);
                    (slot, offset, 1)
                }
                None => (slot, offset, 1),
            });
        }
        if let Some((s, o, m)) = batch {
            reset_gfn(s, o, m);
        }
        count
    }
}

/// A push to a ring with no free entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingHardFull;

/// One harvested ring entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RingEntry {
    /// `as_id << 16 | slot_id`.
    pub slot: u32,
    /// Page offset in the slot.
    pub offset: u64,
}

/// Userspace's side of one ring: a two-phase harvest. [`collect`](Self::collect) reads
/// published entries in order without giving them back; [`commit`](Self::commit) marks all
/// collected entries RESET so the next `KVM_RESET_DIRTY_RINGS` re-protects them. Pages are
/// clean only after that reset, never merely because they were collected.
#[derive(Debug, Default, Clone)]
pub struct RingHarvester {
    /// Next entry to read.
    fetch_index: u32,
    /// First entry collected but not yet committed.
    commit_index: u32,
}

impl RingHarvester {
    /// A harvester at the ring's start, as for a new vCPU (`fetch_index` 0).
    pub fn new() -> Self {
        Self::default()
    }

    /// Entries collected and not yet committed.
    pub fn pending(&self) -> u32 {
        self.fetch_index.wrapping_sub(self.commit_index)
    }

    /// Read every published entry in order, appending it to `out`; stops at the first entry
    /// whose DIRTY flag is clear. Returns the number read. `out` is the caller's reused buffer.
    pub fn collect(&mut self, ring: &[DirtyGfn], out: &mut Vec<RingEntry>) -> u32 {
        let size = ring.len() as u32;
        debug_assert!(size.is_power_of_two());
        let mut n = 0;
        loop {
            // Never run more than a ring's worth ahead of what was committed.
            if self.pending() >= size {
                break;
            }
            let e = &ring[(self.fetch_index & (size - 1)) as usize];
            if e.flags.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_MASK != KVM_DIRTY_GFN_F_DIRTY {
                break;
            }
            out.push(RingEntry {
                slot: e.slot.load(Ordering::Relaxed),
                offset: e.offset.load(Ordering::Relaxed),
            });
            self.fetch_index = self.fetch_index.wrapping_add(1);
            n += 1;
        }
        n
    }

    /// Move past `n` entries that someone else harvested and handed back (for example a bare
    /// ioctl loop a benchmark compares against), so the next [`collect`](Self::collect)
    /// starts after them. Only with nothing collected and uncommitted: otherwise returns
    /// false and does nothing.
    pub fn skip(&mut self, n: u32) -> bool {
        if self.pending() != 0 {
            return false;
        }
        self.fetch_index = self.fetch_index.wrapping_add(n);
        self.commit_index = self.fetch_index;
        true
    }

    /// Mark every collected entry RESET (Release), handing them back to the kernel's reset.
    /// Returns how many were marked; the next reset must report at least that many.
    pub fn commit(&mut self, ring: &[DirtyGfn]) -> u32 {
        let size = ring.len() as u32;
        let n = self.pending();
        while self.commit_index != self.fetch_index {
            ring[(self.commit_index & (size - 1)) as usize]
                .flags
                .store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
            self.commit_index = self.commit_index.wrapping_add(1);
        }
        n
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn size_rules() {
        assert!(check_ring_size(4096, 4096, 64).is_ok());
        assert_eq!(
            check_ring_size(4096 + 16, 4096, 64).unwrap_err().errno(),
            22
        );
        assert_eq!(check_ring_size(0, 4096, 64).unwrap_err().errno(), 22);
        assert_eq!(check_ring_size(2048, 4096, 64).unwrap_err().errno(), 22);
        assert_eq!(check_ring_size(2 << 20, 4096, 64).unwrap_err().errno(), 7);
        assert_eq!(check_ring_size(1 << 20, 4096, 64).unwrap(), 65536);
    }

    #[test]
    fn push_collect_commit_in_order() {
        let r = DirtyRing::new(256, 64);
        let mut h = RingHarvester::new();
        for i in 0..10 {
            assert_eq!(r.push(1, i * 3), Ok(false));
        }
        let mut out = Vec::new();
        assert_eq!(h.collect(r.entries(), &mut out), 10);
        assert_eq!(
            out.iter().map(|e| e.offset).collect::<Vec<_>>(),
            (0..10).map(|i| i * 3).collect::<Vec<_>>()
        );
        assert_eq!(h.collect(r.entries(), &mut out), 0, "nothing new");
        assert_eq!(r.used(), 10, "collecting alone frees nothing");
        assert_eq!(h.commit(r.entries()), 10);
    }

    #[test]
    fn skip_moves_past_entries_handed_back_elsewhere() {
        let r = DirtyRing::new(256, 64);
        let mut h = RingHarvester::new();
        for i in 0..3 {
            r.push(1, i).unwrap();
        }
        let mut out = Vec::new();
        assert_eq!(h.collect(r.entries(), &mut out), 3);
        assert!(!h.skip(1), "refused while collected entries are pending");
        h.commit(r.entries());
        for off in 10..13 {
            r.push(1, off).unwrap();
        }
        // Someone else harvests the next two entries and hands them back.
        for e in &r.entries()[3..5] {
            e.flags.store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
        }
        assert!(h.skip(2));
        out.clear();
        assert_eq!(h.collect(r.entries(), &mut out), 1);
        assert_eq!(out[0].offset, 12);
    }

    #[test]
    fn soft_full_at_size_minus_reserved() {
        let r = DirtyRing::new(256, 64);
        for i in 0..191 {
            assert_eq!(r.push(0, i), Ok(false));
        }
        assert_eq!(r.push(0, 191), Ok(true));
        for i in 192..256 {
            assert_eq!(r.push(0, i), Ok(true));
        }
        assert_eq!(r.push(0, 999), Err(RingHardFull));
    }
}
