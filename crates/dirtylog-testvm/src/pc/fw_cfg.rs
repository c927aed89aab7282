//! QEMU's firmware configuration device (`fw_cfg`), legacy I/O-port interface only: the
//! selector at port `0x510` and the data port at `0x511`, as x86 QEMU machines offer it.
//!
//! # What it models
//!
//! - Writing a key to the selector (a 16-bit write; 8- and 32-bit writes are taken as the
//!   low 16 bits of the value) selects an item and rewinds its read offset. The write-channel
//!   bit (`0x4000`) of a key is ignored, as in QEMU.
//! - Each byte read from the data port returns the next byte of the selected item; reading
//!   past its end returns 0 and leaves the offset at the end. A wider read returns that many
//!   successive bytes, the first in the lowest byte (so they land in memory in item order).
//!   Reads from the selector port also read data bytes, like QEMU's combined
//!   selector-and-data region.
//! - Items, all little-endian numbers unless said otherwise: `FW_CFG_SIGNATURE` (`"QEMU"`),
//!   `FW_CFG_ID` (1: the traditional interface, no DMA), `FW_CFG_UUID` (16 zero bytes),
//!   `FW_CFG_RAM_SIZE` (u64, bytes), `FW_CFG_NOGRAPHIC` (u16 1), `FW_CFG_NB_CPUS` (u16),
//!   `FW_CFG_BOOT_MENU` (u16 0), `FW_CFG_MAX_CPUS` (u16). kvm-unit-tests (`lib/x86/fwcfg.c`)
//!   reads `FW_CFG_RAM_SIZE` and `FW_CFG_NB_CPUS`.
//!
//! # What it does not model
//!
//! The DMA interface (ports `0x514..`), the file directory and named files (`FW_CFG_FILE_DIR`
//! reads as an empty item, i.e. zeros, which a reader takes as "no files"), writes to items
//! (data-port writes are ignored, as QEMU ignores them since 2.4), and the kernel/initrd
//! items QEMU's own option ROMs use (the loader places the kernel in guest memory itself).

/// Selector port.
pub const FW_CFG_PORT_SEL: u16 = 0x510;
/// Data port.
pub const FW_CFG_PORT_DATA: u16 = 0x511;

/// Key: the signature `"QEMU"`.
pub const FW_CFG_SIGNATURE: u16 = 0x00;
/// Key: the interface feature bits (u32; bit 0 traditional interface, bit 1 DMA).
pub const FW_CFG_ID: u16 = 0x01;
/// Key: the VM's UUID (16 bytes).
pub const FW_CFG_UUID: u16 = 0x02;
/// Key: RAM size in bytes (u64).
pub const FW_CFG_RAM_SIZE: u16 = 0x03;
/// Key: no graphical console (u16).
pub const FW_CFG_NOGRAPHIC: u16 = 0x04;
/// Key: number of CPUs started (u16).
pub const FW_CFG_NB_CPUS: u16 = 0x05;
/// Key: whether the firmware shows a boot menu (u16).
pub const FW_CFG_BOOT_MENU: u16 = 0x0e;
/// Key: most CPUs the machine can have (u16).
pub const FW_CFG_MAX_CPUS: u16 = 0x0f;
/// Key bit: the (obsolete) write channel; ignored when selecting.
pub const FW_CFG_WRITE_CHANNEL: u16 = 0x4000;

/// Bytes of the state [`FwCfg::save`] writes.
const SAVE_LEN: usize = 2 + 4;

/// Why [`FwCfg::restore`] refused a saved state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FwCfgError {
    /// The state does not have the layout's length.
    #[error("fw_cfg state has {len} bytes, expected {expected}")]
    BadLength {
        /// Bytes given.
        len: usize,
        /// Bytes the layout has.
        expected: usize,
    },
    /// The read offset lies beyond the end of the selected item.
    #[error("fw_cfg state: offset {offset} beyond the {len}-byte item {key:#x}")]
    OffsetBeyondItem {
        /// The selected key.
        key: u16,
        /// The saved offset.
        offset: u32,
        /// The item's length here.
        len: usize,
    },
}

/// The fw_cfg device; see the [module documentation](self).
#[derive(Debug, Clone)]
pub struct FwCfg {
    items: Vec<(u16, Vec<u8>)>,
    selector: u16,
    offset: u32,
}

impl FwCfg {
    /// Version of the layout [`FwCfg::save`] writes: the selected key (u16 LE, as the guest
    /// wrote it), then the read offset (u32 LE). 6 bytes.
    pub const STATE_VERSION: u32 = 1;

