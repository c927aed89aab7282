//! # dirtylog-kvm
//!
//! The `/dev/kvm` backend of `dirtylog`: KVM's dirty-log interfaces used for real, and a
//! minimal x86-64 VMM whose guests dirty memory in known patterns.
//!
//! - [`sys`]: safe wrappers over `KVM_GET_DIRTY_LOG` (into a caller-owned buffer),
//!   `KVM_CLEAR_DIRTY_LOG`, `KVM_ENABLE_CAP` (manual protect, dirty ring),
//!   `KVM_RESET_DIRTY_RINGS` and `KVM_CHECK_EXTENSION`, with typed errors ([`Error`]).
//! - [`caps`]: what the running kernel offers ([`Caps`], `dirtylog caps`).
//! - [`memory`], [`vm`]: anonymous guest memory, memslots with logging toggled at run time,
//!   vCPUs with their dirty rings mapped ([`ring`]).
//! - [`x86`], [`guest`], [`runner`], [`machine`]: a VMM that boots vCPUs straight into long
//!   mode and runs generated guest programs (stamping, memstress, a tunable dirtier, a
//!   scripted writer, a dirtier with a device request), one host thread per vCPU, handling
//!   sync, pacing, device-port and dirty-ring-full exits, and throttling vCPUs.
//! - [`selftest`]: the kernel's `dirty_log_test` protocol on KVM, through
//!   [`dirtylog::selftest::run`].
//! - [`vcpu_state`]: saving and restoring a parked vCPU's registers, MSRs, XSAVE and events
//!   as a versioned little-endian blob, for live migration.
//! - [`perf`]: the kernel's `dirty_log_perf_test` on KVM ([`KvmPerf`], through
//!   [`dirtylog::perf::run`]), timing our API against the bare ioctls.
//!
//! Tests that need `/dev/kvm` fail (never skip) when it is missing.
//!
//! ## Host quirks handled here (measured on the project's PVM host, Linux 6.18)
//!
//! - `KVM_EXIT_DIRTY_RING_FULL` comes late: the vCPU keeps running past the soft limit until its
//!   next exit to userspace or host interrupt, and the exit lands at an arbitrary guest
//!   instruction, sometimes *before* the faulting write was logged. [`runner::Runner::watch_rings`]
//!   kicks vCPUs whose ring reached the soft limit (without it a fast guest overflows the ring
//!   and KVM overwrites unharvested entries); [`selftest::KvmSelftest`] drains vCPUs blocked on
//!   a full ring before its final collection; [`machine::Machine::harvest_rings`] detects an
//!   overflowed ring ([`Error::RingOverflow`]).
//! - Guest instructions are slow (about 1 µs each), so guest loops are kept short.

pub mod caps;
pub mod error;
pub mod guest;
pub mod machine;
pub mod memory;
pub mod perf;
pub mod ring;
pub mod runner;
pub mod selftest;
pub mod sys;
pub mod vcpu_state;
pub mod vm;
pub mod x86;

pub use caps::{caps_report, Caps};
pub use error::{Error, Op, Result};
pub use guest::Program;
pub use machine::{Machine, MachineConfig, TestRegion, Tracking};
pub use memory::{GuestMemory, MemoryOptions};
pub use perf::KvmPerf;
pub use ring::{DirtyRings, HarvestStats, RingMap};
pub use runner::{Runner, VcpuState};
pub use selftest::KvmSelftest;
pub use sys::RingFlavor;
pub use vcpu_state::VcpuSnapshot;
pub use vm::{KvmVcpu, KvmVm, RingSetup, Slot};
