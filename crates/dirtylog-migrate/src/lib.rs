//! Pre-copy live migration on top of dirtylog's dirty page tracking.
//!
//! - [`send`] and [`recv`]: the engines. The source side runs a bulk pass and rounds of
//!   harvest-and-send over one or more TCP connections, converges (or throttles, or gives up)
//!   and switches over; the destination side validates and applies the streams, checks every
//!   region's hash and only then resumes the guest and acknowledges.
//! - [`vm`]: the two traits the engines drive, [`MigrationSource`] and [`MigrationTarget`];
//!   [`soft`] implements both in software for tests and benchmarks (`dirtylog-testvm`
//!   implements them on real KVM guests).
//! - [`convergence`]: the downtime estimate, limits and QEMU's auto-converge policy.
//! - [`wire`]: the versioned, framed, CRC-checked stream format between the source and the
//!   destination, with a zero-copy encoder and a validating, allocation-free decoder.
//! - [`vmmbitmap`]: a dirty bitmap for the VMM's own writes to guest memory, which KVM's
//!   dirty log does not see.
//! - [`stats`]: migration statistics under QEMU's names.

#![warn(missing_docs)]

pub mod convergence;
pub mod error;
mod guestmem;
pub mod recv;
pub mod send;
pub mod soft;
pub mod stats;
pub mod transport;
pub mod vm;
pub mod vmmbitmap;
pub mod wire;

pub use convergence::{AutoConverge, SwitchoverReason, TimeoutPolicy};
pub use error::{MigrateError, VmError};
pub use recv::{receive, receive_on, ReceiveConfig};
pub use send::{send, send_on, Phase, Progress, SendConfig};
pub use stats::{MigrationStats, ReceiveReport, RoundReport, SendReport};
pub use vm::{MigrationSource, MigrationTarget, RegionMemory};
pub use vmmbitmap::VmmDirtyBitmap;
