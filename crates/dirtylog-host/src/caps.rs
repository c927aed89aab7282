//! [`probe`]: which [`HostMethod`]s work on this machine, on which [`HostBacking`]s, and why
//! not where they do not — each tried for real on a small scratch mapping.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use dirtylog::TrackerKind;
use serde::Serialize;

use crate::memory::{free_huge_pages, HUGE_PAGE_SIZE};
use crate::{
    HostBacking, HostDirtyTracker, HostError, HostMemory, HostMethod, HostRegion, HostTrackerConfig,
};

/// One method on one backing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackingCaps {
    /// The backing.
    pub backing: HostBacking,
    /// Did a write to a protected page show in a harvest, and only that page?
    pub works: bool,
    /// Why not, when it did not (or why it was not tried).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why_not: Option<String>,
}

/// One method on every backing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MethodCaps {
    /// The method.
    pub method: HostMethod,
    /// Per backing, in [`HostBacking::ALL`]'s order.
    pub backings: Vec<BackingCaps>,
}

/// What [`probe`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostCaps {
    /// The kernel release (`uname -r`).
    pub kernel: String,
    /// The userfaultfd features the kernel offers (`UFFDIO_API` with none asked).
    pub uffd_features: Option<u64>,
    /// Why userfaultfd could not be opened, if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uffd_error: Option<String>,
    /// Free 2 MiB huge pages when probed.
    pub free_huge_pages: u64,
    /// Per method, in [`HostMethod::ALL`]'s order.
    pub methods: Vec<MethodCaps>,
}

/// Huge pages a hugetlb trial maps.
const HUGE_PROBE_PAGES: u64 = 2;

