//! State shared by a host-side driver and its vCPU threads: a mutex-protected state with a
//! condition variable (both poison-tolerant), plus lock-free counters.

use std::sync::{Condvar, Mutex, MutexGuard};

#[derive(Debug, Default)]
pub(super) struct Shared<S, C> {
    state: Mutex<S>,
    pub(super) cv: Condvar,
    /// Counters read and bumped without the lock.
    pub(super) c: C,
}

impl<S, C> Shared<S, C> {
    pub(super) fn lock(&self) -> MutexGuard<'_, S> {
        crate::sync::lock(&self.state)
    }

    pub(super) fn wait<'a>(&self, g: MutexGuard<'a, S>) -> MutexGuard<'a, S> {
        crate::sync::wait(&self.cv, g)
    }

    pub(super) fn wait_timeout<'a>(
        &self,
        g: MutexGuard<'a, S>,
        dur: std::time::Duration,
    ) -> MutexGuard<'a, S> {
        crate::sync::wait_timeout(&self.cv, g, dur)
    }
}
