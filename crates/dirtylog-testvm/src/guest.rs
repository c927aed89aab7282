//! Guest programs, generated with iced-x86's `CodeAssembler`, and the control region they
//! share with the host.
//!
//! Every program is a tight loop with no VM exit inside it; it leaves the loop only through an
//! `out` to one of the [`ports`] that is part of its workload (memstress and the script sync
//! after each pass, the dirtier asks for budget, the device dirtier for its mailbox), or, for
//! [`Program::Halt`], through `HLT`. No program polls anything to be stopped: the VMM pauses
//! vCPUs itself, at any instruction ([`crate::runner::Runner::pause`]).
//! Register arguments, set by the host at entry ([`crate::x86::EntryRegs`]):
//!
//! | reg | meaning |
//! |---|---|
//! | `r8` | this vCPU's control block (GPA = GVA) |
//! | `r9` | the global control header |
//! | `r10` | base of the memory the program writes |
//! | `r11` | number of pages there |
//! | `r12` | random generator state (an LCG; `rsi` holds its multiplier) |
//! | `rbx` | a tag or-ed into stamped values (dirtier) |

use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;

use crate::error::{Error, Result};

/// I/O ports guests use to talk to the host.
pub mod ports {
    /// Park until the host releases this vCPU ("sync"; `GUEST_SYNC` in the kernel's tests):
    /// memstress and the script program, after each pass.
    pub const SYNC: u16 = 0x10;
    /// The dirtier ran out of write budget: the host paces it.
    pub const BUDGET: u16 = 0x11;
    /// The device dirtier asks the VMM to fill its mailbox (a VMM write to guest memory; see
    /// [`super::Program::DeviceDirtier`]). Handled by a device the VMM registers
    /// ([`crate::runner::Runner::set_port_handler`]).
    pub const MAILBOX: u16 = 0x12;
}

/// The control region at [`crate::x86::layout::CONTROL`]: a global header, then one 128-byte
/// block per vCPU. All fields are 8-byte words.
pub mod control {
    /// Header: the value the stamping and memstress programs write (`iteration`). (Offset 0
    /// is unused: it held the `STOP` word guests used to poll.)
    pub const ITERATION: u64 = 0x08;
    /// Header: dirtier busy-wait loop count between writes (0 = none; read at entry and after
    /// every budget exit).
    pub const DELAY: u64 = 0x10;
    /// Header: the device dirtier does an `out` to [`super::ports::MAILBOX`] every this many
    /// writes (0 = never; read at entry).
    pub const MAILBOX_EVERY: u64 = 0x18;
    /// Header: guest-physical address of the mailbox page the VMM fills (0 = none). Set by
    /// the VMM; it lives in guest memory so that a migrated guest brings it along.
    pub const MAILBOX: u64 = 0x20;
    /// Offset of vCPU 0's block.
    pub const VCPU_BASE: u64 = 0x100;
    /// Size of a vCPU block.
    pub const VCPU_SIZE: u64 = 0x80;
    /// vCPU block: writes done (stamping: since the host last zeroed it; memstress, dirtier
    /// and tight loop: total).
    pub const WRITES: u64 = 0x00;
    /// vCPU block: completed passes (memstress).
    pub const PASSES: u64 = 0x08;
    /// vCPU block: the dirtier writes while `WRITES < BUDGET`.
    pub const BUDGET: u64 = 0x10;
    /// vCPU block: dirtier and tight-loop working-set base address (read at entry; the
    /// dirtier also after every budget exit).
    pub const WS_BASE: u64 = 0x18;
    /// vCPU block: dirtier and tight-loop working-set size in pages, at least 1 (as
    /// `WS_BASE`).
    pub const WS_PAGES: u64 = 0x20;
    /// vCPU block: dirtier pattern, 0 = sequential, 1 = random (as `WS_BASE`).
    pub const PATTERN: u64 = 0x28;
    /// vCPU block: script program, guest-physical address of this vCPU's page list (8-byte
    /// page indexes into the test range; read after every sync).
    pub const SCRIPT: u64 = 0x30;
    /// vCPU block: script program, number of entries in the page list (read after every sync).
    pub const SCRIPT_LEN: u64 = 0x38;

    /// Offset of vCPU `i`'s block in the control region.
    pub const fn vcpu(i: u32) -> u64 {
        VCPU_BASE + i as u64 * VCPU_SIZE
    }

    /// vCPUs the region has room for.
    pub const fn max_vcpus(region: u64) -> u32 {
        ((region - VCPU_BASE) / VCPU_SIZE) as u32
    }
}

