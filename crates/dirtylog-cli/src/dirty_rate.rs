//! `dirtylog dirty-rate`: how fast a guest dirties its memory, QEMU's `calc-dirty-rate` with
//! its three modes, measured on a test guest of known rate and set beside the guest's own
//! write counters.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args as ClapArgs, ValueEnum};
use dirtylog::TrackerKind;
use dirtylog_host::{
    HostBacking, HostDirtyTracker, HostMemory, HostMethod, HostRegion, HostTrackerConfig,
};
use dirtylog_testvm::dirty_rate::{
    self as rate, AtomicWords, DirtyRate, DirtyRateMode, Observer, TrackedRegion, WriterConfig,
    Writers,
};
use dirtylog_testvm::migrate::{GuestConfig, KvmSource};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::migrate::{bytes, parse_rate, Rate};
use crate::perf::parse_size;

const PAGE: u64 = 4096;
/// The guest's memory slot: region 1 of the source (0 is the system slot, 2 the device slot).
const GUEST_REGION: usize = 1;

/// Where the writes come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// A test guest on /dev/kvm running the dirtier (as `dirtylog demo` boots it).
    Guest,
    /// Memory of this process (--backing), written by --vcpus threads at --dirty-rate each;
    /// dirty-bitmap tracks it with dirtylog-host (--method). No dirty-ring: rings are KVM's,
    /// per vCPU.
    Host,
}

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// How to measure (QEMU's calc-dirty-rate modes).
    ///
    /// page-sampling: hash --sample-pages random 4 KiB pages per GiB, wait --calc-time-ms,
    /// hash them again; the share that changed times the memory. Costs two hash passes over
    /// the sample (a few hundred pages per GiB) and nothing else: no tracking, no write
    /// faults, so it works on any memory; an estimate, within about ±2·√(p(1−p)/n) of the
    /// dirty share p for n pages sampled.
    ///
    /// dirty-bitmap: turn on KVM's dirty log (KVM_GET_DIRTY_LOG) over the whole guest (with
    /// --source host, the dirtylog-host tracker, --method), sync, wait, sync again and count
    /// the pages set. Exact distinct pages; costs a write fault on every page's first write
    /// in the window and a bitmap harvest per sync.
    ///
    /// dirty-ring: per-vCPU dirty rings; each vCPU's rate is the entries its ring received in
    /// the window (the VM's is their sum). Tells which vCPU dirties; costs a write fault per
    /// page per ring reset and the reaper's harvests, and needs KVM_CAP_DIRTY_LOG_RING.
    #[arg(long, default_value = "page-sampling", value_parser = parse_mode, verbatim_doc_comment)]
    pub mode: DirtyRateMode,
    /// The measurement window in milliseconds (QEMU's calc-time, in its range 50..=60000).
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub calc_time_ms: u64,
    /// page-sampling: pages sampled per GiB of memory (QEMU's sample-pages: 128..=16384, at
    /// least one page per region). Default 512.
    #[arg(long, value_name = "N")]
    pub sample_pages: Option<u64>,
    /// dirty-ring: ring entries per vCPU, a power of two from 1024 to 65536. Default 4096.
    #[arg(long, value_name = "ENTRIES")]
    pub ring_entries: Option<u32>,
    /// Where the writes come from.
    #[arg(long, value_enum, default_value_t = Source::Guest)]
    pub source: Source,
    /// Memory, e.g. 1G, 256M (binary units).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub mem: u64,
    /// vCPUs (writer threads for --source host), each dirtying its share of the working set.
    #[arg(long, default_value_t = 2)]
    pub vcpus: u32,
    /// Pages each vCPU writes per second ("max" = as fast as it runs, a few tens of thousands
    /// on this nested host; 0 = idle).
    #[arg(long, value_name = "PAGES/S", default_value = "10000", value_parser = parse_rate)]
    pub dirty_rate: Rate,
    /// Memory the vCPUs write, all together (each its own share), e.g. 256M; at most --mem.
    /// A share smaller than a vCPU's writes in the window is rewritten, and the methods count
    /// a page once: the comparison with the guest's counters takes that into account.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_size)]
    pub working_set: u64,
    /// Write random pages of each share instead of sweeping it.
    #[arg(long)]
    pub random: bool,
    /// Milliseconds the guest runs before the measurement starts (at most a week).
    #[arg(long, default_value_t = 300, value_parser = crate::limits::millis)]
    pub warmup_ms: u64,
    /// Seed of page sampling's choice of pages.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Back guest memory with 4 KiB pages only (no MADV_HUGEPAGE).
    #[arg(long)]
    pub no_huge_pages: bool,
    /// --source host: the memory's backing, anon (4 KiB pages), memfd (shared, 4 KiB) or
    /// hugetlb (2 MiB pages from the reserved pool; a write dirties 2 MiB, and page sampling,
    /// which hashes 4 KiB, sees one changed 4 KiB per written huge page). Default anon.
    #[arg(long, value_name = "BACKING")]
    pub backing: Option<HostBacking>,
    /// --source host with --mode dirty-bitmap: how writes are tracked, async (userfaultfd
    /// write-protect, harvested with PAGEMAP_SCAN: no fault handling), sync (a thread handles
    /// each first write's fault) or mprotect (SIGSEGV per first write). Default async.
    #[arg(long, value_name = "METHOD")]
    pub method: Option<HostMethod>,
    /// Print one JSON document (docs/JSON.md) when done instead of text, and no progress bar.
    #[arg(long)]
    pub json: bool,
}

