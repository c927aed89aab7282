//! Differential test: one deterministic write script, run on /dev/kvm (the script guest), on
//! the reference arch (`dirtylog::softmmu`, each vCPU's writes in turn through `write_u64`),
//! and on a plain model of KVM's semantics. At every reap point the three must agree, with
//! each tracker:
//!
//! - dirty-log: the bitmaps `KVM_GET_DIRTY_LOG` returns, slot by slot;
//! - clear-log (manual protect + `INITIALLY_SET`): the bitmaps GET returns (then CLEAR gives
//!   back exactly those); the first reports every page;
//! - ring: the set of harvested pages; and each vCPU's entry sequence.
//!
//! Ring entries depend on how the host runs guest writes. With writes executed by the CPU,
//! only a write-protection fault logs: a page written twice between resets gets one entry,
//! and where vCPUs race on a page, which of them faults first (and whether both do) is up to
//! the host, so sequences are compared without the pages written by several vCPUs in one
//! phase. A host that *emulates* guest writes (the PVM host this project runs on, whose
//! guests run through KVM's instruction emulator) marks the page dirty on every write
//! (`kvm_vcpu_write_guest` → `mark_page_dirty_in_slot`), writable or not: one entry per write,
//! in each writer's ring, so sequences are deterministic and compared whole. The test probes
//! which kind of host it runs on, and holds KVM to the model of that kind; the reference arch
//! (fault-based, like hardware) is always held to the fault model, and the *sets* of pages
//! must agree between all of them either way.
//!
//! The script covers pages shared between vCPUs, the unaligned tails of slots of
//! `64·n + 3` pages, a page written twice (and three times) in one phase, writes accumulated
//! over phases without a reap, logging turned off with bits not yet fetched and on again, and a
//! reap after writes made only while logging was off. The final memory contents must match too.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use dirtylog::memslot::{MemoryRegion, KVM_MEM_LOG_DIRTY_PAGES};
use dirtylog::ring::RingHarvester;
use dirtylog::softmmu::{FlushKind, Machine as SoftMachine, SoftVcpu};
use dirtylog::vm::{
    VmConfig, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_MANUAL_CAPS,
};
use dirtylog::TrackerKind;
use dirtylog_testvm::x86::layout::TEST_BASE;
use dirtylog_testvm::{Machine, MachineConfig, MemoryOptions, Program};

/// Two test slots of `64·n + 3` pages, contiguous from `TEST_BASE`.
const SLOTS: [u64; 2] = [64 * 6 + 3, 64 * 3 + 3];
const NPAGES: u64 = SLOTS[0] + SLOTS[1];
const VCPUS: usize = 3;
/// Ring entries per vCPU: more than any vCPU pushes between two reaps, so no ring fills.
const RING: u32 = 4096;
const PAGE: u64 = 4096;
const T: Duration = Duration::from_secs(20);

/// The ring tracker, at [`RING`] entries.
const RING_TRACKER: TrackerKind = TrackerKind::Ring { entries: RING };

/// One step of the script.
#[derive(Debug, Clone)]
enum Step {
    /// A phase: vCPU `i` writes the value into each page of `pages[i]`, in order.
    Write(u64, Vec<Vec<u64>>),
    /// `KVM_MEM_LOG_DIRTY_PAGES` on or off on every test slot.
    Logging(bool),
    /// The host reaps (named for messages).
    Reap(&'static str),
}

/// What one reap returned.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reaped {
    /// One GET bitmap per slot.
    Bitmaps(Vec<Vec<u64>>),
    /// Per vCPU, its entries `(slot, offset)` in ring order.
    Ring(Vec<Vec<(u32, u64)>>),
}

/// The slot id and offset of workload page `p`.
fn locate(p: u64) -> (u32, u64) {
    if p < SLOTS[0] {
        (1, p)
    } else {
        (2, p - SLOTS[0])
    }
}

fn page_of(slot: u32, offset: u64) -> u64 {
    if slot == 1 {
        offset
    } else {
        SLOTS[0] + offset
    }
}

