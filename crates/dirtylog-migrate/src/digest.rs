//! The end-to-end memory check: a digest of every page of a region, computed by the source
//! from its paused memory and by the destination from the pages as they arrived.
//!
//! ```text
//! page hash   h(p)  = XXH3-64(bytes of page p)
//! mem digest  D     = XXH3-64(h(0) ‖ h(1) ‖ … ‖ h(n-1))      (each h little-endian)
//! ```
//!
//! The source reads every byte of its paused memory ([`mem_digest`], on every core): a write
//! its tracker missed changes `D`. The destination never re-reads its memory: a
//! [`DigestTable`] keeps `h(p)` of the last copy of each page that arrived, hashed right after
//! the frame landed (while it is still in cache), so its `D` at switchover is one pass over
//! the table (2 MiB per GiB of 4 KiB pages; 8 bytes per page). That is what lets the check
//! run after the destination has resumed the guest (`Verify::Background`): the table
//! describes the memory as it arrived, whatever the guest has written since.
//!
//! The hashes guard against bugs in the migration (a page never sent, sent from the wrong
//! round, written to the wrong place) and, in a verified migration, against corrupted page
//! bytes ([`wire::FLAG_HASH_CHECKED`](crate::wire::FLAG_HASH_CHECKED): the pages carry no CRC
//! of their own then); not against an adversary, which is TLS's job. 64 bits make a chance
//! collision irrelevant next to the bugs it is there to catch; a cryptographic hash would be
//! several times slower per core for no benefit here.

use std::hash::Hasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use twox_hash::XxHash3_64;

/// When the destination's memory is proven equal to the source's paused memory.
///
/// Whatever the mode, the source keeps its paused guest until the destination has
/// acknowledged, and resumes it on any failure before that.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verify {
    /// Before the destination resumes: the blackout pays the source's digest of all its
    /// memory beyond what the final round hides (about 50 ms per GiB on 2 cores here).
    Strict,
    /// The default. The destination resumes first; the source digests its paused memory
    /// while the guest runs there, and the destination compares with the page hashes it
    /// recorded as the pages arrived. On a mismatch the destination stops its guest before
    /// the source hears of it and resumes its own. The blackout pays nothing for the check;
    /// the source lets go of the guest once it has passed.
    #[default]
    Background,
    /// No check.
    Off,
}

impl std::str::FromStr for Verify {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "strict" => Ok(Verify::Strict),
            "background" => Ok(Verify::Background),
            "off" => Ok(Verify::Off),
            _ => Err(format!(
                "unknown verify mode {s:?}: use strict, background or off"
            )),
        }
    }
}

impl std::fmt::Display for Verify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verify::Strict => "strict",
            Verify::Background => "background",
            Verify::Off => "off",
        })
    }
}

/// Regions smaller than this are digested on the calling thread alone.
const PARALLEL_DIGEST_MIN: usize = 16 << 20;

/// XXH3-64 of `bytes`: the hash of one page, and of anything else the stream checks.
///
/// twox-hash's XXH3, which picks AVX2 at run time where the CPU has it (1.5× the SSE2 loop on
/// a piece of a frame still in cache here: 20 against 14 GB/s; the decoder hashes every page
/// that arrives, 14–19% of a verified bulk pass's CPU). The values are XXH3-64's, whatever the
/// build: `tests::xxh3_reference_values`.
pub fn mem_hash(bytes: &[u8]) -> u64 {
    XxHash3_64::oneshot(bytes)
}

/// The hash of a zero-filled page of `page_size` bytes (computed once per size).
fn zero_page_hash(page_size: usize) -> u64 {
    static ZERO_4K: OnceLock<u64> = OnceLock::new();
    if page_size == 4096 {
        return *ZERO_4K.get_or_init(|| mem_hash(&[0u8; 4096]));
    }
    mem_hash(&vec![0u8; page_size])
}

/// [`D`](self) of a region from its page hashes, in page order.
fn combine(hashes: impl Iterator<Item = u64>) -> u64 {
    let mut h = XxHash3_64::default();
    let mut buf = [0u8; 4096];
    let mut n = 0;
    for x in hashes {
        buf[n..n + 8].copy_from_slice(&x.to_le_bytes());
        n += 8;
        if n == buf.len() {
            h.write(&buf);
            n = 0;
        }
    }
    h.write(&buf[..n]);
    h.finish()
}

