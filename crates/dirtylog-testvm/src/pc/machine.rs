//! The PC itself: a KVM VM with guest RAM, an in-kernel irqchip and PIT, vCPUs with the host's
//! CPUID and machine-check banks, the port devices of [`super::pio`] on the vCPU threads'
//! bus, and a dirty tracker enabled from the start (so any running PC can be migrated away,
//! including one that arrived by migration).
//!
//! # Memory map
//!
//! | guest-physical | what | memslot |
//! |---|---|---|
//! | `0` .. `min(mem, 3 GiB)` | RAM (the Multiboot map marks `0x9fc00..0x100000` reserved) | [`PC_RAM_SLOT`] |
//! | `3 GiB` .. `4 GiB` | the hole: IOAPIC `0xfec00000`, LAPIC `0xfee00000` (in-kernel), anything else MMIO read as all-ones | — |
//! | `4 GiB` .. | the rest of RAM, if any | [`PC_RAM_SLOT`] + 1 |
//!
//! The slot ids also tell a migration stream of a PC from one of the harness's guests
//! ([`is_pc_stream`]).
//!
//! # vCPUs
//!
//! vCPU 0 is the bootstrap processor: [`Pc::boot`] puts it in 32-bit protected mode, paging
//! off, flat 4 GiB code and data segments, `EAX = 0x2BADB002`, `EBX` = the Multiboot info
//! block. The others wait in KVM for INIT/SIPI from the guest (the in-kernel LAPIC does SMP
//! bring-up). Every vCPU gets the host's supported CPUID with its own APIC id (leaves 1, 0xb,
//! 0x1f), `KVM_X86_SETUP_MCE`, and LINT0 = ExtINT, LINT1 = NMI (the virtual-wire mode a BIOS
//! leaves, so PIC interrupts reach the BSP).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dirtylog::sync::lock;
use dirtylog_kvm::{KvmDirtyTracker, TrackerOptions};
use dirtylog_migrate::wire::Region;
use dirtylog_migrate::{TrackerKind, VmError};
use kvm_bindings::{kvm_pit_config, kvm_segment, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd};

use super::bus::{ExitSink, PcBus};
use super::fw_cfg::FwCfg;
use super::multiboot::{self, LoadOptions, BOOTLOADER_MAGIC};
use super::pio::PioBus;
use super::serial::Serial;
use crate::error::{Error, Op};
use crate::vcpu_state::StateSpec;
use crate::{GuestMemory, KvmVm, MemoryOptions, Runner, VcpuRunState};

/// The memslot of RAM below 4 GiB; RAM above 4 GiB is the next one.
pub const PC_RAM_SLOT: u32 = 0x100;
/// Where the hole below 4 GiB starts: RAM beyond this goes above 4 GiB.
pub const HOLE_START: u64 = 0xc000_0000;
/// Where RAM above the hole starts.
pub const HIGH_RAM_BASE: u64 = 1 << 32;
/// Most vCPUs of a PC.
pub const MAX_VCPUS: u32 = 64;
/// Least RAM of a PC: the Multiboot info, the image and low memory must fit.
pub const MIN_MEM: u64 = 2 << 20;
/// Most RAM of a PC.
pub const MAX_MEM: u64 = 64 << 30;
/// How long a pause or the start of the vCPU threads may take.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

const PAGE: u64 = 4096;
/// The TSS KVM needs for real mode on Intel (3 pages below the identity map).
const TSS_ADDR: usize = 0xfffb_d000;

/// Where a PC's guest output goes: called with every byte the guest transmits on COM1.
pub type Console = Arc<dyn Fn(u8) + Send + Sync>;
/// Where the PC's diagnostics go (unemulated ports and addresses, logged once each).
pub type Log = Arc<dyn Fn(&str) + Send + Sync>;

