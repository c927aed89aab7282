//! A [`Pc`] is both a migration source and a migration target, so a guest that arrived by
//! migration can leave again (back-to-back migrations, [`run`](mod@super::run#migrations)).
//!
//! | engine trait | the PC's part |
//! |---|---|
//! | [`MigrationMemory`] | the RAM regions of the [memory map](super::machine) (no VMM writes: the VMM writes guest RAM only when loading the kernel, before any tracking) |
//! | [`DirtyTracker`] | the VM's [`KvmDirtyTracker`](dirtylog_kvm::KvmDirtyTracker), enabled when the PC was built; with rings, a [reaper](crate::reaper) while tracking |
//! | [`Vcpus`], [`VcpuRestore`] | with rings, a per-vCPU [dirty limit](crate::dirty_limit); the runner's VMM-driven pause; the full vCPU state ([`VcpuSnapshot`]: registers, FPU/XSAVE, XCRs, debug registers, events, MP state, LAPIC, the saveable MSRs) saved and restored on each vCPU's own thread |
//! | [`DeviceState`] | `serial0` (the UART, with queued input), `fw_cfg`, and `kvm-vm`: the in-kernel PIC, IOAPIC, PIT and kvmclock ([`VmSnapshot`]) |
//!
//! A target is a fresh PC of the stream's shape ([`Pc::for_stream`]): its vCPU threads are
//! parked before their first instruction until the engine resumes it.

use std::sync::atomic::Ordering;

use dirtylog::sync::lock;
use dirtylog::DirtyBitmap;
use dirtylog_kvm::vm_state::{VmSnapshot, VM_STATE_VERSION};
use dirtylog_migrate::wire::{Region, StreamHeader};
use dirtylog_migrate::{
    DeviceSection, DeviceState, DirtyTracker, MigrationMemory, MigrationSource, MigrationTarget,
    RegionMemory, TrackerKind, VcpuRestore, Vcpus, VmError,
};

use super::machine::{err, is_pc_stream, Console, Log, Pc, PcConfig};
use crate::vcpu_state::VcpuSnapshot;
use crate::GuestMemory;

/// The device section of the in-kernel irqchip, PIT and clock.
pub const KVM_VM_DEVICE: &str = "kvm-vm";

const PAGE: u64 = 4096;

fn region_memory(mem: &GuestMemory) -> RegionMemory {
    // SAFETY: `mem` is a page-aligned anonymous mapping of `len()` bytes, kept alive by the
    // `Arc` the PC holds for as long as it lives, which outlives any migration that borrows it.
    // The source's pause stops every vCPU (the only writers of guest RAM once the kernel is
    // loaded) before the final round; a target's RAM is touched by nobody but the engine
    // until its vCPUs are resumed.
    unsafe { RegionMemory::new(mem.host_addr() as *mut u8, mem.len()) }
}

impl Pc {
    /// A PC to receive the guest of `header`: its RAM regions must be a PC's (as
    /// [`PcConfig::regions`] lays them out), its vCPU count becomes `smp`. `tracker` and
    /// `huge_pages` are this PC's own (for migrating it on).
    pub fn for_stream(
        header: &StreamHeader,
        tracker: TrackerKind,
        huge_pages: bool,
        console: Console,
        log: Log,
    ) -> Result<Pc, VmError> {
        if u64::from(header.page_size()) != PAGE {
            return Err(err(format!(
                "the stream's page size is {}; a PC's is {PAGE}",
                header.page_size()
            )));
        }
        let regions = header.regions();
        if !is_pc_stream(regions) {
            return Err(err(
                "the stream does not carry a PC (its first region is not the PC's RAM at \
                 guest-physical 0): it comes from `dirtylog demo` without --kernel",
            ));
        }
        let mem_bytes = regions
            .iter()
            .try_fold(0u64, |sum, r| sum.checked_add(r.size))
            .ok_or_else(|| err("the stream's regions overflow"))?;
        let cfg = PcConfig {
            mem_bytes,
            smp: header.vcpu_count(),
            tracker,
            huge_pages,
        };
        if cfg.regions() != regions {
            return Err(err(format!(
                "the stream's memory map {regions:?} is not a PC's of {mem_bytes} bytes"
            )));
        }
        Pc::new(&cfg, console, log)
    }

    /// Ring tracker: entries KVM has pushed into each vCPU's dirty ring since tracking first
    /// started (wrapping), in vCPU order; empty before that and for other trackers.
    pub fn dirty_ring_pushed(&self) -> Vec<u32> {
        crate::dirty_limit::rings_pushed(&self.tracker)
    }

    /// Each vCPU's dirty rate over the last window, ring entries per second, as the dirty
    /// limit measures it (QEMU's `current-rate`); empty when no limit is in force.
    pub fn dirty_limit_rates(&self) -> Vec<u64> {
        self.dirty_limit.rates()
    }

    fn save_vm_devices(&self) -> Result<Vec<DeviceSection>, VmError> {
        let mut out = Vec::new();
        for (name, version, bytes) in self.bus.pio().save() {
            out.push(DeviceSection::new(name, version, bytes)?);
        }
        let vm = VmSnapshot::save(self.vm.fd())?;
        out.push(DeviceSection::new(
            KVM_VM_DEVICE,
            VM_STATE_VERSION,
            vm.encode(),
        )?);
        Ok(out)
    }
}

impl MigrationSource for Pc {
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

    fn devices(&self) -> Option<&dyn DeviceState> {
        Some(self)
    }

    fn guest_progress(&self) -> u64 {
        self.serial_bytes()
    }
}

impl MigrationTarget for Pc {
    type Memory = Self;
    type Vcpus = Self;

