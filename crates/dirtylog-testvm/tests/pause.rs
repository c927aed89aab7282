//! The VMM pauses vCPUs whatever their guest does: a tight write loop that never exits and a
//! guest halted with interrupts off, neither of which polls anything. Paused and resumed many
//! times in place, then live-migrated (in-process, over loopback) after more pause/resume
//! cycles, arriving byte-identical to the paused source. Needs `/dev/kvm` (fails, never
//! skips, without it).

mod common;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use dirtylog::TrackerKind;
use dirtylog_migrate::{receive, send, MigrationMemory, SendConfig, Vcpus};
use dirtylog_testvm::migrate::{GuestConfig, KvmSource, KvmTarget, TargetOptions};
use dirtylog_testvm::{Machine, MachineConfig, MemoryOptions, Program, VcpuRunState};

const T: Duration = Duration::from_secs(20);
const CYCLES: usize = 6;

fn machine(program: Program) -> Machine {
    Machine::new(MachineConfig {
        vcpus: 2,
        program,
        slot_pages: vec![256],
        log_dirty_pages: true,
        tracker: TrackerKind::DirtyLog,
        initially_set: true,
        memory: MemoryOptions::default(),
        seed: 5,
    })
    .unwrap()
}

/// FNV-1a over every word of the test memory.
fn hash(m: &Machine) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for r in m.regions() {
        for off in (0..r.mem.len() as u64).step_by(8) {
            h = (h ^ r.mem.read_u64(off)).wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

/// Wait until `f()` exceeds `floor`.
fn advances(what: &str, floor: u64, f: impl Fn() -> u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = f();
        if v > floor {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: stuck at {v}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn pause_and_resume(program: Program) {
    let _kvm = common::require_kvm();
    let m = machine(program);
    // Built paused: nothing ran.
    assert!(m.runner().is_paused());
    m.runner()
        .wait_all("the new vCPUs to park", T, |s| s == VcpuRunState::Paused)
        .unwrap();
    assert_eq!(m.total_writes(), 0);
    let h0 = hash(&m);
    m.resume(false, T).unwrap();
    for cycle in 0..CYCLES {
        if program == Program::TightLoop {
            let w = m.total_writes();
            advances("tight loop writes after resume", w, || m.total_writes());
            // Both vCPUs run.
            let per: Vec<u64> = (0..2).map(|i| m.writes(i)).collect();
            std::thread::sleep(Duration::from_millis(10));
            for i in 0..2 {
                advances("each vCPU's writes", per[i as usize], || m.writes(i));
            }
        } else {
            m.runner()
                .wait_all("the vCPUs to halt again", T, |s| s == VcpuRunState::Halted)
                .unwrap();
        }
        m.runner().pause(T).unwrap();
        let states = m.runner().states();
        let expected = match program {
            Program::Halt => [VcpuRunState::Halted, VcpuRunState::Paused].as_slice(),
            _ => [VcpuRunState::Paused].as_slice(),
        };
        assert!(
            states.iter().all(|s| expected.contains(s)),
            "cycle {cycle}: {states:?}"
        );
        let (h1, w1) = (hash(&m), m.total_writes());
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(hash(&m), h1, "cycle {cycle}: memory changed while paused");
        assert_eq!(m.total_writes(), w1, "cycle {cycle}: writes while paused");
        if program == Program::Halt {
            assert_eq!(h1, h0, "the halted guest writes nothing");
            assert_eq!(w1, 0);
        } else {
            assert_ne!(h1, h0, "the tight loop wrote its pages");
        }
        m.runner().resume();
    }
    m.runner().check().unwrap();
    m.shutdown().unwrap();
}

#[test]
fn tight_loop_pauses_and_resumes() {
    pause_and_resume(Program::TightLoop);
}

#[test]
fn halted_guest_pauses_and_resumes() {
    pause_and_resume(Program::Halt);
}

fn guest(program: Program, tracker: TrackerKind) -> GuestConfig {
    GuestConfig {
        mem_bytes: 16 << 20,
        vcpus: 2,
        dirty_rate: None,
        working_set_bytes: 2 << 20,
        mailbox_every: 0,
        tracker,
        program,
        ..GuestConfig::default()
    }
}

/// Every region's bytes.
fn memory_of(mem: &impl MigrationMemory) -> Vec<Vec<u8>> {
    (0..mem.regions().len())
        .map(|i| {
            let r = mem.region_memory(i).unwrap();
            // SAFETY: the region's mapping lives as long as `mem`, which outlives this
            // borrow; its guest is paused (or not started) and no device writes it meanwhile,
            // so nothing writes the bytes while they are copied.
            unsafe { std::slice::from_raw_parts(r.as_ptr(), r.len()) }.to_vec()
        })
        .collect()
}

fn migrate(program: Program, tracker: TrackerKind) {
    let _kvm = common::require_kvm();
    let src = KvmSource::boot(&guest(program, tracker)).expect("boot the source guest");
    // Pause and resume it a few times first.
    for cycle in 0..5 {
        std::thread::sleep(Duration::from_millis(20));
        src.pause().unwrap();
        let w = src.guest_writes();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(src.guest_writes(), w, "cycle {cycle}: writes while paused");
        src.resume().unwrap();
        if program == Program::TightLoop {
            advances("source writes after resume", w, || src.guest_writes());
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let rx = std::thread::spawn(move || {
        receive(&listener, &Default::default(), |h| {
            KvmTarget::new(
                h,
                &TargetOptions {
                    start_paused: true,
                    ..TargetOptions::default()
                },
            )
        })
    });
    let config = SendConfig {
        connections: 2,
        io_timeout: Duration::from_secs(10),
        ack_timeout: Duration::from_secs(20),
        timeout: Some(Duration::from_secs(60)),
        ..SendConfig::default()
    };
    let sent = send(&src, addr, &config, &mut |_| {});
    let received = rx.join().unwrap();
    let report = sent.unwrap_or_else(|e| panic!("send failed: {e}"));
    let (target, _) = received.unwrap_or_else(|e| panic!("receive failed: {e}"));
    eprintln!(
        "{program:?} over {}: {} rounds, downtime {} ms, {} guest writes",
        tracker.name(),
        report.rounds.len(),
        report.stats.downtime,
        src.guest_writes()
    );
    // The source stays paused; the target has not run: byte for byte the same memory.
    let (a, b) = (memory_of(&src), memory_of(&target));
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        if let Some(off) = x.iter().zip(y).position(|(p, q)| p != q) {
            panic!("region {i} differs first at byte {off:#x}");
        }
    }
    let final_writes = src.guest_writes();
    assert_eq!(target.guest_writes(), final_writes);
    target.unpause().unwrap();
    if program == Program::TightLoop {
        advances("target writes", final_writes, || target.guest_writes());
    } else {
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            target
                .vcpu_states()
                .iter()
                .all(|s| *s == VcpuRunState::Halted),
            "{:?}",
            target.vcpu_states()
        );
    }
    target.check().unwrap();
    // Pause the target in the guest too.
    target.pause(T).unwrap();
    target.shutdown().unwrap();
    src.shutdown().unwrap();
}

#[test]
fn tight_loop_migrates_dirty_log() {
    migrate(Program::TightLoop, TrackerKind::DirtyLog);
}

#[test]
fn tight_loop_migrates_dirty_ring() {
    migrate(Program::TightLoop, TrackerKind::Ring { entries: 4096 });
}

#[test]
fn halted_guest_migrates() {
    migrate(Program::Halt, TrackerKind::ClearLog);
}
