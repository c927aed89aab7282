//! `dirtylog run --kernel FILE`: run a Multiboot kernel on the minimal PC, its serial port on
//! stdin/stdout, optionally migrating it back to back between PCs while it runs.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args as ClapArgs;
use dirtylog_testvm::pc::{self, MigrateMode, MigrationRecord, PcConfig, RunConfig, RunEnd};
use serde::Serialize;

use crate::migrate::{bytes, MigrationArgs};
use crate::perf::parse_size;

/// The exit status when the time limit ends the run (as `timeout(1)`).
const TIMEOUT_STATUS: u8 = 124;

/// A kernel to boot instead of the built-in guest (`migrate send`, `demo`) or to run (`run`).
#[derive(ClapArgs, Debug, Clone, Default)]
pub struct KernelArgs {
    /// A Multiboot v1 kernel (an ELF32 image, as for QEMU's -kernel) to run on the minimal PC,
    /// or `builtin:NAME` for one of the project's test kernels (info, echo, smp, memtest, spin,
    /// halt; see crates/dirtylog-testvm/kernels/README.md).
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// The kernel's arguments (its command line is the kernel's path, then these).
    #[arg(long, value_name = "ARGS", default_value = "", requires = "kernel")]
    pub append: String,
    /// A file given to the kernel as its one Multiboot module.
    #[arg(long, value_name = "FILE", requires = "kernel")]
    pub initrd: Option<PathBuf>,
}

/// A kernel read from its files: the image, its command line, its module.
pub struct Kernel {
    pub image: Vec<u8>,
    pub cmdline: String,
    pub initrd: Option<(Vec<u8>, String)>,
}

impl KernelArgs {
    /// The kernel, read from its files; `None` without --kernel.
    pub fn load(&self) -> Result<Option<Kernel>, String> {
        let Some(path) = &self.kernel else {
            return Ok(None);
        };
        let builtin = path.to_str().and_then(|p| p.strip_prefix("builtin:"));
        let image = match builtin {
            Some(name) => dirtylog_testvm::kernels::by_name(name)
                .ok_or_else(|| {
                    let names: Vec<&str> = dirtylog_testvm::kernels::ALL
                        .iter()
                        .map(|k| k.name)
                        .collect();
                    format!(
                        "no built-in kernel {name:?}: use one of {}",
                        names.join(", ")
                    )
                })?
                .elf
                .to_vec(),
            None => std::fs::read(path)
                .map_err(|e| format!("reading the kernel {}: {e}", path.display()))?,
        };
        let mut cmdline = path.display().to_string();
        if !self.append.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&self.append);
        }
        let initrd = match &self.initrd {
            None => None,
            Some(p) => Some((
                std::fs::read(p).map_err(|e| format!("reading the initrd {}: {e}", p.display()))?,
                p.display().to_string(),
            )),
        };
        Ok(Some(Kernel {
            image,
            cmdline,
            initrd,
        }))
    }
}

#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(flatten)]
    pub kernel: KernelArgs,
    /// vCPUs (the others wait for the guest's INIT/SIPI), 1..=64.
    #[arg(long, default_value_t = 1)]
    pub smp: u32,
    /// RAM, e.g. 128M, 1G (binary units; above 3 GiB it continues at 4 GiB).
    #[arg(long, default_value = "128M", value_parser = parse_size)]
    pub mem: u64,
    /// Back RAM with 4 KiB pages only (no MADV_HUGEPAGE).
    #[arg(long)]
    pub no_huge_pages: bool,
    /// Live-migrate the running guest between PCs (each migration a real send and receive over
    /// a socket, into a fresh PC): `on-request` when the guest asks with kvm-unit-tests' serial
    /// handshake ("Now migrate the VM", "Begin/End continuous migration"), or `every=MS`
    /// whatever the guest does; `off` never.
    #[arg(long, value_name = "MODE", default_value = "off", value_parser = parse_migrate)]
    pub migrate: MigrateMode,
    /// At most this many migrations.
    #[arg(long, value_name = "N")]
    pub migrations: Option<u32>,
    /// End the run after this many seconds (1 to a week) if the guest has not ended it
    /// (exit status 124).
    #[arg(long, value_name = "S", value_parser = crate::limits::seconds_nonzero)]
    pub time_limit_s: Option<u64>,
    #[command(flatten)]
    pub migration: MigrationArgs,
    /// Print the migration lines and the summary as JSON lines (on stderr).
    #[arg(long)]
    pub json: bool,
}

