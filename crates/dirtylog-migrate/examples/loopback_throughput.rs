//! Loopback bulk throughput of the engine against raw TCP streams of the same bytes, in
//! alternated pairs.
//!
//! ```text
//! cargo run --release -p dirtylog-migrate --example loopback_throughput -- \
//!     [--mib 1024] [--pairs 5] [--connections 1,2,4] [--memory prefault|fresh] \
//!     [--only engine|raw] [--frame-kib KIB] [--verify background|strict|off] [--raw-hash]
//! ```
//!
//! `--only` runs one side alone (to profile it; its ratios are then meaningless). To profile
//! only the timed parts (the engine's bulk pass, the raw transfer), give `perf record` a
//! control FIFO and its path in `PERF_CTL` (and the ack FIFO in `PERF_ACK`):
//!
//! ```text
//! mkfifo /tmp/ctl /tmp/ack
//! PERF_CTL=/tmp/ctl PERF_ACK=/tmp/ack perf record -e cpu-clock -g -D -1 \
//!     --control fifo:/tmp/ctl,/tmp/ack -- target/release/examples/loopback_throughput …
//! ```
//!
//! For each connection count N and each of `--pairs` pairs, one process runs
//! - the **engine**: an idle software VM of `--mib` MiB with every page non-zero (no zero-page
//!   shortcut) migrated over 127.0.0.1 with N connections; its bulk pass (round 0: zero test,
//!   frame, send — straight from guest memory, or copied first and CRC'd with `--verify off`;
//!   receive, validate, write into the target's memory, hash each page or check the CRC) is
//!   timed by the sender, from the round's start to the last connection's `RoundEnd`;
//! - the **raw** baseline: N plain TCP connections, each writing 1/N of the same source VM's
//!   memory in 4 MiB writes, and a reader per connection `read`ing (4 MiB at most per call)
//!   straight into its share of a destination, from the first connect to the last byte read;
//!   with `--raw-hash` each reader also hashes every page it completes right after each read
//!   ([`mem_hash`], the engine's per-page check), so that the ratio shows what the engine
//!   costs beyond the check it pays for verification;
//!
//! alternating which goes first (pair 0 raw first, pair 1 engine first, …). Both runs of a
//! pair read the same source VM's memory (read once before the pair: see [`read_once`]), and
//! both write into a target built by
//! [`SoftVm::target`] before the clock starts (the raw run writes into that target's memory
//! directly), so both destinations are allocated the same way; with `--memory prefault` (the
//! default) one word of every page of it is written first, so that neither run pays the
//! kernel's first-touch page zeroing (on this nested host its cost swings with what the
//! outer hypervisor backs, and it is not the engine's cost); `--memory fresh` leaves both
//! destinations untouched, as a real destination's memory is. It prints each pair, the
//! medians, and the median of the per-pair ratios engine/raw.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use dirtylog_migrate::digest::mem_hash;
use dirtylog_migrate::soft::{SoftConfig, SoftVm, Workload};
use dirtylog_migrate::wire::{Region, StreamHeader, PAGES_PIECE};
use dirtylog_migrate::{receive, send, Phase, ReceiveConfig, SendConfig, Verify};
use dirtylog_migrate::{MigrationMemory, MigrationSource, MigrationTarget, TrackerKind};

type Error = Box<dyn std::error::Error + Send + Sync>;

const PAGE: usize = 4096;
/// Bytes per raw `write` and most bytes per raw `read` (without `--raw-hash`).
const RAW_CHUNK: usize = 4 << 20;

struct Args {
    mib: u64,
    pairs: usize,
    connections: Vec<usize>,
    prefault: bool,
    /// Run only this side (for profiling): "engine" or "raw".
    only: Option<String>,
    /// [`SendConfig::frame_bytes`]; `None` for the default.
    frame_bytes: Option<usize>,
    /// [`SendConfig::verify`] (default background: every page hashed on arrival; off: every
    /// frame CRC'd instead).
    verify: Verify,
    /// Raw readers hash each page they complete, as the engine's receiver does.
    raw_hash: bool,
}

