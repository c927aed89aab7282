//! Which of KVM's three dirty trackers is in use: the one name for that choice across the
//! workspace (core self-test and perf, the KVM tracker, the migration engine, the command
//! line).

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
        for bad in [
            "", "ring:", "ring:0", "ring:63", "ring:100", "ring:x", "log",
        ] {
            assert!(bad.parse::<TrackerKind>().is_err(), "{bad}");
        }
    }
}
