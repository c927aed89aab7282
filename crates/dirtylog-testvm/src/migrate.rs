//! Live migration of real KVM guests: [`KvmSource`] and [`KvmTarget`] implement the engine's
//! traits on this crate's test VMM, tracking with `dirtylog_kvm::KvmDirtyTracker`.
//!
//! # The guest
//!
//! [`KvmSource::boot`] starts a long-mode guest running the device dirtier
//! ([`Program::DeviceDirtier`]): each vCPU writes a stamp into the pages of its share of a
//! working set, sequentially or at random, at a rate the host paces, and counts its writes in
//! the control region (its progress, [`MigrationSource::guest_progress`]). Every
//! `mailbox_every` writes it asks the VMM, through an `out` to [`ports::MAILBOX`], to fill its
//! mailbox: the VMM writes a record (sequence number, host time, the vCPU's write count) into a
//! mailbox page of guest memory. That is the VMM's own write to guest memory, invisible to
//! KVM's dirty log, so the mailbox device marks it in the region's VMM bitmap (a
//! [`DirtyBitmap`]), which the
//! engine merges with the KVM log at every harvest.
//!
//! # Memory layout (the stream's regions, in this order)
//!
//! | index | slot | where | what | tracked by |
//! |---|---|---|---|---|
//! | 0 | 0 | GPA 0 | system slot: GDT, control region, code, page tables | sent whole in the bulk pass and again, whole, in the final round |
//! | 1 | 1 | [`layout::TEST_BASE`] | guest memory (`mem_bytes`), the working sets | the chosen KVM tracker |
//! | 2 | 2 | right above | device memory: the mailbox page | the KVM tracker (nothing: vCPUs never write it) and the VMM bitmap |
//!
//! **The system slot is not dirty-logged.** It is small (1 MiB plus 4 KiB per GiB of guest
//! memory, mostly zero pages, which travel as markers), and besides the guest (its write
//! counters, on every write) the VMM writes it too (the pacer's `BUDGET` grants, the
//! mailbox device's counters). Rather than log a page that is dirty all the time and chase the VMM's writes,
//! [`pause`](Vcpus::pause) marks the whole slot in its VMM bitmap once the vCPUs
//! are stopped, so the final round re-sends it, consistent with the paused vCPUs. Its cost is
//! the final round's copy of a few dozen non-zero pages.
//!
//! # Trackers ([`TrackerKind`])
//!
//! The source tracks with the library's [`KvmDirtyTracker`], as any VMM would: its
//! [`enable`](KvmDirtyTracker::enable) runs on the machine's new VM before the vCPUs exist
//! ([`Machine::with_vm_setup`]), its slot table is the test slots (regions 1 and 2; the
//! system slot is not in it and harvests nothing), every vCPU fd is added on the vCPU's own
//! thread before the guest first runs, and [`DirtyTracker`] delegates to it.
//!
//! - `DirtyLog`: `KVM_GET_DIRTY_LOG`, which clears and re-protects; `clear` is a no-op.
//! - `ClearLog`: manual protect with `KVM_DIRTY_LOG_INITIALLY_SET` (QEMU's mode): enabling
//!   logging write-protects nothing and reports every page dirty; `harvest` is the GET
//!   snapshot; the engine's per-chunk `clear` is `KVM_CLEAR_DIRTY_LOG`, which re-protects.
//! - `Ring`: per-vCPU dirty rings. A reaper thread calls
//!   [`harvest_rings`](KvmDirtyTracker::harvest_rings) whenever a ring is half full (QEMU's
//!   reaper; a vCPU parked on a full ring is past that), then releases the parked vCPUs
//!   ([`Runner::ring_reset_done`](crate::Runner::ring_reset_done)), so vCPUs rarely block
//!   between the engine's harvests; the runner's watchdog kicks a vCPU whose ring reached the
//!   soft limit ([`KvmDirtyTracker::ring_soft_full`]) so that this host's late ring-full exits
//!   cannot overflow a ring. `harvest` collects and resets every ring and returns the region's
//!   pages.
//!
//! The VMM's own writes (the mailbox, and the whole system slot at the pause) reach the engine
//! through [`MigrationMemory::vmm_bitmap`], not the tracker.
//!
//! # Pause, vCPU state, throttle
//!
//! Pausing kicks every vCPU out of `KVM_RUN` and parks it wherever its guest is
//! ([`Runner::pause`](crate::Runner::pause)): no guest cooperation, so any guest can be
//! migrated. A vCPU blocked on a full ring counts as paused (its write has not retired; it
//! executes at the destination). A paused vCPU's state is saved on its own thread
//! ([`Runner::with_paused_vcpu`](crate::Runner::with_paused_vcpu), [`VcpuSnapshot`]:
//! registers, segments, control registers, EFER and the other MSRs, XSAVE, XCR0, events, MP
//! state, debug registers), plus the pacer's rate as a VMM section. The
//! throttle holds vCPU threads out of `KVM_RUN` for a share of every 10 ms
//! ([`Runner::set_throttle`](crate::Runner::set_throttle)). With the ring tracker, a dirty
//! limit ([`Vcpus::set_dirty_limit`]) throttles each vCPU on its own, from its ring's rate
//! ([`dirty_limit`](crate::dirty_limit)); with a bitmap tracker it is [`Unsupported`](dirtylog_migrate::Unsupported).
//!
//! # The target
//!
//! [`KvmTarget::new`] builds a VM with the stream's memory map (the system slot must be slot 0
//! at GPA 0) and creates the vCPUs with the host's CPUID, without loading any program: memory
//! comes from the stream. vCPU states are loaded into the vCPUs as they arrive; the vCPU
//! threads start only in [`resume`](VcpuRestore::resume), after the engine has checked
//! every region's hash: paused, while the target serves the mailbox at the address the guest's
//! control region names and applies the source's pacing, then released. A source vCPU paused
//! after an I/O exit had the instruction completed first, so a restored vCPU simply runs on.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::dirty_limit::DirtyLimiter;
use crate::guest::{control, ports};
use crate::machine::SYSTEM_SLOT;
use crate::runner::PortHandler;
use crate::vcpu_state::{StateSpec, VcpuSnapshot, VMM_SECTION_BASE};
use crate::x86::{self, layout};
use crate::{
    GuestMemory, KvmVcpu, KvmVm, Machine, MachineConfig, MemoryOptions, Program, Runner,
    VcpuRunState,
};
use dirtylog::sync::lock;
use dirtylog::DirtyBitmap;
use dirtylog_kvm::{KvmDirtyTracker, TrackerOptions};

