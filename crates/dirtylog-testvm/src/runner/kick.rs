//! Kicking a vCPU thread out of `KVM_RUN`, race-free: a signal whose handler sets the thread's
//! `kvm_run.immediate_exit`.
//!
//! The vCPU thread registers a pointer to its `kvm_run.immediate_exit` byte in a thread-local
//! (`KickTarget::register`). A kicker first records what it wants (a pause request, a
//! throttle hold, shutdown) where the thread checks it between two `KVM_RUN`s, then sends
//! [`kick_signal`] to the thread. The handler stores 1 into the registered byte (a plain
//! volatile byte store: async-signal-safe). So:
//!
//! - a signal landing while the thread is in the guest makes `KVM_RUN` return `EINTR`;
//! - a signal landing between the thread's check of the request and its `KVM_RUN` leaves
//!   `immediate_exit = 1`, so that `KVM_RUN` returns `EINTR` at once instead of entering the
//!   guest (without it the kick would be lost and the guest could run on indefinitely);
//! - the thread clears `immediate_exit` after every `KVM_RUN` and then checks the requests,
//!   which were recorded before the signal was sent, so a signal landing just after `KVM_RUN`
//!   returned is not needed.
//!
//! A kick can be lost only when it arrives before the thread registered its pointer: kickers
//! that wait for an acknowledgement re-kick until they get it.

use std::cell::Cell;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Once;

use crate::error::{Error, Op, Result};
use crate::vm::KvmVcpu;

/// The signal used to kick vCPU threads out of `KVM_RUN`: `SIGRTMIN() + 1`. Its handler sets
/// the receiving vCPU thread's `kvm_run.immediate_exit` (see the [module docs](self)).
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 1
}

thread_local! {
    /// The calling vCPU thread's `kvm_run.immediate_exit`, or null. Const-initialised and
    /// without a destructor, so reading it is a plain thread-local load (no lazy
    /// initialisation, no allocation): usable from a signal handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // `try_with` never panics (a panic must not unwind out of a signal handler).
    let _ = IMMEDIATE_EXIT.try_with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: a non-null pointer was registered by this thread's `KickTarget`, which
            // points into the `kvm_run` mapping of a vCPU this thread owns and clears the
            // pointer before the vCPU (and its mapping) can be dropped. The handler runs on
            // that same thread, so nothing else writes the byte concurrently but the kernel,
            // for which `kvm_run` is shared memory by design (KVM only reads this byte). The
            // interrupted code may hold a `&mut kvm_run` from `get_kvm_run` (kvm-ioctls hands
            // one out for the exit data); it never reads `immediate_exit` through it except in
            // `set_kvm_immediate_exit`, a plain store the thread makes itself, so this store
            // behaves as the kernel's own concurrent access to the shared page.
            unsafe { std::ptr::write_volatile(p, 1) };
        }
    });
}

/// Install the kick handler (once per process).
pub(super) fn install_kick_handler() -> Result<()> {
    static ONCE: Once = Once::new();
    static FAILED: AtomicI32 = AtomicI32::new(0);
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler) {
            FAILED.store(e.errno(), Ordering::Release);
        }
    });
    let failed = FAILED.load(Ordering::Acquire);
    if failed != 0 {
        return Err(Error::Kvm {
            op: Op::Signal,
            errno: failed,
        });
    }
    Ok(())
}

/// The registration of a vCPU thread's `immediate_exit` byte; unregisters on drop. Not `Send`:
/// it lives and dies on the vCPU thread.
pub(super) struct KickTarget {
    _not_send: std::marker::PhantomData<*mut u8>,
}

impl KickTarget {
    /// Register `vcpu`'s `immediate_exit` for kicks of the calling thread.
    ///
    /// # Safety
    ///
    /// The guard must be dropped (not leaked) on this thread before `vcpu` is dropped or
    /// moved: until then the signal handler may write through the registered pointer.
    pub(super) unsafe fn register(vcpu: &mut KvmVcpu) -> Self {
        let p: *mut u8 = &mut vcpu.fd_mut().get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|c| c.set(p));
        KickTarget {
            _not_send: std::marker::PhantomData,
        }
    }
}

impl Drop for KickTarget {
    fn drop(&mut self) {
        IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    }
}
