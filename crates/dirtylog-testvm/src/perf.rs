//! The kernel's `dirty_log_perf_test` on `/dev/kvm`: a [`PerfBackend`] over a [`Machine`]
//! running the memstress guest, for [`dirtylog::perf::run`].
//!
//! | mode | setup | GET | CLEAR |
//! |---|---|---|---|
//! | `Get` | test slots, logging off until after populate | `KVM_GET_DIRTY_LOG` of every slot (clears and re-protects) | — |
//! | `GetClear` | + `MANUAL_PROTECT_ENABLE \| INITIALLY_SET` | `KVM_GET_DIRTY_LOG` of every slot (a snapshot) | `KVM_CLEAR_DIRTY_LOG` of each whole slot with the bitmap its GET returned |
//! | `Ring(n)` | + rings of `n` entries (ACQ_REL preferred) | collect every ring | mark the collected entries RESET, `KVM_RESET_DIRTY_RINGS` |
//!
//! Each collection step exists twice. [`Layer::Ours`] goes through this crate's API
//! ([`KvmVm::get_dirty_log`](crate::vm::KvmVm::get_dirty_log) into persistent per-slot
//! buffers, [`KvmVm::clear_dirty_log`](crate::vm::KvmVm::clear_dirty_log),
//! [`Machine::collect_rings`] / [`Machine::reset_rings`], i.e. the core's
//! [`RingHarvester`](dirtylog::ring::RingHarvester) behind
//! [`DirtyRings`](crate::ring::DirtyRings)). [`Layer::Bare`] issues the same ioctls with
//! `libc::ioctl` into plain buffers, and reads and resets ring entries in a plain loop, with
//! none of our checks or bookkeeping: the report's ratio is our overhead.
//!
//! In ring mode the vCPUs may write more pages per pass than a ring holds, so the pass
//! harvests (through our API) whenever a ring is half full while vCPUs still write, or a vCPU
//! is blocked on a full ring; those entries are counted in [`KvmPerf::pass_entries`], not in
//! the GET of the iteration. The crate's ring watchdog stays on throughout. Where the bare
//! layer harvested, our harvesters skip its entries ([`DirtyRings::skip`]) before the next
//! pass, untimed.
//!
//! [`DirtyRings::skip`]: crate::ring::DirtyRings::skip

use std::os::unix::io::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dirtylog::perf::{Layer, PerfBackend, PerfConfig};
use dirtylog::ring::{KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_MASK, KVM_DIRTY_GFN_F_RESET};
use dirtylog::selftest::BackendError;
use dirtylog::TrackerKind;
use kvm_bindings::{kvm_clear_dirty_log, kvm_dirty_log};

use crate::error::{Error, Op, Result};
use crate::guest::Program;
use crate::machine::{Machine, MachineConfig};
use crate::memory::MemoryOptions;
use crate::runner::VcpuRunState;
use crate::sys;

/// Ioctl request numbers, computed once so the bare layer is only the system call.
#[derive(Debug, Clone, Copy)]
struct Requests {
    get: libc::c_ulong,
    clear: libc::c_ulong,
    reset: libc::c_ulong,
}

/// `dirty_log_perf_test` on KVM.
#[derive(Debug)]
pub struct KvmPerf {
    m: Machine,
    cfg: PerfConfig,
    timeout: Duration,
    /// Test slots: (id, pages).
    slots: Vec<(u32, u32)>,
    /// Ours: one persistent bitmap per slot; GET fills it, CLEAR gives back exactly that.
    bufs: Vec<Vec<u64>>,
    /// Bare: plain buffers, one per slot.
    bare_bufs: Vec<Vec<u64>>,
    req: Requests,
    /// Ring mode: entries harvested during passes.
    pass_entries: u64,
    /// Ring mode: harvests during passes.
    pass_harvests: u64,
    /// Bare ring harvest: entries read (slot, offset), a plain buffer.
    bare_entries: Vec<(u32, u64)>,
    /// Bare ring harvest, per ring: first index read and entries read by the last GET.
    bare_read: Vec<(u32, u32)>,
    /// Per ring, entries the bare layer harvested and reset that our harvester has not yet
    /// skipped ([`crate::ring::DirtyRings::skip`], done before anything else uses the rings).
    bare_unsynced: Vec<u32>,
}

