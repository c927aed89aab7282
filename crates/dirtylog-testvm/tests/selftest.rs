//! The kernel's dirty_log_test protocol (`dirtylog::selftest::run`) on /dev/kvm, with each tracker.

mod common;

use std::time::{Duration, Instant};

use dirtylog::selftest::{run, SelftestConfig};
use dirtylog::TrackerKind;
use dirtylog_testvm::KvmSelftest;

fn run_with(tracker: TrackerKind, vcpus: u32) -> dirtylog::selftest::Summary {
    run_with_min_writes(tracker, vcpus, SelftestConfig::default().min_writes)
}

/// Each iteration runs until the vCPUs made `min_writes` writes (and at least 10 ms).
fn run_with_min_writes(
    tracker: TrackerKind,
    vcpus: u32,
    min_writes: u64,
) -> dirtylog::selftest::Summary {
    let _kvm = common::require_kvm();
    let cfg = SelftestConfig {
        tracker,
        vcpus,
        pages: 64 * 64 + 3,
        iterations: 32,
        interval: Duration::from_millis(10),
        seed: 0x5eed + vcpus as u64,
        min_writes,
        ..Default::default()
    };
    let mut b = KvmSelftest::new(&cfg).unwrap_or_else(|e| panic!("{tracker}: {e}"));
    let t = Instant::now();
    let sum = run(&mut b, &cfg, |r| {
        eprintln!(
            "{} it {:2}: dirty {:5} clean {:5} writes {:6} collections {:3} ring-full {}",
            tracker, r.iteration, r.dirty, r.clean, r.writes, r.collections, r.ring_full_exits
        )
    })
    .unwrap_or_else(|e| panic!("{tracker}: {e}"));
    eprintln!(
        "{}: {:.2}s, {} writes, {} ring-full exits, fullest ring harvest {} entries",
        sum.backend,
        t.elapsed().as_secs_f64(),
        sum.writes,
        sum.ring_full_exits,
        b.max_ring_fill()
    );
    b.shutdown().unwrap();
    for v in sum.violations.iter().take(20) {
        eprintln!("VIOLATION: {v}");
    }
    assert!(sum.passed(), "{} violations", sum.violations.len());
    sum
}

#[test]
fn dirty_log_1vcpu() {
    run_with(TrackerKind::DirtyLog, 1);
}

#[test]
fn dirty_log_2vcpu() {
    run_with(TrackerKind::DirtyLog, 2);
}

#[test]
fn clear_log_1vcpu() {
    run_with(TrackerKind::ClearLog, 1);
}

#[test]
fn clear_log_2vcpu() {
    run_with(TrackerKind::ClearLog, 2);
}

#[test]
fn dirty_ring_1vcpu() {
    // 65536 entries: larger than the writes of an iteration, so it never fills.
    let s = run_with(TrackerKind::Ring { entries: 65536 }, 1);
    assert_eq!(s.ring_full_exits, 0);
}

#[test]
fn dirty_ring_2vcpu() {
    run_with(TrackerKind::Ring { entries: 4096 }, 2);
}

/// Writes per vCPU per iteration for the ring-full tests, at least: with one collection at a
/// random point, one side of it has at least half, 256 — above the 256-entry ring's soft-full
/// mark (192) however slowly a loaded host runs the guest (the 10 ms interval alone gave ~250
/// per vCPU under load, and the ring then never filled). Not more: every fill is a chance for
/// a host that takes the ring-full exit late (PVM) to overrun the 64 reserved entries.
const RING_FULL_WRITES_PER_VCPU: u64 = 512;

#[test]
fn dirty_ring_full_1vcpu() {
    // 256 entries (one page, the minimum): soft-full after 192, far below an iteration's writes.
    let s = run_with_min_writes(
        TrackerKind::Ring { entries: 256 },
        1,
        RING_FULL_WRITES_PER_VCPU,
    );
    assert!(s.ring_full_exits > 0, "the ring never filled");
}

#[test]
fn dirty_ring_full_2vcpu() {
    let s = run_with_min_writes(
        TrackerKind::Ring { entries: 256 },
        2,
        2 * RING_FULL_WRITES_PER_VCPU,
    );
    assert!(s.ring_full_exits > 0, "the ring never filled");
}
