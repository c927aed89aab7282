//! Shared helpers of the KVM integration tests.

#![allow(dead_code)]

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

/// Serialises the KVM tests of one test binary: on a 2-core host, guests of concurrent tests
/// compete for the CPUs, which distorts rates and delays the ring watchdog (a late ring-full
/// kick lets a fast guest overrun a small ring on hosts that take the exit late).
pub fn kvm_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    match LOCK.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Fail (never skip) with a clear message if `/dev/kvm` is missing or unusable, then take the
/// binary's KVM lock ([`kvm_lock`]); keep the guard for the whole test.
#[must_use = "hold the guard for the whole test"]
pub fn require_kvm() -> MutexGuard<'static, ()> {
    check_kvm();
    kvm_lock()
}

/// Fail (never skip) with a clear message if `/dev/kvm` is missing or unusable.
pub fn check_kvm() {
    if !Path::new("/dev/kvm").exists() {
        panic!("/dev/kvm does not exist: these tests need KVM (load kvm_intel/kvm_amd, or run on a host that exposes /dev/kvm); they fail rather than skip so a missing KVM is never mistaken for a pass");
    }
    if let Err(e) = dirtylog_testvm::vm::open_kvm(None) {
        panic!("/dev/kvm exists but cannot be used: {e}");
    }
}
