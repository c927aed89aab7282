//! `dirtylog perf`: the kernel's dirty_log_perf_test on a chosen backend.

use std::process::ExitCode;

use clap::{Args as ClapArgs, ValueEnum};
use dirtylog::perf::{self, PerfBackend, PerfConfig, PerfMode};
use dirtylog::softmmu::SoftmmuPerf;

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
    /// Plain KVM_GET_DIRTY_LOG (clear and re-protect in GET) instead of manual protect +
    /// INITIALLY_SET with GET then CLEAR.
    #[arg(long)]
    no_manual_protect: bool,
    /// Use dirty rings of this many entries per vCPU instead of bitmaps.
    #[arg(long, value_name = "ENTRIES")]
    ring: Option<u32>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Parse `1G`, `256M`, `64K` or a plain number of bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => {
                    return Err(format!(
                        "unknown size suffix '{c}' in '{s}': use K, M, G or T"
                    ))
                }
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size: use e.g. 1G, 256M or 4096"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))
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
    let mode = match (a.ring, a.no_manual_protect) {
        (Some(n), _) if !n.is_power_of_two() || !(256..=65536).contains(&n) => {
            return Err(format!(
                "--ring {n} must be a power of two from 256 to 65536"
            ))
        }
        (Some(n), _) => PerfMode::Ring(n),
        (None, true) => PerfMode::Get,
        (None, false) => PerfMode::GetClear,
    };
    let cfg = PerfConfig {
        vcpus: a.vcpus,
        mem_per_vcpu: a.mem_per_vcpu,
        iterations: a.iterations,
        slots: a.slots,
        mode,
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
        println!(
            "{}",
            serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

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
    }
}
