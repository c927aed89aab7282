//! Saving and restoring the architectural state of an x86-64 vCPU, and the versioned blob it
//! travels in (one `VcpuState` frame of a migration stream per vCPU).
//!
//! # What is saved
//!
//! Everything KVM keeps for a vCPU of this harness, which has no in-kernel irqchip (so no
//! LAPIC, PIC or IOAPIC state exists to save):
//!
//! | section | ioctl | contents |
//! |---|---|---|
//! | `REGS` | `KVM_GET_REGS` | the 16 general registers, `rip`, `rflags` |
//! | `SREGS` | `KVM_GET_SREGS` | the 8 segment registers with their hidden parts, GDT/IDT, `cr0`/`cr2`/`cr3`/`cr4`/`cr8`, `EFER`, `APIC_BASE`, the pending-interrupt bitmap |
//! | `XSAVE` | `KVM_GET_XSAVE` | x87, SSE, AVX, ... in the CPU's XSAVE layout (4 KiB); `FPU` (`KVM_GET_FPU`) instead on kernels without `KVM_CAP_XSAVE` |
//! | `XCRS` | `KVM_GET_XCRS` | `XCR0` (with `KVM_CAP_XCRS`) |
//! | `MSRS` | `KVM_GET_MSRS` | the MSRs of [`MIGRATED_MSRS`] that the kernel lists in `KVM_GET_MSR_INDEX_LIST`: `STAR`, `LSTAR`, `CSTAR`, `SFMASK`, `KERNEL_GS_BASE`, `TSC_AUX`, `SYSENTER_*`, `PAT`, `TSC` (`FS_BASE`/`GS_BASE` are in `SREGS`) |
//! | `EVENTS` | `KVM_GET_VCPU_EVENTS` | pending and injected exceptions, interrupts, NMIs, SMM, interrupt shadow |
//! | `MP_STATE` | `KVM_GET_MP_STATE` | runnable, halted, ... |
//! | `DEBUGREGS` | `KVM_GET_DEBUGREGS` | `DR0`–`DR3`, `DR6`, `DR7` |
//!
//! Restoring follows QEMU's `kvm_arch_put_registers` order: regs, XSAVE/FPU, XCRs, sregs,
//! MSRs, events, MP state, debug registers. The target vCPU must have had its CPUID set first
//! (which MSRs and XSAVE components are valid depends on it).
//!
//! # The blob
//!
//! ```text
//! blob    = magic "DLVCPU\0\0" | version u32 (= 1) | vcpu_id u32 | nsections u32 | section*
//! section = tag u32 | length u32 | payload[length]
//! ```
//!
//! Every integer is little-endian and every field of every KVM structure is written one by one
//! at a fixed offset of its section, never as a `memcpy` of the bindgen struct. That keeps the
//! format independent of Rust's and bindgen's layout (padding, unions, field order changes
//! between `kvm-bindings` versions) and of the host's byte order, and it lets the decoder check
//! each section's exact length before reading it. The XSAVE area is copied as bytes because it
//! already has a fixed, CPU-defined little-endian layout. Sections are tagged so that a reader
//! can name what is missing or unknown: a section it does not know is an error (never silently
//! dropped CPU state), except VMM sections (tags from [`VMM_SECTION_BASE`]), which carry the
//! VMM's own per-vCPU device state opaquely. The whole blob is a few kilobytes (4.8 KiB with
//! XSAVE), far below the wire format's 1 MiB limit.
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
//!
//! The harness's VMs have no in-kernel irqchip, so there is no LAPIC state to save; a VMM with
//! one adds `KVM_GET_LAPIC`/`KVM_SET_LAPIC` (a new section, and a new blob version).

use kvm_bindings::{
    kvm_debugregs, kvm_dtable, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd};

use crate::error::{Error, Result};
use crate::sys;

/// `KVM_CAP_XSAVE`.
const KVM_CAP_XSAVE: u32 = 55;
/// `KVM_CAP_XCRS`.
const KVM_CAP_XCRS: u32 = 56;

