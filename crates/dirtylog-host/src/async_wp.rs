//! [`AsyncWatch`]: userfaultfd asynchronous write-protect, harvested with `PAGEMAP_SCAN`.
//!
//! Arming write-protects the region with `UFFDIO_WRITEPROTECT` (with `WP_UNPOPULATED`, pages
//! never touched get a protected PTE marker, so their first write is seen too). A write to a
//! protected page takes one minor fault that the kernel resolves by itself, dropping the
//! uffd-wp bit: no message, no thread. A harvest is one `PAGEMAP_SCAN` over the region asking
//! for `PAGE_IS_WRITTEN` (uffd-wp bit clear); in dirty-log mode with `PM_SCAN_WP_MATCHING`,
//! which write-protects each reported page in the same page-table walk under the page-table
//! lock, so a write racing the harvest is either reported now or faults afterwards and is
//! reported by the next one. `PM_SCAN_CHECK_WPASYNC` makes the scan fail instead of reporting
//! nothing if the range is no longer registered (remapped under us); a hole is caught by an
//! `msync(MS_ASYNC)` check after the scan.
//!
//! Cost (`cargo bench -p dirtylog-host --bench host`, BENCHMARKS.md): a first write ≈ 0.8–0.9 µs
//! here (a minor fault the kernel resolves; nested virtualisation); a harvest of 1 GiB all
//! written ≈ 4 ms, 1 % written ≈ 0.5 ms, within 1.06× of a bare `PAGEMAP_SCAN` loop. Memory: the
//! reused output vector, ≤ 1 bit per page (at least 256 entries, 6 KiB; see [`vec_len`]);
//! nothing else per page — the record of writes is the kernel's page tables.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;

use crate::sys::{self, page_region, pm_scan_arg};
use crate::watch::WriteWatch;
use crate::HostError;

/// Most entries of the reused `PAGEMAP_SCAN` output vector (96 KiB): one call reports up to
/// this many runs of written pages; a harvest with more continues from `walk_end`.
pub(crate) const VEC_LEN: usize = 4096;
/// Fewest entries (Wine's buffer size), unless the region has fewer possible runs.
const VEC_MIN: usize = 256;

/// Entries for a region of `npages`: at most one run per two pages can be reported, and the
/// vector stays within 1 bit per page (24-byte entries: `npages / 200`, leaving room for the tracker's fixed bytes), between
/// [`VEC_MIN`] and [`VEC_LEN`]. A 1 GiB region of 4 KiB pages gets 1310 entries (30.7 KiB):
/// all written is one run and one call; 1% written in scattered pages (≈ 2600 runs) is two.
pub(crate) fn vec_len(npages: usize) -> usize {
    (npages / 200)
        .clamp(VEC_MIN, VEC_LEN)
        .min(npages.div_ceil(2))
        .max(1)
}

/// The userfaultfd features asked for: async write-protect, unpopulated pages protected, and
/// shmem/hugetlbfs support.
pub(crate) const FEATURES: u64 = (sys::UFFD_FEATURE_WP_ASYNC
    | sys::UFFD_FEATURE_WP_UNPOPULATED
    | sys::UFFD_FEATURE_WP_HUGETLBFS_SHMEM) as u64;

/// Async uffd-wp watch of one region.
#[derive(Debug)]
pub(crate) struct AsyncWatch {
    addr: u64,
    len: u64,
    page_size: u64,
    uffd: OwnedFd,
    pagemap: OwnedFd,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    registered: bool,
    /// The scan's output vector, allocated at the first harvest and reused.
    vec: Vec<page_region>,
}

