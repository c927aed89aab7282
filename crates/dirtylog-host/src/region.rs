//! [`HostRegion`]: a range of this process's memory for a tracker to watch.

use std::sync::Arc;

use crate::sys;
use crate::{HostError, HostMemory};

/// A page-aligned range of this process's memory that a tracker watches: a [`HostMemory`]
/// (kept alive while tracked) or a mapping the caller owns ([`from_raw_parts`](Self::from_raw_parts)).
#[derive(Debug, Clone)]
pub struct HostRegion {
    addr: u64,
    len: u64,
    page_size: u64,
    /// Keeps an owned mapping alive while a tracker holds the region.
    _mem: Option<Arc<HostMemory>>,
}

impl HostRegion {
    /// The whole of `mem`.
    pub fn new(mem: Arc<HostMemory>) -> Self {
        HostRegion {
            addr: mem.as_ptr() as u64,
            len: mem.len(),
            page_size: mem.page_size(),
            _mem: Some(mem),
        }
    }

    /// `len` bytes at `addr`, in pages of `page_size` bytes (a power of two, at least the base
    /// page size; 2 MiB for a hugetlb mapping), e.g. a VMM's own guest RAM mapping. `addr` and
    /// `len` must be multiples of `page_size` and `len > 0` (checked).
    ///
    /// # Safety
    /// The range must be memory this process mapped read-write, and it must stay mapped, and
    /// not be re-protected or remapped by anyone else, for as long as a tracker holds the
    /// region. (The `mprotect` method changes its protection and restores read-write when
    /// disarmed; that would be unsound on a range that is, e.g., a guard page or read-only
    /// data.) A range unmapped under a tracker is reported as [`HostError::NotMapped`] by the
    /// next call that touches it.
    pub unsafe fn from_raw_parts(
        addr: *mut u8,
        len: u64,
        page_size: u64,
    ) -> Result<Self, HostError> {
        let addr = addr as u64;
        check_range(addr, len, page_size)?;
        Ok(HostRegion {
            addr,
            len,
            page_size,
            _mem: None,
        })
    }

    /// Start address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Never: a region has at least one page.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Page size in bytes.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Pages in the region.
    pub fn npages(&self) -> u64 {
        self.len / self.page_size
    }

    /// End address (exclusive).
    pub(crate) fn end(&self) -> u64 {
        self.addr + self.len
    }
}

/// Check a region's geometry: a page size that is a power of two ≥ the base page size, a
/// non-empty length, both address and length multiples of it, and an end that fits.
pub(crate) fn check_range(addr: u64, len: u64, page_size: u64) -> Result<(), HostError> {
    if !page_size.is_power_of_two() || page_size < sys::base_page_size() {
        return Err(HostError::BadPageSize(page_size));
    }
    if len == 0 {
        return Err(HostError::ZeroLength);
    }
    if addr % page_size != 0 {
        return Err(HostError::Unaligned {
            what: "address",
            value: addr,
            page_size,
        });
    }
    if len % page_size != 0 {
        return Err(HostError::Unaligned {
            what: "length",
            value: len,
            page_size,
        });
    }
    match addr.checked_add(len) {
        Some(end) if usize::try_from(end).is_ok() && end <= isize::MAX as u64 => Ok(()),
        _ => Err(HostError::RangeOverflow { addr, len }),
    }
}
