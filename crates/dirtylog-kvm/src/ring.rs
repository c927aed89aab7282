//! Per-vCPU dirty rings: the shared mapping of each vCPU's `struct kvm_dirty_gfn` array, and a
//! harvester over all of a VM's rings built on the core's [`RingHarvester`].
//!
//! The ring is mapped from the vCPU fd at `KVM_DIRTY_LOG_PAGE_OFFSET * host page size`,
//! `MAP_SHARED` and `PROT_READ | PROT_WRITE` (the kernel refuses private or executable
//! mappings). It is viewed as `&[DirtyGfn]`, whose fields are atomics: KVM writes entries
//! concurrently, the harvester reads flags with Acquire and writes RESET with Release.
//!
//! A harvest is two-phase, as in the kernel's selftest and QEMU: collect every published entry
//! of every ring, then mark them all RESET, then one `KVM_RESET_DIRTY_RINGS`, whose count must
//! cover what was marked. Only after the reset are the harvested pages write-protected again.

use std::os::unix::io::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use dirtylog::ring::{DirtyGfn, RingEntry, RingHarvester, DIRTY_GFN_BYTES};
use kvm_ioctls::VmFd;

use crate::error::{Error, Op, Result};
use crate::sys;

/// One vCPU's ring, mapped. Unmapped on drop.
#[derive(Debug)]
pub struct RingMap {
    ptr: NonNull<DirtyGfn>,
    entries: u32,
}

// SAFETY: the mapping is shared memory accessed only through `DirtyGfn`'s atomics.
unsafe impl Send for RingMap {}
// SAFETY: as above.
unsafe impl Sync for RingMap {}

impl RingMap {
    /// Map the ring of `entries` entries (a power of two, as enabled on the VM) of a vCPU fd.
    pub fn map(vcpu: &impl AsRawFd, entries: u32) -> Result<Self> {
        if !entries.is_power_of_two() {
            return Err(Error::Config(format!(
                "ring of {entries} entries is not a power of two"
            )));
        }
        let len = entries as usize * DIRTY_GFN_BYTES as usize;
        let offset = sys::KVM_DIRTY_LOG_PAGE_OFFSET * sys::host_page_size();
        // SAFETY: a new shared mapping of the vCPU fd's ring pages at an address the kernel
        // chooses; it aliases no Rust object. `MAP_POPULATE` maps every page now, so the first
        // harvest to reach a page does not pay its fault.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                vcpu.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::last(Op::MmapRing));
        }
        let ptr = NonNull::new(p.cast::<DirtyGfn>()).ok_or(Error::Kvm {
            op: Op::MmapRing,
            errno: libc::ENOMEM,
        })?;
        Ok(RingMap { ptr, entries })
    }

    /// Number of entries.
    pub fn len(&self) -> u32 {
        self.entries
    }

    /// Always false: a ring has at least one page of entries.
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Is the entry at ring index `idx` (taken modulo the size) published by KVM and not yet
    /// handed back (flags DIRTY, not RESET)?
    pub fn is_published(&self, idx: u32) -> bool {
        let e = &self.entries()[(idx & (self.entries - 1)) as usize];
        e.flags.load(Ordering::Acquire) & dirtylog::ring::KVM_DIRTY_GFN_F_MASK
            == dirtylog::ring::KVM_DIRTY_GFN_F_DIRTY
    }

    /// The entries as KVM lays them out.
    pub fn entries(&self) -> &[DirtyGfn] {
        // SAFETY: the mapping holds `entries` contiguous 16-byte `kvm_dirty_gfn`s, page aligned,
        // and lives as long as `self`. `DirtyGfn` is `repr(C)` with the same layout and only
        // atomic fields, so concurrent writes by KVM are not data races on the Rust side.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.entries as usize) }
    }
}

impl Drop for RingMap {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `map`; `entries()` borrows `self`,
        // so no reference into it survives.
        unsafe {
            libc::munmap(
                self.ptr.as_ptr().cast(),
                self.entries as usize * DIRTY_GFN_BYTES as usize,
            )
        };
    }
}

/// What one [`DirtyRings::harvest`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HarvestStats {
    /// Entries collected (and handed back) per vCPU.
    pub per_vcpu: Vec<u32>,
    /// Per vCPU, the last entry collected in this harvest.
    pub last: Vec<Option<RingEntry>>,
    /// Per vCPU, whether the harvest found the ring completely full (as many entries as it
    /// has). KVM must exit with `KVM_EXIT_DIRTY_RING_FULL` while 64 entries are still free; a
    /// full ring means it did not, and the next push overwrote an unharvested entry.
    pub full: Vec<bool>,
    /// Sum of `per_vcpu`.
    pub collected: u64,
    /// What `KVM_RESET_DIRTY_RINGS` reported (0 if nothing was collected and no reset ran).
    pub reset: u64,
}

