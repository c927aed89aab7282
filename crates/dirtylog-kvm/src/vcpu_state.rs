//! Saving and restoring the architectural state of an x86-64 vCPU, and the versioned blob it
//! travels in (one `VcpuState` frame of a migration stream per vCPU). The VM-wide state (PIC,
//! IOAPIC, PIT, kvmclock) is [`crate::vm_state`].
//!
//! # What is saved
//!
//! | section | ioctl | contents |
//! |---|---|---|
//! | `REGS` | `KVM_GET_REGS` | the 16 general registers, `rip`, `rflags` |
//! | `SREGS` | `KVM_GET_SREGS` | the 8 segment registers with their hidden parts, GDT/IDT, `cr0`/`cr2`/`cr3`/`cr4`/`cr8`, `EFER`, `APIC_BASE`, the pending-interrupt bitmap |
//! | `XSAVE` | `KVM_GET_XSAVE` | x87, SSE, AVX, ... in the CPU's XSAVE layout (4 KiB); `FPU` (`KVM_GET_FPU`) instead on kernels without `KVM_CAP_XSAVE` |
//! | `XCRS` | `KVM_GET_XCRS` | `XCR0` (with `KVM_CAP_XCRS`) |
//! | `MSRS` | `KVM_GET_MSRS` | every MSR of [`StateSpec::msrs`]: with [`StateSpec::probe_vcpu`], the MSRs `KVM_GET_MSR_INDEX_LIST` reports plus the machine-check banks, kept if this vCPU reads them and takes the value back (see [`probe_msrs`]) |
//! | `LAPIC` | `KVM_GET_LAPIC` | the local APIC's 1 KiB register page, as bytes (with an in-kernel irqchip, [`StateSpec::lapic`]) |
//! | `EVENTS` | `KVM_GET_VCPU_EVENTS` | pending and injected exceptions, interrupts, NMIs, SMM, interrupt shadow |
//! | `MP_STATE` | `KVM_GET_MP_STATE` | runnable, halted, waiting for SIPI, ... |
//! | `DEBUGREGS` | `KVM_GET_DEBUGREGS` | `DR0`–`DR3`, `DR6`, `DR7` |
//! | VMM | — | the VMM's own per-vCPU state, opaque (tags from [`VMM_SECTION_BASE`]) |
//!
//! `APIC_BASE` travels in `SREGS` (never as an MSR), `FS_BASE`/`GS_BASE` in the segments, the
//! x2APIC registers (MSRs `0x800`–`0x8ff`) in `LAPIC`, and `MCG_CAP` not at all: it is the
//! machine's configuration (`KVM_X86_SETUP_MCE`), which the destination must set up the same.
//! Not saved: nested virtualization state (`KVM_GET_NESTED_STATE`), so a guest that entered
//! VMX/SVM operation does not migrate.
//!
//! # Restore order
//!
//! The target vCPU must have had its CPUID set first (which MSRs and XSAVE components are
//! valid depends on it). [`VcpuSnapshot::restore`] loads, in this order:
//!
//! 1. `SREGS`, `REGS`, `XSAVE`/`FPU`, `XCRS`;
//! 2. the MSRs in one `KVM_SET_MSRS`, in [`msr_restore_order`]: `IA32_FEATURE_CONTROL` first,
//!    then `IA32_TSC`, then the rest by index, then the MSRs that enable something whose
//!    parameters are other MSRs (`MSR_KVM_ASYNC_PF_EN` after `MSR_KVM_ASYNC_PF_INT`, the PMU
//!    global and fixed-counter enables after the counters), as QEMU's `kvm_put_msrs`;
//! 3. `LAPIC` (after `SREGS`, whose `APIC_BASE` decides how KVM reads the page: xAPIC or x2APIC);
//! 4. `IA32_TSC_DEADLINE` alone (after `IA32_TSC`, which its value is relative to, and after
//!    `LAPIC`: KVM ignores the write unless the LVT timer is in TSC-deadline mode, and
//!    `KVM_SET_LAPIC` clears the deadline when it switches the mode);
//! 5. `EVENTS`, `MP_STATE` (KVM checks a latched INIT of the events against the MP state),
//!    `DEBUGREGS`.
//!
//! This is QEMU's `kvm_arch_put_registers` (target/i386/kvm/kvm.c): sregs (with nested state),
//! regs, XSAVE, XCRs, MSRs, vCPU events, MP state, the TSC deadline MSR, debug registers — with
//! the LAPIC, which QEMU loads from its APIC device (`kvm_apic_put`: the APIC base, then
//! `KVM_SET_LAPIC`) before the registers, placed here between the MSRs and the TSC deadline.
//!
//! # The TSC
//!
//! A restored vCPU's `IA32_TSC` is the saved value (QEMU's choice): the guest's TSC stands
//! still while the guest is stopped and continues from where it stopped, so it never goes
//! backwards and never jumps over the downtime; the kvmclock ([`crate::vm_state`]) is restored
//! the same way, so the two stay consistent. KVM keeps the vCPUs of a VM synchronized: a
//! userspace TSC write within a second of what another vCPU's TSC reads now is taken as
//! "synchronize" (the vCPU gets that vCPU's offset), so vCPUs after the first may differ from
//! their saved value by the few microseconds between their saves. `IA32_TSC_ADJUST` is written
//! after `IA32_TSC`; KVM takes a userspace write of either one as is (neither moves the other).
//!
//! # The blob
//!
//! ```text
//! blob    = magic "DLVCPU\0\0" | version u32 (= 2) | vcpu_id u32 | nsections u32 | section*
//! section = tag u32 | length u32 | payload[length]
//! ```
//!
//! Every integer is little-endian and every field of every KVM structure is written one by one
//! at a fixed offset of its section, never as a `memcpy` of the bindgen struct. That keeps the
//! format independent of Rust's and bindgen's layout (padding, unions, field order changes
//! between `kvm-bindings` versions) and of the host's byte order, and it lets the decoder check
//! each section's exact length before reading it. The XSAVE area and the LAPIC page are copied
//! as bytes because they already have fixed, CPU-defined little-endian layouts. Sections are
//! tagged so that a reader can name what is missing or unknown: a section it does not know is
//! an error (never silently dropped CPU state), except VMM sections (tags from
//! [`VMM_SECTION_BASE`]), which carry the VMM's own per-vCPU device state opaquely. Version 1
//! blobs (no `LAPIC`, at most 64 MSRs) are still read. A blob is a few kilobytes, far below
//! the wire format's 1 MiB limit: on the project's PVM host 8.0 KiB with XSAVE, the LAPIC and
//! 201 MSRs (41 listed by the kernel, 160 of the 32 machine-check banks KVM gives a vCPU until
//! `KVM_X86_SETUP_MCE` sets fewer; QEMU's 10 banks make it 91 MSRs and 6.7 KiB).
//!
//! # Where it is taken
//!
//! Every ioctl goes through `kvm-ioctls`' [`VcpuFd`] methods, on the VMM's own vCPU fd. KVM
//! serialises vCPU ioctls with `KVM_RUN` on the vCPU's mutex, so they must only be used while
//! the vCPU is out of `KVM_RUN` and stays out (parked): an ioctl on a running vCPU blocks until
//! it exits. A VMM whose vCPU threads own their `VcpuFd`s runs [`VcpuSnapshot::save`] and
//! [`VcpuSnapshot::restore`] on the parked vCPU's own thread (dirtylog's test VMM:
//! `Runner::with_paused_vcpu`), or before the threads start.
//!
//! Save a vCPU only after completing any pending I/O or MMIO exit (`KVM_RUN` with
//! `immediate_exit = 1`, which finishes the instruction and returns `EINTR`): KVM keeps that
//! completion outside every state it exposes, so a vCPU saved with an `out` half done would
//! re-execute it after a restore. A vCPU saved after the completion simply runs on.

