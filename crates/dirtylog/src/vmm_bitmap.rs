//! VMM writes tracked the vm-memory way: [`VmmBitmap`] implements vm-memory's
//! [`Bitmap`] trait family over a [`DirtyBitmap`].
//!
//! KVM's dirty log sees only what vCPUs write. What the VMM writes into guest memory itself
//! (device models, emulated DMA, block backends) must be logged by the VMM. With guest memory
//! in a `vm_memory::GuestMemoryMmap<VmmBitmap>`, every write through vm-memory (`write_obj`,
//! `write_slice`, `write`, `VolatileSlice` stores, ...) marks the pages it touched, with no
//! call to remember.
//!
//! Each region's bitmap is an `Arc<DirtyBitmap>` in KVM's layout (page `n` is bit `n % 64` of
//! little-endian word `n / 64`), so the migration engine or a tracker takes its words with
//! [`DirtyBitmap::take_word`] / [`DirtyBitmap::take_or_into`] and ORs them straight into a
//! harvested KVM log. A mark is one atomic OR per 64-page word touched (vm-memory's own
//! `AtomicBitmap` does one per page).
//!
//! Protocol: vm-memory writes guest memory first, then marks (a release); whoever takes a word
//! (an acquire) sees the data of every mark it takes.
//!
//! ```
//! use std::sync::Arc;
//! use dirtylog::bitmap::VmmBitmap;
//! use dirtylog::DirtyBitmap;
//! use vm_memory::bitmap::Bitmap;
//!
//! // A 1 MiB region of 4 KiB pages, whose bitmap the migration engine also holds.
//! let bits = Arc::new(DirtyBitmap::new(256));
//! let vmm = VmmBitmap::from_bitmap(bits.clone(), 4096);
//! vmm.mark_dirty(0x1ffc, 8); // straddles pages 1 and 2
//! assert_eq!(bits.take_word(0), 0b110);
//! ```

use std::sync::Arc;

use vm_memory::bitmap::{Bitmap, BitmapSlice, NewBitmap, WithBitmapSlice};

use crate::bitmap::DirtyBitmap;

/// One guest memory region's dirty pages, for vm-memory: an `Arc<DirtyBitmap>` and a page size.
///
/// `NewBitmap::with_len` makes a clean bitmap with the host's page size, so
/// `GuestMemoryMmap::<VmmBitmap>::from_ranges` works; [`from_bitmap`](Self::from_bitmap)
/// wraps a bitmap that someone else (a tracker, the migration engine) already holds.
#[derive(Debug)]
pub struct VmmBitmap {
    bits: Arc<DirtyBitmap>,
    page_shift: u32,
}

/// A view of a [`VmmBitmap`] starting at a byte offset (vm-memory's `BitmapSlice`).
#[derive(Debug, Clone, Copy)]
pub struct VmmBitmapSlice<'a> {
    bitmap: &'a VmmBitmap,
    base: usize,
}

/// The host's page size, the granularity KVM logs at (`sysconf(_SC_PAGESIZE)`, as vm-memory's
/// `AtomicBitmap` uses; through the `page_size` crate, which keeps this crate free of
/// `unsafe`).
fn host_page_size() -> usize {
    page_size::get()
}

impl VmmBitmap {
    /// A clean bitmap for `byte_size` bytes of guest memory in pages of `page_size` bytes
    /// (a partial last page counts as a page).
    ///
    /// # Panics
    /// If `page_size` is not a power of two.
    pub fn new(byte_size: usize, page_size: usize) -> Self {
        assert!(
            page_size.is_power_of_two(),
            "page size {page_size} is not a power of two"
        );
        let npages = byte_size.div_ceil(page_size) as u64;
        Self::from_bitmap(Arc::new(DirtyBitmap::new(npages)), page_size)
    }

    /// Track writes in an existing bitmap, one bit per page of `page_size` bytes from the
    /// region's start; writes past its last page are ignored.
    ///
    /// # Panics
    /// If `page_size` is not a power of two.
    pub fn from_bitmap(bits: Arc<DirtyBitmap>, page_size: usize) -> Self {
        assert!(
            page_size.is_power_of_two(),
            "page size {page_size} is not a power of two"
        );
        VmmBitmap {
            bits,
            page_shift: page_size.trailing_zeros(),
        }
    }

    /// The underlying bitmap, to share with a tracker or the migration engine.
    pub fn bitmap(&self) -> &Arc<DirtyBitmap> {
        &self.bits
    }

    /// Bytes per page (one bit each).
    pub fn page_size(&self) -> usize {
        1 << self.page_shift
    }

