//! How fast is memory being dirtied? QEMU's `calc-dirty-rate`, with its three methods and
//! names (`migration/dirtyrate.c`), over any memory and any [`DirtyTracker`].
//!
//! | mode | how | cost | tells |
//! |---|---|---|---|
//! | [`page-sampling`](DirtyRateMode::PageSampling) | hash `sample-pages` random 4 KiB pages per GiB, wait `calc-time`, hash them again; the share that changed, times the memory, over the time | two hash passes over the sample (a few hundred pages per GiB): no tracking, no write faults, works on any memory | the whole memory, an estimate (a binomial sample: ±2·√(p(1-p)/n) of the dirty share p with n samples) |
//! | [`dirty-bitmap`](DirtyRateMode::DirtyBitmap) | start the dirty log, sync once, wait `calc-time`, sync again and count the set bits | every first write in the window takes a write fault (KVM write-protects the memory); one bitmap harvest per sync | exact distinct pages of the whole memory |
//! | [`dirty-ring`](DirtyRateMode::DirtyRing) | per-vCPU dirty rings: the entries each vCPU's ring received over `calc-time` | a write fault per first write after each ring reset, and the reaper's harvests | each vCPU's rate (QEMU's `vcpu-dirty-rate`), their sum the VM's |
//!
//! All three count a page once however often it is written in the window (the ring: once
//! per reset of the ring, so a page rewritten after the reaper reset the ring counts again),
//! so a guest rewriting a small working set saturates at the working set: see
//! [`expected_dirty_pages`].
//!
//! Every measurement calls an [`Observer`] when its window opens and closes (a VMM reads its
//! guest's own counters there, the CLI its progress bar), and about every 100 ms while waiting.
//! [`Writers`] dirty process memory at a known rate, as the test guest does guest memory, so
//! that the estimates on host memory can be checked the same way.

use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dirtylog::{DirtyTracker, TrackerError, TrackerKind};
use dirtylog_migrate::digest::mem_hash;
use rand::rngs::SmallRng;
use rand::SeedableRng;
use serde::Serialize;

use crate::GuestMemory;

/// Sampled pages per GiB unless told (QEMU's `DIRTYRATE_DEFAULT_SAMPLE_PAGES`).
pub const DEFAULT_SAMPLE_PAGES: u64 = 512;
/// `sample-pages` QEMU accepts (`MIN_SAMPLE_PAGE_COUNT`..=`MAX_SAMPLE_PAGE_COUNT`): at most
/// 1/16 of the pages of a GiB.
pub const SAMPLE_PAGES: RangeInclusive<u64> = 128..=16384;
/// `calc-time` in milliseconds QEMU accepts (`MIN_CALC_TIME_MS`..=`MAX_CALC_TIME_MS`).
pub const CALC_TIME_MS: RangeInclusive<u64> = 50..=60_000;
/// The unit page sampling hashes, whatever the memory's page size (QEMU's target page).
pub const SAMPLE_PAGE_SIZE: u64 = 4096;

const GIB: u64 = 1 << 30;
const TICK: Duration = Duration::from_millis(100);

/// QEMU's `DirtyRateMeasureMode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DirtyRateMode {
    /// Hash a sample of pages, compare after the window.
    PageSampling,
    /// The dirty log of the whole memory: one sync at the start, one at the end.
    DirtyBitmap,
    /// Per-vCPU dirty rings: each vCPU's entries over the window.
    DirtyRing,
}

impl DirtyRateMode {
    /// Every mode, in QEMU's order.
    pub const ALL: [DirtyRateMode; 3] = [
        DirtyRateMode::PageSampling,
        DirtyRateMode::DirtyBitmap,
        DirtyRateMode::DirtyRing,
    ];
}

impl std::str::FromStr for DirtyRateMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "page-sampling" => Ok(DirtyRateMode::PageSampling),
            "dirty-bitmap" => Ok(DirtyRateMode::DirtyBitmap),
            "dirty-ring" => Ok(DirtyRateMode::DirtyRing),
            _ => Err(format!(
                "unknown mode {s:?}: use page-sampling, dirty-bitmap or dirty-ring"
            )),
        }
    }
}

