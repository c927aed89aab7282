//! The dirty-log calls on a `kvm_ioctls::VmFd`, with typed errors.
//!
//! Where `kvm-ioctls` has the call (`KVM_CHECK_EXTENSION`, `KVM_ENABLE_CAP`,
//! `KVM_SET_USER_MEMORY_REGION`) the functions here use it and only add a typed error
//! ([`Error::Kvm`] naming the operation and carrying the kernel's errno). What `kvm-ioctls`
//! lacks — `KVM_GET_DIRTY_LOG` into a caller-owned buffer (its `VmFd::get_dirty_log` allocates
//! a new `Vec` per call), `KVM_CLEAR_DIRTY_LOG` and `KVM_RESET_DIRTY_RINGS` — is the extension
//! trait [`VmFdDirtyLogExt`], shaped like `VmFd` methods so that it could be offered upstream.
//! The free functions of the same names call it.

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_dirty_log, kvm_enable_cap, kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ref};

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

/// The request numbers of the three raw ioctls (the macros make `pub fn`s; this module keeps
/// them out of the public API, which re-exports them documented below).
mod nr {
    use kvm_bindings::{kvm_clear_dirty_log, kvm_dirty_log, KVMIO};
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

    ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
    ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
    ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);
    ioctl_ior_nr!(KVM_X86_GET_MCE_CAP_SUPPORTED, KVMIO, 0x9d, u64);
    ioctl_iow_nr!(KVM_X86_SETUP_MCE, KVMIO, 0x9c, u64);
}

/// The `KVM_GET_DIRTY_LOG` request number, for a bare `ioctl(2)` baseline (benchmarks).
#[allow(non_snake_case)]
pub fn KVM_GET_DIRTY_LOG() -> libc::c_ulong {
    nr::KVM_GET_DIRTY_LOG()
}

/// The `KVM_CLEAR_DIRTY_LOG` request number, for a bare `ioctl(2)` baseline (benchmarks).
#[allow(non_snake_case)]
pub fn KVM_CLEAR_DIRTY_LOG() -> libc::c_ulong {
    nr::KVM_CLEAR_DIRTY_LOG()
}

/// The `KVM_RESET_DIRTY_RINGS` request number, for a bare `ioctl(2)` baseline (benchmarks).
#[allow(non_snake_case)]
pub fn KVM_RESET_DIRTY_RINGS() -> libc::c_ulong {
    nr::KVM_RESET_DIRTY_RINGS()
}

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

/// The dirty-log ioctls `kvm-ioctls` lacks, as methods of its [`VmFd`].
///
/// ```no_run
/// use dirtylog_kvm::sys::VmFdDirtyLogExt;
/// # fn f(vm: &kvm_ioctls::VmFd) -> dirtylog_kvm::Result<()> {
/// // Re-arm pages 0..64 of slot 1 whose bit is set (manual protect).
/// vm.clear_dirty_log(1, 0, 64, &[0b1011])?;
/// # Ok(()) }
/// ```
pub trait VmFdDirtyLogExt {
    /// `KVM_GET_DIRTY_LOG` of `slot` (`as_id << 16 | id`) into `bitmap`, without allocating.
    /// Without manual protect the kernel clears the log and write-protects the reported pages
    /// again; with it, this is a snapshot (see [`clear_dirty_log`](Self::clear_dirty_log)).
    ///
    /// # Safety
    ///
    /// The kernel writes `ALIGN(npages, 64) / 8` bytes, where `npages` is the size of the slot
    /// *as the kernel knows it*, whatever `bitmap.len()` is: `bitmap` must hold at least
    /// `npages.div_ceil(64)` words if the slot exists. (If it does not exist or has logging
    /// off, the kernel fails before writing.) [`crate::KvmDirtyTracker`] is the safe
    /// interface: it keeps one such buffer per slot of its table.
    unsafe fn get_dirty_log_into(&self, slot: u32, bitmap: &mut [u64]) -> Result<()>;

    /// `KVM_CLEAR_DIRTY_LOG`: for every bit set in `bitmap` (bit 0 is `first_page`), clear
    /// the page's dirty bit and write-protect it again. `first_page` must be a multiple of 64,
    /// and `num_pages` too unless the range ends at the slot's end (the kernel's rules,
    /// `EINVAL`). The kernel reads `ALIGN(num_pages, 64) / 8` bytes, so `bitmap` must hold
    /// `num_pages.div_ceil(64)` words ([`Error::BufferTooSmall`] before any ioctl otherwise).
    fn clear_dirty_log(
        &self,
        slot: u32,
        first_page: u64,
        num_pages: u32,
        bitmap: &[u64],
    ) -> Result<()>;

