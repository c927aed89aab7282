//! The kernel's `dirty_log_perf_test`, written once and run on every backend.
//!
//! Each vCPU owns a partition of guest memory. Iteration 0 populates it (every page written
//! once); then logging is enabled, and every later iteration has each vCPU write every page of
//! its partition once while the host times it, then fetches the log (GET), and with manual
//! protect clears it (CLEAR), or harvests and resets the rings. Logging is disabled at the end.
//!
//! Where a backend can do the same collection without our layers (the KVM backend issuing
//! the bare ioctls), iterations alternate between the two so both run on the same state (every
//! page dirty) and the report gives our cost as a ratio of the bare one.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::selftest::BackendError;
use crate::TrackerKind;

/// Parameters of one run (the kernel test's `-v`, `-b`, `-i`, `-x`, `-g`).
#[derive(Debug, Clone, Serialize)]
pub struct PerfConfig {
    /// vCPUs, each writing its own partition of guest memory (`-v`).
    pub vcpus: u32,
    /// Bytes of guest memory per vCPU (`-b`).
    pub mem_per_vcpu: u64,
    /// Iterations after populating (`-i`).
    pub iterations: u32,
    /// Memslots the memory is split into (`-x`).
    pub slots: u32,
    /// How dirty pages are collected: [`TrackerKind::DirtyLog`] is GET that clears and
    /// re-protects (`-g`); [`TrackerKind::ClearLog`], manual protect with `INITIALLY_SET`,
    /// GET then CLEAR of each whole slot (the default); [`TrackerKind::Ring`], dirty rings of
    /// that many entries per vCPU, harvested then reset.
    pub tracker: TrackerKind,
}

impl Default for PerfConfig {
    fn default() -> Self {
        PerfConfig {
            vcpus: 1,
            mem_per_vcpu: 1 << 30,
            iterations: 2,
            slots: 1,
            tracker: TrackerKind::ClearLog,
        }
    }
}

/// Which implementation of a collection step to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layer {
    /// dirtylog's API.
    Ours,
    /// The bare kernel interface, without our layers.
    Bare,
}

/// A backend the perf protocol drives.
pub trait PerfBackend {
    /// A one-line description of the backend and its setup.
    fn describe(&self) -> String;
    /// Whether [`Layer::Bare`] is available.
    fn has_bare(&self) -> bool {
        false
    }
    /// Every vCPU writes every page of its partition once; returns when all are done.
    fn dirty_pass(&mut self, iteration: u64) -> Result<(), BackendError>;
    /// Turn `KVM_MEM_LOG_DIRTY_PAGES` on or off on every test slot.
    fn set_logging(&mut self, on: bool) -> Result<(), BackendError>;
    /// GET over every slot (with rings: harvest every ring). Returns pages (or entries) seen.
    fn get(&mut self, layer: Layer) -> Result<u64, BackendError>;
    /// CLEAR of every whole slot (with rings: commit and reset). Returns pages (or entries)
    /// given back.
    fn clear(&mut self, layer: Layer) -> Result<u64, BackendError>;
}

/// Times of one iteration.
#[derive(Debug, Clone, Serialize)]
pub struct PerfIteration {
    /// The iteration number, from 1.
    pub iteration: u32,
    /// Which implementation collected.
    pub layer: Layer,
    /// Seconds for every vCPU to write its partition once.
    pub dirty_memory_s: f64,
    /// Seconds of the GET step (ring: harvest).
    pub get_s: f64,
    /// Seconds of the CLEAR step (ring: commit and reset; 0 for dirty-log).
    pub clear_s: f64,
    /// Pages (or ring entries) the GET step returned.
    pub pages: u64,
}

