//! `KvmDirtyTracker` against the bare ioctl loop, same process, alternating iterations,
//! medians (harness = false: `cargo bench -p dirtylog-kvm --bench tracker`).
//!
//! - GET+CLEAR: a 1 GiB slot with manual protect and `INITIALLY_SET`. Before each timed step
//!   (untimed) the slot's logging is turned off and on, which sets every page's dirty bit, so
//!   both sides start from the same kernel state: all 262144 pages dirty. Timed: ours is
//!   `tracker.harvest(0, out)` + `tracker.clear(0, 0, out)`; bare is `ioctl(KVM_GET_DIRTY_LOG)`
//!   into a plain buffer + `ioctl(KVM_CLEAR_DIRTY_LOG)` of the whole slot with it.
//! - Ring: two identical VMs with 4096-entry rings; before each timed step (untimed) a
//!   real-mode guest stores into the 240 pages of the data slot. Timed: ours is
//!   `tracker.harvest(1, out)` (collect every ring into the pending bitmaps, mark RESET,
//!   `KVM_RESET_DIRTY_RINGS`, take the region's bits); bare reads the ring entries in a plain
//!   loop into a `Vec`, marks them RESET and calls `ioctl(KVM_RESET_DIRTY_RINGS)`.
//!
//! A counting global allocator checks that our timed steps allocate nothing.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dirtylog::ring::{KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_MASK, KVM_DIRTY_GFN_F_RESET};
use dirtylog::TrackerKind;
use dirtylog_kvm::sys::{self, KVM_MEM_LOG_DIRTY_PAGES};
use dirtylog_kvm::{KvmDirtyTracker, RingMap, Slot};
use kvm_bindings::{kvm_clear_dirty_log, kvm_dirty_log};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use std::os::unix::io::AsRawFd;

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator, only counting calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const ITERS: usize = 60;
const PAGE: u64 = 4096;
const GIB: u64 = 1 << 30;

fn mmap(len: u64) -> u64 {
    // SAFETY: a new anonymous mapping, aliasing nothing; never unmapped (the process ends).
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap");
    p as u64
}

