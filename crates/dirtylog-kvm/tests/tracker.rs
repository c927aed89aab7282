//! `KvmDirtyTracker` on the real `/dev/kvm`, in each mode, driven the way a VMM drives it: a
//! VM made with plain kvm-ioctls, a real-mode guest that stores a byte into chosen pages
//! (with an `out` after each store, so a run is many `KVM_RUN`s), harvests compared with
//! exactly the pages written. Fails (never skips) without `/dev/kvm`.

use std::collections::BTreeSet;
use std::sync::Arc;

use dirtylog::{DirtyBitmap, DirtyTracker, TrackerKind};
use dirtylog_kvm::sys::{KVM_EXIT_DIRTY_RING_FULL, KVM_MEM_LOG_DIRTY_PAGES};
use dirtylog_kvm::{Error, KvmDirtyTracker, Slot, TrackerOptions};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

const PAGE: u64 = 4096;
/// Slot 0: GPA 0..64 KiB (the code at 0x1000). Slot 1: GPA 64 KiB..1 MiB, 240 data pages.
const SLOT0_PAGES: u64 = 16;
const SLOT1_PAGES: u64 = 240;

/// ```text
///  0: 8e c0              mov es, ax
///  2: 26 c6 06 00 00 01  mov byte [es:0], 1
///  8: 01 d8              add ax, bx
/// 10: e6 80              out 0x80, al
/// 12: e2 f2              loop 0
/// 14: f4                 hlt
/// ```
const CODE: [u8; 15] = [
    0x8e, 0xc0, 0x26, 0xc6, 0x06, 0, 0, 1, 0x01, 0xd8, 0xe6, 0x80, 0xe2, 0xf2, 0xf4,
];

struct Mem {
    ptr: *mut u8,
    len: usize,
}

