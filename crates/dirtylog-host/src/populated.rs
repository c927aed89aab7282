//! Which pages of a mapping of this process hold anything: present in its page tables (the
//! shared zero page aside) or swapped out. Every other page of *private anonymous* memory
//! reads as zeros, so a reader that only wants the non-zero pages — a migration's bulk pass,
//! a digest of guest memory — can skip them without touching them (a read of an untouched
//! page costs a page fault and maps the zero page).
//!
//! One `PAGEMAP_SCAN` walk (Linux ≥ 6.7) reports the pages that are present-and-not-the-zero-
//! page or swapped, as ranges; on older kernels `/proc/self/pagemap` is read instead, 8 bytes
//! per base page (present or swapped; the zero page then counts as populated, which only costs
//! a read).
//!
//! What the answer does **not** say: that an unreported page is zero in memory that is not
//! private anonymous (a file or shared mapping keeps its data in the page cache whether or not
//! this process maps it), or in memory a userfaultfd missing-mode handler fills on demand (a
//! lazy restore). The caller knows what its memory is; this module only reads page tables.
//!
//! ```
//! # fn main() -> Result<(), dirtylog_host::HostError> {
//! use dirtylog_host::{populated_pages, HostBacking, HostMemory};
//!
//! let mem = HostMemory::new(64 * 4096, HostBacking::Anonymous)?;
//! // SAFETY: a fresh mapping of ours; nothing else uses it.
//! unsafe { mem.as_ptr().add(5 * 4096).write_volatile(1) };
//! let mut bits = [0u64; 1];
//! let n = populated_pages(mem.as_ptr() as u64, mem.len(), 4096, &mut bits)?;
//! assert_eq!((n, bits[0]), (1, 1 << 5));
//! # Ok(())
//! # }
//! ```

use std::io::Read as _;
use std::os::fd::AsFd as _;
use std::sync::OnceLock;

use dirtylog::bitmap::runs;

use crate::async_wp::set_bits;
use crate::sys::{self, page_region, pm_scan_arg};
use crate::HostError;

/// `PAGE_IS_PRESENT`, `PAGE_IS_SWAPPED`, `PAGE_IS_PFNZERO` (`include/uapi/linux/fs.h`).
use linux_raw_sys::general::{PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_SWAPPED};

/// `/proc/self/pagemap` entry bits (Documentation/admin-guide/mm/pagemap.rst).
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;

/// Ranges asked for per `PAGEMAP_SCAN` call; a longer answer continues from `walk_end`.
const SCAN_RANGES: usize = 512;

/// Set in `out` (bit `i` = page `i` of `page_size` bytes from `addr`; bits past the range are
/// left alone) every page of `[addr, addr + len)` of which some base page is populated:
/// present in this process's page tables and not the shared zero page, or swapped out.
/// Returns how many pages were set. Holes in the mapping are reported as unpopulated.
///
/// `page_size` must be a power of two at least the base page size, `addr` a multiple of the
/// base page size and `len` of `page_size`, and `out` hold `len / page_size` bits (else the
/// matching [`HostError`]). The memory itself is never read, so any range is safe to ask
/// about.
pub fn populated_pages(
    addr: u64,
    len: u64,
    page_size: u64,
    out: &mut [u64],
) -> Result<u64, HostError> {
    let end = check_args(addr, len, page_size, out)?;
    let mut set = 0;
    let mut mark = |start: u64, stop: u64| {
        let first = (start.clamp(addr, end) - addr) / page_size;
        let last = (stop.clamp(addr, end) - addr).div_ceil(page_size);
        set += set_bits(out, first as usize, last as usize);
    };
    if scan_supported() {
        scan(addr, end, POPULATED, &mut mark)?;
    } else {
        read_pagemap(addr, end, sys::base_page_size(), &mut mark)?;
    }
    Ok(set)
}

/// Check the arguments of [`populated_pages`] and [`zero_pfn_pages`]; returns the range's end.
fn check_args(addr: u64, len: u64, page_size: u64, out: &[u64]) -> Result<u64, HostError> {
    let base = sys::base_page_size();
    if !page_size.is_power_of_two() || page_size < base {
        return Err(HostError::BadPageSize(page_size));
    }
    for (what, value, unit) in [("address", addr, base), ("length", len, page_size)] {
        if value % unit != 0 {
            return Err(HostError::Unaligned {
                what,
                value,
                page_size: unit,
            });
        }
    }
    let end = addr
        .checked_add(len)
        .ok_or(HostError::RangeOverflow { addr, len })?;
    let npages = len / page_size;
    if (out.len() as u64).saturating_mul(64) < npages {
        return Err(HostError::BitmapLength {
            index: 0,
            expected: npages.div_ceil(64) as usize,
            got: out.len(),
        });
    }
    Ok(end)
}

