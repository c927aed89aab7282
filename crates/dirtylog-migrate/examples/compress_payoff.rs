//! Where per-frame compression pays off: total migration time with none / lz4 / zstd:1 under
//! `max_bandwidth` limits, on two kinds of guest memory.
//!
//! ```text
//! cargo run --release -p dirtylog-migrate --example compress_payoff -- [MiB] [reps]
//! ```
//!
//! Migrates a guest of `MiB` (default 256) over 127.0.0.1 with one connection, for each limit
//! in 100, 150, 250, 500, 1000, 2000 MiB/s and unlimited, `reps` times (default 3) each codec, the
//! codecs alternating (their order rotates each repetition), and prints the median total time
//! and bytes on the wire of each, and their ratios to no compression. The guest runs one vCPU
//! dirtying 4096 random pages at 5000 pages/s throughout. Two memories:
//!
//! - `soft`: the software VM's own: 60% zero pages (sent as markers), 40% pages holding 8
//!   random words (one per 512 bytes) among zeros, and the vCPU's writes (a random word per
//!   page). Very compressible: nearly all zeros.
//! - `mixed`: like a real guest's used memory: half the pages text-like (words of a small
//!   vocabulary), half random bytes (compressed files, keys, encrypted data), in random order,
//!   no zero pages. The vCPU's dirty pages are re-sent with this content.
//!
//! It first measures each codec alone on one core over the memory (MiB/s of input), which
//! sets the link speed below which compression can pay off.

use std::net::TcpListener;
use std::time::Instant;

use dirtylog_migrate::compress::{Compression, Compressor};
use dirtylog_migrate::soft::{SoftConfig, SoftVm, Workload};
use dirtylog_migrate::wire::Region;
use dirtylog_migrate::{
    receive, send, MigrationSource, ReceiveConfig, SendConfig, SendReport, TrackerKind,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Error = Box<dyn std::error::Error + Send + Sync>;

const PAGE: u64 = 4096;
const LIMITS_MIB: [Option<u64>; 7] = [
    Some(100),
    Some(150),
    Some(250),
    Some(500),
    Some(1000),
    Some(2000),
    None,
];
const CODECS: [Option<Compression>; 3] = [
    None,
    Some(Compression::Lz4),
    Some(Compression::Zstd { level: 1 }),
];

/// A source with memory filled here, and a software VM's tracker and vCPUs over the same
/// layout (its vCPU dirties pages; they are sent with this memory's content).
struct Filled<'m> {
    mem: &'m GuestMemoryMmap<()>,
    vm: SoftVm,
}

impl MigrationSource for Filled<'_> {
    type Memory = GuestMemoryMmap<()>;
    type Tracker = SoftVm;
    type Vcpus = SoftVm;
    fn memory(&self) -> &GuestMemoryMmap<()> {
        self.mem
    }
    fn tracker(&self) -> &SoftVm {
        &self.vm
    }
    fn vcpus(&self) -> &SoftVm {
        &self.vm
    }
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Half text-like pages, half random pages, in random order.
fn mixed_memory(size: u64) -> Vec<u8> {
    const WORDS: [&str; 16] = [
        "the ",
        "page ",
        "dirty ",
        "migration ",
        "of ",
        "kernel ",
        "memory ",
        "and ",
        "log ",
        "guest ",
        "a ",
        "bit\n",
        "struct ",
        "return ",
        "0x7f3a ",
        "error: ",
    ];
    let mut x = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(size as usize + 16);
    for _ in 0..size / PAGE {
        let end = out.len() + PAGE as usize;
        if xorshift(&mut x) % 2 == 0 {
            while out.len() < end {
                let w = WORDS[(xorshift(&mut x) % WORDS.len() as u64) as usize];
                out.extend_from_slice(w.as_bytes());
            }
            out.truncate(end);
        } else {
            while out.len() < end {
                out.extend_from_slice(&xorshift(&mut x).to_le_bytes());
            }
        }
    }
    out
}

fn soft_vm(size: u64, nonzero_percent: u8) -> Result<SoftVm, Error> {
    let vm = SoftVm::source(&SoftConfig {
        page_size: PAGE as u32,
        regions: vec![Region {
            slot: 0,
            gpa: 0,
            size,
        }],
        vcpus: 1,
        tracker: TrackerKind::ClearLog,
        workload: Workload {
            first_page: 16,
            pages: 4096.min(size / PAGE - 16),
            rate: Some(5000),
            random: true,
            vmm_rate: None,
        },
        nonzero_percent,
    })?;
    Ok(vm)
}

