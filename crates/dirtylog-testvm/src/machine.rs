//! A minimal VMM: one KVM VM with a system memslot (page tables, GDT, control region, code;
//! never logged) and test memslots the workload writes, N vCPUs booted straight into long
//! mode, each on its own thread, and the chosen dirty tracking.
//!
//! The VMM stops guests itself: [`Machine::stop`] pauses every vCPU wherever it is
//! ([`Runner::pause`]), and [`Machine::resume`] lets them run on. Memstress and the script
//! program are driven pass by pass through their sync exits instead.
//!
//! Test slots are `1..=n`, contiguous in guest-physical space from
//! [`layout::TEST_BASE`]; the workload sees them as one range of pages. Page `p` of that
//! range is page `p - first` of the slot containing it.

use std::sync::Arc;
use std::time::Duration;

use dirtylog::ring::RingEntry;

use crate::error::{Error, Result};
use crate::guest::{control, Program};
use crate::memory::{GuestMemory, MemoryOptions};
use crate::ring::{DirtyRings, HarvestStats};
use crate::runner::{Runner, VcpuRunState};
use crate::sys::{self, KVM_MEM_LOG_DIRTY_PAGES};
use dirtylog::TrackerKind;

use crate::vm::{KvmVm, RingSetup};
use crate::x86::{self, layout, EntryRegs};

/// The system memslot's id.
pub const SYSTEM_SLOT: u32 = 0;

/// What to build.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MachineConfig {
    /// vCPUs.
    pub vcpus: u32,
    /// The guest program every vCPU runs.
    pub program: Program,
    /// Pages of each test memslot.
    pub slot_pages: Vec<u64>,
    /// Create test slots with `KVM_MEM_LOG_DIRTY_PAGES`.
    pub log_dirty_pages: bool,
    /// The dirty tracker the VM is set up for (manual protect or the ring enabled at
    /// creation; dirty-log needs nothing).
    pub tracker: TrackerKind,
    /// With [`TrackerKind::ClearLog`]: enable `KVM_DIRTY_LOG_INITIALLY_SET` (QEMU's mode;
    /// the default). Ignored by the other trackers.
    pub initially_set: bool,
    /// Backing of test memory.
    #[serde(skip)]
    pub memory: MemoryOptions,
    /// Seed of the guests' random generators.
    pub seed: u64,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpus: 1,
            program: Program::Stamp,
            slot_pages: vec![64 * 64 + 3],
            log_dirty_pages: true,
            tracker: TrackerKind::DirtyLog,
            initially_set: true,
            memory: MemoryOptions {
                no_huge_pages: true,
                populate: false,
            },
            seed: 1,
        }
    }
}

/// A test memslot.
#[derive(Debug, Clone)]
pub struct TestRegion {
    /// Memslot id.
    pub slot: u32,
    /// Guest-physical address.
    pub gpa: u64,
    /// Index of its first page in the workload's page range.
    pub first_page: u64,
    /// Pages.
    pub pages: u64,
    /// Backing memory.
    pub mem: Arc<GuestMemory>,
}

/// The running machine. Dropping it stops the vCPU threads.
#[derive(Debug)]
pub struct Machine {
    // Drop order: threads stop first.
    runner: Runner,
    rings: DirtyRings,
    vm: KvmVm,
    sys: Arc<GuestMemory>,
    regions: Vec<TestRegion>,
    cfg: MachineConfig,
    ring: Option<RingSetup>,
    /// Per vCPU, its ring-full exit count when a harvest last found entries in its ring.
    ring_progress: Vec<u64>,
}

fn guest_seed(seed: u64, i: u32) -> u64 {
    // splitmix64 of (seed, vcpu).
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i as u64 + 1));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) | 1
}

/// Entries of each vCPU's script page list.
fn script_capacity(vcpus: u32) -> u64 {
    layout::SCRIPT_SIZE / 8 / vcpus.max(1) as u64
}

impl Machine {
    /// Build the VM, load the program, create the vCPUs and start their threads. Every guest
    /// starts stopped, having written nothing: memstress and script guests parked at their
    /// first sync exit, the others paused before their first instruction ([`Machine::resume`]
    /// starts them).
    pub fn new(cfg: MachineConfig) -> Result<Self> {
        Self::with_vm_setup(cfg, |_| Ok(()))
    }