    /// Pages covered.
    pub fn npages(&self) -> u64 {
        self.bits.npages()
    }

    #[inline]
    fn mark(&self, offset: usize, len: usize) {
        // usize is at most 64 bits wide on every target Rust supports with atomics of u64.
        self.bits
            .set_byte_range(offset as u64, len as u64, self.page_shift);
    }

    #[inline]
    fn dirty(&self, offset: usize) -> bool {
        let page = (offset as u64) >> self.page_shift;
        page < self.bits.npages() && self.bits.test(page)
    }
}

impl Default for VmmBitmap {
    /// An empty bitmap (no pages) with the host's page size.
    fn default() -> Self {
        VmmBitmap::new(0, host_page_size())
    }
}

impl<'a> WithBitmapSlice<'a> for VmmBitmap {
    type S = VmmBitmapSlice<'a>;
}

impl Bitmap for VmmBitmap {
    /// Mark every page touched by the `len` bytes at `offset`; bytes past the end are ignored.
    #[inline]
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.mark(offset, len)
    }

    #[inline]
    fn dirty_at(&self, offset: usize) -> bool {
        self.dirty(offset)
    }

    #[inline]
    fn slice_at(&self, offset: usize) -> VmmBitmapSlice<'_> {
        VmmBitmapSlice {
            bitmap: self,
            base: offset,
        }
    }
}

impl NewBitmap for VmmBitmap {
    /// A clean bitmap for a region of `len` bytes, in host pages.
    fn with_len(len: usize) -> Self {
        VmmBitmap::new(len, host_page_size())
    }
}

impl VmmBitmapSlice<'_> {
    /// The underlying bitmap of the whole region.
    pub fn bitmap(&self) -> &Arc<DirtyBitmap> {
        &self.bitmap.bits
    }

    /// Byte offset of this view from the region's start.
    pub fn base(&self) -> usize {
        self.base
    }
}

impl<'b> WithBitmapSlice<'b> for VmmBitmapSlice<'_> {
    type S = Self;
}

impl BitmapSlice for VmmBitmapSlice<'_> {}

