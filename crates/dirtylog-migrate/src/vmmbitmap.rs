//! A dirty bitmap for the VMM's own writes to guest memory.
//!
//! KVM's dirty log sees only what vCPUs write through the MMU. When the VMM itself writes into
//! guest memory — a device model filling a virtio RX buffer, emulated DMA, a block backend
//! completing a read — KVM never knows, so the VMM records those writes here and the migration
//! ORs this bitmap into KVM's before deciding what to send.
//!
//! One bitmap covers one region. The bit order is KVM's little-endian one: page `n` is bit
//! `n % 64` of word `n / 64`, so the words OR straight into a harvested KVM bitmap.
//!
//! Protocol: write guest memory first, then [`mark_range`](VmmDirtyBitmap::mark_range) (a
//! release). [`take_into`](VmmDirtyBitmap::take_into) (an acquire) either sees the mark, and
//! then the data, or leaves it for the next round; no mark is ever lost.
//!
//! The bits live in a [`DirtyBitmap`], the workspace's one atomic bitmap, behind an `Arc`: the
//! same bitmap can be shared with a `dirtylog::bitmap::VmmBitmap` (vm-memory's `Bitmap`
//! traits, so a `GuestMemoryMmap` marks it on every write) or with a tracker.

use std::sync::Arc;

use dirtylog::DirtyBitmap;

/// The dirty pages of one region written by the VMM, one bit per page in atomic words.
#[derive(Debug)]
pub struct VmmDirtyBitmap {
    page_shift: u32,
    bits: Arc<DirtyBitmap>,
}

impl VmmDirtyBitmap {
    /// A clean bitmap for a region of `npages` pages of `page_size` bytes.
    ///
    /// # Panics
    /// If `page_size` is not a power of two.
    pub fn new(npages: u64, page_size: u64) -> Self {
        Self::from_bitmap(Arc::new(DirtyBitmap::new(npages)), page_size)
    }

    /// A view of an existing bitmap (one bit per page of `page_size` bytes), shared with
    /// whoever else holds the `Arc`.
    ///
    /// # Panics
    /// If `page_size` is not a power of two.
    pub fn from_bitmap(bits: Arc<DirtyBitmap>, page_size: u64) -> Self {
        assert!(
            page_size.is_power_of_two(),
            "page size {page_size} is not a power of two"
        );
        VmmDirtyBitmap {
            page_shift: page_size.trailing_zeros(),
            bits,
        }
    }

    /// The underlying bitmap.
    pub fn bitmap(&self) -> &Arc<DirtyBitmap> {
        &self.bits
    }

    /// Pages covered.
    pub fn npages(&self) -> u64 {
        self.bits.npages()
    }

    /// Number of 64-bit words, the length [`take_into`](Self::take_into) wants.
    pub fn words(&self) -> usize {
        self.bits.words()
    }

    /// Mark every page touched by the `len` bytes at `offset` (from the region's start) as
    /// dirty: one atomic OR (a release) per word touched, not per page. Bytes past the
    /// region's end are ignored; `len == 0` marks nothing.
    pub fn mark_range(&self, offset: u64, len: u64) {
        self.bits.set_byte_range(offset, len, self.page_shift);
    }