/// splitmix64: the script must not depend on any library's generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// `n` distinct pages, in random order.
    fn pages(&mut self, n: usize) -> Vec<u64> {
        let mut seen = BTreeSet::new();
        let mut v = Vec::new();
        while v.len() < n {
            let p = self.next() % NPAGES;
            if seen.insert(p) {
                v.push(p);
            }
        }
        v
    }

    /// `n` pages picked from `from` (distinct if `from` is).
    fn some_of(&mut self, from: &[u64], n: usize) -> Vec<u64> {
        let mut v = from.to_vec();
        for i in (1..v.len()).rev() {
            v.swap(i, (self.next() % (i as u64 + 1)) as usize);
        }
        v.truncate(n);
        v
    }
}

const SLOT1_TAIL: [u64; 3] = [SLOTS[0] - 3, SLOTS[0] - 2, SLOTS[0] - 1];
const SLOT2_TAIL: [u64; 3] = [NPAGES - 3, NPAGES - 2, NPAGES - 1];

fn script() -> Vec<Step> {
    use Step::*;
    let mut r = Rng(0x5eed);
    let mut s = Vec::new();

    // Spread over both slots, with sharing between vCPUs 0 and 1 and the slot tails.
    let mut v0 = r.pages(150);
    v0.extend(SLOT1_TAIL);
    let mut v1 = r.pages(120);
    v1.extend(r.some_of(&v0, 40));
    v1.extend(SLOT2_TAIL);
    v1.push(SLOTS[0]); // first page of slot 2
    let v2 = r.pages(100);
    s.push(Write(1, vec![v0, v1, v2]));
    s.push(Reap("spread, shared pages and tails"));

    // Pages written twice (and three times) by the same vCPU in one phase.
    let mut v0 = r.pages(100);
    let again = r.some_of(&v0, 30);
    v0.extend(again);
    let mut v2 = r.pages(80);
    v2.insert(40, v2[3]);
    v2.push(v2[3]);
    v2.push(SLOT2_TAIL[2]);
    v2.push(SLOT2_TAIL[2]);
    s.push(Write(2, vec![v0, vec![], v2]));
    s.push(Reap("pages written twice in a phase"));

    // Writes accumulated over two phases without a reap, overlapping across phases.
    let a0 = r.pages(100);
    let a1 = r.pages(100);
    let mut b0 = r.some_of(&a1, 50);
    b0.extend(r.pages(50));
    let b2 = r.pages(60);
    s.push(Write(3, vec![a0, a1, vec![]]));
    s.push(Write(4, vec![b0, vec![], b2]));
    s.push(Reap("two phases before a reap"));

    // Logging off with bits not yet fetched, writes while off, on again, more writes.
    let c1 = r.pages(120);
    let mut d0 = r.some_of(&c1, 30);
    d0.extend(r.pages(70));
    d0.extend(SLOT1_TAIL);
    let d2 = r.pages(80);
    let mut e1 = r.some_of(&d0, 60);
    e1.extend(r.pages(40));
    let e2 = r.some_of(&c1, 40);
    s.push(Write(5, vec![vec![], c1, vec![]]));
    s.push(Logging(false));
    s.push(Write(6, vec![d0, vec![], d2]));
    s.push(Logging(true));
    s.push(Write(7, vec![vec![], e1, e2]));
    s.push(Reap("logging turned off and on again"));

    s.push(Reap("nothing written"));

    // Writes only while logging is off.
    s.push(Logging(false));
    s.push(Write(8, vec![r.pages(80), r.pages(80), r.pages(80)]));
    s.push(Logging(true));
    s.push(Reap("written only while logging was off"));

    // Every page, each by one vCPU, and the tails by all of them.
    let all: Vec<Vec<u64>> = (0..VCPUS as u64)
        .map(|i| {
            let mut v: Vec<u64> = (0..NPAGES).filter(|p| p % 3 == i).collect();
            v.extend(SLOT1_TAIL);
            v.extend(SLOT2_TAIL);
            v
        })
        .collect();
    s.push(Write(9, all));
    s.push(Reap("every page"));

    s.push(Write(
        10,
        vec![SLOT2_TAIL.to_vec(), vec![], SLOT1_TAIL.to_vec()],
    ));
    s.push(Reap("tails only"));
    s
}

