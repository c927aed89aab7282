//! Model check of the lock/flush protocol.
//!
//! Built normally, each scenario runs once with real threads. Built with
//! `RUSTFLAGS="--cfg loom"`, loom explores every interleaving (up to its preemption bound) of
//! vCPU writes through TLBs racing GET, CLEAR, enabling logging, aging and ring reset, and
//! every explored interleaving must keep the invariant checked by [`Machine::page_tracked`]:
//! each page is dirty in the log, or write-protected with no usable stale TLB entry. Three
//! deliberately broken variants of the protocol (see `vm::Mutant`) must each be caught.

use crate::memslot::{MemoryRegion, KVM_MEM_LOG_DIRTY_PAGES};
use crate::ring::RingHarvester;
use crate::softmmu::{FlushKind, Machine};
use crate::sync::{model, thread};
use crate::vm::{
    Mutant, VmConfig, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_MANUAL_CAPS,
};
use std::sync::Arc;

const PAGE: u64 = 4096;
const NPAGES: u64 = 2;

fn region(flags: u32) -> MemoryRegion {
    MemoryRegion {
        slot: 0,
        flags,
        guest_phys_addr: 0,
        memory_size: NPAGES * PAGE,
        userspace_addr: 0x10000,
    }
}

fn machine(kind: FlushKind, mutant: Mutant, logging: bool) -> Arc<Machine> {
    let m = Machine::with_mutant(kind, VmConfig::default(), mutant);
    m.vm()
        .set_user_memory_region(&region(if logging { KVM_MEM_LOG_DIRTY_PAGES } else { 0 }))
        .expect("create slot");
    m
}

fn assert_tracked(m: &Machine, after: &str) {
    for gfn in 0..NPAGES {
        assert!(m.page_tracked(gfn), "page {gfn} not tracked after {after}: clean in the log but writable through a stale TLB entry");
    }
}

/// A vCPU writes a page twice while the host fetches the log (GET clears and re-protects).
fn get_races_vcpu(kind: FlushKind, mutant: Mutant) {
    model(move || {
        let m = machine(kind, mutant, true);
        let v = m.create_vcpu();
        v.write_u64(0, 1).expect("write");
        let t = thread::spawn(move || {
            v.write_u64(0, 2).expect("write");
            v.write_u64(PAGE, 3).expect("write");
        });
        let mut buf = [0u64; 1];
        m.vm().get_dirty_log(0, &mut buf).expect("GET");
        assert_tracked(&m, "GET");
        t.join().expect("vCPU thread");
    });
}

/// Manual protect: a vCPU writes while the host clears the log.
fn clear_races_vcpu(kind: FlushKind, mutant: Mutant) {
    model(move || {
        let m = Machine::with_mutant(kind, VmConfig::default(), mutant);
        m.vm()
            .enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 0, 1)
            .expect("manual protect");
        m.vm()
            .set_user_memory_region(&region(KVM_MEM_LOG_DIRTY_PAGES))
            .expect("slot");
        let v = m.create_vcpu();
        v.write_u64(0, 1).expect("write");
        let t = thread::spawn(move || {
            v.write_u64(0, 2).expect("write");
        });
        m.vm()
            .clear_dirty_log(0, 0, NPAGES as u32, &[0b11])
            .expect("CLEAR");
        assert_tracked(&m, "CLEAR");
        t.join().expect("vCPU thread");
    });
}

/// The race of section 2.6: one caller enables logging (protects, then flushes), another
/// fetches the log; a vCPU holds a writable TLB entry from before logging was on.
fn enable_races_get(kind: FlushKind, mutant: Mutant) {
    model(move || {
        let m = machine(kind, mutant, false);
        let v = m.create_vcpu();
        v.write_u64(0, 1).expect("write");
        let m2 = m.clone();
        let a = thread::spawn(move || {
            m2.vm()
                .set_user_memory_region(&region(KVM_MEM_LOG_DIRTY_PAGES))
                .expect("enable logging");
            assert_tracked(&m2, "enabling logging");
        });
        let mut buf = [0u64; 1];
        if m.vm().get_dirty_log(0, &mut buf).is_ok() {
            assert_tracked(&m, "GET racing enable-logging");
        }
        a.join().expect("enable thread");
    });
}

