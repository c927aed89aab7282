//! The reference arch as a [`SelftestBackend`]: vCPU threads running the stamping workload.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::{Exit, FlushKind, Machine, SoftVcpu};
use crate::memslot::{MemoryRegion, KVM_MEM_LOG_DIRTY_PAGES};
use crate::ring::{RingEntry, RingHarvester, DIRTY_GFN_BYTES};
use crate::selftest::{BackendError, Collected, SelftestBackend, SelftestConfig};
use crate::tracker::TrackerKind;
use crate::vcpu::Vcpu;
use crate::vm::{
    VmConfig, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_MANUAL_CAPS,
};

/// The test slot: id 1 at 1 GiB, as the kernel test puts its slot away from the rest.
const TEST_SLOT: u32 = 1;
const TEST_GPA: u64 = 1 << 30;

#[derive(Debug, Default)]
struct State {
    iteration: u64,
    running: bool,
    quit: bool,
    /// vCPUs parked (stopped, or blocked on a full ring).
    parked: u32,
    /// Bumped by every ring reset, to release vCPUs blocked on a full ring.
    reset_gen: u64,
}

#[derive(Debug, Default)]
struct Counters {
    writes: AtomicU64,
    ring_full_exits: AtomicU64,
}

type Shared = super::shared::Shared<State, Counters>;

/// A softmmu machine with one test slot and vCPU threads stamping iteration numbers.
pub struct SoftmmuSelftest {
    m: Arc<Machine>,
    tracker: TrackerKind,
    kind: FlushKind,
    npages: u64,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    vcpus: Vec<Arc<Vcpu>>,
    harvesters: Vec<RingHarvester>,
    entries: Vec<RingEntry>,
    buf: Vec<u64>,
}

impl SoftmmuSelftest {
    /// Build the machine for `cfg` and start its vCPU threads (parked until `resume`).
    pub fn new(cfg: &SelftestConfig, kind: FlushKind) -> Result<Self, BackendError> {
        let m = Machine::new(kind, VmConfig::default());
        match cfg.tracker {
            TrackerKind::DirtyLog => {}
            TrackerKind::ClearLog => m.vm().enable_cap(
                KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                0,
                KVM_DIRTY_LOG_MANUAL_CAPS,
            )?,
            TrackerKind::Ring { entries } => m.vm().enable_cap(
                KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
                0,
                entries as u64 * DIRTY_GFN_BYTES as u64,
            )?,
        }
        let page = m.vm().config().page_size;
        m.vm().set_user_memory_region(&MemoryRegion {
            slot: TEST_SLOT,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: TEST_GPA,
            memory_size: cfg.pages * page,
            userspace_addr: TEST_GPA,
        })?;
        let shared = Arc::new(Shared::default());
        let mut threads = Vec::new();
        let mut vcpus = Vec::new();
        for i in 0..cfg.vcpus {
            let v = m.create_vcpu();
            vcpus.push(v.generic().clone());
            let sh = shared.clone();
            let (npages, seed) = (cfg.pages, cfg.seed.wrapping_add(i as u64 + 1));
            threads.push(std::thread::spawn(move || {
                vcpu_thread(v, sh, npages, page, seed)
            }));
        }
        let mut me = SoftmmuSelftest {
            m,
            tracker: cfg.tracker,
            kind,
            npages: cfg.pages,
            shared,
            threads,
            harvesters: vec![RingHarvester::new(); vcpus.len()],
            vcpus,
            entries: Vec::new(),
            buf: vec![0; cfg.pages.div_ceil(64) as usize],
        };
        me.wait_parked();
        Ok(me)
    }

    /// The machine, for inspection.
    pub fn machine(&self) -> &Arc<Machine> {
        &self.m
    }

    fn wait_parked(&mut self) {
        let n = self.vcpus.len() as u32;
        let mut st = self.shared.lock();
        while st.parked < n {
            st = self.shared.wait(st);
        }
    }

    fn collect_ring(&mut self, bitmap: &mut [u64]) -> Result<Collected, BackendError> {
        let mut c = Collected {
            last_ring_pages: vec![None; self.vcpus.len()],
            count: 0,
        };
        let mut committed = 0u32;
        for (i, v) in self.vcpus.iter().enumerate() {
            let ring = v.ring().ok_or("a ring tracker without a ring")?;
            self.entries.clear();
            self.harvesters[i].collect(ring.entries(), &mut self.entries);
            for e in &self.entries {
                if e.slot == TEST_SLOT && e.offset < self.npages {
                    bitmap[(e.offset / 64) as usize] |= 1 << (e.offset % 64);
                }
                c.last_ring_pages[i] = Some(e.offset);
            }
            c.count += self.entries.len() as u64;
            committed += self.harvesters[i].commit(ring.entries());
        }
        let reset = self.m.vm().reset_dirty_rings()?;
        if reset < committed {
            return Err(format!(
                "KVM_RESET_DIRTY_RINGS reset {reset} entries, {committed} were committed"
            )
            .into());
        }
        self.shared.lock().reset_gen += 1;
        self.shared.cv.notify_all();
        Ok(c)
    }
}

