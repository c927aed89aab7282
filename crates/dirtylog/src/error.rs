//! Errors with KVM's errno.
//!
//! Every failure of a KVM-mirroring operation is a typed variant that says what was wrong and
//! carries the errno the kernel returns for the same input, so the core and `/dev/kvm` can be
//! compared error for error (see `Error::errno`).

/// `EINVAL`, `ENOENT`, ... as plain numbers, so no libc dependency is needed in the core.
pub mod errno {
    pub const ENOENT: i32 = 2;
    pub const EINTR: i32 = 4;
    pub const ENXIO: i32 = 6;
    pub const E2BIG: i32 = 7;
    pub const ENOMEM: i32 = 12;
    pub const EFAULT: i32 = 14;
    pub const EEXIST: i32 = 17;
    pub const EINVAL: i32 = 22;
    pub const EOPNOTSUPP: i32 = 95;
}

/// An error from a dirty-log operation. `errno()` gives the kernel's errno for the same case.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// GET/CLEAR while a dirty ring is in use without a bitmap.
    #[error(
        "the dirty ring is in use, so there is no dirty bitmap (use ring harvest + reset instead)"
    )]
    RingInUse,
    /// Bad address-space id or slot id (`as_id >= nr_as`, `id >= KVM_USER_MEM_SLOTS`).
    #[error("invalid memslot id {id} in address space {as_id}")]
    InvalidSlotId { as_id: u16, id: u16 },
    /// CLEAR with `first_page` not a multiple of 64.
    #[error("first_page {first_page} is not a multiple of 64")]
    MisalignedFirstPage { first_page: u64 },
    /// No such memslot.
    #[error("memslot {id} (address space {as_id}) does not exist")]
    NoSuchSlot { as_id: u16, id: u16 },
    /// The memslot exists but dirty logging is off (no bitmap).
    #[error("dirty logging is not enabled on memslot {id} (address space {as_id})")]
    LoggingDisabled { as_id: u16, id: u16 },
    /// CLEAR range outside the slot, or not a multiple of 64 pages without ending at the slot end.
    #[error("range first_page={first_page} num_pages={num_pages} is invalid for a slot of {npages} pages (num_pages must be a multiple of 64 unless the range ends at the slot end)")]
    BadRange {
        first_page: u64,
        num_pages: u64,
        npages: u64,
    },
    /// The caller's buffer is smaller than the operation needs (`copy_{to,from}_user` fails).
    #[error("buffer of {got} bytes is too small, {need} bytes needed")]
    BufferTooSmall { need: usize, got: usize },
    /// `KVM_ENABLE_CAP` with invalid arguments.
    #[error("invalid capability arguments: {0}")]
    InvalidCap(&'static str),
    /// The capability is not supported.
    #[error("capability not supported: {0}")]
    Unsupported(&'static str),
    /// Dirty ring size rules (power of two, >= page and reserved entries, set once, before vCPUs).
    #[error("invalid dirty ring size {bytes} bytes: {why}")]
    InvalidRingSize { bytes: u64, why: &'static str },
    /// Dirty ring larger than `KVM_DIRTY_RING_MAX_ENTRIES` entries.
    #[error("dirty ring of {bytes} bytes exceeds the maximum of 1 MiB (65536 entries)")]
    RingTooBig { bytes: u64 },
    /// The ring was already enabled, or vCPUs already exist.
    #[error("the dirty ring can only be enabled once, before any vCPU is created: {0}")]
    RingTooLate(&'static str),
    /// `KVM_RESET_DIRTY_RINGS` without a ring.
    #[error("no dirty ring is enabled")]
    NoRing,
    /// Invalid memory region arguments.
    #[error("invalid memory region: {0}")]
    InvalidRegion(&'static str),
    /// The new region overlaps an existing one.
    #[error("memory region overlaps memslot {id}")]
    RegionOverlap { id: u16 },
    /// A wait was interrupted.
    #[error("interrupted")]
    Interrupted,
}

impl Error {
    /// The errno the kernel returns for the same input.
    pub fn errno(&self) -> i32 {
        use errno::*;
        match self {
            Error::RingInUse => ENXIO,
            Error::InvalidSlotId { .. } => EINVAL,
            Error::MisalignedFirstPage { .. } => EINVAL,
            Error::NoSuchSlot { .. } | Error::LoggingDisabled { .. } => ENOENT,
            Error::BadRange { .. } => EINVAL,
            Error::BufferTooSmall { .. } => EFAULT,
            Error::InvalidCap(_) => EINVAL,
            Error::Unsupported(_) => EINVAL,
            Error::InvalidRingSize { .. } => EINVAL,
            Error::RingTooBig { .. } => E2BIG,
            Error::RingTooLate(_) => EINVAL,
            Error::NoRing => EINVAL,
            Error::InvalidRegion(_) => EINVAL,
            Error::RegionOverlap { .. } => EEXIST,
            Error::Interrupted => EINTR,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