    /// OR the dirty bits into `out` and clear them: one `swap(0)` (an acquire) per non-zero
    /// word, zero words skipped.
    ///
    /// # Panics
    /// If `out` is not [`words`](Self::words) long.
    pub fn take_into(&self, out: &mut [u64]) {
        assert_eq!(
            out.len(),
            self.bits.words(),
            "take_into needs one u64 per bitmap word"
        );
        self.bits.take_or_into(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Barrier;

    const PAGE: u64 = 4096;

    fn take(b: &VmmDirtyBitmap) -> Vec<u64> {
        let mut out = vec![0; b.words()];
        b.take_into(&mut out);
        out
    }

    fn pages_of(words: &[u64]) -> Vec<u64> {
        (0..words.len() as u64 * 64)
            .filter(|&n| words[(n / 64) as usize] & (1 << (n % 64)) != 0)
            .collect()
    }

    #[test]
    fn marks_every_page_touched() {
        let b = VmmDirtyBitmap::new(200, PAGE);
        b.mark_range(PAGE - 1, 2); // straddles pages 0 and 1
        b.mark_range(10 * PAGE, PAGE); // exactly page 10
        b.mark_range(60 * PAGE + 5, 70 * PAGE); // pages 60..=130, across three words
        let mut want = vec![0, 1, 10];
        want.extend(60..=130);
        assert_eq!(pages_of(&take(&b)), want);
    }

    #[test]
    fn take_clears_and_ors() {
        let b = VmmDirtyBitmap::new(128, PAGE);
        b.mark_range(0, PAGE);
        let mut out = vec![1 << 5, 0];
        b.take_into(&mut out);
        assert_eq!(out, [0b10_0001, 0]);
        assert_eq!(take(&b), [0, 0]);
    }

    #[test]
    fn ignores_bytes_past_the_end_and_empty_writes() {
        let b = VmmDirtyBitmap::new(70, PAGE);
        b.mark_range(68 * PAGE, u64::MAX);
        b.mark_range(3 * PAGE, 0);
        b.mark_range(u64::MAX, 1);
        assert_eq!(pages_of(&take(&b)), [68, 69]);
    }

    #[test]
    #[should_panic(expected = "one u64 per bitmap word")]
    fn take_into_wrong_length_panics() {
        VmmDirtyBitmap::new(65, PAGE).take_into(&mut [0]);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Mark(u64, u64),
        Take,
    }

    fn op(limit: u64) -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..limit, 0..limit / 2).prop_map(|(o, l)| Op::Mark(o, l)),
            1 => Just(Op::Take),
        ]
    }

    /// The naive model: set each page's bit, one page at a time, if any byte of it is written.
    fn model_mark(model: &mut [u64], npages: u64, page: u64, offset: u64, len: u64) {
        for n in 0..npages {
            if offset < (n + 1) * page && n * page < offset + len {
                model[(n / 64) as usize] |= 1 << (n % 64);
            }
        }
    }

    proptest! {
        #[test]
        fn matches_a_naive_model(
            npages in 1u64..300,
            shift in 9u32..14,
            ops in prop::collection::vec(op(320 << 13), 1..40),
            seed in any::<u64>(),
        ) {
            let page = 1u64 << shift;
            let b = VmmDirtyBitmap::new(npages, page);
            let mut model = vec![0u64; b.words()];
            for op in ops {
                match op {
                    Op::Mark(offset, len) => {
                        b.mark_range(offset, len);
                        model_mark(&mut model, npages, page, offset, len);
                    }
                    Op::Take => {
                        // Start from arbitrary bits: take_into ORs into them.
                        let mut out: Vec<u64> = model.iter().map(|_| seed).collect();
                        b.take_into(&mut out);
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
        const NPAGES: u64 = 1 << 16;
        const THREADS: u64 = 3;
        let b = VmmDirtyBitmap::new(NPAGES, PAGE);
        let start = Barrier::new(THREADS as usize + 1);
        let done = AtomicBool::new(false);
        let mut taken = vec![0u64; b.words()];
        std::thread::scope(|s| {
            let harvester = s.spawn(|| {
                start.wait();
                while !done.load(Ordering::Acquire) {
                    b.take_into(&mut taken);
                }
            });
            let markers: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (b, start) = (&b, &start);
                    s.spawn(move || {
                        start.wait();
                        for page in (t..NPAGES).step_by(THREADS as usize) {
                            b.mark_range(page * PAGE + page % 7, 1 + page % 3);
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
        b.take_into(&mut taken);
        assert!(taken.iter().all(|&w| w == u64::MAX));
    }
}
