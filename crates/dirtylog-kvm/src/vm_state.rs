//! Saving and restoring the VM-wide state KVM keeps — the in-kernel irqchip (two 8259 PICs
//! and the IOAPIC), the 8254 PIT and the kvmclock — and the versioned blob it travels in (the
//! per-vCPU state is [`crate::vcpu_state`]).
//!
//! # What is saved
//!
//! | section | ioctl | contents |
//! |---|---|---|
//! | `PIC_MASTER`, `PIC_SLAVE` | `KVM_GET_IRQCHIP` (chips 0, 1) | each 8259's IRR, IMR, ISR, vector base, ICW/OCW state, ELCR |
//! | `IOAPIC` | `KVM_GET_IRQCHIP` (chip 2) | base address, `IOREGSEL`, ID, IRR, the 24 redirection entries |
//! | `PIT` | `KVM_GET_PIT2` | each channel's count, latches, mode, gate, load time; the flags (HPET legacy, speaker) |
//! | `CLOCK` | `KVM_GET_CLOCK` | the kvmclock (ns), the flags, and with them the host's wall clock and TSC at that moment |
//! | VMM | — | the VMM's own devices (serial port, fw_cfg, ...), opaque (tags from [`VMM_SECTION_BASE`]) |
//!
//! A VM without an in-kernel irqchip or PIT (`KVM_GET_IRQCHIP` / `KVM_GET_PIT2` say `ENXIO`)
//! saves without those sections ([`VmSnapshot::irqchip`], [`VmSnapshot::pit`] are `None`); the
//! three irqchip sections come together or not at all.
//!
//! # Restore
//!
//! [`VmSnapshot::restore`] sets the PICs, the IOAPIC, the PIT, then the kvmclock. Call it
//! after restoring every vCPU ([`crate::vcpu_state`]) and just before the vCPUs run again, as
//! QEMU loads the kvmclock when the VM starts: the kvmclock runs from the moment it is set.
//!
//! - **kvmclock**: set to the saved `clock` with no flags (`KVM_SET_CLOCK` refuses unknown
//!   flags and ignores `KVM_CLOCK_TSC_STABLE` and `KVM_CLOCK_HOST_TSC`; `KVM_CLOCK_REALTIME`
//!   would advance the clock by the wall time since the save). Like the vCPUs' TSC, which is
//!   restored to its saved value, the guest's clock stands still while the guest is stopped:
//!   it never goes backwards and never jumps over the downtime (QEMU's behaviour).
//! - **PIT**: KVM restarts each channel's count at `KVM_SET_PIT2` (the channel's
//!   `count_load_time` becomes the time of the restore), so a counter read back right after a
//!   restore shows the full initial count, as it would right after the guest programmed it.
//! - **IOAPIC**: KVM clears the IRR and re-asserts the saved IRR's lines.
//!
//! # The blob
//!
//! ```text
//! blob    = magic "DLVMST\0\0" | version u32 (= 1) | 0 u32 | nsections u32 | section*
//! section = tag u32 | length u32 | payload[length]
//! ```
//!
//! As the vCPU blob: little-endian, every field of every KVM structure written one by one
//! (never a `memcpy` of a bindgen struct; the unions of `kvm_irqchip` and of the IOAPIC's
//! redirection entries are read as the plain integers they hold), each section's length
//! checked exactly, unknown sections refused, and [`VmSnapshot::decode`] never panics. About
//! 400 bytes without VMM sections.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pic_state, kvm_pit_channel_state, kvm_pit_state2,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;

use crate::blob::{self, Reader, Writer};
pub use crate::blob::{MAX_VMM_SECTION, VMM_SECTION_BASE};
use crate::error::{Error, Result};

/// First bytes of every VM state blob.
pub const VM_STATE_MAGIC: [u8; 8] = *b"DLVMST\0\0";
/// The VM state blob version this build writes and reads.
pub const VM_STATE_VERSION: u32 = 1;
/// Redirection entries of KVM's IOAPIC (`IOAPIC_NUM_PINS`).
pub const IOAPIC_PINS: usize = 24;

const T_PIC_MASTER: u32 = 1;
const T_PIC_SLAVE: u32 = 2;
const T_IOAPIC: u32 = 3;
const T_PIT: u32 = 4;
const T_CLOCK: u32 = 5;