/// A buffer of `words` words whose pages are already faulted in (so neither layer pays first
/// touches inside a timed step).
fn touched(words: usize) -> Vec<u64> {
    vec![u64::MAX; words]
}

fn ones(words: &[u64]) -> u64 {
    words.iter().map(|w| w.count_ones() as u64).sum()
}

impl KvmPerf {
    /// Build the machine: `cfg.vcpus` memstress vCPUs over `cfg.slots` test slots that split
    /// `vcpus × mem_per_vcpu` evenly, created without logging (populate runs first), with
    /// 4 KiB host pages.
    pub fn new(cfg: &PerfConfig) -> Result<Self> {
        let page = sys::host_page_size();
        if cfg.vcpus == 0 || cfg.slots == 0 || cfg.mem_per_vcpu % page != 0 {
            return Err(Error::Config(format!(
                "{} vCPUs × {} bytes in {} slots: need at least one vCPU and slot, and whole \
                 {page}-byte pages",
                cfg.vcpus, cfg.mem_per_vcpu, cfg.slots
            )));
        }
        let per_vcpu = cfg.mem_per_vcpu / page;
        let total = per_vcpu * cfg.vcpus as u64;
        if per_vcpu == 0 || total % cfg.slots as u64 != 0 {
            return Err(Error::Config(format!(
                "{total} pages cannot be split into {} slots of whole pages",
                cfg.slots
            )));
        }
        let per_slot = total / cfg.slots as u64;
        let per_slot32 = u32::try_from(per_slot).map_err(|_| {
            Error::Config(format!(
                "slots of {per_slot} pages do not fit KVM_CLEAR_DIRTY_LOG's u32 num_pages: use \
                 more slots"
            ))
        })?;
        let m = Machine::new(MachineConfig {
            vcpus: cfg.vcpus,
            program: Program::Memstress,
            slot_pages: vec![per_slot; cfg.slots as usize],
            log_dirty_pages: false,
            tracker: cfg.tracker,
            initially_set: true,
            memory: MemoryOptions {
                no_huge_pages: true,
                populate: false,
            },
            seed: 1,
        })?;
        let slots: Vec<(u32, u32)> = m.regions().iter().map(|r| (r.slot, per_slot32)).collect();
        let words = sys::bitmap_words(per_slot);
        let ring_entries = match cfg.tracker {
            TrackerKind::Ring { entries } => entries as usize * cfg.vcpus as usize,
            _ => 0,
        };
        // Faulted in now, like our harvester's buffer, which the passes' harvests grow.
        let mut bare_entries = vec![(u32::MAX, u64::MAX); ring_entries];
        bare_entries.clear();
        Ok(KvmPerf {
            // About 1 µs per guest instruction, 4 per page, plus a fault: be generous.
            timeout: Duration::from_secs(30) + Duration::from_micros(50 * per_vcpu),
            bufs: slots.iter().map(|_| touched(words)).collect(),
            bare_bufs: slots.iter().map(|_| touched(words)).collect(),
            slots,
            req: Requests {
                get: sys::KVM_GET_DIRTY_LOG(),
                clear: sys::KVM_CLEAR_DIRTY_LOG(),
                reset: sys::KVM_RESET_DIRTY_RINGS(),
            },
            pass_entries: 0,
            pass_harvests: 0,
            bare_entries,
            bare_read: vec![(0, 0); cfg.vcpus as usize],
            bare_unsynced: vec![0; cfg.vcpus as usize],
            cfg: cfg.clone(),
            m,
        })
    }

    /// The machine.
    pub fn machine(&self) -> &Machine {
        &self.m
    }

    /// Ring mode: entries harvested during dirty passes (to keep vCPUs from blocking on a
    /// full ring), which the iterations' GETs do not include.
    pub fn pass_entries(&self) -> u64 {
        self.pass_entries
    }

    /// Ring mode: harvests made during dirty passes.
    pub fn pass_harvests(&self) -> u64 {
        self.pass_harvests
    }

    /// Stop the vCPU threads, reporting any vCPU error.
    pub fn shutdown(self) -> Result<()> {
        self.m.shutdown()
    }

