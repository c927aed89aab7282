//! What the migration engines need from a VM, composed of small parts the VMM already has:
//! [`MigrationSource`] on the sending side, [`MigrationTarget`] on the receiving side.
//!
//! | part | source | target |
//! |---|---|---|
//! | guest memory | [`MigrationMemory`] | [`MigrationMemory`] |
//! | dirty tracking | [`DirtyTracker`] (e.g. `dirtylog_kvm::KvmDirtyTracker`) | — |
//! | vCPUs | [`Vcpus`]: pause, resume, throttle, save | [`VcpuRestore`]: restore, resume |
//! | devices (optional) | [`DeviceState::save_devices`] | [`DeviceState::restore_device`] |
//!
//! A VMM implements each on whatever type owns that part (or one type implements them all)
//! and returns references from the composition: the engines stay generic, with no dynamic
//! dispatch in the hot path.
//!
//! # Memory contract
//! [`MigrationMemory::region_memory`] points at mappings that stay valid for the migration
//! (see [`RegionMemory::new`](crate::RegionMemory::new)). On a source, while the guest runs,
//! only vCPUs and the VMM write them (the engine only reads); between [`Vcpus::pause`] and
//! the resume nobody writes them at all, vCPUs and device models alike. On a target, memory is
//! zero-filled when created and nobody but the engine touches it until
//! [`VcpuRestore::resume`]; the engine writes disjoint ranges of it from several threads.
//!
//! # Dirty tracking
//! The tracker's region indexes are the memory's: region `i` of
//! [`MigrationMemory::regions`] is region `i` of the [`DirtyTracker`]. The engine follows the
//! tracker's contract: [`start`](DirtyTracker::start) once, then `harvest` per region each
//! round (merged with the memory's [`vmm_bitmap`](MigrationMemory::vmm_bitmap)), a `clear` per
//! chunk just before copying its first page (manual protect), [`stop`](DirtyTracker::stop)
//! at the end.

use dirtylog::DirtyTracker;

use crate::device::DeviceState;
use crate::memory::MigrationMemory;
use crate::vcpu::{VcpuRestore, Vcpus};

/// The VM being migrated away: its memory, its dirty tracker, its vCPUs and (optionally) its
/// devices. See the [module docs](self).
pub trait MigrationSource: Sync {
    /// Guest memory.
    type Memory: MigrationMemory + ?Sized;
    /// The dirty tracker over [`Self::Memory`]'s regions, in the same order.
    type Tracker: DirtyTracker + ?Sized;
    /// vCPU control.
    type Vcpus: Vcpus + ?Sized;

    /// The guest's memory.
    fn memory(&self) -> &Self::Memory;
    /// The dirty tracker.
    fn tracker(&self) -> &Self::Tracker;
    /// The vCPUs.
    fn vcpus(&self) -> &Self::Vcpus;
    /// The devices whose state travels with the guest; `None` (the default) for none.
    fn devices(&self) -> Option<&dyn DeviceState> {
        None
    }
    /// A counter that grows while the guest makes progress, for reports and tests; 0 (the
    /// default) if the VMM has none.
    fn guest_progress(&self) -> u64 {
        0
    }
}

/// The VM being migrated in: created empty from the stream header, filled by the engine,
/// resumed only once every region's hash matches the source's. See the [module docs](self).
pub trait MigrationTarget: Sync {
    /// Guest memory, with the stream header's regions in its order.
    type Memory: MigrationMemory + ?Sized;
    /// vCPU restore.
    type Vcpus: VcpuRestore + ?Sized;

    /// The guest's memory.
    fn memory(&self) -> &Self::Memory;
    /// The vCPUs.
    fn vcpus(&self) -> &Self::Vcpus;
    /// The devices to restore; `None` (the default) for a VM without devices, which fails a
    /// stream that carries any.
    fn devices(&self) -> Option<&dyn DeviceState> {
        None
    }
    /// A counter that grows while the guest makes progress; 0 (the default) if none.
    fn guest_progress(&self) -> u64 {
        0
    }
}
