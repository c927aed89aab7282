//! Errno parity: the same bad (and good) inputs given to `/dev/kvm` and to the core's
//! `dirtylog::Vm` (on the softmmu reference arch, configured with KVM's own limits) must give
//! the same errno, and the errno the kernel documents.

mod common;

use std::sync::Arc;

use dirtylog::softmmu::{FlushKind, Machine as SoftMachine, SoftVcpu};
use dirtylog::MemoryRegion;
use dirtylog_testvm::sys::{
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_MEM_LOG_DIRTY_PAGES,
};
use dirtylog_testvm::{Caps, GuestMemory, KvmVcpu, KvmVm, MemoryOptions, RingFlavor};

const EINVAL: i32 = libc::EINVAL;
const ENOENT: i32 = libc::ENOENT;
const ENXIO: i32 = libc::ENXIO;
const E2BIG: i32 = libc::E2BIG;
const EEXIST: i32 = libc::EEXIST;
const PAGE: u64 = 4096;

fn errno_name(e: i32) -> String {
    match e {
        EINVAL => "EINVAL".into(),
        ENOENT => "ENOENT".into(),
        ENXIO => "ENXIO".into(),
        E2BIG => "E2BIG".into(),
        EEXIST => "EEXIST".into(),
        e => format!("errno {e}"),
    }
}

/// One operation, as both targets understand it.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// Create/modify a memslot: (slot, gpa, pages, flags).
    Region(u32, u64, u64, u32),
    /// Delete a memslot (memory_size 0).
    Delete(u32),
    /// KVM_GET_DIRTY_LOG(slot).
    Get(u32),
    /// KVM_CLEAR_DIRTY_LOG(slot, first_page, num_pages) with an all-ones bitmap.
    Clear(u32, u64, u32),
    /// KVM_ENABLE_CAP(cap, flags, args[0]).
    Cap(u32, u32, u64),
    /// KVM_RESET_DIRTY_RINGS.
    Reset,
    /// KVM_CREATE_VCPU.
    Vcpu,
}

/// The result of an op: Ok(value) or Err(errno).
type Res = Result<u64, i32>;

trait Target {
    fn apply(&mut self, op: Op) -> Res;
}

struct Kvm {
    vm: KvmVm,
    vcpus: Vec<KvmVcpu>,
    mems: Vec<(u32, Arc<GuestMemory>)>,
}

impl Kvm {
    fn new() -> Self {
        Kvm {
            vm: KvmVm::new().expect("create a KVM VM"),
            vcpus: Vec::new(),
            mems: Vec::new(),
        }
    }
}

fn kerr(e: dirtylog_testvm::Error) -> i32 {
    e.errno().unwrap_or_else(|| {
        panic!("a kernel errno was expected, got a refusal before the kernel: {e}")
    })
}

impl Target for Kvm {
    fn apply(&mut self, op: Op) -> Res {
        match op {
            Op::Region(slot, gpa, pages, flags) => {
                // Reuse the slot's memory when it exists (a flags-only change), so the size and
                // address stay the same unless the case changes them on purpose.
                let mem = match self
                    .mems
                    .iter()
                    .find(|(s, m)| *s == slot && m.len() as u64 == pages * PAGE)
                {
                    Some((_, m)) => m.clone(),
                    None => {
                        let m = Arc::new(
                            GuestMemory::new((pages * PAGE) as usize, MemoryOptions::default())
                                .expect("mmap"),
                        );
                        self.mems.push((slot, m.clone()));
                        m
                    }
                };
                self.vm
                    .set_memslot(slot, gpa, mem, flags)
                    .map(|_| 0)
                    .map_err(kerr)
            }
            Op::Delete(slot) => {
                let region = kvm_bindings::kvm_userspace_memory_region {
                    slot,
                    ..Default::default()
                };
                // SAFETY: memory_size 0 deletes a slot; no memory is handed to the kernel.
                unsafe { dirtylog_testvm::sys::set_user_memory_region(self.vm.fd(), &region) }
                    .map(|_| 0)
                    .map_err(kerr)
            }
            Op::Get(slot) => {
                let mut buf = vec![0u64; 64];
                self.vm
                    .get_dirty_log(slot, &mut buf)
                    .map(|_| 0)
                    .map_err(kerr)
            }
            Op::Clear(slot, first, num) => {
                let ones = vec![!0u64; (num as usize).div_ceil(64).max(1)];
                self.vm
                    .clear_dirty_log(slot, first, num, &ones)
                    .map(|_| 0)
                    .map_err(kerr)
            }
            Op::Cap(cap, flags, arg) => match cap {
                KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 => self
                    .vm
                    .enable_manual_protect_raw(flags, arg)
                    .map(|_| 0)
                    .map_err(kerr),
                KVM_CAP_DIRTY_LOG_RING | KVM_CAP_DIRTY_LOG_RING_ACQ_REL => {
                    let f = if cap == KVM_CAP_DIRTY_LOG_RING {
                        RingFlavor::Plain
                    } else {
                        RingFlavor::AcqRel
                    };
                    self.vm
                        .enable_dirty_ring_raw(f, flags, arg)
                        .map(|_| 0)
                        .map_err(kerr)
                }
                _ => dirtylog_testvm::sys::enable_cap(
                    self.vm.fd(),
                    dirtylog_testvm::Op::EnableCap,
                    cap,
                    flags,
                    [arg, 0, 0, 0],
                )
                .map(|_| 0)
                .map_err(kerr),
            },
            Op::Reset => self.vm.reset_dirty_rings().map(u64::from).map_err(kerr),
            Op::Vcpu => {
                let v = self.vm.create_vcpu().map_err(kerr)?;
                self.vcpus.push(v);
                Ok(0)
            }
        }
    }
}

