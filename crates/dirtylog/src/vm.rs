//! The VM: memslots, the slots and MMU locks, capabilities, vCPUs, and the generic
//! dirty-log operations of `virt/kvm/kvm_main.c` and `virt/kvm/dirty_ring.c`.
//!
//! Lock order, as in KVM: slots lock → MMU lock. The slots lock serialises every operation
//! that write-protects a memslot or fetches its log, *including the TLB flush that follows*,
//! so no caller returns while another caller's protection is still visible through a stale
//! TLB entry. Functions that need it take a [`SlotsGuard`]; forgetting the lock does not
//! compile, and passing another VM's guard panics (our lockdep). The locks and their guards
//! live in [`guard`](crate::guard).

use crate::arch::ArchMmu;
use crate::bitmap::{dirty_bitmap_words, DirtyBitmap};
use crate::error::{Error, Result};
pub use crate::guard::{MmuGuard, SlotsGuard};
use crate::guard::{MmuLock, SlotsLock};
use crate::memslot::{
    check_region, split_slot, MemoryRegion, Memslot, MemslotSet, MrChange, KVM_MEM_READONLY,
};
use crate::ring::{check_ring_size, DirtyRing, KVM_DIRTY_RING_RSVD_ENTRIES};
use crate::sync::{lock, Arc, AtomicU32, AtomicU64, Mutex, Ordering};
use std::sync::Arc as HostArc;

use crate::vcpu::{Vcpu, KVM_REQ_DIRTY_RING_SOFT_FULL, KVM_REQ_TLB_FLUSH};

/// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`.
pub const KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: u32 = 168;
/// `KVM_CAP_DIRTY_LOG_RING`.
pub const KVM_CAP_DIRTY_LOG_RING: u32 = 192;
/// `KVM_CAP_DIRTY_LOG_RING_ACQ_REL`.
pub const KVM_CAP_DIRTY_LOG_RING_ACQ_REL: u32 = 223;
/// `KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP`.
pub const KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP: u32 = 225;
/// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`.
pub const KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE: u64 = 1 << 0;
/// `KVM_DIRTY_LOG_INITIALLY_SET`.
pub const KVM_DIRTY_LOG_INITIALLY_SET: u64 = 1 << 1;
/// `KVM_DIRTY_LOG_MANUAL_CAPS`.
pub const KVM_DIRTY_LOG_MANUAL_CAPS: u64 =
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET;

/// Static properties of a VM; the defaults are those of x86-64 KVM on our hosts.
#[derive(Debug, Clone, Copy)]
pub struct VmConfig {
    /// Bytes per page, the logging granularity (4096).
    pub page_size: u64,
    /// Address spaces (2 on x86 with SMM).
    pub nr_as: u16,
    /// `KVM_USER_MEM_SLOTS`.
    pub max_slots: u16,
    /// Whether the dirty ring capabilities are offered.
    pub ring_supported: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            page_size: 4096,
            nr_as: 2,
            max_slots: 32764,
            ring_supported: true,
        }
    }
}

/// KVM's `remote_tlb_flush_requests` / `remote_tlb_flush` statistics, plus ranged flushes.
#[derive(Debug, Default)]
pub struct VmStats {
    /// `remote_tlb_flush_requests`: calls of [`flush_remote_tlbs`](Vm::flush_remote_tlbs).
    pub remote_tlb_flush_requests: AtomicU64,
    /// `remote_tlb_flush`: full remote TLB flushes done (by the arch hook or by a
    /// `KVM_REQ_TLB_FLUSH` broadcast).
    pub remote_tlb_flush: AtomicU64,
    /// Ranged remote TLB flushes done through the arch's ranged hook.
    pub remote_tlb_flush_range: AtomicU64,
    /// Pages write-protected through `enable_log_dirty_pt_masked` (bits passed in masks).
    pub pages_protected: AtomicU64,
    /// Dirty marks dropped: a ring write with no running vCPU, or a push to a hard-full ring.
    pub dirty_marks_dropped: AtomicU64,
}

