//! The kernel's `dirty_log_test` protocol, written once and run on every backend.
//!
//! vCPUs stamp the current iteration number into random pages of a test slot. The host
//! collects once at a random point while they run (and keeps collecting with a ring after a
//! ring-full exit), stops them, does a final collection into a second bitmap, and checks every
//! page: a dirty page must hold the current iteration, a clean page an older one. Collection
//! depends on the [`TrackerKind`]: GET (dirty-log), GET then CLEAR of the whole slot
//! (clear-log, with manual protect and `INITIALLY_SET`), or ring collect + commit + reset
//! (ring).

use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::TrackerKind;

/// Parameters of one run.
#[derive(Debug, Clone, Serialize)]
pub struct SelftestConfig {
    /// The tracker under test. `Ring { entries }` gives the entries per vCPU ring: a ring
    /// smaller than the writes of an iteration fills, and exercises ring-full exits.
    pub tracker: TrackerKind,
    /// vCPU threads stamping pages.
    pub vcpus: u32,
    /// Pages in the test slot; the default is 64·n + 3, so the slot's tail is not 64-aligned.
    pub pages: u64,
    /// Iterations (the kernel test's `-i`); each stamps its number, from 1.
    pub iterations: u64,
    /// How long vCPUs run per iteration at least.
    pub interval: Duration,
    /// Seed of the host's collection points and the vCPUs' page choice.
    pub seed: u64,
    /// A floor on writes per iteration (`TEST_MIN_WRITES_PER_ITERATION`).
    pub min_writes: u64,
    /// Give up on an iteration that has not reached `min_writes` after this long.
    pub iteration_timeout: Duration,
}

impl SelftestConfig {
    /// Ring entries per vCPU when the self-test's ring size is not given: 1024, small enough
    /// that the stamping vCPUs fill their rings and take ring-full exits.
    pub const DEFAULT_RING_ENTRIES: u32 = 1024;
}

impl Default for SelftestConfig {
    fn default() -> Self {
        SelftestConfig {
            tracker: TrackerKind::DirtyLog,
            vcpus: 1,
            pages: 64 * 64 + 3,
            iterations: 32,
            interval: Duration::from_millis(10),
            seed: 1,
            min_writes: 0x100,
            iteration_timeout: Duration::from_secs(60),
        }
    }
}

/// What one collection saw.
#[derive(Debug, Clone, Default)]
pub struct Collected {
    /// With a ring: per vCPU, the page of the last entry harvested, if any.
    pub last_ring_pages: Vec<Option<u64>>,
    /// Ring entries harvested (ring) or dirty pages reported (bitmap trackers).
    pub count: u64,
}

/// An error from a backend.
pub type BackendError = Box<dyn std::error::Error + Send + Sync>;

/// A backend the protocol can drive: a VM with one test slot and vCPUs running the stamping
/// workload. Constructed by backend-specific code from a [`SelftestConfig`].
pub trait SelftestBackend {
    /// A one-line description ("softmmu ranged-flush, 2 vCPUs, ...").
    fn describe(&self) -> String;
    /// Pages in the test slot.
    fn npages(&self) -> u64;
    /// Let the vCPUs run, stamping `iteration` into random pages. Resets the write count.
    fn resume(&mut self, iteration: u64) -> Result<(), BackendError>;
    /// Writes done by all vCPUs since the last `resume`.
    fn writes(&self) -> u64;
    /// Ring-full exits so far (0 without a ring).
    fn ring_full_exits(&self) -> u64;
    /// Stop every vCPU and wait until none can write (a vCPU blocked on a full ring counts
    /// as stopped).
    fn stop(&mut self) -> Result<(), BackendError>;
    /// Collect dirty pages of the test slot into `bitmap` (OR), in the tracker's way. With a
    /// ring this also lets vCPUs blocked on a full ring continue (after the reset).
    fn collect(&mut self, bitmap: &mut [u64]) -> Result<Collected, BackendError>;
    /// The 8-byte value at the start of test page `page`, as the host sees it.
    fn read_page(&self, page: u64) -> u64;
    /// True if a ring-full exit can be taken before the write that pushed the last entry has
    /// retired (KVM: the entry is pushed in the fault handler, the write completes after
    /// re-entry). Enables the kernel test's two ring exceptions.
    fn ring_full_before_retire(&self) -> bool {
        false
    }
}

/// One iteration's line.
#[derive(Debug, Clone, Serialize)]
pub struct IterationReport {
    /// The iteration number, from 1: the value stamped into pages.
    pub iteration: u64,
    /// Pages reported dirty by either collection.
    pub dirty: u64,
    /// Pages reported by neither.
    pub clean: u64,
    /// Writes the vCPUs made while running.
    pub writes: u64,
    /// Collections, the final one included.
    pub collections: u64,
    /// Ring-full exits taken during the iteration.
    pub ring_full_exits: u64,
}

/// A page that broke the protocol's invariant.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Violation {
    /// The iteration it was found in.
    pub iteration: u64,
    /// The page, from the test slot's start.
    pub page: u64,
    /// The value the page held (the iteration that last wrote it).
    pub value: u64,
    /// Reported dirty by a collection while vCPUs ran.
    pub dirty_while_running: bool,
    /// Reported dirty by the final collection, after the vCPUs stopped.
    pub dirty_final: bool,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.dirty_while_running || self.dirty_final {
            write!(
                f,
                "iteration {}: page {} is reported dirty but holds {} (expected {}): a false or premature dirty report",
                self.iteration, self.page, self.value, self.iteration
            )
        } else {
            write!(
                f,
                "iteration {}: page {} holds {} (written this iteration) but was never reported dirty: a lost write",
                self.iteration, self.page, self.value
            )
        }
    }
}

