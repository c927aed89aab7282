//! Core micro-benchmarks of the dirty-log paths on the software-MMU reference arch.
//!
//! `cargo bench -p dirtylog --bench core` prints a table; `-- --json` prints JSON instead.
//!
//! Measured for a 1 GiB slot of 4 KiB pages (262 144 pages, a 32 KiB bitmap) at 0 %, 1 %
//! (random pages, fixed seed) and 100 % dirty:
//! - `KVM_GET_DIRTY_LOG` without manual protect (xchg + write-protect + flush + copy), with a
//!   per-part breakdown at 100 %, and with manual protect (a snapshot);
//! - `KVM_CLEAR_DIRTY_LOG` over the whole slot with a user bitmap of all ones;
//! - `bitmap::runs` over the 32 KiB bitmap;
//! - dirty-ring harvest (`collect` + `commit` + `KVM_RESET_DIRTY_RINGS`) per entry;
//! - the plain memory read bandwidth of this machine, to put the bitmap scans in proportion;
//! - RSS and heap costs of a logging slot and of a ring vCPU, and allocations per call
//!   (counted by a wrapping global allocator).
//!
//! Every timed call gets its dirty bits set outside the timed region. Times are the median
//! (and minimum) of N samples taken with `Instant`; results go through `black_box`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Write as _;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use dirtylog::bitmap::runs;
use dirtylog::softmmu::{Exit, FlushKind, Machine, SoftVcpu};
use dirtylog::vm::{
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use dirtylog::{
    ArchMmu, DirtyBitmap, MemoryRegion, RingEntry, RingHarvester, VmConfig, KVM_MEM_LOG_DIRTY_PAGES,
};

// ---------------------------------------------------------------------------------------------
// Allocation counting.

/// `System`, counting calls and bytes.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static LIVE_BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: every method forwards to `System` with the same arguments; the counters are plain
// atomics and never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(l.size() as u64, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc(l) }
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(l.size() as u64, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc_zeroed(l) }
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE_BYTES.fetch_sub(l.size() as u64, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(p, l) }
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(new as u64, Ordering::Relaxed);
        LIVE_BYTES.fetch_sub(l.size() as u64, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.load(Ordering::Relaxed)
}

fn heap_live() -> i64 {
    LIVE_BYTES.load(Ordering::Relaxed) as i64
}

/// A `kB` field of `/proc/self/status` (`VmRSS`, `VmHWM`), in KiB; 0 if unavailable.
fn proc_status_kib(key: &str) -> i64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// RSS (KiB) and live heap bytes, for deltas.
fn mem_point() -> (i64, i64) {
    (proc_status_kib("VmRSS"), heap_live())
}

// ---------------------------------------------------------------------------------------------
// Geometry and dirty patterns.

const PAGE: u64 = 4096;
const SLOT_BYTES: u64 = 1 << 30;
const NPAGES: u64 = SLOT_BYTES / PAGE;
const WORDS: usize = (NPAGES / 64) as usize;
const BITMAP_BYTES: f64 = (WORDS * 8) as f64;
/// A small non-logging slot the vCPU writes between samples, so that it enters guest mode and
/// drains the ranged flushes GET/CLEAR queued for it (an idle vCPU would accumulate them).
const DRAIN_GPA: u64 = 4 << 30;
const RING_ENTRIES: u32 = 65536;
const RING_RSVD: u32 = 64;
const SEED: u64 = 0x5eed_d127_7106;

/// splitmix64: a fixed-seed generator, so the 1 % pattern is the same on every run.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// `n` distinct pages of `0..npages` in random order (a partial Fisher-Yates shuffle).
fn random_pages(n: usize, npages: u64, seed: u64) -> Vec<u64> {
    let mut rng = SplitMix(seed);
    let mut perm: Vec<u64> = (0..npages).collect();
    for i in 0..n {
        let j = i + (rng.next() % (npages - i as u64)) as usize;
        perm.swap(i, j);
    }
    perm.truncate(n);
    perm
}

/// One dirty level: the pages to mark and the resulting bitmap.
struct Level {
    pct: u32,
    pages: Vec<u64>,
    words: Vec<u64>,
    count: u64,
}

impl Level {
    fn new(pct: u32) -> Level {
        let pages = match pct {
            0 => Vec::new(),
            100 => (0..NPAGES).collect(),
            p => random_pages((NPAGES * p as u64 / 100) as usize, NPAGES, SEED),
        };
        let mut words = vec![0u64; WORDS];
        for &p in &pages {
            words[(p / 64) as usize] |= 1 << (p % 64);
        }
        let count = pages.len() as u64;
        Level {
            pct,
            pages,
            words,
            count,
        }
    }

    /// Set this level's bits in the live bitmap (whole words at a time at 100 %).
    fn mark(&self, bm: &DirtyBitmap) {
        if self.pct == 100 {
            bm.set_range(0, NPAGES);
        } else {
            for &p in &self.pages {
                bm.set(p);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Timing.

#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Nanoseconds per call.
    median: f64,
    min: f64,
    /// Allocations per call.
    allocs: f64,
}

/// Run `setup` (untimed) then `f` `reps` times (timed), `iters` times after one warm-up
/// round. Returns per-call times and allocations.
fn bench(iters: usize, reps: usize, mut setup: impl FnMut(), mut f: impl FnMut()) -> Sample {
    setup();
    for _ in 0..reps {
        f();
    }
    let mut t = Vec::with_capacity(iters);
    let mut a = 0;
    for _ in 0..iters {
        setup();
        let a0 = allocs();
        let s = Instant::now();
        for _ in 0..reps {
            f();
        }
        let d = s.elapsed();
        a += allocs() - a0;
        t.push(d.as_nanos() as f64 / reps as f64);
    }
    t.sort_by(f64::total_cmp);
    Sample {
        median: t[t.len() / 2],
        min: t[0],
        allocs: a as f64 / (iters * reps) as f64,
    }
}

/// Best-of-`n` wall time of `f` in nanoseconds.
fn best_of(n: usize, mut f: impl FnMut()) -> f64 {
    (0..n)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_nanos() as f64
        })
        .fold(f64::INFINITY, f64::min)
}

// ---------------------------------------------------------------------------------------------
// Output.

struct Row {
    section: &'static str,
    name: String,
    dirty_pct: Option<u32>,
    value: f64,
    unit: &'static str,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    text: String,
}

impl Report {
    fn metric(
        &mut self,
        section: &'static str,
        name: &str,
        dirty_pct: Option<u32>,
        value: f64,
        unit: &'static str,
    ) {
        self.rows.push(Row {
            section,
            name: name.to_string(),
            dirty_pct,
            value,
            unit,
        });
    }

    fn heading(&mut self, s: &str) {
        let _ = writeln!(self.text, "\n== {s}");
    }

    fn line(&mut self, s: &str) {
        let _ = writeln!(self.text, "{s}");
    }

    /// Append an aligned table: first column left-aligned, the rest right-aligned.
    fn table(&mut self, header: &[&str], rows: &[Vec<String>]) {
        let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
        for r in rows {
            for (i, c) in r.iter().enumerate() {
                w[i] = w[i].max(c.len());
            }
        }
        let fmt = |cells: &mut dyn Iterator<Item = &str>| {
            let mut s = String::new();
            for (i, c) in cells.enumerate() {
                if i == 0 {
                    let _ = write!(s, "  {c:<width$}", width = w[0]);
                } else {
                    let _ = write!(s, "  {c:>width$}", width = w[i]);
                }
            }
            s
        };
        let h = fmt(&mut header.iter().copied());
        let rule = "-".repeat(h.len());
        self.line(&h);
        self.line(&rule);
        for r in rows {
            let l = fmt(&mut r.iter().map(String::as_str));
            self.line(&l);
        }
    }

    fn json(&self, elapsed_s: f64) -> String {
        let mut s = String::from("{\n  \"bench\": \"dirtylog core\",\n");
        let _ = writeln!(s, "  \"elapsed_s\": {},", num(elapsed_s));
        s.push_str("  \"metrics\": [\n");
        for (i, r) in self.rows.iter().enumerate() {
            let dirty = r
                .dirty_pct
                .map_or_else(|| "null".to_string(), |p| p.to_string());
            let _ = write!(
                s,
                "    {{\"section\": {}, \"name\": {}, \"dirty_pct\": {}, \"value\": {}, \"unit\": {}}}",
                jstr(r.section),
                jstr(&r.name),
                dirty,
                num(r.value),
                jstr(r.unit)
            );
            s.push_str(if i + 1 < self.rows.len() { ",\n" } else { "\n" });
        }
        s.push_str("  ]\n}");
        s
    }
}

fn jstr(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn num(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".to_string()
    }
}

fn f3(v: f64) -> String {
    format!("{v:.3}")
}

fn f2(v: f64) -> String {
    format!("{v:.2}")
}

fn us(ns: f64) -> String {
    format!("{:.1}", ns / 1e3)
}

// ---------------------------------------------------------------------------------------------
// Benchmarks.

fn drain(vcpu: &SoftVcpu) {
    vcpu.write_u64(DRAIN_GPA, 0)
        .expect("write to the drain slot");
}

fn region(slot: u32, flags: u32, gpa: u64, size: u64, uaddr: u64) -> MemoryRegion {
    MemoryRegion {
        slot,
        flags,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: uaddr,
    }
}

/// Results the summary needs.
struct Core {
    get0: Sample,
    manual0: Sample,
    runs0: Sample,
}

fn bitmap_benches(rep: &mut Report, levels: &[Level]) -> Core {
    const GET_ITERS: usize = 201;
    let m = Machine::new(FlushKind::Ranged, VmConfig::default());
    let vm = m.vm();

    // --- Memory cost of a 1 GiB logging slot.
    let (rss0, heap0) = mem_point();
    vm.set_user_memory_region(&region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, SLOT_BYTES, 0))
        .expect("create the 1 GiB logging slot");
    let (rss1, heap1) = mem_point();
    vm.set_user_memory_region(&region(1, 0, DRAIN_GPA, 16 * PAGE, 1 << 40))
        .expect("create the drain slot");
    let vcpu = m.create_vcpu();
    let (rss2, heap2) = mem_point();
    // First vCPU accesses: the softmmu builds the slot's shadow table and RAM model.
    vcpu.write_u64(0, 1).expect("first write");
    drain(&vcpu);
    let (rss3, heap3) = mem_point();
    let slot = vm.memslots().get(0, 0).expect("slot 0").clone();
    let bm = slot.dirty_bitmap().expect("slot 0 logs to a bitmap");
    let mut out = vec![0u64; WORDS];
    vm.get_dirty_log(0, &mut out).expect("initial GET");

    rep.heading("Memory: a 1 GiB logging slot (262 144 pages)");
    let floor = NPAGES as f64 / 8.0 / 1024.0;
    rep.table(
        &["what", "RSS delta KiB", "heap delta KiB", "expected KiB"],
        &[
            vec![
                "create logging slot (bitmap)".into(),
                (rss1 - rss0).to_string(),
                f2((heap1 - heap0) as f64 / 1024.0),
                f2(floor),
            ],
            vec![
                "create 1 softmmu vCPU (+ 16-page drain slot)".into(),
                (rss2 - rss1).to_string(),
                f2((heap2 - heap1) as f64 / 1024.0),
                "-".into(),
            ],
            vec![
                "first vCPU writes (softmmu SPT + RAM model)".into(),
                (rss3 - rss2).to_string(),
                f2((heap3 - heap2) as f64 / 1024.0),
                f2((NPAGES as f64 / 8.0 + NPAGES as f64 * 8.0) / 1024.0),
            ],
        ],
    );
    rep.line(&format!(
        "  floor: 1 bit/page = {floor:.0} KiB per GiB of 4 KiB pages (KVM: 2 bits, bitmap + GET buffer); \
         the SPT (1 bit/page) and RAM model (8 B/page) belong to the reference arch, not to logging"
    ));
    rep.metric(
        "memory",
        "logging_slot_1GiB_heap",
        None,
        (heap1 - heap0) as f64 / 1024.0,
        "KiB",
    );
    rep.metric(
        "memory",
        "logging_slot_1GiB_rss",
        None,
        (rss1 - rss0) as f64,
        "KiB",
    );
    rep.metric("memory", "logging_slot_1GiB_floor", None, floor, "KiB");
    rep.metric(
        "memory",
        "softmmu_first_access_heap",
        None,
        (heap3 - heap2) as f64 / 1024.0,
        "KiB",
    );

    // --- GET without manual protect.
    let mut get = Vec::new();
    let mut get_rows = Vec::new();
    for lv in levels {
        let p0 = vm.stats.pages_protected.load(Ordering::Relaxed);
        let s = bench(
            GET_ITERS,
            1,
            || {
                lv.mark(bm);
                drain(&vcpu);
            },
            || vm.get_dirty_log(0, black_box(&mut out)).expect("GET"),
        );
        let prot =
            (vm.stats.pages_protected.load(Ordering::Relaxed) - p0) as f64 / (GET_ITERS + 1) as f64;
        let got: u64 = out.iter().map(|w| w.count_ones() as u64).sum();
        assert_eq!(got, lv.count, "GET returned the marked pages");
        assert_eq!(out, lv.words, "GET returned exactly the marked bitmap");
        assert_eq!(bm.count(), 0, "GET cleared the log");
        get_rows.push(vec![
            format!("{}%", lv.pct),
            f3(s.median / NPAGES as f64),
            f3(s.min / NPAGES as f64),
            us(s.median),
            f2(BITMAP_BYTES / s.median),
            f2(s.allocs),
            format!("{prot:.0}"),
        ]);
        rep.metric(
            "get_dirty_log_protect",
            "ns_per_page_median",
            Some(lv.pct),
            s.median / NPAGES as f64,
            "ns/page",
        );
        rep.metric(
            "get_dirty_log_protect",
            "ns_per_page_min",
            Some(lv.pct),
            s.min / NPAGES as f64,
            "ns/page",
        );
        rep.metric(
            "get_dirty_log_protect",
            "us_per_call_median",
            Some(lv.pct),
            s.median / 1e3,
            "us",
        );
        rep.metric(
            "get_dirty_log_protect",
            "allocs_per_call",
            Some(lv.pct),
            s.allocs,
            "allocs",
        );
        get.push(s);
    }
    rep.heading(&format!(
        "KVM_GET_DIRTY_LOG, no manual protect (xchg + protect + flush + copy), 1 GiB slot, \
         1 idle vCPU, FlushKind::Ranged, median of {GET_ITERS}"
    ));
    let hdr = [
        "dirty",
        "ns/page med",
        "ns/page min",
        "us/call",
        "bitmap GB/s",
        "allocs/call",
        "pages protected/call",
    ];
    rep.table(&hdr, &get_rows);

    // --- Breakdown of GET at 100 %: each part timed on its own.
    let full = &levels[levels.len() - 1];
    let mut scratch = vec![0u64; WORDS];
    let part_scan = bench(
        GET_ITERS,
        1,
        || full.mark(bm),
        || {
            for (i, b) in scratch.iter_mut().enumerate() {
                *b = 0;
                if bm.load_word(i) == 0 {
                    continue;
                }
                *b = bm.take_word(i);
            }
            black_box(&scratch);
        },
    );
    let part_spt_lookup = bench(
        GET_ITERS,
        1,
        || {},
        || {
            let mmu = vm.lock_mmu();
            for i in 0..WORDS as u64 {
                black_box(vm.arch().enable_log_dirty_pt_masked(&mmu, &slot, i * 64, 0));
            }
        },
    );
    let part_protect = bench(
        GET_ITERS,
        1,
        || {},
        || {
            let mmu = vm.lock_mmu();
            for i in 0..WORDS as u64 {
                black_box(
                    vm.arch()
                        .enable_log_dirty_pt_masked(&mmu, &slot, i * 64, !0),
                );
            }
        },
    );
    let part_stats = bench(
        GET_ITERS,
        1,
        || {},
        || {
            for _ in 0..WORDS {
                vm.stats
                    .pages_protected
                    .fetch_add(black_box(64), Ordering::Relaxed);
            }
        },
    );
    let part_flush = bench(
        GET_ITERS,
        1,
        || drain(&vcpu),
        || {
            let g = vm.lock_slots();
            vm.flush_remote_tlbs_memslot(&g, &slot);
        },
    );
    let part_copy = bench(
        GET_ITERS,
        1,
        || {},
        || {
            out.copy_from_slice(black_box(&scratch));
            black_box(&out);
        },
    );
    // The protect benches cleared every writable bit; leave the SPT as GET found it.
    drain(&vcpu);
    let total = get[get.len() - 1].median;
    let parts = [
        ("scan + xchg (4096 words)", part_scan),
        (
            "arch protect: SPT lookup only (mask 0) x4096",
            part_spt_lookup,
        ),
        ("arch protect: lookup + fetch_and x4096", part_protect),
        ("stats.pages_protected fetch_add x4096", part_stats),
        ("lock_slots + flush_remote_tlbs_memslot", part_flush),
        ("copy out (32 KiB)", part_copy),
    ];
    let mut rows = Vec::new();
    let mut sum = 0.0;
    for (name, s) in &parts {
        if !name.contains("lookup only") {
            sum += s.median;
        }
        rows.push(vec![
            (*name).to_string(),
            us(s.median),
            f3(s.median / NPAGES as f64),
            format!("{:.0}%", 100.0 * s.median / total),
            f2(s.allocs),
        ]);
        rep.metric(
            "get_breakdown_100pct",
            name,
            Some(100),
            s.median / 1e3,
            "us",
        );
    }
    rows.push(vec![
        "sum of parts (excluding lookup-only)".into(),
        us(sum),
        f3(sum / NPAGES as f64),
        format!("{:.0}%", 100.0 * sum / total),
        "-".into(),
    ]);
    rows.push(vec![
        "measured GET at 100%".into(),
        us(total),
        f3(total / NPAGES as f64),
        "100%".into(),
        f2(get[get.len() - 1].allocs),
    ]);
    rep.heading("GET at 100% dirty: breakdown (each part timed alone, median)");
    rep.table(
        &["part", "us/call", "ns/page", "% of GET", "allocs/call"],
        &rows,
    );

    // --- An idle vCPU that never re-enters: what do repeated flushes leave queued on it?
    const IDLE_GETS: usize = 1000;
    let one = &levels[1];
    let (rss_i0, heap_i0) = mem_point();
    let a0 = allocs();
    for _ in 0..IDLE_GETS {
        one.mark(bm);
        vm.get_dirty_log(0, &mut out).expect("GET");
    }
    let idle_allocs = (allocs() - a0) as f64 / IDLE_GETS as f64;
    let (rss_i1, heap_i1) = mem_point();
    let s = Instant::now();
    drain(&vcpu);
    let drain_ns = s.elapsed().as_nanos() as f64;
    let heap_i2 = heap_live();
    rep.heading(&format!(
        "{IDLE_GETS} GETs at 1% with the vCPU never entering (no drain between them)"
    ));
    rep.table(
        &["what", "value", "unit"],
        &[
            vec![
                "heap growth over the GETs".into(),
                f2((heap_i1 - heap_i0) as f64 / 1024.0),
                "KiB".into(),
            ],
            vec![
                "RSS growth over the GETs".into(),
                (rss_i1 - rss_i0).to_string(),
                "KiB".into(),
            ],
            vec![
                "heap growth per GET".into(),
                f2((heap_i1 - heap_i0) as f64 / IDLE_GETS as f64),
                "B".into(),
            ],
            vec![
                "allocations per GET".into(),
                f2(idle_allocs),
                "allocs".into(),
            ],
            vec![
                "first guest entry afterwards (drains the queue)".into(),
                us(drain_ns),
                "us".into(),
            ],
            vec![
                "heap after that entry vs before the GETs".into(),
                f2((heap_i2 - heap_i0) as f64 / 1024.0),
                "KiB".into(),
            ],
        ],
    );
    rep.metric(
        "idle_vcpu",
        "heap_growth_per_get",
        Some(1),
        (heap_i1 - heap_i0) as f64 / IDLE_GETS as f64,
        "B",
    );
    rep.metric(
        "idle_vcpu",
        "allocs_per_get",
        Some(1),
        idle_allocs,
        "allocs",
    );
    rep.metric("idle_vcpu", "drain_entry", None, drain_ns / 1e3, "us");

    // --- GET with manual protect: a snapshot.
    vm.enable_cap(
        KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        0,
        KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    )
    .expect("enable manual protect");
    let ones = vec![!0u64; WORDS];
    let mut rows = Vec::new();
    let mut manual0 = None;
    for lv in levels {
        let s = bench(
            GET_ITERS,
            1,
            || {
                vm.clear_dirty_log(0, 0, NPAGES as u32, &ones)
                    .expect("CLEAR");
                lv.mark(bm);
                drain(&vcpu);
            },
            || vm.get_dirty_log(0, black_box(&mut out)).expect("GET"),
        );
        assert_eq!(out, lv.words, "manual GET returned the marked bitmap");
        assert_eq!(bm.count(), lv.count, "manual GET left the log alone");
        if lv.pct == 0 {
            manual0 = Some(s);
        }
        rows.push(vec![
            format!("{}%", lv.pct),
            f3(s.median / NPAGES as f64),
            f3(s.min / NPAGES as f64),
            us(s.median),
            f2(BITMAP_BYTES / s.median),
            f2(s.allocs),
        ]);
        rep.metric(
            "get_dirty_log_manual",
            "ns_per_page_median",
            Some(lv.pct),
            s.median / NPAGES as f64,
            "ns/page",
        );
        rep.metric(
            "get_dirty_log_manual",
            "allocs_per_call",
            Some(lv.pct),
            s.allocs,
            "allocs",
        );
    }
    rep.heading("KVM_GET_DIRTY_LOG with manual protect (snapshot only)");
    rep.table(
        &[
            "dirty",
            "ns/page med",
            "ns/page min",
            "us/call",
            "bitmap GB/s",
            "allocs/call",
        ],
        &rows,
    );

    // --- CLEAR over the whole slot, user bitmap all ones.
    let mut rows = Vec::new();
    for lv in levels {
        vm.clear_dirty_log(0, 0, NPAGES as u32, &ones)
            .expect("CLEAR");
        drain(&vcpu);
        let p0 = vm.stats.pages_protected.load(Ordering::Relaxed);
        let s = bench(
            GET_ITERS,
            1,
            || {
                lv.mark(bm);
                drain(&vcpu);
            },
            || {
                vm.clear_dirty_log(0, 0, NPAGES as u32, black_box(&ones))
                    .expect("CLEAR")
            },
        );
        let prot =
            (vm.stats.pages_protected.load(Ordering::Relaxed) - p0) as f64 / (GET_ITERS + 1) as f64;
        assert_eq!(bm.count(), 0, "CLEAR of all ones cleared the log");
        rows.push(vec![
            format!("{}%", lv.pct),
            f3(s.median / NPAGES as f64),
            f3(s.min / NPAGES as f64),
            us(s.median),
            f2(s.allocs),
            format!("{prot:.0}"),
        ]);
        rep.metric(
            "clear_dirty_log_protect",
            "ns_per_page_median",
            Some(lv.pct),
            s.median / NPAGES as f64,
            "ns/page",
        );
        rep.metric(
            "clear_dirty_log_protect",
            "ns_per_page_min",
            Some(lv.pct),
            s.min / NPAGES as f64,
            "ns/page",
        );
        rep.metric(
            "clear_dirty_log_protect",
            "allocs_per_call",
            Some(lv.pct),
            s.allocs,
            "allocs",
        );
    }
    rep.heading("KVM_CLEAR_DIRTY_LOG, whole slot, user bitmap all ones (manual protect)");
    rep.table(
        &[
            "dirty",
            "ns/page med",
            "ns/page min",
            "us/call",
            "allocs/call",
            "pages protected/call",
        ],
        &rows,
    );

    // --- runs() over the bitmap.
    let mut rows = Vec::new();
    let mut runs0 = None;
    for lv in levels {
        let reps = 32;
        let mut nruns = 0u64;
        let s = bench(
            101,
            reps,
            || {},
            || {
                let (mut n, mut pages) = (0u64, 0u64);
                for (_, len) in runs(black_box(&lv.words)) {
                    n += 1;
                    pages += len;
                }
                nruns = black_box(n);
                black_box(pages);
            },
        );
        let pages: u64 = runs(&lv.words).map(|(_, n)| n).sum();
        assert_eq!(pages, lv.count, "runs() covers the marked pages");
        if lv.pct == 0 {
            runs0 = Some(s);
        }
        rows.push(vec![
            format!("{}%", lv.pct),
            nruns.to_string(),
            f3(s.median / NPAGES as f64),
            us(s.median),
            f2(BITMAP_BYTES / s.median),
            f2(s.allocs),
        ]);
        rep.metric(
            "bitmap_runs",
            "ns_per_page_median",
            Some(lv.pct),
            s.median / NPAGES as f64,
            "ns/page",
        );
        rep.metric(
            "bitmap_runs",
            "scan_gb_per_s",
            Some(lv.pct),
            BITMAP_BYTES / s.median,
            "GB/s",
        );
    }
    rep.heading("bitmap::runs over the 32 KiB bitmap (median of 101 x 32 passes)");
    rep.table(
        &[
            "dirty",
            "runs",
            "ns/page",
            "us/pass",
            "bitmap GB/s",
            "allocs/pass",
        ],
        &rows,
    );

    let runs0 = runs0.expect("a 0% level");
    what_ifs(rep, get[0], runs0);

    Core {
        get0: get[0],
        manual0: manual0.expect("a 0% level"),
        runs0,
    }
}

/// Loops written here over local buffers the size of the bitmap, at 0% dirty, to estimate
/// what reshaping the crate's scans would gain. They are not the crate's code.
fn what_ifs(rep: &mut Report, get0: Sample, runs0: Sample) {
    use std::sync::atomic::AtomicU64 as A;
    let live: Vec<A> = (0..WORDS).map(|_| A::new(0)).collect();
    let plain = vec![0u64; WORDS];
    let user = vec![!0u64; WORDS];
    let mut out = vec![0u64; WORDS];
    let mut scratch = vec![0u64; WORDS];
    let n = black_box(WORDS);
    let it = 51;
    let reps = 16;

    // Today's GET loop shape: indexed atomic load (bounds-checked), scratch store, then copy.
    let today = bench(
        it,
        reps,
        || {},
        || {
            let live = black_box(&live[..]);
            for (i, b) in scratch.iter_mut().enumerate() {
                *b = 0;
                if live[i].load(Ordering::Acquire) == 0 {
                    continue;
                }
                *b = live[i].swap(0, Ordering::AcqRel);
            }
            out.copy_from_slice(&scratch);
            black_box(&out);
        },
    );
    // Straight into `out`, zipped (no bounds checks, no scratch, no copy).
    let direct = bench(
        it,
        reps,
        || {},
        || {
            for (o, w) in out.iter_mut().zip(black_box(&live[..])) {
                let v = w.load(Ordering::Acquire);
                *o = if v == 0 {
                    0
                } else {
                    w.swap(0, Ordering::AcqRel)
                };
            }
            black_box(&out);
        },
    );
    // Straight into `out`, 8 words at a time: one branch per 8 loads when they are all clean.
    let direct8 = bench(
        it,
        reps,
        || {},
        || {
            for (oc, wc) in out
                .chunks_exact_mut(8)
                .zip(black_box(&live[..]).chunks_exact(8))
            {
                let mut any = 0;
                for (o, w) in oc.iter_mut().zip(wc) {
                    *o = w.load(Ordering::Acquire);
                    any |= *o;
                }
                if any != 0 {
                    for (o, w) in oc.iter_mut().zip(wc) {
                        if *o != 0 {
                            *o = w.swap(0, Ordering::AcqRel);
                        }
                    }
                }
            }
            black_box(&out);
        },
    );
    // CLEAR today: one fetch_and per non-zero user word, dirty or not.
    let clear_today = bench(
        it,
        reps,
        || {},
        || {
            let mut acc = 0u64;
            for (w, &u) in black_box(&live[..n]).iter().zip(&user) {
                if u != 0 {
                    acc |= u & w.fetch_and(!u, Ordering::AcqRel);
                }
            }
            black_box(acc);
        },
    );
    // CLEAR with a plain load first: skip the locked RMW when none of the user's bits is set.
    let clear_load = bench(
        it,
        reps,
        || {},
        || {
            let mut acc = 0u64;
            for (w, &u) in black_box(&live[..n]).iter().zip(&user) {
                if u != 0 && w.load(Ordering::Acquire) & u != 0 {
                    acc |= u & w.fetch_and(!u, Ordering::AcqRel);
                }
            }
            black_box(acc);
        },
    );
    // runs() skipping clean words 8 at a time with an OR reduction (vectorises).
    let skip8 = bench(
        it,
        reps,
        || {},
        || {
            let mut found = 0usize;
            for c in black_box(&plain[..]).chunks_exact(8) {
                if c.iter().fold(0, |a, &w| a | w) != 0 {
                    found += c.iter().filter(|&&w| w != 0).count();
                }
            }
            black_box(found);
        },
    );
    let rows = [
        ("measured: GET, 0% (whole ioctl)", get0),
        (
            "local: today's GET loop shape (index, scratch, copy)",
            today,
        ),
        ("local: GET loop zipped straight into out", direct),
        ("local: GET loop into out, 8-word chunks", direct8),
        ("local: CLEAR loop today (fetch_and per word)", clear_today),
        ("local: CLEAR loop with load-before-fetch_and", clear_load),
        ("measured: bitmap::runs, 0%", runs0),
        ("local: runs skip via 8-word OR chunks", skip8),
    ];
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|(name, s)| {
            rep.metric("what_if_0pct", name, Some(0), s.median / 1e3, "us");
            vec![
                (*name).to_string(),
                us(s.median),
                us(s.min),
                f2(BITMAP_BYTES / s.min),
            ]
        })
        .collect();
    rep.heading("What-if at 0% dirty: local loops over a 4096-word buffer (not the crate's code)");
    rep.table(&["loop", "us med", "us min", "GB/s (min)"], &rows);
}