    /// Let our harvesters skip what the bare layer harvested, before anything else reads the
    /// rings (and before vCPUs run, so the watchdog measures from the right place).
    fn sync_rings(&mut self) -> Result<()> {
        for (i, n) in self.bare_unsynced.iter_mut().enumerate() {
            if *n != 0 {
                self.m.rings_mut().skip(i, *n)?;
                *n = 0;
            }
        }
        Ok(())
    }

    fn get_ours(&mut self) -> Result<u64> {
        if let TrackerKind::Ring { .. } = self.cfg.tracker {
            self.sync_rings()?;
            return Ok(self.m.collect_rings(|_, _| {})?.collected);
        }
        let mut n = 0;
        for (&(slot, _), buf) in self.slots.iter().zip(self.bufs.iter_mut()) {
            self.m.vm().get_dirty_log(slot, buf)?;
            n += ones(buf);
        }
        Ok(n)
    }

    fn clear_ours(&mut self) -> Result<u64> {
        match self.cfg.tracker {
            TrackerKind::Ring { .. } => self.m.reset_rings(),
            TrackerKind::DirtyLog => Ok(0),
            TrackerKind::ClearLog => {
                let mut n = 0;
                for (&(slot, pages), buf) in self.slots.iter().zip(self.bufs.iter()) {
                    self.m.vm().clear_dirty_log(slot, 0, pages, buf)?;
                    n += ones(buf);
                }
                Ok(n)
            }
        }
    }

    fn get_bare(&mut self) -> Result<u64> {
        if let TrackerKind::Ring { .. } = self.cfg.tracker {
            return self.ring_get_bare();
        }
        let fd = self.m.vm().as_raw_fd();
        let mut n = 0;
        for (&(slot, _), buf) in self.slots.iter().zip(self.bare_bufs.iter_mut()) {
            let mut log = kvm_dirty_log {
                slot,
                ..Default::default()
            };
            log.__bindgen_anon_1.dirty_bitmap = buf.as_mut_ptr().cast();
            // SAFETY: `log` is a valid `kvm_dirty_log` naming a test slot of `pages` pages
            // created by the machine, and `buf` holds `ALIGN(pages, 64) / 64` words, all the
            // kernel writes; both outlive the call.
            let r = unsafe { libc::ioctl(fd, self.req.get as _, &mut log) };
            if r < 0 {
                return Err(Error::last(Op::GetDirtyLog));
            }
            n += ones(buf);
        }
        Ok(n)
    }

    fn clear_bare(&mut self) -> Result<u64> {
        match self.cfg.tracker {
            TrackerKind::Ring { .. } => self.ring_reset_bare(),
            TrackerKind::DirtyLog => Ok(0),
            TrackerKind::ClearLog => {
                let fd = self.m.vm().as_raw_fd();
                let mut n = 0;
                for (&(slot, pages), buf) in self.slots.iter().zip(self.bare_bufs.iter_mut()) {
                    let mut c = kvm_clear_dirty_log {
                        slot,
                        num_pages: pages,
                        first_page: 0,
                        ..Default::default()
                    };
                    c.__bindgen_anon_1.dirty_bitmap = buf.as_mut_ptr().cast();
                    // SAFETY: `c` is a valid `kvm_clear_dirty_log` over the whole slot; the
                    // kernel reads `ALIGN(pages, 64) / 8` bytes from `buf`, which holds that
                    // many, and writes nothing.
                    let r = unsafe { libc::ioctl(fd, self.req.clear as _, &mut c) };
                    if r < 0 {
                        return Err(Error::last(Op::ClearDirtyLog));
                    }
                    n += ones(buf);
                }
                Ok(n)
            }
        }
    }