/// The report, with the kernel test's metric names.
#[derive(Debug, Clone, Serialize)]
pub struct PerfReport {
    /// The backend's [`describe`](PerfBackend::describe).
    pub backend: String,
    /// The parameters of the run.
    pub config: PerfConfig,
    /// "Populate memory time": seconds of iteration 0 (every page written once).
    pub populate_s: f64,
    /// "Enabling dirty logging time", in seconds.
    pub enable_logging_s: f64,
    /// Every iteration after populating.
    pub iterations: Vec<PerfIteration>,
    /// "Disabling dirty logging time", in seconds.
    pub disable_logging_s: f64,
    /// Average GET seconds of our iterations ([`Layer::Ours`]).
    pub get_avg_s: f64,
    /// Average CLEAR seconds of our iterations.
    pub clear_avg_s: f64,
    /// Average GET seconds of the bare interface, when the backend has one.
    pub bare_get_avg_s: Option<f64>,
    /// Average CLEAR seconds of the bare interface, when the backend has one.
    pub bare_clear_avg_s: Option<f64>,
    /// (ours GET + CLEAR) ÷ (bare GET + CLEAR).
    pub overhead_ratio: Option<f64>,
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn timed<T>(f: impl FnOnce() -> Result<T, BackendError>) -> Result<(T, f64), BackendError> {
    let t = Instant::now();
    let v = f()?;
    Ok((v, secs(t.elapsed())))
}

fn avg(v: impl Iterator<Item = f64>) -> Option<f64> {
    let (n, s) = v.fold((0u32, 0.0), |(n, s), x| (n + 1, s + x));
    (n > 0).then(|| s / n as f64)
}

/// Run the protocol. `on_line` gets each line of the kernel test's text output.
pub fn run<B: PerfBackend + ?Sized>(
    b: &mut B,
    cfg: &PerfConfig,
    mut on_line: impl FnMut(&str),
) -> Result<PerfReport, BackendError> {
    let ((), populate_s) = timed(|| b.dirty_pass(0))?;
    on_line(&format!("Populate memory time: {populate_s:.6}s"));
    let ((), enable_logging_s) = timed(|| b.set_logging(true))?;
    on_line(&format!(
        "Enabling dirty logging time: {enable_logging_s:.6}s"
    ));
    let mut iterations = Vec::new();
    for i in 1..=cfg.iterations {
        let layer = if b.has_bare() && i % 2 == 0 {
            Layer::Bare
        } else {
            Layer::Ours
        };
        let ((), dirty_memory_s) = timed(|| b.dirty_pass(i as u64))?;
        let (pages, get_s) = timed(|| b.get(layer))?;
        let (_, clear_s) = if cfg.tracker == TrackerKind::DirtyLog {
            (0, 0.0)
        } else {
            timed(|| b.clear(layer))?
        };
        let tag = if layer == Layer::Bare { " (bare)" } else { "" };
        on_line(&format!(
            "Iteration {i} dirty memory time: {dirty_memory_s:.6}s"
        ));
        on_line(&format!(
            "Iteration {i} get dirty log time{tag}: {get_s:.6}s ({pages} pages)"
        ));
        if cfg.tracker != TrackerKind::DirtyLog {
            on_line(&format!(
                "Iteration {i} clear dirty log time{tag}: {clear_s:.6}s"
            ));
        }
        iterations.push(PerfIteration {
            iteration: i,
            layer,
            dirty_memory_s,
            get_s,
            clear_s,
            pages,
        });
    }
    let ((), disable_logging_s) = timed(|| b.set_logging(false))?;
    on_line(&format!(
        "Disabling dirty logging time: {disable_logging_s:.6}s"
    ));
    let of = |l: Layer, f: fn(&PerfIteration) -> f64| {
        avg(iterations.iter().filter(|it| it.layer == l).map(f))
    };
    let get_avg_s = of(Layer::Ours, |it| it.get_s).unwrap_or(0.0);
    let clear_avg_s = of(Layer::Ours, |it| it.clear_s).unwrap_or(0.0);
    let bare_get_avg_s = of(Layer::Bare, |it| it.get_s);
    let bare_clear_avg_s = of(Layer::Bare, |it| it.clear_s);
    let overhead_ratio = match (bare_get_avg_s, bare_clear_avg_s) {
        (Some(g), Some(c)) if g + c > 0.0 => Some((get_avg_s + clear_avg_s) / (g + c)),
        _ => None,
    };
    let n = iterations
        .iter()
        .filter(|it| it.layer == Layer::Ours)
        .count();
    on_line(&format!(
        "Get dirty log over {n} iterations took {:.6}s. (Avg {get_avg_s:.6}s/iteration)",
        get_avg_s * n as f64
    ));
    if cfg.tracker != TrackerKind::DirtyLog {
        on_line(&format!(
            "Clear dirty log over {n} iterations took {:.6}s. (Avg {clear_avg_s:.6}s/iteration)",
            clear_avg_s * n as f64
        ));
    }
    if let (Some(g), Some(c), Some(r)) = (bare_get_avg_s, bare_clear_avg_s, overhead_ratio) {
        on_line(&format!(
            "Bare interface: get avg {g:.6}s, clear avg {c:.6}s; ours / bare = {r:.3}x"
        ));
    }
    Ok(PerfReport {
        backend: b.describe(),
        config: cfg.clone(),
        populate_s,
        enable_logging_s,
        iterations,
        disable_logging_s,
        get_avg_s,
        clear_avg_s,
        bare_get_avg_s,
        bare_clear_avg_s,
        overhead_ratio,
    })
}
