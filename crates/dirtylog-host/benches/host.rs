//! Host-memory tracking (issue 11), same process, alternating iterations, medians
//! (harness = false: `cargo bench -p dirtylog-host --bench host`).
//!
//! - Harvest: a 1 GiB anonymous region tracked by `HostDirtyTracker` (async uffd-wp,
//!   dirty-log mode) against the bare loop over the same registered range: `PAGEMAP_SCAN` with
//!   `PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC`, category `PAGE_IS_WRITTEN`, a 4096-entry
//!   `page_region` vector, continuing from `walk_end`, counting pages (the structs from
//!   linux-raw-sys). Before each timed step (untimed) every page, or every 100th, is written;
//!   both sides read and re-protect the same kernel state. Ours also fills a bitmap and checks
//!   the range is still mapped.
//! - First write: µs per first write to a protected, populated page for each method against a
//!   write to an untracked populated page; the harvest that re-protects is untimed.
//! - Throughput: one thread stamps random pages of a 1 MiB and a 64 MiB region for 200 ms while this
//!   thread harvests (re-protecting) every 10 ms; against the same writer on an untracked
//!   region.
//! - Memory: live heap bytes (a counting global allocator) that a tracker of 1 GiB and of
//!   4 GiB holds after start and a first harvest, per method, in bits per tracked page.
//!
//! Sections by name: `cargo bench -p dirtylog-host --bench host -- harvest first-write
//! throughput memory` (all by default); `HOST_BENCH_RAW=1` prints the harvest samples.

use std::alloc::{GlobalAlloc, Layout, System};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dirtylog::{DirtyTracker, TrackerKind};
use dirtylog_host::{
    HostBacking, HostDirtyTracker, HostMemory, HostMethod, HostRegion, HostTrackerConfig,
};
use linux_raw_sys::general::{
    page_region, pm_scan_arg, PAGE_IS_WRITTEN, PM_SCAN_CHECK_WPASYNC, PM_SCAN_WP_MATCHING,
};

/// Live heap bytes, for the memory section.
static LIVE: AtomicUsize = AtomicUsize::new(0);

struct Counting;

// SAFETY: every call is forwarded unchanged to the system allocator; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const PAGE: u64 = 4096;
const WORDS_PER_PAGE: usize = (PAGE / 8) as usize;
const GIB_PAGES: u64 = (1 << 30) / PAGE;

/// `_IOWR('f', 16, struct pm_scan_arg)` (`include/uapi/linux/fs.h`; linux-raw-sys has the
/// structs but not this number).
const PAGEMAP_SCAN: libc::c_ulong = 0xC060_6610;

/// Rounds of the harvest comparison; the first is a warm-up. Many: on a loaded machine a
/// 1 GiB scan is often preempted for a scheduler tick (4 ms), so the samples are bimodal.
const HARVEST_ROUNDS: u64 = 21;

/// Entries of the bare loop's output vector.
const BARE_VEC: usize = 4096;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn anon(len: u64) -> Arc<HostMemory> {
    Arc::new(HostMemory::new(len, HostBacking::Anonymous).expect("mmap the region"))
}

fn tracker(mem: &Arc<HostMemory>, method: HostMethod) -> HostDirtyTracker {
    let cfg = HostTrackerConfig {
        method,
        mode: TrackerKind::DirtyLog,
    };
    HostDirtyTracker::new(vec![HostRegion::new(mem.clone())], cfg)
        .unwrap_or_else(|e| panic!("{method} tracker: {e}"))
}

/// Store `v` into the first word of every `step`th page of `mem`.
fn write_pages(mem: &HostMemory, step: usize, v: u64) {
    let words = mem.words();
    for p in (0..mem.npages() as usize).step_by(step) {
        words[p * WORDS_PER_PAGE].store(v, Ordering::Relaxed);
    }
}

/// The baseline: the bare `PAGEMAP_SCAN` loop over `[start, end)`, reading the written pages
/// and write-protecting them in the same walk. Returns the pages reported.
fn bare_scan(pagemap: &File, start: u64, end: u64, vec: &mut [page_region]) -> u64 {
    let mut pages = 0;
    let mut at = start;
    while at < end {
        let mut arg = pm_scan_arg {
            size: std::mem::size_of::<pm_scan_arg>() as u64,
            flags: u64::from(PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC),
            start: at,
            end,
            walk_end: 0,
            vec: vec.as_mut_ptr() as u64,
            vec_len: vec.len() as u64,
            max_pages: 0,
            category_inverted: 0,
            category_mask: u64::from(PAGE_IS_WRITTEN),
            category_anyof_mask: 0,
            return_mask: u64::from(PAGE_IS_WRITTEN),
        };
        // SAFETY: `arg` is a pm_scan_arg whose `vec` points to `vec.len()` writable
        // page_region entries we hold exclusively for the call.
        let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
        assert!(n >= 0, "PAGEMAP_SCAN: {}", std::io::Error::last_os_error());
        for r in &vec[..n as usize] {
            pages += (r.end - r.start) / PAGE;
        }
        assert!(arg.walk_end > at || n > 0, "PAGEMAP_SCAN made no progress");
        at = arg.walk_end;
    }
    pages
}