impl std::fmt::Display for DirtyRateMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DirtyRateMode::PageSampling => "page-sampling",
            DirtyRateMode::DirtyBitmap => "dirty-bitmap",
            DirtyRateMode::DirtyRing => "dirty-ring",
        })
    }
}

/// Memory page sampling can read while others write it.
pub trait SampledMemory: Sync {
    /// Bytes of the memory (sampled in [`SAMPLE_PAGE_SIZE`] units; a partial last unit is not
    /// sampled).
    fn len(&self) -> u64;
    /// Whether the memory is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copy `out.len()` bytes from `offset` (both multiples of 8, inside the memory), with
    /// reads that are well defined while other threads or a guest write the memory (a torn
    /// copy only makes the page look changed, which it is).
    fn read(&self, offset: u64, out: &mut [u8]);
}

impl SampledMemory for GuestMemory {
    fn len(&self) -> u64 {
        GuestMemory::len(self) as u64
    }

    fn read(&self, offset: u64, out: &mut [u8]) {
        for (i, chunk) in out.chunks_exact_mut(8).enumerate() {
            let w = self
                .atomic_u64(offset + 8 * i as u64)
                .load(Ordering::Relaxed);
            chunk.copy_from_slice(&w.to_ne_bytes());
        }
    }
}

/// Memory seen as shared words (process memory that writer threads write with atomics).
#[derive(Clone, Copy, Debug)]
pub struct AtomicWords<'a>(pub &'a [AtomicU64]);

impl SampledMemory for AtomicWords<'_> {
    fn len(&self) -> u64 {
        self.0.len() as u64 * 8
    }

    fn read(&self, offset: u64, out: &mut [u8]) {
        let first = usize::try_from(offset / 8).unwrap_or(usize::MAX);
        let words = self.0.get(first..).unwrap_or_default();
        assert!(
            offset % 8 == 0 && out.len() % 8 == 0 && words.len() * 8 >= out.len(),
            "read of {}+{offset:#x} outside {} bytes of words or unaligned",
            out.len(),
            self.len()
        );
        for (chunk, w) in out.chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&w.load(Ordering::Relaxed).to_ne_bytes());
        }
    }
}

/// A region of a [`DirtyTracker`] to count: its index in the tracker and its pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrackedRegion {
    /// The tracker's region index.
    pub index: usize,
    /// Pages of the region.
    pub npages: u64,
}

/// Told about the measurement window (the guest's own counters are read here, so that they
/// cover the same window as the estimate).
pub trait Observer {
    /// The window opened: the first hashes are taken, the log synced, the rings read.
    fn opened(&mut self) {}
    /// While waiting, about every 100 ms: time since the window opened, and the whole window.
    fn waiting(&mut self, _elapsed: Duration, _calc_time: Duration) {}
    /// The window is about to close (the second hashes, sync or ring read come next).
    fn closing(&mut self) {}
}

/// An observer that wants to hear nothing.
impl Observer for () {}

/// What page sampling looked at (QEMU's `SampleVMStat`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SampleStats {
    /// Sampled pages per GiB asked for.
    pub sample_pages: u64,
    /// Pages hashed (QEMU's `total-sample-count`).
    pub sampled: u64,
    /// Sampled pages whose hash changed (`total-dirty-samples`).
    pub dirty_samples: u64,
}

/// One measurement (QEMU's `DirtyRateStat`).
#[derive(Clone, Debug, PartialEq)]
pub struct DirtyRate {
    /// How it was measured.
    pub mode: DirtyRateMode,
    /// The window actually measured (from the first read to the last).
    pub calc_time: Duration,
    /// Bytes of the pages counted ([`SAMPLE_PAGE_SIZE`] for sampling, else the tracker's).
    pub page_size: u64,
    /// Pages of the memory measured.
    pub total_pages: u64,
    /// Pages dirtied in the window: estimated from the sample, counted in the log, or the
    /// rings' entries (summed over vCPUs).
    pub dirty_pages: u64,
    /// Page sampling's sample.
    pub sample: Option<SampleStats>,
    /// Dirty ring: each vCPU's entries in the window.
    pub vcpu_dirty_pages: Option<Vec<u64>>,
}

impl DirtyRate {
    /// Dirty pages per second.
    pub fn pages_per_second(&self) -> f64 {
        per_second(self.dirty_pages, self.calc_time)
    }

