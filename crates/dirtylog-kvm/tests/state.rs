//! The vCPU and VM state on the real `/dev/kvm`: a PC-like VM (in-kernel irqchip and PIT, a
//! vCPU with the host's CPUID and the TSC-deadline timer) runs a few real-mode instructions and
//! is given non-default state; its state is saved, restored into a fresh VM set up the same
//! way, and saved again: the blobs are the same bytes once the time fields are masked
//! ([`VcpuSnapshot::without_time`], [`VmSnapshot::without_time`]), the time fields did not go
//! backwards, and the guest, resumed on the fresh VM, sees its TSC move forward. Plus the
//! probe's MSR filter and the decoders on damaged blobs. Fails (never skips) without
//! `/dev/kvm`.

use std::sync::OnceLock;

use dirtylog_kvm::vcpu_state::{
    self, msr_name, probe_msrs, StateSpec, VcpuSnapshot, APIC_TMCCT, MSR_IA32_TSC,
    MSR_IA32_TSC_DEADLINE,
};
use dirtylog_kvm::vm_state::{VmSnapshot, VM_STATE_VERSION};
use dirtylog_kvm::Error;
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use proptest::prelude::*;

const PAGE: usize = 4096;
const PAGES: usize = 16;
const CODE_AT: usize = 0x1000;

/// Real mode, at `CODE_AT`:
///
/// ```text
///  0: 0f 31        rdtsc
///  2: 66 89 c6     mov esi, eax
///  5: 66 89 d7     mov edi, edx
///  8: e6 80        out 0x80, al      ; first exit: the state is saved here
///  a: 0f 31        rdtsc
///  c: 66 29 f0     sub eax, esi
///  f: 66 19 fa     sbb edx, edi      ; edx:eax = TSC now - TSC before the save
/// 12: e6 81        out 0x81, al      ; second exit
/// 14: f4           hlt
/// ```
const CODE: [u8; 21] = [
    0x0f, 0x31, 0x66, 0x89, 0xc6, 0x66, 0x89, 0xd7, 0xe6, 0x80, 0x0f, 0x31, 0x66, 0x29, 0xf0, 0x66,
    0x19, 0xfa, 0xe6, 0x81, 0xf4,
];

const SYSENTER_CS: u32 = 0x174;
const PAT: u32 = 0x277;
const LSTAR: u32 = 0xc000_0082;
const APIC_TASKPRI: usize = 0x80;
const APIC_SPIV: usize = 0xf0;
const APIC_LVTT: usize = 0x320;

fn kvm() -> Kvm {
    Kvm::new().unwrap_or_else(|e| {
        panic!("these tests need /dev/kvm ({e}): load kvm_intel or kvm_amd and run as root")
    })
}

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
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
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
        // SAFETY: the mapping made in `new`; `Pc` drops the vCPU and the VM first.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A VM set up as a minimal PC: in-kernel irqchip and PIT, the TSS address, 64 KiB of memory
/// as slot 0 holding [`CODE`], one vCPU with the host's CPUID (plus the TSC-deadline timer, as
/// QEMU adds it with an in-kernel irqchip) in real mode at the code.
struct Pc {
    // Drop order: the vCPU and the VM close before the memory is unmapped.
    vcpu: VcpuFd,
    vm: VmFd,
    _mem: Mem,
}