fn harvest_vs_bare() {
    println!("== harvest of 1 GiB (262144 pages of 4 KiB), async uffd-wp, dirty-log mode");
    let mem = anon(1 << 30);
    let t = tracker(&mem, HostMethod::Async);
    t.start().expect("start");
    let pagemap = File::open("/proc/self/pagemap").expect("open /proc/self/pagemap");
    let mut vec = vec![
        page_region {
            start: 0,
            end: 0,
            categories: 0
        };
        BARE_VEC
    ];
    let (start, end) = (mem.as_ptr() as u64, mem.as_ptr() as u64 + mem.len());
    let mut out = vec![0u64; GIB_PAGES.div_ceil(64) as usize];
    // Populate (untimed) and take the first harvest.
    write_pages(&mem, 1, 1);
    t.harvest(0, &mut out).expect("harvest");
    for (label, step) in [("all written", 1usize), ("1% written", 100)] {
        let expect = GIB_PAGES.div_ceil(step as u64);
        let (mut ours, mut bare) = (Vec::new(), Vec::new());
        for round in 0..HARVEST_ROUNDS {
            let mut time_ours = || {
                write_pages(&mem, step, round);
                out.iter_mut().for_each(|w| *w = 0);
                let t0 = Instant::now();
                t.harvest(0, &mut out).expect("harvest");
                let d = t0.elapsed();
                let got: u64 = out.iter().map(|w| u64::from(w.count_ones())).sum();
                assert_eq!(got, expect, "the tracker's harvest");
                d
            };
            let (o, b);
            let mut time_bare = || {
                write_pages(&mem, step, round);
                let t0 = Instant::now();
                let n = bare_scan(&pagemap, start, end, &mut vec);
                let d = t0.elapsed();
                assert_eq!(n, expect, "the bare loop's harvest");
                d
            };
            if round % 2 == 0 {
                o = time_ours();
                b = time_bare();
            } else {
                b = time_bare();
                o = time_ours();
            }
            if round > 0 {
                ours.push(o.as_secs_f64() * 1e3);
                bare.push(b.as_secs_f64() * 1e3);
            }
        }
        if std::env::var_os("HOST_BENCH_RAW").is_some() {
            println!("  raw ms: tracker {ours:.2?}\n          bare    {bare:.2?}");
        }
        let (o, b) = (median(&mut ours), median(&mut bare));
        println!(
            "{label:<12} ({expect:>6} pages): tracker {o:7.2} ms  bare PAGEMAP_SCAN loop {b:7.2} ms  \
             ratio {:.3}  (medians of {}, alternating; fastest {:.2} vs {:.2} ms)",
            o / b,
            ours.len(),
            ours[0],
            bare[0]
        );
    }
    t.stop().expect("stop");
}

fn first_write_cost() {
    const PAGES: u64 = 16_384; // 64 MiB
    const ROUNDS: u64 = 9;
    println!(
        "== first write to a protected, populated page ({PAGES} pages, medians of {ROUNDS} rounds, \
         rotating order)"
    );
    let untracked = anon(PAGES * PAGE);
    write_pages(&untracked, 1, 1);
    let tracked: Vec<(HostMethod, Arc<HostMemory>, HostDirtyTracker)> = HostMethod::ALL
        .into_iter()
        .map(|m| {
            let mem = anon(PAGES * PAGE);
            write_pages(&mem, 1, 1);
            let t = tracker(&mem, m);
            t.start().unwrap_or_else(|e| panic!("{m}: start: {e}"));
            (m, mem, t)
        })
        .collect();
    let mut out = vec![0u64; PAGES.div_ceil(64) as usize];
    // Index 0: untracked; 1..=3 the methods.
    let mut us: Vec<Vec<f64>> = vec![Vec::new(); 4];
    for round in 0..ROUNDS {
        for k in 0..4 {
            let i = (k + round as usize) % 4;
            let mem = if i == 0 {
                &untracked
            } else {
                &tracked[i - 1].1
            };
            let t0 = Instant::now();
            write_pages(mem, 1, round + 2);
            us[i].push(t0.elapsed().as_secs_f64() * 1e6 / PAGES as f64);
            if i > 0 {
                // Untimed: the harvest reports every page and protects it again.
                out.iter_mut().for_each(|w| *w = 0);
                tracked[i - 1].2.harvest(0, &mut out).expect("harvest");
                let got: u64 = out.iter().map(|w| u64::from(w.count_ones())).sum();
                assert_eq!(got, PAGES, "{}: every page written", tracked[i - 1].0);
            }
        }
    }
    let base = median(&mut us[0]);
    println!("untracked    {base:8.3} µs/page");
    for (i, (m, _, t)) in tracked.iter().enumerate() {
        let v = median(&mut us[i + 1]);
        println!(
            "{:<12} {v:8.3} µs/page  {:7.1}x untracked",
            m.to_string(),
            v / base
        );
        t.stop().expect("stop");
    }
}

