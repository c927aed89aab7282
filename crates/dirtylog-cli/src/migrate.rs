//! `dirtylog migrate send|receive`: live migration of a KVM guest between two processes.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args as ClapArgs, Subcommand, ValueEnum};
use dirtylog_migrate::{
    listen, receive, Address, AutoConverge, Compression, DirtyTracker, MigrateError,
    MigrationSource, Phase, Progress, ReceiveConfig, ReceiveReport, SendConfig, SendReport,
    TimeoutPolicy, TrackerKind, Verify,
};
use dirtylog_testvm::migrate::{GuestConfig, KvmSource, TargetOptions};
use dirtylog_testvm::target::AnyTarget;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::perf::parse_size;

// Parsed once per process: the size of the arguments does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Boot a KVM guest running a tunable dirtier and migrate it live to a receiver.
    ///
    /// Pre-copy: a bulk pass of all memory (zero pages as markers), then rounds of the pages
    /// dirtied meanwhile (the KVM tracker's log merged with the VMM's own writes), until the
    /// expected downtime fits --downtime-ms (and, with --settle, while rounds keep halving);
    /// then the guest is paused, the rest and the vCPU state are sent, the receiver resumes
    /// the guest once this side commits, and every memslot is checked (--verify). If anything
    /// fails before the commit, or the receiver reports a failed check after it, this guest
    /// is resumed and the command exits non-zero; if the link is lost after the commit, the
    /// guest stays paused here until `dirtylog migrate recover` decides. Bounded: at most --max-rounds rounds (each at
    /// most the guest's memory) and --timeout-s seconds before switchover.
    Send(SendArgs),
    /// Wait for one migration, run the guest it brings, and report it.
    ///
    /// Builds an empty KVM VM with the memory layout the stream announces, fills it, loads
    /// the vCPU states, and resumes the guest only when the source commits; every memslot's
    /// digest is checked before (--verify strict on the sender) or right after (background,
    /// the default) the resume, and a failed check stops the guest and exits non-zero. Prints the bound
    /// address first ("listening on ADDR"; with --json, a {"event":"listening"} line).
    Receive(ReceiveArgs),
    /// Answer a `migrate send` that lost the link after it committed (outcome unknown) and
    /// keeps its guest paused: resume it there, or discard it because the destination runs it.
    Recover(crate::recover::RecoverArgs),
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnTimeout {
    /// Give up: resume this guest and exit non-zero.
    Cancel,
    /// Switch over anyway, accepting a longer downtime.
    Switchover,
}

/// The guest to boot and its workload.
#[derive(ClapArgs, Debug, Clone)]
pub struct GuestArgs {
    /// Guest memory, e.g. 1G, 256M (binary units).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub mem: u64,
    /// vCPUs, each dirtying its share of the working set.
    #[arg(long, default_value_t = 2)]
    pub vcpus: u32,
    /// Pages each vCPU writes per second (0 = an idle guest; "max" = as fast as it runs,
    /// a few tens of thousands on this nested host).
    #[arg(long, value_name = "PAGES/S", default_value = "10000", value_parser = parse_rate)]
    pub dirty_rate: Rate,
    /// Memory the vCPUs write, all together (each its own share), e.g. 64M.
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_size)]
    pub working_set: u64,
    /// Write random pages of each share instead of sweeping it.
    #[arg(long)]
    pub random: bool,
    /// Guest writes between two mailbox requests (an `out` on which the VMM writes guest
    /// memory, tracked in its own dirty bitmap); 0 = never.
    #[arg(long, default_value_t = 1000)]
    pub mailbox_every: u64,
    /// Milliseconds the guest runs before the migration starts (at most a week).
    #[arg(long, default_value_t = 500, value_parser = crate::limits::millis)]
    pub warmup_ms: u64,
    /// Back guest memory with 4 KiB pages only (no MADV_HUGEPAGE): untouched memory then
    /// costs a page fault per 4 KiB when the bulk pass scans it.
    #[arg(long)]
    pub no_huge_pages: bool,
    /// Boot this kernel on the minimal PC instead of the built-in dirtier (--mem and --vcpus
    /// shape the PC; the dirtier's options do not apply). Its serial output is shown line by
    /// line, and goes on at the destination.
    #[command(flatten)]
    pub kernel: crate::run::KernelArgs,
}

/// A dirty rate: pages per second, or unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate(pub Option<u64>);

pub fn parse_rate(s: &str) -> Result<Rate, String> {
    if s.eq_ignore_ascii_case("max") {
        return Ok(Rate(None));
    }
    s.parse()
        .map(|n| Rate(Some(n)))
        .map_err(|_| format!("'{s}' is not a number of pages per second (or \"max\")"))
}