/// Something that runs the script.
trait Target {
    fn write(&mut self, value: u64, pages: &[Vec<u64>]);
    fn logging(&mut self, on: bool);
    fn reap(&mut self) -> Reaped;
    fn read(&self, page: u64) -> u64;
}

/// KVM's semantics written out: which pages are dirty, which are write-protected, what each
/// ring holds. vCPUs write in turn.
struct Model {
    tracker: TrackerKind,
    /// Every write to a logged page is logged (an emulating host), not only faults.
    every_write: bool,
    logging: bool,
    dirty: BTreeSet<u64>,
    writable: BTreeSet<u64>,
    rings: Vec<Vec<(u32, u64)>>,
    mem: BTreeMap<u64, u64>,
}

impl Model {
    fn new(tracker: TrackerKind, every_write: bool) -> Self {
        let mut m = Model {
            tracker,
            every_write,
            logging: false,
            dirty: BTreeSet::new(),
            writable: BTreeSet::new(),
            rings: vec![Vec::new(); VCPUS],
            mem: BTreeMap::new(),
        };
        m.logging(true);
        m
    }
}

impl Target for Model {
    fn write(&mut self, value: u64, pages: &[Vec<u64>]) {
        for (v, list) in pages.iter().enumerate() {
            for &p in list {
                self.mem.insert(p, value);
                // A write to a write-protected page faults: logged, then writable.
                let fault = self.writable.insert(p);
                if self.logging && (fault || self.every_write) {
                    match self.tracker {
                        TrackerKind::Ring { .. } => self.rings[v].push(locate(p)),
                        _ => {
                            self.dirty.insert(p);
                        }
                    }
                }
            }
        }
    }

    fn logging(&mut self, on: bool) {
        // Off drops the bitmap (ring entries stay); on starts a new one: empty and the whole
        // slot write-protected, or, with INITIALLY_SET, full and nothing protected.
        self.dirty.clear();
        if on && !self.logging {
            if self.tracker == TrackerKind::ClearLog {
                self.dirty = (0..NPAGES).collect();
            } else {
                self.writable.clear();
            }
        }
        self.logging = on;
    }

    fn reap(&mut self) -> Reaped {
        match self.tracker {
            TrackerKind::Ring { .. } => {
                let rings = std::mem::replace(&mut self.rings, vec![Vec::new(); VCPUS]);
                for &(s, o) in rings.iter().flatten() {
                    self.writable.remove(&page_of(s, o));
                }
                Reaped::Ring(rings)
            }
            _ => {
                let mut maps: Vec<Vec<u64>> = SLOTS
                    .iter()
                    .map(|&n| vec![0; n.div_ceil(64) as usize])
                    .collect();
                for &p in &self.dirty {
                    let (s, o) = locate(p);
                    maps[s as usize - 1][(o / 64) as usize] |= 1 << (o % 64);
                    // GET (dirty-log) or CLEAR (clear-log) re-protects what it reported.
                    self.writable.remove(&p);
                }
                self.dirty.clear();
                Reaped::Bitmaps(maps)
            }
        }
    }

    fn read(&self, page: u64) -> u64 {
        self.mem.get(&page).copied().unwrap_or(0)
    }
}

/// The reference arch, vCPUs writing in turn on this thread.
struct Soft {
    tracker: TrackerKind,
    m: Arc<SoftMachine>,
    vcpus: Vec<SoftVcpu>,
    harvesters: Vec<RingHarvester>,
}

fn slot_gpa(slot: u32) -> u64 {
    TEST_BASE + PAGE * page_of(slot, 0)
}

impl Soft {
    fn new(tracker: TrackerKind) -> Self {
        let m = SoftMachine::new(FlushKind::Ranged, VmConfig::default());
        match tracker {
            TrackerKind::DirtyLog => {}
            TrackerKind::ClearLog => m
                .vm()
                .enable_cap(
                    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                    0,
                    KVM_DIRTY_LOG_MANUAL_CAPS,
                )
                .unwrap(),
            TrackerKind::Ring { entries } => m
                .vm()
                .enable_cap(KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 0, entries as u64 * 16)
                .unwrap(),
        }
        let mut s = Soft {
            tracker,
            vcpus: (0..VCPUS).map(|_| m.create_vcpu()).collect(),
            m,
            harvesters: vec![RingHarvester::new(); VCPUS],
        };
        s.logging(true);
        s
    }
}