fn ring_benches(rep: &mut Report) {
    const ROUNDS: usize = 16;
    let m = Machine::new(FlushKind::Ranged, VmConfig::default());
    let vm = m.vm();
    vm.enable_cap(KVM_CAP_DIRTY_LOG_RING, 0, RING_ENTRIES as u64 * 16)
        .expect("enable the ring");
    vm.set_user_memory_region(&region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, SLOT_BYTES, 0))
        .expect("create the 1 GiB logging slot");
    let (rss0, heap0) = mem_point();
    let vcpu = m.create_vcpu();
    let (rss1, heap1) = mem_point();
    let ring = vcpu.generic().ring().expect("a ring vCPU").entries();
    let expect_kib = RING_ENTRIES as f64 * 16.0 / 1024.0;

    rep.heading(&format!(
        "Memory: a ring vCPU ({RING_ENTRIES} entries x 16 B)"
    ));
    rep.table(
        &["what", "RSS delta KiB", "heap delta KiB", "expected KiB"],
        &[vec![
            "create ring vCPU".into(),
            (rss1 - rss0).to_string(),
            f2((heap1 - heap0) as f64 / 1024.0),
            f2(expect_kib),
        ]],
    );
    rep.metric(
        "memory",
        "ring_vcpu_heap",
        None,
        (heap1 - heap0) as f64 / 1024.0,
        "KiB",
    );
    rep.metric("memory", "ring_vcpu_rss", None, (rss1 - rss0) as f64, "KiB");
    rep.metric("memory", "ring_vcpu_expected", None, expect_kib, "KiB");

    // Fill to the soft limit: one more push would make the vCPU exit with "ring full".
    let fill = (RING_ENTRIES - RING_RSVD) as usize;
    let patterns = [
        ("sequential", (0..fill as u64).collect::<Vec<u64>>()),
        ("random", random_pages(fill, NPAGES, SEED ^ 0x7269_6e67)),
    ];
    let mut h = RingHarvester::new();
    let mut out: Vec<RingEntry> = Vec::with_capacity(RING_ENTRIES as usize);
    let mut rows = Vec::new();
    for (name, pages) in &patterns {
        let (mut t_fill, mut t_col, mut t_com, mut t_res, mut t_all) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut a_col, mut a_com, mut a_res) = (0u64, 0u64, 0u64);
        for round in 0..=ROUNDS {
            let s = Instant::now();
            for (i, &p) in pages.iter().enumerate() {
                match vcpu.write_u64(p * PAGE, round as u64) {
                    Ok(()) => {}
                    // The push that reaches the soft limit arms the request: the vCPU exits
                    // with "ring full" before re-entering to complete that last write.
                    Err(Exit::DirtyRingFull) if i + 1 == pages.len() => {}
                    Err(e) => panic!("guest write {i}: {e:?}"),
                }
            }
            let fill_ns = s.elapsed().as_nanos() as f64;
            out.clear();

            let a0 = allocs();
            let s0 = Instant::now();
            let n = h.collect(black_box(ring), &mut out);
            let s1 = Instant::now();
            let a1 = allocs();
            let c = h.commit(ring);
            let s2 = Instant::now();
            let a2 = allocs();
            let r = vm.reset_dirty_rings().expect("reset");
            let s3 = Instant::now();
            let a3 = allocs();
            assert_eq!(n as usize, pages.len(), "collected every push");
            assert_eq!(c, n, "committed every collected entry");
            assert_eq!(r, n, "reset every committed entry");
            if round == 0 {
                continue; // warm-up
            }
            t_fill.push(fill_ns);
            t_col.push((s1 - s0).as_nanos() as f64);
            t_com.push((s2 - s1).as_nanos() as f64);
            t_res.push((s3 - s2).as_nanos() as f64);
            t_all.push((s3 - s0).as_nanos() as f64);
            a_col += a1 - a0;
            a_com += a2 - a1;
            a_res += a3 - a2;
        }
        let med = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let per = fill as f64;
        let r = ROUNDS as f64;
        let parts = [
            ("collect", med(&mut t_col), a_col as f64 / r),
            ("commit", med(&mut t_com), a_com as f64 / r),
            ("reset_dirty_rings", med(&mut t_res), a_res as f64 / r),
            (
                "harvest total",
                med(&mut t_all),
                (a_col + a_com + a_res) as f64 / r,
            ),
            (
                "(fill: vCPU write fault + push)",
                med(&mut t_fill),
                f64::NAN,
            ),
        ];
        for (part, ns, a) in parts {
            rows.push(vec![
                format!("{name}: {part}"),
                f2(ns / per),
                us(ns),
                if a.is_nan() { "-".into() } else { f2(a) },
            ]);
            let key = format!("{name}_{}", part.replace([' ', ':', '(', ')', '+'], "_"));
            rep.metric("ring", &key, None, ns / per, "ns/entry");
            if !a.is_nan() {
                rep.metric("ring", &format!("{key}_allocs"), None, a, "allocs/round");
            }
        }
    }
    rep.heading(&format!(
        "Dirty ring: harvest + reset of {fill} entries per round, 1 vCPU, median of {ROUNDS} rounds"
    ));
    rep.table(
        &["pattern: part", "ns/entry", "us/round", "allocs/round"],
        &rows,
    );
}

