//! Saving and restoring vCPU state on /dev/kvm: a parked guest's state survives a round trip
//! through the blob into the same vCPU and into a fresh one, and a restored guest runs on.

mod common;

use std::time::Duration;

use dirtylog_testvm::guest::{control, ports};
use dirtylog_testvm::vcpu_state::{FpuState, StateSpec, VcpuSnapshot};
use dirtylog_testvm::x86::{self, layout};
use dirtylog_testvm::{KvmVm, Machine, MachineConfig, MemoryOptions, Program, Tracking};

const T: Duration = Duration::from_secs(20);

fn machine(vcpus: u32) -> Machine {
    Machine::new(MachineConfig {
        vcpus,
        program: Program::DeviceDirtier,
        slot_pages: vec![512],
        log_dirty_pages: false,
        tracking: Tracking::Bitmap,
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
        let fd = m.runner().vcpu_fd(i as usize).unwrap();
        let s = VcpuSnapshot::save(fd, i, &spec).unwrap();
        // Parked at the `out SYNC` of the program, in long mode.
        assert!(s.regs.rip >= layout::CODE && s.regs.rip < layout::CODE + layout::CODE_SIZE);
        assert_eq!(s.sregs.efer & 0x500, 0x500, "LME|LMA");
        assert_eq!(s.sregs.cr3, layout::PAGE_TABLES);
        assert_eq!(s.regs.r8, layout::CONTROL + control::vcpu(i));
        assert!(matches!(s.fpu, FpuState::Xsave(_)) == spec.xsave);
        let blob = s.encode();
        let d = VcpuSnapshot::decode(&blob).unwrap();
        assert_eq!(d, s);
        // Into the same (parked) vCPU, and back: unchanged.
        d.restore(fd).unwrap();
        let again = VcpuSnapshot::save(fd, i, &spec).unwrap();
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
    let s = VcpuSnapshot::save(m.runner().vcpu_fd(0).unwrap(), 0, &spec).unwrap();

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
    let _ = ports::SYNC;
    m.shutdown().unwrap();
}