fn vcpu_thread(v: SoftVcpu, sh: Arc<Shared>, npages: u64, page: u64, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut pending: Option<(u64, u64)> = None;
    let mut st = sh.lock();
    st.parked += 1;
    sh.cv.notify_all();
    loop {
        while !st.running && !st.quit {
            st = sh.wait(st);
        }
        if st.quit {
            return;
        }
        st.parked -= 1;
        let mut iteration = st.iteration;
        drop(st);
        let mut since_check = 0u32;
        loop {
            // A write interrupted by a ring-full exit is retried with the value it had, as
            // a real vCPU re-executes the faulting instruction with its old registers.
            let (gpa, val) = pending
                .take()
                .unwrap_or_else(|| (TEST_GPA + rng.random_range(0..npages) * page, iteration));
            match v.write_u64(gpa, val) {
                Ok(()) => {
                    sh.c.writes.fetch_add(1, Ordering::Relaxed);
                }
                Err(Exit::DirtyRingFull) => {
                    pending = Some((gpa, val));
                    sh.c.ring_full_exits.fetch_add(1, Ordering::Relaxed);
                    let mut s = sh.lock();
                    let gen = s.reset_gen;
                    s.parked += 1;
                    sh.cv.notify_all();
                    while s.reset_gen == gen && s.running && !s.quit {
                        s = sh.wait(s);
                    }
                    if !s.running || s.quit {
                        st = s;
                        break;
                    }
                    s.parked -= 1;
                    iteration = s.iteration;
                    continue;
                }
                Err(Exit::Mmio { gpa }) => panic!("vCPU wrote outside every memslot: gpa {gpa:#x}"),
            }
            since_check += 1;
            if since_check == 16 {
                since_check = 0;
                let s = sh.lock();
                if !s.running || s.quit {
                    st = s;
                    st.parked += 1;
                    sh.cv.notify_all();
                    break;
                }
            }
        }
    }
}

impl SelftestBackend for SoftmmuSelftest {
    fn describe(&self) -> String {
        format!(
            "softmmu ({:?} flush), {} vCPUs, {} pages",
            self.kind,
            self.vcpus.len(),
            self.npages
        )
    }

    fn npages(&self) -> u64 {
        self.npages
    }

    fn resume(&mut self, iteration: u64) -> Result<(), BackendError> {
        self.shared.c.writes.store(0, Ordering::Relaxed);
        let mut st = self.shared.lock();
        st.iteration = iteration;
        st.running = true;
        self.shared.cv.notify_all();
        Ok(())
    }

    fn writes(&self) -> u64 {
        self.shared.c.writes.load(Ordering::Relaxed)
    }

    fn ring_full_exits(&self) -> u64 {
        self.shared.c.ring_full_exits.load(Ordering::Relaxed)
    }

    fn stop(&mut self) -> Result<(), BackendError> {
        self.shared.lock().running = false;
        self.shared.cv.notify_all();
        self.wait_parked();
        Ok(())
    }

    fn collect(&mut self, bitmap: &mut [u64]) -> Result<Collected, BackendError> {
        let vm = self.m.vm();
        let mut c = Collected::default();
        match self.tracker {
            TrackerKind::Ring { .. } => return self.collect_ring(bitmap),
            TrackerKind::DirtyLog => vm.get_dirty_log(TEST_SLOT, &mut self.buf)?,
            TrackerKind::ClearLog => {
                vm.get_dirty_log(TEST_SLOT, &mut self.buf)?;
                vm.clear_dirty_log(TEST_SLOT, 0, self.npages as u32, &self.buf)?;
            }
        }
        for (o, w) in bitmap.iter_mut().zip(&self.buf) {
            *o |= *w;
            c.count += w.count_ones() as u64;
        }
        Ok(c)
    }

    fn read_page(&self, page: u64) -> u64 {
        self.m
            .read_u64(TEST_GPA + page * self.m.vm().config().page_size)
    }

    fn ring_full_before_retire(&self) -> bool {
        true
    }
}

impl Drop for SoftmmuSelftest {
    fn drop(&mut self) {
        {
            let mut st = self.shared.lock();
            st.quit = true;
            st.running = false;
        }
        self.shared.cv.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
