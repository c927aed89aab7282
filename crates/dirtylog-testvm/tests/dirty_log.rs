//! The dirty-log interfaces on /dev/kvm with real guest writes: GET into a persistent buffer,
//! manual protect + CLEAR, logging toggled at run time, several memslots, and dirty rings
//! harvested with the core's two-phase harvester.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use dirtylog::TrackerKind;
use dirtylog_testvm::{Error, Machine, MachineConfig, MemoryOptions, Program, VcpuRunState};

const T: Duration = Duration::from_secs(30);

fn memstress(vcpus: u32, slot_pages: Vec<u64>, tracker: TrackerKind) -> Machine {
    memstress_with(vcpus, slot_pages, tracker, true)
}

fn memstress_with(
    vcpus: u32,
    slot_pages: Vec<u64>,
    tracker: TrackerKind,
    initially_set: bool,
) -> Machine {
    common::check_kvm();
    Machine::new(MachineConfig {
        vcpus,
        program: Program::Memstress,
        slot_pages,
        log_dirty_pages: true,
        tracker,
        initially_set,
        memory: MemoryOptions {
            no_huge_pages: true,
            populate: false,
        },
        seed: 3,
    })
    .unwrap()
}

fn ones(words: &[u64]) -> u64 {
    words.iter().map(|w| w.count_ones() as u64).sum()
}

/// Every bit of a `pages`-page bitmap set, and none past the end.
fn full(pages: u64) -> Vec<u64> {
    let mut v = vec![!0u64; pages.div_ceil(64) as usize];
    if pages & 63 != 0 {
        *v.last_mut().unwrap() = (1 << (pages % 64)) - 1;
    }
    v
}

#[test]
fn get_dirty_log_reports_each_pass_once() {
    let _kvm = common::require_kvm();
    let mut m = memstress(2, vec![64 * 8 + 3, 100], TrackerKind::DirtyLog);
    let mut buf = [vec![0u64; 9], vec![0u64; 2]];
    for (i, b) in buf.iter_mut().enumerate() {
        m.vm().get_dirty_log(1 + i as u32, b).unwrap();
        assert_eq!(ones(b), 0, "nothing written yet");
    }
    m.memstress_pass(0, T).unwrap();
    for (i, b) in buf.iter_mut().enumerate() {
        m.vm().get_dirty_log(1 + i as u32, b).unwrap();
    }
    assert_eq!(
        buf[0],
        full(64 * 8 + 3),
        "the populating pass dirtied every page of slot 1"
    );
    assert_eq!(buf[1], full(100));
    for (i, b) in buf.iter_mut().enumerate() {
        m.vm().get_dirty_log(1 + i as u32, b).unwrap();
        assert_eq!(ones(b), 0, "GET cleared the log");
    }
    for it in 1..=3 {
        m.memstress_pass(it, T).unwrap();
        for (i, b) in buf.iter_mut().enumerate() {
            m.vm().get_dirty_log(1 + i as u32, b).unwrap();
        }
        assert_eq!(buf[0], full(64 * 8 + 3), "pass {it}");
        assert_eq!(buf[1], full(100), "pass {it}");
        assert_eq!(m.read_page_u64(0), it);
        assert_eq!(m.read_page_u64(64 * 8 + 3 + 99), it);
    }
    // A too-small buffer is refused before the kernel writes.
    let e = m.vm().get_dirty_log(1, &mut [0u64; 8]).unwrap_err();
    assert!(
        matches!(e, Error::BufferTooSmall { need: 9, got: 8 }),
        "{e}"
    );
    m.shutdown().unwrap();
}

#[test]
fn logging_toggles_at_run_time() {
    let _kvm = common::require_kvm();
    let mut m = memstress(1, vec![256], TrackerKind::DirtyLog);
    let mut buf = vec![0u64; 4];
    m.vm_mut().set_logging(1, false).unwrap();
    let e = m.vm().get_dirty_log(1, &mut buf).unwrap_err();
    assert_eq!(e.errno(), Some(libc::ENOENT), "{e}");
    assert!(
        e.to_string().contains("KVM_MEM_LOG_DIRTY_PAGES"),
        "the message says what to do: {e}"
    );
    m.memstress_pass(1, T).unwrap();
    m.vm_mut().set_logging(1, true).unwrap();
    m.vm().get_dirty_log(1, &mut buf).unwrap();
    assert_eq!(
        ones(&buf),
        0,
        "writes made while logging was off are not reported"
    );
    m.memstress_pass(2, T).unwrap();
    m.vm().get_dirty_log(1, &mut buf).unwrap();
    assert_eq!(buf, full(256));
    m.shutdown().unwrap();
}

