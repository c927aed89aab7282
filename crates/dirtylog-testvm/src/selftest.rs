//! The kernel's `dirty_log_test` on `/dev/kvm`: a [`SelftestBackend`] over a [`Machine`]
//! running the stamping guest, for [`dirtylog::selftest::run`].
//!
//! | tracker | setup | collect |
//! |---|---|---|
//! | dirty-log | test slot with `KVM_MEM_LOG_DIRTY_PAGES` | `KVM_GET_DIRTY_LOG` |
//! | clear-log | + `MANUAL_PROTECT_ENABLE \| INITIALLY_SET` | GET, then `KVM_CLEAR_DIRTY_LOG` of the whole slot in one call (the `64·n + 3` tail is legal because the range ends at the slot end) |
//! | ring | + a ring of `entries` per vCPU (ACQ_REL preferred) | harvest every ring, commit, `KVM_RESET_DIRTY_RINGS`, then release vCPUs blocked on a full ring |
//!
//! # Stopping the vCPUs
//!
//! `stop` pauses the vCPUs wherever they are ([`Runner::pause`](crate::Runner::pause)); a
//! vCPU blocked on a full ring counts as stopped. A vCPU can be paused with its store faulted
//! in — the page already logged (bitmap) or pushed (ring) — but not retired: KVM handles the
//! write fault and then returns to userspace for the kick before re-entering the guest. On
//! some hosts (PVM) a vCPU blocked on a full ring even stopped before its store was logged.
//! Left alone, that store would land after the final collection, in the next iteration. So
//! `stop` then completes it as KVM would: the stamping guest's only store is one `movsq` at
//! a known address ([`Program::store_ip`]); for every vCPU paused there, the VMM copies
//! `ITERATION` to the page, advances `rsi`, `rdi` and `rip` past the instruction (on the
//! vCPU's own thread, [`Runner::with_paused_vcpu`](crate::Runner::with_paused_vcpu)), and
//! reports the page dirty itself in the next collection — the VMM's own write to guest memory.

use std::time::Duration;

use kvm_ioctls::VcpuFd;

use dirtylog::selftest::{BackendError, Collected, SelftestBackend, SelftestConfig};
use dirtylog::TrackerKind;

use crate::error::{Error, Result};
use crate::guest::Program;
use crate::machine::{Machine, MachineConfig};
use crate::memory::MemoryOptions;
use crate::runner::VcpuRunState;
use crate::x86::layout;

/// The test slot (the first and only test memslot).
const TEST_SLOT: u32 = 1;

/// `dirty_log_test` on KVM.
#[derive(Debug)]
pub struct KvmSelftest {
    m: Machine,
    tracker: TrackerKind,
    buf: Vec<u64>,
    timeout: Duration,
    /// Pages the VMM wrote completing stores of paused vCPUs (see the [module docs](self)),
    /// reported by the next `collect`.
    vmm_dirty: Vec<u64>,
    /// Guest address of the stamping guest's store.
    store_ip: u64,
    /// The most entries one harvest took from one ring.
    max_ring_fill: u32,
}

impl KvmSelftest {
    /// Build the machine for `cfg`: `cfg.vcpus` stamping vCPUs over one test slot of
    /// `cfg.pages` pages, tracked by `cfg.tracker`.
    pub fn new(cfg: &SelftestConfig) -> Result<Self> {
        let m = Machine::new(MachineConfig {
            vcpus: cfg.vcpus,
            program: Program::Stamp,
            slot_pages: vec![cfg.pages],
            log_dirty_pages: true,
            tracker: cfg.tracker,
            initially_set: true,
            memory: MemoryOptions {
                no_huge_pages: true,
                populate: false,
            },
            seed: cfg.seed,
        })?;
        let words = crate::sys::bitmap_words(cfg.pages);
        Ok(KvmSelftest {
            m,
            tracker: cfg.tracker,
            buf: vec![0; words],
            timeout: cfg.iteration_timeout.max(Duration::from_secs(10)),
            vmm_dirty: Vec::new(),
            store_ip: Program::Stamp.store_ip(layout::CODE)?.ok_or_else(|| {
                Error::Assemble("the stamping program has no designated store".into())
            })?,
            max_ring_fill: 0,
        })
    }

    /// The machine.
    pub fn machine(&self) -> &Machine {
        &self.m
    }

    /// Ring mode: the most entries a single harvest found in one vCPU's ring. KVM should exit
    /// at `entries - 64`; more means the ring-full exit came late (see [`Error::RingOverflow`]).
    pub fn max_ring_fill(&self) -> u32 {
        self.max_ring_fill
    }

    /// Stop the vCPU threads, reporting any vCPU error.
    pub fn shutdown(self) -> Result<()> {
        self.m.shutdown()
    }

    fn collect_bitmap(&mut self, bitmap: &mut [u64]) -> Result<Collected> {
        let vm = self.m.vm();
        vm.get_dirty_log(TEST_SLOT, &mut self.buf)?;
        if self.tracker == TrackerKind::ClearLog {
            let npages = self.m.test_pages();
            let num = u32::try_from(npages).map_err(|_| {
                Error::Config(format!(
                    "{npages} pages do not fit KVM_CLEAR_DIRTY_LOG's u32 num_pages"
                ))
            })?;
            vm.clear_dirty_log(TEST_SLOT, 0, num, &self.buf)?;
        }
        let mut count = self.take_vmm_dirty(bitmap);
        for (o, w) in bitmap.iter_mut().zip(&self.buf) {
            *o |= *w;
            count += w.count_ones() as u64;
        }
        Ok(Collected {
            last_ring_pages: Vec::new(),
            count,
        })
    }

