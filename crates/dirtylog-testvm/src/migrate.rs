//! Live migration of real KVM guests: [`KvmSource`] and [`KvmTarget`] implement the engine's
//! traits on `dirtylog-kvm`'s harness.
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
//! KVM's dirty log, so the mailbox device marks it in the region's [`VmmDirtyBitmap`], which the
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
//! counters, on every write) the VMM writes it too (the `STOP` word, the pacer's `BUDGET`
//! grants). Rather than log a page that is dirty all the time and chase the VMM's writes,
//! [`pause`](MigrationSource::pause) marks the whole slot in its VMM bitmap once the vCPUs
//! are stopped, so the final round re-sends it, consistent with the paused vCPUs. Its cost is
//! the final round's copy of a few dozen non-zero pages.
//!
//! # Trackers ([`KvmTracker`])
//!
//! - `DirtyLog`: `KVM_GET_DIRTY_LOG`, which clears and re-protects; `clear` is a no-op.
//! - `ClearLog`: manual protect with `KVM_DIRTY_LOG_INITIALLY_SET` (QEMU's mode): enabling
//!   logging write-protects nothing and reports every page dirty; `harvest` is the GET
//!   snapshot; the engine's per-chunk `clear` is `KVM_CLEAR_DIRTY_LOG`, which re-protects.
//! - `Ring`: per-vCPU dirty rings. A reaper thread harvests the rings into per-region pending
//!   bitmaps whenever one is half full (QEMU's reaper), so vCPUs rarely block on a full ring
//!   between the engine's harvests; the harness's watchdog kicks vCPUs at the soft limit so
//!   that this host's late ring-full exits cannot overflow a ring. `harvest` collects every
//!   ring, resets them (`KVM_RESET_DIRTY_RINGS`) and returns the pending bits.
//!
//! # Pause, vCPU state, throttle
//!
//! Pausing sets the control region's `STOP` word, which the guest polls on every write, and
//! waits until every vCPU is parked at its sync exit (with rings, harvesting to release a vCPU
//! blocked on a full ring first). A parked vCPU's state is saved through a duplicate of its fd
//! ([`VcpuSnapshot`]: registers, segments, control registers, EFER and the other MSRs, XSAVE,
//! XCR0, events, MP state, debug registers), plus the pacer's rate as a VMM section. The
//! throttle holds vCPU threads out of `KVM_RUN` for a share of every 10 ms
//! ([`Runner::set_throttle`](crate::Runner::set_throttle)).
//!
//! # The target
//!
//! [`KvmTarget::new`] builds a VM with the stream's memory map (the system slot must be slot 0
//! at GPA 0) and creates the vCPUs with the host's CPUID, without loading any program: memory
//! comes from the stream. vCPU states are loaded as they arrive; the vCPU threads start only in
//! [`resume`](MigrationTarget::resume), after the engine has checked every region's hash. A
//! restored vCPU first re-executes the `out` it was parked at (see
//! [`crate::vcpu_state`]) and parks there; the target then serves the mailbox at the
//! address the guest's control region names, applies the source's pacing, clears `STOP` and
//! releases the vCPUs.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::guest::{control, ports};
use crate::machine::SYSTEM_SLOT;
use crate::runner::PortHandler;
use crate::vcpu_state::{StateSpec, VcpuSnapshot, VMM_SECTION_BASE};
use crate::x86::{self, layout};
use crate::{
    GuestMemory, KvmVcpu, KvmVm, Machine, MachineConfig, MemoryOptions, Program, Runner, Tracking,
    VcpuState,
};
use dirtylog::DirtyBitmap;

use dirtylog_migrate::wire::{Region, StreamHeader};
use dirtylog_migrate::VmError;
use dirtylog_migrate::VmmDirtyBitmap;
use dirtylog_migrate::{MigrationSource, MigrationTarget, RegionMemory};

