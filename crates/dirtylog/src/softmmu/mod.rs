//! The software-MMU reference arch: the first real user of the [`ArchMmu`] hooks.
//!
//! A [`Machine`] has vCPUs, each with its own TLB (a small direct-mapped cache of writable
//! gfn translations), a shadow page table with a writable bit per page, and guest memory.
//! A guest write goes through the TLB; on a miss it walks the shadow page table; if the page
//! is write-protected it faults: the fault marks the page dirty (bitmap or ring), makes it
//! writable and retries, exactly like a KVM write-protection fault.
//!
//! Remote TLB flushes are vCPU requests that every vCPU in guest mode must acknowledge before
//! the flush returns; vCPUs outside guest mode count as acknowledged and handle the request
//! on their next entry. A stale writable TLB entry really lets a write through without
//! faulting and without logging: that is the failure the slots-lock rule prevents, and the
//! model check in this crate's tests watches for it.
//!
//! Memory is modelled as one 64-bit word per guest page (what the dirty-log protocol writes
//! and checks), allocated per memslot on first use and keyed by the slot's `userspace_addr`,
//! so a moved slot keeps its contents as a moved KVM memslot does.

use std::collections::HashMap;

use crate::arch::{ArchMmu, Unsupported};
use crate::memslot::{Memslot, KVM_MEM_READONLY};
use crate::sync::{lock, Arc, AtomicU64, Mutex, Ordering};
// The machine handle and its RAM use std's `Arc` even under loom: reference counting is not
// part of the protocol being checked, and loom's `Arc` cannot be a method receiver.
use crate::guard::MmuGuard;
use crate::vcpu::{Vcpu, KVM_REQUEST_ARCH_BASE, KVM_REQ_TLB_FLUSH};
use crate::vm::{Vm, VmConfig};
use std::sync::Arc as HostArc;

/// Entries in each vCPU's TLB.
pub const TLB_ENTRIES: usize = 64;

/// Arch request: flush the ranges queued in the vCPU's `pending_ranges`.
const REQ_TLB_FLUSH_RANGES: u64 = 1 << KVM_REQUEST_ARCH_BASE;

/// Which remote-flush hooks the arch provides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushKind {
    /// A ranged flush and a full flush (x86 on Hyper-V, arm64 with `FEAT_TLBIRANGE`).
    Ranged,
    /// Only a full flush of its own (the MIPS case in the 2020 thread).
    FullOnly,
    /// Neither: the generic code broadcasts `KVM_REQ_TLB_FLUSH` (most arches today).
    RequestOnly,
}

/// Why a vCPU left guest mode for userspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// `KVM_EXIT_DIRTY_RING_FULL`: harvest, reset, then retry the access.
    DirtyRingFull,
    /// A write to a guest-physical address with no writable memslot.
    Mmio {
        /// The guest-physical address written.
        gpa: u64,
    },
}

/// Writable bits of one memslot's shadow page table.
#[derive(Debug)]
struct SlotSpt {
    writable: Box<[AtomicU64]>,
}

