//! [`WriteWatch`]: what every method (`async_wp.rs`, `sync_wp.rs`, `mprotect.rs`) does for one
//! region; the tracker (`tracker.rs`) holds one per region and maps the `DirtyTracker`
//! contract onto it.

#![allow(dead_code)]

use crate::HostError;

/// One region's write watch: write-protection of its pages and the record of which were
/// written. Page `i` is the region's `i`-th page of [`page_size`](Self::page_size) bytes; bit
/// `i % 64` of word `i / 64` in the bitmaps below (KVM's order).
///
/// The rule every method keeps (the same as KVM's `get_dirty_log_protect`): a write that
/// races a harvest is reported by this harvest or the next, never by neither. Methods that
/// record writes in a fault handler (sync, mprotect) must make "record the page, lift its
/// protection" and "take the recorded pages, re-protect them" mutually exclusive for a page,
/// and take before re-protecting; otherwise a write whose fault was recorded but not yet
/// retired is taken by a harvest, then made writable by the handler, and lost.
pub(crate) trait WriteWatch: Send + Sync {
    /// The page size of the region (4 KiB, or 2 MiB for hugetlb).
    fn page_size(&self) -> u64;
    /// Pages in the region.
    fn npages(&self) -> u64;
    /// Start: write-protect every page; from now on the first write to a page is recorded.
    fn arm(&self) -> Result<(), HostError>;
    /// OR the pages written since they were last protected into `out`
    /// (`out.len() == npages.div_ceil(64)`). With `reprotect`, the reported pages are
    /// write-protected again (dirty-log mode); without, they stay writable and reported
    /// until [`protect`](Self::protect) (clear-log mode). Returns the number of pages reported.
    fn harvest(&self, out: &mut [u64], reprotect: bool) -> Result<u64, HostError>;
    /// Write-protect again the pages `first_page + i` for each bit `i` set in `bits`
    /// (`first_page` a multiple of 64), and forget that they were written.
    fn protect(&self, first_page: u64, bits: &[u64]) -> Result<(), HostError>;
    /// Stop: lift every protection and stop recording. Idempotent.
    fn disarm(&self) -> Result<(), HostError>;
}