/// Set in `out` (as [`populated_pages`] does) every page of `[addr, addr + len)` whose base
/// pages all map the shared zero page or the huge zero page: pages the kernel itself says
/// read as zeros, whatever kind of mapping holds them and whatever the caller believes of it.
/// First, where nothing is mapped yet (no base page populated), asks the kernel to map the
/// zero page (`MADV_POPULATE_READ`, as a read of each page would, without reading it here;
/// errors ignored: such pages are then just not reported), so that a digest can take every
/// never-written page of private anonymous memory as zeros without scanning it. Returns how
/// many pages were set; 0 where the kernel lacks `PAGEMAP_SCAN` (Linux < 6.7).
///
/// Reading never-written memory maps the zero page anyway; mapping it ahead only does so
/// for all of it at once. File and shared mappings get their page-cache pages mapped (as a
/// read would), never the zero page, so they are not reported.
///
/// ```
/// # fn main() -> Result<(), dirtylog_host::HostError> {
/// use dirtylog_host::{zero_pfn_pages, HostBacking, HostMemory};
///
/// let mem = HostMemory::new(64 * 4096, HostBacking::Anonymous)?;
/// // SAFETY: a fresh mapping of ours; nothing else uses it.
/// unsafe { mem.as_ptr().add(5 * 4096).write_volatile(1) };
/// let mut bits = [0u64; 1];
/// let n = zero_pfn_pages(mem.as_ptr() as u64, mem.len(), 4096, &mut bits)?;
/// # if n == 0 { return Ok(()) } // a kernel without PAGEMAP_SCAN
/// assert_eq!((n, bits[0]), (63, !(1 << 5)));
/// # Ok(())
/// # }
/// ```
pub fn zero_pfn_pages(
    addr: u64,
    len: u64,
    page_size: u64,
    out: &mut [u64],
) -> Result<u64, HostError> {
    let end = check_args(addr, len, page_size, out)?;
    if !scan_supported() {
        return Ok(0);
    }
    let npages = len / page_size;
    let words = npages.div_ceil(64) as usize;
    let mut populated = vec![0u64; words];
    populated_pages(addr, len, page_size, &mut populated)?;
    // The unpopulated pages, as set bits for the project's run walk.
    for w in &mut populated {
        *w = !*w;
    }
    if npages % 64 != 0 {
        if let Some(last) = populated.last_mut() {
            *last &= (1u64 << (npages % 64)) - 1;
        }
    }
    for (first, count) in runs(&populated) {
        let (start, bytes) = (addr + first * page_size, count * page_size);
        // SAFETY: advice on a range of this process's address space that it asked about; it
        // only faults pages in for reading (the zero page where nothing is mapped), never
        // changes memory, and fails harmlessly on holes or mappings it cannot populate.
        let _ = unsafe {
            libc::madvise(
                start as *mut libc::c_void,
                bytes as usize,
                libc::MADV_POPULATE_READ,
            )
        };
    }
    drop(populated);
    // A page counts only if the zero page covers all of it.
    let mut set = 0;
    let mut mark = |start: u64, stop: u64| {
        let first = (start.clamp(addr, end) - addr).div_ceil(page_size);
        let last = (stop.clamp(addr, end) - addr) / page_size;
        set += set_bits(out, first as usize, last as usize);
    };
    scan(addr, end, ZERO_PFN, &mut mark)?;
    Ok(set)
}

/// Does this kernel have `PAGEMAP_SCAN`? Asked once, with an empty range.
fn scan_supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        let Ok(pagemap) = sys::open_pagemap() else {
            return false;
        };
        let mut arg = scan_arg(0, 0, &mut [], POPULATED);
        // SAFETY: vec is null with vec_len 0.
        unsafe { sys::pagemap_scan(pagemap.as_fd(), &mut arg) }.is_ok()
    })
}

/// Which pages a `PAGEMAP_SCAN` walk reports, as the kernel's category masks: a page matches
/// if its categories XOR `inverted` have all of `mask` and (when not 0) some of `anyof`.
#[derive(Clone, Copy)]
struct Categories {
    inverted: u64,
    mask: u64,
    anyof: u64,
    /// The categories reported with each range.
    ret: u64,
}

/// Present or swapped, and not the zero page ("inverted then required").
const POPULATED: Categories = Categories {
    inverted: PAGE_IS_PFNZERO as u64,
    mask: PAGE_IS_PFNZERO as u64,
    anyof: (PAGE_IS_PRESENT | PAGE_IS_SWAPPED) as u64,
    ret: (PAGE_IS_PRESENT | PAGE_IS_SWAPPED) as u64,
};

