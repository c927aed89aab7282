//! # dirtylog-kvm
//!
//! KVM's dirty-log interfaces for any Rust VMM, over the VMM's own `kvm-ioctls` file
//! descriptors.
//!
//! - [`tracker`]: [`KvmDirtyTracker`], the dirty-log, clear-log and dirty-ring trackers over
//!   the VMM's own `VmFd`, slot table and `VcpuFd`s, implementing [`dirtylog::DirtyTracker`]
//!   (start here).
//! - [`sys`]: safe wrappers over the dirty-log ioctls `kvm-ioctls` lacks or offers only in an
//!   allocating form — `KVM_GET_DIRTY_LOG` into a caller-owned buffer, `KVM_CLEAR_DIRTY_LOG`,
//!   `KVM_RESET_DIRTY_RINGS` — plus `KVM_ENABLE_CAP` of the dirty-log capabilities, with typed
//!   errors ([`Error`]).
//! - [`ring`]: a vCPU's dirty ring mapped from its fd, and a two-phase harvester over every
//!   vCPU's ring built on the core's [`dirtylog::RingHarvester`].
//! - [`vcpu_state`]: saving and restoring a stopped vCPU's registers, MSRs, XSAVE, LAPIC and
//!   events as a versioned little-endian blob, for live migration.
//! - [`vm_state`]: the same for the VM-wide state: the in-kernel PIC and IOAPIC, the PIT and
//!   the kvmclock.
//!
//! Tests that need `/dev/kvm` fail (never skip) when it is missing.
//!
//! ## Host quirks handled here (measured on the project's PVM host, Linux 6.18)
//!
//! - `KVM_EXIT_DIRTY_RING_FULL` comes late: the vCPU keeps running past the soft limit until
//!   its next exit to userspace or host interrupt. A VMM on such a host kicks vCPUs whose ring
//!   reached the soft limit; [`ring::DirtyRings::harvest`] detects an overflowed ring
//!   ([`Error::RingOverflow`]).

#![warn(missing_docs)]

mod blob;
pub mod error;
pub mod ring;
pub mod sys;
pub mod tracker;
pub mod vcpu_state;
pub mod vm_state;

pub use error::{Error, Op, Result};
pub use ring::{DirtyRings, HarvestStats, RingMap, RingsHarvested};
pub use sys::{RingFlavor, VmFdDirtyLogExt};
pub use tracker::{Enabled, KvmDirtyTracker, Slot, TrackerOptions};
pub use vcpu_state::{StateSpec, VcpuSnapshot};
pub use vm_state::VmSnapshot;
