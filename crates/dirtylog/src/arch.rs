//! The per-architecture hooks the generic dirty-log code calls.
//!
//! Mirrors the kernel's split: generic code decides *what* to protect and *when* to flush;
//! an arch knows *how* (`kvm_arch_mmu_enable_log_dirty_pt_masked`,
//! `kvm_arch_flush_remote_tlbs{,_range}`, `kvm_arch_sync_dirty_log`).

use crate::guard::MmuGuard;
use crate::memslot::Memslot;

/// An arch hook declined the request; the generic code falls back (ranged flush → full flush,
/// full flush → `KVM_REQ_TLB_FLUSH` broadcast to every vCPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsupported;

/// The hooks an architecture provides. All methods have the kernel's locking contract.
pub trait ArchMmu: Send + Sync {
    /// `CONFIG_KVM_GENERIC_DIRTYLOG_READ_PROTECT`: GET write-protects what it reports. An arch
    /// without write protection (dirty bits come from elsewhere) sets this to false and GET
    /// becomes a plain fetch-and-clear (`kvm_get_dirty_log`).
    const READ_PROTECT: bool = true;

    /// Drain hardware dirty logs (PML buffers) into the bitmap or ring before a fetch.
    /// Called with the slots lock held.
    fn sync_dirty_log(&self, _slot: &Memslot) {}

    /// Write-protect the pages `gfn_offset + i` of `slot` for every bit `i` set in `mask`, so
    /// the next write to each faults and is logged. `gfn_offset` is any offset (multiples of
    /// 64 on bitmap paths, arbitrary on the ring path). Called with the MMU lock held, which
    /// `mmu` proves. Must not flush TLBs: the caller does, after dropping the MMU lock.
    /// Returns whether any entry changed (was writable). That is for statistics only: the
    /// generic code flushes whenever it asked for protection, changed or not, because a
    /// non-writable entry does not prove that no vCPU holds a stale writable TLB entry.
    fn enable_log_dirty_pt_masked(
        &self,
        mmu: &MmuGuard<'_>,
        slot: &Memslot,
        gfn_offset: u64,
        mask: u64,
    ) -> bool;

    /// Flush every vCPU's TLB and return once none can use a stale translation.
    fn flush_remote_tlbs(&self) -> Result<(), Unsupported> {
        Err(Unsupported)
    }

    /// Flush translations of `[gfn, gfn + npages)` on every vCPU.
    fn flush_remote_tlbs_range(&self, _gfn: u64, _npages: u64) -> Result<(), Unsupported> {
        Err(Unsupported)
    }

    /// Zap every translation of a slot that is being deleted or moved
    /// (`kvm_arch_flush_shadow_memslot`), with the MMU lock held; the generic code flushes
    /// TLBs afterwards. An arch that keeps its per-slot tables in the memslot's arch data
    /// (as the reference arch does) has nothing to do: a moved slot starts with fresh data.
    fn flush_shadow_memslot(&self, _mmu: &MmuGuard<'_>, _slot: &Memslot) {}
}