/// The workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Program {
    /// `dirty_log_test`'s guest: forever, copy `ITERATION` to the start of a pseudo-random
    /// page with one `movsq` (memory to memory: a store interrupted by an exit, or logged and
    /// not yet retired when the vCPU is paused, re-reads `ITERATION` when it executes; see
    /// [`Program::store_ip`]), count the write (10 instructions per write).
    Stamp,
    /// memstress: sync; then write `ITERATION` into the first 8 bytes of every page of the
    /// partition once, count the pass, and sync again; the host drives passes.
    Memstress,
    /// A tunable dirtier: while `WRITES < BUDGET`, write a stamp (`rbx | write serial`) to the
    /// next page of the working set (sequential or random), then spin `DELAY` times; out of
    /// budget, exit to the host through `BUDGET`, then reload the working set, pattern and
    /// delay (the host forces a reload by zeroing `BUDGET`).
    Dirtier,
    /// A scripted writer: sync; then, for each page index of the list at `SCRIPT`
    /// (`SCRIPT_LEN` entries, set by the host while the vCPU is parked), write `ITERATION`
    /// into the first 8 bytes of that page of the test range, in list order (repeats write
    /// again); count the writes and the pass, and sync again. The host drives passes as for
    /// memstress (see [`crate::machine::Machine::set_script`]).
    Script,
    /// [`Dirtier`](Self::Dirtier), plus a device request: every `MAILBOX_EVERY` writes (a
    /// countdown in `rdi`, loaded at entry), an `out` to [`ports::MAILBOX`], on which the VMM
    /// writes into the mailbox page. Two instructions per write more than the dirtier.
    DeviceDirtier,
    /// A guest that never exits and never reads a host word: forever, increment its `WRITES`
    /// word and store the new count into the next page of its working set (`WS_BASE`,
    /// `WS_PAGES`, read once at entry), sweeping it sequentially (10 instructions per write).
    TightLoop,
    /// `cli; hlt; jmp` back to the `cli`: halted with interrupts off, forever. Writes nothing.
    Halt,
}

fn asm_err(e: iced_x86::IcedError) -> Error {
    Error::Assemble(e.to_string())
}

/// Knuth's MMIX LCG multiplier. Guests are emulated slowly on some hosts (about 1 µs per
/// instruction under PVM), so the generator is a 2-instruction LCG step rather than a
/// 9-instruction xorshift; its high bits, which pick the page, are well distributed.
const LCG_MUL: u64 = 6_364_136_223_846_793_005;

/// Load the LCG multiplier into `mul` (once, before a loop).
fn lcg_init(a: &mut CodeAssembler, mul: AsmRegister64) -> Result<(), iced_x86::IcedError> {
    a.mov(mul, LCG_MUL)
}

/// One LCG step on r12 (`r12 = r12 * LCG_MUL + 1`, the multiplier in `mul`), then
/// rdx = (r12 * r11) >> 64: a page in `[0, r11)` from the generator's high bits (clobbers rax).
fn random_page(a: &mut CodeAssembler, mul: AsmRegister64) -> Result<(), iced_x86::IcedError> {
    a.imul_2(r12, mul)?;
    a.inc(r12)?;
    a.mov(rax, r12)?;
    a.mul(r11)
}

/// The stamping loop; returns the label of its only store to the test pages (the `movsq`).
fn stamp(a: &mut CodeAssembler) -> Result<CodeLabel, iced_x86::IcedError> {
    use control::*;
    let mut top = a.create_label();
    let mut store = a.create_label();
    lcg_init(a, r14)?;
    a.set_label(&mut top)?;
    random_page(a, r14)?;
    a.shl(rdx, 12)?;
    a.lea(rdi, qword_ptr(r10 + rdx))?;
    a.lea(rsi, qword_ptr(r9 + ITERATION))?;
    a.set_label(&mut store)?;
    a.movsq()?;
    a.inc(qword_ptr(r8 + WRITES))?;
    a.jmp(top)?;
    Ok(store)
}

fn memstress(a: &mut CodeAssembler) -> Result<(), iced_x86::IcedError> {
    use control::*;
    let mut top = a.create_label();
    let mut pass = a.create_label();
    a.set_label(&mut top)?;
    a.out(ports::SYNC as i32, al)?;
    a.mov(rax, qword_ptr(r9 + ITERATION))?;
    a.mov(rcx, r10)?;
    a.mov(rdx, r11)?;
    a.shl(rdx, 12)?;
    a.add(rdx, r10)?;
    a.set_label(&mut pass)?;
    a.mov(qword_ptr(rcx), rax)?;
    a.add(rcx, 4096)?;
    a.cmp(rcx, rdx)?;
    a.jb(pass)?;
    a.add(qword_ptr(r8 + WRITES), r11)?;
    a.inc(qword_ptr(r8 + PASSES))?;
    a.jmp(top)?;
    Ok(())
}