/// Deliberately broken variants of the protocol, compiled only for tests: the model check
/// must catch each of them.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mutant {
    /// The correct protocol.
    #[default]
    None,
    /// GET/CLEAR/enable-logging do not take the slots lock.
    NoSlotsLock,
    /// Flush only when this caller changed a page-table entry itself.
    FlushOnlyIfChanged,
    /// Flush before write-protecting.
    FlushBeforeProtect,
}

/// The VM.
pub struct Vm<A: ArchMmu> {
    arch: A,
    cfg: VmConfig,
    slots_lock: SlotsLock,
    /// The published memslots. Readers (vCPUs) clone the `Arc`, as KVM's SRCU readers do.
    memslots: Mutex<Arc<MemslotSet>>,
    mmu_lock: MmuLock,
    manual_dirty_log_protect: AtomicU64,
    /// Ring entries per vCPU; 0 without a ring.
    dirty_ring_entries: AtomicU32,
    /// `kvm->lock` + `kvm->vcpu_array`, published as an immutable snapshot so that flushes
    /// and ring resets iterate without allocating.
    vcpus: Mutex<HostArc<[Arc<Vcpu>]>>,
    /// Flush and logging statistics.
    pub stats: VmStats,
    #[cfg(test)]
    pub(crate) mutant: Mutant,
}

impl<A: ArchMmu> Vm<A> {
    /// A VM with no memslots and no vCPUs.
    pub fn new(arch: A, cfg: VmConfig) -> Self {
        Vm {
            arch,
            cfg,
            slots_lock: SlotsLock::new(),
            memslots: Mutex::new(Arc::new(MemslotSet::default())),
            mmu_lock: MmuLock::new(),
            manual_dirty_log_protect: AtomicU64::new(0),
            dirty_ring_entries: AtomicU32::new(0),
            vcpus: Mutex::new(HostArc::new([])),
            stats: VmStats::default(),
            #[cfg(test)]
            mutant: Mutant::None,
        }
    }

    /// The arch's part of the VM (`kvm->arch`).
    pub fn arch(&self) -> &A {
        &self.arch
    }

    /// The static properties the VM was created with.
    pub fn config(&self) -> &VmConfig {
        &self.cfg
    }

