//! Synchronisation primitives used by the core.
//!
//! Everything in the core that is shared between vCPU threads and the host goes through this
//! module, so that the same code can be model-checked: built with `RUSTFLAGS="--cfg loom"`,
//! these names resolve to [loom](https://docs.rs/loom)'s instrumented types and the model
//! tests (`src/model_tests.rs`) explore every interleaving of the lock/flush protocol. In a
//! normal build they are `std`'s.

#[cfg(not(loom))]
pub use std::sync::atomic::{
    fence, AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
#[cfg(not(loom))]
pub use std::sync::{Arc, Condvar, Mutex, MutexGuard};
#[cfg(not(loom))]
pub use std::thread;

#[cfg(loom)]
pub use loom::sync::atomic::{
    fence, AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
#[cfg(loom)]
pub use loom::sync::{Arc, Condvar, Mutex, MutexGuard};
#[cfg(loom)]
pub use loom::thread;

/// Lock a mutex, ignoring poisoning: a panicking vCPU thread must not wedge the host side,
/// and every structure behind these locks is valid after any partial update (they hold
/// plain data whose invariants are re-established by the next operation).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Wait on `cv`, ignoring poisoning like [`lock`].
pub fn wait<'a, T>(cv: &Condvar, g: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    match cv.wait(g) {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Wait on `cv` for at most `dur`, ignoring poisoning like [`lock`]. Whether it timed out is
/// not returned: callers re-check their condition either way.
#[cfg(not(loom))]
pub fn wait_timeout<'a, T>(
    cv: &Condvar,
    g: MutexGuard<'a, T>,
    dur: std::time::Duration,
) -> MutexGuard<'a, T> {
    match cv.wait_timeout(g, dur) {
        Ok((g, _)) => g,
        Err(poisoned) => poisoned.into_inner().0,
    }
}

/// Yield inside a wait loop. Under loom this tells the model checker the thread is spinning.
#[inline]
pub fn spin_wait() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    {
        std::hint::spin_loop();
        std::thread::yield_now();
    }
}

/// Run `f` as a model: every interleaving under loom, once under std.
pub fn model<F: Fn() + Sync + Send + 'static>(f: F) {
    #[cfg(loom)]
    {
        let mut b = loom::model::Builder::new();
        if b.preemption_bound.is_none() {
            b.preemption_bound = Some(3);
        }
        b.check(f);
    }
    #[cfg(not(loom))]
    f();
}
