//! # dirtylog-testvm
//!
//! dirtylog's own test VMM on `/dev/kvm`, built on [`dirtylog_kvm`]: everything that exists
//! to run the project's test guests. Not a library for other VMMs (those use
//! `dirtylog-kvm` and `dirtylog-migrate` directly).
//!
//! - [`memory`], [`vm`]: anonymous guest memory, a VM owning its memslots (logging toggled at
//!   run time) and its vCPUs with their dirty rings mapped.
//! - [`caps`]: what the running kernel offers ([`Caps`], `dirtylog caps`).
//! - [`x86`], [`guest`], [`runner`], [`machine`]: a VMM that boots vCPUs straight into long
//!   mode and runs generated guest programs (stamping, memstress, a tunable dirtier, a
//!   scripted writer, a dirtier with a device request), one host thread per vCPU, handling
//!   sync, pacing, device-port and dirty-ring-full exits, and throttling vCPUs.
//! - [`selftest`]: the kernel's `dirty_log_test` protocol on KVM, through
//!   [`dirtylog::selftest::run`].
//! - [`perf`]: the kernel's `dirty_log_perf_test` on KVM ([`KvmPerf`], through
//!   [`dirtylog::perf::run`]), timing our API against the bare ioctls.
//! - [`migrate`]: the live-migration demo's source and target on these guests.
//! - [`reaper`], [`dirty_limit`]: a migration source's dirty-ring reaper and its per-vCPU
//!   dirty limit (QEMU's dirty-limit), shared by the demo's source and the [`pc`].
//!
//! ## Host quirks handled here (measured on the project's PVM host, Linux 6.18)
//!
//! - `KVM_EXIT_DIRTY_RING_FULL` comes late: the vCPU keeps running past the soft limit until its
//!   next exit to userspace or host interrupt, and the exit lands at an arbitrary guest
//!   instruction, sometimes *before* the faulting write was logged. [`runner::Runner::watch_rings`]
//!   kicks vCPUs whose ring reached the soft limit (without it a fast guest overflows the ring
//!   and KVM overwrites unharvested entries); [`machine::Machine::harvest_rings`] detects an
//!   overflowed ring ([`Error::RingOverflow`]).
//! - A vCPU kicked out of the guest (a pause) may have had its store logged without the store
//!   having retired: migration does not care (the page is re-sent), but the self-test's check
//!   would, so [`selftest::KvmSelftest`] completes such a stamping store itself.
//! - Guest instructions are slow (about 1 µs each), so guest loops are kept short.

pub use dirtylog_kvm::{error, ring, sys, vcpu_state};

pub mod caps;
pub mod dirty_limit;
pub mod dirty_rate;
pub mod guest;
pub mod kernels;
pub mod machine;
pub mod memory;
pub mod migrate;
pub mod pc;
pub mod perf;
pub mod reaper;
pub mod runner;
pub mod selftest;
pub mod snapshot;
pub mod target;
pub mod vm;
pub mod x86;

pub use caps::{caps_report, Caps};
pub use dirtylog_kvm::{
    DirtyRings, Error, HarvestStats, Op, Result, RingFlavor, RingMap, VcpuSnapshot,
};
pub use guest::Program;
pub use machine::{Machine, MachineConfig, TestRegion};
pub use memory::{GuestMemory, MemoryOptions};
pub use perf::KvmPerf;
pub use runner::{Runner, VcpuRunState};
pub use selftest::KvmSelftest;
pub use vm::{KvmVcpu, KvmVm, RingSetup, Slot};
