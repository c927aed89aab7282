//! The per-memslot dirty bitmap.
//!
//! Mirrors KVM's: one bit per page in little-endian bit order (bit `n` of the bitmap is bit
//! `n % 64` of 64-bit word `n / 64`), `ALIGN(npages, 64) / 8` bytes, set lock-free by vCPUs.
//!
//! KVM allocates a second bitmap of the same size (`kvm_second_dirty_bitmap()`) because GET
//! clears bits before `copy_to_user`, which can fault. Our GET writes into an exclusively
//! borrowed output slice whose length is checked before any bit is cleared, so it needs no
//! intermediate buffer: a logging slot costs 1 bit per page, half of KVM's 2.

use crate::sync::{AtomicU64, Ordering};

#[cfg(feature = "vm-memory")]
pub use crate::vmm_bitmap::{VmmBitmap, VmmBitmapSlice};

/// Bytes of a dirty bitmap for `npages` pages: `ALIGN(npages, 64) / 8`, as `kvm_dirty_bitmap_bytes()`.
pub const fn dirty_bitmap_bytes(npages: u64) -> usize {
    (npages.div_ceil(64) * 8) as usize
}

/// 64-bit words of a dirty bitmap for `npages` pages.
pub const fn dirty_bitmap_words(npages: u64) -> usize {
    npages.div_ceil(64) as usize
}

/// A memslot's dirty bitmap: atomic words, one bit per page.
#[derive(Debug)]
pub struct DirtyBitmap {
    npages: u64,
    live: Box<[AtomicU64]>,
}

