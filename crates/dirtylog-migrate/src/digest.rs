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
use std::time::{Duration, Instant};

use twox_hash::XxHash3_64;

/// When the destination's memory is proven equal to the source's paused memory.
///
/// Whatever the mode, the source keeps its paused guest until the destination has
/// acknowledged, and resumes it on any failure before that.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verify {
    /// Before the destination resumes: the blackout pays the source's digest of all its
    /// memory beyond what the final round hides (about 50 ms per GiB written on 2 cores
    /// here; memory never written costs a page-table walk).
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
    mem_digest_zero_pfn(bytes, page_size, &[])
}

/// [`mem_digest`] of memory nobody writes while this runs (a paused guest's, or a target's
/// not yet resumed): the same value, computed with less reading. Pages the
/// kernel maps to its zero page ([`dirtylog_host::zero_pfn_pages`], which first maps it
/// wherever nothing is mapped yet) are zeros without a scan; every other byte is read. A
/// never-written gibibyte costs a page-table walk instead of a read: the background check of
/// a 4 GiB guest with a 64 MiB working set took 33–45 ms instead of 149–201 (BENCHMARKS.md,
/// issue 9). If the kernel cannot tell, every page is read.
///
/// ```
/// use dirtylog_migrate::digest::{mem_digest, paused_digest};
///
/// let mut memory = vec![0u8; 16 * 4096];
/// memory[5 * 4096 + 7] = 1;
/// assert_eq!(paused_digest(&memory, 4096), mem_digest(&memory, 4096));
/// ```
pub fn paused_digest(bytes: &[u8], page_size: usize) -> u64 {
    mem_digest_zero_pfn(bytes, page_size, &zero_pfn_of(bytes, page_size))
}

/// The zero-page bits of `bytes`' pages ([`dirtylog_host::zero_pfn_pages`]); none if the
/// kernel cannot tell.
fn zero_pfn_of(bytes: &[u8], page_size: usize) -> Vec<u64> {
    let mut bits = vec![0u64; (bytes.len() / page_size.max(1)).div_ceil(64)];
    let known = dirtylog_host::zero_pfn_pages(
        bytes.as_ptr() as u64,
        bytes.len() as u64,
        page_size as u64,
        &mut bits,
    );
    if known.is_err() {
        bits.clear();
    }
    bits
}

