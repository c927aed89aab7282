//! Thin wrappers over the dirty-log ioctls that `kvm-ioctls` does not offer (or offers only in
//! an allocating form): `KVM_GET_DIRTY_LOG` into a caller-owned buffer, `KVM_CLEAR_DIRTY_LOG`,
//! `KVM_ENABLE_CAP`, `KVM_RESET_DIRTY_RINGS` and `KVM_CHECK_EXTENSION`.
//!
//! Every function checks the return value and turns a failure into [`Error::Kvm`] with the
//! kernel's errno. The functions take any file descriptor (`AsRawFd`), so the caller decides
//! whether it is the system fd or a VM fd; they are meant to be called on VM fds except
//! [`check_extension`], which works on both.

use std::os::unix::io::AsRawFd;

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_dirty_log, kvm_enable_cap, kvm_userspace_memory_region, KVMIO,
};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::{ioctl_io_nr, ioctl_iow_nr, ioctl_iowr_nr};

use crate::error::{Error, Op, Result};

pub use dirtylog::vm::{
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};

/// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT` (the obsolete first version).
pub const KVM_CAP_MANUAL_DIRTY_LOG_PROTECT: u32 = 166;
/// `KVM_CAP_NR_MEMSLOTS`.
pub const KVM_CAP_NR_MEMSLOTS: u32 = 10;
/// `KVM_CAP_MULTI_ADDRESS_SPACE`.
pub const KVM_CAP_MULTI_ADDRESS_SPACE: u32 = 118;
/// `KVM_CAP_NR_VCPUS` (recommended maximum).
pub const KVM_CAP_NR_VCPUS: u32 = 9;
/// `KVM_CAP_MAX_VCPUS`.
pub const KVM_CAP_MAX_VCPUS: u32 = 66;
/// `KVM_CAP_USER_MEMORY`.
pub const KVM_CAP_USER_MEMORY: u32 = 3;
/// `KVM_CAP_SYNC_MMU`.
pub const KVM_CAP_SYNC_MMU: u32 = 16;
/// `KVM_CAP_READONLY_MEM`.
pub const KVM_CAP_READONLY_MEM: u32 = 81;
/// `KVM_CAP_USER_MEMORY2`.
pub const KVM_CAP_USER_MEMORY2: u32 = 231;
/// `KVM_EXIT_DIRTY_RING_FULL`.
pub const KVM_EXIT_DIRTY_RING_FULL: u32 = 31;
/// `KVM_DIRTY_LOG_PAGE_OFFSET`: the ring sits at this many *host* pages into the vCPU fd.
pub const KVM_DIRTY_LOG_PAGE_OFFSET: u64 = 64;
/// `KVM_MEM_LOG_DIRTY_PAGES`.
pub const KVM_MEM_LOG_DIRTY_PAGES: u32 = 1 << 0;

ioctl_io_nr!(KVM_CHECK_EXTENSION, KVMIO, 0x03);
ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION,
    KVMIO,
    0x46,
    kvm_userspace_memory_region
);
ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
ioctl_iow_nr!(KVM_ENABLE_CAP, KVMIO, 0xa3, kvm_enable_cap);
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

/// The host page size (`sysconf(_SC_PAGESIZE)`), which is what the ring offset and the
/// kernel's ring size minimum use, whatever the guest's page size.
pub fn host_page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let r = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if r > 0 {
        r as u64
    } else {
        4096
    }
}

/// 64-bit words of a dirty bitmap for `npages` pages (`ALIGN(npages, 64) / 64`).
pub fn bitmap_words(npages: u64) -> usize {
    dirtylog::bitmap::dirty_bitmap_words(npages)
}

/// `KVM_CHECK_EXTENSION(cap)` on `fd` (the system fd or a VM fd; a VM fd answers for that VM).
/// Returns the kernel's value: 0 when unsupported, otherwise 1 or a cap-specific number.
pub fn check_extension(fd: &impl AsRawFd, cap: u32) -> Result<i64> {
    // SAFETY: KVM_CHECK_EXTENSION takes its argument by value and touches no user memory.
    let r = unsafe { ioctl_with_val(fd, KVM_CHECK_EXTENSION(), cap as libc::c_ulong) };
    if r < 0 {
        return Err(Error::last(Op::CheckExtension));
    }
    Ok(r as i64)
}

