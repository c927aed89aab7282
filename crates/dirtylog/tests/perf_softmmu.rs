//! The dirty_log_perf_test protocol on the reference arch: every iteration must see every
//! page of every vCPU's partition dirty, with each tracker.

use dirtylog::perf::{run, PerfConfig};
use dirtylog::softmmu::SoftmmuPerf;
use dirtylog::TrackerKind;

fn check(tracker: TrackerKind, vcpus: u32, slots: u32) {
    let cfg = PerfConfig {
        vcpus,
        mem_per_vcpu: 4 << 20,
        iterations: 3,
        slots,
        tracker,
    };
    let mut b = SoftmmuPerf::new(&cfg).expect("machine");
    let mut lines = Vec::new();
    let r = run(&mut b, &cfg, |l| lines.push(l.to_string())).expect("perf run");
    let pages = (4u64 << 20) / 4096 * vcpus as u64;
    for it in &r.iterations {
        match tracker {
            // Ring: entries harvested at ring-full exits during the pass are not in get().
            TrackerKind::Ring { .. } => assert!(
                it.pages <= pages && it.pages > 0,
                "{tracker}: {} entries",
                it.pages
            ),
            _ => assert_eq!(
                it.pages, pages,
                "{tracker} iteration {}: every written page is dirty",
                it.iteration
            ),
        }
    }
    assert!(lines.iter().any(|l| l.starts_with("Populate memory time")));
    assert!(lines
        .iter()
        .any(|l| l.starts_with("Disabling dirty logging time")));
    assert_eq!(r.overhead_ratio, None, "softmmu has no bare interface");
}

#[test]
fn dirty_log() {
    check(TrackerKind::DirtyLog, 2, 1);
}

#[test]
fn clear_log_with_two_slots() {
    check(TrackerKind::ClearLog, 2, 2);
}

#[test]
fn ring_that_fills() {
    check(TrackerKind::Ring { entries: 256 }, 2, 1);
}