fn parse_mode(s: &str) -> Result<DirtyRateMode, String> {
    s.parse()
}

/// The options, checked before anything boots.
#[derive(Debug)]
struct Plan {
    calc_time: Duration,
    sample_pages: u64,
    tracker: TrackerKind,
}

impl Args {
    fn plan(&self) -> Result<Plan, String> {
        if !rate::CALC_TIME_MS.contains(&self.calc_time_ms) {
            return Err(format!(
                "--calc-time-ms {}: use {} to {} ms (QEMU's range)",
                self.calc_time_ms,
                rate::CALC_TIME_MS.start(),
                rate::CALC_TIME_MS.end()
            ));
        }
        let sample_pages = match (self.mode, self.sample_pages) {
            (DirtyRateMode::PageSampling, None) => rate::DEFAULT_SAMPLE_PAGES,
            (DirtyRateMode::PageSampling, Some(n)) if rate::SAMPLE_PAGES.contains(&n) => n,
            (DirtyRateMode::PageSampling, Some(n)) => {
                return Err(format!(
                    "--sample-pages {n}: use {} to {} pages per GiB (QEMU's range)",
                    rate::SAMPLE_PAGES.start(),
                    rate::SAMPLE_PAGES.end()
                ))
            }
            (m, Some(_)) => {
                return Err(format!(
                    "--sample-pages applies to --mode page-sampling, not to --mode {m}"
                ))
            }
            (_, None) => 0,
        };
        let tracker = match (self.mode, self.ring_entries) {
            (DirtyRateMode::DirtyRing, e) => {
                let entries = e.unwrap_or(TrackerKind::DEFAULT_RING_ENTRIES);
                let range = dirtylog_testvm::migrate::RING_ENTRIES;
                if !entries.is_power_of_two() || !range.contains(&entries) {
                    return Err(format!(
                        "--ring-entries {entries}: use a power of two from {} to {}",
                        range.start(),
                        range.end()
                    ));
                }
                TrackerKind::Ring { entries }
            }
            (m, Some(_)) => {
                return Err(format!(
                    "--ring-entries applies to --mode dirty-ring, not to --mode {m}"
                ))
            }
            // Page sampling tracks nothing; the bitmap is KVM_GET_DIRTY_LOG's.
            (_, None) => TrackerKind::DirtyLog,
        };
        if self.vcpus == 0 {
            return Err("--vcpus must be at least 1".into());
        }
        if self.mem == 0 || self.mem % PAGE != 0 {
            return Err(format!(
                "--mem {}: use a positive multiple of 4 KiB",
                self.mem
            ));
        }
        if self.working_set > self.mem {
            return Err(format!(
                "--working-set {} is larger than --mem {}: the vCPUs write inside the memory",
                bytes(self.working_set),
                bytes(self.mem)
            ));
        }
        if self.source == Source::Guest && self.working_set / PAGE < u64::from(self.vcpus) {
            return Err(format!(
                "--working-set {}: at least one page per vCPU ({} bytes)",
                self.working_set,
                u64::from(self.vcpus) * PAGE
            ));
        }
        if self.source == Source::Host {
            if self.no_huge_pages {
                return Err("--no-huge-pages applies to --source guest (use --backing)".into());
            }
            self.check_host()?;
        } else if self.backing.is_some() || self.method.is_some() {
            return Err("--backing and --method apply to --source host".into());
        }
        if self.mode == DirtyRateMode::DirtyRing {
            let caps = dirtylog_testvm::Caps::probe()
                .map_err(|e| format!("probing /dev/kvm for the dirty ring: {e}"))?;
            caps.require_ring().map_err(|e| {
                format!("--mode dirty-ring needs KVM's dirty ring, which this kernel lacks: {e}")
            })?;
        }
        Ok(Plan {
            calc_time: Duration::from_millis(self.calc_time_ms),
            sample_pages,
            tracker,
        })
    }

