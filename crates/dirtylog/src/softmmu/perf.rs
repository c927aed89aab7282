//! The reference arch as a [`PerfBackend`]: memstress vCPU threads, each writing every page
//! of its own partition once per pass.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::{Exit, FlushKind, Machine, SoftVcpu};
use crate::memslot::{MemoryRegion, KVM_MEM_LOG_DIRTY_PAGES};
use crate::perf::{Layer, PerfBackend, PerfConfig};
use crate::ring::{RingEntry, RingHarvester, DIRTY_GFN_BYTES};
use crate::selftest::BackendError;
use crate::tracker::TrackerKind;
use crate::vcpu::Vcpu;
use crate::vm::{
    VmConfig, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_MANUAL_CAPS,
};

const TEST_GPA: u64 = 1 << 30;

#[derive(Debug, Default)]
struct State {
    pass: u64,
    iteration: u64,
    done: u32,
    quit: bool,
    reset_gen: u64,
}

/// vCPUs blocked on a full ring, waiting for a harvest.
type Shared = super::shared::Shared<State, AtomicU64>;

/// A softmmu machine running memstress for `dirtylog perf --backend softmmu`.
pub struct SoftmmuPerf {
    m: Arc<Machine>,
    cfg: PerfConfig,
    /// Test slots: (id, guest-physical address), each `per_slot` pages.
    slots: Vec<(u32, u64)>,
    per_slot: u64,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    vcpus: Vec<Arc<Vcpu>>,
    harvesters: Vec<RingHarvester>,
    entries: Vec<RingEntry>,
    /// One bitmap per slot: GET fills it, CLEAR gives back exactly what GET returned.
    bufs: Vec<Vec<u64>>,
}

impl SoftmmuPerf {
    /// Build the machine: `cfg.slots` test slots splitting `vcpus × mem_per_vcpu` evenly.
    pub fn new(cfg: &PerfConfig) -> Result<Self, BackendError> {
        let m = Machine::new(FlushKind::Ranged, VmConfig::default());
        let page = m.vm().config().page_size;
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
        let per_vcpu = cfg.mem_per_vcpu / page;
        let total = per_vcpu * cfg.vcpus as u64;
        if per_vcpu == 0 || cfg.slots == 0 || total % cfg.slots as u64 != 0 {
            return Err(format!(
                "{total} pages cannot be split into {} slots of whole pages",
                cfg.slots
            )
            .into());
        }
        let per_slot = total / cfg.slots as u64;
        let mut slots = Vec::new();
        for s in 0..cfg.slots {
            let gpa = TEST_GPA + s as u64 * per_slot * page;
            m.vm().set_user_memory_region(&MemoryRegion {
                slot: s + 1,
                flags: 0,
                guest_phys_addr: gpa,
                memory_size: per_slot * page,
                userspace_addr: gpa,
            })?;
            slots.push((s + 1, gpa));
        }
        let shared = Arc::new(Shared::default());
        let mut threads = Vec::new();
        let mut vcpus = Vec::new();
        for i in 0..cfg.vcpus {
            let v = m.create_vcpu();
            vcpus.push(v.generic().clone());
            let sh = shared.clone();
            let first = TEST_GPA + i as u64 * per_vcpu * page;
            threads.push(std::thread::spawn(move || {
                vcpu_thread(v, sh, first, per_vcpu, page)
            }));
        }
        Ok(SoftmmuPerf {
            harvesters: vec![RingHarvester::new(); vcpus.len()],
            bufs: vec![vec![0; per_slot.div_ceil(64) as usize]; cfg.slots as usize],
            m,
            cfg: cfg.clone(),
            slots,
            per_slot,
            shared,
            threads,
            vcpus,
            entries: Vec::new(),
        })
    }

    fn harvest(&mut self) -> u64 {
        let mut n = 0;
        for (i, v) in self.vcpus.iter().enumerate() {
            if let Some(r) = v.ring() {
                self.entries.clear();
                n += self.harvesters[i].collect(r.entries(), &mut self.entries) as u64;
            }
        }
        n
    }

