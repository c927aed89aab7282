//! `vcpu_blob`: `dirtylog_kvm`'s vCPU state decoder (`VcpuSnapshot::decode`) and VM state
//! decoder (`VmSnapshot::decode`), on arbitrary bytes (first byte 0 or 1) or on the encoding
//! of a fuzzer-built snapshot damaged by a few edits (anything else).
//!
//! Oracle: no panic; whenever decoding succeeds, encoding the result and decoding that gives
//! the same snapshot and the same bytes again; a snapshot within the format's limits
//! decodes from its own encoding to itself.

use arbitrary::{Arbitrary, Unstructured};
use dirtylog_kvm::vcpu_state::{FpuState, VcpuSnapshot, LAPIC_BYTES, MAX_MSRS, XSAVE_BYTES};
use dirtylog_kvm::vm_state::{IoapicState, Irqchip, VmSnapshot};
use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_pic_state, kvm_pit_state2, kvm_regs, kvm_sregs,
    kvm_vcpu_events,
};

/// Most XCRs a blob may carry (the decoder's limit).
const MAX_XCRS: usize = 16;

/// Damage to an encoded blob, applied in order.
#[derive(Arbitrary, Debug)]
enum Edit {
    /// Keep only the first `n mod (len + 1)` bytes.
    Truncate(u16),
    /// XOR one byte (offset mod len).
    Flip { at: u16, xor: u8 },
    /// Overwrite a little-endian u32 (offset mod len): lengths, tags, counts, versions.
    Word { at: u16, value: u32 },
    /// Insert bytes (offset mod len + 1).
    Insert { at: u16, bytes: Vec<u8> },
}

#[derive(Arbitrary, Debug)]
struct VcpuInput {
    vcpu_id: u32,
    regs: [u64; 3],
    cr: [u64; 3],
    xsave: Option<u8>,
    lapic: Option<[u8; 4]>,
    xcrs: Vec<(u32, u64)>,
    msrs: Vec<(u32, u64)>,
    mp_state: u32,
    dr7: u64,
    vmm: Vec<(u16, Vec<u8>)>,
    edits: Vec<Edit>,
}

#[derive(Arbitrary, Debug)]
struct VmInput {
    irqchip: Option<([u8; 3], u64, u32)>,
    pit: Option<u32>,
    clock: (u64, u32, u64, u64),
    vmm: Vec<(u16, Vec<u8>)>,
    edits: Vec<Edit>,
}

/// Run one input.
pub fn run(data: &[u8]) {
    match data.split_first() {
        None => {}
        Some((0, rest)) => vcpu_round_trip(rest),
        Some((1, rest)) => vm_round_trip(rest),
        Some((k, rest)) => {
            let mut u = Unstructured::new(rest);
            if k % 2 == 0 {
                if let Ok(input) = VcpuInput::arbitrary(&mut u) {
                    vcpu_structured(input);
                }
            } else if let Ok(input) = VmInput::arbitrary(&mut u) {
                vm_structured(input);
            }
        }
    }
}

fn vcpu_round_trip(blob: &[u8]) {
    let Ok(s) = VcpuSnapshot::decode(blob) else {
        return;
    };
    let again = s.encode();
    match VcpuSnapshot::decode(&again) {
        Ok(s2) => {
            assert_eq!(s2, s, "vCPU state changed by encode + decode");
            assert_eq!(s2.encode(), again, "vCPU state encodes differently");
        }
        Err(e) => panic!("a decoded vCPU state does not decode from its encoding: {e}"),
    }
}

fn vm_round_trip(blob: &[u8]) {
    let Ok(s) = VmSnapshot::decode(blob) else {
        return;
    };
    let again = s.encode();
    match VmSnapshot::decode(&again) {
        Ok(s2) => {
            assert_eq!(s2, s, "VM state changed by encode + decode");
            assert_eq!(s2.encode(), again, "VM state encodes differently");
        }
        Err(e) => panic!("a decoded VM state does not decode from its encoding: {e}"),
    }
}

