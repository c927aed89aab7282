//! The kernel's `dirty_log_test` protocol, written once and run on every backend.
//!
//! vCPUs stamp the current iteration number into random pages of a test slot. The host
//! collects once at a random point while they run (and keeps collecting in ring mode after a
//! ring-full exit), stops them, does a final collection into a second bitmap, and checks every
//! page: a dirty page must hold the current iteration, a clean page an older one. Collection
//! is mode-specific: GET (dirty-log), GET then CLEAR of the whole slot (clear-log, with manual
//! protect and `INITIALLY_SET`), or ring collect + commit + reset (dirty-ring).

use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// How the backend collects dirty pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogMode {
    /// `KVM_GET_DIRTY_LOG`, which clears and re-protects.
    DirtyLog,
    /// Manual protect with `INITIALLY_SET`: GET (a snapshot), then CLEAR of the whole slot.
    ClearLog,
    /// Per-vCPU dirty rings: collect, commit RESET flags, `KVM_RESET_DIRTY_RINGS`.
    DirtyRing,
}

impl LogMode {
    pub const ALL: [LogMode; 3] = [LogMode::DirtyLog, LogMode::ClearLog, LogMode::DirtyRing];

    pub fn name(self) -> &'static str {
        match self {
            LogMode::DirtyLog => "dirty-log",
            LogMode::ClearLog => "clear-log",
            LogMode::DirtyRing => "dirty-ring",
        }
    }
}

/// Parameters of one run.
#[derive(Debug, Clone, Serialize)]
pub struct SelftestConfig {
    pub mode: LogMode,
    pub vcpus: u32,
    /// Pages in the test slot; the default is 64·n + 3, so the slot's tail is not 64-aligned.
    pub pages: u64,
    pub iterations: u64,
    /// How long vCPUs run per iteration at least.
    pub interval: Duration,
    /// Ring entries per vCPU (ring mode); small enough to fill if below the writes per iteration.
    pub ring_entries: u32,
    pub seed: u64,
    /// A floor on writes per iteration (`TEST_MIN_WRITES_PER_ITERATION`).
    pub min_writes: u64,
    /// Give up on an iteration that has not reached `min_writes` after this long.
    pub iteration_timeout: Duration,
}

impl Default for SelftestConfig {
    fn default() -> Self {
        SelftestConfig {
            mode: LogMode::DirtyLog,
            vcpus: 1,
            pages: 64 * 64 + 3,
            iterations: 32,
            interval: Duration::from_millis(10),
            ring_entries: 1024,
            seed: 1,
            min_writes: 0x100,
            iteration_timeout: Duration::from_secs(60),
        }
    }
}

/// What one collection saw.
#[derive(Debug, Clone, Default)]
pub struct Collected {
    /// Ring mode: per vCPU, the page of the last entry harvested, if any.
    pub last_ring_pages: Vec<Option<u64>>,
    /// Ring entries harvested (ring mode) or dirty pages reported (bitmap modes).
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
    /// Ring-full exits so far (0 outside ring mode).
    fn ring_full_exits(&self) -> u64;
    /// Stop every vCPU and wait until none can write (a vCPU blocked on a full ring counts
    /// as stopped).
    fn stop(&mut self) -> Result<(), BackendError>;
    /// Collect dirty pages of the test slot into `bitmap` (OR), in the mode's way. In ring
    /// mode this also lets vCPUs blocked on a full ring continue (after the reset).
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
    pub iteration: u64,
    pub dirty: u64,
    pub clean: u64,
    pub writes: u64,
    pub collections: u64,
    pub ring_full_exits: u64,
}

/// A page that broke the protocol's invariant.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Violation {
    pub iteration: u64,
    pub page: u64,
    pub value: u64,
    /// Reported dirty by the collection while vCPUs ran / by the final one.
    pub dirty_while_running: bool,
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
    pub mode: LogMode,
    pub backend: String,
    pub iterations: u64,
    pub dirty: u64,
    pub clean: u64,
    pub writes: u64,
    pub ring_full_exits: u64,
    pub violations: Vec<Violation>,
}

impl Summary {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Errors that stop a run (violations do not: they are collected in the summary).
#[derive(Debug, thiserror::Error)]
pub enum SelftestError {
    #[error("backend failed: {0}")]
    Backend(#[from] BackendError),
    #[error("iteration {iteration}: the vCPUs made only {writes} writes in {secs} s (at least {min} needed); are they running?")]
    TooFewWrites {
        iteration: u64,
        writes: u64,
        min: u64,
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
    let ring = cfg.mode == LogMode::DirtyRing;
    let relaxed_ring = ring && b.ring_full_before_retire();
    let mut prev_last: Vec<u64> = Vec::new();
    let mut sum = Summary {
        mode: cfg.mode,
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
                    || (cfg.mode == LogMode::ClearLog && iteration == 1 && value == 0 && d0 && !d1)
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