impl Pc {
    fn new(kvm: &Kvm) -> Self {
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        vm.set_tss_address(0xfffb_d000).expect("KVM_SET_TSS_ADDR");
        vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
        vm.create_pit2(kvm_pit_config::default())
            .expect("KVM_CREATE_PIT2");
        let mem = Mem::new(PAGES * PAGE);
        // SAFETY: the code fits in page 1 of the mapping.
        unsafe { std::ptr::copy_nonoverlapping(CODE.as_ptr(), mem.ptr.add(CODE_AT), CODE.len()) };
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: (PAGES * PAGE) as u64,
            userspace_addr: mem.ptr as u64,
        };
        // SAFETY: the memory lives in `Pc::_mem`, dropped after the VM.
        unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");
        let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .expect("KVM_GET_SUPPORTED_CPUID");
        if kvm.check_extension(Cap::TscDeadlineTimer) {
            for e in cpuid.as_mut_slice() {
                if e.function == 1 {
                    e.ecx |= 1 << 24;
                }
            }
        }
        vcpu.set_cpuid2(&cpuid).expect("KVM_SET_CPUID2");
        let mut s = vcpu.get_sregs().expect("KVM_GET_SREGS");
        (s.cs.base, s.cs.selector) = (0, 0);
        vcpu.set_sregs(&s).expect("KVM_SET_SREGS");
        let mut r = vcpu.get_regs().expect("KVM_GET_REGS");
        r.rip = CODE_AT as u64;
        r.rflags = 2;
        vcpu.set_regs(&r).expect("KVM_SET_REGS");
        Pc {
            vcpu,
            vm,
            _mem: mem,
        }
    }

    /// Run to the next `out`, complete it (`immediate_exit`), and return its port.
    fn run_to_out(&mut self) -> u16 {
        let port = match self.vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(port, _) => port,
            e => panic!("unexpected exit {e:?}"),
        };
        self.vcpu.set_kvm_immediate_exit(1);
        let e = self.vcpu.run().map(|_| ()).unwrap_err();
        assert_eq!(e.errno(), libc::EINTR, "the completing KVM_RUN");
        self.vcpu.set_kvm_immediate_exit(0);
        port
    }

    fn set_msrs(&self, msrs: &[(u32, u64)]) {
        let entries: Vec<_> = msrs
            .iter()
            .map(|&(index, data)| kvm_bindings::kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let buf = kvm_bindings::Msrs::from_entries(&entries).unwrap();
        assert_eq!(self.vcpu.set_msrs(&buf).expect("KVM_SET_MSRS"), msrs.len());
    }

    /// Non-default state in every part of the machine the blobs carry.
    fn scribble(&self, tsc_deadline: bool) {
        let mut r = self.vcpu.get_regs().unwrap();
        (r.rbx, r.rbp, r.r8, r.r15) = (0x1111, 0x2222, 0x8888_8888_8888, u64::MAX);
        self.vcpu.set_regs(&r).unwrap();
        self.set_msrs(&[
            (SYSENTER_CS, 0x10),
            (PAT, 0x0007_0406_0007_0105),
            (LSTAR, 0xffff_ffff_8100_0000),
        ]);
        let mut l = self.vcpu.get_lapic().expect("KVM_GET_LAPIC");
        let put = |l: &mut kvm_bindings::kvm_lapic_state, at: usize, v: u32| {
            for (k, b) in v.to_le_bytes().into_iter().enumerate() {
                l.regs[at + k] = b as std::os::raw::c_char;
            }
        };
        put(&mut l, APIC_TASKPRI, 0x10);
        put(&mut l, APIC_SPIV, 0x1ff);
        // The LVT timer masked, vector 0xec, in TSC-deadline mode.
        put(
            &mut l,
            APIC_LVTT,
            0x1_00ec | if tsc_deadline { 2 << 17 } else { 0 },
        );
        self.vcpu.set_lapic(&l).expect("KVM_SET_LAPIC");
        if tsc_deadline {
            // Hours away, so it never fires during the test.
            let tsc = self.get_msr(MSR_IA32_TSC);
            self.set_msrs(&[(MSR_IA32_TSC_DEADLINE, tsc + (1 << 45))]);
        }
        let mut pit = self.vm.get_pit2().expect("KVM_GET_PIT2");
        // Channels 1 and 2 raise no interrupt in KVM (only channel 0 has a timer), so the
        // irqchip stays still between a restore and the next save.
        (
            pit.channels[1].count,
            pit.channels[1].mode,
            pit.channels[1].rw_mode,
        ) = (18, 2, 3);
        (
            pit.channels[2].count,
            pit.channels[2].mode,
            pit.channels[2].rw_mode,
        ) = (0x1234, 3, 3);
        self.vm.set_pit2(&pit).expect("KVM_SET_PIT2");
        let mut c = kvm_bindings::kvm_irqchip {
            chip_id: kvm_bindings::KVM_IRQCHIP_PIC_MASTER,
            ..Default::default()
        };
        self.vm.get_irqchip(&mut c).unwrap();
        // SAFETY: the union holds plain integers; reading it as the PIC member.
        let mut pic = unsafe { c.chip.pic };
        (pic.imr, pic.irq_base, pic.elcr) = (0xfb, 0x20, 0x08);
        c.chip.pic = pic;
        self.vm.set_irqchip(&c).expect("KVM_SET_IRQCHIP");
        c.chip_id = kvm_bindings::KVM_IRQCHIP_IOAPIC;
        self.vm.get_irqchip(&mut c).unwrap();
        // SAFETY: as above, the IOAPIC member.
        let mut io = unsafe { c.chip.ioapic };
        io.redirtbl[4].bits = 0x1_0034;
        io.id = 2 << 24;
        c.chip.ioapic = io;
        self.vm.set_irqchip(&c).expect("KVM_SET_IRQCHIP");
        let clock = kvm_bindings::kvm_clock_data {
            clock: 5_000_000_000,
            ..Default::default()
        };
        self.vm.set_clock(&clock).expect("KVM_SET_CLOCK");
    }

    fn get_msr(&self, index: u32) -> u64 {
        let mut buf = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(self.vcpu.get_msrs(&mut buf).unwrap(), 1);
        buf.as_slice()[0].data
    }
}