use dirtylog_migrate::wire::{Region, StreamHeader};
use dirtylog_migrate::VmError;
use dirtylog_migrate::{
    DirtyTracker, MigrationMemory, MigrationSource, MigrationTarget, RegionMemory, TrackerKind,
    VcpuRestore, Vcpus,
};

/// Pages of the device slot; the mailbox is its first page.
pub const DEVICE_PAGES: u64 = 16;
/// Bytes of one vCPU's mailbox record: sequence, host time (ns since the Unix epoch), the
/// vCPU's write count when it asked, and a check word (`sequence ^ MAILBOX_CHECK`).
pub const MAILBOX_RECORD: u64 = 32;
/// XORed into the sequence number for the record's check word.
pub const MAILBOX_CHECK: u64 = 0x6d61_696c_626f_7821;
/// The VMM section of a vCPU blob holding the pacer's rate.
pub const PACING_SECTION: u32 = VMM_SECTION_BASE;
/// How long [`pause`](Vcpus::pause) and the target's start wait for the vCPUs.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

const PAGE: u64 = 4096;

/// Ring sizes the source accepts: the watchdog kicks at the soft limit (64 entries short of
/// full) and polls fast from 64 entries before it, so smaller rings would be kicked constantly.
pub const RING_ENTRIES: std::ops::RangeInclusive<u32> = 1024..=65536;

/// The guest [`KvmSource::boot`] starts.
#[derive(Clone, Debug)]
pub struct GuestConfig {
    /// Guest memory in bytes (the working memory slot; a multiple of 4 KiB).
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Page writes per second per vCPU; `None` for as fast as the vCPU goes, `Some(0)` for an
    /// idle guest.
    pub dirty_rate: Option<u64>,
    /// Bytes of the working set of all vCPUs together, split evenly among them.
    pub working_set_bytes: u64,
    /// Random pages of each share rather than a sweep.
    pub random: bool,
    /// Guest writes between mailbox requests; 0 for none.
    pub mailbox_every: u64,
    /// The dirty tracker (a ring of a power of two in [`RING_ENTRIES`] entries).
    pub tracker: TrackerKind,
    /// Seed of the guests' random generators.
    pub seed: u64,
    /// Back guest memory with transparent huge pages where the host allows
    /// (`MADV_HUGEPAGE`), as VMMs usually do: untouched memory then reads as the huge zero
    /// page, so the bulk pass's zero scan costs one fault per 2 MiB instead of per 4 KiB.
    /// Dirty tracking stays at 4 KiB (KVM splits its mappings when logging starts).
    pub huge_pages: bool,
    /// The guest program: [`Program::DeviceDirtier`] (the default), [`Program::Dirtier`],
    /// [`Program::TightLoop`] (never exits, polls nothing; its working set is its share of
    /// `working_set_bytes` in the guest memory slot, which the tracker logs; `dirty_rate` and
    /// `mailbox_every` do not apply) or [`Program::Halt`] (`cli; hlt`, writes nothing).
    pub program: Program,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            mem_bytes: 1 << 30,
            vcpus: 2,
            dirty_rate: Some(10_000),
            working_set_bytes: 64 << 20,
            random: false,
            mailbox_every: 1000,
            tracker: TrackerKind::ClearLog,
            seed: 1,
            huge_pages: true,
            program: Program::DeviceDirtier,
        }
    }
}

/// `madvise(MADV_HUGEPAGE)` on `mem`: transparent huge pages for it where the host's THP mode
/// is `madvise` (a hint: failures are ignored, the memory works either way).
pub(crate) fn advise_huge_pages(mem: &GuestMemory) {
    // SAFETY: advice on exactly the range of a live mapping owned by `mem`; MADV_HUGEPAGE
    // changes how the kernel backs it, never its contents or its validity.
    unsafe {
        libc::madvise(
            mem.host_addr() as *mut libc::c_void,
            mem.len(),
            libc::MADV_HUGEPAGE,
        )
    };
}

/// The mailbox device of one VM.
struct Mailbox {
    /// The device memory and the mailbox's offset in it.
    mem: Arc<GuestMemory>,
    offset: u64,
    /// The system memory, to read the asking vCPU's write count.
    sys: Arc<GuestMemory>,
    /// The VMM bitmap of the device region (the source's), if tracked.
    bitmap: Option<Arc<DirtyBitmap>>,
    /// Whether to mark the bitmap (tests turn it off to show it is needed).
    track: Arc<AtomicBool>,
    served: AtomicU64,
}