/// Writes per second of one thread stamping random pages of `mem` for `run`, while this thread
/// harvests `tracker` (if any) every 10 ms.
fn stamp(mem: &HostMemory, tracker: Option<&HostDirtyTracker>, run: Duration, seed: u64) -> f64 {
    let stop = AtomicBool::new(false);
    let writes = AtomicU64::new(0);
    let npages = mem.npages();
    let mut out = vec![0u64; npages.div_ceil(64) as usize];
    let t0 = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            let words = mem.words();
            let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ seed;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..64 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    words[(x % npages) as usize * WORDS_PER_PAGE].store(n, Ordering::Relaxed);
                    n += 1;
                }
            }
            writes.store(n, Ordering::Relaxed);
        });
        while t0.elapsed() < run {
            std::thread::sleep(Duration::from_millis(10));
            if let Some(t) = tracker {
                t.harvest(0, &mut out).expect("harvest");
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    writes.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64()
}

fn throughput() {
    for pages in [256u64, 16_384] {
        throughput_of(pages);
    }
}

fn throughput_of(pages: u64) {
    const ROUNDS: u64 = 8;
    let run = Duration::from_millis(200);
    println!(
        "== write throughput: 1 thread stamping random pages of {} KiB ({pages} pages) for 200 ms, \
         harvests (re-protecting) every 10 ms; medians of {ROUNDS} rounds, rotating order",
        pages * PAGE / 1024
    );
    let untracked = anon(pages * PAGE);
    write_pages(&untracked, 1, 1);
    let tracked: Vec<(HostMethod, Arc<HostMemory>, HostDirtyTracker)> = HostMethod::ALL
        .into_iter()
        .map(|m| {
            let mem = anon(pages * PAGE);
            write_pages(&mem, 1, 1);
            let t = tracker(&mem, m);
            t.start().unwrap_or_else(|e| panic!("{m}: start: {e}"));
            (m, mem, t)
        })
        .collect();
    let mut rate: Vec<Vec<f64>> = vec![Vec::new(); 4];
    for round in 0..ROUNDS {
        for k in 0..4 {
            let i = (k + round as usize) % 4;
            let r = if i == 0 {
                stamp(&untracked, None, run, round)
            } else {
                let (_, mem, t) = &tracked[i - 1];
                stamp(mem, Some(t), run, round)
            };
            rate[i].push(r / 1e6);
        }
    }
    let base = median(&mut rate[0]);
    println!("untracked    {base:9.2} M writes/s");
    for (i, (m, _, t)) in tracked.iter().enumerate() {
        let v = median(&mut rate[i + 1]);
        println!(
            "{:<12} {v:9.2} M writes/s  {:6.3}x untracked",
            m.to_string(),
            v / base
        );
        t.stop().expect("stop");
    }
}

fn memory() {
    println!(
        "== the tracker's own heap (after start and a first harvest; the caller's output \
         bitmap not counted)"
    );
    for gib in [1u64, 4] {
        for m in HostMethod::ALL {
            let mem = anon(gib << 30);
            let npages = mem.npages();
            let mut out = vec![0u64; npages.div_ceil(64) as usize];
            let before = LIVE.load(Ordering::Relaxed);
            let t = tracker(&mem, m);
            t.start().expect("start");
            mem.words()[3 * WORDS_PER_PAGE].store(1, Ordering::Relaxed);
            t.harvest(0, &mut out).expect("harvest");
            let bytes = LIVE.load(Ordering::Relaxed).saturating_sub(before);
            assert_eq!(out[0], 1 << 3, "{m}: the write to page 3");
            println!(
                "{gib} GiB {:<9} {bytes:>7} bytes = {:.3} bits per 4 KiB page",
                m.to_string(),
                bytes as f64 * 8.0 / npages as f64
            );
            t.stop().expect("stop");
        }
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a filter word picks sections.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |s: &str| args.is_empty() || args.iter().any(|a| s.contains(a.as_str()));
    if want("harvest") {
        harvest_vs_bare();
    }
    if want("first-write") {
        first_write_cost();
    }
    if want("throughput") {
        throughput();
    }
    if want("memory") {
        memory();
    }
}