    /// Dirty MiB per second.
    pub fn mib_per_second(&self) -> f64 {
        self.pages_per_second() * self.page_size as f64 / (1u64 << 20) as f64
    }

    /// Each vCPU's dirty pages per second (dirty ring only).
    pub fn vcpu_pages_per_second(&self) -> Option<Vec<f64>> {
        self.vcpu_dirty_pages
            .as_ref()
            .map(|v| v.iter().map(|&p| per_second(p, self.calc_time)).collect())
    }
}

/// `count` per second over `t` (0 over no time).
pub fn per_second(count: u64, t: Duration) -> f64 {
    let s = t.as_secs_f64();
    if s > 0.0 {
        count as f64 / s
    } else {
        0.0
    }
}

/// Distinct pages one writer dirties with `writes` page writes over its share of
/// `share_pages` pages: a sweep dirties `min(writes, share)`; uniformly random pages dirty
/// `share·(1 − (1 − 1/share)^writes)` on average. What page sampling and the dirty bitmap
/// should find for a test guest's vCPU (the ring counts a page again after each reset of its
/// ring, so with a share larger than half the ring it sees every write).
pub fn expected_dirty_pages(writes: u64, share_pages: u64, random: bool) -> f64 {
    if share_pages == 0 {
        return 0.0;
    }
    let share = share_pages as f64;
    if random {
        share * (1.0 - (1.0 - 1.0 / share).powf(writes as f64))
    } else {
        writes.min(share_pages) as f64
    }
}

/// Wait until `calc_time` after `t0`, telling `obs` about every [`TICK`].
fn wait_out(t0: Instant, calc_time: Duration, obs: &mut dyn Observer) {
    loop {
        let elapsed = t0.elapsed();
        if elapsed >= calc_time {
            break;
        }
        obs.waiting(elapsed, calc_time);
        std::thread::sleep((calc_time - elapsed).min(TICK));
    }
    obs.waiting(calc_time, calc_time);
}

/// Open the window (telling `obs`), wait `calc_time`, close it. Returns its length.
fn window(calc_time: Duration, obs: &mut dyn Observer) -> Duration {
    obs.opened();
    let t0 = Instant::now();
    wait_out(t0, calc_time, obs);
    obs.closing();
    t0.elapsed()
}

/// Sample units picked in one region: `(region, unit)` pairs.
fn pick(regions: &[&dyn SampledMemory], sample_pages: u64, seed: u64) -> Vec<(usize, u64)> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut picked = Vec::new();
    for (r, mem) in regions.iter().enumerate() {
        let units = mem.len() / SAMPLE_PAGE_SIZE;
        if units == 0 {
            continue;
        }
        // Pages per GiB, rounded up, at least one, at most every page.
        let want = (u128::from(sample_pages) * u128::from(mem.len())).div_ceil(u128::from(GIB));
        let n = u64::try_from(want).unwrap_or(u64::MAX).clamp(1, units);
        // `units` fits in usize: the memory is mapped in this address space.
        let units_usize = usize::try_from(units).unwrap_or(usize::MAX);
        let n_usize = usize::try_from(n).unwrap_or(units_usize);
        let mut idx: Vec<u64> = rand::seq::index::sample(&mut rng, units_usize, n_usize)
            .into_iter()
            .map(|i| i as u64)
            .collect();
        // In address order: the second pass then reads memory in the same order as the first.
        idx.sort_unstable();
        picked.extend(idx.into_iter().map(|u| (r, u)));
    }
    picked
}

/// Hash the picked pages into `out`, with when each was hashed; `midway` runs halfway.
fn hash_all(
    regions: &[&dyn SampledMemory],
    picked: &[(usize, u64)],
    out: &mut Vec<(u64, Instant)>,
    midway: &mut dyn FnMut(),
) {
    let mut buf = vec![0u8; SAMPLE_PAGE_SIZE as usize];
    out.clear();
    for (k, &(r, u)) in picked.iter().enumerate() {
        if k == picked.len() / 2 {
            midway();
        }
        regions[r].read(u * SAMPLE_PAGE_SIZE, &mut buf);
        out.push((mem_hash(&buf), Instant::now()));
    }
    if picked.is_empty() {
        midway();
    }
}