impl Mailbox {
    fn serve(&self, vcpu: usize) {
        let base = self.offset + MAILBOX_RECORD * vcpu as u64;
        if base + MAILBOX_RECORD > self.mem.len() as u64 {
            return;
        }
        let seq = self.mem.read_u64(base).wrapping_add(1);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let writes = self
            .sys
            .read_u64(layout::CONTROL + control::vcpu(vcpu as u32) + control::WRITES);
        self.mem.write_u64(base, seq);
        self.mem.write_u64(base + 8, now);
        self.mem.write_u64(base + 16, writes);
        self.mem.write_u64(base + 24, seq ^ MAILBOX_CHECK);
        // Data first, then the mark (the VMM bitmap's protocol).
        if let Some(b) = &self.bitmap {
            if self.track.load(Ordering::Relaxed) {
                b.set_byte_range(base, MAILBOX_RECORD, PAGE.trailing_zeros());
            }
        }
        self.served.fetch_add(1, Ordering::Relaxed);
    }

    fn handler(self: &Arc<Self>) -> PortHandler {
        let me = self.clone();
        Arc::new(move |vcpu| me.serve(vcpu))
    }

    /// vCPU `vcpu`'s record: its sequence number, and whether the check word matches.
    fn record(&self, vcpu: u32) -> (u64, bool) {
        let base = self.offset + MAILBOX_RECORD * u64::from(vcpu);
        if base + MAILBOX_RECORD > self.mem.len() as u64 {
            return (0, false);
        }
        let seq = self.mem.read_u64(base);
        (seq, self.mem.read_u64(base + 24) == seq ^ MAILBOX_CHECK)
    }
}

fn err(msg: impl Into<String>) -> VmError {
    msg.into().into()
}

/// Sum of the vCPUs' write counters in the control region of `sys`.
fn writes(sys: &GuestMemory, vcpus: u32) -> u64 {
    (0..vcpus).map(|i| writes_of(sys, i)).sum()
}

/// vCPU `i`'s write counter in the control region of `sys`.
fn writes_of(sys: &GuestMemory, i: u32) -> u64 {
    sys.read_u64(layout::CONTROL + control::vcpu(i) + control::WRITES)
}

fn region_memory(mem: &GuestMemory) -> RegionMemory {
    // SAFETY: `mem` is a page-aligned anonymous mapping of `len()` bytes, kept alive by the
    // `Arc` the source or target holds for as long as it lives, which outlives any migration
    // that borrows it. The source's pause stops every vCPU and the mailbox (the only writers)
    // before the final round; a target's memory is touched by nobody but the engine until its
    // vCPU threads start in `resume`.
    unsafe { RegionMemory::new(mem.host_addr() as *mut u8, mem.len()) }
}

pub(crate) fn encode_pacing(rate: Option<u64>) -> Vec<u8> {
    rate.unwrap_or(u64::MAX).to_le_bytes().to_vec()
}

fn decode_pacing(bytes: &[u8]) -> Result<Option<u64>, VmError> {
    let b: [u8; 8] = bytes
        .try_into()
        .map_err(|_| err(format!("pacing section of {} bytes, not 8", bytes.len())))?;
    let v = u64::from_le_bytes(b);
    Ok((v != u64::MAX).then_some(v))
}

/// What the source's threads share.
struct SourceInner {
    // Drop order: the tracker before the machine and the memory its slot table names (the
    // runner's watchdog holds it too, and drops it when the machine stops the threads).
    /// The tracker over the test slots: tracker region `i` is source region `i + 1`.
    tracker: Arc<KvmDirtyTracker>,
    machine: Mutex<Machine>,
    regions: Vec<Region>,
    mems: Vec<Arc<GuestMemory>>,
    sys: Arc<GuestMemory>,
    vcpus: u32,
    spec: StateSpec,
    vmm: Vec<Arc<DirtyBitmap>>,
    rate: Mutex<Option<u64>>,
    mailbox: Arc<Mailbox>,
    tracking: AtomicBool,
    paused: AtomicBool,
}

/// A running KVM guest to migrate away. See the [module docs](self).
pub struct KvmSource {
    inner: Arc<SourceInner>,
    reaper: crate::reaper::Reaper,
    dirty_limit: DirtyLimiter,
    track_vmm: Arc<AtomicBool>,
}

impl std::fmt::Debug for KvmSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmSource")
            .field("tracker", &self.inner.tracker)
            .field("regions", &self.inner.regions)
            .field("vcpus", &self.inner.vcpus)
            .finish_non_exhaustive()
    }
}

