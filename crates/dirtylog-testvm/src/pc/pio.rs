//! The minimal PC's port I/O bus: what the vCPU threads call on a `KVM_EXIT_IO`.
//!
//! # Ports
//!
//! | ports | device |
//! |---|---|
//! | `0x3f8..=0x3ff` | COM1, a 16550A ([`Serial`]); IRQ 4 follows its interrupt line |
//! | `0xf4` | QEMU's `isa-debug-exit`: a write of `v` (any width) ends the VM with status `(v << 1) \| 1`; reads all-ones |
//! | `0x510..=0x511` | fw_cfg ([`FwCfg`]) |
//! | `0xcf8..=0xcfb` | PCI configuration address: a 32-bit write at `0xcf8` sets the latch, reads return it; other writes are ignored (and logged once, so a reset through `0xcf9` does not go unnoticed) |
//! | `0xcfc..=0xcff` | PCI configuration data: reads all-ones ("no device"), writes ignored |
//! | `0x80`, `0x87` | POST code / delay and DMA page ports: ignored silently (reads all-ones) |
//! | `0xe0..=0xe3`, `0xe8..=0xeb`, `0x2000..=0x2017` | QEMU's `pc-testdev` ([`PcTestdev`]): a scratch register, ISA IRQ lines set by the guest (through the IRQ callback); its MMIO buffer is reached through [`PioBus::testdev`] |
//! | anything else | reads all-ones, writes ignored, logged once per port through the `log` callback |
//!
//! Accesses to the UART wider than a byte are split into byte accesses at successive ports,
//! as QEMU's memory core splits them (the 16550's registers are byte-wide).
//!
//! # What it does not model
//!
//! The legacy devices KVM's in-kernel irqchip and PIT provide (PIC, PIT, and the speaker
//! port `0x61`, which KVM handles with the PIT) are not here: they never exit to userspace.
//! There is no CMOS/RTC, keyboard controller, ACPI or reset port: a guest touching them sees
//! all-ones and the bus logs the port once.
//!
//! Each device sits behind its own mutex ([`dirtylog::sync::lock`]); the IRQ callback is
//! called with the UART's lock held, so level changes reach the interrupt controller in the
//! order they happened.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use dirtylog::sync::lock;

use super::fw_cfg::{FwCfg, FwCfgError, FW_CFG_PORT_DATA, FW_CFG_PORT_SEL};
use super::serial::{Serial, SerialError, COM1_BASE, COM1_IRQ};
use super::testdev::{self, PcTestdev, TestdevError};

/// QEMU's `isa-debug-exit` port.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// PCI configuration address port (mechanism #1).
pub const PCI_CONFIG_ADDRESS: u16 = 0xcf8;
/// PCI configuration data ports start here (`0xcfc..=0xcff`).
pub const PCI_CONFIG_DATA: u16 = 0xcfc;
/// POST code port, also used by guests as an I/O delay.
pub const POST_PORT: u16 = 0x80;
/// DMA page register, touched by some delay loops.
pub const DMA_PAGE_PORT: u16 = 0x87;

/// Device name of the UART's state in [`PioBus::save`].
pub const SERIAL_STATE_NAME: &str = "serial0";
/// Device name of fw_cfg's state in [`PioBus::save`].
pub const FW_CFG_STATE_NAME: &str = "fw_cfg";
/// Device name of the PCI configuration-address latch's state in [`PioBus::save`].
pub const PCI_HOST_STATE_NAME: &str = "pci_host";
/// Version of the PCI host state layout: the latch, u32 LE (4 bytes).
pub const PCI_HOST_STATE_VERSION: u32 = 1;

const COM1_LAST: u16 = COM1_BASE + 7;

/// What the vCPU does after an `out`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PioAction {
    /// Resume the guest.
    Continue,
    /// The guest ended the VM (through `isa-debug-exit`) with this exit status.
    Exit(u32),
}

