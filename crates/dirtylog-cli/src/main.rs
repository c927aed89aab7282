//! `dirtylog`: dirty page tracking with KVM's semantics, from the command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod demo;
mod dirty_rate;
mod events;
mod json;
mod limits;
mod migrate;
mod perf;
mod plot;
mod recover;
mod run;
mod selftest;
mod snapshot;
mod tls;
mod tracker;

/// Dirty page tracking with KVM's semantics: conformance self-tests, capabilities,
/// benchmarks and live migration of KVM guests.
#[derive(Parser, Debug)]
#[command(name = "dirtylog", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the kernel's dirty_log_test protocol against a backend and check every page.
    ///
    /// vCPUs stamp the iteration number into random pages; the host collects while they
    /// run, stops them, collects again, and checks that every dirty page holds the current
    /// iteration and every clean page an older one. Exits non-zero on any violation.
    Selftest(selftest::Args),
    /// Time dirty logging like the kernel's dirty_log_perf_test: populate, enable logging,
    /// per-iteration dirty-memory / get / clear times, disable logging.
    Perf(perf::Args),
    /// Show what the running kernel's /dev/kvm offers for dirty logging (manual protect,
    /// dirty ring sizes, memslots, ...), and which methods track this process's own memory
    /// (userfaultfd async or sync write-protect, mprotect) on which backings.
    Caps {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Live-migrate a KVM guest between two processes: `migrate receive --listen ADDR` on the
    /// destination, `migrate send --to ADDR` on the source.
    #[command(subcommand)]
    Migrate(migrate::Cmd),
    /// Live-migrate a KVM guest in one command, no arguments needed: boot a guest (1 GiB,
    /// 2 vCPUs, a dirtier at a moderate rate), start `dirtylog migrate receive` as a second
    /// process on loopback, migrate with a progress bar, check every memslot's hash, show the
    /// guest running on at the destination, and print the statistics.
    Demo(demo::Args),
    /// Run a Multiboot kernel (an ELF32 image, as QEMU's -kernel) on a minimal PC, its COM1 on
    /// stdin/stdout, and exit with the guest's status the way QEMU's isa-debug-exit does
    /// (a 32-bit write of V to port 0xf4 exits with V*2+1; a shutdown exits 0).
    ///
    /// The PC: RAM from 0 (above 3 GiB continued at 4 GiB), in-kernel LAPIC/IOAPIC/PIC and
    /// PIT, COM1 16550 at 0x3f8, fw_cfg at 0x510 (CPU count, RAM size), PCI configuration ports
    /// answering "no device"; other ports and addresses are logged once and ignored. With
    /// --migrate, the running guest is live-migrated back to back between PCs, on the
    /// guest's request or on a timer; one line per migration and a summary go to stderr.
    Run(run::Args),
    /// How fast memory is dirtied (QEMU's calc-dirty-rate): page-sampling, dirty-bitmap or
    /// dirty-ring (per vCPU), on a test guest or this process's memory written at a known
    /// rate, set beside the writers' own counters. --help explains each mode's cost.
    DirtyRate(dirty_rate::Args),
    /// Incremental snapshots of a KVM guest into a directory: `create` (a full snapshot and
    /// diffs, in stop, live or background mode), `restore` (eager or --lazy), `verify`,
    /// `merge`, `info` (docs/SNAPSHOT.md).
    #[command(subcommand)]
    Snapshot(snapshot::Cmd),
}

/// `dirtylog caps`: the table, or JSON with the kernel's names in kebab-case
/// (`KVM_CAP_DIRTY_LOG_RING` → `dirty-log-ring-bytes`).
fn caps(json: bool) -> Result<ExitCode, String> {
    let c = dirtylog_testvm::Caps::probe().map_err(|e| e.to_string())?;
    let host = dirtylog_host::probe();
    if json {
        let mut v = serde_json::to_value(&c).map_err(|e| e.to_string())?;
        let h = serde_json::to_value(&host).map_err(|e| e.to_string())?;
        match v.as_object_mut() {
            Some(o) => {
                o.insert("host".into(), h);
            }
            None => return Err("caps: the KVM capabilities are not a JSON object".into()),
        }
        println!("{}", json::document(&json::kebab_keys(v))?);
    } else {
        print!("{}", c.table());
        println!();
        print!("{}", host.table());
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Selftest(a) => selftest::run(a),
        Cmd::Perf(a) => perf::run(a),
        Cmd::Migrate(c) => migrate::run(c),
        Cmd::Demo(a) => demo::run(a),
        Cmd::Run(a) => run::run(a),
        Cmd::DirtyRate(a) => dirty_rate::run(a),
        Cmd::Snapshot(c) => snapshot::run(c),
        Cmd::Caps { json } => caps(json),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dirtylog: error: {e}");
            ExitCode::from(2)
        }
    }
}