impl KvmSource {
    /// Boot the guest of `cfg` and let it run.
    pub fn boot(cfg: &GuestConfig) -> Result<Self, VmError> {
        if cfg.mem_bytes == 0 || cfg.mem_bytes % PAGE != 0 {
            return Err(err(format!(
                "guest memory of {} bytes: use a positive multiple of 4 KiB",
                cfg.mem_bytes
            )));
        }
        let pages = cfg.mem_bytes / PAGE;
        let vcpus = u64::from(cfg.vcpus.max(1));
        let ws = cfg.working_set_bytes / PAGE;
        if ws < vcpus || ws > pages {
            return Err(err(format!(
                "a working set of {} bytes: between {} (a page per vCPU) and the guest memory \
                 ({} bytes)",
                cfg.working_set_bytes,
                vcpus * PAGE,
                cfg.mem_bytes
            )));
        }
        let kind = cfg.tracker;
        let mut opts = TrackerOptions::default();
        if let TrackerKind::Ring { entries } = kind {
            if !entries.is_power_of_two() || !RING_ENTRIES.contains(&entries) {
                return Err(err(format!(
                    "a ring of {entries} entries: use a power of two from {} to {}",
                    RING_ENTRIES.start(),
                    RING_ENTRIES.end()
                )));
            }
            // The watchdog's kick threshold: the soft limit.
            opts.ring_soft_full = Some(entries - dirtylog::ring::KVM_DIRTY_RING_RSVD_ENTRIES);
        }
        if !matches!(
            cfg.program,
            Program::DeviceDirtier | Program::Dirtier | Program::TightLoop | Program::Halt
        ) {
            return Err(err(format!(
                "the {:?} program needs the host to drive it pass by pass; a migration source \
                 runs the device dirtier, the dirtier, the tight loop or the halting guest",
                cfg.program
            )));
        }
        // The machine enables nothing itself: the tracker's `enable` runs before the vCPUs.
        let mut machine = Machine::with_vm_setup(
            MachineConfig {
                vcpus: cfg.vcpus,
                program: cfg.program,
                slot_pages: vec![pages, DEVICE_PAGES],
                log_dirty_pages: false,
                tracker: TrackerKind::DirtyLog,
                initially_set: false,
                memory: MemoryOptions {
                    no_huge_pages: !cfg.huge_pages,
                    populate: false,
                },
                seed: cfg.seed,
            },
            |vm| KvmDirtyTracker::enable(vm.fd(), kind).map(|_| ()),
        )?;
        let tracker = track_test_slots(&mut machine, kind, opts)?;
        if cfg.huge_pages {
            for r in machine.regions() {
                advise_huge_pages(&r.mem);
            }
        }
        // Each vCPU's share of the working set, spread over the memory.
        let share = ws / vcpus;
        for i in 0..cfg.vcpus {
            let first = pages * u64::from(i) / vcpus;
            machine.set_working_set(i, first, share, cfg.random)?;
        }
        let sys = machine
            .vm()
            .slot(SYSTEM_SLOT)
            .ok_or_else(|| err("the machine has no system slot"))?
            .mem
            .clone();
        let mut regions = vec![Region {
            slot: SYSTEM_SLOT,
            gpa: 0,
            size: sys.len() as u64,
        }];
        let mut mems = vec![sys.clone()];
        for r in machine.regions() {
            regions.push(Region {
                slot: r.slot,
                gpa: r.gpa,
                size: r.pages * PAGE,
            });
            mems.push(r.mem.clone());
        }
        let device = machine
            .regions()
            .last()
            .ok_or_else(|| err("the machine has no device slot"))?
            .clone();
        let vmm: Vec<Arc<DirtyBitmap>> = regions
            .iter()
            .map(|r| Arc::new(DirtyBitmap::new(r.size / PAGE)))
            .collect();
        let track_vmm = Arc::new(AtomicBool::new(true));
        let mailbox = Arc::new(Mailbox {
            mem: device.mem.clone(),
            offset: 0,
            sys: sys.clone(),
            bitmap: Some(vmm[regions.len() - 1].clone()),
            track: track_vmm.clone(),
            served: AtomicU64::new(0),
        });
        machine
            .runner()
            .set_port_handler(ports::MAILBOX, mailbox.handler())?;
        sys.write_u64(layout::CONTROL + control::MAILBOX, device.gpa);
        sys.write_u64(layout::CONTROL + control::MAILBOX_EVERY, cfg.mailbox_every);
        let spec = StateSpec::probe(machine.vm().kvm())?;
        let rate = cfg.dirty_rate;
        machine.set_rate(rate.map(|r| r as f64));
        machine.resume(false, STOP_TIMEOUT)?;
        let inner = SourceInner {
            tracker,
            machine: Mutex::new(machine),
            regions,
            mems,
            sys,
            vcpus: cfg.vcpus,
            spec,
            vmm,
            rate: Mutex::new(rate),
            mailbox,
            tracking: AtomicBool::new(false),
            paused: AtomicBool::new(false),
        };
        Ok(KvmSource {
            inner: Arc::new(inner),
            reaper: Default::default(),
            dirty_limit: Default::default(),
            track_vmm,
        })
    }

    /// Guest writes so far, all vCPUs.
    pub fn guest_writes(&self) -> u64 {
        writes(&self.inner.sys, self.inner.vcpus)
    }

    /// Each vCPU's guest writes so far, in vCPU order (`dirtylog dirty-rate`'s reference).
    pub fn vcpu_writes(&self) -> Vec<u64> {
        (0..self.inner.vcpus)
            .map(|i| writes_of(&self.inner.sys, i))
            .collect()
    }

    /// The guest memory slot (region 1), which the vCPUs' working sets are in.
    pub fn guest_memory(&self) -> Arc<GuestMemory> {
        self.inner.mems[1].clone()
    }

    /// Mailbox requests served by this VMM.
    pub fn mailbox_served(&self) -> u64 {
        self.inner.mailbox.served.load(Ordering::Relaxed)
    }

    /// vCPU `vcpu`'s mailbox sequence number, and whether its record is intact.
    pub fn mailbox_record(&self, vcpu: u32) -> (u64, bool) {
        self.inner.mailbox.record(vcpu)
    }

    /// Whether [`pause`](Vcpus::pause) stopped the guest and nothing resumed it.
    pub fn is_paused(&self) -> bool {
        self.inner.paused.load(Ordering::Acquire)
    }

    /// The vCPU throttle in force, percent.
    pub fn throttle_percent(&self) -> u8 {
        lock(&self.inner.machine).runner().throttle()
    }

    /// Each vCPU's dirty rate over the last window, ring entries per second, as the dirty
    /// limit measures it (QEMU's `current-rate`); empty when no limit is in force.
    pub fn dirty_limit_rates(&self) -> Vec<u64> {
        self.dirty_limit.rates()
    }