fn script(a: &mut CodeAssembler) -> Result<(), iced_x86::IcedError> {
    use control::*;
    let mut top = a.create_label();
    let mut each = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut top)?;
    a.out(ports::SYNC as i32, al)?;
    a.mov(rax, qword_ptr(r9 + ITERATION))?;
    a.mov(rcx, qword_ptr(r8 + SCRIPT))?;
    a.mov(rdx, qword_ptr(r8 + SCRIPT_LEN))?;
    a.test(rdx, rdx)?;
    a.jz(done)?;
    a.mov(r13, rdx)?;
    a.set_label(&mut each)?;
    a.mov(rdi, qword_ptr(rcx))?;
    a.shl(rdi, 12)?;
    a.mov(qword_ptr(r10 + rdi), rax)?;
    a.add(rcx, 8)?;
    a.dec(rdx)?;
    a.jnz(each)?;
    a.add(qword_ptr(r8 + WRITES), r13)?;
    a.set_label(&mut done)?;
    a.inc(qword_ptr(r8 + PASSES))?;
    a.jmp(top)?;
    Ok(())
}

/// The dirtier: writes pages of its working set (sequentially or at random) within the
/// budget the host grants, with an optional delay loop per write; reloads its parameters after
/// every budget exit. With `mailbox`, every `MAILBOX_EVERY` writes it also asks the VMM (port
/// `MAILBOX`) to write guest memory.
fn dirtier(a: &mut CodeAssembler, mailbox: bool) -> Result<(), iced_x86::IcedError> {
    use control::*;
    let mut reload = a.create_label();
    let mut top = a.create_label();
    let mut budget = a.create_label();
    let mut random = a.create_label();
    let mut write = a.create_label();
    let mut wrote = a.create_label();
    let mut delay = a.create_label();
    let mut seq_ok = a.create_label();
    // r13 = sequential index, r14 = delay count, r15 = pattern, rdi = writes left until
    // the next mailbox request.
    lcg_init(a, rsi)?;
    a.xor(r13, r13)?;
    if mailbox {
        a.mov(rdi, qword_ptr(r9 + MAILBOX_EVERY))?;
    }
    a.set_label(&mut reload)?;
    a.mov(r10, qword_ptr(r8 + WS_BASE))?;
    a.mov(r11, qword_ptr(r8 + WS_PAGES))?;
    a.mov(r15, qword_ptr(r8 + PATTERN))?;
    a.mov(r14, qword_ptr(r9 + DELAY))?;
    a.cmp(r13, r11)?;
    a.jb(top)?;
    a.xor(r13, r13)?;
    a.set_label(&mut top)?;
    a.mov(rax, qword_ptr(r8 + WRITES))?;
    a.cmp(rax, qword_ptr(r8 + BUDGET))?;
    a.jae(budget)?;
    a.test(r15, r15)?;
    a.jnz(random)?;
    a.mov(rdx, r13)?;
    a.inc(r13)?;
    a.cmp(r13, r11)?;
    a.jb(seq_ok)?;
    a.xor(r13, r13)?;
    a.set_label(&mut seq_ok)?;
    a.jmp(write)?;
    a.set_label(&mut random)?;
    random_page(a, rsi)?;
    a.set_label(&mut write)?;
    a.shl(rdx, 12)?;
    a.mov(rax, qword_ptr(r8 + WRITES))?;
    a.inc(rax)?;
    a.mov(qword_ptr(r8 + WRITES), rax)?;
    a.or(rax, rbx)?;
    a.mov(qword_ptr(r10 + rdx), rax)?;
    if mailbox {
        a.dec(rdi)?;
        a.jnz(wrote)?;
        a.out(ports::MAILBOX as i32, al)?;
        a.mov(rdi, qword_ptr(r9 + MAILBOX_EVERY))?;
        a.set_label(&mut wrote)?;
    }
    a.mov(rcx, r14)?;
    a.test(rcx, rcx)?;
    a.jz(top)?;
    a.set_label(&mut delay)?;
    a.dec(rcx)?;
    a.jnz(delay)?;
    a.jmp(top)?;
    a.set_label(&mut budget)?;
    a.out(ports::BUDGET as i32, al)?;
    a.jmp(reload)?;
    Ok(())
}

/// The tight loop: `WRITES += 1`, store it into the next page of the working set, forever.
fn tight_loop(a: &mut CodeAssembler) -> Result<(), iced_x86::IcedError> {
    use control::*;
    let mut top = a.create_label();
    let mut next = a.create_label();
    a.mov(r10, qword_ptr(r8 + WS_BASE))?;
    a.mov(r11, qword_ptr(r8 + WS_PAGES))?;
    a.xor(r13, r13)?;
    a.set_label(&mut top)?;
    a.mov(rax, qword_ptr(r8 + WRITES))?;
    a.inc(rax)?;
    a.mov(qword_ptr(r8 + WRITES), rax)?;
    a.mov(rdx, r13)?;
    a.shl(rdx, 12)?;
    a.mov(qword_ptr(r10 + rdx), rax)?;
    a.inc(r13)?;
    a.cmp(r13, r11)?;
    a.jb(next)?;
    a.xor(r13, r13)?;
    a.set_label(&mut next)?;
    a.jmp(top)?;
    Ok(())
}

