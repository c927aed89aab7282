//! VMM-write marking through vm-memory's `Bitmap` trait: our `VmmBitmap` (one atomic OR per
//! 64-page word) beside vm-memory's `AtomicBitmap` (one atomic OR per page) on the same work,
//! in the same run, iterations alternating. Prints the median ns per `mark_dirty` and the
//! ratio ours / theirs. The target (issue 7): a 64-page range in at most 3 ns.
//!
//! Run: `cargo bench -p dirtylog --bench vmm_bitmap --features vm-memory`
//! (`-- --iters N` to change the number of iterations, at least 40).

use std::hint::black_box;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use dirtylog::bitmap::VmmBitmap;
use vm_memory::bitmap::{AtomicBitmap, Bitmap};

const PAGE: usize = 4096;
/// A 1 GiB region: 262144 pages, a 32 KiB bitmap.
const REGION: usize = 1 << 30;
/// Marks per timed iteration.
const MARKS: usize = 4096;

/// `MARKS` page-aligned offsets in the region (a fixed xorshift sequence), each leaving room
/// for `pages` pages: most 64-page ranges straddle two bitmap words, as a DMA buffer at an
/// arbitrary page does.
fn offsets(pages: usize, seed: u64) -> Vec<usize> {
    let mut x = seed;
    let slots = (REGION / PAGE - pages) as u64;
    (0..MARKS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % slots) as usize * PAGE
        })
        .collect()
}

/// Nanoseconds per mark of one pass over `offs` with writes of `len` bytes.
#[inline(never)]
fn pass<B: Bitmap>(b: &B, offs: &[usize], len: usize) -> f64 {
    let t = Instant::now();
    for &o in offs {
        black_box(b).mark_dirty(black_box(o), len);
    }
    t.elapsed().as_nanos() as f64 / offs.len() as f64
}

/// The floor of any correct lock-free mark: one bare `fetch_or` per mark on the word of the
/// mark's first page (a locked RMW on x86; `VmmBitmap` does one per word touched, so a
/// 64-page range at an arbitrary page costs one or two of these).
#[inline(never)]
fn floor_pass(words: &[AtomicU64], offs: &[usize]) -> f64 {
    let t = Instant::now();
    for &o in offs {
        black_box(words)[o / PAGE / 64].fetch_or(1 << (o / PAGE % 64), Ordering::Release);
    }
    t.elapsed().as_nanos() as f64 / offs.len() as f64
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let iters = args
        .iter()
        .position(|a| a == "--iters")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(100)
        .max(40);
    let ours = VmmBitmap::new(REGION, PAGE);
    let theirs = AtomicBitmap::new(REGION, NonZeroUsize::new(PAGE).expect("non-zero"));
    println!(
        "mark_dirty through vm_memory::bitmap::Bitmap, 1 GiB region of 4 KiB pages, \
         {MARKS} marks per iteration, {iters} iterations alternating"
    );
    println!(
        "{:<22} {:>12} {:>12} {:>8}",
        "range", "ours ns", "theirs ns", "ratio"
    );
    for (name, pages, len) in [
        ("64 pages (256 KiB)", 64, 64 * PAGE),
        ("1 page (4 KiB)", 1, PAGE),
        ("8 bytes", 1, 8),
    ] {
        let offs = offsets(pages, 0x9e37_79b9_7f4a_7c15 ^ pages as u64);
        // Warm up both (page in the bitmaps, train the branch predictors).
        pass(&ours, &offs, len);
        pass(&theirs, &offs, len);
        let (mut a, mut b) = (Vec::with_capacity(iters), Vec::with_capacity(iters));
        for i in 0..iters {
            // Alternate which goes first, so neither always runs on a warmer cache.
            if i % 2 == 0 {
                a.push(pass(&ours, &offs, len));
                b.push(pass(&theirs, &offs, len));
            } else {
                b.push(pass(&theirs, &offs, len));
                a.push(pass(&ours, &offs, len));
            }
        }
        let (ma, mb) = (median(&mut a), median(&mut b));
        println!("{name:<22} {ma:>12.2} {mb:>12.2} {:>8.4}", ma / mb);
    }
    // The cost of one atomic OR on this machine, the same way, for scale.
    let floor: Vec<AtomicU64> = (0..REGION / PAGE / 64).map(|_| AtomicU64::new(0)).collect();
    let offs = offsets(1, 0x51);
    floor_pass(&floor, &offs);
    let mut f: Vec<f64> = (0..iters).map(|_| floor_pass(&floor, &offs)).collect();
    println!(
        "{:<22} {:>12.2}   (one bare AtomicU64::fetch_or per mark)",
        "floor",
        median(&mut f)
    );
    // Both must have recorded the same pages (a benchmark that marks nothing proves nothing).
    let mut words = vec![0u64; ours.bitmap().words()];
    ours.bitmap().take_or_into(&mut words);
    assert_eq!(words, theirs.get_and_reset(), "the two bitmaps disagree");
}
