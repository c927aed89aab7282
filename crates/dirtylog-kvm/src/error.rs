//! Errors of the `/dev/kvm` backend.
//!
//! A failed ioctl becomes [`Error::Kvm`], which names the operation, carries the kernel's errno
//! (compare it with [`dirtylog::Error::errno`]) and says what to do about it. Refusals made
//! before reaching the kernel (a capability the kernel lacks, a buffer too small, a ring
//! combined with `INITIALLY_SET`) have their own variants.

use std::fmt;

use dirtylog::TrackerKind;

/// The operation an ioctl or system call was doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub enum Op {
    /// `open("/dev/kvm")`.
    OpenKvm,
    /// `KVM_GET_API_VERSION`.
    ApiVersion,
    /// `KVM_CREATE_VM`.
    CreateVm,
    /// `KVM_CREATE_VCPU`.
    CreateVcpu,
    /// `KVM_CHECK_EXTENSION`.
    CheckExtension,
    /// `KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)`.
    EnableManualProtect,
    /// `KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING{,_ACQ_REL})`.
    EnableDirtyRing,
    /// `KVM_ENABLE_CAP` of any other capability.
    EnableCap,
    /// `KVM_SET_USER_MEMORY_REGION`.
    SetUserMemoryRegion,
    /// `KVM_GET_DIRTY_LOG`.
    GetDirtyLog,
    /// `KVM_CLEAR_DIRTY_LOG`.
    ClearDirtyLog,
    /// `KVM_RESET_DIRTY_RINGS`.
    ResetDirtyRings,
    /// `mmap` of a vCPU's dirty ring.
    MmapRing,
    /// `mmap` of anonymous guest memory.
    MmapGuestMemory,
    /// `madvise` of guest memory.
    Madvise,
    /// `KVM_SET_REGS` / `KVM_SET_SREGS` / `KVM_SET_CPUID2` / `KVM_GET_*` on a vCPU.
    VcpuState,
    /// `KVM_RUN`.
    Run,
    /// Creating a host thread.
    SpawnThread,
    /// Installing the vCPU kick signal handler.
    Signal,
    /// Setting up a machine's devices and vCPUs (the named ioctl: `KVM_CREATE_IRQCHIP`,
    /// `KVM_CREATE_PIT2`, `KVM_X86_SETUP_MCE`, `KVM_IRQ_LINE`, ...).
    Machine(&'static str),
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::OpenKvm => "opening /dev/kvm",
            Op::ApiVersion => "KVM_GET_API_VERSION",
            Op::CreateVm => "KVM_CREATE_VM",
            Op::CreateVcpu => "KVM_CREATE_VCPU",
            Op::CheckExtension => "KVM_CHECK_EXTENSION",
            Op::EnableManualProtect => "KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)",
            Op::EnableDirtyRing => "KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING)",
            Op::EnableCap => "KVM_ENABLE_CAP",
            Op::SetUserMemoryRegion => "KVM_SET_USER_MEMORY_REGION",
            Op::GetDirtyLog => "KVM_GET_DIRTY_LOG",
            Op::ClearDirtyLog => "KVM_CLEAR_DIRTY_LOG",
            Op::ResetDirtyRings => "KVM_RESET_DIRTY_RINGS",
            Op::MmapRing => "mmap of the vCPU dirty ring",
            Op::MmapGuestMemory => "mmap of guest memory",
            Op::Madvise => "madvise of guest memory",
            Op::VcpuState => "setting up vCPU state",
            Op::Run => "KVM_RUN",
            Op::SpawnThread => "spawning a vCPU thread",
            Op::Signal => "installing the vCPU kick signal handler",
            Op::Machine(ioctl) => ioctl,
        })
    }
}