/// What one [`DirtyRings::harvest_each`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingsHarvested {
    /// Entries collected (and handed back), all rings.
    pub collected: u64,
    /// What `KVM_RESET_DIRTY_RINGS` reported (0 if nothing was collected and no reset ran).
    pub reset: u64,
}

/// One vCPU's ring and how far it has been harvested, for watching its fill level from
/// another thread (see a ring watchdog (as `dirtylog-testvm`'s runner has)).
#[derive(Debug, Clone)]
pub struct RingWatch {
    /// The ring.
    pub ring: Arc<RingMap>,
    /// Entries harvested so far (wrapping): the ring index of the next entry to harvest.
    pub harvested: Arc<AtomicU32>,
}

impl RingWatch {
    /// Does the ring hold at least `n` (≥ 1) published entries not yet harvested?
    pub fn holds_at_least(&self, n: u32) -> bool {
        n > 0
            && self
                .ring
                .is_published(self.harvested.load(Ordering::Acquire).wrapping_add(n - 1))
    }
}

/// The rings of every vCPU of one VM, with one harvester each.
#[derive(Debug, Default)]
pub struct DirtyRings {
    rings: Vec<(Arc<RingMap>, RingHarvester, Arc<AtomicU32>)>,
    scratch: Vec<RingEntry>,
}

impl DirtyRings {
    /// No rings yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add the next vCPU's ring (vCPU indexes follow the order of `push`).
    pub fn push(&mut self, ring: Arc<RingMap>) {
        // A collection appends at most one ring's worth: no harvest allocates.
        let len = ring.len() as usize;
        self.scratch.reserve(len.saturating_sub(self.scratch.len()));
        self.rings
            .push((ring, RingHarvester::new(), Arc::new(AtomicU32::new(0))));
    }

    /// Watch handles of every ring, in vCPU order.
    pub fn watches(&self) -> Vec<RingWatch> {
        self.rings
            .iter()
            .map(|(r, _, h)| RingWatch {
                ring: r.clone(),
                harvested: h.clone(),
            })
            .collect()
    }

    /// Number of rings.
    pub fn len(&self) -> usize {
        self.rings.len()
    }

    /// No rings?
    pub fn is_empty(&self) -> bool {
        self.rings.is_empty()
    }

    /// Entries collected but not yet handed back, over all rings (0 between harvests).
    pub fn pending(&self) -> u64 {
        self.rings.iter().map(|(_, h, _)| h.pending() as u64).sum()
    }

    /// Collect every published entry of every ring, in order, giving each to
    /// `sink(vcpu_index, entry)`; then mark them all RESET; then `KVM_RESET_DIRTY_RINGS` on
    /// `vm`, checking that the kernel reset at least as many entries as were handed back.
    /// After this returns, every harvested page is write-protected again.
    pub fn harvest(
        &mut self,
        vm: &VmFd,
        sink: impl FnMut(usize, RingEntry),
    ) -> Result<HarvestStats> {
        let mut st = self.collect(sink);
        st.reset = self.commit_and_reset(vm)?;
        Ok(st)
    }

    /// [`harvest`](Self::harvest) without allocating, in one pass per ring as QEMU's reaper
    /// does: each published entry is given to `sink(vcpu_index, entry)` and marked RESET at
    /// once, then one `KVM_RESET_DIRTY_RINGS` covers them all (the kernel re-protects only
    /// then, so `sink` has recorded every page before it can be written again). Entries an
    /// earlier [`collect`](Self::collect) left uncommitted are handed back too. A ring found
    /// completely full (KVM went past its hard limit and may have overwritten entries) is
    /// [`Error::RingOverflow`], reported after the reset so that no vCPU stays blocked.
    pub fn harvest_each(
        &mut self,
        vm: &VmFd,
        mut sink: impl FnMut(usize, RingEntry),
    ) -> Result<RingsHarvested> {
        let mut collected = 0u64;
        let mut committed = 0u64;
        let mut overflow = None;
        for (i, (map, h, pos)) in self.rings.iter_mut().enumerate() {
            let ring = map.entries();
            let size = map.len();
            committed += u64::from(h.commit(ring));
            // `pos` is the harvester's fetch index (collect and skip advance both).
            let start = pos.load(Ordering::Relaxed);
            let mut n = 0u32;
            while n < size {
                let e = &ring[(start.wrapping_add(n) & (size - 1)) as usize];
                if e.flags.load(Ordering::Acquire) & dirtylog::ring::KVM_DIRTY_GFN_F_MASK
                    != dirtylog::ring::KVM_DIRTY_GFN_F_DIRTY
                {
                    break;
                }
                sink(
                    i,
                    RingEntry {
                        slot: e.slot.load(Ordering::Relaxed),
                        offset: e.offset.load(Ordering::Relaxed),
                    },
                );
                e.flags
                    .store(dirtylog::ring::KVM_DIRTY_GFN_F_RESET, Ordering::Release);
                n += 1;
            }
            if n == size && overflow.is_none() {
                overflow = Some(i);
            }
            // Nothing is pending after the commit above, so the skip always applies.
            let skipped = h.skip(n);
            debug_assert!(skipped);
            // Only `&mut self` writes `pos`: a store publishes the new position.
            pos.store(start.wrapping_add(n), Ordering::Release);
            collected += u64::from(n);
            committed += u64::from(n);
        }
        let reset = reset_at_least(vm, committed)?;
        if let Some(vcpu) = overflow {
            return Err(Error::RingOverflow {
                vcpu: vcpu as u32,
                detail: format!(
                    "a harvest found all {} entries in use",
                    self.rings[vcpu].0.len()
                ),
            });
        }
        Ok(RingsHarvested { collected, reset })
    }

