//! Loopback bulk throughput of a KVM guest's migration against a raw TCP stream of the same
//! size, measured in the same run.
//!
//! ```text
//! cargo run --release -p dirtylog-testvm --example kvm_loopback_throughput -- \
//!     [MiB] [connections] [clear-log|dirty-log|ring|ring:ENTRIES] [huge-pages|no-huge-pages] [target: same]
//! ```
//!
//! Boots an idle KVM guest of `MiB` (default 1024) whose memory the host first fills with
//! non-zero bytes (so no page takes the zero-page shortcut), migrates it over 127.0.0.1 to a
//! KVM target in this process with the given connections (default 1), and measures the bulk
//! pass (round 0: copy out of guest memory, frame, CRC, send; receive, CRC, validate, write
//! into the target VM's memory). Then it pushes the same number of bytes through one plain TCP
//! connection (4 MiB writes; the reader `read`s into a guest-sized buffer backed like the
//! target's memory), before and after the migration, and prints them, the ratio against the
//! faster raw run, and the migration's downtime.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use dirtylog_migrate::TrackerKind;
use dirtylog_migrate::{receive, send, MigrationMemory, ReceiveConfig, SendConfig};
use dirtylog_testvm::migrate::{GuestConfig, KvmSource, KvmTarget, TargetOptions};
use dirtylog_testvm::{GuestMemory, MemoryOptions};

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().map_or(Ok(1024), |a| a.parse())?;
    let connections: usize = args.next().map_or(Ok(1), |a| a.parse())?;
    let tracker: TrackerKind = match args.next() {
        None => TrackerKind::ClearLog,
        Some(t) => t.parse()?,
    };
    let huge_pages = args.next().as_deref() != Some("no-huge-pages");
    let target_huge_pages = args
        .next()
        .as_deref()
        .map_or(huge_pages, |a| a != "no-huge-pages");
    let size = mib << 20;

    let src = KvmSource::boot(&GuestConfig {
        mem_bytes: size,
        vcpus: 2,
        dirty_rate: Some(0),
        working_set_bytes: 1 << 20,
        mailbox_every: 0,
        tracker,
        huge_pages,
        ..GuestConfig::default()
    })?;
    // Fill the main slot from the host. The idle guest writes nothing.
    let mem = src.region_memory(1).ok_or("the source has no region 1")?;
    for page in 0..mem.len() / 4096 {
        // SAFETY: `page * 4096 + 8 <= len` inside the source's mapping of region 1, which
        // lives as long as `src`; no vCPU writes this memory (the guest is idle) and the
        // engine is not running yet.
        unsafe {
            mem.as_ptr()
                .add(page * 4096)
                .cast::<u64>()
                .write_volatile(page as u64 | 1 << 63);
        }
    }

    // The same bytes over a raw socket, once before the migration and once after: this nested
    // host makes first touches of memory it has not backed yet expensive, so whichever run
    // comes first can pay more; the ratio is taken against the faster raw run.
    let raw_before = raw_stream(size + size / 4096 * 32, size, target_huge_pages)?;

    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let receiver = std::thread::spawn(move || {
        receive(&listener, &ReceiveConfig::default(), |h| {
            KvmTarget::new(
                h,
                &TargetOptions {
                    huge_pages: target_huge_pages,
                    ..TargetOptions::default()
                },
            )
        })
        .map(|(target, report)| (target.guest_writes(), report))
    });
    let config = SendConfig {
        connections,
        timeout: Some(Duration::from_secs(120)),
        ..SendConfig::default()
    };
    let report = send(&src, addr, &config, &mut |_| {})?;
    let (_, rreport) = receiver.join().map_err(|_| "receiver panicked")??;
    src.shutdown()?;
    let bulk = &report.rounds[0];
    let bulk_bytes = bulk.transferred;
    let bulk_s = bulk.stats.send_time_us as f64 / 1e6;
    let engine = bulk_bytes as f64 / bulk_s;

    // The raw stream after the migration, on memory the migration has just freed.
    let (got, raw_s) = raw_stream(bulk_bytes, size, target_huge_pages)?;
    let raw = got as f64 / raw_s;
    let raw_before = raw_before.0 as f64 / raw_before.1;

    let gib = |b: f64| b / f64::from(1 << 30);
    println!(
        "KVM guest {mib} MiB, {connections} connection(s), tracker {}, source {}, target {}, \
         all pages non-zero",
        tracker.name(),
        if huge_pages {
            "huge pages"
        } else {
            "4 KiB pages"
        },
        if target_huge_pages {
            "huge pages"
        } else {
            "4 KiB pages"
        }
    );
    println!(
        "engine bulk pass: {bulk_bytes} bytes in {bulk_s:.3} s = {:.2} GiB/s ({} pages sent, {} zero)",
        gib(engine),
        bulk.stats.sent_pages,
        bulk.stats.zero_pages
    );
    println!(
        "raw TCP stream:   {got} bytes in {raw_s:.3} s = {:.2} GiB/s (before the migration: \
         {:.2} GiB/s)",
        gib(raw),
        gib(raw_before)
    );
    println!("ratio engine/raw: {:.2}", engine / raw.max(raw_before));
    println!(
        "whole migration: total {} ms, downtime {} ms (hash check on the receiver {} ms)",
        report.stats.total_time, report.stats.downtime, rreport.hash_check_time
    );
    Ok(())
}

/// Push `bytes` through one plain TCP connection in 4 MiB writes into a reader that `read`s
/// into a buffer of `size` bytes backed like the target's guest memory (fresh anonymous memory,
/// with the same huge-page advice). Returns the bytes read and the seconds taken.
fn raw_stream(
    bytes: u64,
    size: u64,
    huge_pages: bool,
) -> Result<(u64, f64), Box<dyn std::error::Error + Send + Sync>> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let buffer = GuestMemory::new(
        size as usize,
        MemoryOptions {
            no_huge_pages: !huge_pages,
            populate: false,
        },
    )?;
    if huge_pages {
        // SAFETY: advice on exactly the range of the live mapping `buffer` owns.
        unsafe {
            libc::madvise(
                buffer.host_addr() as *mut libc::c_void,
                buffer.len(),
                libc::MADV_HUGEPAGE,
            )
        };
    }
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut s, _) = listener.accept()?;
        // SAFETY: `buffer` is a live mapping of `size` bytes owned by this thread from here
        // on; nothing else accesses it while the slice exists.
        let memory =
            unsafe { std::slice::from_raw_parts_mut(buffer.host_addr() as *mut u8, buffer.len()) };
        let mut at = 0usize;
        let mut total = 0u64;
        loop {
            let end = (at + (4 << 20)).min(memory.len());
            let n = s.read(&mut memory[at..end])?;
            if n == 0 {
                return Ok(total);
            }
            total += n as u64;
            at = (at + n) % memory.len();
        }
    });
    let chunk = vec![0x5au8; 4 << 20];
    let t = Instant::now();
    let mut s = TcpStream::connect(addr)?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let got = reader.join().map_err(|_| "reader panicked")??;
    Ok((got, t.elapsed().as_secs_f64()))
}