    fn reset(&mut self) -> Result<u64, BackendError> {
        let mut committed = 0;
        for (i, v) in self.vcpus.iter().enumerate() {
            if let Some(r) = v.ring() {
                committed += self.harvesters[i].commit(r.entries()) as u64;
            }
        }
        let reset = self.m.vm().reset_dirty_rings()? as u64;
        if reset < committed {
            return Err(
                format!("ring reset returned {reset}, {committed} entries were committed").into(),
            );
        }
        self.shared.lock().reset_gen += 1;
        self.shared.cv.notify_all();
        Ok(reset)
    }
}

fn vcpu_thread(v: SoftVcpu, sh: Arc<Shared>, first: u64, pages: u64, page: u64) {
    let mut seen = 0u64;
    loop {
        let mut st = sh.lock();
        while st.pass == seen && !st.quit {
            st = sh.wait(st);
        }
        if st.quit {
            return;
        }
        seen = st.pass;
        let iteration = st.iteration;
        drop(st);
        for p in 0..pages {
            loop {
                match v.write_u64(first + p * page, iteration) {
                    Ok(()) => break,
                    Err(Exit::DirtyRingFull) => {
                        let mut st = sh.lock();
                        let gen = st.reset_gen;
                        sh.c.fetch_add(1, Ordering::SeqCst);
                        while st.reset_gen == gen && !st.quit {
                            st = sh.wait(st);
                        }
                        sh.c.fetch_sub(1, Ordering::SeqCst);
                        if st.quit {
                            return;
                        }
                    }
                    Err(Exit::Mmio { gpa }) => {
                        panic!("memstress wrote outside every slot: {gpa:#x}")
                    }
                }
            }
        }
        sh.lock().done += 1;
        sh.cv.notify_all();
    }
}

impl PerfBackend for SoftmmuPerf {
    fn describe(&self) -> String {
        format!(
            "softmmu (Ranged flush) {}, {} vCPUs × {} MiB, {} slots",
            self.cfg.tracker,
            self.cfg.vcpus,
            self.cfg.mem_per_vcpu >> 20,
            self.cfg.slots
        )
    }

    fn dirty_pass(&mut self, iteration: u64) -> Result<(), BackendError> {
        {
            let mut st = self.shared.lock();
            st.pass += 1;
            st.iteration = iteration;
            st.done = 0;
        }
        self.shared.cv.notify_all();
        let n = self.vcpus.len() as u32;
        loop {
            let st = self.shared.lock();
            if st.done == n {
                return Ok(());
            }
            // A vCPU blocked on a full ring needs a harvest before it can go on.
            if self.shared.c.load(Ordering::SeqCst) > 0 {
                drop(st);
                self.harvest();
                self.reset()?;
                continue;
            }
            drop(
                self.shared
                    .wait_timeout(st, std::time::Duration::from_millis(1)),
            );
        }
    }

    fn set_logging(&mut self, on: bool) -> Result<(), BackendError> {
        let page = self.m.vm().config().page_size;
        for &(slot, gpa) in &self.slots {
            let size = self.per_slot * page;
            self.m.vm().set_user_memory_region(&MemoryRegion {
                slot,
                flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                guest_phys_addr: gpa,
                memory_size: size,
                userspace_addr: gpa,
            })?;
        }
        Ok(())
    }

    fn get(&mut self, _layer: Layer) -> Result<u64, BackendError> {
        if let TrackerKind::Ring { .. } = self.cfg.tracker {
            return Ok(self.harvest());
        }
        let mut n = 0;
        for (&(slot, _), buf) in self.slots.iter().zip(self.bufs.iter_mut()) {
            self.m.vm().get_dirty_log(slot, buf)?;
            n += buf.iter().map(|w| w.count_ones() as u64).sum::<u64>();
        }
        Ok(n)
    }

    fn clear(&mut self, _layer: Layer) -> Result<u64, BackendError> {
        if let TrackerKind::Ring { .. } = self.cfg.tracker {
            return self.reset();
        }
        let mut n = 0;
        for (&(slot, _), buf) in self.slots.iter().zip(self.bufs.iter()) {
            self.m
                .vm()
                .clear_dirty_log(slot, 0, self.per_slot as u32, buf)?;
            n += buf.iter().map(|w| w.count_ones() as u64).sum::<u64>();
        }
        Ok(n)
    }
}

impl Drop for SoftmmuPerf {
    fn drop(&mut self) {
        self.shared.lock().quit = true;
        self.shared.cv.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
