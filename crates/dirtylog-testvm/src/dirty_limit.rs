//! The dirty limit of a migration source (the demo's [`KvmSource`](crate::migrate::KvmSource)
//! and the [`Pc`](crate::pc::Pc)): QEMU 8.1's dirty-limit (`set-vcpu-dirty-limit`,
//! `query-vcpu-dirty-limit`), a cap on each vCPU's dirty rate enforced from the dirty ring.
//!
//! A controller thread ([`DirtyLimiter`]) reads every [`DIRTY_LIMIT_SAMPLE`] how many entries
//! KVM has pushed into each vCPU's ring ([`ring_entries_pushed`]: the entries harvested so far
//! plus those published and not yet harvested, so the count does not depend on when the
//! reaper or the engine harvest), takes each vCPU's rate over the last [`DIRTY_LIMIT_WINDOW`]
//! (sliding), and sets that vCPU's own throttle ([`VcpuThrottle`]: the share of every 10 ms it
//! is held out of `KVM_RUN`) with a feedback step ([`next_throttle`]): a vCPU above the limit
//! is held longer, a throttled one below it shorter, and a vCPU that never exceeded the limit
//! is never held (nor kicked). After changing a vCPU's throttle it waits one window, so that
//! the next rate is measured wholly under the new throttle.
//!
//! **The rate is ring entries per second.** KVM pushes one entry per page the first time it is
//! written after being write-protected, so on most hosts entries/s is the dirty-page rate. On
//! this project's PVM host every guest *write* to a write-protected page pushes an entry (see
//! the [`runner`](crate::runner) module docs), so entries/s is the guest's write rate there,
//! which for the dirtier (one write per page, sweeping) is also its page rate.
//!
//! The throttle cannot hold a vCPU more than 99% of the time
//! ([`MAX_VCPU_THROTTLE_PERMILLE`]): a limit below about 1% of a vCPU's free rate is not
//! reached, only approached.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dirtylog::ring::KVM_DIRTY_GFN_F_MASK;
use dirtylog::sync::lock;
use dirtylog_kvm::{ring::RingWatch, KvmDirtyTracker};

use crate::runner::{VcpuThrottle, MAX_VCPU_THROTTLE_PERMILLE};

/// How often the controller reads the rings.
pub const DIRTY_LIMIT_SAMPLE: Duration = Duration::from_millis(50);

/// Samples per window.
const WINDOW_SAMPLES: usize = 3;

/// The sliding window over which a vCPU's rate is measured (and the least time between two
/// changes of its throttle).
pub const DIRTY_LIMIT_WINDOW: Duration = Duration::from_millis(150);

/// The band around the limit in which a throttle is left as it is (no chatter): ±5%.
const TOLERANCE: f64 = 0.05;

/// Entries KVM has pushed into `w`'s ring so far, wrapping: the entries harvested plus those
/// still in use (published by KVM, or collected by a harvest that has not yet moved the
/// harvest position nor had KVM reset them), found by bisection, as the entries in use are
/// contiguous from the harvest position. Counting collected entries too keeps a reading taken
/// during a harvest exact; a harvest that completes during the reading makes it start again.
pub fn ring_entries_pushed(w: &RingWatch) -> u32 {
    let entries = w.ring.entries();
    let size = w.ring.len();
    let in_use = |idx: u32| {
        entries[(idx & size.wrapping_sub(1)) as usize]
            .flags
            .load(Ordering::Acquire)
            & KVM_DIRTY_GFN_F_MASK
            != 0
    };
    let mut harvested = w.harvested.load(Ordering::Acquire);
    for _ in 0..3 {
        // The largest n ≤ the ring's size with n entries in use from `harvested` on.
        let (mut lo, mut hi) = (0u32, size);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if in_use(harvested.wrapping_add(mid - 1)) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        let again = w.harvested.load(Ordering::Acquire);
        if again == harvested {
            return harvested.wrapping_add(lo);
        }
        harvested = again;
    }
    harvested
}

/// [`ring_entries_pushed`] of every vCPU's ring of `tracker`, in vCPU order; empty before its
/// first start and for trackers without rings.
pub fn rings_pushed(tracker: &KvmDirtyTracker) -> Vec<u32> {
    tracker
        .ring_watches()
        .iter()
        .map(ring_entries_pushed)
        .collect()
}

