//! Saving and restoring vCPU state on /dev/kvm: a paused guest's state, taken on the vCPU's own
//! thread, survives a round trip through the blob into the same vCPU and into a fresh one, and
//! a restored guest runs on.

mod common;

use std::time::Duration;

use dirtylog::TrackerKind;
use dirtylog_testvm::guest::control;
use dirtylog_testvm::vcpu_state::{FpuState, StateSpec, VcpuSnapshot};
use dirtylog_testvm::x86::{self, layout};
use dirtylog_testvm::{KvmVm, Machine, MachineConfig, MemoryOptions, Program};

const T: Duration = Duration::from_secs(20);

fn machine(vcpus: u32) -> Machine {
    Machine::new(MachineConfig {
        vcpus,
        program: Program::DeviceDirtier,
        slot_pages: vec![512],
        log_dirty_pages: false,
        tracker: TrackerKind::DirtyLog,
        initially_set: true,
        memory: MemoryOptions::default(),
        seed: 3,
    })
    .unwrap()
}

#[test]
fn parked_state_round_trips_through_the_blob() {
    let _kvm = common::require_kvm();
    let m = machine(2);
    let spec = StateSpec::probe(m.vm().kvm()).unwrap();
    eprintln!("{spec:?}");
    m.set_rate(Some(20_000.0));
    m.resume(false, T).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    m.stop(T).unwrap();
    assert!(m.total_writes() > 0);
    for i in 0..2u32 {
        let sp = spec.clone();
        let s = m
            .runner()
            .with_paused_vcpu(i as usize, move |fd| VcpuSnapshot::save(fd, i, &sp))
            .unwrap()
            .unwrap();
        // Paused inside the program, in long mode.
        assert!(s.regs.rip >= layout::CODE && s.regs.rip < layout::CODE + layout::CODE_SIZE);
        assert_eq!(s.sregs.efer & 0x500, 0x500, "LME|LMA");
        assert_eq!(s.sregs.cr3, layout::PAGE_TABLES);
        assert_eq!(s.regs.r8, layout::CONTROL + control::vcpu(i));
        assert!(matches!(s.fpu, FpuState::Xsave(_)) == spec.xsave);
        let blob = s.encode();
        let d = VcpuSnapshot::decode(&blob).unwrap();
        assert_eq!(d, s);
        // Into the same (paused) vCPU, and back: unchanged.
        let sp = spec.clone();
        let again = m
            .runner()
            .with_paused_vcpu(i as usize, move |fd| {
                d.restore(fd)?;
                VcpuSnapshot::save(fd, i, &sp)
            })
            .unwrap()
            .unwrap();
        assert_eq!(again.regs, s.regs);
        assert_eq!(again.sregs, s.sregs);
        assert_eq!(again.msrs.len(), s.msrs.len());
        eprintln!(
            "vCPU {i}: blob {} bytes, rip {:#x}, {} MSRs",
            blob.len(),
            s.regs.rip,
            s.msrs.len()
        );
    }
    // It still runs.
    let before = m.total_writes();
    m.resume(false, T).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    m.stop(T).unwrap();
    assert!(m.total_writes() > before);
    m.shutdown().unwrap();
}