/// Why [`PioBus::restore`] refused a device state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PioError {
    /// No device of that name on this bus.
    #[error("no I/O device named {0:?} to restore")]
    UnknownDevice(String),
    /// The device exists but does not know that state version.
    #[error("I/O device {name}: state version {version} not supported (expected {expected})")]
    UnsupportedVersion {
        /// Device name.
        name: String,
        /// Version given.
        version: u32,
        /// Version this build reads.
        expected: u32,
    },
    /// The UART refused its state.
    #[error("serial0 state: {0}")]
    Serial(#[from] SerialError),
    /// fw_cfg refused its state.
    #[error("fw_cfg state: {0}")]
    FwCfg(#[from] FwCfgError),
    /// The PCI host state is not 4 bytes.
    #[error("pci_host state has {0} bytes, expected 4")]
    PciHostLength(usize),
    /// pc-testdev refused its state.
    #[error("pc-testdev state: {0}")]
    Testdev(#[from] TestdevError),
}

struct SerialSlot {
    dev: Serial,
    /// The level last sent to the IRQ callback.
    level: bool,
}

/// The port I/O bus; see the [module documentation](self). Shared by the vCPU threads
/// (`Sync`): every method takes `&self`.
pub struct PioBus {
    serial: Mutex<SerialSlot>,
    fw_cfg: Mutex<FwCfg>,
    pci_address: Mutex<u32>,
    testdev: Mutex<PcTestdev>,
    /// One bit per port: already logged as unemulated.
    logged: Box<[AtomicU64]>,
    log: Box<dyn Fn(&str) + Send + Sync>,
    irq: Box<dyn Fn(u32, bool) + Send + Sync>,
}

impl std::fmt::Debug for PioBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PioBus").finish_non_exhaustive()
    }
}

fn fill_ones(data: &mut [u8]) {
    data.fill(0xff);
}

fn le_value(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    for (dst, src) in b.iter_mut().zip(data) {
        *dst = *src;
    }
    u32::from_le_bytes(b)
}

impl PioBus {
    /// A bus with COM1 (`serial`) and `fw_cfg`; unemulated accesses are reported once per
    /// port through `log`, and the UART's interrupt line through `irq(4, level)`.
    pub fn new(
        serial: Serial,
        fw_cfg: FwCfg,
        log: Box<dyn Fn(&str) + Send + Sync>,
        irq: Box<dyn Fn(u32, bool) + Send + Sync>,
    ) -> Self {
        let level = serial.irq_level();
        PioBus {
            serial: Mutex::new(SerialSlot { dev: serial, level }),
            fw_cfg: Mutex::new(fw_cfg),
            pci_address: Mutex::new(0),
            testdev: Mutex::new(PcTestdev::default()),
            logged: (0..1024).map(|_| AtomicU64::new(0)).collect(),
            log,
            irq,
        }
    }