impl DirtyBitmap {
    /// A clean bitmap for `npages` pages.
    pub fn new(npages: u64) -> Self {
        let n = dirty_bitmap_words(npages);
        DirtyBitmap {
            npages,
            live: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Pages covered.
    pub fn npages(&self) -> u64 {
        self.npages
    }

    /// Number of 64-bit words.
    pub fn words(&self) -> usize {
        self.live.len()
    }

    /// Set bit `rel_gfn` (KVM's `set_bit_le`). Lock-free.
    #[inline]
    pub fn set(&self, rel_gfn: u64) {
        debug_assert!(rel_gfn < self.npages);
        self.live[(rel_gfn / 64) as usize].fetch_or(1u64 << (rel_gfn % 64), Ordering::AcqRel);
    }

    /// Set `n` bits from `first`, whole words at a time (one atomic OR per word touched), and
    /// say whether any of them was set already (how a caller claims pages exactly once).
    /// Bits past the end are ignored, as is any part of the range that overflows `u64`.
    #[inline]
    pub fn set_range(&self, first: u64, n: u64) -> bool {
        let end = first.saturating_add(n).min(self.npages);
        if first >= end {
            return false;
        }
        let (fw, lw) = ((first / 64) as usize, ((end - 1) / 64) as usize);
        let lo = !0u64 << (first % 64);
        let hi = !0u64 >> (63 - (end - 1) % 64);
        let or = |w: usize, mask: u64| self.live[w].fetch_or(mask, Ordering::AcqRel) & mask;
        if fw == lw {
            return or(fw, lo & hi) != 0;
        }
        let mut before = or(fw, lo) | or(lw, hi);
        for w in fw + 1..lw {
            before |= or(w, !0);
        }
        before != 0
    }

    /// Set the bit of every page touched by the `len` bytes at byte `offset`, with pages of
    /// `1 << page_shift` bytes (`page_shift < 64`): how a VMM write to guest memory is logged. One atomic OR per
    /// word touched. Bytes past the end (or past `u64::MAX`) are ignored; `len == 0` marks
    /// nothing. The OR is a release: write guest memory first, then mark, and whoever takes
    /// the word ([`take_word`](Self::take_word), an acquire) sees the data.
    #[inline]
    pub fn set_byte_range(&self, offset: u64, len: u64, page_shift: u32) {
        if len == 0 {
            return;
        }
        let first = offset >> page_shift;
        let last = offset.saturating_add(len - 1) >> page_shift;
        self.set_range(first, (last - first).saturating_add(1));
    }

    /// Set every page's bit (KVM's `bitmap_set(..., 0, npages)` for `INITIALLY_SET`).
    pub fn set_all(&self) {
        self.set_range(0, self.npages);
    }

    /// Is bit `rel_gfn` set?
    #[inline]
    pub fn test(&self, rel_gfn: u64) -> bool {
        self.live[(rel_gfn / 64) as usize].load(Ordering::Acquire) & (1u64 << (rel_gfn % 64)) != 0
    }

    /// Load word `i`.
    #[inline]
    pub fn load_word(&self, i: usize) -> u64 {
        self.live[i].load(Ordering::Acquire)
    }

    /// Atomically take word `i`, leaving it zero (KVM's `xchg(&dirty_bitmap[i], 0)`).
    #[inline]
    pub fn take_word(&self, i: usize) -> u64 {
        self.live[i].swap(0, Ordering::AcqRel)
    }

    /// Atomically set `mask` in word `i` and return the bits of `mask` that were already set
    /// (one `fetch_or`, acquire-release).
    #[inline]
    pub fn set_word_bits(&self, i: usize, mask: u64) -> u64 {
        mask & self.live[i].fetch_or(mask, Ordering::AcqRel)
    }

    /// Clear every bit (a plain store per non-zero word): for a caller that knows nobody sets
    /// bits concurrently, such as a round's end at a fence.
    pub fn clear_all(&self) {
        for w in self.live.iter() {
            if w.load(Ordering::Relaxed) != 0 {
                w.store(0, Ordering::Relaxed);
            }
        }
    }

    /// Atomically clear `mask` in word `i` and return the bits of `mask` that were set
    /// (KVM's `mask & atomic_long_fetch_andnot(mask, ...)`).
    /// A word with none of the requested bits set is left untouched: a bit set after the
    /// read is dirty after the clear, exactly as if the clear had come first.
    #[inline]
    pub fn clear_word_bits(&self, i: usize, mask: u64) -> u64 {
        if self.live[i].load(Ordering::Acquire) & mask == 0 {
            return 0;
        }
        mask & self.live[i].fetch_and(!mask, Ordering::AcqRel)
    }

    /// OR every word into `out` and clear it: one `swap(0)` (an acquire) per non-zero word,
    /// clean words skipped with a load. `out` must hold at least `words()` words.
    pub fn take_or_into(&self, out: &mut [u64]) {
        for (o, w) in out[..self.live.len()].iter_mut().zip(self.live.iter()) {
            if w.load(Ordering::Relaxed) != 0 {
                *o |= w.swap(0, Ordering::AcqRel);
            }
        }
    }

    /// Copy the live words into `out` without clearing (manual-protect GET).
    pub fn snapshot_into(&self, out: &mut [u64]) {
        for (o, w) in out.iter_mut().zip(self.live.iter()) {
            *o = w.load(Ordering::Acquire);
        }
    }

    /// Count set bits.
    pub fn count(&self) -> u64 {
        self.live
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
            .sum()
    }

    /// GET's core: for every word, take it (xchg with 0) into `out` and call `f(i, mask)`
    /// for each non-zero one; clean words, skipped eight at a time, are written as 0.
    /// `out` must hold at least `words()` words.
    pub fn take_into(&self, out: &mut [u64], mut f: impl FnMut(usize, u64)) {
        let out = &mut out[..self.live.len()];
        for (c, (live, o)) in self.live.chunks(8).zip(out.chunks_mut(8)).enumerate() {
            if live.iter().fold(0, |a, w| a | w.load(Ordering::Acquire)) == 0 {
                o.fill(0);
                continue;
            }
            for (j, (w, o)) in live.iter().zip(o.iter_mut()).enumerate() {
                *o = if w.load(Ordering::Acquire) == 0 {
                    0
                } else {
                    w.swap(0, Ordering::AcqRel)
                };
                if *o != 0 {
                    f(c * 8 + j, *o);
                }
            }
        }
    }
}

/// Iterate the runs of set bits in a little-endian bitmap as `(first_page, npages)`, skipping
/// clean words with one comparison each and emitting each run once, however many words it spans.
pub fn runs(words: &[u64]) -> Runs<'_> {
    Runs {
        words,
        idx: 0,
        cur: words.first().copied().unwrap_or(0),
    }
}

/// Iterator returned by [`runs`].
#[derive(Debug, Clone)]
pub struct Runs<'a> {
    words: &'a [u64],
    idx: usize,
    /// Remaining bits of `words[idx]` not yet emitted.
    cur: u64,
}