/// First bytes of every blob.
pub const BLOB_MAGIC: [u8; 8] = *b"DLVCPU\0\0";
/// The blob version this build writes and reads.
pub const BLOB_VERSION: u32 = 1;
/// Section tags from here up belong to the VMM ([`VcpuSnapshot::vmm`]) and are carried
/// opaquely.
pub const VMM_SECTION_BASE: u32 = 0x1000;

const T_REGS: u32 = 1;
const T_SREGS: u32 = 2;
const T_XSAVE: u32 = 3;
const T_FPU: u32 = 4;
const T_XCRS: u32 = 5;
const T_MSRS: u32 = 6;
const T_EVENTS: u32 = 7;
const T_MP_STATE: u32 = 8;
const T_DEBUGREGS: u32 = 9;

/// Bytes of the XSAVE area of `KVM_GET_XSAVE`.
pub const XSAVE_BYTES: usize = 4096;
/// Most MSRs a blob may carry.
const MAX_MSRS: usize = 64;
/// Most XCRs a blob may carry (`kvm_xcrs::xcrs`).
const MAX_XCRS: usize = 16;
/// Most bytes of one VMM section.
const MAX_VMM_SECTION: usize = 64 << 10;

/// MSRs saved when the kernel lists them (`KVM_GET_MSR_INDEX_LIST`): the ones 64-bit code
/// and its OS depend on besides `EFER` (in `SREGS`) and the segment bases.
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
    /// The MSRs of [`MIGRATED_MSRS`] the kernel lists.
    pub msrs: Vec<u32>,
}

