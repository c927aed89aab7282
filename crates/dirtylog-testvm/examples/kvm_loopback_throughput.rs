//! Loopback bulk throughput of a KVM guest's migration against raw TCP streams of the same
//! bytes, in alternated pairs.
//!
//! ```text
//! cargo run --release -p dirtylog-testvm --example kvm_loopback_throughput -- \
//!     [--mib 1024] [--pairs 5] [--connections 1,2,4] [--memory prefault|fresh] \
//!     [--tracker clear-log|dirty-log|ring|ring:ENTRIES] [--huge-pages yes|no] \
//!     [--target-huge-pages yes|no] [--only engine|raw] [--raw-hash]
//! ```
//!
//! For each connection count N and each of `--pairs` pairs, one process boots a halted KVM
//! guest of `--mib` MiB (one vCPU in `cli; hlt`: it writes nothing) whose memory the host
//! fills with non-zero bytes (no page takes the zero-page shortcut), then runs
//! - the **engine**: the guest migrated over 127.0.0.1 with N connections to a [`KvmTarget`]
//!   in this process; its bulk pass (round 0: zero test, frame, send straight from guest
//!   memory; receive, validate, write into the target VM's memory, hash each page) is timed
//!   by the sender, from the round's start to the last connection's `RoundEnd`;
//! - the **raw** baseline: N plain TCP connections carrying the same regions' bytes in 4 MiB
//!   writes (chunk k on connection k mod N), each reader `read`ing straight into the same
//!   place of another [`KvmTarget`]'s memory, from the first connect to the last byte read;
//!   with `--raw-hash` each reader also hashes every page right after it lands
//!   ([`mem_hash`], the engine's per-page check, reading at most [`PAGES_PIECE`] per call as
//!   the engine's decoder does), so that the ratio shows what the engine costs beyond the
//!   check it pays for verification;
//!
//! alternating which goes first (pair 0 raw first, pair 1 engine first, …). Both
//! destinations are KVM targets built from the stream header before the clock starts, so their
//! memory is mapped and advised alike (`--target-huge-pages`); with `--memory prefault` (the
//! default) every page of it is faulted in (`MADV_POPULATE_WRITE`) first, so that neither run
//! pays the kernel's first-touch page zeroing (on this nested host its cost swings with what
//! the outer hypervisor backs, and it is not the engine's cost); `--memory fresh` leaves both
//! untouched, as a real destination's memory is. It prints each pair, the medians, and the
//! median of the per-pair ratios engine/raw.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use dirtylog_migrate::digest::mem_hash;
use dirtylog_migrate::wire::{StreamHeader, PAGES_PIECE};
use dirtylog_migrate::TrackerKind;
use dirtylog_migrate::{receive, send, MigrationMemory, ReceiveConfig, SendConfig};
use dirtylog_testvm::migrate::{GuestConfig, KvmSource, KvmTarget, TargetOptions};
use dirtylog_testvm::Program;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Bytes per raw `write`, and per raw chunk (whole pages).
const RAW_CHUNK: usize = 4 << 20;
/// The page the raw readers hash by (`--raw-hash`), the engine's.
const PAGE: usize = 4096;

struct Args {
    mib: u64,
    pairs: usize,
    connections: Vec<usize>,
    prefault: bool,
    tracker: TrackerKind,
    huge_pages: bool,
    target_huge_pages: Option<bool>,
    only: Option<String>,
    /// Raw readers hash each page as it lands, as the engine's receiver does.
    raw_hash: bool,
}