impl AsyncWatch {
    /// Open a userfaultfd with async write-protect and register `[addr, addr + len)` with it
    /// (`UFFDIO_REGISTER_MODE_WP`). Nothing is protected until [`arm`](WriteWatch::arm).
    pub(crate) fn new(addr: usize, len: u64, page_size: u64) -> Result<Self, HostError> {
        let addr = addr as u64;
        crate::region::check_range(addr, len, page_size)?;
        let uffd = sys::userfaultfd(true)?;
        match sys::uffd_api(uffd.as_fd(), FEATURES) {
            Ok(_) => {}
            Err(e) if e.errno() == Some(libc::EINVAL) => {
                let why = match sys::uffd_available_features() {
                    Ok(have) => format!(
                        "UFFDIO_API refused features {FEATURES:#x}; the kernel offers {have:#x} \
                         and lacks {:#x} (WP_ASYNC needs Linux ≥ 6.7, WP_UNPOPULATED ≥ 6.4)",
                        FEATURES & !have
                    ),
                    Err(e2) => format!("UFFDIO_API refused features {FEATURES:#x} ({e2})"),
                };
                return Err(HostError::Unsupported {
                    method: crate::HostMethod::Async,
                    why,
                });
            }
            Err(e) => return Err(e),
        }
        let pagemap = sys::open_pagemap()?;
        let watch = AsyncWatch {
            addr,
            len,
            page_size,
            uffd,
            pagemap,
            state: Mutex::new(State {
                registered: false,
                vec: Vec::new(),
            }),
        };
        watch.register(&mut watch.lock())?;
        Ok(watch)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent across a panic (it is a flag and a scratch vector).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self, st: &mut State) -> Result<(), HostError> {
        if st.registered {
            return Ok(());
        }
        let ioctls = sys::uffd_register(
            self.uffd.as_fd(),
            self.addr,
            self.len,
            sys::UFFDIO_REGISTER_MODE_WP as u64,
        )?;
        st.registered = true;
        if ioctls & (1 << sys::_UFFDIO_WRITEPROTECT) == 0 {
            let _ = sys::uffd_unregister(self.uffd.as_fd(), self.addr, self.len);
            st.registered = false;
            return Err(HostError::Unsupported {
                method: crate::HostMethod::Async,
                why: format!(
                    "UFFDIO_REGISTER of {:#x}..+{:#x} does not offer UFFDIO_WRITEPROTECT \
                     (ioctls {ioctls:#x}): this kind of memory cannot be write-protected",
                    self.addr, self.len
                ),
            });
        }
        Ok(())
    }

    fn npages_usize(&self) -> usize {
        (self.len / self.page_size) as usize
    }
}

/// Set bits `[first, last)` of `out`; returns how many of them were clear before.
pub(crate) fn set_bits(out: &mut [u64], first: usize, last: usize) -> u64 {
    if first >= last {
        return 0;
    }
    let set = |w: &mut u64, mask: u64| {
        let new = u64::from((!*w & mask).count_ones());
        *w |= mask;
        new
    };
    let (fw, lw) = (first / 64, (last - 1) / 64);
    let lo = !0u64 << (first % 64);
    let hi = !0u64 >> (63 - (last - 1) % 64);
    if fw == lw {
        return set(&mut out[fw], lo & hi);
    }
    let mut new = set(&mut out[fw], lo);
    for w in &mut out[fw + 1..lw] {
        new += set(w, !0);
    }
    new + set(&mut out[lw], hi)
}

impl WriteWatch for AsyncWatch {
    fn page_size(&self) -> u64 {
        self.page_size
    }

    fn npages(&self) -> u64 {
        self.len / self.page_size
    }

    fn arm(&self) -> Result<(), HostError> {
        let mut st = self.lock();
        self.register(&mut st)?;
        sys::uffd_writeprotect(self.uffd.as_fd(), self.addr, self.len, true)
    }