/// `KVM_ENABLE_CAP` on a VM fd with all four arguments. `op` names the capability for
/// errors.
pub fn enable_cap(vm: &impl AsRawFd, op: Op, cap: u32, flags: u32, args: [u64; 4]) -> Result<()> {
    let c = kvm_enable_cap {
        cap,
        flags,
        args,
        ..Default::default()
    };
    // SAFETY: the kernel reads exactly one `kvm_enable_cap`, which `c` is, and keeps no
    // reference to it.
    let r = unsafe { ioctl_with_ref(vm, KVM_ENABLE_CAP(), &c) };
    if r < 0 {
        return Err(Error::last(op));
    }
    Ok(())
}

/// `KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, flags)` with `args[0] = mode`:
/// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`, optionally with `KVM_DIRTY_LOG_INITIALLY_SET`, or 0
/// to turn manual protect off. Other values are passed through so that the kernel's checks
/// can be observed.
pub fn enable_manual_protect(vm: &impl AsRawFd, flags: u32, mode: u64) -> Result<()> {
    enable_cap(
        vm,
        Op::EnableManualProtect,
        KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        flags,
        [mode, 0, 0, 0],
    )
}

/// Which dirty ring capability a VM uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum RingFlavor {
    /// `KVM_CAP_DIRTY_LOG_RING_ACQ_REL`: flags are accessed with acquire/release, which is
    /// what [`dirtylog::ring::RingHarvester`] does on every architecture.
    AcqRel,
    /// `KVM_CAP_DIRTY_LOG_RING`: the x86-only original (TSO makes plain accesses ordered).
    Plain,
}

impl RingFlavor {
    /// The capability number.
    pub fn cap(self) -> u32 {
        match self {
            RingFlavor::AcqRel => KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
            RingFlavor::Plain => KVM_CAP_DIRTY_LOG_RING,
        }
    }
}

/// Pick the ring flavour the kernel offers on `vm`, preferring `_ACQ_REL`. Returns the flavour
/// and its maximum size in bytes, or [`Error::Unsupported`] naming the capability.
pub fn probe_dirty_ring(vm: &impl AsRawFd) -> Result<(RingFlavor, u64)> {
    let acq = check_extension(vm, KVM_CAP_DIRTY_LOG_RING_ACQ_REL)?;
    if acq > 0 {
        return Ok((RingFlavor::AcqRel, acq as u64));
    }
    let plain = check_extension(vm, KVM_CAP_DIRTY_LOG_RING)?;
    if plain > 0 {
        return Ok((RingFlavor::Plain, plain as u64));
    }
    Err(Error::Unsupported {
        what: "dirty ring",
        cap: "KVM_CAP_DIRTY_LOG_RING",
        value: plain,
    })
}

/// `KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING{_ACQ_REL}, flags)` with a ring of `bytes` bytes per
/// vCPU. Must happen before any vCPU is created. `bytes` is passed through unchecked so that
/// the kernel's own checks can be observed; use [`probe_dirty_ring`] to pick `flavor`.
pub fn enable_dirty_ring(
    vm: &impl AsRawFd,
    flavor: RingFlavor,
    flags: u32,
    bytes: u64,
) -> Result<()> {
    enable_cap(
        vm,
        Op::EnableDirtyRing,
        flavor.cap(),
        flags,
        [bytes, 0, 0, 0],
    )
}

/// `KVM_GET_DIRTY_LOG` of `slot` (`as_id << 16 | id`) into `bitmap`.
///
/// # Safety
///
/// The kernel writes `ALIGN(npages, 64) / 8` bytes, where `npages` is the size of the slot *as
/// the kernel knows it*; `bitmap` must be at least that long if the slot exists. (If it does
/// not, or logging is off, the kernel fails before writing.) Safe callers track their slots,
/// as `KvmDirtyTracker` does.
pub unsafe fn get_dirty_log(vm: &impl AsRawFd, slot: u32, bitmap: &mut [u64]) -> Result<()> {
    let mut log = kvm_dirty_log {
        slot,
        ..Default::default()
    };
    log.__bindgen_anon_1.dirty_bitmap = bitmap.as_mut_ptr().cast();
    // SAFETY: `log` is a valid `kvm_dirty_log`; the bitmap it points to is large enough for
    // the slot by this function's contract and stays borrowed for the call.
    let r = unsafe { ioctl_with_mut_ref(vm, KVM_GET_DIRTY_LOG(), &mut log) };
    if r < 0 {
        return Err(Error::last(Op::GetDirtyLog));
    }
    Ok(())
}

