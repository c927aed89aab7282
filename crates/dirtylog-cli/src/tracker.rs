//! What every command accepts for `--tracker` and `--ring-entries`, checked one way.

use dirtylog::TrackerKind;

/// The ring sizes `selftest` and `perf` accept (small rings fill, which the self-test wants).
pub const RING_ENTRIES: std::ops::RangeInclusive<u32> = 256..=65536;

/// Refuse a ring whose size is not a power of two within `range`.
pub fn check_ring(t: TrackerKind, range: std::ops::RangeInclusive<u32>) -> Result<(), String> {
    match t.ring_entries() {
        Some(n) if !n.is_power_of_two() || !range.contains(&n) => Err(format!(
            "ring of {n} entries: the size must be a power of two from {} to {}",
            range.start(),
            range.end()
        )),
        _ => Ok(()),
    }
}

/// `--tracker` with `--ring-entries` applied: the ring gets that size, unless `ring:N` named
/// another one (then the two disagree, and that is an error rather than a silent choice).
/// A bare `ring` parses as [`TrackerKind::DEFAULT_RING_ENTRIES`] entries.
pub fn with_ring_entries(t: TrackerKind, ring_entries: Option<u32>) -> Result<TrackerKind, String> {
    match (t, ring_entries) {
        (t, None) => Ok(t),
        (TrackerKind::Ring { entries }, Some(e))
            if entries == e || entries == TrackerKind::DEFAULT_RING_ENTRIES =>
        {
            Ok(TrackerKind::Ring { entries: e })
        }
        (TrackerKind::Ring { entries }, Some(e)) => Err(format!(
            "--tracker ring:{entries} and --ring-entries {e} disagree: give the size once"
        )),
        (t, Some(_)) => Err(format!(
            "--ring-entries applies to --tracker ring, not to --tracker {t}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_entries_apply_once() {
        let ring = |entries| TrackerKind::Ring { entries };
        let bare: TrackerKind = "ring".parse().unwrap();
        assert_eq!(with_ring_entries(bare, Some(1024)), Ok(ring(1024)));
        assert_eq!(with_ring_entries(ring(8192), Some(8192)), Ok(ring(8192)));
        assert_eq!(with_ring_entries(ring(8192), None), Ok(ring(8192)));
        assert!(with_ring_entries(ring(8192), Some(1024)).is_err());
        assert!(with_ring_entries(TrackerKind::ClearLog, Some(1024)).is_err());
        assert!(check_ring(ring(128), RING_ENTRIES).is_err());
        assert!(check_ring(ring(1000), RING_ENTRIES).is_err());
        assert!(check_ring(ring(256), RING_ENTRIES).is_ok());
        assert!(check_ring(TrackerKind::DirtyLog, RING_ENTRIES).is_ok());
    }
}