fn parse_args() -> Result<Args, Error> {
    let mut a = Args {
        mib: 1024,
        pairs: 5,
        connections: vec![1, 2, 4],
        prefault: true,
        only: None,
        frame_bytes: None,
        verify: Verify::default(),
        raw_hash: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--mib" => a.mib = value()?.parse()?,
            "--pairs" => a.pairs = value()?.parse()?,
            "--connections" => {
                a.connections = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "--memory" => {
                a.prefault = match value()?.as_str() {
                    "prefault" => true,
                    "fresh" => false,
                    m => return Err(format!("--memory {m}: use prefault or fresh").into()),
                }
            }
            "--only" => a.only = Some(value()?),
            "--frame-kib" => a.frame_bytes = Some(value()?.parse::<usize>()? << 10),
            "--verify" => a.verify = value()?.parse()?,
            "--raw-hash" => a.raw_hash = true,
            _ => return Err(format!("unknown argument {flag}").into()),
        }
    }
    if a.mib == 0 || a.pairs == 0 || a.connections.iter().any(|&n| n == 0 || n > 64) {
        return Err("--mib and --pairs must be at least 1, connections 1..=64".into());
    }
    Ok(a)
}

fn main() -> Result<(), Error> {
    let args = parse_args()?;
    let size = args.mib.checked_mul(1 << 20).ok_or("--mib too large")?;
    let regions = vec![Region {
        slot: 0,
        gpa: 0,
        size,
    }];
    println!(
        "guest {} MiB, all pages non-zero, {} alternated pairs per connection count, \
         verify {}, raw readers {}, destination memory {}",
        args.mib,
        args.pairs,
        args.verify,
        if args.raw_hash {
            "hash each page (--raw-hash)"
        } else {
            "only read"
        },
        if args.prefault {
            "pre-faulted (one word of each page written before the clock starts)"
        } else {
            "fresh (first touch during the run)"
        }
    );
    let gib = |b: f64| b / f64::from(1 << 30);
    let mut summary = Vec::new();
    for &n in &args.connections {
        let (mut engine, mut raw, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
        for pair in 0..args.pairs {
            let src = SoftVm::source(&SoftConfig {
                page_size: PAGE as u32,
                regions: regions.clone(),
                vcpus: 1,
                tracker: TrackerKind::ClearLog,
                workload: Workload::idle(),
                nonzero_percent: 100,
            })?;
            read_once(&src)?;
            let header = StreamHeader::new(PAGE as u32, 1, regions.clone())?;
            let raw_first = pair % 2 == 0;
            let (mut e, mut r) = (0.0, 0.0);
            for run in 0..2 {
                let target = SoftVm::target(&header, TrackerKind::ClearLog)?;
                let mem = MigrationTarget::memory(&target)
                    .region_memory(0)
                    .ok_or("the target has no region 0")?;
                if args.prefault {
                    prefault(mem.as_ptr(), mem.len());
                }
                let is_raw = (run == 0) == raw_first;
                let wanted = if is_raw { "raw" } else { "engine" };
                if args.only.as_deref().is_some_and(|o| o != wanted) {
                    continue;
                }
                if is_raw {
                    r = raw_stream(&src, target, n, args.raw_hash)?;
                } else {
                    e = engine_bulk(&src, target, n, args.frame_bytes, args.verify)?;
                }
            }
            println!(
                "  {n} conn, pair {pair} ({} first): engine {:.2} GiB/s, raw {:.2} GiB/s, \
                 ratio {:.2}",
                if raw_first { "raw" } else { "engine" },
                gib(e),
                gib(r),
                e / r
            );
            engine.push(e);
            raw.push(r);
            ratio.push(e / r);
        }
        let line = format!(
            "{n} conn: engine {:.2} GiB/s ({:.2}-{:.2}), raw {:.2} GiB/s ({:.2}-{:.2}), \
             median of per-pair ratios {:.2} ({:.2}-{:.2})",
            gib(median(&engine)),
            gib(min(&engine)),
            gib(max(&engine)),
            gib(median(&raw)),
            gib(min(&raw)),
            gib(max(&raw)),
            median(&ratio),
            min(&ratio),
            max(&ratio),
        );
        println!("{line}");
        summary.push(line);
    }
    println!("summary (medians, ranges in parentheses):");
    for line in summary {
        println!("  {line}");
    }
    if let Some(hwm) = peak_rss_kib() {
        println!("peak RSS: {} MiB", hwm / 1024);
    }
    Ok(())
}

/// Migrate `src` into `target` (already built and prepared) over `n` loopback connections;
/// the bulk pass's bytes per second.
fn engine_bulk(
    src: &SoftVm,
    target: SoftVm,
    n: usize,
    frame_bytes: Option<usize>,
    verify: Verify,
) -> Result<f64, Error> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let receiver = std::thread::spawn(move || {
        receive(&listener, &ReceiveConfig::default(), move |_| Ok(target)).map(|_| ())
    });
    let mut config = SendConfig {
        connections: n,
        verify,
        ..SendConfig::default()
    };
    if let Some(b) = frame_bytes {
        config.frame_bytes = b;
    }
    let mut in_bulk = false;
    let report = send(src, addr, &config, &mut |p| {
        let bulk = p.phase == Phase::Bulk;
        if bulk != in_bulk {
            in_bulk = bulk;
            perf_control(if bulk { "enable" } else { "disable" });
        }
    })?;
    if in_bulk {
        perf_control("disable");
    }
    receiver.join().map_err(|_| "receiver panicked")??;
    let bulk = report.rounds.first().ok_or("no bulk round")?;
    if bulk.stats.zero_pages != 0 {
        return Err(format!("{} zero pages in the bulk pass", bulk.stats.zero_pages).into());
    }
    Ok(bulk.transferred as f64 / (bulk.stats.send_time_us.max(1) as f64 / 1e6))
}