    /// [`new`](Self::new), calling `setup(&vm)` on the new VM after `cfg.tracker`'s
    /// capability is enabled and before any memslot or vCPU is created: where a VMM enables
    /// what a `dirtylog_kvm::KvmDirtyTracker` needs (`KvmDirtyTracker::enable`, with
    /// `cfg.tracker` left at [`TrackerKind::DirtyLog`] so that the machine enables nothing
    /// itself, maps no ring and starts no ring watchdog).
    pub fn with_vm_setup(
        cfg: MachineConfig,
        setup: impl FnOnce(&KvmVm) -> Result<()>,
    ) -> Result<Self> {
        let page = sys::host_page_size();
        if cfg.vcpus == 0 || cfg.vcpus > control::max_vcpus(layout::CONTROL_SIZE) {
            return Err(Error::Config(format!(
                "{} vCPUs: between 1 and {} supported",
                cfg.vcpus,
                control::max_vcpus(layout::CONTROL_SIZE)
            )));
        }
        if cfg.slot_pages.is_empty() || cfg.slot_pages.contains(&0) {
            return Err(Error::Config(
                "at least one test slot, of at least one page each, is needed".into(),
            ));
        }
        let total: u64 = cfg.slot_pages.iter().sum();
        if total < cfg.vcpus as u64 {
            return Err(Error::Config(format!(
                "{total} test pages cannot be split among {} vCPUs",
                cfg.vcpus
            )));
        }
        let top = layout::TEST_BASE + total * page;
        let mut vm = KvmVm::new()?;
        let ring = match cfg.tracker {
            TrackerKind::DirtyLog => None,
            TrackerKind::ClearLog => {
                vm.enable_manual_protect(cfg.initially_set)?;
                None
            }
            TrackerKind::Ring { entries } => Some(vm.enable_dirty_ring(entries)?),
        };
        setup(&vm)?;

        let sys = Arc::new(GuestMemory::new(
            x86::system_slot_size(top) as usize,
            MemoryOptions {
                no_huge_pages: false,
                populate: false,
            },
        )?);
        x86::write_gdt(&sys);
        x86::write_page_tables(&sys, top)?;
        let code = cfg.program.assemble(layout::CODE)?;
        if code.len() as u64 > layout::CODE_SIZE {
            return Err(Error::Assemble(format!(
                "program is {} bytes, more than {}",
                code.len(),
                layout::CODE_SIZE
            )));
        }
        sys.write_bytes(layout::CODE, &code);
        vm.set_memslot(SYSTEM_SLOT, 0, sys.clone(), 0)?;

        let mut regions = Vec::new();
        let (mut gpa, mut first) = (layout::TEST_BASE, 0u64);
        let flags = if cfg.log_dirty_pages {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        for (i, &pages) in cfg.slot_pages.iter().enumerate() {
            let mem = Arc::new(GuestMemory::new((pages * page) as usize, cfg.memory)?);
            let slot = 1 + i as u32;
            vm.set_memslot(slot, gpa, mem.clone(), flags)?;
            regions.push(TestRegion {
                slot,
                gpa,
                first_page: first,
                pages,
                mem,
            });
            gpa += pages * page;
            first += pages;
        }

        let ctl = layout::CONTROL;
        let mut vcpus = Vec::new();
        let mut rings = DirtyRings::new();
        for i in 0..cfg.vcpus {
            let v = vm.create_vcpu()?;
            x86::setup_long_mode(vm.kvm(), v.fd())?;
            let (lo, hi) = (
                total * i as u64 / cfg.vcpus as u64,
                total * (i as u64 + 1) / cfg.vcpus as u64,
            );
            let (base, pages) = match cfg.program {
                Program::Stamp | Program::Script => (layout::TEST_BASE, total),
                Program::Memstress
                | Program::Dirtier
                | Program::DeviceDirtier
                | Program::TightLoop
                | Program::Halt => (layout::TEST_BASE + lo * page, hi - lo),
            };
            let vb = ctl + control::vcpu(i);
            sys.write_u64(vb + control::WS_BASE, base);
            sys.write_u64(vb + control::WS_PAGES, pages);
            sys.write_u64(
                vb + control::SCRIPT,
                layout::SCRIPT + 8 * script_capacity(cfg.vcpus) * i as u64,
            );
            sys.write_u64(vb + control::SCRIPT_LEN, 0);
            let tag = (i as u64 + 1) << 48;
            let regs = EntryRegs {
                rip: layout::CODE,
                args: [tag, vb, ctl, base, pages, guest_seed(cfg.seed, i), 0, 0, 0],
            };
            x86::set_entry_regs(v.fd(), &regs)?;
            if let Some(r) = v.ring() {
                rings.push(r.clone());
            }
            vcpus.push(v);
        }
        let mut runner = Runner::start_paused(vcpus, sys.clone())?;
        if let Some(r) = ring {
            runner.watch_rings(
                rings.watches(),
                r.entries
                    .saturating_sub(dirtylog::ring::KVM_DIRTY_RING_RSVD_ENTRIES),
            )?;
        }
        let ring_progress = vec![0; cfg.vcpus as usize];
        let m = Machine {
            runner,
            rings,
            vm,
            sys,
            regions,
            cfg,
            ring,
            ring_progress,
        };
        if matches!(m.cfg.program, Program::Memstress | Program::Script) {
            m.runner.resume();
            m.runner.wait_all(
                "the vCPUs to reach their first sync",
                Duration::from_secs(30),
                |s| s == VcpuRunState::Synced,
            )?;
        }
        Ok(m)
    }

    /// The configuration.
    pub fn config(&self) -> &MachineConfig {
        &self.cfg
    }

    /// The VM.
    pub fn vm(&self) -> &KvmVm {
        &self.vm
    }

    /// The VM, mutably (toggling logging, ...).
    pub fn vm_mut(&mut self) -> &mut KvmVm {
        &mut self.vm
    }

    /// The vCPU threads.
    pub fn runner(&self) -> &Runner {
        &self.runner
    }

    /// The vCPU threads, mutably (starting a ring watchdog, ...).
    pub fn runner_mut(&mut self) -> &mut Runner {
        &mut self.runner
    }

    /// The ring setup, if tracking by ring.
    pub fn ring(&self) -> Option<RingSetup> {
        self.ring
    }

    /// The test memslots.
    pub fn regions(&self) -> &[TestRegion] {
        &self.regions
    }

    /// Pages of all test slots together.
    pub fn test_pages(&self) -> u64 {
        self.regions.iter().map(|r| r.pages).sum()
    }

    /// The region holding workload page `page`, and the page's offset in it.
    pub fn locate(&self, page: u64) -> Option<(&TestRegion, u64)> {
        self.regions
            .iter()
            .find(|r| page >= r.first_page && page < r.first_page + r.pages)
            .map(|r| (r, page - r.first_page))
    }

    /// The 8-byte word at the start of workload page `page` (0 if out of range).
    pub fn read_page_u64(&self, page: u64) -> u64 {
        match self.locate(page) {
            Some((r, off)) => r.mem.read_u64(off * sys::host_page_size()),
            None => 0,
        }
    }

    fn ctl(&self, off: u64) -> u64 {
        self.sys.read_u64(layout::CONTROL + off)
    }

    fn set_ctl(&self, off: u64, v: u64) {
        self.sys.write_u64(layout::CONTROL + off, v)
    }

    /// Set the `ITERATION` word (the value stamping and memstress guests write).
    pub fn set_iteration(&self, v: u64) {
        self.set_ctl(control::ITERATION, v)
    }

    /// The `ITERATION` word.
    pub fn iteration(&self) -> u64 {
        self.ctl(control::ITERATION)
    }

    /// Writes counted by vCPU `i` (see [`control::WRITES`]).
    pub fn writes(&self, i: u32) -> u64 {
        self.ctl(control::vcpu(i) + control::WRITES)
    }

    /// Writes counted by all vCPUs.
    pub fn total_writes(&self) -> u64 {
        (0..self.cfg.vcpus).map(|i| self.writes(i)).sum()
    }

    /// Completed memstress passes of vCPU `i`.
    pub fn passes(&self, i: u32) -> u64 {
        self.ctl(control::vcpu(i) + control::PASSES)
    }

    /// Set the dirtier's (or, before the first resume, the tight loop's) working set of vCPU
    /// `i` (`pattern` 0 sequential, 1 random). The dirtier reloads it at its next budget exit,
    /// which this forces by zeroing its budget: set it while stopped, it takes effect at the
    /// resume.
    pub fn set_working_set(&self, i: u32, first_page: u64, pages: u64, random: bool) -> Result<()> {
        let total = self.test_pages();
        if pages == 0 || first_page.checked_add(pages).is_none_or(|e| e > total) {
            return Err(Error::Config(format!(
                "working set {first_page}+{pages} is outside the {total} test pages"
            )));
        }
        let vb = control::vcpu(i);
        self.set_ctl(
            vb + control::WS_BASE,
            layout::TEST_BASE + first_page * sys::host_page_size(),
        );
        self.set_ctl(vb + control::WS_PAGES, pages);
        self.set_ctl(vb + control::PATTERN, random as u64);
        self.set_ctl(vb + control::BUDGET, 0);
        Ok(())
    }

    /// Dirtier busy-wait loop count between writes (global; read at the next budget exit,
    /// which this forces).
    pub fn set_delay(&self, spins: u64) {
        self.set_ctl(control::DELAY, spins);
        for i in 0..self.cfg.vcpus {
            self.set_ctl(control::vcpu(i) + control::BUDGET, 0);
        }
    }

    /// Dirtier rate in pages per second per vCPU (`None` = as fast as it goes).
    pub fn set_rate(&self, rate: Option<f64>) {
        self.runner.set_rate(rate)
    }

    /// Pause every vCPU wherever its guest is ([`Runner::pause`]) and wait until none can
    /// write: each is paused, halted, parked at a sync exit or blocked on a full ring.
    pub fn stop(&self, timeout: Duration) -> Result<()> {
        self.runner.pause(timeout)
    }

    /// Wait until every vCPU is stopped, zero the write counters if asked, and let them run
    /// ([`Runner::resume`]). vCPUs parked at a sync exit stay there (see
    /// [`memstress_pass`](Self::memstress_pass)).
    pub fn resume(&self, reset_writes: bool, timeout: Duration) -> Result<()> {
        self.runner.wait_all(
            "every vCPU to be stopped before resuming",
            timeout,
            VcpuRunState::is_stopped,
        )?;
        if reset_writes {
            for i in 0..self.cfg.vcpus {
                self.set_ctl(control::vcpu(i) + control::WRITES, 0);
            }
        }
        self.runner.resume();
        Ok(())
    }

    /// One memstress iteration: every vCPU writes `iteration` into each page of its partition
    /// once and syncs. Returns when all have synced.
    pub fn memstress_pass(&mut self, iteration: u64, timeout: Duration) -> Result<()> {
        self.memstress_pass_with(iteration, timeout, |_| Ok(()))
    }

    /// [`memstress_pass`](Self::memstress_pass), calling `poll(self)` about every 200 µs while
    /// the vCPUs run, e.g. to harvest a ring that would otherwise fill and block them. Polling
    /// goes on until every vCPU has parked at its sync exit, since a vCPU can block on a full
    /// ring after finishing its writes (hosts that take the ring-full exit late).
    ///
    /// The script program is driven the same way (one pass over its page list).
    pub fn memstress_pass_with(
        &mut self,
        iteration: u64,
        timeout: Duration,
        mut poll: impl FnMut(&mut Self) -> Result<()>,
    ) -> Result<()> {
        let before: Vec<u64> = (0..self.cfg.vcpus).map(|i| self.passes(i)).collect();
        self.runner
            .wait_all("every vCPU to park before a memstress pass", timeout, |s| {
                s == VcpuRunState::Synced
            })?;
        self.set_iteration(iteration);
        self.runner.release();
        let deadline = std::time::Instant::now() + timeout;
        while !(0..self.cfg.vcpus).all(|i| self.passes(i) > before[i as usize]) {
            self.runner.check()?;
            if std::time::Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: "a memstress pass".into(),
                    ms: timeout.as_millis() as u64,
                });
            }
            poll(self)?;
            std::thread::sleep(Duration::from_micros(200));
        }
        loop {
            match self.runner.wait_all(
                "every vCPU to park after a memstress pass",
                Duration::from_micros(200),
                |s| s == VcpuRunState::Synced,
            ) {
                Err(Error::Timeout { .. }) => {}
                r => return r,
            }
            if std::time::Instant::now() > deadline {
                return self.runner.wait_all(
                    "every vCPU to park after a memstress pass",
                    Duration::ZERO,
                    |s| s == VcpuRunState::Synced,
                );
            }
            poll(self)?;
        }
    }

    /// One pass of the script program: every vCPU writes `iteration` into each page of its
    /// list (see [`set_script`](Self::set_script)), in order, and syncs. Returns when all have
    /// synced. Same as [`memstress_pass`](Self::memstress_pass).
    pub fn script_pass(&mut self, iteration: u64, timeout: Duration) -> Result<()> {
        self.memstress_pass(iteration, timeout)
    }

    /// Entries of each vCPU's script page list.
    pub fn script_capacity(&self) -> u64 {
        script_capacity(self.cfg.vcpus)
    }

    /// Set vCPU `i`'s page list for the script program: workload page indexes (each below
    /// [`test_pages`](Self::test_pages)), written in this order at its next pass; repeats are
    /// written again. The list lives in the system slot, which is never logged. Set it while
    /// the vCPU is parked at a sync exit (between passes).
    pub fn set_script(&self, i: u32, pages: &[u64]) -> Result<()> {
        if i >= self.cfg.vcpus {
            return Err(Error::Config(format!(
                "vCPU {i}: the machine has {}",
                self.cfg.vcpus
            )));
        }
        let cap = self.script_capacity();
        if pages.len() as u64 > cap {
            return Err(Error::Config(format!(
                "a script of {} pages: each vCPU's list holds at most {cap}",
                pages.len()
            )));
        }
        let total = self.test_pages();
        if let Some(p) = pages.iter().find(|&&p| p >= total) {
            return Err(Error::Config(format!(
                "script page {p} is outside the {total} test pages"
            )));
        }
        let base = layout::SCRIPT + 8 * cap * i as u64;
        for (k, &p) in pages.iter().enumerate() {
            self.sys.write_u64(base + 8 * k as u64, p);
        }
        let vb = control::vcpu(i);
        self.set_ctl(vb + control::SCRIPT, base);
        self.set_ctl(vb + control::SCRIPT_LEN, pages.len() as u64);
        Ok(())
    }

    /// Harvest every vCPU's ring (collect, commit, `KVM_RESET_DIRTY_RINGS`), giving each entry
    /// to `sink(vcpu, entry)`, then release vCPUs blocked on a full ring.
    ///
    /// Fails with [`Error::RingOverflow`] if a ring is found completely full, or if a vCPU
    /// keeps exiting with "ring full" while its ring has nothing to harvest: both mean KVM
    /// pushed past the hard limit and the ring is corrupt.
    pub fn harvest_rings(&mut self, sink: impl FnMut(usize, RingEntry)) -> Result<HarvestStats> {
        self.require_ring()?;
        let exits = self.ring_exits();
        let mut st = self.rings.collect(sink);
        // Even if the reset fails, blocked vCPUs must not wait forever (`reset_rings`).
        st.reset = self.reset_rings()?;
        self.check_ring_progress(&st, &exits)?;
        Ok(st)
    }

    /// The first half of [`harvest_rings`](Self::harvest_rings): collect every published entry
    /// of every ring, giving each to `sink(vcpu, entry)`, without handing them back. The pages
    /// stay dirty, and the entries in use, until [`reset_rings`](Self::reset_rings). Same
    /// overflow checks.
    pub fn collect_rings(&mut self, sink: impl FnMut(usize, RingEntry)) -> Result<HarvestStats> {
        self.require_ring()?;
        let exits = self.ring_exits();
        let st = self.rings.collect(sink);
        self.check_ring_progress(&st, &exits)?;
        Ok(st)
    }

    /// The second half of [`harvest_rings`](Self::harvest_rings): hand back every entry
    /// collected so far (mark them RESET, `KVM_RESET_DIRTY_RINGS`), then release vCPUs blocked
    /// on a full ring. Returns what the kernel reported reset.
    pub fn reset_rings(&mut self) -> Result<u64> {
        self.require_ring()?;
        let r = self.rings.commit_and_reset(self.vm.fd());
        self.runner.ring_reset_done();
        r
    }

    /// Does some vCPU's ring hold at least `n` (≥ 1) entries not yet collected? (False
    /// without rings.)
    pub fn rings_hold_at_least(&self, n: u32) -> bool {
        self.rings.any_holds_at_least(n)
    }

    /// The rings, for harvesting them directly (the perf comparison's bare layer).
    pub(crate) fn rings_mut(&mut self) -> &mut DirtyRings {
        &mut self.rings
    }

    fn require_ring(&self) -> Result<()> {
        if self.ring.is_none() {
            return Err(Error::Config(
                "this machine does not track with the dirty ring".into(),
            ));
        }
        Ok(())
    }

    fn ring_exits(&self) -> Vec<u64> {
        (0..self.runner.len())
            .map(|i| self.runner.ring_full_exits(i))
            .collect()
    }

    fn check_ring_progress(&mut self, st: &HarvestStats, exits: &[u64]) -> Result<()> {
        for (i, &n) in st.per_vcpu.iter().enumerate() {
            if st.full[i] {
                return Err(Error::RingOverflow {
                    vcpu: i as u32,
                    detail: format!("a harvest found all {n} entries in use"),
                });
            }
            if n > 0 {
                self.ring_progress[i] = exits[i];
            } else if exits[i] >= self.ring_progress[i] + 4 {
                // A ring-full exit always leaves >= soft-limit entries to harvest; at most one
                // more exit can follow a harvest that raced with it.
                return Err(Error::RingOverflow {
                    vcpu: i as u32,
                    detail: format!(
                        "{} ring-full exits with no entry to harvest",
                        exits[i] - self.ring_progress[i]
                    ),
                });
            }
        }
        Ok(())
    }

    /// Stop the vCPU threads and report the first vCPU error, if any.
    pub fn shutdown(mut self) -> Result<()> {
        self.runner.shutdown(Duration::from_secs(10))
    }
}