use kvm_bindings::{
    kvm_debugregs, kvm_dtable, kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd};

use crate::blob::{self, Reader, Writer};
pub use crate::blob::{MAX_VMM_SECTION, VMM_SECTION_BASE};
use crate::error::{Error, Result};
use crate::sys;

/// `KVM_CAP_XSAVE`.
const KVM_CAP_XSAVE: u32 = 55;
/// `KVM_CAP_XCRS`.
const KVM_CAP_XCRS: u32 = 56;

/// First bytes of every blob.
pub const BLOB_MAGIC: [u8; 8] = *b"DLVCPU\0\0";
/// The blob version this build writes (it also reads version 1).
pub const BLOB_VERSION: u32 = 2;

const T_REGS: u32 = 1;
const T_SREGS: u32 = 2;
const T_XSAVE: u32 = 3;
const T_FPU: u32 = 4;
const T_XCRS: u32 = 5;
const T_MSRS: u32 = 6;
const T_EVENTS: u32 = 7;
const T_MP_STATE: u32 = 8;
const T_DEBUGREGS: u32 = 9;
const T_LAPIC: u32 = 10;

/// Bytes of the XSAVE area of `KVM_GET_XSAVE`.
pub const XSAVE_BYTES: usize = 4096;
/// Bytes of the LAPIC register page of `KVM_GET_LAPIC` (`KVM_APIC_REG_SIZE`).
pub const LAPIC_BYTES: usize = 1024;
/// Most MSRs a blob may carry. They are read and written in batches of at most
/// [`MSR_BATCH`].
pub const MAX_MSRS: usize = 512;
/// MSRs per `KVM_GET_MSRS` / `KVM_SET_MSRS` (`KVM_MAX_MSR_ENTRIES`, what `kvm-ioctls`' `Msrs`
/// holds).
pub const MSR_BATCH: usize = kvm_bindings::KVM_MAX_MSR_ENTRIES;
/// Most MSRs of a version 1 blob.
const MAX_MSRS_V1: usize = 64;
/// Most XCRs a blob may carry (`kvm_xcrs::xcrs`).
const MAX_XCRS: usize = 16;

/// `IA32_TSC`.
pub const MSR_IA32_TSC: u32 = 0x10;
/// `IA32_APIC_BASE` (saved in `SREGS`, never as an MSR).
pub const MSR_IA32_APICBASE: u32 = 0x1b;
/// `IA32_FEATURE_CONTROL`.
pub const MSR_IA32_FEATURE_CONTROL: u32 = 0x3a;
/// `IA32_TSC_ADJUST`.
pub const MSR_IA32_TSC_ADJUST: u32 = 0x3b;
/// `IA32_MCG_CAP` (configuration: `KVM_X86_SETUP_MCE`; not saved).
pub const MSR_IA32_MCG_CAP: u32 = 0x179;
/// `IA32_MC0_CTL`: bank `i`'s `CTL`, `STATUS`, `ADDR`, `MISC` are `0x400 + 4 * i ..`.
pub const MSR_IA32_MC0_CTL: u32 = 0x400;
/// `IA32_MC0_CTL2`: bank `i`'s is `0x280 + i`.
pub const MSR_IA32_MC0_CTL2: u32 = 0x280;
/// `IA32_TSC_DEADLINE`.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// `MSR_KVM_ASYNC_PF_EN`.
pub const MSR_KVM_ASYNC_PF_EN: u32 = 0x4b56_4d02;
/// `MSR_KVM_ASYNC_PF_INT`.
pub const MSR_KVM_ASYNC_PF_INT: u32 = 0x4b56_4d06;
/// `IA32_PERF_GLOBAL_CTRL`.
const MSR_CORE_PERF_GLOBAL_CTRL: u32 = 0x38f;
/// `IA32_FIXED_CTR_CTRL`.
const MSR_CORE_PERF_FIXED_CTR_CTRL: u32 = 0x38d;
/// AMD `PerfCntrGlobalCtl`.
const MSR_AMD64_PERF_CNTR_GLOBAL_CTL: u32 = 0xc000_0301;
/// The x2APIC registers (saved in `LAPIC`).
const X2APIC_MSRS: std::ops::RangeInclusive<u32> = 0x800..=0x8ff;
/// Most machine-check banks probed (`MCG_CAP[7:0]` is at most 32 in KVM).
const MAX_MCE_BANKS: u32 = 32;

/// MSRs that count time by themselves: their saved value is a lower bound of what a restored
/// vCPU reads (`IA32_TSC`, `IA32_MPERF`, `IA32_APERF`, Hyper-V's `TIME_REF_COUNT`).
/// [`VcpuSnapshot::without_time`] zeroes them.
pub const TIME_MSRS: [u32; 4] = [MSR_IA32_TSC, 0xe7, 0xe8, 0x4000_0020];

/// The LAPIC's current-count register (`APIC_TMCCT`), which counts down while the LAPIC timer
/// runs: byte offset in the register page.
pub const APIC_TMCCT: usize = 0x390;

/// MSRs [`StateSpec::probe`] saves when the kernel lists them (`KVM_GET_MSR_INDEX_LIST`): the
/// ones 64-bit code and its OS depend on besides `EFER` (in `SREGS`) and the segment bases.
/// [`StateSpec::probe_vcpu`] saves every MSR the vCPU can restore instead.
pub const MIGRATED_MSRS: [(u32, &str); 12] = [
    (0x0000_0010, "IA32_TSC"),
    (0x0000_0174, "IA32_SYSENTER_CS"),
    (0x0000_0175, "IA32_SYSENTER_ESP"),
    (0x0000_0176, "IA32_SYSENTER_EIP"),
    (0x0000_0277, "IA32_PAT"),
    (0x0000_01a0, "IA32_MISC_ENABLE"),
    (0xc000_0081, "STAR"),
    (0xc000_0082, "LSTAR"),
    (0xc000_0083, "CSTAR"),
    (0xc000_0084, "SFMASK"),
    (0xc000_0102, "KERNEL_GS_BASE"),
    (0xc000_0103, "TSC_AUX"),
];

/// The x87/SSE/AVX state: the XSAVE area, or the legacy FPU state without `KVM_CAP_XSAVE`.
#[derive(Clone, Debug, PartialEq)]
pub enum FpuState {
    /// `KVM_GET_XSAVE`'s 4 KiB area, in the CPU's XSAVE layout.
    Xsave(Box<[u8; XSAVE_BYTES]>),
    /// `KVM_GET_FPU`.
    Legacy(Box<kvm_fpu>),
}

/// What a kernel lets us save, probed once per VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateSpec {
    /// `KVM_CAP_XSAVE`.
    pub xsave: bool,
    /// `KVM_CAP_XCRS`.
    pub xcrs: bool,
    /// The vCPU has an in-kernel LAPIC (the VM has an in-kernel irqchip): save `LAPIC`.
    pub lapic: bool,
    /// The MSRs to save, in [`msr_restore_order`].
    pub msrs: Vec<u32>,
}