    /// --source host's own rules, checked before any memory is mapped.
    fn check_host(&self) -> Result<(), String> {
        if self.mode == DirtyRateMode::DirtyRing {
            return Err(
                "--mode dirty-ring needs per-vCPU dirty rings, which only KVM keeps: \
                 process memory has no vCPUs; use page-sampling or dirty-bitmap with --source \
                 host"
                    .into(),
            );
        }
        if self.method.is_some() && self.mode != DirtyRateMode::DirtyBitmap {
            return Err(format!(
                "--method applies to --mode dirty-bitmap (--mode {} tracks nothing)",
                self.mode
            ));
        }
        let backing = self.backing();
        let page = backing.page_size();
        if self.mem % page != 0 || self.working_set % page != 0 {
            return Err(format!(
                "--mem {} and --working-set {}: use multiples of the {} page size ({})",
                bytes(self.mem),
                bytes(self.working_set),
                backing,
                bytes(page)
            ));
        }
        if self.working_set / page < u64::from(self.vcpus) {
            return Err(format!(
                "--working-set {}: at least one {} page per writer thread",
                bytes(self.working_set),
                bytes(page)
            ));
        }
        if backing == HostBacking::HugeTlb {
            let need = self.mem / page;
            let free = dirtylog_host::free_huge_pages();
            if free < need {
                return Err(format!(
                    "--backing hugetlb needs {need} free 2 MiB huge pages and {free} are: \
                     reserve them in /proc/sys/vm/nr_hugepages"
                ));
            }
        }
        if self.mode == DirtyRateMode::DirtyBitmap {
            let method = self.method();
            let caps = dirtylog_host::probe();
            if !caps.works_on(method, backing) {
                let why = caps
                    .methods
                    .iter()
                    .find(|m| m.method == method)
                    .and_then(|m| m.backings.iter().find(|b| b.backing == backing))
                    .and_then(|b| b.why_not.clone())
                    .unwrap_or_else(|| "the probe failed".into());
                return Err(format!(
                    "--method {method} does not work here on {backing} memory: {why} (see \
                     `dirtylog caps`)"
                ));
            }
        }
        Ok(())
    }

    fn backing(&self) -> HostBacking {
        self.backing.unwrap_or(HostBacking::Anonymous)
    }

    fn method(&self) -> HostMethod {
        self.method.unwrap_or(HostMethod::Async)
    }

    fn guest_config(&self, tracker: TrackerKind) -> GuestConfig {
        GuestConfig {
            mem_bytes: self.mem,
            vcpus: self.vcpus,
            dirty_rate: self.dirty_rate.0,
            working_set_bytes: self.working_set,
            random: self.random,
            mailbox_every: 0,
            tracker,
            seed: 1,
            huge_pages: !self.no_huge_pages,
            ..GuestConfig::default()
        }
    }