/// Pages of the device slot; the mailbox is its first page.
pub const DEVICE_PAGES: u64 = 16;
/// Bytes of one vCPU's mailbox record: sequence, host time (ns since the Unix epoch), the
/// vCPU's write count when it asked, and a check word (`sequence ^ MAILBOX_CHECK`).
pub const MAILBOX_RECORD: u64 = 32;
/// XORed into the sequence number for the record's check word.
pub const MAILBOX_CHECK: u64 = 0x6d61_696c_626f_7821;
/// The VMM section of a vCPU blob holding the pacer's rate.
pub const PACING_SECTION: u32 = VMM_SECTION_BASE;
/// How long [`pause`](MigrationSource::pause) and the target's start wait for the vCPUs.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

const PAGE: u64 = 4096;

/// Which KVM dirty tracker the source uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmTracker {
    /// `KVM_GET_DIRTY_LOG`, which clears and re-protects.
    DirtyLog,
    /// Manual protect with `INITIALLY_SET`: GET snapshots, chunked `KVM_CLEAR_DIRTY_LOG`.
    ClearLog,
    /// Per-vCPU dirty rings of this many entries (a power of two, 1024..=65536).
    Ring {
        /// Entries per vCPU.
        entries: u32,
    },
}

impl KvmTracker {
    /// Short name, as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            KvmTracker::DirtyLog => "dirty-log",
            KvmTracker::ClearLog => "clear-log",
            KvmTracker::Ring { .. } => "ring",
        }
    }
}

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
    /// The dirty tracker.
    pub tracker: KvmTracker,
    /// Seed of the guests' random generators.
    pub seed: u64,
    /// Back guest memory with transparent huge pages where the host allows
    /// (`MADV_HUGEPAGE`), as VMMs usually do: untouched memory then reads as the huge zero
    /// page, so the bulk pass's zero scan costs one fault per 2 MiB instead of per 4 KiB.
    /// Dirty tracking stays at 4 KiB (KVM splits its mappings when logging starts).
    pub huge_pages: bool,
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
            tracker: KvmTracker::ClearLog,
            seed: 1,
            huge_pages: true,
        }
    }
}

