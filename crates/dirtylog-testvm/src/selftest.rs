//! The kernel's `dirty_log_test` on `/dev/kvm`: a [`SelftestBackend`] over a [`Machine`]
//! running the stamping guest, for [`dirtylog::selftest::run`].
//!
//! | mode | setup | collect |
//! |---|---|---|
//! | dirty-log | test slot with `KVM_MEM_LOG_DIRTY_PAGES` | `KVM_GET_DIRTY_LOG` |
//! | clear-log | + `MANUAL_PROTECT_ENABLE \| INITIALLY_SET` | GET, then `KVM_CLEAR_DIRTY_LOG` of the whole slot in one call (the `64·n + 3` tail is legal because the range ends at the slot end) |
//! | dirty-ring | + a ring of `ring_entries` per vCPU (ACQ_REL preferred) | harvest every ring, commit, `KVM_RESET_DIRTY_RINGS`, then release vCPUs blocked on a full ring |

use std::time::Duration;

use dirtylog::selftest::{BackendError, Collected, LogMode, SelftestBackend, SelftestConfig};

use crate::error::{Error, Result};
use crate::guest::Program;
use crate::machine::{Machine, MachineConfig, Tracking};
use crate::memory::MemoryOptions;

/// The test slot (the first and only test memslot).
const TEST_SLOT: u32 = 1;

/// `dirty_log_test` on KVM.
#[derive(Debug)]
pub struct KvmSelftest {
    m: Machine,
    mode: LogMode,
    buf: Vec<u64>,
    timeout: Duration,
    /// Ring mode: pages harvested by `stop` (to drain vCPUs blocked on a full ring), handed
    /// over by the next `collect`.
    pending: Vec<u64>,
    pending_last: Vec<Option<u64>>,
    pending_count: u64,
    /// The most entries one harvest took from one ring.
    max_ring_fill: u32,
}

impl KvmSelftest {
    /// Build the machine for `cfg`: `cfg.vcpus` stamping vCPUs over one test slot of
    /// `cfg.pages` pages, tracked in `cfg.mode`.
    pub fn new(cfg: &SelftestConfig) -> Result<Self> {
        let tracking = match cfg.mode {
            LogMode::DirtyLog => Tracking::Bitmap,
            LogMode::ClearLog => Tracking::Manual {
                initially_set: true,
            },
            LogMode::DirtyRing => Tracking::Ring {
                entries: cfg.ring_entries,
            },
        };
        let m = Machine::new(MachineConfig {
            vcpus: cfg.vcpus,
            program: Program::Stamp,
            slot_pages: vec![cfg.pages],
            log_dirty_pages: true,
            tracking,
            memory: MemoryOptions {
                no_huge_pages: true,
                populate: false,
            },
            seed: cfg.seed,
        })?;
        let words = crate::sys::bitmap_words(cfg.pages);
        Ok(KvmSelftest {
            m,
            mode: cfg.mode,
            buf: vec![0; words],
            timeout: cfg.iteration_timeout.max(Duration::from_secs(10)),
            pending: vec![0; words],
            pending_last: vec![None; cfg.vcpus as usize],
            pending_count: 0,
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
        if self.mode == LogMode::ClearLog {
            let npages = self.m.test_pages();
            let num = u32::try_from(npages).map_err(|_| {
                Error::Config(format!(
                    "{npages} pages do not fit KVM_CLEAR_DIRTY_LOG's u32 num_pages"
                ))
            })?;
            vm.clear_dirty_log(TEST_SLOT, 0, num, &self.buf)?;
        }
        let mut count = 0u64;
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
        let mut last = std::mem::replace(
            &mut self.pending_last,
            vec![None; self.m.config().vcpus as usize],
        );
        let mut count = std::mem::take(&mut self.pending_count);
        for (o, p) in bitmap.iter_mut().zip(self.pending.iter_mut()) {
            *o |= std::mem::take(p);
        }
        count += self.harvest_into(bitmap, &mut last)?;
        Ok(Collected {
            last_ring_pages: last,
            count,
        })
    }

    /// Ring mode: a vCPU blocked on a full ring may hold a write that has not retired, and on
    /// some hosts (PVM) that write was not even pushed yet: the ring-full exit is taken before
    /// the faulting write is handled. Releasing it after the final collection would let the
    /// write land unreported in this iteration and be reported, with this iteration's value,
    /// in the next. So stop drains: while a vCPU is blocked on a full ring, harvest (keeping
    /// the pages for the next `collect`) and let it run on to its sync exit.
    fn drain_ring_full(&mut self) -> Result<()> {
        let deadline = std::time::Instant::now() + self.timeout;
        loop {
            self.m.runner().wait_all(
                "the vCPUs to stop",
                self.timeout,
                crate::runner::VcpuState::is_stopped,
            )?;
            if !self
                .m
                .runner()
                .states()
                .contains(&crate::runner::VcpuState::RingFull)
            {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: "vCPUs blocked on a full ring to reach their sync exit".into(),
                    ms: self.timeout.as_millis() as u64,
                });
            }
            let mut pending = std::mem::take(&mut self.pending);
            let mut last = std::mem::take(&mut self.pending_last);
            let r = self.harvest_into(&mut pending, &mut last);
            self.pending = pending;
            self.pending_last = last;
            let n = r?;
            self.pending_count += n;
            if n == 0 {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
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
            self.mode.name(),
            self.m.config().vcpus,
            self.m.test_pages()
        )
    }

    fn npages(&self) -> u64 {
        self.m.test_pages()
    }

    fn resume(&mut self, iteration: u64) -> Result<(), BackendError> {
        self.m.runner().check()?;
        // Parked vCPUs are not in the guest: set the value first, then release.
        self.m
            .runner()
            .wait_all("every vCPU to park before resuming", self.timeout, |s| {
                s == crate::runner::VcpuState::Synced
            })?;
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
        if self.mode == LogMode::DirtyRing {
            self.drain_ring_full()?;
        }
        Ok(())
    }

    fn collect(&mut self, bitmap: &mut [u64]) -> Result<Collected, BackendError> {
        let c = match self.mode {
            LogMode::DirtyLog | LogMode::ClearLog => self.collect_bitmap(bitmap)?,
            LogMode::DirtyRing => self.collect_ring(bitmap)?,
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