impl Target for Soft {
    fn write(&mut self, value: u64, pages: &[Vec<u64>]) {
        for (v, list) in pages.iter().enumerate() {
            for &p in list {
                self.vcpus[v]
                    .write_u64(TEST_BASE + p * PAGE, value)
                    .unwrap_or_else(|e| panic!("reference vCPU {v}, page {p}: {e:?}"));
            }
        }
    }

    fn logging(&mut self, on: bool) {
        for (i, &n) in SLOTS.iter().enumerate() {
            let slot = i as u32 + 1;
            self.m
                .vm()
                .set_user_memory_region(&MemoryRegion {
                    slot,
                    flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                    guest_phys_addr: slot_gpa(slot),
                    memory_size: n * PAGE,
                    userspace_addr: slot_gpa(slot),
                })
                .unwrap();
        }
    }

    fn reap(&mut self) -> Reaped {
        match self.tracker {
            TrackerKind::Ring { .. } => {
                let mut rings = vec![Vec::new(); VCPUS];
                let mut out = Vec::new();
                for (i, v) in self.vcpus.iter().enumerate() {
                    let r = v.generic().ring().expect("ring");
                    out.clear();
                    self.harvesters[i].collect(r.entries(), &mut out);
                    rings[i] = out.iter().map(|e| (e.slot, e.offset)).collect();
                }
                let mut committed = 0;
                for (i, v) in self.vcpus.iter().enumerate() {
                    committed += self.harvesters[i].commit(v.generic().ring().unwrap().entries());
                }
                let reset = self.m.vm().reset_dirty_rings().unwrap();
                assert!(reset >= committed, "reset {reset} of {committed}");
                Reaped::Ring(rings)
            }
            _ => {
                let mut maps = Vec::new();
                for (i, &n) in SLOTS.iter().enumerate() {
                    let slot = i as u32 + 1;
                    let mut b = vec![0u64; n.div_ceil(64) as usize];
                    self.m.vm().get_dirty_log(slot, &mut b).unwrap();
                    if self.tracker == TrackerKind::ClearLog {
                        self.m.vm().clear_dirty_log(slot, 0, n as u32, &b).unwrap();
                    }
                    maps.push(b);
                }
                Reaped::Bitmaps(maps)
            }
        }
    }

    fn read(&self, page: u64) -> u64 {
        self.m.read_u64(TEST_BASE + page * PAGE)
    }
}

/// `/dev/kvm`: the script guest on every vCPU, released together for each phase.
struct Kvm {
    tracker: TrackerKind,
    m: Machine,
}

impl Kvm {
    fn new(tracker: TrackerKind) -> Self {
        common::check_kvm();
        let m = Machine::new(MachineConfig {
            vcpus: VCPUS as u32,
            program: Program::Script,
            slot_pages: SLOTS.to_vec(),
            log_dirty_pages: true,
            tracker,
            initially_set: true,
            memory: MemoryOptions {
                no_huge_pages: true,
                populate: false,
            },
            seed: 1,
        })
        .unwrap();
        Kvm { tracker, m }
    }
}

impl Target for Kvm {
    fn write(&mut self, value: u64, pages: &[Vec<u64>]) {
        for (v, list) in pages.iter().enumerate() {
            self.m.set_script(v as u32, list).unwrap();
        }
        self.m.script_pass(value, T).unwrap();
        let n: usize = pages.iter().map(Vec::len).sum();
        assert!(self.m.total_writes() >= n as u64);
    }

    fn logging(&mut self, on: bool) {
        for slot in 1..=SLOTS.len() as u32 {
            self.m.vm_mut().set_logging(slot, on).unwrap();
        }
    }

