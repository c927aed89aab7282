//! `dirtylog snapshot create|restore|verify|merge|info`: incremental snapshots of a KVM test
//! guest into a directory (docs/SNAPSHOT.md), through `dirtylog-snapshot`.
//!
//! `create` boots the guest `demo` boots (or a `--kernel` on the minimal PC) and writes a
//! full snapshot and diffs; `restore` rebuilds the guest in the VM `migrate receive` builds
//! (`AnyTarget`) and runs it, showing its progress as the receiver does. Bad option
//! combinations are refused before any guest boots (exit 2); a failed snapshot, restore or
//! check exits 1.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args as ClapArgs, Parser, Subcommand};
use dirtylog_migrate::wire::StreamHeader;
use dirtylog_migrate::{MigrationSource, TrackerKind, VcpuRestore};
use dirtylog_snapshot::{
    Chain, CreateConfig, Progress, RestoreOptions, SnapshotError, SnapshotMode, SnapshotStats,
    Snapshotter,
};
use dirtylog_testvm::migrate::{KvmSource, TargetOptions};
use dirtylog_testvm::pc::{self, Pc, PcConfig};
use dirtylog_testvm::snapshot::RestoredGuest;
use dirtylog_testvm::target::AnyTarget;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::migrate::{bytes, line_console, GuestArgs, MigrationArgs};

// Parsed once per process: the size of the arguments does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Boot a guest and snapshot it into DIR: a full snapshot DIR/0, then with --count N the
    /// diffs DIR/1.. (each only the pages dirtied since the one before), --every-ms apart.
    ///
    /// With --parent DIR/N, the chain ending at DIR/N is restored instead, run for --run-ms,
    /// and the next member is a diff against it (a chain across processes). Each member is written under a temporary name, fsynced and renamed: a
    /// killed create leaves every earlier member intact and the new one absent or complete.
    Create(CreateArgs),
    /// Rebuild the guest from the chain ending at DIR (the full snapshot, then each diff),
    /// check its memory against the snapshot's hash, run it for --run-ms and show its
    /// progress. A missing, corrupt or mismatched member is refused, naming it, before
    /// anything runs.
    Restore(RestoreArgs),
    /// Check the chain ending at DIR: every member's manifest, parent link, file lengths and
    /// chunk checksums, and the memory hash of the state the chain rebuilds.
    Verify(VerifyArgs),
    /// Squash the chain ending at DIR into one full snapshot, INTO/0 (INTO a new or empty
    /// directory: the merged snapshot starts a chain there).
    Merge(MergeArgs),
    /// Describe a snapshot member or chain: kind, parent, guest memory, pages, sizes.
    Info(InfoArgs),
}

#[derive(ClapArgs, Debug)]
pub struct CreateArgs {
    /// The chain's directory (created if missing): DIR/0 the full snapshot, DIR/1.. diffs.
    /// A DIR that already holds a chain needs --parent.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// stop: pause the guest, write, resume. live: copy memory while the guest runs (rounds
    /// of the pages it dirties, at most --max-rounds), then pause for the last dirty pages
    /// and the vCPU/device state. background: pause only to save the vCPU/device state and
    /// write-protect memory (userfaultfd), then save each page before the guest's first
    /// write to it and the rest in the background.
    #[arg(long, default_value = "stop", value_parser = parse_mode)]
    pub mode: SnapshotMode,
    /// Members to write in this run: the full snapshot (or, with --parent, a diff) and then
    /// N−1 diffs.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub count: u32,
    /// Milliseconds from the start of one member to the start of the next, or from the end of
    /// one that took longer (the issue's `--every MS`; the unit is in the name as in every
    /// other option). Needs --count 2 or more; default 1000.
    #[arg(long, value_name = "MS", value_parser = crate::limits::millis)]
    pub every_ms: Option<u64>,
    /// Continue the chain ending at this member: restore it, run it for --run-ms, and write
    /// a diff against it (into DIR; numbered after the parent when the parent is in DIR).
    #[arg(long, value_name = "DIR")]
    pub parent: Option<PathBuf>,
    /// With --parent: milliseconds the restored guest runs before the first diff (default
    /// 500).
    #[arg(long, value_name = "MS", value_parser = crate::limits::millis)]
    pub run_ms: Option<u64>,
    /// live: most copy rounds while the guest runs before the final pause.
    #[arg(long, default_value_t = 8)]
    pub max_rounds: u32,
    /// Dirty tracking: dirty-log, clear-log, ring or ring:ENTRIES (as `migrate send`).
    #[arg(long, value_name = "TRACKER", default_value_t = TrackerKind::ClearLog)]
    pub tracker: TrackerKind,
    /// Dirty ring entries per vCPU, for --tracker ring.
    #[arg(long, value_name = "ENTRIES")]
    pub ring_entries: Option<u32>,
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Print JSON lines instead of text (and no progress bar): one `snapshot` event per
    /// member, then `completed` or `failed` (docs/JSON.md).
    #[arg(long)]
    pub json: bool,
}