/// What [`probe_msrs`] found on one vCPU.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MsrProbe {
    /// `KVM_GET_MSR_INDEX_LIST`, as the kernel listed it.
    pub listed: Vec<u32>,
    /// The machine-check bank MSRs added for the banks `IA32_MCG_CAP` reports.
    pub mce_banks: Vec<u32>,
    /// Left out by rule: `IA32_APIC_BASE`, `IA32_MCG_CAP`, the x2APIC range.
    pub excluded: Vec<u32>,
    /// Not read by `KVM_GET_MSRS` on this vCPU (its CPUID lacks the feature).
    pub unreadable: Vec<u32>,
    /// Read, but the value read was refused by `KVM_SET_MSRS`.
    pub refused: Vec<u32>,
    /// What survived, in [`msr_restore_order`].
    pub saved: Vec<u32>,
}

/// Where MSR `index` goes when restoring: sort by `(msr_restore_rank(i), i)`.
///
/// 0: `IA32_FEATURE_CONTROL` (QEMU writes it before anything else). 1: `IA32_TSC` (before the
/// MSRs derived from it: `IA32_TSC_ADJUST`, the kvmclock MSRs). 2: the rest. 3: enables whose
/// parameters are other MSRs (`MSR_KVM_ASYNC_PF_EN` after `MSR_KVM_ASYNC_PF_INT`; the PMU's
/// global and fixed-counter controls after the counters and event selects). 4:
/// `IA32_TSC_DEADLINE`, written on its own after the LAPIC.
pub fn msr_restore_rank(index: u32) -> u8 {
    match index {
        MSR_IA32_FEATURE_CONTROL => 0,
        MSR_IA32_TSC => 1,
        MSR_KVM_ASYNC_PF_EN
        | MSR_CORE_PERF_GLOBAL_CTRL
        | MSR_CORE_PERF_FIXED_CTR_CTRL
        | MSR_AMD64_PERF_CNTR_GLOBAL_CTL => 3,
        MSR_IA32_TSC_DEADLINE => 4,
        _ => 2,
    }
}

/// Sort MSR indexes into restore order (see [`msr_restore_rank`]) and drop duplicates.
pub fn msr_restore_order(indexes: &mut Vec<u32>) {
    indexes.sort_by_key(|&i| (msr_restore_rank(i), i));
    indexes.dedup();
}

/// Map a failed `kvm-ioctls` call on vCPU `vcpu` to [`Error::VcpuState`] naming `ioctl`.
fn fail(vcpu: u32, ioctl: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> Error {
    move |e| Error::VcpuState {
        vcpu,
        ioctl,
        errno: e.errno(),
    }
}

fn blob_err(m: String) -> Error {
    Error::VcpuBlob(m)
}

/// `KVM_GET_MSRS` of one MSR: `Some(value)`, or `None` when the kernel does not read it.
fn get_one_msr(fd: &VcpuFd, index: u32) -> Result<Option<u64>> {
    let mut buf = msr_buf([kvm_msr_entry {
        index,
        ..Default::default()
    }])?;
    let n = fd.get_msrs(&mut buf).map_err(fail(0, "KVM_GET_MSRS"))?;
    Ok((n == 1).then(|| buf.as_slice()[0].data))
}

/// `KVM_SET_MSRS` of one MSR: whether the kernel took it.
fn set_one_msr(fd: &VcpuFd, index: u32, data: u64) -> Result<bool> {
    let buf = msr_buf([kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }])?;
    Ok(fd.set_msrs(&buf).map_err(fail(0, "KVM_SET_MSRS"))? == 1)
}

/// Find the MSRs vCPU `fd` can save and restore: those `KVM_GET_MSR_INDEX_LIST` reports
/// (the emulated and feature-MSR lists are not needed: the index list already holds the
/// emulated ones) plus the machine-check banks `IA32_MCG_CAP` announces, minus
/// `IA32_APIC_BASE` (in `SREGS`), `IA32_MCG_CAP` (configuration) and the x2APIC range (in
/// `LAPIC`); each kept if `KVM_GET_MSRS` reads it and `KVM_SET_MSRS` takes the value read
/// back. `IA32_TSC` is only read (KVM always takes a userspace TSC write, and writing it back
/// would move the TSC by the time between the two calls).
///
/// `fd` must be parked with its CPUID set (which MSRs exist depends on it). Writing back the
/// values read leaves the vCPU's state as it was; probe before the guest first runs (the
/// kvmclock MSRs, for one, rewrite the guest's clock pages when written).
pub fn probe_msrs(kvm: &Kvm, fd: &VcpuFd) -> Result<MsrProbe> {
    let listed = kvm
        .get_msr_index_list()
        .map_err(fail(0, "KVM_GET_MSR_INDEX_LIST"))?
        .as_slice()
        .to_vec();
    let mut p = MsrProbe {
        listed,
        ..Default::default()
    };
    if let Some(cap) = get_one_msr(fd, MSR_IA32_MCG_CAP)? {
        let banks = (cap & 0xff) as u32;
        for b in 0..banks.min(MAX_MCE_BANKS) {
            p.mce_banks.push(MSR_IA32_MC0_CTL2 + b);
            for k in 0..4 {
                p.mce_banks.push(MSR_IA32_MC0_CTL + 4 * b + k);
            }
        }
    }
    let mut candidates: Vec<u32> = p.listed.iter().chain(&p.mce_banks).copied().collect();
    msr_restore_order(&mut candidates);
    for index in candidates {
        if index == MSR_IA32_APICBASE || index == MSR_IA32_MCG_CAP || X2APIC_MSRS.contains(&index) {
            p.excluded.push(index);
            continue;
        }
        let Some(value) = get_one_msr(fd, index)? else {
            p.unreadable.push(index);
            continue;
        };
        if index != MSR_IA32_TSC && !set_one_msr(fd, index, value)? {
            p.refused.push(index);
            continue;
        }
        p.saved.push(index);
    }
    if p.saved.len() > MAX_MSRS {
        return Err(Error::VcpuBlob(format!(
            "this vCPU has {} restorable MSRs; a blob holds at most {MAX_MSRS}",
            p.saved.len()
        )));
    }
    Ok(p)
}

impl StateSpec {
    /// A spec for VMs without an in-kernel irqchip when no vCPU fd is at hand: no `LAPIC`,
    /// and of the MSRs only [`MIGRATED_MSRS`] that the kernel lists. Prefer
    /// [`StateSpec::probe_vcpu`], which saves every MSR the vCPU can restore.
    pub fn probe(kvm: &Kvm) -> Result<Self> {
        let listed = kvm
            .get_msr_index_list()
            .map_err(fail(0, "KVM_GET_MSR_INDEX_LIST"))?;
        let listed = listed.as_slice();
        let mut msrs: Vec<u32> = MIGRATED_MSRS
            .iter()
            .map(|&(i, _)| i)
            .filter(|i| listed.contains(i))
            .collect();
        msr_restore_order(&mut msrs);
        Ok(StateSpec {
            xsave: sys::check_extension(kvm, KVM_CAP_XSAVE)? > 0,
            xcrs: sys::check_extension(kvm, KVM_CAP_XCRS)? > 0,
            lapic: false,
            msrs,
        })
    }

