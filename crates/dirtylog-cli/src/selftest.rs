//! `dirtylog selftest`: the conformance protocol on a chosen backend.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args as ClapArgs, ValueEnum};
use dirtylog::selftest::{
    self, IterationReport, LogMode, SelftestBackend, SelftestConfig, Summary,
};
use dirtylog::softmmu::{FlushKind, SoftmmuSelftest};

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The software-MMU reference arch (per-vCPU TLBs, write-protection faults).
    Softmmu,
    /// Real guests on /dev/kvm.
    Kvm,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// KVM_GET_DIRTY_LOG, which fetches, clears and re-protects.
    DirtyLog,
    /// Manual protect + INITIALLY_SET: GET a snapshot, then CLEAR the whole slot.
    ClearLog,
    /// Per-vCPU dirty rings: harvest, commit, reset.
    DirtyRing,
    /// All three, one after the other.
    All,
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
    /// How dirty pages are collected.
    #[arg(long, value_enum, default_value_t = Mode::All)]
    mode: Mode,
    /// vCPU threads stamping pages.
    #[arg(long, default_value_t = 2)]
    vcpus: u32,
    /// Iterations per mode.
    #[arg(long, default_value_t = 32)]
    iterations: u64,
    /// Pages in the test slot (64·n + 3 by default, so the tail is not 64-aligned).
    #[arg(long, default_value_t = 64 * 64 + 3)]
    pages: u64,
    /// Dirty ring entries per vCPU (dirty-ring mode); a small ring fills and exercises
    /// ring-full exits. Power of two, 256..=65536.
    #[arg(long, default_value_t = 1024)]
    ring_entries: u32,
    /// Milliseconds the vCPUs run per iteration at least.
    #[arg(long, default_value_t = 10)]
    interval_ms: u64,
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

fn modes(m: Mode) -> Vec<LogMode> {
    match m {
        Mode::DirtyLog => vec![LogMode::DirtyLog],
        Mode::ClearLog => vec![LogMode::ClearLog],
        Mode::DirtyRing => vec![LogMode::DirtyRing],
        Mode::All => LogMode::ALL.to_vec(),
    }
}

fn backend(a: &Args, cfg: &SelftestConfig) -> Result<Box<dyn SelftestBackend>, String> {
    match a.backend {
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
    if !a.ring_entries.is_power_of_two() || !(256..=65536).contains(&a.ring_entries) {
        return Err(format!(
            "--ring-entries {} must be a power of two from 256 to 65536",
            a.ring_entries
        ));
    }
    Ok(())
}

pub fn run(a: Args) -> Result<ExitCode, String> {
    validate(&a)?;
    let mut summaries: Vec<(Summary, Vec<IterationReport>)> = Vec::new();
    for mode in modes(a.mode) {
        let cfg = SelftestConfig {
            mode,
            vcpus: a.vcpus,
            pages: a.pages,
            iterations: a.iterations,
            interval: Duration::from_millis(a.interval_ms),
            ring_entries: a.ring_entries,
            seed: a.seed,
            ..SelftestConfig::default()
        };
        let mut b = backend(&a, &cfg)?;
        if !a.json {
            println!("== {} on {}", mode.name(), b.describe());
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
        .map_err(|e| format!("{} mode: {e}", mode.name()))?;
        if !a.json {
            report(&s);
        }
        summaries.push((s, lines));
    }
    let ok = summaries.iter().all(|(s, _)| s.passed());
    if a.json {
        let runs: Vec<_> = summaries
            .iter()
            .map(
                |(s, l)| serde_json::json!({ "summary": s, "iterations": l, "passed": s.passed() }),
            )
            .collect();
        let doc = serde_json::json!({ "backend": format!("{:?}", a.backend).to_lowercase(), "passed": ok, "runs": runs });
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?
        );
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn report(s: &Summary) {
    println!(
        "{}: {} iterations, dirty {} clean {} writes {} ring-full exits {}",
        s.mode.name(),
        s.iterations,
        s.dirty,
        s.clean,
        s.writes,
        s.ring_full_exits
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