/// The feedback step: the throttle (per mille of the period) for a vCPU held `permille`‰ that
/// dirtied `rate` entries/s against `limit`. The vCPU's rate is taken as proportional to the
/// share of time it runs: above the limit that share is scaled by `limit / rate`; below it, a
/// throttled vCPU's share grows by the same ratio, at most doubling per step; within ±5% of the
/// limit, or unthrottled and below it, nothing changes.
pub fn next_throttle(permille: u16, rate: f64, limit: f64) -> u16 {
    let permille = permille.min(MAX_VCPU_THROTTLE_PERMILLE);
    let run = 1.0 - f64::from(permille) / 1000.0;
    let scale = if rate > limit * (1.0 + TOLERANCE) {
        limit / rate
    } else if permille > 0 && rate < limit * (1.0 - TOLERANCE) {
        if rate > 0.0 {
            (limit / rate).min(2.0)
        } else {
            2.0
        }
    } else {
        return permille;
    };
    let run = (run * scale).clamp(0.0, 1.0);
    let held = ((1.0 - run) * 1000.0).round() as u16;
    held.min(MAX_VCPU_THROTTLE_PERMILLE)
}

/// What the controller thread shares with its owner.
#[derive(Debug, Default)]
struct Shared {
    quit: AtomicBool,
    /// Entries per second per vCPU.
    limit: AtomicU64,
    /// Per vCPU, the rate over the last window (QEMU's `current-rate`).
    rates: Mutex<Vec<u64>>,
}

#[derive(Debug)]
struct Running {
    thread: JoinHandle<()>,
    throttle: VcpuThrottle,
}

/// A dirty-limit controller, started by a limit and stopped when it is lifted. See the
/// [module docs](self).
#[derive(Debug, Default)]
pub struct DirtyLimiter {
    shared: Arc<Shared>,
    running: Mutex<Option<Running>>,
}

impl DirtyLimiter {
    /// Cap every vCPU of `tracker`'s rings at `limit` entries per second (at least 1),
    /// throttling through `throttle`; a running controller just takes the new limit. The rings
    /// are read from the tracker's first [`start`](KvmDirtyTracker::start) on.
    pub fn start(
        &self,
        tracker: Arc<KvmDirtyTracker>,
        throttle: VcpuThrottle,
        limit: u64,
    ) -> std::io::Result<()> {
        self.shared.limit.store(limit.max(1), Ordering::Relaxed);
        let mut running = lock(&self.running);
        if running.is_some() {
            return Ok(());
        }
        self.shared.quit.store(false, Ordering::Release);
        let (sh, th) = (self.shared.clone(), throttle.clone());
        let thread = std::thread::Builder::new()
            .name("dirty-limit".into())
            .spawn(move || control(&sh, &tracker, &th))?;
        *running = Some(Running { thread, throttle });
        Ok(())
    }

    /// Stop the controller, if running, and lift every vCPU's throttle it set.
    pub fn stop(&self) {
        let r = lock(&self.running).take();
        if let Some(r) = r {
            self.shared.quit.store(true, Ordering::Release);
            let _ = r.thread.join();
            r.throttle.clear();
        }
        lock(&self.shared.rates).clear();
    }

    /// The limit in force, entries per second per vCPU (`None`: not running).
    pub fn limit(&self) -> Option<u64> {
        lock(&self.running)
            .is_some()
            .then(|| self.shared.limit.load(Ordering::Relaxed))
    }

    /// Each vCPU's rate over the last window, entries per second (QEMU's `current-rate` of
    /// `query-vcpu-dirty-limit`); empty when not running or before the first window.
    pub fn rates(&self) -> Vec<u64> {
        lock(&self.shared.rates).clone()
    }

    /// Each vCPU's throttle set by the limit, percent of the time held out of the guest
    /// (rounded down); empty when not running.
    pub fn throttle_percent(&self) -> Vec<u8> {
        match &*lock(&self.running) {
            Some(r) => (0..r.throttle.len())
                .map(|i| (r.throttle.get(i) / 10) as u8)
                .collect(),
            None => Vec::new(),
        }
    }
}