    /// The full spec, probed once per VM on one of its vCPUs (parked, CPUID set, before the
    /// guest first runs; see [`probe_msrs`]): the MSRs this vCPU can restore, and `LAPIC` when
    /// the vCPU has an in-kernel LAPIC (`KVM_GET_LAPIC` succeeds). Every vCPU of a VM is
    /// expected to have the same CPUID.
    pub fn probe_vcpu(kvm: &Kvm, fd: &VcpuFd) -> Result<Self> {
        let lapic = match fd.get_lapic() {
            Ok(_) => true,
            // No in-kernel LAPIC: KVM says EINVAL (ENXIO on some kernels).
            Err(e) if e.errno() == libc::EINVAL || e.errno() == libc::ENXIO => false,
            Err(e) => return Err(fail(0, "KVM_GET_LAPIC")(e)),
        };
        Ok(StateSpec {
            xsave: sys::check_extension(kvm, KVM_CAP_XSAVE)? > 0,
            xcrs: sys::check_extension(kvm, KVM_CAP_XCRS)? > 0,
            lapic,
            msrs: probe_msrs(kvm, fd)?.saved,
        })
    }
}

/// The saved state of one vCPU. See the [module docs](self).
#[derive(Clone, Debug, PartialEq)]
pub struct VcpuSnapshot {
    /// The vCPU's index.
    pub vcpu_id: u32,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, `EFER`, `APIC_BASE`.
    pub sregs: kvm_sregs,
    /// x87/SSE/AVX state.
    pub fpu: FpuState,
    /// Extended control registers `(index, value)`; empty without `KVM_CAP_XCRS`.
    pub xcrs: Vec<(u32, u64)>,
    /// `(index, value)` of the saved MSRs (at most [`MAX_MSRS`]); restored in
    /// [`msr_restore_order`] whatever their order here.
    pub msrs: Vec<(u32, u64)>,
    /// The LAPIC register page (`KVM_GET_LAPIC`), with an in-kernel irqchip.
    pub lapic: Option<Box<[u8; LAPIC_BYTES]>>,
    /// Pending and injected events.
    pub events: kvm_vcpu_events,
    /// `KVM_MP_STATE_*`.
    pub mp_state: u32,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// VMM sections `(tag ≥ VMM_SECTION_BASE, bytes)`, in tag order, carried opaquely.
    pub vmm: Vec<(u32, Vec<u8>)>,
}