/// [`mem_digest`] of a region of which the pages set in `zero_pfn` (bit `i` = page `i`; bits
/// past its end or missing count as clear) map the kernel's zero page
/// ([`dirtylog_host::zero_pfn_pages`]): their hash is the zero page's, without reading them.
/// The same value as `mem_digest` whenever those pages do read as zeros, which the kernel
/// guarantees while nobody writes the region. A write the tracker missed still shows: a
/// written page no longer maps the zero page.
fn mem_digest_zero_pfn(bytes: &[u8], page_size: usize, zero_pfn: &[u64]) -> u64 {
    let page = page_size.max(1);
    let n = bytes.len().div_ceil(page);
    let zero = zero_page_hash(page);
    // A zero page's hash is known: testing for zero reads the page as surely as hashing it
    // (a write nobody tracked still shows) and costs about half as much, and most of a
    // guest's memory is often zeros (the huge zero page, where it was never written).
    let hash = |i: usize| {
        let p = &bytes[i * page..((i + 1) * page).min(bytes.len())];
        if p.len() == page && (bit(zero_pfn, i) || crate::guestmem::is_zero_bytes(p)) {
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

/// Is bit `i` of `bits` set (bits past the end count as clear)?
fn bit(bits: &[u64], i: usize) -> bool {
    bits.get(i / 64).is_some_and(|w| w >> (i % 64) & 1 == 1)
}

/// Fewest pages a [`digest_sample`] reads (if the memory has them).
const SAMPLE_PAGES: usize = 64;

/// What [`digest_sample`] measured.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DigestSample {
    /// Bytes of memory digested for the sample.
    pub sampled: usize,
    /// The time [`paused_digest`] of all of the regions should take.
    pub estimate: Duration,
}

/// Time a [`paused_digest`] of all of `regions` (memory nobody writes meanwhile) by a sample.
/// The zero-page part ([`dirtylog_host::zero_pfn_pages`]: a page-table walk, which also maps
/// the zero page where nothing is mapped yet) runs over all of the memory, as the switchover's
/// digest does; what remains to read (every other page: a written zero page costs a scan, a
/// page of data a hash) is sampled, about `budget` bytes of it (at least [`SAMPLE_PAGES`]
/// pages) spread evenly over all of it, read on this thread, and its time scaled to all of it
/// and divided among [`std::thread::available_parallelism`] threads, as [`mem_digest`]
/// divides a large region. Regions no larger than `budget` in all are digested whole instead.
/// Sampling pages spread over memory prices each kind as often as the memory has it, where
/// the first `budget` bytes alone would price all memory like its start (a guest's data often
/// sits low: 4 GiB of mostly zeros was priced at 1.1 s, and digested in about 0.1 s); timing
/// slices of memory scaled by the whole scaled their fixed costs too (4 GiB, 98% never
/// written: 2.5–4 ms for 32 MiB, priced at 300–540 ms, digested in 33–45 ms).
pub(crate) fn digest_sample(regions: &[&[u8]], page_size: usize, budget: usize) -> DigestSample {
    let page = page_size.max(1);
    let total: usize = regions.iter().map(|r| r.len()).sum();
    let start = Instant::now();
    if total <= budget {
        for r in regions {
            std::hint::black_box(paused_digest(r, page));
        }
        return DigestSample {
            sampled: total,
            estimate: start.elapsed(),
        };
    }
    let zero_pfn: Vec<Vec<u64>> = regions.iter().map(|r| zero_pfn_of(r, page)).collect();
    let walk = start.elapsed();
    // zero_pfn_pages marks no bit past a region's pages.
    let to_read: usize = regions
        .iter()
        .zip(&zero_pfn)
        .map(|(r, bits)| {
            r.len().div_ceil(page) - bits.iter().map(|w| w.count_ones() as usize).sum::<usize>()
        })
        .sum();
    let want = (budget / page).max(SAMPLE_PAGES);
    let stride = (to_read / want).max(1);
    let (mut seen, mut taken, mut sampled) = (0usize, 0usize, 0usize);
    let t = Instant::now();
    'sample: for (r, bits) in regions.iter().zip(&zero_pfn) {
        for i in 0..r.len().div_ceil(page) {
            if taken == want {
                break 'sample;
            }
            if bit(bits, i) {
                continue;
            }
            seen += 1;
            if (seen - 1) % stride != 0 {
                continue;
            }
            let p = &r[i * page..((i + 1) * page).min(r.len())];
            let zero = p.len() == page && crate::guestmem::is_zero_bytes(p);
            std::hint::black_box(zero || mem_hash(p) != 0);
            taken += 1;
            sampled += p.len();
        }
    }
    let read = t.elapsed();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let scale = to_read as f64 / taken.max(1) as f64 / threads as f64;
    DigestSample {
        sampled,
        estimate: walk + read.mul_f64(scale),
    }
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
        // Heap memory is not page-aligned: no page is known zero, every page is to read.
        let (a, b) = (vec![0u8; 10 << 20], vec![0u8; 30 << 20]);
        // 1024 of the 10240 pages, every tenth, a quarter of them in `a`.
        assert_eq!(digest_sample(&[&a, &b], page, 4 << 20).sampled, 4 << 20);
        // Smaller than the budget: every byte.
        assert_eq!(
            digest_sample(&[&a[..5 * page], &b[..3]], page, 1 << 20).sampled,
            5 * page + 3
        );
        // A budget under SAMPLE_PAGES pages still reads that many, never more than there is.
        assert_eq!(digest_sample(&[&a], page, 100).sampled, 64 * page);
        assert_eq!(
            digest_sample(&[&a[..page / 2]], page, 100).sampled,
            page / 2
        );
        assert_eq!(digest_sample(&[], page, 1 << 20).sampled, 0);
    }

    #[test]
    fn zero_page_pages_are_neither_read_nor_sampled() {
        use dirtylog_host::{HostBacking, HostMemory};
        let page = 4096;
        let mem = HostMemory::new(512 * 4096, HostBacking::Anonymous).unwrap();
        for (p, v) in [(0, 7u8), (100, 0), (300, 9), (511, 1)] {
            // SAFETY: our own fresh mapping; nothing else uses it.
            unsafe { mem.as_ptr().add(p * page + 17).write_volatile(v) };
        }
        // SAFETY: nothing writes the mapping while the slice lives.
        let bytes = unsafe { std::slice::from_raw_parts(mem.as_ptr(), mem.len() as usize) };
        // The same digest as reading every byte (page 100 was written with zeros: a page of
        // its own, scanned), and a write after it shows.
        assert_eq!(paused_digest(bytes, page), mem_digest(bytes, page));
        let before = paused_digest(bytes, page);
        // SAFETY: as above; no slice of ours is read while this writes.
        unsafe { mem.as_ptr().add(200 * page).write_volatile(3) };
        // SAFETY: as above.
        let bytes = unsafe { std::slice::from_raw_parts(mem.as_ptr(), mem.len() as usize) };
        assert_ne!(paused_digest(bytes, page), before);
        assert_eq!(paused_digest(bytes, page), mem_digest(bytes, page));
        // Only the five written pages are to read, all of them sampled.
        assert_eq!(digest_sample(&[bytes], page, 2 * page).sampled, 5 * page);
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