/// `madvise(MADV_HUGEPAGE)` on `mem`: transparent huge pages for it where the host's THP mode
/// is `madvise` (a hint: failures are ignored, the memory works either way).
fn advise_huge_pages(mem: &GuestMemory) {
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
    bitmap: Option<Arc<VmmDirtyBitmap>>,
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
        // Data first, then the mark (the VmmDirtyBitmap protocol).
        if let Some(b) = &self.bitmap {
            if self.track.load(Ordering::Relaxed) {
                b.mark_range(base, MAILBOX_RECORD);
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn err(msg: impl Into<String>) -> VmError {
    msg.into().into()
}

/// Sum of the vCPUs' write counters in the control region of `sys`.
fn writes(sys: &GuestMemory, vcpus: u32) -> u64 {
    (0..vcpus)
        .map(|i| sys.read_u64(layout::CONTROL + control::vcpu(i) + control::WRITES))
        .sum()
}

fn region_memory(mem: &GuestMemory) -> RegionMemory {
    RegionMemory {
        ptr: mem.host_addr() as *mut u8,
        len: mem.len(),
    }
}

fn encode_pacing(rate: Option<u64>) -> Vec<u8> {
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
    machine: Mutex<Machine>,
    tracker: KvmTracker,
    regions: Vec<Region>,
    mems: Vec<Arc<GuestMemory>>,
    sys: Arc<GuestMemory>,
    vcpus: u32,
    spec: StateSpec,
    vmm: Vec<Arc<VmmDirtyBitmap>>,
    /// Ring mode: pages harvested from the rings, per region, not yet returned by `harvest`.
    pending: Vec<DirtyBitmap>,
    /// Bitmap modes: the GET buffer of each region.
    scratch: Mutex<Vec<Vec<u64>>>,
    /// The first error of the ring reaper.
    reaper_error: Mutex<Option<String>>,
    reaper_quit: AtomicBool,
    rate: Mutex<Option<u64>>,
    mailbox: Arc<Mailbox>,
    tracking: AtomicBool,
    paused: AtomicBool,
}

/// A running KVM guest to migrate away. See the [module docs](self).
pub struct KvmSource {
    inner: Arc<SourceInner>,
    reaper: Mutex<Option<JoinHandle<()>>>,
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
        let tracking = match cfg.tracker {
            KvmTracker::DirtyLog => Tracking::Bitmap,
            KvmTracker::ClearLog => Tracking::Manual {
                initially_set: true,
            },
            KvmTracker::Ring { entries } => {
                if !entries.is_power_of_two() || !(1024..=65536).contains(&entries) {
                    return Err(err(format!(
                        "a ring of {entries} entries: use a power of two from 1024 to 65536"
                    )));
                }
                Tracking::Ring { entries }
            }
        };
        let machine = Machine::new(MachineConfig {
            vcpus: cfg.vcpus,
            program: Program::DeviceDirtier,
            slot_pages: vec![pages, DEVICE_PAGES],
            log_dirty_pages: false,
            tracking,
            memory: MemoryOptions {
                no_huge_pages: !cfg.huge_pages,
                populate: false,
            },
            seed: cfg.seed,
        })?;
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
        let vmm: Vec<Arc<VmmDirtyBitmap>> = regions
            .iter()
            .map(|r| Arc::new(VmmDirtyBitmap::new(r.size / PAGE, PAGE)))
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
            tracker: cfg.tracker,
            pending: regions
                .iter()
                .map(|r| DirtyBitmap::new(r.size / PAGE))
                .collect(),
            scratch: Mutex::new(
                regions
                    .iter()
                    .map(|r| vec![0; (r.size / PAGE).div_ceil(64) as usize])
                    .collect(),
            ),
            machine: Mutex::new(machine),
            regions,
            mems,
            sys,
            vcpus: cfg.vcpus,
            spec,
            vmm,
            reaper_error: Mutex::new(None),
            reaper_quit: AtomicBool::new(false),
            rate: Mutex::new(rate),
            mailbox,
            tracking: AtomicBool::new(false),
            paused: AtomicBool::new(false),
        };
        Ok(KvmSource {
            inner: Arc::new(inner),
            reaper: Mutex::new(None),
            track_vmm,
        })
    }

    /// Guest writes so far, all vCPUs.
    pub fn guest_writes(&self) -> u64 {
        writes(&self.inner.sys, self.inner.vcpus)
    }

    /// Mailbox requests served by this VMM.
    pub fn mailbox_served(&self) -> u64 {
        self.inner.mailbox.served.load(Ordering::Relaxed)
    }

    /// vCPU `vcpu`'s mailbox sequence number, and whether its record is intact.
    pub fn mailbox_record(&self, vcpu: u32) -> (u64, bool) {
        self.inner.mailbox.record(vcpu)
    }

    /// Whether [`pause`](MigrationSource::pause) stopped the guest and nothing resumed it.
    pub fn is_paused(&self) -> bool {
        self.inner.paused.load(Ordering::Acquire)
    }

    /// The vCPU throttle in force, percent.
    pub fn throttle_percent(&self) -> u8 {
        lock(&self.inner.machine).runner().throttle()
    }

    /// Where each vCPU thread is.
    pub fn vcpu_states(&self) -> Vec<VcpuState> {
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
        self.stop_reaper();
        let r = lock(&self.inner.machine).runner().check();
        // Dropping the machine stops and joins the vCPU threads.
        drop(self);
        r.map_err(Into::into)
    }

    fn stop_reaper(&self) {
        self.inner.reaper_quit.store(true, Ordering::Release);
        if let Some(h) = lock(&self.reaper).take() {
            let _ = h.join();
        }
    }

    /// Wait until every vCPU is parked at its sync exit (after `STOP` was set).
    fn wait_stopped(&self) -> Result<(), VmError> {
        let inner = &self.inner;
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            {
                let mut m = lock(&inner.machine);
                m.runner().check()?;
                let states = m.runner().states();
                if states.iter().all(|s| *s == VcpuState::Synced) {
                    return Ok(());
                }
                if states.contains(&VcpuState::RingFull) && inner.tracking.load(Ordering::Acquire) {
                    // Release it: it finishes its write (logged in the ring) and stops.
                    inner.reap(&mut m)?;
                }
                if Instant::now() > deadline {
                    return Err(err(format!(
                        "the vCPUs did not stop within {STOP_TIMEOUT:?} (states: {states:?})"
                    )));
                }
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// The test slots (every region but the system slot): index and slot id.
    fn test_slots(&self) -> impl Iterator<Item = (usize, u32)> + '_ {
        self.inner
            .regions
            .iter()
            .enumerate()
            .filter(|(_, r)| r.slot != SYSTEM_SLOT)
            .map(|(i, r)| (i, r.slot))
    }
}

impl SourceInner {
    /// Collect and reset every ring into the pending bitmaps. Needs the machine locked.
    fn reap(&self, m: &mut Machine) -> Result<(), VmError> {
        let mut bad = None;
        m.harvest_rings(|_, e| {
            match self
                .regions
                .iter()
                .position(|r| r.slot == e.slot && r.slot != SYSTEM_SLOT)
            {
                Some(i) if e.offset < self.pending[i].npages() => self.pending[i].set(e.offset),
                _ => bad = Some((e.slot, e.offset)),
            }
        })?;
        if let Some((slot, offset)) = bad {
            return Err(err(format!(
                "dirty ring entry for slot {slot} page {offset}, outside the guest's memory"
            )));
        }
        Ok(())
    }

    fn reaper(&self, threshold: u32) {
        while !self.reaper_quit.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(1));
            let mut m = lock(&self.machine);
            let blocked = m.runner().states().contains(&VcpuState::RingFull);
            if blocked || m.rings_hold_at_least(threshold) {
                if let Err(e) = self.reap(&mut m) {
                    lock(&self.reaper_error).get_or_insert(e.to_string());
                    return;
                }
            }
        }
    }
}