    /// `KVM_RESET_DIRTY_RINGS`: write-protect again every dirty ring entry that userspace
    /// marked harvested, on every vCPU. Returns how many entries were reset. Retries on
    /// `EINTR` (recent kernels stop the walk on a pending signal).
    fn reset_dirty_rings(&self) -> Result<u32>;
}

impl VmFdDirtyLogExt for VmFd {
    unsafe fn get_dirty_log_into(&self, slot: u32, bitmap: &mut [u64]) -> Result<()> {
        let mut log = kvm_dirty_log {
            slot,
            ..Default::default()
        };
        log.__bindgen_anon_1.dirty_bitmap = bitmap.as_mut_ptr().cast();
        // SAFETY: `log` is a valid `kvm_dirty_log` for the duration of the call; the bitmap
        // it points to is large enough for the slot by this function's contract and stays
        // exclusively borrowed for the call. The kernel keeps no pointer after returning.
        let r = unsafe { ioctl_with_mut_ref(self, nr::KVM_GET_DIRTY_LOG(), &mut log) };
        if r < 0 {
            return Err(Error::last(Op::GetDirtyLog));
        }
        Ok(())
    }

    fn clear_dirty_log(
        &self,
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
        // SAFETY: `c` is a valid `kvm_clear_dirty_log`; the kernel reads
        // `ALIGN(num_pages, 64) / 8` bytes from the bitmap, which we checked `bitmap` holds,
        // does not write to it and keeps no pointer after returning.
        let r = unsafe { ioctl_with_mut_ref(self, nr::KVM_CLEAR_DIRTY_LOG(), &mut c) };
        if r < 0 {
            return Err(Error::last(Op::ClearDirtyLog));
        }
        Ok(())
    }

    fn reset_dirty_rings(&self) -> Result<u32> {
        loop {
            // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument and touches no user memory.
            let r = unsafe { ioctl(self, nr::KVM_RESET_DIRTY_RINGS()) };
            if r >= 0 {
                return Ok(r as u32);
            }
            let e = Error::last(Op::ResetDirtyRings);
            if e.errno() != Some(libc::EINTR) {
                return Err(e);
            }
        }
    }
}

/// The fds that answer `KVM_CHECK_EXTENSION`: the system fd ([`Kvm`]) and a VM fd
/// ([`VmFd`], which answers for that VM).
pub trait ExtensionFd {
    /// `KVM_CHECK_EXTENSION(cap)`: the kernel's return value (negative with `errno` set on
    /// failure).
    fn check_extension_raw(&self, cap: libc::c_ulong) -> i32;
}

impl ExtensionFd for Kvm {
    fn check_extension_raw(&self, cap: libc::c_ulong) -> i32 {
        Kvm::check_extension_raw(self, cap)
    }
}

impl ExtensionFd for VmFd {
    fn check_extension_raw(&self, cap: libc::c_ulong) -> i32 {
        VmFd::check_extension_raw(self, cap)
    }
}

/// Machine-check support for a vCPU, as QEMU sets it up: `KVM_X86_SETUP_MCE` with as many
/// banks as `KVM_CHECK_EXTENSION(KVM_CAP_MCE)` allows, at most 10 (QEMU's count), and the
/// `MCG_CTL_P` / `MCG_SER_P` capabilities `KVM_X86_GET_MCE_CAP_SUPPORTED` reports. Returns the
/// `MCG_CAP` set, or 0 when the kernel has no MCE support (nothing is set up then).
/// `kvm-ioctls` has neither ioctl.
pub fn setup_mce(kvm: &Kvm, vcpu: &kvm_ioctls::VcpuFd) -> Result<u64> {
    /// `KVM_CAP_MCE`.
    const KVM_CAP_MCE: u32 = 31;
    let banks = check_extension(kvm, KVM_CAP_MCE)?.clamp(0, 10) as u64;
    if banks == 0 {
        return Ok(0);
    }
    let mut supported = 0u64;
    // SAFETY: the ioctl writes one u64 into `supported`, which lives across the call.
    let r = unsafe { ioctl_with_mut_ref(kvm, nr::KVM_X86_GET_MCE_CAP_SUPPORTED(), &mut supported) };
    if r < 0 {
        return Err(Error::last(Op::Machine("KVM_X86_GET_MCE_CAP_SUPPORTED")));
    }
    const MCG_CTL_P: u64 = 1 << 8;
    const MCG_SER_P: u64 = 1 << 24;
    let cap = banks | (supported & (MCG_CTL_P | MCG_SER_P));
    // SAFETY: the ioctl reads one u64 from `cap`, which lives across the call.
    let r = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vcpu, nr::KVM_X86_SETUP_MCE(), &cap) };
    if r < 0 {
        return Err(Error::last(Op::Machine("KVM_X86_SETUP_MCE")));
    }
    Ok(cap)
}