    fn memory(&self) -> &Self {
        self
    }

    fn vcpus(&self) -> &Self {
        self
    }

    fn devices(&self) -> Option<&dyn DeviceState> {
        Some(self)
    }

    fn guest_progress(&self) -> u64 {
        self.serial_bytes()
    }
}

impl MigrationMemory for Pc {
    fn page_size(&self) -> u32 {
        PAGE as u32
    }

    fn regions(&self) -> Vec<Region> {
        self.regions.clone()
    }

    fn region_memory(&self, index: usize) -> Option<RegionMemory> {
        self.mems.get(index).map(|m| region_memory(m))
    }

    fn vmm_bitmap(&self, _index: usize) -> Option<&DirtyBitmap> {
        None
    }

    /// [`GuestMemory`] is private anonymous memory that no userfaultfd handler fills: a page
    /// never populated is a page of zeros.
    fn unpopulated_is_zero(&self, _index: usize) -> bool {
        true
    }
}

impl DirtyTracker for Pc {
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
        if let Some(entries) = self.tracker.kind().ring_entries() {
            let release = lock(&self.runner).ring_reset_notifier();
            // A quarter full, not QEMU's half: a guest that writes a new page every few
            // instructions fills the rest faster than this host's late ring-full exits allow.
            self.reaper
                .start(self.tracker.clone(), entries / 4, release)
                .map_err(|e| err(format!("spawning the ring reaper: {e}")))?;
        }
        Ok(())
    }

    fn harvest(&self, index: usize, out: &mut [u64]) -> Result<(), VmError> {
        if self.tracker.kind().ring_entries().is_none() {
            return Ok(self.tracker.harvest(index, out)?);
        }
        if let Some(e) = self.reaper.error() {
            return Err(err(format!("the ring reaper failed: {e}")));
        }
        // Harvests and resets every ring: release vCPUs parked on a full one.
        let r = self.tracker.harvest(index, out);
        lock(&self.runner).ring_reset_done();
        Ok(r?)
    }

    fn clear(&self, index: usize, first_page: u64, bits: &[u64]) -> Result<(), VmError> {
        Ok(self.tracker.clear(index, first_page, bits)?)
    }

    fn stop(&self) -> Result<(), VmError> {
        if !self.tracking.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        self.reaper.stop();
        let r = self.tracker.stop();
        if self.tracker.kind().ring_entries().is_some() {
            lock(&self.runner).ring_reset_done();
        }
        Ok(r?)
    }
}

impl Vcpus for Pc {
    fn vcpu_count(&self) -> u32 {
        self.cfg.smp
    }

    fn pause(&self) -> Result<(), VmError> {
        if let Err(e) = Pc::pause(self) {
            // The engine resumes only a guest it paused: undo a half-done pause here.
            Pc::resume(self);
            return Err(e);
        }
        Ok(())
    }

    fn resume(&self) -> Result<(), VmError> {
        Pc::resume(self);
        Ok(())
    }

    fn throttle(&self, percent: u8) -> Result<(), VmError> {
        lock(&self.runner).set_throttle(percent)?;
        Ok(())
    }

    fn set_dirty_limit(&self, pages_per_second: Option<u64>) -> Result<(), VmError> {
        let throttle = lock(&self.runner).vcpu_throttle();
        crate::migrate::set_dirty_limit(
            &self.dirty_limit,
            &self.tracker,
            throttle,
            pages_per_second,
        )
    }

    fn dirty_limit_throttle(&self) -> Vec<u8> {
        self.dirty_limit.throttle_percent()
    }

    fn save_state(&self) -> Result<Vec<Vec<u8>>, VmError> {
        let runner = lock(&self.runner);
        if !runner.is_paused() || !runner.states().iter().all(|s| s.is_parked()) {
            return Err(err("save_state while the vCPUs are not all paused"));
        }
        (0..self.cfg.smp)
            .map(|i| {
                let spec = self.spec.clone();
                let s = runner
                    .with_paused_vcpu(i as usize, move |fd| VcpuSnapshot::save(fd, i, &spec))??;
                Ok(s.encode())
            })
            .collect()
    }
}

impl VcpuRestore for Pc {
    fn restore_state(&self, vcpu_id: u32, blob: &[u8]) -> Result<(), VmError> {
        let s = VcpuSnapshot::decode(blob)?;
        if s.vcpu_id != vcpu_id {
            return Err(err(format!(
                "the state sent for vCPU {vcpu_id} is vCPU {}'s",
                s.vcpu_id
            )));
        }
        if vcpu_id >= self.cfg.smp {
            return Err(err(format!("no vCPU {vcpu_id} here")));
        }
        s.check_msrs(&self.spec)?;
        lock(&self.runner).with_paused_vcpu(vcpu_id as usize, move |fd| s.restore(fd))??;
        Ok(())
    }

    fn resume(&self) -> Result<(), VmError> {
        Pc::resume(self);
        Ok(())
    }
}

impl DeviceState for Pc {
    fn save_devices(&self) -> Result<Vec<DeviceSection>, VmError> {
        self.save_vm_devices()
    }

    fn restore_device(&self, name: &str, version: u32, bytes: &[u8]) -> Result<(), VmError> {
        if name == KVM_VM_DEVICE {
            if version != VM_STATE_VERSION {
                return Err(err(format!(
                    "{KVM_VM_DEVICE} state version {version}: this build reads {VM_STATE_VERSION}"
                )));
            }
            let s = VmSnapshot::decode(bytes)?;
            s.restore(self.vm.fd())?;
            return Ok(());
        }
        self.bus
            .pio()
            .restore(name, version, bytes)
            .map_err(|e| err(format!("device {name}: {e}")))
    }
}
