//! # dirtylog-host
//!
//! Dirty page tracking of the calling process's own memory, behind the same
//! [`dirtylog::DirtyTracker`] trait the `/dev/kvm` tracker implements, so the migration engine,
//! snapshots and `dirtylog dirty-rate` take it unchanged. Three methods write-protect the
//! tracked pages and learn of the first write to each ([`HostMethod`]):
//!
//! - `async` — userfaultfd with `UFFD_FEATURE_WP_ASYNC | WP_UNPOPULATED`: the kernel resolves
//!   write faults itself, and one `PAGEMAP_SCAN` per region reads the written pages and
//!   write-protects them again, atomically (Linux ≥ 6.7).
//! - `sync` — userfaultfd write-protect with a fault-handling thread that records each page
//!   and lifts its protection.
//! - `mprotect` — `mprotect(PROT_READ)` and a `SIGSEGV` handler that records each page.
//!
//! Modes: [`TrackerKind::DirtyLog`](dirtylog::TrackerKind::DirtyLog) (a harvest re-protects
//! what it reports) and [`TrackerKind::ClearLog`](dirtylog::TrackerKind::ClearLog) (a harvest
//! is a snapshot; `clear` re-protects). A ring has no meaning here: there are no vCPUs whose
//! writes could be queued per thread, so it is refused.
//!
//! Pieces: [`HostMemory`] (a mapping of a [`HostBacking`]: anonymous, memfd, 2 MiB hugetlb),
//! [`HostRegion`] (what a tracker watches: a `HostMemory`, or a caller's own mapping),
//! [`HostDirtyTracker`] (the tracker; example there), [`probe`] (which methods work here, for
//! `dirtylog caps`), [`populated_pages`] (which pages of a mapping hold anything, read from
//! the page tables), [`HostError`] (every failure, typed).

#![warn(missing_docs)]

mod async_wp;
pub mod caps;
pub mod error;
mod fault_log;
mod memory;
mod method;
mod mprotect;
mod populated;
mod region;
#[cfg(feature = "harness")]
pub mod selftest;
mod sync_wp;
mod sys;
mod tracker;
pub mod uffd;
mod watch;

pub use caps::{probe, BackingCaps, HostCaps, MethodCaps};
pub use error::HostError;
pub use memory::{free_huge_pages, HostBacking, HostMemory, ParseHostBackingError, HUGE_PAGE_SIZE};
pub use method::{HostMethod, ParseHostMethodError};
pub use populated::{populated_pages, zero_pfn_pages};
pub use region::HostRegion;
pub use tracker::{HostDirtyTracker, HostTrackerConfig};
