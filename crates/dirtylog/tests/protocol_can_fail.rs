//! The selftest checker can fail: a backend that misreports dirty pages must be caught.
//!
//! `Faulty` wraps the (correct) softmmu backend and delegates everything, except that in one
//! target iteration it
//! - drops one page it reported dirty (every time it is reported): a lost write;
//! - reports one page that was not written this iteration: a false dirty report;
//! - lets one write land after `stop()` returned and the final collection ran, as a `stop()`
//!   that does not wait for its vCPUs would. That race is made deterministic: a straggler
//!   vCPU writes a clean page when the checker starts reading pages back.
//!
//! Each run must report exactly the injected violation, with the right page, iteration,
//! value and dirty flags, and the right text; the same run without a fault must pass.

use std::cell::Cell;
use std::time::Duration;

use dirtylog::selftest::{
    run, BackendError, Collected, SelftestBackend, SelftestConfig, Summary, Violation,
};
use dirtylog::softmmu::{FlushKind, SoftVcpu, SoftmmuSelftest};
use dirtylog::TrackerKind;

/// Every tracker, the ring large enough never to fill here, so that no ring exception blurs
/// the expectations.
const TRACKERS: [TrackerKind; 3] = TrackerKind::all_with_ring(65536);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    DropBit,
    AddBit,
    StopReturnsEarly,
}

struct Faulty {
    inner: SoftmmuSelftest,
    fault: Fault,
    /// The iteration in which the fault is injected.
    target: u64,
    iteration: u64,
    /// `stop()` was called this iteration: the next collection is the final one.
    stopped: bool,
    /// DropBit: the page dropped from every report of the target iteration.
    victim: Option<u64>,
    /// AddBit / StopReturnsEarly: the page and the value the checker will read.
    injected: Option<(u64, u64)>,
    /// StopReturnsEarly: a vCPU the backend "forgot" to stop, with the page it will write.
    straggler: SoftVcpu,
    straggler_write: Cell<Option<u64>>,
    base_gpa: u64,
    page_size: u64,
}

fn bit(words: &[u64], p: u64) -> bool {
    words[(p / 64) as usize] >> (p % 64) & 1 == 1
}

impl Faulty {
    fn new(cfg: &SelftestConfig, fault: Fault, target: u64) -> Self {
        let inner = SoftmmuSelftest::new(cfg, FlushKind::Ranged).expect("softmmu backend");
        let m = inner.machine().clone();
        let page_size = m.vm().config().page_size;
        let base_gpa = m
            .vm()
            .memslots()
            .iter()
            .find(|s| s.npages == cfg.pages)
            .expect("the test slot")
            .base_gfn
            * page_size;
        let straggler = m.create_vcpu();
        Faulty {
            inner,
            fault,
            target,
            iteration: 0,
            stopped: false,
            victim: None,
            injected: None,
            straggler,
            straggler_write: Cell::new(None),
            base_gpa,
            page_size,
        }
    }

    /// The first page (from `from`) that a correct backend cannot report dirty this
    /// iteration and that no ring exception excuses: its value is neither the current
    /// iteration nor the previous one. Only meaningful once the vCPUs are stopped.
    fn unwritten_page(&self, from: u64) -> (u64, u64) {
        let k = self.iteration;
        (from..self.inner.npages())
            .map(|p| (p, self.inner.read_page(p)))
            .find(|&(_, v)| v != k && v + 1 != k)
            .expect("every page was written this iteration: make the slot larger")
    }
}

impl SelftestBackend for Faulty {
    fn describe(&self) -> String {
        format!("{:?} around {}", self.fault, self.inner.describe())
    }

    fn npages(&self) -> u64 {
        self.inner.npages()
    }

    fn resume(&mut self, iteration: u64) -> Result<(), BackendError> {
        self.iteration = iteration;
        self.stopped = false;
        self.inner.resume(iteration)
    }

    fn writes(&self) -> u64 {
        self.inner.writes()
    }

    fn ring_full_exits(&self) -> u64 {
        self.inner.ring_full_exits()
    }

    fn stop(&mut self) -> Result<(), BackendError> {
        self.inner.stop()?;
        self.stopped = true;
        Ok(())
    }