impl Drop for KvmSource {
    fn drop(&mut self) {
        self.stop_reaper();
    }
}

impl MigrationSource for KvmSource {
    fn page_size(&self) -> u32 {
        PAGE as u32
    }

    fn vcpu_count(&self) -> u32 {
        self.inner.vcpus
    }

    fn regions(&self) -> Vec<Region> {
        self.inner.regions.clone()
    }

    fn memory(&self, index: usize) -> RegionMemory {
        region_memory(&self.inner.mems[index])
    }

    fn start_tracking(&self) -> Result<(), VmError> {
        if self.inner.tracking.swap(true, Ordering::AcqRel) {
            return Err(err("dirty tracking is already on"));
        }
        let slots: Vec<u32> = self.test_slots().map(|(_, s)| s).collect();
        {
            let mut m = lock(&self.inner.machine);
            for &slot in &slots {
                m.vm_mut().set_logging(slot, true)?;
            }
        }
        if let KvmTracker::Ring { entries } = self.inner.tracker {
            self.inner.reaper_quit.store(false, Ordering::Release);
            let inner = self.inner.clone();
            let h = std::thread::Builder::new()
                .name("ring-reaper".into())
                .spawn(move || inner.reaper(entries / 2))
                .map_err(|e| err(format!("spawning the ring reaper: {e}")))?;
            *lock(&self.reaper) = Some(h);
        }
        Ok(())
    }

