//! Loopback bulk throughput of the engine against a raw TCP stream of the same size.
//!
//! ```text
//! cargo run --release -p dirtylog-migrate --example loopback_throughput -- [MiB] [connections]
//! ```
//!
//! Builds an idle software VM of `MiB` (default 1024) with every page non-zero (no zero-page
//! shortcut), migrates it over 127.0.0.1 with the given connections (default 1), and measures
//! the bulk pass (round 0: copy, frame, CRC, send; receive, CRC, validate, write into the
//! target's memory). Then it pushes the same number of bytes through one plain TCP connection
//! (4 MiB writes, the reader `read`s into a buffer of guest size, page by page, as the receiver
//! does) and prints both and their ratio.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

use dirtylog_migrate::soft::{SoftConfig, SoftVm, Workload};
use dirtylog_migrate::wire::Region;
use dirtylog_migrate::TrackerKind;
use dirtylog_migrate::{receive, send, ReceiveConfig, SendConfig};

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().map_or(Ok(1024), |a| a.parse())?;
    let connections: usize = args.next().map_or(Ok(1), |a| a.parse())?;
    let size = mib << 20;

    let src = SoftVm::source(&SoftConfig {
        page_size: 4096,
        regions: vec![Region {
            slot: 0,
            gpa: 0,
            size,
        }],
        vcpus: 1,
        tracker: TrackerKind::ClearLog,
        workload: Workload::idle(),
        nonzero_percent: 100,
    })?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let receiver = std::thread::spawn(move || {
        receive(&listener, &ReceiveConfig::default(), |h| {
            SoftVm::target(h, TrackerKind::ClearLog)
        })
        .map(|(_, report)| report)
    });
    let config = SendConfig {
        connections,
        ..SendConfig::default()
    };
    let report = send(&src, addr, &config, &mut |_| {})?;
    let rreport = receiver.join().map_err(|_| "receiver panicked")??;
    let hwm = peak_rss_kib();
    let bulk = &report.rounds[0];
    let bulk_bytes = bulk.transferred;
    let bulk_s = bulk.stats.send_time_us as f64 / 1e6;
    let engine = bulk_bytes as f64 / bulk_s;

    // The same bytes over a raw socket, into a guest-sized buffer.
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut s, _) = listener.accept()?;
        let mut memory = vec![0u8; size as usize];
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
    let mut left = bulk_bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let got = reader.join().map_err(|_| "reader panicked")??;
    let raw_s = t.elapsed().as_secs_f64();
    let raw = got as f64 / raw_s;

    let gib = |b: f64| b / f64::from(1 << 30);
    println!("guest {mib} MiB, {connections} connection(s), all pages non-zero");
    println!(
        "engine bulk pass: {bulk_bytes} bytes in {bulk_s:.3} s = {:.2} GiB/s ({} pages sent, {} zero)",
        gib(engine),
        bulk.stats.sent_pages,
        bulk.stats.zero_pages
    );
    println!(
        "raw TCP stream:   {got} bytes in {raw_s:.3} s = {:.2} GiB/s",
        gib(raw)
    );
    println!("ratio engine/raw: {:.2}", engine / raw);
    println!(
        "whole migration: total {} ms, downtime {} ms (hash check on the receiver {} ms)",
        report.stats.total_time, report.stats.downtime, rreport.hash_check_time
    );
    // Source and target live in this one process: two guests, two budgets.
    let pages = size / 4096;
    let budget_kib = 2 * (size + (64 << 20) + pages / 4) / 1024;
    if let Some(hwm) = hwm {
        println!(
            "peak RSS after the migration: {} MiB; two guests plus two budgets of 64 MiB + 2 \
             bits/page: {} MiB",
            hwm / 1024,
            budget_kib / 1024
        );
    }
    Ok(())
}

/// VmHWM from /proc/self/status, in KiB.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
