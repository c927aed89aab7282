//! `info`: what a chain holds, for people and (`serde`) for `--json`.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::chain::Chain;
use crate::create::member_numbers;
use crate::error::SnapshotError;
use crate::format::{ManifestStats, RegionEntry, SnapshotMode, MANIFEST};

/// One member of a chain.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MemberInfo {
    /// Its directory.
    pub path: PathBuf,
    /// `full` or `diff`.
    pub kind: &'static str,
    /// The parent as recorded.
    pub parent: Option<String>,
    /// How it was taken.
    pub mode: SnapshotMode,
    /// When, in ms since the Unix epoch.
    pub created: u64,
    /// Pages it carries.
    pub pages_present: u64,
    /// The files' apparent sizes.
    pub file_bytes: u64,
    /// What the files occupy on disk (sparse memory files cost only their data).
    pub disk_bytes: u64,
    /// What taking it cost.
    pub stats: ManifestStats,
}

/// A chain, as [`info`] describes it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Info {
    /// Format version.
    pub format: u32,
    /// Page size in bytes.
    pub page_size: u32,
    /// vCPUs.
    pub vcpu_count: u32,
    /// The tracker of the tip.
    pub tracker: String,
    /// The memory map at the tip, with its digests.
    pub regions: Vec<RegionEntry>,
    /// The members, base first.
    pub members: Vec<MemberInfo>,
}

/// Describe the chain ending at `path` (a member), or, for a chain directory, the chain
/// ending at its highest-numbered member. Checks the chain's structure, not its data (see
/// [`verify`](crate::verify())).
pub fn info(path: &Path) -> Result<Info, SnapshotError> {
    let tip = if path.join(MANIFEST).exists() {
        path.to_path_buf()
    } else if path.is_dir() {
        let nums = member_numbers(path)?;
        let last = nums
            .last()
            .ok_or_else(|| SnapshotError::Usage(format!("{} holds no snapshot", path.display())))?;
        path.join(last.to_string())
    } else {
        return Err(SnapshotError::member(path, "missing: no snapshot there"));
    };
    let chain = Chain::open(&tip, false)?;
    let mut members = Vec::new();
    for (p, m) in chain.members().iter().zip(chain.manifests()) {
        let (mut file_bytes, mut disk_bytes) = (0, 0);
        for f in &m.files {
            if let Ok(meta) = std::fs::metadata(p.join(&f.name)) {
                file_bytes += meta.len();
                disk_bytes += meta.blocks() * 512;
            }
        }
        members.push(MemberInfo {
            path: p.clone(),
            kind: m.kind.name(),
            parent: m.parent.as_ref().map(|x| x.path.clone()),
            mode: m.mode,
            created: m.created,
            pages_present: m.regions.iter().map(|r| r.pages_present).sum(),
            file_bytes,
            disk_bytes,
            stats: m.stats.clone(),
        });
    }
    let tipm = chain.tip_manifest();
    Ok(Info {
        format: tipm.format,
        page_size: tipm.page_size,
        vcpu_count: tipm.vcpu_count,
        tracker: tipm.tracker.clone(),
        regions: tipm.regions.clone(),
        members,
    })
}

impl fmt::Display for Info {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "format {}, page size {}, {} vCPUs, tracker {}, {} regions",
            self.format,
            self.page_size,
            self.vcpu_count,
            self.tracker,
            self.regions.len()
        )?;
        for r in &self.regions {
            writeln!(
                f,
                "  slot {} at {:#x}: {} MiB, digest {}",
                r.slot,
                r.guest_phys_addr,
                r.size >> 20,
                r.memory_xxh3
            )?;
        }
        for m in &self.members {
            writeln!(
                f,
                "{}: {} ({}), {} pages, {:.1} MiB on disk, pause {:.1} ms, {} rounds",
                m.path.display(),
                m.kind,
                m.mode,
                m.pages_present,
                m.disk_bytes as f64 / (1 << 20) as f64,
                m.stats.pause_us as f64 / 1000.0,
                m.stats.rounds
            )?;
        }
        Ok(())
    }
}
