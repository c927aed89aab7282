//! Errors with KVM's errno.
//!
//! Every failure of a KVM-mirroring operation is a typed variant that says what was wrong and
//! carries the errno the kernel returns for the same input, so the core and `/dev/kvm` can be
//! compared error for error (see `Error::errno`).

/// `EINVAL`, `ENOENT`, ... as plain numbers, so no libc dependency is needed in the core.
pub mod errno {
    /// No such file or directory: no such memslot, or logging off on it.
    pub const ENOENT: i32 = 2;
    /// Interrupted system call.
    pub const EINTR: i32 = 4;
    /// No such device or address: GET/CLEAR on a VM using dirty rings.
    pub const ENXIO: i32 = 6;
    /// Argument list too long: a dirty ring above `KVM_DIRTY_RING_MAX_ENTRIES`.
    pub const E2BIG: i32 = 7;
    /// Out of memory.
    pub const ENOMEM: i32 = 12;
    /// Bad address: `copy_to_user` / `copy_from_user` failed.
    pub const EFAULT: i32 = 14;
    /// File exists: a memory region overlapping another memslot.
    pub const EEXIST: i32 = 17;
    /// Invalid argument.
    pub const EINVAL: i32 = 22;
    /// Operation not supported.
    pub const EOPNOTSUPP: i32 = 95;
}

/// An error from a dirty-log operation. `errno()` gives the kernel's errno for the same case.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// GET/CLEAR while a dirty ring is in use without a bitmap (`ENXIO`).
    #[error(
        "the dirty ring is in use, so there is no dirty bitmap (use ring harvest + reset instead)"
    )]
    RingInUse,
    /// Bad address-space id or slot id in GET/CLEAR (`as_id >= nr_as`,
    /// `id >= KVM_USER_MEM_SLOTS`): `EINVAL`.
    #[error("invalid memslot id {id} in address space {as_id}")]
    InvalidSlotId {
        /// The address space (`slot >> 16`).
        as_id: u16,
        /// The slot id within it (`slot & 0xffff`).
        id: u16,
    },
    /// CLEAR with `first_page` not a multiple of 64: `EINVAL`.
    #[error("first_page {first_page} is not a multiple of 64")]
    MisalignedFirstPage {
        /// The caller's `first_page`.
        first_page: u64,
    },
    /// GET/CLEAR on a memslot that does not exist: `ENOENT`.
    #[error("memslot {id} (address space {as_id}) does not exist")]
    NoSuchSlot {
        /// The address space (`slot >> 16`).
        as_id: u16,
        /// The slot id within it (`slot & 0xffff`).
        id: u16,
    },
    /// GET/CLEAR on a memslot that exists but has dirty logging off (no bitmap): `ENOENT`.
    #[error("dirty logging is not enabled on memslot {id} (address space {as_id})")]
    LoggingDisabled {
        /// The address space (`slot >> 16`).
        as_id: u16,
        /// The slot id within it (`slot & 0xffff`).
        id: u16,
    },
    /// CLEAR range outside the slot, or not a multiple of 64 pages without ending at the slot
    /// end: `EINVAL`.
    #[error("range first_page={first_page} num_pages={num_pages} is invalid for a slot of {npages} pages (num_pages must be a multiple of 64 unless the range ends at the slot end)")]
    BadRange {
        /// The caller's `first_page`.
        first_page: u64,
        /// The caller's `num_pages`.
        num_pages: u64,
        /// Pages in the slot.
        npages: u64,
    },
    /// The caller's buffer is smaller than the operation needs (`copy_{to,from}_user` fails):
    /// `EFAULT`.
    #[error("buffer of {got} bytes is too small, {need} bytes needed")]
    BufferTooSmall {
        /// Bytes the operation reads or writes.
        need: usize,
        /// Bytes the caller gave.
        got: usize,
    },
    /// `KVM_ENABLE_CAP` with invalid arguments (unknown flags, nonzero reserved args):
    /// `EINVAL`.
    #[error("invalid capability arguments: {0}")]
    InvalidCap(&'static str),
    /// `KVM_ENABLE_CAP` of a capability this VM does not offer: `EINVAL`, as KVM's
    /// `kvm_vm_ioctl_enable_cap_generic` returns for one it does not know.
    #[error("capability not supported: {0}")]
    Unsupported(&'static str),
    /// Dirty ring size that breaks KVM's rules (a power of two, at least a page and more than
    /// the reserved entries): `EINVAL`.
    #[error("invalid dirty ring size {bytes} bytes: {why}")]
    InvalidRingSize {
        /// The requested size in bytes (`cap.args[0]`).
        bytes: u64,
        /// Which rule it breaks.
        why: &'static str,
    },
    /// Dirty ring larger than `KVM_DIRTY_RING_MAX_ENTRIES` entries: `E2BIG`.
    #[error("dirty ring of {bytes} bytes exceeds the maximum of 1 MiB (65536 entries)")]
    RingTooBig {
        /// The requested size in bytes (`cap.args[0]`).
        bytes: u64,
    },
    /// Enabling the dirty ring when it is already enabled, or after a vCPU was created:
    /// `EINVAL`.
    #[error("the dirty ring can only be enabled once, before any vCPU is created: {0}")]
    RingTooLate(&'static str),
    /// `KVM_RESET_DIRTY_RINGS` on a VM without rings: `EINVAL`.
    #[error("no dirty ring is enabled")]
    NoRing,
    /// `KVM_SET_USER_MEMORY_REGION` with invalid arguments (flags, alignment, slot id, a
    /// size or address change of an existing slot, ...): `EINVAL`.
    #[error("invalid memory region: {0}")]
    InvalidRegion(&'static str),
    /// `KVM_SET_USER_MEMORY_REGION` creating or moving a slot onto another one's guest
    /// addresses: `EEXIST`.
    #[error("memory region overlaps memslot {id}")]
    RegionOverlap {
        /// The slot id already there.
        id: u16,
    },
    /// A wait was interrupted (a signal while blocked): `EINTR`.
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

/// A result whose error defaults to [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