/// The shape of a PC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PcConfig {
    /// RAM in bytes: a multiple of 4 KiB in [`MIN_MEM`]`..=`[`MAX_MEM`].
    pub mem_bytes: u64,
    /// vCPUs, 1 to [`MAX_VCPUS`].
    pub smp: u32,
    /// The dirty tracker enabled on the VM (used when it migrates).
    pub tracker: TrackerKind,
    /// Back RAM with transparent huge pages where the host allows.
    pub huge_pages: bool,
}

impl Default for PcConfig {
    fn default() -> Self {
        PcConfig {
            mem_bytes: 128 << 20,
            smp: 1,
            tracker: TrackerKind::ClearLog,
            huge_pages: true,
        }
    }
}

impl PcConfig {
    /// The RAM regions, in stream order: below the hole, then above 4 GiB if any.
    pub fn regions(&self) -> Vec<Region> {
        let low = self.mem_bytes.min(HOLE_START);
        let mut r = vec![Region {
            slot: PC_RAM_SLOT,
            gpa: 0,
            size: low,
        }];
        if self.mem_bytes > low {
            r.push(Region {
                slot: PC_RAM_SLOT + 1,
                gpa: HIGH_RAM_BASE,
                size: self.mem_bytes - low,
            });
        }
        r
    }

    fn check(&self) -> Result<(), VmError> {
        if self.mem_bytes % PAGE != 0 || !(MIN_MEM..=MAX_MEM).contains(&self.mem_bytes) {
            return Err(err(format!(
                "{} bytes of RAM: use a multiple of 4 KiB from {} MiB to {} GiB",
                self.mem_bytes,
                MIN_MEM >> 20,
                MAX_MEM >> 30
            )));
        }
        if !(1..=MAX_VCPUS).contains(&self.smp) {
            return Err(err(format!(
                "{} vCPUs: a PC has 1 to {MAX_VCPUS}",
                self.smp
            )));
        }
        if let TrackerKind::Ring { entries } = self.tracker {
            if !entries.is_power_of_two() || !crate::migrate::RING_ENTRIES.contains(&entries) {
                return Err(err(format!(
                    "a ring of {entries} entries: use a power of two from {} to {}",
                    crate::migrate::RING_ENTRIES.start(),
                    crate::migrate::RING_ENTRIES.end()
                )));
            }
        }
        Ok(())
    }
}

/// Is `regions` (a stream header's) the memory map of a PC?
pub fn is_pc_stream(regions: &[Region]) -> bool {
    regions
        .first()
        .is_some_and(|r| r.slot == PC_RAM_SLOT && r.gpa == 0)
}

pub(super) fn err(msg: impl Into<String>) -> VmError {
    VmError::from(msg.into())
}

fn machine_err(ioctl: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> Error {
    move |e| Error::from_sys(Op::Machine(ioctl), e)
}

/// A running (or paused) PC. See the [module docs](self).
pub struct Pc {
    pub(super) cfg: PcConfig,
    pub(super) regions: Vec<Region>,
    pub(super) mems: Vec<Arc<GuestMemory>>,
    pub(super) tracker: Arc<KvmDirtyTracker>,
    pub(super) runner: Mutex<Runner>,
    pub(super) bus: Arc<PcBus>,
    pub(super) spec: StateSpec,
    pub(super) tracking: AtomicBool,
    /// Bytes the guest transmitted on COM1 here (its progress, as far as a VMM can tell).
    pub(super) serial_bytes: Arc<AtomicU64>,
    pub(super) reaper: crate::reaper::Reaper,
    pub(super) dirty_limit: crate::dirty_limit::DirtyLimiter,
    // Dropped last: the memslots' owner (the runner and tracker go first, in field order).
    pub(super) vm: KvmVm,
}

impl std::fmt::Debug for Pc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pc")
            .field("cfg", &self.cfg)
            .field("regions", &self.regions)
            .finish_non_exhaustive()
    }
}

