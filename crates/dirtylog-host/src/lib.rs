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

#![warn(missing_docs)]

pub mod error;
mod sys;
mod watch;

pub use error::HostError;