impl SlotSpt {
    fn new(npages: u64) -> Self {
        SlotSpt {
            writable: (0..npages.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    fn is_writable(&self, rel: u64) -> bool {
        self.writable[(rel / 64) as usize].load(Ordering::Acquire) >> (rel % 64) & 1 == 1
    }

    fn set_writable(&self, rel: u64) {
        self.writable[(rel / 64) as usize].fetch_or(1 << (rel % 64), Ordering::AcqRel);
    }

    /// Clear the writable bits `offset + i` for bits `i` of `mask`; true if any was set.
    fn protect(&self, offset: u64, mask: u64) -> bool {
        let mut changed = false;
        let (w, sh) = ((offset / 64) as usize, offset % 64);
        let lo = mask << sh;
        if lo != 0 {
            changed |= self.writable[w].fetch_and(!lo, Ordering::AcqRel) & lo != 0;
        }
        if sh != 0 {
            let hi = mask >> (64 - sh);
            if hi != 0 && w + 1 < self.writable.len() {
                changed |= self.writable[w + 1].fetch_and(!hi, Ordering::AcqRel) & hi != 0;
            }
        }
        changed
    }
}

/// Does the range `(first_gfn, npages)` contain `gfn`?
fn covers((first, n): (u64, u64), gfn: u64) -> bool {
    gfn >= first && gfn - first < n
}

/// Arch state of one vCPU that other threads touch: its TLB and queued range flushes.
#[derive(Debug)]
struct VcpuArch {
    generic: Arc<Vcpu>,
    /// Direct-mapped by `gfn % TLB_ENTRIES`; an entry is `gfn + 1` (0 = invalid). Only
    /// writable translations are cached, since only writes are modelled.
    tlb: Box<[AtomicU64]>,
    pending_ranges: Mutex<Vec<(u64, u64)>>,
}

impl VcpuArch {
    fn tlb_lookup(&self, gfn: u64) -> bool {
        self.tlb[(gfn % TLB_ENTRIES as u64) as usize].load(Ordering::Acquire) == gfn + 1
    }

    fn tlb_fill(&self, gfn: u64) {
        self.tlb[(gfn % TLB_ENTRIES as u64) as usize].store(gfn + 1, Ordering::Release);
    }

    fn tlb_flush_all(&self) {
        for e in self.tlb.iter() {
            e.store(0, Ordering::Release);
        }
    }

    /// Flush the queued ranges. The queue stays locked until the entries are gone, so an
    /// observer that sees an empty queue also sees the flushed TLB.
    fn tlb_flush_ranges(&self) {
        let mut ranges = lock(&self.pending_ranges);
        for e in self.tlb.iter() {
            let v = e.load(Ordering::Acquire);
            if v != 0 && ranges.iter().any(|&r| covers(r, v - 1)) {
                e.store(0, Ordering::Release);
            }
        }
        ranges.clear();
    }

    /// Can this vCPU write `gfn` through its TLB without faulting? An entry is dead if a
    /// flush covering it is pending: a requester waits for a vCPU in guest mode to leave it,
    /// and a vCPU acts on requests right after entering guest mode, before any access.
    /// Pending flushes are read *before* the entry: a vCPU empties its TLB before it retires
    /// the request, so "no flush pending" followed by "entry present" is a real stale entry.
    fn tlb_usable(&self, gfn: u64) -> bool {
        if self.generic.requests() & KVM_REQ_TLB_FLUSH != 0 {
            return false;
        }
        // A queued range is flushed before the next entry (its request bit is set right after
        // queueing, and the queue is emptied only once the entries are gone).
        if lock(&self.pending_ranges)
            .iter()
            .any(|&(g, n)| gfn >= g && gfn - g < n)
        {
            return false;
        }
        self.tlb_lookup(gfn)
    }
}

/// Queued range flushes per vCPU before a full flush is requested instead.
const MAX_PENDING_RANGES: usize = 8;

/// The arch: the vCPUs' TLBs. Shadow page tables live in each memslot's arch data, so a
/// moved or deleted slot's translations disappear with it (KVM's zap).
#[derive(Debug)]
pub struct SoftMmu {
    kind: FlushKind,
    /// Snapshot of the vCPUs, replaced when one is created, so flushes iterate without
    /// allocating.
    vcpus: Mutex<HostArc<[Arc<VcpuArch>]>>,
}

impl SoftMmu {
    fn new(kind: FlushKind) -> Self {
        SoftMmu {
            kind,
            vcpus: Mutex::new(HostArc::new([])),
        }
    }

    fn slot_spt(slot: &Memslot) -> &SlotSpt {
        slot.arch_data(|| SlotSpt::new(slot.npages))
    }

    fn existing_spt(slot: &Memslot) -> Option<&SlotSpt> {
        slot.arch_data_if_present()
    }

    fn vcpus(&self) -> HostArc<[Arc<VcpuArch>]> {
        lock(&self.vcpus).clone()
    }
}

impl ArchMmu for SoftMmu {
    fn enable_log_dirty_pt_masked(
        &self,
        _mmu: &MmuGuard<'_>,
        slot: &Memslot,
        gfn_offset: u64,
        mask: u64,
    ) -> bool {
        Self::existing_spt(slot).is_some_and(|spt| spt.protect(gfn_offset, mask))
    }

    fn flush_remote_tlbs(&self) -> Result<(), Unsupported> {
        if self.kind == FlushKind::RequestOnly {
            return Err(Unsupported);
        }
        for v in self.vcpus().iter() {
            v.generic.make_request_and_wait(KVM_REQ_TLB_FLUSH);
        }
        Ok(())
    }

    fn flush_remote_tlbs_range(&self, gfn: u64, npages: u64) -> Result<(), Unsupported> {
        if self.kind != FlushKind::Ranged {
            return Err(Unsupported);
        }
        for v in self.vcpus().iter() {
            let req = {
                let mut q = lock(&v.pending_ranges);
                if q.contains(&(gfn, npages)) {
                    REQ_TLB_FLUSH_RANGES
                } else if q.len() < MAX_PENDING_RANGES {
                    q.push((gfn, npages));
                    REQ_TLB_FLUSH_RANGES
                } else {
                    // An idle vCPU collecting many ranges: flush everything instead.
                    KVM_REQ_TLB_FLUSH
                }
            };
            v.generic.make_request_and_wait(req);
        }
        Ok(())
    }
}

/// A VM on the reference arch, with its guest memory.
#[derive(Debug)]
pub struct Machine {
    vm: Vm<SoftMmu>,
    ram: Mutex<HashMap<u64, HostArc<[AtomicU64]>>>,
}

impl std::fmt::Debug for Vm<SoftMmu> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("config", self.config())
            .finish_non_exhaustive()
    }
}

impl Machine {
    /// A machine with the given flush hooks and VM configuration.
    pub fn new(kind: FlushKind, cfg: VmConfig) -> HostArc<Machine> {
        let arch = SoftMmu::new(kind);
        HostArc::new(Machine {
            vm: Vm::new(arch, cfg),
            ram: Mutex::new(HashMap::new()),
        })
    }

