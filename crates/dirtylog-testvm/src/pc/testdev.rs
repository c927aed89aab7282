//! QEMU's `pc-testdev`, the device kvm-unit-tests' x86 runner always adds (`-device
//! pc-testdev`): a scratch register, ISA IRQ lines the guest raises itself, and a small MMIO
//! buffer. Modelled from its documented behaviour:
//!
//! | where | what |
//! |---|---|
//! | ports `0xe0..=0xe3` and `0xe8..=0xeb` | one 32-bit register: an access of N bytes at offset `k` reads or replaces bytes `k..k+N` |
//! | ports `0xe4..=0xe7` | "flush page": QEMU `mprotect`s the host page of the guest-physical address written, to force the next guest access through a fault. **Not modelled**: the VMM's own threads (the migration engine) read guest memory concurrently, so a `PROT_NONE` window could fault them; writes are logged once by the bus and ignored |
//! | ports `0x2000..=0x2017` | ISA IRQ line `port - 0x2000`: a byte written sets its level (non-zero = high); reads 0 |
//! | MMIO `0xff000000 .. +64 KiB` | a buffer: reads return what was written, zeros at first |

use thiserror::Error;

/// The register ports.
pub const IOPORT: std::ops::RangeInclusive<u16> = 0xe0..=0xe3;
/// The register again, at QEMU's byte-wide alias.
pub const IOPORT_BYTE: std::ops::RangeInclusive<u16> = 0xe8..=0xeb;
/// The flush-page ports (not modelled; see the module docs).
pub const FLUSH_PAGE: std::ops::RangeInclusive<u16> = 0xe4..=0xe7;
/// The IRQ-line ports: `IRQ_LINES.start() + n` drives ISA IRQ `n`.
pub const IRQ_LINES: std::ops::RangeInclusive<u16> = 0x2000..=0x2017;
/// The MMIO buffer's guest-physical base.
pub const IOMEM_BASE: u64 = 0xff00_0000;
/// The MMIO buffer's length.
pub const IOMEM_LEN: u64 = 0x1_0000;
/// Device name of the state in [`super::pio::PioBus::save`].
pub const STATE_NAME: &str = "pc-testdev";
/// Version of the state: the register (u32 LE), then the buffer up to its last non-zero
/// byte (u32 LE length, the bytes).
pub const STATE_VERSION: u32 = 1;

/// A bad saved state.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum TestdevError {
    /// Shorter than its header or its declared buffer.
    #[error("pc-testdev state of {0} bytes is truncated")]
    Truncated(usize),
    /// A buffer longer than the device's, or bytes after it.
    #[error("pc-testdev state has a buffer of {0} bytes or trailing bytes (at most {IOMEM_LEN})")]
    BadLength(usize),
}

/// The device.
#[derive(Clone, PartialEq, Eq)]
pub struct PcTestdev {
    ioport: u32,
    iomem: Box<[u8]>,
}

impl std::fmt::Debug for PcTestdev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PcTestdev")
            .field("ioport", &format_args!("{:#x}", self.ioport))
            .finish_non_exhaustive()
    }
}

impl Default for PcTestdev {
    fn default() -> Self {
        PcTestdev {
            ioport: 0,
            iomem: vec![0; IOMEM_LEN as usize].into_boxed_slice(),
        }
    }
}