fn damage(mut blob: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        match e {
            Edit::Truncate(n) => blob.truncate(usize::from(*n) % (blob.len() + 1)),
            Edit::Flip { at, xor } if !blob.is_empty() => {
                let i = usize::from(*at) % blob.len();
                blob[i] ^= xor;
            }
            Edit::Word { at, value } if blob.len() >= 4 => {
                let i = usize::from(*at) % (blob.len() - 3);
                blob[i..i + 4].copy_from_slice(&value.to_le_bytes());
            }
            Edit::Insert { at, bytes } => {
                let i = usize::from(*at) % (blob.len() + 1);
                blob.splice(i..i, bytes.iter().copied());
            }
            _ => {}
        }
    }
    blob
}

fn vcpu_structured(input: VcpuInput) {
    let regs = kvm_regs {
        rax: input.regs[0],
        rip: input.regs[1],
        rflags: input.regs[2],
        ..Default::default()
    };
    let sregs = kvm_sregs {
        cr0: input.cr[0],
        cr4: input.cr[1],
        efer: input.cr[2],
        ..Default::default()
    };
    let fpu = match input.xsave {
        Some(b) => FpuState::Xsave(Box::new([b; XSAVE_BYTES])),
        None => FpuState::Legacy(Box::new(kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        })),
    };
    let lapic = input.lapic.map(|b| {
        let mut page = Box::new([0u8; LAPIC_BYTES]);
        page[0x20..0x24].copy_from_slice(&b);
        page
    });
    let mut s = VcpuSnapshot {
        vcpu_id: input.vcpu_id,
        regs,
        sregs,
        fpu,
        xcrs: input.xcrs,
        msrs: input.msrs,
        lapic,
        events: kvm_vcpu_events::default(),
        mp_state: input.mp_state,
        debugregs: kvm_debugregs {
            dr7: input.dr7,
            ..Default::default()
        },
        vmm: Vec::new(),
    };
    for (tag, bytes) in input.vmm {
        // Refused below the VMM range or over 64 KiB: the snapshot keeps what was accepted.
        let _ = s.set_vmm_section(u32::from(tag).wrapping_mul(3), bytes);
    }
    let blob = s.encode();
    if s.msrs.len() <= MAX_MSRS && s.xcrs.len() <= MAX_XCRS {
        match VcpuSnapshot::decode(&blob) {
            Ok(d) => assert_eq!(d, s, "a vCPU state within the limits does not survive"),
            Err(e) => panic!("a vCPU state within the limits does not decode: {e}"),
        }
    }
    vcpu_round_trip(&damage(blob, &input.edits));
}

fn vm_structured(input: VmInput) {
    let irqchip = input.irqchip.map(|(pic, base, irr)| Irqchip {
        pic_master: kvm_pic_state {
            irr: pic[0],
            imr: pic[1],
            ..Default::default()
        },
        pic_slave: kvm_pic_state {
            isr: pic[2],
            ..Default::default()
        },
        ioapic: IoapicState {
            base_address: base,
            irr,
            ..Default::default()
        },
    });
    let pit = input.pit.map(|flags| kvm_pit_state2 {
        flags,
        ..Default::default()
    });
    let (clock, flags, realtime, host_tsc) = input.clock;
    let mut s = VmSnapshot {
        irqchip,
        pit,
        clock: kvm_clock_data {
            clock,
            flags,
            realtime,
            host_tsc,
            ..Default::default()
        },
        vmm: Vec::new(),
    };
    for (tag, bytes) in input.vmm {
        let _ = s.set_vmm_section(u32::from(tag).wrapping_mul(3), bytes);
    }
    let blob = s.encode();
    match VmSnapshot::decode(&blob) {
        Ok(d) => assert_eq!(d, s, "a VM state does not survive encode + decode"),
        Err(e) => panic!("a VM state does not decode from its encoding: {e}"),
    }
    vm_round_trip(&damage(blob, &input.edits));
}