    /// A machine running a deliberately broken protocol variant (tests only).
    #[cfg(test)]
    pub(crate) fn with_mutant(
        kind: FlushKind,
        cfg: VmConfig,
        mutant: crate::vm::Mutant,
    ) -> HostArc<Machine> {
        let arch = SoftMmu::new(kind);
        let mut vm = Vm::new(arch, cfg);
        vm.mutant = mutant;
        HostArc::new(Machine {
            vm,
            ram: Mutex::new(HashMap::new()),
        })
    }

    /// The VM: memslots, capabilities, GET/CLEAR/ring reset.
    pub fn vm(&self) -> &Vm<SoftMmu> {
        &self.vm
    }

    /// Create a vCPU. Its handle is meant for one thread; other threads reach it through
    /// requests.
    pub fn create_vcpu(self: &HostArc<Self>) -> SoftVcpu {
        let generic = self.vm.create_vcpu();
        let arch = Arc::new(VcpuArch {
            generic: generic.clone(),
            tlb: (0..TLB_ENTRIES).map(|_| AtomicU64::new(0)).collect(),
            pending_ranges: Mutex::new(Vec::new()),
        });
        let mut vcpus = lock(&self.vm.arch().vcpus);
        *vcpus = vcpus
            .iter()
            .cloned()
            .chain(std::iter::once(arch.clone()))
            .collect();
        drop(vcpus);
        SoftVcpu {
            m: self.clone(),
            arch,
        }
    }