#[derive(ClapArgs, Debug)]
pub struct RestoreArgs {
    /// The chain's last member to restore (e.g. DIR/3).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Resume the guest before its memory is loaded: each page is served from the chain on
    /// its first touch (userfaultfd), the rest is loaded in the background.
    #[arg(long)]
    pub lazy: bool,
    /// Milliseconds to run the restored guest, reporting its progress (at most a week).
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = crate::limits::millis)]
    pub run_ms: u64,
    /// Print JSON lines (restored, samples, done) instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(ClapArgs, Debug)]
pub struct VerifyArgs {
    /// The chain's last member (e.g. DIR/3).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(ClapArgs, Debug)]
pub struct MergeArgs {
    /// The chain's last member (e.g. DIR/3).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// The chain directory to write the merged full snapshot into, as its member 0 (created
    /// if missing; refused if it holds a chain).
    #[arg(long, value_name = "INTO")]
    pub into: PathBuf,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(ClapArgs, Debug)]
pub struct InfoArgs {
    /// A member (DIR/N) or a chain's directory.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

fn parse_mode(s: &str) -> Result<SnapshotMode, String> {
    s.parse::<SnapshotMode>().map_err(|e| e.to_string())
}

pub fn run(cmd: Cmd) -> Result<ExitCode, String> {
    match cmd {
        Cmd::Create(a) => create(a),
        Cmd::Restore(a) => restore(a),
        Cmd::Verify(a) => verify(a),
        Cmd::Merge(a) => merge(a),
        Cmd::Info(a) => info(a),
    }
}

// ---------------------------------------------------------------------------------------
// Output

/// One line of `create`'s and `restore`'s JSON output.
#[derive(Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
enum Event {
    /// A member was written.
    Snapshot(MemberReport),
    /// `create` wrote every member.
    Completed {
        members: usize,
        #[serde(rename = "bytes-written")]
        bytes_written: u64,
        #[serde(rename = "wall-time-ms")]
        wall_time_ms: u64,
        #[serde(rename = "guest-writes")]
        guest_writes: u64,
    },
    /// `restore`: the guest runs.
    Restored(RestoreReport),
    Sample {
        ms: u64,
        #[serde(rename = "guest-writes")]
        guest_writes: u64,
    },
    Serial {
        line: String,
    },
    GuestExit {
        status: i32,
        how: String,
    },
    Done {
        #[serde(rename = "guest-writes")]
        guest_writes: u64,
        advanced: bool,
    },
    Failed {
        error: String,
        /// `create`: the members written before the failure (all usable).
        #[serde(rename = "members-written", skip_serializing_if = "Option::is_none")]
        members_written: Option<usize>,
    },
}

/// A written member, in the JSON style (times with their unit).
#[derive(Serialize, Clone)]
#[serde(rename_all = "kebab-case")]
struct MemberReport {
    path: String,
    kind: String,
    mode: String,
    pages: u64,
    bytes_written: u64,
    pause_us: u64,
    duration_ms: u64,
    rounds: u32,
    /// Megabits per second written over the member's duration.
    mbps: f64,
    guest_writes: u64,
}

impl MemberReport {
    fn of(s: &SnapshotStats, mode: SnapshotMode, guest_writes: u64) -> Self {
        MemberReport {
            path: s.path.display().to_string(),
            kind: s.kind.to_string(),
            mode: mode.to_string(),
            pages: s.pages,
            bytes_written: s.bytes_written,
            pause_us: s.pause.as_micros() as u64,
            duration_ms: s.duration.as_millis() as u64,
            rounds: s.rounds,
            mbps: mbps(s.bytes_written, s.duration),
            guest_writes,
        }
    }