    fn unemulated(&self, port: u16, what: &str, len: usize) {
        let word = usize::from(port / 64);
        let bit = 1u64 << (port % 64);
        let Some(w) = self.logged.get(word) else {
            return;
        };
        if w.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
            let unit = if len == 1 { "byte" } else { "bytes" };
            (self.log)(&format!(
                "guest touched unemulated I/O port {port:#x} ({what}, {len} {unit}); ignored"
            ));
        }
    }

    /// Send the UART's interrupt line to the IRQ callback if it changed (or pulsed).
    fn update_serial_irq(&self, slot: &mut SerialSlot) {
        let level = slot.dev.irq_level();
        let pulse = slot.dev.take_irq_pulse();
        if pulse && slot.level && level {
            (self.irq)(COM1_IRQ, false);
            (self.irq)(COM1_IRQ, true);
        } else if level != slot.level {
            (self.irq)(COM1_IRQ, level);
        }
        slot.level = level;
    }

    /// A guest `in` of `data.len()` bytes (1, 2 or 4) from `port`; fills `data`.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        match port {
            COM1_BASE..=COM1_LAST => {
                let mut slot = lock(&self.serial);
                for (i, b) in data.iter_mut().enumerate() {
                    *b = match u16::try_from(i).ok().and_then(|i| port.checked_add(i)) {
                        Some(p @ COM1_BASE..=COM1_LAST) => {
                            // p - COM1_BASE <= 7.
                            slot.dev.read(u8::try_from(p - COM1_BASE).unwrap_or(0))
                        }
                        _ => 0xff,
                    };
                }
                self.update_serial_irq(&mut slot);
            }
            FW_CFG_PORT_SEL | FW_CFG_PORT_DATA => {
                let v = lock(&self.fw_cfg).read(port, data.len());
                for (dst, src) in data.iter_mut().zip(v.to_le_bytes()) {
                    *dst = src;
                }
                if data.len() > 4 {
                    fill_ones(&mut data[4..]);
                }
            }
            PCI_CONFIG_ADDRESS..=0xcfb => {
                let latch = lock(&self.pci_address).to_le_bytes();
                let start = usize::from(port - PCI_CONFIG_ADDRESS);
                for (i, b) in data.iter_mut().enumerate() {
                    *b = start
                        .checked_add(i)
                        .and_then(|j| latch.get(j))
                        .copied()
                        .unwrap_or(0xff);
                }
            }
            p if testdev::IOPORT.contains(&p) || testdev::IOPORT_BYTE.contains(&p) => {
                lock(&self.testdev).read_ioport(port, data);
            }
            p if testdev::IRQ_LINES.contains(&p) => data.fill(0),
            PCI_CONFIG_DATA..=0xcff | DEBUG_EXIT_PORT | POST_PORT | DMA_PAGE_PORT => {
                fill_ones(data)
            }
            _ => {
                fill_ones(data);
                self.unemulated(port, "read", data.len());
            }
        }
    }

    /// A guest `out` of `data` (1, 2 or 4 bytes, little-endian) to `port`.
    pub fn write(&self, port: u16, data: &[u8]) -> PioAction {
        match port {
            COM1_BASE..=COM1_LAST => {
                let mut slot = lock(&self.serial);
                for (i, &b) in data.iter().enumerate() {
                    if let Some(p @ COM1_BASE..=COM1_LAST) =
                        u16::try_from(i).ok().and_then(|i| port.checked_add(i))
                    {
                        slot.dev.write(u8::try_from(p - COM1_BASE).unwrap_or(0), b);
                    }
                }
                self.update_serial_irq(&mut slot);
            }
            DEBUG_EXIT_PORT => return PioAction::Exit((le_value(data) << 1) | 1),
            FW_CFG_PORT_SEL | FW_CFG_PORT_DATA => {
                lock(&self.fw_cfg).write(port, le_value(data), data.len());
            }
            PCI_CONFIG_ADDRESS if data.len() == 4 => {
                *lock(&self.pci_address) = le_value(data);
            }
            PCI_CONFIG_ADDRESS..=0xcfb => self.unemulated(port, "write", data.len()),
            PCI_CONFIG_DATA..=0xcff | POST_PORT | DMA_PAGE_PORT => {}
            p if testdev::IOPORT.contains(&p) || testdev::IOPORT_BYTE.contains(&p) => {
                lock(&self.testdev).write_ioport(port, data);
            }
            p if testdev::IRQ_LINES.contains(&p) => {
                if let Some((line, level)) = PcTestdev::irq_line(port, data) {
                    // The UART's line (4) belongs to the UART: leave it alone.
                    if line != COM1_IRQ {
                        (self.irq)(line, level);
                    }
                }
            }
            _ => self.unemulated(port, "write", data.len()),
        }
        PioAction::Continue
    }

    /// Queue host input for the guest on COM1 and update IRQ 4.
    pub fn push_serial_input(&self, bytes: &[u8]) {
        let mut slot = lock(&self.serial);
        slot.dev.push_input(bytes);
        self.update_serial_irq(&mut slot);
    }

    /// The pc-testdev, for its MMIO buffer ([`testdev::IOMEM_BASE`]).
    pub fn testdev(&self) -> std::sync::MutexGuard<'_, PcTestdev> {
        lock(&self.testdev)
    }

    /// Bytes of host input dropped so far because COM1's input queue was full.
    pub fn serial_input_dropped(&self) -> u64 {
        lock(&self.serial).dev.input_dropped()
    }

    /// Every device's state as `(name, version, bytes)`: [`SERIAL_STATE_NAME`],
    /// [`FW_CFG_STATE_NAME`], [`PCI_HOST_STATE_NAME`] and [`testdev::STATE_NAME`], in that
    /// order.
    pub fn save(&self) -> Vec<(&'static str, u32, Vec<u8>)> {
        vec![
            (
                SERIAL_STATE_NAME,
                Serial::STATE_VERSION,
                lock(&self.serial).dev.save(),
            ),
            (
                FW_CFG_STATE_NAME,
                FwCfg::STATE_VERSION,
                lock(&self.fw_cfg).save(),
            ),
            (
                PCI_HOST_STATE_NAME,
                PCI_HOST_STATE_VERSION,
                lock(&self.pci_address).to_le_bytes().to_vec(),
            ),
            (
                testdev::STATE_NAME,
                testdev::STATE_VERSION,
                lock(&self.testdev).save(),
            ),
        ]
    }

    /// Restore one device's state from [`PioBus::save`]. An unknown name or version, or a
    /// state the device refuses, is an error and changes nothing. Restoring the UART drives
    /// IRQ 4 to its restored level (the callback is called even if the level is unchanged,
    /// so a fresh VM's line matches the device; with the irqchip restored from the same
    /// source, the line's recorded level is the same and no new edge results).
    pub fn restore(&self, name: &str, version: u32, bytes: &[u8]) -> Result<(), PioError> {
        let check = |expected: u32| {
            if version == expected {
                Ok(())
            } else {
                Err(PioError::UnsupportedVersion {
                    name: name.to_owned(),
                    version,
                    expected,
                })
            }
        };
        match name {
            SERIAL_STATE_NAME => {
                check(Serial::STATE_VERSION)?;
                let mut slot = lock(&self.serial);
                slot.dev.restore(bytes)?;
                let level = slot.dev.irq_level();
                slot.level = level;
                (self.irq)(COM1_IRQ, level);
            }
            FW_CFG_STATE_NAME => {
                check(FwCfg::STATE_VERSION)?;
                lock(&self.fw_cfg).restore(bytes)?;
            }
            PCI_HOST_STATE_NAME => {
                check(PCI_HOST_STATE_VERSION)?;
                let b: [u8; 4] = bytes
                    .try_into()
                    .map_err(|_| PioError::PciHostLength(bytes.len()))?;
                *lock(&self.pci_address) = u32::from_le_bytes(b);
            }
            testdev::STATE_NAME => {
                check(testdev::STATE_VERSION)?;
                lock(&self.testdev).restore(bytes)?;
            }
            _ => return Err(PioError::UnknownDevice(name.to_owned())),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    struct Rig {
        bus: PioBus,
        out: Arc<Mutex<Vec<u8>>>,
        logs: Arc<Mutex<Vec<String>>>,
        irqs: Arc<Mutex<Vec<(u32, bool)>>>,
    }

    fn rig() -> Rig {
        let out = Arc::new(Mutex::new(Vec::new()));
        let logs = Arc::new(Mutex::new(Vec::new()));
        let irqs = Arc::new(Mutex::new(Vec::new()));
        let (o, l, q) = (Arc::clone(&out), Arc::clone(&logs), Arc::clone(&irqs));
        let bus = PioBus::new(
            Serial::new(Box::new(move |b| o.lock().unwrap().push(b))),
            FwCfg::new(2, 128 << 20),
            Box::new(move |s| l.lock().unwrap().push(s.to_owned())),
            Box::new(move |n, lv| q.lock().unwrap().push((n, lv))),
        );
        Rig {
            bus,
            out,
            logs,
            irqs,
        }
    }

    fn inb(bus: &PioBus, port: u16) -> u8 {
        let mut b = [0u8];
        bus.read(port, &mut b);
        b[0]
    }

    #[test]
    fn serial_transmit_and_receive() {
        let r = rig();
        for &b in b"ok" {
            assert_eq!(r.bus.write(0x3f8, &[b]), PioAction::Continue);
        }
        assert_eq!(*r.out.lock().unwrap(), b"ok");
        assert_eq!(inb(&r.bus, 0x3fd) & 0x61, 0x60);
        r.bus.push_serial_input(b"\n");
        assert_eq!(inb(&r.bus, 0x3fd) & 0x01, 0x01);
        assert_eq!(inb(&r.bus, 0x3f8), b'\n');
        assert!(r.irqs.lock().unwrap().is_empty(), "interrupts disabled");
        assert!(r.logs.lock().unwrap().is_empty());
    }

    #[test]
    fn serial_irq_follows_level_changes() {
        let r = rig();
        r.bus.write(0x3f9, &[0x01]); // IER: receive data
        assert!(r.irqs.lock().unwrap().is_empty());
        r.bus.push_serial_input(b"ab");
        assert_eq!(*r.irqs.lock().unwrap(), [(4, true)]);
        inb(&r.bus, 0x3f8);
        assert_eq!(r.irqs.lock().unwrap().len(), 1, "still data: unchanged");
        inb(&r.bus, 0x3f8);
        assert_eq!(*r.irqs.lock().unwrap(), [(4, true), (4, false)]);
        r.irqs.lock().unwrap().clear();
        // THR empty: raised on enabling, cleared by reading IIR, re-raised by a THR write,
        // and pulsed by a write while raised.
        r.bus.write(0x3f9, &[0x02]);
        assert_eq!(*r.irqs.lock().unwrap(), [(4, true)]);
        assert_eq!(inb(&r.bus, 0x3fa), 0x02);
        r.bus.write(0x3f8, b"x");
        r.bus.write(0x3f8, b"y");
        assert_eq!(
            *r.irqs.lock().unwrap(),
            [(4, true), (4, false), (4, true), (4, false), (4, true)]
        );
    }

    #[test]
    fn wide_serial_access_is_split_into_bytes() {
        let r = rig();
        r.bus.write(0x3fe, &[0x11, 0x22]); // MSR (ignored), SCR
        let mut w = [0u8; 2];
        r.bus.read(0x3fe, &mut w);
        assert_eq!(w, [0xb0, 0x22]);
        let mut d = [0u8; 4];
        r.bus.read(0x3fe, &mut d);
        assert_eq!(d, [0xb0, 0x22, 0xff, 0xff], "bytes past COM1 read all-ones");
        r.bus.write(0x3f8, &[b'a', 0, 0, 0]);
        assert_eq!(*r.out.lock().unwrap(), b"a", "THR, then IER/FCR/LCR writes");
    }

    #[test]
    fn pc_testdev_ports() {
        let r = rig();
        assert_eq!(
            r.bus.write(0xe0, &0xdead_beefu32.to_le_bytes()),
            PioAction::Continue
        );
        assert_eq!(inb(&r.bus, 0xe9), 0xbe);
        r.bus.write(0x200b, &[1]);
        r.bus.write(0x200b, &[0]);
        // IRQ 4 is the UART's: the testdev's write to it is dropped.
        r.bus.write(0x2004, &[1]);
        assert_eq!(*r.irqs.lock().unwrap(), vec![(11, true), (11, false)]);
        assert_eq!(inb(&r.bus, 0x200b), 0);
        r.bus.testdev().write_iomem(0x20, &[7]);
        let saved = r.bus.save();
        let (name, version, bytes) = saved.last().unwrap();
        let other = rig();
        other.bus.restore(name, *version, bytes).unwrap();
        assert_eq!(inb(&other.bus, 0xe3), 0xde);
        let mut b = [0u8; 1];
        other.bus.testdev().read_iomem(0x20, &mut b);
        assert_eq!(b, [7]);
        assert!(r.logs.lock().unwrap().is_empty());
    }

    #[test]
    fn debug_exit() {
        let r = rig();
        assert_eq!(r.bus.write(0xf4, &[0]), PioAction::Exit(1));
        assert_eq!(r.bus.write(0xf4, &[1]), PioAction::Exit(3));
        assert_eq!(r.bus.write(0xf4, &[0x34, 0x12]), PioAction::Exit(0x2469));
        assert_eq!(
            r.bus.write(0xf4, &0x8000_0001u32.to_le_bytes()),
            PioAction::Exit(3),
            "top bit shifted out as in QEMU's u32 arithmetic"
        );
        let mut d = [0u8; 4];
        r.bus.read(0xf4, &mut d);
        assert_eq!(d, [0xff; 4]);
        assert!(r.logs.lock().unwrap().is_empty());
    }

    #[test]
    fn fw_cfg_ports() {
        let r = rig();
        r.bus.write(0x510, &5u16.to_le_bytes());
        assert_eq!(inb(&r.bus, 0x511), 2);
        r.bus.write(0x510, &[3]);
        let mut d = [0u8; 4];
        r.bus.read(0x511, &mut d);
        assert_eq!(u32::from_le_bytes(d), 128 << 20);
        let mut w = [0u8; 2];
        r.bus.write(0x510, &0u16.to_le_bytes());
        r.bus.read(0x511, &mut w);
        assert_eq!(&w, b"QE");
    }

    #[test]
    fn pci_config_ports() {
        let r = rig();
        r.bus.write(0xcf8, &0x8000_0000u32.to_le_bytes());
        let mut d = [0u8; 4];
        r.bus.read(0xcf8, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x8000_0000);
        let mut w = [0u8; 2];
        r.bus.read(0xcfa, &mut w);
        assert_eq!(w, [0x00, 0x80]);
        r.bus.read(0xcfc, &mut d);
        assert_eq!(d, [0xff; 4], "no device");
        r.bus.read(0xcfe, &mut w);
        assert_eq!(w, [0xff; 2]);
        assert_eq!(
            r.bus.write(0xcfc, &0x1234u32.to_le_bytes()),
            PioAction::Continue
        );
        assert!(r.logs.lock().unwrap().is_empty());
        // A byte write to 0xcf9 (PIIX reset control) is not the latch: ignored, logged.
        r.bus.write(0xcf9, &[0x06]);
        r.bus.read(0xcf8, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x8000_0000);
        assert_eq!(r.logs.lock().unwrap().len(), 1);
    }

    #[test]
    fn quiet_ports_and_unemulated_ports_logged_once() {
        let r = rig();
        r.bus.write(0x80, &[0]);
        r.bus.write(0x87, &[0]);
        assert_eq!(inb(&r.bus, 0x80), 0xff);
        assert!(r.logs.lock().unwrap().is_empty());
        assert_eq!(inb(&r.bus, 0x70), 0xff);
        r.bus.write(0x70, &[0x8f]);
        let mut d = [0u8; 2];
        r.bus.read(0x64, &mut d);
        assert_eq!(d, [0xff; 2]);
        r.bus.write(0xffff, &[1]);
        r.bus.write(0xffff, &[1]);
        let logs = r.logs.lock().unwrap();
        assert_eq!(
            *logs,
            [
                "guest touched unemulated I/O port 0x70 (read, 1 byte); ignored",
                "guest touched unemulated I/O port 0x64 (read, 2 bytes); ignored",
                "guest touched unemulated I/O port 0xffff (write, 1 byte); ignored",
            ]
        );
    }

    #[test]
    fn save_restore() {
        let r = rig();
        r.bus.write(0x3f9, &[0x01]);
        r.bus.write(0x3ff, &[0x5a]);
        r.bus.push_serial_input(b"mig");
        r.bus.write(0x510, &3u16.to_le_bytes());
        inb(&r.bus, 0x511);
        r.bus.write(0xcf8, &0x8000_1234u32.to_le_bytes());
        let saved = r.bus.save();
        let names: Vec<_> = saved.iter().map(|(n, v, _)| (*n, *v)).collect();
        assert_eq!(
            names,
            [
                ("serial0", 1),
                ("fw_cfg", 1),
                ("pci_host", 1),
                ("pc-testdev", 1)
            ]
        );

        let t = rig();
        for (n, v, b) in &saved {
            t.bus.restore(n, *v, b).unwrap();
        }
        assert_eq!(t.bus.save(), saved);
        assert_eq!(
            *t.irqs.lock().unwrap(),
            [(4, true)],
            "line driven on restore"
        );
        assert_eq!(inb(&t.bus, 0x3ff), 0x5a);
        assert_eq!(inb(&t.bus, 0x3f8), b'm');
        assert_eq!(inb(&t.bus, 0x511), ((128u32 << 20) >> 8) as u8);

        assert!(matches!(
            t.bus.restore("rtc", 1, &[]),
            Err(PioError::UnknownDevice(_))
        ));
        assert!(matches!(
            t.bus.restore("serial0", 2, &saved[0].2),
            Err(PioError::UnsupportedVersion { expected: 1, .. })
        ));
        assert!(matches!(
            t.bus.restore("fw_cfg", 1, &[0; 3]),
            Err(PioError::FwCfg(_))
        ));
        assert!(matches!(
            t.bus.restore("serial0", 1, &[0; 3]),
            Err(PioError::Serial(_))
        ));
        assert_eq!(
            t.bus.restore("pci_host", 1, &[0; 5]),
            Err(PioError::PciHostLength(5))
        );
        assert_eq!(inb(&t.bus, 0x3f8), b'i', "failed restores changed nothing");
    }

    #[test]
    fn bus_is_shared_by_threads() {
        let r = rig();
        let bus = Arc::new(r.bus);
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let bus = Arc::clone(&bus);
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        bus.write(0x3f8, b"x");
                        bus.write(0x1234, &[0]);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(r.out.lock().unwrap().len(), 400);
        assert_eq!(
            r.logs.lock().unwrap().len(),
            1,
            "logged once across threads"
        );
    }

    proptest::proptest! {
        #[test]
        fn any_access_is_safe(ops in proptest::collection::vec((proptest::num::u16::ANY, proptest::collection::vec(proptest::num::u8::ANY, 0..6), proptest::bool::ANY), 0..100)) {
            let r = rig();
            for (port, mut data, w) in ops {
                if w {
                    let action = r.bus.write(port, &data);
                    proptest::prop_assert_eq!(action == PioAction::Continue, port != DEBUG_EXIT_PORT);
                } else {
                    r.bus.read(port, &mut data);
                }
            }
        }
    }
}