    fn memory(&self, slot: &Memslot) -> HostArc<[AtomicU64]> {
        let mut ram = lock(&self.ram);
        let e = ram
            .entry(slot.userspace_addr)
            .or_insert_with(|| (0..slot.npages).map(|_| AtomicU64::new(0)).collect());
        if (e.len() as u64) < slot.npages {
            let mut v: Vec<AtomicU64> = e
                .iter()
                .map(|w| AtomicU64::new(w.load(Ordering::Acquire)))
                .collect();
            v.extend((e.len() as u64..slot.npages).map(|_| AtomicU64::new(0)));
            *e = v.into();
        }
        e.clone()
    }

    /// Read the word of guest page `gpa / page_size` as the host sees it (0 if never written
    /// or outside every slot).
    pub fn read_u64(&self, gpa: u64) -> u64 {
        let gfn = gpa / self.vm.config().page_size;
        let slots = self.vm.memslots();
        match slots.find_gfn(0, gfn) {
            Some(s) => self.memory(s)[(gfn - s.base_gfn) as usize].load(Ordering::Acquire),
            None => 0,
        }
    }

    /// Host-side aging of one page (`kvm_age_gfn` with x86 access tracking, when the hardware
    /// has no accessed/dirty bits): the shadow entry loses its writable bit so the next access
    /// can be seen, but TLBs are *not* flushed, since a stale entry only costs aging accuracy.
    /// This is why enabling logging must flush even when it changed no entry (known bug #5).
    pub fn age_gfn(&self, gfn: u64) {
        let slots = self.vm.memslots();
        let Some(slot) = slots.find_gfn(0, gfn) else {
            return;
        };
        let _mmu = self.vm.lock_mmu();
        if let Some(spt) = SoftMmu::existing_spt(slot) {
            spt.protect(gfn - slot.base_gfn, 1);
        }
    }

    /// Can any vCPU write `gfn` through a TLB entry without faulting (an entry that no
    /// pending flush request will remove before the vCPU's next guest access)?
    pub fn tlb_has_writable(&self, gfn: u64) -> bool {
        self.vm.arch().vcpus().iter().any(|v| v.tlb_usable(gfn))
    }

    /// Is `gfn` writable in the shadow page table?
    pub fn spte_writable(&self, gfn: u64) -> bool {
        let slots = self.vm.memslots();
        let Some(slot) = slots.find_gfn(0, gfn) else {
            return false;
        };
        SoftMmu::existing_spt(slot).is_some_and(|s| s.is_writable(gfn - slot.base_gfn))
    }

    /// The invariant the slots-lock rule protects, for page `gfn` of a logging slot: it is
    /// dirty in the log (bitmap bit, or a ring entry not yet reset), or it is write-protected
    /// with no writable TLB entry on any vCPU. Taken under the MMU lock so that no fault is
    /// half-way through "mark dirty, make writable".
    pub fn page_tracked(&self, gfn: u64) -> bool {
        let slots = self.vm.memslots();
        let Some(slot) = slots.find_gfn(0, gfn) else {
            return true;
        };
        if !slot.logging() {
            return true;
        }
        let _mmu = self.vm.lock_mmu();
        let rel = gfn - slot.base_gfn;
        let dirty = match slot.dirty_bitmap() {
            Some(b) => b.test(rel),
            None => self
                .vm
                .vcpus()
                .iter()
                .any(|v| v.ring().is_some_and(|r| r.contains(slot.slot_word(), rel))),
        };
        let writable = SoftMmu::existing_spt(slot).is_some_and(|s| s.is_writable(rel));
        dirty || (!writable && !self.tlb_has_writable(gfn))
    }
}

/// A vCPU of a [`Machine`]; its methods run on the vCPU's own thread.
#[derive(Debug)]
pub struct SoftVcpu {
    m: HostArc<Machine>,
    arch: Arc<VcpuArch>,
}

enum Access {
    Done,
    Fault,
    /// The slot is being deleted or moved (`KVM_MEMSLOT_INVALID`): retry, as KVM's
    /// `RET_PF_RETRY`, until the new layout is published.
    Retry,
}

impl SoftVcpu {
    /// The generic vCPU (id, requests, ring).
    pub fn generic(&self) -> &Arc<Vcpu> {
        &self.arch.generic
    }

