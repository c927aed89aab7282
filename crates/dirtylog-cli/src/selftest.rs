//! `dirtylog selftest`: the conformance protocol on a chosen backend.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args as ClapArgs, ValueEnum};
use dirtylog::selftest::{self, IterationReport, SelftestBackend, SelftestConfig, Summary};
use dirtylog::softmmu::{FlushKind, SoftmmuSelftest};
use dirtylog::TrackerKind;
use dirtylog_host::selftest::HostSelftest;
use dirtylog_host::{HostBacking, HostMethod};

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The software-MMU reference arch (per-vCPU TLBs, write-protection faults).
    Softmmu,
    /// Real guests on /dev/kvm.
    Kvm,
    /// This process's own memory: writer threads take the vCPUs' place, and the tracker is
    /// userfaultfd write-protect + PAGEMAP_SCAN or a fallback (`--method`). Modes dirty-log
    /// and clear-log; a ring has no meaning here (no vCPU queues its writes).
    Host,
}

/// `--method` for `--backend host`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// userfaultfd `WP_ASYNC` + one `PAGEMAP_SCAN` per harvest (Linux 6.7+).
    Async,
    /// userfaultfd write-protect with a fault-handling thread.
    Sync,
    /// `mprotect` + a `SIGSEGV` handler.
    Mprotect,
    /// The three, one after the other.
    All,
}

/// `--backing` for `--backend host`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous memory.
    Anon,
    /// A memfd mapped shared.
    Memfd,
    /// 2 MiB huge pages (needs pages reserved in /proc/sys/vm/nr_hugepages).
    Hugetlb,
}

/// The `--tracker` value: every tracker, or one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trackers {
    /// `all`: the three trackers, one after the other.
    All,
    /// One tracker; `sized` if a ring's entries were given (`ring:ENTRIES`), not defaulted.
    One { tracker: TrackerKind, sized: bool },
}

/// `all`, or a [`TrackerKind`] by its `FromStr`: `dirty-log`, `clear-log`, `ring`,
/// `ring:ENTRIES` (and the older `dirty-ring`).
pub fn parse_trackers(s: &str) -> Result<Trackers, String> {
    if s == "all" {
        return Ok(Trackers::All);
    }
    let tracker: TrackerKind = s
        .parse()
        .map_err(|e| format!("{e}, or all for the three"))?;
    Ok(Trackers::One {
        tracker,
        sized: s.contains(':'),
    })
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flush {
    /// Ranged and full remote TLB flush hooks (x86 on Hyper-V, arm64 TLBI range).
    Ranged,
    /// Only a full flush hook (the MIPS case).
    Full,
    /// No flush hook: the generic KVM_REQ_TLB_FLUSH broadcast.
    Request,
}

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Where to run the protocol.
    #[arg(long, value_enum, default_value_t = Backend::Softmmu)]
    backend: Backend,
    /// The tracker that collects dirty pages: dirty-log (KVM_GET_DIRTY_LOG, which fetches,
    /// clears and re-protects), clear-log (manual protect + INITIALLY_SET: GET a snapshot,
    /// then CLEAR the whole slot), ring or ring:ENTRIES (per-vCPU dirty rings: harvest,
    /// commit, reset), or all (the three, one after the other).
    #[arg(
        long,
        visible_alias = "mode",
        value_name = "TRACKER",
        default_value = "all",
        value_parser = parse_trackers
    )]
    tracker: Trackers,
    /// vCPU threads stamping pages.
    #[arg(long, default_value_t = 2)]
    vcpus: u32,
    /// Iterations per tracker.
    #[arg(long, default_value_t = 32)]
    iterations: u64,
    /// Pages in the test slot (64·n + 3 by default, so the tail is not 64-aligned).
    #[arg(long, default_value_t = 64 * 64 + 3)]
    pages: u64,
    /// Dirty ring entries per vCPU for `--tracker ring` and `all` (1024 if not given; the
    /// same as `ring:ENTRIES`); a small ring fills and exercises ring-full exits. Power of
    /// two, 256..=65536.
    #[arg(long, value_name = "ENTRIES")]
    ring_entries: Option<u32>,
    /// Milliseconds the vCPUs run per iteration at least.
    #[arg(long, default_value_t = 10)]
    interval_ms: u64,
    /// How host memory is tracked (`--backend host` only).
    #[arg(long, value_enum)]
    method: Option<Method>,
    /// What backs the host memory (`--backend host` only; `--pages` counts 2 MiB pages with
    /// hugetlb).
    #[arg(long, value_enum)]
    backing: Option<Backing>,
    /// Remote TLB flush hooks of the softmmu arch (ignored for kvm: the kernel flushes).
    #[arg(long, value_enum, default_value_t = Flush::Ranged)]
    flush: Flush,
    /// Seed for the host's reap points and the vCPUs' page choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON document (config, per-iteration lines, violations) instead of text.
    #[arg(long)]
    json: bool,
}