/// Mapping the shared or huge zero page.
const ZERO_PFN: Categories = Categories {
    inverted: 0,
    mask: PAGE_IS_PFNZERO as u64,
    anyof: 0,
    ret: PAGE_IS_PFNZERO as u64,
};

/// A `PAGEMAP_SCAN` argument for the pages of `[start, end)` in `categories`, writing into
/// `vec`.
fn scan_arg(start: u64, end: u64, vec: &mut [page_region], categories: Categories) -> pm_scan_arg {
    pm_scan_arg {
        size: std::mem::size_of::<pm_scan_arg>() as u64,
        flags: 0,
        start,
        end,
        walk_end: 0,
        vec: if vec.is_empty() {
            0
        } else {
            vec.as_mut_ptr() as u64
        },
        vec_len: vec.len() as u64,
        max_pages: 0,
        category_inverted: categories.inverted,
        category_mask: categories.mask,
        category_anyof_mask: categories.anyof,
        return_mask: categories.ret,
    }
}

/// Walk `[start, end)` with `PAGEMAP_SCAN`, handing each range of pages in `categories` to
/// `mark`.
fn scan(
    start: u64,
    end: u64,
    categories: Categories,
    mark: &mut impl FnMut(u64, u64),
) -> Result<(), HostError> {
    let pagemap = sys::open_pagemap()?;
    let empty = page_region {
        start: 0,
        end: 0,
        categories: 0,
    };
    let mut vec = vec![empty; SCAN_RANGES];
    let mut at = start;
    while at < end {
        let mut arg = scan_arg(at, end, &mut vec, categories);
        // SAFETY: `vec`/`vec_len` describe `vec`, ours alone for the call.
        let n = unsafe { sys::pagemap_scan(pagemap.as_fd(), &mut arg) }?;
        for r in vec.iter().take(n) {
            mark(r.start, r.end);
        }
        if arg.walk_end <= at {
            return Err(HostError::Sys {
                op: "PAGEMAP_SCAN",
                source: std::io::Error::other(format!("the walk made no progress at {at:#x}")),
            });
        }
        at = arg.walk_end;
    }
    Ok(())
}