    /// Bare ring GET: read every published entry of every ring, in order, into a plain
    /// buffer, as the kernel's selftest does.
    fn ring_get_bare(&mut self) -> Result<u64> {
        // A no-op in the protocol (every pass syncs first); keeps a second GET correct.
        self.sync_rings()?;
        self.bare_entries.clear();
        let rings = self.m.rings_mut();
        let mut total = 0u64;
        for (i, read) in self.bare_read.iter_mut().enumerate() {
            let (Some(map), Some(start)) = (rings.map(i), rings.position(i)) else {
                continue;
            };
            let ring = map.entries();
            let mask = map.len() - 1;
            let mut idx = start;
            while idx.wrapping_sub(start) < map.len() {
                let e = &ring[(idx & mask) as usize];
                if e.flags.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_MASK != KVM_DIRTY_GFN_F_DIRTY {
                    break;
                }
                self.bare_entries.push((
                    e.slot.load(Ordering::Relaxed),
                    e.offset.load(Ordering::Relaxed),
                ));
                idx = idx.wrapping_add(1);
            }
            let n = idx.wrapping_sub(start);
            *read = (start, n);
            total += n as u64;
        }
        Ok(total)
    }

    /// Bare ring CLEAR: mark what the bare GET read RESET, then one `KVM_RESET_DIRTY_RINGS`.
    fn ring_reset_bare(&mut self) -> Result<u64> {
        let fd = self.m.vm().as_raw_fd();
        let rings = self.m.rings_mut();
        for (i, &(start, n)) in self.bare_read.iter().enumerate() {
            let Some(map) = rings.map(i) else {
                continue;
            };
            let ring = map.entries();
            let mask = map.len() - 1;
            for k in 0..n {
                ring[(start.wrapping_add(k) & mask) as usize]
                    .flags
                    .store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
            }
        }
        // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument and touches no user memory.
        let r = unsafe { libc::ioctl(fd, self.req.reset as _) };
        // Our harvesters must skip these entries whatever the kernel said.
        for (u, r) in self.bare_unsynced.iter_mut().zip(self.bare_read.iter_mut()) {
            *u += r.1;
            *r = (0, 0);
        }
        if r < 0 {
            return Err(Error::last(Op::ResetDirtyRings));
        }
        Ok(r as u64)
    }
}

impl PerfBackend for KvmPerf {
    fn describe(&self) -> String {
        let mode = match self.cfg.tracker {
            TrackerKind::DirtyLog => "GET".to_string(),
            TrackerKind::ClearLog => "GET+CLEAR (manual protect, INITIALLY_SET)".to_string(),
            TrackerKind::Ring { entries: n } => match self.m.ring() {
                Some(r) => format!("dirty ring {n} entries ({:?})", r.flavor),
                None => format!("dirty ring {n} entries"),
            },
        };
        format!(
            "kvm {mode}, {} vCPUs × {} MiB, {} slots",
            self.cfg.vcpus,
            self.cfg.mem_per_vcpu >> 20,
            self.cfg.slots
        )
    }

    fn has_bare(&self) -> bool {
        true
    }

    fn dirty_pass(&mut self, iteration: u64) -> Result<(), BackendError> {
        self.sync_rings()?;
        let Some(ring) = self.m.ring() else {
            self.m.memstress_pass(iteration, self.timeout)?;
            return Ok(());
        };
        // Harvest while the vCPUs run once a ring is half full, or a vCPU is blocked on a
        // full one (the watchdog kicks vCPUs at the soft limit).
        let half = (ring.entries / 2).max(1);
        let (mut entries, mut harvests) = (0u64, 0u64);
        self.m.memstress_pass_with(iteration, self.timeout, |m| {
            if m.rings_hold_at_least(half) || m.runner().states().contains(&VcpuRunState::RingFull)
            {
                entries += m.harvest_rings(|_, _| {})?.collected;
                harvests += 1;
            }
            Ok(())
        })?;
        self.pass_entries += entries;
        self.pass_harvests += harvests;
        Ok(())
    }

    fn set_logging(&mut self, on: bool) -> Result<(), BackendError> {
        self.sync_rings()?;
        for i in 0..self.slots.len() {
            let slot = self.slots[i].0;
            self.m.vm_mut().set_logging(slot, on)?;
        }
        Ok(())
    }

    fn get(&mut self, layer: Layer) -> Result<u64, BackendError> {
        Ok(match layer {
            Layer::Ours => self.get_ours()?,
            Layer::Bare => self.get_bare()?,
        })
    }

    fn clear(&mut self, layer: Layer) -> Result<u64, BackendError> {
        Ok(match layer {
            Layer::Ours => self.clear_ours()?,
            Layer::Bare => self.clear_bare()?,
        })
    }
}