/// The trackers to run, with `--ring-entries` mapped into the ring's size.
fn trackers(
    backend: Backend,
    t: Trackers,
    ring_entries: Option<u32>,
) -> Result<Vec<TrackerKind>, String> {
    if backend == Backend::Host {
        if ring_entries.is_some() {
            return Err("--ring-entries has no meaning with --backend host (no rings)".into());
        }
        return match t {
            Trackers::All => Ok(vec![TrackerKind::DirtyLog, TrackerKind::ClearLog]),
            Trackers::One {
                tracker: TrackerKind::Ring { .. },
                ..
            } => Err(
                "--tracker ring has no meaning with --backend host: host memory has no \
                      vCPUs whose writes a ring could queue; use dirty-log, clear-log or all"
                    .into(),
            ),
            Trackers::One { tracker, .. } => Ok(vec![tracker]),
        };
    }
    let entries = ring_entries.unwrap_or(SelftestConfig::DEFAULT_RING_ENTRIES);
    let list = match t {
        Trackers::All => TrackerKind::all_with_ring(entries).to_vec(),
        Trackers::One {
            tracker: TrackerKind::Ring { entries: n },
            sized: true,
        } => {
            if ring_entries.is_some_and(|e| e != n) {
                return Err(format!(
                    "--tracker ring:{n} and --ring-entries {entries} disagree: give the size once"
                ));
            }
            vec![TrackerKind::Ring { entries: n }]
        }
        Trackers::One {
            tracker: TrackerKind::Ring { .. },
            sized: false,
        } => vec![TrackerKind::Ring { entries }],
        Trackers::One { tracker, .. } => vec![tracker],
    };
    for &t in &list {
        crate::tracker::check_ring(t, crate::tracker::RING_ENTRIES)?;
    }
    Ok(list)
}

fn backend(
    a: &Args,
    cfg: &SelftestConfig,
    method: Option<HostMethod>,
) -> Result<Box<dyn SelftestBackend>, String> {
    match a.backend {
        Backend::Host => {
            let backing = match a.backing.unwrap_or(Backing::Anon) {
                Backing::Anon => HostBacking::Anonymous,
                Backing::Memfd => HostBacking::Memfd,
                Backing::Hugetlb => HostBacking::HugeTlb,
            };
            let method = method.unwrap_or(HostMethod::Async);
            Ok(Box::new(
                HostSelftest::new(cfg, method, backing)
                    .map_err(|e| format!("{method} on host memory: {e}"))?,
            ))
        }
        Backend::Softmmu => {
            let kind = match a.flush {
                Flush::Ranged => FlushKind::Ranged,
                Flush::Full => FlushKind::FullOnly,
                Flush::Request => FlushKind::RequestOnly,
            };
            Ok(Box::new(
                SoftmmuSelftest::new(cfg, kind).map_err(|e| e.to_string())?,
            ))
        }
        Backend::Kvm => Ok(Box::new(
            dirtylog_testvm::KvmSelftest::new(cfg).map_err(|e| e.to_string())?,
        )),
    }
}

fn validate(a: &Args) -> Result<(), String> {
    if a.vcpus == 0 || a.vcpus > 64 {
        return Err(format!("--vcpus {} is out of range: use 1 to 64", a.vcpus));
    }
    if a.pages == 0 || a.pages > 1 << 24 {
        return Err(format!(
            "--pages {} is out of range: use 1 to 16777216",
            a.pages
        ));
    }
    if a.iterations == 0 {
        return Err("--iterations must be at least 1".into());
    }
    if a.backend != Backend::Host && (a.method.is_some() || a.backing.is_some()) {
        return Err("--method and --backing are for --backend host only".into());
    }
    Ok(())
}

