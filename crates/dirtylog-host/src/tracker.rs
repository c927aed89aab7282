//! [`HostDirtyTracker`]: the [`DirtyTracker`] over regions of this process's memory, one
//! [`WriteWatch`] per region, by the [`HostMethod`] chosen.

use std::sync::atomic::{AtomicBool, Ordering};

use dirtylog::{DirtyTracker, TrackerError, TrackerKind};
use serde::Serialize;

use crate::async_wp::AsyncWatch;
use crate::mprotect::MprotectWatch;
use crate::sync_wp::SyncWatch;
use crate::watch::WriteWatch;
use crate::{HostError, HostMethod, HostRegion};

/// How a [`HostDirtyTracker`] tracks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HostTrackerConfig {
    /// How writes are learnt of.
    pub method: HostMethod,
    /// [`TrackerKind::DirtyLog`] (a harvest re-protects what it reports) or
    /// [`TrackerKind::ClearLog`] (a harvest is a snapshot; `clear` re-protects). The ring is
    /// refused ([`HostError::RingRefused`]).
    pub mode: TrackerKind,
}

impl Default for HostTrackerConfig {
    /// Async uffd-wp, dirty-log mode.
    fn default() -> Self {
        HostTrackerConfig {
            method: HostMethod::Async,
            mode: TrackerKind::DirtyLog,
        }
    }
}

struct Entry {
    region: HostRegion,
    watch: Box<dyn WriteWatch>,
}

/// A dirty tracker over regions of this process's memory (indexes `0..n` in the order given).
///
/// ```
/// use std::sync::atomic::Ordering;
/// use std::sync::Arc;
///
/// use dirtylog::{DirtyTracker, TrackerKind};
/// use dirtylog_host::{HostBacking, HostDirtyTracker, HostMemory, HostMethod, HostRegion, HostTrackerConfig};
///
/// let mem = Arc::new(HostMemory::new(16 * 4096, HostBacking::Anonymous)?);
/// let cfg = HostTrackerConfig { method: HostMethod::Async, mode: TrackerKind::DirtyLog };
/// let tracker = HostDirtyTracker::new(vec![HostRegion::new(mem.clone())], cfg)?;
/// tracker.start()?;
/// mem.words()[5 * 4096 / 8].store(42, Ordering::Relaxed); // write page 5
/// let mut bits = [0u64; 1];
/// tracker.harvest(0, &mut bits)?;
/// assert_eq!(bits, [1 << 5]);
/// let mut again = [0u64; 1];
/// tracker.harvest(0, &mut again)?; // dirty-log: the harvest re-protected page 5
/// assert_eq!(again, [0]);
/// tracker.stop()?;
/// # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
/// ```
pub struct HostDirtyTracker {
    entries: Vec<Entry>,
    cfg: HostTrackerConfig,
    started: AtomicBool,
}

impl std::fmt::Debug for HostDirtyTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostDirtyTracker")
            .field("cfg", &self.cfg)
            .field(
                "regions",
                &self.entries.iter().map(|e| &e.region).collect::<Vec<_>>(),
            )
            .field("started", &self.started.load(Ordering::Relaxed))
            .finish()
    }
}

/// The watch of `method` over `region`.
fn watch(method: HostMethod, region: &HostRegion) -> Result<Box<dyn WriteWatch>, HostError> {
    let (addr, len, ps) = (region.addr() as usize, region.len(), region.page_size());
    Ok(match method {
        HostMethod::Async => Box::new(AsyncWatch::new(addr, len, ps)?),
        HostMethod::Sync => Box::new(SyncWatch::new(addr, len, ps)?),
        HostMethod::Mprotect => Box::new(MprotectWatch::new(addr, len, ps)?),
    })
}

impl HostDirtyTracker {
    /// A tracker of `regions` (indexes in this order) by `cfg.method`, in `cfg.mode`. Each
    /// region is registered now (so a range that is not mapped, or that another tracker
    /// watches, fails here); nothing is protected until [`start`](DirtyTracker::start).
    /// Refused: no regions is fine (an empty tracker), overlapping regions
    /// ([`HostError::Overlap`]), the ring ([`HostError::RingRefused`]).
    pub fn new(regions: Vec<HostRegion>, cfg: HostTrackerConfig) -> Result<Self, HostError> {
        if let TrackerKind::Ring { .. } = cfg.mode {
            return Err(HostError::RingRefused);
        }
        let mut order: Vec<usize> = (0..regions.len()).collect();
        order.sort_by_key(|&i| regions[i].addr());
        for w in order.windows(2) {
            let (a, b) = (&regions[w[0]], &regions[w[1]]);
            if b.addr() < a.end() {
                let (first, second) = (w[0].min(w[1]), w[0].max(w[1]));
                let (f, s) = (&regions[first], &regions[second]);
                return Err(HostError::Overlap {
                    first,
                    first_addr: f.addr(),
                    first_end: f.end(),
                    second,
                    second_addr: s.addr(),
                    second_end: s.end(),
                });
            }
        }
        let mut entries = Vec::with_capacity(regions.len());
        for region in regions {
            let watch = watch(cfg.method, &region)?;
            entries.push(Entry { region, watch });
        }
        Ok(HostDirtyTracker {
            entries,
            cfg,
            started: AtomicBool::new(false),
        })
    }