    /// Ring tracker: entries KVM has pushed into each vCPU's dirty ring since tracking first
    /// started (wrapping), in vCPU order; empty before that and for other trackers. On this
    /// project's PVM host, one per guest write to a write-protected page.
    pub fn dirty_ring_pushed(&self) -> Vec<u32> {
        crate::dirty_limit::rings_pushed(&self.inner.tracker)
    }

    /// Where each vCPU thread is.
    pub fn vcpu_states(&self) -> Vec<VcpuRunState> {
        lock(&self.inner.machine).runner().states()
    }

    /// Change the dirtier's rate (pages per second per vCPU; `None` unlimited).
    pub fn set_rate(&self, rate: Option<u64>) {
        *lock(&self.inner.rate) = rate;
        lock(&self.inner.machine).set_rate(rate.map(|r| r as f64));
    }

    /// For tests: stop (or restart) marking the mailbox's writes in the VMM bitmap, as a VMM
    /// that forgot its own writes would. A migration then loses them, and the destination's
    /// hash check must catch it.
    #[doc(hidden)]
    pub fn set_vmm_tracking(&self, on: bool) {
        self.track_vmm.store(on, Ordering::Relaxed);
    }

    /// Stop the guest and its threads; the first vCPU error, if any.
    pub fn shutdown(self) -> Result<(), VmError> {
        self.dirty_limit.stop();
        self.reaper.stop();
        let r = lock(&self.inner.machine).runner().check();
        // Dropping the machine stops and joins the vCPU threads.
        drop(self);
        r.map_err(Into::into)
    }

    /// Pause every vCPU ([`Runner::pause`]): each parked out of `KVM_RUN`, or blocked on a
    /// full ring.
    fn wait_stopped(&self) -> Result<(), VmError> {
        let m = lock(&self.inner.machine);
        m.runner().check()?;
        m.runner().pause(STOP_TIMEOUT)?;
        Ok(())
    }
}

/// A [`KvmDirtyTracker`] of `kind` over `machine`'s test slots (in their order), with every
/// vCPU added (on its own thread, parked before its first instruction) and, for rings, the runner's watchdog kicking a vCPU at the soft limit.
fn track_test_slots(
    machine: &mut Machine,
    kind: TrackerKind,
    opts: TrackerOptions,
) -> Result<Arc<KvmDirtyTracker>, VmError> {
    let mut slots = Vec::with_capacity(machine.regions().len());
    for r in machine.regions() {
        let s = machine
            .vm()
            .slot(r.slot)
            .ok_or_else(|| err(format!("the machine has no memslot {}", r.slot)))?;
        slots.push(dirtylog_kvm::Slot {
            slot: s.slot,
            guest_phys_addr: s.guest_phys_addr,
            memory_size: s.npages * PAGE,
            userspace_addr: s.mem.host_addr(),
            flags: s.flags,
        });
    }
    // SAFETY: `slots` are the machine's test memslots exactly as its `KvmVm` created them (id,
    // guest address, size, host memory, flags), and nothing changes them afterwards: the
    // source never touches them through the `KvmVm` (only this tracker toggles their logging).
    // Their memory is pinned by the `KvmVm` (owned by the machine) and by the source's `mems`;
    // the tracker lives in `SourceInner::tracker` (dropped before both) and in the runner's
    // watchdog closures (dropped when the runner stops, before the machine's `KvmVm`).
    let tracker = Arc::new(unsafe {
        KvmDirtyTracker::with_options(machine.vm().shared_fd(), &slots, kind, opts)
    }?);
    // The vCPUs start paused; wait until each thread is parked (it owns its fd).
    machine.stop(STOP_TIMEOUT)?;
    for i in 0..machine.runner().len() {
        let t = tracker.clone();
        machine
            .runner()
            .with_paused_vcpu(i, move |fd| t.add_vcpu(fd))??;
    }
    if let (Some(entries), Some(soft)) = (kind.ring_entries(), opts.ring_soft_full) {
        // Poll fast from 64 entries before the soft limit.
        let near = soft.saturating_sub(64).clamp(1, entries);
        let (t1, t2) = (tracker.clone(), tracker.clone());
        machine.runner_mut().watch_ring_fill(
            move || t1.rings_hold_at_least(near),
            move |i| t2.ring_soft_full(i),
        )?;
    }
    Ok(tracker)
}

/// [`Vcpus::set_dirty_limit`] of a source tracking with `tracker`, throttling through
/// `throttle` (shared with the [`Pc`](crate::pc::Pc)).
pub(crate) fn set_dirty_limit(
    limiter: &DirtyLimiter,
    tracker: &Arc<KvmDirtyTracker>,
    throttle: crate::runner::VcpuThrottle,
    pages_per_second: Option<u64>,
) -> Result<(), VmError> {
    let Some(limit) = pages_per_second else {
        limiter.stop();
        return Ok(());
    };
    if tracker.kind().ring_entries().is_none() {
        return Err(Box::new(dirtylog_migrate::Unsupported(
            "a per-vCPU dirty limit without the dirty ring (it measures each vCPU's rate from \
             its ring: track with --tracker ring)",
        )));
    }
    if limit == 0 {
        return Err(err(
            "a dirty limit of 0 pages/s would stop the vCPUs: give at least 1",
        ));
    }
    limiter
        .start(tracker.clone(), throttle, limit)
        .map_err(|e| err(format!("spawning the dirty-limit controller: {e}")))
}

impl Drop for KvmSource {
    fn drop(&mut self) {
        self.dirty_limit.stop();
        self.reaper.stop();
    }
}

impl MigrationSource for KvmSource {
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
        self.guest_writes()
    }
}