/// Host CPUID for vCPU `id`: its APIC id in leaves 1, 0xb and 0x1f.
fn set_cpuid(kvm: &Kvm, vcpu: &VcpuFd, id: u32) -> crate::Result<()> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(machine_err("KVM_GET_SUPPORTED_CPUID"))?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (id << 24),
            0xb | 0x1f => e.edx = id,
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid)
        .map_err(machine_err("KVM_SET_CPUID2"))
}

/// LINT0 = ExtINT, LINT1 = NMI in the vCPU's LAPIC (what a BIOS leaves).
fn set_lint(vcpu: &VcpuFd) -> crate::Result<()> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const DM_EXTINT: u32 = 0x7 << 8;
    const DM_NMI: u32 = 0x4 << 8;
    let mut lapic = vcpu.get_lapic().map_err(machine_err("KVM_GET_LAPIC"))?;
    for (off, mode) in [(APIC_LVT0, DM_EXTINT), (APIC_LVT1, DM_NMI)] {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = lapic.regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x0001_0700) | mode;
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *x as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(machine_err("KVM_SET_LAPIC"))
}

/// vCPU 0 at a Multiboot entry: 32-bit protected mode, paging off, flat segments.
fn set_multiboot_entry(vcpu: &VcpuFd, entry: u32, info: u32) -> crate::Result<()> {
    let seg = |selector: u16, type_: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let mut sregs = vcpu.get_sregs().map_err(machine_err("KVM_GET_SREGS"))?;
    sregs.cs = seg(0x10, 0xb);
    let data = seg(0x18, 0x3);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.cr0 = (1 << 0) | (1 << 4); // PE, ET
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs)
        .map_err(machine_err("KVM_SET_SREGS"))?;
    let mut regs = vcpu.get_regs().map_err(machine_err("KVM_GET_REGS"))?;
    regs.rip = u64::from(entry);
    regs.rax = u64::from(BOOTLOADER_MAGIC);
    regs.rbx = u64::from(info);
    regs.rflags = 0x2;
    vcpu.set_regs(&regs).map_err(machine_err("KVM_SET_REGS"))
}