    /// The method in use.
    pub fn method(&self) -> HostMethod {
        self.cfg.method
    }

    /// The configuration.
    pub fn config(&self) -> HostTrackerConfig {
        self.cfg
    }

    /// Regions tracked.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No regions tracked?
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Pages in region `index`.
    pub fn npages(&self, index: usize) -> Option<u64> {
        self.entries.get(index).map(|e| e.watch.npages())
    }

    /// Page size of region `index`.
    pub fn page_size(&self, index: usize) -> Option<u64> {
        self.entries.get(index).map(|e| e.watch.page_size())
    }

    /// Region `index`.
    pub fn region(&self, index: usize) -> Option<&HostRegion> {
        self.entries.get(index).map(|e| &e.region)
    }

    fn entry(&self, index: usize) -> Result<&Entry, HostError> {
        self.entries.get(index).ok_or(HostError::NoSuchRegion {
            index,
            count: self.entries.len(),
        })
    }

    /// [`DirtyTracker::start`] with the typed error: arm every region (on failure, the regions
    /// already armed are disarmed again).
    pub fn start_host(&self) -> Result<(), HostError> {
        for (i, e) in self.entries.iter().enumerate() {
            if let Err(err) = e.watch.arm() {
                for e in &self.entries[..i] {
                    let _ = e.watch.disarm();
                }
                return Err(err);
            }
        }
        self.started.store(true, Ordering::Release);
        Ok(())
    }

    /// [`DirtyTracker::harvest`] with the typed error; returns the pages reported.
    pub fn harvest_host(&self, index: usize, out: &mut [u64]) -> Result<u64, HostError> {
        let e = self.entry(index)?;
        let expected = e.watch.npages().div_ceil(64) as usize;
        if out.len() != expected {
            return Err(HostError::BitmapLength {
                index,
                expected,
                got: out.len(),
            });
        }
        if !self.started.load(Ordering::Acquire) {
            return Err(HostError::NotStarted);
        }
        e.watch.harvest(out, self.cfg.mode == TrackerKind::DirtyLog)
    }

    /// [`DirtyTracker::clear`] with the typed error. Checked in every mode; re-protects only in
    /// clear-log mode (dirty-log re-protects in `harvest`).
    pub fn clear_host(&self, index: usize, first_page: u64, bits: &[u64]) -> Result<(), HostError> {
        let e = self.entry(index)?;
        if first_page % 64 != 0 {
            return Err(HostError::FirstPageUnaligned(first_page));
        }
        let npages = e.watch.npages();
        for (w, &word) in bits.iter().enumerate() {
            if word == 0 {
                continue;
            }
            let page = (w as u64)
                .checked_mul(64)
                .and_then(|p| p.checked_add(first_page))
                .and_then(|p| p.checked_add(u64::from(word.trailing_zeros())));
            let last = (w as u64)
                .checked_mul(64)
                .and_then(|p| p.checked_add(first_page))
                .and_then(|p| p.checked_add(63 - u64::from(word.leading_zeros())));
            match (page, last) {
                (Some(_), Some(l)) if l < npages => {}
                _ => {
                    // Name the first page beyond the region whose bit is set.
                    let base = first_page.saturating_add((w as u64).saturating_mul(64));
                    let beyond = (0..64)
                        .filter(|b| word >> b & 1 == 1)
                        .map(|b| base.saturating_add(b))
                        .find(|&p| p >= npages)
                        .unwrap_or(base);
                    return Err(HostError::BitsBeyondRegion {
                        index,
                        page: beyond,
                        npages,
                    });
                }
            }
        }
        if !self.started.load(Ordering::Acquire) {
            return Err(HostError::NotStarted);
        }
        if self.cfg.mode == TrackerKind::ClearLog {
            e.watch.protect(first_page, bits)?;
        }
        Ok(())
    }

    /// [`DirtyTracker::stop`] with the typed error: disarm every region (all are tried; the
    /// first error is returned).
    pub fn stop_host(&self) -> Result<(), HostError> {
        self.started.store(false, Ordering::Release);
        let mut first = None;
        for e in &self.entries {
            if let Err(err) = e.watch.disarm() {
                first.get_or_insert(err);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl DirtyTracker for HostDirtyTracker {
    fn kind(&self) -> TrackerKind {
        self.cfg.mode
    }

    fn start(&self) -> Result<(), TrackerError> {
        Ok(self.start_host()?)
    }

    fn harvest(&self, index: usize, out: &mut [u64]) -> Result<(), TrackerError> {
        self.harvest_host(index, out)?;
        Ok(())
    }

    fn clear(&self, index: usize, first_page: u64, bits: &[u64]) -> Result<(), TrackerError> {
        Ok(self.clear_host(index, first_page, bits)?)
    }

    fn stop(&self) -> Result<(), TrackerError> {
        Ok(self.stop_host()?)
    }
}

impl Drop for HostDirtyTracker {
    fn drop(&mut self) {
        let _ = self.stop_host();
    }
}
