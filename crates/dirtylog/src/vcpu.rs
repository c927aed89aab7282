//! The generic part of a vCPU (`struct kvm_vcpu`): its request bits, its guest-mode flag and
//! its dirty ring. The arch owns the rest (registers, TLB).
//!
//! Requests work like KVM's: a requester sets a bit, and if the vCPU is in guest mode, kicks
//! it and waits until it has left guest mode. A vCPU checks its requests with interrupts
//! "disabled" right after entering guest mode, so a request made while it was outside is seen
//! before it touches guest memory again. Idle vCPUs count as acknowledged.

use crate::ring::DirtyRing;
use crate::sync::{spin_wait, AtomicU64, AtomicU8, Ordering};

/// `KVM_REQ_TLB_FLUSH`: flush the whole TLB before the next guest access.
pub const KVM_REQ_TLB_FLUSH: u64 = 1 << 0;
/// `KVM_REQ_DIRTY_RING_SOFT_FULL`: exit with "ring full" while the ring stays soft-full.
pub const KVM_REQ_DIRTY_RING_SOFT_FULL: u64 = 1 << 1;
/// First request bit free for arch use (`KVM_REQUEST_ARCH_BASE`).
pub const KVM_REQUEST_ARCH_BASE: u32 = 8;

const OUTSIDE_GUEST_MODE: u8 = 0;
const IN_GUEST_MODE: u8 = 1;

/// The generic vCPU.
#[derive(Debug)]
pub struct Vcpu {
    /// The vCPU index (`vcpu->vcpu_idx`): 0, 1, ... in creation order.
    pub id: u32,
    mode: AtomicU8,
    requests: AtomicU64,
    ring: Option<DirtyRing>,
}

impl Vcpu {
    pub(crate) fn new(id: u32, ring: Option<DirtyRing>) -> Self {
        Vcpu {
            id,
            mode: AtomicU8::new(OUTSIDE_GUEST_MODE),
            requests: AtomicU64::new(0),
            ring,
        }
    }

    /// This vCPU's dirty ring, if the VM has rings.
    pub fn ring(&self) -> Option<&DirtyRing> {
        self.ring.as_ref()
    }

    /// Set request bits without waiting (`kvm_make_request`).
    pub fn make_request(&self, req: u64) {
        self.requests.fetch_or(req, Ordering::SeqCst);
    }

    /// Set request bits and, if the vCPU is in guest mode, wait until it has left guest mode
    /// (the kick's acknowledgement). On return the vCPU will act on `req` before its next
    /// guest access.
    pub fn make_request_and_wait(&self, req: u64) {
        self.requests.fetch_or(req, Ordering::SeqCst);
        while self.mode.load(Ordering::SeqCst) == IN_GUEST_MODE
            && self.requests.load(Ordering::SeqCst) & req != 0
        {
            spin_wait();
        }
    }

    /// vCPU thread: enter guest mode. Returns the pending requests; if any are pending the
    /// vCPU is left outside guest mode and must handle them (then call this again).
    pub fn enter_guest(&self) -> u64 {
        self.mode.store(IN_GUEST_MODE, Ordering::SeqCst);
        let r = self.requests.load(Ordering::SeqCst);
        if r != 0 {
            self.mode.store(OUTSIDE_GUEST_MODE, Ordering::SeqCst);
        }
        r
    }

    /// vCPU thread: leave guest mode (a VM exit).
    pub fn exit_guest(&self) {
        self.mode.store(OUTSIDE_GUEST_MODE, Ordering::SeqCst);
    }

    /// vCPU thread, in guest mode: is a kick pending? Checked at every instruction boundary,
    /// as a CPU takes an IPI.
    #[inline]
    pub fn kicked(&self) -> bool {
        self.requests.load(Ordering::SeqCst) != 0
    }

    /// Is the vCPU in guest mode (able to use its TLB right now)?
    pub fn in_guest(&self) -> bool {
        self.mode.load(Ordering::SeqCst) == IN_GUEST_MODE
    }

    /// Pending request bits.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// vCPU thread: mark `req` handled. Call after acting on it, so a waiting requester sees
    /// the work done.
    pub fn clear_request(&self, req: u64) {
        self.requests.fetch_and(!req, Ordering::SeqCst);
    }

    /// `kvm_dirty_ring_check_request`: true if the vCPU must exit with "dirty ring full".
    /// The request stays armed while the ring is soft-full.
    pub fn dirty_ring_check_request(&self) -> bool {
        if self.requests() & KVM_REQ_DIRTY_RING_SOFT_FULL == 0 {
            return false;
        }
        match &self.ring {
            Some(r) if r.soft_full() => true,
            _ => {
                self.clear_request(KVM_REQ_DIRTY_RING_SOFT_FULL);
                false
            }
        }
    }
}