/// Page sampling (QEMU's `page-sampling`): hash `sample_pages` random 4 KiB pages per GiB of
/// each region (at least one per region, chosen from `seed`), wait `calc_time`, hash them
/// again. The dirty pages are the share that changed times each region's pages. No tracking:
/// works on any memory. The second pass starts `calc_time` after the first; the window
/// ([`DirtyRate::calc_time`]) is the mean time between a page's two hashes (`calc_time`
/// when both passes read as fast; a large sample in an unoptimised build takes a good part of
/// a second per pass), and `obs` hears of it opening and closing halfway through each pass.
pub fn page_sampling(
    regions: &[&dyn SampledMemory],
    sample_pages: u64,
    calc_time: Duration,
    seed: u64,
    obs: &mut dyn Observer,
) -> DirtyRate {
    let picked = pick(regions, sample_pages, seed);
    let (mut before, mut after) = (Vec::new(), Vec::new());
    hash_all(regions, &picked, &mut before, &mut || obs.opened());
    // The wait starts once every sample has been read, as QEMU sleeps after its first pass:
    // so each sample's two readings are at least `calc_time` apart, however long a pass takes
    // (from the first reading, a slow first pass ate into the window: 48 ms of 50 seen in CI).
    let t0 = Instant::now();
    wait_out(t0, calc_time, obs);
    hash_all(regions, &picked, &mut after, &mut || obs.closing());
    let between: Duration = before
        .iter()
        .zip(&after)
        .map(|(b, a)| a.1.saturating_duration_since(b.1))
        .sum();
    let elapsed = between / u32::try_from(picked.len().max(1)).unwrap_or(u32::MAX);
    // Per region: the share of its sample that changed, times its pages.
    let mut dirty = 0f64;
    let mut dirty_samples = 0;
    for (r, mem) in regions.iter().enumerate() {
        let units = mem.len() / SAMPLE_PAGE_SIZE;
        let (mut n, mut d) = (0u64, 0u64);
        for ((&(pr, _), b), a) in picked.iter().zip(&before).zip(&after) {
            if pr == r {
                n += 1;
                d += u64::from(a.0 != b.0);
            }
        }
        dirty_samples += d;
        if n > 0 {
            dirty += d as f64 / n as f64 * units as f64;
        }
    }
    DirtyRate {
        mode: DirtyRateMode::PageSampling,
        calc_time: elapsed,
        page_size: SAMPLE_PAGE_SIZE,
        total_pages: regions.iter().map(|m| m.len() / SAMPLE_PAGE_SIZE).sum(),
        dirty_pages: dirty.round() as u64,
        sample: Some(SampleStats {
            sample_pages,
            sampled: picked.len() as u64,
            dirty_samples,
        }),
        vcpu_dirty_pages: None,
    }
}

/// Harvest `regions` of `tracker` into `bufs` (zeroed first) and re-arm what was harvested
/// (`clear`, a no-op for trackers that re-arm on harvest): QEMU's log sync.
fn sync<T: DirtyTracker + ?Sized>(
    tracker: &T,
    regions: &[TrackedRegion],
    bufs: &mut [Vec<u64>],
) -> Result<(), TrackerError> {
    for (r, buf) in regions.iter().zip(bufs.iter_mut()) {
        buf.iter_mut().for_each(|w| *w = 0);
        tracker.harvest(r.index, buf)?;
        if tracker.kind() == TrackerKind::ClearLog {
            for (i, chunk) in buf.chunks(1 << 14).enumerate() {
                tracker.clear(r.index, i as u64 * (1 << 20), chunk)?;
            }
        }
    }
    Ok(())
}

/// Run `f` between the tracker's `start` and `stop`; `stop` runs whatever `f` returns, and its
/// error is reported only when `f` succeeded.
fn tracking<T: DirtyTracker + ?Sized, R>(
    tracker: &T,
    f: impl FnOnce() -> Result<R, TrackerError>,
) -> Result<R, TrackerError> {
    tracker.start()?;
    let r = f();
    let s = tracker.stop();
    let r = r?;
    s?;
    Ok(r)
}

fn buffers(regions: &[TrackedRegion]) -> Vec<Vec<u64>> {
    regions
        .iter()
        .map(|r| vec![0u64; r.npages.div_ceil(64) as usize])
        .collect()
}