    fn harvest(&self, index: usize, out: &mut [u64]) -> Result<(), VmError> {
        let inner = &self.inner;
        let region = &inner.regions[index];
        if out.len() as u64 != (region.size / PAGE).div_ceil(64) {
            return Err(err(format!(
                "harvest buffer of {} words for slot {}",
                out.len(),
                region.slot
            )));
        }
        if region.slot == SYSTEM_SLOT {
            // Not logged: the VMM bitmap carries it (see the module docs).
            return Ok(());
        }
        match inner.tracker {
            KvmTracker::DirtyLog | KvmTracker::ClearLog => {
                let mut scratch = lock(&inner.scratch);
                let buf = &mut scratch[index];
                lock(&inner.machine).vm().get_dirty_log(region.slot, buf)?;
                for (o, b) in out.iter_mut().zip(buf.iter()) {
                    *o |= *b;
                }
            }
            KvmTracker::Ring { .. } => {
                if let Some(e) = lock(&inner.reaper_error).clone() {
                    return Err(err(format!("the ring reaper failed: {e}")));
                }
                {
                    let mut m = lock(&inner.machine);
                    inner.reap(&mut m)?;
                }
                let pending = &inner.pending[index];
                for (i, o) in out.iter_mut().enumerate() {
                    if pending.load_word(i) != 0 {
                        *o |= pending.take_word(i);
                    }
                }
            }
        }
        Ok(())
    }

    fn clear(&self, index: usize, first_page: u64, bits: &[u64]) -> Result<(), VmError> {
        let region = &self.inner.regions[index];
        if self.inner.tracker != KvmTracker::ClearLog || region.slot == SYSTEM_SLOT {
            return Ok(());
        }
        let npages = region.size / PAGE;
        let num = (bits.len() as u64 * 64).min(npages.saturating_sub(first_page));
        if num == 0 {
            return Ok(());
        }
        let num = u32::try_from(num).map_err(|_| err("clear of more than 2^32 pages"))?;
        lock(&self.inner.machine)
            .vm()
            .clear_dirty_log(region.slot, first_page, num, bits)?;
        Ok(())
    }

    fn stop_tracking(&self) -> Result<(), VmError> {
        if !self.inner.tracking.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        self.stop_reaper();
        let slots: Vec<u32> = self.test_slots().map(|(_, s)| s).collect();
        let mut m = lock(&self.inner.machine);
        for &slot in &slots {
            m.vm_mut().set_logging(slot, false)?;
        }
        if matches!(self.inner.tracker, KvmTracker::Ring { .. }) {
            // Hand back what is left, so that no vCPU stays blocked on a full ring.
            self.inner.reap(&mut m)?;
            for p in &self.inner.pending {
                for i in 0..p.words() {
                    p.take_word(i);
                }
            }
        }
        Ok(())
    }

    fn vmm_bitmap(&self, index: usize) -> Option<&VmmDirtyBitmap> {
        self.inner.vmm.get(index).map(|b| &**b)
    }