/// The fields two masked snapshots differ in, for a readable failure.
fn vcpu_diff(a: &VcpuSnapshot, b: &VcpuSnapshot) -> Vec<String> {
    let mut d = Vec::new();
    for (&(i, x), &(j, y)) in a.msrs.iter().zip(&b.msrs) {
        if i != j || x != y {
            d.push(format!(
                "MSR {i:#x} ({}) = {x:#x} / MSR {j:#x} = {y:#x}",
                msr_name(i).unwrap_or("?")
            ));
        }
    }
    if a.msrs.len() != b.msrs.len() {
        d.push(format!("{} / {} MSRs", a.msrs.len(), b.msrs.len()));
    }
    if let (Some(x), Some(y)) = (&a.lapic, &b.lapic) {
        for k in (0..x.len()).step_by(16) {
            if x[k..k + 16] != y[k..k + 16] {
                d.push(format!(
                    "LAPIC {k:#x}: {:x?} / {:x?}",
                    &x[k..k + 4],
                    &y[k..k + 4]
                ));
            }
        }
    }
    if a.regs != b.regs {
        d.push(format!("regs {:x?} / {:x?}", a.regs, b.regs));
    }
    if a.sregs != b.sregs {
        d.push(format!("sregs {:x?} / {:x?}", a.sregs, b.sregs));
    }
    if a.events != b.events {
        d.push(format!("events {:?} / {:?}", a.events, b.events));
    }
    if a.fpu != b.fpu {
        d.push("fpu".into());
    }
    if (a.mp_state, a.debugregs, &a.xcrs) != (b.mp_state, b.debugregs, &b.xcrs) {
        d.push("mp_state, debugregs or xcrs".into());
    }
    d
}