impl PcTestdev {
    /// Read `data.len()` bytes of the register at port `port` (in [`IOPORT`] or
    /// [`IOPORT_BYTE`]); bytes past the register read 0.
    pub fn read_ioport(&self, port: u16, data: &mut [u8]) {
        let bytes = self.ioport.to_le_bytes();
        let k = usize::from(port & 3);
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(k + i).copied().unwrap_or(0);
        }
    }

    /// Replace bytes of the register from port `port` on; bytes past it are dropped.
    pub fn write_ioport(&mut self, port: u16, data: &[u8]) {
        let mut bytes = self.ioport.to_le_bytes();
        let k = usize::from(port & 3);
        for (i, b) in data.iter().enumerate() {
            if let Some(x) = bytes.get_mut(k + i) {
                *x = *b;
            }
        }
        self.ioport = u32::from_le_bytes(bytes);
    }

    /// The IRQ line and level an `out` of `data` to `port` (in [`IRQ_LINES`]) sets.
    pub fn irq_line(port: u16, data: &[u8]) -> Option<(u32, bool)> {
        let line = port.checked_sub(*IRQ_LINES.start())?;
        (line <= IRQ_LINES.end() - IRQ_LINES.start())
            .then(|| (u32::from(line), data.iter().any(|&b| b != 0)))
    }

    /// Read from the buffer at `offset` (bytes outside it read 0).
    pub fn read_iomem(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset.saturating_add(i as u64))
                .ok()
                .and_then(|o| self.iomem.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    /// Write to the buffer at `offset` (bytes outside it are dropped).
    pub fn write_iomem(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let slot = usize::try_from(offset.saturating_add(i as u64))
                .ok()
                .and_then(|o| self.iomem.get_mut(o));
            if let Some(x) = slot {
                *x = *b;
            }
        }
    }

    /// The state ([`STATE_VERSION`]).
    pub fn save(&self) -> Vec<u8> {
        let used = self
            .iomem
            .iter()
            .rposition(|&b| b != 0)
            .map_or(0, |i| i + 1);
        let mut out = Vec::with_capacity(8 + used);
        out.extend_from_slice(&self.ioport.to_le_bytes());
        out.extend_from_slice(&(used as u32).to_le_bytes());
        out.extend_from_slice(&self.iomem[..used]);
        out
    }

    /// Load a state from [`save`](Self::save); on error nothing changes.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), TestdevError> {
        let word = |at: usize| -> Result<u32, TestdevError> {
            let b = bytes
                .get(at..at + 4)
                .ok_or(TestdevError::Truncated(bytes.len()))?;
            Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        let ioport = word(0)?;
        let used = word(4)? as usize;
        if used as u64 > IOMEM_LEN {
            return Err(TestdevError::BadLength(used));
        }
        let buf = bytes
            .get(8..8 + used)
            .ok_or(TestdevError::Truncated(bytes.len()))?;
        if bytes.len() != 8 + used {
            return Err(TestdevError::BadLength(bytes.len()));
        }
        self.ioport = ioport;
        self.iomem.fill(0);
        self.iomem[..used].copy_from_slice(buf);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_reads_back_by_byte_lanes() {
        let mut t = PcTestdev::default();
        t.write_ioport(0xe0, &0x1122_3344u32.to_le_bytes());
        let mut b = [0u8; 1];
        t.read_ioport(0xe2, &mut b);
        assert_eq!(b, [0x22]);
        t.write_ioport(0xe9, &[0xaa]);
        let mut w = [0u8; 4];
        t.read_ioport(0xe0, &mut w);
        assert_eq!(u32::from_le_bytes(w), 0x1122_aa44);
        // A 4-byte access at offset 3 keeps the one byte that fits.
        t.write_ioport(0xe3, &[1, 2, 3, 4]);
        t.read_ioport(0xe3, &mut w);
        assert_eq!(w, [1, 0, 0, 0]);
    }

    #[test]
    fn irq_lines() {
        assert_eq!(PcTestdev::irq_line(0x200b, &[1]), Some((11, true)));
        assert_eq!(PcTestdev::irq_line(0x2000, &[0]), Some((0, false)));
        assert_eq!(PcTestdev::irq_line(0x2017, &[0, 2]), Some((23, true)));
        assert_eq!(PcTestdev::irq_line(0x2018, &[1]), None);
        assert_eq!(PcTestdev::irq_line(0x1fff, &[1]), None);
    }

    #[test]
    fn iomem_and_state_round_trip() {
        let mut t = PcTestdev::default();
        t.write_iomem(0x10, &[9, 8, 7]);
        t.write_iomem(IOMEM_LEN - 1, &[5, 6]); // the second byte falls off the end
        t.write_ioport(0xe0, &[0x42]);
        let mut b = [0u8; 4];
        t.read_iomem(0x10, &mut b);
        assert_eq!(b, [9, 8, 7, 0]);
        t.read_iomem(IOMEM_LEN - 1, &mut b);
        assert_eq!(b, [5, 0, 0, 0]);
        let s = t.save();
        let mut u = PcTestdev::default();
        u.restore(&s).unwrap();
        assert_eq!(t, u);
        assert_eq!(u.save(), s);
        // Damaged states change nothing.
        let before = u.clone();
        assert!(u.restore(&s[..s.len() - 1]).is_err());
        assert!(u.restore(&[s.as_slice(), &[0]].concat()).is_err());
        let mut big = s.clone();
        big[4..8].copy_from_slice(&(IOMEM_LEN as u32 + 1).to_le_bytes());
        assert!(u.restore(&big).is_err());
        assert!(u.restore(&[]).is_err());
        assert_eq!(u, before);
    }
}
