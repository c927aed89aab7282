//! The kernel's dirty_log_test protocol on the software-MMU reference arch: every tracker, 1 and
//! 2 vCPUs, a slot of n·64+3 pages, 32 iterations, every flush flavour.

use std::time::Duration;

use dirtylog::selftest::{run, SelftestConfig, Summary};
use dirtylog::softmmu::{FlushKind, SoftmmuSelftest};
use dirtylog::TrackerKind;

fn check(tracker: TrackerKind, vcpus: u32, kind: FlushKind) -> Summary {
    let cfg = SelftestConfig {
        tracker,
        vcpus,
        pages: 64 * 40 + 3,
        iterations: 32,
        interval: Duration::from_millis(3),
        seed: 7 + vcpus as u64,
        ..SelftestConfig::default()
    };
    let mut b = SoftmmuSelftest::new(&cfg, kind).expect("set up the softmmu machine");
    let s = run(&mut b, &cfg, |_| {}).expect("protocol ran");
    assert!(
        s.passed(),
        "{tracker} {vcpus} vCPUs {kind:?}: {} violations, first: {}",
        s.violations.len(),
        s.violations[0]
    );
    assert!(s.writes >= 32 * 0x100, "too few writes: {}", s.writes);
    assert!(s.dirty > 0 && s.clean > 0, "degenerate run: {s:?}");
    s
}

#[test]
fn dirty_log_1_and_2_vcpus() {
    for kind in [
        FlushKind::Ranged,
        FlushKind::FullOnly,
        FlushKind::RequestOnly,
    ] {
        check(TrackerKind::DirtyLog, 1, kind);
        check(TrackerKind::DirtyLog, 2, kind);
    }
}

#[test]
fn clear_log_1_and_2_vcpus() {
    for kind in [FlushKind::Ranged, FlushKind::FullOnly] {
        check(TrackerKind::ClearLog, 1, kind);
        check(TrackerKind::ClearLog, 2, kind);
    }
}

#[test]
fn dirty_ring_large() {
    for vcpus in [1, 2] {
        let s = check(
            TrackerKind::Ring { entries: 65536 },
            vcpus,
            FlushKind::Ranged,
        );
        assert_eq!(
            s.ring_full_exits, 0,
            "a 64Ki-entry ring should not fill here"
        );
    }
}

#[test]
fn dirty_ring_small_enough_to_fill() {
    for vcpus in [1, 2] {
        let s = check(
            TrackerKind::Ring { entries: 256 },
            vcpus,
            FlushKind::FullOnly,
        );
        assert!(
            s.ring_full_exits > 0,
            "a 256-entry ring never filled: the full path went untested"
        );
    }
}