impl VcpuSnapshot {
    /// Save the state of vCPU `vcpu_id` through `fd`, which must be parked (see the
    /// [module docs](self)).
    pub fn save(fd: &VcpuFd, vcpu_id: u32, spec: &StateSpec) -> Result<Self> {
        let id = vcpu_id;
        let regs = fd.get_regs().map_err(fail(id, "KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(fail(id, "KVM_GET_SREGS"))?;
        let fpu = if spec.xsave {
            // KVM_GET_XSAVE refuses (EINVAL) when the vCPU's XSAVE area is larger than the
            // 4 KiB of `kvm_xsave` (dynamically enabled features such as AMX).
            let x = fd.get_xsave().map_err(fail(id, "KVM_GET_XSAVE"))?;
            let mut bytes = Box::new([0u8; XSAVE_BYTES]);
            for (b, w) in bytes.chunks_exact_mut(4).zip(x.region.iter()) {
                b.copy_from_slice(&w.to_le_bytes());
            }
            FpuState::Xsave(bytes)
        } else {
            FpuState::Legacy(Box::new(fd.get_fpu().map_err(fail(id, "KVM_GET_FPU"))?))
        };
        let xcrs = if spec.xcrs {
            let x = fd.get_xcrs().map_err(fail(id, "KVM_GET_XCRS"))?;
            let n = (x.nr_xcrs as usize).min(x.xcrs.len());
            x.xcrs[..n].iter().map(|c| (c.xcr, c.value)).collect()
        } else {
            Vec::new()
        };
        let msrs = get_msrs(fd, id, &spec.msrs)?;
        let lapic = if spec.lapic {
            let l = fd.get_lapic().map_err(fail(id, "KVM_GET_LAPIC"))?;
            let mut page = Box::new([0u8; LAPIC_BYTES]);
            for (b, &c) in page.iter_mut().zip(l.regs.iter()) {
                *b = c as u8;
            }
            Some(page)
        } else {
            None
        };
        let events = fd
            .get_vcpu_events()
            .map_err(fail(id, "KVM_GET_VCPU_EVENTS"))?;
        let mp = fd.get_mp_state().map_err(fail(id, "KVM_GET_MP_STATE"))?;
        let debugregs = fd.get_debug_regs().map_err(fail(id, "KVM_GET_DEBUGREGS"))?;
        Ok(VcpuSnapshot {
            vcpu_id,
            regs,
            sregs,
            fpu,
            xcrs,
            msrs,
            lapic,
            events,
            mp_state: mp.mp_state,
            debugregs,
            vmm: Vec::new(),
        })
    }

    /// Refuse a state that carries an MSR this VM does not save itself (`spec.msrs`), before
    /// anything is loaded: a blob that came over the network must not set arbitrary MSRs.
    ///
    /// ```
    /// use dirtylog_kvm::{StateSpec, VcpuSnapshot};
    /// # fn f(s: &VcpuSnapshot, spec: &StateSpec) {
    /// if let Err(e) = s.check_msrs(spec) {
    ///     eprintln!("refusing the vCPU state: {e}");
    /// }
    /// # }
    /// ```
    pub fn check_msrs(&self, spec: &StateSpec) -> Result<()> {
        match self.msrs.iter().find(|(i, _)| !spec.msrs.contains(i)) {
            None => Ok(()),
            Some((i, _)) => Err(Error::VcpuBlob(format!(
                "vCPU {}'s state sets MSR {i:#x}, which this VM does not migrate",
                self.vcpu_id
            ))),
        }
    }

    /// Load this state into the vCPU behind `fd`, which must not be running and must have its
    /// CPUID set (and an in-kernel LAPIC if this state has one), in the order of the
    /// [module docs](self#restore-order). Errors name the ioctl, or the MSR the kernel refused.
    pub fn restore(&self, fd: &VcpuFd) -> Result<()> {
        let id = self.vcpu_id;
        fd.set_sregs(&self.sregs)
            .map_err(fail(id, "KVM_SET_SREGS"))?;
        fd.set_regs(&self.regs).map_err(fail(id, "KVM_SET_REGS"))?;
        match &self.fpu {
            FpuState::Xsave(bytes) => {
                let mut x = kvm_xsave::default();
                for (w, b) in x.region.iter_mut().zip(bytes.chunks_exact(4)) {
                    *w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
                // KVM_SET_XSAVE reads the vCPU's whole XSAVE area, which can be larger than
                // `kvm_xsave` (features enabled with arch_prctl, Linux 5.17+), while
                // KVM_GET_XSAVE fails with EINVAL exactly in that case. So a successful GET
                // proves the area fits the 4 KiB `x` holds. (The area only grows through
                // KVM_SET_CPUID2, which the kernel refuses once the vCPU has run, and which
                // needs this vCPU's mutex, as these ioctls do.)
                fd.get_xsave().map_err(fail(id, "KVM_GET_XSAVE"))?;
                // SAFETY: the vCPU's XSAVE area is at most `size_of::<kvm_xsave>()` bytes
                // (checked just above), so the kernel reads only inside `x`.
                unsafe { fd.set_xsave(&x) }.map_err(fail(id, "KVM_SET_XSAVE"))?;
            }
            FpuState::Legacy(f) => fd.set_fpu(f).map_err(fail(id, "KVM_SET_FPU"))?,
        }
        if !self.xcrs.is_empty() {
            let mut x = kvm_xcrs::default();
            if self.xcrs.len() > x.xcrs.len() {
                return Err(Error::VcpuBlob(format!(
                    "{} XCRs, at most {}",
                    self.xcrs.len(),
                    x.xcrs.len()
                )));
            }
            x.nr_xcrs = self.xcrs.len() as u32;
            for (slot, &(xcr, value)) in x.xcrs.iter_mut().zip(&self.xcrs) {
                slot.xcr = xcr;
                slot.value = value;
            }
            fd.set_xcrs(&x).map_err(fail(id, "KVM_SET_XCRS"))?;
        }
        let mut msrs = self.msrs.clone();
        msrs.sort_by_key(|&(i, _)| (msr_restore_rank(i), i));
        let split = msrs.partition_point(|&(i, _)| msr_restore_rank(i) < 4);
        let (early, late) = msrs.split_at(split);
        set_msrs(fd, id, early)?;
        if let Some(page) = &self.lapic {
            let mut l = kvm_lapic_state::default();
            for (c, &b) in l.regs.iter_mut().zip(page.iter()) {
                *c = b as std::os::raw::c_char;
            }
            fd.set_lapic(&l).map_err(fail(id, "KVM_SET_LAPIC"))?;
        }
        set_msrs(fd, id, late)?;
        fd.set_vcpu_events(&self.events)
            .map_err(fail(id, "KVM_SET_VCPU_EVENTS"))?;
        fd.set_mp_state(kvm_bindings::kvm_mp_state {
            mp_state: self.mp_state,
        })
        .map_err(fail(id, "KVM_SET_MP_STATE"))?;
        // The kernel refuses non-zero flags on set.
        let debugregs = kvm_debugregs {
            flags: 0,
            ..self.debugregs
        };
        fd.set_debug_regs(&debugregs)
            .map_err(fail(id, "KVM_SET_DEBUGREGS"))?;
        Ok(())
    }

    /// The value of saved MSR `index`, if saved.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|(i, _)| *i == index).map(|&(_, v)| v)
    }

    /// This state with the fields that move by themselves zeroed: the [`TIME_MSRS`] and the
    /// LAPIC's current timer count ([`APIC_TMCCT`]). Two saves of the same stopped vCPU, or a
    /// save and a save after restoring it elsewhere, encode to the same bytes once both are
    /// passed through this; the time fields themselves are only ordered (a later save reads
    /// a TSC not below an earlier one's).
    pub fn without_time(&self) -> Self {
        let mut s = self.clone();
        for (i, v) in s.msrs.iter_mut() {
            if TIME_MSRS.contains(i) {
                *v = 0;
            }
        }
        if let Some(page) = s.lapic.as_mut() {
            page[APIC_TMCCT..APIC_TMCCT + 4].fill(0);
        }
        s
    }

    /// The VMM section `tag`, if present.
    pub fn vmm_section(&self, tag: u32) -> Option<&[u8]> {
        self.vmm
            .iter()
            .find(|(t, _)| *t == tag)
            .map(|(_, b)| b.as_slice())
    }

    /// Add (or replace) VMM section `tag` (at least [`VMM_SECTION_BASE`], at most 64 KiB).
    pub fn set_vmm_section(&mut self, tag: u32, bytes: Vec<u8>) -> Result<()> {
        blob::set_vmm_section(&mut self.vmm, tag, bytes, blob_err)
    }

    /// The blob (see the [module docs](self)).
    pub fn encode(&self) -> Vec<u8> {
        let mut sections: Vec<(u32, Vec<u8>)> = Vec::new();
        let mut w = Writer::default();
        put_regs(&mut w, &self.regs);
        sections.push((T_REGS, w.take()));
        put_sregs(&mut w, &self.sregs);
        sections.push((T_SREGS, w.take()));
        match &self.fpu {
            FpuState::Xsave(bytes) => sections.push((T_XSAVE, bytes.to_vec())),
            FpuState::Legacy(f) => {
                put_fpu(&mut w, f);
                sections.push((T_FPU, w.take()));
            }
        }
        if !self.xcrs.is_empty() {
            w.u32(self.xcrs.len() as u32);
            for &(xcr, value) in &self.xcrs {
                w.u32(xcr);
                w.u64(value);
            }
            sections.push((T_XCRS, w.take()));
        }
        w.u32(self.msrs.len() as u32);
        for &(index, value) in &self.msrs {
            w.u32(index);
            w.u64(value);
        }
        sections.push((T_MSRS, w.take()));
        if let Some(page) = &self.lapic {
            sections.push((T_LAPIC, page.to_vec()));
        }
        put_events(&mut w, &self.events);
        sections.push((T_EVENTS, w.take()));
        w.u32(self.mp_state);
        sections.push((T_MP_STATE, w.take()));
        for v in self.debugregs.db {
            w.u64(v);
        }
        w.u64(self.debugregs.dr6);
        w.u64(self.debugregs.dr7);
        w.u64(self.debugregs.flags);
        sections.push((T_DEBUGREGS, w.take()));
        sections.extend(self.vmm.iter().cloned());
        blob::frame(&BLOB_MAGIC, BLOB_VERSION, self.vcpu_id, sections)
    }

    /// Parse and validate a blob (version 2, or 1): magic, version, every section's exact
    /// length, each known section at most once, the required ones present, nothing after the
    /// last section. Never panics, whatever the bytes.
    pub fn decode(blob: &[u8]) -> Result<Self> {
        let f = blob::unframe(
            blob,
            &BLOB_MAGIC,
            &[1, BLOB_VERSION],
            "vCPU state",
            blob_err,
        )?;
        let max_msrs = if f.version == 1 {
            MAX_MSRS_V1
        } else {
            MAX_MSRS
        };
        let vcpu_id = f.header;
        let mut regs = None;
        let mut sregs = None;
        let mut fpu = None;
        let mut xcrs = None;
        let mut msrs = None;
        let mut lapic = None;
        let mut events = None;
        let mut mp_state = None;
        let mut debugregs = None;
        let mut vmm: Vec<(u32, Vec<u8>)> = Vec::new();
        for (tag, payload) in f.sections {
            let mut s = Reader::new(payload, section_name(tag), blob_err);
            let dup = || Error::VcpuBlob(format!("section {} appears twice", section_name(tag)));
            match tag {
                T_REGS => {
                    if regs.replace(get_regs(&mut s)?).is_some() {
                        return Err(dup());
                    }
                }
                T_SREGS => {
                    if sregs.replace(get_sregs(&mut s)?).is_some() {
                        return Err(dup());
                    }
                }
                T_XSAVE => {
                    let mut bytes = Box::new([0u8; XSAVE_BYTES]);
                    bytes.copy_from_slice(s.take(XSAVE_BYTES)?);
                    if fpu.replace(FpuState::Xsave(bytes)).is_some() {
                        return Err(dup());
                    }
                }
                T_FPU => {
                    if fpu
                        .replace(FpuState::Legacy(Box::new(get_fpu(&mut s)?)))
                        .is_some()
                    {
                        return Err(dup());
                    }
                }
                T_XCRS => {
                    let count = s.u32()? as usize;
                    if count > MAX_XCRS {
                        return Err(Error::VcpuBlob(format!("{count} XCRs, at most {MAX_XCRS}")));
                    }
                    let mut v = Vec::with_capacity(count);
                    for _ in 0..count {
                        v.push((s.u32()?, s.u64()?));
                    }
                    if xcrs.replace(v).is_some() {
                        return Err(dup());
                    }
                }
                T_MSRS => {
                    let count = s.u32()? as usize;
                    if count > max_msrs {
                        return Err(Error::VcpuBlob(format!(
                            "{count} MSRs, at most {max_msrs} in version {}",
                            f.version
                        )));
                    }
                    let mut v = Vec::with_capacity(count);
                    for _ in 0..count {
                        v.push((s.u32()?, s.u64()?));
                    }
                    if msrs.replace(v).is_some() {
                        return Err(dup());
                    }
                }
                T_LAPIC if f.version >= 2 => {
                    let mut page = Box::new([0u8; LAPIC_BYTES]);
                    page.copy_from_slice(s.take(LAPIC_BYTES)?);
                    if lapic.replace(page).is_some() {
                        return Err(dup());
                    }
                }
                T_EVENTS => {
                    if events.replace(get_events(&mut s)?).is_some() {
                        return Err(dup());
                    }
                }
                T_MP_STATE => {
                    if mp_state.replace(s.u32()?).is_some() {
                        return Err(dup());
                    }
                }
                T_DEBUGREGS => {
                    let mut d = kvm_debugregs::default();
                    for v in d.db.iter_mut() {
                        *v = s.u64()?;
                    }
                    d.dr6 = s.u64()?;
                    d.dr7 = s.u64()?;
                    d.flags = s.u64()?;
                    if debugregs.replace(d).is_some() {
                        return Err(dup());
                    }
                }
                t if t >= VMM_SECTION_BASE => {
                    blob::push_vmm_section(&mut vmm, t, s.take(payload.len())?, blob_err)?;
                }
                t => {
                    return Err(Error::VcpuBlob(format!(
                        "unknown section {t} in version {}: written by a newer dirtylog? \
                         Refusing to drop CPU state",
                        f.version
                    )))
                }
            }
            s.finish()?;
        }
        let missing = |what: &str| Error::VcpuBlob(format!("the {what} section is missing"));
        Ok(VcpuSnapshot {
            vcpu_id,
            regs: regs.ok_or_else(|| missing("REGS"))?,
            sregs: sregs.ok_or_else(|| missing("SREGS"))?,
            fpu: fpu.ok_or_else(|| missing("XSAVE or FPU"))?,
            xcrs: xcrs.unwrap_or_default(),
            msrs: msrs.ok_or_else(|| missing("MSRS"))?,
            lapic,
            events: events.ok_or_else(|| missing("EVENTS"))?,
            mp_state: mp_state.ok_or_else(|| missing("MP_STATE"))?,
            debugregs: debugregs.ok_or_else(|| missing("DEBUGREGS"))?,
            vmm,
        })
    }
}

fn section_name(tag: u32) -> &'static str {
    match tag {
        T_REGS => "REGS",
        T_SREGS => "SREGS",
        T_XSAVE => "XSAVE",
        T_FPU => "FPU",
        T_XCRS => "XCRS",
        T_MSRS => "MSRS",
        T_LAPIC => "LAPIC",
        T_EVENTS => "EVENTS",
        T_MP_STATE => "MP_STATE",
        T_DEBUGREGS => "DEBUGREGS",
        t if t >= VMM_SECTION_BASE => "VMM",
        _ => "unknown",
    }
}

/// One batch (at most [`MSR_BATCH`] entries) for `KVM_GET_MSRS` / `KVM_SET_MSRS`.
fn msr_buf<I: IntoIterator<Item = kvm_msr_entry>>(entries: I) -> Result<Msrs> {
    let entries: Vec<kvm_msr_entry> = entries.into_iter().collect();
    let n = entries.len();
    Msrs::from_entries(&entries)
        .map_err(|_| Error::VcpuBlob(format!("{n} MSRs in one batch, at most {MSR_BATCH}")))
}

/// `KVM_GET_MSRS` of `indexes` (at most [`MAX_MSRS`]), in batches; fails naming the first MSR
/// the kernel would not read.
fn get_msrs(fd: &VcpuFd, id: u32, indexes: &[u32]) -> Result<Vec<(u32, u64)>> {
    if indexes.len() > MAX_MSRS {
        return Err(Error::VcpuBlob(format!(
            "{} MSRs, at most {MAX_MSRS}",
            indexes.len()
        )));
    }
    let mut out = Vec::with_capacity(indexes.len());
    for batch in indexes.chunks(MSR_BATCH) {
        let mut buf = msr_buf(batch.iter().map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        }))?;
        let read = fd.get_msrs(&mut buf).map_err(fail(id, "KVM_GET_MSRS"))?;
        if read < batch.len() {
            return Err(Error::MsrRefused {
                vcpu: id,
                ioctl: "KVM_GET_MSRS",
                index: batch[read],
                value: 0,
            });
        }
        out.extend(buf.as_slice().iter().map(|e| (e.index, e.data)));
    }
    Ok(out)
}