    fn describe(&self) -> String {
        let who = match self.source {
            Source::Guest => "vCPU",
            Source::Host => "thread",
        };
        let r = match self.dirty_rate.0 {
            None => "as fast as it runs".to_string(),
            Some(0) => "idle".to_string(),
            Some(r) => format!("{r} pages/s per {who}"),
        };
        let pattern = if self.random { "random" } else { "sequential" };
        match self.source {
            Source::Guest => format!(
                "{} guest, {} vCPU(s), dirtier {r} over {} ({pattern})",
                bytes(self.mem),
                self.vcpus,
                bytes(self.working_set),
            ),
            Source::Host => format!(
                "{} of {} process memory{}, {} writer thread(s) {r} over {} ({pattern})",
                bytes(self.mem),
                self.backing(),
                if self.mode == DirtyRateMode::DirtyBitmap {
                    format!(" tracked by {}", self.method())
                } else {
                    String::new()
                },
                self.vcpus,
                bytes(self.working_set),
            ),
        }
    }
}

/// The guest's write counters, per vCPU, and when they were read.
type Reading = (Instant, Vec<u64>);

/// The write counters when the measurement window opened and when it closed.
#[derive(Default)]
struct Window {
    start: Option<Reading>,
    end: Option<Reading>,
}

/// Reads the writers' own counters (the guest's vCPUs', or the writer threads') when the
/// window opens and closes, and draws the bar.
struct Watch<'a> {
    counters: &'a dyn Fn() -> Vec<u64>,
    window: Window,
    bar: Option<ProgressBar>,
}

impl<'a> Watch<'a> {
    fn new(counters: &'a dyn Fn() -> Vec<u64>, bar: Option<ProgressBar>) -> Self {
        Watch {
            counters,
            window: Window::default(),
            bar,
        }
    }

    /// The counters' readings, the bar cleared away.
    fn finish(self) -> Window {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        self.window
    }
}

impl Observer for Watch<'_> {
    fn opened(&mut self) {
        self.window.start = Some((Instant::now(), (self.counters)()));
    }

    fn waiting(&mut self, elapsed: Duration, calc_time: Duration) {
        if let Some(bar) = &self.bar {
            bar.set_length(calc_time.as_millis() as u64);
            bar.set_position(elapsed.as_millis() as u64);
        }
    }

    fn closing(&mut self) {
        self.window.end = Some((Instant::now(), (self.counters)()));
    }
}

/// The window's progress on stderr when it is a terminal (and not --json), nothing otherwise.
fn progress_bar(enabled: bool, mode: DirtyRateMode, calc_time_ms: u64) -> Option<ProgressBar> {
    (enabled && std::io::stderr().is_terminal()).then(|| {
        let bar = ProgressBar::with_draw_target(Some(calc_time_ms), ProgressDrawTarget::stderr());
        if let Ok(style) =
            ProgressStyle::with_template("{spinner} {prefix} [{bar:24}] {pos}/{len} ms")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(mode.to_string());
        bar.enable_steady_tick(Duration::from_millis(100));
        bar
    })
}

/// One vCPU's line of the report.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct VcpuRate {
    id: u32,
    /// MiB/s (QEMU's `dirty-rate` of `vcpu-dirty-rate`, in MiB).
    dirty_rate: f64,
    dirty_pages_rate: f64,
    dirty_pages: u64,
    /// The vCPU's own write counter over the window, pages per second.
    guest_writes_rate: Option<f64>,
}

