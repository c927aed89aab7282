//! Raw userfaultfd and `PAGEMAP_SCAN` definitions. The structs and constants come from
//! `linux-raw-sys` (generated from the kernel's uapi headers); the `PAGEMAP_SCAN` ioctl number
//! is missing there and is defined here, checked against the uapi layout in a test.

#![allow(dead_code)]

pub(crate) use linux_raw_sys::general::{page_region, pm_scan_arg};

/// `_IOWR('f', 16, struct pm_scan_arg)` (`include/uapi/linux/fs.h`).
pub(crate) const PAGEMAP_SCAN: u32 = 0xC060_6610;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pagemap_scan_number_matches_the_uapi_layout() {
        // _IOC(dir=READ|WRITE (3), type 'f', nr 16, size) on x86-64: dir<<30 | size<<16 | type<<8 | nr.
        let size = std::mem::size_of::<pm_scan_arg>() as u32;
        assert_eq!(size, 96, "struct pm_scan_arg is 96 bytes in the uapi");
        assert_eq!(
            PAGEMAP_SCAN,
            (3 << 30) | (size << 16) | ((b'f' as u32) << 8) | 16
        );
        assert_eq!(std::mem::size_of::<page_region>(), 24);
    }
}