fn parse_migrate(s: &str) -> Result<MigrateMode, String> {
    s.parse()
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Summary {
    event: &'static str,
    migrations: usize,
    failed_migrations: usize,
    total_time_ms_median: Option<f64>,
    downtime_ms_median: Option<f64>,
    downtime_ms_max: Option<f64>,
    bytes: u64,
    end: String,
    exit_status: u8,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

pub fn run(a: Args) -> Result<ExitCode, String> {
    // Refuse bad migration options (such as --dirty-limit without a ring) before any work.
    a.migration.tracker_kind()?;
    a.migration
        .tls
        .refuse("`dirtylog run`, whose migrations stay inside this process")?;
    let k = a
        .kernel
        .load()?
        .ok_or("dirtylog run needs --kernel FILE (a Multiboot kernel)")?;
    let cfg = RunConfig {
        pc: PcConfig {
            mem_bytes: a.mem,
            smp: a.smp,
            tracker: a.migration.tracker_kind()?,
            huge_pages: !a.no_huge_pages,
        },
        kernel: k.image,
        cmdline: k.cmdline,
        initrd: k.initrd,
        migrate: a.migrate,
        max_migrations: a.migrations,
        send: a.migration.config()?,
        receive: Default::default(),
        timeout: a.time_limit_s.map(Duration::from_secs),
    };
    let json = a.json;
    let log: pc::Log = Arc::new(|m: &str| eprintln!("dirtylog: {}", m.escape_debug()));
    let input = pc::SerialInput::default();
    let stdin_input = input.clone();
    // The guest's serial input: stdin as it comes (a terminal stays in line mode).
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        let mut stdin = std::io::stdin().lock();
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 {
                break;
            }
            stdin_input.push(&buf[..n]);
        }
    });
    let mut on_migration = |r: &MigrationRecord| {
        if json {
            let mut v = serde_json::to_value(r).unwrap_or_default();
            v["event"] = "migration".into();
            let v = crate::json::integer_ms(v);
            eprintln!("{}", crate::json::line(&v).unwrap_or_default());
        } else {
            eprintln!(
                "dirtylog: migration {} ({:?}): total-time {:.1} ms, downtime {:.1} ms, {}",
                r.index,
                r.trigger,
                r.total_time_ms,
                r.downtime_ms,
                bytes(r.bytes)
            );
        }
    };
    let report = pc::run(
        &cfg,
        Box::new(std::io::stdout()),
        log,
        Some(&input),
        &mut on_migration,
    )
    .map_err(|e| e.to_string())?;
    let (end, status) = match &report.end {
        RunEnd::Exit(e) => (e.to_string(), e.code() as u8),
        RunEnd::Timeout(d) => (
            format!("the time limit of {} s passed", d.as_secs()),
            TIMEOUT_STATUS,
        ),
    };
    let m = &report.migrations;
    let summary = Summary {
        event: "done",
        migrations: m.len(),
        failed_migrations: report.failures.len(),
        total_time_ms_median: median(m.iter().map(|r| r.total_time_ms).collect()),
        downtime_ms_median: median(m.iter().map(|r| r.downtime_ms).collect()),
        downtime_ms_max: m.iter().map(|r| r.downtime_ms).reduce(f64::max),
        bytes: m.iter().map(|r| r.bytes).sum(),
        end,
        exit_status: status,
    };
    if json {
        let v = serde_json::to_value(&summary).map_err(|e| e.to_string())?;
        eprintln!("{}", crate::json::line(&crate::json::integer_ms(v))?);
    } else {
        if !m.is_empty() {
            eprintln!(
                "dirtylog: {} migration(s): total-time median {:.1} ms, downtime median {:.1} ms \
                 (max {:.1} ms), {} in all",
                summary.migrations,
                summary.total_time_ms_median.unwrap_or(0.0),
                summary.downtime_ms_median.unwrap_or(0.0),
                summary.downtime_ms_max.unwrap_or(0.0),
                bytes(summary.bytes)
            );
        }
        if !report.failures.is_empty() {
            eprintln!(
                "dirtylog: {} migration(s) failed (the guest ran on where it was)",
                report.failures.len()
            );
        }
        eprintln!("dirtylog: {} (exit status {status})", summary.end);
    }
    Ok(ExitCode::from(status))
}