/// The digest `D` of `bytes`, a region of whole pages of `page_size` bytes (a shorter last
/// page is hashed as it is): every byte is read, on [`std::thread::available_parallelism`]
/// threads for a large region.
pub fn mem_digest(bytes: &[u8], page_size: usize) -> u64 {
    let page = page_size.max(1);
    let n = bytes.len().div_ceil(page);
    let zero = zero_page_hash(page);
    // A zero page's hash is known: testing for zero reads the page as surely as hashing it
    // (a write nobody tracked still shows) and costs about half as much, and most of a
    // guest's memory is often zeros (the huge zero page, where it was never written).
    let hash = |i: usize| {
        let p = &bytes[i * page..((i + 1) * page).min(bytes.len())];
        if p.len() == page && crate::guestmem::is_zero_bytes(p) {
            zero
        } else {
            mem_hash(p)
        }
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut hashes = vec![0u64; n];
    if bytes.len() < PARALLEL_DIGEST_MIN || threads < 2 {
        for (i, h) in hashes.iter_mut().enumerate() {
            *h = hash(i);
        }
    } else {
        let per = n.div_ceil(threads);
        std::thread::scope(|s| {
            for (t, part) in hashes.chunks_mut(per).enumerate() {
                let hash = &hash;
                s.spawn(move || {
                    for (j, h) in part.iter_mut().enumerate() {
                        *h = hash(t * per + j);
                    }
                });
            }
        });
    }
    combine(hashes.into_iter())
}

/// Slices a [`digest_sample`] is taken in.
const SAMPLE_SLICES: usize = 64;

/// Digest about `budget` bytes of `regions`, in [`SAMPLE_SLICES`] slices of whole pages spread
/// evenly over their total size, on [`std::thread::available_parallelism`] threads as
/// [`mem_digest`] uses for a large region (regions no larger than `budget` in all: each by
/// [`mem_digest`], as the switchover digests them); returns the bytes read. A strict switchover's digest costs what the memory holds (a zero
/// page a scan, a page of data a hash): timing this sample prices both as often as the memory
/// has them, where the first `budget` bytes alone would price all memory like its start
/// (a guest's data often sits low: 4 GiB of mostly zeros was priced at 1.1 s, and digested in
/// about 0.1 s).
pub(crate) fn digest_sample(regions: &[&[u8]], page_size: usize, budget: usize) -> usize {
    let page = page_size.max(1);
    let total: usize = regions.iter().map(|r| r.len()).sum();
    if total <= budget {
        for r in regions {
            std::hint::black_box(mem_digest(r, page));
        }
        return total;
    }
    let len = (budget / SAMPLE_SLICES / page).max(1) * page;
    let stride = total / SAMPLE_SLICES;
    let slices: Vec<&[u8]> = (0..SAMPLE_SLICES)
        .filter_map(|k| {
            // Offset `k * stride` of the regions laid end to end, down to its page.
            let mut at = k * stride;
            regions.iter().find_map(|r| {
                if at >= r.len() {
                    at -= r.len();
                    return None;
                }
                let start = at / page * page;
                Some(&r[start..(start + len).min(r.len())])
            })
        })
        .collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|s| {
        for t in 0..threads.min(slices.len()) {
            let slices = &slices;
            s.spawn(move || {
                for slice in slices.iter().skip(t).step_by(threads) {
                    std::hint::black_box(mem_digest(slice, page));
                }
            });
        }
    });
    slices.iter().map(|s| s.len()).sum()
}

/// The destination's page hashes of one region, kept as pages arrive, so that its digest
/// needs no read of guest memory.
///
/// Each entry holds `h(p) XOR h(zero page)`: a page never written is zero-filled memory and its
/// entry the `0` of a fresh allocation, so the table costs resident memory only where pages
/// arrived. Entries are atomics: the connection threads record disjoint pages of a round
/// concurrently (the receiver's claims make them disjoint), and rounds are fenced.
#[derive(Debug)]
pub struct DigestTable {
    page_size: usize,
    zero: u64,
    entries: Vec<AtomicU64>,
}