impl StateSpec {
    /// Ask the kernel.
    pub fn probe(kvm: &Kvm) -> Result<Self> {
        let listed = kvm.get_msr_index_list().map_err(|e| Error::VcpuState {
            vcpu: 0,
            ioctl: "KVM_GET_MSR_INDEX_LIST",
            errno: e.errno(),
        })?;
        let listed = listed.as_slice();
        Ok(StateSpec {
            xsave: sys::check_extension(kvm, KVM_CAP_XSAVE)? > 0,
            xcrs: sys::check_extension(kvm, KVM_CAP_XCRS)? > 0,
            msrs: MIGRATED_MSRS
                .iter()
                .map(|&(i, _)| i)
                .filter(|i| listed.contains(i))
                .collect(),
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
    /// `(index, value)` of the saved MSRs.
    pub msrs: Vec<(u32, u64)>,
    /// Pending and injected events.
    pub events: kvm_vcpu_events,
    /// `KVM_MP_STATE_*`.
    pub mp_state: u32,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// VMM sections `(tag ≥ VMM_SECTION_BASE, bytes)`, in tag order, carried opaquely.
    pub vmm: Vec<(u32, Vec<u8>)>,
}

/// Map a failed `kvm-ioctls` call on vCPU `vcpu` to [`Error::VcpuState`] naming `ioctl`.
fn fail(vcpu: u32, ioctl: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> Error {
    move |e| Error::VcpuState {
        vcpu,
        ioctl,
        errno: e.errno(),
    }
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
            events,
            mp_state: mp.mp_state,
            debugregs,
            vmm: Vec::new(),
        })
    }

    /// Load this state into the vCPU behind `fd`, which must not be running and must have its
    /// CPUID set. Errors name the ioctl (and for MSRs, the MSR) the kernel refused.
    pub fn restore(&self, fd: &VcpuFd) -> Result<()> {
        let id = self.vcpu_id;
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
            let mut x = kvm_xcrs {
                nr_xcrs: self.xcrs.len() as u32,
                ..Default::default()
            };
            for (slot, &(xcr, value)) in x.xcrs.iter_mut().zip(&self.xcrs) {
                slot.xcr = xcr;
                slot.value = value;
            }
            fd.set_xcrs(&x).map_err(fail(id, "KVM_SET_XCRS"))?;
        }
        fd.set_sregs(&self.sregs)
            .map_err(fail(id, "KVM_SET_SREGS"))?;
        set_msrs(fd, id, &self.msrs)?;
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

    /// The VMM section `tag`, if present.
    pub fn vmm_section(&self, tag: u32) -> Option<&[u8]> {
        self.vmm
            .iter()
            .find(|(t, _)| *t == tag)
            .map(|(_, b)| b.as_slice())
    }

    /// Add (or replace) VMM section `tag` (at least [`VMM_SECTION_BASE`], at most 64 KiB).
    pub fn set_vmm_section(&mut self, tag: u32, bytes: Vec<u8>) -> Result<()> {
        if tag < VMM_SECTION_BASE || bytes.len() > MAX_VMM_SECTION {
            return Err(Error::VcpuBlob(format!(
                "VMM section {tag:#x} of {} bytes: tags start at {VMM_SECTION_BASE:#x}, sections \
                 hold at most {MAX_VMM_SECTION} bytes",
                bytes.len()
            )));
        }
        self.vmm.retain(|(t, _)| *t != tag);
        self.vmm.push((tag, bytes));
        self.vmm.sort_by_key(|(t, _)| *t);
        Ok(())
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

        let mut out = Writer::default();
        out.bytes(&BLOB_MAGIC);
        out.u32(BLOB_VERSION);
        out.u32(self.vcpu_id);
        out.u32(sections.len() as u32);
        for (tag, payload) in sections {
            out.u32(tag);
            out.u32(payload.len() as u32);
            out.bytes(&payload);
        }
        out.take()
    }

    /// Parse and validate a blob: magic, version, every section's exact length, each known
    /// section at most once, the required ones present, nothing after the last section.
    pub fn decode(blob: &[u8]) -> Result<Self> {
        let mut r = Reader::new(blob, "the blob header");
        if r.take(8)? != BLOB_MAGIC {
            return Err(Error::VcpuBlob(
                "not a dirtylog KVM vCPU state (bad magic)".into(),
            ));
        }
        let version = r.u32()?;
        if version != BLOB_VERSION {
            return Err(Error::VcpuBlob(format!(
                "vCPU state version {version}; this build reads version {BLOB_VERSION}"
            )));
        }
        let vcpu_id = r.u32()?;
        let n = r.u32()?;
        let mut regs = None;
        let mut sregs = None;
        let mut fpu = None;
        let mut xcrs = None;
        let mut msrs = None;
        let mut events = None;
        let mut mp_state = None;
        let mut debugregs = None;
        let mut vmm: Vec<(u32, Vec<u8>)> = Vec::new();
        for _ in 0..n {
            let tag = r.u32()?;
            let len = r.u32()? as usize;
            let payload = r.take(len)?;
            let mut s = Reader::new(payload, section_name(tag));
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
                    if count > MAX_MSRS {
                        return Err(Error::VcpuBlob(format!("{count} MSRs, at most {MAX_MSRS}")));
                    }
                    let mut v = Vec::with_capacity(count);
                    for _ in 0..count {
                        v.push((s.u32()?, s.u64()?));
                    }
                    if msrs.replace(v).is_some() {
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
                    if len > MAX_VMM_SECTION {
                        return Err(Error::VcpuBlob(format!(
                            "VMM section {t:#x} of {len} bytes, at most {MAX_VMM_SECTION}"
                        )));
                    }
                    if vmm.iter().any(|(x, _)| *x == t) {
                        return Err(dup());
                    }
                    vmm.push((t, s.take(len)?.to_vec()));
                }
                t => {
                    return Err(Error::VcpuBlob(format!(
                        "unknown section {t}: written by a newer dirtylog? Refusing to drop CPU \
                         state"
                    )))
                }
            }
            s.finish()?;
        }
        r.finish()?;
        let missing = |what: &str| Error::VcpuBlob(format!("the {what} section is missing"));
        vmm.sort_by_key(|(t, _)| *t);
        Ok(VcpuSnapshot {
            vcpu_id,
            regs: regs.ok_or_else(|| missing("REGS"))?,
            sregs: sregs.ok_or_else(|| missing("SREGS"))?,
            fpu: fpu.ok_or_else(|| missing("XSAVE or FPU"))?,
            xcrs: xcrs.unwrap_or_default(),
            msrs: msrs.ok_or_else(|| missing("MSRS"))?,
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
        T_EVENTS => "EVENTS",
        T_MP_STATE => "MP_STATE",
        T_DEBUGREGS => "DEBUGREGS",
        t if t >= VMM_SECTION_BASE => "VMM",
        _ => "unknown",
    }
}

fn msr_buf(entries: impl Iterator<Item = kvm_msr_entry>, id: u32) -> Result<Msrs> {
    let entries: Vec<kvm_msr_entry> = entries.take(MAX_MSRS).collect();
    Msrs::from_entries(&entries).map_err(|_| Error::VcpuState {
        vcpu: id,
        ioctl: "KVM_*_MSRS (too many MSRs)",
        errno: libc::E2BIG,
    })
}

/// `KVM_GET_MSRS` of `indexes`; fails naming the first MSR the kernel would not read.
fn get_msrs(fd: &VcpuFd, id: u32, indexes: &[u32]) -> Result<Vec<(u32, u64)>> {
    let mut buf = msr_buf(
        indexes.iter().map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        }),
        id,
    )?;
    let n = buf.as_slice().len();
    let read = fd.get_msrs(&mut buf).map_err(fail(id, "KVM_GET_MSRS"))?;
    if read < n {
        return Err(Error::VcpuState {
            vcpu: id,
            ioctl: msr_name(indexes[read]),
            errno: libc::EINVAL,
        });
    }
    Ok(buf.as_slice().iter().map(|e| (e.index, e.data)).collect())
}

