//! `core_clear_ring`: the core's `KVM_GET_DIRTY_LOG`, `KVM_CLEAR_DIRTY_LOG` and
//! `KVM_RESET_DIRTY_RINGS` on the software MMU (`dirtylog::softmmu::Machine`), with
//! fuzzer-chosen slots, pages, ranges and bitmaps, guest writes, ring harvests and garbage
//! written into the ring by "userspace", against a model: the dirty set per slot (bitmap
//! VMs) or the ring's expected entries (ring VMs), and KVM's checks in KVM's order for the
//! errors (`kvm_clear_dirty_log_protect`, `kvm_get_dirty_log_protect`).
//!
//! Oracle: no panic; the same error or result as the model; every page CLEAR or a ring
//! reset handed back is write-protected (no writable TLB entry either); every logging page
//! is dirty or write-protected at the end (unless the ring was scribbled on).

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use dirtylog::ring::{DirtyRing, KVM_DIRTY_GFN_F_RESET, KVM_DIRTY_RING_RSVD_ENTRIES};
use dirtylog::softmmu::{Exit, FlushKind, Machine, SoftVcpu};
use dirtylog::vm::{
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_CAPS,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use dirtylog::{
    Error, MemoryRegion, RingEntry, RingHarvester, Vcpu, VmConfig, KVM_MEM_LOG_DIRTY_PAGES,
};

const PAGE: u64 = 4096;
const NR_AS: u32 = 2;
const MAX_SLOTS: u32 = 32764;

/// The memslots: (slot id, first gfn, pages, logging).
const SLOTS: [(u32, u64, u64, bool); 3] = [
    // Unaligned tail: 3 * 64 + 3 pages.
    (0, 0, 195, true),
    (1, (1 << 30) / PAGE, 64, false),
    (2, (2 << 30) / PAGE, 128, true),
];

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Mode {
    /// Bitmap, no manual protect.
    Bitmap,
    /// Bitmap, `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`.
    Manual,
    /// Bitmap, manual protect and `KVM_DIRTY_LOG_INITIALLY_SET`.
    ManualInitSet,
    /// A dirty ring of 256 (`false`) or 512 entries.
    Ring(bool),
}

/// A slot id as userspace passes it: one of the interesting ones, or anything.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum SlotId {
    Known(u8),
    Raw(u32),
}

