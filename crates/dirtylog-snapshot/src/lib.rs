//! Incremental snapshots of a running guest for any VMM that adopts dirtylog's tracker: a
//! full checkpoint, then diffs holding only the pages dirtied since the one before, taken in
//! `stop`, `live` or `background` mode; crash-safe, checksummed chains of sparse files; eager
//! and lazy restore; verify, merge and info.
//!
//! A snapshot is a migration into a file: the crate is generic over dirtylog-migrate's
//! traits. [`Snapshotter`] takes members from a [`MigrationSource`](dirtylog_migrate::MigrationSource);
//! [`restore()`] builds a [`MigrationTarget`](dirtylog_migrate::MigrationTarget) with the same
//! `make_target` closure `dirtylog_migrate::receive` takes. `docs/SNAPSHOT.md` describes the
//! format and why a killed writer never damages a chain.
//!
//! - [`mod@format`]: the manifest and the files of a member.
//! - `write`: the crash-safe member writer.
//! - [`chain`]: [`Chain::open`] and its checks.
//! - [`create`]: [`Snapshotter`], stop and live modes; `background` for background mode.
//! - [`restore`](mod@restore): eager restore; `lazy` for lazy restore.
//! - [`verify()`], [`merge()`], [`info()`].
//!
//! # Example
//!
//! A software guest writing pages, a full snapshot and two diffs, restored into a new VM:
//!
//! ```
//! use dirtylog_migrate::soft::{SoftConfig, SoftVm, Workload};
//! use dirtylog_migrate::wire::Region;
//! use dirtylog_migrate::TrackerKind;
//! use dirtylog_snapshot::{restore, CreateConfig, RestoreOptions, SnapshotMode, Snapshotter};
//!
//! let vm = SoftVm::source(&SoftConfig {
//!     page_size: 4096,
//!     regions: vec![Region { slot: 0, gpa: 0, size: 4 << 20 }],
//!     vcpus: 1,
//!     tracker: TrackerKind::ClearLog,
//!     workload: Workload { first_page: 0, pages: 256, rate: Some(10_000), random: true, vmm_rate: None },
//!     nonzero_percent: 30,
//! })?;
//! let dir = tempfile::tempdir()?;
//! let mut snap = Snapshotter::new(&vm, dir.path(), None)?;
//! let live = CreateConfig { mode: SnapshotMode::Live, ..CreateConfig::default() };
//! assert_eq!(snap.take(&live)?.kind, "full");
//! assert_eq!(snap.take(&live)?.kind, "diff");
//! let last = snap.take(&CreateConfig::default())?; // stop mode
//! snap.finish()?;
//! // Checked (every checksum, then the memory digest) before the new guest runs.
//! let (restored, stats) = restore(
//!     &last.path,
//!     |header| SoftVm::target(header, TrackerKind::DirtyLog),
//!     &RestoreOptions::default(),
//! )?;
//! assert_eq!(stats.members, 3);
//! assert!(!restored.is_paused());
//! # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
//! ```

#![warn(missing_docs)]

mod background;
pub mod chain;
mod claims;
pub mod create;
pub mod error;
pub mod format;
pub mod info;
mod lazy;
pub mod merge;
pub mod restore;
pub mod verify;
mod write;

pub use chain::Chain;
pub use create::{CreateConfig, Progress, ProgressFn, SnapshotStats, Snapshotter};
pub use error::SnapshotError;
pub use format::{Kind, Manifest, SnapshotMode, FORMAT};
pub use info::{info, Info, MemberInfo};
pub use merge::merge;
pub use restore::{restore, RestoreOptions, RestoreStats};
pub use verify::{verify, VerifyReport};