impl Mem {
    fn new(len: usize) -> Self {
        // SAFETY: a new anonymous private mapping, aliasing nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap of guest memory");
        Mem { ptr: p.cast(), len }
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; `Guest` drops the VM (and vCPU) first.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

struct Guest {
    // Drop order: the vCPU and the VM close before the memory is unmapped.
    vcpu: Option<VcpuFd>,
    vm: Arc<VmFd>,
    slots: Vec<Slot>,
    _mem: Mem,
    /// `KVM_EXIT_DIRTY_RING_FULL` exits seen.
    ring_full_exits: u32,
    /// Exits at which the tracker said the ring was soft-full.
    soft_full_seen: u32,
}

fn kvm() -> Kvm {
    Kvm::new().unwrap_or_else(|e| {
        panic!("these tests need /dev/kvm ({e}): load kvm_intel or kvm_amd and run as root")
    })
}

impl Guest {
    /// A VM with `kind` enabled, slots 0 and 1 (with `extra_flags` on slot 1), one vCPU.
    fn new(kind: TrackerKind, slot1_flags: u32) -> (Self, dirtylog_kvm::Enabled) {
        let vm = kvm().create_vm().expect("KVM_CREATE_VM");
        let enabled = KvmDirtyTracker::enable(&vm, kind).expect("enable");
        let len = ((SLOT0_PAGES + SLOT1_PAGES) * PAGE) as usize;
        let mem = Mem::new(len);
        // SAFETY: the code fits in page 1 of the mapping.
        unsafe { std::ptr::copy_nonoverlapping(CODE.as_ptr(), mem.ptr.add(0x1000), CODE.len()) };
        let slots = vec![
            Slot {
                slot: 0,
                guest_phys_addr: 0,
                memory_size: SLOT0_PAGES * PAGE,
                userspace_addr: mem.ptr as u64,
                flags: 0,
            },
            Slot {
                slot: 1,
                guest_phys_addr: SLOT0_PAGES * PAGE,
                memory_size: SLOT1_PAGES * PAGE,
                userspace_addr: mem.ptr as u64 + SLOT0_PAGES * PAGE,
                flags: slot1_flags,
            },
        ];
        for s in &slots {
            // SAFETY: the memory lives in `Guest::_mem`, dropped after the VM.
            unsafe { vm.set_user_memory_region((*s).into()) }.expect("set_user_memory_region");
        }
        let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        let mut s = vcpu.get_sregs().expect("get_sregs");
        (s.cs.base, s.cs.selector) = (0, 0);
        vcpu.set_sregs(&s).expect("set_sregs");
        (
            Guest {
                vcpu: Some(vcpu),
                vm: Arc::new(vm),
                slots,
                _mem: mem,
                ring_full_exits: 0,
                soft_full_seen: 0,
            },
            enabled,
        )
    }

    fn tracker(&self, kind: TrackerKind, slots: &[Slot]) -> KvmDirtyTracker {
        // SAFETY: `slots` are this VM's memslots as created in `new`, and the memory outlives
        // the tracker (tests drop the tracker before the guest).
        unsafe { KvmDirtyTracker::new(self.vm.clone(), slots, kind) }.expect("KvmDirtyTracker::new")
    }

    fn vcpu(&self) -> &VcpuFd {
        self.vcpu.as_ref().expect("vcpu")
    }

    /// The guest stores into `count` pages from guest page `first` (GPA / 4096), one
    /// `KVM_RUN` per page; `tracker`, if given, is harvested on ring-full exits.
    fn write_pages(&mut self, first: u64, count: u64, tracker: Option<&KvmDirtyTracker>) {
        assert!(first >= 2 && first + count <= SLOT0_PAGES + SLOT1_PAGES && count > 0);
        let vcpu = self.vcpu.as_mut().expect("vcpu");
        let mut r = vcpu.get_regs().expect("get_regs");
        (r.rip, r.rflags, r.rax, r.rbx, r.rcx) = (0x1000, 2, first << 8, 0x100, count);
        vcpu.set_regs(&r).expect("set_regs");
        loop {
            match vcpu.run().expect("KVM_RUN") {
                VcpuExit::Hlt => return,
                VcpuExit::IoOut(0x80, _) => {
                    if tracker.is_some_and(|t| t.ring_soft_full(0)) {
                        self.soft_full_seen += 1;
                    }
                }
                VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL) => {
                    self.ring_full_exits += 1;
                    tracker
                        .expect("a ring-full exit needs a tracker")
                        .harvest_rings()
                        .expect("harvest_rings on KVM_EXIT_DIRTY_RING_FULL");
                }
                e => panic!("unexpected exit {e:?}"),
            }
        }
    }
}

/// Harvest region `index` into a set of region-relative page numbers.
fn harvest(t: &dyn DirtyTracker, index: usize, npages: u64) -> BTreeSet<u64> {
    let mut out = vec![0u64; npages.div_ceil(64) as usize];
    t.harvest(index, &mut out).expect("harvest");
    pages(&out)
}

fn pages(words: &[u64]) -> BTreeSet<u64> {
    (0..words.len() as u64 * 64)
        .filter(|p| words[(p / 64) as usize] & (1 << (p % 64)) != 0)
        .collect()
}

/// Guest pages `first..first + n` of slot 1, as slot-1-relative page numbers.
fn slot1(first: u64, n: u64) -> BTreeSet<u64> {
    (first - SLOT0_PAGES..first - SLOT0_PAGES + n).collect()
}

#[test]
fn dirty_log_reports_exactly_the_written_pages() {
    let kind = TrackerKind::DirtyLog;
    let (mut g, _) = Guest::new(kind, 0);
    let t = g.tracker(kind, &g.slots.clone());
    t.start().expect("start");
    g.write_pages(20, 7, None);
    g.write_pages(8, 1, None); // slot 0, page 8
    assert_eq!(harvest(&t, 0, SLOT0_PAGES), BTreeSet::from([8]));
    assert_eq!(harvest(&t, 1, SLOT1_PAGES), slot1(20, 7));
    // The fetch re-armed them: nothing new.
    assert_eq!(harvest(&t, 0, SLOT0_PAGES), BTreeSet::new());
    assert_eq!(harvest(&t, 1, SLOT1_PAGES), BTreeSet::new());
    // Written again: reported again.
    g.write_pages(22, 2, None);
    assert_eq!(harvest(&t, 1, SLOT1_PAGES), slot1(22, 2));
    t.stop().expect("stop");
    // Logging is off after stop: the kernel says so.
    let mut out = [0u64; 4];
    let e = t.harvest(1, &mut out).expect_err("harvest after stop");
    assert_eq!(e.errno(), Some(libc::ENOENT), "{e}");
}

#[test]
fn clear_log_reports_until_cleared_and_again_after_a_new_write() {
    let kind = TrackerKind::ClearLog;
    let (mut g, on) = Guest::new(kind, 0);
    let t = g.tracker(kind, &g.slots.clone());
    t.start().expect("start");
    let mut all = vec![0u64; SLOT1_PAGES.div_ceil(64) as usize];
    t.harvest(1, &mut all).expect("harvest");
    if on.initially_set {
        assert_eq!(pages(&all), (0..SLOT1_PAGES).collect(), "INITIALLY_SET");
    } else {
        assert_eq!(pages(&all), BTreeSet::new());
    }
    t.clear(1, 0, &all).expect("clear");
    assert_eq!(harvest(&t, 1, SLOT1_PAGES), BTreeSet::new());

    g.write_pages(100, 5, None);
    assert_eq!(harvest(&t, 1, SLOT1_PAGES), slot1(100, 5));
    // A snapshot: reported until cleared.
    assert_eq!(harvest(&t, 1, SLOT1_PAGES), slot1(100, 5));
    // Clear two of them (pages 84 and 85 of slot 1, in the word from page 64).
    t.clear(1, 64, &[0b11 << (84 - 64)]).expect("clear");
    assert_eq!(harvest(&t, 1, SLOT1_PAGES), slot1(102, 3));
    // Cleared pages come back only after a new write.
    g.write_pages(100, 1, None);
    let mut want = slot1(102, 3);
    want.insert(84);
    assert_eq!(harvest(&t, 1, SLOT1_PAGES), want);
    t.stop().expect("stop");
}

#[test]
fn ring_fills_past_soft_full_and_loses_nothing() {
    // The smallest ring the kernel takes (a 4 KiB page of entries): its soft limit (192
    // entries) is below the 240 pages a round writes.
    let kind = TrackerKind::Ring { entries: 256 };
    let (mut g, on) = Guest::new(kind, 0);
    assert!(on.ring.is_some());
    let t = g.tracker(kind, &g.slots.clone());
    assert_eq!(t.add_vcpu(g.vcpu()).expect("add_vcpu"), 0);
    t.start().expect("start");
    let first = SLOT0_PAGES;
    for round in 0..3 {
        g.write_pages(first, SLOT1_PAGES, Some(&t));
        assert_eq!(
            harvest(&t, 1, SLOT1_PAGES),
            slot1(first, SLOT1_PAGES),
            "round {round}"
        );
        assert_eq!(
            harvest(&t, 0, SLOT0_PAGES),
            BTreeSet::new(),
            "round {round}"
        );
    }
    assert!(
        g.ring_full_exits >= 1,
        "720 pages through a 256-entry ring gave no KVM_EXIT_DIRTY_RING_FULL"
    );
    assert!(g.soft_full_seen >= 1, "ring_soft_full never said so");
    // Nothing left over.
    assert_eq!(harvest(&t, 1, SLOT1_PAGES), BTreeSet::new());
    t.stop().expect("stop");
}

#[test]
fn vmm_writes_are_merged_in_every_mode() {
    for kind in [
        TrackerKind::DirtyLog,
        TrackerKind::ClearLog,
        TrackerKind::Ring { entries: 256 },
    ] {
        let (mut g, on) = Guest::new(kind, 0);
        let t = g.tracker(kind, &g.slots.clone());
        if kind.ring_entries().is_some() {
            t.add_vcpu(g.vcpu()).expect("add_vcpu");
        }
        let vmm = Arc::new(DirtyBitmap::new(SLOT1_PAGES));
        t.set_vmm_bitmap(1, vmm.clone()).expect("set_vmm_bitmap");
        let e = t
            .set_vmm_bitmap(1, Arc::new(DirtyBitmap::new(SLOT1_PAGES + 1)))
            .expect_err("a bitmap of the wrong size");
        assert!(matches!(e, Error::Config(_)), "{e}");
        t.start().expect("start");
        if on.initially_set {
            let mut all = vec![0u64; SLOT1_PAGES.div_ceil(64) as usize];
            t.harvest(1, &mut all).expect("harvest");
            t.clear(1, 0, &all).expect("clear");
        }
        g.write_pages(SLOT0_PAGES + 3, 1, Some(&t));
        vmm.set(7);
        vmm.set(200);
        let mut want = slot1(SLOT0_PAGES + 3, 1);
        want.extend([7, 200]);
        assert_eq!(harvest(&t, 1, SLOT1_PAGES), want, "{kind}");
        assert_eq!(vmm.count(), 0, "{kind}: the VMM bits were taken");
        if kind == TrackerKind::ClearLog {
            t.clear(1, 0, &[1 << 3]).expect("clear");
        }
        assert_eq!(harvest(&t, 1, SLOT1_PAGES), BTreeSet::new(), "{kind}");
        t.stop().expect("stop");
    }
}

#[test]
fn misuse_is_a_typed_error() {
    let kind = TrackerKind::Ring { entries: 256 };
    let (g, _) = Guest::new(kind, 0);
    let t = g.tracker(kind, &g.slots);
    assert!(matches!(t.start(), Err(Error::NoVcpu)));
    assert!(matches!(t.harvest_rings(), Err(Error::NoVcpu)));
    let mut out = vec![0u64; 4];
    assert!(matches!(t.harvest(1, &mut out), Err(Error::NoVcpu)));
    assert!(matches!(
        t.harvest(2, &mut out),
        Err(Error::IndexOutOfRange {
            index: 2,
            regions: 2
        })
    ));
    assert!(matches!(
        t.harvest(1, &mut out[..3]),
        Err(Error::BufferLength {
            index: 1,
            need: 4,
            got: 3
        })
    ));
    assert!(matches!(
        t.harvest(0, &mut out),
        Err(Error::BufferLength {
            index: 0,
            need: 1,
            got: 4
        })
    ));
    assert!(!t.ring_soft_full(0));
    t.add_vcpu(g.vcpu()).expect("add_vcpu");
    t.start().expect("start");
    let e = t.add_vcpu(g.vcpu()).expect_err("add_vcpu after start");
    assert!(e.to_string().contains("before start"), "{e}");
    t.stop().expect("stop");

    // Tracker-kind mismatches and bad tables.
    let t = g.tracker(TrackerKind::DirtyLog, &g.slots);
    assert_eq!(t.add_vcpu(g.vcpu()).expect("add_vcpu counts"), 0);
    assert_eq!(t.add_vcpu(g.vcpu()).expect("add_vcpu counts"), 1);
    assert_eq!(t.vcpus(), 2);
    assert!(matches!(t.harvest_rings(), Err(Error::Config(_))));
    assert!(matches!(
        t.clear(5, 0, &[]),
        Err(Error::IndexOutOfRange { index: 5, .. })
    ));
    let dup = [g.slots[0], g.slots[0]];
    // SAFETY: refused before any ioctl.
    let e = unsafe { KvmDirtyTracker::new(&*g.vm, &dup, TrackerKind::DirtyLog) }
        .expect_err("a slot listed twice");
    assert!(e.to_string().contains("listed twice"), "{e}");
    let odd = [Slot {
        memory_size: 100,
        ..g.slots[0]
    }];
    // SAFETY: refused before any ioctl.
    let e = unsafe { KvmDirtyTracker::new(&*g.vm, &odd, TrackerKind::DirtyLog) }
        .expect_err("a slot of 100 bytes");
    assert!(matches!(e, Error::Config(_)), "{e}");
}

#[test]
fn ring_entry_outside_the_table_is_a_typed_error() {
    // Slot 1 logs (the VMM created it so) but the tracker is given slot 0 only.
    let kind = TrackerKind::Ring { entries: 256 };
    let (mut g, _) = Guest::new(kind, KVM_MEM_LOG_DIRTY_PAGES);
    let t = g.tracker(kind, &g.slots[..1]);
    t.add_vcpu(g.vcpu()).expect("add_vcpu");
    t.start().expect("start");
    g.write_pages(SLOT0_PAGES + 9, 1, Some(&t));
    let e = t.harvest_rings().expect_err("an entry of slot 1");
    assert!(
        matches!(
            e,
            Error::RingEntryOutsideTable {
                vcpu: 0,
                slot: 1,
                offset: 9
            }
        ),
        "{e}"
    );
    // The entry was handed back anyway: the ring is empty now.
    assert!(!t.rings_hold_at_least(1));
    assert_eq!(t.harvest_rings().expect("harvest_rings").collected, 0);
    t.stop().expect("stop");
}

#[test]
fn shared_across_threads_with_a_borrowed_fd() {
    // `&VmFd` and an `Arc` around the tracker: a reaper thread harvests the rings while
    // the vCPU thread runs the guest.
    let kind = TrackerKind::Ring { entries: 256 };
    let (mut g, _) = Guest::new(kind, 0);
    let vm = g.vm.clone();
    let slots = g.slots.clone();
    // SAFETY: the slots are the VM's; the memory outlives the scope.
    let t = unsafe {
        KvmDirtyTracker::with_options(
            &*vm,
            &slots,
            kind,
            TrackerOptions {
                ring_soft_full: Some(64),
                ..Default::default()
            },
        )
    }
    .expect("new");
    t.add_vcpu(g.vcpu()).expect("add_vcpu");
    t.start().expect("start");
    let t = &t;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let seen = std::thread::scope(|s| {
        let reaper = s.spawn(|| {
            let mut acc = vec![0u64; SLOT1_PAGES.div_ceil(64) as usize];
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                t.harvest(1, &mut acc).expect("reaper harvest");
                std::thread::yield_now();
            }
            acc
        });
        let mut vcpu = g.vcpu.take().expect("vcpu");
        // Run the guest on this thread with a borrowed tracker of a different V.
        let mut r = vcpu.get_regs().expect("get_regs");
        (r.rip, r.rflags, r.rax, r.rbx, r.rcx) = (0x1000, 2, SLOT0_PAGES << 8, 0x100, SLOT1_PAGES);
        vcpu.set_regs(&r).expect("set_regs");
        loop {
            match vcpu.run().expect("KVM_RUN") {
                VcpuExit::Hlt => break,
                VcpuExit::IoOut(..) => {}
                VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL) => {
                    t.harvest_rings().expect("harvest_rings");
                }
                e => panic!("unexpected exit {e:?}"),
            }
        }
        g.vcpu = Some(vcpu);
        stop.store(true, std::sync::atomic::Ordering::Release);
        let mut acc = reaper.join().expect("reaper");
        t.harvest(1, &mut acc).expect("final harvest");
        pages(&acc)
    });
    assert_eq!(seen, (0..SLOT1_PAGES).collect());
    t.stop().expect("stop");
}