impl Iterator for Runs<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        // Find the first set bit, skipping aligned blocks of eight clean words at once.
        while self.cur == 0 {
            let next = self.idx + 1;
            if next & 7 == 0 {
                if let Some(chunk) = self.words.get(next..next + 8) {
                    if chunk.iter().fold(0, |a, &w| a | w) == 0 {
                        self.idx += 8;
                        continue;
                    }
                }
            }
            self.idx += 1;
            if self.idx >= self.words.len() {
                return None;
            }
            self.cur = self.words[self.idx];
        }
        let lo = self.cur.trailing_zeros() as u64;
        let start = self.idx as u64 * 64 + lo;
        // Length of the run of ones starting at `lo` in this word.
        let ones = (self.cur >> lo).trailing_ones() as u64;
        if lo + ones < 64 {
            self.cur &= !(((1u64 << ones) - 1) << lo);
            return Some((start, ones));
        }
        // The run reaches the top of the word: continue through following words.
        let mut len = 64 - lo;
        loop {
            self.idx += 1;
            if self.idx >= self.words.len() {
                self.cur = 0;
                return Some((start, len));
            }
            let w = self.words[self.idx];
            if w == !0 {
                len += 64;
                continue;
            }
            let t = w.trailing_ones() as u64;
            len += t;
            self.cur = w & !((1u64 << t) - 1);
            return Some((start, len));
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn naive_runs(words: &[u64]) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for i in 0..words.len() as u64 * 64 {
            if words[(i / 64) as usize] >> (i % 64) & 1 == 1 {
                match out.last_mut() {
                    Some((s, n)) if *s + *n == i => *n += 1,
                    _ => out.push((i, 1)),
                }
            }
        }
        out
    }

    #[test]
    fn bytes_are_aligned_to_64_pages() {
        assert_eq!(dirty_bitmap_bytes(1), 8);
        assert_eq!(dirty_bitmap_bytes(64), 8);
        assert_eq!(dirty_bitmap_bytes(65), 16);
        assert_eq!(dirty_bitmap_bytes(64 * 3 + 3), 32);
    }

    #[test]
    fn set_range_matches_per_bit() {
        for (first, n) in [
            (0, 0),
            (0, 1),
            (3, 61),
            (3, 62),
            (63, 2),
            (10, 200),
            (0, 259),
            (64, 64),
        ] {
            let a = DirtyBitmap::new(259);
            let b = DirtyBitmap::new(259);
            a.set_range(first, n);
            for p in first..(first + n).min(259) {
                b.set(p);
            }
            for w in 0..a.words() {
                assert_eq!(
                    a.load_word(w),
                    b.load_word(w),
                    "first={first} n={n} word={w}"
                );
            }
        }
    }

    #[test]
    fn set_range_ignores_the_end_and_overflow() {
        let b = DirtyBitmap::new(70);
        b.set_range(68, u64::MAX);
        b.set_range(u64::MAX, 2);
        b.set_range(70, 1);
        assert!(!b.set_range(3, 0));
        assert_eq!((b.load_word(0), b.load_word(1)), (0, 0b11 << 4));
        // It says whether any bit of the range was set already, in any word it touches.
        let c = DirtyBitmap::new(256);
        assert!(!c.set_range(10, 100));
        assert!(!c.set_range(110, 140));
        assert!(c.set_range(0, 11));
        assert!(c.set_range(200, 1));
        c.clear_all();
        assert_eq!(c.count(), 0);
    }

    #[test]
    fn set_byte_range_marks_every_page_touched() {
        let b = DirtyBitmap::new(200);
        b.set_byte_range(4095, 2, 12); // straddles pages 0 and 1
        b.set_byte_range(10 << 12, 4096, 12); // exactly page 10
        b.set_byte_range(u64::MAX, 1, 12); // past the end
        b.set_byte_range(5 << 12, 0, 12); // empty
        b.set_byte_range((60 << 12) + 5, 70 << 12, 12); // pages 60..=130
        let want: Vec<u64> = [0, 1, 10].into_iter().chain(60..=130).collect();
        let got: Vec<u64> = (0..200).filter(|&p| b.test(p)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn take_or_into_ors_and_clears() {
        let b = DirtyBitmap::new(128);
        b.set(0);
        let mut out = [1 << 5, 7];
        b.take_or_into(&mut out);
        assert_eq!(out, [0b10_0001, 7]);
        assert_eq!(b.count(), 0);
    }

    #[test]
    fn clear_keeps_only_bits_that_were_set() {
        let b = DirtyBitmap::new(128);
        b.set(1);
        b.set(5);
        assert_eq!(b.clear_word_bits(0, 0b110), 0b10);
        assert_eq!(b.load_word(0), 1 << 5);
    }

    use proptest::prelude::*;

    fn word() -> impl Strategy<Value = u64> {
        any::<u64>().prop_map(|w| match w % 4 {
            0 => 0,
            1 => !0,
            _ => w,
        })
    }

    proptest! {
        #[test]
        fn runs_match_naive(words in proptest::collection::vec(word(), 0..8)) {
            let got: Vec<_> = runs(&words).collect();
            prop_assert_eq!(got, naive_runs(&words));
        }
    }
}