impl Pc {
    /// A PC of `cfg`, its vCPU threads started and parked before their first instruction:
    /// [`boot`](Self::boot) a kernel, or restore a migrated guest into it. Guest output goes
    /// to `console`, diagnostics to `log`.
    pub fn new(cfg: &PcConfig, console: Console, log: Log) -> Result<Self, VmError> {
        cfg.check()?;
        let mut vm = KvmVm::new()?;
        // The tracker first: a ring must be enabled before any vCPU exists.
        KvmDirtyTracker::enable(vm.fd(), cfg.tracker)?;
        vm.fd()
            .set_tss_address(TSS_ADDR)
            .map_err(machine_err("KVM_SET_TSS_ADDR"))?;
        vm.fd()
            .create_irq_chip()
            .map_err(machine_err("KVM_CREATE_IRQCHIP"))?;
        vm.fd()
            .create_pit2(kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            })
            .map_err(machine_err("KVM_CREATE_PIT2"))?;
        let regions = cfg.regions();
        let mut mems = Vec::with_capacity(regions.len());
        let mut slots = Vec::with_capacity(regions.len());
        for r in &regions {
            let size = usize::try_from(r.size).map_err(|_| err("RAM too large for this host"))?;
            let mem = Arc::new(GuestMemory::new(
                size,
                MemoryOptions {
                    no_huge_pages: !cfg.huge_pages,
                    populate: false,
                },
            )?);
            if cfg.huge_pages {
                crate::migrate::advise_huge_pages(&mem);
            }
            vm.set_memslot(r.slot, r.gpa, mem.clone(), 0)?;
            slots.push(dirtylog_kvm::Slot {
                slot: r.slot,
                guest_phys_addr: r.gpa,
                memory_size: r.size,
                userspace_addr: mem.host_addr(),
                flags: 0,
            });
            mems.push(mem);
        }
        let mut vcpus = Vec::with_capacity(cfg.smp as usize);
        for id in 0..cfg.smp {
            let v = vm.create_vcpu()?;
            set_cpuid(vm.kvm(), v.fd(), id)?;
            dirtylog_kvm::sys::setup_mce(vm.kvm(), v.fd())?;
            set_lint(v.fd())?;
            vcpus.push(v);
        }
        // What to save of each vCPU: every MSR KVM lists that reads back and restores here
        // (probed on vCPU 0 before it ever runs, after its CPUID and MCE banks are set), the
        // LAPIC, XSAVE, XCRs.
        let spec = StateSpec::probe_vcpu(vm.kvm(), vcpus[0].fd())?;
        let mut opts = TrackerOptions::default();
        if let TrackerKind::Ring { entries } = cfg.tracker {
            opts.ring_soft_full = Some(entries - dirtylog::ring::KVM_DIRTY_RING_RSVD_ENTRIES);
        }
        // SAFETY: `slots` are this VM's RAM memslots exactly as `vm` created them, and nothing
        // changes them afterwards (only the tracker toggles their logging). Their memory is
        // pinned by `vm` and by `mems`, both dropped after the tracker (field order of `Pc`;
        // the runner's watchdog closures holding it go with the runner, also before `vm`).
        let tracker = Arc::new(unsafe {
            KvmDirtyTracker::with_options(vm.shared_fd(), &slots, cfg.tracker, opts)
        }?);
        let irq_vm = vm.shared_fd();
        let irq_log = log.clone();
        let irq = Box::new(move |line: u32, level: bool| {
            if let Err(e) = irq_vm.set_irq_line(line, level) {
                irq_log(&format!("KVM_IRQ_LINE({line}, {level}) failed: {e}"));
            }
        });
        let out = console.clone();
        let serial_bytes = Arc::new(AtomicU64::new(0));
        let counter = serial_bytes.clone();
        let serial = Serial::new(Box::new(move |b| {
            counter.fetch_add(1, Ordering::Relaxed);
            out(b)
        }));
        let fw_cfg = FwCfg::new(cfg.smp as u16, cfg.mem_bytes);
        let pio_log = log.clone();
        let pio = PioBus::new(serial, fw_cfg, Box::new(move |m: &str| pio_log(m)), irq);
        let bus_log = log.clone();
        let bus = Arc::new(PcBus::new(pio, Box::new(move |m: &str| bus_log(m))));
        let mut runner = Runner::start_with_bus(vcpus, bus.clone(), true)?;
        runner.pause(STOP_TIMEOUT)?;
        for i in 0..runner.len() {
            let t = tracker.clone();
            runner.with_paused_vcpu(i, move |fd| t.add_vcpu(fd))??;
        }
        if let (Some(entries), Some(soft)) = (cfg.tracker.ring_entries(), opts.ring_soft_full) {
            let near = soft.saturating_sub(64).clamp(1, entries);
            let (t1, t2) = (tracker.clone(), tracker.clone());
            runner.watch_ring_fill(
                move || t1.rings_hold_at_least(near),
                move |i| t2.ring_soft_full(i),
            )?;
        }
        Ok(Pc {
            cfg: cfg.clone(),
            regions,
            mems,
            tracker,
            runner: Mutex::new(runner),
            bus,
            spec,
            tracking: AtomicBool::new(false),
            serial_bytes,
            reaper: Default::default(),
            dirty_limit: Default::default(),
            vm,
        })
    }

    /// Load the Multiboot kernel `image` with `cmdline` (the kernel's name, then its
    /// arguments) and an optional module (`initrd`, with its own command line), point vCPU 0
    /// at its entry and let every vCPU run.
    pub fn boot(
        &self,
        image: &[u8],
        cmdline: &str,
        initrd: Option<(&[u8], &str)>,
    ) -> Result<(), VmError> {
        let low = self.regions[0].size;
        let boot = multiboot::load(
            image,
            &LoadOptions {
                ram_bytes: self.cfg.mem_bytes,
                below_4g_bytes: low,
                cmdline,
                module: initrd,
            },
        )
        .map_err(|e| err(format!("loading the kernel: {e}")))?;
        let mem = &self.mems[0];
        let fits = |gpa: u64, len: u64| gpa.checked_add(len).is_some_and(|end| end <= low);
        for (gpa, bytes) in &boot.writes {
            if !fits(*gpa, bytes.len() as u64) {
                return Err(err(format!(
                    "the kernel loads {} bytes at {gpa:#x}, beyond the {low:#x} bytes of low RAM",
                    bytes.len()
                )));
            }
            mem.write_bytes(*gpa, bytes);
        }
        for &(gpa, len) in &boot.zeroes {
            if !fits(gpa, len) {
                return Err(err(format!(
                    "the kernel's bss at {gpa:#x} ({len} bytes) is beyond low RAM"
                )));
            }
            // Fresh anonymous memory is zero already; zero explicitly all the same, a page at
            // a time.
            let zero = [0u8; PAGE as usize];
            let mut off = 0;
            while off < len {
                let n = (len - off).min(PAGE);
                mem.write_bytes(gpa + off, &zero[..n as usize]);
                off += n;
            }
        }
        let (entry, info) = (boot.entry, boot.info_addr);
        let runner = lock(&self.runner);
        runner.with_paused_vcpu(0, move |fd| set_multiboot_entry(fd, entry, info))??;
        runner.resume();
        Ok(())
    }

    /// The machine's shape.
    pub fn config(&self) -> &PcConfig {
        &self.cfg
    }

    /// The device bus (serial input, device state).
    pub fn bus(&self) -> &Arc<PcBus> {
        &self.bus
    }

    /// Send the machine's end to `sink` (at once if it already ended).
    pub fn on_exit(&self, sink: ExitSink) {
        self.bus.on_exit(sink);
    }

    /// Queue `bytes` on COM1's receive side.
    pub fn serial_input(&self, bytes: &[u8]) {
        self.bus.pio().push_serial_input(bytes);
    }

    /// Bytes the guest transmitted on COM1 on this PC.
    pub fn serial_bytes(&self) -> u64 {
        self.serial_bytes.load(Ordering::Relaxed)
    }

    /// How the guest ended the machine, if it did.
    pub fn exit(&self) -> Option<super::PcExit> {
        self.bus.exit()
    }

    /// The RAM regions (stream order) and their memory.
    pub fn memory(&self) -> impl Iterator<Item = (&Region, &Arc<GuestMemory>)> {
        self.regions.iter().zip(&self.mems)
    }

    /// Where each vCPU thread is.
    pub fn vcpu_states(&self) -> Vec<VcpuRunState> {
        lock(&self.runner).states()
    }

    /// The first vCPU error, if a vCPU thread failed.
    pub fn check(&self) -> Result<(), VmError> {
        lock(&self.runner).check()?;
        Ok(())
    }

    /// Pause every vCPU (see [`Runner::pause`]).
    pub fn pause(&self) -> Result<(), VmError> {
        let r = lock(&self.runner);
        r.check()?;
        r.pause(STOP_TIMEOUT)?;
        Ok(())
    }

    /// Let every vCPU run.
    pub fn resume(&self) {
        lock(&self.runner).resume();
    }

    /// Stop the vCPU threads; the first vCPU error, if any.
    pub fn shutdown(self) -> Result<(), VmError> {
        self.dirty_limit.stop();
        self.reaper.stop();
        let r = lock(&self.runner).shutdown(STOP_TIMEOUT);
        r.map_err(Into::into)
    }
}

impl Drop for Pc {
    fn drop(&mut self) {
        self.dirty_limit.stop();
        self.reaper.stop();
    }
}