/// Dirty bitmap (QEMU's `dirty-bitmap`): start `tracker` (not started yet; it is stopped
/// again at the end), sync once to start from a clean log (a manual-protect tracker with
/// initially-set reports every page at first), wait `calc_time`, sync again and count the
/// pages of `regions` set. Any bitmap tracker, or a ring tracker (its rings harvested into
/// the bitmap).
pub fn dirty_bitmap<T: DirtyTracker + ?Sized>(
    tracker: &T,
    regions: &[TrackedRegion],
    page_size: u64,
    calc_time: Duration,
    obs: &mut dyn Observer,
) -> Result<DirtyRate, TrackerError> {
    let mut bufs = buffers(regions);
    tracking(tracker, || {
        sync(tracker, regions, &mut bufs)?;
        let elapsed = window(calc_time, obs);
        sync(tracker, regions, &mut bufs)?;
        let dirty = bufs
            .iter()
            .flatten()
            .map(|w| u64::from(w.count_ones()))
            .sum();
        Ok(DirtyRate {
            mode: DirtyRateMode::DirtyBitmap,
            calc_time: elapsed,
            page_size,
            total_pages: regions.iter().map(|r| r.npages).sum(),
            dirty_pages: dirty,
            sample: None,
            vcpu_dirty_pages: None,
        })
    })
}

/// Dirty ring (QEMU's `dirty-ring`): start `tracker` (a ring tracker, not started yet;
/// stopped again at the end), sync once, read each vCPU's count of entries its ring has
/// received (`pushed`: wrapping counters, one per vCPU, as
/// [`KvmSource::dirty_ring_pushed`](crate::migrate::KvmSource::dirty_ring_pushed)), wait
/// `calc_time`, read them again. Each vCPU's dirty pages are its entries in the window, the
/// VM's their sum. `regions` are synced at both ends (the ring tracker's harvest resets the
/// rings) and give the total pages.
pub fn dirty_ring<T: DirtyTracker + ?Sized>(
    tracker: &T,
    pushed: &dyn Fn() -> Vec<u32>,
    regions: &[TrackedRegion],
    page_size: u64,
    calc_time: Duration,
    obs: &mut dyn Observer,
) -> Result<DirtyRate, TrackerError> {
    if tracker.kind().ring_entries().is_none() {
        return Err(format!(
            "the dirty-ring mode needs a ring tracker, not {}",
            tracker.kind()
        )
        .into());
    }
    let mut bufs = buffers(regions);
    tracking(tracker, || {
        sync(tracker, regions, &mut bufs)?;
        let p0 = pushed();
        let elapsed = window(calc_time, obs);
        let p1 = pushed();
        sync(tracker, regions, &mut bufs)?;
        if p0.len() != p1.len() || p0.is_empty() {
            return Err(format!(
                "ring counters of {} vCPUs, then of {}: no rings to read",
                p0.len(),
                p1.len()
            )
            .into());
        }
        let vcpus: Vec<u64> = p0
            .iter()
            .zip(&p1)
            .map(|(a, b)| u64::from(b.wrapping_sub(*a)))
            .collect();
        Ok(DirtyRate {
            mode: DirtyRateMode::DirtyRing,
            calc_time: elapsed,
            page_size,
            total_pages: regions.iter().map(|r| r.npages).sum(),
            dirty_pages: vcpus.iter().sum(),
            sample: None,
            vcpu_dirty_pages: Some(vcpus),
        })
    })
}

/// Stores a value into a word of the memory the [`Writers`] dirty (word index, value).
pub type StoreWord = Arc<dyn Fn(usize, u64) + Send + Sync>;

/// Threads that dirty process memory at a known rate, as the test guest's vCPUs do guest
/// memory: thread `i` of `n` writes a fresh value into the first word of pages of its share
/// (`working_set_pages / n` pages from page `npages·i/n`), sweeping it or at random, at `rate`
/// pages per second (`None`: as fast as it runs; `Some(0)`: idle), and counts its writes.
#[derive(Debug)]
pub struct Writers {
    stop: Arc<AtomicBool>,
    counts: Arc<Vec<AtomicU64>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// What [`Writers::spawn`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriterConfig {
    /// Pages of the memory.
    pub npages: u64,
    /// Bytes of a page (the first word of a page is written).
    pub page_size: u64,
    /// Writer threads, at least 1.
    pub threads: u32,
    /// Pages each thread writes per second; `None` for as fast as it runs.
    pub rate: Option<u64>,
    /// Pages of all shares together (at least one per thread, at most `npages`).
    pub working_set_pages: u64,
    /// Random pages of each share rather than a sweep.
    pub random: bool,
    /// Seed of the random pages.
    pub seed: u64,
}