    fn pause(&self) -> Result<(), VmError> {
        let inner = &self.inner;
        inner.sys.write_u64(layout::CONTROL + control::STOP, 1);
        lock(&inner.machine).runner().poke();
        if let Err(e) = self.wait_stopped() {
            // The engine resumes only a guest it paused: undo the half-done pause here.
            inner.sys.write_u64(layout::CONTROL + control::STOP, 0);
            lock(&inner.machine).runner().release();
            return Err(e);
        }
        // Every writer is stopped: the system slot (control region, VMM-written words) goes
        // whole into the final round.
        let sys = &inner.regions[0];
        inner.vmm[0].mark_range(0, sys.size);
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

    fn save_vcpu_state(&self) -> Result<Vec<Vec<u8>>, VmError> {
        let m = lock(&self.inner.machine);
        let runner = m.runner();
        if !runner.states().iter().all(|s| *s == VcpuState::Synced) {
            return Err(err("save_vcpu_state while the vCPUs are not all parked"));
        }
        let rate = *lock(&self.inner.rate);
        (0..self.inner.vcpus)
            .map(|i| {
                let fd = runner
                    .vcpu_fd(i as usize)
                    .ok_or_else(|| err(format!("no fd for vCPU {i}")))?;
                let mut s = VcpuSnapshot::save(fd, i, &self.inner.spec)?;
                s.set_vmm_section(PACING_SECTION, encode_pacing(rate))?;
                Ok(s.encode())
            })
            .collect()
    }

    fn guest_progress(&self) -> u64 {
        self.guest_writes()
    }
}

/// Options of a [`KvmTarget`].
#[derive(Clone, Debug)]
pub struct TargetOptions {
    /// Back guest memory with transparent huge pages (`MADV_HUGEPAGE`): pages the stream
    /// leaves zero then read as the huge zero page during the hash check. Default true.
    pub huge_pages: bool,
}

impl Default for TargetOptions {
    fn default() -> Self {
        TargetOptions { huge_pages: true }
    }
}

/// A KVM VM built from a migration stream's header, waiting for its memory, its vCPU states
/// and [`resume`](MigrationTarget::resume). See the [module docs](self).
pub struct KvmTarget {
    // Drop order: the vCPU threads stop first, then the vCPUs, the VM, the memory.
    runner: Mutex<Option<Runner>>,
    vcpus: Mutex<Vec<Option<KvmVcpu>>>,
    restored: Mutex<Vec<Option<Option<u64>>>>,
    mailbox: Mutex<Option<Arc<Mailbox>>>,
    _vm: KvmVm,
    regions: Vec<Region>,
    mems: Vec<Arc<GuestMemory>>,
    sys: Arc<GuestMemory>,
    vcpu_count: u32,
    resumed: AtomicBool,
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
            resumed: AtomicBool::new(false),
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

    /// Where each vCPU thread is (empty before the resume).
    pub fn vcpu_states(&self) -> Vec<VcpuState> {
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
        let runner = Runner::start(vcpus, self.sys.clone())?;
        // The mailbox the guest's control region names, if any.
        let gpa = self.sys.read_u64(layout::CONTROL + control::MAILBOX);
        if gpa != 0 {
            let (i, r) = self
                .regions
                .iter()
                .enumerate()
                .find(|(_, r)| gpa >= r.gpa && gpa + PAGE <= r.gpa + r.size)
                .ok_or_else(|| err(format!("the guest's mailbox {gpa:#x} is in no region")))?;
            let mailbox = Arc::new(Mailbox {
                mem: self.mems[i].clone(),
                offset: gpa - r.gpa,
                sys: self.sys.clone(),
                bitmap: None,
                track: Arc::new(AtomicBool::new(false)),
                served: AtomicU64::new(0),
            });
            runner.set_port_handler(ports::MAILBOX, mailbox.handler())?;
            *lock(&self.mailbox) = Some(mailbox);
        }
        // Every vCPU re-executes the `out` it was saved at and parks there.
        let parked = runner.wait_all(
            "the restored vCPUs to park at their sync exit",
            STOP_TIMEOUT,
            |s| s == VcpuState::Synced,
        );
        let store = |r| *lock(&self.runner) = Some(r);
        if let Err(e) = parked {
            store(runner);
            return Err(e.into());
        }
        runner.set_rate(rate.map(|r| r as f64));
        self.sys.write_u64(layout::CONTROL + control::STOP, 0);
        runner.release();
        store(runner);
        Ok(())
    }
}

impl MigrationTarget for KvmTarget {
    fn memory(&self, index: usize) -> RegionMemory {
        region_memory(&self.mems[index])
    }

    fn restore_vcpu_state(&self, vcpu_id: u32, blob: &[u8]) -> Result<(), VmError> {
        let s = VcpuSnapshot::decode(blob)?;
        if s.vcpu_id != vcpu_id {
            return Err(err(format!(
                "the state sent for vCPU {vcpu_id} is vCPU {}'s",
                s.vcpu_id
            )));
        }
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

    fn guest_progress(&self) -> u64 {
        self.guest_writes()
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