/// What to do about `errno` from `op`: the kernel's reasons for that errno, in KVM's terms.
pub fn hint(op: Op, errno: i32) -> &'static str {
    use libc::*;
    match (op, errno) {
        (Op::OpenKvm, ENOENT) => "there is no /dev/kvm: load kvm_intel/kvm_amd (or run on a host with KVM)",
        (Op::OpenKvm, EACCES) => "no permission on /dev/kvm: run as root or join the kvm group",
        (Op::OpenKvm, _) => "check that /dev/kvm is a working KVM device",
        (Op::CreateVm, _) => "the kernel refused a new VM: check dmesg, memory limits and the KVM module",
        (Op::CreateVcpu, EINVAL) => "vCPU id out of range (see KVM_CAP_MAX_VCPU_ID)",
        (Op::CreateVcpu, _) => "the kernel refused a new vCPU: check KVM_CAP_MAX_VCPUS and memory",
        (Op::GetDirtyLog | Op::ClearDirtyLog, ENXIO) => {
            "this VM uses the dirty ring, so there is no dirty bitmap: harvest the per-vCPU rings and call KVM_RESET_DIRTY_RINGS instead"
        }
        (Op::GetDirtyLog | Op::ClearDirtyLog, ENOENT) => {
            "the memslot does not exist or has dirty logging off: create it with KVM_MEM_LOG_DIRTY_PAGES or set that flag"
        }
        (Op::GetDirtyLog, EINVAL) => {
            "bad slot: the address space (bits 16-31) must be below KVM_CAP_MULTI_ADDRESS_SPACE and the id below KVM_CAP_NR_MEMSLOTS"
        }
        (Op::ClearDirtyLog, EINVAL) => {
            "bad slot id, first_page not a multiple of 64, or a range outside the slot (num_pages must be a multiple of 64 unless the range ends exactly at the slot end)"
        }
        (Op::GetDirtyLog | Op::ClearDirtyLog, EFAULT) => {
            "the bitmap buffer is not accessible or is smaller than ALIGN(pages, 64) / 8 bytes"
        }
        (Op::EnableManualProtect, EINVAL) => {
            "flags must be 0 and args[0] a subset of KVM_CHECK_EXTENSION(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2); INITIALLY_SET needs MANUAL_PROTECT_ENABLE"
        }
        (Op::EnableDirtyRing, EINVAL) => {
            "the ring size must be a power of two of at least a page and 64 entries, flags must be 0, and the ring can be enabled only once, before any vCPU is created"
        }
        (Op::EnableDirtyRing, E2BIG) => {
            "the ring is larger than KVM_CHECK_EXTENSION(KVM_CAP_DIRTY_LOG_RING) allows (at most 65536 entries, 1 MiB)"
        }
        (Op::EnableCap, EINVAL) => "the capability is unknown, or its flags or arguments are invalid",
        (Op::ResetDirtyRings, EINVAL) => "no dirty ring is enabled on this VM",
        (Op::ResetDirtyRings, EINTR) => "interrupted by a signal: call it again",
        (Op::SetUserMemoryRegion, EINVAL) => {
            "invalid region: unaligned address or size, unknown flags, slot id out of range, or an attempt to change a slot's size, address or READONLY flag"
        }
        (Op::SetUserMemoryRegion, EEXIST) => "the region overlaps another memslot",
        (Op::MmapRing, EINVAL) => {
            "the ring must be mapped MAP_SHARED, without PROT_EXEC, at 64 * host page size, and the VM must have a dirty ring"
        }
        (Op::MmapRing | Op::MmapGuestMemory, ENOMEM) => "out of memory or address space",
        (Op::Run, EINTR) => "KVM_RUN was interrupted by a signal: run again",
        (Op::Run, EFAULT) => "the guest touched memory whose backing is gone or unmapped",
        (_, ENOMEM) => "out of memory",
        (_, EPERM | EACCES) => "permission denied",
        _ => "see the KVM API documentation for this ioctl",
    }
}

/// The text of an errno (`strerror`).
pub fn strerror(errno: i32) -> String {
    std::io::Error::from_raw_os_error(errno).to_string()
}