    /// Take the slots lock (`mutex_lock(&kvm->slots_lock)`).
    pub fn lock_slots(&self) -> SlotsGuard<'_> {
        #[cfg(test)]
        if self.mutant == Mutant::NoSlotsLock {
            return self.slots_lock.fake_guard();
        }
        self.slots_lock.lock()
    }

    /// Panics unless `g` is this VM's slots guard (`lockdep_assert_held`).
    pub fn assert_slots_held(&self, g: &SlotsGuard<'_>) {
        self.slots_lock.assert_held(g);
    }

    /// Take the MMU lock (`KVM_MMU_LOCK`).
    pub fn lock_mmu(&self) -> MmuGuard<'_> {
        self.mmu_lock.lock()
    }

    /// The current memslots (an SRCU-style snapshot).
    pub fn memslots(&self) -> Arc<MemslotSet> {
        lock(&self.memslots).clone()
    }

    /// The vCPUs created so far (a snapshot; cloning it does not allocate).
    pub fn vcpus(&self) -> HostArc<[Arc<Vcpu>]> {
        lock(&self.vcpus).clone()
    }

    /// Is manual protect (`KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`) on?
    pub fn manual_protect(&self) -> bool {
        self.manual_dirty_log_protect.load(Ordering::Acquire) & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
            != 0
    }

    fn manual_protect_and_init_set(&self) -> bool {
        self.manual_dirty_log_protect.load(Ordering::Acquire) == KVM_DIRTY_LOG_MANUAL_CAPS
    }

    /// Ring entries per vCPU, 0 without a ring.
    pub fn dirty_ring_entries(&self) -> u32 {
        self.dirty_ring_entries.load(Ordering::Acquire)
    }

    /// `kvm_use_dirty_bitmap`: no ring (we do not offer ring-with-bitmap).
    pub fn use_dirty_bitmap(&self) -> bool {
        self.dirty_ring_entries() == 0
    }

    /// `KVM_CHECK_EXTENSION` for the dirty-log capabilities.
    pub fn check_extension(&self, cap: u32) -> u64 {
        match cap {
            KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 => KVM_DIRTY_LOG_MANUAL_CAPS,
            KVM_CAP_DIRTY_LOG_RING | KVM_CAP_DIRTY_LOG_RING_ACQ_REL if self.cfg.ring_supported => {
                crate::ring::KVM_DIRTY_RING_MAX_ENTRIES as u64 * crate::ring::DIRTY_GFN_BYTES as u64
            }
            _ => 0,
        }
    }

    /// `KVM_ENABLE_CAP` for the dirty-log capabilities, with KVM's checks.
    pub fn enable_cap(&self, cap: u32, flags: u32, arg0: u64) -> Result<()> {
        match cap {
            KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 => {
                let allowed = if arg0 & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE != 0 {
                    KVM_DIRTY_LOG_MANUAL_CAPS
                } else {
                    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
                };
                if flags != 0 {
                    return Err(Error::InvalidCap("flags must be 0"));
                }
                if arg0 & !allowed != 0 {
                    return Err(Error::InvalidCap(
                        "INITIALLY_SET needs MANUAL_PROTECT_ENABLE, and no other bits are defined",
                    ));
                }
                self.manual_dirty_log_protect.store(arg0, Ordering::Release);
                Ok(())
            }
            KVM_CAP_DIRTY_LOG_RING | KVM_CAP_DIRTY_LOG_RING_ACQ_REL => {
                if self.check_extension(cap) == 0 {
                    return Err(Error::Unsupported("dirty ring"));
                }
                self.enable_dirty_log_ring(arg0)
            }
            KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP => Err(Error::Unsupported("dirty ring with bitmap")),
            _ => Err(Error::Unsupported("unknown capability")),
        }
    }

    /// `kvm_vm_ioctl_enable_dirty_log_ring`.
    /// The kernel takes the size as a `u32`, so `arg0` is truncated to 32 bits first.
    fn enable_dirty_log_ring(&self, arg0: u64) -> Result<()> {
        let bytes = arg0 as u32 as u64;
        let entries = check_ring_size(bytes, self.cfg.page_size, KVM_DIRTY_RING_RSVD_ENTRIES)?;
        if self.dirty_ring_entries() != 0 {
            return Err(Error::RingTooLate("the ring is already enabled"));
        }
        let vcpus = lock(&self.vcpus);
        if !vcpus.is_empty() {
            return Err(Error::RingTooLate("vCPUs already exist"));
        }
        self.dirty_ring_entries.store(entries, Ordering::Release);
        Ok(())
    }

    /// Create a vCPU (its generic part), with its ring if the VM has rings.
    pub fn create_vcpu(&self) -> Arc<Vcpu> {
        let mut vcpus = lock(&self.vcpus);
        let n = self.dirty_ring_entries();
        let ring = (n != 0).then(|| DirtyRing::new(n, KVM_DIRTY_RING_RSVD_ENTRIES));
        let v = Arc::new(Vcpu::new(vcpus.len() as u32, ring));
        *vcpus = vcpus
            .iter()
            .cloned()
            .chain(std::iter::once(v.clone()))
            .collect();
        v
    }

    /// `KVM_SET_USER_MEMORY_REGION`: create, move, delete a memslot or change its flags.
    pub fn set_user_memory_region(&self, r: &MemoryRegion) -> Result<()> {
        let g = self.lock_slots();
        let cur = self.memslots();
        let change = match check_region(
            &cur,
            r,
            self.cfg.page_size,
            self.cfg.nr_as,
            self.cfg.max_slots,
        )? {
            Some(c) => c,
            None => return Ok(()),
        };
        let (as_id, id) = split_slot(r.slot);
        let old = cur.get(as_id, id).cloned();
        if let (Some(o), MrChange::Delete | MrChange::Move) = (&old, change) {
            self.invalidate_memslot(&cur, o);
        }
        let new =
            (change != MrChange::Delete).then(|| Arc::new(self.prepare_memslot(r, old.as_deref())));
        self.publish(&cur, as_id, id, new.clone());
        self.commit_memory_region(&g, old.as_deref(), new.as_deref(), change);
        Ok(())
    }

    /// Publish `cur` with slot `(as_id, id)` replaced by `new` (or removed).
    fn publish(&self, cur: &MemslotSet, as_id: u16, id: u16, new: Option<Arc<Memslot>>) {
        let mut next = MemslotSet::default();
        for s in cur.iter() {
            next.insert(s.clone());
        }
        match new {
            Some(n) => next.insert(n),
            None => next.remove(as_id, id),
        }
        *lock(&self.memslots) = Arc::new(next);
    }

    /// Before a slot is deleted or moved, as KVM does: publish it marked invalid (vCPUs that
    /// touch it retry), zap its translations and flush every TLB. Only then may its gfns be
    /// mapped by the new slot; otherwise a stale TLB entry for an old gfn would write into
    /// whatever the new layout puts there, unlogged.
    fn invalidate_memslot(&self, cur: &MemslotSet, old: &Memslot) {
        let invalid = Memslot {
            invalid: true,
            ..old.clone_version()
        };
        self.publish(cur, old.as_id, old.id, Some(Arc::new(invalid)));
        self.arch.flush_shadow_memslot(&self.lock_mmu(), old);
        self.flush_remote_tlbs();
    }

    /// `kvm_prepare_memory_region`: decide the new slot's bitmap.
    fn prepare_memslot(&self, r: &MemoryRegion, old: Option<&Memslot>) -> Memslot {
        let (as_id, id) = split_slot(r.slot);
        let npages = r.memory_size / self.cfg.page_size;
        let logging = r.flags & crate::memslot::KVM_MEM_LOG_DIRTY_PAGES != 0;
        let dirty_bitmap = if !logging {
            None
        } else if let Some(b) = old.and_then(|o| o.dirty_bitmap.clone()) {
            Some(b)
        } else if self.use_dirty_bitmap() {
            let b = DirtyBitmap::new(npages);
            if self.manual_protect_and_init_set() {
                b.set_all();
            }
            Some(Arc::new(b))
        } else {
            None
        };
        let base_gfn = r.guest_phys_addr / self.cfg.page_size;
        let arch = match old {
            Some(o) if o.base_gfn == base_gfn => o.arch.clone(),
            _ => Default::default(),
        };
        Memslot {
            as_id,
            id,
            base_gfn,
            npages,
            userspace_addr: r.userspace_addr,
            flags: r.flags,
            dirty_bitmap,
            arch,
            invalid: false,
        }
    }

    /// `kvm_commit_memory_region` + x86's `kvm_mmu_slot_apply_flags`.
    fn commit_memory_region(
        &self,
        g: &SlotsGuard<'_>,
        old: Option<&Memslot>,
        new: Option<&Memslot>,
        change: MrChange,
    ) {
        match change {
            // Zapped and flushed by `invalidate_memslot` before the new layout was published.
            MrChange::Delete | MrChange::Move => {}
            MrChange::FlagsOnly => {
                let (Some(o), Some(n)) = (old, new) else {
                    return;
                };
                // x86's kvm_mmu_slot_apply_flags: a read-only slot cannot be dirtied, and
                // with INITIALLY_SET protection happens lazily in CLEAR.
                let readonly = n.flags & KVM_MEM_READONLY != 0;
                if !o.logging() && n.logging() && !readonly && !self.manual_protect_and_init_set() {
                    self.slot_enable_log_dirty(g, n);
                }
            }
            MrChange::Create => {}
        }
    }

    /// Write-protect a whole slot for logging and flush **unconditionally**: a
    /// non-writable entry does not prove no vCPU can write through a stale TLB entry
    /// (see the reference, known bug #5).
    fn slot_enable_log_dirty(&self, g: &SlotsGuard<'_>, slot: &Memslot) {
        self.protect_words_and_flush(g, slot, |protect| {
            for w in 0..dirty_bitmap_words(slot.npages) {
                let n = (slot.npages - w as u64 * 64).min(64);
                protect(w, if n == 64 { !0 } else { (1u64 << n) - 1 });
            }
        });
    }

    /// The shared second half of enabling logging, GET and CLEAR. Under the MMU lock,
    /// `produce` hands `(word, mask)` pairs to its argument, which write-protects those
    /// pages; then, with the MMU lock dropped but the slots lock still held, the memslot's
    /// TLB entries are flushed if any protection was asked for (changed or not).
    fn protect_words_and_flush(
        &self,
        g: &SlotsGuard<'_>,
        slot: &Memslot,
        produce: impl FnOnce(&mut dyn FnMut(usize, u64)),
    ) {
        #[cfg(test)]
        if self.mutant == Mutant::FlushBeforeProtect {
            self.flush_remote_tlbs_memslot(g, slot);
        }
        let mut flush = false;
        let mut protected = 0u64;
        {
            let mmu = self.lock_mmu();
            produce(&mut |w, mask| {
                protected += mask.count_ones() as u64;
                flush |= self.protect_masked(&mmu, slot, w as u64 * 64, mask);
            });
        }
        self.stats
            .pages_protected
            .fetch_add(protected, Ordering::Relaxed);
        #[cfg(test)]
        if self.mutant == Mutant::FlushBeforeProtect {
            flush = false;
        }
        if flush {
            self.flush_remote_tlbs_memslot(g, slot);
        }
    }

    /// `kvm_arch_mmu_enable_log_dirty_pt_masked`. Returns whether the caller must flush:
    /// always, except in a test mutant that flushes only if an entry changed.
    fn protect_masked(&self, mmu: &MmuGuard<'_>, slot: &Memslot, offset: u64, mask: u64) -> bool {
        let changed = self
            .arch
            .enable_log_dirty_pt_masked(mmu, slot, offset, mask);
        #[cfg(test)]
        if self.mutant == Mutant::FlushOnlyIfChanged {
            return changed;
        }
        let _ = changed;
        true
    }

    /// `kvm_flush_remote_tlbs`: the arch's full flush, or a `KVM_REQ_TLB_FLUSH` broadcast.
    pub fn flush_remote_tlbs(&self) {
        self.stats
            .remote_tlb_flush_requests
            .fetch_add(1, Ordering::Relaxed);
        if self.arch.flush_remote_tlbs().is_err() {
            for v in self.vcpus().iter() {
                v.make_request_and_wait(KVM_REQ_TLB_FLUSH);
            }
        }
        self.stats.remote_tlb_flush.fetch_add(1, Ordering::Relaxed);
    }

    /// `kvm_flush_remote_tlbs_range`: ranged where the arch can, else a full flush.
    pub fn flush_remote_tlbs_range(&self, gfn: u64, npages: u64) {
        if self.arch.flush_remote_tlbs_range(gfn, npages).is_ok() {
            self.stats
                .remote_tlb_flush_range
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.flush_remote_tlbs();
    }

    /// `kvm_flush_remote_tlbs_memslot`: needs the slots lock, so that the flush of one
    /// protect operation is observed by every other operation on the memslot.
    pub fn flush_remote_tlbs_memslot(&self, g: &SlotsGuard<'_>, slot: &Memslot) {
        self.assert_slots_held(g);
        self.flush_remote_tlbs_range(slot.base_gfn, slot.npages);
    }

    /// Look up a logging slot for GET/CLEAR, with KVM's checks up to the slot lookup.
    fn dirty_log_slot(&self, slot: u32) -> Result<Arc<Memslot>> {
        if !self.use_dirty_bitmap() {
            return Err(Error::RingInUse);
        }
        let (as_id, id) = self.check_slot_id(slot)?;
        self.lookup_logging_slot(as_id, id)
    }

    fn check_slot_id(&self, slot: u32) -> Result<(u16, u16)> {
        let (as_id, id) = split_slot(slot);
        if as_id >= self.cfg.nr_as || id >= self.cfg.max_slots {
            return Err(Error::InvalidSlotId { as_id, id });
        }
        Ok((as_id, id))
    }

    fn lookup_logging_slot(&self, as_id: u16, id: u16) -> Result<Arc<Memslot>> {
        let slots = self.memslots();
        let s = slots
            .get(as_id, id)
            .ok_or(Error::NoSuchSlot { as_id, id })?;
        if s.dirty_bitmap.is_none() {
            return Err(Error::LoggingDisabled { as_id, id });
        }
        Ok(s.clone())
    }

    /// `KVM_GET_DIRTY_LOG`: takes the slots lock and fetches the log of `slot` into `out`
    /// (`ALIGN(npages, 64) / 64` words at least).
    pub fn get_dirty_log(&self, slot: u32, out: &mut [u64]) -> Result<()> {
        let g = self.lock_slots();
        if A::READ_PROTECT {
            self.get_dirty_log_protect(&g, slot, out)
        } else {
            self.get_dirty_log_noprotect(&g, slot, out)
        }
    }

    fn check_out_len(memslot: &Memslot, len: usize) -> Result<()> {
        let need = dirty_bitmap_words(memslot.npages);
        if len < need {
            return Err(Error::BufferTooSmall {
                need: need * 8,
                got: len * 8,
            });
        }
        Ok(())
    }

    /// `kvm_get_dirty_log` for arches without write protection: copy the bitmap out and
    /// clear what was copied.
    pub fn get_dirty_log_noprotect(
        &self,
        g: &SlotsGuard<'_>,
        slot: u32,
        out: &mut [u64],
    ) -> Result<()> {
        self.assert_slots_held(g);
        let memslot = self.dirty_log_slot(slot)?;
        Self::check_out_len(&memslot, out.len())?;
        self.arch.sync_dirty_log(&memslot);
        let bm = memslot
            .dirty_bitmap
            .as_deref()
            .expect("checked by dirty_log_slot");
        for (i, o) in out.iter_mut().take(bm.words()).enumerate() {
            *o = bm.take_word(i);
        }
        Ok(())
    }

    /// `kvm_get_dirty_log_protect`. Without manual protect: take each non-zero word (xchg),
    /// write-protect its pages under the MMU lock, drop the MMU lock, flush the memslot's TLB
    /// entries under the slots lock, then copy out. With manual protect: a snapshot, nothing
    /// cleared, protected or flushed. The output buffer is checked before anything is
    /// cleared, so a too-small buffer loses no dirty bit (KVM would have cleared them), and
    /// words are taken straight into it (KVM stages them in a second bitmap).
    pub fn get_dirty_log_protect(
        &self,
        g: &SlotsGuard<'_>,
        slot: u32,
        out: &mut [u64],
    ) -> Result<()> {
        self.assert_slots_held(g);
        let memslot = self.dirty_log_slot(slot)?;
        Self::check_out_len(&memslot, out.len())?;
        self.arch.sync_dirty_log(&memslot);
        let bm = memslot
            .dirty_bitmap
            .as_deref()
            .expect("checked by dirty_log_slot");
        let n = bm.words();
        if self.manual_protect() {
            bm.snapshot_into(&mut out[..n]);
            return Ok(());
        }
        self.protect_words_and_flush(g, &memslot, |protect| bm.take_into(out, protect));
        Ok(())
    }

    /// `KVM_CLEAR_DIRTY_LOG`: takes the slots lock.
    pub fn clear_dirty_log(
        &self,
        slot: u32,
        first_page: u64,
        num_pages: u32,
        bitmap: &[u64],
    ) -> Result<()> {
        let g = self.lock_slots();
        self.clear_dirty_log_protect(&g, slot, first_page, num_pages, bitmap)
    }

    /// `kvm_clear_dirty_log_protect`: for each bit set in `bitmap` (bit 0 = `first_page`),
    /// atomically clear it in the log, keeping only the bits that were set, write-protect
    /// those pages, then flush under the slots lock. Checks run in KVM's order.
    pub fn clear_dirty_log_protect(
        &self,
        g: &SlotsGuard<'_>,
        slot: u32,
        first_page: u64,
        num_pages: u32,
        bitmap: &[u64],
    ) -> Result<()> {
        self.assert_slots_held(g);
        if !self.use_dirty_bitmap() {
            return Err(Error::RingInUse);
        }
        let (as_id, id) = self.check_slot_id(slot)?;
        if first_page & 63 != 0 {
            return Err(Error::MisalignedFirstPage { first_page });
        }
        let memslot = self.lookup_logging_slot(as_id, id)?;
        let num = num_pages as u64;
        let npages = memslot.npages;
        if first_page > npages
            || num > npages - first_page
            || (num < npages - first_page && num & 63 != 0)
        {
            return Err(Error::BadRange {
                first_page,
                num_pages: num,
                npages,
            });
        }
        let words = num.div_ceil(64) as usize;
        if bitmap.len() < words {
            return Err(Error::BufferTooSmall {
                need: words * 8,
                got: bitmap.len() * 8,
            });
        }
        self.arch.sync_dirty_log(&memslot);
        let bm = memslot
            .dirty_bitmap
            .as_deref()
            .expect("checked by lookup_logging_slot");
        let first_word = (first_page / 64) as usize;
        self.protect_words_and_flush(g, &memslot, |protect| {
            for (j, &user) in bitmap[..words].iter().enumerate() {
                if user == 0 {
                    continue;
                }
                let mask = bm.clear_word_bits(first_word + j, user);
                if mask != 0 {
                    protect(first_word + j, mask);
                }
            }
        });
        Ok(())
    }

    /// `mark_page_dirty_in_slot`: log a write to `slot` page `rel_gfn`, to the writing vCPU's
    /// ring when the VM has rings, else to the slot's bitmap. Returns false if the mark was
    /// dropped (a ring VM written with no vCPU, or a hard-full ring), which KVM warns about.
    pub fn mark_page_dirty_in_slot(
        &self,
        vcpu: Option<&Vcpu>,
        slot: &Memslot,
        rel_gfn: u64,
    ) -> bool {
        if !slot.logging() {
            return true;
        }
        if self.dirty_ring_entries() != 0 {
            let pushed =
                vcpu.and_then(|v| v.ring().map(|r| (v, r.push(slot.slot_word(), rel_gfn))));
            return match pushed {
                Some((v, Ok(soft_full))) => {
                    if soft_full {
                        v.make_request(KVM_REQ_DIRTY_RING_SOFT_FULL);
                    }
                    true
                }
                _ => {
                    self.stats
                        .dirty_marks_dropped
                        .fetch_add(1, Ordering::Relaxed);
                    false
                }
            };
        }
        if let Some(b) = slot.dirty_bitmap() {
            b.set(rel_gfn);
        }
        true
    }

    /// `KVM_RESET_DIRTY_RINGS`: under the slots lock, re-protect every entry userspace marked
    /// RESET, then, after dropping the slots lock, flush all TLBs once if anything was reset.
    /// Returns the number of entries reset.
    pub fn reset_dirty_rings(&self) -> Result<u32> {
        if self.dirty_ring_entries() == 0 {
            return Err(Error::NoRing);
        }
        let cleared = {
            let g = self.lock_slots();
            let slots = self.memslots();
            let mut cleared = 0u32;
            for v in self.vcpus().iter() {
                if let Some(r) = v.ring() {
                    cleared += r.reset(&g, |s, off, mask| {
                        self.reset_dirty_gfn(&slots, s, off, mask)
                    });
                }
            }
            cleared
        };
        if cleared != 0 {
            self.flush_remote_tlbs();
        }
        Ok(cleared)
    }

    /// `kvm_reset_dirty_gfn`: re-protect one coalesced batch, silently skipping a bogus slot
    /// or a range past the slot's end (userspace can write anything into the ring).
    fn reset_dirty_gfn(&self, slots: &MemslotSet, slot: u32, offset: u64, mask: u64) {
        let (as_id, id) = split_slot(slot);
        if as_id >= self.cfg.nr_as || id >= self.cfg.max_slots || mask == 0 {
            return;
        }
        let Some(memslot) = slots.get(as_id, id) else {
            return;
        };
        let last = 63 - mask.leading_zeros() as u64;
        match offset.checked_add(last) {
            Some(end) if end < memslot.npages => {}
            _ => return,
        }
        let mmu = self.lock_mmu();
        self.protect_masked(&mmu, memslot, offset, mask);
        self.stats
            .pages_protected
            .fetch_add(mask.count_ones() as u64, Ordering::Relaxed);
    }
}
