//! Booting an x86-64 vCPU straight into 64-bit long mode: the guest-physical layout of the
//! system memslot, identity-mapped page tables with 2 MiB pages, a flat GDT, and the control
//! and general registers (`KVM_SET_SREGS`, `KVM_SET_REGS`, `KVM_SET_CPUID2`).
//!
//! There is no firmware, no interrupt controller and no IDT: guest programs run with
//! interrupts off and never fault; an exception becomes a triple fault, which the harness
//! reports as a shutdown exit with the registers.

use kvm_bindings::{kvm_regs, kvm_segment, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};

use crate::error::{Error, Op, Result};
use crate::memory::GuestMemory;

/// Guest-physical layout of the system memslot (slot 0, never logged), identity mapped.
pub mod layout {
    /// The GDT: null, 64-bit code (0x08), data (0x10), TSS (0x18, 16 bytes).
    pub const GDT: u64 = 0x1000;
    /// The control region shared by host and guests: see [`crate::guest::control`].
    pub const CONTROL: u64 = 0x10000;
    /// Size of the control region.
    pub const CONTROL_SIZE: u64 = 0x4000;
    /// Guest programs.
    pub const CODE: u64 = 0x20000;
    /// Room for guest programs.
    pub const CODE_SIZE: u64 = 0x10000;
    /// A scratch stack (guest programs use none, but `rsp` points somewhere harmless).
    pub const STACK_TOP: u64 = 0x40000;
    /// Page lists of the script program ([`crate::guest::Program::Script`]), split evenly
    /// among the vCPUs.
    pub const SCRIPT: u64 = 0x40000;
    /// Size of the script area (up to the page tables).
    pub const SCRIPT_SIZE: u64 = PAGE_TABLES - SCRIPT;
    /// PML4; the PDPT follows, then one page directory per GiB.
    pub const PAGE_TABLES: u64 = 0x100000;
    /// Highest identity-mapped address (one PDPT: 512 GiB).
    pub const MAX_GPA: u64 = 512 << 30;
    /// Where test memslots may start (above the system slot).
    pub const TEST_BASE: u64 = 1 << 30;
}

const GIB: u64 = 1 << 30;
const PTE_P: u64 = 1 << 0;
const PTE_RW: u64 = 1 << 1;
const PTE_A: u64 = 1 << 5;
const PTE_D: u64 = 1 << 6;
const PTE_PS: u64 = 1 << 7;

/// Size of the system memslot for guests whose memory ends below `top_gpa`: the fixed
/// areas plus one page directory per GiB.
pub fn system_slot_size(top_gpa: u64) -> u64 {
    layout::PAGE_TABLES + 0x1000 * (2 + top_gpa.div_ceil(GIB))
}

/// Write identity-mapped page tables covering `[0, top_gpa)` into the system memory `sys`
/// (which is mapped at guest-physical 0). Leaves are 2 MiB pages with Accessed and Dirty
/// preset, so the CPU never writes the tables (they stay clean for dirty logging anyway).
pub fn write_page_tables(sys: &GuestMemory, top_gpa: u64) -> Result<()> {
    if top_gpa > layout::MAX_GPA {
        return Err(Error::Config(format!(
            "guest memory ends at {top_gpa:#x}, above the {:#x} this harness maps",
            layout::MAX_GPA
        )));
    }
    if (sys.len() as u64) < system_slot_size(top_gpa) {
        return Err(Error::Config(
            "system memory too small for the page tables".into(),
        ));
    }
    let pml4 = layout::PAGE_TABLES;
    let pdpt = pml4 + 0x1000;
    let table = PTE_P | PTE_RW | PTE_A;
    sys.write_u64(pml4, pdpt | table);
    for g in 0..top_gpa.div_ceil(GIB) {
        let pd = pdpt + 0x1000 * (1 + g);
        sys.write_u64(pdpt + 8 * g, pd | table);
        for e in 0..512u64 {
            let addr = g * GIB + (e << 21);
            sys.write_u64(pd + 8 * e, addr | PTE_P | PTE_RW | PTE_A | PTE_D | PTE_PS);
        }
    }
    Ok(())
}