fn parse_args() -> Result<Args, Error> {
    let mut a = Args {
        mib: 1024,
        pairs: 5,
        connections: vec![1, 2, 4],
        prefault: true,
        tracker: TrackerKind::ClearLog,
        huge_pages: true,
        target_huge_pages: None,
        only: None,
        raw_hash: false,
    };
    let yes = |v: String| match v.as_str() {
        "yes" => Ok(true),
        "no" => Ok(false),
        _ => Err(format!("{v}: use yes or no")),
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
            "--tracker" => a.tracker = value()?.parse()?,
            "--huge-pages" => a.huge_pages = yes(value()?)?,
            "--target-huge-pages" => a.target_huge_pages = Some(yes(value()?)?),
            "--only" => a.only = Some(value()?),
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
    let target_huge_pages = args.target_huge_pages.unwrap_or(args.huge_pages);
    let pages = |h: bool| if h { "huge pages" } else { "4 KiB pages" };
    println!(
        "KVM guest {} MiB, tracker {}, source {}, target {}, all pages non-zero, {} alternated \
         pairs per connection count, raw readers {}, destination memory {}",
        args.mib,
        args.tracker.name(),
        pages(args.huge_pages),
        pages(target_huge_pages),
        args.pairs,
        if args.raw_hash {
            "hash each page (--raw-hash)"
        } else {
            "only read"
        },
        if args.prefault {
            "pre-faulted (MADV_POPULATE_WRITE before the clock starts)"
        } else {
            "fresh (first touch during the run)"
        }
    );
    let opts = TargetOptions {
        huge_pages: target_huge_pages,
        ..TargetOptions::default()
    };
    let gib = |b: f64| b / f64::from(1 << 30);
    let mut summary = Vec::new();
    for &n in &args.connections {
        let (mut engine, mut raw, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
        for pair in 0..args.pairs {
            let src = boot_filled(size, args.tracker, args.huge_pages)?;
            let header = StreamHeader::new(src.page_size(), 1, src.regions())?;
            let raw_first = pair % 2 == 0;
            let (mut e, mut r) = (0.0, 0.0);
            for run in 0..2 {
                let is_raw = (run == 0) == raw_first;
                let wanted = if is_raw { "raw" } else { "engine" };
                if args.only.as_deref().is_some_and(|o| o != wanted) {
                    continue;
                }
                let target = KvmTarget::new(&header, &opts)?;
                if args.prefault {
                    for i in 0..header.regions().len() {
                        let mem = MigrationMemory::region_memory(&target, i)
                            .ok_or("the target has fewer regions than the header")?;
                        populate(mem.as_ptr(), mem.len())?;
                    }
                }
                if is_raw {
                    r = raw_stream(&src, &target, n, args.raw_hash)?;
                } else {
                    e = engine_bulk(&src, target, n)?;
                }
            }
            src.shutdown()?;
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
    Ok(())
}

/// Boot a halted guest of `size` bytes and fill its main slot with non-zero words.
fn boot_filled(size: u64, tracker: TrackerKind, huge_pages: bool) -> Result<KvmSource, Error> {
    let src = KvmSource::boot(&GuestConfig {
        mem_bytes: size,
        vcpus: 1,
        dirty_rate: Some(0),
        working_set_bytes: 1 << 20,
        mailbox_every: 0,
        tracker,
        huge_pages,
        program: Program::Halt,
        ..GuestConfig::default()
    })?;
    let mem = src.region_memory(1).ok_or("the source has no region 1")?;
    for page in 0..mem.len() / 4096 {
        // SAFETY: `page * 4096 + 8 <= len` inside the source's mapping of region 1, which
        // lives as long as `src`; the halted guest writes nothing and the engine is not
        // running yet.
        unsafe {
            mem.as_ptr()
                .add(page * 4096)
                .cast::<u64>()
                .write_volatile(page as u64 | 1 << 63);
        }
    }
    Ok(src)
}

/// Fault in every page of the mapping at `ptr` (page-aligned, `len` bytes) for writing,
/// without changing its contents.
fn populate(ptr: *mut u8, len: usize) -> Result<(), Error> {
    // SAFETY: advice on exactly the range of a live anonymous mapping a target owns; it only
    // faults pages in (zero-filled, as they read already).
    let r = unsafe { libc::madvise(ptr.cast(), len, libc::MADV_POPULATE_WRITE) };
    if r != 0 {
        return Err(format!("MADV_POPULATE_WRITE: {}", std::io::Error::last_os_error()).into());
    }
    Ok(())
}

/// Migrate `src` into `target` (already built and prepared) over `n` loopback connections;
/// the bulk pass's bytes per second.
fn engine_bulk(src: &KvmSource, target: KvmTarget, n: usize) -> Result<f64, Error> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let receiver = std::thread::spawn(move || {
        let (target, _) = receive(&listener, &ReceiveConfig::default(), move |_| Ok(target))?;
        target.shutdown()?;
        Ok::<(), Error>(())
    });
    let config = SendConfig {
        connections: n,
        timeout: Some(Duration::from_secs(120)),
        ..SendConfig::default()
    };
    let report = send(src, addr, &config, &mut |_| {})?;
    receiver.join().map_err(|_| "receiver panicked")??;
    let bulk = report.rounds.first().ok_or("no bulk round")?;
    Ok(bulk.transferred as f64 / (bulk.stats.send_time_us.max(1) as f64 / 1e6))
}

/// `n` plain TCP connections carrying every region of `src` into the same region of
/// `target`, 4 MiB chunk k on connection k mod n (each page hashed as it lands with `hash`).
/// Bytes per second from the first connect to the last byte read.
fn raw_stream(src: &KvmSource, target: &KvmTarget, n: usize, hash: bool) -> Result<f64, Error> {
    let mut from: Vec<&[u8]> = Vec::new();
    let mut to: Vec<&mut [u8]> = Vec::new();
    for i in 0..src.regions().len() {
        let (Some(s), Some(d)) = (
            src.region_memory(i),
            MigrationMemory::region_memory(target, i),
        ) else {
            return Err(format!("region {i} missing on one side").into());
        };
        let len = s.len().min(d.len());
        // SAFETY: the source guest is halted (it writes nothing) and `src` outlives this
        // call; the slice is only read.
        let s = unsafe { std::slice::from_raw_parts(s.as_ptr().cast_const(), len) };
        // SAFETY: the target has not resumed and is not migrating: nothing else accesses its
        // memory while this slice (which ends with this call, before `target`) lives.
        let d = unsafe { std::slice::from_raw_parts_mut(d.as_ptr(), len) };
        from.extend(s.chunks(RAW_CHUNK));
        to.extend(d.chunks_mut(RAW_CHUNK));
    }
    let total: usize = from.iter().map(|c| c.len()).sum();
    let mut readers_to: Vec<Vec<&mut [u8]>> = (0..n).map(|_| Vec::new()).collect();
    for (k, chunk) in to.into_iter().enumerate() {
        readers_to[k % n].push(chunk);
    }
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    let t = Instant::now();
    let got = std::thread::scope(|s| -> Result<u64, Error> {
        let readers: Vec<_> = listeners
            .iter()
            .zip(readers_to)
            .map(|(l, dst)| s.spawn(move || read_into(l, dst, hash)))
            .collect();
        let writers: Vec<_> = listeners
            .iter()
            .enumerate()
            .map(|(k, l)| {
                let addr = l.local_addr();
                let from = &from;
                s.spawn(move || -> std::io::Result<()> {
                    let mut stream = TcpStream::connect(addr?)?;
                    stream.set_nodelay(true)?;
                    for chunk in from.iter().skip(k).step_by(n) {
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
    if got != total as u64 {
        return Err(format!("raw streams carried {got} bytes of {total}").into());
    }
    Ok(got as f64 / secs)
}

/// Accept one connection on `l` and read it into `dst`, chunk after chunk, until it ends,
/// with `hash` hashing each page as it lands; the bytes read.
fn read_into(l: &TcpListener, dst: Vec<&mut [u8]>, hash: bool) -> std::io::Result<u64> {
    let (mut s, _) = l.accept()?;
    s.set_nodelay(true)?;
    let (mut got, mut sum) = (0, 0u64);
    for chunk in dst {
        if !hash {
            s.read_exact(chunk)?;
            got += chunk.len() as u64;
            continue;
        }
        let (mut at, mut hashed) = (0, 0);
        while at < chunk.len() {
            let end = (at + PAGES_PIECE).min(chunk.len());
            match s.read(&mut chunk[at..end])? {
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                k => at += k,
            }
            while hashed + PAGE <= at {
                sum ^= mem_hash(&chunk[hashed..hashed + PAGE]);
                hashed += PAGE;
            }
        }
        got += chunk.len() as u64;
    }
    std::hint::black_box(sum);
    let mut probe = [0u8; 1];
    match s.read(&mut probe)? {
        0 => Ok(got),
        _ => Err(std::io::Error::other("more bytes than the destination")),
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