/// An error of the `/dev/kvm` backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An ioctl or system call failed with `errno`.
    #[error("{op} failed: {} (errno {errno}): {}", strerror(*.errno), hint(*.op, *.errno))]
    Kvm {
        /// What was being done.
        op: Op,
        /// The kernel's errno.
        errno: i32,
    },
    /// The kernel does not offer a capability the operation needs.
    #[error("{what} not supported by this kernel ({cap} = {value})")]
    Unsupported {
        /// What is missing ("dirty ring").
        what: &'static str,
        /// The capability name (`KVM_CAP_DIRTY_LOG_RING`).
        cap: &'static str,
        /// What `KVM_CHECK_EXTENSION` returned.
        value: i64,
    },
    /// The dirty ring and `KVM_DIRTY_LOG_INITIALLY_SET` were asked for together.
    #[error("the dirty ring cannot be combined with KVM_DIRTY_LOG_INITIALLY_SET: pages reported initially dirty through the bitmap are never pushed to the ring, so they would be lost (use manual protect without INITIALLY_SET, or no ring)")]
    RingWithInitiallySet,
    /// A bitmap buffer is too small for the slot or range.
    #[error("dirty bitmap buffer of {got} words is too small: {need} words (ALIGN(pages, 64) / 64) are needed")]
    BufferTooSmall {
        /// Words needed.
        need: usize,
        /// Words given.
        got: usize,
    },
    /// No memslot with this id was created through this VM.
    #[error("memslot {0:#x} was not created on this VM")]
    NoSuchSlot(u32),
    /// Bad arguments detected before any ioctl.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// `KVM_RESET_DIRTY_RINGS` reset fewer entries than were handed back.
    #[error("KVM_RESET_DIRTY_RINGS reset {reset} entries but {committed} were marked harvested: the kernel left entries in the rings")]
    ResetShort {
        /// Entries marked RESET by the harvester.
        committed: u64,
        /// Entries the kernel reported reset.
        reset: u64,
    },
    /// A vCPU's dirty ring went past its hard limit: KVM overwrote entries not yet harvested.
    #[error("vCPU {vcpu}'s dirty ring overflowed ({detail}): the kernel pushed past the ring's hard limit (it warns once in dmesg, kvm_dirty_ring_push) and overwrote entries not yet harvested, so dirty pages were lost and the ring cannot resynchronise. KVM must take KVM_EXIT_DIRTY_RING_FULL while the 64 reserved entries are still free; this host delivers it late (seen on PVM). Use bitmap logging, or harvest long before the ring fills")]
    RingOverflow {
        /// The vCPU index.
        vcpu: u32,
        /// What was seen.
        detail: String,
    },
    /// The kernel lacks a capability a [`TrackerKind`] needs ([`crate::KvmDirtyTracker::enable`]).
    #[error("the {kind} tracker needs {cap}, which this kernel does not offer (KVM_CHECK_EXTENSION({cap}) = {value}): {instead}")]
    TrackerUnsupported {
        /// The tracker asked for.
        kind: TrackerKind,
        /// The capability it needs.
        cap: &'static str,
        /// What `KVM_CHECK_EXTENSION` returned.
        value: i64,
        /// What to do instead.
        instead: &'static str,
    },
    /// A ring tracker was started or harvested with no vCPU ring added.
    #[error("the dirty ring tracker has no vCPU: call add_vcpu with every vCPU fd, in vCPU order, after creating the vCPUs and before start")]
    NoVcpu,
    /// A region index past the tracker's slot table.
    #[error("region index {index} is out of range: the tracker has {regions} regions")]
    IndexOutOfRange {
        /// The index given.
        index: usize,
        /// Regions in the table.
        regions: usize,
    },
    /// A harvest buffer whose length is not the region's bitmap length.
    #[error("the harvest buffer of region {index} has {got} words; it must have exactly {need} (one bit per page, npages.div_ceil(64) words)")]
    BufferLength {
        /// The region index.
        index: usize,
        /// Words needed.
        need: usize,
        /// Words given.
        got: usize,
    },
    /// A dirty ring entry names a slot or page outside the tracker's slot table.
    #[error("vCPU {vcpu}'s dirty ring reported slot {slot:#x} page {offset}, which is outside the tracker's slot table: the table given to KvmDirtyTracker::new must list every memslot with dirty logging on")]
    RingEntryOutsideTable {
        /// The vCPU index.
        vcpu: u32,
        /// `as_id << 16 | id` of the entry.
        slot: u32,
        /// Page offset in the slot.
        offset: u64,
    },
    /// A vCPU stopped in a way the harness cannot continue from.
    #[error("vCPU {vcpu}: {what}")]
    Guest {
        /// The vCPU index.
        vcpu: u32,
        /// The exit and the register state.
        what: String,
    },
    /// A wait for the vCPUs timed out.
    #[error("timed out after {ms} ms waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        ms: u64,
    },
    /// Assembling a guest program failed (a bug in the program generator).
    #[error("assembling the guest program failed: {0}")]
    Assemble(String),
    /// Saving or restoring a vCPU's state failed ([`crate::vcpu_state`]).
    #[error("vCPU {vcpu}: {ioctl} failed: {} (errno {errno}); the vCPU must be parked (not in KVM_RUN), and a restored state must come from a host with the same CPU features", strerror(*.errno))]
    VcpuState {
        /// The vCPU index.
        vcpu: u32,
        /// The ioctl, or the MSR the kernel refused.
        ioctl: &'static str,
        /// The kernel's errno.
        errno: i32,
    },
    /// A saved vCPU state blob is malformed ([`crate::vcpu_state`]).
    #[error("bad vCPU state: {0}")]
    VcpuBlob(String),
    /// `KVM_GET_MSRS` or `KVM_SET_MSRS` stopped at an MSR ([`crate::vcpu_state`]).
    #[error("vCPU {vcpu}: {ioctl} refused MSR {index:#x} (value {value:#x}); the target vCPU must have the source's CPUID (and the same machine-check setup), on a host with the same CPU features")]
    MsrRefused {
        /// The vCPU index.
        vcpu: u32,
        /// `KVM_GET_MSRS` or `KVM_SET_MSRS`.
        ioctl: &'static str,
        /// The MSR.
        index: u32,
        /// The value written (0 for a read).
        value: u64,
    },
    /// Saving or restoring VM-wide state failed ([`crate::vm_state`]).
    #[error("{ioctl} failed: {} (errno {errno}); the VM must have the same in-kernel devices (irqchip, PIT) as the saved one", strerror(*.errno))]
    VmState {
        /// The ioctl.
        ioctl: &'static str,
        /// The kernel's errno.
        errno: i32,
    },
    /// A saved VM state blob is malformed ([`crate::vm_state`]).
    #[error("bad VM state: {0}")]
    VmBlob(String),
}

