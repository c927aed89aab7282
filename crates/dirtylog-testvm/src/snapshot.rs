//! A harness guest restored from a snapshot that can be snapshotted again: a [`KvmTarget`]
//! with a dirty tracker over its memslots and vCPU state saving, so that `dirtylog snapshot
//! create --parent` continues a chain of the built-in guest in another process.
//!
//! | engine trait | here |
//! |---|---|
//! | [`MigrationTarget`], [`VcpuRestore`] | the [`KvmTarget`]'s: restore fills it, [`VcpuRestore::resume`] starts its vCPU threads |
//! | [`MigrationMemory`] | the target's regions; VMM bitmaps of the system and device slots, set whole at every pause (the mailbox writes the device slot, which KVM does not see, and the system slot holds VMM-written words), as [`KvmSource`](crate::migrate::KvmSource) does for the system slot |
//! | [`DirtyTracker`] | a [`KvmDirtyTracker`] over every memslot (dirty-log or clear-log without `INITIALLY_SET`: the ring needs enabling before the vCPUs exist, which the target has created) |
//! | [`Vcpus`] | the runner's pause and resume; the vCPU state saved on each vCPU's own thread with the pacing rate it was restored with |

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use dirtylog::sync::lock;
use dirtylog::DirtyBitmap;
use dirtylog_kvm::{KvmDirtyTracker, TrackerOptions};
use dirtylog_migrate::wire::{Region, StreamHeader};
use dirtylog_migrate::{
    DirtyTracker, MigrationMemory, MigrationSource, MigrationTarget, RegionMemory, TrackerKind,
    VcpuRestore, Vcpus, VmError,
};

use crate::migrate::{encode_pacing, KvmTarget, TargetOptions, PACING_SECTION, STOP_TIMEOUT};
use crate::vcpu_state::VcpuSnapshot;

const PAGE: u64 = 4096;

fn err(msg: impl Into<String>) -> VmError {
    msg.into().into()
}

/// A restored harness guest that is both a restore target and a snapshot source.
pub struct RestoredGuest {
    // Drop order: the tracker (which names the memslots) before the target owning them.
    tracker: Arc<KvmDirtyTracker>,
    target: KvmTarget,
    /// Per region: the VMM's writes, or `None` for a region only the guest writes.
    vmm: Vec<Option<DirtyBitmap>>,
    tracking: AtomicBool,
}

impl std::fmt::Debug for RestoredGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoredGuest")
            .field("target", &self.target)
            .field("tracker", &self.tracker.kind())
            .finish_non_exhaustive()
    }
}

impl RestoredGuest {
    /// An empty VM for `header`'s guest (as [`KvmTarget::new`]) tracked with `kind` once
    /// [`DirtyTracker::start`] is called. `kind` must be dirty-log or clear-log.
    pub fn new(
        header: &StreamHeader,
        opts: &TargetOptions,
        kind: TrackerKind,
    ) -> Result<Self, VmError> {
        if kind.ring_entries().is_some() {
            return Err(err(
                "a restored test guest is tracked with dirty-log or clear-log: the dirty ring \
                 must be enabled before the vCPUs exist, and the restore creates them first",
            ));
        }
        let target = KvmTarget::new(header, opts)?;
        let vm = &target._vm;
        KvmDirtyTracker::enable_with(
            vm.fd(),
            kind,
            &TrackerOptions {
                // The first diff holds what the guest wrote, not every page.
                initially_set: false,
                ring_soft_full: None,
            },
        )?;
        let regions = target.regions();
        let mut slots = Vec::with_capacity(regions.len());
        for r in &regions {
            let s = vm
                .slot(r.slot)
                .ok_or_else(|| err(format!("the target has no memslot {}", r.slot)))?;
            slots.push(dirtylog_kvm::Slot {
                slot: s.slot,
                guest_phys_addr: s.guest_phys_addr,
                memory_size: s.npages * PAGE,
                userspace_addr: s.mem.host_addr(),
                flags: s.flags,
            });
        }
        // SAFETY: `slots` are the target's memslots exactly as its `KvmVm` created them (id,
        // guest address, size, host memory, flags), and nothing changes them afterwards: the
        // target never touches them again (only this tracker toggles their logging). Their
        // memory is pinned by the `KvmVm` and the target's `mems`, both owned by `target`,
        // which is dropped after the tracker (field order).
        let tracker = Arc::new(unsafe {
            KvmDirtyTracker::with_options(vm.shared_fd(), &slots, kind, TrackerOptions::default())
        }?);
        let last = regions.len().saturating_sub(1);
        let vmm = regions
            .iter()
            .enumerate()
            .map(|(i, r)| (i == 0 || i == last).then(|| DirtyBitmap::new(r.size / PAGE)))
            .collect();
        Ok(RestoredGuest {
            tracker,
            target,
            vmm,
            tracking: AtomicBool::new(false),
        })
    }

