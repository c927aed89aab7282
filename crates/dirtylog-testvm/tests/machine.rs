//! The VMM on /dev/kvm: long-mode boot, the three workloads, pacing, and the guest write rate.

mod common;

use std::time::{Duration, Instant};

use dirtylog::TrackerKind;
use dirtylog_testvm::{Machine, MachineConfig, MemoryOptions, Program};

const T: Duration = Duration::from_secs(20);

fn machine(vcpus: u32, program: Program, pages: u64, log: bool, tracker: TrackerKind) -> Machine {
    common::check_kvm();
    Machine::new(MachineConfig {
        vcpus,
        program,
        slot_pages: vec![pages],
        log_dirty_pages: log,
        tracker,
        initially_set: true,
        memory: MemoryOptions {
            no_huge_pages: true,
            populate: true,
        },
        seed: 11,
    })
    .unwrap()
}

#[test]
fn stamp_guest_boots_and_writes() {
    let _kvm = common::require_kvm();
    let m = machine(2, Program::Stamp, 1000, true, TrackerKind::DirtyLog);
    assert_eq!(m.total_writes(), 0, "stopped guests must not write");
    m.set_iteration(7);
    m.resume(true, T).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    m.stop(T).unwrap();
    let w: Vec<u64> = (0..2).map(|i| m.writes(i)).collect();
    assert!(w.iter().all(|&x| x > 0), "both vCPUs wrote: {w:?}");
    let after = m.total_writes();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(m.total_writes(), after, "stopped guests do not write");
    assert!((0..1000).any(|p| m.read_page_u64(p) == 7));
    assert!((0..1000).all(|p| matches!(m.read_page_u64(p), 0 | 7)));
    // Resume with a new value: the guests reload it after their sync.
    m.set_iteration(8);
    m.resume(true, T).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    m.stop(T).unwrap();
    assert!((0..1000).any(|p| m.read_page_u64(p) == 8));
    m.shutdown().unwrap();
}

#[test]
fn memstress_writes_each_partition_once_per_pass() {
    let _kvm = common::require_kvm();
    let mut m = machine(2, Program::Memstress, 301, false, TrackerKind::DirtyLog);
    for it in 1..=3 {
        m.memstress_pass(it, T).unwrap();
        assert!((0..301).all(|p| m.read_page_u64(p) == it), "pass {it}");
        assert_eq!((m.passes(0), m.passes(1)), (it, it));
    }
    assert_eq!(m.total_writes(), 3 * 301);
    m.shutdown().unwrap();
}

#[test]
fn dirtier_follows_working_set_pattern_and_rate() {
    let _kvm = common::require_kvm();
    let m = machine(1, Program::Dirtier, 2048, false, TrackerKind::DirtyLog);
    m.set_working_set(0, 0, 512, false).unwrap();
    let rate = 10_000.0;
    m.set_rate(Some(rate));
    m.resume(false, T).unwrap();
    let t = Instant::now();
    std::thread::sleep(Duration::from_millis(100));
    let mid = m.writes(0);
    std::thread::sleep(Duration::from_millis(200));
    m.stop(T).unwrap();
    let (w, el) = (m.writes(0), t.elapsed().as_secs_f64());
    eprintln!("paced dirtier: {w} writes in {el:.3} s (asked {rate} pages/s)");
    assert!(
        mid > 0 && w > mid,
        "the write counter advances while the guest runs ({mid} then {w})"
    );
    assert!(
        w as f64 <= rate * el * 1.1 + 20.0,
        "{w} writes exceed the rate"
    );
    assert!(
        w as f64 >= rate * el * 0.3,
        "{w} writes: far below the rate"
    );
    // Sequential: write number s (1-based) went to page (s - 1) % 512, stamped (1 << 48) | s.
    for p in 0..512u64 {
        let v = m.read_page_u64(p);
        if v != 0 {
            assert_eq!(v >> 48, 1, "vCPU tag");
            assert_eq!(
                ((v & 0xffff_ffff_ffff) - 1) % 512,
                p,
                "page {p} holds {v:#x}"
            );
        }
    }
    assert!(
        (512..2048).all(|p| m.read_page_u64(p) == 0),
        "nothing outside the working set"
    );

    // A new working set, random, unpaced: takes effect at the next resume.
    m.set_working_set(0, 1024, 100, true).unwrap();
    m.set_rate(None);
    m.resume(false, T).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    m.stop(T).unwrap();
    let w2 = m.writes(0) - w;
    eprintln!("unpaced random dirtier: {w2} writes in 50 ms");
    assert!(w2 > 0);
    assert!(
        (1024..1124).filter(|&p| m.read_page_u64(p) != 0).count() > 50,
        "random writes cover the set"
    );
    assert!((512..1024)
        .chain(1124..2048)
        .all(|p| m.read_page_u64(p) == 0));
    m.shutdown().unwrap();
}

/// One quick measurement of the guest write rate, with and without dirty logging.
#[test]
fn guest_write_rate() {
    let _kvm = common::require_kvm();
    let pages = 4096u64;
    let run = |log: bool, collect: bool| -> f64 {
        let m = machine(1, Program::Stamp, pages, log, TrackerKind::DirtyLog);
        let mut buf = vec![0u64; (pages / 64) as usize];
        // Warm up: map every page (first touches fault with or without logging).
        m.set_iteration(1);
        m.resume(true, T).unwrap();
        std::thread::sleep(Duration::from_millis(150));
        m.stop(T).unwrap();
        if log {
            m.vm().get_dirty_log(1, &mut buf).unwrap();
        }
        m.resume(true, T).unwrap();
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(300) {
            std::thread::sleep(Duration::from_millis(10));
            if collect {
                m.vm().get_dirty_log(1, &mut buf).unwrap();
            }
        }
        m.stop(T).unwrap();
        let r = m.writes(0) as f64 / t.elapsed().as_secs_f64();
        m.shutdown().unwrap();
        r
    };
    let off = run(false, false);
    let on_idle = run(true, false);
    let on = run(true, true);
    let pass = |log: bool| -> f64 {
        let mut m = machine(1, Program::Memstress, pages, log, TrackerKind::DirtyLog);
        let mut buf = vec![0u64; (pages / 64) as usize];
        m.memstress_pass(0, T).unwrap();
        let t = Instant::now();
        for it in 1..=5 {
            if log {
                m.vm().get_dirty_log(1, &mut buf).unwrap();
            }
            m.memstress_pass(it, T).unwrap();
        }
        let r = 5.0 * pages as f64 / t.elapsed().as_secs_f64();
        m.shutdown().unwrap();
        r
    };
    let (seq_off, seq_on) = (pass(false), pass(true));
    eprintln!("guest write rate, 1 vCPU, {pages} pages (4 KiB host pages):");
    eprintln!("  random stamping, logging off:                 {off:>9.0} pages/s");
    eprintln!("  random stamping, logging on, no GET:          {on_idle:>9.0} pages/s");
    eprintln!("  random stamping, logging on, GET every 10 ms: {on:>9.0} pages/s");
    eprintln!("  memstress passes, logging off:                {seq_off:>9.0} pages/s");
    eprintln!("  memstress passes, GET before each pass:       {seq_on:>9.0} pages/s");
    assert!(off > 0.0 && on > 0.0 && seq_off > 0.0 && seq_on > 0.0);
}
