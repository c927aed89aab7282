//! What the migration engines need from a VM: [`MigrationSource`] on the sending side,
//! [`MigrationTarget`] on the receiving side. Both are small on purpose: a KVM VMM implements
//! them in a few dozen lines over its memslots, its dirty-log tracker and its vCPU threads.
//!
//! Regions are named by their **index** in [`MigrationSource::regions`] (the order of the
//! stream header's memory map), not by slot id; an implementation maps the index to its slot.

use crate::error::VmError;
use crate::vmmbitmap::VmmDirtyBitmap;
use crate::wire::Region;

/// Raw access to one region of guest memory: `len` bytes at `ptr`, valid for the lifetime of
/// the VM. Raw because vCPUs write the memory while the engine reads it, so no Rust reference
/// to it may exist; the engine copies from it with word-sized relaxed atomic loads (see
/// [`crate::guestmem`]).
#[derive(Clone, Copy, Debug)]
pub struct RegionMemory {
    /// First byte of the region in the host address space; at least 8-byte aligned.
    pub ptr: *mut u8,
    /// Size of the region in bytes, equal to its [`Region::size`].
    pub len: usize,
}

// SAFETY: a `RegionMemory` is an address and a length; every access through it goes through
// `crate::guestmem`, whose functions state their own concurrency contracts. The VM guarantees
// the mapping outlives the migration (trait contracts below).
unsafe impl Send for RegionMemory {}
// SAFETY: as for `Send`.
unsafe impl Sync for RegionMemory {}

/// The VM being migrated away: its memory layout and memory, its dirty tracker, and control
/// of its vCPUs.
///
/// # Dirty tracking contract
/// - [`start_tracking`](Self::start_tracking) is called once, before the first
///   [`harvest`](Self::harvest) and before any page is read. From then on, every write to guest
///   memory by a vCPU must show up in a later `harvest` — unless it was made before a
///   [`clear`](Self::clear) covering the page (then the engine copies the page after it).
/// - `harvest(region, out)` ORs the pages dirtied since the previous harvest (or clear) into
///   `out`, one bit per page in KVM's little-endian order, `out.len() == npages.div_ceil(64)`.
///   Trackers that re-arm on read (legacy `KVM_GET_DIRTY_LOG`) re-arm here. With manual protect
///   (`KVM_CLEAR_DIRTY_LOG`) this is the GET only: bits stay set until `clear`. With the dirty
///   ring, harvest every vCPU's ring **and reset the rings** before returning: the engine treats
///   the returned pages as clean (copies them) as soon as `harvest` returns.
/// - `clear(region, first_page, bits)` re-arms the pages whose bits are set in `bits` (bit `i`
///   is page `first_page + i`; `first_page` is a multiple of 64). The engine calls it once per
///   chunk, just before copying the first page of that chunk, and only with bits it has
///   harvested. Trackers that re-arm in `harvest` make it a no-op.
/// - [`vmm_bitmap`](Self::vmm_bitmap) is the VMM's own record of its writes (device models,
///   emulated DMA) that the tracker cannot see; the engine takes its bits at every harvest and
///   merges them with the tracker's into one deduplicated dirty set.
///
/// # Memory contract
/// [`memory`](Self::memory) points at mappings that stay valid until the VM is dropped. While
/// the guest runs, only vCPUs and the VMM write them (the engine only reads); between
/// [`pause`](Self::pause) and [`resume`](Self::resume) nobody writes them at all, vCPUs and
/// device models alike.
///
/// Every method takes `&self`: the engine calls them from its control thread while its sender
/// threads read memory.
pub trait MigrationSource: Sync {
    /// Page size of the dirty log and of the stream, a power of two ≥ 4096.
    fn page_size(&self) -> u32;
    /// Number of vCPUs, the number of blobs [`save_vcpu_state`](Self::save_vcpu_state) returns.
    fn vcpu_count(&self) -> u32;
    /// The memory map: slot, guest physical address and size of each region.
    fn regions(&self) -> Vec<Region>;
    /// The host mapping of region `index`.
    fn memory(&self, index: usize) -> RegionMemory;
    /// Start dirty tracking on every region.
    fn start_tracking(&self) -> Result<(), VmError>;
    /// OR the tracker's dirty bits of region `index` into `out` (see the contract above).
    fn harvest(&self, index: usize, out: &mut [u64]) -> Result<(), VmError>;
    /// Re-arm the pages of `bits` in region `index` from `first_page` (manual protect); a
    /// no-op for trackers that re-arm in [`harvest`](Self::harvest).
    fn clear(&self, index: usize, first_page: u64, bits: &[u64]) -> Result<(), VmError>;
    /// Stop dirty tracking. Called once at the end, after success or failure.
    fn stop_tracking(&self) -> Result<(), VmError>;
    /// The VMM-side dirty bitmap of region `index`, if the VMM writes guest memory itself.
    fn vmm_bitmap(&self, index: usize) -> Option<&VmmDirtyBitmap>;
    /// Stop every vCPU and every other writer of guest memory; returns once they are stopped.
    fn pause(&self) -> Result<(), VmError>;
    /// Let the vCPUs run again.
    fn resume(&self) -> Result<(), VmError>;
    /// Hold every vCPU out of guest mode for `percent`% of each period (0 = no throttling).
    fn throttle(&self, percent: u8) -> Result<(), VmError>;
    /// The saved state of each vCPU, in vCPU order; called while paused. Each blob is at most
    /// [`MAX_VCPU_BLOB`](crate::wire::MAX_VCPU_BLOB) bytes.
    fn save_vcpu_state(&self) -> Result<Vec<Vec<u8>>, VmError>;
    /// A counter that grows while the guest makes progress (for reports and tests).
    fn guest_progress(&self) -> u64;
}

/// The VM being migrated in: created empty from the stream header, filled by the engine,
/// resumed only once every region's hash matches the source's.
///
/// # Memory contract
/// Memory is zero-filled when the target is created (anonymous mappings are), and nobody but
/// the engine touches it until [`resume`](Self::resume). The engine writes disjoint ranges of
/// it from several threads at once.
pub trait MigrationTarget: Sync {
    /// The host mapping of region `index` of the stream header; `len` must equal the
    /// region's size.
    fn memory(&self, index: usize) -> RegionMemory;
    /// Load the state of vCPU `vcpu_id` (below the header's vCPU count), as saved by the
    /// source's [`MigrationSource::save_vcpu_state`].
    fn restore_vcpu_state(&self, vcpu_id: u32, blob: &[u8]) -> Result<(), VmError>;
    /// Start the guest. Called at most once, after every check has passed.
    fn resume(&self) -> Result<(), VmError>;
    /// A counter that grows while the guest makes progress.
    fn guest_progress(&self) -> u64;
}