    fn collect(&mut self, bitmap: &mut [u64]) -> Result<Collected, BackendError> {
        let before = bitmap.to_vec();
        let c = self.inner.collect(bitmap)?;
        if self.iteration != self.target {
            return Ok(c);
        }
        match self.fault {
            Fault::None => {}
            Fault::DropBit => {
                if self.victim.is_none() {
                    self.victim = (0..self.npages()).find(|&p| bit(bitmap, p) && !bit(&before, p));
                }
                if let Some(p) = self.victim {
                    bitmap[(p / 64) as usize] &= !(1 << (p % 64));
                }
            }
            Fault::AddBit if self.stopped => {
                let (p, v) = self.unwritten_page(0);
                bitmap[(p / 64) as usize] |= 1 << (p % 64);
                self.injected = Some((p, v));
            }
            Fault::StopReturnsEarly if self.stopped => {
                // Page 0 is the first the checker reads: pick a later one.
                let (p, _) = self.unwritten_page(1);
                self.straggler_write.set(Some(p));
                self.injected = Some((p, self.iteration));
            }
            Fault::AddBit | Fault::StopReturnsEarly => {}
        }
        Ok(c)
    }

    fn read_page(&self, page: u64) -> u64 {
        if let Some(p) = self.straggler_write.take() {
            self.straggler
                .write_u64(self.base_gpa + p * self.page_size, self.iteration)
                .expect("straggler write");
        }
        self.inner.read_page(page)
    }

    fn ring_full_before_retire(&self) -> bool {
        self.inner.ring_full_before_retire()
    }
}

fn config(tracker: TrackerKind) -> SelftestConfig {
    SelftestConfig {
        tracker,
        vcpus: 2,
        // Large enough that a few milliseconds of writes leave most pages untouched.
        pages: 64 * 512 + 3,
        iterations: 3,
        interval: Duration::from_millis(1),
        seed: 11,
        min_writes: 16,
        ..SelftestConfig::default()
    }
}

fn run_with(tracker: TrackerKind, fault: Fault, target: u64) -> (Summary, Faulty) {
    let cfg = config(tracker);
    let mut b = Faulty::new(&cfg, fault, target);
    let s = run(&mut b, &cfg, |_| {}).expect("the protocol ran");
    assert_eq!(s.ring_full_exits, 0, "{tracker}: the ring filled");
    (s, b)
}

#[test]
fn a_correct_backend_passes() {
    for tracker in TRACKERS {
        let (s, _) = run_with(tracker, Fault::None, 2);
        assert!(
            s.passed(),
            "{tracker}: {} violations, first: {}",
            s.violations.len(),
            s.violations[0]
        );
        assert!(
            s.dirty > 0 && s.writes >= 3 * 16,
            "{tracker}: degenerate run {s:?}"
        );
    }
}

#[test]
fn a_dropped_dirty_bit_is_reported_as_a_lost_write() {
    for tracker in TRACKERS {
        let (s, b) = run_with(tracker, Fault::DropBit, 2);
        let page = b.victim.expect("iteration 2 reported at least one page");
        let expected = Violation {
            iteration: 2,
            page,
            value: 2,
            dirty_while_running: false,
            dirty_final: false,
        };
        assert_eq!(s.violations, vec![expected.clone()], "{tracker}");
        assert!(!s.passed());
        assert_eq!(
            expected.to_string(),
            format!(
                "iteration 2: page {page} holds 2 (written this iteration) but was never \
                 reported dirty: a lost write"
            )
        );
    }
}

#[test]
fn an_extra_dirty_bit_is_reported_as_a_false_dirty_page() {
    for tracker in TRACKERS {
        let (s, b) = run_with(tracker, Fault::AddBit, 2);
        let (page, value) = b.injected.expect("a bit was added");
        assert_ne!(value, 2);
        let expected = Violation {
            iteration: 2,
            page,
            value,
            dirty_while_running: false,
            dirty_final: true,
        };
        assert_eq!(s.violations, vec![expected.clone()], "{tracker}");
        assert_eq!(
            expected.to_string(),
            format!(
                "iteration 2: page {page} is reported dirty but holds {value} (expected 2): a \
                 false or premature dirty report"
            )
        );
    }
}

#[test]
fn a_write_after_stop_returned_is_reported_as_a_lost_write() {
    // The last iteration, so the straggler's bit (fetched by no later collection) cannot
    // surface as a second, premature report.
    for tracker in TRACKERS {
        let (s, b) = run_with(tracker, Fault::StopReturnsEarly, 3);
        let (page, value) = b.injected.expect("a straggler write was armed");
        assert!(b.straggler_write.get().is_none(), "the straggler wrote");
        let expected = Violation {
            iteration: 3,
            page,
            value,
            dirty_while_running: false,
            dirty_final: false,
        };
        assert_eq!(value, 3);
        assert_eq!(s.violations, vec![expected], "{tracker}");
        assert!(s.violations[0].to_string().ends_with("a lost write"));
    }
}