/// Plain read bandwidth: sum a buffer with 8 independent accumulators.
fn sum_u64(buf: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    for c in buf.chunks_exact(8) {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(x);
        }
    }
    acc.iter().fold(0, |a, &b| a.wrapping_add(b))
}

fn bandwidth_and_summary(rep: &mut Report, core: &Core) {
    let hwm_before = proc_status_kib("VmHWM");

    // DRAM: 256 MiB, far beyond the caches.
    let big = vec![1u64; (256usize << 20) / 8];
    let dram_ns = best_of(7, || {
        black_box(sum_u64(black_box(&big)));
    });
    let dram_gbs = (big.len() * 8) as f64 / dram_ns;
    drop(big);
    // Cache-resident: the bitmap's size, summed repeatedly.
    let small = vec![1u64; WORDS];
    let reps = 256;
    let cache_ns = best_of(31, || {
        for _ in 0..reps {
            black_box(sum_u64(black_box(&small)));
        }
    }) / reps as f64;
    let cache_gbs = BITMAP_BYTES / cache_ns;

    // Best-of against best-of: the scans' minimum over their samples.
    let runs_gbs = BITMAP_BYTES / core.runs0.min;
    let get_gbs = BITMAP_BYTES / core.get0.min;
    let manual_gbs = BITMAP_BYTES / core.manual0.min;
    rep.heading("Read bandwidth and the bitmap scans (0% dirty: pure scan)");
    rep.table(
        &["what", "GB/s", "vs DRAM", "vs 32 KiB sum"],
        &[
            vec![
                "plain sum, 256 MiB buffer (DRAM), best of 7".into(),
                f2(dram_gbs),
                "100%".into(),
                "-".into(),
            ],
            vec![
                "plain sum, 32 KiB buffer (cache), best of 31".into(),
                f2(cache_gbs),
                format!("{:.0}%", 100.0 * cache_gbs / dram_gbs),
                "100%".into(),
            ],
            vec![
                "bitmap::runs, 0% dirty (best)".into(),
                f2(runs_gbs),
                format!("{:.0}%", 100.0 * runs_gbs / dram_gbs),
                format!("{:.0}%", 100.0 * runs_gbs / cache_gbs),
            ],
            vec![
                "GET manual (snapshot), 0% dirty (best)".into(),
                f2(manual_gbs),
                format!("{:.0}%", 100.0 * manual_gbs / dram_gbs),
                format!("{:.0}%", 100.0 * manual_gbs / cache_gbs),
            ],
            vec![
                "GET (no manual), 0% dirty (best)".into(),
                f2(get_gbs),
                format!("{:.0}%", 100.0 * get_gbs / dram_gbs),
                format!("{:.0}%", 100.0 * get_gbs / cache_gbs),
            ],
        ],
    );
    rep.line("  target: pure scan >= 80% of plain read bandwidth (GB/s of bitmap scanned)");
    rep.metric("bandwidth", "dram_sum_256MiB", None, dram_gbs, "GB/s");
    rep.metric("bandwidth", "cache_sum_32KiB", None, cache_gbs, "GB/s");
    rep.metric("bandwidth", "runs_0pct", None, runs_gbs, "GB/s");
    rep.metric("bandwidth", "get_0pct", None, get_gbs, "GB/s");
    rep.metric("bandwidth", "get_manual_0pct", None, manual_gbs, "GB/s");
    rep.metric(
        "bandwidth",
        "get_manual_0pct_vs_dram",
        None,
        manual_gbs / dram_gbs,
        "ratio",
    );
    rep.metric(
        "bandwidth",
        "runs_0pct_vs_dram",
        None,
        runs_gbs / dram_gbs,
        "ratio",
    );
    rep.metric(
        "bandwidth",
        "runs_0pct_vs_cache",
        None,
        runs_gbs / cache_gbs,
        "ratio",
    );
    rep.metric(
        "bandwidth",
        "get_0pct_vs_dram",
        None,
        get_gbs / dram_gbs,
        "ratio",
    );
    rep.metric(
        "bandwidth",
        "get_0pct_vs_cache",
        None,
        get_gbs / cache_gbs,
        "ratio",
    );

    let hwm = proc_status_kib("VmHWM");
    rep.heading("Peak RSS");
    rep.table(
        &["what", "KiB"],
        &[
            vec![
                "VmHWM before the 256 MiB bandwidth buffer".into(),
                hwm_before.to_string(),
            ],
            vec!["VmHWM at the end".into(), hwm.to_string()],
            vec![
                "VmRSS at the end".into(),
                proc_status_kib("VmRSS").to_string(),
            ],
            vec![
                "floor: bitmap of one 1 GiB slot (1 bit/page)".into(),
                (NPAGES / 8 / 1024).to_string(),
            ],
            vec![
                "floor: one ring of 65536 entries (16 B/entry)".into(),
                (RING_ENTRIES as u64 * 16 / 1024).to_string(),
            ],
        ],
    );
    rep.metric(
        "memory",
        "vm_hwm_before_bw_buffer",
        None,
        hwm_before as f64,
        "KiB",
    );
    rep.metric("memory", "vm_hwm_end", None, hwm as f64, "KiB");
}

fn main() {
    // cargo passes `--bench`; only `--json` means anything here.
    let json = std::env::args().skip(1).any(|a| a == "--json");
    let start = Instant::now();
    let mut rep = Report::default();
    rep.line(&format!(
        "dirtylog core bench: 1 GiB slot = {NPAGES} pages of 4 KiB, bitmap {} KiB ({WORDS} words)",
        WORDS * 8 / 1024
    ));
    let levels = [Level::new(0), Level::new(1), Level::new(100)];
    let core = bitmap_benches(&mut rep, &levels);
    ring_benches(&mut rep);
    bandwidth_and_summary(&mut rep, &core);
    let elapsed = start.elapsed().as_secs_f64();
    if json {
        println!("{}", rep.json(elapsed));
    } else {
        rep.line(&format!("\ntotal bench time: {elapsed:.1} s"));
        println!("{}", rep.text);
    }
}