/// The writers' own account of the window: the guest's vCPUs, or the writer threads (then
/// `vcpus` counts the threads).
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Reference {
    mem: u64,
    vcpus: u32,
    /// Pages per second per vCPU (thread) asked for; null for as fast as it runs.
    requested_pages_rate_per_vcpu: Option<u64>,
    working_set: u64,
    random: bool,
    /// Page writes the vCPUs counted in the window.
    writes: u64,
    writes_rate: f64,
    /// The distinct pages those writes dirty (dirty-ring: every write, see docs/JSON.md).
    expected_dirty_pages: u64,
    expected_dirty_pages_rate: f64,
    /// The estimate's rate over the expected rate (1.0 = exact).
    accuracy: f64,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Report {
    mode: DirtyRateMode,
    source: Source,
    /// The window asked for, ms.
    requested_calc_time: u64,
    /// The window measured, ms (QEMU's calc-time).
    calc_time: u64,
    page_size: u64,
    total_pages: u64,
    dirty_pages: u64,
    /// MiB/s.
    dirty_rate: f64,
    dirty_pages_rate: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    sample_pages: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sampled_pages: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dirty_samples: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    vcpu_dirty_rate: Option<Vec<VcpuRate>>,
    /// --source guest: the guest's counters.
    #[serde(skip_serializing_if = "Option::is_none")]
    guest: Option<Reference>,
    /// --source host: the backing, the tracking method (dirty-bitmap), the writer threads'
    /// counters.
    #[serde(skip_serializing_if = "Option::is_none")]
    backing: Option<HostBacking>,
    #[serde(skip_serializing_if = "Option::is_none")]
    method: Option<HostMethod>,
    #[serde(skip_serializing_if = "Option::is_none")]
    writers: Option<Reference>,
}

const MIB: f64 = (1u64 << 20) as f64;

/// `share_pages`: each writer's share of the working set, in the writers' pages.
fn report(a: &Args, r: &DirtyRate, watch: &Window, share_pages: u64) -> Report {
    let window = |(s, e): (&Reading, &Reading)| {
        let t = e.0.saturating_duration_since(s.0);
        let w: Vec<u64> =
            s.1.iter()
                .zip(&e.1)
                .map(|(a, b)| b.wrapping_sub(*a))
                .collect();
        (t, w)
    };
    let reference = watch.start.as_ref().zip(watch.end.as_ref()).map(window);
    let share = share_pages;
    let account = reference.as_ref().map(|(t, w)| {
        let writes: u64 = w.iter().sum();
        let expected: f64 = match r.mode {
            DirtyRateMode::DirtyRing => writes as f64,
            _ => w
                .iter()
                .map(|&n| rate::expected_dirty_pages(n, share, a.random))
                .sum(),
        };
        let expected_rate = expected / t.as_secs_f64().max(1e-9);
        Reference {
            mem: a.mem,
            vcpus: a.vcpus,
            requested_pages_rate_per_vcpu: a.dirty_rate.0,
            working_set: a.working_set,
            random: a.random,
            writes,
            writes_rate: rate::per_second(writes, *t),
            expected_dirty_pages: expected.round() as u64,
            expected_dirty_pages_rate: expected_rate,
            accuracy: if expected_rate > 0.0 {
                r.pages_per_second() / expected_rate
            } else if r.dirty_pages == 0 {
                1.0
            } else {
                // Dirty pages with no writes: as far off as JSON can say (it has no infinity).
                f64::MAX
            },
        }
    });
    let vcpu_dirty_rate = r.vcpu_dirty_pages.as_ref().map(|v| {
        v.iter()
            .enumerate()
            .map(|(i, &p)| {
                let pps = rate::per_second(p, r.calc_time);
                VcpuRate {
                    id: i as u32,
                    dirty_rate: pps * r.page_size as f64 / MIB,
                    dirty_pages_rate: pps,
                    dirty_pages: p,
                    guest_writes_rate: reference
                        .as_ref()
                        .and_then(|(t, w)| w.get(i).map(|&n| rate::per_second(n, *t))),
                }
            })
            .collect()
    });
    let (guest, writers) = match a.source {
        Source::Guest => (account, None),
        Source::Host => (None, account),
    };
    Report {
        mode: r.mode,
        source: a.source,
        requested_calc_time: a.calc_time_ms,
        calc_time: r.calc_time.as_millis() as u64,
        page_size: r.page_size,
        total_pages: r.total_pages,
        dirty_pages: r.dirty_pages,
        dirty_rate: r.mib_per_second(),
        dirty_pages_rate: r.pages_per_second(),
        sample_pages: r.sample.map(|s| s.sample_pages),
        sampled_pages: r.sample.map(|s| s.sampled),
        dirty_samples: r.sample.map(|s| s.dirty_samples),
        vcpu_dirty_rate,
        guest,
        backing: (a.source == Source::Host).then(|| a.backing()),
        method: (a.source == Source::Host && a.mode == DirtyRateMode::DirtyBitmap)
            .then(|| a.method()),
        writers,
    }
}

fn print_text(rep: &Report, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "dirty rate ({}, {} ms measured of {} ms asked): {:.1} MiB/s, {:.0} pages/s ({} of {} pages of {} B)",
        rep.mode,
        rep.calc_time,
        rep.requested_calc_time,
        rep.dirty_rate,
        rep.dirty_pages_rate,
        rep.dirty_pages,
        rep.total_pages,
        rep.page_size
    )?;
    if let (Some(n), Some(d), Some(per)) = (rep.sampled_pages, rep.dirty_samples, rep.sample_pages)
    {
        writeln!(
            out,
            "  sampled {n} pages ({per} per GiB), {d} changed: ±{:.0}% of the dirty share (2σ)",
            sampling_margin(n, d) * 100.0
        )?;
    }
    for v in rep.vcpu_dirty_rate.iter().flatten() {
        write!(
            out,
            "  vCPU {}: {:.1} MiB/s, {:.0} pages/s",
            v.id, v.dirty_rate, v.dirty_pages_rate
        )?;
        if let Some(g) = v.guest_writes_rate {
            write!(out, "   (the vCPU counted {g:.0} writes/s)")?;
        }
        writeln!(out)?;
    }
    let whose = if rep.guest.is_some() {
        "guest's own counters"
    } else {
        "writer threads' counters"
    };
    if let Some(g) = rep.guest.as_ref().or(rep.writers.as_ref()) {
        writeln!(
            out,
            "{whose}: {} writes in the window, {:.0} writes/s; expected {:.0} dirty \
             pages/s{}; estimate/expected = {:.3}",
            g.writes,
            g.writes_rate,
            g.expected_dirty_pages_rate,
            if rep.mode == DirtyRateMode::DirtyRing {
                " (the ring counts every write)"
            } else if g.expected_dirty_pages < g.writes {
                " (pages rewritten in the window count once)"
            } else {
                ""
            },
            g.accuracy
        )?;
    }
    Ok(())
}