    /// The device for a machine with `nb_cpus` CPUs (also the maximum) and `ram_bytes` of
    /// RAM; no item selected (key 0, offset 0).
    pub fn new(nb_cpus: u16, ram_bytes: u64) -> Self {
        let items = vec![
            (FW_CFG_SIGNATURE, b"QEMU".to_vec()),
            (FW_CFG_ID, 1u32.to_le_bytes().to_vec()),
            (FW_CFG_UUID, vec![0; 16]),
            (FW_CFG_RAM_SIZE, ram_bytes.to_le_bytes().to_vec()),
            (FW_CFG_NOGRAPHIC, 1u16.to_le_bytes().to_vec()),
            (FW_CFG_NB_CPUS, nb_cpus.to_le_bytes().to_vec()),
            (FW_CFG_BOOT_MENU, 0u16.to_le_bytes().to_vec()),
            (FW_CFG_MAX_CPUS, nb_cpus.to_le_bytes().to_vec()),
        ];
        FwCfg {
            items,
            selector: 0,
            offset: 0,
        }
    }

    /// The contents of the item `key` selects (empty for keys without an item).
    pub fn item(&self, key: u16) -> &[u8] {
        let key = key & !FW_CFG_WRITE_CHANNEL;
        self.items
            .iter()
            .find(|(k, _)| *k == key)
            .map_or(&[][..], |(_, v)| v.as_slice())
    }

    /// The selected key, as written.
    pub fn selector(&self) -> u16 {
        self.selector
    }

    fn read_byte(&mut self) -> u8 {
        let off = usize::try_from(self.offset).unwrap_or(usize::MAX);
        match self.item(self.selector).get(off) {
            Some(&b) => {
                // off < item length, which is far below u32::MAX.
                self.offset = self.offset.saturating_add(1);
                b
            }
            None => 0,
        }
    }

    /// A guest `in` of `size` bytes (1, 2 or 4; more are read as 4) from `port`. Ports other
    /// than the selector and data ports read as all-ones.
    pub fn read(&mut self, port: u16, size: usize) -> u32 {
        let size = size.min(4);
        if port != FW_CFG_PORT_SEL && port != FW_CFG_PORT_DATA {
            return if size >= 4 {
                u32::MAX
            } else {
                (1u32 << (8 * size)) - 1
            };
        }
        let mut v = 0u32;
        for i in 0..size {
            v |= u32::from(self.read_byte()) << (8 * i);
        }
        v
    }

    /// A guest `out` of `size` bytes of `value` to `port`: on the selector port it selects
    /// the key in the low 16 bits (the low 8 bits for a 1-byte write) and rewinds; anything
    /// else is ignored.
    pub fn write(&mut self, port: u16, value: u32, size: usize) {
        if port != FW_CFG_PORT_SEL {
            return;
        }
        let key = if size == 1 {
            value & 0xff
        } else {
            value & 0xffff
        };
        // Masked to 16 bits just above.
        self.selector = u16::try_from(key).unwrap_or(u16::MAX);
        self.offset = 0;
    }

    /// The selector and read offset, in the layout of [`FwCfg::STATE_VERSION`].
    pub fn save(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(SAVE_LEN);
        v.extend_from_slice(&self.selector.to_le_bytes());
        v.extend_from_slice(&self.offset.to_le_bytes());
        v
    }

    /// Restore the selector and read offset [`FwCfg::save`] produced; the state must be
    /// exactly 6 bytes and the offset within the selected item. On error nothing changes.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), FwCfgError> {
        let b: &[u8; SAVE_LEN] = bytes.try_into().map_err(|_| FwCfgError::BadLength {
            len: bytes.len(),
            expected: SAVE_LEN,
        })?;
        let selector = u16::from_le_bytes([b[0], b[1]]);
        let offset = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let len = self.item(selector).len();
        if usize::try_from(offset).map_or(true, |o| o > len) {
            return Err(FwCfgError::OffsetBeyondItem {
                key: selector,
                offset,
                len,
            });
        }
        self.selector = selector;
        self.offset = offset;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_item(f: &mut FwCfg, key: u16, n: usize) -> Vec<u8> {
        f.write(FW_CFG_PORT_SEL, u32::from(key), 2);
        (0..n)
            .map(|_| u8::try_from(f.read(FW_CFG_PORT_DATA, 1)).unwrap())
            .collect()
    }

    #[test]
    fn items() {
        let mut f = FwCfg::new(3, 0x1_2345_6000);
        assert_eq!(read_item(&mut f, FW_CFG_SIGNATURE, 4), b"QEMU");
        assert_eq!(read_item(&mut f, FW_CFG_ID, 4), [1, 0, 0, 0]);
        assert_eq!(read_item(&mut f, FW_CFG_UUID, 16), [0; 16]);
        assert_eq!(
            read_item(&mut f, FW_CFG_RAM_SIZE, 8),
            0x1_2345_6000u64.to_le_bytes()
        );
        assert_eq!(read_item(&mut f, FW_CFG_NOGRAPHIC, 2), [1, 0]);
        assert_eq!(read_item(&mut f, FW_CFG_NB_CPUS, 2), [3, 0]);
        assert_eq!(read_item(&mut f, FW_CFG_BOOT_MENU, 2), [0, 0]);
        assert_eq!(read_item(&mut f, FW_CFG_MAX_CPUS, 2), [3, 0]);
    }