/// `KVM_SET_MSRS` of `msrs` (at most [`MAX_MSRS`]), in order, in batches; fails naming the
/// first MSR the kernel refused.
fn set_msrs(fd: &VcpuFd, id: u32, msrs: &[(u32, u64)]) -> Result<()> {
    if msrs.len() > MAX_MSRS {
        return Err(Error::VcpuBlob(format!(
            "{} MSRs, at most {MAX_MSRS}",
            msrs.len()
        )));
    }
    for batch in msrs.chunks(MSR_BATCH) {
        let buf = msr_buf(batch.iter().map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }))?;
        let written = fd.set_msrs(&buf).map_err(fail(id, "KVM_SET_MSRS"))?;
        if written < batch.len() {
            let (index, value) = batch[written];
            return Err(Error::MsrRefused {
                vcpu: id,
                ioctl: "KVM_SET_MSRS",
                index,
                value,
            });
        }
    }
    Ok(())
}

/// The name of MSR `index` among the common ones, for messages.
pub fn msr_name(index: u32) -> Option<&'static str> {
    const MORE: [(u32, &str); 10] = [
        (MSR_IA32_FEATURE_CONTROL, "IA32_FEATURE_CONTROL"),
        (MSR_IA32_TSC_ADJUST, "IA32_TSC_ADJUST"),
        (MSR_IA32_TSC_DEADLINE, "IA32_TSC_DEADLINE"),
        (0x17a, "IA32_MCG_STATUS"),
        (0x17b, "IA32_MCG_CTL"),
        (0x4b56_4d00, "MSR_KVM_WALL_CLOCK_NEW"),
        (0x4b56_4d01, "MSR_KVM_SYSTEM_TIME_NEW"),
        (MSR_KVM_ASYNC_PF_EN, "MSR_KVM_ASYNC_PF_EN"),
        (MSR_KVM_ASYNC_PF_INT, "MSR_KVM_ASYNC_PF_INT"),
        (0x4b56_4d03, "MSR_KVM_STEAL_TIME"),
    ];
    MIGRATED_MSRS
        .iter()
        .chain(MORE.iter())
        .find(|(i, _)| *i == index)
        .map(|&(_, n)| n)
}