/// How to migrate.
#[derive(ClapArgs, Debug, Clone)]
pub struct MigrationArgs {
    /// Dirty tracking on the source: dirty-log (KVM_GET_DIRTY_LOG, which clears and
    /// re-protects), clear-log (manual protect with INITIALLY_SET: GET snapshots,
    /// KVM_CLEAR_DIRTY_LOG per 1 GiB chunk just before the chunk is sent), ring or
    /// ring:ENTRIES (per-vCPU dirty rings, 4096 entries unless given, harvested and reset every
    /// round and whenever half full).
    #[arg(long, value_name = "TRACKER", default_value_t = TrackerKind::ClearLog)]
    pub tracker: TrackerKind,
    /// Dirty ring entries per vCPU, for --tracker ring (same as ring:ENTRIES): a power of two,
    /// 1024..=65536.
    #[arg(long, value_name = "ENTRIES")]
    pub ring_entries: Option<u32>,
    /// Switch over once the expected downtime is at most this many milliseconds (at most a
    /// week): the dirty bytes ÷ the measured bandwidth, plus the last harvest's time, plus the
    /// pause, state save and resume measured by a probe at setup (the guest stops once for a
    /// few ms), plus in strict verification the part of the memory digest the final round
    /// does not hide. A downtime above the limit is reported as such.
    #[arg(long, default_value_t = 300, value_parser = crate::limits::millis)]
    pub downtime_ms: u64,
    /// Limit on bytes per second over all connections, e.g. 100M (binary units).
    #[arg(long, value_name = "BYTES/S", value_parser = parse_size)]
    pub max_bandwidth: Option<u64>,
    /// Compress each run of pages before sending it: lz4 (fast, modest ratios), zstd (at
    /// level 1) or zstd:LEVEL. Runs that do not shrink go as they are, and --max-bandwidth
    /// counts the bytes sent: worth it on links slower than the codec (see BENCHMARKS.md), a
    /// loss on loopback.
    #[arg(long, value_name = "CODEC", value_parser = parse_compress)]
    pub compress: Option<Compression>,
    /// TCP connections, each carrying a share of every round (1..=64). Default: one per CPU
    /// core, at most 4 — on 2 cores, 2 connections took the final round of a 64 MiB working
    /// set from ~40 to ~20 ms (BENCHMARKS.md, issue 9).
    #[arg(long, default_value_t = crate::limits::default_connections(), value_parser = crate::limits::connections)]
    pub connections: usize,
    /// Most seconds from the start until switchover (1 to a week); then --on-timeout applies.
    #[arg(long, default_value_t = 60, value_parser = crate::limits::seconds_nonzero)]
    pub timeout_s: u64,
    /// Most pre-copy rounds after the bulk pass; then --on-timeout applies.
    #[arg(long, default_value_t = 30)]
    pub max_rounds: u64,
    /// What to do when pre-copy does not converge in time.
    #[arg(long, value_enum, default_value_t = OnTimeout::Cancel)]
    pub on_timeout: OnTimeout,
    /// Throttle the vCPUs (QEMU's auto-converge: 20%, +10% per step, at most 99%) while the
    /// guest dirties memory faster than half the bandwidth.
    #[arg(long)]
    pub auto_converge: bool,
    /// Cap each vCPU's dirty rate at this many pages per second while migrating (QEMU's
    /// dirty-limit): only the vCPUs that dirty faster are slowed, each held out of the guest
    /// for the share of every 10 ms that brings its rate down, as measured from its dirty
    /// ring (so it needs --tracker ring; on this PVM host the ring counts every guest write,
    /// not every page). Lifted when the migration ends or fails.
    #[arg(long, value_name = "PAGES/S", value_parser = clap::value_parser!(u64).range(1..))]
    pub dirty_limit: Option<u64>,
    /// When the destination's memory is proven equal to the source's paused memory.
    /// background (default): the destination resumes at once, the source digests its paused
    /// memory while the guest runs there and lets go only when the destination's page hashes
    /// match (on a mismatch the destination guest is stopped and the source's resumes); no
    /// downtime for the check, the source keeps the guest ~50 ms per GiB of written memory
    /// longer (never-written memory costs a page-table walk). strict: the check is done
    /// before the destination resumes; the blackout waits for whatever of the digest the
    /// final round does not hide. off: no check.
    #[arg(long, default_value_t = Verify::Background, value_parser = parse_verify)]
    pub verify: Verify,
    /// Once the expected downtime fits the limit, keep sending rounds while each at least
    /// halves the dirty set, and switch over when it stops shrinking (within --max-rounds and
    /// --timeout-s): the downtime is then what the guest's working set forces, usually far
    /// below the limit, for a few short extra rounds. false: switch over at the first
    /// estimate that fits, as QEMU does.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub settle: bool,
    #[command(flatten)]
    pub tls: crate::tls::SendTlsArgs,
}

fn parse_verify(s: &str) -> Result<Verify, String> {
    s.parse()
}

fn parse_compress(s: &str) -> Result<Compression, String> {
    s.parse()
}