impl MigrationMemory for KvmSource {
    fn page_size(&self) -> u32 {
        PAGE as u32
    }

    fn regions(&self) -> Vec<Region> {
        self.inner.regions.clone()
    }

    fn region_memory(&self, index: usize) -> Option<RegionMemory> {
        self.inner.mems.get(index).map(|m| region_memory(m))
    }

    fn vmm_bitmap(&self, index: usize) -> Option<&DirtyBitmap> {
        self.inner.vmm.get(index).map(|b| &**b)
    }

    /// [`GuestMemory`] is private anonymous memory that no userfaultfd handler fills: a page
    /// never populated is a page of zeros.
    fn unpopulated_is_zero(&self, _index: usize) -> bool {
        true
    }
}

impl DirtyTracker for KvmSource {
    fn kind(&self) -> TrackerKind {
        self.inner.tracker.kind()
    }

    fn start(&self) -> Result<(), VmError> {
        if self.inner.tracking.swap(true, Ordering::AcqRel) {
            return Err(err("dirty tracking is already on"));
        }
        if let Err(e) = self.inner.tracker.start() {
            self.inner.tracking.store(false, Ordering::Release);
            return Err(e.into());
        }
        if let Some(entries) = self.inner.tracker.kind().ring_entries() {
            // Half full (QEMU's rule): a vCPU parked on a full ring has at least the soft
            // limit (entries - 64 > half) unharvested, so this also releases every vCPU
            // blocked on its ring.
            let release = lock(&self.inner.machine).runner().ring_reset_notifier();
            self.reaper
                .start(self.inner.tracker.clone(), entries / 2, release)
                .map_err(|e| err(format!("spawning the ring reaper: {e}")))?;
        }
        Ok(())
    }

    fn harvest(&self, index: usize, out: &mut [u64]) -> Result<(), VmError> {
        let inner = &self.inner;
        let Some(t) = index.checked_sub(1) else {
            // The system slot is not logged: the VMM bitmap carries it (see the module docs).
            let words = (inner.regions[0].size / PAGE).div_ceil(64);
            if out.len() as u64 != words {
                return Err(err(format!(
                    "harvest buffer of {} words for the system slot, which needs {words}",
                    out.len()
                )));
            }
            return Ok(());
        };
        if inner.tracker.kind().ring_entries().is_none() {
            return Ok(inner.tracker.harvest(t, out)?);
        }
        if let Some(e) = self.reaper.error() {
            return Err(err(format!("the ring reaper failed: {e}")));
        }
        // Harvests and resets every ring: release vCPUs parked on a full one.
        let r = inner.tracker.harvest(t, out);
        lock(&inner.machine).runner().ring_reset_done();
        Ok(r?)
    }

    fn clear(&self, index: usize, first_page: u64, bits: &[u64]) -> Result<(), VmError> {
        match index.checked_sub(1) {
            None => Ok(()),
            Some(t) => Ok(self.inner.tracker.clear(t, first_page, bits)?),
        }
    }

    fn stop(&self) -> Result<(), VmError> {
        if !self.inner.tracking.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        self.reaper.stop();
        // Rings: the last harvest hands back what is left; no vCPU may stay blocked.
        let r = self.inner.tracker.stop();
        if self.inner.tracker.kind().ring_entries().is_some() {
            lock(&self.inner.machine).runner().ring_reset_done();
        }
        Ok(r?)
    }
}

impl Vcpus for KvmSource {
    fn vcpu_count(&self) -> u32 {
        self.inner.vcpus
    }

    fn pause(&self) -> Result<(), VmError> {
        let inner = &self.inner;
        if let Err(e) = self.wait_stopped() {
            // The engine resumes only a guest it paused: undo the half-done pause here.
            lock(&inner.machine).runner().resume();
            return Err(e);
        }
        // Every writer is stopped: the system slot (control region, VMM-written words) goes
        // whole into the final round.
        inner.vmm[0].set_all();
        inner.paused.store(true, Ordering::Release);
        Ok(())
    }

    fn resume(&self) -> Result<(), VmError> {
        lock(&self.inner.machine).resume(false, STOP_TIMEOUT)?;
        self.inner.paused.store(false, Ordering::Release);
        Ok(())
    }

    fn throttle(&self, percent: u8) -> Result<(), VmError> {
        lock(&self.inner.machine).runner().set_throttle(percent)?;
        Ok(())
    }

    fn set_dirty_limit(&self, pages_per_second: Option<u64>) -> Result<(), VmError> {
        let throttle = lock(&self.inner.machine).runner().vcpu_throttle();
        set_dirty_limit(
            &self.dirty_limit,
            &self.inner.tracker,
            throttle,
            pages_per_second,
        )
    }

    fn dirty_limit_throttle(&self) -> Vec<u8> {
        self.dirty_limit.throttle_percent()
    }

    fn save_state(&self) -> Result<Vec<Vec<u8>>, VmError> {
        let m = lock(&self.inner.machine);
        let runner = m.runner();
        if !runner.is_paused() || !runner.states().iter().all(|s| s.is_parked()) {
            return Err(err("save_vcpu_state while the vCPUs are not all paused"));
        }
        let rate = *lock(&self.inner.rate);
        (0..self.inner.vcpus)
            .map(|i| {
                // On the vCPU's own thread, which owns its fd.
                let spec = self.inner.spec.clone();
                let mut s = runner
                    .with_paused_vcpu(i as usize, move |fd| VcpuSnapshot::save(fd, i, &spec))??;
                s.set_vmm_section(PACING_SECTION, encode_pacing(rate))?;
                Ok(s.encode())
            })
            .collect()
    }
}