impl Drop for DirtyLimiter {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One vCPU's readings.
#[derive(Debug, Default)]
struct VcpuRate {
    /// The last raw (wrapping) count read.
    raw: Option<u32>,
    /// Entries since the controller started, by sample time (the last window's samples).
    samples: VecDeque<(Instant, u64)>,
    total: u64,
    /// Samples taken since this vCPU's throttle last changed.
    since_change: usize,
    /// The last window's rate, entries per second.
    rate: u64,
}

impl VcpuRate {
    /// Add a reading; the rate over the window, once the window is full.
    fn sample(&mut self, now: Instant, raw: u32) -> Option<f64> {
        if let Some(prev) = self.raw {
            let delta = raw.wrapping_sub(prev);
            // A reading taken mid-harvest can be low: keep the higher one, count nothing.
            if (delta as i32) < 0 {
                return None;
            }
            self.total += u64::from(delta);
        }
        self.raw = Some(raw);
        self.since_change += 1;
        self.samples.push_back((now, self.total));
        while self.samples.len() > WINDOW_SAMPLES + 1 {
            self.samples.pop_front();
        }
        let (&(t0, n0), &(t1, n1)) = (self.samples.front()?, self.samples.back()?);
        let span = t1.duration_since(t0).as_secs_f64();
        (self.samples.len() == WINDOW_SAMPLES + 1 && span > 0.0).then(|| (n1 - n0) as f64 / span)
    }
}

fn control(sh: &Shared, tracker: &KvmDirtyTracker, throttle: &VcpuThrottle) {
    let mut vcpus: Vec<VcpuRate> = Vec::new();
    while !sh.quit.load(Ordering::Acquire) {
        std::thread::sleep(DIRTY_LIMIT_SAMPLE);
        let watches = tracker.ring_watches();
        let n = watches.len().min(throttle.len());
        vcpus.resize_with(n, VcpuRate::default);
        let limit = sh.limit.load(Ordering::Relaxed) as f64;
        let now = Instant::now();
        let mut rates = Vec::with_capacity(n);
        for (i, (w, v)) in watches.iter().zip(vcpus.iter_mut()).enumerate() {
            let sampled = v.sample(now, ring_entries_pushed(w));
            rates.push(sampled.map_or(v.rate, |r| r as u64));
            let Some(rate) = sampled else {
                continue;
            };
            v.rate = rate as u64;
            // The window must lie wholly under the throttle in force.
            if v.since_change < WINDOW_SAMPLES {
                continue;
            }
            let held = throttle.get(i);
            let next = next_throttle(held, rate, limit);
            if next != held && throttle.set(i, next).is_ok() {
                v.since_change = 0;
            }
        }
        *lock(&sh.rates) = rates;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vcpu_under_the_limit_is_never_throttled() {
        for rate in [0.0, 1.0, 500.0, 999.0, 1049.0] {
            assert_eq!(next_throttle(0, rate, 1000.0), 0, "rate {rate}");
        }
    }

    #[test]
    fn a_vcpu_over_the_limit_is_held_in_proportion() {
        // Free at 10× the limit: it may run a tenth of the time.
        assert_eq!(next_throttle(0, 10_000.0, 1000.0), 900);
        // Running half the time at 2× the limit: a quarter.
        assert_eq!(next_throttle(500, 2000.0, 1000.0), 750);
        // Never past the maximum.
        assert_eq!(next_throttle(0, 1e9, 1.0), MAX_VCPU_THROTTLE_PERMILLE);
    }

    #[test]
    fn a_throttled_vcpu_under_the_limit_is_released_gradually() {
        // At half the limit: twice the run time.
        assert_eq!(next_throttle(900, 500.0, 1000.0), 800);
        // Idle: at most double per step, down to nothing.
        assert_eq!(next_throttle(900, 0.0, 1000.0), 800);
        assert_eq!(next_throttle(400, 0.0, 1000.0), 0);
        // Within the band: left alone.
        assert_eq!(next_throttle(900, 980.0, 1000.0), 900);
        assert_eq!(next_throttle(900, 1040.0, 1000.0), 900);
    }

    #[test]
    fn the_window_rate_needs_a_full_window_and_skips_low_readings() {
        let mut v = VcpuRate::default();
        let t = Instant::now();
        let ms = |n: u64| t + Duration::from_millis(n);
        assert_eq!(v.sample(ms(0), u32::MAX - 99), None);
        assert_eq!(v.sample(ms(50), 0), None); // wrapped: +100
        assert_eq!(v.sample(ms(100), 100), None);
        // A reading below the last one (taken mid-harvest) counts nothing.
        assert_eq!(v.sample(ms(120), 50), None);
        let r = v.sample(ms(150), 300).expect("a full window");
        // 400 entries over 150 ms.
        assert!((r - 400.0 / 0.150).abs() < 1e-6, "{r}");
    }
}