fn set_region(vm: &VmFd, s: &Slot, flags: u32) {
    // SAFETY: the memory is mapped for the life of the process.
    unsafe { vm.set_user_memory_region(Slot { flags, ..*s }.into()) }.expect("set region");
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn report(what: &str, ours: &mut [Duration], bare: &mut [Duration], allocs: u64) -> f64 {
    let (o, b) = (median(ours), median(bare));
    let ratio = o.as_secs_f64() / b.as_secs_f64();
    println!(
        "{what}: ours median {o:?} (min {:?}), bare median {b:?} (min {:?}), ratio {ratio:.3}, \
         allocations in our {} timed steps: {allocs}",
        ours[0],
        bare[0],
        ours.len()
    );
    ratio
}

fn get_clear() -> (f64, u64) {
    let kvm = Kvm::new().expect("/dev/kvm is needed");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let on = KvmDirtyTracker::enable(&vm, TrackerKind::ClearLog).expect("enable");
    assert!(
        on.initially_set,
        "the benchmark needs KVM_DIRTY_LOG_INITIALLY_SET"
    );
    let slot = Slot {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: GIB,
        userspace_addr: mmap(GIB),
        flags: 0,
    };
    set_region(&vm, &slot, 0);
    let npages = GIB / PAGE;
    let words = sys::bitmap_words(npages);
    // SAFETY: `slot` is the VM's memslot; its memory is never unmapped.
    let t = unsafe { KvmDirtyTracker::new(&vm, &[slot], TrackerKind::ClearLog) }.expect("new");
    let mut out = vec![0u64; words];
    let mut bare_buf = vec![0u64; words];
    let (get, clear) = (sys::KVM_GET_DIRTY_LOG(), sys::KVM_CLEAR_DIRTY_LOG());
    let mut ours = Vec::with_capacity(ITERS);
    let mut bare = Vec::with_capacity(ITERS);
    let mut allocs = 0;
    let rearm = || {
        set_region(&vm, &slot, 0);
        set_region(&vm, &slot, KVM_MEM_LOG_DIRTY_PAGES); // INITIALLY_SET: every bit set
    };
    for i in 0..ITERS * 2 {
        rearm();
        if (i % 2 == 0) == (i / 2 % 2 == 0) {
            let a = ALLOCS.load(Ordering::Relaxed);
            let s = Instant::now();
            t.harvest(0, &mut out).expect("harvest");
            t.clear(0, 0, &out).expect("clear");
            ours.push(s.elapsed());
            allocs += ALLOCS.load(Ordering::Relaxed) - a;
            assert!(out.iter().all(|w| *w == !0), "every page dirty");
        } else {
            let s = Instant::now();
            let mut log = kvm_dirty_log {
                slot: 0,
                ..Default::default()
            };
            log.__bindgen_anon_1.dirty_bitmap = bare_buf.as_mut_ptr().cast();
            // SAFETY: the buffer holds the slot's bitmap.
            let r = unsafe { libc::ioctl(vm.as_raw_fd(), get, &mut log) };
            assert_eq!(r, 0, "GET");
            let mut c = kvm_clear_dirty_log {
                slot: 0,
                num_pages: npages as u32,
                first_page: 0,
                ..Default::default()
            };
            c.__bindgen_anon_1.dirty_bitmap = bare_buf.as_mut_ptr().cast();
            // SAFETY: the buffer holds `num_pages` bits.
            let r = unsafe { libc::ioctl(vm.as_raw_fd(), clear, &mut c) };
            assert_eq!(r, 0, "CLEAR");
            bare.push(s.elapsed());
            assert!(bare_buf.iter().all(|w| *w == !0), "every page dirty");
        }
    }
    let ratio = report(
        "GET+CLEAR, 1 GiB slot, every page dirty",
        &mut ours,
        &mut bare,
        allocs,
    );
    (ratio, allocs)
}

/// Real mode at 0x1000: store a byte into `cx` pages from segment `ax` (stride `bx`), `hlt`.
const CODE: [u8; 13] = [
    0x8e, 0xc0, 0x26, 0xc6, 0x06, 0, 0, 1, 0x01, 0xd8, 0xe2, 0xf4, 0xf4,
];
const SLOT0_PAGES: u64 = 16;
const SLOT1_PAGES: u64 = 240;

struct RingVm {
    vm: VmFd,
    vcpu: VcpuFd,
    slots: [Slot; 2],
}

fn ring_vm(kvm: &Kvm, kind: TrackerKind) -> RingVm {
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    KvmDirtyTracker::enable(&vm, kind).expect("enable");
    let host = mmap((SLOT0_PAGES + SLOT1_PAGES) * PAGE);
    // SAFETY: the code fits in page 1 of the new mapping.
    unsafe { std::ptr::copy_nonoverlapping(CODE.as_ptr(), (host + 0x1000) as *mut u8, CODE.len()) };
    let slots = [
        Slot {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: SLOT0_PAGES * PAGE,
            userspace_addr: host,
            flags: 0,
        },
        Slot {
            slot: 1,
            guest_phys_addr: SLOT0_PAGES * PAGE,
            memory_size: SLOT1_PAGES * PAGE,
            userspace_addr: host + SLOT0_PAGES * PAGE,
            flags: 0,
        },
    ];
    for s in &slots {
        set_region(&vm, s, s.flags);
    }
    let vcpu = vm.create_vcpu(0).expect("vcpu");
    let mut s = vcpu.get_sregs().expect("sregs");
    (s.cs.base, s.cs.selector) = (0, 0);
    vcpu.set_sregs(&s).expect("sregs");
    RingVm { vm, vcpu, slots }
}

fn dirty_all(vcpu: &mut VcpuFd) {
    let mut r = vcpu.get_regs().expect("regs");
    (r.rip, r.rflags, r.rax, r.rbx, r.rcx) = (0x1000, 2, SLOT0_PAGES << 8, 0x100, SLOT1_PAGES);
    vcpu.set_regs(&r).expect("regs");
    match vcpu.run().expect("KVM_RUN") {
        VcpuExit::Hlt => {}
        e => panic!("unexpected exit {e:?}"),
    }
}

fn ring() -> (f64, u64) {
    let kvm = Kvm::new().expect("/dev/kvm is needed");
    let kind = TrackerKind::Ring { entries: 4096 };
    let mut a = ring_vm(&kvm, kind);
    let mut b = ring_vm(&kvm, kind);
    // Ours on VM a.
    // SAFETY: `a.slots` are VM a's memslots; the memory is never unmapped.
    let t = unsafe { KvmDirtyTracker::new(&a.vm, &a.slots, kind) }.expect("new");
    t.add_vcpu(&a.vcpu).expect("add_vcpu");
    t.start().expect("start");
    // Bare on VM b.
    for s in &b.slots {
        set_region(&b.vm, s, KVM_MEM_LOG_DIRTY_PAGES);
    }
    let map = RingMap::map(&b.vcpu, 4096).expect("map ring");
    let mask = map.len() - 1;
    let mut next = 0u32;
    let mut entries: Vec<(u32, u64)> = Vec::with_capacity(4096);
    let reset = sys::KVM_RESET_DIRTY_RINGS();

    let mut out = vec![0u64; sys::bitmap_words(SLOT1_PAGES)];
    let mut ours = Vec::with_capacity(ITERS);
    let mut bare = Vec::with_capacity(ITERS);
    let mut allocs = 0;
    for i in 0..ITERS * 2 {
        if (i % 2 == 0) == (i / 2 % 2 == 0) {
            dirty_all(&mut a.vcpu);
            out.fill(0);
            let n0 = ALLOCS.load(Ordering::Relaxed);
            let s = Instant::now();
            t.harvest(1, &mut out).expect("harvest");
            ours.push(s.elapsed());
            allocs += ALLOCS.load(Ordering::Relaxed) - n0;
            assert!(
                out.iter().map(|w| w.count_ones() as u64).sum::<u64>() == SLOT1_PAGES,
                "every page harvested"
            );
        } else {
            dirty_all(&mut b.vcpu);
            let s = Instant::now();
            entries.clear();
            let ring = map.entries();
            loop {
                let e = &ring[(next & mask) as usize];
                if e.flags.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_MASK != KVM_DIRTY_GFN_F_DIRTY {
                    break;
                }
                entries.push((
                    e.slot.load(Ordering::Relaxed),
                    e.offset.load(Ordering::Relaxed),
                ));
                e.flags.store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
                next = next.wrapping_add(1);
            }
            // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument.
            let r = unsafe { libc::ioctl(b.vm.as_raw_fd(), reset) };
            assert!(r >= 0, "RESET");
            bare.push(s.elapsed());
            assert_eq!(entries.len() as u64, SLOT1_PAGES, "every page harvested");
        }
    }
    let ratio = report(
        "ring harvest+reset, 240 entries",
        &mut ours,
        &mut bare,
        allocs,
    );
    (ratio, allocs)
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken.
    let (gc, gc_allocs) = get_clear();
    let (r, r_allocs) = ring();
    println!(
        "targets: GET+CLEAR ratio {gc:.3} (<= 1.05: {}), ring ratio {r:.3} (<= 1.1: {}), \
         allocations {} (0: {})",
        if gc <= 1.05 { "met" } else { "MISSED" },
        if r <= 1.1 { "met" } else { "MISSED" },
        gc_allocs + r_allocs,
        if gc_allocs + r_allocs == 0 {
            "met"
        } else {
            "MISSED"
        },
    );
}