/// `KVM_SET_MSRS`; fails naming the first MSR the kernel refused.
fn set_msrs(fd: &VcpuFd, id: u32, msrs: &[(u32, u64)]) -> Result<()> {
    if msrs.is_empty() {
        return Ok(());
    }
    let buf = msr_buf(
        msrs.iter().map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }),
        id,
    )?;
    let n = buf.as_slice().len();
    let written = fd.set_msrs(&buf).map_err(fail(id, "KVM_SET_MSRS"))?;
    if written < n {
        return Err(Error::VcpuState {
            vcpu: id,
            ioctl: msr_name(msrs[written].0),
            errno: libc::EINVAL,
        });
    }
    Ok(())
}

fn msr_name(index: u32) -> &'static str {
    MIGRATED_MSRS
        .iter()
        .find(|(i, _)| *i == index)
        .map_or("KVM_*_MSRS (an MSR)", |(_, n)| *n)
}

/// Little-endian field writer.
#[derive(Default)]
struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

/// Little-endian field reader over one section; every read is bounds-checked.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, at: 0, what }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                Error::VcpuBlob(format!(
                    "{} is truncated: {} bytes, {} needed",
                    self.what,
                    self.buf.len(),
                    self.at.saturating_add(n)
                ))
            })?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn finish(&self) -> Result<()> {
        if self.at != self.buf.len() {
            return Err(Error::VcpuBlob(format!(
                "{} has {} bytes, {} expected",
                self.what,
                self.buf.len(),
                self.at
            )));
        }
        Ok(())
    }
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
        assert!(blob.len() < 5000, "{} bytes", blob.len());
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
        assert_eq!(VcpuSnapshot::decode(&legacy.encode()).unwrap(), legacy);
    }

    #[test]
    fn is_little_endian_at_fixed_offsets() {
        let blob = sample().encode();
        // header: magic, version, vcpu id, section count; then REGS: tag, length, rax.
        assert_eq!(&blob[8..12], &1u32.to_le_bytes());
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
        b[8] = 2;
        assert!(err(&b).contains("version 2"));
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
