//! Errors of the host-memory tracker. Every failed system call names the operation and carries
//! the kernel's errno; refusals made before any system call have their own variants.

use crate::HostMethod;

/// A host-memory tracker error.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A system call failed.
    #[error("{op} failed: {source}")]
    Sys {
        /// The operation (`"UFFDIO_REGISTER"`, `"PAGEMAP_SCAN"`, `"mprotect"`, ...).
        op: &'static str,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
    /// A length of zero bytes.
    #[error("a region of zero bytes")]
    ZeroLength,
    /// An address or length that is not a multiple of the page size.
    #[error("{what} {value:#x} is not a multiple of the page size {page_size:#x}")]
    Unaligned {
        /// `"address"` or `"length"`.
        what: &'static str,
        /// The value given.
        value: u64,
        /// The page size it must be a multiple of.
        page_size: u64,
    },
    /// A page size that is not a power of two at least the system's base page size.
    #[error("page size {0:#x} is not a power of two at least the base page size")]
    BadPageSize(u64),
    /// A range that wraps around the address space or does not fit in it.
    #[error("range {addr:#x} + {len:#x} does not fit in the address space")]
    RangeOverflow {
        /// Start address.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Two regions of one tracker overlap.
    #[error(
        "regions {first} ({first_addr:#x}..{first_end:#x}) and {second} \
         ({second_addr:#x}..{second_end:#x}) overlap"
    )]
    Overlap {
        /// Index of one region.
        first: usize,
        /// Its start.
        first_addr: u64,
        /// Its end (exclusive).
        first_end: u64,
        /// Index of the other region.
        second: usize,
        /// Its start.
        second_addr: u64,
        /// Its end (exclusive).
        second_end: u64,
    },
    /// Some of the range is not mapped in this process (`ENOMEM`/`ENOENT` from `op`, or a hole
    /// found after `EINVAL`): it was never mapped, or was unmapped (or replaced by another
    /// mapping, `EPERM` from `PAGEMAP_SCAN`) while tracked.
    #[error(
        "{op}: {addr:#x}..+{len:#x} is not (or no longer) mapped in this process as the tracker \
         registered it"
    )]
    NotMapped {
        /// The operation that found the hole.
        op: &'static str,
        /// Start of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
    },
    /// The range is already registered with another userfaultfd (`EBUSY`): another tracker
    /// watches it.
    #[error("{addr:#x}..+{len:#x} is already watched by another tracker (userfaultfd EBUSY)")]
    AlreadyTracked {
        /// Start of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
    },
    /// The dirty ring was asked for: it has no meaning for host memory.
    #[error(
        "the dirty ring is refused for host memory: a ring queues each vCPU's writes in its \
         own ring, and process memory has no vCPUs whose writes the kernel could queue per \
         thread; use dirty-log or clear-log"
    )]
    RingRefused,
    /// No region with this index.
    #[error("no region {index}: the tracker has {count}")]
    NoSuchRegion {
        /// The index given.
        index: usize,
        /// Regions in the tracker.
        count: usize,
    },
    /// A bitmap of the wrong length for the region.
    #[error("bitmap of {got} words for region {index}: it needs {expected}")]
    BitmapLength {
        /// Region index.
        index: usize,
        /// Words needed (`npages.div_ceil(64)`).
        expected: usize,
        /// Words given.
        got: usize,
    },
    /// `clear` with a first page that is not a multiple of 64.
    #[error("first page {0} is not a multiple of 64")]
    FirstPageUnaligned(u64),
    /// `clear` with bits for pages beyond the region.
    #[error("bit for page {page} of region {index}, which has {npages} pages")]
    BitsBeyondRegion {
        /// Region index.
        index: usize,
        /// The first page out of range that had its bit set.
        page: u64,
        /// Pages in the region.
        npages: u64,
    },
    /// `harvest` or `clear` before `start`, or after `stop`.
    #[error("the tracker is not started")]
    NotStarted,
    /// This kernel cannot do `method` (what the probe saw is in `why`).
    #[error("method {method} is not supported here: {why}")]
    Unsupported {
        /// The method.
        method: HostMethod,
        /// What was missing.
        why: String,
    },
    /// The method is not compiled into this build of the crate.
    #[error("method {0} is not built into this version of dirtylog-host")]
    MethodNotBuilt(HostMethod),
    /// Not enough free 2 MiB huge pages for a hugetlb mapping.
    #[error(
        "{needed} free 2 MiB huge pages are needed, {free} are free: reserve them as root with \
         `echo N > /proc/sys/vm/nr_hugepages` (N = the pages already reserved plus {needed})"
    )]
    HugePagesUnavailable {
        /// Huge pages the mapping needs.
        needed: u64,
        /// Huge pages free now.
        free: u64,
    },
    /// A length that does not fit in this process's address space (`usize`).
    #[error("length {0:#x} does not fit in the address space")]
    TooLarge(u64),
}

impl HostError {
    /// The errno of the last system call, for `op`.
    pub(crate) fn last_os(op: &'static str) -> Self {
        HostError::Sys {
            op,
            source: std::io::Error::last_os_error(),
        }
    }

    /// The errno, if this error came from a system call.
    pub fn errno(&self) -> Option<i32> {
        match self {
            HostError::Sys { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}