/// Try every method on every backing: a 16-page scratch mapping (two huge pages for hugetlb,
/// only if they are free), a dirty-log tracker, a write to page 3 (1 for hugetlb), a harvest
/// that must report exactly that page, a second that must report nothing.
pub fn probe() -> HostCaps {
    let free = free_huge_pages();
    let methods = HostMethod::ALL
        .into_iter()
        .map(|method| MethodCaps {
            method,
            backings: HostBacking::ALL
                .into_iter()
                .map(|backing| {
                    let why_not = if backing == HostBacking::HugeTlb && free < HUGE_PROBE_PAGES {
                        Some(
                            HostError::HugePagesUnavailable {
                                needed: HUGE_PROBE_PAGES,
                                free,
                            }
                            .to_string(),
                        )
                    } else {
                        try_method(method, backing).err()
                    };
                    BackingCaps {
                        backing,
                        works: why_not.is_none(),
                        why_not,
                    }
                })
                .collect(),
        })
        .collect();
    let uffd = crate::sys::uffd_available_features();
    HostCaps {
        kernel: kernel_release(),
        uffd_features: uffd.as_ref().ok().copied(),
        uffd_error: uffd.err().map(|e| e.to_string()),
        free_huge_pages: free,
        methods,
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

/// One trial; the error says what went wrong.
fn try_method(method: HostMethod, backing: HostBacking) -> Result<(), String> {
    let (len, page) = match backing {
        HostBacking::HugeTlb => (HUGE_PROBE_PAGES * HUGE_PAGE_SIZE, 1u64),
        _ => (16 * backing.page_size(), 3),
    };
    let mem = Arc::new(HostMemory::new(len, backing).map_err(|e| e.to_string())?);
    let cfg = HostTrackerConfig {
        method,
        mode: TrackerKind::DirtyLog,
    };
    let tracker = HostDirtyTracker::new(vec![HostRegion::new(mem.clone())], cfg)
        .map_err(|e| e.to_string())?;
    tracker.start_host().map_err(|e| e.to_string())?;
    let word = (page * mem.page_size() / 8) as usize;
    mem.words()[word].store(0x5a5a, Ordering::Relaxed);
    let mut bits = [0u64; 1];
    tracker
        .harvest_host(0, &mut bits)
        .map_err(|e| e.to_string())?;
    if bits != [1 << page] {
        return Err(format!(
            "a write to page {page} was harvested as {:#x}, not {:#x}",
            bits[0],
            1u64 << page
        ));
    }
    let mut again = [0u64; 1];
    tracker
        .harvest_host(0, &mut again)
        .map_err(|e| e.to_string())?;
    if again != [0] {
        return Err(format!(
            "a second harvest with no write reported {:#x}",
            again[0]
        ));
    }
    tracker.stop_host().map_err(|e| e.to_string())?;
    Ok(())
}

impl HostCaps {
    /// Does `method` work here on at least anonymous memory?
    pub fn works(&self, method: HostMethod) -> bool {
        self.methods
            .iter()
            .find(|m| m.method == method)
            .and_then(|m| {
                m.backings
                    .iter()
                    .find(|b| b.backing == HostBacking::Anonymous)
            })
            .is_some_and(|b| b.works)
    }

    /// Does `method` work here on `backing`?
    pub fn works_on(&self, method: HostMethod, backing: HostBacking) -> bool {
        self.methods
            .iter()
            .find(|m| m.method == method)
            .and_then(|m| m.backings.iter().find(|b| b.backing == backing))
            .is_some_and(|b| b.works)
    }

    /// The best method that works here (async, then sync, then mprotect).
    pub fn best(&self) -> Option<HostMethod> {
        HostMethod::ALL.into_iter().find(|&m| self.works(m))
    }

    /// A text table for `dirtylog caps`: one line per method with yes/no per backing and what
    /// a first write to a protected page costs, the method a tracker would pick, then the
    /// userfaultfd features, the free huge pages and the reason for each no.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "host memory tracking (this process's own pages; kernel {})",
            self.kernel
        );
        let _ = write!(s, "  {:<9}", "method");
        for b in HostBacking::ALL {
            let _ = write!(s, " {:<8}", b.name());
        }
        let _ = writeln!(s, " a first write to a protected page costs");
        for m in &self.methods {
            let _ = write!(s, "  {:<9}", m.method.name());
            for b in &m.backings {
                let _ = write!(s, " {:<8}", if b.works { "yes" } else { "no" });
            }
            let _ = writeln!(s, " {}", cost(m.method));
        }
        match self.best() {
            Some(m) => {
                let _ = writeln!(s, "  best method here: {m} (the first that works on anon)");
            }
            None => {
                let _ = writeln!(s, "  best method here: none (no method works on anon)");
            }
        }
        match (&self.uffd_features, &self.uffd_error) {
            (Some(f), _) => {
                let _ = writeln!(s, "  userfaultfd features offered: {f:#x}");
            }
            (None, Some(e)) => {
                let _ = writeln!(s, "  userfaultfd: {e}");
            }
            (None, None) => {}
        }
        let _ = writeln!(
            s,
            "  free 2 MiB huge pages: {} (hugetlb needs some: /proc/sys/vm/nr_hugepages)",
            self.free_huge_pages
        );
        // Each reason once, with every method it applies to ("async, sync on hugetlb: ...").
        let mut reasons: Vec<(HostBacking, &str, Vec<&'static str>)> = Vec::new();
        for m in &self.methods {
            for b in &m.backings {
                if let Some(why) = &b.why_not {
                    match reasons
                        .iter_mut()
                        .find(|(bk, w, _)| *bk == b.backing && *w == why.as_str())
                    {
                        Some((_, _, methods)) => methods.push(m.method.name()),
                        None => reasons.push((b.backing, why, vec![m.method.name()])),
                    }
                }
            }
        }
        for (backing, why, methods) in reasons {
            let _ = writeln!(s, "  no: {} on {backing}: {why}", methods.join(", "));
        }
        s
    }
}

/// What a first write to a protected page costs with `method`, in words.
fn cost(method: HostMethod) -> &'static str {
    match method {
        HostMethod::Async => "a minor fault the kernel resolves (Linux >= 6.7)",
        HostMethod::Sync => "a round trip to a fault-handling thread",
        HostMethod::Mprotect => "a SIGSEGV and an mprotect",
    }
}
