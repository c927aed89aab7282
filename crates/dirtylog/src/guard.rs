//! The VM's two locks and the guards that prove they are held.
//!
//! KVM documents its locking in comments and checks it at run time with lockdep
//! (`lockdep_assert_held(&kvm->slots_lock)`); here the proof is a value. A function that must
//! run under a lock takes the lock's guard as an argument, so calling it without the lock does
//! not compile, and passing the guard of another VM's lock panics (the part lockdep checks at
//! run time stays a run-time check).
//!
//! Lock order, as in KVM: slots lock, then MMU lock.
//!
//! - [`SlotsGuard`] proves `kvm->slots_lock` is held. It serialises every operation that
//!   write-protects a memslot or fetches its log (enabling logging, GET, CLEAR, ring reset,
//!   memslot updates), **including the TLB flush that follows**, so that no caller returns
//!   while another caller's protection is still visible through a stale TLB entry.
//! - [`MmuGuard`] proves `kvm->mmu_lock` (`KVM_MMU_LOCK`) is held. It serialises changes to
//!   the arch's page tables ([`ArchMmu`](crate::ArchMmu) hooks such as
//!   `enable_log_dirty_pt_masked`); it is dropped before the remote TLB flush.
//!
//! Neither guard is `Send` or `Sync`: a guard stays on the thread that locked, as a kernel
//! mutex is released by its owner.
//!
//! This module depends only on [`sync`](crate::sync), so the VM (which holds the locks) and
//! the arch hooks and rings (which demand the guards) all depend on it and not on each other.

use std::cell::Cell;
use std::marker::PhantomData;

use crate::sync::{lock, Mutex, MutexGuard};

/// `kvm->slots_lock`: the mutex behind [`SlotsGuard`].
#[derive(Debug)]
pub(crate) struct SlotsLock(Mutex<()>);

impl SlotsLock {
    pub(crate) fn new() -> Self {
        SlotsLock(Mutex::new(()))
    }

    /// An identity for lockdep-style checks: the lock's address.
    fn id(&self) -> usize {
        &self.0 as *const Mutex<()> as usize
    }

    /// `mutex_lock(&kvm->slots_lock)`.
    pub(crate) fn lock(&self) -> SlotsGuard<'_> {
        SlotsGuard {
            _g: Some(lock(&self.0)),
            owner: self.id(),
            _not_sync: PhantomData,
        }
    }

    /// A guard that proves nothing: only for the test mutant that "forgets" the lock, which
    /// the model check must catch.
    #[cfg(test)]
    pub(crate) fn fake_guard(&self) -> SlotsGuard<'_> {
        SlotsGuard {
            _g: None,
            owner: self.id(),
            _not_sync: PhantomData,
        }
    }

    /// `lockdep_assert_held(&kvm->slots_lock)`: panics unless `g` was taken on this lock.
    pub(crate) fn assert_held(&self, g: &SlotsGuard<'_>) {
        assert_eq!(
            g.owner,
            self.id(),
            "slots lock of another VM passed as proof"
        );
    }
}

/// `kvm->mmu_lock`: the mutex behind [`MmuGuard`].
#[derive(Debug)]
pub(crate) struct MmuLock(Mutex<()>);

impl MmuLock {
    pub(crate) fn new() -> Self {
        MmuLock(Mutex::new(()))
    }

    /// `KVM_MMU_LOCK(kvm)`.
    pub(crate) fn lock(&self) -> MmuGuard<'_> {
        MmuGuard {
            _g: lock(&self.0),
            _not_sync: PhantomData,
        }
    }
}

/// Proof that the slots lock of one VM is held (`lockdep_assert_held(&kvm->slots_lock)`).
///
/// Taken by [`Vm::lock_slots`](crate::Vm::lock_slots); demanded by every operation that
/// write-protects a memslot or fetches its log and by the remote TLB flush of a memslot, which
/// must complete before the lock is released. Not `Send` or `Sync`: it stays on the thread
/// that locked.
pub struct SlotsGuard<'a> {
    _g: Option<MutexGuard<'a, ()>>,
    owner: usize,
    _not_sync: PhantomData<Cell<()>>,
}

/// Proof that the MMU lock of one VM is held (`KVM_MMU_LOCK`).
///
/// Taken by [`Vm::lock_mmu`](crate::Vm::lock_mmu); demanded by the arch hooks that change
/// page-table entries ([`ArchMmu`](crate::ArchMmu)). Nests inside the slots lock, never
/// around it. Not `Send` or `Sync`.
pub struct MmuGuard<'a> {
    _g: MutexGuard<'a, ()>,
    _not_sync: PhantomData<Cell<()>>,
}

impl std::fmt::Debug for SlotsGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotsGuard").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for MmuGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmuGuard").finish_non_exhaustive()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_guard_proves_only_its_own_lock() {
        let (a, b) = (SlotsLock::new(), SlotsLock::new());
        let g = a.lock();
        a.assert_held(&g);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.assert_held(&g)));
        assert!(r.is_err(), "another lock's guard was accepted as proof");
    }

    #[test]
    fn guards_exclude() {
        let l = SlotsLock::new();
        let g = l.lock();
        assert!(l.0.try_lock().is_err(), "slots lock not held by its guard");
        drop(g);
        assert!(l.0.try_lock().is_ok());
        let m = MmuLock::new();
        let g = m.lock();
        assert!(m.0.try_lock().is_err(), "MMU lock not held by its guard");
        drop(g);
    }
}