#[test]
fn state_loads_into_a_fresh_vcpu() {
    let _kvm = common::require_kvm();
    let m = machine(1);
    let spec = StateSpec::probe(m.vm().kvm()).unwrap();
    m.set_rate(Some(5_000.0));
    m.resume(false, T).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    m.stop(T).unwrap();
    let sp = spec.clone();
    let s = m
        .runner()
        .with_paused_vcpu(0, move |fd| VcpuSnapshot::save(fd, 0, &sp))
        .unwrap()
        .unwrap();

    // A state carrying an MSR this VM does not migrate is refused before it is loaded.
    s.check_msrs(&spec).unwrap();
    let mut forged = s.clone();
    forged.msrs.push((0x3b, 1 << 40)); // IA32_TSC_ADJUST, not in the harness's list
    assert!(!spec.msrs.contains(&0x3b));
    let e = forged.check_msrs(&spec).unwrap_err();
    assert!(e.to_string().contains("MSR 0x3b"), "{e}");

    let mut vm = KvmVm::new().unwrap();
    let v = vm.create_vcpu().unwrap();
    x86::setup_long_mode(vm.kvm(), v.fd()).unwrap();
    s.restore(v.fd()).unwrap();
    let t = VcpuSnapshot::save(v.fd(), 0, &spec).unwrap();
    assert_eq!(t.regs, s.regs);
    assert_eq!(t.sregs, s.sregs);
    assert_eq!(t.fpu, s.fpu);
    assert_eq!(t.xcrs, s.xcrs);
    assert_eq!(t.events, s.events);
    assert_eq!(t.mp_state, s.mp_state);
    assert_eq!(t.debugregs.dr7, s.debugregs.dr7);
    for (a, b) in t.msrs.iter().zip(&s.msrs) {
        // The TSC moves on.
        if a.0 != 0x10 {
            assert_eq!(a, b, "MSR {:#x}", a.0);
        }
    }
    m.shutdown().unwrap();
}

#[test]
fn with_paused_vcpu_needs_a_pause() {
    let _kvm = common::require_kvm();
    let m = machine(1);
    m.set_rate(Some(5_000.0));
    m.resume(false, T).unwrap();
    let e = m
        .runner()
        .with_paused_vcpu(0, |fd| fd.get_regs())
        .unwrap_err();
    assert!(e.to_string().contains("pause the runner first"), "{e}");
    m.stop(T).unwrap();
    assert!(m
        .runner()
        .with_paused_vcpu(0, |fd| fd.get_regs())
        .unwrap()
        .is_ok());
    assert!(m.runner().with_paused_vcpu(1, |fd| fd.get_regs()).is_err());
    // A panicking closure is an error, and the vCPU thread lives on.
    let e = m
        .runner()
        .with_paused_vcpu(0, |_| -> u32 { panic!("boom") })
        .unwrap_err();
    assert!(e.to_string().contains("panicked"), "{e}");
    let before = m.total_writes();
    m.resume(false, T).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    m.stop(T).unwrap();
    assert!(m.total_writes() > before);
    m.shutdown().unwrap();
}

#[test]
fn every_restorable_msr_loads_into_a_fresh_vcpu() {
    let _kvm = common::require_kvm();
    let m = machine(1);
    m.set_rate(Some(5_000.0));
    m.resume(false, T).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    m.stop(T).unwrap();
    // The full probe, on the parked vCPU (it writes back the values it reads).
    let spec = m
        .runner()
        .with_paused_vcpu(0, |fd| {
            StateSpec::probe_vcpu(&kvm_ioctls::Kvm::new().expect("/dev/kvm"), fd)
        })
        .unwrap()
        .unwrap();
    assert!(!spec.lapic, "the test VMM has no in-kernel irqchip");
    assert!(spec.msrs.len() > StateSpec::probe(m.vm().kvm()).unwrap().msrs.len());
    let sp = spec.clone();
    let s = m
        .runner()
        .with_paused_vcpu(0, move |fd| VcpuSnapshot::save(fd, 0, &sp))
        .unwrap()
        .unwrap();
    assert!(s.lapic.is_none());
    let s = VcpuSnapshot::decode(&s.encode()).unwrap();

    let mut vm = KvmVm::new().unwrap();
    let v = vm.create_vcpu().unwrap();
    x86::setup_long_mode(vm.kvm(), v.fd()).unwrap();
    s.restore(v.fd()).unwrap();
    let t = VcpuSnapshot::save(v.fd(), 0, &spec).unwrap();
    assert_eq!(t.without_time().encode(), s.without_time().encode());
    let tsc = dirtylog_testvm::vcpu_state::MSR_IA32_TSC;
    assert!(t.msr(tsc) >= s.msr(tsc));
    eprintln!("{} MSRs, blob {} bytes", s.msrs.len(), s.encode().len());
    // The guest still runs where it was.
    m.resume(false, T).unwrap();
    m.stop(T).unwrap();
    m.shutdown().unwrap();
}