impl DigestTable {
    /// A table for `npages` zero-filled pages of `page_size` bytes.
    pub fn new(npages: usize, page_size: usize) -> Self {
        DigestTable {
            page_size,
            zero: zero_page_hash(page_size),
            entries: (0..npages).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Pages in the table.
    pub fn npages(&self) -> usize {
        self.entries.len()
    }

    /// Record the contents of pages `first..` as `data` (whole pages). Pages past the table's
    /// end are ignored (the caller has checked the range against the region).
    pub fn record(&self, first: u64, data: &[u8]) {
        let Ok(first) = usize::try_from(first) else {
            return;
        };
        for (k, page) in data.chunks(self.page_size.max(1)).enumerate() {
            if let Some(e) = first.checked_add(k).and_then(|p| self.entries.get(p)) {
                e.store(mem_hash(page) ^ self.zero, Ordering::Relaxed);
            }
        }
    }

    /// Record pages `first..` as having the hashes ([`mem_hash`]) `hashes`, in page order.
    /// Pages past the table's end are ignored (the caller has checked the range against the
    /// region).
    pub fn record_hashes(&self, first: u64, hashes: &[u64]) {
        let Ok(first) = usize::try_from(first) else {
            return;
        };
        let end = first.saturating_add(hashes.len()).min(self.entries.len());
        for (e, h) in self
            .entries
            .get(first..end)
            .unwrap_or(&[])
            .iter()
            .zip(hashes)
        {
            e.store(h ^ self.zero, Ordering::Relaxed);
        }
    }

    /// Record pages `first..first + npages` as zero-filled.
    pub fn record_zero(&self, first: u64, npages: u64) {
        let (Ok(first), Ok(n)) = (usize::try_from(first), usize::try_from(npages)) else {
            return;
        };
        let end = first.saturating_add(n).min(self.entries.len());
        for e in self.entries.get(first..end).unwrap_or(&[]) {
            e.store(0, Ordering::Relaxed);
        }
    }

    /// The digest `D` of the region as recorded: equal to [`mem_digest`] of the memory the
    /// recorded pages (and zeros elsewhere) make up.
    pub fn digest(&self) -> u64 {
        combine(
            self.entries
                .iter()
                .map(|e| e.load(Ordering::Relaxed) ^ self.zero),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_a_hash_of_page_hashes() {
        let page = 4096;
        let mem: Vec<u8> = (0..40 * page).map(|i| (i * 7 % 251) as u8).collect();
        let manual: Vec<u8> = mem
            .chunks(page)
            .flat_map(|p| mem_hash(p).to_le_bytes())
            .collect();
        assert_eq!(mem_digest(&mem, page), mem_hash(&manual));
    }

    /// XXH3-64 (seed 0) test vectors, from the reference algorithm as xxhash-rust computes
    /// it: the page hash must not change with the crate or the CPU (digests are compared across
    /// machines and stored in snapshots). 4096 bytes take the vectorised path, 100 the short one.
    #[test]
    fn xxh3_reference_values() {
        let page: Vec<u8> = (0..4096usize).map(|i| (i * 31 + i / 256) as u8).collect();
        assert_eq!(mem_hash(b""), 0x2d06_8005_38d3_94c2);
        assert_eq!(mem_hash(&page), 0xbe85_5965_eae8_486b);
        assert_eq!(mem_hash(&page[..100]), 0x10c6_f5ef_f4f4_5481);
    }

    #[test]
    fn the_probe_sample_spreads_over_all_regions() {
        let page = 4096;
        let (a, b) = (vec![0u8; 10 << 20], vec![0u8; 30 << 20]);
        // 64 slices of 16 pages, 40 MiB / 64 apart: 4 MiB in all, a quarter of them in `a`.
        assert_eq!(digest_sample(&[&a, &b], page, 4 << 20), 4 << 20);
        // Smaller than the budget: every byte.
        assert_eq!(
            digest_sample(&[&a[..5 * page], &b[..3]], page, 1 << 20),
            5 * page + 3
        );
        // A budget under a page per slice still reads a page per slice, never past a region.
        assert_eq!(digest_sample(&[&a], page, 100), 64 * page);
        assert_eq!(digest_sample(&[&a[..page / 2]], page, 100), 64 * (page / 2));
        assert_eq!(digest_sample(&[], page, 1 << 20), 0);
    }

    #[test]
    fn many_threads_give_the_same_digest_as_one() {
        let page = 4096;
        let big: Vec<u8> = (0..(PARALLEL_DIGEST_MIN + 3 * page))
            .map(|i| (i % 253) as u8)
            .collect();
        let manual: Vec<u8> = big
            .chunks(page)
            .flat_map(|p| mem_hash(p).to_le_bytes())
            .collect();
        assert_eq!(mem_digest(&big, page), mem_hash(&manual));
    }

    #[test]
    fn the_table_matches_the_memory_it_describes() {
        let page = 4096;
        let npages = 300;
        let mut mem = vec![0u8; npages * page];
        let table = DigestTable::new(npages, page);
        assert_eq!(table.digest(), mem_digest(&mem, page), "all zero");
        // Pages arrive, some twice, some later zeroed.
        for (first, n, byte) in [(3usize, 5usize, 1u8), (100, 70, 2), (4, 1, 3), (120, 10, 0)] {
            let data = vec![byte; n * page];
            mem[first * page..(first + n) * page].copy_from_slice(&data);
            if byte == 0 {
                table.record_zero(first as u64, n as u64);
            } else {
                table.record(first as u64, &data);
            }
            assert_eq!(table.digest(), mem_digest(&mem, page));
        }
        // A byte the table did not see is caught.
        mem[250 * page + 17] = 9;
        assert_ne!(table.digest(), mem_digest(&mem, page));
    }

    #[test]
    fn recorded_hashes_equal_recorded_pages() {
        let page = 4096;
        let a = DigestTable::new(10, page);
        let b = DigestTable::new(10, page);
        let data: Vec<u8> = (0..3 * page).map(|i| (i % 251) as u8).collect();
        a.record(4, &data);
        let hashes: Vec<u64> = data.chunks(page).map(mem_hash).collect();
        b.record_hashes(4, &hashes);
        assert_eq!(a.digest(), b.digest());
        assert_ne!(a.digest(), DigestTable::new(10, page).digest());
        // Past the end: ignored, as `record` does.
        b.record_hashes(9, &hashes);
        a.record(9, &data);
        assert_eq!(a.digest(), b.digest());
        b.record_hashes(u64::MAX, &hashes);
        assert_eq!(a.digest(), b.digest());
    }

    #[test]
    fn out_of_range_records_are_ignored() {
        let table = DigestTable::new(2, 4096);
        let before = table.digest();
        table.record(2, &[1u8; 4096]);
        table.record(u64::MAX, &[1u8; 4096]);
        table.record_zero(u64::MAX, u64::MAX);
        assert_eq!(table.digest(), before);
    }
}