impl Error {
    /// The kernel's errno, for errors that come from (or stand for) a failed system call.
    /// `BufferTooSmall` maps to `EFAULT`, which is what the kernel returns when its copy to or
    /// from a too-small user buffer faults.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Kvm { errno, .. } => Some(*errno),
            Error::BufferTooSmall { .. } => Some(libc::EFAULT),
            _ => None,
        }
    }

    /// Shorthand for [`Error::Kvm`] with the calling thread's current errno.
    pub fn last(op: Op) -> Self {
        Error::Kvm {
            op,
            errno: std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        }
    }

    /// Shorthand for [`Error::Kvm`] from a `vmm_sys_util` / `kvm_ioctls` error.
    pub fn from_sys(op: Op, e: vmm_sys_util::errno::Error) -> Self {
        Error::Kvm {
            op,
            errno: e.errno(),
        }
    }
}

/// Result of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_what_to_do() {
        let e = Error::Kvm {
            op: Op::GetDirtyLog,
            errno: libc::ENXIO,
        };
        let s = e.to_string();
        assert!(s.contains("KVM_GET_DIRTY_LOG failed"), "{s}");
        assert!(s.contains("errno 6"), "{s}");
        assert!(s.contains("KVM_RESET_DIRTY_RINGS"), "{s}");
        assert_eq!(e.errno(), Some(libc::ENXIO));
        let u = Error::Unsupported {
            what: "dirty ring",
            cap: "KVM_CAP_DIRTY_LOG_RING",
            value: 0,
        };
        assert_eq!(
            u.to_string(),
            "dirty ring not supported by this kernel (KVM_CAP_DIRTY_LOG_RING = 0)"
        );
        assert_eq!(u.errno(), None);
    }
}