/// `KVM_CHECK_EXTENSION(cap)` through `kvm-ioctls`' `check_extension_raw` on the system fd
/// or a VM fd. Returns the kernel's value: 0 when unsupported, otherwise 1 or a cap-specific
/// number.
pub fn check_extension(fd: &impl ExtensionFd, cap: u32) -> Result<i64> {
    let r = fd.check_extension_raw(libc::c_ulong::from(cap));
    if r < 0 {
        return Err(Error::last(Op::CheckExtension));
    }
    Ok(i64::from(r))
}

/// `KVM_ENABLE_CAP` ([`VmFd::enable_cap`]) with all four arguments. `op` names the
/// capability for errors.
pub fn enable_cap(vm: &VmFd, op: Op, cap: u32, flags: u32, args: [u64; 4]) -> Result<()> {
    let c = kvm_enable_cap {
        cap,
        flags,
        args,
        ..Default::default()
    };
    vm.enable_cap(&c).map_err(|e| Error::from_sys(op, e))
}

/// `KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, flags)` with `args[0] = mode`:
/// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`, optionally with `KVM_DIRTY_LOG_INITIALLY_SET`, or 0
/// to turn manual protect off. Other values are passed through so that the kernel's checks
/// can be observed.
pub fn enable_manual_protect(vm: &VmFd, flags: u32, mode: u64) -> Result<()> {
    enable_cap(
        vm,
        Op::EnableManualProtect,
        KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        flags,
        [mode, 0, 0, 0],
    )
}

/// Which dirty ring capability a VM uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
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
pub fn probe_dirty_ring(vm: &VmFd) -> Result<(RingFlavor, u64)> {
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
pub fn enable_dirty_ring(vm: &VmFd, flavor: RingFlavor, flags: u32, bytes: u64) -> Result<()> {
    enable_cap(
        vm,
        Op::EnableDirtyRing,
        flavor.cap(),
        flags,
        [bytes, 0, 0, 0],
    )
}

/// `KVM_GET_DIRTY_LOG` of `slot` into `bitmap`: [`VmFdDirtyLogExt::get_dirty_log_into`].
///
/// # Safety
///
/// As [`VmFdDirtyLogExt::get_dirty_log_into`]: `bitmap` holds the slot's
/// `npages.div_ceil(64)` words if the slot exists.
pub unsafe fn get_dirty_log(vm: &VmFd, slot: u32, bitmap: &mut [u64]) -> Result<()> {
    // SAFETY: this function's contract is the method's.
    unsafe { vm.get_dirty_log_into(slot, bitmap) }
}

/// `KVM_CLEAR_DIRTY_LOG`: [`VmFdDirtyLogExt::clear_dirty_log`].
pub fn clear_dirty_log(
    vm: &VmFd,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bitmap: &[u64],
) -> Result<()> {
    vm.clear_dirty_log(slot, first_page, num_pages, bitmap)
}

/// `KVM_RESET_DIRTY_RINGS`: [`VmFdDirtyLogExt::reset_dirty_rings`].
pub fn reset_dirty_rings(vm: &VmFd) -> Result<u32> {
    vm.reset_dirty_rings()
}

/// `KVM_SET_USER_MEMORY_REGION` ([`VmFd::set_user_memory_region`]) with a typed error.
///
/// # Safety
///
/// When `memory_size != 0`, `[userspace_addr, userspace_addr + memory_size)` must be memory the
/// caller owns for as long as the slot exists *and* any vCPU of the VM can run: the guest
/// writes to it behind Rust's back.
pub unsafe fn set_user_memory_region(
    vm: &VmFd,
    region: &kvm_userspace_memory_region,
) -> Result<()> {
    // SAFETY: the memory the region names is valid by this function's contract.
    unsafe { vm.set_user_memory_region(*region) }
        .map_err(|e| Error::from_sys(Op::SetUserMemoryRegion, e))
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
    }

    #[test]
    fn clear_checks_the_buffer_before_the_kernel() {
        let kvm = kvm_ioctls::Kvm::new()
            .expect("this test needs /dev/kvm (load kvm_intel or kvm_amd, run as root)");
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        // Slot 0 does not exist: only the length check can make this fail with
        // BufferTooSmall (the kernel would say ENOENT).
        let e = vm.clear_dirty_log(0, 0, 65, &[0]).unwrap_err();
        assert!(
            matches!(e, Error::BufferTooSmall { need: 2, got: 1 }),
            "{e}"
        );
        assert_eq!(e.errno(), Some(libc::EFAULT));
        let e = clear_dirty_log(&vm, 0, 0, 64, &[0]).unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENOENT), "{e}");
    }
}