#[test]
fn manual_protect_get_is_a_snapshot_and_clear_rearms() {
    let _kvm = common::require_kvm();
    let mut m = memstress_with(1, vec![64 * 3 + 3], TrackerKind::ClearLog, false);
    let n = 64 * 3 + 3;
    let mut buf = vec![0u64; 4];
    m.memstress_pass(0, T).unwrap();
    m.vm().get_dirty_log(1, &mut buf).unwrap();
    assert_eq!(buf, full(n), "populating pass");
    m.vm().get_dirty_log(1, &mut buf).unwrap();
    assert_eq!(buf, full(n), "with manual protect GET does not clear");
    // Clear the unaligned tail and the second 64-page chunk only.
    m.vm().clear_dirty_log(1, 192, 3, &[0b111]).unwrap();
    m.vm().clear_dirty_log(1, 64, 64, &[!0]).unwrap();
    m.vm().get_dirty_log(1, &mut buf).unwrap();
    assert_eq!(buf, vec![!0, 0, !0, 0]);
    m.vm().clear_dirty_log(1, 0, n as u32, &full(n)).unwrap();
    m.vm().get_dirty_log(1, &mut buf).unwrap();
    assert_eq!(ones(&buf), 0);
    m.memstress_pass(1, T).unwrap();
    m.vm().get_dirty_log(1, &mut buf).unwrap();
    assert_eq!(buf, full(n), "CLEAR re-armed tracking of every page");
    let e = m.vm().clear_dirty_log(1, 0, 65, &[!0, !0]).unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");
    m.shutdown().unwrap();
}

#[test]
fn initially_set_reports_never_written_pages() {
    let _kvm = common::require_kvm();
    // A stamping guest that never runs: nothing is written, yet every page is reported.
    let m = Machine::new(MachineConfig {
        tracker: TrackerKind::ClearLog,
        initially_set: true,
        slot_pages: vec![131],
        ..Default::default()
    })
    .unwrap();
    let mut buf = vec![0u64; 3];
    m.vm().get_dirty_log(1, &mut buf).unwrap();
    assert_eq!(buf, full(131));
    m.vm().clear_dirty_log(1, 0, 131, &buf).unwrap();
    m.vm().get_dirty_log(1, &mut buf).unwrap();
    assert_eq!(ones(&buf), 0);
    m.shutdown().unwrap();
}

#[test]
fn ring_harvest_returns_every_page_once_per_pass() {
    let _kvm = common::require_kvm();
    let slots = vec![1000 + 3, 517];
    let total: u64 = slots.iter().sum();
    let mut m = memstress(2, slots.clone(), TrackerKind::Ring { entries: 4096 });
    let r = m.ring().unwrap();
    assert_eq!(r.entries, 4096);
    for it in 0..3 {
        m.memstress_pass(it, T).unwrap();
        let mut seen = BTreeSet::new();
        let mut dups = 0;
        let st = m
            .harvest_rings(|_, e| {
                if !seen.insert((e.slot, e.offset)) {
                    dups += 1;
                }
            })
            .unwrap();
        assert_eq!(
            dups, 0,
            "pass {it}: a page was pushed twice without a reset in between"
        );
        assert_eq!(seen.len() as u64, total, "pass {it}");
        for (i, &p) in slots.iter().enumerate() {
            assert_eq!(
                seen.iter().filter(|(s, _)| *s == 1 + i as u32).count() as u64,
                p
            );
        }
        assert_eq!(st.collected, total);
        assert_eq!(
            st.reset, total,
            "KVM_RESET_DIRTY_RINGS reset what was harvested"
        );
        assert_eq!(st.per_vcpu.iter().map(|&n| n as u64).sum::<u64>(), total);
        assert!(
            st.per_vcpu.iter().all(|&n| n > 0),
            "each vCPU dirtied its own partition: {:?}",
            st.per_vcpu
        );
        let again = m.harvest_rings(|_, _| {}).unwrap();
        assert_eq!((again.collected, again.reset), (0, 0));
    }
    // GET on a ring VM: ENXIO, with a message pointing at the ring.
    let e = m.vm().get_dirty_log(1, &mut [0u64; 16]).unwrap_err();
    assert_eq!(e.errno(), Some(libc::ENXIO));
    assert!(e.to_string().contains("KVM_RESET_DIRTY_RINGS"), "{e}");
    m.shutdown().unwrap();
}

