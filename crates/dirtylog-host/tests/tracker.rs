//! The host tracker against its contract: typed errors for bad input (table-driven), exact
//! bitmaps for every method × mode × backing, re-protect semantics per mode, and a writer
//! racing harvests (every write is reported by a harvest in progress when it landed or by the
//! first harvest that started after it — the kernel's `dirty_log_test` invariant in miniature).
//!
//! Hugetlb cases reserve 2 MiB pages themselves through `/proc/sys/vm/nr_hugepages` (the
//! tests run as root) and restore the old value.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;

use dirtylog::{DirtyTracker, TrackerKind};
use dirtylog_host::{
    HostBacking, HostDirtyTracker, HostError, HostMemory, HostMethod, HostRegion,
    HostTrackerConfig, HUGE_PAGE_SIZE,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const MODES: [TrackerKind; 2] = [TrackerKind::DirtyLog, TrackerKind::ClearLog];

/// n·64 + 3 pages of 4 KiB: a partial tail word.
const PAGES: u64 = 2 * 64 + 3;

// ---------------------------------------------------------------------------------------------
// Helpers

/// Serialises the tests that change the huge page pool.
static HUGE_LOCK: Mutex<()> = Mutex::new(());

/// `n` more 2 MiB huge pages reserved while this lives (the old pool size restored on drop).
struct HugePages {
    old: u64,
    _lock: MutexGuard<'static, ()>,
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

impl HugePages {
    fn reserve(n: u64) -> Self {
        let lock = HUGE_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let old: u64 = std::fs::read_to_string(NR_HUGEPAGES)
            .unwrap_or_else(|e| panic!("hugetlb tests need {NR_HUGEPAGES}: {e}"))
            .trim()
            .parse()
            .expect("nr_hugepages is a number");
        std::fs::write(NR_HUGEPAGES, format!("{}", old + n)).unwrap_or_else(|e| {
            panic!("hugetlb tests must reserve {n} huge pages (run as root): writing {NR_HUGEPAGES}: {e}")
        });
        let free = dirtylog_host::free_huge_pages();
        let guard = HugePages { old, _lock: lock };
        assert!(
            free >= n,
            "reserved {n} more 2 MiB huge pages but only {free} are free (memory too fragmented?)"
        );
        guard
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, format!("{}", self.old));
    }
}

/// Memory of `npages` pages of `backing`, with huge pages reserved for it if hugetlb. Bind
/// as `let (_huge, mem) = memory(..)`: locals drop in reverse order, so the memory is unmapped
/// before the reservation ends and the pool shrinks back.
fn memory(backing: HostBacking, npages: u64) -> (Option<HugePages>, Arc<HostMemory>) {
    let huge = (backing == HostBacking::HugeTlb).then(|| HugePages::reserve(npages));
    let mem = HostMemory::new(npages * backing.page_size(), backing)
        .unwrap_or_else(|e| panic!("{backing} memory of {npages} pages: {e}"));
    (huge, Arc::new(mem))
}

/// A tracker of `mem`, or `None` (said on stderr) when `method` is not built into the crate
/// yet. Any other error fails the test.
fn tracker(
    mem: &Arc<HostMemory>,
    method: HostMethod,
    mode: TrackerKind,
) -> Option<HostDirtyTracker> {
    let cfg = HostTrackerConfig { method, mode };
    match HostDirtyTracker::new(vec![HostRegion::new(mem.clone())], cfg) {
        Ok(t) => Some(t),
        Err(HostError::MethodNotBuilt(m)) => {
            eprintln!("NOT RUN: method {m} is not built into dirtylog-host yet");
            None
        }
        Err(e) => panic!("{method} {mode} on {}: {e}", mem.backing()),
    }
}

/// Write `value` to the first word of each of `pages`, from another thread.
fn write_pages(mem: &Arc<HostMemory>, pages: &[u64], value: u64) {
    let mem = mem.clone();
    let pages = pages.to_vec();
    thread::spawn(move || {
        let per_page = (mem.page_size() / 8) as usize;
        for p in pages {
            mem.words()[p as usize * per_page].store(value, Ordering::Relaxed);
        }
    })
    .join()
    .expect("writer thread");
}

fn bitmap(npages: u64, pages: &[u64]) -> Vec<u64> {
    let mut b = vec![0u64; npages.div_ceil(64) as usize];
    for &p in pages {
        b[(p / 64) as usize] |= 1 << (p % 64);
    }
    b
}

fn harvest(t: &HostDirtyTracker, npages: u64) -> Vec<u64> {
    let mut out = vec![0u64; npages.div_ceil(64) as usize];
    t.harvest(0, &mut out).expect("harvest");
    out
}

fn set_pages(bits: &[u64]) -> Vec<u64> {
    dirtylog::bitmap::runs(bits)
        .flat_map(|(first, n)| first..first + n)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Typed errors

/// `HostRegion::from_raw_parts` for a geometry it must refuse; the region is dropped unused.
fn refused_geometry(addr: *mut u8, len: u64, page_size: u64) -> Result<(), HostError> {
    // SAFETY: every caller passes a geometry the checks refuse, and even if one were accepted
    // the region would be dropped without any tracker using it: nothing touches the range.
    unsafe { HostRegion::from_raw_parts(addr, len, page_size) }.map(drop)
}

#[test]
fn bad_input_is_a_typed_error() {
    fn anon(pages: u64) -> Arc<HostMemory> {
        Arc::new(HostMemory::new(pages * 4096, HostBacking::Anonymous).expect("anon memory"))
    }
    let cfg = |mode| HostTrackerConfig {
        method: HostMethod::Async,
        mode,
    };
    let dl = cfg(TrackerKind::DirtyLog);
    let mem = anon(PAGES);
    let base = mem.as_ptr();

    // Never mapped: below vm.mmap_min_addr (64 KiB), nothing can be mapped there, so no
    // other test's mapping can appear in it meanwhile.
    let gone = 0x4000usize;

    type Case = (
        &'static str,
        Box<dyn Fn() -> Result<(), HostError>>,
        fn(&HostError) -> bool,
    );
    let cases: Vec<Case> = vec![
        (
            "memory of zero bytes",
            Box::new(|| HostMemory::new(0, HostBacking::Anonymous).map(drop)),
            |e| matches!(e, HostError::ZeroLength),
        ),
        (
            "memory length not page-aligned",
            Box::new(|| HostMemory::new(4097, HostBacking::Memfd).map(drop)),
            |e| {
                matches!(
                    e,
                    HostError::Unaligned {
                        what: "length",
                        value: 4097,
                        ..
                    }
                )
            },
        ),
        (
            "hugetlb length not a multiple of 2 MiB",
            Box::new(|| HostMemory::new(4096, HostBacking::HugeTlb).map(drop)),
            |e| {
                matches!(
                    e,
                    HostError::Unaligned {
                        page_size: HUGE_PAGE_SIZE,
                        ..
                    }
                )
            },
        ),
        (
            "region address not page-aligned",
            Box::new(move || refused_geometry(base.wrapping_add(8), 4096, 4096)),
            |e| {
                matches!(
                    e,
                    HostError::Unaligned {
                        what: "address",
                        ..
                    }
                )
            },
        ),
        (
            "region length not page-aligned",
            Box::new(move || refused_geometry(base, 100, 4096)),
            |e| matches!(e, HostError::Unaligned { what: "length", .. }),
        ),
        (
            "region of zero bytes",
            Box::new(move || refused_geometry(base, 0, 4096)),
            |e| matches!(e, HostError::ZeroLength),
        ),
        (
            "page size not a power of two",
            Box::new(move || refused_geometry(base, 12000, 3000)),
            |e| matches!(e, HostError::BadPageSize(3000)),
        ),
        (
            "region wrapping the address space",
            Box::new(|| refused_geometry((usize::MAX & !4095) as *mut u8, 8192, 4096)),
            |e| matches!(e, HostError::RangeOverflow { .. }),
        ),
        (
            "the dirty ring",
            {
                let mem = mem.clone();
                Box::new(move || {
                    HostDirtyTracker::new(
                        vec![HostRegion::new(mem.clone())],
                        cfg(TrackerKind::Ring { entries: 4096 }),
                    )
                    .map(drop)
                })
            },
            |e| matches!(e, HostError::RingRefused) && e.to_string().contains("no vCPUs"),
        ),
        (
            "the same memory twice in one tracker",
            {
                let mem = mem.clone();
                Box::new(move || {
                    HostDirtyTracker::new(
                        vec![HostRegion::new(mem.clone()), HostRegion::new(mem.clone())],
                        dl,
                    )
                    .map(drop)
                })
            },
            |e| {
                matches!(
                    e,
                    HostError::Overlap {
                        first: 0,
                        second: 1,
                        ..
                    }
                )
            },
        ),
        (
            "partly overlapping regions",
            Box::new(move || {
                // SAFETY: `mem` (PAGES pages at `base`) outlives the tracker, which is refused.
                let a = unsafe {
                    HostRegion::from_raw_parts(base.wrapping_add(4 * 4096), 8 * 4096, 4096)
                }?;
                // SAFETY: as above.
                let b = unsafe { HostRegion::from_raw_parts(base, 5 * 4096, 4096) }?;
                // SAFETY: as above.
                let c = unsafe {
                    HostRegion::from_raw_parts(base.wrapping_add(20 * 4096), 4096, 4096)
                }?;
                HostDirtyTracker::new(vec![c, a, b], dl).map(drop)
            }),
            |e| {
                matches!(
                    e,
                    HostError::Overlap {
                        first: 1,
                        second: 2,
                        ..
                    }
                )
            },
        ),
        (
            "a range that is not mapped",
            Box::new(move || {
                // SAFETY: the range is unmapped; the tracker must refuse it without touching it.
                let r = unsafe { HostRegion::from_raw_parts(gone as *mut u8, 4 * 4096, 4096) }?;
                HostDirtyTracker::new(vec![r], dl).map(drop)
            }),
            |e| {
                matches!(
                    e,
                    HostError::NotMapped {
                        op: "UFFDIO_REGISTER",
                        ..
                    }
                )
            },
        ),
        (
            "memory another tracker watches",
            {
                let mem = mem.clone();
                Box::new(move || {
                    let _first = HostDirtyTracker::new(vec![HostRegion::new(mem.clone())], dl)?;
                    HostDirtyTracker::new(vec![HostRegion::new(mem.clone())], dl).map(drop)
                })
            },
            |e| matches!(e, HostError::AlreadyTracked { .. }),
        ),
    ];
    for (what, f, ok) in cases {
        match f() {
            Ok(()) => panic!("{what}: accepted"),
            Err(e) => assert!(ok(&e), "{what}: wrong error {e:?} ({e})"),
        }
    }

    // Errors of a tracker's calls.
    for mode in MODES {
        let t =
            HostDirtyTracker::new(vec![HostRegion::new(mem.clone())], cfg(mode)).expect("tracker");
        let words = PAGES.div_ceil(64) as usize;
        let mut out = vec![0u64; words];
        let typed = |e: dirtylog::TrackerError| *e.downcast::<HostError>().expect("a HostError");
        assert!(matches!(
            typed(t.harvest(0, &mut out).unwrap_err()),
            HostError::NotStarted
        ));
        t.start().expect("start");
        assert!(matches!(
            typed(t.harvest(1, &mut out).unwrap_err()),
            HostError::NoSuchRegion { index: 1, count: 1 }
        ));
        assert!(matches!(
            typed(t.harvest(0, &mut out[..words - 1]).unwrap_err()),
            HostError::BitmapLength {
                index: 0,
                expected: 3,
                got: 2
            }
        ));
        assert!(matches!(
            typed(t.harvest(0, &mut vec![0u64; words + 1]).unwrap_err()),
            HostError::BitmapLength { got: 4, .. }
        ));
        assert!(matches!(
            typed(t.clear(0, 3, &[1]).unwrap_err()),
            HostError::FirstPageUnaligned(3)
        ));
        assert!(matches!(
            typed(t.clear(7, 0, &[1]).unwrap_err()),
            HostError::NoSuchRegion { index: 7, .. }
        ));
        // Page 64 + 40 = 104 < 131 is fine; 128 + 3 = 131 is one past the end.
        t.clear(0, 64, &[1 << 40]).expect("clear inside the region");
        assert!(matches!(
            typed(t.clear(0, 128, &[1 << 3]).unwrap_err()),
            HostError::BitsBeyondRegion {
                index: 0,
                page: 131,
                npages: PAGES
            }
        ));
        t.clear(0, 64, &[0, 1 << 2]).expect("page 130, the last");
        assert!(matches!(
            typed(t.clear(0, 64, &[0, 1 << 3, 0]).unwrap_err()),
            HostError::BitsBeyondRegion { page: 131, .. }
        ));
        assert!(matches!(
            typed(t.clear(0, u64::MAX - 63, &[1]).unwrap_err()),
            HostError::BitsBeyondRegion { .. }
        ));
        // Zero bits beyond the end are fine (the caller's bitmap may be longer).
        t.clear(0, 128, &[0, 0]).expect("clear of no pages");
        t.stop().expect("stop");
        assert!(matches!(
            typed(t.harvest(0, &mut out).unwrap_err()),
            HostError::NotStarted
        ));
    }
}

#[test]
fn hugetlb_without_reserved_pages_says_how_to_reserve() {
    let _lock = HUGE_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let free = dirtylog_host::free_huge_pages();
    let err = HostMemory::new((free + 1) * HUGE_PAGE_SIZE, HostBacking::HugeTlb)
        .expect_err("more huge pages than are free");
    assert!(
        matches!(err, HostError::HugePagesUnavailable { needed, .. } if needed == free + 1),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("echo N > /proc/sys/vm/nr_hugepages"),
        "{err}"
    );
}

#[test]
fn a_region_unmapped_under_the_tracker_is_a_typed_error() {
    let len = 8 * 4096usize;
    // SAFETY: a fresh private anonymous mapping; only this test uses it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: the range is ours; unmapping it under the tracker is what this test checks is
    // reported, and the async method never dereferences it.
    let region = unsafe { HostRegion::from_raw_parts(p.cast(), len as u64, 4096) }.expect("region");
    let t = HostDirtyTracker::new(vec![region], HostTrackerConfig::default()).expect("tracker");
    t.start().expect("start");
    // SAFETY: our mapping, not referenced by anything but the tracker's addresses.
    assert_eq!(unsafe { libc::munmap(p, len) }, 0);
    let mut out = [0u64; 1];
    let err = *t
        .harvest(0, &mut out)
        .unwrap_err()
        .downcast::<HostError>()
        .expect("HostError");
    assert!(matches!(err, HostError::NotMapped { .. }), "{err:?}");
    // Stopping reports the hole too, and never panics.
    assert!(t.stop().is_err());
}

// ---------------------------------------------------------------------------------------------
// Exact bitmaps and re-protect semantics

/// One method × mode × backing: writes from another thread, exact harvests, the mode's
/// re-protect rule, never-touched and read-only-touched pages, restart after stop.
fn exact(method: HostMethod, mode: TrackerKind, backing: HostBacking) {
    let what = format!("{method} {mode} {backing}");
    let npages = if backing == HostBacking::HugeTlb {
        6
    } else {
        PAGES
    };
    let (_huge, mem) = memory(backing, npages);
    // Page 2 is read before arming (a populated zero page), the rest never touched.
    let per_page = (mem.page_size() / 8) as usize;
    assert_eq!(mem.words()[2 * per_page].load(Ordering::Relaxed), 0);
    let Some(t) = tracker(&mem, method, mode) else {
        return;
    };
    assert_eq!(t.npages(0), Some(npages), "{what}");
    assert_eq!(t.page_size(0), Some(backing.page_size()), "{what}");
    assert_eq!(t.method(), method);
    assert_eq!(t.kind(), mode);
    t.start().unwrap_or_else(|e| panic!("{what}: start: {e}"));
    assert_eq!(
        harvest(&t, npages),
        bitmap(npages, &[]),
        "{what}: nothing written yet"
    );

    let first: Vec<u64> = if backing == HostBacking::HugeTlb {
        vec![0, 2, 5]
    } else {
        vec![0, 1, 2, 63, 64, 100, npages - 1]
    };
    write_pages(&mem, &first, 1);
    let got = harvest(&t, npages);
    assert_eq!(set_pages(&got), first, "{what}: first harvest");

    // A harvest ORs into its output.
    let mut or = bitmap(npages, &[1]);
    t.harvest(0, &mut or).expect("harvest");
    match mode {
        TrackerKind::DirtyLog => {
            assert_eq!(
                or,
                bitmap(npages, &[1]),
                "{what}: re-protected, nothing new"
            );
            // Every page harvested was re-protected: writing each again (and one new page)
            // is seen again.
            let mut second = first.clone();
            second.push(npages - 2);
            second.sort_unstable();
            write_pages(&mem, &second, 2);
            assert_eq!(
                set_pages(&harvest(&t, npages)),
                second,
                "{what}: second write seen"
            );
            assert_eq!(
                harvest(&t, npages),
                bitmap(npages, &[]),
                "{what}: and re-protected"
            );
            // clear is a no-op in dirty-log mode.
            t.clear(0, 0, &bitmap(npages, &first)).expect("clear");
        }
        _ => {
            let mut want = got.clone();
            want[0] |= 1 << 1;
            assert_eq!(or, want, "{what}: a snapshot: the bits stay until clear");
            // Clear all but the last page; it stays reported, the others go.
            let mut clear = got.clone();
            let last = *first.last().expect("pages");
            clear[(last / 64) as usize] &= !(1 << (last % 64));
            t.clear(0, 0, &clear).expect("clear");
            assert_eq!(
                set_pages(&harvest(&t, npages)),
                vec![last],
                "{what}: after clear"
            );
            // A new write to a cleared page shows again; a write to an uncleared one stays once.
            write_pages(&mem, &[first[0], last], 3);
            assert_eq!(
                set_pages(&harvest(&t, npages)),
                vec![first[0], last],
                "{what}"
            );
            // Clearing in 64-page chunks, as the migration engine does.
            let all = harvest(&t, npages);
            for (w, word) in all.iter().enumerate() {
                t.clear(0, w as u64 * 64, &[*word]).expect("chunked clear");
            }
            assert_eq!(
                harvest(&t, npages),
                bitmap(npages, &[]),
                "{what}: all cleared"
            );
        }
    }

    // Stop lifts tracking: writes are no longer recorded and harvest refuses.
    t.stop().unwrap_or_else(|e| panic!("{what}: stop: {e}"));
    write_pages(&mem, &[3], 4);
    let mut out = bitmap(npages, &[]);
    assert!(
        t.harvest(0, &mut out).is_err(),
        "{what}: harvest after stop"
    );
    // Start again: armed afresh.
    t.start().unwrap_or_else(|e| panic!("{what}: restart: {e}"));
    assert_eq!(
        harvest(&t, npages),
        bitmap(npages, &[]),
        "{what}: clean after restart"
    );
    write_pages(&mem, &[3, 4], 5);
    assert_eq!(
        set_pages(&harvest(&t, npages)),
        vec![3, 4],
        "{what}: after restart"
    );
    drop(t);
    // Dropping disarmed: the memory is writable and untracked.
    write_pages(&mem, &[0, 1], 6);
    assert_eq!(mem.words()[per_page].load(Ordering::Relaxed), 6);
}

fn exact_all(method: HostMethod) {
    for backing in HostBacking::ALL {
        for mode in MODES {
            exact(method, mode, backing);
        }
    }
}

#[test]
fn exact_bitmaps_async() {
    exact_all(HostMethod::Async);
}

#[test]
fn exact_bitmaps_sync() {
    exact_all(HostMethod::Sync);
}

#[test]
fn exact_bitmaps_mprotect() {
    exact_all(HostMethod::Mprotect);
}

/// More runs of written pages than one `PAGEMAP_SCAN` output vector holds: the harvest
/// continues from `walk_end` and still reports exactly what was written.
fn many_runs(method: HostMethod) {
    let npages = 4 * 4096 + 3;
    let (_huge, mem) = memory(HostBacking::Anonymous, npages);
    for mode in MODES {
        let Some(t) = tracker(&mem, method, mode) else {
            return;
        };
        t.start().expect("start");
        let pages: Vec<u64> = (0..npages).step_by(2).collect();
        write_pages(&mem, &pages, 7);
        let got = harvest(&t, npages);
        assert_eq!(set_pages(&got), pages, "{method} {mode}: every other page");
        if mode == TrackerKind::DirtyLog {
            assert_eq!(harvest(&t, npages), bitmap(npages, &[]));
        } else {
            assert_eq!(harvest(&t, npages), got);
        }
    }
}

#[test]
fn many_runs_async() {
    many_runs(HostMethod::Async);
}

#[test]
fn many_runs_sync() {
    many_runs(HostMethod::Sync);
}

#[test]
fn many_runs_mprotect() {
    many_runs(HostMethod::Mprotect);
}

// ---------------------------------------------------------------------------------------------
// Writers racing harvests

/// One write: its stamp `s` (taken before the store) and the next stamp its writer took
/// (after the store), and the page.
struct Write {
    s: u64,
    next: u64,
    page: u64,
}

/// One harvest: the counter before it started and after it (and its clear) ended, and what
/// it reported.
struct Harvest {
    start: u64,
    end: u64,
    bits: Vec<u64>,
}

/// `writers` threads stamp random pages while the main thread harvests (and, in clear-log
/// mode, clears exactly what it harvested) at random points. Afterwards, for every write:
/// some harvest that was in progress when it landed, or the first harvest that started after
/// it, reports its page. A write lands between taking stamp `s` and taking `next`, so a
/// harvest with `start ≤ next` and `end ≥ s + 1` may have been in progress, and the first with
/// `start > next` began after it.
fn race(method: HostMethod, mode: TrackerKind, writers: usize, seed: u64) {
    let what = format!("{method} {mode} {writers} writer(s) seed {seed}");
    let npages = PAGES;
    let (_huge, mem) = memory(HostBacking::Anonymous, npages);
    let Some(t) = tracker(&mem, method, mode) else {
        return;
    };
    t.start().expect("start");
    let seq = Arc::new(AtomicU64::new(0));
    // Writers keep going until the harvester has reaped at least this often.
    const MIN_REAPS: u64 = 64;
    let reaps = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let (mem, seq, reaps) = (mem.clone(), seq.clone(), reaps.clone());
            thread::spawn(move || {
                let mut rng = SmallRng::seed_from_u64(seed ^ ((w as u64 + 1) * 0x9e37_79b9));
                let per_page = (mem.page_size() / 8) as usize;
                let mut log = Vec::new();
                let mut s = seq.fetch_add(1, Ordering::SeqCst);
                let mut n = 0u64;
                while n < 20_000 || reaps.load(Ordering::SeqCst) < MIN_REAPS {
                    n += 1;
                    // Bursts on a few pages, then jumps: both re-writes and first writes.
                    let page = rng.random_range(0..npages);
                    mem.words()[page as usize * per_page].store(s, Ordering::SeqCst);
                    let next = seq.fetch_add(1, Ordering::SeqCst);
                    log.push(Write { s, next, page });
                    s = next;
                    if rng.random_ratio(1, 64) {
                        thread::yield_now();
                    }
                }
                log
            })
        })
        .collect();

    let mut rng = SmallRng::seed_from_u64(seed);
    let mut harvests = Vec::new();
    let reap = |harvests: &mut Vec<Harvest>| {
        let start = seq.load(Ordering::SeqCst);
        let mut bits = bitmap(npages, &[]);
        t.harvest(0, &mut bits)
            .unwrap_or_else(|e| panic!("{what}: harvest: {e}"));
        if mode == TrackerKind::ClearLog {
            t.clear(0, 0, &bits)
                .unwrap_or_else(|e| panic!("{what}: clear: {e}"));
        }
        let end = seq.load(Ordering::SeqCst);
        harvests.push(Harvest { start, end, bits });
        reaps.fetch_add(1, Ordering::SeqCst);
    };
    while !handles.iter().all(|h| h.is_finished()) {
        reap(&mut harvests);
        for _ in 0..rng.random_range(0..2000) {
            std::hint::spin_loop();
        }
    }
    let logs: Vec<Vec<Write>> = handles
        .into_iter()
        .map(|h| h.join().expect("writer"))
        .collect();
    // The final harvest starts after every write.
    reap(&mut harvests);
    assert!(
        harvests.len() as u64 > MIN_REAPS,
        "{what}: only {} harvests",
        harvests.len()
    );

    let reported = |h: &Harvest, p: u64| h.bits[(p / 64) as usize] >> (p % 64) & 1 == 1;
    let mut checked = 0u64;
    for w in logs.iter().flatten() {
        // Harvests run one after another, so their starts and ends both increase.
        let after = harvests.partition_point(|h| h.start <= w.next);
        assert!(
            after < harvests.len(),
            "{what}: no harvest after write {}",
            w.s
        );
        let first = harvests.partition_point(|h| h.end <= w.s);
        let ok = harvests[first.min(after)..=after]
            .iter()
            .any(|h| reported(h, w.page));
        assert!(
            ok,
            "{what}: the write of stamp {} to page {} (landed before stamp {}) was reported by \
             no harvest in progress then nor by harvest {after} (start {}), the first after it",
            w.s, w.page, w.next, harvests[after].start
        );
        checked += 1;
    }
    assert!(
        checked >= writers as u64 * 20_000,
        "{what}: {checked} writes checked"
    );
    t.stop().expect("stop");
}

