//! `verify`: a chain checked as a restore would, without a VM: every member's manifest,
//! parent link, file length and chunk checksum, the state files, and each region's digest
//! recomputed from the pages the chain holds.

use std::path::{Path, PathBuf};

use dirtylog_migrate::digest::DigestTable;
use serde::Serialize;

use crate::chain::Chain;
use crate::error::SnapshotError;
use crate::format::hex;

/// What [`verify`] checked.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VerifyReport {
    /// The members, base first.
    pub members: Vec<PathBuf>,
    /// Bytes of files whose checksums were checked.
    pub bytes_checked: u64,
    /// Each region's slot and digest (16 hex digits), as recorded and recomputed.
    pub regions: Vec<(u32, String)>,
}

/// Open the chain ending at `tip` with every checksum checked, parse its state files, and
/// recompute each region's digest from the chain's pages.
pub fn verify(tip: &Path) -> Result<VerifyReport, SnapshotError> {
    let chain = Chain::open(tip, false)?;
    chain.check_data(2)?;
    chain.vcpu_states()?;
    chain.device_sections()?;
    let digests = chain.memory_digests()?;
    let page = u64::from(chain.header().page_size());
    let per = ((4u64 << 20) / page).max(1);
    let mut buf = vec![0u8; (per * page) as usize];
    let mut regions = Vec::new();
    for (i, (r, want)) in chain.header().regions().iter().zip(digests).enumerate() {
        let npages = r.size / page;
        let table = DigestTable::new(npages as usize, page as usize);
        let mut first = 0;
        while first < npages {
            let n = per.min(npages - first);
            let b = &mut buf[..(n * page) as usize];
            chain.read_pages(i, first, b)?;
            table.record(first, b);
            first += n;
        }
        let got = table.digest();
        if got != want {
            return Err(SnapshotError::member(
                chain.tip(),
                format!(
                    "region {i} (slot {}): the chain's pages digest to {}, the tip records {} \
                     (a member was modified and its checksums rewritten, or a diff misses \
                     pages): do not restore it",
                    r.slot,
                    hex(got),
                    hex(want)
                ),
            ));
        }
        regions.push((r.slot, hex(got)));
    }
    let bytes_checked = chain
        .manifests()
        .iter()
        .flat_map(|m| m.files.iter().map(|f| f.len))
        .sum();
    Ok(VerifyReport {
        members: chain.members().to_vec(),
        bytes_checked,
        regions,
    })
}