/// Write one word of every page of `len` bytes at `ptr` (a region of a VM nobody runs), so
/// that the kernel has backed every page before a run.
fn prefault(ptr: *mut u8, len: usize) {
    for offset in (0..len).step_by(PAGE) {
        // SAFETY: `offset + 8 <= len` inside a live, 8-byte aligned region of a target VM that
        // is not running and that no other thread accesses yet; the store is atomic, as every
        // access of the software VM to its memory is.
        let word = unsafe { &*ptr.add(offset).cast::<AtomicU64>() };
        word.store(0, Ordering::Relaxed);
    }
}

/// Read every page of `src` once, before its pair. The first pass over a process's first
/// guest memory ran at a quarter of the speed of later passes here (copying it: 1.6-2.0
/// against 7-9 GiB/s, 2026-12-01; no page faults, so the cause lies below this process),
/// which taxed whichever side ran first in the first pair (its engine runs 1.8-2.0 GiB/s
/// against 2.7-3.1 after it). A running guest's memory is not in that state.
fn read_once(src: &SoftVm) -> Result<(), Error> {
    let mem = MigrationSource::memory(src)
        .region_memory(0)
        .ok_or("the source has no region 0")?;
    let mut sum = 0u64;
    for offset in (0..mem.len()).step_by(8) {
        // SAFETY: `offset + 8 <= len` inside a live, 8-byte aligned region of an idle VM
        // (its vCPUs write nothing); the load is atomic, as every access of the software VM
        // to its memory is.
        let word = unsafe { &*mem.as_ptr().add(offset).cast::<AtomicU64>() };
        sum = sum.wrapping_add(word.load(Ordering::Relaxed));
    }
    std::hint::black_box(sum);
    Ok(())
}