    /// The first phase of [`harvest`](Self::harvest) on its own: collect every published
    /// entry of every ring, in order, giving each to `sink(vcpu_index, entry)`, without
    /// handing anything back. The pages stay dirty (and the entries in use) until
    /// [`commit_and_reset`](Self::commit_and_reset). `reset` of the result is 0.
    pub fn collect(&mut self, mut sink: impl FnMut(usize, RingEntry)) -> HarvestStats {
        let n = self.rings.len();
        let mut st = HarvestStats {
            per_vcpu: vec![0; n],
            last: vec![None; n],
            full: vec![false; n],
            ..Default::default()
        };
        for (i, (map, h, pos)) in self.rings.iter_mut().enumerate() {
            self.scratch.clear();
            let got = h.collect(map.entries(), &mut self.scratch);
            pos.fetch_add(got, Ordering::Release);
            st.per_vcpu[i] = got;
            // Counted from the last commit: entries collected earlier but not yet handed
            // back occupy the ring too.
            st.full[i] = h.pending() >= map.len();
            st.last[i] = self.scratch.last().copied();
            st.collected += got as u64;
            for e in self.scratch.iter() {
                sink(i, *e);
            }
        }
        st
    }

    /// The second phase of [`harvest`](Self::harvest): mark every collected entry RESET,
    /// then `KVM_RESET_DIRTY_RINGS` on `vm` until the kernel has reset at least as many
    /// entries as were marked ([`Error::ResetShort`] otherwise). Returns what the kernel
    /// reported; 0 without a call when nothing was pending.
    pub fn commit_and_reset(&mut self, vm: &VmFd) -> Result<u64> {
        let mut committed = 0u64;
        for (map, h, _) in self.rings.iter_mut() {
            committed += h.commit(map.entries()) as u64;
        }
        reset_at_least(vm, committed)
    }

    /// vCPU `i`'s ring, if there is one.
    pub fn map(&self, i: usize) -> Option<&Arc<RingMap>> {
        self.rings.get(i).map(|(m, _, _)| m)
    }

    /// The ring index (wrapping) of the next entry of ring `i` to harvest.
    pub fn position(&self, i: usize) -> Option<u32> {
        self.rings
            .get(i)
            .map(|(_, _, pos)| pos.load(Ordering::Acquire))
    }

    /// Does any ring hold at least `n` (≥ 1) published entries not yet collected?
    pub fn any_holds_at_least(&self, n: u32) -> bool {
        n > 0
            && self.rings.iter().any(|(map, _, pos)| {
                map.is_published(pos.load(Ordering::Acquire).wrapping_add(n - 1))
            })
    }

    /// Record that the next `n` entries of ring `i` were harvested and reset by someone else
    /// (a bare harvest driving the ring directly, as the perf comparison does), so the next
    /// [`collect`](Self::collect) starts after them and the watchdog measures the fill level
    /// from there. Refused while this harvester has collected entries not yet committed.
    pub fn skip(&mut self, i: usize, n: u32) -> Result<()> {
        let Some((_, h, pos)) = self.rings.get_mut(i) else {
            return Err(Error::Config(format!("no ring for vCPU {i}")));
        };
        if !h.skip(n) {
            return Err(Error::Config(format!(
                "ring {i} has {} collected entries not yet handed back",
                h.pending()
            )));
        }
        pos.fetch_add(n, Ordering::Release);
        Ok(())
    }
}

/// `KVM_RESET_DIRTY_RINGS` until the kernel has reset at least `committed` entries
/// ([`Error::ResetShort`] otherwise). Returns what it reported; 0 without a call when
/// `committed` is 0.
fn reset_at_least(vm: &VmFd, committed: u64) -> Result<u64> {
    if committed == 0 {
        return Ok(0);
    }
    // One call normally resets everything; a kernel that stops early (signal, batch bound)
    // is called again until it makes no progress.
    let mut reset = 0u64;
    while reset < committed {
        let r = u64::from(sys::reset_dirty_rings(vm)?);
        if r == 0 {
            break;
        }
        reset += r;
    }
    if reset < committed {
        return Err(Error::ResetShort { committed, reset });
    }
    Ok(reset)
}