    /// Enter guest mode, first acting on pending requests (TLB flushes, ring soft-full).
    fn enter(&self) -> Result<(), Exit> {
        loop {
            let req = self.arch.generic.enter_guest();
            if req == 0 {
                return Ok(());
            }
            if req & KVM_REQ_TLB_FLUSH != 0 {
                self.arch.tlb_flush_all();
                self.arch.generic.clear_request(KVM_REQ_TLB_FLUSH);
            }
            if req & REQ_TLB_FLUSH_RANGES != 0 {
                self.arch.generic.clear_request(REQ_TLB_FLUSH_RANGES);
                self.arch.tlb_flush_ranges();
            }
            if self.arch.generic.dirty_ring_check_request() {
                return Err(Exit::DirtyRingFull);
            }
        }
    }

    /// One guest instruction writing `val` to the page of `gpa`: TLB, then page walk, then a
    /// write-protection fault if needed. On `Err(DirtyRingFull)` the write has not happened;
    /// call again after the ring was harvested and reset, as KVM re-executes it.
    pub fn write_u64(&self, gpa: u64, val: u64) -> Result<(), Exit> {
        let gfn = gpa / self.m.vm.config().page_size;
        loop {
            self.enter()?;
            let r = self.access(gfn, val);
            self.arch.generic.exit_guest();
            match r? {
                Access::Done => return Ok(()),
                Access::Fault => self.write_fault(gfn)?,
                Access::Retry => crate::sync::spin_wait(),
            }
        }
    }

    /// In guest mode: the memory access itself.
    fn access(&self, gfn: u64, val: u64) -> Result<Access, Exit> {
        let slots = self.m.vm.memslots();
        let slot = slots.find_gfn(0, gfn).ok_or(Exit::Mmio {
            gpa: gfn * self.m.vm.config().page_size,
        })?;
        if slot.invalid {
            return Ok(Access::Retry);
        }
        let rel = gfn - slot.base_gfn;
        if !self.arch.tlb_lookup(gfn) {
            let spt = SoftMmu::slot_spt(slot);
            if !spt.is_writable(rel) {
                return Ok(Access::Fault);
            }
            self.arch.tlb_fill(gfn);
        }
        self.m.memory(slot)[rel as usize].store(val, Ordering::Release);
        Ok(Access::Done)
    }

    /// The write-protection fault handler, outside guest mode: under the MMU lock, log the
    /// page, then make it writable (in that order, so a fetch never sees writable-but-clean).
    fn write_fault(&self, gfn: u64) -> Result<(), Exit> {
        let gpa = gfn * self.m.vm.config().page_size;
        let slots = self.m.vm.memslots();
        let slot = slots.find_gfn(0, gfn).ok_or(Exit::Mmio { gpa })?;
        if slot.invalid {
            return Ok(());
        }
        if slot.flags & KVM_MEM_READONLY != 0 {
            return Err(Exit::Mmio { gpa });
        }
        let spt = SoftMmu::slot_spt(slot);
        let rel = gfn - slot.base_gfn;
        let _mmu = self.m.vm.lock_mmu();
        if !spt.is_writable(rel) {
            self.m
                .vm
                .mark_page_dirty_in_slot(Some(&self.arch.generic), slot, rel);
            spt.set_writable(rel);
        }
        Ok(())
    }
}

#[cfg(all(feature = "harness", not(loom)))]
mod perf;
#[cfg(all(feature = "harness", not(loom)))]
mod selftest;
#[cfg(all(feature = "harness", not(loom)))]
mod shared;
#[cfg(all(feature = "harness", not(loom)))]
pub use perf::SoftmmuPerf;
#[cfg(all(feature = "harness", not(loom)))]
pub use selftest::SoftmmuSelftest;