/// `n` plain TCP connections carrying `src`'s memory, 1/n each, into `target`'s memory (each
/// page hashed as it lands with `hash`). Bytes per second from the first connect to the last
/// byte read.
fn raw_stream(src: &SoftVm, target: SoftVm, n: usize, hash: bool) -> Result<f64, Error> {
    let from = MigrationSource::memory(src)
        .region_memory(0)
        .ok_or("the source has no region 0")?;
    let to = MigrationTarget::memory(&target)
        .region_memory(0)
        .ok_or("the target has no region 0")?;
    let len = from.len().min(to.len());
    // SAFETY: the source VM is idle (its vCPUs write nothing) and lives across this call; the
    // slice is only read.
    let from = unsafe { std::slice::from_raw_parts(from.as_ptr().cast_const(), len) };
    // SAFETY: the target VM has not run and is not migrating: nothing else accesses its memory
    // while this slice (dropped before `target`) lives.
    let to = unsafe { std::slice::from_raw_parts_mut(to.as_ptr(), len) };
    let share = (len / PAGE).div_ceil(n) * PAGE;
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    perf_control("enable");
    let t = Instant::now();
    let got = std::thread::scope(|s| -> Result<u64, Error> {
        let readers: Vec<_> = listeners
            .iter()
            .zip(to.chunks_mut(share))
            .map(|(l, dst)| s.spawn(move || read_into(l, dst, hash)))
            .collect();
        let writers: Vec<_> = listeners
            .iter()
            .zip(from.chunks(share))
            .map(|(l, bytes)| {
                let addr = l.local_addr();
                s.spawn(move || -> std::io::Result<()> {
                    let mut stream = TcpStream::connect(addr?)?;
                    stream.set_nodelay(true)?;
                    for chunk in bytes.chunks(RAW_CHUNK) {
                        stream.write_all(chunk)?;
                    }
                    stream.shutdown(std::net::Shutdown::Write)
                })
            })
            .collect();
        for w in writers {
            w.join().map_err(|_| "raw writer panicked")??;
        }
        let mut got = 0;
        for r in readers {
            got += r.join().map_err(|_| "raw reader panicked")??;
        }
        Ok(got)
    })?;
    let secs = t.elapsed().as_secs_f64();
    perf_control("disable");
    if got != len as u64 {
        return Err(format!("raw streams carried {got} bytes of {len}").into());
    }
    drop(target);
    Ok(got as f64 / secs)
}

/// Accept one connection on `l` and read it into `dst` until it ends, hashing each page as it
/// completes with `hash`; the bytes read.
fn read_into(l: &TcpListener, dst: &mut [u8], hash: bool) -> std::io::Result<u64> {
    let (mut s, _) = l.accept()?;
    s.set_nodelay(true)?;
    let (mut at, mut hashed, mut sum) = (0, 0, 0u64);
    loop {
        if hash {
            while hashed + PAGE <= at {
                sum ^= mem_hash(&dst[hashed..hashed + PAGE]);
                hashed += PAGE;
            }
        }
        // Hashing, read as the engine's decoder does: at most a piece per call, hashed while
        // it is still in cache.
        let most = if hash { PAGES_PIECE } else { RAW_CHUNK };
        let end = (at + most).min(dst.len());
        if at == end {
            // Full: the stream must end here.
            let mut probe = [0u8; 1];
            std::hint::black_box(sum);
            return match s.read(&mut probe)? {
                0 => Ok(at as u64),
                _ => Err(std::io::Error::other("more bytes than the destination")),
            };
        }
        let k = s.read(&mut dst[at..end])?;
        if k == 0 {
            std::hint::black_box(sum);
            return Ok(at as u64);
        }
        at += k;
    }
}

/// Tell `perf record --control` (FIFOs in `PERF_CTL` and `PERF_ACK`) to `enable` or
/// `disable` sampling, and wait for its ack. Nothing without `PERF_CTL`.
fn perf_control(command: &str) {
    let Some(ctl) = std::env::var_os("PERF_CTL") else {
        return;
    };
    let sent = std::fs::OpenOptions::new()
        .write(true)
        .open(ctl)
        .and_then(|mut f| f.write_all(format!("{command}\n").as_bytes()));
    if let Err(e) = sent {
        eprintln!("PERF_CTL: {e}");
        return;
    }
    if let Some(ack) = std::env::var_os("PERF_ACK") {
        let mut buf = [0u8; 5];
        if let Err(e) = std::fs::File::open(ack).and_then(|mut f| f.read(&mut buf)) {
            eprintln!("PERF_ACK: {e}");
        }
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

/// VmHWM from /proc/self/status, in KiB.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