    /// The target inside (its progress, mailbox, errors).
    pub fn target(&self) -> &KvmTarget {
        &self.target
    }

    /// Stop the guest; the first vCPU error, if any.
    pub fn shutdown(self) -> Result<(), VmError> {
        let _ = DirtyTracker::stop(&self);
        let RestoredGuest {
            tracker, target, ..
        } = self;
        drop(tracker);
        target.shutdown()
    }
}

impl MigrationTarget for RestoredGuest {
    type Memory = Self;
    type Vcpus = Self;

    fn memory(&self) -> &Self {
        self
    }

    fn vcpus(&self) -> &Self {
        self
    }

    fn guest_progress(&self) -> u64 {
        self.target.guest_writes()
    }
}

impl MigrationSource for RestoredGuest {
    type Memory = Self;
    type Tracker = Self;
    type Vcpus = Self;

    fn memory(&self) -> &Self {
        self
    }

    fn tracker(&self) -> &Self {
        self
    }

    fn vcpus(&self) -> &Self {
        self
    }

    fn guest_progress(&self) -> u64 {
        self.target.guest_writes()
    }
}

impl MigrationMemory for RestoredGuest {
    fn page_size(&self) -> u32 {
        PAGE as u32
    }

    fn regions(&self) -> Vec<Region> {
        self.target.regions()
    }

    fn region_memory(&self, index: usize) -> Option<RegionMemory> {
        self.target.region_memory(index)
    }

    fn vmm_bitmap(&self, index: usize) -> Option<&DirtyBitmap> {
        self.vmm.get(index)?.as_ref()
    }
}

impl VcpuRestore for RestoredGuest {
    fn restore_state(&self, vcpu: u32, blob: &[u8]) -> Result<(), VmError> {
        self.target.restore_state(vcpu, blob)
    }

    fn resume(&self) -> Result<(), VmError> {
        VcpuRestore::resume(&self.target)
    }
}

impl DirtyTracker for RestoredGuest {
    fn kind(&self) -> TrackerKind {
        self.tracker.kind()
    }

    fn start(&self) -> Result<(), VmError> {
        if self.tracking.swap(true, Ordering::AcqRel) {
            return Err(err("dirty tracking is already on"));
        }
        if let Err(e) = self.tracker.start() {
            self.tracking.store(false, Ordering::Release);
            return Err(e.into());
        }
        Ok(())
    }

    fn harvest(&self, index: usize, out: &mut [u64]) -> Result<(), VmError> {
        Ok(self.tracker.harvest(index, out)?)
    }

    fn clear(&self, index: usize, first_page: u64, bits: &[u64]) -> Result<(), VmError> {
        Ok(self.tracker.clear(index, first_page, bits)?)
    }

    fn stop(&self) -> Result<(), VmError> {
        if !self.tracking.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        Ok(self.tracker.stop()?)
    }
}

impl Vcpus for RestoredGuest {
    fn vcpu_count(&self) -> u32 {
        lock(&self.target.restored).len() as u32
    }

    fn pause(&self) -> Result<(), VmError> {
        self.target.pause(STOP_TIMEOUT)?;
        // Every writer is stopped: the VMM-written slots go whole into the member.
        for b in self.vmm.iter().flatten() {
            b.set_all();
        }
        Ok(())
    }

    fn resume(&self) -> Result<(), VmError> {
        self.target.unpause()
    }

    fn save_state(&self) -> Result<Vec<Vec<u8>>, VmError> {
        let guard = lock(&self.target.runner);
        let runner = guard
            .as_ref()
            .ok_or_else(|| err("save_vcpu_state before the guest was resumed"))?;
        if !runner.is_paused() || !runner.states().iter().all(|s| s.is_parked()) {
            return Err(err("save_vcpu_state while the vCPUs are not all paused"));
        }
        let rate = lock(&self.target.restored)
            .first()
            .copied()
            .flatten()
            .unwrap_or(None);
        (0..self.vcpu_count())
            .map(|i| {
                // On the vCPU's own thread, which owns its fd.
                let spec = self.target.spec.clone();
                let mut s = runner
                    .with_paused_vcpu(i as usize, move |fd| VcpuSnapshot::save(fd, i, &spec))??;
                s.set_vmm_section(PACING_SECTION, encode_pacing(rate))?;
                Ok(s.encode())
            })
            .collect()
    }
}