/// The fallback: one `/proc/self/pagemap` entry per base page.
fn read_pagemap(
    start: u64,
    end: u64,
    base: u64,
    mark: &mut impl FnMut(u64, u64),
) -> Result<(), HostError> {
    use std::io::Seek as _;
    let sys_err = |source| HostError::Sys {
        op: "read /proc/self/pagemap",
        source,
    };
    let mut file = std::fs::File::open("/proc/self/pagemap").map_err(sys_err)?;
    let mut buf = vec![0u8; 8 * 4096];
    let mut page = start;
    while page < end {
        let count = ((end - page) / base).min(4096) as usize;
        file.seek(std::io::SeekFrom::Start(page / base * 8))
            .map_err(sys_err)?;
        file.read_exact(&mut buf[..count * 8]).map_err(sys_err)?;
        for (i, entry) in buf[..count * 8].chunks_exact(8).enumerate() {
            let mut e = [0u8; 8];
            e.copy_from_slice(entry);
            if u64::from_ne_bytes(e) & (PM_PRESENT | PM_SWAPPED) != 0 {
                let p = page + i as u64 * base;
                mark(p, p + base);
            }
        }
        page += count as u64 * base;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{HostBacking, HostMemory};

    fn touch(mem: &HostMemory, page: usize, value: u8) {
        // SAFETY: `page` lies in our own fresh mapping, which nothing else uses.
        unsafe { mem.as_ptr().add(page * 4096).write_volatile(value) };
    }

    fn read(mem: &HostMemory, page: usize) -> u8 {
        // SAFETY: as in `touch`.
        unsafe { mem.as_ptr().add(page * 4096).read_volatile() }
    }

    #[test]
    fn zero_pfn_pages_are_the_never_written_ones() {
        if !scan_supported() {
            panic!("this test needs PAGEMAP_SCAN (Linux >= 6.7)");
        }
        let mem = HostMemory::new(256 * 4096, HostBacking::Anonymous).unwrap();
        for p in [0, 3, 64, 255] {
            touch(&mem, p, 7);
        }
        // Written back to zero: zero bytes, but a page of its own, not the zero page.
        touch(&mem, 70, 0);
        assert_eq!(read(&mem, 100), 0);
        let mut bits = [0u64; 4];
        let n = zero_pfn_pages(mem.as_ptr() as u64, mem.len(), 4096, &mut bits).unwrap();
        assert_eq!(n, 256 - 5);
        assert_eq!(bits, [!0b1001, !(1 | 1 << 6), !0, !(1 << 63)]);
        // Nothing was written: the memory still reads as before, and the written pages stay
        // populated.
        assert_eq!((read(&mem, 3), read(&mem, 100), read(&mem, 200)), (7, 0, 0));
        let mut populated = [0u64; 4];
        populated_pages(mem.as_ptr() as u64, mem.len(), 4096, &mut populated).unwrap();
        assert_eq!(populated, [0b1001, 1 | 1 << 6, 0, 1 << 63]);

        // In 16 KiB pages: only a page all of whose base pages are the zero page.
        let mut big = [0u64; 1];
        let n = zero_pfn_pages(mem.as_ptr() as u64, mem.len(), 16384, &mut big).unwrap();
        assert_eq!(n, 64 - 4);
        assert_eq!(big[0], !(1 | 1 << 16 | 1 << 17 | 1 << 63));
        // Bits outside the range stay; bad arguments are refused as by populated_pages.
        let mut wide = [0u64; 2];
        wide[1] = 5;
        zero_pfn_pages(mem.as_ptr() as u64, 64 * 4096, 4096, &mut wide).unwrap();
        assert_eq!(wide, [!0b1001, 5]);
        // A range that ends inside a bitmap word: nothing past it is marked.
        let mut part = [0u64; 2];
        zero_pfn_pages(mem.as_ptr() as u64, 70 * 4096, 4096, &mut part).unwrap();
        assert_eq!(part, [!0b1001, 0b11_1110]);
        assert!(zero_pfn_pages(mem.as_ptr() as u64, 4096, 3000, &mut wide).is_err());
        assert!(zero_pfn_pages(mem.as_ptr() as u64 + 1, 4096, 4096, &mut wide).is_err());
    }

    #[test]
    fn written_pages_are_populated_read_ones_are_not() {
        // Anonymous backing has 4 KiB pages: one write populates one page.
        let mem = HostMemory::new(256 * 4096, HostBacking::Anonymous).unwrap();
        for p in [0, 3, 64, 255] {
            touch(&mem, p, 7);
        }
        // A read maps the shared zero page: still nothing there.
        assert_eq!(read(&mem, 100), 0);
        let mut bits = [0u64; 4];
        let n = populated_pages(mem.as_ptr() as u64, mem.len(), 4096, &mut bits).unwrap();
        assert_eq!(n, 4);
        assert_eq!(bits, [0b1001, 1, 0, 1 << 63]);

        // In 16 KiB pages: a page is populated if any of its base pages is.
        let mut big = [0u64; 1];
        let n = populated_pages(mem.as_ptr() as u64, mem.len(), 16384, &mut big).unwrap();
        assert_eq!((n, big[0]), (3, 1 | 1 << 16 | 1 << 63));
    }

    #[test]
    fn the_fallback_agrees_on_what_was_written() {
        let mem = HostMemory::new(128 * 4096, HostBacking::Anonymous).unwrap();
        for p in [1, 2, 70, 127] {
            touch(&mem, p, 1);
        }
        let mut bits = [0u64; 2];
        read_pagemap(
            mem.as_ptr() as u64,
            mem.as_ptr() as u64 + mem.len(),
            4096,
            &mut |s, e| {
                for a in (s..e).step_by(4096) {
                    let p = (a - mem.as_ptr() as u64) / 4096;
                    bits[(p / 64) as usize] |= 1 << (p % 64);
                }
            },
        )
        .unwrap();
        assert_eq!(bits, [0b110, 1 << 6 | 1 << 63]);
    }

    #[test]
    fn bad_arguments_are_refused() {
        let mut bits = [0u64; 1];
        assert!(
            populated_pages(4096, 65 * 4096, 4096, &mut bits).is_err(),
            "bitmap too short"
        );
        assert!(
            populated_pages(4095, 4096, 4096, &mut bits).is_err(),
            "unaligned address"
        );
        assert!(
            populated_pages(4096, 4095, 4096, &mut bits).is_err(),
            "unaligned length"
        );
        assert!(
            populated_pages(0, 4096, 3000, &mut bits).is_err(),
            "odd page size"
        );
        assert!(
            populated_pages(u64::MAX - 4095, 8192, 4096, &mut bits).is_err(),
            "wraps"
        );
        // An unmapped range is simply empty.
        assert_eq!(populated_pages(4096, 4096, 4096, &mut bits).unwrap(), 0);
    }
}