    #[test]
    fn past_end_and_unknown_keys_read_zero() {
        let mut f = FwCfg::new(1, 1 << 30);
        assert_eq!(read_item(&mut f, FW_CFG_SIGNATURE, 6), b"QEMU\0\0");
        assert_eq!(f.save()[2..], 4u32.to_le_bytes(), "offset stops at the end");
        assert_eq!(read_item(&mut f, 0x19, 4), [0; 4], "file dir: no files");
        assert_eq!(read_item(&mut f, 0x1234, 3), [0; 3]);
        assert_eq!(
            read_item(&mut f, 0x8000, 3),
            [0; 3],
            "arch-local keys: none"
        );
    }

    #[test]
    fn selecting_rewinds_and_write_channel_bit_is_ignored() {
        let mut f = FwCfg::new(2, 0);
        assert_eq!(read_item(&mut f, FW_CFG_SIGNATURE, 2), b"QE");
        assert_eq!(read_item(&mut f, FW_CFG_SIGNATURE, 2), b"QE");
        assert_eq!(
            read_item(&mut f, FW_CFG_WRITE_CHANNEL | FW_CFG_NB_CPUS, 2),
            [2, 0]
        );
    }

    #[test]
    fn access_widths() {
        let mut f = FwCfg::new(4, 0x8000_0000);
        // 8-bit selector write.
        f.write(FW_CFG_PORT_SEL, 0x105, 1);
        assert_eq!(f.selector(), FW_CFG_NB_CPUS);
        assert_eq!(f.read(FW_CFG_PORT_DATA, 2), 4);
        // 32-bit selector write takes the low 16 bits.
        f.write(FW_CFG_PORT_SEL, 0xdead_0003, 4);
        assert_eq!(f.selector(), FW_CFG_RAM_SIZE);
        assert_eq!(f.read(FW_CFG_PORT_DATA, 4), 0x8000_0000);
        assert_eq!(
            f.read(FW_CFG_PORT_SEL, 4),
            0,
            "selector port reads data too"
        );
        f.write(FW_CFG_PORT_SEL, 0, 2);
        assert_eq!(f.read(FW_CFG_PORT_SEL, 1), u32::from(b'Q'));
        assert_eq!(f.read(FW_CFG_PORT_DATA, 8), u32::from_le_bytes(*b"EMU\0"));
        // Data-port writes and other ports change nothing.
        f.write(FW_CFG_PORT_SEL, 0, 2);
        f.write(FW_CFG_PORT_DATA, 0x55, 1);
        f.write(0x512, 5, 2);
        assert_eq!(f.selector(), 0);
        assert_eq!(f.read(FW_CFG_PORT_DATA, 1), u32::from(b'Q'));
        assert_eq!(f.read(0x512, 2), 0xffff);
        assert_eq!(f.read(0x512, 4), u32::MAX);
        assert_eq!(f.read(FW_CFG_PORT_DATA, 0), 0);
    }

    #[test]
    fn save_restore() {
        let mut f = FwCfg::new(2, 64 << 20);
        read_item(&mut f, FW_CFG_RAM_SIZE, 3);
        let s = f.save();
        assert_eq!(s.len(), 6);
        let mut g = FwCfg::new(2, 64 << 20);
        g.restore(&s).unwrap();
        assert_eq!(g.save(), s);
        let rest: Vec<u8> = (0..5)
            .map(|_| u8::try_from(g.read(FW_CFG_PORT_DATA, 1)).unwrap())
            .collect();
        assert_eq!(rest, (64u64 << 20).to_le_bytes()[3..]);
    }

    #[test]
    fn restore_is_strict() {
        let mut f = FwCfg::new(1, 0);
        for len in [0, 5, 7] {
            assert_eq!(
                f.restore(&vec![0; len]),
                Err(FwCfgError::BadLength { len, expected: 6 })
            );
        }
        let mut bad = vec![0u8, 0];
        bad.extend_from_slice(&5u32.to_le_bytes());
        assert!(matches!(
            f.restore(&bad),
            Err(FwCfgError::OffsetBeyondItem { len: 4, .. })
        ));
        let mut at_end = vec![0u8, 0];
        at_end.extend_from_slice(&4u32.to_le_bytes());
        f.restore(&at_end).unwrap();
        assert_eq!(f.read(FW_CFG_PORT_DATA, 1), 0);
    }

    proptest::proptest! {
        #[test]
        fn never_panics(ops in proptest::collection::vec((0x50fu16..0x513, proptest::num::u32::ANY, 0usize..9, proptest::bool::ANY), 0..100),
                        state in proptest::collection::vec(proptest::num::u8::ANY, 0..8)) {
            let mut f = FwCfg::new(1, 1 << 20);
            let _ = f.restore(&state);
            for (port, v, size, w) in ops {
                if w { f.write(port, v, size) } else { f.read(port, size); }
            }
        }
    }
}
