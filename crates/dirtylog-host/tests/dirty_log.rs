//! The kernel's `dirty_log_test` protocol on host memory: every method, both modes that have a
//! meaning here, 1 and 2 writer threads, n·64 + 3 pages, 32 iterations, the protocol's own
//! checker. A ring is refused with a reason.

use std::time::Duration;

use dirtylog::selftest::{self, SelftestConfig};
use dirtylog::TrackerKind;
use dirtylog_host::selftest::HostSelftest;
use dirtylog_host::{HostBacking, HostMethod};

fn run(method: HostMethod, backing: HostBacking, mode: TrackerKind, writers: u32, pages: u64) {
    let cfg = SelftestConfig {
        tracker: mode,
        vcpus: writers,
        pages,
        iterations: 32,
        interval: Duration::from_millis(5),
        seed: 7 + u64::from(writers),
        ..Default::default()
    };
    let what = format!("{method} {backing} {mode} {writers} writer(s)");
    let mut b = HostSelftest::new(&cfg, method, backing)
        .unwrap_or_else(|e| panic!("{what}: {e} (see `dirtylog caps` for the host methods)"));
    let sum = selftest::run(&mut b, &cfg, |_| {}).unwrap_or_else(|e| panic!("{what}: {e}"));
    let first: Vec<String> = sum
        .violations
        .iter()
        .take(5)
        .map(|v| v.to_string())
        .collect();
    assert!(
        sum.passed(),
        "{what}: {} violations, first: {first:#?}",
        sum.violations.len()
    );
    // Fast writers may cover every page in an iteration, so clean pages are not required;
    // the checker above is the test.
    assert!(
        sum.dirty > 0,
        "{what}: nothing reported dirty in {} writes",
        sum.writes
    );
}

#[test]
fn dirty_log_protocol_on_anonymous_memory() {
    for method in [HostMethod::Async, HostMethod::Sync, HostMethod::Mprotect] {
        for mode in [TrackerKind::DirtyLog, TrackerKind::ClearLog] {
            for writers in [1, 2] {
                run(method, HostBacking::Anonymous, mode, writers, 64 * 64 + 3);
            }
        }
    }
}

#[test]
fn dirty_log_protocol_on_shared_memory() {
    for method in [HostMethod::Async, HostMethod::Sync, HostMethod::Mprotect] {
        run(
            method,
            HostBacking::Memfd,
            TrackerKind::DirtyLog,
            2,
            64 * 64 + 3,
        );
        run(
            method,
            HostBacking::Memfd,
            TrackerKind::ClearLog,
            1,
            64 * 64 + 3,
        );
    }
}

#[test]
fn a_ring_is_refused_with_a_reason() {
    let cfg = SelftestConfig {
        tracker: TrackerKind::Ring { entries: 1024 },
        ..Default::default()
    };
    let e = HostSelftest::new(&cfg, HostMethod::Async, HostBacking::Anonymous)
        .err()
        .expect("a ring must be refused");
    assert!(e.to_string().contains("no meaning for host memory"), "{e}");
}