pub fn run(a: Args) -> Result<ExitCode, String> {
    validate(&a)?;
    let mut summaries: Vec<(Summary, Vec<IterationReport>)> = Vec::new();
    let methods: Vec<Option<HostMethod>> = match a.method {
        None => vec![None],
        Some(Method::Async) => vec![Some(HostMethod::Async)],
        Some(Method::Sync) => vec![Some(HostMethod::Sync)],
        Some(Method::Mprotect) => vec![Some(HostMethod::Mprotect)],
        Some(Method::All) => vec![
            Some(HostMethod::Async),
            Some(HostMethod::Sync),
            Some(HostMethod::Mprotect),
        ],
    };
    let runs = trackers(a.backend, a.tracker, a.ring_entries)?;
    for (method, tracker) in methods
        .iter()
        .flat_map(|&m| runs.iter().map(move |&t| (m, t)))
    {
        let cfg = SelftestConfig {
            tracker,
            vcpus: a.vcpus,
            pages: a.pages,
            iterations: a.iterations,
            interval: Duration::from_millis(a.interval_ms),
            seed: a.seed,
            ..SelftestConfig::default()
        };
        let mut b = backend(&a, &cfg, method)?;
        if !a.json {
            println!("== {tracker} on {}", b.describe());
        }
        let mut lines = Vec::new();
        let s = selftest::run(b.as_mut(), &cfg, |r| {
            if !a.json {
                println!(
                    "Iteration {:2}: dirty: {:<6} clean: {:<6} writes: {:<6}{}",
                    r.iteration,
                    r.dirty,
                    r.clean,
                    r.writes,
                    if r.ring_full_exits > 0 {
                        format!(" ring-full exits: {}", r.ring_full_exits)
                    } else {
                        String::new()
                    }
                );
            }
            lines.push(r.clone());
        })
        .map_err(|e| format!("{tracker}: {e}"))?;
        if !a.json {
            report(&s);
        }
        summaries.push((s, lines));
    }
    let ok = summaries.iter().all(|(s, _)| s.passed());
    if a.json {
        let runs: Vec<_> = summaries
            .iter()
            .map(|(s, l)| {
                serde_json::json!({
                    "tracker": s.tracker.to_string(),
                    "summary": s,
                    "iterations": l,
                    "passed": s.passed(),
                })
            })
            .collect();
        let doc = serde_json::json!({ "backend": format!("{:?}", a.backend).to_lowercase(), "passed": ok, "runs": runs });
        println!("{}", crate::json::document(&crate::json::kebab_keys(doc))?);
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn report(s: &Summary) {
    let ring = match s.tracker {
        TrackerKind::Ring { .. } => format!(" ring-full exits {}", s.ring_full_exits),
        _ => String::new(),
    };
    println!(
        "{}: {} iterations, dirty {} clean {} writes {}{ring}",
        s.tracker, s.iterations, s.dirty, s.clean, s.writes
    );
    if s.passed() {
        println!("PASS: every dirty page held the current iteration and no write was lost");
    } else {
        println!("FAIL: {} violations", s.violations.len());
        for v in s.violations.iter().take(20) {
            println!("  {v}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(entries: u32) -> TrackerKind {
        TrackerKind::Ring { entries }
    }

    fn resolve(arg: &str, ring_entries: Option<u32>) -> Result<Vec<TrackerKind>, String> {
        trackers(Backend::Softmmu, parse_trackers(arg)?, ring_entries)
    }

    #[test]
    fn host_memory_runs_the_two_bitmap_modes_and_refuses_a_ring() {
        let host = |arg: &str, ring_entries| {
            trackers(Backend::Host, parse_trackers(arg).unwrap(), ring_entries)
        };
        assert_eq!(
            host("all", None),
            Ok(vec![TrackerKind::DirtyLog, TrackerKind::ClearLog])
        );
        assert_eq!(host("clear-log", None), Ok(vec![TrackerKind::ClearLog]));
        assert!(host("ring", None).unwrap_err().contains("no meaning"));
        assert!(host("all", Some(1024)).is_err());
    }

    #[test]
    fn tracker_names_and_ring_sizes() {
        assert_eq!(
            resolve("all", None),
            Ok(TrackerKind::all_with_ring(1024).to_vec())
        );
        assert_eq!(
            resolve("all", Some(256)),
            Ok(TrackerKind::all_with_ring(256).to_vec())
        );
        assert_eq!(
            resolve("dirty-log", Some(256)),
            Ok(vec![TrackerKind::DirtyLog])
        );
        assert_eq!(resolve("clear-log", None), Ok(vec![TrackerKind::ClearLog]));
        assert_eq!(resolve("ring", None), Ok(vec![ring(1024)]));
        assert_eq!(resolve("dirty-ring", Some(512)), Ok(vec![ring(512)]));
        assert_eq!(resolve("ring:4096", None), Ok(vec![ring(4096)]));
        assert_eq!(resolve("ring:4096", Some(4096)), Ok(vec![ring(4096)]));
    }

    #[test]
    fn bad_trackers_are_refused() {
        assert!(resolve("ring:4096", Some(256))
            .unwrap_err()
            .contains("disagree"));
        assert!(resolve("ring:128", None)
            .unwrap_err()
            .contains("256 to 65536"));
        assert!(resolve("all", Some(131072))
            .unwrap_err()
            .contains("256 to 65536"));
        assert!(resolve("ring", Some(1000)).is_err());
        let e = resolve("log", None).unwrap_err();
        assert!(e.contains("dirty-log") && e.contains("all"), "{e}");
    }
}