impl Writers {
    /// Start the threads, writing through `store`. Errors: a configuration the memory cannot
    /// hold, or a thread that cannot be spawned (the others are stopped).
    pub fn spawn(cfg: WriterConfig, store: StoreWord) -> std::io::Result<Self> {
        let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
        let n = u64::from(cfg.threads);
        if n == 0 || cfg.working_set_pages < n || cfg.working_set_pages > cfg.npages {
            return Err(bad(format!(
                "{} writer threads over {} of {} pages: at least a page per thread, at most \
                 the memory",
                cfg.threads, cfg.working_set_pages, cfg.npages
            )));
        }
        if cfg.page_size < 8 || cfg.page_size % 8 != 0 {
            return Err(bad(format!("page size {}", cfg.page_size)));
        }
        let mut w = Writers {
            stop: Arc::new(AtomicBool::new(false)),
            counts: Arc::new((0..n).map(|_| AtomicU64::new(0)).collect()),
            threads: Vec::new(),
        };
        let share = cfg.working_set_pages / n;
        for i in 0..n {
            let first = cfg.npages * i / n;
            let (stop, counts, store) = (w.stop.clone(), w.counts.clone(), store.clone());
            let words_per_page = cfg.page_size / 8;
            let mut rng = SmallRng::seed_from_u64(cfg.seed.wrapping_add(i));
            let body = move || {
                let t0 = Instant::now();
                let mut done = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if let Some(r) = cfg.rate {
                        let allowed = u128::from(r) * t0.elapsed().as_nanos() / 1_000_000_000;
                        if u128::from(done) >= allowed {
                            std::thread::sleep(Duration::from_millis(1));
                            continue;
                        }
                    }
                    let k = if cfg.random {
                        rand::Rng::random_range(&mut rng, 0..share)
                    } else {
                        done % share
                    };
                    let word = (first + k) * words_per_page;
                    // A value never written before: the thread and its write serial.
                    store(word as usize, (i << 56) | (done + 1));
                    done += 1;
                    counts[i as usize].store(done, Ordering::Relaxed);
                }
            };
            match std::thread::Builder::new()
                .name(format!("dirty-rate-writer-{i}"))
                .spawn(body)
            {
                Ok(t) => w.threads.push(t),
                Err(e) => {
                    w.stop_threads();
                    return Err(e);
                }
            }
        }
        Ok(w)
    }

    /// Each thread's writes so far.
    pub fn writes(&self) -> Vec<u64> {
        self.counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Stop the threads; each one's writes in all.
    pub fn finish(mut self) -> Vec<u64> {
        self.stop_threads();
        self.writes()
    }

    fn stop_threads(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Writers {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_round_trip() {
        for m in DirtyRateMode::ALL {
            assert_eq!(m.to_string().parse::<DirtyRateMode>(), Ok(m));
        }
        assert!("sampling".parse::<DirtyRateMode>().is_err());
    }

    #[test]
    fn expected_pages() {
        assert_eq!(expected_dirty_pages(100, 1000, false), 100.0);
        assert_eq!(expected_dirty_pages(5000, 1000, false), 1000.0);
        let r = expected_dirty_pages(1000, 1000, true);
        assert!((r - 1000.0 * (1.0 - (-1.0f64).exp())).abs() < 1.0, "{r}");
        assert_eq!(expected_dirty_pages(10, 0, true), 0.0);
    }

    #[test]
    fn picks_per_gib_at_least_one_at_most_all() {
        let big: Vec<AtomicU64> = (0..(8 << 20) / 8).map(|_| AtomicU64::new(0)).collect();
        let small: Vec<AtomicU64> = (0..1024).map(|_| AtomicU64::new(0)).collect();
        let (b, s) = (AtomicWords(&big), AtomicWords(&small));
        let regions: [&dyn SampledMemory; 2] = [&b, &s];
        let p = pick(&regions, 16384, 7);
        // 8 MiB at 16384 per GiB: 128 pages; 8 KiB: 1 (rounded up), distinct and in order.
        assert_eq!(p.iter().filter(|x| x.0 == 0).count(), 128);
        assert_eq!(p.iter().filter(|x| x.0 == 1).count(), 1);
        assert!(p.windows(2).all(|w| w[0] < w[1]));
        assert!(p
            .iter()
            .all(|&(r, u)| u < regions[r].len() / SAMPLE_PAGE_SIZE));
    }

    /// Writers dirty a known share of the memory while sampling waits: the estimate finds it.
    #[test]
    fn sampling_finds_a_known_share() {
        let pages = 4096u64;
        let mem: Arc<Vec<AtomicU64>> =
            Arc::new((0..pages * 512).map(|_| AtomicU64::new(0)).collect());
        struct WriteQuarter(Arc<Vec<AtomicU64>>, bool);
        impl Observer for WriteQuarter {
            // Between the passes, once.
            fn waiting(&mut self, _: Duration, _: Duration) {
                if std::mem::replace(&mut self.1, true) {
                    return;
                }
                // Every fourth page, one word each.
                for p in (0..self.0.len() / 512).step_by(4) {
                    self.0[p * 512 + 3].fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let words = AtomicWords(&mem);
        let r = page_sampling(
            &[&words],
            16384,
            Duration::from_millis(50),
            1,
            &mut WriteQuarter(mem.clone(), false),
        );
        let s = r.sample.unwrap();
        // 16 MiB at 16384 per GiB: 256 samples; a quarter dirty, within 4 standard deviations.
        assert_eq!(s.sampled, 256);
        let share = s.dirty_samples as f64 / s.sampled as f64;
        assert!(
            (share - 0.25).abs() < 4.0 * (0.25f64 * 0.75 / 256.0).sqrt(),
            "{share}"
        );
        assert_eq!(r.total_pages, pages);
        assert!(r.calc_time >= Duration::from_millis(50));
        let est = r.dirty_pages as f64 / 1024.0;
        assert!((est - 1.0).abs() < 0.3, "{est}");
    }

    /// Nothing written: nothing dirty, whatever the sample.
    #[test]
    fn sampling_idle_memory_is_clean() {
        let mem: Vec<AtomicU64> = (0..512 * 64).map(AtomicU64::new).collect();
        let r = page_sampling(
            &[&AtomicWords(&mem)],
            128,
            Duration::from_millis(50),
            3,
            &mut (),
        );
        assert_eq!(r.dirty_pages, 0);
        assert_eq!(r.sample.unwrap().sampled, 1);
        assert_eq!(r.pages_per_second(), 0.0);
    }

    /// A manual-protect tracker over one region that reports every page at first (initially
    /// set) and then what the test marks; it counts starts, stops and clears.
    struct FakeTracker {
        kind: TrackerKind,
        bits: std::sync::Mutex<Vec<u64>>,
        calls: std::sync::Mutex<Vec<&'static str>>,
    }

    impl FakeTracker {
        fn new(kind: TrackerKind, npages: u64) -> Self {
            FakeTracker {
                kind,
                bits: std::sync::Mutex::new(vec![u64::MAX; npages.div_ceil(64) as usize]),
                calls: Default::default(),
            }
        }
    }

    impl DirtyTracker for FakeTracker {
        fn kind(&self) -> TrackerKind {
            self.kind
        }
        fn start(&self) -> Result<(), TrackerError> {
            self.calls.lock().unwrap().push("start");
            Ok(())
        }
        fn harvest(&self, index: usize, out: &mut [u64]) -> Result<(), TrackerError> {
            assert_eq!(index, 3);
            let mut b = self.bits.lock().unwrap();
            for (o, w) in out.iter_mut().zip(b.iter_mut()) {
                *o |= *w;
                if self.kind != TrackerKind::ClearLog {
                    *w = 0;
                }
            }
            Ok(())
        }
        fn clear(&self, _: usize, first_page: u64, bits: &[u64]) -> Result<(), TrackerError> {
            self.calls.lock().unwrap().push("clear");
            let mut b = self.bits.lock().unwrap();
            for (i, w) in bits.iter().enumerate() {
                b[(first_page / 64) as usize + i] &= !w;
            }
            Ok(())
        }
        fn stop(&self) -> Result<(), TrackerError> {
            self.calls.lock().unwrap().push("stop");
            Ok(())
        }
    }

    struct Mark<'a>(&'a FakeTracker, u64);
    impl Observer for Mark<'_> {
        fn closing(&mut self) {
            self.0.bits.lock().unwrap()[0] = (1 << self.1) - 1;
        }
    }

    /// The first sync clears an initially-set log; the count is what was written in the
    /// window; the tracker is started and stopped once.
    #[test]
    fn bitmap_counts_only_the_window() {
        let t = FakeTracker::new(TrackerKind::ClearLog, 1000);
        let regions = [TrackedRegion {
            index: 3,
            npages: 1000,
        }];
        let r = dirty_bitmap(
            &t,
            &regions,
            4096,
            Duration::from_millis(50),
            &mut Mark(&t, 10),
        )
        .unwrap();
        assert_eq!(r.dirty_pages, 10);
        assert_eq!(r.total_pages, 1000);
        assert!(r.calc_time >= Duration::from_millis(50));
        let calls = t.calls.lock().unwrap().clone();
        assert_eq!(calls.first(), Some(&"start"));
        assert_eq!(calls.last(), Some(&"stop"));
        assert!(calls.contains(&"clear"));
    }

    /// Per-vCPU entries are the counters' differences, across a wrap of the u32 counter; a
    /// bitmap tracker is refused.
    #[test]
    fn ring_counts_entries_per_vcpu() {
        let t = FakeTracker::new(TrackerKind::Ring { entries: 1024 }, 64);
        let regions = [TrackedRegion {
            index: 3,
            npages: 64,
        }];
        let reads = std::cell::Cell::new(0);
        let pushed = || {
            reads.set(reads.get() + 1);
            if reads.get() == 1 {
                vec![u32::MAX - 4, 100]
            } else {
                vec![5, 350]
            }
        };
        let r = dirty_ring(
            &t,
            &pushed,
            &regions,
            4096,
            Duration::from_millis(50),
            &mut (),
        )
        .unwrap();
        assert_eq!(r.vcpu_dirty_pages, Some(vec![10, 250]));
        assert_eq!(r.dirty_pages, 260);
        let bitmap = FakeTracker::new(TrackerKind::DirtyLog, 64);
        let e = dirty_ring(
            &bitmap,
            &pushed,
            &regions,
            4096,
            Duration::from_millis(50),
            &mut (),
        );
        assert!(e.unwrap_err().to_string().contains("ring tracker"));
    }

    /// Writers at a rate over a big working set: every write a new page, counted, and the
    /// sampled estimate over the writers' window matches their count.
    #[test]
    fn writers_write_what_they_count() {
        let npages = 4096u64;
        let mem: Arc<Vec<AtomicU64>> =
            Arc::new((0..npages * 512).map(|_| AtomicU64::new(0)).collect());
        let m = mem.clone();
        let store: StoreWord = Arc::new(move |i, v| m[i].store(v, Ordering::Relaxed));
        let cfg = WriterConfig {
            npages,
            page_size: 4096,
            threads: 2,
            rate: Some(1000),
            working_set_pages: npages,
            random: false,
            seed: 1,
        };
        let t0 = Instant::now();
        let w = Writers::spawn(cfg, store.clone()).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let counts = w.finish();
        let elapsed = t0.elapsed().as_secs_f64();
        let written = mem
            .iter()
            .filter(|x| x.load(Ordering::Relaxed) != 0)
            .count() as u64;
        // Each write a page of its own (2048 per share), as counted; within the pacing.
        let total: u64 = counts.iter().sum();
        assert_eq!(written, total, "{counts:?}");
        assert!(counts.iter().all(|&c| c > 0), "{counts:?}");
        assert!(
            total as f64 <= 2.0 * 1000.0 * elapsed + 2.0,
            "{total} in {elapsed} s"
        );
        assert!(
            Writers::spawn(WriterConfig { threads: 0, ..cfg }, store.clone()).is_err(),
            "no threads"
        );
        assert!(Writers::spawn(
            WriterConfig {
                working_set_pages: npages + 1,
                ..cfg
            },
            store
        )
        .is_err());
    }
}