    fn reap(&mut self) -> Reaped {
        match self.tracker {
            TrackerKind::Ring { .. } => {
                let mut rings = vec![Vec::new(); VCPUS];
                let st = self
                    .m
                    .harvest_rings(|v, e| rings[v].push((e.slot, e.offset)))
                    .unwrap();
                assert_eq!(st.reset, st.collected);
                Reaped::Ring(rings)
            }
            _ => {
                let mut maps = Vec::new();
                for (i, &n) in SLOTS.iter().enumerate() {
                    let slot = i as u32 + 1;
                    let mut b = vec![0u64; n.div_ceil(64) as usize];
                    self.m.vm().get_dirty_log(slot, &mut b).unwrap();
                    if self.tracker == TrackerKind::ClearLog {
                        self.m.vm().clear_dirty_log(slot, 0, n as u32, &b).unwrap();
                    }
                    maps.push(b);
                }
                Reaped::Bitmaps(maps)
            }
        }
    }

    fn read(&self, page: u64) -> u64 {
        self.m.read_page_u64(page)
    }
}

fn pages_of(r: &Reaped) -> BTreeSet<u64> {
    match r {
        Reaped::Bitmaps(maps) => {
            let mut s = BTreeSet::new();
            for (i, m) in maps.iter().enumerate() {
                for (w, &bits) in m.iter().enumerate() {
                    for b in 0..64 {
                        if bits >> b & 1 == 1 {
                            s.insert(page_of(i as u32 + 1, w as u64 * 64 + b));
                        }
                    }
                }
            }
            s
        }
        Reaped::Ring(rings) => rings
            .iter()
            .flatten()
            .map(|&(s, o)| page_of(s, o))
            .collect(),
    }
}

/// Each vCPU's ring sequence without the pages in `contested`.
fn sequences(r: &Reaped, contested: &BTreeSet<u64>) -> Vec<Vec<u64>> {
    match r {
        Reaped::Ring(rings) => rings
            .iter()
            .map(|seq| {
                seq.iter()
                    .map(|&(s, o)| page_of(s, o))
                    .filter(|p| !contested.contains(p))
                    .collect()
            })
            .collect(),
        Reaped::Bitmaps(_) => Vec::new(),
    }
}

/// Does this host's KVM log every guest write to a logged page in the dirty ring, even to a
/// page already writable (guest writes emulated), rather than only write-protection faults?
fn kvm_logs_every_write() -> bool {
    let mut k = Kvm::new(RING_TRACKER);
    k.m.set_script(0, &[0, 0, 0]).unwrap();
    k.m.script_pass(1, T).unwrap();
    let Reaped::Ring(r) = k.reap() else {
        unreachable!("a ring tracker")
    };
    k.m.shutdown().unwrap();
    match r[0].len() {
        1 => false,
        3 => true,
        n => panic!("three writes to one page gave {n} ring entries: {r:?}"),
    }
}