impl SlotId {
    fn get(self) -> u32 {
        match self {
            SlotId::Known(k) => {
                [0, 1, 2, 3, 1 << 16, 2 << 16, MAX_SLOTS, 0xffff, u32::MAX][usize::from(k) % 9]
            }
            SlotId::Raw(v) => v,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// A guest write to page `page` (mod its slot's size) of slot `slot % 3`.
    Write { slot: u8, page: u8 },
    /// `KVM_GET_DIRTY_LOG` with a buffer of `words` (mod 8) u64s.
    Get { slot: SlotId, words: u8 },
    /// `KVM_CLEAR_DIRTY_LOG`.
    Clear {
        slot: SlotId,
        /// A multiple of 64 below 256 (`< 8`) or anything.
        first_page: u64,
        num_pages: u32,
        bitmap: Vec<u64>,
    },
    /// Userspace: collect every published ring entry.
    Collect,
    /// Userspace: mark every collected entry RESET.
    Commit,
    /// `KVM_RESET_DIRTY_RINGS`.
    Reset,
    /// Userspace scribbles on a ring entry (the kernel must survive anything there).
    Scribble {
        index: u16,
        flags: u32,
        slot: SlotId,
        offset: u64,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    mode: Mode,
    flush: u8,
    ops: Vec<Op>,
}

/// Run one input.
pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let kind = [
        FlushKind::Ranged,
        FlushKind::FullOnly,
        FlushKind::RequestOnly,
    ][usize::from(input.flush) % 3];
    let m = Machine::new(kind, VmConfig::default());
    match input.mode {
        Mode::Ring(big) => {
            let bytes = if big { 8192 } else { 4096 };
            if let Err(e) = m.vm().enable_cap(KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 0, bytes) {
                panic!("enabling a {bytes}-byte ring: {e}");
            }
        }
        Mode::Bitmap => {}
        Mode::Manual | Mode::ManualInitSet => {
            let caps = if matches!(input.mode, Mode::Manual) {
                KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
            } else {
                KVM_DIRTY_LOG_MANUAL_CAPS
            };
            if let Err(e) = m
                .vm()
                .enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 0, caps)
            {
                panic!("enabling manual protect {caps}: {e}");
            }
        }
    }
    for (i, &(slot, gfn, npages, log)) in SLOTS.iter().enumerate() {
        let r = MemoryRegion {
            slot,
            flags: if log { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: gfn * PAGE,
            memory_size: npages * PAGE,
            userspace_addr: 0x1000_0000 * (i as u64 + 1),
        };
        if let Err(e) = m.vm().set_user_memory_region(&r) {
            panic!("slot {slot}: {e}");
        }
    }
    let v = m.create_vcpu();
    match input.mode {
        Mode::Ring(_) => RingModel::new(&m, v).run(&input.ops),
        mode => BitmapModel::new(&m, v, matches!(mode, Mode::ManualInitSet)).run(&input.ops),
    }
}

/// The slot's index in [`SLOTS`], if userspace's `slot` names one of them.
fn slot_index(slot: u32) -> Option<usize> {
    SLOTS.iter().position(|s| s.0 == slot)
}

/// KVM's checks up to the slot lookup (`check_slot_id`, `id_to_memslot`, `dirty_bitmap`).
fn lookup(slot: u32) -> Result<usize, Error> {
    let (as_id, id) = ((slot >> 16) as u16, slot as u16);
    if u32::from(as_id) >= NR_AS || u32::from(id) >= MAX_SLOTS {
        return Err(Error::InvalidSlotId { as_id, id });
    }
    match slot_index(slot) {
        None => Err(Error::NoSuchSlot { as_id, id }),
        Some(i) if !SLOTS[i].3 => Err(Error::LoggingDisabled { as_id, id }),
        Some(i) => Ok(i),
    }
}

fn gfn_of(slot: usize, page: u64) -> u64 {
    SLOTS[slot].1 + page
}

fn protected(m: &Machine, gfn: u64) -> bool {
    !m.spte_writable(gfn) && !m.tlb_has_writable(gfn)
}

fn words_of(set: &BTreeSet<u64>, npages: u64) -> Vec<u64> {
    let mut w = vec![0u64; npages.div_ceil(64) as usize];
    for &p in set {
        w[(p / 64) as usize] |= 1 << (p % 64);
    }
    w
}

/// Every page of a logging slot is dirty or write-protected (`Machine::page_tracked`). On a
/// ring VM, `page_tracked` looks for the page among the ring's outstanding entries, one by
/// one; a write-protected page is tracked whatever the ring holds, so that walk is taken only
/// for the pages still writable (for all 323 pages it was a third of a run).
fn assert_all_tracked(m: &Machine, ring: bool, why: &str) {
    for &(_, gfn, npages, log) in &SLOTS {
        if log {
            for g in gfn..gfn + npages {
                assert!(
                    (ring && protected(m, g)) || m.page_tracked(g),
                    "gfn {g:#x} writable and not dirty, {why}"
                );
            }
        }
    }
}

struct BitmapModel<'a> {
    m: &'a Arc<Machine>,
    v: SoftVcpu,
    dirty: [BTreeSet<u64>; 3],
    manual: bool,
}

impl<'a> BitmapModel<'a> {
    fn new(m: &'a Arc<Machine>, v: SoftVcpu, init_set: bool) -> Self {
        let all = |i: usize| -> BTreeSet<u64> {
            if init_set && SLOTS[i].3 {
                (0..SLOTS[i].2).collect()
            } else {
                BTreeSet::new()
            }
        };
        BitmapModel {
            manual: m.vm().manual_protect(),
            m,
            v,
            dirty: [all(0), all(1), all(2)],
        }
    }

    fn run(mut self, ops: &[Op]) {
        for op in ops {
            match *op {
                Op::Write { slot, page } => {
                    let s = usize::from(slot) % 3;
                    let p = u64::from(page) % SLOTS[s].2;
                    if let Err(e) = self.v.write_u64(gfn_of(s, p) * PAGE, p) {
                        panic!("a write to slot {s} page {p} of a bitmap VM: {e:?}");
                    }
                    if SLOTS[s].3 {
                        self.dirty[s].insert(p);
                    }
                }
                Op::Get { slot, words } => self.get(slot.get(), usize::from(words % 8)),
                Op::Clear {
                    slot,
                    first_page,
                    num_pages,
                    ref bitmap,
                } => {
                    let first = if first_page < 8 {
                        first_page * 64
                    } else {
                        first_page
                    };
                    self.clear(slot.get(), first, num_pages, bitmap);
                }
                Op::Reset => assert_eq!(self.m.vm().reset_dirty_rings(), Err(Error::NoRing)),
                Op::Collect | Op::Commit | Op::Scribble { .. } => {}
            }
        }
        for i in [0, 2] {
            self.get(SLOTS[i].0, 8);
        }
        assert_all_tracked(self.m, false, "at the end");
    }

