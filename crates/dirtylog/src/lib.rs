//! # dirtylog
//!
//! Dirty page tracking with KVM's semantics. This crate is the core: memslots, atomic dirty
//! bitmaps, the generic `get_dirty_log_protect` / `clear_dirty_log_protect` / dirty-ring
//! algorithms with KVM's exact errors, the arch hook trait ([`ArchMmu`]) and the slots-lock
//! rule enforced by types ([`SlotsGuard`], in [`guard`]). [`softmmu`] is a reference arch with
//! real per-vCPU TLBs. [`DirtyBitmap`] is the one atomic bitmap every bitmap in the workspace
//! is built on.
//!
//! Cargo features:
//! - `harness` (default): `selftest` (the kernel's `dirty_log_test` protocol) and `perf`
//!   (`dirty_log_perf_test`), generic over backends, with the software MMU's backends. A
//!   library user turns default features off and does not build them or their dependencies.
//! - `vm-memory`: `bitmap::VmmBitmap`, a `DirtyBitmap` behind vm-memory's `Bitmap` traits, so
//!   a `GuestMemoryMmap<VmmBitmap>` logs every write the VMM makes to guest memory.
//!
//! ```
//! use dirtylog::softmmu::{Machine, FlushKind};
//! use dirtylog::{MemoryRegion, KVM_MEM_LOG_DIRTY_PAGES};
//!
//! let m = Machine::new(FlushKind::Ranged, Default::default());
//! m.vm().set_user_memory_region(&MemoryRegion {
//!     slot: 0, flags: KVM_MEM_LOG_DIRTY_PAGES, guest_phys_addr: 0,
//!     memory_size: 67 * 4096, userspace_addr: 0,
//! }).unwrap();
//! let vcpu = m.create_vcpu();
//! vcpu.write_u64(5 * 4096, 42).unwrap();  // a guest write: faults, is logged
//! let mut log = [0u64; 2];
//! m.vm().get_dirty_log(0, &mut log).unwrap();
//! assert_eq!(log, [1 << 5, 0]);
//! ```

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod arch;
pub mod bitmap;
pub mod error;
pub mod guard;
pub mod memslot;
#[cfg(feature = "harness")]
pub mod perf;
pub mod ring;
#[cfg(feature = "harness")]
pub mod selftest;
pub mod softmmu;
pub mod sync;
pub mod tracker;
pub mod vcpu;
pub mod vm;
#[cfg(feature = "vm-memory")]
pub mod vmm_bitmap;

pub use arch::{ArchMmu, Unsupported};
pub use bitmap::{dirty_bitmap_bytes, dirty_bitmap_words, DirtyBitmap};
pub use error::{Error, Result};
pub use guard::{MmuGuard, SlotsGuard};
pub use memslot::{MemoryRegion, Memslot, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY};
pub use ring::{DirtyGfn, RingEntry, RingHarvester};
pub use tracker::{DirtyTracker, TrackerError, TrackerKind};
pub use vcpu::Vcpu;
pub use vm::{Vm, VmConfig};

#[cfg(test)]
mod model_tests;