#[test]
fn the_probe_keeps_the_msrs_this_vcpu_can_restore() {
    let kvm = kvm();
    let pc = Pc::new(&kvm);
    let p = probe_msrs(&kvm, &pc.vcpu).unwrap();
    let names = |v: &[u32]| {
        v.iter()
            .map(|&i| {
                format!(
                    "{i:#x}{}",
                    msr_name(i).map(|n| format!(" {n}")).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    eprintln!(
        "listed {}, machine-check bank MSRs {}, excluded {} [{}], unreadable {} [{}], refused {} [{}], saved {}",
        p.listed.len(),
        p.mce_banks.len(),
        p.excluded.len(),
        names(&p.excluded),
        p.unreadable.len(),
        names(&p.unreadable),
        p.refused.len(),
        names(&p.refused),
        p.saved.len()
    );
    eprintln!("listed: {}", names(&p.listed));
    assert!(!p.listed.is_empty());
    assert_eq!(
        p.excluded.len() + p.unreadable.len() + p.refused.len() + p.saved.len(),
        {
            let mut all: Vec<u32> = p.listed.iter().chain(&p.mce_banks).copied().collect();
            all.sort();
            all.dedup();
            all.len()
        },
        "every candidate is accounted for once"
    );
    for must in [MSR_IA32_TSC, SYSENTER_CS, PAT, LSTAR] {
        assert!(p.saved.contains(&must), "{must:#x} not saved");
    }
    assert!(!p.saved.contains(&vcpu_state::MSR_IA32_APICBASE));
    // Saved in restore order, TSC early, TSC_DEADLINE (when there) last.
    let mut sorted = p.saved.clone();
    vcpu_state::msr_restore_order(&mut sorted);
    assert_eq!(sorted, p.saved);
    if let Some(k) = p.saved.iter().position(|&i| i == MSR_IA32_TSC_DEADLINE) {
        assert_eq!(k, p.saved.len() - 1);
    }

    let spec = StateSpec::probe_vcpu(&kvm, &pc.vcpu).unwrap();
    assert!(spec.lapic, "the VM has an in-kernel irqchip");
    assert_eq!(spec.msrs, p.saved);
    // The same on another VM set up the same way, and the write-backs changed nothing.
    let other = Pc::new(&kvm);
    assert_eq!(StateSpec::probe_vcpu(&kvm, &other.vcpu).unwrap(), spec);
    // Without an irqchip: no LAPIC.
    let bare = kvm.create_vm().unwrap();
    let v = bare.create_vcpu(0).unwrap();
    v.set_cpuid2(&kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap())
        .unwrap();
    assert!(!StateSpec::probe_vcpu(&kvm, &v).unwrap().lapic);
    assert!(VmSnapshot::save(&bare).unwrap().irqchip.is_none());
}

#[test]
fn state_round_trips_into_a_fresh_vm_and_time_goes_on() {
    let kvm = kvm();
    let deadline = kvm.check_extension(Cap::TscDeadlineTimer);
    let mut src = Pc::new(&kvm);
    let spec = StateSpec::probe_vcpu(&kvm, &src.vcpu).unwrap();
    assert_eq!(src.run_to_out(), 0x80);
    src.scribble(deadline);

    let s1 = VcpuSnapshot::save(&src.vcpu, 0, &spec).unwrap();
    let v1 = VmSnapshot::save(&src.vm).unwrap();
    let (b1, w1) = (s1.encode(), v1.encode());
    eprintln!(
        "{} MSRs saved; vCPU blob {} bytes, VM blob {} bytes",
        s1.msrs.len(),
        b1.len(),
        w1.len()
    );
    // The non-default state is in the blobs.
    assert_eq!(s1.msr(SYSENTER_CS), Some(0x10));
    assert_eq!(s1.msr(PAT), Some(0x0007_0406_0007_0105));
    assert_eq!(
        s1.regs.rip,
        (CODE_AT + 10) as u64,
        "saved after the completed out"
    );
    let page = s1.lapic.as_ref().expect("LAPIC saved");
    assert_eq!(page[APIC_TASKPRI], 0x10);
    assert_eq!(page[APIC_SPIV..APIC_SPIV + 2], [0xff, 0x01]);
    assert_eq!(s1.sregs.cr8, 1, "CR8 mirrors the TPR");
    if deadline {
        assert!(s1.msr(MSR_IA32_TSC_DEADLINE).unwrap_or(0) > s1.msr(MSR_IA32_TSC).unwrap());
    }
    let chip = v1.irqchip.expect("irqchip saved");
    assert_eq!(
        (chip.pic_master.imr, chip.pic_master.irq_base),
        (0xfb, 0x20)
    );
    assert_eq!(chip.ioapic.redirtbl[4], 0x1_0034);
    let pit = v1.pit.expect("PIT saved");
    assert_eq!((pit.channels[2].count, pit.channels[2].mode), (0x1234, 3));
    assert!(v1.clock.clock >= 5_000_000_000);

    // Into a fresh VM set up the same way, through the bytes.
    let mut dst = Pc::new(&kvm);
    assert_eq!(StateSpec::probe_vcpu(&kvm, &dst.vcpu).unwrap(), spec);
    let d = VcpuSnapshot::decode(&b1).unwrap();
    assert_eq!(d, s1);
    d.restore(&dst.vcpu).unwrap();
    let w = VmSnapshot::decode(&w1).unwrap();
    assert_eq!(w, v1);
    w.restore(&dst.vm).unwrap();
    let s2 = VcpuSnapshot::save(&dst.vcpu, 0, &spec).unwrap();
    let v2 = VmSnapshot::save(&dst.vm).unwrap();

    // The same bytes, time fields masked ...
    let diff = vcpu_diff(&s1.without_time(), &s2.without_time());
    assert!(diff.is_empty(), "vCPU state differs: {diff:#?}");
    assert_eq!(s1.without_time().encode(), s2.without_time().encode());
    assert_eq!(
        v1.without_time(),
        v2.without_time(),
        "VM state differs (time masked)"
    );
    assert_eq!(v1.without_time().encode(), v2.without_time().encode());
    // ... which did not go backwards.
    assert!(s2.msr(MSR_IA32_TSC) >= s1.msr(MSR_IA32_TSC));
    assert_eq!(
        page[APIC_TMCCT..APIC_TMCCT + 4],
        [0; 4],
        "no LAPIC timer runs"
    );
    assert_eq!(
        s2.lapic.as_ref().unwrap()[APIC_TMCCT..APIC_TMCCT + 4],
        [0; 4]
    );
    assert!(v2.clock.clock >= v1.clock.clock);
    assert!(v2.clock.realtime >= v1.clock.realtime);
    assert!(v2.clock.host_tsc >= v1.clock.host_tsc);
    let (p1, p2) = (v1.pit.unwrap(), v2.pit.unwrap());
    for (a, b) in p1.channels.iter().zip(&p2.channels) {
        assert!(b.count_load_time >= a.count_load_time);
    }
    // A second restore of the same state into the same vCPU changes nothing either.
    d.restore(&dst.vcpu).unwrap();
    let s3 = VcpuSnapshot::save(&dst.vcpu, 0, &spec).unwrap();
    assert_eq!(s3.without_time().encode(), s1.without_time().encode());

    // The guest resumes on the fresh VM: it reads its TSC again and sees it moved forward.
    assert_eq!(dst.run_to_out(), 0x81);
    let r = dst.vcpu.get_regs().unwrap();
    let delta = ((r.rdx & 0xffff_ffff) << 32 | (r.rax & 0xffff_ffff)) as i64;
    eprintln!("the guest's TSC moved {delta} cycles across the migration");
    assert!(delta > 0, "the guest's TSC went backwards by {}", -delta);
}

/// A real vCPU blob and VM blob, saved once.
fn real_blobs() -> &'static (Vec<u8>, Vec<u8>) {
    static BLOBS: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    BLOBS.get_or_init(|| {
        let kvm = kvm();
        let pc = Pc::new(&kvm);
        pc.scribble(false);
        let spec = StateSpec::probe_vcpu(&kvm, &pc.vcpu).unwrap();
        (
            VcpuSnapshot::save(&pc.vcpu, 0, &spec).unwrap().encode(),
            VmSnapshot::save(&pc.vm).unwrap().encode(),
        )
    })
}

#[test]
fn damaged_blobs_are_refused_with_a_reason() {
    let (vcpu, vm) = real_blobs();
    let ve = |b: &[u8]| match VcpuSnapshot::decode(b) {
        Err(e @ Error::VcpuBlob(_)) => e.to_string(),
        r => panic!("not a VcpuBlob error: {r:?}"),
    };
    let me = |b: &[u8]| match VmSnapshot::decode(b) {
        Err(e @ Error::VmBlob(_)) => e.to_string(),
        r => panic!("not a VmBlob error: {r:?}"),
    };
    assert!(VcpuSnapshot::decode(vcpu).is_ok());
    assert!(VmSnapshot::decode(vm).is_ok());
    // Truncated.
    assert!(ve(&vcpu[..vcpu.len() - 3]).contains("truncated"));
    assert!(me(&vm[..vm.len() - 3]).contains("truncated"));
    assert!(ve(&vcpu[..10]).contains("truncated"));
    // A wrong version.
    let mut b = vcpu.clone();
    b[8..12].copy_from_slice(&9u32.to_le_bytes());
    assert!(ve(&b).contains("version 9"), "{}", ve(&b));
    let mut b = vm.clone();
    b[8..12].copy_from_slice(&(VM_STATE_VERSION + 1).to_le_bytes());
    assert!(me(&b).contains("version 2"), "{}", me(&b));
    // An unknown section: the first one's tag changed.
    let mut b = vcpu.clone();
    b[20..24].copy_from_slice(&0x0fffu32.to_le_bytes());
    assert!(ve(&b).contains("unknown section 4095"), "{}", ve(&b));
    let mut b = vm.clone();
    b[20..24].copy_from_slice(&0x0fffu32.to_le_bytes());
    assert!(me(&b).contains("unknown section 4095"), "{}", me(&b));
    // Each other's blobs.
    assert!(ve(vm).contains("bad magic"));
    assert!(me(vcpu).contains("bad magic"));
    // A section count the blob cannot hold.
    let mut b = vcpu.clone();
    b[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(ve(&b).contains("sections announced"), "{}", ve(&b));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn decoding_random_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = VcpuSnapshot::decode(&bytes);
        let _ = VmSnapshot::decode(&bytes);
    }

    #[test]
    fn decoding_damaged_real_blobs_never_panics(
        cut in any::<prop::sample::Index>(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
    ) {
        let (vcpu, vm) = real_blobs();
        for blob in [vcpu, vm] {
            let cut = cut.index(blob.len());
            prop_assert!(VcpuSnapshot::decode(&blob[..cut]).is_err());
            prop_assert!(VmSnapshot::decode(&blob[..cut]).is_err());
            let mut b = blob.clone();
            for (at, x) in &flips {
                let k = at.index(b.len());
                b[k] ^= x;
            }
            // Either a clean error or a state that survives its own round trip (a flipped
            // tag can turn a section into a VMM one, which encodes last).
            if let Ok(s) = VcpuSnapshot::decode(&b) {
                prop_assert_eq!(VcpuSnapshot::decode(&s.encode()).unwrap(), s);
            }
            if let Ok(s) = VmSnapshot::decode(&b) {
                prop_assert_eq!(VmSnapshot::decode(&s.encode()).unwrap(), s);
            }
        }
    }
}
