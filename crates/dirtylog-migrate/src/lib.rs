//! Pre-copy live migration on top of dirtylog's dirty page tracking, for any VMM: the engine
//! knows no hypervisor. A VMM composes a [`MigrationSource`] from parts it already has —
//! guest memory ([`MigrationMemory`], implemented for vm-memory's
//! [`GuestMemoryMmap`](vm_memory::GuestMemoryMmap)), a [`DirtyTracker`] (such as
//! `dirtylog_kvm::KvmDirtyTracker`), its vCPU control ([`Vcpus`]) and optionally its devices'
//! state ([`DeviceState`]) — and migrates it over TCP or Unix sockets (any [`Transport`]) to a
//! [`MigrationTarget`] built from the stream header.
//!
//! - [`send`](mod@send) and [`recv`]: the engines. The source side runs a bulk pass and rounds of
//!   harvest-and-send over one or more connections, converges (or throttles, or gives up) and
//!   switches over; the destination side validates and applies the streams, restores vCPUs
//!   and devices, checks every region's hash and only then resumes the guest and acknowledges.
//! - [`vm`]: the two compositions the engines drive, [`MigrationSource`] and
//!   [`MigrationTarget`], over [`memory`], [`vcpu`] and [`device`]; [`soft`] implements them
//!   in software for tests and benchmarks (`dirtylog-testvm` implements them on real KVM
//!   guests).
//! - [`protocol`]: who sends what, from the preamble to the acknowledgement.
//! - [`transport`]: connections ([`Transport`]), addresses (`host:port`, `unix:/path`),
//!   connecting and listening.
//! - [`convergence`]: the downtime estimate, limits and QEMU's auto-converge policy.
//! - [`wire`]: the versioned, framed, CRC-checked stream format between the source and the
//!   destination, with a zero-copy encoder and a validating, allocation-free decoder.
//! - The VMM's own writes to guest memory, which a hypervisor's dirty log does not see, are
//!   a [`dirtylog::DirtyBitmap`] per region ([`MigrationMemory::vmm_bitmap`]); with guest
//!   memory in a `GuestMemoryMmap<`[`VmmBitmap`]`>` vm-memory records them by itself.
//! - [`stats`]: migration statistics under QEMU's names.
//!
//! # A minimal source
//!
//! Guest memory from vm-memory, a tracker that reports every page dirty at every harvest, and
//! vCPUs with nothing to pause, migrated over a Unix socket pair into a software target:
//!
//! ```
//! use std::os::unix::net::UnixStream;
//! use std::sync::atomic::{AtomicBool, Ordering};
//!
//! use dirtylog_migrate::soft::SoftVm;
//! use dirtylog_migrate::{
//!     receive_on, send_on, DirtyTracker, MigrationSource, ReceiveConfig, SendConfig,
//!     TimeoutPolicy, TrackerError, TrackerKind, Vcpus, VmError,
//! };
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
//!
//! /// Every page is dirty, always: each round resends everything, so pre-copy never converges
//! /// and the configuration below switches over after one round (a real VMM uses
//! /// `dirtylog_kvm::KvmDirtyTracker`).
//! struct AllDirty;
//! impl DirtyTracker for AllDirty {
//!     fn kind(&self) -> TrackerKind {
//!         TrackerKind::DirtyLog
//!     }
//!     fn start(&self) -> Result<(), TrackerError> {
//!         Ok(())
//!     }
//!     fn harvest(&self, _region: usize, out: &mut [u64]) -> Result<(), TrackerError> {
//!         out.fill(u64::MAX); // the engine masks the bits past the region's end
//!         Ok(())
//!     }
//!     fn stop(&self) -> Result<(), TrackerError> {
//!         Ok(())
//!     }
//! }
//!
//! /// One vCPU that is never running (a real VMM kicks its vCPU threads out of KVM_RUN).
//! struct Parked(AtomicBool);
//! impl Vcpus for Parked {
//!     fn vcpu_count(&self) -> u32 {
//!         1
//!     }
//!     fn pause(&self) -> Result<(), VmError> {
//!         self.0.store(true, Ordering::SeqCst);
//!         Ok(())
//!     }
//!     fn resume(&self) -> Result<(), VmError> {
//!         self.0.store(false, Ordering::SeqCst);
//!         Ok(())
//!     }
//!     fn save_state(&self) -> Result<Vec<Vec<u8>>, VmError> {
//!         // The software target below expects its own vCPU format.
//!         Ok(vec![SoftVm::idle_vcpu_state()])
//!     }
//! }
//!
//! struct Source {
//!     memory: GuestMemoryMmap,
//!     vcpus: Parked,
//! }
//! impl MigrationSource for Source {
//!     type Memory = GuestMemoryMmap;
//!     type Tracker = AllDirty;
//!     type Vcpus = Parked;
//!     fn memory(&self) -> &GuestMemoryMmap {
//!         &self.memory
//!     }
//!     fn tracker(&self) -> &AllDirty {
//!         &AllDirty
//!     }
//!     fn vcpus(&self) -> &Parked {
//!         &self.vcpus
//!     }
//! }
//!
//! let memory = GuestMemoryMmap::<()>::from_ranges(&[
//!     (GuestAddress(0), 1 << 20),
//!     (GuestAddress(1 << 32), 1 << 20),
//! ])?;
//! memory.write_obj(0xfeed_u64, GuestAddress((1 << 32) + 4096))?;
//! let source = Source { memory, vcpus: Parked(AtomicBool::new(false)) };
//!
//! let (a, b) = UnixStream::pair()?;
//! let (target, report) = std::thread::scope(|s| {
//!     let receiver = s.spawn(|| {
//!         receive_on(b, Vec::new(), &ReceiveConfig::default(), |header| {
//!             SoftVm::target(header, TrackerKind::DirtyLog)
//!         })
//!     });
//!     let config = SendConfig {
//!         downtime_limit: std::time::Duration::ZERO, // never met: stop at the round limit
//!         max_rounds: 1,
//!         on_timeout: TimeoutPolicy::Switchover,
//!         ..SendConfig::default()
//!     };
//!     let sent = send_on(&source, vec![a], &config, &mut |_| {});
//!     (receiver.join().unwrap(), sent)
//! });
//! let (target, _) = target?;
//! let report = report?;
//! assert_eq!(report.total, 2 << 20);
//! assert_eq!(report.rounds.len(), 3); // bulk, one round, final
//! assert_eq!(target.snapshot(1)[4096..4104], 0xfeed_u64.to_ne_bytes());
//! assert!(source.vcpus.0.load(Ordering::SeqCst)); // the source stays paused
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

pub mod compress;
pub mod convergence;
pub mod device;
pub mod digest;
pub mod error;
mod guestmem;
pub mod memory;
pub mod protocol;
pub mod recv;
pub mod send;
pub mod soft;
pub mod stats;
pub mod transport;
pub mod vcpu;
pub mod vm;
pub mod wire;

pub use compress::Compression;
pub use convergence::{AutoConverge, SwitchoverReason, TimeoutPolicy};
pub use device::{DeviceSection, DeviceState};
pub use digest::Verify;
pub use dirtylog::bitmap::VmmBitmap;
pub use dirtylog::{DirtyTracker, TrackerError, TrackerKind};
pub use error::{MigrateError, VmError};
pub use memory::{MigrationMemory, RegionBitmap, RegionMemory, SlotTable};
pub use recv::{receive, receive_on, ReceiveConfig};
pub use send::{send, send_on, Phase, Progress, SendConfig};
pub use stats::{
    CompressionStats, DowntimeBreakdown, MigrationStats, ReceiveReport, RoundReport, SendReport,
};
pub use transport::{connect, listen, Address, Listener, Stream, Transport};
pub use vcpu::{Unsupported, VcpuRestore, Vcpus};
pub use vm::{MigrationSource, MigrationTarget};