#[derive(ClapArgs, Debug)]
pub struct SendArgs {
    /// The receiver, HOST:PORT or unix:PATH (where `dirtylog migrate receive --listen`
    /// listens).
    #[arg(long, value_name = "ADDR")]
    pub to: String,
    #[command(flatten)]
    pub guest: GuestArgs,
    #[command(flatten)]
    pub migration: MigrationArgs,
    /// Print JSON lines instead of text (and no progress bar): a progress event at most every
    /// 100 ms while migrating, then one completed or failed event with the statistics
    /// (docs/JSON.md).
    #[arg(long)]
    pub json: bool,
    /// Draw the migration into this SVG file: pages per round, expected and measured downtime
    /// against the limit, throttle. If it cannot be written, the statistics are printed all
    /// the same, the error goes to stderr and the exit status is 3.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<std::path::PathBuf>,
    /// If the link fails after this side committed the switchover (outcome unknown: the
    /// destination may run the guest), keep the guest paused and wait for
    /// `dirtylog migrate recover --socket PATH resume|stop` on this Unix socket (default
    /// $TMPDIR/dirtylog-recover-PID.sock).
    #[arg(long, value_name = "PATH")]
    pub recover_socket: Option<std::path::PathBuf>,
    /// Seconds to wait for that decision (1 to a week); then the paused copy is discarded
    /// (the process ends) and the command says so.
    #[arg(long, default_value_t = 600, value_parser = crate::limits::seconds_nonzero)]
    pub recover_timeout_s: u64,
}

#[derive(ClapArgs, Debug)]
pub struct ReceiveArgs {
    /// Where to listen, HOST:PORT (port 0 picks a free one, printed first) or unix:PATH (a
    /// Unix socket, created; the path must not exist).
    #[arg(long, value_name = "ADDR")]
    pub listen: String,
    /// Seconds to wait for the sender to connect (0 = for ever; else at most a week).
    #[arg(long, default_value_t = 120, value_parser = crate::limits::seconds)]
    pub accept_timeout_s: u64,
    /// Most seconds from the first connection to the guest running (1 to a week); after that
    /// the receiver gives up and exits non-zero (the guest never ran).
    #[arg(long, default_value_t = 300, value_parser = crate::limits::seconds_nonzero)]
    pub timeout_s: u64,
    /// Milliseconds to run the migrated guest, reporting its progress, before exiting (at
    /// most a week).
    #[arg(long, default_value_t = 1000, value_parser = crate::limits::millis)]
    pub run_for_ms: u64,
    /// Most guest memory to accept, e.g. 16G (binary units); a stream announcing more is
    /// refused before any memory is allocated. Default: this host's physical memory.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_memory: Option<u64>,
    /// Print JSON lines (listening, completed, samples, done) instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
}

/// This host's physical memory in bytes (`MemTotal` of /proc/meminfo), if known.
fn host_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

pub fn run(cmd: Cmd) -> Result<ExitCode, String> {
    match cmd {
        Cmd::Send(a) => run_send(a),
        Cmd::Receive(a) => run_receive(a),
        Cmd::Recover(a) => crate::recover::run(a),
    }
}

impl MigrationArgs {
    /// --tracker, with --ring-entries applied to a ring.
    pub fn tracker_kind(&self) -> Result<TrackerKind, String> {
        let kind = crate::tracker::with_ring_entries(self.tracker, self.ring_entries)?;
        if self.dirty_limit.is_some() && kind.ring_entries().is_none() {
            return Err(format!(
                "--dirty-limit measures each vCPU's dirty rate from its dirty ring, and \
                 --tracker is {kind}: add --tracker ring (or drop --dirty-limit)"
            ));
        }
        Ok(kind)
    }
}

impl GuestArgs {
    pub fn config(&self, m: &MigrationArgs) -> Result<GuestConfig, String> {
        if self.vcpus == 0 {
            return Err("--vcpus must be at least 1".into());
        }
        if self.mem == 0 || self.mem % 4096 != 0 {
            return Err(format!(
                "--mem {}: use a positive multiple of 4 KiB (e.g. 1G, 256M)",
                self.mem
            ));
        }
        Ok(GuestConfig {
            mem_bytes: self.mem,
            vcpus: self.vcpus,
            dirty_rate: self.dirty_rate.0,
            working_set_bytes: self.working_set.min(self.mem),
            random: self.random,
            mailbox_every: self.mailbox_every,
            tracker: m.tracker_kind()?,
            seed: 1,
            huge_pages: !self.no_huge_pages,
            ..GuestConfig::default()
        })
    }

    pub fn describe(&self) -> String {
        if let Some(k) = &self.kernel.kernel {
            return format!(
                "{} PC, {} vCPU(s), kernel {}{}",
                bytes(self.mem),
                self.vcpus,
                k.display(),
                if self.kernel.append.is_empty() {
                    String::new()
                } else {
                    format!(" {}", self.kernel.append)
                }
            );
        }
        let rate = match self.dirty_rate.0 {
            None => "as fast as it runs".to_string(),
            Some(0) => "idle".to_string(),
            Some(r) => format!("{r} pages/s per vCPU"),
        };
        format!(
            "{} guest, {} vCPU(s), dirtier {} over {} ({}), mailbox every {} writes",
            bytes(self.mem),
            self.vcpus,
            rate,
            bytes(self.working_set.min(self.mem)),
            if self.random { "random" } else { "sequential" },
            self.mailbox_every
        )
    }
}

impl MigrationArgs {
    pub fn config(&self) -> Result<SendConfig, String> {
        // --timeout-s is at least 1 s (crate::limits): a migration is always bounded.
        Ok(SendConfig {
            connections: self.connections,
            downtime_limit: Duration::from_millis(self.downtime_ms),
            max_bandwidth: self.max_bandwidth,
            compress: self.compress,
            max_rounds: self.max_rounds,
            timeout: Some(Duration::from_secs(self.timeout_s)),
            on_timeout: match self.on_timeout {
                OnTimeout::Cancel => TimeoutPolicy::Cancel,
                OnTimeout::Switchover => TimeoutPolicy::Switchover,
            },
            auto_converge: self.auto_converge.then(AutoConverge::default),
            dirty_limit: self.dirty_limit,
            verify: self.verify,
            settle: self.settle,
            io_timeout: Duration::from_secs(30),
            ack_timeout: Duration::from_secs(60),
            ..SendConfig::default()
        })
    }
}

