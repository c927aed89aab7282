//! Dirty trackers: [`TrackerKind`], which of KVM's three is in use (the one name for that
//! choice across the workspace: self-test, perf, the KVM tracker, the migration engine, the
//! command line), and [`DirtyTracker`], what a consumer such as the migration engine needs
//! from any of them (`dirtylog-kvm`'s `KvmDirtyTracker` implements it on `/dev/kvm`).

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// A KVM dirty tracker.
///
/// ```
/// use dirtylog::TrackerKind;
///
/// let t: TrackerKind = "ring:4096".parse().unwrap();
/// assert_eq!(t, TrackerKind::Ring { entries: 4096 });
/// assert_eq!(t.to_string(), "ring:4096");
/// assert_eq!("clear-log".parse::<TrackerKind>().unwrap(), TrackerKind::ClearLog);
/// assert!("ring:1000".parse::<TrackerKind>().is_err()); // not a power of two
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrackerKind {
    /// `KVM_GET_DIRTY_LOG` without manual protect: each fetch clears the log and
    /// write-protects the fetched pages again.
    DirtyLog,
    /// Manual protect (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`): a fetch is a snapshot, and
    /// `KVM_CLEAR_DIRTY_LOG` clears and re-protects chosen pages (QEMU's default).
    ClearLog,
    /// Per-vCPU dirty rings of `entries` entries each (a power of two), harvested and
    /// reset with `KVM_RESET_DIRTY_RINGS`.
    Ring {
        /// Entries per vCPU ring.
        entries: u32,
    },
}

impl TrackerKind {
    /// The ring size used when none is given: 4096 entries (64 KiB per vCPU), QEMU's default.
    pub const DEFAULT_RING_ENTRIES: u32 = 4096;

    /// The three trackers, the ring at [`DEFAULT_RING_ENTRIES`](Self::DEFAULT_RING_ENTRIES).
    pub const ALL: [TrackerKind; 3] = [
        TrackerKind::DirtyLog,
        TrackerKind::ClearLog,
        TrackerKind::Ring {
            entries: Self::DEFAULT_RING_ENTRIES,
        },
    ];

    /// The three trackers, as [`ALL`](Self::ALL) but with rings of `entries` entries per vCPU.
    pub const fn all_with_ring(entries: u32) -> [TrackerKind; 3] {
        [
            TrackerKind::DirtyLog,
            TrackerKind::ClearLog,
            TrackerKind::Ring { entries },
        ]
    }

    /// The short name, as on the command line: `dirty-log`, `clear-log` or `ring`.
    pub fn name(self) -> &'static str {
        match self {
            TrackerKind::DirtyLog => "dirty-log",
            TrackerKind::ClearLog => "clear-log",
            TrackerKind::Ring { .. } => "ring",
        }
    }

    /// Does this tracker need `KVM_CLEAR_DIRTY_LOG` to re-arm pages?
    pub fn manual_protect(self) -> bool {
        self == TrackerKind::ClearLog
    }

    /// Ring entries per vCPU, for the ring tracker.
    pub fn ring_entries(self) -> Option<u32> {
        match self {
            TrackerKind::Ring { entries } => Some(entries),
            _ => None,
        }
    }
}

impl fmt::Display for TrackerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrackerKind::Ring { entries } => write!(f, "ring:{entries}"),
            other => f.write_str(other.name()),
        }
    }
}

/// Why a tracker name did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown tracker {0:?}: use dirty-log, clear-log, ring or ring:ENTRIES (a power of two, \
     at least 64)"
)]
pub struct ParseTrackerError(String);

impl FromStr for TrackerKind {
    type Err = ParseTrackerError;

    /// `dirty-log`, `clear-log`, `ring` (4096 entries) or `ring:ENTRIES`. `dirty-ring` is
    /// accepted for `ring`, as the kernel's selftest names it.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseTrackerError(s.to_string());
        match s {
            "dirty-log" => Ok(TrackerKind::DirtyLog),
            "clear-log" => Ok(TrackerKind::ClearLog),
            "ring" | "dirty-ring" => Ok(TrackerKind::Ring {
                entries: Self::DEFAULT_RING_ENTRIES,
            }),
            _ => {
                let n = s
                    .strip_prefix("ring:")
                    .or_else(|| s.strip_prefix("dirty-ring:"))
                    .ok_or_else(bad)?;
                let entries: u32 = n.parse().map_err(|_| bad())?;
                if !entries.is_power_of_two() || entries < 64 {
                    return Err(bad());
                }
                Ok(TrackerKind::Ring { entries })
            }
        }
    }
}

/// The error a [`DirtyTracker`] returns: any error, boxed, so that trackers on different
/// hypervisors share one trait.
pub type TrackerError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A dirty tracker over a fixed table of memory regions (indexes `0..n`, in the order the
/// tracker was given them), as the migration engine drives it.
///
/// # Contract
/// - [`start`](Self::start) is called once, before the first [`harvest`](Self::harvest) and
///   before the consumer reads any page. From then on, every guest write to a region must show
///   up in a later `harvest` — unless it was made before a [`clear`](Self::clear) covering the
///   page (then the consumer copies the page after the clear).
/// - `harvest(index, out)` ORs the pages dirtied since the previous harvest (or clear) into
///   `out`, one bit per page in KVM's little-endian order (`out.len()` is the region's
///   `npages.div_ceil(64)`). Trackers that re-arm on read (`KVM_GET_DIRTY_LOG`) re-arm here;
///   with manual protect this is the snapshot only and bits stay set until `clear`; a ring
///   tracker harvests **and resets** every ring before returning, so that the returned pages
///   may be treated as clean at once.
/// - `clear(index, first_page, bits)` re-arms the pages whose bits are set in `bits` (bit `i`
///   is page `first_page + i`; `first_page` is a multiple of 64), only with bits the consumer
///   harvested. Trackers that re-arm in `harvest` keep the default no-op.
/// - [`stop`](Self::stop) ends tracking; called once at the end, after success or failure.
///
/// Every method takes `&self`: consumers call them from a control thread while other threads
/// read memory and vCPUs run.
pub trait DirtyTracker: Send + Sync {
    /// Which tracker this is.
    fn kind(&self) -> TrackerKind;
    /// Start tracking every region.
    fn start(&self) -> Result<(), TrackerError>;
    /// OR the dirty bits of region `index` into `out` (see the contract above).
    fn harvest(&self, index: usize, out: &mut [u64]) -> Result<(), TrackerError>;
    /// Re-arm the pages of `bits` in region `index` from `first_page` (manual protect only).
    fn clear(&self, index: usize, first_page: u64, bits: &[u64]) -> Result<(), TrackerError> {
        let _ = (index, first_page, bits);
        Ok(())
    }
    /// Stop tracking.
    fn stop(&self) -> Result<(), TrackerError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for t in TrackerKind::ALL
            .into_iter()
            .chain([TrackerKind::Ring { entries: 65536 }])
        {
            assert_eq!(t.to_string().parse::<TrackerKind>(), Ok(t));
        }
        assert_eq!(
            TrackerKind::all_with_ring(TrackerKind::DEFAULT_RING_ENTRIES),
            TrackerKind::ALL
        );
        assert_eq!(
            TrackerKind::all_with_ring(256).map(TrackerKind::ring_entries),
            [None, None, Some(256)]
        );
        for bad in [
            "", "ring:", "ring:0", "ring:63", "ring:100", "ring:x", "log",
        ] {
            assert!(bad.parse::<TrackerKind>().is_err(), "{bad}");
        }
    }
}