fn regs_fields(r: &mut kvm_regs) -> [&mut u64; 18] {
    [
        &mut r.rax,
        &mut r.rbx,
        &mut r.rcx,
        &mut r.rdx,
        &mut r.rsi,
        &mut r.rdi,
        &mut r.rsp,
        &mut r.rbp,
        &mut r.r8,
        &mut r.r9,
        &mut r.r10,
        &mut r.r11,
        &mut r.r12,
        &mut r.r13,
        &mut r.r14,
        &mut r.r15,
        &mut r.rip,
        &mut r.rflags,
    ]
}

fn put_regs(w: &mut Writer, r: &kvm_regs) {
    let mut r = *r;
    for v in regs_fields(&mut r) {
        w.u64(*v);
    }
}

fn get_regs(s: &mut Reader<'_>) -> Result<kvm_regs> {
    let mut r = kvm_regs::default();
    for v in regs_fields(&mut r) {
        *v = s.u64()?;
    }
    Ok(r)
}

fn put_segment(w: &mut Writer, s: &kvm_segment) {
    w.u64(s.base);
    w.u32(s.limit);
    w.u16(s.selector);
    for b in [
        s.type_, s.present, s.dpl, s.db, s.s, s.l, s.g, s.avl, s.unusable,
    ] {
        w.u8(b);
    }
}

fn get_segment(s: &mut Reader<'_>) -> Result<kvm_segment> {
    Ok(kvm_segment {
        base: s.u64()?,
        limit: s.u32()?,
        selector: s.u16()?,
        type_: s.u8()?,
        present: s.u8()?,
        dpl: s.u8()?,
        db: s.u8()?,
        s: s.u8()?,
        l: s.u8()?,
        g: s.u8()?,
        avl: s.u8()?,
        unusable: s.u8()?,
        padding: 0,
    })
}

fn put_sregs(w: &mut Writer, r: &kvm_sregs) {
    for seg in [&r.cs, &r.ds, &r.es, &r.fs, &r.gs, &r.ss, &r.tr, &r.ldt] {
        put_segment(w, seg);
    }
    for t in [&r.gdt, &r.idt] {
        w.u64(t.base);
        w.u16(t.limit);
    }
    for v in [r.cr0, r.cr2, r.cr3, r.cr4, r.cr8, r.efer, r.apic_base] {
        w.u64(v);
    }
    for v in r.interrupt_bitmap {
        w.u64(v);
    }
}

fn get_sregs(s: &mut Reader<'_>) -> Result<kvm_sregs> {
    let mut r = kvm_sregs::default();
    for seg in [
        &mut r.cs, &mut r.ds, &mut r.es, &mut r.fs, &mut r.gs, &mut r.ss, &mut r.tr, &mut r.ldt,
    ] {
        *seg = get_segment(s)?;
    }
    for t in [&mut r.gdt, &mut r.idt] {
        *t = kvm_dtable {
            base: s.u64()?,
            limit: s.u16()?,
            padding: [0; 3],
        };
    }
    for v in [
        &mut r.cr0,
        &mut r.cr2,
        &mut r.cr3,
        &mut r.cr4,
        &mut r.cr8,
        &mut r.efer,
        &mut r.apic_base,
    ] {
        *v = s.u64()?;
    }
    for v in r.interrupt_bitmap.iter_mut() {
        *v = s.u64()?;
    }
    Ok(r)
}

fn put_fpu(w: &mut Writer, f: &kvm_fpu) {
    for r in &f.fpr {
        w.bytes(r);
    }
    w.u16(f.fcw);
    w.u16(f.fsw);
    w.u8(f.ftwx);
    w.u16(f.last_opcode);
    w.u64(f.last_ip);
    w.u64(f.last_dp);
    for x in &f.xmm {
        w.bytes(x);
    }
    w.u32(f.mxcsr);
}

fn get_fpu(s: &mut Reader<'_>) -> Result<kvm_fpu> {
    let mut f = kvm_fpu::default();
    for r in f.fpr.iter_mut() {
        r.copy_from_slice(s.take(16)?);
    }
    f.fcw = s.u16()?;
    f.fsw = s.u16()?;
    f.ftwx = s.u8()?;
    f.last_opcode = s.u16()?;
    f.last_ip = s.u64()?;
    f.last_dp = s.u64()?;
    for x in f.xmm.iter_mut() {
        x.copy_from_slice(s.take(16)?);
    }
    f.mxcsr = s.u32()?;
    Ok(f)
}

fn put_events(w: &mut Writer, e: &kvm_vcpu_events) {
    let x = &e.exception;
    for b in [x.injected, x.nr, x.has_error_code, x.pending] {
        w.u8(b);
    }
    w.u32(x.error_code);
    let i = &e.interrupt;
    for b in [i.injected, i.nr, i.soft, i.shadow] {
        w.u8(b);
    }
    let n = &e.nmi;
    for b in [n.injected, n.pending, n.masked] {
        w.u8(b);
    }
    w.u32(e.sipi_vector);
    w.u32(e.flags);
    let m = &e.smi;
    for b in [m.smm, m.pending, m.smm_inside_nmi, m.latched_init] {
        w.u8(b);
    }
    w.u8(e.triple_fault.pending);
    w.u8(e.exception_has_payload);
    w.u64(e.exception_payload);
}