    fn text(&self) -> String {
        format!(
            "{} ({} {}): {} pages, {} written in {} ms ({:.0} Mbit/s), guest paused {:.1} ms{}",
            self.path,
            self.kind,
            self.mode,
            self.pages,
            bytes(self.bytes_written),
            self.duration_ms,
            self.mbps,
            self.pause_us as f64 / 1000.0,
            if self.rounds > 0 {
                format!(", {} rounds", self.rounds)
            } else {
                String::new()
            }
        )
    }
}

/// A restore, in the JSON style.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct RestoreReport {
    path: String,
    members: Vec<String>,
    lazy: bool,
    /// The library's statistics (kebab-case keys).
    stats: serde_json::Value,
    /// The restored memory's hash matched the snapshot's (`memory-xxh3`).
    memory_checked: bool,
    guest_writes: u64,
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 * 8.0 / 1e6 / d.as_secs_f64().max(1e-6)
}

fn emit(json: bool, e: &Event, text: impl FnOnce() -> String) {
    let line = if json {
        crate::json::line(e)
            .unwrap_or_else(|_| "{\"schema-version\":1,\"event\":\"failed\"}".into())
    } else {
        text()
    };
    let mut out = std::io::stdout().lock();
    // Stdout gone: nothing useful to do about it.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// A progress bar on stderr when it is a terminal and the output is text.
fn progress_bar(enabled: bool) -> Option<ProgressBar> {
    (enabled && std::io::stderr().is_terminal()).then(|| {
        let bar = ProgressBar::with_draw_target(Some(1), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} {prefix:>10} [{bar:24}] {percent:>3}% {bytes}/{total_bytes} {bytes_per_sec}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.enable_steady_tick(Duration::from_millis(100));
        bar
    })
}

/// The library's progress callback driving `bar`.
fn progress_fn(bar: &Option<ProgressBar>) -> Option<Arc<dyn Fn(Progress) + Send + Sync>> {
    let bar = bar.clone()?;
    Some(Arc::new(move |p: Progress| {
        bar.set_prefix(p.phase);
        bar.update(|s| {
            s.set_len(p.total_bytes.max(1));
            s.set_pos(p.done_bytes.min(p.total_bytes.max(1)));
        });
    }))
}

fn finish_bar(bar: &Option<ProgressBar>) {
    if let Some(b) = bar {
        b.finish_and_clear();
    }
}

// ---------------------------------------------------------------------------------------
// create

/// `--tracker`/`--ring-entries` as the migration options `GuestArgs::config` reads.
fn migration_args(
    tracker: TrackerKind,
    ring_entries: Option<u32>,
) -> Result<MigrationArgs, String> {
    #[derive(Parser)]
    struct P {
        #[command(flatten)]
        m: MigrationArgs,
    }
    let mut argv = vec![
        "snapshot".to_string(),
        "--tracker".into(),
        tracker.to_string(),
    ];
    if let Some(n) = ring_entries {
        argv.extend(["--ring-entries".into(), n.to_string()]);
    }
    P::try_parse_from(argv)
        .map(|p| p.m)
        .map_err(|e| e.to_string())
}

/// Whether `dir` holds a chain already (a member `0`, or any numbered member).
fn holds_chain(dir: &Path) -> Result<Option<PathBuf>, String> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", dir.display())),
    };
    for entry in rd {
        let entry = entry.map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
        let name = entry.file_name();
        if name.to_str().is_some_and(|n| n.parse::<u64>().is_ok()) {
            return Ok(Some(entry.path()));
        }
    }
    Ok(None)
}

impl CreateArgs {
    /// Refuse bad combinations before any work.
    fn check(&self) -> Result<(), String> {
        if self.every_ms.is_some() && self.count < 2 {
            return Err(
                "--every-ms is the time between members: it needs --count 2 or more".into(),
            );
        }
        if self.run_ms.is_some() && self.parent.is_none() {
            return Err(
                "--run-ms is how long the restored parent runs before its diff: it needs --parent"
                    .into(),
            );
        }
        if self.parent.is_some() && self.guest.kernel.kernel.is_some() {
            return Err(
                "--parent restores the guest from its chain: --kernel (and the other guest \
                 options) do not apply"
                    .into(),
            );
        }
        if self.dir.exists() && !self.dir.is_dir() {
            return Err(format!(
                "{} exists and is not a directory",
                self.dir.display()
            ));
        }
        if self.parent.is_none() {
            if let Some(m) = holds_chain(&self.dir)? {
                return Err(format!(
                    "{} already holds a chain ({}): continue it with --parent {}/N, or use an \
                     empty directory",
                    self.dir.display(),
                    m.display(),
                    self.dir.display()
                ));
            }
        }
        crate::tracker::with_ring_entries(self.tracker, self.ring_entries)?;
        Ok(())
    }

