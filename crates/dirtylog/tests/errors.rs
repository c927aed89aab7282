//! Every error path of the core, with the errno KVM returns for the same input.
//!
//! Table-driven: each case builds a fresh VM from a fixture, runs one operation and checks
//! both the typed variant and `errno()`. Sources for the expected values: the reference
//! (`kvm-dirty-log.md`) sections 1.2-1.6, i.e. `__kvm_set_memory_region`,
//! `kvm_get_dirty_log_protect`, `kvm_clear_dirty_log_protect`,
//! `kvm_vm_ioctl_enable_cap_generic` and `kvm_vm_ioctl_enable_dirty_log_ring`.

use std::sync::Arc;

use dirtylog::error::errno::{E2BIG, EEXIST, EFAULT, EINVAL, ENOENT, ENXIO};
use dirtylog::softmmu::{FlushKind, Machine, SoftMmu};
use dirtylog::vm::{
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_CAPS,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use dirtylog::{Error, MemoryRegion, Vm, VmConfig, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY};

const PAGE: u64 = 4096;

/// Slot 0, address space 0: logging, 64*3+3 pages (unaligned tail) at gpa 0.
const LOG_SLOT: u32 = 0;
const LOG_NPAGES: u64 = 64 * 3 + 3;
/// Slot 1, address space 0: no logging.
const PLAIN_SLOT: u32 = 1;
/// Slot 2, address space 0: logging, exactly 128 pages.
const ALIGNED_SLOT: u32 = 2;
const ALIGNED_NPAGES: u64 = 128;
/// Slot 0 of address space 1: logging, 64 pages.
const AS1_SLOT: u32 = 1 << 16;
/// Exists nowhere.
const MISSING_SLOT: u32 = 9;

type V = Vm<SoftMmu>;

fn machine() -> Arc<Machine> {
    Machine::new(FlushKind::Ranged, VmConfig::default())
}

fn region(slot: u32, flags: u32, gpa: u64, npages: u64, uaddr: u64) -> MemoryRegion {
    MemoryRegion {
        slot,
        flags,
        guest_phys_addr: gpa,
        memory_size: npages * PAGE,
        userspace_addr: uaddr,
    }
}

/// The GET/CLEAR fixture (see the constants above). `ring` enables a dirty ring first.
fn log_fixture(ring: bool) -> Arc<Machine> {
    let m = machine();
    let vm = m.vm();
    if ring {
        vm.enable_cap(KVM_CAP_DIRTY_LOG_RING, 0, 4096).unwrap();
    }
    let l = KVM_MEM_LOG_DIRTY_PAGES;
    for r in [
        region(LOG_SLOT, l, 0, LOG_NPAGES, 0x1000_0000),
        region(PLAIN_SLOT, 0, 1 << 30, 16, 0x2000_0000),
        region(ALIGNED_SLOT, l, 2 << 30, ALIGNED_NPAGES, 0x3000_0000),
        region(AS1_SLOT, l, 0, 64, 0x4000_0000),
    ] {
        vm.set_user_memory_region(&r).unwrap();
    }
    m
}

/// One row of a table: an operation on a fresh fixture and the error it must fail with.
struct Case {
    name: &'static str,
    op: fn(&V) -> Result<(), Error>,
    errno: i32,
    variant: fn(&Error) -> bool,
}

/// One row that must succeed.
struct Ok_ {
    name: &'static str,
    op: fn(&V) -> Result<(), Error>,
}

fn run_table(fixture: impl Fn() -> Arc<Machine>, cases: &[Case]) {
    let mut failures = Vec::new();
    for c in cases {
        let m = fixture();
        match (c.op)(m.vm()) {
            Ok(()) => failures.push(format!("{}: succeeded, expected errno {}", c.name, c.errno)),
            Err(e) => {
                if e.errno() != c.errno {
                    failures.push(format!(
                        "{}: errno {} ({e:?}), expected {}",
                        c.name,
                        e.errno(),
                        c.errno
                    ));
                } else if !(c.variant)(&e) {
                    failures.push(format!("{}: unexpected variant {e:?}", c.name));
                }
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

fn run_ok_table(fixture: impl Fn() -> Arc<Machine>, cases: &[Ok_]) {
    let mut failures = Vec::new();
    for c in cases {
        let m = fixture();
        if let Err(e) = (c.op)(m.vm()) {
            failures.push(format!(
                "{}: failed with {e:?} (errno {})",
                c.name,
                e.errno()
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

fn get(vm: &V, slot: u32) -> Result<(), Error> {
    let mut buf = [0u64; 8];
    vm.get_dirty_log(slot, &mut buf)
}

fn clear(vm: &V, slot: u32, first: u64, num: u32) -> Result<(), Error> {
    vm.clear_dirty_log(slot, first, num, &[!0u64; 8])
}

// ---------------------------------------------------------------------------------------
// KVM_GET_DIRTY_LOG
// ---------------------------------------------------------------------------------------

#[test]
fn get_dirty_log_errors() {
    run_table(
        || log_fixture(false),
        &[
            Case {
                name: "as_id == nr_as",
                op: |vm| get(vm, 2 << 16),
                errno: EINVAL,
                variant: |e| matches!(e, Error::InvalidSlotId { as_id: 2, id: 0 }),
            },
            Case {
                name: "as_id 0xffff",
                op: |vm| get(vm, 0xffff << 16),
                errno: EINVAL,
                variant: |e| matches!(e, Error::InvalidSlotId { as_id: 0xffff, .. }),
            },
            Case {
                name: "id == KVM_USER_MEM_SLOTS",
                op: |vm| get(vm, 32764),
                errno: EINVAL,
                variant: |e| {
                    matches!(
                        e,
                        Error::InvalidSlotId {
                            as_id: 0,
                            id: 32764
                        }
                    )
                },
            },
            Case {
                name: "id 0xffff",
                op: |vm| get(vm, 0xffff),
                errno: EINVAL,
                variant: |e| matches!(e, Error::InvalidSlotId { id: 0xffff, .. }),
            },
            Case {
                name: "missing slot",
                op: |vm| get(vm, MISSING_SLOT),
                errno: ENOENT,
                variant: |e| matches!(e, Error::NoSuchSlot { as_id: 0, id: 9 }),
            },
            Case {
                name: "slot 1 exists only in address space 0",
                op: |vm| get(vm, 1 << 16 | PLAIN_SLOT),
                errno: ENOENT,
                variant: |e| matches!(e, Error::NoSuchSlot { as_id: 1, id: 1 }),
            },
            Case {
                name: "slot without logging",
                op: |vm| get(vm, PLAIN_SLOT),
                errno: ENOENT,
                variant: |e| matches!(e, Error::LoggingDisabled { as_id: 0, id: 1 }),
            },
            Case {
                name: "buffer one word short (195 pages need 4 words)",
                op: |vm| vm.get_dirty_log(LOG_SLOT, &mut [0u64; 3]),
                errno: EFAULT,
                variant: |e| matches!(e, Error::BufferTooSmall { need: 32, got: 24 }),
            },
            Case {
                name: "empty buffer",
                op: |vm| vm.get_dirty_log(AS1_SLOT, &mut []),
                errno: EFAULT,
                variant: |e| matches!(e, Error::BufferTooSmall { need: 8, got: 0 }),
            },
            Case {
                name: "missing slot is ENOENT before the buffer is looked at",
                op: |vm| vm.get_dirty_log(MISSING_SLOT, &mut []),
                errno: ENOENT,
                variant: |e| matches!(e, Error::NoSuchSlot { .. }),
            },
            Case {
                name: "bad id is EINVAL before the buffer is looked at",
                op: |vm| vm.get_dirty_log(40000, &mut []),
                errno: EINVAL,
                variant: |e| matches!(e, Error::InvalidSlotId { .. }),
            },
        ],
    );
    run_ok_table(
        || log_fixture(false),
        &[
            Ok_ {
                name: "logging slot, exact buffer",
                op: |vm| vm.get_dirty_log(LOG_SLOT, &mut [0u64; 4]),
            },
            Ok_ {
                name: "logging slot, larger buffer",
                op: |vm| get(vm, LOG_SLOT),
            },
            Ok_ {
                name: "address space 1",
                op: |vm| vm.get_dirty_log(AS1_SLOT, &mut [0u64; 1]),
            },
        ],
    );
}

#[test]
fn get_and_clear_with_the_ring_on_are_enxio_before_anything_else() {
    run_table(
        || log_fixture(true),
        &[
            Case {
                name: "GET, logging slot",
                op: |vm| get(vm, LOG_SLOT),
                errno: ENXIO,
                variant: |e| matches!(e, Error::RingInUse),
            },
            Case {
                name: "GET, bad slot id",
                op: |vm| get(vm, 2 << 16 | 40000),
                errno: ENXIO,
                variant: |e| matches!(e, Error::RingInUse),
            },
            Case {
                name: "GET, empty buffer",
                op: |vm| vm.get_dirty_log(LOG_SLOT, &mut []),
                errno: ENXIO,
                variant: |e| matches!(e, Error::RingInUse),
            },
            Case {
                name: "CLEAR, logging slot",
                op: |vm| clear(vm, LOG_SLOT, 0, 64),
                errno: ENXIO,
                variant: |e| matches!(e, Error::RingInUse),
            },
            Case {
                name: "CLEAR, bad slot id and misaligned first_page",
                op: |vm| clear(vm, 40000, 3, 1),
                errno: ENXIO,
                variant: |e| matches!(e, Error::RingInUse),
            },
            Case {
                name: "CLEAR, missing slot",
                op: |vm| clear(vm, MISSING_SLOT, 0, 0),
                errno: ENXIO,
                variant: |e| matches!(e, Error::RingInUse),
            },
        ],
    );
}

// ---------------------------------------------------------------------------------------
// KVM_CLEAR_DIRTY_LOG
// ---------------------------------------------------------------------------------------

#[test]
fn clear_dirty_log_errors_in_kvm_order() {
    run_table(
        || log_fixture(false),
        &[
            Case {
                name: "bad as_id",
                op: |vm| clear(vm, 2 << 16, 0, 64),
                errno: EINVAL,
                variant: |e| matches!(e, Error::InvalidSlotId { as_id: 2, id: 0 }),
            },
            Case {
                name: "bad id",
                op: |vm| clear(vm, 32764, 0, 64),
                errno: EINVAL,
                variant: |e| {
                    matches!(
                        e,
                        Error::InvalidSlotId {
                            as_id: 0,
                            id: 32764
                        }
                    )
                },
            },
            Case {
                name: "bad id is checked before first_page alignment",
                op: |vm| clear(vm, 32764, 1, 64),
                errno: EINVAL,
                variant: |e| matches!(e, Error::InvalidSlotId { .. }),
            },
            Case {
                name: "misaligned first_page on a missing slot is EINVAL, not ENOENT",
                op: |vm| clear(vm, MISSING_SLOT, 1, 64),
                errno: EINVAL,
                variant: |e| matches!(e, Error::MisalignedFirstPage { first_page: 1 }),
            },
            Case {
                name: "misaligned first_page on a slot without logging",
                op: |vm| clear(vm, PLAIN_SLOT, 63, 1),
                errno: EINVAL,
                variant: |e| matches!(e, Error::MisalignedFirstPage { first_page: 63 }),
            },
            Case {
                name: "misaligned first_page on a logging slot",
                op: |vm| clear(vm, LOG_SLOT, 32, 64),
                errno: EINVAL,
                variant: |e| matches!(e, Error::MisalignedFirstPage { first_page: 32 }),
            },
            Case {
                name: "misaligned first_page, num_pages 0",
                op: |vm| clear(vm, LOG_SLOT, 65, 0),
                errno: EINVAL,
                variant: |e| matches!(e, Error::MisalignedFirstPage { first_page: 65 }),
            },
            Case {
                name: "aligned first_page on a missing slot",
                op: |vm| clear(vm, MISSING_SLOT, 64, 64),
                errno: ENOENT,
                variant: |e| matches!(e, Error::NoSuchSlot { as_id: 0, id: 9 }),
            },
            Case {
                name: "missing slot in address space 1",
                op: |vm| clear(vm, 1 << 16 | 3, 0, 0),
                errno: ENOENT,
                variant: |e| matches!(e, Error::NoSuchSlot { as_id: 1, id: 3 }),
            },
            Case {
                name: "slot without logging",
                op: |vm| clear(vm, PLAIN_SLOT, 0, 16),
                errno: ENOENT,
                variant: |e| matches!(e, Error::LoggingDisabled { as_id: 0, id: 1 }),
            },
            Case {
                name: "missing slot is ENOENT before the range is looked at",
                op: |vm| clear(vm, MISSING_SLOT, 1 << 20, u32::MAX),
                errno: ENOENT,
                variant: |e| matches!(e, Error::NoSuchSlot { .. }),
            },
            Case {
                name: "first_page > npages",
                op: |vm| clear(vm, ALIGNED_SLOT, 192, 0),
                errno: EINVAL,
                variant: |e| {
                    matches!(
                        e,
                        Error::BadRange {
                            first_page: 192,
                            num_pages: 0,
                            npages: 128
                        }
                    )
                },
            },
            Case {
                name: "first_page far past the end (no overflow)",
                op: |vm| clear(vm, LOG_SLOT, !63u64, 64),
                errno: EINVAL,
                variant: |e| matches!(e, Error::BadRange { .. }),
            },
            Case {
                name: "num_pages > npages - first_page (tail of 3, asked 4)",
                op: |vm| clear(vm, LOG_SLOT, 192, 4),
                errno: EINVAL,
                variant: |e| {
                    matches!(
                        e,
                        Error::BadRange {
                            first_page: 192,
                            num_pages: 4,
                            npages: 195
                        }
                    )
                },
            },
            Case {
                name: "num_pages > npages - first_page (whole slot + 64)",
                op: |vm| clear(vm, ALIGNED_SLOT, 0, 192),
                errno: EINVAL,
                variant: |e| matches!(e, Error::BadRange { .. }),
            },
            Case {
                name: "num_pages u32::MAX",
                op: |vm| clear(vm, LOG_SLOT, 0, u32::MAX),
                errno: EINVAL,
                variant: |e| matches!(e, Error::BadRange { .. }),
            },
            Case {
                name: "num_pages 1 not ending at the slot end",
                op: |vm| clear(vm, LOG_SLOT, 0, 1),
                errno: EINVAL,
                variant: |e| matches!(e, Error::BadRange { num_pages: 1, .. }),
            },
            Case {
                name: "num_pages 63 not ending at the slot end",
                op: |vm| clear(vm, LOG_SLOT, 64, 63),
                errno: EINVAL,
                variant: |e| matches!(e, Error::BadRange { num_pages: 63, .. }),
            },
            Case {
                name: "num_pages 65 from 0 on a larger slot (known bug #3)",
                op: |vm| clear(vm, LOG_SLOT, 0, 65),
                errno: EINVAL,
                variant: |e| matches!(e, Error::BadRange { num_pages: 65, .. }),
            },
            Case {
                name: "num_pages 194: one short of the slot end",
                op: |vm| clear(vm, LOG_SLOT, 0, 194),
                errno: EINVAL,
                variant: |e| matches!(e, Error::BadRange { num_pages: 194, .. }),
            },
            Case {
                name: "num_pages 2 of a 3-page tail",
                op: |vm| clear(vm, LOG_SLOT, 192, 2),
                errno: EINVAL,
                variant: |e| matches!(e, Error::BadRange { .. }),
            },
            Case {
                name: "user bitmap one word short (128 pages need 2 words)",
                op: |vm| vm.clear_dirty_log(LOG_SLOT, 0, 128, &[!0]),
                errno: EFAULT,
                variant: |e| matches!(e, Error::BufferTooSmall { need: 16, got: 8 }),
            },
            Case {
                name: "user bitmap one word short (whole 195-page slot needs 4 words)",
                op: |vm| vm.clear_dirty_log(LOG_SLOT, 0, 195, &[!0; 3]),
                errno: EFAULT,
                variant: |e| matches!(e, Error::BufferTooSmall { need: 32, got: 24 }),
            },
            Case {
                name: "empty user bitmap for the 3-page tail",
                op: |vm| vm.clear_dirty_log(LOG_SLOT, 192, 3, &[]),
                errno: EFAULT,
                variant: |e| matches!(e, Error::BufferTooSmall { need: 8, got: 0 }),
            },
            Case {
                name: "a bad range is EINVAL before the user bitmap is copied",
                op: |vm| vm.clear_dirty_log(LOG_SLOT, 0, 65, &[]),
                errno: EINVAL,
                variant: |e| matches!(e, Error::BadRange { .. }),
            },
        ],
    );
    run_ok_table(
        || log_fixture(false),
        &[
            Ok_ {
                name: "num_pages 0 at 0",
                op: |vm| vm.clear_dirty_log(LOG_SLOT, 0, 0, &[]),
            },
            Ok_ {
                name: "num_pages 0 at the last aligned page",
                op: |vm| vm.clear_dirty_log(LOG_SLOT, 192, 0, &[]),
            },
            Ok_ {
                name: "num_pages 0 with first_page == npages",
                op: |vm| vm.clear_dirty_log(ALIGNED_SLOT, 128, 0, &[]),
            },
            Ok_ {
                name: "64 pages",
                op: |vm| clear(vm, LOG_SLOT, 64, 64),
            },
            Ok_ {
                name: "128 pages",
                op: |vm| clear(vm, LOG_SLOT, 0, 128),
            },
            Ok_ {
                name: "the unaligned tail (bug #3)",
                op: |vm| vm.clear_dirty_log(LOG_SLOT, 192, 3, &[0b111]),
            },
            Ok_ {
                name: "the whole unaligned slot",
                op: |vm| vm.clear_dirty_log(LOG_SLOT, 0, 195, &[!0; 4]),
            },
            Ok_ {
                name: "65 pages ending at the slot end (131-page tail from 64)",
                op: |vm| clear(vm, LOG_SLOT, 64, 131),
            },
            Ok_ {
                name: "the whole aligned slot",
                op: |vm| clear(vm, ALIGNED_SLOT, 0, 128),
            },
            Ok_ {
                name: "address space 1",
                op: |vm| clear(vm, AS1_SLOT, 0, 64),
            },
        ],
    );
}

// ---------------------------------------------------------------------------------------
// Failed operations must not lose or clear dirty bits.
// ---------------------------------------------------------------------------------------

#[test]
fn a_failed_get_loses_no_dirty_bit() {
    let m = log_fixture(false);
    let v = m.create_vcpu();
    let pages = [0u64, 63, 64, 130, 194];
    for p in pages {
        v.write_u64(p * PAGE, 7).unwrap();
    }
    let protected = m
        .vm()
        .stats
        .pages_protected
        .load(std::sync::atomic::Ordering::Relaxed);
    for short in [0usize, 1, 2, 3] {
        let mut buf = vec![0xdead_beefu64; short];
        let e = m.vm().get_dirty_log(LOG_SLOT, &mut buf).unwrap_err();
        assert_eq!(e.errno(), EFAULT);
        assert!(
            buf.iter().all(|&w| w == 0xdead_beef),
            "failed GET wrote the buffer"
        );
    }
    for p in pages {
        assert!(m.spte_writable(p), "failed GET protected page {p}");
    }
    assert_eq!(
        m.vm()
            .stats
            .pages_protected
            .load(std::sync::atomic::Ordering::Relaxed),
        protected,
        "failed GET protected pages"
    );
    let mut buf = [0u64; 4];
    m.vm().get_dirty_log(LOG_SLOT, &mut buf).unwrap();
    assert_eq!(buf, [1 | 1 << 63, 1, 1 << 2, 1 << 2]);
}

#[test]
fn a_failed_clear_clears_nothing() {
    let m = machine();
    m.vm()
        .enable_cap(
            KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            0,
            KVM_DIRTY_LOG_MANUAL_CAPS,
        )
        .unwrap();
    m.vm()
        .set_user_memory_region(&region(LOG_SLOT, KVM_MEM_LOG_DIRTY_PAGES, 0, LOG_NPAGES, 0))
        .unwrap();
    let all = [!0u64, !0, !0, 0b111];
    let mut buf = [0u64; 4];
    m.vm().get_dirty_log(LOG_SLOT, &mut buf).unwrap();
    assert_eq!(buf, all, "INITIALLY_SET");
    for (first, num, words) in [(0u64, 195u32, 3usize), (0, 128, 1), (192, 3, 0), (0, 65, 2)] {
        let e = m
            .vm()
            .clear_dirty_log(LOG_SLOT, first, num, &vec![!0; words])
            .unwrap_err();
        assert!(e.errno() == EFAULT || e.errno() == EINVAL, "{e:?}");
        m.vm().get_dirty_log(LOG_SLOT, &mut buf).unwrap();
        assert_eq!(buf, all, "failed CLEAR({first}, {num}) cleared bits");
    }
    assert_eq!(
        m.vm()
            .stats
            .pages_protected
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

// ---------------------------------------------------------------------------------------
// KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
// ---------------------------------------------------------------------------------------

#[test]
fn manual_protect_cap_arguments() {
    let bad: [(u32, u64); 9] = [
        (0, KVM_DIRTY_LOG_INITIALLY_SET),
        (1, 0),
        (1, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE),
        (0x8000_0000, KVM_DIRTY_LOG_MANUAL_CAPS),
        (0, 1 << 2),
        (0, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | 1 << 2),
        (0, KVM_DIRTY_LOG_MANUAL_CAPS | 1 << 2),
        (0, KVM_DIRTY_LOG_INITIALLY_SET | 1 << 63),
        (0, u64::MAX),
    ];
    for (flags, arg0) in bad {
        for start in [0, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE] {
            let m = machine();
            m.vm()
                .enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 0, start)
                .unwrap();
            let e = m
                .vm()
                .enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, flags, arg0)
                .unwrap_err();
            assert_eq!(e.errno(), EINVAL, "flags={flags:#x} arg0={arg0:#x}");
            assert!(matches!(e, Error::InvalidCap(_)), "{e:?}");
            assert_eq!(
                m.vm().manual_protect(),
                start != 0,
                "a rejected enable changed the mode (flags={flags:#x} arg0={arg0:#x})"
            );
        }
    }
    let m = machine();
    for (arg0, manual) in [(1u64, true), (0, false), (3, true), (1, true), (0, false)] {
        m.vm()
            .enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 0, arg0)
            .unwrap_or_else(|e| panic!("arg0={arg0}: {e:?}"));
        assert_eq!(m.vm().manual_protect(), manual, "arg0={arg0}");
    }
    assert_eq!(
        m.vm().check_extension(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2),
        KVM_DIRTY_LOG_MANUAL_CAPS
    );
}

#[test]
fn unknown_cap_is_einval() {
    let m = machine();
    for cap in [0u32, 166, 167, 224, 9999] {
        let e = m.vm().enable_cap(cap, 0, 1).unwrap_err();
        assert_eq!(e.errno(), EINVAL, "cap {cap}");
        assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
    }
}

// ---------------------------------------------------------------------------------------
// KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING{,_ACQ_REL,_WITH_BITMAP}), KVM_RESET_DIRTY_RINGS
// ---------------------------------------------------------------------------------------

#[test]
fn ring_size_errors() {
    let cases: &[(u64, i32, &str)] = &[
        (0, EINVAL, "zero"),
        (4096 + 16, EINVAL, "not a power of two"),
        (3 * 4096, EINVAL, "not a power of two (3 pages)"),
        (
            (1 << 20) - 16,
            EINVAL,
            "not a power of two (just under 1 MiB)",
        ),
        (16, EINVAL, "one entry, below a page"),
        (
            1024,
            EINVAL,
            "64 entries: reserved entries fit, but below a page",
        ),
        (2048, EINVAL, "below a page"),
        (2 << 20, E2BIG, "2 MiB"),
        (
            1 << 31,
            E2BIG,
            "2 GiB, the largest power of two KVM's u32 size can hold",
        ),
    ];
    for cap in [KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL] {
        for &(bytes, errno, why) in cases {
            let m = machine();
            let e = m.vm().enable_cap(cap, 0, bytes).unwrap_err();
            assert_eq!(e.errno(), errno, "{why}: {e:?}");
            if errno == E2BIG {
                assert_eq!(e, Error::RingTooBig { bytes });
            } else {
                assert!(
                    matches!(e, Error::InvalidRingSize { bytes: b, .. } if b == bytes),
                    "{e:?}"
                );
            }
            assert_eq!(
                m.vm().dirty_ring_entries(),
                0,
                "{why}: a rejected size enabled a ring"
            );
        }
        for (bytes, entries) in [(4096u64, 256u32), (8192, 512), (1 << 20, 65536)] {
            let m = machine();
            m.vm().enable_cap(cap, 0, bytes).unwrap();
            assert_eq!(m.vm().dirty_ring_entries(), entries);
            assert!(!m.vm().use_dirty_bitmap());
        }
    }
}

#[test]
fn ring_smaller_than_the_reserved_entries_with_small_pages() {
    // With 512-byte pages the page rule allows 512 bytes, but 32 entries cannot hold the 64
    // reserved ones: the other half of KVM's "< rsvd_entries * 16 || < PAGE_SIZE" check.
    let cfg = VmConfig {
        page_size: 512,
        ..VmConfig::default()
    };
    let m = Machine::new(FlushKind::Ranged, cfg);
    let e = m
        .vm()
        .enable_cap(KVM_CAP_DIRTY_LOG_RING, 0, 512)
        .unwrap_err();
    assert_eq!(e.errno(), EINVAL);
    assert!(
        matches!(e, Error::InvalidRingSize { bytes: 512, .. }),
        "{e:?}"
    );
    m.vm().enable_cap(KVM_CAP_DIRTY_LOG_RING, 0, 2048).unwrap();
    assert_eq!(m.vm().dirty_ring_entries(), 128);
}

/// KVM accepts a ring of exactly `rsvd_entries * 16` bytes when that is at least a page
/// (`size < rsvd * 16` is the error, equality is not). Such a ring has a soft limit of 0: it
/// is soft-full from the start. The core accepts the size and must then be able to create
/// the vCPU's ring.
#[test]
fn ring_of_exactly_the_reserved_entries_can_be_created() {
    let cfg = VmConfig {
        page_size: 1024,
        ..VmConfig::default()
    };
    let m = Machine::new(FlushKind::Ranged, cfg);
    m.vm()
        .enable_cap(KVM_CAP_DIRTY_LOG_RING, 0, 64 * 16)
        .unwrap();
    assert_eq!(m.vm().dirty_ring_entries(), 64);
    let v = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| m.create_vcpu()));
    let v = v.unwrap_or_else(|_| {
        panic!("create_vcpu panicked for a ring size enable_cap accepted (size == rsvd)")
    });
    let ring = v.generic().ring().expect("the vCPU has a ring");
    assert_eq!(ring.size(), 64);
    assert!(ring.soft_full(), "soft limit 0: soft-full from the start");
    // Every logged write exits with "ring full" before it retires, until harvest + reset.
    m.vm()
        .set_user_memory_region(&MemoryRegion {
            slot: 0,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: 0,
            memory_size: 4 * 1024,
            userspace_addr: 0,
        })
        .unwrap();
    assert_eq!(
        v.write_u64(1024, 5),
        Err(dirtylog::softmmu::Exit::DirtyRingFull)
    );
    assert_eq!((ring.used(), m.read_u64(1024)), (1, 0));
}

/// `kvm_vm_ioctl_enable_dirty_log_ring(struct kvm *kvm, u32 size)` is called with
/// `cap->args[0]`, so KVM ignores the upper 32 bits of the argument: a "1 TiB" ring is size 0
/// (EINVAL, not E2BIG) and `1 << 32 | 4096` is a valid 4 KiB ring.
#[test]
fn ring_size_is_truncated_to_32_bits_like_kvm() {
    for arg0 in [1u64 << 32, 1 << 40, 1 << 63, 1 << 32 | 4097] {
        let m = machine();
        let e = m
            .vm()
            .enable_cap(KVM_CAP_DIRTY_LOG_RING, 0, arg0)
            .unwrap_err();
        assert_eq!(
            e.errno(),
            EINVAL,
            "arg0 {arg0:#x}: KVM sees {:#x}, EINVAL; got {e:?}",
            arg0 as u32
        );
    }
    let m = machine();
    m.vm()
        .enable_cap(KVM_CAP_DIRTY_LOG_RING, 0, 1 << 32 | 4096)
        .expect("KVM sees 4096 and enables a 256-entry ring");
    assert_eq!(m.vm().dirty_ring_entries(), 256);
}

#[test]
fn ring_enable_order_errors() {
    // Second enable, in KVM's order: size checks first, then "already set".
    let m = machine();
    m.vm().enable_cap(KVM_CAP_DIRTY_LOG_RING, 0, 4096).unwrap();
    for (cap, bytes, errno) in [
        (KVM_CAP_DIRTY_LOG_RING, 4096u64, EINVAL),
        (KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 8192, EINVAL),
        (KVM_CAP_DIRTY_LOG_RING, 2 << 20, E2BIG),
        (KVM_CAP_DIRTY_LOG_RING, 4097, EINVAL),
    ] {
        let e = m.vm().enable_cap(cap, 0, bytes).unwrap_err();
        assert_eq!(e.errno(), errno, "second enable of {bytes} bytes: {e:?}");
        if bytes == 4096 || bytes == 8192 {
            assert!(matches!(e, Error::RingTooLate(_)), "{e:?}");
        }
    }
    assert_eq!(m.vm().dirty_ring_entries(), 256, "the first size stays");

    // After a vCPU exists.
    let m = machine();
    let _v = m.create_vcpu();
    let e = m
        .vm()
        .enable_cap(KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 0, 4096)
        .unwrap_err();
    assert_eq!(e.errno(), EINVAL);
    assert!(matches!(e, Error::RingTooLate(_)), "{e:?}");
    assert_eq!(m.vm().dirty_ring_entries(), 0);
    assert!(m.vm().vcpus()[0].ring().is_none());
    // A bad size is still reported as a bad size.
    let e = m
        .vm()
        .enable_cap(KVM_CAP_DIRTY_LOG_RING, 0, 2 << 20)
        .unwrap_err();
    assert_eq!(e.errno(), E2BIG);
}

#[test]
fn ring_unsupported_and_with_bitmap() {
    let cfg = VmConfig {
        ring_supported: false,
        ..VmConfig::default()
    };
    let m = Machine::new(FlushKind::Ranged, cfg);
    for cap in [KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL] {
        assert_eq!(m.vm().check_extension(cap), 0);
        let e = m.vm().enable_cap(cap, 0, 4096).unwrap_err();
        assert_eq!(e.errno(), EINVAL);
        assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
    }
    assert_eq!(m.vm().dirty_ring_entries(), 0);

    let m = machine();
    for cap in [KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL] {
        assert_eq!(m.vm().check_extension(cap), 1 << 20);
    }
    assert_eq!(
        m.vm().check_extension(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP),
        0
    );
    // WITH_BITMAP: not offered, before and after a ring is enabled.
    for arg0 in [0u64, 1] {
        let e = m
            .vm()
            .enable_cap(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP, 0, arg0)
            .unwrap_err();
        assert_eq!(e.errno(), EINVAL);
    }
    m.vm().enable_cap(KVM_CAP_DIRTY_LOG_RING, 0, 4096).unwrap();
    let e = m
        .vm()
        .enable_cap(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP, 0, 1)
        .unwrap_err();
    assert_eq!(e.errno(), EINVAL);
    assert!(!m.vm().use_dirty_bitmap());
}

#[test]
fn reset_dirty_rings_without_a_ring() {
    let m = log_fixture(false);
    let _v = m.create_vcpu();
    let e = m.vm().reset_dirty_rings().unwrap_err();
    assert_eq!(e.errno(), EINVAL);
    assert_eq!(e, Error::NoRing);

    let m = log_fixture(true);
    assert_eq!(m.vm().reset_dirty_rings(), Ok(0), "a ring VM with no vCPU");
    let _v = m.create_vcpu();
    assert_eq!(m.vm().reset_dirty_rings(), Ok(0));
}

// ---------------------------------------------------------------------------------------
// KVM_SET_USER_MEMORY_REGION
// ---------------------------------------------------------------------------------------

/// Slot 0: gpa [0, 16 pages), logging. Slot 1: gpa [64, 80 pages), READONLY.
/// Address space 1 slot 0: gpa [128, 144 pages).
fn region_fixture() -> Arc<Machine> {
    let m = machine();
    for r in [
        region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 16, 0x10_0000),
        region(1, KVM_MEM_READONLY, 64 * PAGE, 16, 0x20_0000),
        region(1 << 16, 0, 128 * PAGE, 16, 0x30_0000),
    ] {
        m.vm().set_user_memory_region(&r).unwrap();
    }
    m
}

fn set(vm: &V, r: MemoryRegion) -> Result<(), Error> {
    vm.set_user_memory_region(&r)
}

/// (as_id, id, base_gfn, npages, flags, userspace_addr) of every slot.
fn slots_summary(vm: &V) -> Vec<(u16, u16, u64, u64, u32, u64)> {
    vm.memslots()
        .iter()
        .map(|s| {
            (
                s.as_id,
                s.id,
                s.base_gfn,
                s.npages,
                s.flags,
                s.userspace_addr,
            )
        })
        .collect()
}

fn is_region(e: &Error) -> bool {
    matches!(e, Error::InvalidRegion(_))
}

#[test]
fn set_user_memory_region_errors() {
    let cases = [
        Case {
            name: "unknown flag bit 2",
            op: |vm| set(vm, region(5, 1 << 2, 200 * PAGE, 1, 0)),
            errno: EINVAL,
            variant: is_region,
        },
        Case {
            name: "unknown flag bit 31, with LOG_DIRTY_PAGES",
            op: |vm| {
                set(
                    vm,
                    region(5, 1 << 31 | KVM_MEM_LOG_DIRTY_PAGES, 200 * PAGE, 1, 0),
                )
            },
            errno: EINVAL,
            variant: is_region,
        },
        Case {
            name: "unknown flag on an existing slot",
            op: |vm| {
                set(
                    vm,
                    region(0, KVM_MEM_LOG_DIRTY_PAGES | 1 << 3, 0, 16, 0x10_0000),
                )
            },
            errno: EINVAL,
            variant: is_region,
        },
        Case {
            name: "size not page aligned (4095)",
            op: |vm| {
                set(
                    vm,
                    MemoryRegion {
                        memory_size: 4095,
                        ..region(5, 0, 200 * PAGE, 0, 0)
                    },
                )
            },
            errno: EINVAL,
            variant: is_region,
        },
        Case {
            name: "size not page aligned (page + 1)",
            op: |vm| {
                set(
                    vm,
                    MemoryRegion {
                        memory_size: PAGE + 1,
                        ..region(5, 0, 200 * PAGE, 0, 0)
                    },
                )
            },
            errno: EINVAL,
            variant: is_region,
        },
        Case {
            name: "gpa not page aligned",
            op: |vm| set(vm, region(5, 0, 200 * PAGE + 0x800, 1, 0)),
            errno: EINVAL,
            variant: is_region,
        },
        Case {
            name: "userspace_addr not page aligned",
            op: |vm| set(vm, region(5, 0, 200 * PAGE, 1, 0x123)),
            errno: EINVAL,
            variant: is_region,
        },
        Case {
            name: "gpa + size overflows",
            op: |vm| set(vm, region(5, 0, !(PAGE - 1), 2, 0)),
            errno: EINVAL,
            variant: is_region,
        },
        Case {
            name: "more than KVM_MEM_MAX_NR_PAGES pages",
            op: |vm| set(vm, region(5, 0, 1 << 40, 1 << 31, 0)),
            errno: EINVAL,
            variant: is_region,
        },
        Case {
            name: "as_id == nr_as",
            op: |vm| set(vm, region(2 << 16, 0, 200 * PAGE, 1, 0)),
            errno: EINVAL,
            variant: is_region,
        },
        Case {
            name: "id == KVM_USER_MEM_SLOTS",
            op: |vm| set(vm, region(32764, 0, 200 * PAGE, 1, 0)),
            errno: EINVAL,
            variant: is_region,
        },
        Case {
            name: "delete of a missing slot",
            op: |vm| set(vm, region(9, 0, 0, 0, 0)),
            errno: EINVAL,
            variant: is_region,
        },
        Case {
            name: "delete of a slot that exists only in the other address space",
            op: |vm| set(vm, region(1 << 16 | 1, 0, 0, 0, 0)),
            errno: EINVAL,
            variant: is_region,
        },
        Case {
            name: "delete with a misaligned gpa (checked before the delete)",
            op: |vm| set(vm, region(0, 0, 0x800, 0, 0)),
            errno: EINVAL,
            variant: is_region,
        },
        Case {
            name: "change the size of a slot",
            op: |vm| set(vm, region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 17, 0x10_0000)),
            errno: EINVAL,
            variant: is_region,
        },
        Case {
            name: "shrink a slot",
            op: |vm| set(vm, region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 8, 0x10_0000)),
            errno: EINVAL,
            variant: is_region,
        },
        Case {
            name: "change userspace_addr",
            op: |vm| set(vm, region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 16, 0x50_0000)),
            errno: EINVAL,
            variant: is_region,
        },
        Case {
            name: "change userspace_addr while moving",
            op: |vm| {
                set(
                    vm,
                    region(0, KVM_MEM_LOG_DIRTY_PAGES, 300 * PAGE, 16, 0x50_0000),
                )
            },
            errno: EINVAL,
            variant: is_region,
        },
        Case {
            name: "set READONLY on an existing slot",
            op: |vm| {
                set(
                    vm,
                    region(
                        0,
                        KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY,
                        0,
                        16,
                        0x10_0000,
                    ),
                )
            },
            errno: EINVAL,
            variant: is_region,
        },
        Case {
            name: "clear READONLY on an existing slot",
            op: |vm| set(vm, region(1, 0, 64 * PAGE, 16, 0x20_0000)),
            errno: EINVAL,
            variant: is_region,
        },
        Case {
            name: "create overlapping the start of slot 0",
            op: |vm| set(vm, region(7, 0, 8 * PAGE, 16, 0x60_0000)),
            errno: EEXIST,
            variant: |e| matches!(e, Error::RegionOverlap { id: 0 }),
        },
        Case {
            name: "create with exactly slot 0's range",
            op: |vm| set(vm, region(7, 0, 0, 16, 0x60_0000)),
            errno: EEXIST,
            variant: |e| matches!(e, Error::RegionOverlap { id: 0 }),
        },
        Case {
            name: "create containing slot 1",
            op: |vm| set(vm, region(7, 0, 32 * PAGE, 64, 0x60_0000)),
            errno: EEXIST,
            variant: |e| matches!(e, Error::RegionOverlap { id: 1 }),
        },
        Case {
            name: "create inside slot 1",
            op: |vm| set(vm, region(7, 0, 70 * PAGE, 1, 0x60_0000)),
            errno: EEXIST,
            variant: |e| matches!(e, Error::RegionOverlap { id: 1 }),
        },
        Case {
            name: "create overlapping the last page of slot 1",
            op: |vm| set(vm, region(7, 0, 79 * PAGE, 8, 0x60_0000)),
            errno: EEXIST,
            variant: |e| matches!(e, Error::RegionOverlap { id: 1 }),
        },
        Case {
            name: "create in address space 1 overlapping its slot 0",
            op: |vm| set(vm, region(1 << 16 | 4, 0, 140 * PAGE, 8, 0x60_0000)),
            errno: EEXIST,
            variant: |e| matches!(e, Error::RegionOverlap { id: 0 }),
        },
        Case {
            name: "move slot 0 onto slot 1",
            op: |vm| {
                set(
                    vm,
                    region(0, KVM_MEM_LOG_DIRTY_PAGES, 60 * PAGE, 16, 0x10_0000),
                )
            },
            errno: EEXIST,
            variant: |e| matches!(e, Error::RegionOverlap { id: 1 }),
        },
        Case {
            name: "move slot 1 onto slot 0",
            op: |vm| set(vm, region(1, KVM_MEM_READONLY, 15 * PAGE, 16, 0x20_0000)),
            errno: EEXIST,
            variant: |e| matches!(e, Error::RegionOverlap { id: 0 }),
        },
    ];
    // Every failure leaves the memslots exactly as they were.
    let before = slots_summary(region_fixture().vm());
    for c in &cases {
        let m = region_fixture();
        let _ = (c.op)(m.vm());
        assert_eq!(
            slots_summary(m.vm()),
            before,
            "{}: a failed call changed the memslots",
            c.name
        );
    }
    run_table(region_fixture, &cases);
}

#[test]
fn set_user_memory_region_successes() {
    run_ok_table(
        region_fixture,
        &[
            Ok_ {
                name: "create adjacent to both slots",
                op: |vm| set(vm, region(7, 0, 16 * PAGE, 48, 0x60_0000)),
            },
            Ok_ {
                name: "create in address space 1 over address space 0's slot 0",
                op: |vm| set(vm, region(1 << 16 | 7, 0, 0, 16, 0x60_0000)),
            },
            Ok_ {
                name: "move slot 0 onto part of its own old range",
                op: |vm| {
                    set(
                        vm,
                        region(0, KVM_MEM_LOG_DIRTY_PAGES, 8 * PAGE, 16, 0x10_0000),
                    )
                },
            },
            Ok_ {
                name: "no change",
                op: |vm| set(vm, region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 16, 0x10_0000)),
            },
            Ok_ {
                name: "flags only: logging off",
                op: |vm| set(vm, region(0, 0, 0, 16, 0x10_0000)),
            },
            Ok_ {
                name: "flags only: logging on a read-only slot",
                op: |vm| {
                    set(
                        vm,
                        region(
                            1,
                            KVM_MEM_READONLY | KVM_MEM_LOG_DIRTY_PAGES,
                            64 * PAGE,
                            16,
                            0x20_0000,
                        ),
                    )
                },
            },
            Ok_ {
                name: "delete (userspace_addr and gpa of the call are not compared)",
                op: |vm| set(vm, region(0, 0, 999 * PAGE, 0, 0x99_9000)),
            },
            Ok_ {
                name: "delete in address space 1",
                op: |vm| set(vm, region(1 << 16, 0, 0, 0, 0)),
            },
            Ok_ {
                name: "KVM_MEM_MAX_NR_PAGES pages exactly",
                op: |vm| set(vm, region(7, 0, 1 << 40, (1 << 31) - 1, 0)),
            },
        ],
    );
    // Deleting frees the id and the range.
    let m = region_fixture();
    set(m.vm(), region(0, 0, 0, 0, 0)).unwrap();
    assert!(m.vm().memslots().get(0, 0).is_none());
    let e = get(m.vm(), 0).unwrap_err();
    assert_eq!(e.errno(), ENOENT);
    set(m.vm(), region(7, 0, 0, 16, 0x60_0000)).unwrap();
    set(m.vm(), region(0, 0, 16 * PAGE, 8, 0x70_0000)).unwrap();
}

/// KVM rejects a region whose host range is not user memory (`access_ok(userspace_addr,
/// memory_size)` fails) with EINVAL: a range that wraps, or one past x86-64's 47-bit user
/// address space.
#[test]
fn userspace_range_outside_user_memory_is_einval() {
    for (uaddr, npages) in [(!(PAGE - 1), 2u64), (1 << 47, 1), ((1 << 47) - PAGE, 2)] {
        let m = region_fixture();
        let before = slots_summary(m.vm());
        let r = region(5, 0, 200 * PAGE, npages, uaddr);
        let res = m.vm().set_user_memory_region(&r);
        assert_eq!(
            res.as_ref().map_err(|e| e.errno()),
            Err(EINVAL),
            "userspace_addr {uaddr:#x} + {:#x}: KVM says EINVAL, got {res:?}",
            r.memory_size
        );
        assert_eq!(slots_summary(m.vm()), before);
    }
}