/// Two standard deviations of the sampled dirty share, relative to it (1.0 when nothing
/// was found dirty).
fn sampling_margin(n: u64, d: u64) -> f64 {
    if n == 0 || d == 0 {
        return 1.0;
    }
    let p = d as f64 / n as f64;
    2.0 * (p * (1.0 - p) / n as f64).sqrt() / p
}

pub fn run(a: Args) -> Result<ExitCode, String> {
    let plan = a.plan()?;
    if !a.json {
        println!(
            "== dirtylog dirty-rate --mode {}: {}, calc-time {} ms",
            a.mode,
            a.describe(),
            a.calc_time_ms
        );
    }
    let bar = progress_bar(!a.json, a.mode, a.calc_time_ms);
    let (measured, window, share) = match a.source {
        Source::Guest => measure_guest(&a, &plan, bar)?,
        Source::Host => measure_host(&a, &plan, bar)?,
    };
    let rep = report(&a, &measured, &window, share);
    if a.json {
        println!("{}", crate::json::document(&rep)?);
    } else {
        let mut out = std::io::stdout().lock();
        print_text(&rep, &mut out).map_err(|e| e.to_string())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// A measurement, the writers' counters around its window, and each writer's share of the
/// working set in its pages.
type Measured = (DirtyRate, Window, u64);

/// Boot the test guest, let it warm up, measure, shut it down.
fn measure_guest(a: &Args, plan: &Plan, bar: Option<ProgressBar>) -> Result<Measured, String> {
    let src = KvmSource::boot(&a.guest_config(plan.tracker))
        .map_err(|e| format!("booting the guest: {e}"))?;
    std::thread::sleep(Duration::from_millis(a.warmup_ms));
    let counters = || src.vcpu_writes();
    let mut watch = Watch::new(&counters, bar);
    let regions = [TrackedRegion {
        index: GUEST_REGION,
        npages: a.mem / PAGE,
    }];
    let measured = match a.mode {
        DirtyRateMode::PageSampling => {
            let guest = src.guest_memory();
            Ok(rate::page_sampling(
                &[&*guest],
                plan.sample_pages,
                plan.calc_time,
                a.seed,
                &mut watch,
            ))
        }
        DirtyRateMode::DirtyBitmap => {
            rate::dirty_bitmap(&src, &regions, PAGE, plan.calc_time, &mut watch)
        }
        DirtyRateMode::DirtyRing => rate::dirty_ring(
            &src,
            &|| src.dirty_ring_pushed(),
            &regions,
            PAGE,
            plan.calc_time,
            &mut watch,
        ),
    };
    let window = watch.finish();
    let shutdown = src.shutdown().map_err(|e| format!("the guest failed: {e}"));
    let measured = measured.map_err(|e| format!("measuring: {e}"))?;
    shutdown?;
    let share = a.working_set / PAGE / u64::from(a.vcpus);
    Ok((measured, window, share))
}

/// Map the memory, start the tracker (dirty-bitmap) and the writer threads, let them warm
/// up, measure, stop them.
fn measure_host(a: &Args, plan: &Plan, bar: Option<ProgressBar>) -> Result<Measured, String> {
    let backing = a.backing();
    let mem = Arc::new(
        HostMemory::new(a.mem, backing)
            .map_err(|e| format!("mapping {} of {backing} memory: {e}", bytes(a.mem)))?,
    );
    let page = mem.page_size();
    // The tracker registers the memory before any writer runs.
    let tracker = match a.mode {
        DirtyRateMode::DirtyBitmap => Some(
            HostDirtyTracker::new(
                vec![HostRegion::new(mem.clone())],
                HostTrackerConfig {
                    method: a.method(),
                    mode: TrackerKind::DirtyLog,
                },
            )
            .map_err(|e| format!("tracking the memory with {}: {e}", a.method()))?,
        ),
        _ => None,
    };
    let m = mem.clone();
    let store: rate::StoreWord = Arc::new(move |i, v| {
        if let Some(w) = m.words().get(i) {
            w.store(v, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let writers = Writers::spawn(
        WriterConfig {
            npages: mem.npages(),
            page_size: page,
            threads: a.vcpus,
            rate: a.dirty_rate.0,
            working_set_pages: a.working_set / page,
            random: a.random,
            seed: a.seed,
        },
        store,
    )
    .map_err(|e| format!("starting the writer threads: {e}"))?;
    std::thread::sleep(Duration::from_millis(a.warmup_ms));
    let counters = || writers.writes();
    let mut watch = Watch::new(&counters, bar);
    let measured = match (a.mode, &tracker) {
        (DirtyRateMode::PageSampling, _) => Ok(rate::page_sampling(
            &[&AtomicWords(mem.words())],
            plan.sample_pages,
            plan.calc_time,
            a.seed,
            &mut watch,
        )),
        (DirtyRateMode::DirtyBitmap, Some(t)) => rate::dirty_bitmap(
            t,
            &[TrackedRegion {
                index: 0,
                npages: mem.npages(),
            }],
            page,
            plan.calc_time,
            &mut watch,
        ),
        // Refused in `check_host`.
        _ => Err("process memory has no dirty rings".into()),
    };
    let window = watch.finish();
    writers.finish();
    drop(tracker);
    let measured = measured.map_err(|e| format!("measuring: {e}"))?;
    let share = a.working_set / page / u64::from(a.vcpus);
    Ok((measured, window, share))
}