#[test]
fn small_ring_fills_and_the_vcpu_waits_for_the_harvest() {
    let _kvm = common::require_kvm();
    // A paced dirtier sweeps 4099 pages through a 256-entry ring (soft limit 192): the vCPU
    // exits with KVM_EXIT_DIRTY_RING_FULL many times and continues only after each harvest +
    // reset. The pacing exits every ~20 writes, so even a host that takes the ring-full exit
    // late (PVM: only at the next exit to userspace) stays within the 64 reserved entries.
    let pages = 64 * 64 + 3;
    let mut m = Machine::new(MachineConfig {
        program: Program::Dirtier,
        slot_pages: vec![pages],
        tracker: TrackerKind::Ring { entries: 256 },
        ..Default::default()
    })
    .unwrap();
    m.set_working_set(0, 0, pages, false).unwrap();
    m.set_rate(Some(20_000.0));
    m.resume(true, T).unwrap();
    let mut seen = BTreeSet::new();
    let mut max_batch = 0u64;
    let deadline = std::time::Instant::now() + T;
    while m.writes(0) < pages {
        assert!(
            std::time::Instant::now() < deadline,
            "the dirtier made only {} writes",
            m.writes(0)
        );
        m.runner().check().unwrap();
        // Harvest only when the vCPU is blocked on the full ring.
        if m.runner().states().contains(&VcpuRunState::RingFull) {
            let st = m
                .harvest_rings(|_, e| {
                    seen.insert(e.offset);
                })
                .unwrap();
            max_batch = max_batch.max(st.collected);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    m.stop(T).unwrap();
    let st = m
        .harvest_rings(|_, e| {
            seen.insert(e.offset);
        })
        .unwrap();
    max_batch = max_batch.max(st.collected);
    let exits = m.runner().total_ring_full_exits();
    eprintln!(
        "{exits} ring-full exits, largest harvest {max_batch} of 256 entries, {} writes",
        m.writes(0)
    );
    assert!(
        exits > 0,
        "a 256-entry ring must fill during a {pages}-page sweep"
    );
    assert!(
        seen.len() as u64 >= pages.min(m.writes(0)),
        "every page written was harvested"
    );
    assert!(
        max_batch >= 192,
        "a ring-full exit happens at the soft limit (192 entries) or later"
    );
    m.shutdown().unwrap();
}

#[test]
fn ring_and_initially_set_are_refused_together() {
    let _kvm = common::require_kvm();
    let mut vm = dirtylog_testvm::KvmVm::new().unwrap();
    vm.enable_manual_protect(true).unwrap();
    let e = vm.enable_dirty_ring(4096).unwrap_err();
    assert!(matches!(e, Error::RingWithInitiallySet), "{e}");
    let mut vm = dirtylog_testvm::KvmVm::new().unwrap();
    vm.enable_dirty_ring(4096).unwrap();
    let e = vm.enable_manual_protect(true).unwrap_err();
    assert!(matches!(e, Error::RingWithInitiallySet), "{e}");
    assert!(e.to_string().contains("INITIALLY_SET"));
    // Manual protect without INITIALLY_SET is allowed (it is meaningless with a ring, not harmful).
    vm.enable_manual_protect(false).unwrap();
}

#[test]
fn ring_must_be_mapped_shared_and_not_executable() {
    let _kvm = common::require_kvm();
    let mut vm = dirtylog_testvm::KvmVm::new().unwrap();
    vm.enable_dirty_ring(4096).unwrap();
    let v = vm.create_vcpu().unwrap();
    assert_eq!(v.ring().unwrap().len(), 4096);
    let off = (64 * dirtylog_testvm::sys::host_page_size()) as libc::off_t;
    use std::os::unix::io::AsRawFd;
    for (prot, flags, what) in [
        (
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
            "MAP_PRIVATE",
        ),
        (
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_SHARED,
            "PROT_EXEC",
        ),
    ] {
        // SAFETY: a fresh mapping request of the vCPU fd; it is expected to fail, and is
        // unmapped if it does not.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                65536,
                prot,
                flags,
                v.fd().as_raw_fd(),
                off,
            )
        };
        if p != libc::MAP_FAILED {
            // SAFETY: unmapping what was just mapped.
            unsafe { libc::munmap(p, 65536) };
            panic!("the kernel accepted a {what} mapping of the dirty ring");
        }
    }
}