impl Bitmap for VmmBitmapSlice<'_> {
    /// Offsets are relative to the view and added with wrapping arithmetic, as vm-memory's
    /// own slices do: an access vm-memory allowed cannot overflow, and a wrapped offset can
    /// at worst mark a page that was not written (a false positive, never a lost write).
    #[inline]
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.bitmap.mark(self.base.wrapping_add(offset), len)
    }

    #[inline]
    fn dirty_at(&self, offset: usize) -> bool {
        self.bitmap.dirty(self.base.wrapping_add(offset))
    }

    #[inline]
    fn slice_at(&self, offset: usize) -> Self {
        VmmBitmapSlice {
            bitmap: self.bitmap,
            base: self.base.wrapping_add(offset),
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Barrier;

    const PAGE: usize = 4096;

    fn take(b: &VmmBitmap) -> Vec<u64> {
        let mut out = vec![0; b.bitmap().words()];
        b.bitmap().take_or_into(&mut out);
        out
    }

    fn pages_of(words: &[u64]) -> Vec<u64> {
        (0..words.len() as u64 * 64)
            .filter(|&n| words[(n / 64) as usize] & (1 << (n % 64)) != 0)
            .collect()
    }

    #[test]
    fn marks_every_page_touched() {
        let b = VmmBitmap::new(200 * PAGE, PAGE);
        b.mark_dirty(PAGE - 1, 2); // straddles pages 0 and 1
        b.mark_dirty(10 * PAGE, PAGE); // exactly page 10
        b.mark_dirty(60 * PAGE + 5, 70 * PAGE); // pages 60..=130, across three words
        let mut want = vec![0, 1, 10];
        want.extend(60..=130);
        assert_eq!(pages_of(&take(&b)), want);
    }

    #[test]
    fn take_clears_and_ors() {
        let b = VmmBitmap::new(128 * PAGE, PAGE);
        b.mark_dirty(0, PAGE);
        let mut out = vec![1 << 5, 0];
        b.bitmap().take_or_into(&mut out);
        assert_eq!(out, [0b10_0001, 0]);
        assert_eq!(take(&b), [0, 0]);
    }

    #[test]
    fn ignores_bytes_past_the_end_and_empty_writes() {
        let b = VmmBitmap::new(70 * PAGE, PAGE);
        b.mark_dirty(68 * PAGE, usize::MAX);
        b.mark_dirty(3 * PAGE, 0);
        b.mark_dirty(usize::MAX, 1);
        assert_eq!(pages_of(&take(&b)), [68, 69]);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Mark(usize, usize),
        Take,
    }

    fn op(limit: usize) -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..limit, 0..limit / 2).prop_map(|(o, l)| Op::Mark(o, l)),
            1 => Just(Op::Take),
        ]
    }

    /// The naive model: set each page's bit, one page at a time, if any byte of it is written.
    fn model_mark(model: &mut [u64], npages: usize, page: usize, offset: usize, len: usize) {
        for n in 0..npages {
            if offset < (n + 1) * page && n * page < offset + len {
                model[n / 64] |= 1 << (n % 64);
            }
        }
    }

    proptest! {
        #[test]
        fn matches_a_naive_model(
            npages in 1usize..300,
            shift in 9u32..14,
            ops in prop::collection::vec(op(320 << 13), 1..40),
            seed in any::<u64>(),
        ) {
            let page = 1usize << shift;
            let b = VmmBitmap::new(npages * page, page);
            let mut model = vec![0u64; b.bitmap().words()];
            for op in ops {
                match op {
                    Op::Mark(offset, len) => {
                        b.mark_dirty(offset, len);
                        model_mark(&mut model, npages, page, offset, len);
                    }
                    Op::Take => {
                        // Start from arbitrary bits: the take ORs into them.
                        let mut out: Vec<u64> = model.iter().map(|_| seed).collect();
                        b.bitmap().take_or_into(&mut out);
                        let want: Vec<u64> = model.iter().map(|m| m | seed).collect();
                        prop_assert_eq!(out, want);
                        model.fill(0);
                    }
                }
            }
            prop_assert_eq!(take(&b), model);
        }
    }

    /// Markers mark each page exactly once, in disjoint interleaved sets, while a harvester
    /// takes concurrently: the union of everything taken must be every page.
    #[test]
    fn no_mark_lost_between_concurrent_mark_and_take() {
        const NPAGES: usize = 1 << 16;
        const THREADS: usize = 3;
        let b = VmmBitmap::new(NPAGES * PAGE, PAGE);
        let start = Barrier::new(THREADS + 1);
        let done = AtomicBool::new(false);
        let mut taken = vec![0u64; b.bitmap().words()];
        std::thread::scope(|s| {
            let harvester = s.spawn(|| {
                start.wait();
                while !done.load(Ordering::Acquire) {
                    b.bitmap().take_or_into(&mut taken);
                }
            });
            let markers: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (b, start) = (&b, &start);
                    s.spawn(move || {
                        start.wait();
                        for page in (t..NPAGES).step_by(THREADS) {
                            b.mark_dirty(page * PAGE + page % 7, 1 + page % 3);
                        }
                    })
                })
                .collect();
            for m in markers {
                m.join().unwrap();
            }
            done.store(true, Ordering::Release);
            harvester.join().unwrap();
        });
        b.bitmap().take_or_into(&mut taken);
        assert!(taken.iter().all(|&w| w == u64::MAX));
    }

    #[test]
    fn slices_are_offset_views() {
        let b = VmmBitmap::new(16 * 4096, 4096);
        let s = b.slice_at(3 * 4096).slice_at(4096);
        s.mark_dirty(4095, 2); // pages 4 and 5 of the region
        assert!(s.dirty_at(0) && s.dirty_at(4096) && !s.dirty_at(2 * 4096));
        assert_eq!(b.bitmap().load_word(0), 0b11 << 4);
        assert!(b.dirty_at(5 * 4096 + 7) && !b.dirty_at(3 * 4096));
        assert!(!b.dirty_at(usize::MAX));
        assert_eq!(s.base(), 4 * 4096);
    }

    #[test]
    fn with_len_counts_a_partial_page() {
        let b = VmmBitmap::with_len(3 * host_page_size() + 1);
        assert_eq!(b.npages(), 4);
        assert_eq!(VmmBitmap::default().npages(), 0);
        VmmBitmap::default().mark_dirty(0, 4096); // no pages: ignored, no panic
    }

    #[test]
    fn new_bitmaps_use_the_host_page_size() {
        // x86-64 Linux has 4 KiB base pages.
        #[cfg(target_arch = "x86_64")]
        assert_eq!(host_page_size(), 4096);
        assert_eq!(VmmBitmap::with_len(1).page_size(), host_page_size());
    }

    #[test]
    #[should_panic(expected = "not a power of two")]
    fn page_size_must_be_a_power_of_two() {
        VmmBitmap::new(4096, 3000);
    }
}
