//! `dirtylog perf`: the kernel's dirty_log_perf_test on a chosen backend.

use std::process::ExitCode;

use clap::{Args as ClapArgs, ValueEnum};
use dirtylog::perf::{self, PerfBackend, PerfConfig};
use dirtylog::softmmu::SoftmmuPerf;
use dirtylog::TrackerKind;

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The software-MMU reference arch.
    Softmmu,
    /// Real guests on /dev/kvm (memstress); even iterations use the bare ioctls, so the
    /// report gives our overhead as a ratio.
    Kvm,
}

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Where to run.
    #[arg(long, value_enum, default_value_t = Backend::Softmmu)]
    backend: Backend,
    /// vCPUs, each writing its own partition of guest memory.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest memory per vCPU, e.g. 1G, 256M, 4096K (binary units).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    mem_per_vcpu: u64,
    /// Iterations after populating (at least 2; with a bare interface, even ones use it).
    #[arg(long, default_value_t = 2)]
    iterations: u32,
    /// Memslots the memory is split into.
    #[arg(long, default_value_t = 1)]
    slots: u32,
    /// The tracker that collects dirty pages: dirty-log (KVM_GET_DIRTY_LOG, which clears and
    /// re-protects in GET), clear-log (manual protect + INITIALLY_SET: GET, then CLEAR of
    /// each whole slot), ring (4096 entries per vCPU) or ring:ENTRIES (per-vCPU dirty rings:
    /// harvest, then commit and reset).
    #[arg(long, value_name = "TRACKER", default_value_t = TrackerKind::ClearLog)]
    tracker: TrackerKind,
    /// The same as --tracker dirty-log.
    #[arg(long, conflicts_with_all = ["tracker", "ring"])]
    no_manual_protect: bool,
    /// The same as --tracker ring:ENTRIES.
    #[arg(long, value_name = "ENTRIES", conflicts_with = "tracker")]
    ring: Option<u32>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Parse a number of bytes with an optional binary suffix, in any case: `K`/`KiB`, `M`/`MiB`,
/// `G`/`GiB`, `T`/`TiB` (`1G` = `1GiB` = 2³⁰ bytes). `1GB` and the like are refused with a
/// hint, as people mean 10⁹ or 2³⁰ by them.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, suffix) = (&s[..digits], s[digits..].trim());
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size: use e.g. 1G, 256M or 4096"))?;
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KIB" => 10,
        "M" | "MIB" => 20,
        "G" | "GIB" => 30,
        "T" | "TIB" => 40,
        "KB" | "MB" | "GB" | "TB" => {
            let unit = &suffix[..1];
            return Err(format!(
                "'{s}' is ambiguous: write {n}{unit} or {n}{unit}iB for the binary size (the \
                 unit here), or the number of bytes for the decimal one"
            ));
        }
        _ => {
            return Err(format!(
                "unknown size suffix '{suffix}' in '{s}': use K, M, G or T (or KiB, MiB, GiB, \
                 TiB)"
            ))
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// `--tracker`, with the older `--no-manual-protect` and `--ring ENTRIES` mapped into it.
fn tracker(a: &Args) -> Result<TrackerKind, String> {
    let t = match (a.ring, a.no_manual_protect) {
        (Some(entries), _) => TrackerKind::Ring { entries },
        (None, true) => TrackerKind::DirtyLog,
        (None, false) => a.tracker,
    };
    crate::tracker::check_ring(t, crate::tracker::RING_ENTRIES)?;
    Ok(t)
}

pub fn run(a: Args) -> Result<ExitCode, String> {
    if a.iterations < 2 {
        return Err("--iterations must be at least 2".into());
    }
    if a.vcpus == 0 || a.slots == 0 {
        return Err("--vcpus and --slots must be at least 1".into());
    }
    if a.mem_per_vcpu < 4096 || a.mem_per_vcpu % 4096 != 0 {
        return Err(format!(
            "--mem-per-vcpu {} must be a positive multiple of 4 KiB",
            a.mem_per_vcpu
        ));
    }
    let cfg = PerfConfig {
        vcpus: a.vcpus,
        mem_per_vcpu: a.mem_per_vcpu,
        iterations: a.iterations,
        slots: a.slots,
        tracker: tracker(&a)?,
    };
    let mut b: Box<dyn PerfBackend> = match a.backend {
        Backend::Softmmu => Box::new(SoftmmuPerf::new(&cfg).map_err(|e| e.to_string())?),
        Backend::Kvm => Box::new(dirtylog_testvm::KvmPerf::new(&cfg).map_err(|e| e.to_string())?),
    };
    if !a.json {
        println!("== {}", b.describe());
    }
    let json = a.json;
    let r = perf::run(b.as_mut(), &cfg, |l| {
        if !json {
            println!("{l}");
        }
    })
    .map_err(|e| e.to_string())?;
    if json {
        // Seconds (f64) become integer nanoseconds: `get_s` → `get-ns`.
        let v = serde_json::to_value(&r).map_err(|e| e.to_string())?;
        let v = crate::json::kebab_keys(crate::json::seconds_to_ns(v));
        println!("{}", crate::json::document(&v)?);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::{parse_size, tracker, Args};
    use clap::Parser;
    use dirtylog::TrackerKind;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn resolve(argv: &[&str]) -> Result<TrackerKind, String> {
        let cli = Cli::try_parse_from(std::iter::once("perf").chain(argv.iter().copied()))
            .map_err(|e| e.to_string())?;
        tracker(&cli.args)
    }

    #[test]
    fn trackers() {
        assert_eq!(resolve(&[]), Ok(TrackerKind::ClearLog));
        assert_eq!(
            resolve(&["--tracker", "dirty-log"]),
            Ok(TrackerKind::DirtyLog)
        );
        assert_eq!(resolve(&["--no-manual-protect"]), Ok(TrackerKind::DirtyLog));
        assert_eq!(
            resolve(&["--tracker", "ring"]),
            Ok(TrackerKind::Ring { entries: 4096 })
        );
        assert_eq!(
            resolve(&["--tracker", "ring:256"]),
            Ok(TrackerKind::Ring { entries: 256 })
        );
        assert_eq!(
            resolve(&["--ring", "512"]),
            Ok(TrackerKind::Ring { entries: 512 })
        );
        assert!(resolve(&["--ring", "1000"])
            .unwrap_err()
            .contains("power of two"));
        assert!(resolve(&["--ring", "128"])
            .unwrap_err()
            .contains("256 to 65536"));
        assert!(resolve(&["--tracker", "ring:128"]).is_err());
        assert!(resolve(&["--tracker", "get"]).is_err());
        assert!(resolve(&["--tracker", "ring", "--ring", "512"]).is_err());
        assert!(resolve(&["--no-manual-protect", "--ring", "512"]).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("256m"), Ok(256 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("1Q").unwrap_err().contains("suffix"));
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999T")
            .unwrap_err()
            .contains("too large"));
        // The forms people type: binary with or without "iB", any case; "GB" refused with a
        // hint rather than guessed.
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1gib"), Ok(1 << 30));
        assert_eq!(parse_size("2 MiB"), Ok(2 << 20));
        assert_eq!(parse_size("16T"), Ok(16 << 40));
        assert_eq!(parse_size("512B"), Ok(512));
        let e = parse_size("1GB").unwrap_err();
        assert!(e.contains("ambiguous") && e.contains("1G or 1GiB"), "{e}");
        assert!(parse_size("1Gi").unwrap_err().contains("suffix"));
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("").is_err());
    }
}