fn race_all(method: HostMethod) {
    for mode in MODES {
        for writers in [1, 2] {
            race(method, mode, writers, 0x5eed + writers as u64);
        }
    }
}

#[test]
fn writes_racing_harvests_async() {
    race_all(HostMethod::Async);
}

#[test]
fn writes_racing_harvests_sync() {
    race_all(HostMethod::Sync);
}

#[test]
fn writes_racing_harvests_mprotect() {
    race_all(HostMethod::Mprotect);
}

// ---------------------------------------------------------------------------------------------
// Capabilities

#[test]
fn probe_finds_async_working_here() {
    // The probe maps huge pages when some are free: not while another test holds its own.
    let huge = HugePages::reserve(2);
    let caps = dirtylog_host::probe();
    drop(huge);
    let table = caps.table();
    println!("{table}");
    assert!(
        caps.works(HostMethod::Async),
        "async uffd-wp + PAGEMAP_SCAN should work on this machine (Linux 6.18):\n{table}"
    );
    assert_eq!(caps.best(), Some(HostMethod::Async));
    assert!(
        caps.works_on(HostMethod::Async, HostBacking::Memfd),
        "{table}"
    );
    for m in HostMethod::ALL {
        assert!(table.contains(m.name()), "{table}");
    }
    // The CLI prints it with `--json`.
    let json = serde_json::to_value(&caps).expect("caps serialise");
    assert_eq!(json["methods"][0]["method"], "async", "{json}");
    assert_eq!(
        json["methods"][0]["backings"][0]["backing"], "anon",
        "{json}"
    );
    assert_eq!(json["methods"][0]["backings"][0]["works"], true, "{json}");
    assert!(json["uffd_features"].as_u64().is_some(), "{json}");
}
