//! The record kept by the methods that learn of writes in a fault handler (`sync_wp.rs`,
//! `mprotect.rs`): a [`DirtyBitmap`] the handler sets a page's bit in before it lifts the
//! page's protection, and the two operations that re-protect pages, in the order the race
//! rule of [`WriteWatch`](crate::watch::WriteWatch) needs.
//!
//! Both run with the method's lock held (the lock the handler takes around "record, lift"),
//! so for any page, "record, lift" and "take, re-protect" do not interleave. The invariant the
//! lock keeps: **a page is writable only if its bit is set**. Harvest takes a word, then
//! re-protects the pages it took; a write between the two goes to a page whose bit was just
//! taken, so this harvest reports it, and a write after the re-protection faults and is
//! recorded for the next one.

use dirtylog::bitmap::runs;
use dirtylog::DirtyBitmap;

use crate::HostError;

/// OR the recorded pages into `out` (`out.len() >= bitmap.words()`) and return how many there
/// were. With `reprotect`, take them (the bits are cleared) and call `wp(first_page, npages)`
/// for each run of taken pages, in address order; a run whose `wp` fails keeps its bits (the
/// pages are reported again next time: they may still be writable) and the first error is
/// returned after every run was tried. Without `reprotect`, the bits stay (clear-log mode).
///
/// The caller holds the method's lock, and `out` is not in the watched region (writing it
/// must not fault into the handler that waits for that lock).
pub(crate) fn harvest(
    bitmap: &DirtyBitmap,
    out: &mut [u64],
    reprotect: bool,
    mut wp: impl FnMut(u64, u64) -> Result<(), HostError>,
) -> Result<u64, HostError> {
    let mut reported = 0u64;
    let mut pending: Option<(u64, u64)> = None;
    let mut first_err = None;
    let mut flush = |run: (u64, u64)| {
        if let Err(e) = wp(run.0, run.1) {
            bitmap.set_range(run.0, run.1);
            first_err.get_or_insert(e);
        }
    };
    let words = bitmap.words();
    let Some(out) = out.get_mut(..words) else {
        return Err(HostError::BitmapLength {
            index: 0,
            expected: words,
            got: out.len(),
        });
    };
    for (i, o) in out.iter_mut().enumerate() {
        if bitmap.load_word(i) == 0 {
            continue;
        }
        let w = if reprotect {
            bitmap.take_word(i)
        } else {
            bitmap.load_word(i)
        };
        *o |= w;
        reported += u64::from(w.count_ones());
        if !reprotect {
            continue;
        }
        for (s, n) in runs(std::slice::from_ref(&w)) {
            let s = i as u64 * 64 + s;
            pending = match pending {
                Some((ps, pn)) if ps + pn == s => Some((ps, pn + n)),
                Some(run) => {
                    flush(run);
                    Some((s, n))
                }
                None => Some((s, n)),
            };
        }
    }
    if let Some(run) = pending {
        flush(run);
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(reported),
    }
}

/// Re-protect pages `first_page + i` for each bit `i` of `bits` with `wp(first_page, npages)`
/// per run, and clear each run's bits once its pages are protected (protect first: the page
/// is never writable with its bit clear). `first_page` must be a multiple of 64; bits for
/// pages past the bitmap's end are ignored (the tracker refuses them before this; here they
/// must only never reach `wp`). Stops at the first failure; the failed run keeps its bits.
///
/// The caller holds the method's lock.
pub(crate) fn protect(
    bitmap: &DirtyBitmap,
    first_page: u64,
    bits: &[u64],
    mut wp: impl FnMut(u64, u64) -> Result<(), HostError>,
) -> Result<(), HostError> {
    if first_page % 64 != 0 {
        return Err(HostError::FirstPageUnaligned(first_page));
    }
    let npages = bitmap.npages();
    for (s, n) in runs(bits) {
        let Some(first) = first_page.checked_add(s).filter(|&f| f < npages) else {
            break;
        };
        let n = n.min(npages - first);
        wp(first, n)?;
        clear_range(bitmap, first, n);
    }
    Ok(())
}

/// Clear bits `first..first + n` (inside the bitmap), one atomic AND per word touched.
fn clear_range(bitmap: &DirtyBitmap, first: u64, n: u64) {
    let end = first + n;
    let mut p = first;
    while p < end {
        let word = p / 64;
        let lo = p % 64;
        let hi = (end - word * 64).min(64);
        let mask = if hi - lo == 64 {
            !0
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        };
        bitmap.clear_word_bits(word as usize, mask);
        p = word * 64 + hi;
    }
}