/// `KVM_CLEAR_DIRTY_LOG`: for every bit set in `bitmap` (bit 0 is `first_page`), clear the
/// page's dirty bit and re-arm tracking of it. The kernel reads `ALIGN(num_pages, 64) / 8`
/// bytes, so `bitmap` must hold `ceil(num_pages / 64)` words ([`Error::BufferTooSmall`]
/// otherwise, before any ioctl).
pub fn clear_dirty_log(
    vm: &impl AsRawFd,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bitmap: &[u64],
) -> Result<()> {
    let need = (num_pages as u64).div_ceil(64) as usize;
    if bitmap.len() < need {
        return Err(Error::BufferTooSmall {
            need,
            got: bitmap.len(),
        });
    }
    let mut c = kvm_clear_dirty_log {
        slot,
        num_pages,
        first_page,
        ..Default::default()
    };
    // The kernel only reads through this pointer (copy_from_user); the field is `*mut` in
    // the UAPI union.
    c.__bindgen_anon_1.dirty_bitmap = bitmap.as_ptr() as *mut libc::c_void;
    // SAFETY: `c` is a valid `kvm_clear_dirty_log`; the kernel reads `ALIGN(num_pages, 64) / 8`
    // bytes from the bitmap, which we checked `bitmap` holds, and does not write to it.
    let r = unsafe { ioctl_with_mut_ref(vm, KVM_CLEAR_DIRTY_LOG(), &mut c) };
    if r < 0 {
        return Err(Error::last(Op::ClearDirtyLog));
    }
    Ok(())
}

/// `KVM_RESET_DIRTY_RINGS`: re-protect every ring entry userspace marked harvested, on every
/// vCPU of the VM. Returns how many entries were reset. Retries on `EINTR` (the 2025 kernels
/// stop the walk on a pending signal).
pub fn reset_dirty_rings(vm: &impl AsRawFd) -> Result<u32> {
    loop {
        // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument and touches no user memory.
        let r = unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
        if r >= 0 {
            return Ok(r as u32);
        }
        let e = Error::last(Op::ResetDirtyRings);
        if e.errno() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// `KVM_SET_USER_MEMORY_REGION`.
///
/// # Safety
///
/// When `memory_size != 0`, `[userspace_addr, userspace_addr + memory_size)` must be memory the
/// caller owns for as long as the slot exists *and* any vCPU of the VM can run: the guest
/// writes to it behind Rust's back. Safe callers own the memory and the slot table (`dirtylog-testvm`'s `KvmVm`).
pub unsafe fn set_user_memory_region(
    vm: &impl AsRawFd,
    region: &kvm_userspace_memory_region,
) -> Result<()> {
    // SAFETY: the kernel reads one `kvm_userspace_memory_region`; the memory it names is valid
    // by this function's contract.
    let r = unsafe { ioctl_with_ref(vm, KVM_SET_USER_MEMORY_REGION(), region) };
    if r < 0 {
        return Err(Error::last(Op::SetUserMemoryRegion));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_uapi() {
        // Values from include/uapi/linux/kvm.h on x86-64.
        assert_eq!(KVM_GET_DIRTY_LOG(), 0x4010_ae42);
        assert_eq!(KVM_CLEAR_DIRTY_LOG(), 0xc018_aec0);
        assert_eq!(KVM_RESET_DIRTY_RINGS(), 0xaec7);
        assert_eq!(KVM_ENABLE_CAP(), 0x4068_aea3);
        assert_eq!(KVM_CHECK_EXTENSION(), 0xae03);
        assert_eq!(KVM_SET_USER_MEMORY_REGION(), 0x4020_ae46);
    }

    #[test]
    fn clear_checks_the_buffer_before_the_kernel() {
        // fd -1 is never reached: the length check fails first.
        struct Bad;
        impl AsRawFd for Bad {
            fn as_raw_fd(&self) -> i32 {
                -1
            }
        }
        let e = clear_dirty_log(&Bad, 0, 0, 65, &[0]).unwrap_err();
        assert!(
            matches!(e, Error::BufferTooSmall { need: 2, got: 1 }),
            "{e}"
        );
        assert_eq!(e.errno(), Some(libc::EFAULT));
    }
}