    fn config(&self, progress: Option<Arc<dyn Fn(Progress) + Send + Sync>>) -> CreateConfig {
        CreateConfig {
            mode: self.mode,
            max_rounds: self.max_rounds,
            progress,
            ..CreateConfig::default()
        }
    }
}

/// What a create run reports at the end.
struct CreateOutcome {
    members: Vec<MemberReport>,
    error: Option<String>,
    guest_writes: u64,
}

/// Take `a.count` members of `src` with `snap`, `every` apart; `progress` reads the guest's
/// progress. Stops at the first error (earlier members stay as they are).
fn take_all<S: MigrationSource>(
    src: &S,
    mut snap: Snapshotter<'_, S>,
    a: &CreateArgs,
    progress: &dyn Fn(&S) -> u64,
) -> CreateOutcome {
    let every = Duration::from_millis(a.every_ms.unwrap_or(1000));
    let mut members = Vec::new();
    let mut error = None;
    let mut next = Instant::now();
    for i in 0..a.count {
        if i > 0 {
            // A member that took longer than --every-ms delays the next one, and the schedule
            // goes on from there (no burst to catch up).
            next = (next + every).max(Instant::now());
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        let bar = progress_bar(!a.json);
        let r = snap.take(&a.config(progress_fn(&bar)));
        finish_bar(&bar);
        match r {
            Ok(s) => {
                let m = MemberReport::of(&s, a.mode, progress(src));
                emit(a.json, &Event::Snapshot(m.clone()), || m.text());
                members.push(m);
            }
            Err(e) => {
                error = Some(explain(&e));
                break;
            }
        }
    }
    if let Err(e) = snap.finish() {
        error.get_or_insert_with(|| format!("stopping dirty tracking: {}", explain(&e)));
    }
    CreateOutcome {
        members,
        error,
        guest_writes: progress(src),
    }
}

/// A snapshot error in words (the library's say what is at fault and what to do).
fn explain(e: &SnapshotError) -> String {
    e.to_string()
}

fn create(a: CreateArgs) -> Result<ExitCode, String> {
    a.check()?;
    let t0 = Instant::now();
    let json = a.json;
    let say = |m: &str| {
        if !json {
            eprintln!("{m}");
        }
    };
    let outcome = if let Some(parent) = &a.parent {
        create_from_parent(&a, parent, &say)?
    } else if let Some(kernel) = a.guest.kernel.load()? {
        create_pc(&a, kernel, &say)?
    } else {
        let m = migration_args(a.tracker, a.ring_entries)?;
        let cfg = a.guest.config(&m)?;
        let src = KvmSource::boot(&cfg).map_err(|e| format!("booting the guest: {e}"))?;
        say(&format!(
            "booted a {} (tracker {})",
            a.guest.describe(),
            cfg.tracker.name()
        ));
        std::thread::sleep(Duration::from_millis(a.guest.warmup_ms));
        let outcome = match Snapshotter::new(&src, &a.dir, None) {
            Ok(snap) => take_all(&src, snap, &a, &|s: &KvmSource| s.guest_writes()),
            Err(e) => CreateOutcome {
                members: Vec::new(),
                error: Some(explain(&e)),
                guest_writes: src.guest_writes(),
            },
        };
        if let Err(e) = src.shutdown() {
            say(&format!("stopping the guest: {e}"));
        }
        outcome
    };
    finish_create(json, t0, outcome)
}

fn finish_create(json: bool, t0: Instant, o: CreateOutcome) -> Result<ExitCode, String> {
    let written: u64 = o.members.iter().map(|m| m.bytes_written).sum();
    match o.error {
        None => {
            emit(
                json,
                &Event::Completed {
                    members: o.members.len(),
                    bytes_written: written,
                    wall_time_ms: t0.elapsed().as_millis() as u64,
                    guest_writes: o.guest_writes,
                },
                || {
                    format!(
                        "snapshot completed: {} member(s), {} written in {} ms; the guest's \
                         progress {} (page writes; a kernel's serial bytes)",
                        o.members.len(),
                        bytes(written),
                        t0.elapsed().as_millis(),
                        o.guest_writes
                    )
                },
            );
            Ok(ExitCode::SUCCESS)
        }
        Some(error) => {
            let n = o.members.len();
            emit(
                json,
                &Event::Failed {
                    error: error.clone(),
                    members_written: Some(n),
                },
                || format!("snapshot failed after {n} member(s) of this run: {error}"),
            );
            Ok(ExitCode::from(1))
        }
    }
}

/// `create --kernel`: the kernel on the minimal PC.
fn create_pc(
    a: &CreateArgs,
    kernel: crate::run::Kernel,
    say: &dyn Fn(&str),
) -> Result<CreateOutcome, String> {
    let tracker = crate::tracker::with_ring_entries(a.tracker, a.ring_entries)?;
    let g = &a.guest;
    if g.vcpus == 0 {
        return Err("--vcpus must be at least 1".into());
    }
    let cfg = PcConfig {
        mem_bytes: g.mem,
        smp: g.vcpus,
        tracker,
        huge_pages: !g.no_huge_pages,
    };
    let src = Pc::new(&cfg, quiet_console(), pc_log("PC"))
        .map_err(|e| format!("building the PC: {e}"))?;
    let initrd = kernel.initrd.as_ref().map(|(b, c)| (&b[..], c.as_str()));
    src.boot(&kernel.image, &kernel.cmdline, initrd)
        .map_err(|e| format!("booting the kernel: {e}"))?;
    say(&format!(
        "booted a {} (tracker {})",
        g.describe(),
        tracker.name()
    ));
    std::thread::sleep(Duration::from_millis(g.warmup_ms));
    if let Some(e) = src.exit() {
        return Err(format!("the guest ended before the first snapshot: {e}"));
    }
    let outcome = match Snapshotter::new(&src, &a.dir, None) {
        Ok(snap) => take_all(&src, snap, a, &|p: &Pc| p.serial_bytes()),
        Err(e) => CreateOutcome {
            members: Vec::new(),
            error: Some(explain(&e)),
            guest_writes: src.serial_bytes(),
        },
    };
    if let Err(e) = src.shutdown() {
        say(&format!("stopping the guest: {e}"));
    }
    Ok(outcome)
}

fn quiet_console() -> pc::Console {
    line_console(|_| {})
}

fn pc_log(who: &'static str) -> pc::Log {
    Arc::new(move |m: &str| eprintln!("{who}: {m}"))
}

/// `create --parent`: restore the parent's chain into a fresh VM (a PC for a kernel's chain,
/// else the harness guest), start tracking before its first instruction, run it, and write
/// diffs against the parent.
fn create_from_parent(
    a: &CreateArgs,
    parent: &Path,
    say: &dyn Fn(&str),
) -> Result<CreateOutcome, String> {
    // Opened (without reading the data) to refuse what cannot work before any VM exists; the
    // restore checks every byte.
    let chain = Chain::open(parent, false).map_err(|e| e.to_string())?;
    let tracker = crate::tracker::with_ring_entries(a.tracker, a.ring_entries)?;
    let is_pc = pc::is_pc_stream(chain.header().regions());
    if !is_pc && tracker.ring_entries().is_some() {
        return Err(format!(
            "--parent {}: a restored test guest is tracked with --tracker dirty-log or \
             clear-log (its vCPUs exist before tracking starts, and a dirty ring must be \
             enabled before them)",
            parent.display()
        ));
    }
    let bar = progress_bar(!a.json);
    let opts = RestoreOptions {
        lazy: false,
        progress: progress_fn(&bar),
        // Paused until tracking is on: no write of the restored guest escapes the diff.
        resume: false,
    };
    let members = chain.members().len();
    if is_pc {
        let make =
            |h: &StreamHeader| Pc::for_stream(h, tracker, true, quiet_console(), pc_log("PC"));
        let restored = dirtylog_snapshot::restore(parent, make, &opts);
        finish_bar(&bar);
        let (src, _) = restored.map_err(|e| format!("restoring the parent: {}", explain(&e)))?;
        let outcome = continue_chain(a, parent, members, &src, &|p: &Pc| p.serial_bytes(), say);
        if let Err(e) = src.shutdown() {
            say(&format!("stopping the guest: {e}"));
        }
        outcome
    } else {
        let make = |h: &StreamHeader| RestoredGuest::new(h, &TargetOptions::default(), tracker);
        let restored = dirtylog_snapshot::restore(parent, make, &opts);
        finish_bar(&bar);
        let (src, _) = restored.map_err(|e| format!("restoring the parent: {}", explain(&e)))?;
        let outcome = continue_chain(
            a,
            parent,
            members,
            &src,
            &|g: &RestoredGuest| g.target().guest_writes(),
            say,
        );
        if let Err(e) = src.shutdown() {
            say(&format!("stopping the guest: {e}"));
        }
        outcome
    }
}

/// Track the restored, still paused `src`, let it run for --run-ms, and take the members.
fn continue_chain<S: MigrationSource + VcpuRestore>(
    a: &CreateArgs,
    parent: &Path,
    members: usize,
    src: &S,
    progress: &dyn Fn(&S) -> u64,
    say: &dyn Fn(&str),
) -> Result<CreateOutcome, String> {
    let snap = match Snapshotter::new(src, &a.dir, Some(parent)) {
        Ok(s) => s,
        Err(e) => {
            return Ok(CreateOutcome {
                members: Vec::new(),
                error: Some(explain(&e)),
                guest_writes: progress(src),
            })
        }
    };
    VcpuRestore::resume(src).map_err(|e| format!("resuming the restored guest: {e}"))?;
    let run = a.run_ms.unwrap_or(500);
    say(&format!(
        "restored {} ({members} member(s)); the guest runs {run} ms before the first diff",
        parent.display()
    ));
    std::thread::sleep(Duration::from_millis(run));
    Ok(take_all(src, snap, a, progress))
}

// ---------------------------------------------------------------------------------------
// restore

fn restore(a: RestoreArgs) -> Result<ExitCode, String> {
    let json = a.json;
    let console = line_console(move |l| {
        emit(
            json,
            &Event::Serial {
                line: l.to_string(),
            },
            || format!("guest| {l}"),
        )
    });
    let log: pc::Log = Arc::new(|m: &str| eprintln!("PC: {m}"));
    // The VM `migrate receive` builds for a stream of this header.
    let make = |h: &StreamHeader| AnyTarget::new(h, &TargetOptions::default(), console, log);
    let bar = progress_bar(!json);
    let opts = RestoreOptions {
        lazy: a.lazy,
        progress: progress_fn(&bar),
        ..RestoreOptions::default()
    };
    let restored = dirtylog_snapshot::restore(&a.dir, make, &opts);
    finish_bar(&bar);
    let (target, stats) = match restored {
        Ok(x) => x,
        Err(e) => {
            let msg = explain(&e);
            emit(
                json,
                &Event::Failed {
                    error: msg.clone(),
                    members_written: None,
                },
                || {
                    if a.lazy {
                        // A lazy restore resumes the guest before its memory is checked: a
                        // late failure stopped a guest that ran.
                        format!("lazy restore failed (the guest was stopped): {msg}")
                    } else {
                        format!("restore refused (nothing ran): {msg}")
                    }
                },
            );
            return Ok(ExitCode::from(1));
        }
    };
    let members: Vec<String> = Chain::open(&a.dir, false)
        .map(|c| {
            c.members()
                .iter()
                .map(|m| m.display().to_string())
                .collect()
        })
        .unwrap_or_default();
    let stats_v = serde_json::to_value(&stats).map_err(|e| e.to_string())?;
    let w0 = target.progress();
    // The guest's progress: the harness guest's page writes, or a kernel's serial bytes.
    let unit = match &target {
        AnyTarget::Harness(_) => "guest writes",
        AnyTarget::Pc(_) => "serial bytes",
    };
    let report = RestoreReport {
        path: a.dir.display().to_string(),
        members: members.clone(),
        lazy: a.lazy,
        stats: crate::json::integer_ms(crate::json::kebab_keys(stats_v)),
        memory_checked: true,
        guest_writes: w0,
    };
    emit(json, &Event::Restored(report), || {
        format!(
            "restored {} from {} member(s): the guest resumed after {} ms{}; memory matches the \
             snapshot's hash (memory-xxh3); the guest runs",
            a.dir.display(),
            members.len(),
            stats.time_to_resume.as_millis(),
            if a.lazy {
                format!(
                    " (lazy: every page in and checked after {} ms)",
                    stats.duration.as_millis()
                )
            } else {
                String::new()
            }
        )
    });
    let start = Instant::now();
    let step = Duration::from_millis(200);
    let mut last = w0;
    while start.elapsed() < Duration::from_millis(a.run_ms) {
        std::thread::sleep(step.min(Duration::from_millis(a.run_ms)));
        if let Err(e) = target.check() {
            let msg = format!("the restored guest failed: {e}");
            emit(
                json,
                &Event::Failed {
                    error: msg.clone(),
                    members_written: None,
                },
                || msg.clone(),
            );
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
        emit(
            json,
            &Event::Sample {
                ms: start.elapsed().as_millis() as u64,
                guest_writes: w,
            },
            || {
                format!(
                    "  +{:>5} ms  {unit} {w} (+{})",
                    start.elapsed().as_millis(),
                    w.saturating_sub(last)
                )
            },
        );
        last = w;
    }
    let w1 = target.progress();
    emit(
        json,
        &Event::Done {
            guest_writes: w1,
            advanced: w1 > w0,
        },
        || format!("{unit} {w0} → {w1} while running here; stopping it"),
    );
    target.shutdown().map_err(|e| e.to_string())?;
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------------------
// verify, merge, info

/// A checked chain, in the JSON style.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct VerifyDoc {
    path: String,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    report: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

fn to_style(v: &impl Serialize) -> Result<serde_json::Value, String> {
    let v = serde_json::to_value(v).map_err(|e| e.to_string())?;
    Ok(crate::json::integer_ms(crate::json::kebab_keys(v)))
}

fn verify(a: VerifyArgs) -> Result<ExitCode, String> {
    let r = dirtylog_snapshot::verify(&a.dir);
    let ok = r.is_ok();
    let doc = match r {
        Ok(rep) => VerifyDoc {
            path: a.dir.display().to_string(),
            status: "ok",
            report: Some(to_style(&rep)?),
            error: None,
        },
        Err(e) => VerifyDoc {
            path: a.dir.display().to_string(),
            status: "failed",
            report: None,
            error: Some(explain(&e)),
        },
    };
    if a.json {
        println!("{}", crate::json::document(&doc)?);
    } else if let Some(e) = &doc.error {
        println!("verify failed: {e}");
    } else {
        println!(
            "{}: the chain is intact: every member's manifest, parent link and chunk checksum \
             checked, and the memory it rebuilds matches the snapshot's hash (memory-xxh3)",
            a.dir.display()
        );
        if let Some(r) = &doc.report {
            print_fields(r, "  ");
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn merge(a: MergeArgs) -> Result<ExitCode, String> {
    match dirtylog_snapshot::merge(&a.dir, &a.into) {
        Ok(s) => {
            let m = MemberReport::of(&s, SnapshotMode::Stop, 0);
            if a.json {
                println!("{}", crate::json::document(&m)?);
            } else {
                println!(
                    "merged the chain ending at {} into {}: {} pages, {} written in {} ms",
                    a.dir.display(),
                    m.path,
                    m.pages,
                    bytes(m.bytes_written),
                    m.duration_ms
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let msg = explain(&e);
            if a.json {
                println!(
                    "{}",
                    crate::json::document(&VerifyDoc {
                        path: a.dir.display().to_string(),
                        status: "failed",
                        report: None,
                        error: Some(msg),
                    })?
                );
            } else {
                println!("merge failed: {msg}");
            }
            Ok(ExitCode::from(1))
        }
    }
}

fn info(a: InfoArgs) -> Result<ExitCode, String> {
    let i = match dirtylog_snapshot::info(&a.dir) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("dirtylog: error: {}", explain(&e));
            return Ok(ExitCode::from(1));
        }
    };
    let v = to_style(&i)?;
    if a.json {
        println!("{}", crate::json::document(&v)?);
    } else {
        print_fields(&v, "");
    }
    Ok(ExitCode::SUCCESS)
}

/// A JSON value as indented `key: value` lines.
fn print_fields(v: &serde_json::Value, indent: &str) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match x {
                    serde_json::Value::Object(_) => {
                        println!("{indent}{k}:");
                        print_fields(x, &format!("{indent}  "));
                    }
                    serde_json::Value::Array(items)
                        if items.iter().any(|i| i.is_object() || i.is_array()) =>
                    {
                        println!("{indent}{k}:");
                        for (n, item) in items.iter().enumerate() {
                            println!("{indent}  [{n}]");
                            print_fields(item, &format!("{indent}    "));
                        }
                    }
                    x => println!("{indent}{k}: {}", scalar(x)),
                }
            }
        }
        x => println!("{indent}{}", scalar(x)),
    }
}

fn scalar(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}