/// Options of a [`KvmTarget`].
#[derive(Clone, Debug, Default)]
pub struct TargetOptions {
    /// Back guest memory with transparent huge pages (`MADV_HUGEPAGE`). Default **false**:
    /// the destination never reads the pages the stream leaves zero (its check keeps page
    /// hashes as pages arrive), and the first write into each 2 MiB then costs a fresh huge
    /// page, zeroed whole. On our nested hosts a fresh huge page is often memory the outer
    /// hypervisor must back first (free page reporting hands 2 MiB blocks back to it): a
    /// bulk pass that lands 64 MiB took 72–260 ms with huge pages against a steady ~90 ms
    /// without (BENCHMARKS.md, issue 9).
    pub huge_pages: bool,
    /// Keep the vCPUs paused after the engine's resume, until [`KvmTarget::unpause`] (tests
    /// compare the arrived memory with the source's before the guest runs). Default false.
    pub start_paused: bool,
}

/// A KVM VM built from a migration stream's header, waiting for its memory, its vCPU states
/// and [`resume`](VcpuRestore::resume). See the [module docs](self).
pub struct KvmTarget {
    // Drop order: the vCPU threads stop first, then the vCPUs, the VM, the memory.
    pub(crate) runner: Mutex<Option<Runner>>,
    vcpus: Mutex<Vec<Option<KvmVcpu>>>,
    pub(crate) restored: Mutex<Vec<Option<Option<u64>>>>,
    mailbox: Mutex<Option<Arc<Mailbox>>>,
    pub(crate) _vm: KvmVm,
    regions: Vec<Region>,
    mems: Vec<Arc<GuestMemory>>,
    sys: Arc<GuestMemory>,
    vcpu_count: u32,
    /// What a source of this kind saves: incoming vCPU states may set only these MSRs.
    pub(crate) spec: StateSpec,
    resumed: AtomicBool,
    start_paused: bool,
}

impl std::fmt::Debug for KvmTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmTarget")
            .field("regions", &self.regions)
            .field("vcpus", &self.vcpu_count)
            .field("resumed", &self.resumed)
            .finish_non_exhaustive()
    }
}

impl KvmTarget {
    /// An empty VM with `header`'s memory map and vCPU count (see the [module docs](self)).
    pub fn new(header: &StreamHeader, opts: &TargetOptions) -> Result<Self, VmError> {
        if u64::from(header.page_size()) != crate::sys::host_page_size() {
            return Err(err(format!(
                "the stream's page size is {}, this host's {}",
                header.page_size(),
                crate::sys::host_page_size()
            )));
        }
        let vcpus = header.vcpu_count();
        let max = control::max_vcpus(layout::CONTROL_SIZE);
        if vcpus == 0 || vcpus > max {
            return Err(err(format!("{vcpus} vCPUs: this harness runs 1 to {max}")));
        }
        let regions = header.regions().to_vec();
        let sys_index = regions
            .iter()
            .position(|r| r.slot == SYSTEM_SLOT && r.gpa == 0 && r.size >= layout::PAGE_TABLES)
            .ok_or_else(|| {
                err(
                    "the stream has no system slot (slot 0 at guest-physical 0, at least 1 MiB): \
                     it does not come from a dirtylog KVM guest",
                )
            })?;
        let top = regions.iter().map(|r| r.gpa + r.size).max().unwrap_or(0);
        if top > layout::MAX_GPA {
            return Err(err(format!(
                "guest memory ends at {top:#x}, above the {:#x} this harness maps",
                layout::MAX_GPA
            )));
        }
        let mut vm = KvmVm::new()?;
        let spec = StateSpec::probe(vm.kvm())?;
        let mut mems = Vec::with_capacity(regions.len());
        for r in &regions {
            let size = usize::try_from(r.size).map_err(|_| err("region too large"))?;
            let mem = Arc::new(GuestMemory::new(
                size,
                MemoryOptions {
                    no_huge_pages: !opts.huge_pages,
                    populate: false,
                },
            )?);
            if opts.huge_pages {
                advise_huge_pages(&mem);
            }
            vm.set_memslot(r.slot, r.gpa, mem.clone(), 0)?;
            mems.push(mem);
        }
        let mut created = Vec::with_capacity(vcpus as usize);
        for _ in 0..vcpus {
            let v = vm.create_vcpu()?;
            // CPUID (and a valid long-mode state, overwritten by the restore).
            x86::setup_long_mode(vm.kvm(), v.fd())?;
            created.push(Some(v));
        }
        Ok(KvmTarget {
            runner: Mutex::new(None),
            vcpus: Mutex::new(created),
            restored: Mutex::new(vec![None; vcpus as usize]),
            mailbox: Mutex::new(None),
            _vm: vm,
            sys: mems[sys_index].clone(),
            regions,
            mems,
            vcpu_count: vcpus,
            spec,
            resumed: AtomicBool::new(false),
            start_paused: opts.start_paused,
        })
    }

    /// Guest writes so far, all vCPUs (from the migrated control region).
    pub fn guest_writes(&self) -> u64 {
        writes(&self.sys, self.vcpu_count)
    }

    /// Mailbox requests served here since the resume.
    pub fn mailbox_served(&self) -> u64 {
        lock(&self.mailbox)
            .as_ref()
            .map_or(0, |m| m.served.load(Ordering::Relaxed))
    }

    /// vCPU `vcpu`'s mailbox sequence number and whether its record is intact (0 and false
    /// before the resume or without a mailbox).
    pub fn mailbox_record(&self, vcpu: u32) -> (u64, bool) {
        lock(&self.mailbox)
            .as_ref()
            .map_or((0, false), |m| m.record(vcpu))
    }