/// Totals of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The tracker under test.
    pub tracker: TrackerKind,
    /// The backend's [`describe`](SelftestBackend::describe).
    pub backend: String,
    /// Iterations run.
    pub iterations: u64,
    /// Pages reported dirty, over all iterations.
    pub dirty: u64,
    /// Pages reported clean, over all iterations.
    pub clean: u64,
    /// Writes by the vCPUs, over all iterations.
    pub writes: u64,
    /// Ring-full exits, over all iterations.
    pub ring_full_exits: u64,
    /// Every page that broke the invariant; empty when the run passed.
    pub violations: Vec<Violation>,
}

impl Summary {
    /// No violations?
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Errors that stop a run (violations do not: they are collected in the summary).
#[derive(Debug, thiserror::Error)]
pub enum SelftestError {
    /// A backend call failed.
    #[error("backend failed: {0}")]
    Backend(#[from] BackendError),
    /// The vCPUs did not reach [`SelftestConfig::min_writes`] within
    /// [`SelftestConfig::iteration_timeout`].
    #[error("iteration {iteration}: the vCPUs made only {writes} writes in {secs} s (at least {min} needed); are they running?")]
    TooFewWrites {
        /// The iteration that stalled.
        iteration: u64,
        /// Writes made by then.
        writes: u64,
        /// Writes needed (`min_writes`).
        min: u64,
        /// The timeout, in seconds.
        secs: u64,
    },
}

fn bit(words: &[u64], page: u64) -> bool {
    words[(page / 64) as usize] >> (page % 64) & 1 == 1
}

/// Run the protocol. `on_iteration` gets each iteration's line as it completes.
pub fn run<B: SelftestBackend + ?Sized>(
    b: &mut B,
    cfg: &SelftestConfig,
    mut on_iteration: impl FnMut(&IterationReport),
) -> Result<Summary, SelftestError> {
    let npages = b.npages();
    let words = npages.div_ceil(64) as usize;
    let mut bmap = [vec![0u64; words], vec![0u64; words]];
    let mut rng = SmallRng::seed_from_u64(cfg.seed);
    let ring = matches!(cfg.tracker, TrackerKind::Ring { .. });
    let relaxed_ring = ring && b.ring_full_before_retire();
    let mut prev_last: Vec<u64> = Vec::new();
    let mut sum = Summary {
        tracker: cfg.tracker,
        backend: b.describe(),
        iterations: cfg.iterations,
        dirty: 0,
        clean: 0,
        writes: 0,
        ring_full_exits: 0,
        violations: Vec::new(),
    };
    let interval_ms = cfg.interval.as_millis().max(1) as u64;
    for iteration in 1..=cfg.iterations {
        let full_before = b.ring_full_exits();
        b.resume(iteration)?;
        let reap_at = rng.random_range(0..interval_ms);
        let start = Instant::now();
        let mut cur_last: Vec<Option<u64>> = Vec::new();
        let mut collections = 0u64;
        let merge_last = |c: &Collected, cur: &mut Vec<Option<u64>>| {
            if cur.len() < c.last_ring_pages.len() {
                cur.resize(c.last_ring_pages.len(), None);
            }
            for (d, s) in cur.iter_mut().zip(&c.last_ring_pages) {
                if s.is_some() {
                    *d = *s;
                }
            }
        };
        let mut ms = 0u64;
        loop {
            std::thread::sleep(Duration::from_millis(1));
            ms += 1;
            let reap_now = ms == reap_at + 1;
            let keep_ring_moving = ring && collections > 0 && b.ring_full_exits() > full_before;
            if reap_now || keep_ring_moving {
                let c = b.collect(&mut bmap[0])?;
                merge_last(&c, &mut cur_last);
                collections += 1;
            }
            let w = b.writes();
            if ms >= interval_ms && collections > 0 && w >= cfg.min_writes {
                break;
            }
            if start.elapsed() > cfg.iteration_timeout {
                let _ = b.stop();
                return Err(SelftestError::TooFewWrites {
                    iteration,
                    writes: w,
                    min: cfg.min_writes,
                    secs: cfg.iteration_timeout.as_secs(),
                });
            }
        }
        let writes = b.writes();
        b.stop()?;
        let c = b.collect(&mut bmap[1])?;
        merge_last(&c, &mut cur_last);
        collections += 1;
        let cur_last: Vec<u64> = cur_last.into_iter().flatten().collect();

        let (mut dirty, mut clean) = (0u64, 0u64);
        for page in 0..npages {
            let (d0, d1) = (bit(&bmap[0], page), bit(&bmap[1], page));
            let value = b.read_page(page);
            let ok = if d0 || d1 {
                dirty += 1;
                value == iteration
                    || (relaxed_ring && prev_last.contains(&page) && value + 1 == iteration)
                    || (relaxed_ring && cur_last.contains(&page) && value < iteration)
                    || (cfg.tracker == TrackerKind::ClearLog
                        && iteration == 1
                        && value == 0
                        && d0
                        && !d1)
            } else {
                clean += 1;
                value < iteration
            };
            if !ok {
                sum.violations.push(Violation {
                    iteration,
                    page,
                    value,
                    dirty_while_running: d0,
                    dirty_final: d1,
                });
            }
        }
        for m in bmap.iter_mut() {
            m.fill(0);
        }
        let rep = IterationReport {
            iteration,
            dirty,
            clean,
            writes,
            collections,
            ring_full_exits: b.ring_full_exits() - full_before,
        };
        on_iteration(&rep);
        sum.dirty += dirty;
        sum.clean += clean;
        sum.writes += writes;
        sum.ring_full_exits += rep.ring_full_exits;
        prev_last = cur_last;
    }
    Ok(sum)
}