/// The IOAPIC's state (`kvm_ioapic_state`, without its padding, each redirection entry as the
/// 64-bit register).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoapicState {
    /// The MMIO base (`0xfec0_0000`).
    pub base_address: u64,
    /// `IOREGSEL`.
    pub ioregsel: u32,
    /// The IOAPIC ID.
    pub id: u32,
    /// Pins asserted (level) or pending.
    pub irr: u32,
    /// The redirection table, each entry's 64 bits.
    pub redirtbl: [u64; IOAPIC_PINS],
}

/// The in-kernel irqchip: the two 8259s and the IOAPIC.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Irqchip {
    /// Chip 0 (`KVM_IRQCHIP_PIC_MASTER`).
    pub pic_master: kvm_pic_state,
    /// Chip 1 (`KVM_IRQCHIP_PIC_SLAVE`).
    pub pic_slave: kvm_pic_state,
    /// Chip 2 (`KVM_IRQCHIP_IOAPIC`).
    pub ioapic: IoapicState,
}

/// The VM-wide state. See the [module docs](self).
#[derive(Clone, Debug, PartialEq)]
pub struct VmSnapshot {
    /// The in-kernel PICs and IOAPIC; `None` for a VM without `KVM_CREATE_IRQCHIP`.
    pub irqchip: Option<Irqchip>,
    /// The PIT (`KVM_GET_PIT2`); `None` for a VM without `KVM_CREATE_PIT2`. `reserved` is
    /// neither saved nor restored (decoded as zeros).
    pub pit: Option<kvm_pit_state2>,
    /// The kvmclock (`KVM_GET_CLOCK`); `pad0` and `pad` are not saved (decoded as zeros).
    pub clock: kvm_clock_data,
    /// VMM sections `(tag ≥ VMM_SECTION_BASE, bytes)`, in tag order, carried opaquely.
    pub vmm: Vec<(u32, Vec<u8>)>,
}

