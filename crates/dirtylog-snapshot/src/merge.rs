//! `merge`: squash a chain (base + diffs) into one full member, written crash-safely as
//! member 0 of a new chain directory.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dirtylog_migrate::digest::DigestTable;

use crate::chain::Chain;
use crate::create::{member_numbers, SnapshotStats};
use crate::error::SnapshotError;
use crate::format::{hex, parse_hex, Kind, Manifest, ManifestStats, RegionEntry, FORMAT};
use crate::write::{clean_leftovers, Member};

/// Squash the chain ending at `tip` into one full member, `into/0` (`into` is a chain
/// directory, created if missing, that must not hold a chain). Every checksum of the source
/// chain is checked first, and the result's digest must equal the tip's record.
pub fn merge(tip: &Path, into: &Path) -> Result<SnapshotStats, SnapshotError> {
    let t0 = Instant::now();
    let chain = Chain::open(tip, true)?;
    let vcpus = chain.vcpu_states()?;
    let devices = chain.device_sections()?;
    let want = chain.memory_digests()?;
    if !into.is_dir() {
        std::fs::create_dir_all(into).map_err(|e| SnapshotError::io("create", into, e))?;
        if let Some(up) = into.parent().filter(|p| !p.as_os_str().is_empty()) {
            crate::write::sync_dir(up)?;
        }
    }
    clean_leftovers(into);
    let existing = member_numbers(into)?;
    if !existing.is_empty() {
        return Err(SnapshotError::Usage(format!(
            "{} already holds a chain (members {existing:?}): merge into an empty directory",
            into.display()
        )));
    }
    let header = chain.header();
    let page = u64::from(header.page_size());
    let tables = header
        .regions()
        .iter()
        .map(|r| DigestTable::new((r.size / page) as usize, page as usize))
        .collect();
    let mut member = Member::create(
        into,
        0,
        Kind::Full,
        header.page_size(),
        header.regions(),
        tables,
    )
    .map_err(|(e, _)| e)?;
    let r = (|| {
        let per = ((4u64 << 20) / page).max(1);
        let mut buf = vec![0u8; (per * page) as usize];
        for (i, r) in header.regions().iter().enumerate() {
            let npages = r.size / page;
            let mut first = 0;
            while first < npages {
                let n = per.min(npages - first);
                let b = &mut buf[..(n * page) as usize];
                chain.read_pages(i, first, b)?;
                member.write_run(i, first, b)?;
                first += n;
            }
        }
        for ((r, t), w) in header.regions().iter().zip(&member.tables).zip(&want) {
            if t.digest() != *w {
                return Err(SnapshotError::HashMismatch {
                    slot: r.slot,
                    at: format!(
                        "merging {}: the chain's pages differ from its record",
                        tip.display()
                    ),
                    expected: *w,
                    actual: t.digest(),
                });
            }
        }
        member.set_vcpus(vcpus);
        member.set_devices(devices);
        let tipm = chain.tip_manifest();
        let duration = t0.elapsed();
        let mut manifest = Manifest {
            format: FORMAT,
            kind: Kind::Full,
            parent: None,
            page_size: header.page_size(),
            vcpu_count: header.vcpu_count(),
            regions: header
                .regions()
                .iter()
                .zip(&want)
                .map(|(r, w)| RegionEntry {
                    slot: r.slot,
                    guest_phys_addr: r.gpa,
                    size: r.size,
                    pages_present: 0,
                    memory_xxh3: hex(*w),
                })
                .collect(),
            tracker: tipm.tracker.clone(),
            mode: tipm.mode,
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            files: Vec::new(),
            stats: ManifestStats {
                pages: member.pages(),
                bytes_written: member.bytes_written(),
                pause_us: 0,
                duration_us: duration.as_micros() as u64,
                rounds: 0,
            },
        };
        debug_assert!(manifest
            .regions
            .iter()
            .all(|r| parse_hex(&r.memory_xxh3).is_some()));
        member.commit(&mut manifest)
    })();
    match r {
        Ok((path, _)) => {
            let duration = t0.elapsed();
            let bytes = member.bytes_written();
            Ok(SnapshotStats {
                path,
                kind: Kind::Full.name(),
                pages: member.pages(),
                bytes_written: bytes,
                pause: Duration::ZERO,
                duration,
                rounds: 0,
                throughput_bytes_per_sec: (bytes as f64 / duration.as_secs_f64().max(1e-9)) as u64,
            })
        }
        Err(e) => {
            member.discard();
            Err(e)
        }
    }
}
