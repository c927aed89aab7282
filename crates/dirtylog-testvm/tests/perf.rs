//! The dirty_log_perf_test protocol on /dev/kvm: every iteration sees every page of every
//! vCPU's partition dirty, whichever layer (ours or the bare ioctls) collects it, and the
//! report compares the two.

mod common;

use dirtylog::perf::{run, Layer, PerfConfig};
use dirtylog::TrackerKind;
use dirtylog_testvm::KvmPerf;

const MIB: u64 = 1 << 20;

fn check(tracker: TrackerKind, vcpus: u32, slots: u32) {
    let _kvm = common::require_kvm();
    let cfg = PerfConfig {
        vcpus,
        mem_per_vcpu: 16 * MIB,
        iterations: 4,
        slots,
        tracker,
    };
    let mut b = KvmPerf::new(&cfg).expect("machine");
    let mut lines = Vec::new();
    let r = run(&mut b, &cfg, |l| lines.push(l.to_string())).expect("perf run");
    let pages = 16 * MIB / 4096 * vcpus as u64;
    assert_eq!(r.iterations.len(), 4);
    assert_eq!(
        r.iterations.iter().map(|it| it.layer).collect::<Vec<_>>(),
        [Layer::Ours, Layer::Bare, Layer::Ours, Layer::Bare],
        "iterations alternate between our API and the bare ioctls"
    );
    match tracker {
        TrackerKind::Ring { .. } => {
            // GET takes what the pass left: normally some entries, but none if a vCPU blocked
            // on a full ring right at the end of its pass (this host takes the exit late) and
            // that harvest took everything.
            for it in &r.iterations {
                assert!(
                    it.pages <= pages,
                    "{tracker} iteration {}: {} entries",
                    it.iteration,
                    it.pages
                );
            }
            assert!(r.iterations.iter().any(|it| it.pages > 0));
            // Each pass writes every page once, so it pushes exactly one entry per page: some
            // harvested during the pass, the rest by GET, with either layer (and our harvester
            // resynchronised after the bare one).
            let got: u64 = r.iterations.iter().map(|it| it.pages).sum();
            assert_eq!(
                got + b.pass_entries(),
                4 * pages,
                "{} entries by GET, {} during passes ({} harvests)",
                got,
                b.pass_entries(),
                b.pass_harvests()
            );
        }
        _ => {
            for it in &r.iterations {
                assert_eq!(
                    it.pages, pages,
                    "{tracker} iteration {} ({:?}): every written page is dirty",
                    it.iteration, it.layer
                );
            }
        }
    }
    let (g, c) = (
        r.bare_get_avg_s.expect("bare GET average"),
        r.bare_clear_avg_s.expect("bare CLEAR average"),
    );
    assert!(g > 0.0, "bare GET took time");
    if tracker == TrackerKind::DirtyLog {
        assert_eq!(c, 0.0, "no CLEAR without manual protect");
    } else {
        assert!(c > 0.0, "bare CLEAR took time");
    }
    let ratio = r.overhead_ratio.expect("ours / bare ratio");
    assert!(ratio.is_finite() && ratio > 0.0, "{ratio}");
    assert!(lines.iter().any(|l| l.contains("(bare)")), "{lines:#?}");
    assert!(lines.iter().any(|l| l.starts_with("Bare interface")));
    eprintln!("{tracker}: {}", lines.join("\n  "));
    b.shutdown().expect("vCPU threads");
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
fn ring_that_fills_during_passes() {
    // 4096 writes per vCPU and pass: at least one harvest during each pass.
    check(TrackerKind::Ring { entries: 4096 }, 2, 1);
}

#[test]
fn bad_configs_are_refused() {
    common::check_kvm();
    let cfg = |vcpus, mem_per_vcpu, slots| PerfConfig {
        vcpus,
        mem_per_vcpu,
        iterations: 2,
        slots,
        tracker: TrackerKind::DirtyLog,
    };
    for c in [
        cfg(0, MIB, 1),
        cfg(1, 1000, 1),
        cfg(1, MIB, 0),
        cfg(1, MIB, 3),
    ] {
        let e = KvmPerf::new(&c).unwrap_err();
        assert!(e.to_string().contains("invalid configuration"), "{e}");
    }
}