fn fail(ioctl: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> Error {
    move |e| Error::VmState {
        ioctl,
        errno: e.errno(),
    }
}

fn blob_err(m: String) -> Error {
    Error::VmBlob(m)
}

/// `KVM_GET_IRQCHIP` of chip `id`; `None` without an in-kernel irqchip (`ENXIO`).
fn get_chip(vm: &VmFd, id: u32) -> Result<Option<kvm_irqchip>> {
    let mut c = kvm_irqchip {
        chip_id: id,
        ..Default::default()
    };
    match vm.get_irqchip(&mut c) {
        Ok(()) => Ok(Some(c)),
        Err(e) if e.errno() == libc::ENXIO => Ok(None),
        Err(e) => Err(fail("KVM_GET_IRQCHIP")(e)),
    }
}

fn pic_of(c: &kvm_irqchip) -> kvm_pic_state {
    // SAFETY: every field of every member of the union is an integer (or an array of them),
    // so any bytes are a valid `kvm_pic_state`; the union is fully initialised
    // (`kvm_irqchip::default()` zeroes its 512 bytes, then the kernel wrote the chip's state).
    unsafe { c.chip.pic }
}

fn ioapic_of(c: &kvm_irqchip) -> IoapicState {
    // SAFETY: as in `pic_of`: plain integers, fully initialised.
    let s = unsafe { c.chip.ioapic };
    let mut redirtbl = [0u64; IOAPIC_PINS];
    for (r, e) in redirtbl.iter_mut().zip(s.redirtbl.iter()) {
        // SAFETY: both members of the entry's union are 8 bytes of plain integers.
        *r = unsafe { e.bits };
    }
    IoapicState {
        base_address: s.base_address,
        ioregsel: s.ioregsel,
        id: s.id,
        irr: s.irr,
        redirtbl,
    }
}

impl VmSnapshot {
    /// Save the VM-wide state of `vm`. Take it with every vCPU parked, after saving them.
    pub fn save(vm: &VmFd) -> Result<Self> {
        let irqchip = match (
            get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            get_chip(vm, KVM_IRQCHIP_IOAPIC)?,
        ) {
            (Some(m), Some(s), Some(io)) => Some(Irqchip {
                pic_master: pic_of(&m),
                pic_slave: pic_of(&s),
                ioapic: ioapic_of(&io),
            }),
            (None, None, None) => None,
            _ => {
                return Err(Error::VmState {
                    ioctl: "KVM_GET_IRQCHIP (some chips but not all)",
                    errno: libc::ENXIO,
                })
            }
        };
        let pit = match vm.get_pit2() {
            Ok(p) => Some(kvm_pit_state2 {
                reserved: [0; 9],
                ..p
            }),
            Err(e) if e.errno() == libc::ENXIO => None,
            Err(e) => return Err(fail("KVM_GET_PIT2")(e)),
        };
        let c = vm.get_clock().map_err(fail("KVM_GET_CLOCK"))?;
        let clock = kvm_clock_data {
            clock: c.clock,
            flags: c.flags,
            realtime: c.realtime,
            host_tsc: c.host_tsc,
            ..Default::default()
        };
        Ok(VmSnapshot {
            irqchip,
            pit,
            clock,
            vmm: Vec::new(),
        })
    }

    /// Load this state into `vm`, which must have the same in-kernel devices (see the
    /// [module docs](self#restore) for the order and the clock).
    pub fn restore(&self, vm: &VmFd) -> Result<()> {
        if let Some(chip) = &self.irqchip {
            for (id, pic) in [
                (KVM_IRQCHIP_PIC_MASTER, chip.pic_master),
                (KVM_IRQCHIP_PIC_SLAVE, chip.pic_slave),
            ] {
                let mut c = kvm_irqchip {
                    chip_id: id,
                    ..Default::default()
                };
                c.chip.pic = pic;
                vm.set_irqchip(&c).map_err(fail("KVM_SET_IRQCHIP"))?;
            }
            let mut c = kvm_irqchip {
                chip_id: KVM_IRQCHIP_IOAPIC,
                ..Default::default()
            };
            let io = &chip.ioapic;
            // SAFETY: as in `pic_of`: reading the (zeroed) union as its IOAPIC member.
            let mut s = unsafe { c.chip.ioapic };
            s.base_address = io.base_address;
            s.ioregsel = io.ioregsel;
            s.id = io.id;
            s.irr = io.irr;
            for (e, &bits) in s.redirtbl.iter_mut().zip(io.redirtbl.iter()) {
                e.bits = bits;
            }
            c.chip.ioapic = s;
            vm.set_irqchip(&c).map_err(fail("KVM_SET_IRQCHIP"))?;
        }
        if let Some(p) = &self.pit {
            let p = kvm_pit_state2 {
                reserved: [0; 9],
                ..*p
            };
            vm.set_pit2(&p).map_err(fail("KVM_SET_PIT2"))?;
        }
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(fail("KVM_SET_CLOCK"))?;
        Ok(())
    }

    /// This state with the fields that move by themselves zeroed: the kvmclock's `clock`,
    /// `realtime` and `host_tsc`, and each PIT channel's `count_load_time`. Two saves of the
    /// same stopped VM, or a save and a save after restoring it elsewhere, encode to the same
    /// bytes once both are passed through this; the time fields themselves are only ordered
    /// (a later save reads values not below an earlier one's).
    pub fn without_time(&self) -> Self {
        let mut s = self.clone();
        s.clock.clock = 0;
        s.clock.realtime = 0;
        s.clock.host_tsc = 0;
        if let Some(p) = s.pit.as_mut() {
            for c in p.channels.iter_mut() {
                c.count_load_time = 0;
            }
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
        if let Some(c) = &self.irqchip {
            put_pic(&mut w, &c.pic_master);
            sections.push((T_PIC_MASTER, w.take()));
            put_pic(&mut w, &c.pic_slave);
            sections.push((T_PIC_SLAVE, w.take()));
            let io = &c.ioapic;
            w.u64(io.base_address);
            w.u32(io.ioregsel);
            w.u32(io.id);
            w.u32(io.irr);
            for &e in &io.redirtbl {
                w.u64(e);
            }
            sections.push((T_IOAPIC, w.take()));
        }
        if let Some(p) = &self.pit {
            for c in &p.channels {
                put_pit_channel(&mut w, c);
            }
            w.u32(p.flags);
            sections.push((T_PIT, w.take()));
        }
        w.u64(self.clock.clock);
        w.u32(self.clock.flags);
        w.u64(self.clock.realtime);
        w.u64(self.clock.host_tsc);
        sections.push((T_CLOCK, w.take()));
        sections.extend(self.vmm.iter().cloned());
        blob::frame(&VM_STATE_MAGIC, VM_STATE_VERSION, 0, sections)
    }

    /// Parse and validate a blob: magic, version, every section's exact length, each known
    /// section at most once, the irqchip's three together, the clock present, nothing after
    /// the last section. Never panics, whatever the bytes.
    pub fn decode(blob: &[u8]) -> Result<Self> {
        let f = blob::unframe(
            blob,
            &VM_STATE_MAGIC,
            &[VM_STATE_VERSION],
            "VM state",
            blob_err,
        )?;
        if f.header != 0 {
            return Err(Error::VmBlob(format!(
                "header word {:#x}, 0 expected",
                f.header
            )));
        }
        let mut master = None;
        let mut slave = None;
        let mut ioapic = None;
        let mut pit = None;
        let mut clock = None;
        let mut vmm: Vec<(u32, Vec<u8>)> = Vec::new();
        for (tag, payload) in f.sections {
            let mut s = Reader::new(payload, section_name(tag), blob_err);
            let dup = || Error::VmBlob(format!("section {} appears twice", section_name(tag)));
            match tag {
                T_PIC_MASTER => {
                    if master.replace(get_pic(&mut s)?).is_some() {
                        return Err(dup());
                    }
                }
                T_PIC_SLAVE => {
                    if slave.replace(get_pic(&mut s)?).is_some() {
                        return Err(dup());
                    }
                }
                T_IOAPIC => {
                    let mut io = IoapicState {
                        base_address: s.u64()?,
                        ioregsel: s.u32()?,
                        id: s.u32()?,
                        irr: s.u32()?,
                        redirtbl: [0; IOAPIC_PINS],
                    };
                    for e in io.redirtbl.iter_mut() {
                        *e = s.u64()?;
                    }
                    if ioapic.replace(io).is_some() {
                        return Err(dup());
                    }
                }
                T_PIT => {
                    let mut p = kvm_pit_state2::default();
                    for c in p.channels.iter_mut() {
                        *c = get_pit_channel(&mut s)?;
                    }
                    p.flags = s.u32()?;
                    if pit.replace(p).is_some() {
                        return Err(dup());
                    }
                }
                T_CLOCK => {
                    let c = kvm_clock_data {
                        clock: s.u64()?,
                        flags: s.u32()?,
                        realtime: s.u64()?,
                        host_tsc: s.u64()?,
                        ..Default::default()
                    };
                    if clock.replace(c).is_some() {
                        return Err(dup());
                    }
                }
                t if t >= VMM_SECTION_BASE => {
                    blob::push_vmm_section(&mut vmm, t, s.take(payload.len())?, blob_err)?;
                }
                t => {
                    return Err(Error::VmBlob(format!(
                        "unknown section {t}: written by a newer dirtylog? Refusing to drop \
                         device state"
                    )))
                }
            }
            s.finish()?;
        }
        let irqchip = match (master, slave, ioapic) {
            (Some(pic_master), Some(pic_slave), Some(ioapic)) => Some(Irqchip {
                pic_master,
                pic_slave,
                ioapic,
            }),
            (None, None, None) => None,
            _ => {
                return Err(Error::VmBlob(
                    "the PIC_MASTER, PIC_SLAVE and IOAPIC sections come together".into(),
                ))
            }
        };
        Ok(VmSnapshot {
            irqchip,
            pit,
            clock: clock.ok_or_else(|| Error::VmBlob("the CLOCK section is missing".into()))?,
            vmm,
        })
    }
}

fn section_name(tag: u32) -> &'static str {
    match tag {
        T_PIC_MASTER => "PIC_MASTER",
        T_PIC_SLAVE => "PIC_SLAVE",
        T_IOAPIC => "IOAPIC",
        T_PIT => "PIT",
        T_CLOCK => "CLOCK",
        t if t >= VMM_SECTION_BASE => "VMM",
        _ => "unknown",
    }
}

fn pic_fields(p: &mut kvm_pic_state) -> [&mut u8; 16] {
    [
        &mut p.last_irr,
        &mut p.irr,
        &mut p.imr,
        &mut p.isr,
        &mut p.priority_add,
        &mut p.irq_base,
        &mut p.read_reg_select,
        &mut p.poll,
        &mut p.special_mask,
        &mut p.init_state,
        &mut p.auto_eoi,
        &mut p.rotate_on_auto_eoi,
        &mut p.special_fully_nested_mode,
        &mut p.init4,
        &mut p.elcr,
        &mut p.elcr_mask,
    ]
}

fn put_pic(w: &mut Writer, p: &kvm_pic_state) {
    let mut p = *p;
    for v in pic_fields(&mut p) {
        w.u8(*v);
    }
}

fn get_pic(s: &mut Reader<'_>) -> Result<kvm_pic_state> {
    let mut p = kvm_pic_state::default();
    for v in pic_fields(&mut p) {
        *v = s.u8()?;
    }
    Ok(p)
}

fn put_pit_channel(w: &mut Writer, c: &kvm_pit_channel_state) {
    w.u32(c.count);
    w.u16(c.latched_count);
    for b in [
        c.count_latched,
        c.status_latched,
        c.status,
        c.read_state,
        c.write_state,
        c.write_latch,
        c.rw_mode,
        c.mode,
        c.bcd,
        c.gate,
    ] {
        w.u8(b);
    }
    w.u64(c.count_load_time as u64);
}

fn get_pit_channel(s: &mut Reader<'_>) -> Result<kvm_pit_channel_state> {
    Ok(kvm_pit_channel_state {
        count: s.u32()?,
        latched_count: s.u16()?,
        count_latched: s.u8()?,
        status_latched: s.u8()?,
        status: s.u8()?,
        read_state: s.u8()?,
        write_state: s.u8()?,
        write_latch: s.u8()?,
        rw_mode: s.u8()?,
        mode: s.u8()?,
        bcd: s.u8()?,
        gate: s.u8()?,
        count_load_time: s.u64()? as i64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmSnapshot {
        let mut ioapic = IoapicState {
            base_address: 0xfec0_0000,
            ioregsel: 0x10,
            id: 0,
            irr: 1 << 4,
            ..Default::default()
        };
        for (i, e) in ioapic.redirtbl.iter_mut().enumerate() {
            *e = 0x1_0000 | (0x20 + i as u64);
        }
        let mut pit = kvm_pit_state2 {
            flags: 1,
            ..Default::default()
        };
        for (i, c) in pit.channels.iter_mut().enumerate() {
            c.count = 0x1_0000 - i as u32;
            c.mode = i as u8 + 1;
            c.rw_mode = 3;
            c.gate = 1;
            c.count_load_time = -5 + i as i64 * 1_000_000_007;
        }
        let mut s = VmSnapshot {
            irqchip: Some(Irqchip {
                pic_master: kvm_pic_state {
                    imr: 0xfb,
                    irq_base: 0x20,
                    elcr_mask: 0xf8,
                    ..Default::default()
                },
                pic_slave: kvm_pic_state {
                    imr: 0xff,
                    irq_base: 0x28,
                    init4: 1,
                    elcr_mask: 0xde,
                    ..Default::default()
                },
                ioapic,
            }),
            pit: Some(pit),
            clock: kvm_clock_data {
                clock: 123_456_789_000,
                flags: 2 | 4 | 8,
                realtime: 1_700_000_000_000_000_000,
                host_tsc: u64::MAX - 3,
                ..Default::default()
            },
            vmm: Vec::new(),
        };
        s.set_vmm_section(VMM_SECTION_BASE + 1, b"uart".to_vec())
            .unwrap();
        s
    }

    #[test]
    fn round_trips() {
        let s = sample();
        let blob = s.encode();
        assert_eq!(&blob[..8], b"DLVMST\0\0");
        assert_eq!(&blob[8..12], &VM_STATE_VERSION.to_le_bytes());
        assert_eq!(VmSnapshot::decode(&blob).unwrap(), s);
        let bare = VmSnapshot {
            irqchip: None,
            pit: None,
            vmm: Vec::new(),
            ..s.clone()
        };
        assert_eq!(VmSnapshot::decode(&bare.encode()).unwrap(), bare);
        let t = s.without_time();
        assert_eq!(t.clock.clock, 0);
        assert!(t
            .pit
            .unwrap()
            .channels
            .iter()
            .all(|c| c.count_load_time == 0));
        assert_eq!(t.clock.flags, s.clock.flags);
    }

    #[test]
    fn rejects_damage() {
        let blob = sample().encode();
        let err = |b: &[u8]| VmSnapshot::decode(b).unwrap_err().to_string();
        assert!(err(&blob[..blob.len() - 1]).contains("truncated"));
        let mut b = blob.clone();
        b[0] ^= 1;
        assert!(err(&b).contains("bad magic"));
        let mut b = blob.clone();
        b[8] = 2;
        assert!(err(&b).contains("version 2"), "{}", err(&b));
        let mut b = blob.clone();
        b[12] = 1;
        assert!(err(&b).contains("header word"));
        // The first section (PIC_MASTER) renamed to an unknown tag.
        let mut b = blob.clone();
        b[20..24].copy_from_slice(&77u32.to_le_bytes());
        assert!(err(&b).contains("unknown section 77"));
        // ... or to a second PIC_SLAVE.
        let mut b = blob.clone();
        b[20..24].copy_from_slice(&T_PIC_SLAVE.to_le_bytes());
        assert!(err(&b).contains("twice"));
        for cut in 0..blob.len() {
            assert!(VmSnapshot::decode(&blob[..cut]).is_err());
        }
    }
}
