//! The dirty_log_perf_test protocol on the reference arch: every iteration must see every
//! page of every vCPU's partition dirty, in each collection mode.

use dirtylog::perf::{run, PerfConfig, PerfMode};
use dirtylog::softmmu::SoftmmuPerf;

fn check(mode: PerfMode, vcpus: u32, slots: u32) {
    let cfg = PerfConfig {
        vcpus,
        mem_per_vcpu: 4 << 20,
        iterations: 3,
        slots,
        mode,
    };
    let mut b = SoftmmuPerf::new(&cfg).expect("machine");
    let mut lines = Vec::new();
    let r = run(&mut b, &cfg, |l| lines.push(l.to_string())).expect("perf run");
    let pages = (4u64 << 20) / 4096 * vcpus as u64;
    for it in &r.iterations {
        match mode {
            // Ring: entries harvested at ring-full exits during the pass are not in get().
            PerfMode::Ring(_) => assert!(
                it.pages <= pages && it.pages > 0,
                "{mode:?}: {} entries",
                it.pages
            ),
            _ => assert_eq!(
                it.pages, pages,
                "{mode:?} iteration {}: every written page is dirty",
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
fn get_mode() {
    check(PerfMode::Get, 2, 1);
}

#[test]
fn get_clear_mode_with_two_slots() {
    check(PerfMode::GetClear, 2, 2);
}

#[test]
fn ring_mode_that_fills() {
    check(PerfMode::Ring(256), 2, 1);
}