struct Core {
    m: Arc<SoftMachine>,
    vcpus: Vec<SoftVcpu>,
}

impl Core {
    fn new(caps: &Caps) -> Self {
        Core {
            m: SoftMachine::new(FlushKind::Ranged, caps.vm_config()),
            vcpus: Vec::new(),
        }
    }
}

impl Target for Core {
    fn apply(&mut self, op: Op) -> Res {
        let vm = self.m.vm();
        let e = |e: dirtylog::Error| e.errno();
        match op {
            Op::Region(slot, gpa, pages, flags) => vm
                .set_user_memory_region(&MemoryRegion {
                    slot,
                    flags,
                    guest_phys_addr: gpa,
                    memory_size: pages * PAGE,
                    // A distinct, aligned fake host address per slot and size.
                    userspace_addr: ((slot as u64 + 1) << 32) | (pages * PAGE),
                })
                .map(|_| 0)
                .map_err(e),
            Op::Delete(slot) => vm
                .set_user_memory_region(&MemoryRegion {
                    slot,
                    ..Default::default()
                })
                .map(|_| 0)
                .map_err(e),
            Op::Get(slot) => {
                let mut buf = vec![0u64; 64];
                vm.get_dirty_log(slot, &mut buf).map(|_| 0).map_err(e)
            }
            Op::Clear(slot, first, num) => {
                let ones = vec![!0u64; (num as usize).div_ceil(64).max(1)];
                vm.clear_dirty_log(slot, first, num, &ones)
                    .map(|_| 0)
                    .map_err(e)
            }
            Op::Cap(cap, flags, arg) => vm.enable_cap(cap, flags, arg).map(|_| 0).map_err(e),
            Op::Reset => vm.reset_dirty_rings().map(u64::from).map_err(e),
            Op::Vcpu => {
                self.vcpus.push(self.m.create_vcpu());
                Ok(0)
            }
        }
    }
}

/// A scenario: setup steps (which must succeed on both), then checked steps with the
/// documented result.
struct Case {
    name: &'static str,
    setup: Vec<Op>,
    steps: Vec<(Op, Res)>,
}