    /// Whether the guest runs here.
    pub fn is_resumed(&self) -> bool {
        self.resumed.load(Ordering::Acquire)
    }

    /// Pause the guest's vCPUs (after the resume; see [`Runner::pause`]).
    pub fn pause(&self, timeout: Duration) -> Result<(), VmError> {
        let runner = lock(&self.runner);
        let r = runner
            .as_ref()
            .ok_or_else(|| err("the target has not resumed"))?;
        r.pause(timeout)?;
        Ok(())
    }

    /// Let the guest's vCPUs run (after [`pause`](Self::pause), or with
    /// [`TargetOptions::start_paused`]).
    pub fn unpause(&self) -> Result<(), VmError> {
        let runner = lock(&self.runner);
        let r = runner
            .as_ref()
            .ok_or_else(|| err("the target has not resumed"))?;
        r.resume();
        Ok(())
    }

    /// Where each vCPU thread is (empty before the resume).
    pub fn vcpu_states(&self) -> Vec<VcpuRunState> {
        lock(&self.runner)
            .as_ref()
            .map_or_else(Vec::new, Runner::states)
    }

    /// The first vCPU error, if a vCPU thread failed.
    pub fn check(&self) -> Result<(), VmError> {
        if let Some(r) = lock(&self.runner).as_ref() {
            r.check()?;
        }
        Ok(())
    }

    /// Stop the guest and its threads; the first vCPU error, if any.
    pub fn shutdown(self) -> Result<(), VmError> {
        let runner = lock(&self.runner).take();
        if let Some(mut r) = runner {
            r.shutdown(STOP_TIMEOUT)?;
        }
        Ok(())
    }

    fn start(&self) -> Result<(), VmError> {
        let vcpus: Vec<KvmVcpu> = {
            let restored = lock(&self.restored);
            if let Some(i) = restored.iter().position(Option::is_none) {
                return Err(err(format!("resume before the state of vCPU {i} arrived")));
            }
            let mut slots = lock(&self.vcpus);
            slots.iter_mut().map(Option::take).collect::<Option<_>>()
        }
        .ok_or_else(|| err("the target was resumed already"))?;
        let rate = lock(&self.restored)
            .first()
            .copied()
            .flatten()
            .unwrap_or(None);
        // Paused until the devices and the pacing are in place.
        let runner = Runner::start_paused(vcpus, self.sys.clone())?;
        let store = |r| *lock(&self.runner) = Some(r);
        // The mailbox the guest's control region names, if any.
        let gpa = self.sys.read_u64(layout::CONTROL + control::MAILBOX);
        if gpa != 0 {
            let found = self
                .regions
                .iter()
                .enumerate()
                .find(|(_, r)| gpa >= r.gpa && gpa + PAGE <= r.gpa + r.size);
            let Some((i, r)) = found else {
                store(runner);
                return Err(err(format!("the guest's mailbox {gpa:#x} is in no region")));
            };
            let mailbox = Arc::new(Mailbox {
                mem: self.mems[i].clone(),
                offset: gpa - r.gpa,
                sys: self.sys.clone(),
                bitmap: None,
                track: Arc::new(AtomicBool::new(false)),
                served: AtomicU64::new(0),
            });
            if let Err(e) = runner.set_port_handler(ports::MAILBOX, mailbox.handler()) {
                store(runner);
                return Err(e.into());
            }
            *lock(&self.mailbox) = Some(mailbox);
        }
        runner.set_rate(rate.map(|r| r as f64));
        if !self.start_paused {
            runner.resume();
        }
        store(runner);
        Ok(())
    }
}

impl MigrationTarget for KvmTarget {
    type Memory = Self;
    type Vcpus = Self;

    fn memory(&self) -> &Self {
        self
    }

    fn vcpus(&self) -> &Self {
        self
    }

    fn guest_progress(&self) -> u64 {
        self.guest_writes()
    }
}

impl MigrationMemory for KvmTarget {
    fn page_size(&self) -> u32 {
        PAGE as u32
    }

    fn regions(&self) -> Vec<Region> {
        self.regions.clone()
    }

    fn region_memory(&self, index: usize) -> Option<RegionMemory> {
        self.mems.get(index).map(|m| region_memory(m))
    }
}

impl VcpuRestore for KvmTarget {
    fn restore_state(&self, vcpu_id: u32, blob: &[u8]) -> Result<(), VmError> {
        let s = VcpuSnapshot::decode(blob)?;
        if s.vcpu_id != vcpu_id {
            return Err(err(format!(
                "the state sent for vCPU {vcpu_id} is vCPU {}'s",
                s.vcpu_id
            )));
        }
        s.check_msrs(&self.spec)?;
        let rate = match s.vmm_section(PACING_SECTION) {
            Some(b) => decode_pacing(b)?,
            None => None,
        };
        {
            let vcpus = lock(&self.vcpus);
            let v = vcpus
                .get(vcpu_id as usize)
                .and_then(Option::as_ref)
                .ok_or_else(|| err(format!("no vCPU {vcpu_id} waiting for its state")))?;
            s.restore(v.fd())?;
        }
        lock(&self.restored)[vcpu_id as usize] = Some(rate);
        Ok(())
    }

    fn resume(&self) -> Result<(), VmError> {
        self.start()?;
        self.resumed.store(true, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacing_round_trips() {
        for r in [None, Some(0), Some(12_345)] {
            assert_eq!(decode_pacing(&encode_pacing(r)).unwrap(), r);
        }
        assert!(decode_pacing(&[1, 2, 3]).is_err());
    }
}