/// Resolve `HOST:PORT`, or take `unix:PATH`.
pub fn resolve(addr: &str) -> Result<Address, String> {
    addr.parse::<Address>().map_err(|e| e.to_string())
}

/// Binary size for humans.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The progress display: an indicatif bar on stderr when it is a terminal, nothing otherwise.
pub struct ProgressView {
    bar: Option<ProgressBar>,
    phase: Option<(Phase, u64)>,
}

impl ProgressView {
    pub fn new(enabled: bool) -> Self {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(Some(1), ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template(
                "{spinner} {prefix:>10} [{bar:24}] {percent:>3}% {msg}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        });
        ProgressView { bar, phase: None }
    }

    pub fn update(&mut self, p: &Progress) {
        let Some(bar) = &self.bar else { return };
        if self.phase != Some((p.phase, p.round)) {
            self.phase = Some((p.phase, p.round));
            bar.set_prefix(match p.phase {
                Phase::Setup => "setup".to_string(),
                Phase::Bulk => "bulk".to_string(),
                Phase::Iterating => format!("round {}", p.round),
                Phase::Switchover => "switchover".to_string(),
                Phase::WaitingForAck => "checking".to_string(),
                Phase::Verifying => "verifying".to_string(),
                Phase::Completed => "done".to_string(),
            });
        }
        // Length and position together, so that no frame shows one round's against the other's.
        bar.update(|s| {
            s.set_len(p.round_pages.max(1));
            s.set_pos(p.round_done_pages);
        });
        let mut msg = format!("{} sent", bytes(p.transferred));
        if p.round > 0 {
            msg += &format!(
                ", {:.0} Mbit/s, dirty {}/s, downtime ~{} ms",
                p.mbps, p.dirty_pages_rate, p.expected_downtime_ms
            );
        }
        if p.throttle > 0 {
            msg += &format!(", throttle {}%", p.throttle);
        }
        bar.set_message(msg);
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// The outcome of a migration of a booted source, for printing.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SendSummary {
    pub status: &'static str,
    pub tracker: &'static str,
    pub guest: GuestSummary,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration: Option<SendReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The source guest's writes when the migration ended.
    pub source_writes: u64,
    /// Mailbox requests served by the source VMM.
    pub source_mailbox_served: u64,
    /// After a failure: the source guest's writes a little later (it runs on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_writes_after: Option<u64>,
    /// With --kernel: the bytes the guest wrote to its serial port on the source (its
    /// progress; `source-writes` counts them too).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_serial_bytes: Option<u64>,
}

#[derive(Serialize, Clone)]
#[serde(rename_all = "kebab-case")]
pub struct GuestSummary {
    pub memory: u64,
    pub vcpus: u32,
    pub dirty_rate: Option<u64>,
    pub working_set: u64,
    pub random: bool,
    pub mailbox_every: u64,
}

impl GuestSummary {
    pub fn of(g: &GuestArgs) -> Self {
        GuestSummary {
            memory: g.mem,
            vcpus: g.vcpus,
            dirty_rate: g.dirty_rate.0,
            working_set: g.working_set.min(g.mem),
            random: g.random,
            mailbox_every: g.mailbox_every,
        }
    }
}

/// Explain a send failure: what happened, and what to do when it is a connection problem.
pub fn explain(e: &MigrateError, to: &Address) -> String {
    if let MigrateError::Connect { source, .. } = e {
        let hint = match source.kind() {
            std::io::ErrorKind::ConnectionRefused => {
                " — is `dirtylog migrate receive` listening?".to_string()
            }
            std::io::ErrorKind::TimedOut => {
                " — is the receiver's host reachable, and the port open?".to_string()
            }
            std::io::ErrorKind::NotFound => {
                " — no socket there: is `dirtylog migrate receive` listening?".to_string()
            }
            _ => String::new(),
        };
        let what = match source.kind() {
            std::io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
            _ => source.to_string(),
        };
        return format!("could not connect to {to}: {what}{hint}");
    }
    e.to_string()
}

/// Boot, warm up and migrate; the summary, and whether it completed.
pub fn migrate_guest(
    guest: &GuestArgs,
    migration: &MigrationArgs,
    to: Address,
    show_progress: bool,
    json_progress: bool,
    say: &mut dyn FnMut(&str),
    decide: Decide<'_>,
) -> Result<SendSummary, String> {
    // Refuse bad migration options (such as --dirty-limit without a ring, TLS files that do
    // not load, or plain TCP off this host) before any work.
    migration.tracker_kind()?;
    let client = migration.tls.client(&to)?;
    if let Some(kernel) = guest.kernel.load()? {
        return migrate_pc(
            guest,
            kernel,
            migration,
            to,
            show_progress,
            json_progress,
            say,
            decide,
        );
    }
    let cfg = guest.config(migration)?;
    let config = migration.config()?;
    let src = KvmSource::boot(&cfg).map_err(|e| format!("booting the guest: {e}"))?;
    say(&format!(
        "source: booted a {} (tracker {})",
        guest.describe(),
        cfg.tracker.name()
    ));
    let (w0, t0) = (src.guest_writes(), Instant::now());
    std::thread::sleep(Duration::from_millis(guest.warmup_ms));
    let rate = (src.guest_writes() - w0) as f64 / t0.elapsed().as_secs_f64().max(1e-3);
    say(&format!(
        "source: guest writes {rate:.0} pages/s; migrating to {to} over {} connection(s) ({})",
        config.connections,
        client.describe()
    ));
    let progress = (show_progress, json_progress);
    let mut summary = send_and_summarize(
        &src,
        guest,
        &config,
        (to, &client),
        progress,
        |s| s.guest_writes(),
        decide,
    );
    summary.source_mailbox_served = src.mailbox_served();
    if let Err(e) = src.shutdown() {
        say(&format!("source: stopping the guest: {e}"));
    }
    Ok(summary)
}

/// Migrate `src` to `to` with a progress bar, and summarize; `progress` reads the guest's
/// progress (writes, or serial bytes), which the summary shows at the end and, after a
/// failure, again 200 ms later (the source guest was resumed and runs on).
/// Who decides, when a migration's outcome is unknown, what becomes of the source's paused
/// copy: the operator (`migrate send`), or a harness that sees both sides (`demo`).
pub type Decide<'a> = &'a mut dyn FnMut(&MigrateError) -> crate::recover::Decision;

#[allow(clippy::too_many_arguments)]
fn send_and_summarize<S: MigrationSource>(
    src: &S,
    guest: &GuestArgs,
    config: &SendConfig,
    (to, client): (Address, &crate::tls::Client),
    (show_progress, json_progress): (bool, bool),
    progress: impl Fn(&S) -> u64,
    decide: Decide<'_>,
) -> SendSummary {
    let mut view = ProgressView::new(show_progress);
    let mut events = crate::events::ProgressEvents::new(json_progress);
    let result = client.send(src, &to, config, &mut |p| {
        view.update(p);
        events.update(p);
    });
    view.finish();
    let mut summary = SendSummary {
        status: "completed",
        tracker: src.tracker().kind().name(),
        guest: GuestSummary::of(guest),
        migration: None,
        error: None,
        source_writes: progress(src),
        source_mailbox_served: 0,
        source_writes_after: None,
        source_serial_bytes: None,
    };
    match result {
        Ok(report) => summary.migration = Some(report),
        // Committed, then lost track of the destination: the guest stays paused here until
        // someone who knows decides.
        Err(e @ MigrateError::OutcomeUnknown(_)) => {
            summary.status = "outcome-unknown";
            let decision = decide(&e);
            let resolved = match decision {
                crate::recover::Decision::Resume => {
                    match dirtylog_migrate::Vcpus::resume(src.vcpus()) {
                        Ok(()) => "resolved: the guest runs here again".to_string(),
                        Err(r) => format!("resuming the guest here failed: {r}"),
                    }
                }
                crate::recover::Decision::Stop => {
                    "resolved: this copy is discarded (the destination runs the guest)".into()
                }
            };
            summary.error = Some(format!("{}; {resolved}", explain(&e, &to)));
            if decision == crate::recover::Decision::Resume {
                std::thread::sleep(Duration::from_millis(200));
                summary.source_writes_after = Some(progress(src));
            }
        }
        Err(e) => {
            summary.status = "failed";
            summary.error = Some(explain(&e, &to));
            std::thread::sleep(Duration::from_millis(200));
            summary.source_writes_after = Some(progress(src));
        }
    }
    summary
}

/// A console that hands the guest's serial output to `line`, a line at a time (or every 64
/// bytes of a line that goes on).
pub fn line_console(line: impl Fn(&str) + Send + Sync + 'static) -> dirtylog_testvm::pc::Console {
    let buf = std::sync::Mutex::new(Vec::<u8>::with_capacity(64));
    Arc::new(move |b: u8| {
        let mut g = dirtylog::sync::lock(&buf);
        if b != b'\n' && b != b'\r' {
            g.push(b);
        }
        if b == b'\n' || g.len() >= 64 {
            line(&String::from_utf8_lossy(&g).escape_debug().to_string());
            g.clear();
        }
    })
}

/// [`migrate_guest`] for a kernel on the minimal PC.
#[allow(clippy::too_many_arguments)]
fn migrate_pc(
    guest: &GuestArgs,
    kernel: crate::run::Kernel,
    migration: &MigrationArgs,
    to: Address,
    show_progress: bool,
    json_progress: bool,
    say: &mut dyn FnMut(&str),
    decide: Decide<'_>,
) -> Result<SendSummary, String> {
    use dirtylog_testvm::pc::{Pc, PcConfig};
    let config = migration.config()?;
    let client = migration.tls.client(&to)?;
    let cfg = PcConfig {
        mem_bytes: guest.mem,
        smp: guest.vcpus,
        tracker: migration.tracker_kind()?,
        huge_pages: !guest.no_huge_pages,
    };
    let quiet = !show_progress;
    let console = line_console(move |l| {
        if !quiet {
            eprintln!("  source guest| {l}");
        }
    });
    let log: dirtylog_testvm::pc::Log = Arc::new(|m: &str| eprintln!("  source PC: {m}"));
    let src = Pc::new(&cfg, console, log).map_err(|e| format!("building the PC: {e}"))?;
    let initrd = kernel.initrd.as_ref().map(|(b, c)| (&b[..], c.as_str()));
    src.boot(&kernel.image, &kernel.cmdline, initrd)
        .map_err(|e| format!("booting the kernel: {e}"))?;
    say(&format!(
        "source: booted a {} (tracker {})",
        guest.describe(),
        cfg.tracker.name()
    ));
    std::thread::sleep(Duration::from_millis(guest.warmup_ms));
    if let Some(e) = src.exit() {
        return Err(format!("the guest ended before the migration: {e}"));
    }
    src.check().map_err(|e| format!("the guest failed: {e}"))?;
    say(&format!(
        "source: the guest wrote {} serial bytes in {} ms; migrating to {to} over {} connection(s) ({})",
        src.serial_bytes(),
        guest.warmup_ms,
        config.connections,
        client.describe()
    ));
    let mut summary = send_and_summarize(
        &src,
        guest,
        &config,
        (to, &client),
        (show_progress, json_progress),
        Pc::serial_bytes,
        decide,
    );
    summary.source_serial_bytes = Some(summary.source_writes);
    if let Err(e) = src.shutdown() {
        say(&format!("source: stopping the guest: {e}"));
    }
    Ok(summary)
}

/// How the destination's memory was checked, in words: `check_ms` to compare the digests,
/// `after_resume_ms` from the guest's resume to the end of a background check.
pub fn check_phrase(verify: Verify, check_ms: u64, after_resume_ms: u64) -> String {
    match verify {
        Verify::Strict => format!(
            "every memslot's digest matched before the guest resumed (compared in {check_ms} ms)"
        ),
        Verify::Background => format!(
            "every memslot's digest matched, checked while the guest ran ({after_resume_ms} ms \
             after it resumed)"
        ),
        Verify::Off => "memory not checked (--verify off)".to_string(),
    }
}

/// The human summary of a completed migration: QEMU-named totals and the per-round table.
pub fn print_report(r: &SendReport, out: &mut dyn Write) -> std::io::Result<()> {
    let s = &r.stats;
    let final_round = r.rounds.iter().find(|x| x.is_final);
    writeln!(
        out,
        "total-time {} ms · downtime {} ms · setup-time {} ms · transferred {} ({} bytes) · \
         rounds {} · switchover {:?}",
        s.total_time,
        s.downtime,
        s.setup_time,
        bytes(s.transferred),
        s.transferred,
        r.rounds.len(),
        r.switchover
    )?;
    writeln!(
        out,
        "normal {} pages · duplicate (zero) {} pages · mbps {:.0} · dirty-sync-count {} · \
         dirty-pages-rate {} · expected-downtime {} ms · cpu-throttle-percentage {}% · {} \
         connection(s) · guest memory {}",
        s.normal,
        s.duplicate,
        s.mbps,
        s.dirty_sync_count,
        s.dirty_pages_rate,
        s.expected_downtime,
        r.cpu_throttle_percentage,
        r.connections,
        bytes(r.total)
    )?;
    if let Some(f) = final_round {
        writeln!(
            out,
            "final round (guest paused): {} dirty pages, {} sent, {} zero",
            f.stats.dirty_pages, f.stats.sent_pages, f.stats.zero_pages
        )?;
    }
    let ms = |us: u64| us as f64 / 1000.0;
    let phases = |b: &dirtylog_migrate::DowntimeBreakdown| {
        format!(
            "pause {:.1} · state {:.1} · final-round {:.1} · verify {:.1} · resume {:.1}",
            ms(b.pause),
            ms(b.state),
            ms(b.final_round),
            ms(b.verify),
            ms(b.resume)
        )
    };
    writeln!(
        out,
        "downtime {} ms (ms: {}); expected {} ms (ms: {})",
        s.downtime,
        phases(&r.downtime_breakdown),
        s.expected_downtime,
        phases(&r.expected_downtime_breakdown)
    )?;
    match r.verify {
        dirtylog_migrate::Verify::Strict => writeln!(
            out,
            "verify strict: every byte checked before the destination resumed"
        )?,
        dirtylog_migrate::Verify::Background => writeln!(
            out,
            "verify background: every byte checked {} ms after the destination resumed, \
             before the source let go",
            r.verify_time
        )?,
        dirtylog_migrate::Verify::Off => writeln!(out, "verify off: memory not checked")?,
    }
    if let Some(codec) = r.compression.codec {
        let z = &r.compression;
        writeln!(
            out,
            "compression {codec}: {} pages ({}) sent as {} ({:.2}x) · {} pages did not shrink",
            z.pages,
            bytes(z.pages * u64::from(r.page_size)),
            bytes(z.compressed_size),
            z.compression_rate,
            z.incompressible_pages
        )?;
    }
    if r.downtime_limit_exceeded {
        writeln!(
            out,
            "downtime {} ms EXCEEDED the limit of {} ms (expected {} ms)",
            s.downtime, r.downtime_limit, s.expected_downtime
        )?;
    }
    writeln!(
        out,
        "{:>5} {:>11} {:>10} {:>10} {:>12} {:>10} {:>9} {:>8} {:>16} {:>17} {:>8}",
        "round",
        "dirty-pages",
        "sent-pages",
        "zero-pages",
        "transferred",
        "harvest-us",
        "send-ms",
        "mbps",
        "dirty-pages-rate",
        "expected-downtime",
        "throttle"
    )?;
    for x in &r.rounds {
        writeln!(
            out,
            "{:>5} {:>11} {:>10} {:>10} {:>12} {:>10} {:>9.1} {:>8.0} {:>16} {:>17} {:>7}%{}",
            x.stats.round,
            x.stats.dirty_pages,
            x.stats.sent_pages,
            x.stats.zero_pages,
            bytes(x.transferred),
            x.stats.harvest_time_us,
            x.stats.send_time_us as f64 / 1000.0,
            x.stats.mbps,
            x.dirty_pages_rate,
            if x.stats.round == 0 {
                "-".to_string()
            } else {
                format!("{} ms", x.expected_downtime)
            },
            x.cpu_throttle_percentage,
            if x.is_final { "  final" } else { "" }
        )?;
    }
    let unpopulated: u64 = r.rounds.iter().map(|x| x.stats.unpopulated_pages).sum();
    if unpopulated > 0 {
        writeln!(
            out,
            "(bulk pass: {unpopulated} pages never populated on the source, neither read nor sent)"
        )?;
    }
    Ok(())
}

fn run_send(mut a: SendArgs) -> Result<ExitCode, String> {
    let to = resolve(&a.to)?;
    a.migration.tls.default_server_name(&a.to);
    let json = a.json;
    let mut say = |m: &str| {
        if !json {
            eprintln!("{m}");
        }
    };
    if let Some(p) = &a.plot {
        crate::events::check_plot_path(p)?;
    }
    let socket = a
        .recover_socket
        .clone()
        .unwrap_or_else(crate::recover::default_socket);
    let wait = Duration::from_secs(a.recover_timeout_s);
    let mut decide = |_: &MigrateError| {
        let mut tell = |m: &str| eprintln!("{m}");
        crate::recover::wait_for_operator(&socket, wait, &mut tell).unwrap_or_else(|| {
            eprintln!(
                "no decision within {} s: discarding this copy of the guest",
                wait.as_secs()
            );
            crate::recover::Decision::Stop
        })
    };
    let summary = migrate_guest(
        &a.guest,
        &a.migration,
        to.clone(),
        !json,
        json,
        &mut say,
        &mut decide,
    )?;
    let plot = crate::events::PlotResult::write(a.plot.as_deref(), summary.migration.as_ref());
    if json {
        crate::json::print_line(&plot.outcome(summary.migration.is_some(), &summary))?;
    } else {
        let mut out = std::io::stdout().lock();
        let w = |e: std::io::Error| e.to_string();
        match (&summary.migration, &summary.error) {
            (Some(report), _) => {
                writeln!(
                    out,
                    "migration completed: the guest runs at {to}; {}",
                    check_phrase(report.verify, 0, report.verify_time)
                )
                .map_err(w)?;
                print_report(report, &mut out).map_err(w)?;
            }
            (None, Some(e)) => {
                writeln!(out, "migration failed: {e}").map_err(w)?;
                if let Some(after) = summary.source_writes_after {
                    writeln!(
                        out,
                        "the source guest runs on: writes {} → {} 200 ms later",
                        summary.source_writes, after
                    )
                    .map_err(w)?;
                }
            }
            (None, None) => {}
        }
    }
    plot.say(json);
    Ok(if summary.migration.is_none() {
        ExitCode::from(1)
    } else if plot.error.is_some() {
        ExitCode::from(crate::events::PlotResult::FAILED_STATUS)
    } else {
        ExitCode::SUCCESS
    })
}

/// One line of the receiver's JSON output.
#[derive(Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    Listening {
        address: String,
    },
    Completed {
        report: ReceiveReport,
        #[serde(rename = "guest-writes")]
        guest_writes: u64,
    },
    Sample {
        ms: u64,
        #[serde(rename = "guest-writes")]
        guest_writes: u64,
        #[serde(rename = "mailbox-served")]
        mailbox_served: u64,
        #[serde(rename = "mailbox-seq")]
        mailbox_seq: u64,
    },
    Done {
        #[serde(rename = "guest-writes")]
        guest_writes: u64,
        advanced: bool,
    },
    Failed {
        error: String,
    },
    /// A line of the migrated kernel's serial output.
    Serial {
        line: String,
    },
    /// The migrated kernel ended its machine.
    GuestExit {
        status: i32,
        how: String,
    },
}

fn emit(json: bool, e: &Event, text: impl FnOnce() -> String) {
    let line = if json {
        crate::json::line(e)
            .unwrap_or_else(|_| "{\"schema-version\":1,\"event\":\"failed\"}".into())
    } else {
        text()
    };
    let mut out = std::io::stdout().lock();
    // Stdout gone (the demo died): nothing useful to do about it.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn run_receive(a: ReceiveArgs) -> Result<ExitCode, String> {
    let json = a.json;
    let addr = resolve(&a.listen)?;
    let tls = a.tls.config()?;
    a.tls.check_plain(&addr, "--listen", tls.is_some())?;
    let listener = listen(&addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let bound = listener
        .local_addr()
        .map_err(|e| format!("cannot read the bound address: {e}"))?;
    emit(
        json,
        &Event::Listening {
            address: bound.to_string(),
        },
        || format!("listening on {bound}"),
    );
    let mut config = ReceiveConfig {
        accept_timeout: (a.accept_timeout_s > 0).then(|| Duration::from_secs(a.accept_timeout_s)),
        // Connections that are not the sender's are dropped, and the receive goes on: say so.
        on_refused: Some(Arc::new(|line: &str| {
            eprintln!("receiver: refused a connection: {line}")
        })),
        ..ReceiveConfig::default()
    };
    if let Some(max) = a.max_memory.or_else(host_memory) {
        config.max_guest_memory = config.max_guest_memory.min(max);
    }
    // The whole receive is bounded: past the deadline, exit without ever running the guest.
    let done = Arc::new(AtomicBool::new(false));
    let limit = Duration::from_secs(a.accept_timeout_s.max(1) + a.timeout_s.max(1));
    {
        let done = done.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            while t.elapsed() < limit {
                std::thread::sleep(Duration::from_millis(100));
                if done.load(Ordering::Acquire) {
                    return;
                }
            }
            let msg = format!("no completed migration within {limit:?}; giving up");
            emit(json, &Event::Failed { error: msg.clone() }, || {
                format!("receive failed: {msg}")
            });
            std::process::exit(1);
        });
    }
    let console = line_console(move |l| {
        emit(
            json,
            &Event::Serial {
                line: l.to_string(),
            },
            || format!("guest| {l}"),
        )
    });
    let log: dirtylog_testvm::pc::Log = Arc::new(|m: &str| eprintln!("receiver PC: {m}"));
    let make = |h: &dirtylog_migrate::wire::StreamHeader| {
        AnyTarget::new(h, &TargetOptions::default(), console, log)
    };
    let received = match tls {
        None => receive(&listener, &config, make),
        Some(tls) => receive(
            &dirtylog_migrate::transport::tls::TlsListener::new(listener, tls)
                .with_handshake_timeout(config.handshake_timeout),
            &config,
            make,
        ),
    };
    done.store(true, Ordering::Release);
    let (target, report) = match received {
        Ok(x) => x,
        Err(e) => {
            let msg = e.to_string();
            emit(json, &Event::Failed { error: msg.clone() }, || {
                format!("receive failed (the guest never ran here): {msg}")
            });
            return Ok(ExitCode::from(1));
        }
    };
    let w0 = target.progress();
    emit(
        json,
        &Event::Completed {
            report: report.clone(),
            guest_writes: w0,
        },
        || {
            format!(
                "received {} ({} pages with data, {} zero) in {} rounds over {} connection(s) \
                 in {} ms; {}; the guest runs here ({} ms from the sender's Prepare){}",
                bytes(report.transferred),
                report.normal,
                report.duplicate,
                report.rounds,
                report.connections,
                report.total_time,
                match &report.warning {
                    Some(_) => "the end could not be confirmed".to_string(),
                    None => check_phrase(
                        report.verify,
                        report.hash_check_time,
                        report.verify_after_resume_time,
                    ),
                },
                report.resume_time,
                report
                    .warning
                    .as_ref()
                    .map(|w| format!("\nWARNING: {w}"))
                    .unwrap_or_default()
            )
        },
    );
    let start = Instant::now();
    let step = Duration::from_millis(200);
    let mut last = w0;
    while start.elapsed() < Duration::from_millis(a.run_for_ms) {
        std::thread::sleep(step.min(Duration::from_millis(a.run_for_ms)));
        if let Err(e) = target.check() {
            let msg = format!("the migrated guest failed: {e}");
            emit(json, &Event::Failed { error: msg.clone() }, || msg.clone());
            return Ok(ExitCode::from(1));
        }
        if let Some(e) = target.exit() {
            emit(
                json,
                &Event::GuestExit {
                    status: e.code(),
                    how: e.to_string(),
                },
                || format!("{e} (exit status {})", e.code()),
            );
            break;
        }
        let w = target.progress();
        let seq = match &target {
            AnyTarget::Harness(t) => t.mailbox_record(0).0,
            AnyTarget::Pc(_) => 0,
        };
        emit(
            json,
            &Event::Sample {
                ms: start.elapsed().as_millis() as u64,
                guest_writes: w,
                mailbox_served: target.mailbox_served(),
                mailbox_seq: seq,
            },
            || {
                format!(
                    "  +{:>5} ms  guest writes {w} (+{})  mailbox requests served here {}",
                    start.elapsed().as_millis(),
                    w - last,
                    target.mailbox_served()
                )
            },
        );
        last = w;
    }
    let w1 = target.progress();
    let advanced = w1 > w0;
    emit(
        json,
        &Event::Done {
            guest_writes: w1,
            advanced,
        },
        || format!("guest writes {w0} → {w1} while running here; stopping it"),
    );
    target.shutdown().map_err(|e| e.to_string())?;
    Ok(ExitCode::SUCCESS)
}