fn cases(caps: &Caps) -> Vec<Case> {
    let max = caps.nr_memslots as u32;
    let nr_as = caps.address_spaces() as u32;
    let ring = if caps.dirty_log_ring_acq_rel_bytes > 0 {
        KVM_CAP_DIRTY_LOG_RING_ACQ_REL
    } else {
        KVM_CAP_DIRTY_LOG_RING
    };
    let manual = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;
    let log = KVM_MEM_LOG_DIRTY_PAGES;
    // Slot 0: 259 pages (64·4 + 3) with logging; slot 1: 128 pages without.
    let slots = vec![
        Op::Region(0, 1 << 30, 259, log),
        Op::Region(1, 2 << 30, 128, 0),
    ];
    let ok = Ok(0);
    vec![
        Case {
            name: "GET",
            setup: slots.clone(),
            steps: vec![
                (Op::Get(0), ok),
                (Op::Get(max), Err(EINVAL)),
                (Op::Get(max - 1), Err(ENOENT)),
                (Op::Get(nr_as << 16), Err(EINVAL)),
                (Op::Get(5), Err(ENOENT)),
                (Op::Get(1), Err(ENOENT)),
                (Op::Reset, Err(EINVAL)),
            ],
        },
        Case {
            name: "CLEAR",
            setup: slots.clone(),
            steps: vec![
                (Op::Clear(0, 0, 259), ok),
                (Op::Clear(0, 0, 64), ok),
                (Op::Clear(0, 256, 3), ok),
                (Op::Clear(0, 0, 0), ok),
                (Op::Clear(0, 256, 0), ok),
                (Op::Clear(0, 1, 64), Err(EINVAL)),
                (Op::Clear(5, 1, 64), Err(EINVAL)),
                (Op::Clear(5, 0, 64), Err(ENOENT)),
                (Op::Clear(0, 320, 0), Err(EINVAL)),
                (Op::Clear(0, 0, 65), Err(EINVAL)),
                (Op::Clear(0, 192, 65), Err(EINVAL)),
                (Op::Clear(0, 256, 4), Err(EINVAL)),
                (Op::Clear(0, 0, 260), Err(EINVAL)),
                (Op::Clear(1, 0, 64), Err(ENOENT)),
                (Op::Clear(max, 0, 64), Err(EINVAL)),
                (Op::Clear(nr_as << 16, 0, 64), Err(EINVAL)),
            ],
        },
        Case {
            name: "manual protect cap",
            setup: vec![],
            steps: vec![
                (Op::Cap(manual, 0, 2), Err(EINVAL)),
                (Op::Cap(manual, 1, 1), Err(EINVAL)),
                (Op::Cap(manual, 0, 1 | 4), Err(EINVAL)),
                (Op::Cap(manual, 0, 3), ok),
                (Op::Cap(manual, 0, 1), ok),
                (Op::Cap(manual, 0, 0), ok),
            ],
        },
        Case {
            name: "GET/CLEAR with manual protect + INITIALLY_SET",
            setup: [vec![Op::Cap(manual, 0, 3)], slots.clone()].concat(),
            steps: vec![
                (Op::Get(0), ok),
                (Op::Clear(0, 0, 259), ok),
                (Op::Get(1), Err(ENOENT)),
                (Op::Clear(0, 64, 63), Err(EINVAL)),
            ],
        },
        Case {
            name: "ring size",
            setup: vec![],
            steps: vec![
                (Op::Cap(ring, 0, 0), Err(EINVAL)),
                (Op::Cap(ring, 0, 4096 + 16), Err(EINVAL)),
                (Op::Cap(ring, 0, 2048), Err(EINVAL)),
                (Op::Cap(ring, 0, 2 << 20), Err(E2BIG)),
                (Op::Cap(ring, 0, 4 << 20), Err(E2BIG)),
                (Op::Cap(ring, 0, 1 << 20), ok),
                (Op::Cap(ring, 0, 1 << 20), Err(EINVAL)),
                (Op::Cap(ring, 0, 4096), Err(EINVAL)),
            ],
        },
        Case {
            // The kernel does not check flags for the ring capability (only args[0]).
            name: "ring flags are not checked",
            setup: vec![],
            steps: vec![(Op::Cap(ring, 1, 4096), ok)],
        },
        Case {
            name: "ring after vCPUs exist",
            setup: vec![Op::Vcpu],
            steps: vec![(Op::Cap(ring, 0, 65536), Err(EINVAL))],
        },
        Case {
            name: "GET/CLEAR/RESET with the ring",
            setup: [vec![Op::Cap(ring, 0, 65536)], slots.clone(), vec![Op::Vcpu]].concat(),
            steps: vec![
                (Op::Get(0), Err(ENXIO)),
                (Op::Get(1), Err(ENXIO)),
                (Op::Get(max), Err(ENXIO)),
                (Op::Clear(0, 0, 64), Err(ENXIO)),
                (Op::Clear(0, 1, 64), Err(ENXIO)),
                (Op::Reset, Ok(0)),
            ],
        },
        Case {
            name: "memslots",
            setup: slots.clone(),
            steps: vec![
                (Op::Region(2, (1 << 30) + 100 * PAGE, 16, 0), Err(EEXIST)),
                (Op::Region(0, 1 << 30, 259, 0), ok),
                (Op::Get(0), Err(ENOENT)),
                (Op::Region(0, 1 << 30, 259, log), ok),
                (Op::Get(0), ok),
                (Op::Region(max, 3 << 30, 16, 0), Err(EINVAL)),
                (Op::Region(nr_as << 16, 3 << 30, 16, 0), Err(EINVAL)),
                (Op::Region(1, 2 << 30, 128, 1 << 7), Err(EINVAL)),
                (Op::Delete(7), Err(EINVAL)),
                (Op::Delete(1), ok),
                (Op::Get(1), Err(ENOENT)),
            ],
        },
    ]
}

#[test]
fn kvm_and_core_agree_on_errno() {
    let _kvm = common::require_kvm();
    let caps = Caps::probe().expect("probe /dev/kvm");
    caps.require_ring().expect("this test needs the dirty ring");
    caps.require_manual_protect(true)
        .expect("this test needs manual protect with INITIALLY_SET");
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in cases(&caps) {
        let mut kvm = Kvm::new();
        let mut core = Core::new(&caps);
        for op in &case.setup {
            let (k, c) = (kvm.apply(*op), core.apply(*op));
            assert!(
                k.is_ok() && c.is_ok(),
                "{}: setup {op:?} failed: kvm {k:?}, core {c:?}",
                case.name
            );
        }
        for (op, want) in &case.steps {
            let (k, c) = (kvm.apply(*op), core.apply(*op));
            checked += 1;
            let show = |r: &Res| match r {
                Ok(v) => format!("Ok({v})"),
                Err(e) => format!("Err({})", errno_name(*e)),
            };
            eprintln!(
                "{:<45} {:<28} kvm {:<28} core {}",
                case.name,
                format!("{op:?}"),
                show(&k),
                show(&c)
            );
            if k != c || k != *want {
                failures.push(format!(
                    "{}: {op:?}: kvm {}, core {}, documented {}",
                    case.name,
                    show(&k),
                    show(&c),
                    show(want)
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} checks differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