/// Check a region given as `addr`, `len` bytes of `page_size` pages: a power-of-two page
/// size at least the base page, a non-empty length, both aligned, inside the address space.
/// Returns the address, the length in `usize` and `log2(page_size)`.
pub(crate) fn region_bounds(
    addr: usize,
    len: u64,
    page_size: u64,
) -> Result<(usize, usize, u32), HostError> {
    if !page_size.is_power_of_two() || page_size < crate::sys::base_page_size() {
        return Err(HostError::BadPageSize(page_size));
    }
    if len == 0 {
        return Err(HostError::ZeroLength);
    }
    let unaligned = |what, value: u64| HostError::Unaligned {
        what,
        value,
        page_size,
    };
    if addr as u64 % page_size != 0 {
        return Err(unaligned("address", addr as u64));
    }
    if len % page_size != 0 {
        return Err(unaligned("length", len));
    }
    let ulen = usize::try_from(len).map_err(|_| HostError::TooLarge(len))?;
    if addr.checked_add(ulen).is_none() {
        return Err(HostError::RangeOverflow {
            addr: addr as u64,
            len,
        });
    }
    Ok((addr, ulen, page_size.trailing_zeros()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bitmap_with(npages: u64, pages: &[u64]) -> DirtyBitmap {
        let b = DirtyBitmap::new(npages);
        for &p in pages {
            b.set(p);
        }
        b
    }

    #[test]
    fn harvest_takes_and_reprotects_runs_across_words() {
        let b = bitmap_with(200, &[0, 1, 2, 62, 63, 64, 65, 130, 199]);
        let mut out = vec![0u64; b.words()];
        out[3] = 1 << 5; // bits already in `out` stay
        let mut calls = Vec::new();
        let n = harvest(&b, &mut out, true, |s, n| {
            calls.push((s, n));
            Ok(())
        })
        .unwrap();
        assert_eq!(n, 9);
        assert_eq!(calls, [(0, 3), (62, 4), (130, 1), (199, 1)]);
        assert_eq!(b.count(), 0);
        assert_eq!(out[0], 0b111 | 3 << 62);
        assert_eq!(out[1], 0b11);
        assert_eq!(out[2], 1 << 2);
        assert_eq!(out[3], 1 << 5 | 1 << 7);
    }

    #[test]
    fn harvest_without_reprotect_keeps_bits() {
        let b = bitmap_with(100, &[3, 70]);
        let mut out = vec![0u64; 2];
        let n = harvest(&b, &mut out, false, |_, _| panic!("no re-protection")).unwrap();
        assert_eq!(n, 2);
        assert_eq!(out, [1 << 3, 1 << 6]);
        assert_eq!(b.count(), 2);
    }

    #[test]
    fn a_failed_reprotection_keeps_its_pages_recorded() {
        let b = bitmap_with(128, &[1, 2, 10, 100]);
        let mut out = vec![0u64; 2];
        let r = harvest(&b, &mut out, true, |s, _| {
            if s == 10 {
                Err(HostError::ZeroLength)
            } else {
                Ok(())
            }
        });
        assert!(matches!(r, Err(HostError::ZeroLength)));
        assert_eq!((b.load_word(0), b.load_word(1)), (1 << 10, 0));
    }

    #[test]
    fn protect_clears_after_protecting_and_stops_at_a_failure() {
        let b = bitmap_with(256, &[64, 65, 66, 127, 128, 200]);
        let mut calls = Vec::new();
        protect(&b, 64, &[0b011 | 1 << 63, 1], |s, n| {
            calls.push((s, n));
            Ok(())
        })
        .unwrap();
        assert_eq!(calls, [(64, 2), (127, 2)]);
        let left: Vec<u64> = (0..256).filter(|&p| b.test(p)).collect();
        assert_eq!(left, [66, 200]);
        let r = protect(&b, 192, &[1 << 8], |_, _| Err(HostError::ZeroLength));
        assert!(r.is_err());
        assert!(b.test(200));
        // Bits past the end never reach `wp`; an unaligned first page is refused.
        let c = bitmap_with(100, &[99]);
        let mut calls = Vec::new();
        protect(&c, 64, &[!0, !0], |s, n| {
            calls.push((s, n));
            Ok(())
        })
        .unwrap();
        assert_eq!(calls, [(64, 36)]);
        assert_eq!(c.count(), 0);
        assert!(matches!(
            protect(&c, 3, &[1], |_, _| Ok(())),
            Err(HostError::FirstPageUnaligned(3))
        ));
    }

    #[test]
    fn clear_range_handles_word_edges() {
        let b = DirtyBitmap::new(256);
        b.set_all();
        clear_range(&b, 60, 136);
        let left: Vec<u64> = (0..256).filter(|&p| !b.test(p)).collect();
        assert_eq!(left, (60..196).collect::<Vec<_>>());
    }
}

/// What the tests of every fault-handling method share: a mapping of their own (not
/// `HostMemory`) and the scenarios each method must pass.
#[cfg(test)]
pub(crate) mod testing {

    /// The tests every fault-recording method shares, as `#[test]` functions in the calling
    /// module: `$watch(&Mapping) -> impl WriteWatch` builds the method's watch, `$npages`
    /// sizes the mappings.
    macro_rules! shared_watch_tests {
        ($watch:ident, $npages:expr) => {
            #[test]
            fn reports_exactly_the_written_pages() {
                let m = Mapping::anon($npages);
                testing::reports_exactly_the_written_pages(&$watch(&m), &m);
            }

            #[test]
            fn reports_exactly_the_written_pages_of_a_memfd() {
                let m = Mapping::memfd($npages);
                testing::reports_exactly_the_written_pages(&$watch(&m), &m);
                let m = Mapping::memfd($npages);
                testing::racing_writes_are_never_lost(&$watch(&m), &m, 2, true, 32);
            }

            #[test]
            fn protect_rearms_only_the_given_pages() {
                let m = Mapping::anon($npages);
                testing::protect_rearms_only_the_given_pages(&$watch(&m), &m);
            }

            #[test]
            fn disarm_lifts_every_protection() {
                let m = Mapping::anon($npages);
                testing::disarm_lifts_every_protection(&$watch(&m), &m);
            }

            #[test]
            fn drop_lifts_every_protection() {
                let m = Mapping::anon($npages);
                testing::drop_lifts_every_protection(Box::new($watch(&m)), &m);
            }

            #[test]
            fn racing_writes_are_never_lost_dirty_log() {
                for writers in [1, 2] {
                    let m = Mapping::anon($npages);
                    testing::racing_writes_are_never_lost(&$watch(&m), &m, writers, true, 40);
                }
            }

            #[test]
            fn racing_writes_are_never_lost_clear_log() {
                for writers in [1, 2] {
                    let m = Mapping::anon($npages);
                    testing::racing_writes_are_never_lost(&$watch(&m), &m, writers, false, 40);
                }
            }
        };
    }
    pub(crate) use shared_watch_tests;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::Duration;

    use crate::watch::WriteWatch;
    use crate::HostError;

    pub(crate) const PAGE: u64 = 4096;

    /// An anonymous private read-write mapping, unmapped on drop.
    pub(crate) struct Mapping {
        ptr: *mut u8,
        len: usize,
    }

    // SAFETY: the mapping is plain memory; all access goes through atomics (`word`).
    unsafe impl Send for Mapping {}
    // SAFETY: as above.
    unsafe impl Sync for Mapping {}

    impl Mapping {
        pub(crate) fn anon(pages: u64) -> Mapping {
            let len = (pages * PAGE) as usize;
            // SAFETY: a fresh anonymous mapping; no existing memory is affected.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(
                ptr,
                libc::MAP_FAILED,
                "mmap: {}",
                std::io::Error::last_os_error()
            );
            Mapping {
                ptr: ptr.cast(),
                len,
            }
        }

        /// A shared mapping of a memfd (shmem), as `HostBacking::Memfd`.
        pub(crate) fn memfd(pages: u64) -> Mapping {
            let len = (pages * PAGE) as usize;
            // SAFETY: a new memfd from a NUL-terminated name; its fd is closed below, the
            // mapping keeps the file.
            let ptr = unsafe {
                let fd = libc::memfd_create(c"dirtylog-host-test".as_ptr(), libc::MFD_CLOEXEC);
                assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
                assert_eq!(libc::ftruncate(fd, len as libc::off_t), 0);
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd,
                    0,
                );
                libc::close(fd);
                p
            };
            assert_ne!(
                ptr,
                libc::MAP_FAILED,
                "mmap: {}",
                std::io::Error::last_os_error()
            );
            Mapping {
                ptr: ptr.cast(),
                len,
            }
        }

        pub(crate) fn addr(&self) -> usize {
            self.ptr as usize
        }

        pub(crate) fn len(&self) -> u64 {
            self.len as u64
        }

        pub(crate) fn pages(&self) -> u64 {
            self.len as u64 / PAGE
        }

        /// The first word of `page`.
        pub(crate) fn word(&self, page: u64) -> &AtomicU64 {
            assert!(page < self.pages());
            // SAFETY: inside the mapping, 8-byte aligned (page-aligned), alive as long as
            // `self`; every access to the mapping is atomic.
            unsafe { &*(self.ptr.add((page * PAGE) as usize) as *const AtomicU64) }
        }
    }

    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: our own mapping; no reference into it outlives `self`.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }

    fn set_pages(bits: &[u64]) -> Vec<u64> {
        (0..bits.len() as u64 * 64)
            .filter(|&p| bits[(p / 64) as usize] >> (p % 64) & 1 == 1)
            .collect()
    }

    /// Write `pages` from another thread, storing `value`.
    pub(crate) fn write_from_thread(m: &Mapping, pages: &[u64], value: u64) {
        std::thread::scope(|s| {
            s.spawn(|| {
                for &p in pages {
                    m.word(p).store(value, Ordering::Relaxed);
                }
            });
        });
    }

    fn harvest(w: &dyn WriteWatch, reprotect: bool) -> Vec<u64> {
        let mut bits = vec![0u64; w.npages().div_ceil(64) as usize];
        let n = w.harvest(&mut bits, reprotect).expect("harvest");
        let pages = set_pages(&bits);
        assert_eq!(n, pages.len() as u64, "harvest's count");
        pages
    }

    /// Dirty-log mode: exact pages, re-protected by the harvest.
    pub(crate) fn reports_exactly_the_written_pages(w: &dyn WriteWatch, m: &Mapping) {
        let last = m.pages() - 1;
        assert!(matches!(
            w.harvest(&mut [0; 4], true),
            Err(HostError::NotStarted)
        ));
        w.arm().expect("arm");
        assert_eq!(harvest(w, true), Vec::<u64>::new());
        let written = [0, 5, 63, 64, 65, 130, last];
        write_from_thread(m, &written, 7);
        assert_eq!(harvest(w, true), written);
        assert_eq!(
            harvest(w, true),
            Vec::<u64>::new(),
            "a harvest takes the bits"
        );
        // Re-protected: the next write to a harvested page is seen again; the main thread
        // writes too.
        m.word(5).store(8, Ordering::Relaxed);
        write_from_thread(m, &[last], 9);
        assert_eq!(harvest(w, true), [5, last]);
        for (p, v) in [(0, 7), (5, 8), (130, 7), (last, 9)] {
            assert_eq!(
                m.word(p).load(Ordering::Relaxed),
                v,
                "page {p} holds what was written"
            );
        }
        // A harvest into a short bitmap is refused, and takes nothing.
        m.word(1).store(1, Ordering::Relaxed);
        assert!(matches!(
            w.harvest(&mut [0; 1], true),
            Err(HostError::BitmapLength { .. })
        ));
        assert_eq!(harvest(w, true), [1]);
        w.disarm().expect("disarm");
    }

    /// Clear-log mode: a harvest without re-protection keeps reporting until `protect`.
    pub(crate) fn protect_rearms_only_the_given_pages(w: &dyn WriteWatch, m: &Mapping) {
        w.arm().expect("arm");
        write_from_thread(m, &[3, 70, 71], 1);
        assert_eq!(harvest(w, false), [3, 70, 71]);
        // Still writable and still reported: a second write does not change the record.
        write_from_thread(m, &[3], 2);
        assert_eq!(harvest(w, false), [3, 70, 71]);
        // Re-protect 3 and 70 only (bits relative to page 64 for 70).
        w.protect(0, &[1 << 3]).expect("protect");
        w.protect(64, &[1 << 6]).expect("protect");
        assert_eq!(harvest(w, false), [71]);
        write_from_thread(m, &[70], 3);
        assert_eq!(harvest(w, false), [70, 71]);
        assert!(matches!(
            w.protect(1, &[1]),
            Err(HostError::FirstPageUnaligned(1))
        ));
        w.disarm().expect("disarm");
        assert!(matches!(w.protect(0, &[1]), Err(HostError::NotStarted)));
    }

    /// After `disarm` (twice: idempotent) every page is writable and nothing is recorded; a
    /// second `arm` starts afresh.
    pub(crate) fn disarm_lifts_every_protection(w: &dyn WriteWatch, m: &Mapping) {
        let all: Vec<u64> = (0..m.pages()).collect();
        w.arm().expect("arm");
        write_from_thread(m, &[2], 1);
        w.disarm().expect("disarm");
        w.disarm().expect("disarm again");
        write_from_thread(m, &all, 5);
        m.word(0).store(6, Ordering::Relaxed);
        assert!(matches!(
            w.harvest(&mut vec![0; all.len().div_ceil(64)], true),
            Err(HostError::NotStarted)
        ));
        w.arm().expect("arm again");
        assert_eq!(harvest(w, true), Vec::<u64>::new(), "arm starts afresh");
        write_from_thread(m, &[4], 1);
        assert_eq!(harvest(w, true), [4]);
        w.disarm().expect("disarm");
    }

    /// Dropping an armed watch lifts its protection.
    pub(crate) fn drop_lifts_every_protection(w: Box<dyn WriteWatch>, m: &Mapping) {
        w.arm().expect("arm");
        write_from_thread(m, &[1], 1);
        w.harvest(&mut vec![0; m.pages().div_ceil(64) as usize], true)
            .expect("harvest");
        drop(w);
        let all: Vec<u64> = (0..m.pages()).collect();
        write_from_thread(m, &all, 3);
        m.word(1).store(4, Ordering::Relaxed);
        assert_eq!(m.word(1).load(Ordering::Relaxed), 4);
        assert_eq!(m.word(all.len() as u64 - 1).load(Ordering::Relaxed), 3);
    }

    /// The `dirty_log_test` invariant: `writers` threads stamp ever-increasing numbers into
    /// random pages while this thread harvests `iterations` times at random moments (with
    /// `reprotect`, or harvest then `protect` of what it got). Every page whose value
    /// changed between two harvests is reported by the later one or the one after it.
    pub(crate) fn racing_writes_are_never_lost(
        w: &dyn WriteWatch,
        m: &Mapping,
        writers: usize,
        reprotect: bool,
        iterations: u32,
    ) {
        let npages = w.npages();
        let words = npages.div_ceil(64) as usize;
        let stop = AtomicBool::new(false);
        let stamp = AtomicU64::new(1);
        let snapshot = || -> Vec<u64> {
            (0..npages)
                .map(|p| m.word(p).load(Ordering::Acquire))
                .collect()
        };
        w.arm().expect("arm");
        let mut reported_total = 0u64;
        std::thread::scope(|s| {
            for t in 0..writers {
                let (stop, stamp) = (&stop, &stamp);
                s.spawn(move || {
                    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (t as u64 + 1);
                    while !stop.load(Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let v = stamp.fetch_add(1, Ordering::Relaxed);
                        m.word(x % npages).store(v, Ordering::Release);
                    }
                });
            }
            // A failed check below must stop the writers, or the scope waits for them forever.
            struct StopOnDrop<'a>(&'a AtomicBool);
            impl Drop for StopOnDrop<'_> {
                fn drop(&mut self) {
                    self.0.store(true, Ordering::Relaxed);
                }
            }
            let _stop = StopOnDrop(&stop);
            let mut prev = snapshot();
            let mut owed: Vec<u64> = Vec::new();
            let mut x = 0x2545_F491_4F6C_DD1Du64;
            for it in 0..iterations {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                std::thread::sleep(Duration::from_micros(x % 2000));
                let mut bits = vec![0u64; words];
                let n = w.harvest(&mut bits, reprotect).expect("harvest");
                if !reprotect {
                    w.protect(0, &bits).expect("protect");
                }
                let cur = snapshot();
                let got = set_pages(&bits);
                assert_eq!(n, got.len() as u64);
                assert!(got.iter().all(|&p| p < npages), "bits past the end");
                reported_total += n;
                let is_set = |p: u64| bits[(p / 64) as usize] >> (p % 64) & 1 == 1;
                for &p in &owed {
                    assert!(
                        is_set(p),
                        "iteration {it}: page {p} changed before harvest {} and was reported \
                         by neither it nor this one",
                        it.saturating_sub(1)
                    );
                }
                owed = (0..npages)
                    .filter(|&p| cur[p as usize] != prev[p as usize] && !is_set(p))
                    .collect();
                prev = cur;
            }
        });
        // The writers stopped: one more harvest settles what is still owed.
        let mut bits = vec![0u64; words];
        w.harvest(&mut bits, reprotect).expect("harvest");
        w.disarm().expect("disarm");
        assert!(
            reported_total > 0,
            "the writers wrote nothing that was reported"
        );
    }
}