    fn get(&mut self, slot: u32, words: usize) {
        let mut out = vec![u64::MAX; words];
        let got = self.m.vm().get_dirty_log(slot, &mut out);
        let want = lookup(slot).and_then(|i| {
            let need = SLOTS[i].2.div_ceil(64) as usize;
            if words < need {
                return Err(Error::BufferTooSmall {
                    need: need * 8,
                    got: words * 8,
                });
            }
            Ok(i)
        });
        match (got, want) {
            (Ok(()), Ok(i)) => {
                let npages = SLOTS[i].2;
                let n = npages.div_ceil(64) as usize;
                assert_eq!(
                    out[..n],
                    words_of(&self.dirty[i], npages),
                    "GET of slot {slot}"
                );
                if !self.manual {
                    for &p in &self.dirty[i] {
                        assert!(protected(self.m, gfn_of(i, p)), "GET left {p} writable");
                    }
                    self.dirty[i].clear();
                }
            }
            (got, want) => assert_eq!(got, want.map(drop), "GET of slot {slot:#x}, {words} words"),
        }
    }

    fn clear(&mut self, slot: u32, first_page: u64, num_pages: u32, bitmap: &[u64]) {
        let got = self
            .m
            .vm()
            .clear_dirty_log(slot, first_page, num_pages, bitmap);
        // kvm_clear_dirty_log_protect's checks, in its order.
        let (as_id, id) = ((slot >> 16) as u16, slot as u16);
        let num = u64::from(num_pages);
        let want = if u32::from(as_id) >= NR_AS || u32::from(id) >= MAX_SLOTS {
            Err(Error::InvalidSlotId { as_id, id })
        } else if first_page & 63 != 0 {
            Err(Error::MisalignedFirstPage { first_page })
        } else {
            lookup(slot).and_then(|i| {
                let npages = SLOTS[i].2;
                if first_page > npages
                    || num > npages - first_page
                    || (num < npages - first_page && num & 63 != 0)
                {
                    return Err(Error::BadRange {
                        first_page,
                        num_pages: num,
                        npages,
                    });
                }
                let words = num.div_ceil(64) as usize;
                if bitmap.len() < words {
                    return Err(Error::BufferTooSmall {
                        need: words * 8,
                        got: bitmap.len() * 8,
                    });
                }
                Ok(i)
            })
        };
        match (got, want) {
            (Ok(()), Ok(i)) => {
                let words = num.div_ceil(64) as usize;
                let mut cleared = Vec::new();
                for (j, &mask) in bitmap[..words].iter().enumerate() {
                    for b in 0..64 {
                        let p = first_page + 64 * j as u64 + b;
                        if mask >> b & 1 == 1 && self.dirty[i].remove(&p) {
                            cleared.push(p);
                        }
                    }
                }
                for p in cleared {
                    assert!(
                        protected(self.m, gfn_of(i, p)),
                        "CLEAR left slot {slot} page {p} writable"
                    );
                }
            }
            (got, want) => assert_eq!(
                got,
                want.map(drop),
                "CLEAR slot {slot:#x} first {first_page} num {num_pages} bitmap {} words",
                bitmap.len()
            ),
        }
    }
}

fn ring_of(vcpu: &Vcpu) -> &DirtyRing {
    match vcpu.ring() {
        Some(r) => r,
        None => panic!("a ring VM's vCPU has no ring"),
    }
}

struct RingModel<'a> {
    m: &'a Arc<Machine>,
    v: SoftVcpu,
    /// Entries pushed and not reset, from `reset_index`, as (slot, offset); the model of the
    /// ring while userspace plays by the rules.
    outstanding: std::collections::VecDeque<(u32, u64)>,
    /// Pages writable through a pushed, not yet reset entry: (slot index, page).
    writable: BTreeSet<(usize, u64)>,
    harvester: RingHarvester,
    collected: Vec<RingEntry>,
    /// Entries of `outstanding` collected, and committed (a prefix of those collected).
    fetched: u64,
    committed: u64,
    /// The kernel's reset index as the model follows it.
    reset_index: u32,
    /// Userspace wrote garbage into the ring: only "no panic" and the reset walk's count
    /// are checked from then on.
    scribbled: bool,
}

impl<'a> RingModel<'a> {
    fn new(m: &'a Arc<Machine>, v: SoftVcpu) -> Self {
        RingModel {
            m,
            v,
            outstanding: Default::default(),
            writable: BTreeSet::new(),
            harvester: RingHarvester::new(),
            collected: Vec::new(),
            fetched: 0,
            committed: 0,
            reset_index: 0,
            scribbled: false,
        }
    }

    fn ring(&self) -> &DirtyRing {
        ring_of(self.v.generic())
    }