/// Aging removes the writable bit without a flush (x86 access tracking); enabling logging,
/// and then GET, must flush anyway (known bug #5).
fn aging_then_enable_and_get(kind: FlushKind, mutant: Mutant) {
    model(move || {
        let m = machine(kind, mutant, false);
        let v = m.create_vcpu();
        v.write_u64(0, 1).expect("write");
        m.age_gfn(0);
        m.vm()
            .set_user_memory_region(&region(KVM_MEM_LOG_DIRTY_PAGES))
            .expect("enable logging");
        assert_tracked(&m, "enabling logging on an aged page");
        v.write_u64(0, 2).expect("write");
        m.age_gfn(0);
        let t = thread::spawn(move || v.write_u64(PAGE, 3).expect("write"));
        let mut buf = [0u64; 1];
        m.vm().get_dirty_log(0, &mut buf).expect("GET");
        assert_tracked(&m, "GET of an aged dirty page");
        t.join().expect("vCPU thread");
    });
}

/// Dirty ring: a vCPU pushes while the host harvests, commits and resets.
fn ring_races_vcpu(kind: FlushKind, mutant: Mutant) {
    model(move || {
        let m = Machine::with_mutant(kind, VmConfig::default(), mutant);
        m.vm()
            .enable_cap(KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 0, 4096)
            .expect("ring");
        m.vm()
            .set_user_memory_region(&region(KVM_MEM_LOG_DIRTY_PAGES))
            .expect("slot");
        let v = m.create_vcpu();
        v.write_u64(0, 1).expect("write");
        let g = v.generic().clone();
        let t = thread::spawn(move || {
            v.write_u64(0, 2).expect("write");
            v.write_u64(PAGE, 3).expect("write");
        });
        let ring = g.ring().expect("ring");
        let mut h = RingHarvester::new();
        let mut out = Vec::new();
        h.collect(ring.entries(), &mut out);
        let committed = h.commit(ring.entries());
        let reset = m.vm().reset_dirty_rings().expect("reset");
        assert!(reset >= committed, "reset {reset} < committed {committed}");
        assert_tracked(&m, "ring reset");
        t.join().expect("vCPU thread");
    });
}

/// Initially-set manual protect: CLEAR protects lazily, a vCPU writes concurrently.
fn initially_set_clear(kind: FlushKind, mutant: Mutant) {
    model(move || {
        let m = Machine::with_mutant(kind, VmConfig::default(), mutant);
        m.vm()
            .enable_cap(
                KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                0,
                KVM_DIRTY_LOG_MANUAL_CAPS,
            )
            .expect("caps");
        m.vm().set_user_memory_region(&region(0)).expect("slot");
        let v = m.create_vcpu();
        v.write_u64(0, 1).expect("write");
        m.vm()
            .set_user_memory_region(&region(KVM_MEM_LOG_DIRTY_PAGES))
            .expect("enable logging");
        let t = thread::spawn(move || v.write_u64(0, 2).expect("write"));
        m.vm()
            .clear_dirty_log(0, 0, NPAGES as u32, &[0b11])
            .expect("CLEAR");
        assert_tracked(&m, "CLEAR of an initially-set slot");
        t.join().expect("vCPU thread");
    });
}

const KINDS: [FlushKind; 3] = [
    FlushKind::Ranged,
    FlushKind::FullOnly,
    FlushKind::RequestOnly,
];

#[test]
fn correct_protocol_get() {
    for k in KINDS {
        get_races_vcpu(k, Mutant::None);
    }
}

#[test]
fn correct_protocol_clear() {
    for k in KINDS {
        clear_races_vcpu(k, Mutant::None);
        initially_set_clear(k, Mutant::None);
    }
}

#[test]
fn correct_protocol_enable_vs_get() {
    for k in KINDS {
        enable_races_get(k, Mutant::None);
    }
}

#[test]
fn correct_protocol_aging() {
    for k in KINDS {
        aging_then_enable_and_get(k, Mutant::None);
    }
}

#[test]
fn correct_protocol_ring() {
    for k in KINDS {
        ring_races_vcpu(k, Mutant::None);
    }
}

// The mutants. Deterministic ones are caught by a single run; racy ones need loom's search
// and are compiled only for the loom build, where the search is exhaustive.

#[test]
#[should_panic(expected = "not tracked")]
fn mutant_flush_only_if_changed_is_caught() {
    aging_then_enable_and_get(FlushKind::Ranged, Mutant::FlushOnlyIfChanged);
}

#[cfg(loom)]
#[test]
#[should_panic(expected = "not tracked")]
fn mutant_no_slots_lock_is_caught() {
    enable_races_get(FlushKind::Ranged, Mutant::NoSlotsLock);
}

#[cfg(loom)]
#[test]
#[should_panic(expected = "not tracked")]
fn mutant_flush_before_protect_is_caught() {
    get_races_vcpu(FlushKind::Ranged, Mutant::FlushBeforeProtect);
}