/// `cli; hlt; jmp` back.
fn halt(a: &mut CodeAssembler) -> Result<(), iced_x86::IcedError> {
    let mut top = a.create_label();
    a.set_label(&mut top)?;
    a.cli()?;
    a.hlt()?;
    a.jmp(top)?;
    Ok(())
}

impl Program {
    /// Every program.
    pub const ALL: [Program; 7] = [
        Program::Stamp,
        Program::Memstress,
        Program::Dirtier,
        Program::Script,
        Program::DeviceDirtier,
        Program::TightLoop,
        Program::Halt,
    ];

    /// Assemble at `ip`; the guest address of the program's designated store, if it has one.
    fn build(self, ip: u64) -> Result<(Vec<u8>, Option<u64>)> {
        let mut a = CodeAssembler::new(64).map_err(asm_err)?;
        let store = match self {
            Program::Stamp => stamp(&mut a).map(Some),
            Program::Memstress => memstress(&mut a).map(|_| None),
            Program::Dirtier => dirtier(&mut a, false).map(|_| None),
            Program::Script => script(&mut a).map(|_| None),
            Program::DeviceDirtier => dirtier(&mut a, true).map(|_| None),
            Program::TightLoop => tight_loop(&mut a).map(|_| None),
            Program::Halt => halt(&mut a).map(|_| None),
        }
        .map_err(asm_err)?;
        let r = a
            .assemble_options(ip, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
            .map_err(asm_err)?;
        let store_ip = match store {
            Some(l) => Some(r.label_ip(&l).map_err(asm_err)?),
            None => None,
        };
        Ok((r.inner.code_buffer, store_ip))
    }

    /// Machine code of the program, linked to run at guest address `ip`.
    pub fn assemble(self, ip: u64) -> Result<Vec<u8>> {
        Ok(self.build(ip)?.0)
    }

    /// For [`Program::Stamp`] linked at `ip`: the guest address of its only store to the test
    /// pages, a 2-byte `movsq` (`rdi` = the page, `rsi` = `ITERATION`'s address). A vCPU paused
    /// with `rip` there may have had the write faulted in (and logged) but not retired; the
    /// self-test completes it before its final collection
    /// ([`crate::selftest::KvmSelftest`]). `None` for the other programs.
    pub fn store_ip(self, ip: u64) -> Result<Option<u64>> {
        Ok(self.build(ip)?.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Formatter, NasmFormatter};

    fn disasm(code: &[u8], ip: u64) -> Vec<String> {
        let mut d = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
        let mut f = NasmFormatter::new();
        let mut out = Vec::new();
        for ins in &mut d {
            let mut s = String::new();
            f.format(&ins, &mut s);
            out.push(s);
        }
        out
    }

    #[test]
    fn programs_assemble_and_loop_without_exits() {
        for p in Program::ALL {
            let code = p.assemble(0x20000).unwrap();
            let text = disasm(&code, 0x20000);
            assert!(
                text.iter().all(|l| !l.contains("(bad)")),
                "{p:?}: {text:#?}"
            );
            // The only exits are the workload's `out`s to our ports (none for the stamping
            // guest and the tight loop), and the halting guest's `hlt`.
            let outs: Vec<_> = text.iter().filter(|l| l.starts_with("out")).collect();
            let expected = match p {
                Program::Stamp | Program::TightLoop | Program::Halt => 0,
                Program::Memstress | Program::Script | Program::Dirtier => 1,
                Program::DeviceDirtier => 2,
            };
            assert_eq!(outs.len(), expected, "{p:?}: {outs:?}");
            let hlts = text.iter().filter(|l| l.starts_with("hlt")).count();
            assert_eq!(hlts, usize::from(p == Program::Halt), "{p:?}");
            assert!(!text.iter().any(|l| l.starts_with("in ")), "{p:?}");
        }
    }

    #[test]
    fn stamp_store_is_its_movsq() {
        let ip = 0x20000;
        let store = Program::Stamp.store_ip(ip).unwrap().unwrap();
        let code = Program::Stamp.assemble(ip).unwrap();
        let off = (store - ip) as usize;
        assert_eq!(&code[off..off + 2], &[0x48, 0xa5], "movsq");
        assert_eq!(Program::Dirtier.store_ip(ip).unwrap(), None);
    }
}