fn migrate<S: MigrationSource>(src: &S, config: &SendConfig) -> Result<SendReport, Error> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let receiver = std::thread::spawn(move || {
        receive(&listener, &ReceiveConfig::default(), |h| {
            SoftVm::target(h, TrackerKind::ClearLog)
        })
        .map(|(_, report)| report)
    });
    let report = send(src, addr, config, &mut |_| {})?;
    receiver.join().map_err(|_| "receiver panicked")??;
    Ok(report)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn name(c: Option<Compression>) -> String {
    c.map_or("none".into(), |c| c.to_string())
}

/// MiB/s of input each codec compresses on one core, and its ratio, over `bytes` in 2 MiB
/// frames (as the sender's), skipping all-zero pages (sent as markers).
fn codec_speed(bytes: &[u8]) -> Result<(), Error> {
    for c in CODECS.into_iter().flatten() {
        let mut compressor = Compressor::new(c)?;
        let (mut raw, mut packed) = (0usize, 0usize);
        let t = Instant::now();
        for frame in bytes.chunks(2 << 20) {
            if frame.iter().all(|&b| b == 0) {
                continue;
            }
            raw += frame.len();
            packed += compressor.compress(frame)?.map_or(frame.len(), <[u8]>::len);
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "  {:>7}: {:>6.0} MiB/s of input on one core, ratio {:.2}",
            c.to_string(),
            raw as f64 / s / f64::from(1 << 20),
            raw as f64 / packed.max(1) as f64
        );
    }
    Ok(())
}

fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().map_or(Ok(256), |a| a.parse())?;
    let reps: usize = args.next().map_or(Ok(3), |a| a.parse())?;
    let size = mib << 20;

    let mixed = mixed_memory(size);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)])?;
    mem.write_slice(&mixed, GuestAddress(0))?;

    for dataset in ["soft", "mixed"] {
        println!("\n== {dataset}: {mib} MiB guest, 1 connection ==");
        if dataset == "soft" {
            let vm = soft_vm(size, 40)?;
            let snapshot = vm.snapshot(0);
            codec_speed(&snapshot)?;
        } else {
            codec_speed(&mixed)?;
        }
        println!(
            "{:>10} {:>8} {:>14} {:>14} {:>14} {:>10} {:>10}",
            "limit", "codec", "total-time ms", "vs none", "wire MiB", "vs none", "rate"
        );
        for limit in LIMITS_MIB {
            // times[codec][rep], wire[codec][rep], rate[codec][rep]
            let mut times = vec![Vec::new(); CODECS.len()];
            let mut wire = vec![Vec::new(); CODECS.len()];
            let mut rate = vec![Vec::new(); CODECS.len()];
            for rep in 0..reps {
                for k in 0..CODECS.len() {
                    let i = (k + rep) % CODECS.len();
                    let config = SendConfig {
                        max_bandwidth: limit.map(|m| m << 20),
                        compress: CODECS[i],
                        ..SendConfig::default()
                    };
                    let report = if dataset == "soft" {
                        migrate(&soft_vm(size, 40)?, &config)?
                    } else {
                        let src = Filled {
                            mem: &mem,
                            vm: soft_vm(size, 0)?,
                        };
                        migrate(&src, &config)?
                    };
                    times[i].push(report.stats.total_time as f64);
                    wire[i].push(report.stats.transferred as f64 / f64::from(1 << 20));
                    rate[i].push(report.compression.compression_rate);
                }
            }
            let base_t = median(&mut times[0].clone());
            let base_w = median(&mut wire[0].clone());
            for (i, c) in CODECS.into_iter().enumerate() {
                let t = median(&mut times[i]);
                let w = median(&mut wire[i]);
                println!(
                    "{:>10} {:>8} {:>14.0} {:>14.2} {:>14.1} {:>10.2} {:>10.2}",
                    limit.map_or("unlimited".into(), |m| format!("{m} MiB/s")),
                    name(c),
                    t,
                    t / base_t,
                    w,
                    w / base_w,
                    median(&mut rate[i])
                );
            }
        }
    }
    Ok(())
}