fn differential(tracker: TrackerKind) {
    let _kvm = common::require_kvm();
    let every_write = matches!(tracker, TrackerKind::Ring { .. }) && kvm_logs_every_write();
    if matches!(tracker, TrackerKind::Ring { .. }) {
        eprintln!(
            "this host logs {} in the dirty ring",
            if every_write {
                "every guest write (emulated writes)"
            } else {
                "write-protection faults only"
            }
        );
    }
    let mut kvm = Kvm::new(tracker);
    let mut soft = Soft::new(tracker);
    // The reference arch, like hardware, logs faults; KVM is held to its host's kind.
    let mut model = Model::new(tracker, false);
    let mut host_model = Model::new(tracker, every_write);
    // Pages written by more than one vCPU in some phase since the last reap, and who wrote
    // what since the last reap.
    let mut contested = BTreeSet::new();
    let mut writers: BTreeMap<u64, BTreeSet<usize>> = BTreeMap::new();
    let mut reaps = 0;
    for step in script() {
        match step {
            Step::Write(value, pages) => {
                let mut phase: BTreeMap<u64, BTreeSet<usize>> = BTreeMap::new();
                for (v, list) in pages.iter().enumerate() {
                    for &p in list {
                        phase.entry(p).or_default().insert(v);
                        writers.entry(p).or_default().insert(v);
                    }
                }
                contested.extend(phase.iter().filter(|(_, w)| w.len() > 1).map(|(&p, _)| p));
                kvm.write(value, &pages);
                soft.write(value, &pages);
                model.write(value, &pages);
                host_model.write(value, &pages);
            }
            Step::Logging(on) => {
                kvm.logging(on);
                soft.logging(on);
                model.logging(on);
                host_model.logging(on);
            }
            Step::Reap(what) => {
                reaps += 1;
                let at = format!("{tracker}, reap {reaps} ({what})");
                let (k, s, m, hm) = (kvm.reap(), soft.reap(), model.reap(), host_model.reap());
                assert_eq!(s, m, "{at}: reference arch vs model");
                let (kp, sp) = (pages_of(&k), pages_of(&s));
                assert_eq!(
                    kp,
                    sp,
                    "{at}: KVM reported {:?} that the reference did not; the reference {:?} \
                     that KVM did not",
                    kp.difference(&sp).collect::<Vec<_>>(),
                    sp.difference(&kp).collect::<Vec<_>>()
                );
                match &k {
                    Reaped::Bitmaps(_) => assert_eq!(k, s, "{at}: bitmaps"),
                    Reaped::Ring(_) if every_write => {
                        assert_eq!(k, hm, "{at}: KVM's rings vs the every-write model")
                    }
                    Reaped::Ring(kr) => {
                        assert_eq!(
                            sequences(&k, &contested),
                            sequences(&hm, &contested),
                            "{at}: per-vCPU entry sequences of uncontested pages"
                        );
                        // Contested pages: logged once per writing vCPU at most.
                        for (v, seq) in kr.iter().enumerate() {
                            for &(sl, o) in seq {
                                let p = page_of(sl, o);
                                assert!(
                                    writers.get(&p).is_some_and(|w| w.contains(&v)),
                                    "{at}: vCPU {v} logged page {p}, which it did not write"
                                );
                            }
                        }
                    }
                }
                let entries = match &k {
                    Reaped::Ring(r) => format!(", {} ring entries", r.iter().flatten().count()),
                    Reaped::Bitmaps(_) => String::new(),
                };
                eprintln!("{at}: {} pages agree{entries}", kp.len());
                contested.clear();
                writers.clear();
            }
        }
    }
    for p in 0..NPAGES {
        assert_eq!(kvm.read(p), soft.read(p), "{tracker}: contents of page {p}");
        assert_eq!(
            kvm.read(p),
            model.read(p),
            "{tracker}: contents of page {p}"
        );
    }
    kvm.m.shutdown().unwrap();
}

#[test]
fn dirty_log() {
    differential(TrackerKind::DirtyLog);
}

#[test]
fn clear_log() {
    differential(TrackerKind::ClearLog);
}

#[test]
fn dirty_ring() {
    differential(RING_TRACKER);
}

#[test]
fn script_guest_writes_its_list_in_order() {
    let _kvm = common::require_kvm();
    let mut k = Kvm::new(TrackerKind::DirtyLog);
    k.m.set_script(0, &[5, 7, 5]).unwrap();
    k.m.set_script(2, &[NPAGES - 1]).unwrap();
    k.m.script_pass(42, T).unwrap();
    assert_eq!((k.m.writes(0), k.m.writes(1), k.m.writes(2)), (3, 0, 1));
    for p in 0..NPAGES {
        let want = if [5, 7, NPAGES - 1].contains(&p) {
            42
        } else {
            0
        };
        assert_eq!(k.m.read_page_u64(p), want, "page {p}");
    }
    // The list stays until replaced; a pass writes it again.
    k.m.script_pass(43, T).unwrap();
    assert_eq!(k.m.read_page_u64(7), 43);
    let e = k.m.set_script(0, &[NPAGES]).unwrap_err();
    assert!(e.to_string().contains("outside"), "{e}");
    let e = k.m.set_script(3, &[0]).unwrap_err();
    assert!(e.to_string().contains("vCPU 3"), "{e}");
    let too_long = vec![0; k.m.script_capacity() as usize + 1];
    assert!(k.m.set_script(1, &too_long).is_err());
    k.m.shutdown().unwrap();
}