fn get_events(s: &mut Reader<'_>) -> Result<kvm_vcpu_events> {
    let mut e = kvm_vcpu_events::default();
    let x = &mut e.exception;
    x.injected = s.u8()?;
    x.nr = s.u8()?;
    x.has_error_code = s.u8()?;
    x.pending = s.u8()?;
    x.error_code = s.u32()?;
    let i = &mut e.interrupt;
    i.injected = s.u8()?;
    i.nr = s.u8()?;
    i.soft = s.u8()?;
    i.shadow = s.u8()?;
    let n = &mut e.nmi;
    n.injected = s.u8()?;
    n.pending = s.u8()?;
    n.masked = s.u8()?;
    e.sipi_vector = s.u32()?;
    e.flags = s.u32()?;
    let m = &mut e.smi;
    m.smm = s.u8()?;
    m.pending = s.u8()?;
    m.smm_inside_nmi = s.u8()?;
    m.latched_init = s.u8()?;
    e.triple_fault.pending = s.u8()?;
    e.exception_has_payload = s.u8()?;
    e.exception_payload = s.u64()?;
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VcpuSnapshot {
        let mut regs = kvm_regs::default();
        for (k, v) in regs_fields(&mut regs).into_iter().enumerate() {
            *v = 0x0101_0101_0101_0101u64.wrapping_mul(k as u64 + 1);
        }
        let mut sregs = kvm_sregs {
            cr0: 0x8001_0033,
            cr3: 0x10_0000,
            cr4: 0x20,
            efer: 0x500,
            ..Default::default()
        };
        sregs.cs = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 8,
            type_: 0xb,
            present: 1,
            s: 1,
            l: 1,
            g: 1,
            ..Default::default()
        };
        sregs.gdt.base = 0x1000;
        sregs.gdt.limit = 39;
        sregs.interrupt_bitmap[3] = 1 << 63;
        let mut xsave = Box::new([0u8; XSAVE_BYTES]);
        for (i, b) in xsave.iter_mut().enumerate() {
            *b = (i * 7) as u8;
        }
        let mut lapic = Box::new([0u8; LAPIC_BYTES]);
        lapic[0x80] = 0x20;
        lapic[0xf0..0xf4].copy_from_slice(&0x1ffu32.to_le_bytes());
        lapic[APIC_TMCCT] = 0x77;
        let mut events = kvm_vcpu_events::default();
        events.interrupt.shadow = 1;
        events.flags = 0x5;
        events.exception_payload = u64::MAX - 1;
        let debugregs = kvm_debugregs {
            dr6: 0xffff_0ff0,
            dr7: 0x400,
            ..Default::default()
        };
        let mut s = VcpuSnapshot {
            vcpu_id: 3,
            regs,
            sregs,
            fpu: FpuState::Xsave(xsave),
            xcrs: vec![(0, 7)],
            msrs: vec![(0xc000_0082, 0xffff_8000_0000_1000), (0x277, 0x0007_0406)],
            lapic: Some(lapic),
            events,
            mp_state: 0,
            debugregs,
            vmm: Vec::new(),
        };
        s.set_vmm_section(0x1001, vec![1, 2, 3]).unwrap();
        s
    }

    #[test]
    fn round_trips() {
        let s = sample();
        let blob = s.encode();
        assert!(blob.len() < 6200, "{} bytes", blob.len());
        assert_eq!(&blob[..8], b"DLVCPU\0\0");
        let d = VcpuSnapshot::decode(&blob).unwrap();
        assert_eq!(d, s);
        assert_eq!(d.vmm_section(0x1001), Some(&[1u8, 2, 3][..]));
        assert_eq!(d.vmm_section(0x1002), None);

        let mut legacy = s.clone();
        let mut f = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            last_ip: 9,
            ..Default::default()
        };
        f.xmm[15][0] = 0xaa;
        f.fpr[7][15] = 0x55;
        legacy.fpu = FpuState::Legacy(Box::new(f));
        legacy.xcrs.clear();
        legacy.lapic = None;
        assert_eq!(VcpuSnapshot::decode(&legacy.encode()).unwrap(), legacy);

        // `without_time` zeroes the TSC and the LAPIC's current count, nothing else.
        let mut timed = s.clone();
        timed.msrs.push((MSR_IA32_TSC, 99));
        let t = timed.without_time();
        assert_eq!(t.msr(MSR_IA32_TSC), Some(0));
        assert_eq!(t.msr(0x277), Some(0x0007_0406));
        assert_eq!(t.lapic.as_ref().unwrap()[APIC_TMCCT], 0);
        assert_eq!(t.lapic.as_ref().unwrap()[0x80], 0x20);
    }

    #[test]
    fn reads_version_1() {
        // A version 1 blob is a version 2 blob without LAPIC and with at most 64 MSRs.
        let mut s = sample();
        s.lapic = None;
        let mut blob = s.encode();
        blob[8..12].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(VcpuSnapshot::decode(&blob).unwrap(), s);
        // ... and in version 1, LAPIC is unknown.
        let mut blob = sample().encode();
        blob[8..12].copy_from_slice(&1u32.to_le_bytes());
        let e = VcpuSnapshot::decode(&blob).unwrap_err().to_string();
        assert!(e.contains("unknown section 10"), "{e}");
    }

    #[test]
    fn msr_counts_are_bounded() {
        let mut s = sample();
        s.msrs = (0..MAX_MSRS as u32)
            .map(|i| (0x1000 + i, i as u64))
            .collect();
        assert_eq!(VcpuSnapshot::decode(&s.encode()).unwrap(), s);
        s.msrs.push((0x2000, 1));
        let e = VcpuSnapshot::decode(&s.encode()).unwrap_err().to_string();
        assert!(e.contains("513 MSRs, at most 512"), "{e}");
        let mut s = sample();
        s.lapic = None;
        s.msrs = (0..65).map(|i| (0x1000 + i, 0)).collect();
        let mut blob = s.encode();
        blob[8..12].copy_from_slice(&1u32.to_le_bytes());
        let e = VcpuSnapshot::decode(&blob).unwrap_err().to_string();
        assert!(e.contains("at most 64"), "{e}");
    }

    #[test]
    fn restore_order_puts_dependent_msrs_after_their_parameters() {
        let mut v = vec![
            MSR_IA32_TSC_DEADLINE,
            MSR_KVM_ASYNC_PF_EN,
            0x277,
            MSR_IA32_TSC_ADJUST,
            MSR_KVM_ASYNC_PF_INT,
            MSR_IA32_TSC,
            MSR_IA32_FEATURE_CONTROL,
            0x277,
        ];
        msr_restore_order(&mut v);
        assert_eq!(
            v,
            [
                MSR_IA32_FEATURE_CONTROL,
                MSR_IA32_TSC,
                MSR_IA32_TSC_ADJUST,
                0x277,
                MSR_KVM_ASYNC_PF_INT,
                MSR_KVM_ASYNC_PF_EN,
                MSR_IA32_TSC_DEADLINE
            ]
        );
    }

    #[test]
    fn is_little_endian_at_fixed_offsets() {
        let blob = sample().encode();
        // header: magic, version, vcpu id, section count; then REGS: tag, length, rax.
        assert_eq!(&blob[8..12], &2u32.to_le_bytes());
        assert_eq!(&blob[12..16], &3u32.to_le_bytes());
        assert_eq!(&blob[20..24], &T_REGS.to_le_bytes());
        assert_eq!(&blob[24..28], &144u32.to_le_bytes());
        assert_eq!(&blob[28..36], &0x0101_0101_0101_0101u64.to_le_bytes());
    }

    #[test]
    fn rejects_damage() {
        let blob = sample().encode();
        let err = |b: &[u8]| VcpuSnapshot::decode(b).unwrap_err().to_string();
        assert!(err(&blob[..blob.len() - 1]).contains("truncated"));
        let mut b = blob.clone();
        b[0] ^= 1;
        assert!(err(&b).contains("bad magic"));
        let mut b = blob.clone();
        b[8] = 3;
        assert!(err(&b).contains("version 3"));
        let mut b = blob.clone();
        b.push(0);
        assert!(err(&b).contains("expected"));
        // REGS one word short: its length says 136.
        let mut b = blob.clone();
        b[24..28].copy_from_slice(&136u32.to_le_bytes());
        assert!(!err(&b).is_empty());
        // An unknown (non-VMM) section.
        let mut b = blob.clone();
        b[20..24].copy_from_slice(&77u32.to_le_bytes());
        assert!(err(&b).contains("unknown section 77"));
        // Without REGS: renumber it as a second SREGS.
        let mut b = blob.clone();
        b[20..24].copy_from_slice(&T_SREGS.to_le_bytes());
        let e = err(&b);
        assert!(e.contains("SREGS"), "{e}");
        // Every truncation fails cleanly.
        for cut in 0..blob.len() {
            assert!(VcpuSnapshot::decode(&blob[..cut]).is_err());
        }
    }

    #[test]
    fn vmm_sections_are_checked() {
        let mut s = sample();
        assert!(s.set_vmm_section(5, vec![]).is_err());
        assert!(s
            .set_vmm_section(0x1000, vec![0; MAX_VMM_SECTION + 1])
            .is_err());
        s.set_vmm_section(0x1000, vec![9]).unwrap();
        s.set_vmm_section(0x1001, vec![8]).unwrap();
        assert_eq!(s.vmm, vec![(0x1000, vec![9]), (0x1001, vec![8])]);
    }
}