    fn run(mut self, ops: &[Op]) {
        for op in ops {
            match *op {
                Op::Write { slot, page } => self.write(usize::from(slot) % 3, page),
                Op::Get { slot, words } => {
                    let mut out = vec![0u64; usize::from(words % 8)];
                    let got = self.m.vm().get_dirty_log(slot.get(), &mut out);
                    assert_eq!(got, Err(Error::RingInUse), "GET on a ring VM");
                }
                Op::Clear {
                    slot,
                    first_page,
                    num_pages,
                    ref bitmap,
                } => {
                    let got =
                        self.m
                            .vm()
                            .clear_dirty_log(slot.get(), first_page, num_pages, bitmap);
                    assert_eq!(got, Err(Error::RingInUse), "CLEAR on a ring VM");
                }
                Op::Collect => {
                    self.collected.clear();
                    let vcpu = Arc::clone(self.v.generic());
                    let n = self
                        .harvester
                        .collect(ring_of(&vcpu).entries(), &mut self.collected);
                    if !self.scribbled {
                        // Exactly the entries pushed since the last collect, in order.
                        let want: Vec<RingEntry> = self
                            .outstanding
                            .iter()
                            .skip(self.fetched as usize)
                            .map(|&(slot, offset)| RingEntry { slot, offset })
                            .collect();
                        assert_eq!(self.collected, want, "collected entries");
                    }
                    self.fetched += u64::from(n);
                }
                Op::Commit => {
                    let vcpu = Arc::clone(self.v.generic());
                    let n = self.harvester.commit(ring_of(&vcpu).entries());
                    self.committed += u64::from(n);
                }
                Op::Reset => self.reset(),
                Op::Scribble {
                    index,
                    flags,
                    slot,
                    offset,
                } => {
                    let entries = self.ring().entries();
                    let e = &entries[usize::from(index) % entries.len()];
                    e.flags.store(flags, Ordering::Release);
                    e.slot.store(slot.get(), Ordering::Relaxed);
                    e.offset.store(offset, Ordering::Relaxed);
                    self.scribbled = true;
                }
            }
        }
        if !self.scribbled {
            assert_all_tracked(self.m, true, "at the end of a ring run");
        }
    }

    fn write(&mut self, s: usize, page: u8) {
        let p = u64::from(page) % SLOTS[s].2;
        let used_before = self.ring().used();
        let r = self.v.write_u64(gfn_of(s, p) * PAGE, p);
        if self.scribbled {
            return;
        }
        let soft_limit = self.ring().size() - KVM_DIRTY_RING_RSVD_ENTRIES;
        match r {
            Ok(()) => {
                assert!(used_before < soft_limit, "a write ran on a soft-full ring");
                if SLOTS[s].3 && self.writable.insert((s, p)) {
                    self.outstanding.push_back((SLOTS[s].0, p));
                }
                assert_eq!(
                    self.ring().used() as usize,
                    self.outstanding.len(),
                    "entries in the ring after a write to slot {s} page {p}"
                );
            }
            Err(Exit::DirtyRingFull) => {
                assert!(used_before >= soft_limit, "ring full exit at {used_before}");
                assert_eq!(self.ring().used(), used_before);
            }
            Err(e) => panic!("a write to slot {s} page {p}: {e:?}"),
        }
    }

    fn reset(&mut self) {
        // The walk from the reset index: every entry flagged RESET, at most a ring's worth.
        let ring = self.ring();
        let size = ring.size();
        let mut want = 0u32;
        while want < size {
            let e = &ring.entries()[(self.reset_index.wrapping_add(want) & (size - 1)) as usize];
            if e.flags.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_RESET == 0 {
                break;
            }
            want += 1;
        }
        let got = self.m.vm().reset_dirty_rings();
        assert_eq!(got, Ok(want), "entries reset");
        self.reset_index = self.reset_index.wrapping_add(want);
        if self.scribbled {
            return;
        }
        // Playing by the rules, exactly the committed entries are reset.
        assert_eq!(
            u64::from(want),
            self.committed,
            "entries reset vs committed"
        );
        for _ in 0..want {
            let Some((slot, offset)) = self.outstanding.pop_front() else {
                panic!("reset more entries than were pushed");
            };
            let s = slot_index(slot).unwrap_or_else(|| panic!("slot {slot} pushed"));
            self.writable.remove(&(s, offset));
            assert!(
                protected(self.m, gfn_of(s, offset)),
                "ring reset left slot {slot} page {offset} writable"
            );
            self.fetched -= 1;
            self.committed -= 1;
        }
        assert_eq!(
            self.ring().used() as usize,
            self.outstanding.len(),
            "entries in the ring after a reset"
        );
    }
}