/// Write the GDT into the system memory.
pub fn write_gdt(sys: &GuestMemory) {
    // Flat descriptors: base 0, limit 0xfffff, G=1.
    let code64: u64 = 0x00af_9b00_0000_ffff; // P, DPL0, S, type 0xb (exec/read, accessed), L=1
    let data: u64 = 0x00cf_9300_0000_ffff; // P, DPL0, S, type 0x3 (read/write, accessed), D/B=1
    let tss_lo: u64 = 0x0000_8b00_0000_0067; // P, type 0xb (busy 64-bit TSS), limit 0x67, base 0
    for (i, d) in [0, code64, data, tss_lo, 0].iter().enumerate() {
        sys.write_u64(layout::GDT + 8 * i as u64, *d);
    }
}

fn segment(selector: u16, type_: u8, s: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Put a fresh vCPU into 64-bit long mode with the host's supported CPUID: paging with the
/// identity map, flat segments from [`write_gdt`], EFER.LME|LMA, interrupts off.
pub fn setup_long_mode(kvm: &Kvm, vcpu: &VcpuFd) -> Result<()> {
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| Error::from_sys(Op::VcpuState, e))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| Error::from_sys(Op::VcpuState, e))?;
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| Error::from_sys(Op::VcpuState, e))?;
    let code = segment(0x08, 0xb, 1, 1, 0);
    let data = segment(0x10, 0x3, 1, 0, 1);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        limit: 0x67,
        type_: 0xb,
        s: 0,
        l: 0,
        db: 0,
        g: 0,
        ..segment(0x18, 0xb, 0, 0, 0)
    };
    sregs.gdt.base = layout::GDT;
    sregs.gdt.limit = 5 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr3 = layout::PAGE_TABLES;
    sregs.cr4 = 1 << 5; // PAE
    sregs.cr0 = (1 << 0) | (1 << 1) | (1 << 4) | (1 << 5) | (1 << 16) | (1 << 31); // PE MP ET NE WP PG
    sregs.efer = (1 << 8) | (1 << 10); // LME LMA
    vcpu.set_sregs(&sregs)
        .map_err(|e| Error::from_sys(Op::VcpuState, e))?;
    Ok(())
}

/// Initial general registers of a guest program: entry point and the argument registers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EntryRegs {
    /// Entry point.
    pub rip: u64,
    /// `rbx`, `r8` .. `r15` (indexes 0 = rbx, 1 = r8, ..., 8 = r15).
    pub args: [u64; 9],
}

/// `KVM_SET_REGS` with `EntryRegs`, interrupts off.
pub fn set_entry_regs(vcpu: &VcpuFd, e: &EntryRegs) -> Result<()> {
    let a = e.args;
    let regs = kvm_regs {
        rip: e.rip,
        rflags: 0x2,
        rsp: layout::STACK_TOP,
        rbx: a[0],
        r8: a[1],
        r9: a[2],
        r10: a[3],
        r11: a[4],
        r12: a[5],
        r13: a[6],
        r14: a[7],
        r15: a[8],
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(|e| Error::from_sys(Op::VcpuState, e))
}

/// The vCPU's registers as one line, for error reports.
pub fn describe_state(vcpu: &VcpuFd) -> String {
    let mut s = String::new();
    match vcpu.get_regs() {
        Ok(r) => s.push_str(&format!(
            "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} r8={:#x} r9={:#x} r10={:#x} r11={:#x} r12={:#x} r13={:#x} r14={:#x} r15={:#x}",
            r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15
        )),
        Err(e) => s.push_str(&format!("(KVM_GET_REGS failed: {e})")),
    }
    match vcpu.get_sregs() {
        Ok(r) => s.push_str(&format!(
            " cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}/l={}",
            r.cr0, r.cr2, r.cr3, r.cr4, r.efer, r.cs.selector, r.cs.l
        )),
        Err(e) => s.push_str(&format!(" (KVM_GET_SREGS failed: {e})")),
    }
    s
}