    fn harvest(&self, out: &mut [u64], reprotect: bool) -> Result<u64, HostError> {
        let npages = self.npages_usize();
        debug_assert_eq!(out.len(), npages.div_ceil(64));
        let mut st = self.lock();
        if !st.registered {
            return Err(HostError::NotStarted);
        }
        if st.vec.is_empty() {
            let n = vec_len(npages);
            st.vec = vec![
                page_region {
                    start: 0,
                    end: 0,
                    categories: 0
                };
                n
            ];
        }
        let mut flags = sys::PM_SCAN_CHECK_WPASYNC as u64;
        if reprotect {
            flags |= sys::PM_SCAN_WP_MATCHING as u64;
        }
        let end = self.addr + self.len;
        let mut start = self.addr;
        let mut reported = 0u64;
        while start < end {
            let mut arg = pm_scan_arg {
                size: std::mem::size_of::<pm_scan_arg>() as u64,
                flags,
                start,
                end,
                walk_end: 0,
                vec: st.vec.as_mut_ptr() as u64,
                vec_len: st.vec.len() as u64,
                max_pages: 0,
                category_inverted: 0,
                category_mask: sys::PAGE_IS_WRITTEN as u64,
                category_anyof_mask: 0,
                return_mask: sys::PAGE_IS_WRITTEN as u64,
            };
            // SAFETY: `vec`/`vec_len` describe `st.vec`, which we hold exclusively (the lock)
            // for the call.
            let n = unsafe { sys::pagemap_scan(self.pagemap.as_fd(), &mut arg) }.map_err(|e| {
                // PM_SCAN_CHECK_WPASYNC: part of the range is no longer our registered
                // mapping (it was unmapped and something else mapped there).
                if e.errno() == Some(libc::EPERM) {
                    HostError::NotMapped {
                        op: "PAGEMAP_SCAN",
                        addr: self.addr,
                        len: self.len,
                    }
                } else {
                    e
                }
            })?;
            for r in st.vec.get(..n).unwrap_or(&st.vec[..]) {
                let s = r.start.clamp(self.addr, end) - self.addr;
                let e = r.end.clamp(self.addr, end) - self.addr;
                let first = (s / self.page_size) as usize;
                let last = (e.div_ceil(self.page_size) as usize).min(npages);
                set_bits(out, first, last);
                reported += (last.saturating_sub(first)) as u64;
            }
            if arg.walk_end <= start && n == 0 {
                return Err(HostError::Sys {
                    op: "PAGEMAP_SCAN",
                    source: std::io::Error::other(format!(
                        "the walk made no progress at {start:#x}"
                    )),
                });
            }
            start = arg.walk_end.max(start);
        }
        drop(st);
        // A hole (the region unmapped under us) is skipped silently by the scan.
        sys::check_mapped(self.addr, self.len)?;
        Ok(reported)
    }

    fn protect(&self, first_page: u64, bits: &[u64]) -> Result<(), HostError> {
        let st = self.lock();
        if !st.registered {
            return Err(HostError::NotStarted);
        }
        for (page, n) in dirtylog::bitmap::runs(bits) {
            let page = first_page + page;
            sys::uffd_writeprotect(
                self.uffd.as_fd(),
                self.addr + page * self.page_size,
                n * self.page_size,
                true,
            )?;
        }
        Ok(())
    }

    fn disarm(&self) -> Result<(), HostError> {
        let mut st = self.lock();
        if !st.registered {
            return Ok(());
        }
        st.registered = false;
        sys::uffd_unregister(self.uffd.as_fd(), self.addr, self.len)
    }
}

impl Drop for AsyncWatch {
    fn drop(&mut self) {
        // Closing the userfaultfd would drop the registration too; unregistering first also
        // lifts the write-protection of every page.
        let _ = self.disarm();
    }
}

#[cfg(test)]
mod tests {
    use super::set_bits;

    #[test]
    fn the_output_vector_stays_within_a_bit_per_page() {
        use super::vec_len;
        assert_eq!(vec_len(1), 1);
        assert_eq!(vec_len(131), 66);
        assert_eq!(vec_len(4096), 256);
        assert_eq!(vec_len(262_144), 1310); // 1 GiB: 30.7 KiB
        assert!(vec_len(262_144) * 24 * 8 <= 262_144);
        assert_eq!(vec_len(1 << 30), 4096);
    }

    #[test]
    fn set_bits_spans_words() {
        let mut w = [0u64; 3];
        assert_eq!(set_bits(&mut w, 3, 3), 0);
        assert_eq!(w, [0; 3]);
        assert_eq!(set_bits(&mut w, 3, 5), 2);
        assert_eq!(w, [0b11000, 0, 0]);
        assert_eq!(set_bits(&mut w, 62, 130), 68);
        assert_eq!(w, [0b11000 | (3 << 62), !0, 0b11]);
        // Bits already set are not counted again.
        assert_eq!(set_bits(&mut w, 0, 66), 60);
        let mut w = [0u64; 1];
        set_bits(&mut w, 0, 64);
        assert_eq!(w, [!0]);
    }
}