    /// Harvest every ring into `bitmap`, recording each vCPU's last page in `last`.
    fn harvest_into(&mut self, bitmap: &mut [u64], last: &mut [Option<u64>]) -> Result<u64> {
        let npages = self.m.test_pages();
        let mut stray = None;
        let st = self.m.harvest_rings(|_, e| {
            if e.slot == TEST_SLOT && e.offset < npages {
                bitmap[(e.offset / 64) as usize] |= 1 << (e.offset % 64);
            } else {
                stray = Some(e);
            }
        })?;
        if let Some(e) = stray {
            return Err(Error::Config(format!(
                "ring entry outside the test slot: slot {:#x} offset {}",
                e.slot, e.offset
            )));
        }
        self.max_ring_fill = self
            .max_ring_fill
            .max(st.per_vcpu.iter().copied().max().unwrap_or(0));
        for (d, s) in last.iter_mut().zip(&st.last) {
            if let Some(e) = s {
                *d = Some(e.offset);
            }
        }
        Ok(st.collected)
    }

    fn collect_ring(&mut self, bitmap: &mut [u64]) -> Result<Collected> {
        let mut last = vec![None; self.m.config().vcpus as usize];
        let mut count = self.take_vmm_dirty(bitmap);
        count += self.harvest_into(bitmap, &mut last)?;
        Ok(Collected {
            last_ring_pages: last,
            count,
        })
    }

    /// OR the pages the VMM wrote into `bitmap`; how many.
    fn take_vmm_dirty(&mut self, bitmap: &mut [u64]) -> u64 {
        let n = self.vmm_dirty.len() as u64;
        for p in self.vmm_dirty.drain(..) {
            if let Some(w) = bitmap.get_mut((p / 64) as usize) {
                *w |= 1 << (p % 64);
            }
        }
        n
    }

    /// Complete the store of every vCPU paused at it (see the [module docs](self)).
    fn retire_stores(&mut self) -> Result<()> {
        let store_ip = self.store_ip;
        for i in 0..self.m.config().vcpus as usize {
            let regs = self
                .m
                .runner()
                .with_paused_vcpu(i, |fd: &VcpuFd| fd.get_regs())?
                .map_err(|e| Error::from_sys(crate::error::Op::VcpuState, e))?;
            if regs.rip != store_ip {
                continue;
            }
            // movsq: [rdi] = [rsi]; rsi += 8; rdi += 8 (DF is clear).
            let value = self.m.iteration();
            let src = layout::CONTROL + crate::guest::control::ITERATION;
            let page_size = crate::sys::host_page_size();
            let first = layout::TEST_BASE;
            let page = regs
                .rdi
                .checked_sub(first)
                .map(|off| off / page_size)
                .filter(|&p| regs.rsi == src && regs.rdi % 8 == 0 && p < self.m.test_pages())
                .ok_or_else(|| {
                    Error::Config(format!(
                        "vCPU {i} paused at the stamping store with rsi {:#x}, rdi {:#x}: not a                          store of ITERATION into the test pages",
                        regs.rsi, regs.rdi
                    ))
                })?;
            let (r, off) = self
                .m
                .locate(page)
                .ok_or_else(|| Error::Config(format!("page {page} is in no test slot")))?;
            r.mem
                .write_u64(off * page_size + regs.rdi % page_size, value);
            let mut next = regs;
            next.rsi += 8;
            next.rdi += 8;
            next.rip += 2;
            self.m
                .runner()
                .with_paused_vcpu(i, move |fd: &VcpuFd| fd.set_regs(&next))?
                .map_err(|e| Error::from_sys(crate::error::Op::VcpuState, e))?;
            self.vmm_dirty.push(page);
        }
        Ok(())
    }
}

impl SelftestBackend for KvmSelftest {
    fn describe(&self) -> String {
        let ring = match self.m.ring() {
            Some(r) => format!(", ring {} entries ({:?})", r.entries, r.flavor),
            None => String::new(),
        };
        format!(
            "kvm {}, {} vCPUs, {} pages{ring}",
            self.tracker.name(),
            self.m.config().vcpus,
            self.m.test_pages()
        )
    }

    fn npages(&self) -> u64 {
        self.m.test_pages()
    }

    fn resume(&mut self, iteration: u64) -> Result<(), BackendError> {
        self.m.runner().check()?;
        // Paused vCPUs are not in the guest: set the value first, then resume.
        self.m.runner().wait_all(
            "every vCPU to be stopped before resuming",
            self.timeout,
            VcpuRunState::is_stopped,
        )?;
        self.m.set_iteration(iteration);
        self.m.resume(true, self.timeout)?;
        Ok(())
    }

    fn writes(&self) -> u64 {
        self.m.total_writes()
    }

    fn ring_full_exits(&self) -> u64 {
        self.m.runner().total_ring_full_exits()
    }

    fn stop(&mut self) -> Result<(), BackendError> {
        self.m.stop(self.timeout)?;
        self.retire_stores()?;
        Ok(())
    }

    fn collect(&mut self, bitmap: &mut [u64]) -> Result<Collected, BackendError> {
        let c = match self.tracker {
            TrackerKind::DirtyLog | TrackerKind::ClearLog => self.collect_bitmap(bitmap)?,
            TrackerKind::Ring { .. } => self.collect_ring(bitmap)?,
        };
        Ok(c)
    }

    fn read_page(&self, page: u64) -> u64 {
        self.m.read_page_u64(page)
    }

    fn ring_full_before_retire(&self) -> bool {
        true
    }
}
